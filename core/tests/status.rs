//! What budget lines and `status` answers say (SPEC §6): the remaining amount of every limit a
//! budget has.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_schemas::wire::*;
use common::*;

fn status(h: &Harness, req: StatusRequest) -> StatusAnswer {
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
    let s = status(&h, StatusRequest::default());
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
