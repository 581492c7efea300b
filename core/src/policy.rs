//! The policy file `bursar.toml` (SPEC §4): parse, validate, resolve.
//!
//! [`parse_policy`] deserializes the text into the raw [`PolicyFile`] (unknown keys rejected),
//! then validates every section into a [`ResolvedPolicy`] plus [`DaemonSettings`]. Every error
//! names the file, the line and the key as a dotted path (`budget[2].window_seconds`,
//! `pricing.models."gpt-4o".input_per_mtok`; array indexes count from 0). Validation collects
//! all the errors it finds rather than stopping at the first: each section of the file (the top
//! level, `[daemon]`, `[pricing]` and each of its models, `[tiers]`, each `[[budget]]`) is
//! deserialized on its own, every unknown key and every value of the wrong type is reported, and
//! what is left is validated. A TOML syntax error stops at that error.
//!
//! Prices: the built-in table, then `[pricing] import` (a LiteLLM price file read through the
//! caller's `read_import`, so this module does no I/O), then `[pricing.models."NAME"]`
//! sections merged over it.

use crate::money::{self, MoneyError};
use crate::pricing::{self, apply_section, builtin_table, import_litellm};
use bursar_schemas::policy::{
    BudgetSection, CalendarUnit, ClusterSection, DaemonSection, Dollars, Enforce, PolicyFile,
    PricingSection, QuotaSection, ResolvedBudget, ResolvedPolicy, ResolvedQuota,
    ResolvedSubscription, ResolvedTierCap, ResolvedTiers, SubscriptionSection, TierDef,
    TierDefSection, TierOrigin, TierPriceRange, TiersSection, UnknownModels, WindowSpec,
    ALLOWANCE_ID_PREFIX, QUOTA_ID_PREFIX,
};
use bursar_schemas::pricing::PriceTable;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use toml_edit::{ImDocument, Item, Table, Value};

/// Default hold lifetime.
pub const DEFAULT_RESERVATION_TTL_SECONDS: u64 = 300;
/// Longest hold lifetime a policy may set.
pub const MAX_RESERVATION_TTL_SECONDS: u64 = 86400;
/// Default fail-closed bound on dynamic `group_by` keys per budget.
pub const DEFAULT_MAX_KEYS_PER_BUDGET: u64 = 100_000;
/// Default number of buckets given per-bucket gauges on `/metrics` (SPEC §12).
pub const DEFAULT_METRICS_MAX_BUCKETS: usize = 1000;
/// `day`, `week` or `month`.
pub fn calendar_unit_name(u: bursar_schemas::policy::CalendarUnit) -> &'static str {
    use bursar_schemas::policy::CalendarUnit;
    match u {
        CalendarUnit::Day => "day",
        CalendarUnit::Week => "week",
        CalendarUnit::Month => "month",
    }
}

/// `[daemon] max_waiters` by default.
pub const DEFAULT_MAX_WAITERS: usize = 1024;
/// Most `max_waiters` may ask for (each waiter is a request kept in memory).
pub const MAX_MAX_WAITERS: usize = 1 << 20;
/// Most buckets `metrics_max_buckets` may ask for (a scrape stays small and quick).
pub const MAX_METRICS_BUCKETS: usize = 100_000;
/// Longest `idempotency_window_seconds`: a year.
pub const MAX_IDEMPOTENCY_WINDOW_SECONDS: u64 = 366 * 86_400;
pub use bursar_schemas::policy::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS;
/// Default socket mode.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Longest fixed or rolling window: 100 years (keeps window arithmetic in microseconds far from
/// overflow).
pub const MAX_WINDOW_SECONDS: u64 = 100 * 366 * 86_400;
/// Most slots a rolling window may have (`window_seconds / resolution_seconds`, rounded up).
pub const MAX_ROLLING_SLOTS: u64 = 100_000;
/// Longest budget id.
pub const MAX_BUDGET_ID_BYTES: usize = 128;
/// Longest label value (SPEC §3); also bounds tier names, which become the `tier` label.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Name of the built-in tier used when `[tiers] default` is not set.
pub const DEFAULT_TIER: &str = "default";
/// Key of an error that no key or table header can be blamed for (e.g. a syntax error above the
/// first table header on a line without `=`).
pub const TOP_LEVEL_KEY: &str = "(top level)";
/// Id of the budget of the default policy.
pub const DEFAULT_BUDGET_ID: &str = "model-daily";
/// `source` of the default policy.
pub const EMBEDDED_DEFAULT_SOURCE: &str = "embedded default";

/// One configuration error: `FILE:LINE: KEY: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// File name as given to the parser.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `budget[0].window_seconds`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.file, line, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// `[daemon]` settings that are not part of the resolved (logged) policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Socket path; `None`: the daemon's default.
    pub socket: Option<String>,
    /// Data directory; `None`: the daemon's default.
    pub data_dir: Option<String>,
    /// Socket file mode (`0o600` by default).
    pub socket_mode: u32,
    /// Group owning the socket.
    pub socket_group: Option<String>,
    /// Admin uids; empty: only the daemon's own uid.
    pub admin_uids: Vec<u32>,
    /// Where the Prometheus endpoint listens (SPEC §12); `None`: no endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Most buckets given per-bucket gauges, most utilized first.
    pub metrics_max_buckets: usize,
    /// Most `reserve`s waiting in line at once (SPEC §10 `wait_ms`).
    pub max_waiters: usize,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            socket: None,
            data_dir: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            admin_uids: Vec::new(),
            metrics_listen: None,
            metrics_max_buckets: DEFAULT_METRICS_MAX_BUCKETS,
            max_waiters: DEFAULT_MAX_WAITERS,
        }
    }
}

/// A validated policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPolicy {
    /// What the daemon runs under and logs in `policy_applied`.
    pub resolved: ResolvedPolicy,
    /// Where and how the daemon runs.
    pub daemon: DaemonSettings,
    /// `[cluster]`, when the file has it (SPEC §13).
    pub cluster: Option<ClusterSettings>,
    /// File name, or `"embedded default"`.
    pub source: String,
    /// BLAKE3 hex of the file's text.
    pub source_hash: String,
}

/// `[cluster]`, checked (SPEC §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// NATS server URLs.
    pub nats: Vec<String>,
    /// This daemon's name.
    pub node: String,
    /// The label whose value picks a partition.
    pub partition_by: String,
    /// Partitions.
    pub partitions: u32,
    /// JetStream replicas per stream.
    pub replicas: u32,
    /// Stream name prefix.
    pub stream_prefix: String,
    /// MiB of written memory kept ready for the fold (0: none).
    pub memory_reserve_mib: u32,
}

/// Most partitions a cluster may have.
pub const MAX_PARTITIONS: u32 = 256;
/// `[cluster] memory_reserve_mib` when the file does not set it: at 20,000 records/s a
/// follower grows a few MiB a second, and the reserve is written again every 250 ms.
pub const DEFAULT_MEMORY_RESERVE_MIB: u32 = 64;
/// Largest `memory_reserve_mib`.
pub const MAX_MEMORY_RESERVE_MIB: u32 = 4096;

/// Most JetStream replicas of a stream (JetStream's own limit).
pub const MAX_REPLICAS: u32 = 5;

/// `[cluster]` checked key by key.
fn resolve_cluster(c: &ClusterSection, issues: &mut Issues) -> Option<ClusterSettings> {
    let at = |key: &str| vec![k("cluster"), k(key)];
    let before = issues.0.len();
    if c.nats.is_empty() {
        issues.push(
            at("nats"),
            "give at least one NATS server URL (nats://host:4222)",
        );
    }
    for (i, url) in c.nats.iter().enumerate() {
        let host = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme));
        if !host.is_some_and(|h| !h.is_empty() && !h.contains(char::is_whitespace)) {
            issues.push(
                with(&at("nats"), Seg::Index(i)),
                format!("{url:?} is not a NATS URL (nats://host:port, tls://, ws:// or wss://)"),
            );
        }
    }
    let name_ok = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !name_ok(&c.node, 64) {
        issues.push(
            at("node"),
            format!(
                "{:?} is not a node name (1 to 64 of A-Z a-z 0-9 _ -)",
                c.node
            ),
        );
    }
    if !crate::labels::is_valid_label_key(&c.partition_by) {
        issues.push(
            at("partition_by"),
            format!(
                "{:?} is not a label key ([a-z][a-z0-9_.-]{{0,63}})",
                c.partition_by
            ),
        );
    } else if crate::labels::RESERVED_LABELS.contains(&c.partition_by.as_str()) {
        issues.push(
            at("partition_by"),
            format!(
                "{:?} is derived by the daemon and may differ between a call's candidates: \
                 partition by a label agents send (e.g. org)",
                c.partition_by
            ),
        );
    }
    if !(1..=MAX_PARTITIONS).contains(&c.partitions) {
        issues.push(
            at("partitions"),
            format!(
                "must be between 1 and {MAX_PARTITIONS}, got {}",
                c.partitions
            ),
        );
    }
    let replicas = c.replicas.unwrap_or(3);
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        issues.push(
            at("replicas"),
            format!("must be between 1 and {MAX_REPLICAS} (JetStream's limit), got {replicas}"),
        );
    }
    let memory_reserve_mib = c.memory_reserve_mib.unwrap_or(DEFAULT_MEMORY_RESERVE_MIB);
    if memory_reserve_mib > MAX_MEMORY_RESERVE_MIB {
        issues.push(
            at("memory_reserve_mib"),
            format!(
                "must be between 0 (none) and {MAX_MEMORY_RESERVE_MIB} MiB, got {memory_reserve_mib}"
            ),
        );
    }
    let prefix = c.stream_prefix.clone().unwrap_or_else(|| "bursar".into());
    if !name_ok(&prefix, 32) {
        issues.push(
            at("stream_prefix"),
            format!("{prefix:?} is not a stream name prefix (1 to 32 of A-Z a-z 0-9 _ -)"),
        );
    }
    (issues.0.len() == before).then(|| ClusterSettings {
        nats: c.nats.clone(),
        node: c.node.clone(),
        partition_by: c.partition_by.clone(),
        partitions: c.partitions,
        replicas,
        stream_prefix: prefix,
        memory_reserve_mib,
    })
}

/// In cluster mode every budget lies within one partition (SPEC §13): its `match` pins
/// `partition_by` or its `group_by` contains it; so do subscriptions (their allowances are
/// budgets) and quotas (their calls must all reach one partition's writer).
fn check_partitions(raw: &PolicyFile, budgets: &[ResolvedBudget], by: &str, issues: &mut Issues) {
    let within = |m: &BTreeMap<String, String>, group_by: &[String]| lies_within(m, group_by, by);
    let why = |what: &str, id: &str| {
        format!(
            "in cluster mode every {what} must lie within one partition: its `match` must pin \
             `{by}` (the cluster's partition_by) or its `group_by` contain it; {what} {id:?} would \
             span partitions, and no single writer could keep its limits (SPEC §13)"
        )
    };
    for (i, b) in raw.budget.iter().enumerate() {
        let resolved = budgets.iter().find(|r| r.id == b.id);
        if resolved.is_some_and(|r| !within(&r.match_labels, &r.group_by)) {
            issues.push(vec![k("budget"), Seg::Index(i)], why("budget", &b.id));
        }
    }
    for (i, sub) in raw.subscription.iter().enumerate() {
        if !within(&sub.match_labels, &sub.group_by) {
            issues.push(
                vec![k("subscription"), Seg::Index(i), k("match")],
                why("subscription", &sub.id),
            );
        }
    }
    for (i, q) in raw.quota.iter().enumerate() {
        if !within(&q.match_labels, &[]) {
            issues.push(
                vec![k("quota"), Seg::Index(i), k("match")],
                why("quota", &q.id),
            );
        }
    }
}

/// Whether a budget (or quota) with this `match` and `group_by` lies within one partition of a
/// cluster partitioned by `by`: its `match` pins `by`, or its `group_by` contains it.
fn lies_within(m: &BTreeMap<String, String>, group_by: &[String], by: &str) -> bool {
    m.get(by).is_some_and(|v| v != "*") || group_by.iter().any(|g| g == by)
}

/// The first budget (quota limits included), subscription or quota of a resolved policy that
/// would span partitions of a cluster partitioned by `by`, named: what a cluster node checks on
/// a policy another node sent it, as [`parse_policy`] checks a file (`check_partitions`). A
/// subscription is checked by its own `match` and its allowances' `group_by` (an allowance's
/// budget matches on the derived `subscription` label alone, which pins no partition).
pub fn spanning_partitions(p: &ResolvedPolicy, by: &str) -> Option<String> {
    let budget = || {
        p.budgets
            .iter()
            .filter(|b| !bursar_schemas::policy::is_allowance(&b.id))
            .find(|b| !lies_within(&b.match_labels, &b.group_by, by))
            .map(|b| format!("budget {:?}", b.id))
    };
    let subscription = || {
        p.subscriptions
            .iter()
            .find(|s| {
                // A subscription without allowances limits nothing.
                let group_by = s
                    .allowances
                    .first()
                    .and_then(|id| p.budgets.iter().find(|b| b.id == *id))
                    .map(|b| b.group_by.as_slice());
                group_by.is_some_and(|g| !lies_within(&s.match_labels, g, by))
            })
            .map(|s| format!("subscription {:?}", s.id))
    };
    let quota = || {
        p.quotas
            .iter()
            .find(|q| !lies_within(&q.match_labels, &[], by))
            .map(|q| format!("quota {:?}", q.id))
    };
    budget().or_else(subscription).or_else(quota).map(|what| {
        format!("{what} would span partitions: its `match` must pin `{by}` or its `group_by` contain it (SPEC §13)")
    })
}

/// The default policy (SPEC §8): built-in prices and one meter per model per day.
pub fn default_policy() -> LoadedPolicy {
    let resolved = ResolvedPolicy {
        reservation_ttl_seconds: DEFAULT_RESERVATION_TTL_SECONDS,
        max_keys_per_budget: DEFAULT_MAX_KEYS_PER_BUDGET,
        idempotency_window_seconds: DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
        unknown_models: UnknownModels::Deny,
        tiers: default_tiers(),
        budgets: vec![ResolvedBudget {
            id: DEFAULT_BUDGET_ID.to_string(),
            match_labels: BTreeMap::new(),
            group_by: vec!["model".to_string()],
            window: WindowSpec::Fixed {
                seconds: 86_400,
                offset_seconds: 0,
            },
            max_micros: None,
            max_tokens: None,
            max_requests: None,
            max_concurrent: None,
            warn_at_ppm: None,
            enforce: Enforce::Deny,
        }],
        pricing: builtin_table(),
        subscriptions: Vec::new(),
        quotas: Vec::new(),
        report_exclude_labels: bursar_schemas::policy::default_report_exclude_labels(),
    };
    // There is no file text: the hash covers the resolved policy itself, so it changes exactly
    // when the embedded default (including the built-in prices) changes.
    let canonical = serde_json::to_vec(&resolved).unwrap_or_default();
    LoadedPolicy {
        resolved,
        daemon: DaemonSettings::default(),
        cluster: None,
        source: EMBEDDED_DEFAULT_SOURCE.to_string(),
        source_hash: blake3::hash(&canonical).to_hex().to_string(),
    }
}

fn default_tiers() -> ResolvedTiers {
    let mut defs = crate::tiers::builtin_tiers();
    defs.push(crate::tiers::implicit(DEFAULT_TIER));
    ResolvedTiers {
        default: DEFAULT_TIER.to_string(),
        patterns: Vec::new(),
        caps: BTreeMap::new(),
        defs,
    }
}

/// Parse and validate a policy file. `file` names it in errors; `read_import` reads the
/// `[pricing] import` path exactly as written (the caller resolves it, e.g. against the config
/// file's directory) and returns its text or a message.
pub fn parse_policy(
    text: &str,
    file: &str,
    read_import: &dyn Fn(&str) -> Result<String, String>,
) -> Result<LoadedPolicy, Vec<PolicyError>> {
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let line = e.span().map(|r| line_of_offset(text, r.start));
            let key = line.map(|l| key_on_line(text, l)).unwrap_or_default();
            return Err(vec![PolicyError {
                file: file.to_string(),
                line,
                key,
                message: non_empty_message(
                    e.message().trim().lines().collect::<Vec<_>>().join("; "),
                    "is not valid TOML (a value is missing or incomplete)",
                ),
            }]);
        }
    };
    // Every unknown key and every value of the wrong type, each section on its own (serde stops
    // at the first error of a document); then, on what is left, the checks of `resolve`.
    let read = read_sections(&doc, text, file);
    let raw: PolicyFile = match read.cleaned {
        Some(raw) => raw,
        None if read.errors.is_empty() => match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                return Err(vec![deserialize_error(
                    e.message(),
                    e.span(),
                    text,
                    file,
                    &doc,
                    &[],
                )])
            }
        },
        None => return Err(read.errors),
    };
    let mut issues = Issues::default();
    let resolved = resolve(&raw, read_import, &mut issues);
    if !read.errors.is_empty() {
        // A section with a value of the wrong type lost that key: what `resolve` says about
        // the section would be about the copy, not the file.
        let mut errors = read.errors;
        errors.extend(
            issues
                .0
                .into_iter()
                .filter(|issue| !read.mistyped.iter().any(|m| issue.path.starts_with(m)))
                .map(|issue| located(issue, &doc, text, file)),
        );
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        return Err(errors);
    }
    match resolved {
        Some((resolved, daemon, cluster)) if issues.0.is_empty() => Ok(LoadedPolicy {
            resolved,
            daemon,
            cluster,
            source: file.to_string(),
            source_hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
        }),
        _ => Err(issues
            .0
            .into_iter()
            .map(|issue| located(issue, &doc, text, file))
            .collect()),
    }
}

fn located(issue: Issue, doc: &ImDocument<&str>, text: &str, file: &str) -> PolicyError {
    PolicyError {
        file: file.to_string(),
        line: locate(doc, &issue.path).map(|off| line_of_offset(text, off)),
        key: render_path(&issue.path),
        message: issue.message,
    }
}

// ---------------------------------------------------------------------------------------------
// Every deserialization error in one run

/// Most errors reported for one section (a budget, a model's prices, `[daemon]`, ...).
const MAX_ERRORS_PER_SECTION: usize = 64;

/// What [`read_sections`] found.
struct Sections {
    /// Unknown keys and values of the wrong type, in the order of the file.
    errors: Vec<PolicyError>,
    /// The file without the keys of `errors`, when every section could be read that way (no
    /// required key missing, no section of the wrong type).
    cleaned: Option<PolicyFile>,
    /// Sections that had a value of the wrong type.
    mistyped: Vec<Vec<Seg>>,
}

/// One part of the file deserialized on its own: its key path, its copy (keys dropped as their
/// errors are reported) and its type.
struct Section {
    at: Vec<Seg>,
    item: Item,
    check: fn(Value) -> Result<(), toml_edit::de::Error>,
}

fn check_as<T: serde::de::DeserializeOwned>(v: Value) -> Result<(), toml_edit::de::Error> {
    use serde::de::IntoDeserializer;
    T::deserialize(v.into_deserializer()).map(|_| ())
}

/// Each element of the array of tables `name` (`[[budget]]`, …) as a section of its own, or
/// the key as a whole when it is not an array.
fn array_sections<T: serde::de::DeserializeOwned>(
    root: &Table,
    name: &str,
    out: &mut Vec<Section>,
) {
    let element = |i: usize, item: Item| Section {
        at: vec![k(name), Seg::Index(i)],
        item,
        check: check_as::<T>,
    };
    match root.get(name) {
        Some(Item::ArrayOfTables(tables)) => out.extend(
            tables
                .iter()
                .enumerate()
                .map(|(i, t)| element(i, Item::Table(t.clone()))),
        ),
        Some(Item::Value(Value::Array(values))) => out.extend(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| element(i, Item::Value(v.clone()))),
        ),
        Some(other) => out.push(Section {
            at: vec![k(name)],
            item: other.clone(),
            check: check_as::<Vec<T>>,
        }),
        None => {}
    }
}

/// The sections of the file, each deserialized on its own type: top-level keys, `[daemon]`,
/// `[pricing]` and each of its models, `[tiers]`, each `[[budget]]`.
fn sections(root: &Table) -> Vec<Section> {
    use bursar_schemas::policy::ModelPriceSection;
    let mut out = Vec::new();
    let mut top = root.clone();
    for known in [
        "daemon",
        "pricing",
        "tiers",
        "budget",
        "subscription",
        "quota",
    ] {
        top.remove(known);
    }
    out.push(Section {
        at: Vec::new(),
        item: Item::Table(top),
        check: check_as::<PolicyFile>,
    });
    if let Some(item) = root.get("daemon") {
        out.push(Section {
            at: vec![k("daemon")],
            item: item.clone(),
            check: check_as::<DaemonSection>,
        });
    }
    if let Some(item) = root.get("pricing") {
        let mut pricing = item.clone();
        let models = match pricing.get("models") {
            Some(m) if m.is_table_like() => m.as_table_like().map(|t| {
                t.iter()
                    .map(|(name, m)| (name.to_string(), m.clone()))
                    .collect::<Vec<_>>()
            }),
            _ => None,
        };
        if let Some(models) = models {
            if let Some(t) = pricing.as_table_like_mut() {
                t.remove("models");
            }
            for (name, model) in models {
                out.push(Section {
                    at: vec![k("pricing"), k("models"), Seg::Name(name)],
                    item: model,
                    check: check_as::<ModelPriceSection>,
                });
            }
        }
        out.push(Section {
            at: vec![k("pricing")],
            item: pricing,
            check: check_as::<PricingSection>,
        });
    }
    if let Some(item) = root.get("tiers") {
        out.push(Section {
            at: vec![k("tiers")],
            item: item.clone(),
            check: check_as::<TiersSection>,
        });
    }
    array_sections::<BudgetSection>(root, "budget", &mut out);
    array_sections::<SubscriptionSection>(root, "subscription", &mut out);
    array_sections::<QuotaSection>(root, "quota", &mut out);
    out
}

/// Deserialize each section of the file on its own, and within a section report every unknown
/// key and every value of the wrong type: after each error the key it names is dropped from the
/// section's copy and the section is read again. A missing required key ends its section (a
/// key dropped for its type, or misspelt as a key that was reported with "did you mean" it, is
/// not reported missing as well).
fn read_sections(doc: &ImDocument<&str>, text: &str, file: &str) -> Sections {
    let mut errors = Vec::new();
    let mut mistyped = Vec::new();
    let mut complete = true;
    let mut cleaned = Item::Table(doc.as_table().clone());
    for mut section in sections(doc.as_table()) {
        let mut dropped: Vec<Vec<Seg>> = Vec::new();
        let mut clean = false;
        for _ in 0..MAX_ERRORS_PER_SECTION {
            let Ok(value) = section.item.clone().into_value() else {
                break;
            };
            let Err(e) = (section.check)(value) else {
                clean = true;
                break;
            };
            let (error, path) =
                deserialize_error_at(e.message(), e.span(), text, file, doc, &section.at);
            let missing = e.message().trim_start().starts_with("missing field");
            if missing && dropped.contains(&path) {
                break;
            }
            let unknown = e.message().trim_start().starts_with("unknown field");
            if let Some(meant) = error
                .message
                .split_once("did you mean `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(meant, _)| meant)
            {
                // A misspelt required key: its absence is the same mistake.
                let mut sibling = path.clone();
                sibling.pop();
                sibling.push(k(meant));
                dropped.push(sibling);
            }
            errors.push(error);
            if missing {
                break;
            }
            if !unknown && !mistyped.contains(&section.at) {
                mistyped.push(section.at.clone());
            }
            // The key the error is about (an array element's error drops the whole array).
            let mut key = path;
            while matches!(key.last(), Some(Seg::Index(_))) {
                key.pop();
            }
            let Some(relative) = key.strip_prefix(section.at.as_slice()) else {
                break;
            };
            if relative.is_empty() || !remove_key(&mut section.item, relative) {
                break;
            }
            dropped.push(key);
        }
        if !clean || !replace_at(&mut cleaned, &section.at, section.item) {
            complete = false;
        }
    }
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    let cleaned = if complete && !errors.is_empty() {
        // The sections were read without errors, so is their sum (else: report as before).
        cleaned.into_value().ok().and_then(|v| {
            use serde::de::IntoDeserializer;
            use serde::Deserialize;
            PolicyFile::deserialize(v.into_deserializer()).ok()
        })
    } else {
        None
    };
    Sections {
        errors,
        cleaned,
        mistyped,
    }
}

fn get_mut<'a>(item: &'a mut Item, seg: &Seg) -> Option<&'a mut Item> {
    match seg {
        Seg::Key(name) | Seg::Name(name) => item.get_mut(name.as_str()),
        Seg::Index(i) => item.get_mut(*i),
    }
}

/// Drop the key at `path` (below `item`); false when it is not there.
fn remove_key(item: &mut Item, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let Some(name) = seg_name(last) else {
        return false;
    };
    let mut node = item;
    for seg in parents {
        match get_mut(node, seg) {
            Some(next) => node = next,
            None => return false,
        }
    }
    node.as_table_like_mut()
        .is_some_and(|t| t.remove(name).is_some())
}

/// Put a section's cleaned copy back at its path in the document's copy.
fn replace_at(root: &mut Item, path: &[Seg], item: Item) -> bool {
    let Some((last, parents)) = path.split_last() else {
        // The top level: only the keys the other sections do not cover.
        let (Item::Table(top), Some(root)) = (item, root.as_table_mut()) else {
            return false;
        };
        let unknown: Vec<String> = root
            .iter()
            .map(|(key, _)| key.to_string())
            .filter(|key| {
                ![
                    "daemon",
                    "pricing",
                    "tiers",
                    "budget",
                    "subscription",
                    "quota",
                ]
                .contains(&key.as_str())
            })
            .filter(|key| !top.contains_key(key))
            .collect();
        for key in unknown {
            root.remove(&key);
        }
        return true;
    };
    let mut node = root;
    for seg in parents {
        match get_mut(node, seg) {
            Some(next) => node = next,
            None => return false,
        }
    }
    let slot = match last {
        Seg::Index(i) => node.get_mut(*i),
        Seg::Key(name) | Seg::Name(name) => {
            // `[pricing]` without its models: keep the models (their own sections).
            if let (Some(existing), Item::Table(new)) = (node.get_mut(name.as_str()), &item) {
                if let Some(models) = existing.get("models").cloned() {
                    if !new.contains_key("models") && existing.is_table() {
                        let mut merged = new.clone();
                        merged.insert("models", models);
                        *existing = Item::Table(merged);
                        return true;
                    }
                }
            }
            node.get_mut(name.as_str())
        }
    };
    match slot {
        Some(slot) => {
            *slot = item;
            true
        }
        None => false,
    }
}

/// Resolve a `[pricing]` section: `base`, then the import (if any), then the `models` sections
/// merged over it. Errors carry no line (there is no text); keys are as in [`parse_policy`].
pub fn parse_pricing_section(
    section: &PricingSection,
    base: &PriceTable,
    file: &str,
    read_import: &dyn Fn(&str) -> Result<String, String>,
) -> Result<PriceTable, Vec<PolicyError>> {
    let mut issues = Issues::default();
    let table = resolve_pricing(section, base, read_import, &mut issues);
    if issues.0.is_empty() {
        Ok(table)
    } else {
        Err(issues
            .0
            .into_iter()
            .map(|issue| PolicyError {
                file: file.to_string(),
                line: None,
                key: render_path(&issue.path),
                message: issue.message,
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Key paths

/// One segment of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// A key, quoted only when it is not a bare TOML key.
    Key(String),
    /// A user-chosen name (a model), always quoted: `pricing.models."gpt-4o"`.
    Name(String),
    /// An array index, from 0.
    Index(usize),
}

fn k(s: &str) -> Seg {
    Seg::Key(s.to_string())
}

fn path(segs: &[Seg]) -> Vec<Seg> {
    segs.to_vec()
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
            Seg::Key(s) | Seg::Name(s) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&match seg {
                    Seg::Key(_) => crate::toml_text::key(s),
                    _ => crate::toml_text::string(s),
                });
            }
        }
    }
    out
}

/// Errors found while validating, each at a key path.
#[derive(Default)]
struct Issues(Vec<Issue>);

struct Issue {
    path: Vec<Seg>,
    message: String,
}

impl Issues {
    fn push(&mut self, path: Vec<Seg>, message: impl Into<String>) {
        self.0.push(Issue {
            path,
            message: message.into(),
        });
    }
}

fn with(base: &[Seg], seg: Seg) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.push(seg);
    p
}

// ---------------------------------------------------------------------------------------------
// Lines

fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// For a syntax error: the key or table header on that line, as written. A line with neither
/// (a stray word, a blank or continuation line, `= 1`) names the table header in force there, and
/// above the first header [`TOP_LEVEL_KEY`], so that every error names a key.
fn key_on_line(text: &str, line: usize) -> String {
    let index = line.saturating_sub(1);
    let own = text
        .lines()
        .nth(index)
        .map(key_or_header)
        .unwrap_or_default();
    if !own.is_empty() {
        return own;
    }
    text.lines()
        .take(index)
        .filter(|l| l.trim_start().starts_with('['))
        .map(key_or_header)
        .filter(|h| !h.is_empty())
        .last()
        .unwrap_or_else(|| TOP_LEVEL_KEY.to_string())
}

/// The table header (`budget` of `[[budget]]`) or the key before `=` on one line; empty if none.
fn key_or_header(line: &str) -> String {
    let l = line.trim();
    if l.starts_with('[') {
        return l
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
    }
    match l.split_once('=') {
        Some((key, _)) => key.trim().to_string(),
        None => String::new(),
    }
}

/// A node of the parsed document while walking a key path.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

fn seg_name(seg: &Seg) -> Option<&str> {
    match seg {
        Seg::Key(s) | Seg::Name(s) => Some(s),
        Seg::Index(_) => None,
    }
}

fn step<'a>(node: Node<'a>, seg: &Seg) -> Option<(Node<'a>, Option<Range<usize>>)> {
    let table = match node {
        Node::Table(t) | Node::Item(Item::Table(t)) => Some(t),
        _ => None,
    };
    let inline = match node {
        Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
            Some(t)
        }
        _ => None,
    };
    let array = match node {
        Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => Some(a),
        _ => None,
    };
    if let Some(name) = seg_name(seg) {
        let (key, item) = match (table, inline) {
            (Some(t), _) => t.get_key_value(name)?,
            (_, Some(t)) => t.get_key_value(name)?,
            _ => return None,
        };
        return Some((Node::Item(item), key.span().or_else(|| item.span())));
    }
    let Seg::Index(i) = seg else {
        return None;
    };
    match (node, array) {
        (Node::Item(Item::ArrayOfTables(a)), _) => {
            let t = a.get(*i)?;
            Some((Node::Table(t), t.span()))
        }
        (_, Some(a)) => {
            let v = a.get(*i)?;
            Some((Node::Value(v), v.span()))
        }
        _ => None,
    }
}

/// Byte offset of the deepest part of `path` present in the document.
fn locate(doc: &ImDocument<&str>, path: &[Seg]) -> Option<usize> {
    let mut node = Node::Table(doc.as_table());
    let mut best: Option<usize> = None;
    for seg in path {
        let Some((next, span)) = step(node, seg) else {
            break;
        };
        if let Some(r) = span {
            best = Some(r.start);
        }
        node = next;
    }
    best
}

fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|r| r.start <= offset && offset < r.end.max(r.start + 1))
}

/// The key path of the deepest key or value whose text covers `offset`.
fn path_at(doc: &ImDocument<&str>, offset: usize) -> Vec<Seg> {
    let mut path = Vec::new();
    search_table(doc.as_table(), offset, &mut path);
    // Model names under `pricing.models` are quoted, as users write them.
    if path.len() >= 3 && path[0] == k("pricing") && path[1] == k("models") {
        if let Seg::Key(name) = &path[2] {
            path[2] = Seg::Name(name.clone());
        }
    }
    path
}

fn search_table(t: &Table, offset: usize, path: &mut Vec<Seg>) -> bool {
    for (name, item) in t.iter() {
        path.push(k(name));
        let key_span = t.key(name).and_then(|key| key.span());
        if search_item(item, offset, path) || contains(key_span, offset) {
            return true;
        }
        path.pop();
    }
    false
}

fn search_item(item: &Item, offset: usize, path: &mut Vec<Seg>) -> bool {
    match item {
        Item::None => false,
        Item::Value(v) => search_value(v, offset, path) || contains(v.span(), offset),
        Item::Table(t) => search_table(t, offset, path) || contains(t.span(), offset),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if search_table(t, offset, path) || contains(t.span(), offset) {
                    return true;
                }
                path.pop();
            }
            false
        }
    }
}

fn search_value(v: &Value, offset: usize, path: &mut Vec<Seg>) -> bool {
    match v {
        Value::InlineTable(t) => {
            for (name, value) in t.iter() {
                path.push(k(name));
                let key_span = t.key(name).and_then(|key| key.span());
                if search_value(value, offset, path)
                    || contains(key_span, offset)
                    || contains(value.span(), offset)
                {
                    return true;
                }
                path.pop();
            }
            false
        }
        Value::Array(a) => {
            for (i, value) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if search_value(value, offset, path) || contains(value.span(), offset) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

/// A serde error: place it by its span and name the key; without a span, at `section`.
fn deserialize_error(
    message: &str,
    span: Option<Range<usize>>,
    text: &str,
    file: &str,
    doc: &ImDocument<&str>,
    section: &[Seg],
) -> PolicyError {
    deserialize_error_at(message, span, text, file, doc, section).0
}

/// [`deserialize_error`], and the key path it names.
fn deserialize_error_at(
    message: &str,
    span: Option<Range<usize>>,
    text: &str,
    file: &str,
    doc: &ImDocument<&str>,
    section: &[Seg],
) -> (PolicyError, Vec<Seg>) {
    let raw_message = message.trim().to_string();
    let (line, mut path) = match span {
        Some(r) => (Some(line_of_offset(text, r.start)), path_at(doc, r.start)),
        None => (
            locate(doc, section).map(|off| line_of_offset(text, off)),
            section.to_vec(),
        ),
    };
    // "unknown field `x`, expected ..." / "missing field `x`": make sure the key is named.
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| raw_message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    if let Some(field) = named {
        if path.last().and_then(seg_name) != Some(field) {
            path.push(k(field));
        }
    }
    let message = if raw_message.contains("untagged enum Dollars") {
        "expected a dollar amount: a number such as 12.5 or a decimal string such as \"12.50\""
            .to_string()
    } else if named.is_some() && raw_message.starts_with("missing field") {
        "is required".to_string()
    } else if let Some(rest) = raw_message.strip_prefix("unknown field `") {
        match rest.split_once("`, expected ") {
            Some((typed, expected)) => match closest_key(typed, expected) {
                Some(key) => {
                    format!("unknown key; did you mean `{key}`? (expected {expected})")
                }
                None => format!("unknown key (expected {expected})"),
            },
            None => "unknown key".to_string(),
        }
    } else {
        raw_message
            .replace("expected u64", "expected a whole number >= 0")
            .replace("expected u32", "expected a whole number >= 0")
            .replace("expected i64", "expected a whole number")
            .replace("expected f64", "expected a number")
    };
    let error = PolicyError {
        file: file.to_string(),
        line,
        key: if path.is_empty() {
            TOP_LEVEL_KEY.to_string()
        } else {
            render_path(&path)
        },
        message: non_empty_message(message, "is not a valid policy file"),
    };
    (error, path)
}

fn non_empty_message(message: String, fallback: &str) -> String {
    if message.trim().is_empty() {
        fallback.to_string()
    } else {
        message
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn resolve(
    raw: &PolicyFile,
    read_import: &dyn Fn(&str) -> Result<String, String>,
    issues: &mut Issues,
) -> Option<(ResolvedPolicy, DaemonSettings, Option<ClusterSettings>)> {
    let (daemon, ttl, max_keys, id_window, unknown_models) = resolve_daemon(&raw.daemon, issues);
    let pricing = resolve_pricing(&raw.pricing, &builtin_table(), read_import, issues);
    let tiers = resolve_tiers(raw.tiers.as_ref(), issues);
    let report_exclude_labels = match raw.reports.as_ref().and_then(|r| r.exclude_labels.clone()) {
        None => bursar_schemas::policy::default_report_exclude_labels(),
        Some(keys) => {
            for (i, key) in keys.iter().enumerate() {
                if !crate::labels::is_valid_label_key(key) {
                    issues.push(
                        vec![k("reports"), k("exclude_labels"), Seg::Index(i)],
                        format!("{key:?} is not a label key ([a-z][a-z0-9_.-]{{0,63}})"),
                    );
                }
            }
            keys
        }
    };
    let mut budgets = Vec::with_capacity(raw.budget.len());
    let mut first_index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, section) in raw.budget.iter().enumerate() {
        let at = vec![k("budget"), Seg::Index(i)];
        if let Some(&j) = first_index.get(section.id.as_str()) {
            issues.push(
                with(&at, k("id")),
                format!(
                    "duplicate budget id {:?} (budget[{j}] already uses it)",
                    section.id
                ),
            );
        } else {
            first_index.insert(&section.id, i);
        }
        if let Some(b) = resolve_budget(section, &at, issues) {
            budgets.push(b);
        }
    }
    let subscriptions = resolve_subscriptions(&raw.subscription, &mut budgets, issues);
    let quotas = resolve_quotas(&raw.quota, &mut budgets, issues);
    let cluster = raw
        .cluster
        .as_ref()
        .and_then(|c| resolve_cluster(c, issues));
    if let Some(c) = &cluster {
        check_partitions(raw, &budgets, &c.partition_by, issues);
    }
    if !issues.0.is_empty() {
        return None;
    }
    Some((
        ResolvedPolicy {
            reservation_ttl_seconds: ttl,
            max_keys_per_budget: max_keys,
            idempotency_window_seconds: id_window,
            unknown_models,
            tiers,
            budgets,
            pricing,
            report_exclude_labels,
            subscriptions,
            quotas,
        },
        daemon,
        cluster,
    ))
}

fn resolve_daemon(
    d: &DaemonSection,
    issues: &mut Issues,
) -> (DaemonSettings, u64, u64, u64, UnknownModels) {
    let at = [k("daemon")];
    let mut settings = DaemonSettings::default();
    let non_empty = |key: &str, v: &Option<String>, issues: &mut Issues| -> Option<String> {
        match v {
            Some(s) if s.is_empty() => {
                issues.push(with(&at, k(key)), "must not be empty");
                None
            }
            Some(s) if s.contains('\0') => {
                issues.push(with(&at, k(key)), "must not contain a NUL character");
                None
            }
            other => other.clone(),
        }
    };
    settings.socket = non_empty("socket", &d.socket, issues);
    settings.data_dir = non_empty("data_dir", &d.data_dir, issues);
    settings.socket_group = non_empty("socket_group", &d.socket_group, issues);
    if let Some(mode) = &d.socket_mode {
        match parse_octal_mode(mode) {
            Some(m) => settings.socket_mode = m,
            None => issues.push(
                with(&at, k("socket_mode")),
                format!(
                    "{mode:?} is not an octal file mode (0 to 0777), e.g. \"0600\" or \"0660\""
                ),
            ),
        }
    }
    settings.admin_uids = d.admin_uids.clone().unwrap_or_default();
    if let Some(addr) = non_empty("metrics_listen", &d.metrics_listen, issues) {
        match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => settings.metrics_listen = Some(a),
            Err(_) => issues.push(
                with(&at, k("metrics_listen")),
                format!(
                    "{addr:?} is not an address and port, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\""
                ),
            ),
        }
    }
    if let Some(n) = d.max_waiters {
        match usize::try_from(n) {
            Ok(n) if (1..=MAX_MAX_WAITERS).contains(&n) => settings.max_waiters = n,
            _ => issues.push(
                with(&at, k("max_waiters")),
                format!("must be between 1 and {MAX_MAX_WAITERS}, got {n}"),
            ),
        }
    }
    if let Some(n) = d.metrics_max_buckets {
        match usize::try_from(n) {
            Ok(n) if (1..=MAX_METRICS_BUCKETS).contains(&n) => settings.metrics_max_buckets = n,
            _ => issues.push(
                with(&at, k("metrics_max_buckets")),
                format!("must be between 1 and {MAX_METRICS_BUCKETS}, got {n}"),
            ),
        }
    }
    let ttl = d
        .reservation_ttl_seconds
        .unwrap_or(DEFAULT_RESERVATION_TTL_SECONDS);
    if !(1..=MAX_RESERVATION_TTL_SECONDS).contains(&ttl) {
        issues.push(
            with(&at, k("reservation_ttl_seconds")),
            format!("must be between 1 and {MAX_RESERVATION_TTL_SECONDS} seconds, got {ttl}"),
        );
    }
    let max_keys = d.max_keys_per_budget.unwrap_or(DEFAULT_MAX_KEYS_PER_BUDGET);
    if max_keys < 1 {
        issues.push(with(&at, k("max_keys_per_budget")), "must be at least 1");
    }
    let unknown_models = match d.unknown_models.as_deref() {
        None | Some("deny") => UnknownModels::Deny,
        Some("price_at_max") => UnknownModels::PriceAtMax,
        Some(other) => {
            issues.push(
                with(&at, k("unknown_models")),
                format!("must be \"deny\" or \"price_at_max\", got {other:?}"),
            );
            UnknownModels::Deny
        }
    };
    let id_window = d
        .idempotency_window_seconds
        .unwrap_or(DEFAULT_IDEMPOTENCY_WINDOW_SECONDS);
    if !(1..=MAX_IDEMPOTENCY_WINDOW_SECONDS).contains(&id_window) {
        issues.push(
            with(&at, k("idempotency_window_seconds")),
            format!(
                "must be between 1 and {MAX_IDEMPOTENCY_WINDOW_SECONDS} seconds (366 days), got \
                 {id_window}"
            ),
        );
    }
    (settings, ttl, max_keys, id_window, unknown_models)
}

/// `"0600"`, `"660"`, `"0o600"`: an octal mode from 0 to 0777.
fn parse_octal_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return None;
    }
    let mode = u32::from_str_radix(digits, 8).ok()?;
    (mode <= 0o777).then_some(mode)
}

fn resolve_pricing(
    section: &PricingSection,
    base: &PriceTable,
    read_import: &dyn Fn(&str) -> Result<String, String>,
    issues: &mut Issues,
) -> PriceTable {
    let mut table = base.clone();
    if let Some(import_path) = &section.import {
        let at = path(&[k("pricing"), k("import")]);
        if import_path.trim().is_empty() {
            issues.push(at, "must name a LiteLLM price file");
        } else {
            match read_import(import_path) {
                Err(e) => issues.push(at, format!("cannot read {import_path:?}: {e}")),
                Ok(text) => match import_litellm(&text) {
                    Err(e) => issues.push(at, format!("{import_path:?}: {e}")),
                    Ok(import) if import.table.models.is_empty() => issues.push(
                        at,
                        format!(
                            "{import_path:?} holds no token-priced models (not a LiteLLM price \
                             file?)"
                        ),
                    ),
                    Ok(import) => table.models.extend(import.table.models),
                },
            }
        }
    }
    for (name, model_section) in &section.models {
        let at = path(&[k("pricing"), k("models"), Seg::Name(name.clone())]);
        match apply_section(name, table.models.get(name), model_section) {
            Ok(price) => {
                table.models.insert(name.clone(), price);
            }
            Err((field, message)) if field.is_empty() => issues.push(at, message),
            Err((field, message)) => {
                // `tiers[1].above_tokens` → tiers, [1], above_tokens.
                let mut p = at.clone();
                for part in field.split('.') {
                    match part.split_once('[') {
                        Some((key, rest)) => {
                            p.push(k(key));
                            if let Ok(i) = rest.trim_end_matches(']').parse() {
                                p.push(Seg::Index(i));
                            }
                        }
                        None => p.push(k(part)),
                    }
                }
                issues.push(p, message)
            }
        }
    }
    table
}

/// A tier name becomes the derived `tier` label value: 1..=256 bytes, no control characters.
fn tier_name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        Some("a tier name must not be empty".to_string())
    } else if name.len() > MAX_LABEL_VALUE_BYTES || name.chars().any(char::is_control) {
        Some(format!(
            "a tier name must be 1..={MAX_LABEL_VALUE_BYTES} bytes without control characters"
        ))
    } else {
        None
    }
}

fn resolve_tiers(tiers: Option<&TiersSection>, issues: &mut Issues) -> ResolvedTiers {
    let Some(t) = tiers else {
        return default_tiers();
    };
    let at = [k("tiers")];
    let default = t
        .default
        .clone()
        .unwrap_or_else(|| DEFAULT_TIER.to_string());
    if let Some(problem) = tier_name_problem(&default) {
        issues.push(with(&at, k("default")), problem);
    }
    // The built-in tiers, less those removed.
    let mut removed: BTreeSet<&str> = BTreeSet::new();
    for (i, id) in t.remove.iter().flatten().enumerate() {
        if crate::tiers::is_builtin(id) {
            removed.insert(id);
        } else {
            issues.push(
                with(&with(&at, k("remove")), Seg::Index(i)),
                format!(
                    "{id:?} is not a built-in tier: only {} can be removed",
                    quoted_list(crate::tiers::BUILTIN_TIER_IDS.iter().copied())
                ),
            );
        }
    }
    let mut defs: Vec<TierDef> = crate::tiers::builtin_tiers()
        .into_iter()
        .filter(|d| !removed.contains(d.id.as_str()))
        .collect();
    if let Some(n) = t.defs.as_ref().map(BTreeMap::len) {
        if n > MAX_TIER_DEFS {
            issues.push(
                with(&at, k("defs")),
                format!("at most {MAX_TIER_DEFS} tiers may be defined, got {n}"),
            );
        }
    }
    for (id, section) in t.defs.iter().flatten() {
        let def_at = with(&with(&at, k("defs")), k(id));
        if let Some(problem) = tier_name_problem(id) {
            issues.push(def_at.clone(), problem);
        }
        let def = match defs.iter_mut().find(|d| d.id == *id) {
            Some(builtin) => {
                builtin.origin = TierOrigin::Changed;
                builtin
            }
            None => {
                let mut new = crate::tiers::implicit(id);
                new.origin = TierOrigin::Defined;
                defs.push(new);
                let Some(last) = defs.last_mut() else {
                    continue;
                };
                last
            }
        };
        resolve_tier_def(section, def, &def_at, issues);
    }
    // Every tier named must exist; in a file without `[tiers.defs]`, a name is definition
    // enough (it is implicit: no metadata). The tier `default` never needs a definition.
    let strict = t.defs.is_some();
    let need = |id: &str, key: Vec<Seg>, defs: &mut Vec<TierDef>, issues: &mut Issues| {
        if defs.iter().any(|d| d.id == id) {
            return;
        }
        if strict && id != DEFAULT_TIER {
            let list = quoted_list(defs.iter().map(|d| d.id.as_str()));
            issues.push(
                key,
                format!(
                    "no tier named {id:?}: it is neither built in nor defined in [tiers.defs] \
                     (tiers: {list})"
                ),
            );
        } else {
            defs.push(crate::tiers::implicit(id));
        }
    };
    need(&default, with(&at, k("default")), &mut defs, issues);
    let mut patterns = Vec::with_capacity(t.patterns.len());
    for (i, p) in t.patterns.iter().enumerate() {
        let pat_at = with(&with(&at, k("patterns")), Seg::Index(i));
        if let Some(problem) = glob_problem(&p.pattern) {
            issues.push(with(&pat_at, k("match")), problem);
        }
        if let Some(problem) = tier_name_problem(&p.tier) {
            issues.push(with(&pat_at, k("tier")), problem);
        }
        need(&p.tier, with(&pat_at, k("tier")), &mut defs, issues);
        patterns.push((p.pattern.clone(), p.tier.clone()));
    }
    let mut caps = BTreeMap::new();
    for (name, cap) in &t.caps {
        let cap_at = with(&with(&at, k("caps")), k(name));
        if !defs.iter().any(|d| d.id == *name) {
            let list = quoted_list(defs.iter().map(|d| d.id.as_str()));
            issues.push(
                cap_at.clone(),
                format!(
                    "no tier named {name:?}: caps must name a built-in or defined tier, the \
                     default tier or a pattern's tier ({list})"
                ),
            );
        }
        let max_call_micros =
            money_field(&cap.max_call_usd, with(&cap_at, k("max_call_usd")), issues);
        caps.insert(
            name.clone(),
            ResolvedTierCap {
                max_call_micros,
                max_call_output_tokens: cap.max_call_output_tokens,
            },
        );
    }
    ResolvedTiers {
        default,
        patterns,
        caps,
        defs,
    }
}

/// `"a", "b", "c"`.
fn quoted_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most `[tiers.defs.ID]` tables (every `status` answer carries the tiers).
pub const MAX_TIER_DEFS: usize = 1000;
/// Longest tier `display_name`, in bytes.
pub const MAX_TIER_DISPLAY_NAME_BYTES: usize = 128;
/// Longest tier `description`, in bytes.
pub const MAX_TIER_DESCRIPTION_BYTES: usize = 1024;
/// Longest tier `icon` and `color`, in bytes.
pub const MAX_TIER_ICON_BYTES: usize = 32;

/// A metadata text: 1..=`max` bytes, no control characters.
fn tier_text_problem(text: &str, max: usize) -> Option<String> {
    if text.trim().is_empty() {
        Some("must not be empty".to_string())
    } else if text.len() > max {
        Some(format!("must be at most {max} bytes, got {}", text.len()))
    } else if text.chars().any(char::is_control) {
        Some("must not contain control characters".to_string())
    } else {
        None
    }
}

/// `#rgb`, `#rrggbb`, or a colour name of lowercase ASCII letters and `-` (`green`,
/// `dark-orange`).
fn color_problem(color: &str) -> Option<String> {
    let ok = match color.strip_prefix('#') {
        Some(hex) => {
            (hex.len() == 3 || hex.len() == 6) && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => {
            !color.is_empty()
                && color.len() <= MAX_TIER_ICON_BYTES
                && color.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        }
    };
    (!ok).then(|| {
        format!(
            "{color:?} is not a colour: write \"#rrggbb\", \"#rgb\" or a name such as \"green\""
        )
    })
}

/// Apply one `[tiers.defs.ID]` section to `def` (each key given replaces its value).
fn resolve_tier_def(section: &TierDefSection, def: &mut TierDef, at: &[Seg], issues: &mut Issues) {
    let mut text = |key: &str, value: &Option<String>, max: usize, slot: &mut Option<String>| {
        if let Some(v) = value {
            match tier_text_problem(v, max) {
                Some(problem) => issues.push(with(at, k(key)), problem),
                None => *slot = Some(v.clone()),
            }
        }
    };
    text(
        "display_name",
        &section.display_name,
        MAX_TIER_DISPLAY_NAME_BYTES,
        &mut def.display_name,
    );
    text(
        "description",
        &section.description,
        MAX_TIER_DESCRIPTION_BYTES,
        &mut def.description,
    );
    text("icon", &section.icon, MAX_TIER_ICON_BYTES, &mut def.icon);
    if let Some(color) = &section.color {
        match color_problem(color) {
            Some(problem) => issues.push(with(at, k("color")), problem),
            None => def.color = Some(color.clone()),
        }
    }
    if let Some(range) = &section.price_range {
        let range_at = with(at, k("price_range"));
        let [min, max] = range.as_slice() else {
            issues.push(
                range_at,
                format!(
                    "must be [min, max] (USD per million input tokens), got {} values",
                    range.len()
                ),
            );
            return;
        };
        let before = issues.0.len();
        let min = money_field(&Some(min.clone()), with(&range_at, Seg::Index(0)), issues);
        let max = money_field(&Some(max.clone()), with(&range_at, Seg::Index(1)), issues);
        match (min, max) {
            (Some(min), Some(max)) if min > max => issues.push(
                range_at,
                format!(
                    "min {} USD is above max {} USD (per million input tokens)",
                    money::format_usd(min),
                    money::format_usd(max)
                ),
            ),
            (Some(min), Some(max)) => {
                def.price_range = Some(TierPriceRange {
                    min_input_per_mtok: min,
                    max_input_per_mtok: max,
                })
            }
            _ => debug_assert!(
                issues.0.len() > before,
                "a bad price_range end went unreported"
            ),
        }
    }
}

/// Model globs: non-empty, `*` is the only wildcard, so `?`, `[`, `]`, `{`, `}` (wildcards in
/// other glob dialects, never in model names) are rejected rather than silently taken literally.
fn glob_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("a pattern must not be empty".to_string());
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}'))
    {
        return Some(format!(
            "pattern {pattern:?} uses {c:?}: only \"*\" (any run of characters) is a wildcard"
        ));
    }
    if pattern.chars().any(char::is_control) {
        return Some(format!("pattern {pattern:?} contains a control character"));
    }
    None
}

/// The label key rule of SPEC §3: `[a-z][a-z0-9_.-]{0,63}`.
fn is_label_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            first.is_ascii_lowercase()
                && rest.len() <= 63
                && rest.iter().all(|&b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                })
        }
        None => false,
    }
}

fn money_message(e: &MoneyError) -> String {
    pricing::money_message(e)
}

fn money_field(value: &Option<Dollars>, at: Vec<Seg>, issues: &mut Issues) -> Option<i64> {
    let d = value.as_ref()?;
    match money::dollars_to_micros(d) {
        Ok(m) => Some(m),
        Err(e) => {
            issues.push(at, money_message(&e));
            None
        }
    }
}

/// A `match` selector's keys and values are label keys and values (`"*"` = any value).
fn check_match(selector: &BTreeMap<String, String>, at: &[Seg], issues: &mut Issues) {
    for (key, value) in selector {
        let key_at = with(at, k(key));
        if !is_label_key(key) {
            issues.push(
                key_at,
                format!("{key:?} is not a label key ([a-z][a-z0-9_.-]{{0,63}})"),
            );
        } else if value.is_empty() {
            issues.push(key_at, "must not be empty (use \"*\" for any value)");
        } else if value.len() > MAX_LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
            issues.push(
                key_at,
                format!(
                    "a label value is 1..={MAX_LABEL_VALUE_BYTES} bytes without control \
                     characters"
                ),
            );
        }
    }
}

/// `[[subscription]]`s: each validated, and each of its allowances resolved as a budget (id
/// `subscription:ID:N`, matching the derived label `subscription = ID`) appended to `budgets`.
fn resolve_subscriptions(
    subs: &[SubscriptionSection],
    budgets: &mut Vec<ResolvedBudget>,
    issues: &mut Issues,
) -> Vec<ResolvedSubscription> {
    let mut out = Vec::with_capacity(subs.len());
    let mut first_index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in subs.iter().enumerate() {
        let at = vec![k("subscription"), Seg::Index(i)];
        let field = |name: &str| with(&at, k(name));
        let before = issues.0.len();
        if let Some(problem) = budget_id_problem(&s.id, "subscription") {
            issues.push(field("id"), problem);
        } else if let Some(&j) = first_index.get(s.id.as_str()) {
            issues.push(
                field("id"),
                format!(
                    "duplicate subscription id {:?} (subscription[{j}] already uses it)",
                    s.id
                ),
            );
        } else {
            first_index.insert(&s.id, i);
        }
        if s.match_labels.is_empty() {
            issues.push(
                field("match"),
                "say which calls draw on this subscription, e.g. match = { account = \"claude-pro\" } \
                 (without it, every call would be free)",
            );
        }
        check_match(&s.match_labels, &field("match"), issues);
        if s.match_labels.contains_key("subscription") {
            issues.push(
                with(&field("match"), k("subscription")),
                "the label subscription is derived from this match: match on the labels agents send",
            );
        }
        let fee_micros = money_field(&s.fee_usd, field("fee_usd"), issues).unwrap_or(0);
        let fee_period = match s.fee_period.as_deref() {
            None | Some("month") => CalendarUnit::Month,
            Some("week") => CalendarUnit::Week,
            Some("day") => CalendarUnit::Day,
            Some(other) => {
                issues.push(
                    field("fee_period"),
                    format!("must be \"month\", \"week\" or \"day\", got {other:?}"),
                );
                CalendarUnit::Month
            }
        };
        if let Some(name) = &s.timezone {
            if crate::window::parse_zone(name).is_none() {
                issues.push(
                    field("timezone"),
                    format!(
                        "{name:?} is not an IANA time zone (such as \"Europe/Berlin\", \
                         \"America/New_York\" or \"UTC\")"
                    ),
                );
            }
        }
        let mut allowances = Vec::with_capacity(s.allowance.len());
        for (j, a) in s.allowance.iter().enumerate() {
            let a_at = with(&field("allowance"), Seg::Index(j));
            if a.max_requests.is_none() && a.max_tokens.is_none() && a.max_concurrent.is_none() {
                issues.push(
                    a_at.clone(),
                    "an allowance needs max_requests, max_tokens or max_concurrent",
                );
                continue;
            }
            let as_budget = BudgetSection {
                id: "allowance".to_string(),
                match_labels: BTreeMap::from([("subscription".to_string(), s.id.clone())]),
                group_by: s.group_by.clone(),
                window: a.window.clone(),
                window_seconds: a.window_seconds,
                window_offset_seconds: a.window_offset_seconds,
                resolution_seconds: a.resolution_seconds,
                calendar: a.calendar.clone(),
                utc_offset: a.utc_offset.clone(),
                timezone: a.timezone.clone(),
                max_usd: None,
                max_tokens: a.max_tokens,
                max_requests: a.max_requests,
                max_concurrent: a.max_concurrent,
                warn_at: a.warn_at,
                enforce: None,
            };
            if let Some(mut b) = resolve_budget(&as_budget, &a_at, issues) {
                b.id = format!("{ALLOWANCE_ID_PREFIX}{}:{}", s.id, j + 1);
                allowances.push(b);
            }
        }
        if issues.0.len() != before {
            continue;
        }
        out.push(ResolvedSubscription {
            id: s.id.clone(),
            match_labels: s.match_labels.clone(),
            fee_micros,
            fee_period,
            timezone: s.timezone.clone(),
            allowances: allowances.iter().map(|b| b.id.clone()).collect(),
        });
        budgets.extend(allowances);
    }
    out
}

/// `[[quota]]`s: each validated; its known limits (`requests_per_minute`, `tokens_per_minute`)
/// resolved as rolling one-minute budgets `quota:ID:requests` and `quota:ID:tokens` over the
/// calls whose derived `provider` (and `match`) it names, appended to `budgets`.
fn resolve_quotas(
    quotas: &[QuotaSection],
    budgets: &mut Vec<ResolvedBudget>,
    issues: &mut Issues,
) -> Vec<ResolvedQuota> {
    let mut out = Vec::with_capacity(quotas.len());
    let mut first_index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, q) in quotas.iter().enumerate() {
        let at = vec![k("quota"), Seg::Index(i)];
        let field = |name: &str| with(&at, k(name));
        let before = issues.0.len();
        if let Some(problem) = budget_id_problem(&q.id, "quota") {
            issues.push(field("id"), problem);
        } else if let Some(&j) = first_index.get(q.id.as_str()) {
            issues.push(
                field("id"),
                format!("duplicate quota id {:?} (quota[{j}] already uses it)", q.id),
            );
        } else {
            first_index.insert(&q.id, i);
        }
        if q.provider.is_empty()
            || q.provider.len() > MAX_LABEL_VALUE_BYTES
            || q.provider.chars().any(char::is_control)
        {
            issues.push(
                field("provider"),
                "name the provider label of the calls it governs, e.g. \"openai\"",
            );
        }
        check_match(&q.match_labels, &field("match"), issues);
        if q.match_labels.contains_key("provider") {
            issues.push(
                with(&field("match"), k("provider")),
                "give the provider as `provider = ...` of the quota, not in its match",
            );
        }
        for (key, value) in [
            ("requests_per_minute", q.requests_per_minute),
            ("tokens_per_minute", q.tokens_per_minute),
        ] {
            if value == Some(0) {
                issues.push(field(key), "must be at least 1 (leave it out when unknown)");
            }
        }
        if issues.0.len() != before {
            continue;
        }
        let mut selector = q.match_labels.clone();
        selector.insert("provider".to_string(), q.provider.clone());
        let limit = |what: &str, requests: Option<u64>, tokens: Option<u64>| ResolvedBudget {
            id: format!("{QUOTA_ID_PREFIX}{}:{what}", q.id),
            match_labels: selector.clone(),
            group_by: Vec::new(),
            window: WindowSpec::Rolling {
                seconds: 60,
                resolution_seconds: 1,
            },
            max_micros: None,
            max_tokens: tokens,
            max_requests: requests,
            max_concurrent: None,
            warn_at_ppm: None,
            enforce: Enforce::Deny,
        };
        if q.requests_per_minute.is_some() {
            budgets.push(limit("requests", q.requests_per_minute, None));
        }
        if q.tokens_per_minute.is_some() {
            budgets.push(limit("tokens", None, q.tokens_per_minute));
        }
        out.push(ResolvedQuota {
            id: q.id.clone(),
            provider: q.provider.clone(),
            match_labels: q.match_labels.clone(),
            requests_per_minute: q.requests_per_minute,
            tokens_per_minute: q.tokens_per_minute,
        });
    }
    out
}

/// What is wrong with a budget or subscription id, if anything.
fn budget_id_problem(id: &str, what: &str) -> Option<String> {
    if id.is_empty() {
        Some("must not be empty".to_string())
    } else if id.len() > MAX_BUDGET_ID_BYTES
        || !id.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
    {
        Some(format!(
            "{id:?} is not a {what} id: use 1..={MAX_BUDGET_ID_BYTES} of a-z 0-9 _ . -"
        ))
    } else {
        None
    }
}

fn resolve_budget(b: &BudgetSection, at: &[Seg], issues: &mut Issues) -> Option<ResolvedBudget> {
    let before = issues.0.len();
    let field = |name: &str| with(at, k(name));

    if let Some(problem) = budget_id_problem(&b.id, "budget") {
        issues.push(field("id"), problem);
    }
    check_match(&b.match_labels, &field("match"), issues);
    let mut seen = BTreeSet::new();
    for (i, key) in b.group_by.iter().enumerate() {
        let key_at = with(&field("group_by"), Seg::Index(i));
        if !is_label_key(key) {
            issues.push(
                key_at,
                format!("{key:?} is not a label key ([a-z][a-z0-9_.-]{{0,63}})"),
            );
        } else if !seen.insert(key.as_str()) {
            issues.push(key_at, format!("{key:?} is listed twice"));
        }
    }

    let window = resolve_window(b, at, issues);

    let max_micros = money_field(&b.max_usd, field("max_usd"), issues);
    let has_limit = b.max_usd.is_some()
        || b.max_tokens.is_some()
        || b.max_requests.is_some()
        || b.max_concurrent.is_some();
    let warn_at_ppm = match b.warn_at {
        None => None,
        Some(w) => {
            let ppm = warn_at_to_ppm(w);
            match ppm {
                Err(message) => {
                    issues.push(field("warn_at"), message);
                    None
                }
                Ok(_) if !has_limit => {
                    issues.push(
                        field("warn_at"),
                        "this budget has no limit (max_usd, max_tokens, max_requests or \
                         max_concurrent), so there is nothing to warn about",
                    );
                    None
                }
                Ok(ppm) => Some(ppm),
            }
        }
    };
    let enforce = match b.enforce.as_deref() {
        None | Some("deny") => Enforce::Deny,
        Some("warn") => Enforce::Warn,
        Some(other) => {
            issues.push(
                field("enforce"),
                format!("must be \"deny\" or \"warn\", got {other:?}"),
            );
            Enforce::Deny
        }
    };
    if issues.0.len() != before {
        return None;
    }
    Some(ResolvedBudget {
        id: b.id.clone(),
        match_labels: b.match_labels.clone(),
        group_by: b.group_by.clone(),
        window: window?,
        max_micros,
        max_tokens: b.max_tokens,
        max_requests: b.max_requests,
        max_concurrent: b.max_concurrent,
        warn_at_ppm,
        enforce,
    })
}

/// `warn_at` in (0, 1] with at most 6 decimals, as parts per million.
fn warn_at_to_ppm(w: f64) -> Result<u32, String> {
    if !w.is_finite() {
        return Err("must be a finite number".to_string());
    }
    if w <= 0.0 || w > 1.0 {
        return Err(format!(
            "must be greater than 0 and at most 1 (a fraction of the limit), got {w}"
        ));
    }
    match money::dollars_to_micros(&Dollars::Float(w)) {
        Ok(ppm) => u32::try_from(ppm).map_err(|_| "is out of range".to_string()),
        Err(MoneyError::TooPrecise) => Err("has more than 6 decimal places".to_string()),
        Err(e) => Err(money_message(&e)),
    }
}

fn resolve_window(b: &BudgetSection, at: &[Seg], issues: &mut Issues) -> Option<WindowSpec> {
    let field = |name: &str| with(at, k(name));
    let kind = b.window.as_deref().unwrap_or("cumulative");
    let only_for = |name: &str, present: bool, wanted: &str, issues: &mut Issues| {
        if present && kind != wanted {
            issues.push(
                field(name),
                format!("only applies to window = {wanted:?} (this budget's window is {kind:?})"),
            );
        }
    };
    let before = issues.0.len();
    match kind {
        "fixed" | "rolling" | "calendar" | "cumulative" => {}
        other => {
            issues.push(
                field("window"),
                format!(
                    "must be \"fixed\", \"rolling\", \"calendar\" or \"cumulative\", got {other:?}"
                ),
            );
            return None;
        }
    }
    let uses_seconds = matches!(kind, "fixed" | "rolling");
    if b.window_seconds.is_some() && !uses_seconds {
        issues.push(
            field("window_seconds"),
            format!(
                "only applies to window = \"fixed\" or \"rolling\" (this budget's window is \
                 {kind:?})"
            ),
        );
    }
    only_for(
        "window_offset_seconds",
        b.window_offset_seconds.is_some(),
        "fixed",
        issues,
    );
    only_for(
        "resolution_seconds",
        b.resolution_seconds.is_some(),
        "rolling",
        issues,
    );
    only_for("calendar", b.calendar.is_some(), "calendar", issues);
    only_for("utc_offset", b.utc_offset.is_some(), "calendar", issues);
    only_for("timezone", b.timezone.is_some(), "calendar", issues);
    if b.timezone.is_some() && b.utc_offset.is_some() {
        issues.push(
            field("timezone"),
            "give either timezone (an IANA zone, with daylight saving time) or utc_offset (a              fixed offset), not both",
        );
    }

    let seconds = if uses_seconds {
        match b.window_seconds {
            None => {
                issues.push(
                    field("window_seconds"),
                    format!("is required for window = {kind:?}"),
                );
                None
            }
            Some(0) => {
                issues.push(field("window_seconds"), "must be at least 1");
                None
            }
            Some(s) if s > MAX_WINDOW_SECONDS => {
                issues.push(
                    field("window_seconds"),
                    format!("must be at most {MAX_WINDOW_SECONDS} (100 years)"),
                );
                None
            }
            Some(s) => Some(s),
        }
    } else {
        None
    };

    let spec = match (kind, seconds) {
        ("fixed", Some(seconds)) => {
            let offset = b.window_offset_seconds.unwrap_or(0);
            if offset.unsigned_abs() >= seconds {
                issues.push(
                    field("window_offset_seconds"),
                    format!("must be smaller in size than window_seconds ({seconds})"),
                );
            }
            Some(WindowSpec::Fixed {
                seconds,
                offset_seconds: offset,
            })
        }
        ("rolling", Some(seconds)) => {
            let resolution = b.resolution_seconds.unwrap_or((seconds / 60).max(1));
            if resolution < 1 || resolution > seconds {
                issues.push(
                    field("resolution_seconds"),
                    format!("must be between 1 and window_seconds ({seconds}), got {resolution}"),
                );
            } else if seconds.div_ceil(resolution) > MAX_ROLLING_SLOTS {
                issues.push(
                    field("resolution_seconds"),
                    format!(
                        "gives {} slots per window; at most {MAX_ROLLING_SLOTS} are allowed \
                         (use a coarser resolution)",
                        seconds.div_ceil(resolution)
                    ),
                );
            }
            Some(WindowSpec::Rolling {
                seconds,
                resolution_seconds: resolution,
            })
        }
        ("calendar", _) => {
            let unit = match b.calendar.as_deref() {
                Some("day") => Some(CalendarUnit::Day),
                Some("week") => Some(CalendarUnit::Week),
                Some("month") => Some(CalendarUnit::Month),
                Some(other) => {
                    issues.push(
                        field("calendar"),
                        format!("must be \"day\", \"week\" or \"month\", got {other:?}"),
                    );
                    None
                }
                None => {
                    issues.push(
                        field("calendar"),
                        "is required for window = \"calendar\" (\"day\", \"week\" or \"month\")",
                    );
                    None
                }
            };
            let offset = match b.utc_offset.as_deref() {
                None => Some(0),
                Some(text) => match parse_utc_offset(text) {
                    Some(o) => Some(o),
                    None => {
                        issues.push(
                            field("utc_offset"),
                            format!(
                                "{text:?} is not a UTC offset like \"+02:00\" or \"-05:30\" \
                                 (less than 24 hours)"
                            ),
                        );
                        None
                    }
                },
            };
            let zone = match b.timezone.as_deref() {
                None => None,
                Some(name) => match crate::window::parse_zone(name) {
                    Some(_) => Some(name.to_string()),
                    None => {
                        issues.push(
                            field("timezone"),
                            format!(
                                "{name:?} is not an IANA time zone (such as \"Europe/Berlin\", \
                                 \"America/New_York\" or \"UTC\")"
                            ),
                        );
                        None
                    }
                },
            };
            match (unit, offset, zone) {
                (Some(unit), _, Some(timezone)) => {
                    Some(WindowSpec::CalendarZone { unit, timezone })
                }
                (Some(unit), Some(utc_offset_seconds), None) => Some(WindowSpec::Calendar {
                    unit,
                    utc_offset_seconds,
                }),
                _ => None,
            }
        }
        ("cumulative", _) => Some(WindowSpec::Cumulative),
        _ => None,
    };
    if issues.0.len() != before {
        return None;
    }
    spec
}

/// `"+02:00"`, `"-05:30"`, `"+00:00"`: seconds east of UTC, |offset| < 24 h.
fn parse_utc_offset(text: &str) -> Option<i32> {
    let bytes = text.as_bytes();
    if bytes.len() != 6 || bytes[3] != b':' {
        return None;
    }
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let two = |i: usize| -> Option<i32> {
        let (a, b) = (bytes[i], bytes[i + 1]);
        (a.is_ascii_digit() && b.is_ascii_digit())
            .then(|| i32::from(a - b'0') * 10 + i32::from(b - b'0'))
    };
    let hours = two(1)?;
    let minutes = two(4)?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60))
}

/// The key among serde's "one of `a`, `b`" list that `typed` most likely meant: the nearest
/// by edit distance, when it is close (at most a third of the key's length, and 3 edits).
fn closest_key<'a>(typed: &str, expected: &'a str) -> Option<&'a str> {
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|key| (strsim::damerau_levenshtein(typed, key), key))
        .filter(|(d, key)| *d <= 3 && *d * 3 <= key.len().max(typed.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, key)| key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_as_users_write_keys() {
        assert_eq!(
            render_path(&[k("budget"), Seg::Index(2), k("window_seconds")]),
            "budget[2].window_seconds"
        );
        assert_eq!(
            render_path(&[
                k("pricing"),
                k("models"),
                Seg::Name("gpt-4o".into()),
                k("input_per_mtok")
            ]),
            "pricing.models.\"gpt-4o\".input_per_mtok"
        );
        assert_eq!(
            render_path(&[k("tiers"), k("caps"), k("a.b")]),
            "tiers.caps.\"a.b\""
        );
    }

    #[test]
    fn label_keys_follow_the_spec_rule() {
        assert!(is_label_key("team"));
        assert!(is_label_key("a"));
        assert!(is_label_key("k8s.pod-name_1"));
        assert!(is_label_key(&format!("a{}", "b".repeat(63))));
        assert!(!is_label_key(&format!("a{}", "b".repeat(64))));
        assert!(!is_label_key(""));
        assert!(!is_label_key("Team"));
        assert!(!is_label_key("1team"));
        assert!(!is_label_key("team name"));
    }

    #[test]
    fn utc_offsets_and_modes_parse_strictly() {
        assert_eq!(parse_utc_offset("+02:00"), Some(7200));
        assert_eq!(parse_utc_offset("-05:30"), Some(-19800));
        assert_eq!(parse_utc_offset("+23:59"), Some(86340));
        assert_eq!(parse_utc_offset("+24:00"), None);
        assert_eq!(parse_utc_offset("+2:00"), None);
        assert_eq!(parse_utc_offset("02:00"), None);
        assert_eq!(parse_utc_offset("+02:60"), None);
        assert_eq!(parse_octal_mode("0600"), Some(0o600));
        assert_eq!(parse_octal_mode("0660"), Some(0o660));
        assert_eq!(parse_octal_mode("777"), Some(0o777));
        assert_eq!(parse_octal_mode("1777"), None);
        assert_eq!(parse_octal_mode("0800"), None);
        assert_eq!(parse_octal_mode(""), None);
    }

    #[test]
    fn warn_at_converts_to_parts_per_million() {
        assert_eq!(warn_at_to_ppm(0.9), Ok(900_000));
        assert_eq!(warn_at_to_ppm(1.0), Ok(1_000_000));
        assert_eq!(warn_at_to_ppm(0.000001), Ok(1));
        assert!(warn_at_to_ppm(0.0).is_err());
        assert!(warn_at_to_ppm(1.5).is_err());
        assert!(warn_at_to_ppm(f64::NAN).is_err());
        assert!(warn_at_to_ppm(0.1234567).is_err());
    }
}
