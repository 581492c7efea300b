//! Subscriptions end to end (SPEC §10, issue 16.1): through a real daemon, a plan's calls cost
//! nothing, the export names the plan, an exhausted allowance falls back to a paid candidate,
//! and `bursar status` shows the fee.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{record, Daemon};
use serde_json::{json, Value};

const POLICY: &str = r#"
[[budget]]
id = "team"
max_usd = 5.00

[[subscription]]
id = "chat-pro"
match = { account = "chat-pro", model = "claude-sonnet-4-5" }
fee_usd = 20
fee_period = "month"

[[subscription.allowance]]
window = "rolling"
window_seconds = 18000
max_requests = 2
"#;

#[test]
fn a_subscription_carries_calls_for_free_until_its_allowance_runs_out_then_the_paid_api_takes_over()
{
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    let plan = json!({"account": "chat-pro"});

    let a = c.call(record("e1", plan.clone(), "claude-sonnet-4-5", 1000, 500));
    assert_eq!(a["ok"], json!(true), "{a}");
    assert_eq!(a["cost_micros"], json!(0), "{a}");

    // Two requests per 5 hours: the first reserve takes the plan's last one, the next falls
    // back to the paid candidate with the plan's candidate skipped for `quota`.
    let ask = |id: &str| {
        json!({"op": "reserve", "reservation_id": id, "labels": {"account": "chat-pro"},
               "candidates": ["claude-sonnet-4-5", "gpt-4o-mini"],
               "estimate": {"input_tokens": 1000, "max_output_tokens": 500}})
    };
    let r1 = c.call(ask("r1"));
    assert_eq!(r1["decision"], json!("allow"), "{r1}");
    assert_eq!(r1["model"], json!("claude-sonnet-4-5"));
    assert_eq!(r1["hold_micros"], json!(0));
    let r2 = c.call(ask("r2"));
    assert_eq!(r2["decision"], json!("allow"), "{r2}");
    assert_eq!(r2["model"], json!("gpt-4o-mini"));
    assert_eq!(r2["skipped"][0]["reason"], json!("quota"), "{r2}");
    assert!(r2["hold_micros"].as_i64().unwrap() > 0);

    // The export names the plan on the free call's event, and prices it at 0.
    c.send(&json!({"op": "export"}));
    let (events, _) = c.read_stream();
    let usage: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == json!("usage_recorded"))
        .collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        usage[0]["body"]["usage_recorded"]["labels"]["subscription"],
        json!("chat-pro"),
        "{}",
        usage[0]
    );
    assert_eq!(usage[0]["cost_micros"], json!(0));

    // status --json and the human status show the plan's fee.
    let s = d.cli_json(&["status", "--json"]);
    assert_eq!(s["subscriptions"][0]["id"], json!("chat-pro"), "{s}");
    assert_eq!(s["subscriptions"][0]["fee_micros"], json!(20_000_000));
    let human = d.cli(&["status"]).ok();
    assert!(
        human
            .stdout
            .contains("subscription chat-pro: 20.00 per month"),
        "{}",
        human.stdout
    );

    // Reports show the flat fee over their range, apart from what calls cost.
    let r = d.cli_json(&[
        "report",
        "--by",
        "subscription",
        "--every",
        "month",
        "--since",
        "1d",
        "--format",
        "json",
    ]);
    assert_eq!(r["subscriptions"][0]["id"], json!("chat-pro"), "{r}");
    assert_eq!(
        r["subscriptions"][0]["fee_micros"],
        json!(20_000_000),
        "{r}"
    );
    assert!(
        r["subscriptions"][0]["periods"].as_u64().unwrap() >= 1,
        "{r}"
    );
    let table = d
        .cli(&[
            "report",
            "--by",
            "subscription",
            "--every",
            "month",
            "--since",
            "1d",
        ])
        .ok();
    assert!(
        table
            .stdout
            .contains("subscription chat-pro: $20.00 per month × 1 = $20.00"),
        "{}",
        table.stdout
    );
}
