//! The log (SPEC §7): a versioned envelope around every event body, hash-chained.
//!
//! A sled record holds one or more consecutive envelopes (a group-commit frame) behind a
//! one-byte record format tag:
//!
//! - **Format 2** (written now): the first envelope's `prev_hash`, the number of envelopes, then
//!   per envelope its encoded length, its `hash` and its encoding: bincode 2 (serde) of
//!   `{version, seq, ts, actor, body}`. Each envelope is encoded once, when it is sealed, and
//!   `hash = BLAKE3(prev_hash ‖ those very bytes)`: the chain covers the bytes stored, so
//!   checking it never re-encodes anything ([`decode_record_checked`]). A `policy_applied`'s
//!   policy and a `pricing_changed`'s table are stored as JSON inside the bincode body, so that
//!   the policy can grow keys without a new log format.
//! - **Format 1** (read only): bincode of `Vec<Envelope>` with the bodies of envelope version 1
//!   ([`v1`]); its chain hash is over the canonical re-encoding in those types.
//!
//! Types here avoid serde attributes that bincode cannot honour (`skip_serializing_if`,
//! `flatten`, internal tags).

mod chain_many;
mod labels;
pub mod receipts;
pub(crate) mod text;
pub mod v1;

pub use chain_many::chain_hash_many;
pub use labels::{copy_short, EventLabels, SharingLabels, SUBSCRIPTION_LABEL};

use crate::policy::ResolvedPolicy;
use crate::pricing::PriceTable;
use crate::wire::Usage;
use crate::{Labels, Micros, TsMicros};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version of the envelope format written by this build.
pub const ENVELOPE_VERSION: u16 = 2;
/// Tag of a record of format 1: bincode `Vec<Envelope>` of envelope version 1 (read only).
pub const RECORD_FORMAT_V1: u8 = 1;
/// Tag of a record of format 2: framed envelopes, each hashed as stored.
pub const RECORD_FORMAT_V2: u8 = 2;
/// Most envelopes in one record (a group commit is far smaller).
pub const MAX_RECORD_ENVELOPES: u64 = 1 << 20;

/// A 32-byte BLAKE3 hash: hex in JSON, raw bytes in bincode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// Lower-case hex (blake3's encoder).
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    /// Parse lower- or upper-case hex (blake3's decoder).
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Self(*h.as_bytes()))
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

/// The part of an envelope that is encoded and hashed (everything but the hashes).
#[derive(Serialize)]
struct Content<'a> {
    version: u16,
    seq: u64,
    ts: TsMicros,
    actor: &'a Actor,
    body: &'a EventBody,
}

/// [`Content`], decoded.
#[derive(Deserialize)]
struct OwnedContent {
    version: u16,
    seq: u64,
    ts: TsMicros,
    actor: Actor,
    body: EventBody,
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

/// Largest record accepted when decoding.
const MAX_RECORD_BYTES: usize = 256 << 20;

/// An envelope encoded once, as it is stored: its seq, its hash and its bytes
/// (`bincode({version, seq, ts, actor, body})`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Its seq.
    pub seq: u64,
    /// Its `ts`.
    pub ts: TsMicros,
    /// `BLAKE3(prev_hash ‖ bytes)`.
    pub hash: Hash32,
    /// The hash of the envelope before it.
    pub prev_hash: Hash32,
    /// The encoded envelope without its hashes.
    pub bytes: Vec<u8>,
}

/// `BLAKE3(prev ‖ bytes)`.
pub fn chain_hash(prev: &Hash32, bytes: &[u8]) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(&prev.0);
    h.update(bytes);
    Hash32(*h.finalize().as_bytes())
}

/// Encode an event once, as the next link of the chain after `prev_hash`.
pub fn seal(
    seq: u64,
    ts: TsMicros,
    actor: &Actor,
    prev_hash: Hash32,
    body: &EventBody,
) -> Result<Sealed, CodecError> {
    let content = Content {
        version: ENVELOPE_VERSION,
        seq,
        ts,
        actor,
        body,
    };
    let bytes = bincode::serde::encode_to_vec(&content, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(Sealed {
        seq,
        ts,
        hash: chain_hash(&prev_hash, &bytes),
        prev_hash,
        bytes,
    })
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
        let sealed = seal(seq, ts, &actor, prev_hash, &body)?;
        Ok(Envelope {
            version: ENVELOPE_VERSION,
            seq,
            ts,
            actor,
            prev_hash,
            hash: sealed.hash,
            body,
        })
    }

    /// `H(prev_hash ‖ encoding without hashes)`, the encoding being the canonical one of the
    /// envelope's version (for a decoded record, [`decode_record_checked`] gives the hash of
    /// the bytes actually stored).
    pub fn compute_hash(&self) -> Result<Hash32, CodecError> {
        if self.version == v1::ENVELOPE_VERSION_V1 {
            return v1::compute_hash(self);
        }
        let content = Content {
            version: self.version,
            seq: self.seq,
            ts: self.ts,
            actor: &self.actor,
            body: &self.body,
        };
        let bytes = bincode::serde::encode_to_vec(&content, config())
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(chain_hash(&self.prev_hash, &bytes))
    }

    /// The envelope as it is stored: sealed again from its fields (for tests and tools; the
    /// writer seals each event once, with [`seal`]).
    pub fn to_sealed(&self) -> Result<Sealed, CodecError> {
        seal(self.seq, self.ts, &self.actor, self.prev_hash, &self.body)
    }
}

/// Encode consecutive envelopes as one stored record, as they are: version-2 envelopes in a
/// format-2 record, version-1 envelopes (decoded from an old record) in a format-1 record.
/// Their `hash` fields are written as given (a sealed envelope's is the hash of the bytes
/// written); a format-2 record stores only the first `prev_hash`, each later envelope's being
/// the `hash` before it, so `decode(encode(x)) == x` for a chained `x`.
pub fn encode_record(envs: &[Envelope]) -> Result<Vec<u8>, CodecError> {
    if !envs.is_empty() && envs.iter().all(|e| e.version == v1::ENVELOPE_VERSION_V1) {
        return v1::encode_record_v1(envs);
    }
    let mut sealed = Vec::with_capacity(envs.len());
    for e in envs {
        if e.version != ENVELOPE_VERSION {
            return Err(CodecError::Encode(format!(
                "envelope {} of version {} in a record of version {ENVELOPE_VERSION}",
                e.seq, e.version
            )));
        }
        let content = Content {
            version: e.version,
            seq: e.seq,
            ts: e.ts,
            actor: &e.actor,
            body: &e.body,
        };
        let bytes = bincode::serde::encode_to_vec(&content, config())
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        sealed.push(Sealed {
            seq: e.seq,
            ts: e.ts,
            hash: e.hash,
            prev_hash: e.prev_hash,
            bytes,
        });
    }
    Ok(encode_sealed(&sealed))
}

/// One stored record (format 2) of consecutive sealed envelopes, whose bytes are copied as
/// they are.
pub fn encode_sealed(sealed: &[Sealed]) -> Vec<u8> {
    let size: usize = sealed.iter().map(|s| s.bytes.len() + 40).sum();
    let mut out = Vec::with_capacity(1 + 32 + 5 + size);
    out.push(RECORD_FORMAT_V2);
    out.extend_from_slice(&sealed.first().map(|s| s.prev_hash).unwrap_or_default().0);
    put_varint(&mut out, sealed.len() as u64);
    for s in sealed {
        put_varint(&mut out, s.bytes.len() as u64);
        out.extend_from_slice(&s.hash.0);
        out.extend_from_slice(&s.bytes);
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, CodecError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes
            .get(*at)
            .ok_or_else(|| CodecError::Decode("record ends inside a length".into()))?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::Decode("a length of more than 64 bits".into()))
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], CodecError> {
    let end = at
        .checked_add(n)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| CodecError::Decode(format!("record ends inside a field of {n} bytes")))?;
    let out = bytes.get(*at..end).unwrap_or_default();
    *at = end;
    Ok(out)
}

fn hash_at(bytes: &[u8], at: &mut usize) -> Result<Hash32, CodecError> {
    let raw = take(bytes, at, 32)?;
    let mut h = [0u8; 32];
    h.copy_from_slice(raw);
    Ok(Hash32(h))
}

/// A decoded envelope with the hash of its bytes as stored (which the chain check compares
/// with the stored `hash`).
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The envelope as stored (its `hash` is the stored one).
    pub env: Envelope,
    /// `H(prev_hash ‖ its bytes as stored)`.
    pub content_hash: Hash32,
}

/// Decode a stored record into its envelopes.
pub fn decode_record(bytes: &[u8]) -> Result<Vec<Envelope>, CodecError> {
    decode_record_checked(bytes).map(|v| v.into_iter().map(|c| c.env).collect())
}

/// Decode a stored record, with the hash of each envelope's stored bytes.
pub fn decode_record_checked(bytes: &[u8]) -> Result<Vec<Checked>, CodecError> {
    let (tag, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match *tag {
        RECORD_FORMAT_V2 => decode_v2(rest),
        RECORD_FORMAT_V1 => v1::decode(rest),
        other => Err(CodecError::UnknownFormat(other)),
    }
}

fn decode_v2(rest: &[u8]) -> Result<Vec<Checked>, CodecError> {
    let decoded = decode_v2_with(
        rest,
        |env, body, at| (env, at..at + body.len()),
        |(env, _)| env,
    )?;
    let links: Vec<(&Hash32, &[u8])> = decoded
        .iter()
        // The ranges are where `decode_v2_with` found the bodies in `rest`.
        .map(|(env, range)| (&env.prev_hash, rest.get(range.clone()).unwrap_or_default()))
        .collect();
    let hashes = chain_hash_many(&links);
    Ok(decoded
        .into_iter()
        .zip(hashes)
        .map(|((env, _), content_hash)| Checked { env, content_hash })
        .collect())
}

/// A decoded envelope whose chain hash may still have to be computed, over its bytes in the
/// record it was decoded from ([`decode_record_deferred`]): recovery decodes records on one
/// thread and hashes their events on another.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferred {
    /// The envelope as stored.
    pub env: Envelope,
    hashed: Hashed,
}

#[derive(Debug, Clone, PartialEq)]
enum Hashed {
    /// Computed while decoding (a format-1 record's hash is over a re-encoding).
    Done(Hash32),
    /// The envelope's bytes in the record, to hash after `env.prev_hash`.
    Over(std::ops::Range<usize>),
}

impl Deferred {
    /// `H(prev_hash ‖ its bytes as stored)`; `record` is the record it was decoded from.
    pub fn content_hash(&self, record: &[u8]) -> Result<Hash32, CodecError> {
        match &self.hashed {
            Hashed::Done(h) => Ok(*h),
            Hashed::Over(range) => record
                .get(range.clone())
                .map(|bytes| chain_hash(&self.env.prev_hash, bytes))
                .ok_or_else(|| CodecError::Decode("not the record it was decoded from".into())),
        }
    }
}

/// Compute the hashes of every event of `events` not hashed yet, side by side
/// ([`chain_hash_many`]); `record` is the record they were decoded from. An event whose bytes
/// are not in `record` is left as it is, for [`Deferred::content_hash`] to report.
pub fn hash_all(record: &[u8], events: &mut [Deferred]) {
    if !events.iter().any(|d| matches!(d.hashed, Hashed::Over(_))) {
        return;
    }
    let mut which = Vec::with_capacity(events.len());
    let mut links = Vec::with_capacity(events.len());
    for (i, d) in events.iter().enumerate() {
        if let Hashed::Over(range) = &d.hashed {
            if let Some(bytes) = record.get(range.clone()) {
                which.push(i);
                links.push((&d.env.prev_hash, bytes));
            }
        }
    }
    let hashes = chain_hash_many(&links);
    for (i, h) in which.into_iter().zip(hashes) {
        events[i].hashed = Hashed::Done(h);
    }
}

/// [`decode_record_checked`] without hashing: each envelope with where its bytes lie in
/// `bytes`, which [`Deferred::content_hash`] hashes later.
pub fn decode_record_deferred(bytes: &[u8]) -> Result<Vec<Deferred>, CodecError> {
    let (tag, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match *tag {
        RECORD_FORMAT_V2 => decode_v2_with(
            rest,
            |env, body, at| Deferred {
                env,
                // `at` is in `rest`, one byte into `bytes`.
                hashed: Hashed::Over(at + 1..at + 1 + body.len()),
            },
            |d| &mut d.env,
        ),
        RECORD_FORMAT_V1 => v1::decode(rest).map(|v| {
            v.into_iter()
                .map(|c| Deferred {
                    env: c.env,
                    hashed: Hashed::Done(c.content_hash),
                })
                .collect()
        }),
        other => Err(CodecError::UnknownFormat(other)),
    }
}

/// Decode a format-2 record's envelopes, each passed to `make` with its bytes as stored and
/// where they start in `rest`; `env_of` finds the envelope in what `make` made. While this
/// thread shares label sets, their lookups are put off until the record is decoded
/// ([`labels::PutOffLookups`]): `make` must not read an envelope's labels, which are a
/// stand-in (an empty map) until then.
fn decode_v2_with<T>(
    rest: &[u8],
    mut make: impl FnMut(Envelope, &[u8], usize) -> T,
    env_of: impl Fn(&mut T) -> &mut Envelope,
) -> Result<Vec<T>, CodecError> {
    if rest.len() > MAX_RECORD_BYTES {
        return Err(CodecError::Decode(format!(
            "a record of {} bytes (the limit is {MAX_RECORD_BYTES})",
            rest.len()
        )));
    }
    let mut at = 0usize;
    let mut prev = hash_at(rest, &mut at)?;
    let n = get_varint(rest, &mut at)?;
    // Each envelope takes at least 33 bytes: no allocation for a count the bytes cannot hold.
    if n > MAX_RECORD_ENVELOPES || n > (rest.len() as u64) / 33 {
        return Err(CodecError::Decode(format!(
            "a record claiming {n} envelopes"
        )));
    }
    let mut out = Vec::with_capacity(n as usize);
    let put_off = labels::PutOffLookups::start();
    for _ in 0..n {
        let len = get_varint(rest, &mut at)?;
        let len = usize::try_from(len).map_err(|_| CodecError::Decode("length".into()))?;
        let hash = hash_at(rest, &mut at)?;
        let start = at;
        let body = take(rest, &mut at, len)?;
        let unread = receipts::left_unread();
        // No bincode limit: what decoding a body allocates is bounded by its bytes (`text`).
        let (c, used): (OwnedContent, usize) = bincode::serde::decode_from_slice(body, config())
            .map_err(|e| CodecError::Decode(e.to_string()))?;
        // The event's bytes after the fields read (not the record's `rest`).
        let unread_bytes = body.get(used..).unwrap_or_default();
        if receipts::left_unread() == unread {
            if !unread_bytes.is_empty() {
                return Err(CodecError::Trailing(unread_bytes.len()));
            }
        } else if !receipts::could_be_receipt(unread_bytes) {
            // What is left must be the receipt the fold left unread (the last field of the
            // event: `receipts::without_receipts`).
            return Err(CodecError::Decode(format!(
                "event {} ends in {} bytes that are not a receipt",
                c.seq,
                unread_bytes.len()
            )));
        }
        if c.version != ENVELOPE_VERSION {
            return Err(CodecError::UnknownVersion(c.version, c.seq));
        }
        let env = Envelope {
            version: c.version,
            seq: c.seq,
            ts: c.ts,
            actor: c.actor,
            prev_hash: prev,
            hash,
            body: c.body,
        };
        out.push(make(env, body, start));
        prev = hash;
    }
    if at != rest.len() {
        return Err(CodecError::Trailing(rest.len() - at));
    }
    let resolved = put_off.resolve(out.iter_mut().filter_map(|t| env_of(t).body.labels_mut()));
    if let Err(e) = resolved {
        return Err(CodecError::Decode(match e {
            labels::PutOffError::NotText(i) => {
                // The `i`-th of the places `resolve` was given.
                let seq = out
                    .iter_mut()
                    .map(&env_of)
                    .filter_map(|e| {
                        let seq = e.seq;
                        e.body.labels_mut().map(|_| seq)
                    })
                    .nth(i);
                format!(
                    "event {}: a label name or value is not valid UTF-8",
                    seq.map_or_else(|| "?".to_string(), |s| s.to_string())
                )
            }
            labels::PutOffError::Places => {
                "a label set decoded where no event has a place for it".into()
            }
            labels::PutOffError::Lost => {
                "the label sets were let go while a record was decoded".into()
            }
        }));
    }
    Ok(out)
}

/// Serde helpers for a value stored as JSON inside bincode (and as itself in JSON): policies
/// and price tables, whose keys grow over time, so that a log never needs a new format for it.
pub mod json_inside {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serialize `v` as JSON bytes in a binary format, as itself in a human-readable one.
    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            v.serialize(s)
        } else {
            let bytes = serde_json::to_vec(v).map_err(serde::ser::Error::custom)?;
            s.serialize_bytes(&bytes)
        }
    }

    /// The inverse of [`serialize`].
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        if d.is_human_readable() {
            T::deserialize(d)
        } else {
            let bytes = super::Bytes::deserialize(d)?;
            serde_json::from_slice(&bytes.0).map_err(serde::de::Error::custom)
        }
    }
}

/// Bytes read from a binary format.
struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bytes, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        // Borrowed where the format can (bincode from a slice): a damaged length is then an
        // error, not an allocation (`text`).
        d.deserialize_bytes(V)
    }
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
    /// A commit of a reservation the daemon denied (the call went ahead without a hold): the
    /// usage is recorded with the commit's own labels and model where it gives them, the
    /// denial's otherwise.
    Denied,
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
    /// What a provider said about a `[[quota]]` (SPEC §10 `observe`, or a commit's headers).
    QuotaObserved(QuotaObserved),
    /// An observed provider limit ran out (once per observation and limit).
    QuotaExhausted(QuotaExhausted),
}

/// Every event type's name ([`EventBody::kind`]), in SPEC §7's order.
pub const EVENT_KINDS: [&str; 12] = [
    "usage_recorded",
    "reservation_created",
    "reservation_denied",
    "reservation_released",
    "reservation_extended",
    "reservation_expired",
    "budget_warned",
    "budget_exhausted",
    "policy_applied",
    "pricing_changed",
    "quota_observed",
    "quota_exhausted",
];

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
            EventBody::QuotaObserved(_) => "quota_observed",
            EventBody::QuotaExhausted(_) => "quota_exhausted",
        }
    }

    /// The labels field of the event, if its kind has one (each has at most one).
    pub fn labels_mut(&mut self) -> Option<&mut EventLabels> {
        match self {
            EventBody::UsageRecorded(u) => Some(&mut u.labels),
            EventBody::ReservationCreated(r) => Some(&mut r.labels),
            EventBody::ReservationDenied(r) => Some(&mut r.labels),
            EventBody::QuotaObserved(q) => Some(&mut q.labels),
            // Every kind listed: a kind with labels left out here would fail every record
            // holding one on a thread that shares label sets (`labels::PutOffLookups`).
            EventBody::ReservationReleased(_)
            | EventBody::ReservationExtended(_)
            | EventBody::ReservationExpired(_)
            | EventBody::BudgetWarned(_)
            | EventBody::BudgetExhausted(_)
            | EventBody::PolicyApplied(_)
            | EventBody::PricingChanged(_)
            | EventBody::QuotaExhausted(_) => None,
        }
    }

    /// The labels field of the event, if its kind has one (the kinds of
    /// [`EventBody::labels_mut`], which lists every kind; the samples of every kind are
    /// checked against it in `schemas/tests/labels_put_off.rs`).
    pub fn event_labels(&self) -> Option<&EventLabels> {
        match self {
            EventBody::UsageRecorded(u) => Some(&u.labels),
            EventBody::ReservationCreated(r) => Some(&r.labels),
            EventBody::ReservationDenied(r) => Some(&r.labels),
            EventBody::QuotaObserved(q) => Some(&q.labels),
            _ => None,
        }
    }

    /// Labels carried by the event, if it carries any.
    pub fn labels(&self) -> Option<&Labels> {
        self.event_labels().map(|l| &**l)
    }
}

/// Usage that happened. Raw token counts are the truth; cost is computed when folding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageRecorded {
    /// Client idempotency id.
    #[serde(deserialize_with = "text::owned")]
    pub event_id: String,
    /// The committed hold, for a commit.
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub reservation_id: Option<String>,
    /// Relation to the hold.
    pub reservation: ReservationLink,
    /// A commit after the hold expired.
    pub late: bool,
    /// Labels, including the derived `model`, `provider` and `tier`.
    pub labels: EventLabels,
    /// Model name.
    #[serde(deserialize_with = "text::owned")]
    pub model: String,
    /// Counts.
    pub usage: Usage,
    /// Client-side time (audit only).
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub occurred_at: Option<String>,
    /// Provider-reported cost, decimal USD string (audit only).
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub reported_cost_usd: Option<String>,
    /// Digest of the request payload, for idempotency after restart.
    pub payload_digest: [u8; 16],
    /// What the daemon answered (absent in events of envelope version 1).
    #[serde(default, deserialize_with = "receipts::maybe_skipped")]
    pub receipt: Option<Receipt>,
}

/// A granted hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationCreated {
    /// Client id of the hold.
    #[serde(deserialize_with = "text::owned")]
    pub reservation_id: String,
    /// Labels, including derived ones for the chosen model.
    pub labels: EventLabels,
    /// The chosen model.
    #[serde(deserialize_with = "text::owned")]
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
    /// What the daemon answered (absent in events of envelope version 1).
    #[serde(default, deserialize_with = "receipts::maybe_skipped")]
    pub receipt: Option<Receipt>,
}

/// A refused hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationDenied {
    /// Client id of the hold.
    #[serde(deserialize_with = "text::owned")]
    pub reservation_id: String,
    /// Labels of the request (with derived labels of the last candidate considered).
    pub labels: EventLabels,
    /// The last candidate considered.
    #[serde(deserialize_with = "text::owned")]
    pub model: String,
    /// Money the hold would have taken.
    pub hold_micros: Micros,
    /// Reason code (`budget`, `tier_cap`, `unknown_model`, `missing_capability`, `max_keys`).
    #[serde(deserialize_with = "text::owned")]
    pub reason: String,
    /// Budget that denied, when one did.
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub budget: Option<String>,
    /// Its scope key.
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub key: Option<String>,
    /// Digest of the request payload.
    pub payload_digest: [u8; 16],
    /// Output tokens of the estimate of the last candidate considered, after capping (0 when
    /// none was priced).
    pub max_output_tokens: u64,
    /// What the daemon answered (absent in events of envelope version 1).
    #[serde(default, deserialize_with = "receipts::maybe_skipped")]
    pub receipt: Option<Receipt>,
}

/// A cancelled hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationReleased {
    /// The hold.
    #[serde(deserialize_with = "text::owned")]
    pub reservation_id: String,
    /// Always `"cancelled"` in this version.
    #[serde(deserialize_with = "text::owned")]
    pub reason: String,
    /// Digest of the request payload (`release` is idempotent too).
    pub payload_digest: [u8; 16],
}

/// What the daemon answered to the request that an event records, as far as the event does not
/// say it already: with the policy in force (its budgets, by `policy_version`) it renders the
/// original answer again, byte for byte, for a resent request (a duplicate), and shows
/// afterwards why the daemon said what it said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The policy the answer's budget lines refer to.
    pub policy_version: u64,
    /// The answer's budget lines, in order.
    pub lines: Vec<ReceiptLine>,
    /// Usage: the cost answered (a later repricing changes the fold, not what was answered).
    pub cost_micros: Micros,
    /// Usage: priced at the table's highest prices (unknown model).
    pub priced_at_max: bool,
    /// Usage: a commit's cost above its hold.
    pub overrun_micros: Option<Micros>,
    /// Reservations: the decision.
    pub decision: Option<crate::wire::Decision>,
    /// Reservations: the candidates skipped, in order.
    pub skipped: Vec<crate::wire::Skipped>,
    /// A denial: its reason, in words.
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub message: Option<String>,
}

/// One budget line of an answer: the budget (its index in the policy), whether the line is the
/// budget's `(overflow)` bucket (else the scope of the event's labels), and the bucket's figures
/// as answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiptLine {
    /// Index of the budget in the policy.
    pub budget: u32,
    /// The budget's `(overflow)` bucket.
    pub overflow: bool,
    /// Spent in the window.
    pub spent_micros: Micros,
    /// Tokens spent.
    pub spent_tokens: u64,
    /// Requests made.
    pub spent_requests: u64,
    /// Held by live holds.
    pub held_micros: Micros,
    /// Tokens held.
    pub held_tokens: u64,
    /// Requests held.
    pub held_requests: u64,
    /// Live holds.
    pub live_holds: u64,
}

/// A hold with a new expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationExtended {
    /// The hold.
    #[serde(deserialize_with = "text::owned")]
    pub reservation_id: String,
    /// New expiry (Unix µs).
    pub expires_at: TsMicros,
}

/// An expired hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationExpired {
    /// The hold.
    #[serde(deserialize_with = "text::owned")]
    pub reservation_id: String,
}

/// A bucket crossing a threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetCrossing {
    /// Budget id.
    #[serde(deserialize_with = "text::owned")]
    pub budget: String,
    /// Scope key.
    #[serde(deserialize_with = "text::owned")]
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
    #[serde(deserialize_with = "text::owned")]
    pub source: String,
    /// BLAKE3 of the source text, hex.
    #[serde(deserialize_with = "text::owned")]
    pub source_hash: String,
    /// The resolved policy, prices included (JSON inside the bincode body).
    #[serde(
        serialize_with = "json_inside::serialize",
        deserialize_with = "json_inside::deserialize"
    )]
    pub policy: ResolvedPolicy,
}

/// New prices from `effective_from` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PricingChanged {
    /// Events with `ts >= effective_from` are priced with `pricing`.
    pub effective_from: TsMicros,
    /// The full new table (JSON inside the bincode body).
    #[serde(
        serialize_with = "json_inside::serialize",
        deserialize_with = "json_inside::deserialize"
    )]
    pub pricing: PriceTable,
}

/// One limit a provider reported: what was left of it and when it is whole again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservedLimit {
    /// The limit per window, when the provider said it.
    pub limit: Option<u64>,
    /// What was left when the response was sent.
    pub remaining: u64,
    /// When the limit is whole again (Unix µs); the observation binds until then.
    pub reset_at: TsMicros,
}

/// A rate-limit header that was recognised but could not be read (it was ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IgnoredHeader {
    /// The header's name as it was sent.
    #[serde(deserialize_with = "text::owned")]
    pub header: String,
    /// Its value (cut to 64 characters).
    #[serde(deserialize_with = "text::owned")]
    pub value: String,
    /// What is wrong with it.
    #[serde(deserialize_with = "text::owned")]
    pub reason: String,
}

/// What a provider said about one `[[quota]]` (SPEC §10): each limit binds until its reset,
/// less the usage of the quota recorded (and held) since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaObserved {
    /// The `[[quota]]` id.
    #[serde(deserialize_with = "text::owned")]
    pub quota: String,
    /// The provider that said it.
    #[serde(deserialize_with = "text::owned")]
    pub provider: String,
    /// The labels the observation came with.
    pub labels: EventLabels,
    /// The commit's `event_id` when the headers came with a commit or record.
    #[serde(default, deserialize_with = "text::owned_opt")]
    pub event_id: Option<String>,
    /// Requests.
    pub requests: Option<ObservedLimit>,
    /// Tokens (all kinds).
    pub tokens: Option<ObservedLimit>,
    /// Input tokens (Anthropic).
    pub input_tokens: Option<ObservedLimit>,
    /// Output tokens (Anthropic).
    pub output_tokens: Option<ObservedLimit>,
    /// Rate-limit headers that could not be read.
    pub ignored: Vec<IgnoredHeader>,
}

/// One of a quota's observed limits ran out: by the observation itself (remaining 0) or by the
/// usage recorded since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaExhausted {
    /// The `[[quota]]` id.
    #[serde(deserialize_with = "text::owned")]
    pub quota: String,
    /// Which limit: `requests`, `tokens`, `input_tokens` or `output_tokens`.
    #[serde(deserialize_with = "text::owned")]
    pub limit: String,
    /// Seq of the `quota_observed` event whose limit ran out.
    pub observed_seq: u64,
    /// When it is whole again (Unix µs).
    pub reset_at: TsMicros,
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
            labels: EventLabels::from([("team".into(), "search".into())]),
            model: "gpt-4o".into(),
            usage: Usage::default(),
            occurred_at: None,
            reported_cost_usd: None,
            payload_digest: [7; 16],
            receipt: None,
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
        assert_eq!(Hash32::from_hex(&"AB".repeat(32)), Some(h));
        assert_eq!(Hash32::from_hex(&"ag".repeat(32)), None);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
    }
}
