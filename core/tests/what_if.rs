//! What-if replay (SPEC §11): what another policy would have done with the log's requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bursar_core::ledger::what_if;
use bursar_core::time::format_ts;
use bursar_schemas::event::EventBody;
use bursar_schemas::policy::ResolvedPolicy;
use bursar_schemas::wire::WhatIfAnswer;
use common::*;

fn session_budget(max_micros: i64) -> ResolvedPolicy {
    let mut b = budget("session");
    b.group_by = vec!["session".into()];
    b.match_labels = [("session".to_string(), "*".to_string())].into();
    b.max_micros = Some(max_micros);
    policy(vec![b])
}

fn run(h: &Harness, p: &ResolvedPolicy, since: i64) -> WhatIfAnswer {
    what_if(|| h.log.iter().cloned().map(Ok::<_, String>), p, since).unwrap()
}

/// A day of one agent: two reservations in session s-1 (each holding $0.003 of model `m`,
/// each committing $0.002), one in s-2, then a $0.0025 record in s-1. Under a $10 budget.
fn day() -> (Harness, Vec<i64>) {
    let mut h = Harness::new(session_budget(10_000_000));
    let mut at = Vec::new();
    let s1 = labels(&[("session", "s-1")]);
    for (rid, eid, l) in [
        ("r-1", "e-1", s1.clone()),
        ("r-2", "e-2", s1.clone()),
        ("r-3", "e-3", labels(&[("session", "s-2")])),
    ] {
        h.now += SEC;
        at.push(h.now);
        assert_eq!(
            h.reserve(rid, l, "m", 1000, 1000).decision,
            bursar_schemas::wire::Decision::Allow
        );
        h.now += SEC;
        h.commit(rid, eid, usage(1000, 500));
    }
    h.now += SEC;
    at.push(h.now);
    h.record("e-4", s1, "m", usage(1500, 500));
    (h, at)
}

#[test]
fn under_the_policy_in_force_nothing_is_denied_and_exhaustions_are_the_logs_own() {
    let mut h = Harness::new(session_budget(6_000));
    let s1 = labels(&[("session", "s-1")]);
    for i in 0..4 {
        h.now += SEC;
        h.reserve(&format!("r-{i}"), s1.clone(), "m", 1000, 1000);
        h.now += SEC;
        h.commit(&format!("r-{i}"), &format!("e-{i}"), usage(1000, 500));
    }
    // Two of the four reservations were denied; records are kept and exhaust the budget once.
    for i in 0..2 {
        h.now += SEC;
        h.record(&format!("e-rec-{i}"), s1.clone(), "m", usage(1500, 500));
    }
    let p = h.ledger.policy().unwrap().clone();
    let w = run(&h, &p, i64::MIN);
    // The log's own denials are not asked again; none that was granted is denied now.
    assert_eq!(w.denied_total, 0, "{w:#?}");
    assert_eq!(w.usage_left_out, 0);
    let logged: Vec<(String, String, String)> = h
        .log
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::BudgetExhausted(c) => {
                Some((c.budget.clone(), c.key.clone(), format_ts(e.ts)))
            }
            _ => None,
        })
        .collect();
    assert!(!logged.is_empty(), "the scenario exhausts the budget");
    let found: Vec<(String, String, String)> = w
        .exhausted
        .iter()
        .map(|x| (x.budget.clone(), x.key.clone(), x.at.clone()))
        .collect();
    assert_eq!(found, logged);
    // The peak is the status at the end (a cumulative budget only grows; no hold is left).
    let status = h.status();
    assert_eq!(w.peaks.len(), 1);
    assert_eq!(w.peaks[0].utilization, status[0].utilization);
}

#[test]
fn a_stricter_budget_denies_the_reservation_that_would_pass_it_and_leaves_its_usage_out() {
    let (h, at) = day();
    let w = run(&h, &session_budget(4_000), i64::MIN);
    assert_eq!(w.reservations, 3);
    // r-1 holds $0.003 of $0.004 and spends $0.002; r-2 would hold $0.003 more: denied.
    assert_eq!(w.denied_total, 1, "{w:#?}");
    let d = &w.denied[0];
    assert_eq!(d.reservation_id, "r-2");
    assert_eq!(d.ts, format_ts(at[1]));
    let logged = h
        .log
        .iter()
        .find(|e| matches!(&e.body, EventBody::ReservationCreated(r) if r.reservation_id == "r-2"))
        .unwrap();
    assert_eq!(d.seq, logged.seq);
    assert_eq!(d.model, "m");
    assert_eq!(d.labels.get("session").map(String::as_str), Some("s-1"));
    assert_eq!(d.labels.get("model").map(String::as_str), Some("m"));
    assert_eq!(d.hold_micros, 3_000);
    assert_eq!(d.reason, "budget");
    assert_eq!(d.budget.as_deref(), Some("session"));
    assert_eq!(d.key.as_deref(), Some("session=s-1"));
    assert_eq!(w.denied_hold_micros, 3_000);
    // Its commit ($0.002) would not have happened.
    assert_eq!(w.usage_left_out, 1);
    assert_eq!(w.usage_left_out_micros, 2_000);
    // The record is kept ($0.0025): s-1 reaches $0.0045 of $0.004, exhausted then.
    assert_eq!(w.exhausted.len(), 1, "{w:#?}");
    assert_eq!(w.exhausted_total, 1);
    assert_eq!(w.exhausted[0].key, "session=s-1");
    // Stamped as the daemon stamps the crossing: right after the record that caused it.
    assert_eq!(w.exhausted[0].at, format_ts(at[3] + 1));
    assert_eq!(w.peaks.len(), 1);
    assert_eq!(w.peaks[0].key, "session=s-1");
    assert_eq!(w.peaks[0].utilization, 4_500.0 / 4_000.0);
    assert_eq!(w.peaks[0].at, format_ts(at[3]));
}

#[test]
fn before_since_the_policy_in_force_decides() {
    let (h, at) = day();
    // From just after r-2 was granted: r-2 stays (the $10 policy granted it), and with it
    // the $0.004 of s-1 is spent by its commit; nothing later is a reservation of s-1.
    let w = run(&h, &session_budget(4_000), at[1] + 1);
    assert_eq!(w.denied_total, 0, "{w:#?}");
    assert_eq!(w.reservations, 1, "only r-3 comes after since");
    // Commit of r-2 (after since) is kept: $0.004 spent; the record makes it $0.0065.
    assert_eq!(w.exhausted.len(), 1, "{w:#?}");
    assert_eq!(w.peaks[0].utilization, 6_500.0 / 4_000.0);
}

#[test]
fn a_looser_policy_denies_nothing_the_log_granted() {
    let (h, _) = day();
    let w = run(&h, &session_budget(1_000_000_000), i64::MIN);
    assert_eq!(w.denied_total, 0);
    assert!(w.exhausted.is_empty());
    assert_eq!(w.events, h.log.len() as u64);
}
