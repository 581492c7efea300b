//! Subscriptions (SPEC §10): a flat-fee plan's calls cost nothing per call, name the plan in
//! their events, count against its allowances, and are denied with reason `quota` (a candidate
//! skipped with reason `quota`, so that fallback moves to a paid one) once an allowance is gone.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_core::ledger::{Answer, Command};
use bursar_core::policy::{parse_policy, PolicyError};
use bursar_schemas::event::EventBody;
use bursar_schemas::policy::{CalendarUnit, ResolvedPolicy, WindowSpec};
use bursar_schemas::wire::*;
use common::*;

fn no_import(path: &str) -> Result<String, String> {
    Err(format!("no such file: {path}"))
}

/// A plan `pro` for calls of account `pro` to model `m`: $20 a month, 2 requests per rolling
/// minute and 10,000 tokens a day; a team budget of $1 over everything.
const PLAN: &str = r#"
[[budget]]
id = "team"
max_usd = 1.00

[[subscription]]
id = "pro"
match = { account = "pro", model = "m" }
fee_usd = 20
fee_period = "month"

[[subscription.allowance]]
window = "rolling"
window_seconds = 60
max_requests = 2

[[subscription.allowance]]
window = "calendar"
calendar = "day"
max_tokens = 10000
"#;

fn plan() -> ResolvedPolicy {
    let mut p = parse_policy(PLAN, "bursar.toml", &no_import)
        .unwrap()
        .resolved;
    p.pricing = prices();
    p
}

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_policy(text, "bursar.toml", &no_import) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errs) => errs,
    }
}

fn pro() -> bursar_schemas::Labels {
    labels(&[("account", "pro")])
}

#[test]
fn a_subscription_resolves_into_its_fee_and_one_allowance_budget_per_window() {
    let p = parse_policy(PLAN, "bursar.toml", &no_import)
        .unwrap()
        .resolved;
    assert_eq!(p.subscriptions.len(), 1);
    let s = &p.subscriptions[0];
    assert_eq!(s.id, "pro");
    assert_eq!(s.fee_micros, 20_000_000);
    assert_eq!(s.fee_period, CalendarUnit::Month);
    assert_eq!(s.allowances, ["subscription:pro:1", "subscription:pro:2"]);
    let ids: Vec<&str> = p.budgets.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["team", "subscription:pro:1", "subscription:pro:2"]);
    let first = &p.budgets[1];
    assert_eq!(first.max_requests, Some(2));
    assert!(matches!(
        first.window,
        WindowSpec::Rolling { seconds: 60, .. }
    ));
    assert_eq!(
        first.match_labels.get("subscription").map(String::as_str),
        Some("pro")
    );
}

#[test]
fn subscription_mistakes_are_reported_at_their_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[[subscription]]\nid = \"pro\"\nmatch = { account = \"pro\" }\nfee_period = \"year\"\n",
            "subscription[0].fee_period",
            "\"month\", \"week\" or \"day\"",
        ),
        (
            "[[subscription]]\nid = \"pro\"\nfee_usd = 20\n",
            "subscription[0].match",
            "every call would be free",
        ),
        (
            "[[subscription]]\nid = \"pro\"\nmatch = { subscription = \"x\" }\n",
            "subscription[0].match.subscription",
            "derived",
        ),
        (
            "[[subscription]]\nid = \"Pro Plan\"\nmatch = { account = \"pro\" }\n",
            "subscription[0].id",
            "is not a subscription id",
        ),
        (
            "[[subscription]]\nid = \"pro\"\nmatch = { account = \"pro\" }\n\
             [[subscription.allowance]]\nwindow = \"rolling\"\nwindow_seconds = 60\n",
            "subscription[0].allowance[0]",
            "needs max_requests, max_tokens or max_concurrent",
        ),
        (
            "[[subscription]]\nid = \"pro\"\nmatch = { account = \"pro\" }\n\
             [[subscription.allowance]]\nmax_usd = 5\n",
            "subscription[0].allowance[0].max_usd",
            "unknown key",
        ),
        (
            "[[subscription]]\nid = \"pro\"\nmatch = { account = \"pro\" }\n\
             [[subscription.allowance]]\nwindow = \"rolling\"\nmax_requests = 5\n",
            "subscription[0].allowance[0].window_seconds",
            "",
        ),
        (
            "[[subscription]]\nid = \"pro\"\nmatch = { account = \"pro\" }\n\
             [[subscription]]\nid = \"pro\"\nmatch = { account = \"x\" }\n",
            "subscription[1].id",
            "duplicate subscription id",
        ),
    ];
    for (text, key, words) in cases {
        let errs = errors(text);
        assert!(
            errs.iter()
                .any(|e| e.key == *key && e.message.contains(words)),
            "expected an error at {key} saying {words:?} for\n{text}\ngot {errs:#?}"
        );
    }
}

#[test]
fn a_call_a_subscription_carries_costs_nothing_names_the_plan_and_counts_against_its_allowances() {
    let mut h = Harness::new(plan());
    let a = h.record("e1", pro(), "m", usage(100, 50));
    assert_eq!(a.cost_micros, 0, "a subscription call costs 0 µUSD");
    let team = a.budgets.iter().find(|b| b.budget == "team").unwrap();
    assert_eq!(team.spent_micros, 0);
    assert_eq!(team.spent_tokens, 150, "tokens still count everywhere");
    let day = a
        .budgets
        .iter()
        .find(|b| b.budget == "subscription:pro:2")
        .unwrap();
    assert_eq!(day.spent_tokens, 150);
    assert_eq!(day.remaining_tokens, Some(9850));
    let EventBody::UsageRecorded(u) = &h.log.last().unwrap().body else {
        panic!("the last event is not a usage event");
    };
    assert_eq!(
        u.labels.get("subscription").map(String::as_str),
        Some("pro")
    );

    // The same call of another account is paid, and is not counted by the plan.
    let paid = h.record("e2", labels(&[("account", "other")]), "m", usage(100, 50));
    assert_eq!(paid.cost_micros, 200);
    assert!(paid
        .budgets
        .iter()
        .all(|b| !b.budget.starts_with("subscription:")));

    // Replay folds the same figures from the log.
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn an_exhausted_allowance_skips_the_candidate_with_reason_quota_and_falls_back_to_a_paid_one() {
    let mut h = Harness::new(plan());
    let ask = |h: &Harness, id: &str| {
        let mut r = h.reserve_req(id, pro(), "m", 100, 100);
        r.model = None;
        r.candidates = Some(vec!["m".into(), "big".into()]);
        r
    };
    for id in ["r1", "r2"] {
        let r = ask(&h, id);
        let Answer::Decision(d) = h.run(Command::Reserve(&r)) else {
            panic!("reserve answered no decision");
        };
        assert_eq!(d.decision, Decision::Allow);
        assert_eq!(d.model.as_deref(), Some("m"));
        assert_eq!(d.hold_micros, 0, "a subscription call holds no money");
    }
    // The plan's 2 requests per minute are held: the third call goes to the paid model.
    let r = ask(&h, "r3");
    let Answer::Decision(d) = h.run(Command::Reserve(&r)) else {
        panic!("reserve answered no decision");
    };
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(d.model.as_deref(), Some("big"));
    assert!(d.hold_micros > 0);
    assert_eq!(d.skipped.len(), 1);
    assert_eq!(d.skipped[0].model, "m");
    assert_eq!(d.skipped[0].reason, SkipReason::Quota);
    assert!(d.skipped[0].detail.contains("subscription:pro:1"));

    // Without a paid candidate the call is denied with reason `quota`, and the log says so.
    let d = h.reserve("r4", pro(), "m", 100, 100);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "quota");
    assert_eq!(d.reason.budget.as_deref(), Some("subscription:pro:1"));
    let Some(EventBody::ReservationDenied(denied)) = h.log.last().map(|e| &e.body) else {
        panic!("the last event is not a denial");
    };
    assert_eq!(denied.reason, "quota");

    // A minute later the rolling window has let the two requests go.
    h.commit("r1", "c1", usage(10, 10));
    h.commit("r2", "c2", usage(10, 10));
    h.now += 61 * SEC;
    let d = h.reserve("r5", pro(), "m", 100, 100);
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn clients_cannot_claim_a_subscription_by_sending_its_label() {
    let mut h = Harness::new(plan());
    let r = RecordRequest {
        event_id: "e1".into(),
        labels: labels(&[("subscription", "pro")]),
        model: "big".into(),
        usage: usage(100, 50),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    let e = error(h.run(Command::Record(&r)));
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(e.field.as_deref(), Some("labels.subscription"));
}

#[test]
fn status_shows_each_subscription_with_its_fee_and_current_period() {
    let h = Harness::new(plan());
    let s = h.ledger.status(&StatusRequest::default(), h.now).unwrap();
    assert_eq!(s.subscriptions.len(), 1);
    let pro = &s.subscriptions[0];
    assert_eq!(pro.id, "pro");
    assert_eq!(pro.fee_micros, 20_000_000);
    assert_eq!(pro.fee_period, "month");
    // T0 is 2026-11-23.
    assert_eq!(pro.period_start, "2026-11-01T00:00:00Z");
    assert_eq!(pro.period_end, "2026-12-01T00:00:00Z");
    assert_eq!(pro.allowances, ["subscription:pro:1", "subscription:pro:2"]);
}

/// The ```toml blocks of a doc that show subscriptions or quotas.
fn doc_policies(doc: &str) -> Vec<String> {
    let mut blocks = doc_toml_blocks(doc);
    blocks.retain(|b| b.contains("[[subscription]]") || b.contains("[[quota]]"));
    blocks
}

/// Every ```toml block of a doc.
fn doc_toml_blocks(doc: &str) -> Vec<String> {
    let path = format!("{}/../docs/{doc}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn the_local_gpu_example_of_the_docs_is_two_slots_over_a_free_model() {
    let blocks: Vec<String> = doc_toml_blocks("quotas.md")
        .into_iter()
        .filter(|b| b.contains("local-gpu"))
        .collect();
    assert_eq!(blocks.len(), 1, "docs/quotas.md shows the local GPU once");
    let p = parse_policy(&blocks[0], "quotas.md", &no_import)
        .unwrap_or_else(|e| panic!("{e:#?}\n{}", blocks[0]))
        .resolved;
    let gpu = p.budgets.iter().find(|b| b.id == "local-gpu").unwrap();
    assert_eq!(gpu.max_concurrent, Some(2));
    let model = gpu.match_labels.get("model").unwrap();
    let price = &p.pricing.models[model];
    assert_eq!((price.input_per_mtok, price.output_per_mtok), (0, 0));
}

#[test]
fn the_subscription_and_quota_examples_of_the_docs_are_valid_policies() {
    let mut seen = 0;
    for doc in ["quotas.md", "configuration.md"] {
        for block in doc_policies(doc) {
            seen += 1;
            let p = parse_policy(&block, doc, &no_import)
                .unwrap_or_else(|e| panic!("{doc}: {e:#?}\n{block}"))
                .resolved;
            assert!(!p.subscriptions.is_empty() || !p.quotas.is_empty(), "{doc}");
        }
    }
    assert!(seen >= 3, "the docs show subscriptions and a quota");
}

#[test]
fn a_report_shows_each_plans_flat_fee_over_its_range_apart_from_the_calls_cost() {
    let mut h = Harness::new(plan());
    h.record("e1", pro(), "m", usage(100, 100));
    let report = |h: &Harness, since: Option<&str>, until: &str| {
        h.ledger
            .report(
                &ReportRequest {
                    group_by: vec!["subscription".into()],
                    every: Some("month".into()),
                    timezone: None,
                    since: since.map(String::from),
                    until: Some(until.into()),
                    labels: None,
                },
                h.now,
            )
            .unwrap()
    };
    // Since October 15, until December 5: the fee counts from the first usage (November 23),
    // so the November and December periods.
    let r = report(&h, Some("2026-10-15T00:00:00Z"), "2026-12-05T00:00:00Z");
    assert_eq!(r.subscriptions.len(), 1);
    let fee = &r.subscriptions[0];
    assert_eq!((fee.id.as_str(), fee.fee_period.as_str()), ("pro", "month"));
    assert_eq!((fee.periods, fee.fee_total_micros), (2, 40_000_000));
    let december = report(&h, Some("2026-12-01T00:00:00Z"), "2026-12-05T00:00:00Z");
    assert_eq!(
        december.subscriptions[0].periods, 1,
        "since December 1: only December"
    );
    // The plan's calls cost nothing per call: the fee is not in the rows.
    assert_eq!(r.rows.iter().map(|row| row.cost_micros).sum::<i64>(), 0);
    assert_eq!(r.rows[0].group["subscription"].as_deref(), Some("pro"));
    // Without `since`, the range starts at the first usage (November 23): one period.
    let r = report(&h, None, "2026-11-30T00:00:00Z");
    assert_eq!(r.subscriptions[0].periods, 1);
}
