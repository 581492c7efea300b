//! The policy file `bursar.toml` (SPEC §4), as written by people ([`PolicyFile`]), and the
//! resolved form that the daemon logs in `policy_applied` and folds with ([`ResolvedPolicy`]).
//!
//! Raw structs reject unknown keys. Money in the raw file is a [`Dollars`] value (a TOML number
//! or a decimal string); `bursar-core` converts it exactly to micro-USD and validates it.

use crate::pricing::PriceTable;
use crate::Micros;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A dollar amount as written in `bursar.toml`: `12.5`, `12` or `"12.50"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Dollars {
    /// A TOML integer.
    Int(i64),
    /// A TOML float; converted through its shortest round-trip decimal form.
    Float(f64),
    /// A decimal string such as `"12.50"`.
    Text(String),
}

/// The whole policy file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// `[daemon]`: where and how the daemon runs.
    #[serde(default)]
    pub daemon: DaemonSection,
    /// `[pricing]`: merged over the built-in price table.
    #[serde(default)]
    pub pricing: PricingSection,
    /// `[tiers]`: model tiers and per-call caps.
    pub tiers: Option<TiersSection>,
    /// `[reports]`: what the report rollups keep (SPEC §11).
    pub reports: Option<ReportsSection>,
    /// `[[budget]]`: the budgets.
    #[serde(default)]
    pub budget: Vec<BudgetSection>,
    /// `[[subscription]]`: flat-fee plans whose calls cost nothing per call and count
    /// against their allowances (SPEC §10).
    #[serde(default)]
    pub subscription: Vec<SubscriptionSection>,
    /// `[[quota]]`: a provider's rate limits for one key or account (SPEC §10).
    #[serde(default)]
    pub quota: Vec<QuotaSection>,
    /// `[cluster]`: run as one node of a cluster sharing its log through NATS JetStream
    /// (SPEC §13).
    pub cluster: Option<ClusterSection>,
}

/// `[cluster]` (SPEC §13).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// NATS server URLs (`nats://host:port`, also `tls://`, `ws://`, `wss://`).
    pub nats: Vec<String>,
    /// This daemon's name, unique in the cluster.
    pub node: String,
    /// The label whose value picks a partition.
    pub partition_by: String,
    /// Partitions (fixed when the cluster's streams are created).
    pub partitions: u32,
    /// JetStream replicas of each partition's stream (default 3).
    pub replicas: Option<u32>,
    /// Stream names are `<stream_prefix>-p0` .. (default `bursar`).
    pub stream_prefix: Option<String>,
    /// MiB of memory this node keeps written and ready for its fold, so that the fold does
    /// not wait for the host to back fresh pages (default 64; 0 keeps none). Not part of
    /// SPEC §13: a node's own tuning, see docs/cluster.md.
    pub memory_reserve_mib: Option<u32>,
}

/// `[[quota]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaSection {
    /// Unique id, `[a-z0-9_.-]+`.
    pub id: String,
    /// The derived label `provider` of the calls it governs.
    pub provider: String,
    /// Optional narrowing (e.g. `{ account = "prod" }`).
    #[serde(default, rename = "match")]
    pub match_labels: BTreeMap<String, String>,
    /// Known requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Known tokens per minute (all kinds).
    pub tokens_per_minute: Option<u64>,
}

/// `[[subscription]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSection {
    /// Unique id, `[a-z0-9_.-]+`; calls it carries get the derived label `subscription`.
    pub id: String,
    /// Label selector of the calls that draw on it (all must hold; `"*"` = any value).
    #[serde(default, rename = "match")]
    pub match_labels: BTreeMap<String, String>,
    /// One set of allowances per distinct tuple of these labels (e.g. `["user"]` for a plan
    /// per seat); none = one set for every call it carries.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// The flat fee per `fee_period` in USD (shown in status, never charged per call).
    pub fee_usd: Option<Dollars>,
    /// `"month"` (default), `"week"` or `"day"`.
    pub fee_period: Option<String>,
    /// IANA time zone of the fee period (default UTC).
    pub timezone: Option<String>,
    /// `[[subscription.allowance]]`: windows of requests or tokens the plan allows.
    #[serde(default)]
    pub allowance: Vec<AllowanceSection>,
}

/// `[[subscription.allowance]]`: one window of a subscription (any window kind of a budget).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowanceSection {
    /// `"fixed"`, `"rolling"`, `"calendar"` or `"cumulative"` (default).
    pub window: Option<String>,
    /// Fixed/rolling window length.
    pub window_seconds: Option<u64>,
    /// Fixed only: shift of the epoch alignment.
    pub window_offset_seconds: Option<i64>,
    /// Rolling only: bucket size; default `window_seconds / 60`, min 1.
    pub resolution_seconds: Option<u64>,
    /// Calendar only: `"day"`, `"week"` or `"month"`.
    pub calendar: Option<String>,
    /// Calendar only: UTC offset such as `"+02:00"`.
    pub utc_offset: Option<String>,
    /// Calendar only: an IANA time zone.
    pub timezone: Option<String>,
    /// Requests allowed per window.
    pub max_requests: Option<u64>,
    /// Tokens allowed per window (all token kinds added).
    pub max_tokens: Option<u64>,
    /// Calls in flight at once.
    pub max_concurrent: Option<u64>,
    /// Warn when utilization would reach this fraction (0 < warn_at <= 1).
    pub warn_at: Option<f64>,
}

/// `[daemon]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Socket path; default `$XDG_RUNTIME_DIR/bursar.sock`, else `./bursar.sock`.
    pub socket: Option<String>,
    /// Data directory; default `./bursar-data`.
    pub data_dir: Option<String>,
    /// Socket mode as an octal string, `"0600"` (default) or `"0660"`.
    pub socket_mode: Option<String>,
    /// Group that owns the socket (with `socket_mode = "0660"`).
    pub socket_group: Option<String>,
    /// Uids allowed to `reload` and `replay` with `apply`; empty: the daemon's own uid.
    pub admin_uids: Option<Vec<u32>>,
    /// Default hold lifetime in seconds (default 300, max 86400).
    pub reservation_ttl_seconds: Option<u64>,
    /// Fail-closed bound on dynamic `group_by` keys per budget (default 100000).
    pub max_keys_per_budget: Option<u64>,
    /// How long an `event_id` / `reservation_id` is remembered after its event: a request resent
    /// within it is a duplicate with its original answer; later, a new request (default 3600).
    pub idempotency_window_seconds: Option<u64>,
    /// `"deny"` (default) or `"price_at_max"`.
    pub unknown_models: Option<String>,
    /// Address (`host:port`) of the Prometheus endpoint `/metrics` (SPEC §12); off when absent.
    pub metrics_listen: Option<String>,
    /// Most buckets given spent/held/limit gauges, most utilized first (default 1000).
    pub metrics_max_buckets: Option<u64>,
    /// Most `reserve`s waiting in line at once (`wait_ms`, SPEC §10); past it a request that
    /// would wait answers `overloaded` (default 1024).
    pub max_waiters: Option<u64>,
}

/// `[reports]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportsSection {
    /// Labels left out of the report rollups: reports cannot group or filter by them, and they
    /// cost no memory there (default `["session"]`: sessions are many and short-lived; `export`
    /// keeps them).
    pub exclude_labels: Option<Vec<String>>,
}

/// `[pricing]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PricingSection {
    /// Path of a LiteLLM `model_prices_and_context_window.json` to import.
    pub import: Option<String>,
    /// Per-model prices in USD per million tokens.
    // `null` (in a `replay` request's JSON; TOML has none) reads as absent: no models.
    #[serde(default, deserialize_with = "crate::decode::unique_map_or_null")]
    pub models: BTreeMap<String, ModelPriceSection>,
}

/// `[pricing.models."NAME"]`: prices in USD per million tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelPriceSection {
    /// Provider name.
    pub provider: Option<String>,
    /// USD per million input tokens.
    pub input_per_mtok: Option<Dollars>,
    /// USD per million output tokens.
    pub output_per_mtok: Option<Dollars>,
    /// USD per million cached-input (cache read) tokens.
    pub cached_input_per_mtok: Option<Dollars>,
    /// USD per million cache-write tokens.
    pub cache_write_per_mtok: Option<Dollars>,
    /// Long-context threshold on the whole prompt (input + cached input + cache writes): the
    /// one-tier form; see `tiers` for several.
    pub above_tokens: Option<u64>,
    /// USD per million input tokens above the threshold.
    pub input_per_mtok_above: Option<Dollars>,
    /// USD per million output tokens above the threshold.
    pub output_per_mtok_above: Option<Dollars>,
    /// USD per million cached-input tokens above the threshold.
    pub cached_input_per_mtok_above: Option<Dollars>,
    /// USD per million cache-write tokens above the threshold.
    pub cache_write_per_mtok_above: Option<Dollars>,
    /// The model's maximum output tokens per call.
    pub max_output_tokens: Option<u64>,
    /// Capabilities such as `tools`, `vision`, `json`, `streaming`.
    pub capabilities: Option<Vec<String>>,
    /// Long-context tiers (`[[pricing.models."NAME".tiers]]`), replacing the model's; instead of
    /// the one-tier keys `above_tokens` and `*_above`.
    pub tiers: Option<Vec<PriceTierSection>>,
}

/// `[[pricing.models."NAME".tiers]]`: the prices for prompts of more than `above_tokens`
/// tokens (USD per million tokens); a price left out is the model's base price of that kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceTierSection {
    /// The tier applies to prompts (input + cached input + cache writes) of more tokens.
    pub above_tokens: u64,
    /// USD per million input tokens.
    pub input_per_mtok: Option<Dollars>,
    /// USD per million output tokens.
    pub output_per_mtok: Option<Dollars>,
    /// USD per million cached-input tokens.
    pub cached_input_per_mtok: Option<Dollars>,
    /// USD per million cache-write tokens.
    pub cache_write_per_mtok: Option<Dollars>,
}

/// `[tiers]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TiersSection {
    /// Tier of a model that matches no pattern (deny-by-default: make it the smallest).
    pub default: Option<String>,
    /// Ordered patterns; the first match wins. `*` matches any run of characters.
    #[serde(default)]
    pub patterns: Vec<TierPattern>,
    /// Per-call caps per tier.
    #[serde(default)]
    pub caps: BTreeMap<String, TierCapSection>,
    /// `[tiers.defs.ID]`: user-defined tiers, or changes to a built-in one (SPEC §10). Once the
    /// file has `defs` (even an empty table), every tier a pattern, `default` or cap names must
    /// be built in or defined here.
    pub defs: Option<BTreeMap<String, TierDefSection>>,
    /// Built-in tiers (`low`, `medium`, `high`, `premium`) to leave out; a `defs` entry with a
    /// removed id defines that id afresh.
    pub remove: Option<Vec<String>>,
}

/// `[tiers.defs.ID]`: a tier's metadata, every key optional. On a built-in tier, each key given
/// replaces the built-in value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TierDefSection {
    /// Name shown to people, e.g. `"Frontier"`.
    pub display_name: Option<String>,
    /// One line on what the tier is for.
    pub description: Option<String>,
    /// `[min, max]`: the input prices (USD per million input tokens) the tier's models should
    /// have; `policy check` warns about a model outside it.
    pub price_range: Option<Vec<Dollars>>,
    /// A colour for dashboards: `"#rrggbb"`, `"#rgb"` or a name such as `"green"`.
    pub color: Option<String>,
    /// A short symbol or icon name for dashboards.
    pub icon: Option<String>,
}

/// One tier pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TierPattern {
    /// Glob over the model name (`*` only).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Tier name.
    pub tier: String,
}

/// `[tiers.caps.NAME]`: per-call caps, checked on the worst-case estimate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TierCapSection {
    /// Largest worst-case cost of one call, in USD.
    pub max_call_usd: Option<Dollars>,
    /// Largest `max_output_tokens` of one call.
    pub max_call_output_tokens: Option<u64>,
}

/// `[[budget]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    /// Unique id, `[a-z0-9_.-]+`.
    pub id: String,
    /// Label selector: all must hold; value `"*"` means present with any value.
    #[serde(default, rename = "match")]
    pub match_labels: BTreeMap<String, String>,
    /// One independent bucket per distinct tuple of these labels.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// `"fixed"`, `"rolling"`, `"calendar"` or `"cumulative"` (default).
    pub window: Option<String>,
    /// Fixed/rolling window length.
    pub window_seconds: Option<u64>,
    /// Fixed only: shift of the epoch alignment.
    pub window_offset_seconds: Option<i64>,
    /// Rolling only: bucket size; default `window_seconds / 60`, min 1.
    pub resolution_seconds: Option<u64>,
    /// Calendar only: `"day"`, `"week"` or `"month"`.
    pub calendar: Option<String>,
    /// Calendar only: UTC offset such as `"+02:00"` (default `"+00:00"`).
    pub utc_offset: Option<String>,
    /// Calendar only, instead of `utc_offset`: an IANA time zone such as `"Europe/Berlin"`;
    /// periods reset at local midnight with daylight saving time.
    pub timezone: Option<String>,
    /// Spend limit in USD.
    pub max_usd: Option<Dollars>,
    /// Token limit (all token kinds added).
    pub max_tokens: Option<u64>,
    /// Request limit.
    pub max_requests: Option<u64>,
    /// Live reservations at once.
    pub max_concurrent: Option<u64>,
    /// Warn when utilization would reach this fraction (0 < warn_at <= 1).
    pub warn_at: Option<f64>,
    /// `"deny"` (default) or `"warn"`.
    pub enforce: Option<String>,
}

/// How reserve/check treat a model with no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModels {
    /// Deny reservations and checks of unknown models.
    Deny,
    /// Price them at the table's highest input and output prices.
    PriceAtMax,
}

/// Calendar window unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CalendarUnit {
    /// Local day.
    Day,
    /// Local week starting Monday.
    Week,
    /// Local calendar month.
    Month,
}

/// A validated window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowSpec {
    /// Epoch-aligned windows of `seconds`, shifted by `offset_seconds`.
    Fixed {
        /// Window length.
        seconds: u64,
        /// Alignment shift.
        offset_seconds: i64,
    },
    /// The last `seconds`, at `resolution_seconds` granularity.
    Rolling {
        /// Window length.
        seconds: u64,
        /// Slot size.
        resolution_seconds: u64,
    },
    /// Local calendar periods at a fixed UTC offset.
    Calendar {
        /// Day, week or month.
        unit: CalendarUnit,
        /// Offset east of UTC in seconds.
        utc_offset_seconds: i32,
    },
    /// Never resets.
    Cumulative,
    /// Local calendar periods in an IANA time zone, daylight saving time included (a 23- or
    /// 25-hour day is one day).
    CalendarZone {
        /// Day, week or month.
        unit: CalendarUnit,
        /// IANA zone name, e.g. `Europe/Berlin`.
        timezone: String,
    },
}

/// Hard or soft enforcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Enforce {
    /// Deny what would exceed a limit.
    Deny,
    /// Never deny; only warn.
    Warn,
}

/// A validated budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedBudget {
    /// Unique id.
    pub id: String,
    /// Label selector (`"*"` = present with any value).
    pub match_labels: BTreeMap<String, String>,
    /// Grouping labels.
    pub group_by: Vec<String>,
    /// Window.
    pub window: WindowSpec,
    /// Spend limit.
    pub max_micros: Option<Micros>,
    /// Token limit.
    pub max_tokens: Option<u64>,
    /// Request limit.
    pub max_requests: Option<u64>,
    /// Concurrent hold limit.
    pub max_concurrent: Option<u64>,
    /// Warning threshold in parts per million of a limit (900000 = 90 %).
    pub warn_at_ppm: Option<u32>,
    /// Enforcement.
    pub enforce: Enforce,
}

/// A validated tier cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedTierCap {
    /// Largest worst-case cost of one call.
    pub max_call_micros: Option<Micros>,
    /// Largest `max_output_tokens` of one call.
    pub max_call_output_tokens: Option<u64>,
}

/// Validated tiers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedTiers {
    /// Tier of a model matching no pattern.
    pub default: String,
    /// Ordered `(pattern, tier)` pairs.
    pub patterns: Vec<(String, String)>,
    /// Caps per tier.
    pub caps: BTreeMap<String, ResolvedTierCap>,
    /// Every tier of the policy with its metadata: the built-in ones left in, the defined ones,
    /// then those only named (see [`TierOrigin`]). Empty in a policy logged before tiers had
    /// metadata (the tiers are then the names `default`, `patterns` and `caps` use).
    #[serde(default)]
    pub defs: Vec<TierDef>,
}

/// Where a tier comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TierOrigin {
    /// A built-in tier as shipped.
    Builtin,
    /// A built-in tier that `[tiers.defs.ID]` changed.
    Changed,
    /// Defined by `[tiers.defs.ID]`.
    Defined,
    /// Not defined, only named (by `default` or a pattern) in a file without `[tiers.defs]`, or
    /// the tier `default` (the default tier when `[tiers] default` is not set): it has no
    /// metadata.
    Implicit,
}

/// A tier's input price range, micro-USD per million input tokens, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TierPriceRange {
    /// Lowest input price.
    pub min_input_per_mtok: Micros,
    /// Highest input price.
    pub max_input_per_mtok: Micros,
}

/// A tier and its metadata (SPEC §10), as resolved and as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TierDef {
    /// The tier id: the value of the derived `tier` label.
    pub id: String,
    /// Built in, changed, defined or implicit.
    pub origin: TierOrigin,
    /// Name shown to people.
    pub display_name: Option<String>,
    /// What the tier is for.
    pub description: Option<String>,
    /// The input prices its models should have.
    pub price_range: Option<TierPriceRange>,
    /// A colour for dashboards.
    pub color: Option<String>,
    /// A short symbol or icon name.
    pub icon: Option<String>,
}

/// Default of `idempotency_window_seconds`: an hour, as long as ended reservations are
/// remembered.
pub const DEFAULT_IDEMPOTENCY_WINDOW_SECONDS: u64 = 3600;

fn default_idempotency_window_seconds() -> u64 {
    DEFAULT_IDEMPOTENCY_WINDOW_SECONDS
}

/// Default of `[reports] exclude_labels`.
pub fn default_report_exclude_labels() -> Vec<String> {
    vec!["session".to_string()]
}

/// The policy the daemon runs under, as logged in `policy_applied` and folded by replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedPolicy {
    /// Default hold lifetime.
    pub reservation_ttl_seconds: u64,
    /// Bound on group_by keys per budget.
    pub max_keys_per_budget: u64,
    /// Ids are remembered this long after their event (duplicates within it).
    #[serde(default = "default_idempotency_window_seconds")]
    pub idempotency_window_seconds: u64,
    /// Unknown model handling.
    pub unknown_models: UnknownModels,
    /// Tiers.
    pub tiers: ResolvedTiers,
    /// Budgets in file order.
    pub budgets: Vec<ResolvedBudget>,
    /// The full effective price table (built-in, import, then file overrides).
    pub pricing: PriceTable,
    /// Labels the report rollups leave out (`[reports] exclude_labels`).
    #[serde(default = "default_report_exclude_labels")]
    pub report_exclude_labels: Vec<String>,
    /// Subscriptions in file order (their allowances are budgets of `budgets`, with ids that
    /// start with [`ALLOWANCE_ID_PREFIX`]). Left out of the JSON when empty, so that a policy
    /// without subscriptions keeps the hash it had before they existed. (The policy is JSON
    /// inside the bincode of events and snapshots, so this attribute is honoured.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<ResolvedSubscription>,
    /// Provider quotas in file order (their known limits are budgets of `budgets`, ids
    /// starting with [`QUOTA_ID_PREFIX`]); left out of the JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<ResolvedQuota>,
}

/// Budget ids of a `[[quota]]`'s known limits start with this (`quota:ID:requests`,
/// `quota:ID:tokens`).
pub const QUOTA_ID_PREFIX: &str = "quota:";

/// A validated `[[quota]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedQuota {
    /// Unique id.
    pub id: String,
    /// The provider label it governs.
    pub provider: String,
    /// Extra selector.
    pub match_labels: BTreeMap<String, String>,
    /// Known requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Known tokens per minute.
    pub tokens_per_minute: Option<u64>,
}

/// Budget ids of subscription allowances start with this (`subscription:ID:N`, N from 1): a
/// `[[budget]]` id cannot contain `:`, so the two never collide.
pub const ALLOWANCE_ID_PREFIX: &str = "subscription:";

/// True when `budget_id` is a subscription allowance's (a deny by it has reason `quota`).
pub fn is_allowance(budget_id: &str) -> bool {
    budget_id.starts_with(ALLOWANCE_ID_PREFIX)
}

/// True when `budget_id` stands for a `[[quota]]`'s known limit (a deny has reason `quota`).
pub fn is_quota_limit(budget_id: &str) -> bool {
    budget_id.starts_with(QUOTA_ID_PREFIX)
}

/// A validated subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedSubscription {
    /// Unique id.
    pub id: String,
    /// Label selector of the calls that draw on it.
    pub match_labels: BTreeMap<String, String>,
    /// The flat fee per period, in micro-USD.
    pub fee_micros: Micros,
    /// The fee's period (calendar).
    pub fee_period: CalendarUnit,
    /// The fee period's time zone (`None` = UTC).
    pub timezone: Option<String>,
    /// Budget ids of its allowances, in file order.
    pub allowances: Vec<String>,
}
