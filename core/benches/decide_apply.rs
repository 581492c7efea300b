//! Core micro-benchmarks (issue 3, "Performance"): `decide` + `apply` on a policy of 20 budgets
//! with `group_by` over 10,000 scopes. Target: at least 2 million events per second on one core.
//!
//! The policy is parsed from TOML with `parse_policy`, exactly as a user writes it: org, team,
//! user, session, agent and plan budgets, fixed daily and hourly windows, a rolling
//! tokens-per-minute and a rolling requests-per-minute budget, calendar week and month budgets,
//! concurrency budgets and meters. 10,000 users (and sessions) over 100 teams are pre-populated
//! before anything is measured.
//!
//! Benchmarks (each reports events per second through `Throughput::Elements`):
//! - `decide+apply`: the issue's figure. `Ledger::apply_usage` of a `usage_recorded`: the fold
//!   and, in the same pass over the event's 14 buckets, the decision on each (SPEC §5: its
//!   figures and state after the event, the event's state, the `budget_warned` /
//!   `budget_exhausted` crossings due). This is what the writer does for every `record` and
//!   `commit`, before it renders the answer. Nothing is rendered here: no answer lines, no
//!   JSON.
//! - `decide,apply`: `Ledger::decide` (the verdict `check` and `reserve` make: allow / warn /
//!   deny over every budget an event of this cost counts in) and then `Ledger::apply` of the
//!   `usage_recorded`, as two calls (each finds the event's buckets). The event is priced
//!   first.
//! - `record`: `Ledger::execute(Command::Record)` — validation, idempotency digest, decision,
//!   apply, crossings, the receipt and the typed answer rendered from it.
//! - `apply`: `Ledger::apply` of pre-built `usage_recorded` bodies (the replay/fold path).
//! - `check`: `Ledger::check` (read-only decision).
//! - `reserve_commit`: a `reserve` then its `commit` through `execute` (two events per element).
//!
//! Run: `cargo bench -p bursar-core --bench decide_apply`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bursar_core::ledger::{total_tokens, Answer, Command, Ledger, Step};
use bursar_core::policy::parse_policy;
use bursar_core::window::Amounts;
use bursar_schemas::event::{EventBody, PolicyApplied};
use bursar_schemas::wire::BucketState;
use bursar_schemas::wire::{
    CheckRequest, CommitRequest, Decision, Estimate, RecordRequest, ReserveRequest, Usage,
};
use bursar_schemas::{Labels, TsMicros};
use criterion::{criterion_group, BatchSize, Criterion, Throughput};

/// 2026-11-23T00:00:00Z in µs.
const T0: TsMicros = 1_795_392_000_000_000;
/// Distinct users (and sessions): the scopes of the per-user budgets.
const SCOPES: usize = 10_000;
/// Teams.
const TEAMS: usize = 100;
/// Simulated time between two recorded events (1000 events/s).
const RECORD_STEP: TsMicros = 1_000;
/// Simulated time between two reserve/commit pairs (20 pairs/s): ended reservations are
/// remembered for an hour, so this bounds their number (and the bench's memory).
const PAIR_STEP: TsMicros = 50_000;

/// A realistic `bursar.toml`: 20 budgets, all but one with `group_by`.
const POLICY: &str = r#"
[daemon]
reservation_ttl_seconds = 300
max_keys_per_budget = 100000
unknown_models = "deny"

[tiers]
default = "small"
patterns = [
  { match = "gpt-4o-mini*", tier = "small" },
  { match = "gpt-4o*", tier = "frontier" },
  { match = "claude-opus*", tier = "frontier" },
  { match = "claude-sonnet*", tier = "mid" },
]
[tiers.caps.frontier]
max_call_usd = 0.50
max_call_output_tokens = 16000

# --- per organisation -------------------------------------------------------------------
[[budget]]
id = "org-monthly"
group_by = ["org"]
window = "calendar"
calendar = "month"
utc_offset = "+02:00"
max_usd = 5000000
warn_at = 0.8

[[budget]]
id = "acme-daily"
match = { org = "acme" }
group_by = ["org"]
window = "fixed"
window_seconds = 86400
window_offset_seconds = -7200
max_usd = 500000
max_requests = 1000000000

[[budget]]
id = "globex-daily"
match = { org = "globex" }
group_by = ["org"]
window = "fixed"
window_seconds = 86400
max_usd = 100000

[[budget]]
id = "initech-daily"
match = { org = "initech" }
group_by = ["org"]
window = "fixed"
window_seconds = 86400
max_usd = 2000

# --- per team ---------------------------------------------------------------------------
[[budget]]
id = "team-daily"
match = { org = "acme" }
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 50000
max_tokens = 100000000000
max_requests = 100000000
max_concurrent = 1000
warn_at = 0.9

[[budget]]
id = "team-weekly"
group_by = ["team"]
window = "calendar"
calendar = "week"
max_usd = 200000

[[budget]]
id = "team-frontier-daily"
match = { tier = "frontier" }
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 30000
enforce = "warn"

[[budget]]
id = "team-rpm"
group_by = ["team"]
window = "rolling"
window_seconds = 60
resolution_seconds = 5
max_requests = 1000000

# --- per user and session ---------------------------------------------------------------
[[budget]]
id = "user-daily"
group_by = ["user"]
window = "fixed"
window_seconds = 86400
max_usd = 1000
warn_at = 0.9

[[budget]]
id = "user-tpm"
group_by = ["user"]
window = "rolling"
window_seconds = 60
max_tokens = 100000000

[[budget]]
id = "user-concurrency"
group_by = ["user"]
max_concurrent = 8

[[budget]]
id = "user-opus-daily"
match = { model = "claude-opus-4-1" }
group_by = ["user"]
window = "fixed"
window_seconds = 86400
max_usd = 50

[[budget]]
id = "session-cap"
match = { session = "*" }
group_by = ["session"]
max_usd = 500

# --- per agent and plan -----------------------------------------------------------------
[[budget]]
id = "agent-hourly"
match = { org = "acme" }
group_by = ["team", "agent"]
window = "fixed"
window_seconds = 3600
max_usd = 10000
enforce = "warn"

[[budget]]
id = "plan-monthly"
match = { plan = "*" }
group_by = ["plan"]
window = "calendar"
calendar = "month"
max_usd = 100000

# --- meters (no limit: they report, never warn or deny) ---------------------------------
[[budget]]
id = "model-daily"
group_by = ["model"]
window = "fixed"
window_seconds = 86400

[[budget]]
id = "provider-daily"
group_by = ["provider"]
window = "fixed"
window_seconds = 86400

[[budget]]
id = "user-model-daily"
match = { org = "globex" }
group_by = ["user", "model"]
window = "fixed"
window_seconds = 86400

# --- narrow budgets most events do not match --------------------------------------------
[[budget]]
id = "local-gpu"
match = { provider = "ollama" }
max_concurrent = 2

[[budget]]
id = "vision-daily"
match = { agent = "vision" }
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 100
"#;

const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "gpt-4.1-mini"];
const AGENTS: [&str; 4] = ["planner", "coder", "reviewer", "search"];

/// Labels of the agent that is scope `i`: 10,000 users and sessions, 100 teams, 500 plans;
/// nine users in ten are in org `acme`, the others in `globex`.
fn labels(i: usize) -> Labels {
    let org = if i % 10 == 9 { "globex" } else { "acme" };
    [
        ("org", org.to_string()),
        ("team", format!("team-{}", i % TEAMS)),
        ("user", format!("u-{i}")),
        ("session", format!("s-{i}")),
        ("agent", AGENTS[(i / TEAMS) % AGENTS.len()].to_string()),
        ("plan", format!("p-{}", i % 500)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn model(i: usize) -> &'static str {
    MODELS[(i / 7) % MODELS.len()]
}

fn usage(i: usize) -> Usage {
    Usage {
        input_tokens: 1200 + (i % 50) as u64 * 10,
        output_tokens: 300 + (i % 30) as u64 * 5,
        cached_input_tokens: if i % 3 == 0 { 512 } else { 0 },
        cache_write_tokens: 0,
        requests: 1,
    }
}

fn record_request(i: usize) -> RecordRequest {
    RecordRequest {
        event_id: format!("e-{i}"),
        labels: labels(i),
        model: model(i).to_string(),
        usage: usage(i),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    }
}

fn reserve_request(i: usize, n: u64) -> ReserveRequest {
    ReserveRequest {
        reservation_id: format!("r-{n}"),
        labels: labels(i),
        model: Some(model(i).to_string()),
        estimate: Estimate {
            input_tokens: 1500,
            max_output_tokens: Some(800),
        },
        ttl_seconds: None,
        candidates: None,
        require: None,
        wait_ms: None,
    }
}

fn commit_request(i: usize, n: u64) -> CommitRequest {
    CommitRequest {
        reservation_id: format!("r-{n}"),
        event_id: format!("c-{n}"),
        usage: usage(i),
        labels: None,
        model: None,
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    }
}

fn check_request(i: usize) -> CheckRequest {
    CheckRequest {
        labels: labels(i),
        model: Some(model(i).to_string()),
        estimate: Estimate {
            input_tokens: 1500,
            max_output_tokens: Some(800),
        },
        candidates: None,
        require: None,
        wait_ms: None,
    }
}

/// The ledger under test, its simulated clock and the pre-built requests and events. The
/// idempotency index stays empty (no id is found, as for new ids).
struct Workload {
    ledger: Ledger,
    now: TsMicros,
    records: Vec<RecordRequest>,
    checks: Vec<CheckRequest>,
    bodies: Vec<EventBody>,
    replay: Ledger,
    replay_ts: TsMicros,
    decided: Ledger,
    decided_ts: TsMicros,
    folded: Ledger,
    folded_ts: TsMicros,
    next: usize,
    pairs: u64,
}

impl Workload {
    /// A ledger under the bench policy with every scope populated by one `record`.
    fn new() -> Workload {
        let loaded = parse_policy(POLICY, "bench.toml", &|_| Err("no import".to_string()))
            .expect("the bench policy parses");
        assert_eq!(loaded.resolved.budgets.len(), 20);
        let mut ledger = Ledger::new();
        let body = EventBody::PolicyApplied(PolicyApplied {
            policy_version: 1,
            source: loaded.source,
            source_hash: loaded.source_hash,
            policy: loaded.resolved,
        });
        ledger.apply(1, T0, &body).unwrap();
        let mut w = Workload {
            ledger,
            now: T0,
            records: (0..SCOPES).map(record_request).collect(),
            checks: (0..SCOPES).map(check_request).collect(),
            bodies: Vec::with_capacity(SCOPES),
            replay: Ledger::new(),
            replay_ts: 0,
            decided: Ledger::new(),
            decided_ts: 0,
            folded: Ledger::new(),
            folded_ts: 0,
            next: 0,
            pairs: 0,
        };
        for i in 0..SCOPES {
            w.now += RECORD_STEP;
            let step = w.ledger.execute(Command::Record(&w.records[i]), w.now);
            assert!(matches!(step.answer, Answer::Usage(_)), "{:?}", step.answer);
            w.bodies.extend(
                step.events
                    .into_iter()
                    .map(|(_, _, body)| body)
                    .filter(|body| matches!(body, EventBody::UsageRecorded(_))),
            );
        }
        assert_eq!(w.bodies.len(), SCOPES);
        // The fold benchmarks run on copies. A clone's rolling counters have no spare room, so
        // one pass over every scope first brings each copy to its working size (a ledger that
        // has been folding for a while), as criterion's warm-up would.
        w.replay = w.ledger.clone();
        w.replay_ts = w.replay.last_ts();
        w.decided = w.ledger.clone();
        w.decided_ts = w.decided.last_ts();
        w.folded = w.ledger.clone();
        w.folded_ts = w.folded.last_ts();
        for _ in 0..SCOPES {
            w.apply_one();
            w.decide_apply_one();
            w.fold_decide_one();
        }
        w
    }

    fn next_scope(&mut self) -> usize {
        let i = self.next % SCOPES;
        self.next += 1;
        i
    }

    /// One `record` through `execute` (decide + apply).
    #[inline(never)]
    fn record_one(&mut self) -> Step {
        let i = self.next_scope();
        self.now += RECORD_STEP;
        let step = self
            .ledger
            .execute(Command::Record(&self.records[i]), self.now);
        debug_assert!(matches!(step.answer, Answer::Usage(_)));
        step
    }

    /// One `usage_recorded` folded by `apply` (a separate copy of the ledger).
    #[inline(never)]
    fn apply_one(&mut self) {
        let i = self.next_scope();
        self.replay_ts += RECORD_STEP;
        let seq = self.replay.last_seq() + 1;
        self.replay
            .apply(seq, self.replay_ts, &self.bodies[i])
            .unwrap();
    }

    /// One `usage_recorded` folded and decided in one pass (`Ledger::apply_usage`), on a
    /// separate copy of the ledger. The 10,000 pre-built events are read in turn, so each is
    /// cold (read once per pass over the scopes).
    #[inline(never)]
    fn fold_decide_one(&mut self) -> BucketState {
        let i = self.next_scope();
        self.folded_ts += RECORD_STEP;
        let seq = self.folded.last_seq() + 1;
        let decided = self
            .folded
            .apply_usage(seq, self.folded_ts, &self.bodies[i])
            .unwrap();
        debug_assert_eq!(decided.budgets(), 14);
        decided.state
    }

    /// One event decided (`Ledger::decide`, the verdict `check` and `reserve` make) and folded
    /// (`Ledger::apply`), on a separate copy of the ledger.
    #[inline(never)]
    fn decide_apply_one(&mut self) -> Decision {
        let i = self.next_scope();
        self.decided_ts += RECORD_STEP;
        let ts = self.decided_ts;
        let body = &self.bodies[i];
        let EventBody::UsageRecorded(u) = body else {
            unreachable!("the bench keeps usage_recorded bodies")
        };
        let (cost, _, _) = self.decided.usage_cost(&u.model, &u.usage, ts);
        let amounts = Amounts {
            micros: cost,
            tokens: total_tokens(&u.usage),
            requests: u.usage.requests,
        };
        let verdict = self.decided.decide(&u.labels, amounts, ts);
        debug_assert_eq!(verdict.budgets(), 14);
        let seq = self.decided.last_seq() + 1;
        self.decided.apply(seq, ts, body).unwrap();
        verdict.decision()
    }

    /// One `check` (read-only).
    #[inline(never)]
    fn check_one(&mut self) -> Answer {
        let i = self.next_scope();
        self.ledger.check(&self.checks[i], self.now)
    }

    /// The requests of the next reserve/commit pair (built outside the measurement).
    fn next_pair(&mut self) -> (ReserveRequest, CommitRequest) {
        let n = self.pairs;
        self.pairs += 1;
        let i = (n as usize).wrapping_mul(7919) % SCOPES;
        (reserve_request(i, n), commit_request(i, n))
    }

    /// A `reserve` then its `commit`, both through `execute`.
    #[inline(never)]
    fn pair_one(&mut self, reserve: &ReserveRequest, commit: &CommitRequest) -> (Step, Step) {
        self.now += PAIR_STEP;
        let held = self.ledger.execute(Command::Reserve(reserve), self.now);
        debug_assert!(
            matches!(&held.answer, Answer::Decision(a) if a.decision != Decision::Deny),
            "{:?}",
            held.answer
        );
        let committed = self.ledger.execute(Command::Commit(commit), self.now);
        (held, committed)
    }

    fn describe(&self) {
        let matched = match self.ledger.check(&self.checks[0], self.now) {
            Answer::Decision(a) => a.budgets.len(),
            _ => 0,
        };
        eprintln!(
            "bench ledger: 20 budgets, {} buckets over {SCOPES} users; a typical event matches \
             {matched} budgets",
            self.ledger.bucket_count()
        );
    }
}

fn decide_apply(c: &mut Criterion) {
    let w = RefCell::new(Workload::new());
    w.borrow().describe();
    let mut group = c.benchmark_group("core");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    group.bench_function(
        "decide+apply (apply_usage: fold and decide in one pass)",
        |b| b.iter(|| black_box(w.borrow_mut().fold_decide_one())),
    );
    group.bench_function("decide,apply (decide, then apply)", |b| {
        b.iter(|| black_box(w.borrow_mut().decide_apply_one()))
    });
    group.bench_function(
        "record (execute: validate, decide, apply, answer JSON)",
        |b| b.iter(|| black_box(w.borrow_mut().record_one())),
    );
    group.bench_function("apply usage_recorded (fold)", |b| {
        b.iter(|| w.borrow_mut().apply_one())
    });
    group.bench_function("check (read-only decision)", |b| {
        b.iter(|| black_box(w.borrow_mut().check_one()))
    });
    // One element = one pair (two events).
    group.bench_function("reserve+commit pair (execute)", |b| {
        b.iter_batched(
            || w.borrow_mut().next_pair(),
            |(reserve, commit)| black_box(w.borrow_mut().pair_one(&reserve, &commit)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Time this thread has spent on a CPU, from `/proc/thread-self/schedstat` (Linux), so that a
/// rate measured on a busy machine leaves out the time other processes had the core.
fn on_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// `BURSAR_BENCH_ITERS=N`: run each workload N times without criterion and print its rate by
/// the wall clock and by on-CPU time; for profilers (`valgrind --tool=callgrind`, `perf record`)
/// and for busy machines. `BURSAR_BENCH_ONLY=NAME` (`decide+apply`, `decide,apply`, `record`,
/// `apply`, `check`, `reserve+commit`) runs only that one.
fn fixed_iterations(n: usize) {
    let mut w = Workload::new();
    w.describe();
    // `BURSAR_BENCH_ONLY=NAME` runs one workload (for profilers).
    let only = std::env::var("BURSAR_BENCH_ONLY").ok();
    let timed = |name: &str, run: &mut dyn FnMut()| {
        if only.as_deref().is_some_and(|o| o != name) {
            return;
        }
        let (wall, cpu) = (Instant::now(), on_cpu());
        run();
        let wall = wall.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
        let cpu = cpu.zip(on_cpu()).map(|(start, end)| {
            end.saturating_sub(start)
                .as_secs_f64()
                .max(f64::MIN_POSITIVE)
        });
        let per_cpu = cpu.map_or("n/a".to_string(), |c| {
            format!("{:.0} /s, {:.2} µs each", n as f64 / c, c * 1e6 / n as f64)
        });
        eprintln!(
            "{name}: {n} in {wall:.3} s wall = {:.0} /s; on-CPU: {per_cpu}",
            n as f64 / wall
        );
    };
    timed("decide+apply", &mut || {
        for _ in 0..n {
            black_box(w.fold_decide_one());
        }
    });
    timed("decide,apply", &mut || {
        for _ in 0..n {
            black_box(w.decide_apply_one());
        }
    });
    timed("record", &mut || {
        for _ in 0..n {
            black_box(w.record_one());
        }
    });
    timed("apply", &mut || {
        for _ in 0..n {
            w.apply_one();
        }
    });
    timed("check", &mut || {
        for _ in 0..n {
            black_box(w.check_one());
        }
    });
    // Built outside the measurement, and only when that workload runs.
    let pairs: Vec<_> = if only.as_deref().is_none_or(|o| o == "reserve+commit") {
        (0..n).map(|_| w.next_pair()).collect()
    } else {
        Vec::new()
    };
    timed("reserve+commit", &mut || {
        for (reserve, commit) in &pairs {
            black_box(w.pair_one(reserve, commit));
        }
    });
}

criterion_group!(benches, decide_apply);

fn main() {
    if let Some(n) = std::env::var("BURSAR_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        fixed_iterations(n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
