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
