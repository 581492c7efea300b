//! Provider quotas' known limits (SPEC §10 `[[quota]]`): `requests_per_minute` and
//! `tokens_per_minute` of one provider (and account) bound the calls that go to it; a candidate
//! over them is skipped with reason `quota` and the next provider is tried.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_core::ledger::{Answer, Command};
use bursar_core::policy::{parse_policy, PolicyError};
use bursar_schemas::policy::{ResolvedPolicy, WindowSpec};
use bursar_schemas::pricing::ModelPrice;
use bursar_schemas::wire::*;
use bursar_schemas::Labels;
use common::*;

fn no_import(path: &str) -> Result<String, String> {
    Err(format!("no such file: {path}"))
}

/// `m` is served by `acme` on the prod account at 2 requests and 500 tokens a minute; `other`
/// is another provider's model.
const QUOTA: &str = r#"
[[quota]]
id = "acme-prod"
provider = "acme"
match = { account = "prod" }
requests_per_minute = 2
tokens_per_minute = 500
"#;

fn policy_with_quota() -> ResolvedPolicy {
    let mut p = parse_policy(QUOTA, "bursar.toml", &no_import)
        .unwrap()
        .resolved;
    let mut table = prices();
    let mut other: ModelPrice = table.models["m"].clone();
    other.provider = "elsewhere".into();
    table.models.insert("other".into(), other);
    p.pricing = table;
    p
}

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_policy(text, "bursar.toml", &no_import) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errs) => errs,
    }
}

#[test]
fn a_quota_resolves_into_rolling_one_minute_limits_on_its_provider() {
    let p = parse_policy(QUOTA, "bursar.toml", &no_import)
        .unwrap()
        .resolved;
    assert_eq!(p.quotas.len(), 1);
    let ids: Vec<&str> = p.budgets.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["quota:acme-prod:requests", "quota:acme-prod:tokens"]);
    let r = &p.budgets[0];
    assert_eq!(r.max_requests, Some(2));
    assert_eq!(
        r.match_labels.get("provider").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        r.match_labels.get("account").map(String::as_str),
        Some("prod")
    );
    assert!(matches!(r.window, WindowSpec::Rolling { seconds: 60, .. }));
}

#[test]
fn quota_mistakes_are_reported_at_their_key() {
    for (text, key) in [
        (
            "[[quota]]\nid = \"q\"\nprovider = \"\"\n",
            "quota[0].provider",
        ),
        (
            "[[quota]]\nid = \"q\"\nprovider = \"openai\"\nrequests_per_minute = 0\n",
            "quota[0].requests_per_minute",
        ),
        (
            "[[quota]]\nid = \"q\"\nprovider = \"openai\"\nmatch = { provider = \"x\" }\n",
            "quota[0].match.provider",
        ),
        (
            "[[quota]]\nid = \"q\"\nprovider = \"openai\"\nrpm = 5\n",
            "quota[0].rpm",
        ),
        ("[[quota]]\nprovider = \"openai\"\n", "quota[0].id"),
        (
            "[[quota]]\nid = \"q\"\nprovider = \"a\"\n[[quota]]\nid = \"q\"\nprovider = \"b\"\n",
            "quota[1].id",
        ),
    ] {
        let errs = errors(text);
        assert!(
            errs.iter().any(|e| e.key == key),
            "expected an error at {key} for\n{text}\ngot {errs:#?}"
        );
    }
}

#[test]
fn a_provider_over_its_quota_is_skipped_with_reason_quota_and_the_next_provider_is_tried() {
    let mut h = Harness::new(policy_with_quota());
    let prod = labels(&[("account", "prod")]);
    let ask = |h: &Harness, id: &str| {
        let mut r = h.reserve_req(id, prod.clone(), "m", 100, 100);
        r.model = None;
        r.candidates = Some(vec!["m".into(), "other".into()]);
        r
    };
    for id in ["r1", "r2"] {
        let Answer::Decision(d) = h.run(Command::Reserve(&ask(&h, id))) else {
            panic!("no decision");
        };
        assert_eq!(d.model.as_deref(), Some("m"), "{d:?}");
    }
    let Answer::Decision(d) = h.run(Command::Reserve(&ask(&h, "r3"))) else {
        panic!("no decision");
    };
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(d.model.as_deref(), Some("other"));
    assert_eq!(d.skipped[0].reason, SkipReason::Quota);
    assert!(
        d.skipped[0].detail.contains("quota:acme-prod:requests"),
        "{d:?}"
    );

    // Only `m`: denied with reason quota. Another account is not under this quota.
    let d = h.reserve("r4", prod.clone(), "m", 100, 100);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "quota");
    let d = h.reserve("r5", labels(&[("account", "dev")]), "m", 100, 100);
    assert_eq!(d.decision, Decision::Allow);

    // The tokens per minute bind too, and a minute later both limits have freed up.
    h.commit("r1", "c1", usage(10, 10));
    h.commit("r2", "c2", usage(10, 10));
    h.now += 61 * SEC;
    let d = h.reserve("r6", prod.clone(), "m", 400, 200);
    assert_eq!(d.decision, Decision::Deny, "600 tokens > 500 per minute");
    assert_eq!(d.reason.budget.as_deref(), Some("quota:acme-prod:tokens"));
    let d = h.reserve("r7", prod, "m", 100, 100);
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(h.refold(), h.ledger);
}

// ---- observations (SPEC §10 `observe`) ----

/// `acme-prod` with no known limits: only what the provider says binds.
const OBSERVED: &str = r#"
[[quota]]
id = "acme-prod"
provider = "acme"
match = { account = "prod" }
"#;

fn policy_observed() -> ResolvedPolicy {
    observed_policy(OBSERVED)
}

/// A policy of `text` on the test prices, with `other` served by another provider.
fn observed_policy(text: &str) -> ResolvedPolicy {
    let mut p = parse_policy(text, "bursar.toml", &no_import)
        .unwrap()
        .resolved;
    let mut table = prices();
    let mut other: ModelPrice = table.models["m"].clone();
    other.provider = "elsewhere".into();
    table.models.insert("other".into(), other);
    p.pricing = table;
    p
}

fn at(h: &Harness, secs: i64) -> String {
    bursar_core::time::format_ts(h.now + secs * SEC)
}

fn observe_req(provider: &str, account: &str) -> ObserveRequest {
    ObserveRequest {
        provider: provider.into(),
        labels: labels(&[("account", account)]),
        quota: None,
        headers: None,
    }
}

fn observe(h: &mut Harness, req: &ObserveRequest) -> ObserveAnswer {
    match h.run(Command::Observe(req)) {
        Answer::Observe(a) => a,
        other => panic!("observe answered {other:?}"),
    }
}

fn requests_left(h: &mut Harness, remaining: u64, reset_in: i64) -> ObserveAnswer {
    let mut req = observe_req("acme", "prod");
    req.quota = Some(ObservedQuota {
        requests: Some(ObservedWindow {
            limit: Some(100),
            remaining,
            reset_at: at(h, reset_in),
        }),
        ..ObservedQuota::default()
    });
    observe(h, &req)
}

fn headers(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn an_observation_binds_until_its_reset_less_what_was_used_and_held_since() {
    let mut h = Harness::new(policy_observed());
    let prod = labels(&[("account", "prod")]);
    let a = requests_left(&mut h, 2, 30);
    assert_eq!(a.quotas, ["acme-prod"]);
    assert_eq!(h.kinds().last(), Some(&"quota_observed"));

    // Two calls fit in the two requests left; the holds count, so a third does not.
    assert_eq!(
        h.reserve("r1", prod.clone(), "m", 10, 10).decision,
        Decision::Allow
    );
    assert_eq!(
        h.reserve("r2", prod.clone(), "m", 10, 10).decision,
        Decision::Allow
    );
    let d = h.reserve("r3", prod.clone(), "m", 10, 10);
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.reason.code, "quota");
    assert!(d.reason.message.contains("acme-prod"), "{d:?}");

    // With a fallback, the candidate is skipped with reason quota and the next one is taken.
    let mut r = h.reserve_req("r4", prod.clone(), "m", 10, 10);
    r.model = None;
    r.candidates = Some(vec!["m".into(), "other".into()]);
    let Answer::Decision(d) = h.run(Command::Reserve(&r)) else {
        panic!("no decision")
    };
    assert_eq!(d.model.as_deref(), Some("other"));
    assert_eq!(d.skipped[0].reason, SkipReason::Quota);
    assert!(d.skipped[0].detail.contains("acme-prod"), "{d:?}");

    // A commit turns a hold into usage recorded since: still nothing left. Another account is
    // not under this quota.
    h.commit("r1", "c1", usage(10, 10));
    assert_eq!(
        h.reserve("r5", prod.clone(), "m", 10, 10).decision,
        Decision::Deny
    );
    let dev = labels(&[("account", "dev")]);
    assert_eq!(h.reserve("r6", dev, "m", 10, 10).decision, Decision::Allow);

    // Past its reset the observation no longer binds.
    h.now += 31 * SEC;
    assert_eq!(
        h.reserve("r7", prod.clone(), "m", 10, 10).decision,
        Decision::Allow
    );
    // A new observation replaces the old one: what was used before it is not counted again.
    requests_left(&mut h, 1, 30);
    h.commit("r2", "c2", usage(10, 10));
    assert_eq!(h.reserve("r8", prod, "m", 10, 10).decision, Decision::Deny);
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn openai_headers_are_read_and_each_malformed_one_is_reported_not_fatal() {
    let mut h = Harness::new(policy_observed());
    let mut req = observe_req("acme", "prod");
    req.headers = Some(headers(&[
        ("X-RateLimit-Limit-Requests", "60"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-limit-tokens", "150000"),
        ("x-ratelimit-remaining-tokens", "lots"),
        ("x-ratelimit-reset-tokens", "6m0s"),
        ("content-type", "application/json"),
    ]));
    let a = observe(&mut h, &req);
    assert_eq!(a.quotas, ["acme-prod"]);
    let r = a.observed.requests.as_ref().unwrap();
    assert_eq!((r.limit, r.remaining), (Some(60), 0));
    // `1s` after the response arrived: the observation's own time.
    let observed_at = h
        .log
        .iter()
        .find(|e| e.body.kind() == "quota_observed")
        .unwrap()
        .ts;
    assert_eq!(r.reset_at, bursar_core::time::format_ts(observed_at + SEC));
    // The tokens window has no readable `remaining`: it does not bind, and the header is named.
    assert!(a.observed.tokens.is_none(), "{a:?}");
    assert_eq!(a.ignored.len(), 1, "{a:?}");
    assert_eq!(a.ignored[0].header, "x-ratelimit-remaining-tokens");
    assert_eq!(a.ignored[0].value, "lots");
    // Nothing left of the requests: quota_exhausted right away, and reserve is refused.
    assert_eq!(
        h.kinds()[h.kinds().len() - 2..],
        ["quota_observed", "quota_exhausted"]
    );
    let prod = labels(&[("account", "prod")]);
    assert_eq!(
        h.reserve("r1", prod.clone(), "m", 1, 1).reason.code,
        "quota"
    );
    h.now += 2 * SEC;
    assert_eq!(h.reserve("r2", prod, "m", 1, 1).decision, Decision::Allow);
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn anthropic_token_limits_bind_a_call_whose_worst_case_does_not_fit() {
    let mut h = Harness::new(policy_observed());
    let mut req = observe_req("acme", "prod");
    req.headers = Some(headers(&[
        ("anthropic-ratelimit-requests-remaining", "50"),
        ("anthropic-ratelimit-requests-reset", &at(&h, 60)),
        ("anthropic-ratelimit-input-tokens-limit", "40000"),
        ("anthropic-ratelimit-input-tokens-remaining", "500"),
        ("anthropic-ratelimit-input-tokens-reset", &at(&h, 20)),
        ("anthropic-ratelimit-output-tokens-reset", "yesterday"),
    ]));
    let a = observe(&mut h, &req);
    assert_eq!(a.observed.input_tokens.as_ref().unwrap().remaining, 500);
    assert_eq!(
        a.ignored[0].header,
        "anthropic-ratelimit-output-tokens-reset"
    );
    let prod = labels(&[("account", "prod")]);
    let d = h.reserve("r1", prod.clone(), "m", 600, 10);
    assert_eq!(d.decision, Decision::Deny, "600 input tokens > 500 left");
    assert!(d.reason.message.contains("input_tokens"), "{d:?}");
    assert_eq!(
        h.reserve("r2", prod, "m", 400, 10).decision,
        Decision::Allow
    );
}

#[test]
fn usage_recorded_since_an_observation_exhausts_it_once() {
    let mut h = Harness::new(policy_observed());
    let prod = labels(&[("account", "prod")]);
    requests_left(&mut h, 2, 30);
    h.record("e1", prod.clone(), "m", usage(1, 1));
    assert!(!h.kinds().contains(&"quota_exhausted"));
    h.record("e2", prod.clone(), "m", usage(1, 1));
    h.record("e3", prod, "m", usage(1, 1));
    let exhausted: Vec<_> = h
        .log
        .iter()
        .filter_map(|e| match &e.body {
            bursar_schemas::event::EventBody::QuotaExhausted(q) => Some(q.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(exhausted.len(), 1, "once per observation and limit");
    assert_eq!(exhausted[0].quota, "acme-prod");
    assert_eq!(exhausted[0].limit, "requests");
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn a_commit_brings_the_responses_headers_and_observes_the_quota_of_its_call() {
    let mut h = Harness::new(policy_observed());
    let prod = labels(&[("account", "prod")]);
    h.reserve("r1", prod.clone(), "m", 10, 10);
    let c = CommitRequest {
        reservation_id: "r1".into(),
        event_id: "c1".into(),
        usage: usage(10, 10),
        labels: None,
        model: None,
        occurred_at: None,
        reported_cost_usd: None,
        headers: Some(headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "20ms"),
        ])),
    };
    let a = usage_answer(h.run(Command::Commit(&c)));
    assert!(!a.duplicate);
    let n = h.kinds().len();
    assert_eq!(
        h.kinds()[n - 3..],
        ["usage_recorded", "quota_observed", "quota_exhausted"]
    );
    let Some(bursar_schemas::event::EventBody::QuotaObserved(q)) = h
        .log
        .iter()
        .map(|e| &e.body)
        .find(|b| b.kind() == "quota_observed")
    else {
        panic!("no observation");
    };
    assert_eq!(q.event_id.as_deref(), Some("c1"));
    assert_eq!(q.provider, "acme");
    assert_eq!(
        h.reserve("r2", prod.clone(), "m", 1, 1).reason.code,
        "quota"
    );
    // A resent commit is a duplicate and observes nothing again.
    let again = usage_answer(h.run(Command::Commit(&c)));
    assert!(again.duplicate);
    assert_eq!(h.kinds().len(), n + 1, "only r2's denial was appended");
    // Headers of a call no quota governs are left alone.
    let r = RecordRequest {
        event_id: "e9".into(),
        labels: labels(&[("account", "dev")]),
        model: "m".into(),
        usage: usage(1, 1),
        occurred_at: None,
        reported_cost_usd: None,
        headers: c.headers.clone(),
    };
    usage_answer(h.run(Command::Record(&r)));
    assert_eq!(h.kinds().last(), Some(&"usage_recorded"));
    assert_eq!(h.refold(), h.ledger);
}

#[test]
fn observe_mistakes_are_errors_naming_the_field() {
    let mut h = Harness::new(policy_observed());
    let e = error(h.run(Command::Observe(&observe_req("acme", "prod"))));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::BadRequest, Some("quota"))
    );

    let mut both = observe_req("acme", "prod");
    both.quota = Some(ObservedQuota::default());
    both.headers = Some(headers(&[]));
    let e = error(h.run(Command::Observe(&both)));
    assert_eq!(e.field.as_deref(), Some("headers"));

    // Each normalised limit's mistake names its field; a reset years ahead would bind the
    // quota for good: refused (and ignored when headers say it, below).
    let w = |limit: Option<u64>, remaining: u64, reset_at: String| ObservedWindow {
        limit,
        remaining,
        reset_at,
    };
    for (quota, field) in [
        (
            ObservedQuota {
                tokens: Some(w(None, 1, "soon".into())),
                ..ObservedQuota::default()
            },
            "quota.tokens.reset_at",
        ),
        (
            ObservedQuota {
                requests: Some(w(Some(5), 6, at(&h, 1))),
                ..ObservedQuota::default()
            },
            "quota.requests.remaining",
        ),
        (
            ObservedQuota {
                requests: Some(w(None, 0, "2099-01-01T00:00:00Z".into())),
                ..ObservedQuota::default()
            },
            "quota.requests.reset_at",
        ),
    ] {
        let mut req = observe_req("acme", "prod");
        req.quota = Some(quota);
        let e = error(h.run(Command::Observe(&req)));
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
    }
    let mut far = observe_req("acme", "prod");
    far.headers = Some(headers(&[
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", "2099-01-01T00:00:00Z"),
    ]));
    let a = observe(&mut h, &far);
    assert!(a.observed.requests.is_none(), "{a:?}");
    assert_eq!(a.ignored[0].header, "requests reset", "{a:?}");
    assert!(a.quotas.is_empty());

    let mut nobody = observe_req("nobody", "prod");
    nobody.quota = Some(ObservedQuota::default());
    let e = error(h.run(Command::Observe(&nobody)));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("provider"))
    );

    // Headers that say nothing about rate limits: an answer, nothing appended.
    let before = h.log.len();
    let mut quiet = observe_req("acme", "prod");
    quiet.headers = Some(headers(&[("content-type", "text/plain")]));
    let a = observe(&mut h, &quiet);
    assert!(a.quotas.is_empty() && a.seq.is_none(), "{a:?}");
    assert_eq!(h.log.len(), before);
}

#[test]
fn a_policy_change_counts_live_holds_in_the_quotas_that_govern_them_now() {
    let mut h = Harness::new(policy_observed());
    let prod = labels(&[("account", "prod")]);
    requests_left(&mut h, 2, 60);
    h.reserve("r1", prod.clone(), "m", 10, 10);
    // The same policy again (a reload): the hold still counts, once.
    h.apply_policy(policy_observed());
    assert_eq!(h.ledger.quota_held("acme-prod").0[0], 1);
    assert_eq!(
        h.reserve("r2", prod.clone(), "m", 10, 10).decision,
        Decision::Allow
    );
    assert_eq!(h.reserve("r3", prod, "m", 10, 10).decision, Decision::Deny);
    assert_eq!(h.refold(), h.ledger);
    // A ledger read back from a snapshot's form counts them the same.
    let copy: bursar_core::ledger::Ledger = bincode::serde::decode_from_slice(
        &bincode::serde::encode_to_vec(&h.ledger, bincode::config::standard()).unwrap(),
        bincode::config::standard(),
    )
    .unwrap()
    .0;
    assert_eq!(copy.quota_held("acme-prod").0[0], 2);
}

#[test]
fn a_hold_past_its_expiry_no_longer_counts_in_a_quota_for_reads_before_the_reaper_ends_it() {
    let two = format!("{OBSERVED}\n[[quota]]\nid = \"acme-dev\"\nprovider = \"acme\"\nmatch = {{ account = \"dev\" }}\n");
    let mut h = Harness::new(observed_policy(&two));
    let (prod, dev) = (
        labels(&[("account", "prod")]),
        labels(&[("account", "dev")]),
    );
    let window = |remaining| {
        Some(ObservedWindow {
            limit: Some(100),
            remaining,
            reset_at: at(&h, 300),
        })
    };
    let (two_requests, one_request) = (window(2), window(1));
    let tokens = window(100);
    for (account, requests) in [("prod", two_requests), ("dev", one_request)] {
        let mut req = observe_req("acme", account);
        req.quota = Some(ObservedQuota {
            requests,
            tokens: tokens.clone(),
            ..ObservedQuota::default()
        });
        observe(&mut h, &req);
    }
    // Prod: one hold that expires in 5 s and one that lives on; dev: one that lives on.
    for (id, l, ttl) in [("r1", &prod, 5), ("r2", &prod, 600), ("r3", &dev, 600)] {
        let mut r = h.reserve_req(id, l.clone(), "m", 10, 10);
        r.ttl_seconds = Some(ttl);
        let Answer::Decision(d) = h.run(Command::Reserve(&r)) else {
            panic!("no decision")
        };
        assert_eq!(d.decision, Decision::Allow, "{id}");
    }
    let decision =
        |h: &Harness, l: &Labels| match h.ledger.check(&h.check_req(l.clone(), "m", 10, 10), h.now)
        {
            Answer::Decision(d) => (d.decision, d.reason.code),
            other => panic!("check answered {other:?}"),
        };
    // Each quota's (requests, tokens) remaining, as `status` shows them.
    let remaining = |h: &Harness| {
        let status = h.ledger.status(&StatusRequest::default(), h.now).unwrap();
        status
            .quotas
            .iter()
            .map(|q| {
                let left = |name: &str| {
                    q.limits
                        .iter()
                        .find(|l| l.limit == name)
                        .map(|l| l.remaining)
                };
                (q.id.clone(), left("requests"), left("tokens"))
            })
            .collect::<Vec<_>>()
    };
    let deny = (Decision::Deny, "quota".to_string());
    let allow = (Decision::Allow, "ok".to_string());
    // While the holds live, both quotas are used up (each hold takes a request and 20 tokens).
    assert_eq!(decision(&h, &prod), deny);
    assert_eq!(decision(&h, &dev), deny);
    assert_eq!(
        remaining(&h),
        [
            ("acme-prod".into(), Some(0), Some(60)),
            ("acme-dev".into(), Some(0), Some(80))
        ]
    );

    // Past r1's expiry, before the reaper's `reservation_expired` is folded: reads leave r1
    // out of the quota that governs it, and only r1; r2 and r3 still count.
    h.now += 6 * SEC;
    assert_eq!(h.ledger.quota_held("acme-prod").0[0], 2, "not reaped yet");
    assert_eq!(decision(&h, &prod).0, allow.0);
    assert_eq!(decision(&h, &dev), deny);
    assert_eq!(
        remaining(&h),
        [
            ("acme-prod".into(), Some(1), Some(80)),
            ("acme-dev".into(), Some(0), Some(80))
        ]
    );
    // A reserve, which reaps first, sees the same.
    assert_eq!(
        h.reserve("r4", prod.clone(), "m", 10, 10).decision,
        Decision::Allow
    );
    assert!(h.kinds().contains(&"reservation_expired"));
    assert_eq!(h.reserve("r5", dev, "m", 10, 10).decision, Decision::Deny);
    assert_eq!(h.refold(), h.ledger);
}
