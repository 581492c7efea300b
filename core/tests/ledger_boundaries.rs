//! Every boundary of SPEC §5, as the ledger decides it.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_core::ledger::{Answer, Command};
use bursar_schemas::policy::{CalendarUnit, Enforce, ResolvedTierCap, UnknownModels, WindowSpec};
use bursar_schemas::wire::*;
use common::*;

fn limited(max_micros: i64) -> bursar_schemas::policy::ResolvedBudget {
    let mut b = budget("cap");
    b.max_micros = Some(max_micros);
    b
}

#[test]
fn reserve_exactly_to_the_limit_is_allowed_and_one_micro_over_is_denied() {
    // hold = 100 in × 1 + 100 out × 2 = 300 micros
    let mut h = Harness::new(policy(vec![limited(600)]));
    assert_eq!(
        h.reserve("r1", labels(&[]), "m", 100, 100).decision,
        Decision::Allow
    );
    let second = h.reserve("r2", labels(&[]), "m", 100, 100);
    assert_eq!(
        second.decision,
        Decision::Allow,
        "300 + 300 = 600 is exactly the limit"
    );
    assert_eq!(second.budgets[0].remaining_micros, Some(0));
    let third = h.reserve("r3", labels(&[]), "m", 1, 0);
    assert_eq!(third.decision, Decision::Deny, "one micro over the limit");
    assert_eq!(third.reason.code, "budget");
    assert_eq!(third.reason.budget.as_deref(), Some("cap"));
    assert!(h.kinds().contains(&"reservation_denied"));
}

#[test]
fn record_exactly_to_the_limit_is_exhausted_and_logged_once_per_window() {
    let mut b = limited(1000);
    b.window = WindowSpec::Fixed {
        seconds: 60,
        offset_seconds: 0,
    };
    let mut h = Harness::new(policy(vec![b]));
    let a = h.record("e1", labels(&[]), "m", usage(600, 0));
    assert_eq!(a.state, BucketState::Ok);
    let a = h.record("e2", labels(&[]), "m", usage(400, 0));
    assert_eq!(a.cost_micros, 400);
    assert_eq!(
        a.state,
        BucketState::Exhausted,
        "spent == limit is exhausted"
    );
    let a = h.record("e3", labels(&[]), "m", usage(10, 0));
    assert_eq!(
        a.budgets[0].spent_micros, 1010,
        "records are always kept, even over the limit"
    );
    let exhausted = h
        .kinds()
        .iter()
        .filter(|k| **k == "budget_exhausted")
        .count();
    assert_eq!(exhausted, 1, "once per bucket per window");
    // The next window starts fresh and may be exhausted again.
    h.now += 60 * SEC;
    h.record("e4", labels(&[]), "m", usage(1000, 0));
    assert_eq!(
        h.kinds()
            .iter()
            .filter(|k| **k == "budget_exhausted")
            .count(),
        2
    );
}

#[test]
fn warn_at_threshold_warns_once_and_still_allows() {
    let mut b = limited(1000);
    b.warn_at_ppm = Some(900_000);
    let mut h = Harness::new(policy(vec![b]));
    let a = h.record("e1", labels(&[]), "m", usage(899, 0));
    assert_eq!(a.state, BucketState::Ok);
    // 899 + 1 = 900 = 90 % of 1000: warn.
    let d = h.reserve("r1", labels(&[]), "m", 1, 0);
    assert_eq!(d.decision, Decision::Warn);
    assert_eq!(
        h.kinds().iter().filter(|k| **k == "budget_warned").count(),
        1
    );
    h.record("e2", labels(&[]), "m", usage(5, 0));
    assert_eq!(
        h.kinds().iter().filter(|k| **k == "budget_warned").count(),
        1
    );
}

#[test]
fn soft_budget_never_denies() {
    let mut b = limited(100);
    b.enforce = Enforce::Warn;
    let mut h = Harness::new(policy(vec![b]));
    let d = h.reserve("r1", labels(&[]), "m", 1000, 0);
    assert_eq!(d.decision, Decision::Warn);
}

#[test]
fn meter_reports_but_never_warns_or_denies() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    let d = h.reserve("r1", labels(&[]), "big", 1_000_000, 100_000);
    assert_eq!(d.decision, Decision::Allow);
    let a = h.record("e1", labels(&[]), "big", usage(1_000_000, 0));
    assert_eq!(a.state, BucketState::Ok);
    assert_eq!(a.budgets[0].utilization, 0.0);
    assert_eq!(a.budgets[0].limit_micros, None);
}

#[test]
fn fixed_window_event_at_the_boundary_belongs_to_the_new_window() {
    let mut b = limited(1_000_000);
    b.window = WindowSpec::Fixed {
        seconds: 3600,
        offset_seconds: 0,
    };
    let mut h = Harness::new(policy(vec![b]));
    h.now = T0 + 3600 * SEC - 1;
    h.record("e1", labels(&[]), "m", usage(100, 0));
    h.now = T0 + 3600 * SEC;
    let a = h.record("e2", labels(&[]), "m", usage(7, 0));
    assert_eq!(
        a.budgets[0].spent_micros, 7,
        "the boundary event starts the new window"
    );
    assert_eq!(
        a.budgets[0].window_end.as_deref(),
        Some("2026-11-23T02:00:00Z")
    );
}

#[test]
fn calendar_month_rolls_over_at_local_midnight() {
    let mut b = limited(1_000_000);
    b.window = WindowSpec::Calendar {
        unit: CalendarUnit::Month,
        utc_offset_seconds: 3600,
    };
    let mut h = Harness::new(policy(vec![b]));
    // 2026-11-30T22:59:59Z is 23:59:59 on Nov 30 at +01:00.
    h.now = 1_796_079_599_000_000;
    h.record("e1", labels(&[]), "m", usage(100, 0));
    assert_eq!(h.status()[0].spent_micros, 100);
    assert_eq!(
        h.status()[0].window_end.as_deref(),
        Some("2026-11-30T23:00:00Z")
    );
    h.now += SEC; // local midnight, December 1st
    assert!(
        h.status().is_empty(),
        "reads show the new month before any event: November's scope is no longer live"
    );
    let a = h.record("e2", labels(&[]), "m", usage(3, 0));
    assert_eq!(a.budgets[0].spent_micros, 3);
}

#[test]
fn rolling_window_forgets_usage_after_window_seconds() {
    let mut b = limited(1000);
    b.window = WindowSpec::Rolling {
        seconds: 60,
        resolution_seconds: 10,
    };
    let mut h = Harness::new(policy(vec![b]));
    h.record("e1", labels(&[]), "m", usage(1000, 0));
    assert_eq!(
        h.reserve("r1", labels(&[]), "m", 1, 0).decision,
        Decision::Deny
    );
    h.now += 50 * SEC;
    assert_eq!(
        h.status()[0].spent_micros,
        1000,
        "still inside the last 60 s"
    );
    h.now += 10 * SEC;
    assert!(
        h.status().is_empty(),
        "dropped out of the window: no longer live"
    );
    assert_eq!(
        h.reserve("r2", labels(&[]), "m", 1, 0).decision,
        Decision::Allow
    );
}

#[test]
fn expired_hold_is_never_shown_and_is_released_by_an_event() {
    let mut h = Harness::new(policy(vec![limited(300)]));
    let mut req = h.reserve_req("r1", labels(&[]), "m", 100, 100);
    req.ttl_seconds = Some(10);
    let Answer::Decision(d) = h.run(Command::Reserve(&req)) else {
        panic!()
    };
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(h.status()[0].held_micros, 300);
    // The hold was stamped 1 µs after the policy event, so it expires at T0 + 10 s + 1 µs.
    h.now += 10 * SEC;
    assert_eq!(h.status()[0].held_micros, 300, "live until its expiry");
    h.now += 1;
    // Not reaped yet, but reads must not show it.
    assert_eq!(h.status()[0].held_micros, 0);
    let check = CheckRequest {
        labels: labels(&[]),
        model: Some("m".into()),
        estimate: Estimate {
            input_tokens: 100,
            max_output_tokens: Some(100),
        },
        candidates: None,
        require: None,
        wait_ms: None,
    };
    let Answer::Decision(c) = h.ledger.check(&check, h.now) else {
        panic!()
    };
    assert_eq!(c.decision, Decision::Allow);
    let reaped = h.ledger.reap(h.now);
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].2.kind(), "reservation_expired");
    assert_eq!(h.ledger.live_holds(), 0);
}

#[test]
fn commit_with_overrun_is_recorded_never_refused() {
    let mut h = Harness::new(policy(vec![limited(1000)]));
    let d = h.reserve("r1", labels(&[]), "m", 100, 100);
    assert_eq!(d.hold_micros, 300);
    let a = usage_answer(h.commit("r1", "e1", usage(100, 600)));
    assert_eq!(a.cost_micros, 1300);
    assert_eq!(a.overrun_micros, Some(1000));
    assert_eq!(a.state, BucketState::Exhausted);
    assert_eq!(
        a.budgets[0].held_micros, 0,
        "commit releases the hold in the same event"
    );
    assert_eq!(a.budgets[0].spent_micros, 1300);
}

#[test]
fn late_commit_is_recorded_and_flagged() {
    let mut h = Harness::new(policy(vec![limited(10_000)]));
    let mut req = h.reserve_req("r1", labels(&[("team", "a")]), "m", 100, 100);
    req.ttl_seconds = Some(5);
    h.run(Command::Reserve(&req));
    h.now += 6 * SEC;
    let a = usage_answer(h.commit("r1", "e1", usage(10, 10)));
    assert!(a.late);
    assert_eq!(a.cost_micros, 30);
    assert_eq!(a.budgets[0].spent_micros, 30);
    let kinds = h.kinds();
    let exp = kinds
        .iter()
        .position(|k| *k == "reservation_expired")
        .unwrap();
    let used = kinds.iter().position(|k| *k == "usage_recorded").unwrap();
    assert!(exp < used, "the expiry is logged before the late commit");
}

#[test]
fn commit_of_an_unknown_reservation_is_recorded_and_flagged() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    let c = CommitRequest {
        reservation_id: "ghost".into(),
        event_id: "e1".into(),
        usage: usage(10, 0),
        labels: Some(labels(&[("team", "a")])),
        model: Some("m".into()),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    let a = usage_answer(h.run(Command::Commit(&c)));
    assert_eq!(a.reservation.as_deref(), Some("unknown"));
    assert_eq!(a.cost_micros, 10);
    // Releasing or extending it is not_found.
    let e = error(h.run(Command::Release(&ReleaseRequest {
        reservation_id: "ghost".into(),
    })));
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = error(h.run(Command::Extend(&ExtendRequest {
        reservation_id: "ghost".into(),
        ttl_seconds: 5,
    })));
    assert_eq!(e.code, ErrorCode::NotFound);
}

/// A commit of a reservation the daemon denied (the client called the model all the same) is
/// usage against what the reservation asked for: its labels and model, not an unknown
/// reservation's (the commit's labels, often none, and a model priced at the table's
/// maximum). It is flagged `"reservation":"denied"`, holds nothing to release (no overrun),
/// and a second commit of it is a conflict, as for a hold.
#[test]
fn commit_of_a_denied_reservation_is_recorded_against_what_it_asked_for() {
    let mut team = limited(1_000);
    team.group_by = vec!["team".into()];
    let mut h = Harness::new(policy(vec![team]));
    let a = labels(&[("team", "a")]);
    h.record("e0", a.clone(), "m", usage(900, 0));
    // hold = 100 in × 1 + 100 out × 2 = 300 micros, over the 100 left.
    let d = h.reserve("r1", a.clone(), "m", 100, 100);
    assert_eq!(d.decision, Decision::Deny);
    let e = error(h.run(Command::Release(&ReleaseRequest {
        reservation_id: "r1".into(),
    })));
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("denied"), "{}", e.message);

    h.now += SEC;
    let u = usage_answer(h.commit("r1", "e1", usage(100, 100)));
    assert_eq!(u.reservation.as_deref(), Some("denied"));
    assert!(!u.late && !u.priced_at_max && u.overrun_micros.is_none());
    assert_eq!(u.cost_micros, 300, "priced as model m");
    assert_eq!(u.budgets.len(), 1, "team a's budget counts it");
    assert_eq!(u.budgets[0].key, "team=a");
    assert_eq!(u.budgets[0].spent_micros, 1_200);
    assert_eq!(u.state, BucketState::Exhausted);
    let again = error(h.commit("r1", "e2", usage(1, 0)));
    assert_eq!(again.code, ErrorCode::Conflict);
    assert!(again.message.contains("e1"), "{}", again.message);

    // A commit that says which model the call used (and its labels) is taken at its word.
    let b = labels(&[("team", "b")]);
    let mut big = h.reserve_req("r2", b.clone(), "big", 100, 100);
    big.estimate.input_tokens = 1_000_000;
    assert!(
        matches!(h.run(Command::Reserve(&big)), Answer::Decision(d) if d.decision == Decision::Deny)
    );
    let c = CommitRequest {
        reservation_id: "r2".into(),
        event_id: "e3".into(),
        usage: usage(10, 0),
        labels: Some(labels(&[("team", "c")])),
        model: Some("m".into()),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    let u = usage_answer(h.run(Command::Commit(&c)));
    assert_eq!(u.reservation.as_deref(), Some("denied"));
    assert_eq!((u.cost_micros, u.budgets[0].key.as_str()), (10, "team=c"));
    // Only the model given: the denial's labels. Only labels given: the denial's model.
    for (rid, eid, l, model, key, cost) in [
        ("r4", "e6", None, Some("big"), "team=b", 100),
        (
            "r5",
            "e7",
            Some(labels(&[("team", "d")])),
            None,
            "team=d",
            10,
        ),
    ] {
        let mut req = h.reserve_req(rid, b.clone(), "m", 100, 100);
        req.estimate.input_tokens = 1_000_000;
        let Answer::Decision(d) = h.run(Command::Reserve(&req)) else {
            panic!("{rid} not decided")
        };
        assert_eq!(d.decision, Decision::Deny);
        let c = CommitRequest {
            reservation_id: rid.into(),
            event_id: eid.into(),
            labels: l,
            model: model.map(String::from),
            ..c.clone()
        };
        let u = usage_answer(h.run(Command::Commit(&c)));
        assert_eq!(u.reservation.as_deref(), Some("denied"));
        assert_eq!(
            (u.cost_micros, u.budgets[0].key.as_str()),
            (cost, key),
            "{rid}"
        );
    }
    assert_eq!(h.refold(), h.ledger);

    // Denials are remembered as ended reservations are, for an hour: then a commit of one is
    // an unknown reservation's.
    assert_eq!(
        h.reserve("r3", a.clone(), "m", 100, 100).decision,
        Decision::Deny
    );
    h.now += 3_601 * SEC;
    h.record("e4", b, "m", usage(1, 0));
    let u = usage_answer(h.commit("r3", "e5", usage(1, 0)));
    assert_eq!(u.reservation.as_deref(), Some("unknown"));
    assert_eq!(h.refold(), h.ledger);
}

/// A denied reservation holds nothing: past the idempotency window, a `reserve` may use its
/// id again (and a commit then finds that hold), while the id of a hold that ended otherwise
/// stays in use for the hour.
#[test]
fn a_denied_reservation_id_may_be_reserved_again_past_the_idempotency_window() {
    let mut p = policy(vec![limited(1_000)]);
    p.idempotency_window_seconds = 60;
    let mut h = Harness::new(p);
    h.record("e0", labels(&[]), "m", usage(800, 0));
    assert_eq!(
        h.reserve("r1", labels(&[]), "m", 100, 100).decision,
        Decision::Deny
    );
    assert_eq!(
        h.reserve("r2", labels(&[]), "m", 10, 10).decision,
        Decision::Allow
    );
    h.run(Command::Release(&ReleaseRequest {
        reservation_id: "r2".into(),
    }));
    h.now += 61 * SEC;
    h.record("e1", labels(&[]), "m", usage(1, 0));
    assert_eq!(
        h.reserve("r1", labels(&[]), "m", 10, 10).decision,
        Decision::Allow
    );
    let Answer::Error(e) = h.run(Command::Reserve(&h.reserve_req(
        "r2",
        labels(&[]),
        "m",
        10,
        10,
    ))) else {
        panic!("a released id reused within the hour was not refused")
    };
    assert_eq!(e.code, ErrorCode::Conflict);
    let u = usage_answer(h.commit("r1", "e2", usage(10, 10)));
    assert_eq!(
        (u.reservation, u.cost_micros, u.budgets[0].held_micros),
        (None, 30, 0)
    );
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn duplicate_returns_the_original_answer_and_counts_nothing_twice() {
    let mut h = Harness::new(policy(vec![limited(10_000)]));
    let first = h.record("e1", labels(&[]), "m", usage(100, 0));
    let r = RecordRequest {
        event_id: "e1".into(),
        labels: labels(&[]),
        model: "m".into(),
        usage: usage(100, 0),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    let Answer::Usage(v) = h.run(Command::Record(&r)) else {
        panic!("not a usage answer")
    };
    // The original answer, byte for byte, but for `duplicate`.
    assert_eq!(
        v,
        UsageAnswer {
            duplicate: true,
            ..first.clone()
        }
    );
    assert_eq!(h.status()[0].spent_micros, 100);
    // Same id, different payload: conflict naming the field.
    let mut other = r.clone();
    other.usage.input_tokens = 101;
    let e = error(h.run(Command::Record(&other)));
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.field.as_deref(), Some("event_id"));
    // Reservations too.
    let d = h.reserve("r1", labels(&[]), "m", 1, 1);
    let again = h.reserve_req("r1", labels(&[]), "m", 1, 1);
    let Answer::Decision(v) = h.run(Command::Reserve(&again)) else {
        panic!()
    };
    assert_eq!(
        v,
        DecisionAnswer {
            duplicate: true,
            ..d.clone()
        }
    );
    assert_eq!(h.ledger.live_holds(), 1);
}

#[test]
fn double_commit_with_a_new_event_id_is_a_conflict() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    h.reserve("r1", labels(&[]), "m", 1, 1);
    usage_answer(h.commit("r1", "e1", usage(1, 1)));
    let e = error(h.commit("r1", "e2", usage(1, 1)));
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.field.as_deref(), Some("reservation_id"));
}

#[test]
fn max_output_is_capped_at_the_models_maximum_and_defaults_to_it() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    let d = h.reserve("r1", labels(&[]), "m", 0, 1_000_000);
    assert_eq!(d.max_output_tokens, Some(1000));
    assert_eq!(d.hold_micros, 2000);
    let mut req = h.reserve_req("r2", labels(&[]), "m", 0, 0);
    req.estimate.max_output_tokens = None;
    let Answer::Decision(d) = h.run(Command::Reserve(&req)) else {
        panic!()
    };
    assert_eq!(d.max_output_tokens, Some(1000));
}

#[test]
fn max_concurrent_counts_live_holds() {
    let mut b = budget("gpu");
    b.max_concurrent = Some(2);
    let mut h = Harness::new(policy(vec![b]));
    assert_eq!(
        h.reserve("r1", labels(&[]), "local", 1, 1).decision,
        Decision::Allow
    );
    assert_eq!(
        h.reserve("r2", labels(&[]), "local", 1, 1).decision,
        Decision::Allow
    );
    assert_eq!(
        h.reserve("r3", labels(&[]), "local", 1, 1).decision,
        Decision::Deny
    );
    h.run(Command::Release(&ReleaseRequest {
        reservation_id: "r1".into(),
    }));
    assert_eq!(
        h.reserve("r4", labels(&[]), "local", 1, 1).decision,
        Decision::Allow
    );
}

#[test]
fn extend_moves_the_expiry() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    let mut req = h.reserve_req("r1", labels(&[]), "m", 1, 1);
    req.ttl_seconds = Some(10);
    h.run(Command::Reserve(&req));
    h.now += 5 * SEC;
    let Answer::Extend(e) = h.run(Command::Extend(&ExtendRequest {
        reservation_id: "r1".into(),
        ttl_seconds: 60,
    })) else {
        panic!()
    };
    assert_eq!(e.expires_at, "2026-11-23T00:01:05Z");
    h.now += 30 * SEC;
    assert!(h.ledger.reap(h.now).is_empty());
    assert_eq!(h.ledger.live_holds(), 1);
}

#[test]
fn group_by_gives_independent_buckets_and_events_lacking_the_label_do_not_count() {
    let mut b = limited(100);
    b.group_by = vec!["team".into()];
    let mut h = Harness::new(policy(vec![b]));
    h.record("e1", labels(&[("team", "a")]), "m", usage(100, 0));
    assert_eq!(
        h.reserve("r1", labels(&[("team", "a")]), "m", 1, 0)
            .decision,
        Decision::Deny
    );
    assert_eq!(
        h.reserve("r2", labels(&[("team", "b")]), "m", 1, 0)
            .decision,
        Decision::Allow
    );
    let a = h.record("e2", labels(&[("user", "x")]), "m", usage(5, 0));
    assert!(a.budgets.is_empty());
    assert_eq!(a.state, BucketState::Ok);
}

#[test]
fn tiers_are_deny_by_default_and_caps_apply_to_the_worst_case() {
    let mut p = policy(vec![budget("meter")]);
    p.tiers.patterns = vec![("big*".into(), "frontier".into())];
    p.tiers.caps.insert(
        "frontier".into(),
        ResolvedTierCap {
            max_call_micros: Some(50_000),
            max_call_output_tokens: Some(2000),
        },
    );
    p.tiers.caps.insert(
        "small".into(),
        ResolvedTierCap {
            max_call_micros: Some(1000),
            max_call_output_tokens: None,
        },
    );
    let mut h = Harness::new(p);
    let d = h.reserve("r1", labels(&[]), "big", 1000, 3000);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "tier_cap");
    // worst case 1000×10 + 2000×20 = 50,000 = the cap: allowed.
    assert_eq!(
        h.reserve("r2", labels(&[]), "big", 1000, 2000).decision,
        Decision::Allow
    );
    // `m` matches no pattern: default tier "small", cap 1000 micros.
    let d = h.reserve("r3", labels(&[]), "m", 0, 600);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "tier_cap");
}

#[test]
fn fallback_picks_the_first_allowed_candidate_and_explains_every_skip() {
    let mut b = limited(5000);
    b.match_labels = [("model".to_string(), "big".to_string())].into();
    let mut h = Harness::new(policy(vec![b]));
    let req = ReserveRequest {
        reservation_id: "r1".into(),
        labels: labels(&[]),
        model: None,
        estimate: Estimate {
            input_tokens: 1000,
            max_output_tokens: Some(100),
        },
        ttl_seconds: None,
        candidates: Some(vec![
            "nope".into(),
            "local".into(),
            "big".into(),
            "m".into(),
        ]),
        require: Some(vec!["tools".into()]),
        wait_ms: None,
    };
    let Answer::Decision(d) = h.run(Command::Reserve(&req)) else {
        panic!()
    };
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(d.model.as_deref(), Some("m"));
    let reasons: Vec<_> = d
        .skipped
        .iter()
        .map(|s| (s.model.as_str(), s.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("nope", SkipReason::UnknownModel),
            ("local", SkipReason::MissingCapability),
            ("big", SkipReason::Budget),
        ]
    );
}

#[test]
fn unknown_models_are_denied_for_holds_but_records_are_priced_at_max() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    let d = h.reserve("r1", labels(&[]), "mystery", 10, 10);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "unknown_model");
    let a = h.record("e1", labels(&[]), "mystery", usage(10, 10));
    assert!(a.priced_at_max);
    assert_eq!(
        a.cost_micros,
        10 * 10 + 10 * 20,
        "highest input and output prices"
    );
    let mut p = policy(vec![budget("meter")]);
    p.unknown_models = UnknownModels::PriceAtMax;
    h.apply_policy(p);
    assert_eq!(
        h.reserve("r2", labels(&[]), "mystery", 10, 10).decision,
        Decision::Allow
    );
}

#[test]
fn max_keys_per_budget_fails_closed_for_new_scopes() {
    let mut b = limited(1_000_000);
    b.group_by = vec!["user".into()];
    let mut p = policy(vec![b]);
    p.max_keys_per_budget = 2;
    let mut h = Harness::new(p);
    h.record("e1", labels(&[("user", "a")]), "m", usage(1, 0));
    h.record("e2", labels(&[("user", "b")]), "m", usage(1, 0));
    let d = h.reserve("r1", labels(&[("user", "c")]), "m", 1, 0);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "max_keys");
    assert_eq!(
        h.reserve("r2", labels(&[("user", "a")]), "m", 1, 0)
            .decision,
        Decision::Allow
    );
    // A record for a new scope is still kept, in the overflow bucket, and its answer says so.
    let a = h.record("e3", labels(&[("user", "c")]), "m", usage(1, 0));
    assert_eq!(a.seq, h.ledger.last_seq());
    assert_eq!(a.budgets[0].key, bursar_core::ledger::OVERFLOW_KEY);
    assert!(h
        .status()
        .iter()
        .any(|r| r.key == bursar_core::ledger::OVERFLOW_KEY));
}

/// A daily per-session budget with room for two live sessions.
fn two_sessions_a_day() -> bursar_schemas::policy::ResolvedPolicy {
    let mut b = limited(1_000_000);
    b.group_by = vec!["session".into()];
    b.window = WindowSpec::Fixed {
        seconds: 86_400,
        offset_seconds: 0,
    };
    let mut p = policy(vec![b]);
    p.max_keys_per_budget = 2;
    p
}

/// SPEC §5 (revision 2): only live scopes count against `max_keys_per_budget`. Yesterday's
/// sessions do not keep today's out, also in a ledger read back from a snapshot (a restart).
#[test]
fn scopes_whose_window_ended_no_longer_count_against_max_keys() {
    let mut h = Harness::new(two_sessions_a_day());
    let session = |s: &str| labels(&[("session", s)]);
    h.record("e1", session("s1"), "m", usage(1, 0));
    h.record("e2", session("s2"), "m", usage(1, 0));
    let d = h.reserve("r1", session("s3"), "m", 1, 0);
    assert_eq!(
        (d.decision, d.reason.code.as_str()),
        (Decision::Deny, "max_keys")
    );
    // The next day, s1 and s2 have ended: s3 and s4 are two new live scopes.
    h.now += 86_400 * SEC;
    let restarted = {
        let json = serde_json::to_string(&h.ledger).unwrap();
        serde_json::from_str::<bursar_core::ledger::Ledger>(&json).unwrap()
    };
    for ledger in [h.ledger.clone(), restarted] {
        let mut g = Harness {
            ledger,
            log: h.log.clone(),
            now: h.now,
        };
        assert_eq!(
            g.reserve("r3", session("s3"), "m", 1, 0).decision,
            Decision::Allow
        );
        let a = g.record("e4", session("s4"), "m", usage(1, 0));
        assert_eq!(
            a.budgets[0].key, "session=s4",
            "its own bucket, not the overflow"
        );
        // Two live scopes again: a third is refused, today.
        let d = g.reserve("r5", session("s5"), "m", 1, 0);
        assert_eq!(d.reason.code, "max_keys");
        // The ended ones are gone from memory and from status.
        assert_eq!(g.ledger.bucket_count(), 2);
        let keys: Vec<String> = g.status().into_iter().map(|r| r.key).collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.iter().all(|k| k == "session=s3" || k == "session=s4"));
        assert_eq!(g.refold(), g.ledger, "a fold of the log agrees");
    }
}

/// SPEC §5: reads never show a hold past its expiry, even before its `reservation_expired` is
/// written; a scope that only such a hold keeps live is not live for a read either (`check`'s
/// `max_keys`, `status`'s list), as it is not for a `reserve`, which reaps first.
#[test]
fn a_scope_kept_live_only_by_an_expired_hold_is_not_live_for_reads() {
    let mut h = Harness::new(two_sessions_a_day());
    let session = |s: &str| labels(&[("session", s)]);
    h.now += 12 * 3600 * SEC;
    for (id, s) in [("r1", "s1"), ("r2", "s2")] {
        let mut r = h.reserve_req(id, session(s), "m", 1, 0);
        r.ttl_seconds = Some(86_400);
        let Answer::Decision(d) = h.run(Command::Reserve(&r)) else {
            panic!("no decision")
        };
        assert_eq!(d.decision, Decision::Allow, "{id}");
    }
    // The next day, past both holds' expiry, before the reaper has ended them.
    h.now += 25 * 3600 * SEC;
    assert_eq!(h.ledger.bucket_count(), 2, "not reaped, not swept yet");
    let check = h.check_req(session("s3"), "m", 1, 0);
    let Answer::Decision(d) = h.ledger.check(&check, h.now) else {
        panic!("no decision")
    };
    assert_eq!(d.decision, Decision::Allow, "s1 and s2 are not live: {d:?}");
    let keys: Vec<String> = h.status().into_iter().map(|r| r.key).collect();
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(
        h.reserve("r3", session("s3"), "m", 1, 0).decision,
        Decision::Allow
    );
    assert_eq!(h.refold(), h.ledger);
}

/// A scope that holds a live reservation is live even after its window ended.
#[test]
fn a_scope_holding_a_reservation_stays_live_past_its_window() {
    let mut h = Harness::new(two_sessions_a_day());
    let session = |s: &str| labels(&[("session", s)]);
    h.record("e2", session("s2"), "m", usage(1, 0));
    h.now += 12 * 3600 * SEC;
    let mut r = h.reserve_req("r1", session("s1"), "m", 1, 0);
    r.ttl_seconds = Some(86_400);
    assert_eq!(
        match h.run(Command::Reserve(&r)) {
            Answer::Decision(d) => d.decision,
            other => panic!("{other:?}"),
        },
        Decision::Allow
    );
    h.now += 13 * 3600 * SEC; // the next day: s1's hold still live, s2 ended
    let d = h.reserve("r3", session("s3"), "m", 1, 0);
    assert_eq!(d.decision, Decision::Allow, "s2 ended: room for s3: {d:?}");
    let d = h.reserve("r4", session("s4"), "m", 1, 0);
    assert_eq!(d.reason.code, "max_keys", "s1 (held) and s3 are live");
}

/// A scope in which a hold was placed is live until its window ends, also when the hold was
/// released and nothing was spent: status lists it with zero spent and zero held (the Python
/// client's `hold()` without a commit reads its bucket back).
#[test]
fn a_scope_whose_hold_was_released_stays_listed_until_its_window_ends() {
    let mut h = Harness::new(two_sessions_a_day());
    let session = |s: &str| labels(&[("session", s)]);
    assert_eq!(
        h.reserve("r1", session("s1"), "m", 1, 0).decision,
        Decision::Allow
    );
    h.run(Command::Release(&ReleaseRequest {
        reservation_id: "r1".into(),
    }));
    let rows = h.status();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].key.as_str(),
            rows[0].spent_micros,
            rows[0].held_micros
        ),
        ("session=s1", 0, 0)
    );
    assert_eq!(h.refold(), h.ledger, "a fold of the log agrees");
    h.now += 86_400 * SEC; // the next day: it has ended
    assert!(h.status().is_empty());
}

/// Memory stays bounded while scopes churn: ended buckets leave as new ones come.
#[test]
fn ended_buckets_leave_memory_while_sessions_churn_through_many_windows() {
    let mut b = budget("per-session");
    b.group_by = vec!["session".into()];
    b.window = WindowSpec::Fixed {
        seconds: 60,
        offset_seconds: 0,
    };
    b.max_requests = Some(1_000);
    let mut h = Harness::new(policy(vec![b]));
    let per_window = 3_000;
    let mut most = 0;
    for w in 0..12 {
        for i in 0..per_window {
            let s = format!("w{w}-s{i}");
            h.record(&s, labels(&[("session", &s)]), "m", usage(1, 0));
            most = most.max(h.ledger.bucket_count());
        }
        h.now += 60 * SEC;
    }
    // Never more than about twice the live sessions (a sweep runs when the budget holds twice
    // what the last one kept), far from the 36,000 sessions seen.
    assert!(most <= 2 * per_window + 1024, "{most} buckets at most");
    // A ledger with swept (vacant) slots snapshots and reads back as it is (bincode needs every
    // map's length up front).
    let bytes = bincode::serde::encode_to_vec(&h.ledger, bincode::config::standard()).unwrap();
    let (back, _): (bursar_core::ledger::Ledger, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!(back, h.ledger);
    assert_eq!(back.bucket_count(), h.ledger.bucket_count());
    assert_eq!(
        h.status().len(),
        0,
        "the last window has ended too: nothing is live"
    );
}

#[test]
fn timestamps_strictly_increase_when_the_clock_steps_back() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    h.record("e1", labels(&[]), "m", usage(1, 0));
    h.now -= 3600 * SEC;
    h.record("e2", labels(&[]), "m", usage(1, 0));
    let ts: Vec<_> = h.log.iter().map(|e| e.ts).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");
}

#[test]
fn client_may_not_set_derived_labels_and_bad_input_names_the_field() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    let r = RecordRequest {
        event_id: "e1".into(),
        labels: labels(&[("model", "cheap")]),
        model: "m".into(),
        usage: usage(1, 0),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    let e = error(h.run(Command::Record(&r)));
    assert_eq!(e.field.as_deref(), Some("labels.model"));
    let mut r2 = r.clone();
    r2.labels = labels(&[]);
    r2.usage.input_tokens = 1_000_000_000_001;
    assert_eq!(
        error(h.run(Command::Record(&r2))).field.as_deref(),
        Some("usage")
    );
    let mut r3 = r2.clone();
    r3.usage.input_tokens = 1;
    r3.occurred_at = Some("last tuesday".into());
    assert_eq!(
        error(h.run(Command::Record(&r3))).field.as_deref(),
        Some("occurred_at")
    );
    assert_eq!(h.ledger.last_seq(), 1, "nothing was appended for bad input");
}

#[test]
fn derived_labels_are_added_and_match_budgets() {
    let mut b = budget("per-provider");
    b.group_by = vec!["provider".into(), "tier".into()];
    let mut h = Harness::new(policy(vec![b]));
    let a = h.record("e1", labels(&[]), "m", usage(1, 0));
    assert_eq!(a.budgets[0].key, "provider=acme,tier=small");
}

#[test]
fn policy_reload_keeps_unchanged_budgets_and_recounts_live_holds() {
    let mut h = Harness::new(policy(vec![limited(1000)]));
    h.record("e1", labels(&[]), "m", usage(100, 0));
    h.reserve("r1", labels(&[]), "m", 100, 0);
    let mut other = budget("new");
    other.max_micros = Some(50);
    h.apply_policy(policy(vec![limited(1000), other]));
    let s = h.status();
    let cap = s.iter().find(|r| r.budget == "cap").unwrap();
    assert_eq!((cap.spent_micros, cap.held_micros), (100, 100));
    let new = s.iter().find(|r| r.budget == "new").unwrap();
    assert_eq!(
        (new.spent_micros, new.held_micros),
        (0, 100),
        "live hold counts in the new budget"
    );
    usage_answer(h.commit("r1", "e2", usage(10, 0)));
    let new = h.status().into_iter().find(|r| r.budget == "new").unwrap();
    assert_eq!((new.spent_micros, new.held_micros), (10, 0));
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn fold_of_the_log_equals_the_live_ledger() {
    let mut b = limited(5000);
    b.group_by = vec!["team".into()];
    b.window = WindowSpec::Fixed {
        seconds: 60,
        offset_seconds: 0,
    };
    b.warn_at_ppm = Some(500_000);
    let mut h = Harness::new(policy(vec![b, budget("meter")]));
    for i in 0..50 {
        let team = if i % 3 == 0 { "a" } else { "b" };
        h.now += 7 * SEC;
        h.record(
            &format!("e{i}"),
            labels(&[("team", team)]),
            "m",
            usage(50, 20),
        );
        let d = h.reserve(&format!("r{i}"), labels(&[("team", team)]), "m", 10, 10);
        if d.decision != Decision::Deny && i % 2 == 0 {
            h.commit(&format!("r{i}"), &format!("c{i}"), usage(5, 5));
        }
    }
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn a_clock_stepping_back_never_makes_a_window_look_new() {
    let mut b = limited(1000);
    b.window = WindowSpec::Fixed {
        seconds: 3600,
        offset_seconds: 0,
    };
    let mut h = Harness::new(policy(vec![b]));
    h.now = T0 + 3600 * SEC + 10 * SEC; // just into the second hour
    h.record("e1", labels(&[]), "m", usage(1000, 0));
    h.now -= 60 * SEC; // the wall clock steps back into the first hour
    assert_eq!(
        h.status()[0].spent_micros,
        1000,
        "the budget does not look reset"
    );
    let d = h.reserve("r1", labels(&[]), "m", 1, 0);
    assert_eq!(d.decision, Decision::Deny, "and cannot be spent again");
    let ts: Vec<_> = h.log.iter().map(|e| e.ts).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn a_clock_stepped_back_across_a_window_boundary_neither_hides_spending_nor_overspends() {
    // T0 is a boundary of 60-second windows.
    let mut b = limited(1000);
    b.window = WindowSpec::Fixed {
        seconds: 60,
        offset_seconds: 0,
    };
    let mut h = Harness::new(policy(vec![b]));
    h.now = T0 + 10 * SEC;
    h.record("e1", labels(&[]), "m", usage(900, 0));
    // The wall clock steps back 15 s, into the previous window. Events are still stamped after
    // the last one, in the window that holds the 900 spent.
    h.now = T0 - 5 * SEC;
    assert_eq!(h.status()[0].spent_micros, 900, "status still shows it");
    let check = CheckRequest {
        labels: labels(&[]),
        model: Some("m".into()),
        estimate: Estimate {
            input_tokens: 300,
            max_output_tokens: Some(0),
        },
        candidates: None,
        require: None,
        wait_ms: None,
    };
    match h.ledger.check(&check, h.now) {
        Answer::Decision(d) => assert_eq!(d.decision, Decision::Deny, "{d:?}"),
        other => panic!("check answered {other:?}"),
    }
    let r = h.reserve("r1", labels(&[]), "m", 300, 0);
    assert_eq!(
        r.decision,
        Decision::Deny,
        "900 + 300 would overspend the window the hold lands in"
    );
    let r = h.reserve("r2", labels(&[]), "m", 100, 0);
    assert_eq!(r.decision, Decision::Allow, "exactly to the limit");
    let s = h.status();
    assert_eq!((s[0].spent_micros, s[0].held_micros), (900, 100));
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn a_hold_due_within_a_burst_is_expired_before_the_next_decision() {
    // Many events at one clock instant are stamped one microsecond apart; a hold that is due
    // by the time the next event is stamped no longer counts against that decision.
    let mut b = limited(600);
    b.max_concurrent = Some(1);
    let mut h = Harness::new(policy(vec![b]));
    let mut r = h.reserve_req("r1", labels(&[]), "m", 100, 100);
    r.ttl_seconds = Some(1);
    let first = match h.run(Command::Reserve(&r)) {
        Answer::Decision(d) => d,
        other => panic!("reserve answered {other:?}"),
    };
    assert_eq!(first.decision, Decision::Allow);
    let expires_at = h.ledger.hold("r1").unwrap().expires_at;
    // The clock reaches one microsecond before the expiry, and stays there for two events:
    // the second is stamped at the expiry.
    h.now = expires_at - 1;
    h.record("e1", labels(&[]), "m", usage(1, 0));
    assert!(h.ledger.hold("r1").is_some(), "not due yet");
    let second = h.reserve("r2", labels(&[]), "m", 100, 100);
    assert_eq!(second.decision, Decision::Allow, "{second:?}");
    assert!(h.kinds().contains(&"reservation_expired"));
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn a_new_policy_regroups_the_next_event_of_a_label_set_already_seen() {
    // The ledger remembers which buckets a label set counts in; a policy that groups the same
    // budget differently must not reuse that memory.
    let mut by_team = budget("cap");
    by_team.group_by = vec!["team".into()];
    let mut h = Harness::new(policy(vec![by_team]));
    let seen = labels(&[("team", "a"), ("user", "u1")]);
    let a = h.record("e1", seen.clone(), "m", usage(100, 0));
    assert_eq!(a.budgets[0].key, "team=a");
    let mut by_user = budget("cap-by-user");
    by_user.group_by = vec!["user".into()];
    h.apply_policy(policy(vec![by_user]));
    let a = h.record("e2", seen.clone(), "m", usage(10, 0));
    assert_eq!(a.budgets.len(), 1);
    assert_eq!(a.budgets[0].budget, "cap-by-user");
    assert_eq!(a.budgets[0].key, "user=u1");
    assert_eq!(a.budgets[0].spent_micros, 10);
    assert_eq!(h.refold(), h.ledger);
}

/// SPEC §4 `timezone`: a daily budget of a team in New York resets at local midnight, also in
/// summer, when a fixed `-05:00` offset would reset it an hour late.
#[test]
fn a_daily_budget_in_new_york_resets_at_local_midnight_in_summer() {
    let mut b = budget("ny-daily");
    b.window = WindowSpec::CalendarZone {
        unit: bursar_schemas::policy::CalendarUnit::Day,
        timezone: "America/New_York".into(),
    };
    b.max_micros = Some(1_000);
    let mut h = Harness::new(policy(vec![b]));
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_micros()
    };
    // 23:30 EDT on 2027-07-14: 800 of 1,000 spent.
    h.now = at("2027-07-14T23:30:00-04:00");
    h.record("e1", labels(&[]), "m", usage(800, 0));
    // 00:10 EDT on 2027-07-15 (04:10Z, still the 14th at -05:00): a new day, 0 spent before.
    h.now = at("2027-07-15T00:10:00-04:00");
    let a = h.record("e2", labels(&[]), "m", usage(300, 0));
    assert_eq!(a.budgets[0].spent_micros, 300, "{a:?}");
    assert_eq!(a.state, BucketState::Ok);
    assert_eq!(
        a.budgets[0].window_end.as_deref(),
        Some("2027-07-16T04:00:00Z")
    );
    // A fold of the log agrees.
    assert_eq!(h.refold(), h.ledger);
}

/// Ids are remembered for `idempotency_window_seconds` after their event (a projection of the
/// log, not a second store): within it a resend is a duplicate with the original answer, after
/// it a new request.
#[test]
fn an_id_is_remembered_for_the_idempotency_window_and_then_counts_as_new() {
    let mut p = policy(vec![limited(1_000_000)]);
    p.idempotency_window_seconds = 60;
    let mut h = Harness::new(p);
    let first = h.record("e1", labels(&[]), "m", usage(100, 0));
    h.now += 60 * SEC;
    // Another event moves ledger time on; e1 is 60 s old: still within the window.
    h.record("other", labels(&[]), "m", usage(1, 0));
    let again = h.record("e1", labels(&[]), "m", usage(100, 0));
    assert!(again.duplicate);
    assert_eq!(again.seq, first.seq);
    assert_eq!(h.status()[0].spent_micros, 101, "counted once");
    h.now += SEC;
    h.record("later", labels(&[]), "m", usage(1, 0));
    // 61 s after it, e1 is forgotten: the same request is new usage now.
    let late = h.record("e1", labels(&[]), "m", usage(100, 0));
    assert!(!late.duplicate);
    assert_ne!(late.seq, first.seq);
    assert_eq!(h.status()[0].spent_micros, 202);
    // A fold of the log (what a restart does) knows the same ids.
    assert_eq!(h.refold(), h.ledger);
    assert_eq!(
        h.ledger
            .ids()
            .get(bursar_core::ledger::IdKind::Event, "e1")
            .map(|e| e.seq),
        Some(late.seq)
    );
}

/// A new answer's scope keys are taken where it was decided (`Renderer::keyed`, the writer) and
/// rendered elsewhere (`render_keyed`, the connection): each line keeps its own key, encoded
/// as every scope key is, and a resent request's answer, rendered again from the log, shows
/// the same lines.
#[test]
fn an_answers_budget_lines_show_their_own_scope_keys_encoded() {
    let mut by_user_and_team = limited(1_000_000);
    by_user_and_team.group_by = vec!["user".into(), "team".into()];
    let mut by_org = budget("org");
    by_org.group_by = vec!["org".into()];
    let mut h = Harness::new(policy(vec![by_user_and_team, by_org, budget("meter")]));
    let l = labels(&[("user", "a,b=c%d"), ("team", "é t"), ("org", "acme")]);
    let a = h.record("e1", l.clone(), "m", usage(1, 0));
    let keys: Vec<(&str, &str)> = a
        .budgets
        .iter()
        .map(|b| (b.budget.as_str(), b.key.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("cap", "user=a%2Cb%3Dc%25d,team=é t"),
            ("org", "org=acme"),
            ("meter", "")
        ]
    );
    let again = h.record("e1", l, "m", usage(1, 0));
    assert!(again.duplicate);
    assert_eq!(again.budgets, a.budgets);
}
