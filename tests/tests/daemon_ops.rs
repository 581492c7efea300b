//! Every op end to end against a real `bursard`: answers, pipelining, `req` echo, streaming.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{record, reserve, Daemon};
use serde_json::{json, Value};

const POLICY: &str = r#"
[daemon]
reservation_ttl_seconds = 60

[[budget]]
id = "team-daily"
match = { org = "acme" }
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 0.05
warn_at = 0.8

[[budget]]
id = "gpu"
match = { model = "ollama/llama3.1" }
max_concurrent = 2
"#;

fn acme(team: &str) -> Value {
    json!({"org":"acme","team":team})
}

#[test]
fn hello_answers_with_server_protocol_and_policy_version() {
    let d = Daemon::start();
    let a = d
        .client()
        .call(json!({"op":"hello","client":"test/1","req":"h1"}));
    assert_eq!(a["ok"], true);
    assert_eq!(a["protocol"], 1);
    assert_eq!(a["policy_version"], 1);
    assert_eq!(a["req"], "h1");
    assert!(a["server"].as_str().unwrap().starts_with("bursard "));
}

#[test]
fn record_prices_real_models_and_reports_every_budget() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    let a = c.call(record("e-1", acme("search"), "gpt-4o", 1200, 300));
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["cost_micros"], 6000);
    assert_eq!(a["duplicate"], false);
    assert_eq!(a["state"], "ok");
    let b = &a["budgets"][0];
    assert_eq!(b["budget"], "team-daily");
    assert_eq!(b["key"], "team=search");
    assert_eq!(b["limit_micros"], 50_000);
    assert_eq!(b["spent_micros"], 6000);
    assert_eq!(b["remaining_micros"], 44_000);
    assert!(b["window_end"].as_str().unwrap().ends_with("T00:00:00Z"));
    // An event that matches no budget is still recorded.
    let a = c.call(record("e-2", json!({"org":"other"}), "gpt-4o", 1, 1));
    assert_eq!(a["budgets"], json!([]));
    assert_eq!(a["state"], "ok");
    assert_eq!(a["seq"].as_u64().unwrap(), 3);
}

#[test]
fn reserve_commit_release_extend_check_status_end_to_end() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    // gpt-4o worst case: 1200 × 2.50 + 800 × 10.00 per Mtok = 11,000 micros.
    let r = c.call(reserve("r-7", acme("search"), "gpt-4o", 1200, 800));
    assert_eq!(r["decision"], "allow", "{r}");
    assert_eq!(r["hold_micros"], 11_000);
    assert!(r["expires_at"].is_string());
    assert_eq!(r["budgets"][0]["held_micros"], 11_000);
    let chk = c.call(json!({"op":"check","labels":acme("search"),"model":"gpt-4o","estimate":{"input_tokens":1200,"max_output_tokens":800}}));
    assert_eq!(chk["decision"], "allow");
    assert!(chk.get("seq").is_none(), "check appends nothing");
    let e = c.call(json!({"op":"extend","reservation_id":"r-7","ttl_seconds":300}));
    assert_eq!(e["ok"], true, "{e}");
    assert!(e["expires_at"].is_string());
    let cm = c.call(json!({"op":"commit","reservation_id":"r-7","event_id":"e-2","usage":{"input_tokens":1000,"output_tokens":100}}));
    assert_eq!(cm["ok"], true, "{cm}");
    assert_eq!(cm["cost_micros"], 3500);
    assert_eq!(cm["budgets"][0]["held_micros"], 0);
    let r2 = c.call(reserve("r-8", acme("search"), "gpt-4o", 100, 100));
    let rel = c.call(json!({"op":"release","reservation_id":"r-8"}));
    assert_eq!(rel["ok"], true, "{rel}");
    assert!(rel["seq"].as_u64().unwrap() > r2["seq"].as_u64().unwrap());
    let rel_again = c.call(json!({"op":"release","reservation_id":"r-8"}));
    assert_eq!(rel_again["duplicate"], true, "{rel_again}");
    let nf = c.call(json!({"op":"release","reservation_id":"nope"}));
    assert_eq!(nf["error"]["code"], "not_found");
    let st = c.call(json!({"op":"status","budget":"team-daily","labels":{"team":"search"}}));
    assert_eq!(st["budgets"].as_array().unwrap().len(), 1);
    assert_eq!(st["budgets"][0]["spent_micros"], 3500);
    assert_eq!(st["budgets"][0]["held_micros"], 0);
}

#[test]
fn budget_warns_then_denies_and_the_denial_is_logged() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    // 50,000 µUSD limit; warn at 80 % = 40,000.
    let a = c.call(record("e-1", acme("a"), "gpt-4o", 16_000, 0)); // 40,000
    assert_eq!(a["state"], "warn");
    let r = c.call(reserve("r-1", acme("a"), "gpt-4o", 4000, 0)); // 10,000 → exactly 50,000
    assert_eq!(r["decision"], "warn", "{r}");
    let r = c.call(reserve("r-2", acme("a"), "gpt-4o", 1, 0));
    assert_eq!(r["decision"], "deny", "{r}");
    assert_eq!(r["reason"]["code"], "budget");
    assert_eq!(r["reason"]["budget"], "team-daily");
    assert_eq!(r["reason"]["key"], "team=a");
    assert!(
        r["seq"].as_u64().is_some(),
        "a denial appends reservation_denied"
    );
    // Other teams are independent.
    assert_eq!(
        c.call(reserve("r-3", acme("b"), "gpt-4o", 1, 0))["decision"],
        "allow"
    );
    c.send(&json!({"op":"export"}));
    let (events, _) = c.read_stream();
    let kinds: Vec<_> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "policy_applied",
        "usage_recorded",
        "budget_warned",
        "reservation_created",
        "budget_exhausted",
        "reservation_denied",
    ] {
        assert!(kinds.iter().any(|x| x == k), "missing {k} in {kinds:?}");
    }
}

#[test]
fn max_concurrent_caps_live_holds_of_a_local_model() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    let l = json!({});
    assert_eq!(
        c.call(reserve("g1", l.clone(), "ollama/llama3.1", 10, 10))["decision"],
        "allow"
    );
    assert_eq!(
        c.call(reserve("g2", l.clone(), "ollama/llama3.1", 10, 10))["decision"],
        "allow"
    );
    let third = c.call(reserve("g3", l.clone(), "ollama/llama3.1", 10, 10));
    assert_eq!(third["decision"], "deny", "{third}");
    c.call(json!({"op":"release","reservation_id":"g1"}));
    assert_eq!(
        c.call(reserve("g4", l, "ollama/llama3.1", 10, 10))["decision"],
        "allow"
    );
}

#[test]
fn budget_lines_say_what_remains_of_every_limit_without_a_spend_limit_too() {
    let d = Daemon::start_with_config(
        r#"
[[budget]]
id = "tokens"
max_tokens = 10000

[[budget]]
id = "calls"
max_requests = 3
max_concurrent = 2
"#,
    );
    let mut c = d.client();
    let line = |a: &Value, id: &str| -> Value {
        a["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["budget"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} line in {a}"))
    };
    let a = c.call(record("e-1", json!({}), "gpt-4o", 1200, 300));
    let tokens = line(&a, "tokens");
    assert_eq!(tokens["remaining_tokens"], 8500, "{a}");
    assert!(
        tokens.get("remaining_micros").is_none(),
        "no spend limit: {a}"
    );
    let calls = line(&a, "calls");
    assert_eq!(calls["remaining_requests"], 2, "{a}");
    assert_eq!(calls["remaining_concurrent"], 2, "{a}");
    assert!(
        calls.get("remaining_tokens").is_none(),
        "no token limit: {a}"
    );

    // A hold of 1000 in + 500 out takes its tokens, a request and a slot.
    let r = c.call(reserve("r-1", json!({}), "gpt-4o", 1000, 500));
    assert_eq!(r["decision"], "allow", "{r}");
    assert_eq!(line(&r, "tokens")["remaining_tokens"], 7000, "{r}");
    assert_eq!(line(&r, "calls")["remaining_requests"], 1, "{r}");
    assert_eq!(line(&r, "calls")["remaining_concurrent"], 1, "{r}");
    let chk = c.call(json!({"op":"check","model":"gpt-4o","estimate":{"input_tokens":100,"max_output_tokens":0}}));
    assert_eq!(
        line(&chk, "tokens")["remaining_tokens"],
        6900,
        "as it would be: {chk}"
    );
    assert_eq!(line(&chk, "calls")["remaining_concurrent"], 0, "{chk}");
    let st = c.call(json!({"op":"status"}));
    assert_eq!(line(&st, "tokens")["remaining_tokens"], 7000, "{st}");
    assert_eq!(line(&st, "calls")["remaining_requests"], 1, "{st}");
    assert_eq!(line(&st, "calls")["remaining_concurrent"], 1, "{st}");
}

#[test]
fn status_says_how_many_buckets_matched_and_refuses_an_unknown_budget() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    for (n, team) in ["a", "b", "c"].into_iter().enumerate() {
        let input = 1000 * (n as u64 + 1);
        let a = c.call(record(&format!("e-{n}"), acme(team), "gpt-4o", input, 0));
        assert_eq!(a["ok"], true, "{a}");
    }
    let top = c.call(json!({"op":"status","limit":2}));
    let keys: Vec<&str> = top["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["team=c", "team=b"], "most utilized first: {top}");
    assert_eq!(top["total"], 3, "{top}");
    assert_eq!(top["truncated"], true, "{top}");
    let all = c.call(json!({"op":"status"}));
    assert_eq!(
        (&all["total"], &all["truncated"]),
        (&json!(3), &json!(false))
    );

    // `org` is pinned to acme by team-daily's `match`: every team's bucket carries it.
    let acme_only = c.call(json!({"op":"status","labels":{"org":"acme"}}));
    assert_eq!(acme_only["total"], 3, "{acme_only}");
    let other = c.call(json!({"op":"status","labels":{"org":"globex"}}));
    assert_eq!(other["total"], 0, "{other}");

    let nf = c.call(json!({"op":"status","budget":"team-dialy","req":"s-1"}));
    assert_eq!(nf["ok"], false, "{nf}");
    assert_eq!(nf["error"]["code"], "not_found", "{nf}");
    assert_eq!(nf["error"]["field"], "budget", "{nf}");
    assert_eq!(nf["req"], "s-1", "{nf}");
}

#[test]
fn pipelined_requests_are_answered_in_order_with_req_echoed() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    let n = 500;
    for i in 0..n {
        let mut r = record(&format!("e-{i}"), acme("p"), "gpt-4o-mini", 10, 10);
        r["req"] = json!(i);
        c.send(&r);
        if i % 50 == 0 {
            c.send(&json!({"op":"status","req":{"status_after":i}}));
        }
    }
    let mut last_seq = 0;
    for i in 0..n {
        let a = c.recv();
        assert_eq!(a["req"], i, "answers come in request order");
        let seq = a["seq"].as_u64().unwrap();
        assert!(seq > last_seq);
        last_seq = seq;
        if i % 50 == 0 {
            let s = c.recv();
            assert_eq!(s["req"]["status_after"], i);
            // A read sees exactly this connection's earlier writes, none of the later ones
            // pipelined behind it (SPEC §5, read consistency).
            let spent = s["budgets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["budget"] == "team-daily")
                .unwrap()["spent_requests"]
                .as_u64()
                .unwrap();
            assert_eq!(spent, i as u64 + 1, "status after record {i}");
        }
    }
}

/// SPEC §5: `record A; status; check; record B` sent in one write: `status` counts A and not B,
/// and `check` is decided without B (which would deny it).
#[test]
fn a_pipelined_read_sees_the_writes_before_it_and_none_after_it() {
    let d = Daemon::start_with_config(
        r#"
[[budget]]
id = "two-calls"
group_by = ["team"]
max_requests = 2
"#,
    );
    for round in 0..20 {
        let team = json!({"team": format!("t{round}")});
        let mut c = d.client();
        let mut batch = Vec::new();
        for v in [
            record(&format!("a-{round}"), team.clone(), "gpt-4o-mini", 10, 10),
            json!({"op":"status","labels":team}),
            json!({"op":"check","labels":team,"model":"gpt-4o-mini",
                   "estimate":{"input_tokens":10,"max_output_tokens":10}}),
            record(&format!("b-{round}"), team.clone(), "gpt-4o-mini", 10, 10),
        ] {
            batch.extend_from_slice(v.to_string().as_bytes());
            batch.push(b'\n');
        }
        c.send_raw(&batch);
        assert_eq!(c.recv()["ok"], true);
        let status = c.recv();
        assert_eq!(
            status["budgets"][0]["spent_requests"], 1,
            "round {round}: status counts A only: {status}"
        );
        let check = c.recv();
        assert_eq!(
            check["decision"], "allow",
            "round {round}: check decided without B: {check}"
        );
        assert_eq!(c.recv()["state"], "exhausted", "B brings it to its limit");
    }
}

#[test]
fn export_streams_exactly_the_events_written_and_filters() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    for i in 0..30 {
        let team = if i % 3 == 0 { "x" } else { "y" };
        c.call(record(
            &format!("e-{i}"),
            acme(team),
            "gpt-4o-mini",
            100,
            10,
        ));
    }
    let head = c.call(json!({"op":"verify"}));
    let total = head["events"].as_u64().unwrap();
    c.send(&json!({"op":"export","req":"ex"}));
    let (events, end) = c.read_stream();
    assert_eq!(end["end"], true);
    assert_eq!(end["req"], "ex");
    assert_eq!(end["count"].as_u64().unwrap(), total);
    assert_eq!(events.len() as u64, total);
    let usage: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "usage_recorded")
        .collect();
    assert_eq!(usage.len(), 30);
    assert!(usage
        .iter()
        .all(|e| e["cost_micros"].as_i64().unwrap() > 0 && e["price_version"] == 1));
    for w in events.windows(2) {
        assert_eq!(
            w[1]["prev_hash"], w[0]["hash"],
            "the chain is visible in the export"
        );
    }
    c.send(&json!({"op":"export","labels":{"team":"x"}}));
    let (events, end) = c.read_stream();
    assert_eq!(events.len(), 10);
    assert_eq!(end["count"], 10);
    c.send(&json!({"op":"export","since":"2100-01-01T00:00:00Z"}));
    let (events, _) = c.read_stream();
    assert!(events.is_empty());
    let bad = c.call(json!({"op":"export","since":"yesterday"}));
    assert_eq!(bad["error"]["field"], "since");
}

#[test]
fn tail_follow_streams_new_events_as_they_become_durable() {
    let d = Daemon::start_with_config(POLICY);
    let mut follower = d.client();
    follower.send(&json!({"op":"tail","follow":true}));
    let mut c = d.client();
    c.call(json!({"op":"hello"}));
    for i in 0..3 {
        c.call(record(&format!("t-{i}"), acme("t"), "gpt-4o", 1, 1));
    }
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let v = follower.recv();
        let ev = &v["event"];
        if ev["type"] == "usage_recorded" {
            ids.push(
                ev["body"]["usage_recorded"]["event_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    assert_eq!(ids, vec!["t-0", "t-1", "t-2"]);
    // Non-follow tail from a seq ends.
    let mut c2 = d.client();
    c2.send(&json!({"op":"tail","from_seq":1}));
    let (events, end) = c2.read_stream();
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(end["end"], true);
}

#[test]
fn replay_reprices_and_apply_is_admin_only() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    c.call(record("e-1", acme("r"), "gpt-4o", 1000, 0)); // 2,500
    let dry = c.call(json!({"op":"replay","pricing":{"models":{"gpt-4o":{"input_per_mtok":5.0,"output_per_mtok":10.0}}}}));
    assert_eq!(dry["ok"], true, "{dry}");
    assert_eq!(dry["total_delta_micros"], 2500);
    assert_eq!(dry["diff"][0]["before_micros"], 2500);
    assert_eq!(dry["diff"][0]["after_micros"], 5000);
    assert_eq!(dry["applied"], false);
    let st = c.call(json!({"op":"status","budget":"team-daily"}));
    assert_eq!(
        st["budgets"][0]["spent_micros"], 2500,
        "a dry run changes nothing"
    );
    // The test runs as the daemon's own uid, which is admin by default.
    let ap = c.call(json!({"op":"replay","pricing":{"models":{"gpt-4o":{"input_per_mtok":5.0,"output_per_mtok":10.0}}},"apply":true}));
    assert_eq!(ap["applied"], true, "{ap}");
    let st = c.call(json!({"op":"status","budget":"team-daily"}));
    assert_eq!(st["budgets"][0]["spent_micros"], 5000);
    let a = c.call(record("e-2", acme("r"), "gpt-4o", 1000, 0));
    assert_eq!(a["cost_micros"], 5000, "new events use the new prices");
    assert_eq!(c.call(json!({"op":"verify"}))["ok"], true);
}

#[test]
fn duplicates_and_conflicts_over_the_wire() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    let first = c.call(record("dup", acme("d"), "gpt-4o", 10, 10));
    let again = c.call(record("dup", acme("d"), "gpt-4o", 10, 10));
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"], first["seq"]);
    let conflict = c.call(record("dup", acme("d"), "gpt-4o", 11, 10));
    assert_eq!(conflict["error"]["code"], "conflict");
    assert_eq!(conflict["error"]["field"], "event_id");
    let st = c.call(json!({"op":"status","budget":"team-daily"}));
    assert_eq!(st["budgets"][0]["spent_requests"], 1, "counted once");
}
