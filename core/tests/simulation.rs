//! Deterministic simulation of the ledger against a naive reference model.
//!
//! Each seed drives a [`Ledger`] through thousands of random commands (record, reserve with
//! candidates and `require`, commit within and over the hold, late and of unknown reservations,
//! release, extend, check, identical retries, conflicting id reuse), clock advances (small,
//! large, backwards, and to just before fixed, calendar, rolling and hourly window boundaries,
//! followed by bursts at one instant), reaps, policy reloads that change limits, and simulated
//! restarts (the ledger is rebuilt by folding the log so far and the run goes on with the
//! rebuilt one).
//!
//! After EVERY step the ledger is compared with [`Model`], written independently and naively:
//! a `Vec` of accepted usage events with their `ts`, a map of holds with their expiry, spent
//! computed by summing the events that fall in each bucket's current window, held by summing
//! live holds. Every answer (cost, flags, state, decision, chosen model, skipped candidates,
//! duplicate, conflict, not found) and every `status` bucket must agree with it, and every
//! restart checks that the live ledger equals the fold of the emitted log.
//!
//! Time semantics the model encodes: a command is decided at the `ts` its event gets (the
//! daemon's clock, but never at or before the last event), holds due by then are expired
//! first; reads look at the same instant a write would get. This matters only when the clock
//! lags the log (bursts within one microsecond, a clock step back).
//!
//! Any divergence panics with the seed and step; reproduce it with
//! `BURSAR_SIM_SEED=<seed> cargo test -p bursar-core --test simulation`.
//! Longer runs: `BURSAR_SIM_SEEDS=<n>` (seeds from `BURSAR_SIM_SEED_BASE`, default 1) and
//! `BURSAR_SIM_STEPS=<n>` (steps per seed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bursar_core::ledger::{Answer, Command, Ledger, ENDED_RESERVATION_MEMORY_SECONDS};
use bursar_schemas::event::{Envelope, EventBody};
use bursar_schemas::policy::{
    CalendarUnit, Enforce, ResolvedBudget, ResolvedPolicy, ResolvedTierCap, ResolvedTiers,
    UnknownModels, WindowSpec,
};
use bursar_schemas::pricing::{ModelPrice, PriceTable};
use bursar_schemas::wire::{
    BucketState, BudgetReport, CheckRequest, CommitRequest, Decision, ErrorCode, Estimate,
    ExtendRequest, RecordRequest, ReleaseRequest, ReserveRequest, SkipReason, StatusRequest, Usage,
};
use bursar_schemas::{Labels, TsMicros};
use common::{Harness, SEC, T0};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::AddAssign;

/// Seeds and steps per seed of the default (CI) run.
const DEFAULT_SEEDS: u64 = 4;
const DEFAULT_STEPS: u64 = 1500;
const MINUTE: i64 = 60 * SEC;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
const MTOK: i128 = 1_000_000;
const MAX_TTL_SECONDS: u64 = 86_400;
const MAX_EVENT_TOKENS: u128 = 1_000_000_000_000;
/// `frontier` tier caps (models matching `big*`).
const FRONTIER_MAX_CALL_MICROS: i64 = 60_000;
const FRONTIER_MAX_CALL_OUTPUT: u64 = 3_500;

// ---- a small deterministic PRNG (splitmix64, shared: `bursar-testkit`) ---------------------

struct Rng(bursar_testkit::Rng);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.range(lo, hi)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.0.chance(percent)
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }
}

// ---- the world: prices and policy -----------------------------------------------------------

fn price(provider: &str, input: i64, output: i64, max: Option<u64>, caps: &[&str]) -> ModelPrice {
    ModelPrice {
        provider: provider.into(),
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
        tiers: Vec::new(),
        max_output_tokens: max,
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
    }
}

/// `m`: 1.5 / 2.5 µUSD per token (costs round up), max output 1000, tools. `big`: 10 / 20, max
/// output 4000, tools + vision, tier `frontier`. `local`: free, no max output, no capabilities.
/// `unit`: 1 µUSD per token either way, so that a request can be sized to hit a limit
/// exactly. `mystery` (used by requests) is in no table.
fn sim_prices() -> PriceTable {
    PriceTable {
        models: BTreeMap::from([
            (
                "m".to_string(),
                price("acme", 1_500_000, 2_500_000, Some(1000), &["tools"]),
            ),
            (
                "big".to_string(),
                price(
                    "acme",
                    10_000_000,
                    20_000_000,
                    Some(4000),
                    &["tools", "vision"],
                ),
            ),
            ("local".to_string(), price("ollama", 0, 0, None, &[])),
            (
                "unit".to_string(),
                price("acme", 1_000_000, 1_000_000, Some(2000), &["tools"]),
            ),
        ]),
    }
}

const MODELS: [&str; 5] = ["m", "big", "local", "unit", "mystery"];

/// The knobs a reload changes.
#[derive(Clone, Copy, Debug)]
struct Limits {
    team_micros: i64,
    team_warn_ppm: u32,
    tpm_tokens: u64,
    daily_micros: i64,
    trial_requests: u64,
    agent_concurrent: u64,
    soft_micros: i64,
    unknown: UnknownModels,
    ttl_seconds: u64,
}

const BASE: Limits = Limits {
    team_micros: 90_000,
    team_warn_ppm: 800_000,
    tpm_tokens: 80_000,
    daily_micros: 1_500_000,
    trial_requests: 40,
    agent_concurrent: 3,
    soft_micros: 60_000,
    unknown: UnknownModels::Deny,
    ttl_seconds: 300,
};

fn limited(id: &str, window: WindowSpec) -> ResolvedBudget {
    ResolvedBudget {
        id: id.into(),
        match_labels: BTreeMap::new(),
        group_by: vec![],
        window,
        max_micros: None,
        max_tokens: None,
        max_requests: None,
        max_concurrent: None,
        warn_at_ppm: None,
        enforce: Enforce::Deny,
    }
}

/// One budget of every kind SPEC §4 knows.
fn sim_policy(l: &Limits) -> ResolvedPolicy {
    let sel = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let mut team = limited(
        "team-fixed",
        WindowSpec::Fixed {
            seconds: 600,
            offset_seconds: 120,
        },
    );
    team.match_labels = sel(&[("org", "acme")]);
    team.group_by = vec!["team".into()];
    team.max_micros = Some(l.team_micros);
    team.warn_at_ppm = Some(l.team_warn_ppm);

    let mut tpm = limited(
        "tpm",
        WindowSpec::Rolling {
            seconds: 300,
            resolution_seconds: 30,
        },
    );
    tpm.max_tokens = Some(l.tpm_tokens);

    let mut daily = limited(
        "daily",
        WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            utc_offset_seconds: 7200,
        },
    );
    daily.match_labels = sel(&[("org", "*")]);
    daily.group_by = vec!["org".into()];
    daily.max_micros = Some(l.daily_micros);
    daily.warn_at_ppm = Some(900_000);

    let mut trial = limited("trial-requests", WindowSpec::Cumulative);
    trial.match_labels = sel(&[("plan", "trial")]);
    trial.group_by = vec!["user".into()];
    trial.max_requests = Some(l.trial_requests);

    let mut conc = limited("agent-concurrency", WindowSpec::Cumulative);
    conc.group_by = vec!["agent".into()];
    conc.max_concurrent = Some(l.agent_concurrent);

    let mut soft = limited(
        "soft-user",
        WindowSpec::Fixed {
            seconds: 3600,
            offset_seconds: 0,
        },
    );
    soft.group_by = vec!["user".into()];
    soft.max_micros = Some(l.soft_micros);
    soft.warn_at_ppm = Some(500_000);
    soft.enforce = Enforce::Warn;

    let mut meter = limited("meter", WindowSpec::Cumulative);
    meter.group_by = vec!["model".into()];

    ResolvedPolicy {
        reservation_ttl_seconds: l.ttl_seconds,
        max_keys_per_budget: 100_000,
        // Short enough that long runs forget ids and count a late resend as new.
        idempotency_window_seconds: 600,
        unknown_models: l.unknown,
        tiers: ResolvedTiers {
            default: "small".into(),
            patterns: vec![("big*".into(), "frontier".into())],
            caps: BTreeMap::from([(
                "frontier".to_string(),
                ResolvedTierCap {
                    max_call_micros: Some(FRONTIER_MAX_CALL_MICROS),
                    max_call_output_tokens: Some(FRONTIER_MAX_CALL_OUTPUT),
                },
            )]),
            defs: Vec::new(),
        },
        budgets: vec![team, tpm, daily, trial, conc, soft, meter],
        pricing: sim_prices(),
        report_exclude_labels: vec!["session".into()],
        subscriptions: Vec::new(),
        quotas: Vec::new(),
    }
}

// ---- the reference model -------------------------------------------------------------------

/// Money, tokens, requests, in wide integers so the model never saturates.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Amt {
    micros: i128,
    tokens: i128,
    requests: i128,
}

impl AddAssign for Amt {
    fn add_assign(&mut self, o: Amt) {
        self.micros += o.micros;
        self.tokens += o.tokens;
        self.requests += o.requests;
    }
}

/// A bucket at one instant.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Fig {
    spent: Amt,
    held: Amt,
    live: i128,
}

struct UsageFact {
    /// `(bucket, window key of the event's ts)`: see [`window_key`].
    buckets: Vec<(usize, i64)>,
    amt: Amt,
}

#[derive(Clone, Debug)]
struct HoldFact {
    labels: Labels,
    model: String,
    amt: Amt,
    input: u64,
    max_out: u64,
    expires_at: TsMicros,
    buckets: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Committed,
    Released,
    Expired,
    /// A denied reservation, remembered as an ended one (holding nothing).
    Denied,
}

#[derive(Clone, Debug)]
struct EndedFact {
    labels: Labels,
    model: String,
    hold_micros: i128,
    how: How,
    at: TsMicros,
}

/// What the model expects a candidate evaluation to give.
#[derive(Clone, Debug)]
struct Eval {
    decision: Decision,
    model: Option<String>,
    labels: Labels,
    hold: Amt,
    max_out: u64,
    skipped: Vec<SkipReason>,
    /// `(budget id, key, figures as reported)` of every matching bucket.
    reports: Vec<(String, String, Fig)>,
}

/// The naive reference: facts in vectors and maps, every figure recomputed from them.
struct Model {
    policy: ResolvedPolicy,
    usage: Vec<UsageFact>,
    holds: BTreeMap<String, HoldFact>,
    ended: HashMap<String, EndedFact>,
    /// Idempotency key → (request fingerprint, original answer JSON).
    ids: HashMap<String, (String, String, TsMicros)>,
    /// Interned `(budget index, scope key)`.
    bucket_ids: HashMap<(usize, String), usize>,
    buckets: Vec<(usize, String)>,
    /// Buckets some usage or hold has touched (the ledger lists exactly these).
    touched: BTreeSet<usize>,
    /// `(bucket, window key)` of every hold placed in a fixed or calendar bucket: such a bucket
    /// is live until the end of that window, even once the hold is gone.
    placed: HashSet<(usize, i64)>,
    /// `(bucket, exhausted?, crossing window)` of every warn/exhausted event seen.
    crossings: HashSet<(usize, bool, TsMicros)>,
    last_ts: TsMicros,
    /// Bumped by every change that can move a figure; keys the figures cache.
    generation: u64,
    cache: std::cell::RefCell<Option<(TsMicros, u64, Vec<Fig>)>>,
}

fn selector_matches(sel: &BTreeMap<String, String>, labels: &Labels) -> bool {
    sel.iter().all(|(k, v)| match labels.get(k) {
        Some(have) => v == "*" || have == v,
        None => false,
    })
}

fn encode(s: &str) -> String {
    s.replace('%', "%25")
        .replace(',', "%2C")
        .replace('=', "%3D")
}

fn render_key(group_by: &[String], labels: &Labels) -> Option<String> {
    let mut parts = Vec::new();
    for k in group_by {
        parts.push(format!("{}={}", encode(k), encode(labels.get(k)?)));
    }
    Some(parts.join(","))
}

/// Which window `t` is in: the index of the fixed window, of the local day, or of the rolling
/// slot (0 for cumulative).
fn window_key(spec: &WindowSpec, t: TsMicros) -> i64 {
    match *spec {
        WindowSpec::Cumulative => 0,
        WindowSpec::Fixed {
            seconds,
            offset_seconds,
        } => (t - offset_seconds * SEC).div_euclid(seconds as i64 * SEC),
        WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            utc_offset_seconds,
        } => (t + i64::from(utc_offset_seconds) * SEC).div_euclid(DAY),
        WindowSpec::Calendar { .. } => panic!("the simulation uses calendar days only"),
        WindowSpec::CalendarZone { .. } => panic!("the simulation uses fixed offsets only"),
        WindowSpec::Rolling {
            resolution_seconds, ..
        } => t.div_euclid(resolution_seconds as i64 * SEC),
    }
}

/// Whether an event whose ts had window key `event` counts at a time whose key is `now`.
fn key_counts(spec: &WindowSpec, event: i64, now: i64) -> bool {
    match *spec {
        WindowSpec::Rolling {
            seconds,
            resolution_seconds,
        } => event <= now && event > now - seconds.div_ceil(resolution_seconds) as i64,
        _ => event == now,
    }
}

fn in_window(spec: &WindowSpec, ts: TsMicros, t: TsMicros) -> bool {
    match *spec {
        WindowSpec::Cumulative => true,
        WindowSpec::Fixed {
            seconds,
            offset_seconds,
        } => {
            let (w, o) = (seconds as i64 * SEC, offset_seconds * SEC);
            (ts - o).div_euclid(w) == (t - o).div_euclid(w)
        }
        WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            utc_offset_seconds,
        } => {
            let o = i64::from(utc_offset_seconds) * SEC;
            (ts + o).div_euclid(DAY) == (t + o).div_euclid(DAY)
        }
        WindowSpec::Calendar { .. } => panic!("the simulation uses calendar days only"),
        WindowSpec::CalendarZone { .. } => panic!("the simulation uses fixed offsets only"),
        WindowSpec::Rolling {
            seconds,
            resolution_seconds,
        } => {
            let r = resolution_seconds as i64 * SEC;
            let n = seconds.div_ceil(resolution_seconds) as i64;
            let (slot, current) = (ts.div_euclid(r), t.div_euclid(r));
            slot <= current && slot > current - n
        }
    }
}

/// Start of the window a crossing at `t` is remembered for ("once per bucket per window").
fn crossing_window(spec: &WindowSpec, t: TsMicros) -> TsMicros {
    match *spec {
        WindowSpec::Cumulative => 0,
        WindowSpec::Fixed {
            seconds,
            offset_seconds,
        } => {
            let (w, o) = (seconds as i64 * SEC, offset_seconds * SEC);
            (t - o).div_euclid(w) * w + o
        }
        WindowSpec::Calendar {
            utc_offset_seconds, ..
        } => {
            let o = i64::from(utc_offset_seconds) * SEC;
            (t + o).div_euclid(DAY) * DAY - o
        }
        WindowSpec::CalendarZone { .. } => panic!("the simulation uses fixed offsets only"),
        WindowSpec::Rolling { seconds, .. } => {
            let w = seconds as i64 * SEC;
            t.div_euclid(w) * w
        }
    }
}

/// `(used, limit)` of every limit a budget sets.
fn dims(b: &ResolvedBudget, f: &Fig) -> Vec<(i128, i128)> {
    let mut out = Vec::new();
    if let Some(l) = b.max_micros {
        out.push((f.spent.micros + f.held.micros, i128::from(l)));
    }
    if let Some(l) = b.max_tokens {
        out.push((f.spent.tokens + f.held.tokens, i128::from(l)));
    }
    if let Some(l) = b.max_requests {
        out.push((f.spent.requests + f.held.requests, i128::from(l)));
    }
    if let Some(l) = b.max_concurrent {
        out.push((f.live, i128::from(l)));
    }
    out
}

fn warn_reached(b: &ResolvedBudget, f: &Fig) -> bool {
    b.warn_at_ppm.is_some_and(|ppm| {
        dims(b, f)
            .iter()
            .any(|(used, limit)| used * 1_000_000 >= i128::from(ppm) * limit)
    })
}

fn state(b: &ResolvedBudget, f: &Fig) -> BucketState {
    if dims(b, f).iter().any(|(used, limit)| used >= limit) {
        BucketState::Exhausted
    } else if warn_reached(b, f) {
        BucketState::Warn
    } else {
        BucketState::Ok
    }
}

fn cost(p: &ModelPrice, u: &Usage) -> i128 {
    let (i, o) = (i128::from(p.input_per_mtok), i128::from(p.output_per_mtok));
    let cached = i128::from(p.cached_input_per_mtok.unwrap_or(p.input_per_mtok));
    let write = i128::from(p.cache_write_per_mtok.unwrap_or(p.input_per_mtok));
    let num = i128::from(u.input_tokens) * i
        + i128::from(u.output_tokens) * o
        + i128::from(u.cached_input_tokens) * cached
        + i128::from(u.cache_write_tokens) * write;
    (num + MTOK - 1) / MTOK
}

fn usage_amt(p: &ModelPrice, u: &Usage) -> Amt {
    Amt {
        micros: cost(p, u),
        tokens: i128::from(u.input_tokens)
            + i128::from(u.output_tokens)
            + i128::from(u.cached_input_tokens)
            + i128::from(u.cache_write_tokens),
        requests: i128::from(u.requests),
    }
}

fn fingerprint(op: &str, payload: &impl serde::Serialize) -> String {
    serde_json::to_string(&(op, payload)).unwrap()
}

impl Model {
    fn new(policy: ResolvedPolicy) -> Model {
        Model {
            policy,
            usage: Vec::new(),
            holds: BTreeMap::new(),
            ended: HashMap::new(),
            ids: HashMap::new(),
            bucket_ids: HashMap::new(),
            buckets: Vec::new(),
            touched: BTreeSet::new(),
            placed: HashSet::new(),
            crossings: HashSet::new(),
            last_ts: 0,
            generation: 0,
            cache: std::cell::RefCell::new(None),
        }
    }

    /// The price of `model`, and whether it is the table's maximum (an unknown model).
    fn price_of(&self, model: &str) -> (ModelPrice, bool) {
        if let Some(p) = self.policy.pricing.models.get(model) {
            return (p.clone(), false);
        }
        let t = &self.policy.pricing.models;
        let input = t.values().map(|p| p.input_per_mtok).max().unwrap_or(0);
        let output = t.values().map(|p| p.output_per_mtok).max().unwrap_or(0);
        let mut p = price("unknown", input, output, None, &[]);
        p.cached_input_per_mtok = Some(input);
        p.cache_write_per_mtok = Some(input);
        (p, true)
    }

    fn tier_of(model: &str) -> &'static str {
        if model.starts_with("big") {
            "frontier"
        } else {
            "small"
        }
    }

    fn derived(&self, client: &Labels, model: &str) -> Labels {
        let mut l = client.clone();
        let (p, at_max) = self.price_of(model);
        l.insert("model".into(), model.into());
        l.insert(
            "provider".into(),
            if at_max { "unknown".into() } else { p.provider },
        );
        l.insert("tier".into(), Self::tier_of(model).into());
        l
    }

    fn intern(&mut self, budget: usize, key: String) -> usize {
        if let Some(id) = self.bucket_ids.get(&(budget, key.clone())) {
            return *id;
        }
        let id = self.buckets.len();
        self.buckets.push((budget, key.clone()));
        self.bucket_ids.insert((budget, key), id);
        id
    }

    /// Every bucket an event with these labels counts in, in policy order.
    fn matching(&mut self, labels: &Labels) -> Vec<usize> {
        let mut out = Vec::new();
        for i in 0..self.policy.budgets.len() {
            let b = &self.policy.budgets[i];
            if !selector_matches(&b.match_labels, labels) {
                continue;
            }
            if let Some(key) = render_key(&b.group_by, labels) {
                out.push(self.intern(i, key));
            }
        }
        out
    }

    /// Figures of every interned bucket at `t`: usage summed over each bucket's window at `t`,
    /// holds summed when still live at `t` (expiry strictly after `t`).
    fn figures(&self, t: TsMicros) -> Vec<Fig> {
        if let Some((at, generation, figs)) = &*self.cache.borrow() {
            if *at == t && *generation == self.generation && figs.len() == self.buckets.len() {
                return figs.clone();
            }
        }
        let now: Vec<i64> = self
            .policy
            .budgets
            .iter()
            .map(|b| window_key(&b.window, t))
            .collect();
        let mut figs = vec![Fig::default(); self.buckets.len()];
        for u in &self.usage {
            for &(b, key) in &u.buckets {
                let budget = self.buckets[b].0;
                if key_counts(&self.policy.budgets[budget].window, key, now[budget]) {
                    figs[b].spent += u.amt;
                }
            }
        }
        for h in self.holds.values() {
            if h.expires_at > t {
                for &b in &h.buckets {
                    figs[b].held += h.amt;
                    figs[b].live += 1;
                }
            }
        }
        *self.cache.borrow_mut() = Some((t, self.generation, figs.clone()));
        figs
    }

    /// True when `bucket` is a live scope for a read at `t` (SPEC §5): it holds a reservation
    /// still live at `t` (a read never shows one past its expiry, reaped or not), its budget is
    /// cumulative, some usage in it is still in its window at `t`, or (fixed and calendar) a
    /// hold was placed in it in the window of `t`.
    fn live(&self, bucket: usize, t: TsMicros) -> bool {
        let spec = &self.budget_of(bucket).window;
        if *spec == WindowSpec::Cumulative
            || self
                .holds
                .values()
                .any(|h| h.buckets.contains(&bucket) && h.expires_at > t)
        {
            return true;
        }
        let now = window_key(spec, t);
        if self.placed.contains(&(bucket, now)) {
            return true;
        }
        self.usage.iter().any(|u| {
            u.buckets
                .iter()
                .any(|&(b, key)| b == bucket && key_counts(spec, key, now))
        })
    }

    fn budget_of(&self, bucket: usize) -> &ResolvedBudget {
        &self.policy.budgets[self.buckets[bucket].0]
    }

    /// SPEC §5 for one candidate's hold `probe` against every matching bucket.
    fn judge(
        &mut self,
        labels: &Labels,
        probe: Amt,
        t: TsMicros,
    ) -> (Decision, Vec<(String, String, Fig)>) {
        let refs = self.matching(labels);
        let figs = self.figures(t);
        let mut decision = Decision::Allow;
        let mut with = Vec::new();
        let mut without = Vec::new();
        for b in refs {
            let budget = self.budget_of(b);
            let f = figs[b];
            let mut after = f;
            after.held += probe;
            after.live += 1;
            let over = dims(budget, &after).iter().any(|(u, l)| u > l);
            let verdict = if over && budget.enforce == Enforce::Deny {
                Decision::Deny
            } else if over || warn_reached(budget, &after) {
                Decision::Warn
            } else {
                Decision::Allow
            };
            decision = decision.max(verdict);
            with.push((budget.id.clone(), self.buckets[b].1.clone(), after));
            without.push((budget.id.clone(), self.buckets[b].1.clone(), f));
        }
        if decision == Decision::Deny {
            (decision, without)
        } else {
            (decision, with)
        }
    }

    /// What a check or reserve decides at `t`: the first candidate that is priced, has every
    /// required capability, fits its tier's caps and every deny budget.
    fn evaluate(
        &mut self,
        client: &Labels,
        models: &[String],
        require: &[String],
        est: &Estimate,
        t: TsMicros,
    ) -> Eval {
        let mut skipped = Vec::new();
        for model in models {
            let (p, at_max) = self.price_of(model);
            if at_max && self.policy.unknown_models == UnknownModels::Deny {
                skipped.push(SkipReason::UnknownModel);
                continue;
            }
            if require.iter().any(|c| !p.capabilities.contains(c)) {
                skipped.push(SkipReason::MissingCapability);
                continue;
            }
            let max_out = match (est.max_output_tokens, p.max_output_tokens) {
                (Some(e), Some(m)) => e.min(m),
                (Some(e), None) => e,
                (None, Some(m)) => m,
                (None, None) => 4096,
            };
            let worst = i128::from(est.input_tokens) * i128::from(p.input_per_mtok)
                + i128::from(max_out) * i128::from(p.output_per_mtok);
            let hold = Amt {
                micros: (worst + MTOK - 1) / MTOK,
                tokens: i128::from(est.input_tokens) + i128::from(max_out),
                requests: 1,
            };
            if Self::tier_of(model) == "frontier"
                && (hold.micros > i128::from(FRONTIER_MAX_CALL_MICROS)
                    || max_out > FRONTIER_MAX_CALL_OUTPUT)
            {
                skipped.push(SkipReason::TierCap);
                continue;
            }
            let labels = self.derived(client, model);
            let (decision, reports) = self.judge(&labels, hold, t);
            if decision == Decision::Deny {
                skipped.push(SkipReason::Budget);
                continue;
            }
            return Eval {
                decision,
                model: Some(model.clone()),
                labels,
                hold,
                max_out,
                skipped,
                reports,
            };
        }
        // A denial's labels are the request's with those derived from its last candidate.
        let last = models.last().cloned().unwrap_or_default();
        Eval {
            decision: Decision::Deny,
            labels: self.derived(client, &last),
            model: Some(last),
            hold: Amt::default(),
            max_out: 0,
            skipped,
            reports: Vec::new(),
        }
    }

    /// Fold an event's time: ended reservations are remembered for an hour after they end.
    fn saw_event(&mut self, ts: TsMicros) {
        self.last_ts = ts;
        let horizon = ts - ENDED_RESERVATION_MEMORY_SECONDS * SEC;
        self.ended.retain(|_, e| e.at >= horizon);
    }

    fn end_hold(&mut self, rid: &str, how: How, at: TsMicros) {
        self.generation += 1;
        if let Some(h) = self.holds.remove(rid) {
            self.ended.insert(
                rid.to_string(),
                EndedFact {
                    labels: h.labels,
                    model: h.model,
                    hold_micros: h.amt.micros,
                    how,
                    at,
                },
            );
        }
    }
}

// ---- requests -------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Req {
    Record(RecordRequest),
    Reserve(ReserveRequest),
    Commit(CommitRequest),
    Release(ReleaseRequest),
    Extend(ExtendRequest),
}

impl Req {
    fn command(&self) -> Command<'_> {
        match self {
            Req::Record(r) => Command::Record(r),
            Req::Reserve(r) => Command::Reserve(r),
            Req::Commit(r) => Command::Commit(r),
            Req::Release(r) => Command::Release(r),
            Req::Extend(r) => Command::Extend(r),
        }
    }
}

/// What the model expects of one write.
#[derive(Debug)]
enum Expect {
    Error(ErrorCode),
    Duplicate(String),
    Usage {
        key: String,
        fp: String,
        labels: Labels,
        amt: Amt,
        at_max: bool,
        late: bool,
        unknown: bool,
        /// The answer's `reservation` flag (`unknown`, `denied`).
        flag: Option<&'static str>,
        hold_micros: Option<i128>,
        rid: Option<String>,
    },
    Reserve {
        key: String,
        fp: String,
        eval: Eval,
        ttl: u64,
        rid: String,
        report_skips: bool,
    },
    Release {
        key: String,
        fp: String,
        rid: String,
    },
    Extend {
        rid: String,
        ttl: u64,
    },
}

fn bad_id(id: &str) -> bool {
    id.is_empty() || id.len() > 256 || id.chars().any(char::is_control)
}

fn bad_usage(u: &Usage) -> bool {
    u128::from(u.input_tokens)
        + u128::from(u.output_tokens)
        + u128::from(u.cached_input_tokens)
        + u128::from(u.cache_write_tokens)
        > MAX_EVENT_TOKENS
}

fn bad_ttl(ttl: u64) -> bool {
    ttl == 0 || ttl > MAX_TTL_SECONDS
}

impl Model {
    /// The idempotency verdict for `key`: a duplicate or a conflict, if the id is known.
    fn known_id(&self, key: &str, fp: &str) -> Option<Expect> {
        // Ids are remembered for the policy's window after their event, counted back from the
        // last event folded.
        let horizon = self.last_ts - self.policy.idempotency_window_seconds as i64 * SEC;
        let known = self.ids.get(key).filter(|(_, _, at)| *at >= horizon);
        known.map(|(have, answer, _)| {
            if have == fp {
                Expect::Duplicate(answer.clone())
            } else {
                Expect::Error(ErrorCode::Conflict)
            }
        })
    }

    /// What `req` should do at `t` (holds due by `t` already expired).
    fn expect(&mut self, req: &Req, t: TsMicros) -> Expect {
        match req {
            Req::Record(r) => {
                if bad_id(&r.event_id) || bad_usage(&r.usage) {
                    return Expect::Error(ErrorCode::BadRequest);
                }
                let (key, fp) = (format!("e/{}", r.event_id), fingerprint("record", r));
                if let Some(e) = self.known_id(&key, &fp) {
                    return e;
                }
                let (p, at_max) = self.price_of(&r.model);
                Expect::Usage {
                    key,
                    fp,
                    labels: self.derived(&r.labels, &r.model),
                    amt: usage_amt(&p, &r.usage),
                    at_max,
                    late: false,
                    unknown: false,
                    flag: None,
                    hold_micros: None,
                    rid: None,
                }
            }
            Req::Commit(c) => {
                if bad_id(&c.reservation_id) || bad_id(&c.event_id) || bad_usage(&c.usage) {
                    return Expect::Error(ErrorCode::BadRequest);
                }
                let (key, fp) = (format!("e/{}", c.event_id), fingerprint("commit", c));
                if let Some(e) = self.known_id(&key, &fp) {
                    return e;
                }
                let rid = c.reservation_id.clone();
                let (labels, model, late, flag, hold_micros) = if let Some(h) = self.holds.get(&rid)
                {
                    (
                        h.labels.clone(),
                        h.model.clone(),
                        false,
                        None,
                        Some(h.amt.micros),
                    )
                } else if let Some(e) = self.ended.get(&rid) {
                    match e.how {
                        How::Committed => return Expect::Error(ErrorCode::Conflict),
                        // The call went ahead without a hold: the commit's own labels and
                        // model where it gives them, the denial's otherwise.
                        How::Denied => {
                            let model = c.model.clone().unwrap_or_else(|| e.model.clone());
                            let client = c.labels.clone().unwrap_or_else(|| {
                                let mut l = e.labels.clone();
                                l.retain(|k, _| {
                                    !["model", "provider", "tier", "subscription"]
                                        .contains(&k.as_str())
                                });
                                l
                            });
                            (
                                self.derived(&client, &model),
                                model,
                                false,
                                Some("denied"),
                                None,
                            )
                        }
                        How::Released | How::Expired => (
                            e.labels.clone(),
                            e.model.clone(),
                            true,
                            None,
                            Some(e.hold_micros),
                        ),
                    }
                } else {
                    let model = c.model.clone().unwrap_or_else(|| "unknown".into());
                    let labels = self.derived(&c.labels.clone().unwrap_or_default(), &model);
                    (labels, model, false, Some("unknown"), None)
                };
                let unknown = flag == Some("unknown");
                let (p, at_max) = self.price_of(&model);
                Expect::Usage {
                    key,
                    fp,
                    labels,
                    amt: usage_amt(&p, &c.usage),
                    at_max,
                    late,
                    unknown,
                    flag,
                    hold_micros,
                    rid: Some(rid),
                }
            }
            Req::Reserve(r) => {
                let ttl = r.ttl_seconds.unwrap_or(self.policy.reservation_ttl_seconds);
                if bad_id(&r.reservation_id) || bad_ttl(ttl) {
                    return Expect::Error(ErrorCode::BadRequest);
                }
                let models = match (&r.candidates, &r.model) {
                    (Some(c), _) if !c.is_empty() => c.clone(),
                    (_, Some(m)) => vec![m.clone()],
                    _ => return Expect::Error(ErrorCode::BadRequest),
                };
                let (key, fp) = (format!("r/{}", r.reservation_id), fingerprint("reserve", r));
                if let Some(e) = self.known_id(&key, &fp) {
                    return e;
                }
                // An id past the idempotency window whose hold is live or remembered as ended
                // is still in use (a denied one holds nothing: it is not).
                if self.holds.contains_key(&r.reservation_id)
                    || self
                        .ended
                        .get(&r.reservation_id)
                        .is_some_and(|e| e.how != How::Denied)
                {
                    return Expect::Error(ErrorCode::Conflict);
                }
                let require = r.require.clone().unwrap_or_default();
                let eval = self.evaluate(&r.labels, &models, &require, &r.estimate, t);
                Expect::Reserve {
                    key,
                    fp,
                    eval,
                    ttl,
                    rid: r.reservation_id.clone(),
                    report_skips: r.candidates.is_some(),
                }
            }
            Req::Release(r) => {
                if bad_id(&r.reservation_id) {
                    return Expect::Error(ErrorCode::BadRequest);
                }
                let (key, fp) = (format!("x/{}", r.reservation_id), fingerprint("release", r));
                if let Some(e) = self.known_id(&key, &fp) {
                    return e;
                }
                if !self.holds.contains_key(&r.reservation_id) {
                    return Expect::Error(ErrorCode::NotFound);
                }
                Expect::Release {
                    key,
                    fp,
                    rid: r.reservation_id.clone(),
                }
            }
            Req::Extend(e) => {
                if bad_id(&e.reservation_id) || bad_ttl(e.ttl_seconds) {
                    return Expect::Error(ErrorCode::BadRequest);
                }
                if !self.holds.contains_key(&e.reservation_id) {
                    return Expect::Error(ErrorCode::NotFound);
                }
                Expect::Extend {
                    rid: e.reservation_id.clone(),
                    ttl: e.ttl_seconds,
                }
            }
        }
    }
}

// ---- the driver -----------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    steps: u64,
    events: u64,
    allowed: u64,
    warned: u64,
    denied: u64,
    usage: u64,
    late: u64,
    unknown: u64,
    /// Commits of denied reservations.
    denied_commits: u64,
    overruns: u64,
    duplicates: u64,
    conflicts: u64,
    not_found: u64,
    bad: u64,
    expired: u64,
    crossings: u64,
    restarts: u64,
    reloads: u64,
    checks: u64,
    windows_crossed: u64,
    /// Denied reservations by reason (`budget:<id>`, `tier_cap`, ...).
    deny_reasons: BTreeMap<String, u64>,
}

struct Sim {
    seed: u64,
    step: u64,
    rng: Rng,
    h: Harness,
    m: Model,
    history: Vec<Req>,
    next_id: u64,
    trace: VecDeque<String>,
    stats: Stats,
}

macro_rules! ensure {
    ($sim:expr, $cond:expr, $($fmt:tt)*) => {
        if !$cond {
            $sim.fail(format!($($fmt)*));
        }
    };
}

macro_rules! ensure_eq {
    ($sim:expr, $left:expr, $right:expr, $($fmt:tt)*) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            $sim.fail(format!("{}: ledger {:?} != model {:?}", format!($($fmt)*), l, r));
        }
    }};
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(bursar_testkit::Rng::new(seed));
        let policy = sim_policy(&BASE);
        let mut h = Harness {
            ledger: Ledger::new(),
            log: Vec::new(),
            // Start somewhere in the day, so every seed meets the boundaries at other moments.
            now: T0 + rng.below(DAY as u64) as i64,
        };
        h.apply_policy(policy.clone());
        let mut m = Model::new(policy);
        m.saw_event(h.log[0].ts);
        Sim {
            seed,
            step: 0,
            rng,
            h,
            m,
            history: Vec::new(),
            next_id: 0,
            trace: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    fn fail(&self, msg: String) -> ! {
        let trace: Vec<&String> = self.trace.iter().collect();
        panic!(
            "simulation diverged from the model at seed {seed}, step {step} (now {now}):\n  {msg}\n\
             last operations (oldest first):\n    {trace}\n\
             reproduce with: BURSAR_SIM_SEED={seed} BURSAR_SIM_STEPS={steps} cargo test -p bursar-core --test simulation",
            seed = self.seed,
            step = self.step,
            now = self.h.now,
            trace = trace
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n    "),
            steps = self.step + 1,
        );
    }

    fn note(&mut self, what: String) {
        if self.trace.len() == 24 {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("#{} @{}: {what}", self.step, self.h.now));
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    /// The instant a write issued now would be decided at.
    fn present(&self) -> TsMicros {
        self.h.now.max(self.m.last_ts + 1)
    }

    // ---- random requests --------------------------------------------------------------------

    fn client_labels(&mut self) -> Labels {
        let mut l = Labels::new();
        let org = self.rng.below(10);
        if org < 7 {
            l.insert("org".into(), "acme".into());
        } else if org < 9 {
            l.insert("org".into(), "beta".into());
        }
        if self.rng.chance(90) {
            // The last value needs percent-encoding in a scope key.
            let team = self.rng.pick(&["search", "ads", "r&d,eu=1%"]);
            l.insert("team".into(), team.into());
        }
        if self.rng.chance(95) {
            let user = self.rng.pick(&["u1", "u2", "u3", "u4"]);
            l.insert("user".into(), user.into());
        }
        if self.rng.chance(80) {
            let agent = self.rng.pick(&["planner", "coder"]);
            l.insert("agent".into(), agent.into());
        }
        if self.rng.chance(30) {
            l.insert("plan".into(), "trial".into());
        }
        l
    }

    fn any_model(&mut self) -> String {
        let r = self.rng.below(20);
        match r {
            0..=7 => "m",
            8..=12 => "big",
            13..=15 => "local",
            16..=17 => "unit",
            _ => "mystery",
        }
        .to_string()
    }

    fn usage(&mut self, scale: u64) -> Usage {
        Usage {
            input_tokens: self.rng.below(2000 * scale),
            output_tokens: self.rng.below(1000 * scale),
            cached_input_tokens: if self.rng.chance(15) {
                self.rng.below(3000)
            } else {
                0
            },
            cache_write_tokens: if self.rng.chance(5) {
                self.rng.below(500)
            } else {
                0
            },
            requests: match self.rng.below(10) {
                0 => 0,
                1 => 2,
                2 => 3,
                _ => 1,
            },
        }
    }

    fn record_req(&mut self) -> Req {
        let id = self.fresh("e");
        let labels = self.client_labels();
        let model = self.any_model();
        let usage = self.usage(1);
        Req::Record(RecordRequest {
            event_id: id,
            labels,
            model,
            usage,
            occurred_at: None,
            reported_cost_usd: None,
            headers: None,
        })
    }

    fn estimate(&mut self) -> Estimate {
        Estimate {
            input_tokens: self.rng.below(2500),
            max_output_tokens: if self.rng.chance(80) {
                Some(self.rng.below(1500))
            } else {
                None
            },
        }
    }

    /// Model, candidates and require of a reserve or check.
    fn choice(&mut self) -> (Option<String>, Option<Vec<String>>, Option<Vec<String>>) {
        if self.rng.chance(65) {
            return (Some(self.any_model()), None, None);
        }
        let mut pool: Vec<String> = MODELS.iter().map(|s| s.to_string()).collect();
        let mut cands = Vec::new();
        let n = self.rng.range(1, 4);
        for _ in 0..n {
            let i = self.rng.below(pool.len() as u64) as usize;
            cands.push(pool.remove(i));
        }
        let require = match self.rng.below(6) {
            0 | 1 => Some(vec!["tools".to_string()]),
            2 => Some(vec!["vision".to_string()]),
            3 => Some(vec![]),
            _ => None,
        };
        let model = self.rng.chance(30).then(|| self.any_model());
        (model, Some(cands), require)
    }

    fn reserve_req(&mut self) -> Req {
        let id = self.fresh("r");
        let labels = self.client_labels();
        let (model, candidates, require) = self.choice();
        let estimate = self.estimate();
        let ttl_seconds = match self.rng.below(10) {
            0..=2 => None,
            3..=7 => Some(self.rng.range(1, 120)),
            _ => Some(self.rng.range(1, 900)),
        };
        Req::Reserve(ReserveRequest {
            reservation_id: id,
            labels,
            model,
            estimate,
            ttl_seconds,
            candidates,
            require,
            wait_ms: None,
        })
    }

    /// An amount (µUSD and tokens alike, for model `unit`) that takes a limited bucket these
    /// labels count in exactly to its limit or its warn threshold at the present, or one
    /// below or above.
    fn precise_amount(&mut self, client: &Labels) -> Option<u64> {
        let labels = self.m.derived(client, "unit");
        let buckets = self.m.matching(&labels);
        let figs = self.m.figures(self.present());
        let mut targets = Vec::new();
        for b in buckets {
            let budget = self.m.budget_of(b);
            let f = figs[b];
            let dims = [
                (
                    f.spent.micros + f.held.micros,
                    budget.max_micros.map(i128::from),
                ),
                (
                    f.spent.tokens + f.held.tokens,
                    budget.max_tokens.map(i128::from),
                ),
            ];
            for (used, limit) in dims {
                let Some(limit) = limit else { continue };
                targets.push(limit - used);
                if let Some(ppm) = budget.warn_at_ppm {
                    targets.push((i128::from(ppm) * limit + 999_999) / 1_000_000 - used);
                }
            }
        }
        if targets.is_empty() {
            return None;
        }
        let target = self.rng.pick(&targets) + self.rng.pick(&[-1, 0, 0, 1]);
        u64::try_from(target).ok().filter(|t| *t > 0)
    }

    fn precise_record_req(&mut self) -> Req {
        let mut r = self.record_req();
        if let Req::Record(r) = &mut r {
            if let Some(amount) = self.precise_amount(&r.labels) {
                r.model = "unit".into();
                r.usage = Usage {
                    input_tokens: amount,
                    output_tokens: 0,
                    cached_input_tokens: 0,
                    cache_write_tokens: 0,
                    requests: 1,
                };
            }
        }
        r
    }

    fn precise_reserve_req(&mut self) -> Req {
        let mut r = self.reserve_req();
        if let Req::Reserve(r) = &mut r {
            if let Some(amount) = self.precise_amount(&r.labels) {
                let out = amount.min(self.rng.below(2001));
                r.model = Some("unit".into());
                r.candidates = None;
                r.require = None;
                r.estimate = Estimate {
                    input_tokens: amount - out,
                    max_output_tokens: Some(out),
                };
            }
        }
        r
    }

    /// A reservation id to act on: mostly one the model has as a hold (live or due), else an
    /// ended, denied or never-seen one.
    fn some_rid(&mut self, live_percent: u64) -> String {
        if self.rng.chance(live_percent) && !self.m.holds.is_empty() {
            let i = self.rng.below(self.m.holds.len() as u64) as usize;
            return self.m.holds.keys().nth(i).unwrap().clone();
        }
        match self.rng.below(3) {
            0 if !self.m.ended.is_empty() => {
                let mut ended: Vec<&String> = self.m.ended.keys().collect();
                ended.sort();
                let i = self.rng.below(ended.len() as u64) as usize;
                ended[i].clone()
            }
            1 => {
                // Any reservation id ever used (denied, forgotten, ...).
                let rids: Vec<String> = self
                    .history
                    .iter()
                    .rev()
                    .take(300)
                    .filter_map(|r| match r {
                        Req::Reserve(r) => Some(r.reservation_id.clone()),
                        _ => None,
                    })
                    .collect();
                if rids.is_empty() {
                    self.fresh("ghost-")
                } else {
                    self.rng.pick(&rids)
                }
            }
            _ => self.fresh("ghost-"),
        }
    }

    fn commit_req(&mut self) -> Req {
        let rid = self.some_rid(70);
        let event_id = self.fresh("c");
        let mut usage = self.usage(1);
        if let Some((input, max_out)) = self.m.holds.get(&rid).map(|h| (h.input, h.max_out)) {
            // Mostly within the hold, sometimes over it (an overrun is recorded, never refused).
            if self.rng.chance(75) {
                usage.input_tokens = self.rng.below(input + 1);
                usage.output_tokens = self.rng.below(max_out + 1);
                usage.cached_input_tokens = 0;
                usage.cache_write_tokens = 0;
            } else {
                usage = self.usage(3);
            }
        }
        let (labels, model) = match self.rng.below(4) {
            0 => (Some(self.client_labels()), Some(self.any_model())),
            1 => (Some(self.client_labels()), None),
            2 => (None, Some(self.any_model())),
            _ => (None, None),
        };
        Req::Commit(CommitRequest {
            reservation_id: rid,
            event_id,
            usage,
            labels,
            model,
            occurred_at: None,
            reported_cost_usd: None,
            headers: None,
        })
    }

    fn release_req(&mut self) -> Req {
        Req::Release(ReleaseRequest {
            reservation_id: self.some_rid(65),
        })
    }

    fn extend_req(&mut self) -> Req {
        Req::Extend(ExtendRequest {
            reservation_id: self.some_rid(65),
            ttl_seconds: self.rng.range(1, 600),
        })
    }

    fn invalid_req(&mut self) -> Req {
        match self.rng.below(4) {
            0 => {
                let mut r = self.record_req();
                if let Req::Record(r) = &mut r {
                    r.event_id = String::new();
                }
                r
            }
            1 => {
                let mut r = self.reserve_req();
                if let Req::Reserve(r) = &mut r {
                    r.ttl_seconds = Some(if self.rng.chance(50) { 0 } else { 86_401 });
                }
                r
            }
            2 => {
                let mut r = self.commit_req();
                if let Req::Commit(c) = &mut r {
                    c.usage.input_tokens = 1_000_000_000_001;
                }
                r
            }
            _ => Req::Extend(ExtendRequest {
                reservation_id: self.some_rid(90),
                ttl_seconds: 0,
            }),
        }
    }

    /// An earlier request again, unchanged (a client retry).
    fn retry_req(&mut self) -> Option<Req> {
        if self.history.is_empty() {
            return None;
        }
        let n = self.history.len() as u64;
        let i = (n - 1 - self.rng.below(n.min(200))) as usize;
        Some(self.history[i].clone())
    }

    /// An earlier id with a different payload.
    fn conflicting_req(&mut self) -> Option<Req> {
        let mut r = self.retry_req()?;
        match &mut r {
            Req::Record(r) => r.usage.input_tokens += 1,
            Req::Reserve(r) => r.estimate.input_tokens += 1,
            Req::Commit(c) => c.usage.output_tokens += 1,
            Req::Release(_) | Req::Extend(_) => return None,
        }
        Some(r)
    }

    // ---- steps ------------------------------------------------------------------------------

    fn step(&mut self) {
        let roll = self.rng.below(1000);
        match roll {
            0..=139 => {
                let r = self.record_req();
                self.write(r);
            }
            140..=164 => {
                let r = self.precise_record_req();
                self.write(r);
            }
            165..=329 => {
                let r = self.reserve_req();
                self.write(r);
            }
            330..=364 => {
                let r = self.precise_reserve_req();
                self.write(r);
            }
            365..=534 => {
                let r = self.commit_req();
                self.write(r);
            }
            535..=584 => {
                let r = self.release_req();
                self.write(r);
            }
            585..=624 => {
                let r = self.extend_req();
                self.write(r);
            }
            625..=694 => self.check(),
            695..=744 => {
                if let Some(r) = self.retry_req() {
                    self.write(r);
                }
            }
            745..=764 => {
                if let Some(r) = self.conflicting_req() {
                    self.write(r);
                }
            }
            765..=774 => {
                let r = self.invalid_req();
                self.write(r);
            }
            775..=974 => self.advance(),
            975..=989 => self.reap(),
            990..=994 => self.reload(),
            _ => self.restart(),
        }
        self.compare_status();
    }

    fn advance(&mut self) {
        let before = self.h.now;
        let delta = match self.rng.below(20) {
            0..=8 => self.rng.range(1, 1000) as i64 * 1000,
            9..=13 => self.rng.range(1, 60) as i64 * SEC + self.rng.below(1000) as i64,
            14..=15 => self.rng.range(1, 600) as i64 * SEC,
            16 => self.rng.range(1, 8 * 3600) as i64 * SEC,
            // The wall clock steps back (NTP); the log's time does not.
            17 => -(self.rng.range(1, 30_000_000) as i64),
            _ => {
                // To just before (or exactly at) the next boundary of some window; the bursts
                // that follow at this instant are stamped across it.
                let now = self.h.now;
                let next = match self.rng.below(4) {
                    0 => {
                        (now - 120 * SEC).div_euclid(600 * SEC) * 600 * SEC + 120 * SEC + 600 * SEC
                    }
                    1 => (now + 2 * HOUR).div_euclid(DAY) * DAY - 2 * HOUR + DAY,
                    2 => now.div_euclid(HOUR) * HOUR + HOUR,
                    _ => now.div_euclid(30 * SEC) * 30 * SEC + 30 * SEC,
                };
                let before_boundary = self.rng.pick(&[0, 1, 2, 3, 5, 1000]);
                (next - before_boundary - now).max(0)
            }
        };
        self.h.now += delta;
        let crossed = |spec: &WindowSpec| !in_window(spec, before, self.h.now);
        if self.m.policy.budgets.iter().any(|b| crossed(&b.window)) {
            self.stats.windows_crossed += 1;
        }
        self.note(format!("advance {delta} µs"));
    }

    /// Check the events a step appended: dense seqs, strictly increasing ts, never before the
    /// clock, and the hash chain links.
    fn new_events(&self, before: usize) -> Vec<Envelope> {
        let log = &self.h.log;
        for i in before.max(1)..log.len() {
            ensure!(
                self,
                log[i].seq == log[i - 1].seq + 1,
                "seq gap at {}",
                log[i].seq
            );
            ensure!(
                self,
                log[i].ts > log[i - 1].ts,
                "ts not increasing at seq {}",
                log[i].seq
            );
            ensure!(
                self,
                log[i].prev_hash == log[i - 1].hash,
                "broken chain at seq {}",
                log[i].seq
            );
        }
        for e in &log[before..] {
            ensure!(
                self,
                e.ts >= self.h.now,
                "event {} stamped before the clock",
                e.seq
            );
        }
        log[before..].to_vec()
    }

    /// Fold the leading `reservation_expired` events into the model, checking that exactly
    /// the holds due by then were expired. Returns the remaining events.
    fn model_reaps(&mut self, events: Vec<Envelope>) -> Vec<Envelope> {
        let mut rest = events.into_iter().peekable();
        while let Some(e) = rest.peek() {
            let EventBody::ReservationExpired(x) = &e.body else {
                break;
            };
            let (rid, ts) = (x.reservation_id.clone(), e.ts);
            match self.m.holds.get(&rid) {
                Some(h) => ensure!(
                    self,
                    h.expires_at <= ts,
                    "{rid} expired at {ts}, before its expiry {}",
                    h.expires_at
                ),
                None => self.fail(format!("{rid} expired but the model has no such hold")),
            }
            self.m.end_hold(&rid, How::Expired, ts);
            self.m.saw_event(ts);
            self.stats.expired += 1;
            rest.next();
        }
        let t = self.present();
        if let Some((rid, h)) = self.m.holds.iter().find(|(_, h)| h.expires_at <= t) {
            self.fail(format!(
                "hold {rid} is due at {} but was not expired before a decision at {t}",
                h.expires_at
            ));
        }
        rest.collect()
    }

    fn write(&mut self, req: Req) {
        self.note(format!("{req:?}"));
        let before = self.h.log.len();
        let answer = self.h.run(req.command());
        let events = self.new_events(before);
        self.stats.events += events.len() as u64;
        let rest = self.model_reaps(events);
        let t = self.present();
        let expect = self.m.expect(&req, t);
        self.judge_write(expect, answer, rest, t);
        self.history.push(req);
    }

    /// Compare a write's answer and events with the model's expectation, then fold it into the
    /// model.
    fn judge_write(&mut self, expect: Expect, answer: Answer, rest: Vec<Envelope>, t: TsMicros) {
        match expect {
            Expect::Error(code) => {
                match &answer {
                    Answer::Error(e) => ensure_eq!(self, e.code, code, "error code"),
                    other => self.fail(format!("expected error {code:?}, got {other:?}")),
                }
                ensure!(self, rest.is_empty(), "an error appended {rest:?}");
                match code {
                    ErrorCode::Conflict => self.stats.conflicts += 1,
                    ErrorCode::NotFound => self.stats.not_found += 1,
                    _ => self.stats.bad += 1,
                }
            }
            Expect::Duplicate(original) => {
                let v: serde_json::Value = match &answer {
                    Answer::Usage(_) | Answer::Decision(_) | Answer::Release(_) => {
                        serde_json::from_str(&answer.to_line(None)).unwrap()
                    }
                    other => self.fail(format!("expected a duplicate, got {other:?}")),
                };
                let mut want: serde_json::Value = serde_json::from_str(&original).unwrap();
                want["duplicate"] = serde_json::Value::Bool(true);
                ensure_eq!(self, v.clone(), want, "duplicate answer");
                ensure!(self, rest.is_empty(), "a duplicate appended {rest:?}");
                self.stats.duplicates += 1;
            }
            Expect::Usage {
                key,
                fp,
                labels,
                amt,
                at_max,
                late,
                unknown,
                flag,
                hold_micros,
                rid,
            } => {
                let Answer::Usage(a) = &answer else {
                    self.fail(format!("expected usage to be recorded, got {answer:?}"));
                };
                let Some(first) = rest.first() else {
                    self.fail("usage answered but nothing appended".into());
                };
                let EventBody::UsageRecorded(u) = &first.body else {
                    self.fail(format!("expected usage_recorded, got {:?}", first.body));
                };
                ensure_eq!(self, first.ts, t, "usage ts");
                ensure_eq!(self, a.seq, first.seq, "usage seq");
                ensure_eq!(self, u.labels, labels, "usage labels");
                ensure_eq!(self, i128::from(a.cost_micros), amt.micros, "cost");
                ensure_eq!(self, a.priced_at_max, at_max, "priced_at_max");
                ensure_eq!(self, a.late, late, "late");
                ensure_eq!(self, a.reservation.as_deref(), flag, "reservation flag");
                let overrun = hold_micros.map(|h| amt.micros - h).filter(|o| *o > 0);
                ensure_eq!(self, a.overrun_micros.map(i128::from), overrun, "overrun");
                ensure!(self, !a.duplicate, "first answer marked duplicate");
                // Fold into the model.
                let buckets = self.m.matching(&labels);
                let keyed = buckets
                    .iter()
                    .map(|&b| (b, window_key(&self.m.budget_of(b).window, t)))
                    .collect();
                self.m.usage.push(UsageFact {
                    buckets: keyed,
                    amt,
                });
                self.m.generation += 1;
                self.m.touched.extend(buckets.iter().copied());
                if let Some(rid) = &rid {
                    if !unknown {
                        if self.m.holds.contains_key(rid) {
                            self.m.end_hold(rid, How::Committed, t);
                        } else if let Some(e) = self.m.ended.get_mut(rid) {
                            e.how = How::Committed;
                        }
                    }
                }
                self.m.saw_event(t);
                let reports = self.reports_at(&buckets, t, None);
                self.compare_reports(&a.budgets, &reports, "usage answer");
                let worst = reports.iter().map(|r| r.3).max().unwrap_or(BucketState::Ok);
                ensure_eq!(self, a.state, worst, "usage state");
                self.judge_crossings(&buckets, &rest[1..], t);
                self.m
                    .ids
                    .insert(key, (fp, serde_json::to_string(a).unwrap(), t));
                self.stats.usage += 1;
                self.stats.late += u64::from(late);
                self.stats.unknown += u64::from(unknown);
                self.stats.denied_commits += u64::from(flag == Some("denied"));
                self.stats.overruns += u64::from(overrun.is_some());
            }
            Expect::Reserve {
                key,
                fp,
                eval,
                ttl,
                rid,
                report_skips,
            } => {
                let Answer::Decision(a) = &answer else {
                    self.fail(format!("expected a decision, got {answer:?}"));
                };
                self.compare_decision(a, &eval, report_skips, "reserve");
                let Some(first) = rest.first() else {
                    self.fail("reserve answered but nothing appended".into());
                };
                ensure_eq!(self, first.ts, t, "reservation ts");
                ensure_eq!(self, a.seq, Some(first.seq), "reservation seq");
                if eval.decision == Decision::Deny {
                    ensure!(
                        self,
                        matches!(first.body, EventBody::ReservationDenied(_)),
                        "a denial appended {:?}",
                        first.body
                    );
                    ensure!(self, rest.len() == 1, "a denial appended more: {rest:?}");
                    if let EventBody::ReservationDenied(d) = &first.body {
                        ensure_eq!(self, &*d.labels, &eval.labels, "denial labels");
                    }
                    // Remembered as an ended reservation is, for a commit of it.
                    self.m.ended.insert(
                        rid,
                        EndedFact {
                            labels: eval.labels.clone(),
                            model: eval.model.clone().unwrap_or_default(),
                            hold_micros: 0,
                            how: How::Denied,
                            at: t,
                        },
                    );
                    self.m.saw_event(t);
                    self.stats.denied += 1;
                    let why = match &a.reason.budget {
                        Some(b) => format!("{}:{b}", a.reason.code),
                        None => a.reason.code.clone(),
                    };
                    *self.stats.deny_reasons.entry(why).or_default() += 1;
                } else {
                    let EventBody::ReservationCreated(c) = &first.body else {
                        self.fail(format!(
                            "expected reservation_created, got {:?}",
                            first.body
                        ));
                    };
                    let expires_at = t + ttl as i64 * SEC;
                    ensure_eq!(self, c.expires_at, expires_at, "expiry");
                    let buckets = self.m.matching(&eval.labels);
                    self.m.touched.extend(buckets.iter().copied());
                    for &b in &buckets {
                        let spec = self.m.budget_of(b).window.clone();
                        if matches!(spec, WindowSpec::Fixed { .. } | WindowSpec::Calendar { .. }) {
                            self.m.placed.insert((b, window_key(&spec, t)));
                        }
                    }
                    self.m.generation += 1;
                    self.m.holds.insert(
                        rid,
                        HoldFact {
                            labels: eval.labels.clone(),
                            model: eval.model.clone().unwrap_or_default(),
                            amt: eval.hold,
                            input: u64::try_from(eval.hold.tokens).unwrap() - eval.max_out,
                            max_out: eval.max_out,
                            expires_at,
                            buckets: buckets.clone(),
                        },
                    );
                    self.m.saw_event(t);
                    self.judge_crossings(&buckets, &rest[1..], t);
                    if eval.decision == Decision::Warn {
                        self.stats.warned += 1;
                    } else {
                        self.stats.allowed += 1;
                    }
                }
                self.m
                    .ids
                    .insert(key, (fp, serde_json::to_string(a).unwrap(), t));
            }
            Expect::Release { key, fp, rid } => {
                let Answer::Release(a) = &answer else {
                    self.fail(format!("expected a release, got {answer:?}"));
                };
                ensure!(
                    self,
                    rest.len() == 1 && matches!(rest[0].body, EventBody::ReservationReleased(_)),
                    "release appended {rest:?}"
                );
                ensure_eq!(self, rest[0].ts, t, "release ts");
                ensure_eq!(self, a.seq, rest[0].seq, "release seq");
                self.m.end_hold(&rid, How::Released, t);
                self.m.saw_event(t);
                self.m
                    .ids
                    .insert(key, (fp, serde_json::to_string(a).unwrap(), t));
            }
            Expect::Extend { rid, ttl } => {
                let Answer::Extend(a) = &answer else {
                    self.fail(format!("expected an extension, got {answer:?}"));
                };
                let expires_at = t + ttl as i64 * SEC;
                match rest.as_slice() {
                    [e] => match &e.body {
                        EventBody::ReservationExtended(x) => {
                            ensure_eq!(self, x.expires_at, expires_at, "extended expiry");
                            ensure_eq!(self, e.ts, t, "extend ts");
                            ensure_eq!(self, a.seq, e.seq, "extend seq");
                        }
                        other => self.fail(format!("extend appended {other:?}")),
                    },
                    other => self.fail(format!("extend appended {other:?}")),
                }
                if let Some(h) = self.m.holds.get_mut(&rid) {
                    h.expires_at = expires_at;
                    self.m.generation += 1;
                }
                self.m.saw_event(t);
            }
        }
    }

    /// `(budget id, key, figures, state)` of `buckets` at `t`, with `probe` added if given.
    fn reports_at(
        &self,
        buckets: &[usize],
        t: TsMicros,
        probe: Option<Amt>,
    ) -> Vec<(String, String, Fig, BucketState)> {
        let figs = self.m.figures(t);
        buckets
            .iter()
            .map(|&b| {
                let budget = self.m.budget_of(b);
                let mut f = figs[b];
                if let Some(p) = probe {
                    f.held += p;
                    f.live += 1;
                }
                (
                    budget.id.clone(),
                    self.m.buckets[b].1.clone(),
                    f,
                    state(budget, &f),
                )
            })
            .collect()
    }

    fn compare_reports(
        &self,
        got: &[BudgetReport],
        want: &[(String, String, Fig, BucketState)],
        what: &str,
    ) {
        ensure_eq!(self, got.len(), want.len(), "{what}: number of budgets");
        for (g, (id, key, f, st)) in got.iter().zip(want) {
            let row = |r: &BudgetReport| {
                (
                    r.budget.clone(),
                    r.key.clone(),
                    i128::from(r.spent_micros),
                    i128::from(r.held_micros),
                    i128::from(r.spent_tokens),
                    i128::from(r.held_tokens),
                    i128::from(r.spent_requests),
                    i128::from(r.live_holds),
                    r.state,
                )
            };
            let expected = (
                id.clone(),
                key.clone(),
                f.spent.micros,
                f.held.micros,
                f.spent.tokens,
                f.held.tokens,
                f.spent.requests,
                f.live,
                *st,
            );
            ensure_eq!(self, row(g), expected, "{what}: bucket {id} {key:?}");
            // What is left of each limit the budget has: `limit - spent - held`, never below 0.
            if let Some(b) = self.m.policy.budgets.iter().find(|b| b.id == *id) {
                let left = |limit: Option<i128>, used: i128| limit.map(|l| (l - used).max(0));
                let got_left = (
                    g.remaining_micros.map(i128::from),
                    g.remaining_tokens.map(i128::from),
                    g.remaining_requests.map(i128::from),
                    g.remaining_concurrent.map(i128::from),
                );
                let want_left = (
                    left(b.max_micros.map(i128::from), f.spent.micros + f.held.micros),
                    left(b.max_tokens.map(i128::from), f.spent.tokens + f.held.tokens),
                    left(
                        b.max_requests.map(i128::from),
                        f.spent.requests + f.held.requests,
                    ),
                    left(b.max_concurrent.map(i128::from), f.live),
                );
                ensure_eq!(
                    self,
                    got_left,
                    want_left,
                    "{what}: remaining of {id} {key:?}"
                );
            }
        }
    }

    fn compare_decision(
        &self,
        a: &bursar_schemas::wire::DecisionAnswer,
        eval: &Eval,
        report_skips: bool,
        what: &str,
    ) {
        ensure_eq!(
            self,
            a.decision,
            eval.decision,
            "{what}: decision ({:?})",
            a.reason
        );
        if eval.decision != Decision::Deny {
            ensure_eq!(self, a.model, eval.model, "{what}: chosen model");
            ensure_eq!(
                self,
                i128::from(a.hold_micros),
                eval.hold.micros,
                "{what}: hold"
            );
            let want: Vec<(String, String, Fig, BucketState)> = eval
                .reports
                .iter()
                .map(|(id, key, f)| {
                    let b = self.m.policy.budgets.iter().find(|b| &b.id == id).unwrap();
                    (id.clone(), key.clone(), *f, state(b, f))
                })
                .collect();
            self.compare_reports(&a.budgets, &want, what);
        }
        if report_skips {
            let got: Vec<SkipReason> = a.skipped.iter().map(|s| s.reason).collect();
            ensure_eq!(self, got, eval.skipped, "{what}: skipped candidates");
        }
    }

    /// The warn/exhausted events after a usage or hold: each for a touched bucket that is in
    /// that state, at most once per bucket per window; and every touched bucket in such a state
    /// has had its event in this window.
    fn judge_crossings(&mut self, buckets: &[usize], events: &[Envelope], t: TsMicros) {
        let figs = self.m.figures(t);
        for e in events {
            let (c, exhausted) = match &e.body {
                EventBody::BudgetWarned(c) => (c, false),
                EventBody::BudgetExhausted(c) => (c, true),
                other => self.fail(format!("unexpected event {other:?}")),
            };
            let b = buckets
                .iter()
                .copied()
                .find(|&b| self.m.budget_of(b).id == c.budget && self.m.buckets[b].1 == c.key)
                .unwrap_or_else(|| self.fail(format!("crossing of an untouched bucket {c:?}")));
            let budget = self.m.budget_of(b);
            let st = state(budget, &figs[b]);
            let need = if exhausted {
                BucketState::Exhausted
            } else {
                BucketState::Warn
            };
            ensure!(
                self,
                st >= need,
                "crossing {c:?} but the model's bucket is {st:?}"
            );
            let w = crossing_window(&budget.window, t);
            ensure_eq!(self, c.window_start, w, "crossing window of {c:?}");
            ensure_eq!(
                self,
                (i128::from(c.spent_micros), i128::from(c.held_micros)),
                (figs[b].spent.micros, figs[b].held.micros),
                "crossing figures"
            );
            ensure!(
                self,
                self.m.crossings.insert((b, exhausted, w)),
                "second crossing in one window: {c:?}"
            );
            self.m.saw_event(e.ts);
            self.stats.crossings += 1;
        }
        for &b in buckets {
            let budget = self.m.budget_of(b);
            let st = state(budget, &figs[b]);
            let w = crossing_window(&budget.window, t);
            if st >= BucketState::Warn && budget.warn_at_ppm.is_some() {
                ensure!(
                    self,
                    self.m.crossings.contains(&(b, false, w)),
                    "bucket {} {:?} reached warn_at without budget_warned",
                    budget.id,
                    self.m.buckets[b].1
                );
            }
            if st == BucketState::Exhausted {
                ensure!(
                    self,
                    self.m.crossings.contains(&(b, true, w)),
                    "bucket {} {:?} is exhausted without budget_exhausted",
                    budget.id,
                    self.m.buckets[b].1
                );
            }
        }
    }

    fn check(&mut self) {
        let labels = self.client_labels();
        let (model, candidates, require) = self.choice();
        let estimate = self.estimate();
        let req = CheckRequest {
            labels,
            model,
            estimate,
            candidates,
            require,
            wait_ms: None,
        };
        self.note(format!("check {req:?}"));
        let answer = self.h.ledger.check(&req, self.h.now);
        let models = match (&req.candidates, &req.model) {
            (Some(c), _) if !c.is_empty() => c.clone(),
            (_, Some(m)) => vec![m.clone()],
            _ => {
                ensure!(
                    self,
                    answer.is_error(),
                    "check without a model answered {answer:?}"
                );
                return;
            }
        };
        let t = self.present();
        let require = req.require.clone().unwrap_or_default();
        let eval = self
            .m
            .evaluate(&req.labels, &models, &require, &req.estimate, t);
        let Answer::Decision(a) = &answer else {
            self.fail(format!("check answered {answer:?}"));
        };
        ensure!(self, a.seq.is_none(), "check has a seq");
        self.compare_decision(a, &eval, req.candidates.is_some(), "check");
        self.stats.checks += 1;
    }

    fn reap(&mut self) {
        self.note("reap".into());
        let before = self.h.log.len();
        let events = self.h.ledger.reap(self.h.now);
        for (seq, ts, body) in events {
            let prev = self.h.log.last().map(|e| e.hash).unwrap_or_default();
            self.h
                .log
                .push(Envelope::seal(seq, ts, Default::default(), prev, body).unwrap());
        }
        let events = self.new_events(before);
        self.stats.events += events.len() as u64;
        let rest = self.model_reaps(events);
        ensure!(self, rest.is_empty(), "the reaper appended {rest:?}");
    }

    fn reload(&mut self) {
        let mut scale = |v: i64| -> i64 { v * self.rng.range(1, 8) as i64 / 4 };
        let mut l = BASE;
        l.team_micros = scale(BASE.team_micros);
        l.tpm_tokens = scale(BASE.tpm_tokens as i64) as u64;
        l.daily_micros = scale(BASE.daily_micros);
        l.trial_requests = scale(BASE.trial_requests as i64) as u64;
        l.soft_micros = scale(BASE.soft_micros);
        l.agent_concurrent = self.rng.range(1, 5);
        l.team_warn_ppm = self.rng.pick(&[500_000, 800_000, 1_000_000]);
        l.unknown = if self.rng.chance(50) {
            UnknownModels::Deny
        } else {
            UnknownModels::PriceAtMax
        };
        l.ttl_seconds = self.rng.range(1, 600);
        self.note(format!("reload {l:?}"));
        let policy = sim_policy(&l);
        let before = self.h.log.len();
        self.h.apply_policy(policy.clone());
        let events = self.new_events(before);
        ensure!(self, events.len() == 1, "a reload appended {events:?}");
        self.m.policy = policy;
        self.m.generation += 1;
        self.m.saw_event(events[0].ts);
        self.stats.reloads += 1;
    }

    fn restart(&mut self) {
        self.note("restart".into());
        let refolded = self.h.refold();
        ensure!(
            self,
            refolded == self.h.ledger,
            "the live ledger differs from the fold of its log"
        );
        self.h.ledger = refolded;
        self.stats.restarts += 1;
    }

    /// `status` at the present must list exactly the touched buckets, with the model's
    /// figures and states.
    fn compare_status(&mut self) {
        let got = self
            .h
            .ledger
            .status(&StatusRequest::default(), self.h.now)
            .unwrap()
            .budgets;
        // A read never looks at a time before the last event.
        let t = self.h.now.max(self.m.last_ts);
        // Only live scopes are listed (SPEC §5): a bucket that holds a reservation, of a
        // cumulative budget, or with usage still in its window at `t`.
        let touched: Vec<usize> = self
            .m
            .touched
            .iter()
            .copied()
            .filter(|&b| self.m.live(b, t))
            .collect();
        let mut want = self.reports_at(&touched, t, None);
        want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut got = got;
        got.sort_by(|a, b| (&a.budget, &a.key).cmp(&(&b.budget, &b.key)));
        self.compare_reports(&got, &want, "status");
        for r in &got {
            let b = self
                .m
                .policy
                .budgets
                .iter()
                .find(|b| b.id == r.budget)
                .unwrap();
            ensure_eq!(
                self,
                r.limit_micros,
                b.max_micros,
                "status limit of {}",
                r.budget
            );
            ensure_eq!(self, r.enforce, b.enforce, "status enforce of {}", r.budget);
            let remaining = b
                .max_micros
                .map(|l| (l - r.spent_micros - r.held_micros).max(0));
            ensure_eq!(
                self,
                r.remaining_micros,
                remaining,
                "remaining of {}",
                r.budget
            );
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn run_seed(seed: u64, steps: u64) -> Stats {
    let progress = std::cell::Cell::new(0u64);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed);
        for step in 0..steps {
            progress.set(step);
            sim.step = step;
            sim.step();
        }
        sim.step = steps;
        sim.restart();
        sim.stats.steps = steps;
        sim.stats
    }));
    match run {
        Ok(stats) => stats,
        Err(panic) => {
            // Also for panics inside the ledger, not only for the model's own checks.
            eprintln!(
                "simulation failed at seed {seed}, step {step}; reproduce with: \
                 BURSAR_SIM_SEED={seed} BURSAR_SIM_STEPS={steps} cargo test -p bursar-core --test simulation",
                step = progress.get(),
            );
            std::panic::resume_unwind(panic)
        }
    }
}

#[test]
fn the_ledger_agrees_with_a_naive_model_over_seeded_random_runs() {
    let steps = env_u64("BURSAR_SIM_STEPS").unwrap_or(DEFAULT_STEPS);
    let seeds: Vec<u64> = match env_u64("BURSAR_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let n = env_u64("BURSAR_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
            let base = env_u64("BURSAR_SIM_SEED_BASE").unwrap_or(1);
            (base..base + n).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    for seed in &seeds {
        let s = run_seed(*seed, steps);
        total.steps += s.steps;
        total.events += s.events;
        total.allowed += s.allowed;
        total.warned += s.warned;
        total.denied += s.denied;
        total.usage += s.usage;
        total.late += s.late;
        total.unknown += s.unknown;
        total.denied_commits += s.denied_commits;
        total.overruns += s.overruns;
        total.duplicates += s.duplicates;
        total.conflicts += s.conflicts;
        total.not_found += s.not_found;
        total.bad += s.bad;
        total.expired += s.expired;
        total.crossings += s.crossings;
        total.restarts += s.restarts;
        total.reloads += s.reloads;
        total.checks += s.checks;
        total.windows_crossed += s.windows_crossed;
        for (k, v) in s.deny_reasons {
            *total.deny_reasons.entry(k).or_default() += v;
        }
    }
    eprintln!(
        "simulation: {} seeds × {steps} steps in {:?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    // The run must actually exercise what it claims to.
    if seeds.len() * steps as usize >= 5000 {
        for (what, n) in [
            ("allowed reservations", total.allowed),
            ("warned reservations", total.warned),
            ("denied reservations", total.denied),
            ("late commits", total.late),
            ("unknown commits", total.unknown),
            ("commits of denied reservations", total.denied_commits),
            ("overruns", total.overruns),
            ("duplicates", total.duplicates),
            ("conflicts", total.conflicts),
            ("not found", total.not_found),
            ("expiries", total.expired),
            ("crossings", total.crossings),
            ("restarts", total.restarts),
            ("reloads", total.reloads),
            ("window boundaries crossed", total.windows_crossed),
        ] {
            assert!(n > 0, "the simulation never produced any {what}: {total:?}");
        }
    }
}
