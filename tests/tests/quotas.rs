//! Provider quotas end to end (SPEC §10 `observe`, issue 16.2): through a real daemon, what a
//! provider's headers say binds the calls of its quota until their reset, a commit can bring
//! them along, scripts see each crossing in `tail`, and a restart (a fold of the log) keeps
//! every binding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::Daemon;
use serde_json::{json, Value};

const POLICY: &str = r#"
[[budget]]
id = "team"
max_usd = 5.00

[[quota]]
id = "openai-prod"
provider = "openai"
match = { account = "prod" }
"#;

fn ask(id: &str) -> Value {
    json!({"op": "reserve", "reservation_id": id, "labels": {"account": "prod"},
           "candidates": ["gpt-4o-mini", "claude-3-5-haiku-20241022"],
           "estimate": {"input_tokens": 100, "max_output_tokens": 100}})
}

#[test]
fn a_providers_headers_bind_its_quota_until_the_reset_and_survive_a_restart() {
    let mut d = Daemon::start_with_config(POLICY);
    let mut c = d.client();

    // `bursar observe` with raw headers: the malformed one is reported, the rest recorded.
    let out = d
        .cli(&[
            "observe",
            "--provider",
            "openai",
            "--label",
            "account=prod",
            "--header",
            "x-ratelimit-limit-requests: 500",
            "--header",
            "x-ratelimit-remaining-requests: 1",
            "--header",
            "x-ratelimit-reset-requests: 1h0m0s",
            "--header",
            "x-ratelimit-remaining-tokens: plenty",
        ])
        .ok();
    assert!(
        out.stdout.contains("observed openai-prod"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("requests: 1/500 left"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ignored x-ratelimit-remaining-tokens"),
        "{}",
        out.stdout
    );

    // One request left: the first call takes it, the next falls back to another provider.
    let r1 = c.call(ask("r1"));
    assert_eq!(r1["model"], json!("gpt-4o-mini"), "{r1}");
    let r2 = c.call(ask("r2"));
    assert_eq!(r2["model"], json!("claude-3-5-haiku-20241022"), "{r2}");
    assert_eq!(r2["skipped"][0]["reason"], json!("quota"), "{r2}");

    // The commit brings the response's headers: the quota is observed again, now exhausted.
    let commit = c.call(
        json!({"op": "commit", "reservation_id": "r1", "event_id": "c1",
        "usage": {"input_tokens": 90, "output_tokens": 40},
        "headers": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1h"}}),
    );
    assert_eq!(commit["ok"], json!(true), "{commit}");

    // Scripts see each crossing as one JSON line.
    let lines = d
        .cli(&["tail", "--type", "quota_observed,quota_exhausted", "--json"])
        .ok()
        .json_lines();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "quota_observed",
            "quota_exhausted",
            "quota_observed",
            "quota_exhausted"
        ],
        "{lines:?}"
    );
    assert_eq!(
        lines[2]["body"]["quota_observed"]["event_id"],
        json!("c1"),
        "{}",
        lines[2]
    );

    // status shows what binds: nothing left of the requests until the reset.
    let s = d.cli_json(&["status", "--json"]);
    let q = &s["quotas"][0];
    assert_eq!(q["id"], json!("openai-prod"), "{s}");
    assert_eq!(q["limits"][0]["limit"], json!("requests"), "{s}");
    assert_eq!(q["limits"][0]["remaining"], json!(0), "{s}");
    let human = d.cli(&["status"]).ok().stdout;
    assert!(
        human.contains("quota openai-prod (openai): requests 0 left"),
        "{human}"
    );

    // A restart folds the log again: the observation still binds.
    d.kill9();
    d.restart_after_kill();
    let mut c = d.client();
    let only = c.call(json!({"op": "reserve", "reservation_id": "r3",
        "labels": {"account": "prod"}, "model": "gpt-4o-mini",
        "estimate": {"input_tokens": 100, "max_output_tokens": 100}}));
    assert_eq!(only["decision"], json!("deny"), "{only}");
    assert_eq!(only["reason"]["code"], json!("quota"), "{only}");

    // The normalised form, on the wire: a new observation replaces the old one.
    let in_an_hour = bursar_core::time::format_ts(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap()
            + 3_600_000_000,
    );
    let o = c.call(
        json!({"op": "observe", "provider": "openai", "labels": {"account": "prod"},
        "quota": {"requests": {"remaining": 5, "reset_at": in_an_hour}}}),
    );
    assert_eq!(o["quotas"], json!(["openai-prod"]), "{o}");
    assert!(o["seq"].as_u64().is_some(), "{o}");
    let r4 = c.call(ask("r4"));
    assert_eq!(r4["model"], json!("gpt-4o-mini"), "{r4}");

    // Mistakes are errors naming the field.
    let e = c.call(json!({"op": "observe", "provider": "nobody", "quota": {}}));
    assert_eq!(e["error"]["code"], json!("not_found"), "{e}");
    assert_eq!(e["error"]["field"], json!("provider"), "{e}");
    let e = c.call(
        json!({"op": "observe", "provider": "openai", "labels": {"account": "prod"},
        "quota": {"requests": {"remaining": -1, "reset_at": "2099-01-01T00:00:00Z"}}}),
    );
    assert_eq!(e["error"]["code"], json!("bad_request"), "{e}");
    assert_eq!(
        e["error"]["field"],
        json!("quota.requests.remaining"),
        "{e}"
    );

    let v = d.cli(&["verify"]).ok();
    assert!(
        v.stdout.contains("ok") || v.stdout.contains("verified"),
        "{}",
        v.stdout
    );
}
