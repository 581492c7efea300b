//! What-if `replay` over the socket (SPEC §11): a stricter policy's denials, exhaustions and
//! peaks, from the daemon's own log, changing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{record, reserve, Daemon};
use serde_json::{json, Value};

const IN_FORCE: &str = r#"
[[budget]]
id = "session"
match = { session = "*" }
group_by = ["session"]
window = "cumulative"
max_usd = 10
"#;

const STRICTER: &str = r#"
[[budget]]
id = "session"
match = { session = "*" }
group_by = ["session"]
window = "cumulative"
max_usd = 0.5
"#;

fn commit(rid: &str, eid: &str, input: u64, output: u64) -> Value {
    json!({"op":"commit","reservation_id":rid,"event_id":eid,
           "usage":{"input_tokens":input,"output_tokens":output}})
}

#[test]
fn a_stricter_policy_lists_the_reservations_it_would_have_denied_and_changes_nothing() {
    let d = Daemon::start_with_config(IN_FORCE);
    let mut c = d.client();
    let s1 = json!({"session": "s-1"});
    // gpt-4o: $2.50 in, $10 out per Mtok. Each reserve holds 100k in + 10k out = $0.35.
    for (rid, eid) in [("r-1", "e-1"), ("r-2", "e-2"), ("r-3", "e-3")] {
        let a = c.call(reserve(rid, s1.clone(), "gpt-4o", 100_000, 10_000));
        assert_eq!(a["decision"], "allow", "{a}");
        // Each commit spends $0.30 (100k in + 5k out).
        let a = c.call(commit(rid, eid, 100_000, 5_000));
        assert_eq!(a["ok"], true, "{a}");
    }
    let r = c.call(record("e-4", json!({"session": "s-2"}), "gpt-4o", 1_000, 0));
    assert_eq!(r["ok"], true);
    let status_before = c.call(json!({"op":"status"}));
    let verify_before = c.call(json!({"op":"verify"}));

    let w = c.call(json!({"op":"replay","policy":STRICTER,"req":7}));
    assert_eq!(w["ok"], true, "{w}");
    assert_eq!(w["req"], 7);
    assert_eq!(w["reservations"], 3);
    // Under $0.50: r-1 holds $0.35 and spends $0.30; r-2 would need $0.30 + $0.35: denied,
    // and so is r-3 ($0.30 + $0.35 again, r-2's usage being left out).
    assert_eq!(w["denied_total"], 2, "{w}");
    let denied: Vec<&str> = w["denied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reservation_id"].as_str().unwrap())
        .collect();
    assert_eq!(denied, ["r-2", "r-3"]);
    let first = &w["denied"][0];
    assert_eq!(first["budget"], "session");
    assert_eq!(first["key"], "session=s-1");
    assert_eq!(first["reason"], "budget");
    assert_eq!(first["model"], "gpt-4o");
    assert_eq!(first["hold_micros"], 350_000);
    assert_eq!(first["labels"]["session"], "s-1");
    assert!(first["seq"].as_u64().unwrap() > 1);
    assert_eq!(w["denied_hold_micros"], 700_000);
    assert_eq!(w["usage_left_out"], 2);
    assert_eq!(w["usage_left_out_micros"], 600_000);
    let peak = w["peaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["budget"] == "session")
        .unwrap();
    assert_eq!(peak["key"], "session=s-1");
    // The peak is r-1's hold: $0.35 of $0.50.
    assert_eq!(peak["utilization"], 0.7);
    assert_eq!(w["exhausted"], json!([]));

    // Nothing changed: same buckets, same log.
    assert_eq!(c.call(json!({"op":"status"})), status_before);
    assert_eq!(c.call(json!({"op":"verify"})), verify_before);

    // The CLI shows it as tables, from the daemon and offline.
    let file = d.dir.path().join("stricter.toml");
    std::fs::write(&file, STRICTER).unwrap();
    let shown = d
        .cli(&["replay", "--policy", file.to_str().unwrap()])
        .ok()
        .stdout;
    for text in [
        "WOULD HAVE DENIED: 2 reservations, holding $0.70",
        "r-2",
        "r-3",
        "session=s-1",
        "left out (the calls would not have been made): 2 events, $0.60",
        "no bucket would have been exhausted",
        "PEAK UTILIZATION",
        "70%",
        "nothing was changed",
    ] {
        assert!(shown.contains(text), "{text:?} in:\n{shown}");
    }
    let refused = d.cli(&["replay", "--policy", file.to_str().unwrap(), "--apply"]);
    assert_ne!(refused.code, Some(0), "a what-if never applies");
    let mut d = d;
    d.terminate();
    let offline = d
        .offline(&["--json", "replay", "--policy", file.to_str().unwrap()])
        .ok()
        .json();
    assert_eq!(offline["denied_total"], 2, "{offline}");
}

#[test]
fn a_what_if_is_refused_with_the_field_to_fix() {
    let d = Daemon::start_with_config(IN_FORCE);
    let mut c = d.client();
    let a = c.call(json!({"op":"replay","policy":STRICTER,"apply":true}));
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    assert_eq!(a["error"]["field"], "apply");
    let a = c.call(json!({"op":"replay","policy":STRICTER,
                          "pricing":{"models":{"gpt-4o":{"input_per_mtok":1,"output_per_mtok":1}}}}));
    assert_eq!(a["error"]["field"], "pricing", "{a}");
    let a = c.call(json!({"op":"replay","policy":"[[budget]]\nid = \"x\"\nmax_usdd = 1\n"}));
    assert_eq!(a["error"]["field"], "policy", "{a}");
    let msg = a["error"]["message"].as_str().unwrap();
    assert!(msg.contains("replay.policy:3"), "{msg}");
    assert!(msg.contains("max_usd"), "the typo's suggestion: {msg}");
    // The daemon opens no file a request names.
    let a = c.call(json!({"op":"replay","policy":"[pricing]\nimport = \"/etc/passwd\"\n"}));
    assert_eq!(a["error"]["field"], "policy", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reads no file"),
        "{a}"
    );
    // And the daemon goes on.
    assert_eq!(c.call(json!({"op":"hello"}))["ok"], true);
}
