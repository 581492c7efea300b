//! Records of format 1 (envelope version 1), read only: the first release's log.
//!
//! A format-1 record is bincode of `Vec<Envelope>` where the bodies carry the types of that
//! release; its chain hash is over the canonical bincode of `{version, seq, ts, actor, body}` in
//! those types. The types that changed since are frozen here (`ModelPrice` with one
//! long-context tier, the policy and pricing bodies that hold it, the usage and reservation
//! bodies without receipts); the rest are the current ones, unchanged since (the frozen fixtures
//! `daemon/tests/fixtures/log-format-v1.bin` and `datadir-v1/` fail if one changes). Decoded
//! envelopes are converted to the current types, keeping `version: 1`; `compute_hash`
//! converts back, which is exact for anything that came from a format-1 record.

use super::{
    chain_hash, Actor, BudgetCrossing, Checked, CodecError, Envelope, EventBody, Hash32,
    ReservationCreated, ReservationDenied, ReservationExpired, ReservationExtended,
    ReservationLink, ReservationReleased, UsageRecorded,
};
use crate::policy::{
    ResolvedBudget, ResolvedPolicy, ResolvedTierCap, ResolvedTiers, UnknownModels,
};
use crate::pricing::{ModelPrice, PriceTable, PriceTier};
use crate::wire::Usage;
use crate::TsMicros;
use crate::{Labels, Micros};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The envelope version of format-1 records.
pub const ENVELOPE_VERSION_V1: u16 = 1;

/// A model's price as the first release stored it: at most one long-context tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ModelPriceV1 {
    provider: String,
    input_per_mtok: i64,
    output_per_mtok: i64,
    cached_input_per_mtok: Option<i64>,
    cache_write_per_mtok: Option<i64>,
    above_tokens: Option<u64>,
    input_per_mtok_above: Option<i64>,
    output_per_mtok_above: Option<i64>,
    cached_input_per_mtok_above: Option<i64>,
    cache_write_per_mtok_above: Option<i64>,
    max_output_tokens: Option<u64>,
    capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PriceTableV1 {
    models: BTreeMap<String, ModelPriceV1>,
}

/// Tiers as the first release stored them: names only, no metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResolvedTiersV1 {
    default: String,
    patterns: Vec<(String, String)>,
    caps: BTreeMap<String, ResolvedTierCap>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResolvedPolicyV1 {
    reservation_ttl_seconds: u64,
    max_keys_per_budget: u64,
    unknown_models: UnknownModels,
    tiers: ResolvedTiersV1,
    budgets: Vec<ResolvedBudget>,
    pricing: PriceTableV1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PolicyAppliedV1 {
    policy_version: u64,
    source: String,
    source_hash: String,
    policy: ResolvedPolicyV1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PricingChangedV1 {
    effective_from: TsMicros,
    pricing: PriceTableV1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UsageRecordedV1 {
    event_id: String,
    reservation_id: Option<String>,
    reservation: ReservationLink,
    late: bool,
    labels: Labels,
    model: String,
    usage: Usage,
    occurred_at: Option<String>,
    reported_cost_usd: Option<String>,
    payload_digest: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReservationCreatedV1 {
    reservation_id: String,
    labels: Labels,
    model: String,
    input_tokens: u64,
    max_output_tokens: u64,
    hold_micros: Micros,
    expires_at: TsMicros,
    payload_digest: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReservationDeniedV1 {
    reservation_id: String,
    labels: Labels,
    model: String,
    hold_micros: Micros,
    reason: String,
    budget: Option<String>,
    key: Option<String>,
    payload_digest: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReservationReleasedV1 {
    reservation_id: String,
    reason: String,
}

/// The bodies of version 1, variant for variant in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum EventBodyV1 {
    UsageRecorded(UsageRecordedV1),
    ReservationCreated(ReservationCreatedV1),
    ReservationDenied(ReservationDeniedV1),
    ReservationReleased(ReservationReleasedV1),
    ReservationExtended(ReservationExtended),
    ReservationExpired(ReservationExpired),
    BudgetWarned(BudgetCrossing),
    BudgetExhausted(BudgetCrossing),
    PolicyApplied(PolicyAppliedV1),
    PricingChanged(PricingChangedV1),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EnvelopeV1 {
    version: u16,
    seq: u64,
    ts: TsMicros,
    actor: Actor,
    prev_hash: Hash32,
    hash: Hash32,
    body: EventBodyV1,
}

#[derive(Serialize)]
struct HashedV1<'a> {
    version: u16,
    seq: u64,
    ts: TsMicros,
    actor: &'a Actor,
    body: &'a EventBodyV1,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Decode the bytes after the format tag of a format-1 record.
pub(super) fn decode(rest: &[u8]) -> Result<Vec<Checked>, CodecError> {
    let (envs, used): (Vec<EnvelopeV1>, usize) =
        bincode::serde::decode_from_slice(rest, config().with_limit::<{ 256 << 20 }>())
            .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != rest.len() {
        return Err(CodecError::Trailing(rest.len() - used));
    }
    envs.into_iter()
        .map(|e| {
            if e.version != ENVELOPE_VERSION_V1 {
                return Err(CodecError::UnknownVersion(e.version, e.seq));
            }
            let content_hash = hash_of(&e.prev_hash, e.seq, e.ts, &e.actor, &e.body)?;
            Ok(Checked {
                env: Envelope {
                    version: e.version,
                    seq: e.seq,
                    ts: e.ts,
                    actor: e.actor,
                    prev_hash: e.prev_hash,
                    hash: e.hash,
                    body: e.body.into(),
                },
                content_hash,
            })
        })
        .collect()
}

fn hash_of(
    prev: &Hash32,
    seq: u64,
    ts: TsMicros,
    actor: &Actor,
    body: &EventBodyV1,
) -> Result<Hash32, CodecError> {
    let bytes = bincode::serde::encode_to_vec(
        HashedV1 {
            version: ENVELOPE_VERSION_V1,
            seq,
            ts,
            actor,
            body,
        },
        config(),
    )
    .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(chain_hash(prev, &bytes))
}

/// The chain hash of a version-1 envelope: over the canonical encoding of its body in the
/// version-1 types.
pub(super) fn compute_hash(env: &Envelope) -> Result<Hash32, CodecError> {
    let body = EventBodyV1::try_from(&env.body)?;
    hash_of(&env.prev_hash, env.seq, env.ts, &env.actor, &body)
}

/// A format-1 record of `envs` (envelopes of version 1): for tests and fixtures that need a
/// log of the first release.
pub fn encode_record_v1(envs: &[Envelope]) -> Result<Vec<u8>, CodecError> {
    let old = envs
        .iter()
        .map(|e| {
            Ok(EnvelopeV1 {
                version: ENVELOPE_VERSION_V1,
                seq: e.seq,
                ts: e.ts,
                actor: e.actor,
                prev_hash: e.prev_hash,
                hash: e.hash,
                body: EventBodyV1::try_from(&e.body)?,
            })
        })
        .collect::<Result<Vec<_>, CodecError>>()?;
    let mut out = vec![super::RECORD_FORMAT_V1];
    bincode::serde::encode_into_std_write(&old, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Seal `body` as a version-1 envelope (for fixtures of the first release's format).
pub fn seal_v1(
    seq: u64,
    ts: TsMicros,
    actor: Actor,
    prev_hash: Hash32,
    body: EventBody,
) -> Result<Envelope, CodecError> {
    let old = EventBodyV1::try_from(&body)?;
    let hash = hash_of(&prev_hash, seq, ts, &actor, &old)?;
    Ok(Envelope {
        version: ENVELOPE_VERSION_V1,
        seq,
        ts,
        actor,
        prev_hash,
        hash,
        body,
    })
}

impl From<ModelPriceV1> for ModelPrice {
    fn from(p: ModelPriceV1) -> ModelPrice {
        let tiers = match p.above_tokens {
            Some(above_tokens) => vec![PriceTier {
                above_tokens,
                input_per_mtok: p.input_per_mtok_above,
                output_per_mtok: p.output_per_mtok_above,
                cached_input_per_mtok: p.cached_input_per_mtok_above,
                cache_write_per_mtok: p.cache_write_per_mtok_above,
            }],
            None => Vec::new(),
        };
        ModelPrice {
            provider: p.provider,
            input_per_mtok: p.input_per_mtok,
            output_per_mtok: p.output_per_mtok,
            cached_input_per_mtok: p.cached_input_per_mtok,
            cache_write_per_mtok: p.cache_write_per_mtok,
            tiers,
            max_output_tokens: p.max_output_tokens,
            capabilities: p.capabilities,
        }
    }
}

fn not_v1(what: &str) -> CodecError {
    CodecError::Encode(format!("{what} cannot be written in envelope version 1"))
}

impl TryFrom<&ModelPrice> for ModelPriceV1 {
    type Error = CodecError;
    fn try_from(p: &ModelPrice) -> Result<ModelPriceV1, CodecError> {
        let tier = match p.tiers.as_slice() {
            [] => None,
            [t] => Some(t),
            _ => return Err(not_v1("a price with several long-context tiers")),
        };
        Ok(ModelPriceV1 {
            provider: p.provider.clone(),
            input_per_mtok: p.input_per_mtok,
            output_per_mtok: p.output_per_mtok,
            cached_input_per_mtok: p.cached_input_per_mtok,
            cache_write_per_mtok: p.cache_write_per_mtok,
            above_tokens: tier.map(|t| t.above_tokens),
            input_per_mtok_above: tier.and_then(|t| t.input_per_mtok),
            output_per_mtok_above: tier.and_then(|t| t.output_per_mtok),
            cached_input_per_mtok_above: tier.and_then(|t| t.cached_input_per_mtok),
            cache_write_per_mtok_above: tier.and_then(|t| t.cache_write_per_mtok),
            max_output_tokens: p.max_output_tokens,
            capabilities: p.capabilities.clone(),
        })
    }
}

impl From<PriceTableV1> for PriceTable {
    fn from(t: PriceTableV1) -> PriceTable {
        PriceTable {
            models: t.models.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }
}

impl TryFrom<&PriceTable> for PriceTableV1 {
    type Error = CodecError;
    fn try_from(t: &PriceTable) -> Result<PriceTableV1, CodecError> {
        Ok(PriceTableV1 {
            models: t
                .models
                .iter()
                .map(|(k, v)| Ok((k.clone(), ModelPriceV1::try_from(v)?)))
                .collect::<Result<_, CodecError>>()?,
        })
    }
}

impl From<ResolvedPolicyV1> for ResolvedPolicy {
    fn from(p: ResolvedPolicyV1) -> ResolvedPolicy {
        ResolvedPolicy {
            reservation_ttl_seconds: p.reservation_ttl_seconds,
            max_keys_per_budget: p.max_keys_per_budget,
            idempotency_window_seconds: crate::policy::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
            unknown_models: p.unknown_models,
            tiers: ResolvedTiers {
                default: p.tiers.default,
                patterns: p.tiers.patterns,
                caps: p.tiers.caps,
                defs: Vec::new(),
            },
            budgets: p.budgets,
            pricing: p.pricing.into(),
            subscriptions: Vec::new(),
            quotas: Vec::new(),
            report_exclude_labels: crate::policy::default_report_exclude_labels(),
        }
    }
}

impl TryFrom<&ResolvedPolicy> for ResolvedPolicyV1 {
    type Error = CodecError;
    fn try_from(p: &ResolvedPolicy) -> Result<ResolvedPolicyV1, CodecError> {
        Ok(ResolvedPolicyV1 {
            reservation_ttl_seconds: p.reservation_ttl_seconds,
            max_keys_per_budget: p.max_keys_per_budget,
            unknown_models: p.unknown_models,
            tiers: {
                if !p.tiers.defs.is_empty() {
                    return Err(not_v1("tiers with metadata"));
                }
                ResolvedTiersV1 {
                    default: p.tiers.default.clone(),
                    patterns: p.tiers.patterns.clone(),
                    caps: p.tiers.caps.clone(),
                }
            },
            budgets: p.budgets.clone(),
            pricing: PriceTableV1::try_from(&p.pricing)?,
        })
    }
}

impl From<EventBodyV1> for EventBody {
    fn from(b: EventBodyV1) -> EventBody {
        match b {
            EventBodyV1::UsageRecorded(x) => EventBody::UsageRecorded(UsageRecorded {
                event_id: x.event_id,
                reservation_id: x.reservation_id,
                reservation: x.reservation,
                late: x.late,
                labels: x.labels.into(),
                model: x.model,
                usage: x.usage,
                occurred_at: x.occurred_at,
                reported_cost_usd: x.reported_cost_usd,
                payload_digest: x.payload_digest,
                receipt: None,
            }),
            EventBodyV1::ReservationCreated(x) => {
                EventBody::ReservationCreated(ReservationCreated {
                    reservation_id: x.reservation_id,
                    labels: x.labels.into(),
                    model: x.model,
                    input_tokens: x.input_tokens,
                    max_output_tokens: x.max_output_tokens,
                    hold_micros: x.hold_micros,
                    expires_at: x.expires_at,
                    payload_digest: x.payload_digest,
                    receipt: None,
                })
            }
            EventBodyV1::ReservationDenied(x) => EventBody::ReservationDenied(ReservationDenied {
                reservation_id: x.reservation_id,
                labels: x.labels.into(),
                model: x.model,
                hold_micros: x.hold_micros,
                reason: x.reason,
                budget: x.budget,
                key: x.key,
                payload_digest: x.payload_digest,
                max_output_tokens: 0,
                receipt: None,
            }),
            EventBodyV1::ReservationReleased(x) => {
                // Version 1 kept no digest for a release: it is the digest of the only
                // request that can cause it.
                let payload_digest = crate::wire::request_digest(
                    "release",
                    &crate::wire::ReleaseRequest {
                        reservation_id: x.reservation_id.clone(),
                    },
                );
                EventBody::ReservationReleased(ReservationReleased {
                    reservation_id: x.reservation_id,
                    reason: x.reason,
                    payload_digest,
                })
            }
            EventBodyV1::ReservationExtended(x) => EventBody::ReservationExtended(x),
            EventBodyV1::ReservationExpired(x) => EventBody::ReservationExpired(x),
            EventBodyV1::BudgetWarned(x) => EventBody::BudgetWarned(x),
            EventBodyV1::BudgetExhausted(x) => EventBody::BudgetExhausted(x),
            EventBodyV1::PolicyApplied(p) => EventBody::PolicyApplied(super::PolicyApplied {
                policy_version: p.policy_version,
                source: p.source,
                source_hash: p.source_hash,
                policy: p.policy.into(),
            }),
            EventBodyV1::PricingChanged(p) => EventBody::PricingChanged(super::PricingChanged {
                effective_from: p.effective_from,
                pricing: p.pricing.into(),
            }),
        }
    }
}

impl TryFrom<&EventBody> for EventBodyV1 {
    type Error = CodecError;
    fn try_from(b: &EventBody) -> Result<EventBodyV1, CodecError> {
        Ok(match b {
            EventBody::UsageRecorded(x) => EventBodyV1::UsageRecorded(UsageRecordedV1 {
                event_id: x.event_id.clone(),
                reservation_id: x.reservation_id.clone(),
                reservation: x.reservation,
                late: x.late,
                labels: (*x.labels).clone(),
                model: x.model.clone(),
                usage: x.usage,
                occurred_at: x.occurred_at.clone(),
                reported_cost_usd: x.reported_cost_usd.clone(),
                payload_digest: x.payload_digest,
            }),
            EventBody::ReservationCreated(x) => {
                EventBodyV1::ReservationCreated(ReservationCreatedV1 {
                    reservation_id: x.reservation_id.clone(),
                    labels: (*x.labels).clone(),
                    model: x.model.clone(),
                    input_tokens: x.input_tokens,
                    max_output_tokens: x.max_output_tokens,
                    hold_micros: x.hold_micros,
                    expires_at: x.expires_at,
                    payload_digest: x.payload_digest,
                })
            }
            EventBody::ReservationDenied(x) => {
                EventBodyV1::ReservationDenied(ReservationDeniedV1 {
                    reservation_id: x.reservation_id.clone(),
                    labels: (*x.labels).clone(),
                    model: x.model.clone(),
                    hold_micros: x.hold_micros,
                    reason: x.reason.clone(),
                    budget: x.budget.clone(),
                    key: x.key.clone(),
                    payload_digest: x.payload_digest,
                })
            }
            EventBody::ReservationReleased(x) => {
                EventBodyV1::ReservationReleased(ReservationReleasedV1 {
                    reservation_id: x.reservation_id.clone(),
                    reason: x.reason.clone(),
                })
            }
            EventBody::ReservationExtended(x) => EventBodyV1::ReservationExtended(x.clone()),
            EventBody::ReservationExpired(x) => EventBodyV1::ReservationExpired(x.clone()),
            EventBody::BudgetWarned(x) => EventBodyV1::BudgetWarned(x.clone()),
            EventBody::BudgetExhausted(x) => EventBodyV1::BudgetExhausted(x.clone()),
            EventBody::PolicyApplied(p) => EventBodyV1::PolicyApplied(PolicyAppliedV1 {
                policy_version: p.policy_version,
                source: p.source.clone(),
                source_hash: p.source_hash.clone(),
                policy: ResolvedPolicyV1::try_from(&p.policy)?,
            }),
            EventBody::PricingChanged(p) => EventBodyV1::PricingChanged(PricingChangedV1 {
                effective_from: p.effective_from,
                pricing: PriceTableV1::try_from(&p.pricing)?,
            }),
            EventBody::QuotaObserved(_) => return Err(not_v1("quota_observed")),
            EventBody::QuotaExhausted(_) => return Err(not_v1("quota_exhausted")),
        })
    }
}
