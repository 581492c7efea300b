//! The socket protocol (SPEC §6): one JSON object per line each way.
//!
//! Requests are decoded by [`decode_request`] (in `crate::decode`): once, straight into the
//! op's struct, with unknown fields and duplicate keys rejected. Every decoding failure becomes a
//! [`WireError`] that names the offending field.

use crate::{Labels, Micros};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Longest request line accepted, in bytes (without the newline).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Token and request counts of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Uncached input tokens.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub input_tokens: u64,
    /// Output tokens.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub output_tokens: u64,
    /// Cached-input (cache read) tokens, in addition to `input_tokens`.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub cached_input_tokens: u64,
    /// Cache-write (cache creation) tokens, in addition to `input_tokens`.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub cache_write_tokens: u64,
    /// Number of requests (default 1).
    #[serde(default = "one", deserialize_with = "crate::decode::requests_or_one")]
    pub requests: u64,
}

fn one() -> u64 {
    1
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            requests: 1,
        }
    }
}

/// The worst case of a call that is about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Estimate {
    /// Input tokens of the prompt.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub input_tokens: u64,
    /// Most output tokens the call may produce; capped at (and defaulting to) the model's maximum.
    pub max_output_tokens: Option<u64>,
}

/// `hello`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HelloRequest {
    /// Free-form client name and version.
    pub client: Option<String>,
}

/// `record`: usage that already happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordRequest {
    /// Client-chosen idempotency id.
    pub event_id: String,
    /// Labels of the call.
    #[serde(default, deserialize_with = "crate::decode::unique_map_or_null")]
    pub labels: Labels,
    /// Model name.
    pub model: String,
    /// What was used.
    pub usage: Usage,
    /// When it happened, as the client saw it (audit only; never moves a window).
    pub occurred_at: Option<String>,
    /// A provider-reported cost as a decimal USD string (audit only).
    pub reported_cost_usd: Option<String>,
    /// The provider response's rate-limit headers (SPEC §10): each `[[quota]]` governing the
    /// call gets a `quota_observed` event after the usage. Left out of the request's digest
    /// when absent.
    #[serde(
        default,
        deserialize_with = "crate::decode::unique_map_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub headers: Option<BTreeMap<String, String>>,
}

/// `reserve` and `check` share these fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// Client-chosen idempotency id of the hold (`reserve` only).
    pub reservation_id: String,
    /// Labels of the call.
    #[serde(default, deserialize_with = "crate::decode::unique_map_or_null")]
    pub labels: Labels,
    /// Model name; may be omitted when `candidates` is given.
    pub model: Option<String>,
    /// Worst case of the call.
    pub estimate: Estimate,
    /// Hold lifetime; default from policy, max 86400.
    pub ttl_seconds: Option<u64>,
    /// Ordered fallback models.
    pub candidates: Option<Vec<String>>,
    /// Capabilities every candidate must have.
    pub require: Option<Vec<String>>,
    /// Wait in line up to this many milliseconds (at most 60000) when only limits that free up
    /// by themselves stand in the way (SPEC §10). Not part of the request's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// `check`: a reserve that holds nothing and appends nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// Labels of the call.
    #[serde(default, deserialize_with = "crate::decode::unique_map_or_null")]
    pub labels: Labels,
    /// Model name; may be omitted when `candidates` is given.
    pub model: Option<String>,
    /// Worst case of the call.
    pub estimate: Estimate,
    /// Ordered fallback models.
    pub candidates: Option<Vec<String>>,
    /// Capabilities every candidate must have.
    pub require: Option<Vec<String>>,
    /// Wait up to this many milliseconds (at most 60000) for the call to fit, as `reserve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// `commit`: actual usage of a reserved call; releases the hold in the same event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// The hold being committed.
    pub reservation_id: String,
    /// Idempotency id of the usage event.
    pub event_id: String,
    /// What was used.
    pub usage: Usage,
    /// Labels, used only when the reservation is unknown to the daemon.
    #[serde(default, deserialize_with = "crate::decode::unique_map_opt")]
    pub labels: Option<Labels>,
    /// Model, used only when the reservation is unknown to the daemon.
    pub model: Option<String>,
    /// Audit-only client time.
    pub occurred_at: Option<String>,
    /// Audit-only provider cost, decimal USD string.
    pub reported_cost_usd: Option<String>,
    /// The provider response's rate-limit headers, as on `record`.
    #[serde(
        default,
        deserialize_with = "crate::decode::unique_map_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub headers: Option<BTreeMap<String, String>>,
}

/// `observe`: what a provider said about its rate limits (SPEC §10), normalised (`quota`) or
/// as the response's raw headers (`headers`); exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObserveRequest {
    /// The provider (the derived label `provider` of the calls the quota governs).
    pub provider: String,
    /// Labels that pick the `[[quota]]` (its `match`), e.g. `account`.
    #[serde(default, deserialize_with = "crate::decode::unique_map_or_null")]
    pub labels: Labels,
    /// Normalised limits.
    pub quota: Option<ObservedQuota>,
    /// Raw response headers (OpenAI `x-ratelimit-*`, Anthropic `anthropic-ratelimit-*`).
    #[serde(default, deserialize_with = "crate::decode::unique_map_opt")]
    pub headers: Option<BTreeMap<String, String>>,
}

/// Normalised limits of an `observe`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservedQuota {
    /// Requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ObservedWindow>,
    /// Tokens (all kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<ObservedWindow>,
    /// Input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<ObservedWindow>,
    /// Output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<ObservedWindow>,
}

/// One normalised limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservedWindow {
    /// The limit per window (optional).
    pub limit: Option<u64>,
    /// What is left.
    pub remaining: u64,
    /// When it is whole again (RFC 3339).
    pub reset_at: String,
}

/// Answer to `observe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ObserveAnswer {
    /// Always true.
    pub ok: bool,
    /// Seq of the last event appended (absent when nothing was observed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The quotas the observation was recorded for (one `quota_observed` each).
    pub quotas: Vec<String>,
    /// What was read, as recorded.
    pub observed: ObservedQuota,
    /// Rate-limit headers that were ignored, each with why.
    pub ignored: Vec<crate::event::IgnoredHeader>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// `release`: cancel a hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The hold.
    pub reservation_id: String,
}

/// `extend`: give a live hold a new lifetime from now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    /// The hold.
    pub reservation_id: String,
    /// New lifetime from now, max 86400.
    pub ttl_seconds: u64,
}

/// `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// Keep buckets that carry each of these labels with this value: as a `group_by` label of
    /// their budget (in the scope key), or pinned to that value by their budget's `match`.
    #[serde(default, deserialize_with = "crate::decode::unique_map_opt")]
    pub labels: Option<Labels>,
    /// Keep one budget (`not_found` when the policy in force has no such budget).
    pub budget: Option<String>,
    /// At most this many buckets, most utilized first (default 1000); the answer's `total`
    /// and `truncated` say what was left out.
    pub limit: Option<usize>,
}

/// `tail`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TailRequest {
    /// First seq to send (default: the next event, i.e. only new ones when following).
    pub from_seq: Option<u64>,
    /// Keep streaming new events.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub follow: bool,
    /// Keep only events of these types (e.g. `["budget_warned","budget_exhausted"]`): one
    /// line per crossing for an alerting script. `from_seq` and the default last events count
    /// every event of the log, before this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// Cluster mode (SPEC §13): only this partition's log (default: every partition's; with
    /// `from_seq` and more than one partition, required — a seq counts one partition's events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// `export`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// RFC 3339 lower bound on `ts` (inclusive).
    pub since: Option<String>,
    /// RFC 3339 upper bound on `ts` (exclusive).
    pub until: Option<String>,
    /// Keep events carrying all these labels.
    #[serde(default, deserialize_with = "crate::decode::unique_map_opt")]
    pub labels: Option<Labels>,
    /// Cluster mode (SPEC §13): only this partition's log, one unbroken hash chain (default:
    /// every partition's, one after the other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// `replay`: refold the log under new prices from `since`, or, with `policy`, what that policy
/// would have done (a what-if, SPEC §11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// New prices, same shape as the `[pricing]` section (required without `policy`).
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub pricing: crate::policy::PricingSection,
    /// The text of a `bursar.toml`: a what-if under this policy instead of the one in force
    /// (never applied; without `pricing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// RFC 3339 time from which the new prices apply (default: the start of the log).
    pub since: Option<String>,
    /// Append `pricing_changed` and make the projections follow (admin only).
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub apply: bool,
}

/// `report` (SPEC §11): spend per period, grouped by labels, from the rollups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// Group rows by these labels (derived `model`, `provider`, `tier` included); none: one
    /// group.
    #[serde(default, deserialize_with = "crate::decode::or_default_if_null")]
    pub group_by: Vec<String>,
    /// `hour`, `day` (default), `week` (ISO, from Monday) or `month`.
    pub every: Option<String>,
    /// IANA time zone of the periods (default UTC).
    pub timezone: Option<String>,
    /// RFC 3339 lower bound (default: the start of the log).
    pub since: Option<String>,
    /// RFC 3339 upper bound, exclusive (default: now).
    pub until: Option<String>,
    /// Keep usage carrying all these labels.
    #[serde(default, deserialize_with = "crate::decode::unique_map_opt")]
    pub labels: Option<Labels>,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `hello`.
    Hello(HelloRequest),
    /// `record`.
    Record(RecordRequest),
    /// `reserve`.
    Reserve(ReserveRequest),
    /// `check`.
    Check(CheckRequest),
    /// `commit`.
    Commit(CommitRequest),
    /// `release`.
    Release(ReleaseRequest),
    /// `extend`.
    Extend(ExtendRequest),
    /// `status`.
    Status(StatusRequest),
    /// `tail`.
    Tail(TailRequest),
    /// `export`.
    Export(ExportRequest),
    /// `replay`.
    Replay(ReplayRequest),
    /// `report`.
    Report(ReportRequest),
    /// `observe`.
    Observe(ObserveRequest),
    /// `verify`.
    Verify,
    /// `reload`.
    Reload,
    /// `cluster_status` (cluster mode, SPEC §13).
    ClusterStatus,
}

impl Request {
    /// The op name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Record(_) => "record",
            Request::Reserve(_) => "reserve",
            Request::Check(_) => "check",
            Request::Commit(_) => "commit",
            Request::Release(_) => "release",
            Request::Extend(_) => "extend",
            Request::Status(_) => "status",
            Request::Tail(_) => "tail",
            Request::Export(_) => "export",
            Request::Replay(_) => "replay",
            Request::Report(_) => "report",
            Request::Observe(_) => "observe",
            Request::Verify => "verify",
            Request::Reload => "reload",
            Request::ClusterStatus => "cluster_status",
        }
    }

    /// Encode as a request line body (without `req`), e.g. for clients.
    pub fn to_json(&self) -> Value {
        let (op, body) = match self {
            Request::Hello(r) => ("hello", serde_json::to_value(r)),
            Request::Record(r) => ("record", serde_json::to_value(r)),
            Request::Reserve(r) => ("reserve", serde_json::to_value(r)),
            Request::Check(r) => ("check", serde_json::to_value(r)),
            Request::Commit(r) => ("commit", serde_json::to_value(r)),
            Request::Release(r) => ("release", serde_json::to_value(r)),
            Request::Extend(r) => ("extend", serde_json::to_value(r)),
            Request::Status(r) => ("status", serde_json::to_value(r)),
            Request::Tail(r) => ("tail", serde_json::to_value(r)),
            Request::Export(r) => ("export", serde_json::to_value(r)),
            Request::Replay(r) => ("replay", serde_json::to_value(r)),
            Request::Report(r) => ("report", serde_json::to_value(r)),
            Request::Observe(r) => ("observe", serde_json::to_value(r)),
            Request::Verify => ("verify", Ok(Value::Object(Default::default()))),
            Request::Reload => ("reload", Ok(Value::Object(Default::default()))),
            Request::ClusterStatus => ("cluster_status", Ok(Value::Object(Default::default()))),
        };
        let mut map = match body {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        // Drop nulls so the line stays short; absent and null mean the same on decode.
        map.retain(|_, v| !v.is_null());
        map.insert("op".into(), Value::String(op.into()));
        Value::Object(map)
    }
}

/// A decoded request line: the request and its `req` echo value.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLine {
    /// The request.
    pub request: Request,
    /// `req`, echoed in the answer.
    pub req: Option<Value>,
}

/// Error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or invalid request.
    BadRequest,
    /// `op` names no operation.
    UnknownOp,
    /// Line longer than 64 KiB.
    TooLarge,
    /// An id was reused for a different payload.
    Conflict,
    /// No such reservation, or (`status`) no such budget.
    NotFound,
    /// Not allowed for this peer.
    Forbidden,
    /// The daemon's queue is full; retry later.
    Overloaded,
    /// The log cannot be written; the daemon fails closed.
    Unavailable,
    /// A bug.
    Internal,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The `error` object of a failed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// Dotted path of the offending field, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl WireError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }
    /// A `bad_request` naming a field.
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

/// `{"ok":false,"error":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorAnswer {
    /// Always false.
    pub ok: bool,
    /// The error.
    pub error: WireError,
    /// Echo of the request's `req`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

impl ErrorAnswer {
    /// Wrap an error.
    pub fn new(error: WireError, req: Option<Value>) -> Self {
        Self {
            ok: false,
            error,
            req,
        }
    }
}

pub use crate::decode::{body_as, decode_request};

/// The idempotency digest of a request: the first 16 bytes of BLAKE3 over the JSON of
/// `[op, payload]` (serde_json's, of the typed request: the same request always gives the
/// same bytes, whatever its key order or spacing on the wire). A resent request is a duplicate
/// when its id and digest match; the same id with another digest is a conflict. Computed where
/// the request is decoded, off the writer thread.
pub fn request_digest(op: &str, payload: &impl Serialize) -> [u8; 16] {
    // One allocation of the usual size of a request's JSON instead of a series of regrowths.
    let mut bytes = Vec::with_capacity(512);
    if serde_json::to_writer(&mut bytes, &(op, payload)).is_err() {
        bytes.clear();
    }
    let hash = blake3::hash(&bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

/// `state` of a bucket or of a usage answer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BucketState {
    /// Below `warn_at`.
    Ok,
    /// At or above `warn_at`.
    Warn,
    /// `spent + held >= limit`.
    Exhausted,
}

/// Outcome of a check or reservation.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Allowed, near a limit.
    Warn,
    /// Refused.
    Deny,
}

/// One budget bucket as reported in answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetReport {
    /// Budget id.
    pub budget: String,
    /// Scope key (canonical `group_by` rendering; empty for an ungrouped budget).
    pub key: String,
    /// Spend limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_micros: Option<Micros>,
    /// Spent in the current window.
    pub spent_micros: Micros,
    /// Held by live reservations.
    pub held_micros: Micros,
    /// `limit_micros - spent_micros - held_micros`, never below 0 (absent without a spend limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_micros: Option<Micros>,
    /// Token limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_tokens: Option<u64>,
    /// Tokens used in the current window.
    pub spent_tokens: u64,
    /// Tokens held by live reservations.
    pub held_tokens: u64,
    /// `limit_tokens - spent_tokens - held_tokens`, never below 0 (absent without a token
    /// limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_tokens: Option<u64>,
    /// Request limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_requests: Option<u64>,
    /// Requests in the current window.
    pub spent_requests: u64,
    /// `limit_requests` less the requests spent and held (one per live reservation), never
    /// below 0 (absent without a request limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_requests: Option<u64>,
    /// Concurrency limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_concurrent: Option<u64>,
    /// Live reservations now.
    pub live_holds: u64,
    /// `limit_concurrent - live_holds`, never below 0 (absent without a concurrency limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_concurrent: Option<u64>,
    /// Highest `(spent + held) / limit` over the budget's limits (display only; 0 for a meter).
    pub utilization: f64,
    /// Bucket state.
    pub state: BucketState,
    /// `deny` or `warn` enforcement.
    pub enforce: crate::policy::Enforce,
    /// Window kind: `fixed`, `rolling`, `calendar` or `cumulative`. For a rolling window,
    /// `window_end` is when its oldest counted slot drops out.
    pub window: String,
    /// End of the current window (RFC 3339), absent for cumulative budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_end: Option<String>,
}

/// `hello` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HelloAnswer {
    /// Always true.
    pub ok: bool,
    /// `bursard <version>`.
    pub server: String,
    /// Protocol version.
    pub protocol: u32,
    /// Version of the policy in force.
    pub policy_version: u64,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// Answer to `record` and `commit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageAnswer {
    /// Always true.
    pub ok: bool,
    /// Seq of the usage event.
    pub seq: u64,
    /// True when this repeats an earlier identical request.
    pub duplicate: bool,
    /// Cost of the event under the prices in force.
    pub cost_micros: Micros,
    /// Most severe bucket state after the event.
    pub state: BucketState,
    /// Every matching bucket after the event.
    pub budgets: Vec<BudgetReport>,
    /// Priced at the table's highest prices because the model is unknown.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub priced_at_max: bool,
    /// A commit after its hold had expired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
    /// `"unknown"` for a commit naming a reservation the daemon never saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// Overrun of the actual cost over the hold, when positive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrun_micros: Option<Micros>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// Why a candidate model was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Lacks a required capability.
    MissingCapability,
    /// A budget would deny it.
    Budget,
    /// Its worst case exceeds its tier's per-call cap.
    TierCap,
    /// No price is known and unknown models are denied.
    UnknownModel,
    /// A subscription allowance or a provider quota (SPEC §10) would deny it.
    Quota,
}

/// A skipped candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Skipped {
    /// The candidate.
    #[serde(deserialize_with = "crate::event::text::owned")]
    pub model: String,
    /// Why.
    pub reason: SkipReason,
    /// Details (the missing capability, the budget, the cap).
    #[serde(deserialize_with = "crate::event::text::owned")]
    pub detail: String,
}

/// Why a decision was what it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reason {
    /// `budget`, `quota`, `tier_cap`, `unknown_model`, `missing_capability`, `max_keys` or `ok`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The budget to blame, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// Its scope key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Answer to `reserve` and `check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionAnswer {
    /// Always true: a denial is an answer, not an error.
    pub ok: bool,
    /// Seq of the appended event (`reserve` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// True when this repeats an earlier identical request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// The decision.
    pub decision: Decision,
    /// Chosen model (the first allowed candidate), or the last one considered when denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Worst-case cost held (or that would be held).
    pub hold_micros: Micros,
    /// `max_output_tokens` actually used for the estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// When the hold expires (RFC 3339), for an allowed `reserve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Every matching bucket, as it would be with the hold.
    pub budgets: Vec<BudgetReport>,
    /// Candidates skipped, in order, with reasons.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// The reason for the decision.
    pub reason: Reason,
    /// How long the request waited in line, when it said `wait_ms` (SPEC §10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// Cluster mode (SPEC §13), `check`: how stale the local fold this was decided on may be
    /// (ms since this node last knew it held the partition's whole log; 0 on its writer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// Answer to `release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReleaseAnswer {
    /// Always true.
    pub ok: bool,
    /// Seq of the release event.
    pub seq: u64,
    /// True when the hold had already been released by this same request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// Answer to `extend`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExtendAnswer {
    /// Always true.
    pub ok: bool,
    /// Seq of the extend event.
    pub seq: u64,
    /// New expiry (RFC 3339).
    pub expires_at: String,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// Answer to `cluster_status` (cluster mode, SPEC §13).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatusAnswer {
    /// Always true.
    pub ok: bool,
    /// The node that answered.
    pub node: String,
    /// The label whose value picks a partition.
    pub partition_by: String,
    /// Every partition.
    pub partitions: Vec<ClusterPartitionStatus>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// One partition in `cluster_status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterPartitionStatus {
    /// Its number.
    pub partition: u32,
    /// Its JetStream stream.
    pub stream: String,
    /// The node holding its lease (its writer), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The lease's revision (grows with every take-over and renewal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_revision: Option<u64>,
    /// Each node's fold of it, as the node last reported.
    pub nodes: Vec<ClusterNodeLag>,
}

/// A node's fold of one partition, as it reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterNodeLag {
    /// The node.
    pub node: String,
    /// The last seq it folded.
    pub folded_seq: u64,
    /// How stale its fold may be (ms since it last knew it held the whole stream; 0 on the
    /// writer).
    pub lag_ms: u64,
    /// Whether it is the partition's writer.
    pub writer: bool,
    /// How long ago it reported (nodes report every second; a node that stopped reporting is
    /// down or cut off).
    pub reported_ms_ago: u64,
    /// Follower lag, median (µs): from a record's storage in the stream to its fold on this
    /// node, over the records that reached it since it started and caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold_lag_p50_us: Option<u64>,
    /// Follower lag, 99th percentile (µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold_lag_p99_us: Option<u64>,
    /// Records the lag figures are over.
    #[serde(default)]
    pub fold_lag_records: u64,
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatusAnswer {
    /// Always true.
    pub ok: bool,
    /// Buckets, most utilized first, at most the request's `limit` of them.
    pub budgets: Vec<BudgetReport>,
    /// How many buckets matched the filters in all (more than `budgets` holds when cut).
    pub total: u64,
    /// True when `budgets` was cut at the request's `limit`.
    pub truncated: bool,
    /// The policy's subscriptions (SPEC §10) with their fee and its current period; absent
    /// when there are none. Their allowances are among `budgets` (ids `subscription:ID:N`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionReport>,
    /// The policy's `[[quota]]`s with what their providers last said that still binds (SPEC
    /// §10); absent when there are none. Their known limits are among `budgets` (`quota:ID:*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<QuotaReport>,
    /// The tiers of the policy in force, with their metadata (SPEC §10).
    #[serde(default)]
    pub tiers: Vec<crate::policy::TierDef>,
    /// Cluster mode (SPEC §13): how stale the local folds this was read from may be (the
    /// largest over the partitions; ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// A subscription in a `status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriptionReport {
    /// Subscription id (the derived label `subscription` of the calls it carries).
    pub id: String,
    /// The flat fee per period, in micro-USD (never charged per call).
    pub fee_micros: Micros,
    /// `month`, `week` or `day`.
    pub fee_period: String,
    /// Start of the current fee period (RFC 3339).
    pub period_start: String,
    /// End of the current fee period (RFC 3339).
    pub period_end: String,
    /// Budget ids of its allowances.
    pub allowances: Vec<String>,
}

/// A `[[quota]]` in a `status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaReport {
    /// Quota id.
    pub id: String,
    /// The provider it governs.
    pub provider: String,
    /// When its provider last said something (RFC 3339); absent when never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<String>,
    /// Each observed limit that still binds (before its reset).
    pub limits: Vec<QuotaLimitReport>,
}

/// One observed limit of a quota that still binds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaLimitReport {
    /// `requests`, `tokens`, `input_tokens` or `output_tokens`.
    pub limit: String,
    /// The limit per window, when the provider said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<u64>,
    /// What the provider said was left.
    pub observed_remaining: u64,
    /// What is left now: that, less the usage recorded and the holds since.
    pub remaining: u64,
    /// When it stops binding (RFC 3339).
    pub reset_at: String,
}

/// End of a `tail` or `export` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamEnd {
    /// Always true.
    pub ok: bool,
    /// Always true.
    pub end: bool,
    /// Events sent (export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// One line of the replay diff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiffRow {
    /// Budget id.
    pub budget: String,
    /// Scope key.
    pub key: String,
    /// Current-window spend before repricing.
    pub before_micros: Micros,
    /// After repricing.
    pub after_micros: Micros,
    /// `after - before`.
    pub delta_micros: Micros,
    /// Bucket state before.
    pub state_before: BucketState,
    /// Bucket state after.
    pub state_after: BucketState,
}

/// Answer to `replay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReplayAnswer {
    /// Always true.
    pub ok: bool,
    /// Events folded.
    pub events: u64,
    /// Buckets whose figures change.
    pub diff: Vec<DiffRow>,
    /// Change of total cost over all usage since `since`.
    pub total_delta_micros: Micros,
    /// Whether `pricing_changed` was appended.
    pub applied: bool,
    /// Seq of the `pricing_changed` event when applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// Answer to `report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportAnswer {
    /// Always true.
    pub ok: bool,
    /// `hour`, `day`, `week` or `month`.
    pub every: String,
    /// The time zone of the periods.
    pub timezone: String,
    /// Rows by period, then group (at most [`REPORT_MAX_ROWS`]).
    pub rows: Vec<ReportRow>,
    /// Rows in all.
    pub total_rows: u64,
    /// True when rows were left out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The flat fees of the policy's subscriptions over the report's range (SPEC §10): not in
    /// the rows' cost, which is what calls cost per token. Absent without subscriptions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionFee>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// A subscription's fee over a report's range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriptionFee {
    /// Subscription id.
    pub id: String,
    /// The fee per period, in micro-USD.
    pub fee_micros: Micros,
    /// `month`, `week` or `day`.
    pub fee_period: String,
    /// Fee periods that overlap the report's range (from `since`, or from the first usage the
    /// rollups hold, to `until`).
    pub periods: u64,
    /// `fee_micros × periods`.
    pub fee_total_micros: Micros,
}

/// Most rows a [`ReportAnswer`] carries.
pub const REPORT_MAX_ROWS: usize = 100_000;

/// One period of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportRow {
    /// Start of the period (RFC 3339, with the zone's offset).
    pub period_start: String,
    /// The group: each `group_by` label and its value (`null` for usage without it).
    pub group: std::collections::BTreeMap<String, Option<String>>,
    /// Cost, at the prices of the current fold.
    pub cost_micros: Micros,
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Cached-input tokens.
    pub cached_input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Requests.
    pub requests: u64,
    /// Reservations denied.
    pub denied: u64,
}

/// Answer to a what-if `replay` (with `policy`): what that policy would have done differently
/// from `since` on, had the same requests come (SPEC §11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WhatIfAnswer {
    /// Always true.
    pub ok: bool,
    /// Events of the log read.
    pub events: u64,
    /// Reservations of the log decided again under the policy.
    pub reservations: u64,
    /// Reservations granted in the log that the policy would have denied, in log order (at
    /// most [`WHAT_IF_MAX_DENIALS`]; `denied_total` counts them all).
    pub denied: Vec<WhatIfDenial>,
    /// How many it would have denied.
    pub denied_total: u64,
    /// The money those denied reservations would have held.
    pub denied_hold_micros: Micros,
    /// Usage committed in the log against a reservation the policy denies (the call would
    /// not have been made): left out of the what-if fold.
    pub usage_left_out: u64,
    /// Its cost, at the prices of the what-if fold.
    pub usage_left_out_micros: Micros,
    /// Each bucket's first exhaustion per window under the policy, in time order (at most
    /// [`WHAT_IF_MAX_DENIALS`]; `exhausted_total` counts them all).
    pub exhausted: Vec<WhatIfExhausted>,
    /// How many exhaustions there were.
    pub exhausted_total: u64,
    /// The peak utilization of each budget of the policy (its most utilized bucket, at the
    /// first time it reached that peak), by budget id.
    pub peaks: Vec<WhatIfPeak>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

impl WhatIfAnswer {
    /// An answer over no events (what a what-if starts from, and what partitions sum into).
    pub fn empty() -> WhatIfAnswer {
        WhatIfAnswer {
            ok: true,
            events: 0,
            reservations: 0,
            denied: Vec::new(),
            denied_total: 0,
            denied_hold_micros: 0,
            usage_left_out: 0,
            usage_left_out_micros: 0,
            exhausted: Vec::new(),
            exhausted_total: 0,
            peaks: Vec::new(),
            req: None,
        }
    }
}

/// Most denials (and most exhaustions) a [`WhatIfAnswer`] lists.
pub const WHAT_IF_MAX_DENIALS: usize = 10_000;

/// A reservation the what-if policy would have denied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WhatIfDenial {
    /// Seq of its `reservation_created` in the log.
    pub seq: u64,
    /// When (RFC 3339).
    pub ts: String,
    /// Its id.
    pub reservation_id: String,
    /// Its labels (the derived `model`, `provider` and `tier` included).
    pub labels: Labels,
    /// Its model.
    pub model: String,
    /// The money it would have held.
    pub hold_micros: Micros,
    /// Why: the reason code (`budget`, `tier_cap`, ...).
    pub reason: String,
    /// The budget that would have denied it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// Its scope key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Cluster mode (SPEC §13): the partition whose log holds it (`seq` is that log's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// A bucket the what-if policy would have exhausted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WhatIfExhausted {
    /// Budget id.
    pub budget: String,
    /// Scope key.
    pub key: String,
    /// When it became exhausted (RFC 3339).
    pub at: String,
    /// Start of the window it was exhausted in (RFC 3339).
    pub window_start: String,
}

/// The peak utilization of a budget under the what-if policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WhatIfPeak {
    /// Budget id.
    pub budget: String,
    /// The bucket at the peak.
    pub key: String,
    /// Spent and held over the tightest limit (1 = 100 %).
    pub utilization: f64,
    /// When (RFC 3339).
    pub at: String,
}

/// Answer to `verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VerifyAnswer {
    /// Always true (a broken chain is an error answer naming the seq).
    pub ok: bool,
    /// Events checked.
    pub events: u64,
    /// Hash of the last event, hex. Cluster mode: BLAKE3 over each partition's head (32 bytes
    /// each, zeros for an empty log) in partition order.
    pub head: String,
    /// Cluster mode (SPEC §13): each partition's copy, checked up to what it folded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionVerified>,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// One partition's part of a cluster node's `verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PartitionVerified {
    /// The partition.
    pub partition: u32,
    /// Events checked.
    pub events: u64,
    /// Hash of its last event, hex.
    pub head: String,
}

/// Answer to `reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReloadAnswer {
    /// Always true.
    pub ok: bool,
    /// New policy version.
    pub policy_version: u64,
    /// Echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<Value>,
}

/// One event as `tail` and `export` stream it: `{"event": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventLine {
    /// The event.
    pub event: ExportedEvent,
}

/// An event with its audit context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExportedEvent {
    /// The envelope's version (SPEC §7; absent from the lines of daemons before it was shown).
    #[serde(default)]
    pub version: u16,
    /// Dense sequence number.
    pub seq: u64,
    /// Daemon time, Unix µs.
    pub ts: crate::TsMicros,
    /// Daemon time, RFC 3339.
    pub time: String,
    /// Peer credentials of the request that caused it.
    pub actor: crate::event::Actor,
    /// Event type, e.g. `usage_recorded`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The body, tagged with its type.
    pub body: crate::event::EventBody,
    /// Cost of a usage event under the prices in force at its time (as folded now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<Micros>,
    /// Version (seq of the introducing event) of the price table that cost comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_version: Option<u64>,
    /// Hash of the previous event.
    pub prev_hash: crate::event::Hash32,
    /// This event's chain hash.
    pub hash: crate::event::Hash32,
    /// Cluster mode (SPEC §13): the partition whose log holds it (`seq` and the chain are that
    /// partition's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// Hand-written JSON for the answers a busy writer produces most (the answer of every `record`,
/// `commit`, `reserve` and `check` names each of its budgets): the same bytes `serde_json`
/// writes, with field names copied rather than escaped. `schemas/tests/answer_json.rs` checks them against
/// `serde_json` byte for byte.
mod fast_json {
    use super::{
        BucketState, BudgetReport, Decision, DecisionAnswer, Reason, SkipReason, UsageAnswer,
    };
    use crate::policy::Enforce;

    /// A JSON string, escaped as `serde_json` escapes it.
    fn string(out: &mut Vec<u8>, s: &str) {
        let plain = s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        if plain {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        } else if serde_json::to_writer(&mut *out, s).is_err() {
            // Writing into a `Vec` does not fail.
            out.extend_from_slice(b"\"\"");
        }
    }

    fn unsigned(out: &mut Vec<u8>, n: u64) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    fn signed(out: &mut Vec<u8>, n: i64) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    fn state(s: BucketState) -> &'static [u8] {
        match s {
            BucketState::Ok => b"\"ok\"",
            BucketState::Warn => b"\"warn\"",
            BucketState::Exhausted => b"\"exhausted\"",
        }
    }

    fn boolean(out: &mut Vec<u8>, b: bool) {
        out.extend_from_slice(if b { b"true" } else { b"false" });
    }

    impl BudgetReport {
        /// This line's JSON (as `serde_json::to_writer` writes it), appended to `out`.
        pub fn write_json(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"{\"budget\":");
            string(out, &self.budget);
            out.extend_from_slice(b",\"key\":");
            string(out, &self.key);
            if let Some(l) = self.limit_micros {
                out.extend_from_slice(b",\"limit_micros\":");
                signed(out, l);
            }
            out.extend_from_slice(b",\"spent_micros\":");
            signed(out, self.spent_micros);
            out.extend_from_slice(b",\"held_micros\":");
            signed(out, self.held_micros);
            if let Some(r) = self.remaining_micros {
                out.extend_from_slice(b",\"remaining_micros\":");
                signed(out, r);
            }
            if let Some(l) = self.limit_tokens {
                out.extend_from_slice(b",\"limit_tokens\":");
                unsigned(out, l);
            }
            out.extend_from_slice(b",\"spent_tokens\":");
            unsigned(out, self.spent_tokens);
            out.extend_from_slice(b",\"held_tokens\":");
            unsigned(out, self.held_tokens);
            if let Some(r) = self.remaining_tokens {
                out.extend_from_slice(b",\"remaining_tokens\":");
                unsigned(out, r);
            }
            if let Some(l) = self.limit_requests {
                out.extend_from_slice(b",\"limit_requests\":");
                unsigned(out, l);
            }
            out.extend_from_slice(b",\"spent_requests\":");
            unsigned(out, self.spent_requests);
            if let Some(r) = self.remaining_requests {
                out.extend_from_slice(b",\"remaining_requests\":");
                unsigned(out, r);
            }
            if let Some(l) = self.limit_concurrent {
                out.extend_from_slice(b",\"limit_concurrent\":");
                unsigned(out, l);
            }
            out.extend_from_slice(b",\"live_holds\":");
            unsigned(out, self.live_holds);
            if let Some(r) = self.remaining_concurrent {
                out.extend_from_slice(b",\"remaining_concurrent\":");
                unsigned(out, r);
            }
            out.extend_from_slice(b",\"utilization\":");
            // Floats exactly as `serde_json` writes them (`null` when not finite).
            if serde_json::to_writer(&mut *out, &self.utilization).is_err() {
                out.extend_from_slice(b"null");
            }
            out.extend_from_slice(b",\"state\":");
            out.extend_from_slice(state(self.state));
            out.extend_from_slice(b",\"enforce\":");
            out.extend_from_slice(match self.enforce {
                Enforce::Deny => b"\"deny\"",
                Enforce::Warn => b"\"warn\"",
            });
            out.extend_from_slice(b",\"window\":");
            string(out, &self.window);
            if let Some(end) = &self.window_end {
                out.extend_from_slice(b",\"window_end\":");
                string(out, end);
            }
            out.push(b'}');
        }
    }

    /// `[` the lines `]`, each written by `write`.
    fn list<T>(out: &mut Vec<u8>, items: &[T], write: impl Fn(&T, &mut Vec<u8>)) {
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write(item, out);
        }
        out.push(b']');
    }

    /// `,"req":…` when there is one.
    fn req(out: &mut Vec<u8>, req: Option<&serde_json::Value>) {
        if let Some(req) = req {
            out.extend_from_slice(b",\"req\":");
            if serde_json::to_writer(&mut *out, req).is_err() {
                out.extend_from_slice(b"null");
            }
        }
    }

    impl Reason {
        /// This reason's JSON (as `serde_json::to_writer` writes it), appended to `out`.
        pub fn write_json(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"{\"code\":");
            string(out, &self.code);
            out.extend_from_slice(b",\"message\":");
            string(out, &self.message);
            if let Some(b) = &self.budget {
                out.extend_from_slice(b",\"budget\":");
                string(out, b);
            }
            if let Some(k) = &self.key {
                out.extend_from_slice(b",\"key\":");
                string(out, k);
            }
            out.push(b'}');
        }
    }

    impl DecisionAnswer {
        /// This answer's JSON (as `serde_json::to_writer` writes it), appended to `out`.
        pub fn write_json(&self, out: &mut Vec<u8>) {
            self.write_json_with(self.req.as_ref(), out);
        }

        /// [`DecisionAnswer::write_json`] with `req` in place of the answer's own.
        pub fn write_json_with(&self, req_value: Option<&serde_json::Value>, out: &mut Vec<u8>) {
            out.extend_from_slice(b"{\"ok\":");
            boolean(out, self.ok);
            if let Some(seq) = self.seq {
                out.extend_from_slice(b",\"seq\":");
                unsigned(out, seq);
            }
            if self.duplicate {
                out.extend_from_slice(b",\"duplicate\":true");
            }
            out.extend_from_slice(b",\"decision\":");
            out.extend_from_slice(match self.decision {
                Decision::Allow => b"\"allow\"",
                Decision::Warn => b"\"warn\"",
                Decision::Deny => b"\"deny\"",
            });
            if let Some(m) = &self.model {
                out.extend_from_slice(b",\"model\":");
                string(out, m);
            }
            out.extend_from_slice(b",\"hold_micros\":");
            signed(out, self.hold_micros);
            if let Some(m) = self.max_output_tokens {
                out.extend_from_slice(b",\"max_output_tokens\":");
                unsigned(out, m);
            }
            if let Some(e) = &self.expires_at {
                out.extend_from_slice(b",\"expires_at\":");
                string(out, e);
            }
            out.extend_from_slice(b",\"budgets\":");
            list(out, &self.budgets, BudgetReport::write_json);
            out.extend_from_slice(b",\"skipped\":");
            list(out, &self.skipped, |s, out| {
                out.extend_from_slice(b"{\"model\":");
                string(out, &s.model);
                out.extend_from_slice(b",\"reason\":");
                out.extend_from_slice(match s.reason {
                    SkipReason::MissingCapability => b"\"missing_capability\"",
                    SkipReason::Budget => b"\"budget\"",
                    SkipReason::TierCap => b"\"tier_cap\"",
                    SkipReason::UnknownModel => b"\"unknown_model\"",
                    SkipReason::Quota => b"\"quota\"",
                });
                out.extend_from_slice(b",\"detail\":");
                string(out, &s.detail);
                out.push(b'}');
            });
            out.extend_from_slice(b",\"reason\":");
            self.reason.write_json(out);
            if let Some(w) = self.waited_ms {
                out.extend_from_slice(b",\"waited_ms\":");
                unsigned(out, w);
            }
            if let Some(l) = self.lag_ms {
                out.extend_from_slice(b",\"lag_ms\":");
                unsigned(out, l);
            }
            req(out, req_value);
            out.push(b'}');
        }
    }

    impl UsageAnswer {
        /// This answer's JSON (as `serde_json::to_writer` writes it), appended to `out`.
        pub fn write_json(&self, out: &mut Vec<u8>) {
            self.write_json_with(self.req.as_ref(), out);
        }

        /// [`UsageAnswer::write_json`] with `req` in place of the answer's own.
        pub fn write_json_with(&self, req_value: Option<&serde_json::Value>, out: &mut Vec<u8>) {
            out.extend_from_slice(b"{\"ok\":");
            boolean(out, self.ok);
            out.extend_from_slice(b",\"seq\":");
            unsigned(out, self.seq);
            out.extend_from_slice(b",\"duplicate\":");
            boolean(out, self.duplicate);
            out.extend_from_slice(b",\"cost_micros\":");
            signed(out, self.cost_micros);
            out.extend_from_slice(b",\"state\":");
            out.extend_from_slice(state(self.state));
            out.extend_from_slice(b",\"budgets\":");
            list(out, &self.budgets, BudgetReport::write_json);
            if self.priced_at_max {
                out.extend_from_slice(b",\"priced_at_max\":true");
            }
            if self.late {
                out.extend_from_slice(b",\"late\":true");
            }
            if let Some(r) = &self.reservation {
                out.extend_from_slice(b",\"reservation\":");
                string(out, r);
            }
            if let Some(o) = self.overrun_micros {
                out.extend_from_slice(b",\"overrun_micros\":");
                signed(out, o);
            }
            req(out, req_value);
            out.push(b'}');
        }
    }
}
