//! What budget lines and `status` answers say (SPEC §6): the remaining amount of every limit a
//! budget has, `status` filters (budget, labels in the scope or pinned by `match`), the cut at
//! `limit` with the total, and an unknown budget.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_schemas::wire::*;
use common::*;
use std::collections::BTreeMap;

fn status(h: &Harness, req: StatusRequest) -> Result<StatusAnswer, WireError> {
    h.ledger.status(&req, h.now)
}

fn remaining(r: &BudgetReport) -> (Option<i64>, Option<u64>, Option<u64>, Option<u64>) {
    (
        r.remaining_micros,
        r.remaining_tokens,
        r.remaining_requests,
        r.remaining_concurrent,
    )
}

fn line<'a>(lines: &'a [BudgetReport], budget: &str) -> &'a BudgetReport {
    lines
        .iter()
        .find(|r| r.budget == budget)
        .unwrap_or_else(|| panic!("no line of {budget} in {lines:?}"))
}

#[test]
fn every_budget_line_says_what_is_left_of_each_limit_its_budget_has() {
    let mut tokens = budget("tokens");
    tokens.max_tokens = Some(1000);
    let mut calls = budget("calls");
    calls.max_requests = Some(5);
    calls.max_concurrent = Some(2);
    let mut all = budget("all");
    all.max_micros = Some(10_000);
    all.max_tokens = Some(1_000_000);
    all.max_requests = Some(100);
    all.max_concurrent = Some(10);
    let meter = budget("meter");
    let mut h = Harness::new(policy(vec![tokens, calls, all, meter]));

    // 100 in + 50 out of `m` = 200 µUSD, 150 tokens, 1 request.
    let a = h.record("e1", labels(&[]), "m", usage(100, 50));
    assert_eq!(
        remaining(line(&a.budgets, "tokens")),
        (None, Some(850), None, None)
    );
    assert_eq!(
        remaining(line(&a.budgets, "calls")),
        (None, None, Some(4), Some(2))
    );
    assert_eq!(
        remaining(line(&a.budgets, "all")),
        (Some(9800), Some(999_850), Some(99), Some(10))
    );
    assert_eq!(
        remaining(line(&a.budgets, "meter")),
        (None, None, None, None),
        "a meter has no limit, so nothing remains of one"
    );

    // A hold takes from what remains: 100 in + 200 max out = 500 µUSD, 300 tokens, 1 request,
    // 1 slot.
    let d = h.reserve("r1", labels(&[]), "m", 100, 200);
    assert_eq!(d.decision, Decision::Allow, "{:?}", d.reason);
    assert_eq!(
        remaining(line(&d.budgets, "tokens")),
        (None, Some(550), None, None)
    );
    assert_eq!(
        remaining(line(&d.budgets, "calls")),
        (None, None, Some(3), Some(1))
    );
    assert_eq!(
        remaining(line(&d.budgets, "all")),
        (Some(9300), Some(999_550), Some(98), Some(9))
    );
    let s = status(&h, StatusRequest::default()).unwrap();
    assert_eq!(
        remaining(line(&s.budgets, "calls")),
        (None, None, Some(3), Some(1))
    );

    // Spending past a limit leaves nothing, never less than nothing.
    let over = h.record("e2", labels(&[]), "m", usage(2000, 0));
    assert_eq!(
        remaining(line(&over.budgets, "tokens")),
        (None, Some(0), None, None)
    );
    assert_eq!(line(&over.budgets, "tokens").state, BucketState::Exhausted);
}

#[test]
fn an_unknown_budget_is_not_found() {
    let mut team = budget("team-daily");
    team.group_by = vec!["team".into()];
    let mut h = Harness::new(policy(vec![team]));
    h.record("e1", labels(&[("team", "a")]), "m", usage(1, 0));
    let err = status(
        &h,
        StatusRequest {
            budget: Some("team-dialy".into()),
            ..StatusRequest::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(err.field.as_deref(), Some("budget"));
    assert!(err.message.contains("team-dialy"), "{}", err.message);
    // A budget that exists but has no bucket yet is an empty answer, not an error.
    let mut idle = budget("idle");
    idle.group_by = vec!["user".into()];
    let h = Harness::new(policy(vec![idle]));
    let s = status(
        &h,
        StatusRequest {
            budget: Some("idle".into()),
            ..StatusRequest::default()
        },
    )
    .unwrap();
    assert_eq!((s.budgets.len(), s.total, s.truncated), (0, 0, false));
}

#[test]
fn a_label_pinned_by_a_budgets_match_selects_its_buckets() {
    let mut acme = budget("acme-teams");
    acme.match_labels = BTreeMap::from([("org".into(), "acme".into())]);
    acme.group_by = vec!["team".into()];
    let mut any_org = budget("any-org");
    any_org.match_labels = BTreeMap::from([("org".into(), "*".into())]);
    let mut per_org = budget("per-org");
    per_org.group_by = vec!["org".into()];
    let mut h = Harness::new(policy(vec![acme, any_org, per_org]));
    h.record(
        "e1",
        labels(&[("org", "acme"), ("team", "a")]),
        "m",
        usage(1, 0),
    );
    h.record(
        "e2",
        labels(&[("org", "acme"), ("team", "b")]),
        "m",
        usage(1, 0),
    );
    h.record(
        "e3",
        labels(&[("org", "globex"), ("team", "a")]),
        "m",
        usage(1, 0),
    );
    let find = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut got: Vec<(String, String)> = status(
            &h,
            StatusRequest {
                labels: Some(labels(pairs)),
                ..StatusRequest::default()
            },
        )
        .unwrap()
        .budgets
        .into_iter()
        .map(|r| (r.budget, r.key))
        .collect();
        got.sort();
        got
    };
    let pair = |b: &str, k: &str| (b.to_string(), k.to_string());
    // `org` is pinned to acme by acme-teams' match, and a group_by label of per-org; any-org's
    // `"*"` pins nothing.
    assert_eq!(
        find(&[("org", "acme")]),
        vec![
            pair("acme-teams", "team=a"),
            pair("acme-teams", "team=b"),
            pair("per-org", "org=acme"),
        ]
    );
    assert_eq!(
        find(&[("org", "acme"), ("team", "b")]),
        vec![pair("acme-teams", "team=b")]
    );
    assert_eq!(
        find(&[("org", "globex")]),
        vec![pair("per-org", "org=globex")]
    );
    assert_eq!(find(&[("org", "*")]), Vec::<(String, String)>::new());
    // A label neither in the scope nor pinned keeps nothing of that budget.
    assert_eq!(find(&[("team", "a")]), vec![pair("acme-teams", "team=a")]);
}

#[test]
fn status_says_how_many_buckets_matched_and_whether_it_cut_them() {
    let mut per_user = budget("per-user");
    per_user.group_by = vec!["user".into()];
    per_user.max_micros = Some(1_000_000);
    let mut h = Harness::new(policy(vec![per_user]));
    // 1001 users; user u-N spends N µUSD, so u-1000 is the most utilized.
    for n in 0..=1000u64 {
        let user = format!("u-{n}");
        h.record(
            &format!("e-{n}"),
            labels(&[("user", &user)]),
            "m",
            usage(n, 0),
        );
    }
    let all = status(&h, StatusRequest::default()).unwrap();
    assert_eq!(all.budgets.len(), 1000, "at most 1000 by default");
    assert_eq!(all.total, 1001);
    assert!(all.truncated);
    assert_eq!(all.budgets[0].key, "user=u-1000", "most utilized first");
    assert_eq!(all.budgets[999].key, "user=u-1");
    assert!(
        all.budgets.iter().all(|r| r.key != "user=u-0"),
        "the least utilized is the one cut"
    );

    let top = status(
        &h,
        StatusRequest {
            limit: Some(3),
            ..StatusRequest::default()
        },
    )
    .unwrap();
    let keys: Vec<&str> = top.budgets.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["user=u-1000", "user=u-999", "user=u-998"]);
    assert_eq!((top.total, top.truncated), (1001, true));

    let whole = status(
        &h,
        StatusRequest {
            limit: Some(1001),
            ..StatusRequest::default()
        },
    )
    .unwrap();
    assert_eq!((whole.budgets.len(), whole.total), (1001, 1001));
    assert!(!whole.truncated, "nothing was left out");
}
