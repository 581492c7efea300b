//! Test harness for the ledger: a hand-made price table and policy, and a driver that keeps the
//! emitted events (the "log") and the idempotency index like the daemon does.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_core::ledger::{fold, Answer, Command, Ledger, Reply};
use bursar_schemas::event::{Actor, Envelope, EventBody, PolicyApplied};
use bursar_schemas::policy::*;
use bursar_schemas::pricing::{ModelPrice, PriceTable};
use bursar_schemas::wire::*;
use bursar_schemas::{Labels, TsMicros};
use std::collections::BTreeMap;

/// 2026-11-23T00:00:00Z in µs.
pub const T0: TsMicros = 1_795_392_000_000_000;
pub const SEC: TsMicros = 1_000_000;

/// Model `m`: 1 µUSD per input token, 2 per output token, max output 1000, tools.
/// Model `big`: 10 / 20, max output 100000, tools + vision. `local`: free.
pub fn prices() -> PriceTable {
    let mk = |provider: &str, i: i64, o: i64, max: Option<u64>, caps: &[&str]| ModelPrice {
        provider: provider.into(),
        input_per_mtok: i,
        output_per_mtok: o,
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
        tiers: Vec::new(),
        max_output_tokens: max,
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
    };
    PriceTable {
        models: BTreeMap::from([
            (
                "m".to_string(),
                mk("acme", 1_000_000, 2_000_000, Some(1000), &["tools"]),
            ),
            (
                "big".to_string(),
                mk(
                    "acme",
                    10_000_000,
                    20_000_000,
                    Some(100_000),
                    &["tools", "vision"],
                ),
            ),
            ("local".to_string(), mk("ollama", 0, 0, None, &[])),
        ]),
    }
}

pub fn budget(id: &str) -> ResolvedBudget {
    ResolvedBudget {
        id: id.into(),
        match_labels: BTreeMap::new(),
        group_by: vec![],
        window: WindowSpec::Cumulative,
        max_micros: None,
        max_tokens: None,
        max_requests: None,
        max_concurrent: None,
        warn_at_ppm: None,
        enforce: Enforce::Deny,
    }
}

pub fn policy(budgets: Vec<ResolvedBudget>) -> ResolvedPolicy {
    ResolvedPolicy {
        reservation_ttl_seconds: 300,
        max_keys_per_budget: 100_000,
        idempotency_window_seconds: DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
        unknown_models: UnknownModels::Deny,
        tiers: ResolvedTiers {
            default: "small".into(),
            patterns: vec![],
            caps: BTreeMap::new(),
            defs: Vec::new(),
        },
        budgets,
        pricing: prices(),
        report_exclude_labels: vec!["session".into()],
        subscriptions: Vec::new(),
        quotas: Vec::new(),
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        ..Usage::default()
    }
}

pub struct Harness {
    pub ledger: Ledger,
    pub log: Vec<Envelope>,
    pub now: TsMicros,
}

impl Harness {
    pub fn new(p: ResolvedPolicy) -> Self {
        let mut h = Harness {
            ledger: Ledger::new(),
            log: Vec::new(),
            now: T0,
        };
        h.apply_policy(p);
        h
    }

    pub fn apply_policy(&mut self, p: ResolvedPolicy) {
        let version = self.ledger.policy_version() + 1;
        let body = EventBody::PolicyApplied(PolicyApplied {
            policy_version: version,
            source: "test".into(),
            source_hash: String::new(),
            policy: p,
        });
        let seq = self.ledger.last_seq() + 1;
        let ts = self.ledger.stamp(self.now);
        self.ledger.apply(seq, ts, &body).unwrap();
        self.push(seq, ts, body);
    }

    fn push(&mut self, seq: u64, ts: TsMicros, body: EventBody) {
        let prev = self.log.last().map(|e| e.hash).unwrap_or_default();
        self.log
            .push(Envelope::seal(seq, ts, Actor::default(), prev, body).unwrap());
    }

    /// Execute `cmd` at `now` as the daemon does: decided and folded by the ledger, the answer
    /// rendered afterwards from its event with the renderer of the policy it was decided under
    /// (a duplicate's original answer from the log). While the ledger is small, the same command
    /// also runs through `execute` (rendered in one go) on a copy, and both must agree.
    pub fn run(&mut self, cmd: Command<'_>) -> Answer {
        let twin = (self.ledger.bucket_count() < 300).then(|| {
            let mut twin = self.ledger.clone();
            twin.execute(cmd, self.now)
        });
        let renderer = self.ledger.renderer();
        let decided = self.ledger.decide_digested(cmd, &cmd.digest(), self.now);
        let answer = match decided.reply {
            Reply::Ready(a) => a,
            Reply::Wait => panic!("the harness never sends a reserve that may wait"),
            Reply::Event(i) => {
                // Keyed as the writer does (the labels dropped), rendered as a connection does.
                let (seq, ts, body) = &decided.events[i];
                renderer
                    .render_keyed(renderer.keyed(*seq, *ts, body.clone()))
                    .unwrap_or_else(|| panic!("event {seq} renders no answer"))
            }
        };
        if let Some(step) = twin {
            assert_eq!(step.answer, answer, "execute and decide+render disagree");
            assert_eq!(step.events, decided.events, "execute and decide disagree");
        }
        for (seq, ts, body) in decided.events {
            self.push(seq, ts, body);
        }
        self.resolve(answer)
    }

    /// The original answer behind a [`Answer::Duplicate`] (any other answer as it is).
    pub fn resolve(&self, answer: Answer) -> Answer {
        let Answer::Duplicate { seq } = answer else {
            return answer;
        };
        let e = self
            .log
            .iter()
            .find(|e| e.seq == seq)
            .unwrap_or_else(|| panic!("duplicate of seq {seq}, which is not in the log"));
        self.ledger
            .render_event(e.seq, e.ts, &e.body, true)
            .unwrap_or_else(|| panic!("event {seq} renders no answer"))
    }

    pub fn record(&mut self, id: &str, l: Labels, model: &str, u: Usage) -> UsageAnswer {
        let r = RecordRequest {
            event_id: id.into(),
            labels: l,
            model: model.into(),
            usage: u,
            occurred_at: None,
            reported_cost_usd: None,
            headers: None,
        };
        match self.run(Command::Record(&r)) {
            Answer::Usage(a) => a,
            other => panic!("record answered {other:?}"),
        }
    }

    pub fn reserve_req(
        &self,
        id: &str,
        l: Labels,
        model: &str,
        input: u64,
        max_out: u64,
    ) -> ReserveRequest {
        ReserveRequest {
            reservation_id: id.into(),
            labels: l,
            model: Some(model.into()),
            estimate: Estimate {
                input_tokens: input,
                max_output_tokens: Some(max_out),
            },
            ttl_seconds: None,
            candidates: None,
            require: None,
            wait_ms: None,
        }
    }

    /// A `check` of `model` for these labels and this estimate (what `reserve_req` would ask).
    pub fn check_req(&self, l: Labels, model: &str, input: u64, max_out: u64) -> CheckRequest {
        let r = self.reserve_req("", l, model, input, max_out);
        CheckRequest {
            labels: r.labels,
            model: r.model,
            estimate: r.estimate,
            candidates: None,
            require: None,
            wait_ms: None,
        }
    }

    pub fn reserve(
        &mut self,
        id: &str,
        l: Labels,
        model: &str,
        input: u64,
        max_out: u64,
    ) -> DecisionAnswer {
        let r = self.reserve_req(id, l, model, input, max_out);
        match self.run(Command::Reserve(&r)) {
            Answer::Decision(a) => a,
            other => panic!("reserve answered {other:?}"),
        }
    }

    pub fn commit(&mut self, rid: &str, eid: &str, u: Usage) -> Answer {
        let c = CommitRequest {
            reservation_id: rid.into(),
            event_id: eid.into(),
            usage: u,
            labels: None,
            model: None,
            occurred_at: None,
            reported_cost_usd: None,
            headers: None,
        };
        self.run(Command::Commit(&c))
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.log.iter().map(|e| e.body.kind()).collect()
    }

    /// The ledger rebuilt from the log alone.
    pub fn refold(&self) -> Ledger {
        fold(|| self.log.iter().cloned().map(Ok::<_, String>)).unwrap()
    }

    pub fn status(&self) -> Vec<BudgetReport> {
        self.ledger
            .status(&StatusRequest::default(), self.now)
            .unwrap()
            .budgets
    }
}

pub fn usage_answer(a: Answer) -> UsageAnswer {
    match a {
        Answer::Usage(u) => u,
        other => panic!("expected a usage answer, got {other:?}"),
    }
}

pub fn error(a: Answer) -> WireError {
    match a {
        Answer::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}
