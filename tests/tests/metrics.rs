//! Prometheus metrics (SPEC §12): scraped over loopback from a running daemon, checked by
//! `promtool` where it is installed (`.ci/run` installs Debian's `prometheus`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::metrics::{get, metrics_addr, sample, scrape};
use bursar_tests::{record, reserve, Daemon};
use serde_json::json;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

const POLICY: &str = r#"
[daemon]
metrics_listen = "127.0.0.1:0"
metrics_max_buckets = 2

[[budget]]
id = "session"
match = { session = "*" }
group_by = ["session"]
window = "cumulative"
max_usd = 1

[[budget]]
id = "gpu"
match = { pool = "gpu" }
max_concurrent = 1

[[quota]]
id = "openai-prod"
provider = "openai"
match = { account = "prod" }
"#;

fn promtool() -> Option<&'static str> {
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "promtool")
}

#[test]
fn a_scrape_counts_requests_decisions_and_syncs_and_shows_the_most_utilized_buckets() {
    let d = Daemon::start_with_config(POLICY);
    let addr = metrics_addr(&d);
    let mut c = d.client();
    for (i, cost_tokens) in [(1, 100_000u64), (2, 40_000), (3, 10_000)] {
        let r = c.call(record(
            &format!("e-{i}"),
            json!({"session": format!("s-{i}")}),
            "gpt-4o",
            cost_tokens,
            0,
        ));
        assert_eq!(r["ok"], true, "{r}");
    }
    // A resent record is a duplicate: an answer, not an event.
    let dup = c.call(record(
        "e-1",
        json!({"session": "s-1"}),
        "gpt-4o",
        100_000,
        0,
    ));
    assert_eq!(dup["duplicate"], true, "{dup}");
    // $1 for the session: a hold of $2.50 + output is denied by the budget.
    let denied = c.call(reserve(
        "r-1",
        json!({"session": "s-1"}),
        "gpt-4o",
        1_000_000,
        10,
    ));
    assert_eq!(denied["decision"], "deny", "{denied}");
    let bad = c.call(json!({"op": "record", "event_id": "e-9"}));
    assert_eq!(bad["ok"], false);

    let text = scrape(&addr);
    let n = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}: {text}"));
    assert_eq!(n(r#"bursar_requests_total{op="record",outcome="ok"}"#), 4.0);
    assert_eq!(
        n(r#"bursar_requests_total{op="record",outcome="bad_request"}"#),
        1.0
    );
    assert_eq!(
        n(r#"bursar_requests_total{op="reserve",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        n(r#"bursar_decisions_total{decision="deny",op="reserve",reason="budget"}"#),
        1.0
    );
    assert_eq!(
        n(r#"bursar_request_duration_seconds_count{op="record"}"#),
        5.0
    );
    // Every event the log holds went through a sync: policy_applied, 3 usages, 1 denial.
    assert_eq!(n("bursar_log_head_seq"), 5.0);
    assert_eq!(n("bursar_events_appended_total"), 5.0);
    assert_eq!(n("bursar_durable_seq"), 5.0);
    assert!(n("bursar_batch_events_count") >= 1.0);
    assert!(n("bursar_fdatasync_duration_seconds_count") >= 1.0);
    assert!(n("bursar_log_bytes") > 0.0);
    assert_eq!(n("bursar_writer_poisoned"), 0.0);
    // Three live buckets, two exported: the two most utilized ($0.25 of $1, $0.10 of $1).
    assert_eq!(n("bursar_live_buckets"), 3.0);
    assert_eq!(n("bursar_buckets_not_exported"), 1.0);
    assert_eq!(
        n(r#"bursar_bucket_spent_micros{budget="session",key="session=s-1"}"#),
        250_000.0
    );
    assert_eq!(
        n(r#"bursar_bucket_limit_micros{budget="session",key="session=s-2"}"#),
        1_000_000.0
    );
    assert_eq!(
        n(r#"bursar_bucket_utilization_ratio{budget="session",key="session=s-1"}"#),
        0.25
    );
    assert!(
        !text.contains(r#"key="session=s-3""#),
        "the least utilized bucket is left out: {text}"
    );

    // The check's decision is counted under its own op.
    let ok = c.call(
        json!({"op": "check", "labels": {"session": "s-3"}, "model": "gpt-4o",
                           "estimate": {"input_tokens": 10, "max_output_tokens": 10}}),
    );
    assert_eq!(ok["decision"], "allow", "{ok}");
    let text = scrape(&addr);
    assert_eq!(
        sample(
            &text,
            r#"bursar_decisions_total{decision="allow",op="check",reason="ok"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

/// A request whose client hangs up before its answer is counted under outcome `hung_up` (a
/// `reserve` waiting in line); a `tail --follow` ends so, and counts as `ok`.
#[test]
fn requests_whose_client_hung_up_are_counted_as_hung_up() {
    let d = Daemon::start_with_config(POLICY);
    let addr = metrics_addr(&d);
    let mut c = d.client();
    let held = c.call(reserve("r-1", json!({"pool": "gpu"}), "gpt-4o", 10, 10));
    assert_eq!(held["decision"], "allow", "{held}");
    {
        let mut waiter = d.client();
        let mut waiting = reserve("r-2", json!({"pool": "gpu"}), "gpt-4o", 10, 10);
        waiting["wait_ms"] = json!(60_000);
        waiter.send(&waiting);
        let mut follower = d.client();
        follower.send(&json!({"op": "tail", "follow": true, "types": ["budget_exhausted"]}));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            waiter.poll_recv().is_none(),
            "the reserve waits for the slot"
        );
    } // Both hang up.
    let every = std::time::Duration::from_millis(100);
    let text = bursar_tests::eventually(std::time::Duration::from_secs(10), every, || {
        let text = scrape(&addr);
        let reserve = sample(
            &text,
            r#"bursar_requests_total{op="reserve",outcome="hung_up"}"#,
        );
        let tail = sample(&text, r#"bursar_requests_total{op="tail",outcome="ok"}"#);
        if reserve == Some(1.0) && tail == Some(1.0) {
            Ok(text)
        } else {
            Err(format!(
                "reserve {reserve:?}, tail {tail:?} hung up: {text}"
            ))
        }
    });
    let n = |series: &str| sample(&text, series);
    // Only the first reserve was answered.
    assert_eq!(
        n(r#"bursar_requests_total{op="reserve",outcome="ok"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        n(r#"bursar_requests_total{op="tail",outcome="hung_up"}"#),
        None,
        "{text}"
    );
}

/// SPEC §12's "spent, held and limit per bucket" for every unit a budget limits: a live
/// reservation holds one request of a request limit and one slot of a concurrency limit, and
/// gives both back when it commits.
#[test]
fn a_scrape_shows_the_requests_and_slots_live_reservations_hold() {
    let d = Daemon::start_with_config(
        r#"
[daemon]
metrics_listen = "127.0.0.1:0"

[[budget]]
id = "gpu"
match = { pool = "gpu" }
max_concurrent = 2

[[budget]]
id = "team-requests"
group_by = ["team"]
max_requests = 10
"#,
    );
    let addr = metrics_addr(&d);
    let mut c = d.client();
    let labels = json!({"pool": "gpu", "team": "a"});
    let r = c.call(reserve("r-1", labels.clone(), "gpt-4o", 10, 10));
    assert_eq!(r["decision"], "allow", "{r}");
    let gpu_key = r["budgets"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["budget"] == "gpu"))
        .map(|b| b["key"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no gpu line in {r}"));
    let gpu = |name: &str| format!(r#"bursar_bucket_{name}{{budget="gpu",key="{gpu_key}"}}"#);
    let team =
        |name: &str| format!(r#"bursar_bucket_{name}{{budget="team-requests",key="team=a"}}"#);
    let text = scrape(&addr);
    let n = |series: String| sample(&text, &series).unwrap_or_else(|| panic!("{series}: {text}"));
    assert_eq!(n(gpu("held_concurrent")), 1.0);
    assert_eq!(n(gpu("limit_concurrent")), 2.0);
    assert_eq!(n(team("held_requests")), 1.0);
    assert_eq!(n(team("spent_requests")), 0.0);
    assert_eq!(n(team("limit_requests")), 10.0);

    let commit = json!({"op": "commit", "reservation_id": "r-1", "event_id": "e-1",
                        "usage": {"input_tokens": 10, "output_tokens": 5}});
    assert_eq!(c.call(commit)["ok"], true);
    let text = scrape(&addr);
    let n = |series: String| sample(&text, &series).unwrap_or_else(|| panic!("{series}: {text}"));
    assert_eq!(n(gpu("held_concurrent")), 0.0);
    assert_eq!(n(team("held_requests")), 0.0);
    assert_eq!(n(team("spent_requests")), 1.0);
}

#[test]
fn the_endpoint_serves_only_get_metrics() {
    let d = Daemon::start_with_config(POLICY);
    let addr = metrics_addr(&d);
    let (status, _) = get(&addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = get(&addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    // A scraper that sends garbage and hangs up disturbs nobody.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0xff; 100]).unwrap();
    drop(s);
    assert_eq!(d.client().call(json!({"op": "hello"}))["ok"], true);
    assert!(scrape(&addr).contains("bursar_requests_total"));
}

#[test]
fn without_metrics_listen_no_endpoint_is_opened() {
    let d = Daemon::start();
    assert!(
        !d.stderr().contains("metrics at"),
        "metrics are off by default: {}",
        d.stderr()
    );
}

#[test]
fn a_taken_metrics_port_stops_the_start_with_an_error_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bursar.toml");
    std::fs::write(
        &cfg,
        format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let out = Command::new(bursar_tests::bin("bursard"))
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[test]
fn promtool_accepts_a_scrape_and_the_example_alerting_rules() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "skipped: promtool not installed (Debian: apt-get install prometheus; .ci/run does)"
        );
        return;
    };
    let d = Daemon::start_with_config(POLICY);
    let addr = metrics_addr(&d);
    let mut c = d.client();
    c.call(record("e-1", json!({"session": "s-1"}), "gpt-4o", 1000, 10));
    c.call(reserve(
        "r-1",
        json!({"session": "s-1"}),
        "gpt-4o",
        1_000_000,
        10,
    ));
    c.call(
        json!({"op": "observe", "provider": "openai", "labels": {"account": "prod"},
        "headers": {"x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "1h"}}),
    );
    let text = scrape(&addr);
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bursar-alerts.yml");
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The rules name metrics the daemon serves.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    for metric in [
        "bursar_bucket_utilization_ratio",
        "bursar_fdatasync_duration_seconds_bucket",
        "bursar_writer_poisoned",
    ] {
        assert!(rules_text.contains(metric), "{metric} in the rules");
        let family = metric.trim_end_matches("_bucket");
        assert!(text.contains(family), "{family} in a scrape");
    }
}

#[test]
fn a_scrape_shows_the_waiting_line_and_what_each_quota_has_left() {
    let d = Daemon::start_with_config(POLICY);
    let addr = metrics_addr(&d);
    let mut c = d.client();
    let o = c.call(
        json!({"op": "observe", "provider": "openai", "labels": {"account": "prod"},
        "headers": {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1h"}}),
    );
    assert_eq!(o["quotas"], json!(["openai-prod"]), "{o}");
    let gpu = |id: &str, wait: u64| {
        json!({"op": "reserve", "reservation_id": id, "labels": {"pool": "gpu", "account": "prod"},
            "model": "gpt-4o-mini", "estimate": {"input_tokens": 10, "max_output_tokens": 10},
            "wait_ms": wait})
    };
    assert_eq!(c.call(gpu("g1", 0))["decision"], json!("allow"));
    let mut waiter = d.client();
    waiter.send(&gpu("g2", 20_000));
    bursar_tests::metrics::wait_for_waiters(&addr, 1);
    let text = scrape(&addr);
    // Five requests left, one held by g1.
    assert_eq!(
        sample(
            &text,
            "bursar_quota_remaining{limit=\"requests\",quota=\"openai-prod\"}"
        ),
        Some(4.0),
        "{text}"
    );
    c.call(json!({"op": "release", "reservation_id": "g1"}));
    assert_eq!(waiter.recv()["decision"], json!("allow"));
    assert_eq!(sample(&scrape(&addr), "bursar_waiting_requests"), Some(0.0));
    // A `check` waiting for the slot g2 holds is in the line too.
    let mut asker = d.client();
    asker.send(
        &json!({"op": "check", "labels": {"pool": "gpu", "account": "prod"}, "model": "gpt-4o-mini",
        "estimate": {"input_tokens": 10, "max_output_tokens": 10}, "wait_ms": 20_000}),
    );
    bursar_tests::metrics::wait_for_waiters(&addr, 1);
    c.call(json!({"op": "release", "reservation_id": "g2"}));
    assert_eq!(asker.recv()["decision"], json!("allow"));
    assert_eq!(sample(&scrape(&addr), "bursar_waiting_requests"), Some(0.0));
}
