//! The log (SPEC §7): a versioned envelope around every event body, hash-chained.
//!
//! Envelopes are encoded with bincode 2 (serde). A sled record holds one or more consecutive
//! envelopes (a group-commit frame) behind a one-byte record format tag. Types here avoid serde
//! attributes that bincode cannot honour (`skip_serializing_if`, `flatten`, internal tags).

use crate::policy::ResolvedPolicy;
use crate::pricing::PriceTable;
use crate::wire::Usage;
use crate::{Labels, Micros, TsMicros};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version of the envelope format written by this build.
pub const ENVELOPE_VERSION: u16 = 1;
/// Tag of a sled record that holds a bincode `Vec<Envelope>`.
pub const RECORD_FORMAT_V1: u8 = 1;

/// A 32-byte BLAKE3 hash: hex in JSON, raw bytes in bincode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }
    /// Parse lower- or upper-case hex.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(*pair.first()?)?;
            let lo = hex_val(*pair.get(1)?)?;
            *out.get_mut(i)? = (hi << 4) | lo;
        }
        Some(Self(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Hash32::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
        } else {
            <[u8; 32]>::deserialize(d).map(Hash32)
        }
    }
}

impl JsonSchema for Hash32 {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Hash32".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[0-9a-f]{64}$"})
    }
}

/// Who sent the request, from the socket's peer credentials (never from the client's word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id (0 when unknown).
    pub pid: u32,
}

/// One logged event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Envelope format version.
    pub version: u16,
    /// Dense sequence number from 1.
    pub seq: u64,
    /// Daemon receive time, Unix microseconds, strictly increasing.
    pub ts: TsMicros,
    /// Peer credentials of the request that caused it (the daemon itself: its own).
    pub actor: Actor,
    /// Hash of the previous envelope (zeros for seq 1).
    pub prev_hash: Hash32,
    /// `H(prev_hash ‖ encoding of this envelope without hash)`.
    pub hash: Hash32,
    /// The event.
    pub body: EventBody,
}

/// The part of an envelope that is hashed.
#[derive(Serialize)]
struct Hashed<'a> {
    version: u16,
    seq: u64,
    ts: TsMicros,
    actor: &'a Actor,
    body: &'a EventBody,
}

/// Errors decoding a stored record.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Empty record.
    #[error("empty record")]
    Empty,
    /// A format tag this build does not know.
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    /// An envelope version this build does not know.
    #[error("unknown envelope version {0} at seq {1}")]
    UnknownVersion(u16, u64),
    /// bincode failed.
    #[error("undecodable record: {0}")]
    Decode(String),
    /// bincode failed to encode.
    #[error("unencodable record: {0}")]
    Encode(String),
    /// Bytes left over after the envelopes.
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl Envelope {
    /// Build an envelope and compute its hash from `prev_hash`.
    pub fn seal(
        seq: u64,
        ts: TsMicros,
        actor: Actor,
        prev_hash: Hash32,
        body: EventBody,
    ) -> Result<Self, CodecError> {
        let mut env = Envelope {
            version: ENVELOPE_VERSION,
            seq,
            ts,
            actor,
            prev_hash,
            hash: Hash32::default(),
            body,
        };
        env.hash = env.compute_hash()?;
        Ok(env)
    }

    /// `H(prev_hash ‖ encoding without hash)`.
    pub fn compute_hash(&self) -> Result<Hash32, CodecError> {
        let hashed = Hashed {
            version: self.version,
            seq: self.seq,
            ts: self.ts,
            actor: &self.actor,
            body: &self.body,
        };
        let bytes = bincode::serde::encode_to_vec(&hashed, config())
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let mut h = blake3::Hasher::new();
        h.update(&self.prev_hash.0);
        h.update(&bytes);
        Ok(Hash32(*h.finalize().as_bytes()))
    }
}

/// Encode consecutive envelopes as one stored record.
pub fn encode_record(envs: &[Envelope]) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![RECORD_FORMAT_V1];
    bincode::serde::encode_into_std_write(envs, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decode a stored record into its envelopes.
pub fn decode_record(bytes: &[u8]) -> Result<Vec<Envelope>, CodecError> {
    let (tag, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if *tag != RECORD_FORMAT_V1 {
        return Err(CodecError::UnknownFormat(*tag));
    }
    let (envs, used): (Vec<Envelope>, usize) =
        bincode::serde::decode_from_slice(rest, config().with_limit::<{ 256 << 20 }>())
            .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != rest.len() {
        return Err(CodecError::Trailing(rest.len() - used));
    }
    for e in &envs {
        if e.version != ENVELOPE_VERSION {
            return Err(CodecError::UnknownVersion(e.version, e.seq));
        }
    }
    Ok(envs)
}

/// How a usage event relates to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationLink {
    /// A plain `record`.
    None,
    /// A commit of a hold the daemon knows (live or expired).
    Known,
    /// A commit naming a reservation the daemon never saw.
    Unknown,
}

/// Every event body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventBody {
    /// Usage (a `record`, or a `commit` that also releases its hold).
    UsageRecorded(UsageRecorded),
    /// A hold was granted.
    ReservationCreated(ReservationCreated),
    /// A hold was refused.
    ReservationDenied(ReservationDenied),
    /// A hold was cancelled by `release`.
    ReservationReleased(ReservationReleased),
    /// A hold got a new expiry (`extend`). Not in SPEC §7's list; see docs/protocol.md.
    ReservationExtended(ReservationExtended),
    /// A hold expired; appended by the daemon's reaper.
    ReservationExpired(ReservationExpired),
    /// A bucket crossed `warn_at` (once per bucket per window).
    BudgetWarned(BudgetCrossing),
    /// A bucket became exhausted (once per bucket per window).
    BudgetExhausted(BudgetCrossing),
    /// The policy (and price table) in force from this event on.
    PolicyApplied(PolicyApplied),
    /// New prices from `effective_from` on (retroactive repricing).
    PricingChanged(PricingChanged),
}

impl EventBody {
    /// The snake_case type name.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::UsageRecorded(_) => "usage_recorded",
            EventBody::ReservationCreated(_) => "reservation_created",
            EventBody::ReservationDenied(_) => "reservation_denied",
            EventBody::ReservationReleased(_) => "reservation_released",
            EventBody::ReservationExtended(_) => "reservation_extended",
            EventBody::ReservationExpired(_) => "reservation_expired",
            EventBody::BudgetWarned(_) => "budget_warned",
            EventBody::BudgetExhausted(_) => "budget_exhausted",
            EventBody::PolicyApplied(_) => "policy_applied",
            EventBody::PricingChanged(_) => "pricing_changed",
        }
    }

    /// Labels carried by the event, if it carries any.
    pub fn labels(&self) -> Option<&Labels> {
        match self {
            EventBody::UsageRecorded(u) => Some(&u.labels),
            EventBody::ReservationCreated(r) => Some(&r.labels),
            EventBody::ReservationDenied(r) => Some(&r.labels),
            _ => None,
        }
    }
}

/// Usage that happened. Raw token counts are the truth; cost is computed when folding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageRecorded {
    /// Client idempotency id.
    pub event_id: String,
    /// The committed hold, for a commit.
    pub reservation_id: Option<String>,
    /// Relation to the hold.
    pub reservation: ReservationLink,
    /// A commit after the hold expired.
    pub late: bool,
    /// Labels, including the derived `model`, `provider` and `tier`.
    pub labels: Labels,
    /// Model name.
    pub model: String,
    /// Counts.
    pub usage: Usage,
    /// Client-side time (audit only).
    pub occurred_at: Option<String>,
    /// Provider-reported cost, decimal USD string (audit only).
    pub reported_cost_usd: Option<String>,
    /// Digest of the request payload, for idempotency after restart.
    pub payload_digest: [u8; 16],
}

/// A granted hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationCreated {
    /// Client id of the hold.
    pub reservation_id: String,
    /// Labels, including derived ones for the chosen model.
    pub labels: Labels,
    /// The chosen model.
    pub model: String,
    /// Input tokens of the estimate.
    pub input_tokens: u64,
    /// Output tokens of the estimate, after capping.
    pub max_output_tokens: u64,
    /// Money held.
    pub hold_micros: Micros,
    /// When the hold expires (Unix µs).
    pub expires_at: TsMicros,
    /// Digest of the request payload.
    pub payload_digest: [u8; 16],
}

/// A refused hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationDenied {
    /// Client id of the hold.
    pub reservation_id: String,
    /// Labels of the request (with derived labels of the last candidate considered).
    pub labels: Labels,
    /// The last candidate considered.
    pub model: String,
    /// Money the hold would have taken.
    pub hold_micros: Micros,
    /// Reason code (`budget`, `tier_cap`, `unknown_model`, `missing_capability`, `max_keys`).
    pub reason: String,
    /// Budget that denied, when one did.
    pub budget: Option<String>,
    /// Its scope key.
    pub key: Option<String>,
    /// Digest of the request payload.
    pub payload_digest: [u8; 16],
}

/// A cancelled hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationReleased {
    /// The hold.
    pub reservation_id: String,
    /// Always `"cancelled"` in this version.
    pub reason: String,
}

/// A hold with a new expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationExtended {
    /// The hold.
    pub reservation_id: String,
    /// New expiry (Unix µs).
    pub expires_at: TsMicros,
}

/// An expired hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationExpired {
    /// The hold.
    pub reservation_id: String,
}

/// A bucket crossing a threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetCrossing {
    /// Budget id.
    pub budget: String,
    /// Scope key.
    pub key: String,
    /// Start of the window in which it happened (Unix µs; 0 for cumulative).
    pub window_start: TsMicros,
    /// Spent at that moment.
    pub spent_micros: Micros,
    /// Held at that moment.
    pub held_micros: Micros,
    /// Utilization in parts per million.
    pub utilization_ppm: u64,
}

/// The policy from this event on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyApplied {
    /// Policy version (1, 2, …).
    pub policy_version: u64,
    /// Where it came from (file path or `embedded default`).
    pub source: String,
    /// BLAKE3 of the source text, hex.
    pub source_hash: String,
    /// The resolved policy, prices included.
    pub policy: ResolvedPolicy,
}

/// New prices from `effective_from` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PricingChanged {
    /// Events with `ts >= effective_from` are priced with `pricing`.
    pub effective_from: TsMicros,
    /// The full new table.
    pub pricing: PriceTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_body(id: &str) -> EventBody {
        EventBody::UsageRecorded(UsageRecorded {
            event_id: id.into(),
            reservation_id: None,
            reservation: ReservationLink::None,
            late: false,
            labels: Labels::from([("team".into(), "search".into())]),
            model: "gpt-4o".into(),
            usage: Usage::default(),
            occurred_at: None,
            reported_cost_usd: None,
            payload_digest: [7; 16],
        })
    }

    #[test]
    fn record_roundtrips_and_chain_hash_is_recomputable() {
        let a =
            Envelope::seal(1, 10, Actor::default(), Hash32::default(), usage_body("a")).unwrap();
        let b = Envelope::seal(2, 11, Actor::default(), a.hash, usage_body("b")).unwrap();
        let bytes = encode_record(&[a.clone(), b.clone()]).unwrap();
        let back = decode_record(&bytes).unwrap();
        assert_eq!(back, vec![a.clone(), b.clone()]);
        assert_eq!(back[1].compute_hash().unwrap(), b.hash);
        assert_eq!(back[1].prev_hash, a.hash);
    }

    #[test]
    fn tampered_body_changes_hash() {
        let a =
            Envelope::seal(1, 10, Actor::default(), Hash32::default(), usage_body("a")).unwrap();
        let mut t = a.clone();
        t.body = usage_body("x");
        assert_ne!(t.compute_hash().unwrap(), a.hash);
    }

    #[test]
    fn garbage_records_are_errors_not_panics() {
        assert!(decode_record(&[]).is_err());
        assert!(decode_record(&[9, 1, 2]).is_err());
        assert!(decode_record(&[RECORD_FORMAT_V1, 0xff, 0xff, 0xff]).is_err());
        let a =
            Envelope::seal(1, 10, Actor::default(), Hash32::default(), usage_body("a")).unwrap();
        let mut bytes = encode_record(&[a]).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_record(&bytes),
            Err(CodecError::Trailing(1))
        ));
        bytes.truncate(bytes.len() - 5);
        assert!(decode_record(&bytes).is_err());
    }

    #[test]
    fn hash_hex_roundtrip() {
        let h = Hash32([0xab; 32]);
        assert_eq!(Hash32::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash32::from_hex("zz"), None);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
    }
}
