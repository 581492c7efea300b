//! Which denials a `reserve` or `check` with `wait_ms` may wait out (SPEC §10): only limits
//! that free up by themselves — concurrency, rolling windows, other holds, allowances and
//! provider quotas — and never money already spent in a fixed window. A waiting reserve
//! appends nothing; `wait_ms` is no part of the request's digest.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_core::ledger::{Answer, Command, Reply};
use bursar_schemas::policy::WindowSpec;
use bursar_schemas::wire::*;
use common::*;

fn gpu_policy() -> bursar_schemas::policy::ResolvedPolicy {
    let mut slots = budget("gpu");
    slots.max_concurrent = Some(1);
    slots.match_labels = [("pool".to_string(), "gpu".to_string())].into();
    let mut rpm = budget("rpm");
    rpm.max_requests = Some(1);
    rpm.window = WindowSpec::Rolling {
        seconds: 60,
        resolution_seconds: 1,
    };
    rpm.match_labels = [("pool".to_string(), "api".to_string())].into();
    let mut daily = budget("daily");
    daily.max_micros = Some(1000);
    daily.window = WindowSpec::Fixed {
        seconds: 86_400,
        offset_seconds: 0,
    };
    daily.match_labels = [("pool".to_string(), "small".to_string())].into();
    let mut held = budget("held");
    held.max_micros = Some(50);
    held.window = WindowSpec::Fixed {
        seconds: 86_400,
        offset_seconds: 0,
    };
    held.match_labels = [("pool".to_string(), "shared".to_string())].into();
    let mut tpm = budget("tpm");
    tpm.max_tokens = Some(50);
    tpm.window = WindowSpec::Rolling {
        seconds: 60,
        resolution_seconds: 1,
    };
    tpm.match_labels = [("pool".to_string(), "tiny".to_string())].into();
    policy(vec![slots, rpm, daily, held, tpm])
}

fn waiting(h: &mut Harness, id: &str, pool: &str) -> Reply {
    let mut r = h.reserve_req(id, labels(&[("pool", pool)]), "m", 10, 10);
    r.wait_ms = Some(1000);
    let before = h.ledger.last_seq();
    let d = h.ledger.decide_digested(
        Command::ReserveOrWait(&r),
        &Command::Reserve(&r).digest(),
        h.now,
    );
    if d.reply == Reply::Wait {
        assert!(d.events.is_empty(), "a waiting reserve appends nothing");
        assert_eq!(h.ledger.last_seq(), before);
    }
    d.reply
}

fn check(h: &Harness, pool: &str) -> (Answer, bool) {
    let mut r = h.check_req(labels(&[("pool", pool)]), "m", 10, 10);
    r.wait_ms = Some(1000);
    h.ledger.check_waitable(&r, h.now)
}

#[test]
fn a_full_concurrency_limit_or_rolling_window_is_waited_out_spent_money_is_not() {
    let mut h = Harness::new(gpu_policy());
    // Concurrency: the one slot is taken.
    assert_eq!(
        h.reserve("g1", labels(&[("pool", "gpu")]), "m", 10, 10)
            .decision,
        Decision::Allow
    );
    assert_eq!(waiting(&mut h, "g2", "gpu"), Reply::Wait);
    assert!(check(&h, "gpu").1);
    // A rolling request limit used up.
    h.record("e1", labels(&[("pool", "api")]), "m", usage(1, 1));
    assert_eq!(waiting(&mut h, "a1", "api"), Reply::Wait);
    // Money spent in a fixed window: denied (and the deny appended) at once.
    h.record("e2", labels(&[("pool", "small")]), "m", usage(1000, 1000));
    assert!(matches!(waiting(&mut h, "s1", "small"), Reply::Event(_)));
    assert_eq!(
        h.ledger.last_seq(),
        h.log.len() as u64 + 1,
        "the deny was appended"
    );
    assert!(!check(&h, "small").1);
    // Money other holds keep in a fixed window comes back when they end: waited out.
    let shared = labels(&[("pool", "shared")]);
    assert_eq!(
        h.reserve("x1", shared.clone(), "m", 10, 10).decision,
        Decision::Allow
    );
    assert_eq!(
        h.reserve("x2", shared, "m", 10, 10).decision,
        Decision::Deny
    );
    assert_eq!(waiting(&mut h, "x3", "shared"), Reply::Wait);
}

#[test]
fn wait_ms_is_no_part_of_a_reserves_digest_and_is_bounded() {
    let h = Harness::new(gpu_policy());
    let mut r = h.reserve_req("r", labels(&[("pool", "gpu")]), "m", 10, 10);
    let plain = Command::Reserve(&r).digest();
    r.wait_ms = Some(5000);
    assert_eq!(Command::Reserve(&r).digest(), plain);
    assert_eq!(Command::ReserveOrWait(&r).digest(), plain);
    r.wait_ms = Some(60_001);
    let mut h = h;
    let e = error(h.run(Command::Reserve(&r)));
    assert_eq!(e.field.as_deref(), Some("wait_ms"));
}

#[test]
fn a_request_larger_than_a_limit_itself_does_not_wait() {
    let mut h = Harness::new(gpu_policy());
    // 10 input + 10 output tokens fit the rolling 50; a call of 100 never would.
    let mut r = h.reserve_req("big", labels(&[("pool", "tiny")]), "m", 100, 10);
    r.wait_ms = Some(1000);
    let d = h.ledger.decide_digested(
        Command::ReserveOrWait(&r),
        &Command::Reserve(&r).digest(),
        h.now,
    );
    assert!(matches!(d.reply, Reply::Event(_)), "{:?}", d.reply);
}
