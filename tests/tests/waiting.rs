//! Waiting in line (SPEC §10 `wait_ms`, issue 16.4), through a real daemon: agents that say
//! `wait_ms` wait for limits that free up by themselves instead of being denied, first come
//! first served, without holding up anybody else; a waiter whose time runs out gets its deny.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::metrics::{metrics_addr, wait_for_waiters};
use bursar_tests::{Client, Daemon};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A local GPU with two slots, an API with two requests per rolling 2 s, and a small fixed
/// daily budget.
const POLICY: &str = r#"
[daemon]
max_waiters = 24
metrics_listen = "127.0.0.1:0"

[[budget]]
id = "local-gpu"
match = { pool = "gpu" }
max_concurrent = 2

[[budget]]
id = "api-rpm"
match = { pool = "api" }
window = "rolling"
window_seconds = 2
resolution_seconds = 1
max_requests = 2

[[budget]]
id = "daily"
match = { pool = "small" }
window = "fixed"
window_seconds = 86400
max_usd = 0.0001
"#;

fn reserve(id: &str, pool: &str, wait_ms: Option<u64>) -> Value {
    let mut r = json!({"op": "reserve", "reservation_id": id, "labels": {"pool": pool},
        "model": "gpt-4o-mini", "estimate": {"input_tokens": 10, "max_output_tokens": 10}});
    if let Some(w) = wait_ms {
        r["wait_ms"] = json!(w);
    }
    r
}

/// Hold both GPU slots, as `h1` and `h2`.
fn take_both_gpu_slots(c: &mut Client) {
    for id in ["h1", "h2"] {
        assert_eq!(c.call(reserve(id, "gpu", None))["decision"], json!("allow"));
    }
}

fn release(id: &str) -> Value {
    json!({"op": "release", "reservation_id": id})
}

fn created_order(c: &mut Client) -> Vec<String> {
    c.send(&json!({"op": "export"}));
    let (events, _) = c.read_stream();
    events
        .iter()
        .filter(|e| e["type"] == json!("reservation_created"))
        .map(|e| {
            e["body"]["reservation_created"]["reservation_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn twenty_agents_waiting_for_two_gpu_slots_are_all_served_in_arrival_order() {
    let d = Daemon::start_with_config(POLICY);
    let mut admin = d.client();
    take_both_gpu_slots(&mut admin);
    // Twenty agents, one connection each, each arriving once the one before waits: all wait.
    let addr = metrics_addr(&d);
    let mut agents: Vec<Client> = Vec::new();
    for i in 0..20 {
        let mut c = d.client();
        c.send(&reserve(&format!("a{i:02}"), "gpu", Some(30_000)));
        wait_for_waiters(&addr, i + 1);
        assert!(
            c.poll_recv().is_none(),
            "agent {i} was answered without a free slot"
        );
        agents.push(c);
    }
    // A reserve without wait_ms is denied at once and does not jump the line.
    let denied = admin.call(reserve("impatient", "gpu", None));
    assert_eq!(denied["decision"], json!("deny"), "{denied}");
    // Each slot freed goes to the next agent in line; each agent then frees its own.
    assert_eq!(admin.call(release("h1"))["ok"], json!(true));
    assert_eq!(admin.call(release("h2"))["ok"], json!(true));
    let mut waited = Vec::new();
    for (i, c) in agents.iter_mut().enumerate() {
        let a = c.recv();
        assert_eq!(a["decision"], json!("allow"), "agent {i}: {a}");
        waited.push(a["waited_ms"].as_u64().unwrap());
        assert_eq!(c.call(release(&format!("a{i:02}")))["ok"], json!(true));
    }
    let order = created_order(&mut admin);
    let expected: Vec<String> = ["h1", "h2"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..20).map(|i| format!("a{i:02}")))
        .collect();
    assert_eq!(order, expected, "served in arrival order");
    // The first in line waited longest.
    assert!(waited[0] >= waited[19] && waited[0] > 0, "{waited:?}");
}

#[test]
fn waiters_on_a_rolling_request_limit_are_admitted_as_the_window_slides() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    for id in ["r1", "r2"] {
        assert_eq!(c.call(reserve(id, "api", None))["decision"], json!("allow"));
        let commit = c.call(
            json!({"op": "commit", "reservation_id": id, "event_id": format!("e-{id}"),
            "usage": {"input_tokens": 10, "output_tokens": 10}}),
        );
        assert_eq!(commit["ok"], json!(true), "{commit}");
    }
    // Two requests in the last 2 s: a third waits until the oldest slides out of the window.
    let started = Instant::now();
    let a = c.call(reserve("r3", "api", Some(10_000)));
    let elapsed = started.elapsed();
    assert_eq!(a["decision"], json!("allow"), "{a}");
    let waited = a["waited_ms"].as_u64().unwrap();
    assert!(
        waited >= 500,
        "admitted after {waited} ms, before the window slid: {a}"
    );
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    // One more waits in its turn too.
    let b = c.call(reserve("r4", "api", Some(10_000)));
    assert_eq!(b["decision"], json!("allow"), "{b}");
}

#[test]
fn a_waiter_whose_time_runs_out_gets_its_deny_once() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    let started = Instant::now();
    let a = c.call(reserve("late", "gpu", Some(300)));
    assert_eq!(a["decision"], json!("deny"), "{a}");
    assert!(a["waited_ms"].as_u64().unwrap() >= 300, "{a}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(a["reason"]["budget"], json!("local-gpu"), "{a}");
    c.send(&json!({"op": "export"}));
    let (events, _) = c.read_stream();
    let denials = events
        .iter()
        .filter(|e| e["type"] == json!("reservation_denied"))
        .count();
    assert_eq!(denials, 1, "only the final deny is appended");
    // A resend is a duplicate of that deny, whatever its wait_ms.
    let again = c.call(reserve("late", "gpu", Some(5)));
    assert_eq!(again["duplicate"], json!(true), "{again}");
    assert_eq!(again["decision"], json!("deny"), "{again}");
}

#[test]
fn a_full_line_is_overloaded_and_a_deny_that_cannot_free_up_is_answered_at_once() {
    let d = Daemon::start_with_config(&POLICY.replace("max_waiters = 24", "max_waiters = 2"));
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    let addr = metrics_addr(&d);
    let mut waiting = Vec::new();
    for i in 0..2 {
        let mut w = d.client();
        w.send(&reserve(&format!("w{i}"), "gpu", Some(20_000)));
        wait_for_waiters(&addr, i + 1);
        waiting.push(w);
    }
    let o = c.call(reserve("w2", "gpu", Some(20_000)));
    assert_eq!(o["error"]["code"], json!("overloaded"), "{o}");

    // Money spent in a fixed daily window does not come back by waiting: denied at once.
    c.call(
        json!({"op": "record", "event_id": "spend", "labels": {"pool": "small"},
        "model": "gpt-4o-mini", "usage": {"input_tokens": 1000, "output_tokens": 1000}}),
    );
    let started = Instant::now();
    let a = c.call(reserve("s1", "small", Some(20_000)));
    assert_eq!(a["decision"], json!("deny"), "{a}");
    assert_eq!(a["waited_ms"], json!(0), "{a}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let e = c.call(reserve("s2", "gpu", Some(60_001)));
    assert_eq!(e["error"]["code"], json!("bad_request"), "{e}");
    assert_eq!(e["error"]["field"], json!("wait_ms"), "{e}");

    // The waiters are still served when a slot frees.
    c.call(release("h1"));
    assert_eq!(waiting[0].recv()["decision"], json!("allow"));
}

#[test]
fn a_check_with_wait_ms_waits_for_a_release_and_appends_nothing() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    let mut asker = d.client();
    asker.send(
        &json!({"op": "check", "labels": {"pool": "gpu"}, "model": "gpt-4o-mini",
        "estimate": {"input_tokens": 10, "max_output_tokens": 10}, "wait_ms": 20_000}),
    );
    wait_for_waiters(&metrics_addr(&d), 1);
    let in_line = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        asker.poll_recv().is_none(),
        "answered while both slots were held"
    );
    // Another connection is not held up meanwhile.
    let s = c.call(json!({"op": "status"}));
    assert_eq!(s["ok"], json!(true));
    let seen_waiting = in_line.elapsed().as_millis() as u64;
    c.call(release("h1"));
    let a = asker.recv();
    assert_eq!(a["decision"], json!("allow"), "{a}");
    // At least as long as it was seen waiting.
    assert!(a["waited_ms"].as_u64().unwrap() >= seen_waiting, "{a}");
    assert!(a.get("seq").is_none(), "a check appends nothing: {a}");
    // Without a slot and with little time, a check says deny after waiting.
    c.call(reserve("h3", "gpu", None));
    let late = asker.call(json!({"op": "check", "labels": {"pool": "gpu"},
        "model": "gpt-4o-mini", "estimate": {"input_tokens": 10, "max_output_tokens": 10},
        "wait_ms": 200}));
    assert_eq!(late["decision"], json!("deny"), "{late}");
    assert!(late["waited_ms"].as_u64().unwrap() >= 200, "{late}");
    // `"wait_ms": 0` does not wait, and says so, for a check as for a reserve.
    let asked = |op: &str| {
        let mut r = json!({"op": op, "labels": {"pool": "gpu"}, "model": "gpt-4o-mini",
            "estimate": {"input_tokens": 10, "max_output_tokens": 10}, "wait_ms": 0});
        if op == "reserve" {
            r["reservation_id"] = json!("no-wait");
        }
        r
    };
    for op in ["check", "reserve"] {
        let now = asker.call(asked(op));
        assert_eq!(now["decision"], json!("deny"), "{now}");
        assert_eq!(now["waited_ms"], json!(0), "{now}");
    }
}

#[test]
fn bursar_reserve_with_wait_ms_waits_for_a_slot_and_says_how_long() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    let socket = d.socket.to_str().unwrap().to_string();
    let cli = std::thread::spawn(move || {
        bursar_tests::bursar_command(&[
            "--socket",
            &socket,
            "reserve",
            "--label",
            "pool=gpu",
            "--model",
            "gpt-4o-mini",
            "--input-tokens",
            "10",
            "--max-output-tokens",
            "10",
            "--wait-ms",
            "20000",
        ])
        .output()
        .unwrap()
    });
    // Released once the CLI's reserve waits in line.
    wait_for_waiters(&metrics_addr(&d), 1);
    c.call(release("h1"));
    let out = cli.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("after waiting in line"), "{stdout}");
}

#[test]
fn a_stopping_daemon_decides_its_waiters_before_it_exits() {
    let mut d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    let mut w = d.client();
    w.send(&reserve("waiting", "gpu", Some(30_000)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(w.poll_recv().is_none());
    let started = Instant::now();
    assert!(d.terminate().success());
    // Answered (denied: both slots are still held), not left hanging until its 30 s are up.
    let a = w.recv();
    assert_eq!(a["decision"], json!("deny"), "{a}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The deny is in the log.
    let events = d.offline(&["--json", "export"]).ok().json_lines();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == json!("reservation_denied")
                && e["body"]["reservation_denied"]["reservation_id"] == json!("waiting")),
        "{events:?}"
    );
}

/// SPEC §6: a client never affects others. A client that hangs up while it waits in line
/// leaves the line: the slot a release frees goes to a live waiter, nothing is appended for
/// the one that left, and its place in the line (`max_waiters`) is free again.
#[test]
fn a_waiter_whose_client_hangs_up_leaves_the_line_gets_no_slot_and_frees_its_place() {
    let d = Daemon::start_with_config(&POLICY.replace("max_waiters = 24", "max_waiters = 2"));
    let addr = metrics_addr(&d);
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    {
        let mut gone_reserve = d.client();
        gone_reserve.send(&reserve("gone", "gpu", Some(60_000)));
        let mut gone_check = d.client();
        gone_check.send(
            &json!({"op": "check", "labels": {"pool": "gpu"}, "model": "gpt-4o-mini",
            "estimate": {"input_tokens": 10, "max_output_tokens": 10}, "wait_ms": 60_000}),
        );
        wait_for_waiters(&addr, 2);
        assert!(gone_reserve.poll_recv().is_none() && gone_check.poll_recv().is_none());
    } // Both hang up.
      // They leave the line.
    wait_for_waiters(&addr, 0);
    // Their places are free: two live waiters fit in the line of two (an `overloaded` answer
    // would come back at once, in place of the `allow`s below).
    let mut live = Vec::new();
    for (i, id) in ["live-1", "live-2"].into_iter().enumerate() {
        let mut w = d.client();
        w.send(&reserve(id, "gpu", Some(20_000)));
        wait_for_waiters(&addr, i as u64 + 1);
        live.push(w);
    }
    // Each freed slot goes to a live waiter, in arrival order, none to the ones that left.
    c.call(release("h1"));
    let a = live[0].recv();
    assert_eq!(a["decision"], json!("allow"), "{a}");
    c.call(release("h2"));
    let b = live[1].recv();
    assert_eq!(b["decision"], json!("allow"), "{b}");
    assert_eq!(
        created_order(&mut c),
        ["h1", "h2", "live-1", "live-2"],
        "nothing is appended for a waiter that left"
    );
}

/// A client that only shuts down its writing side still gets the answer of its waiting
/// `reserve`, however long after it is decided.
#[test]
fn a_waiter_whose_client_half_closes_still_gets_its_slot() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = d.client();
    take_both_gpu_slots(&mut c);
    let mut w = d.client();
    w.send(&reserve("half", "gpu", Some(20_000)));
    w.shutdown_write();
    wait_for_waiters(&metrics_addr(&d), 1);
    let in_line = Instant::now();
    std::thread::sleep(Duration::from_millis(700));
    let seen_waiting = in_line.elapsed().as_millis() as u64;
    c.call(release("h1"));
    let a = w.recv();
    assert_eq!(a["decision"], json!("allow"), "{a}");
    // At least as long as it was seen waiting, past the hang-up watch's first look (200 ms).
    assert!(a["waited_ms"].as_u64().unwrap() >= seen_waiting, "{a}");
}

/// The descriptors the daemon holds open (its connections among them).
fn open_descriptors(d: &Daemon) -> usize {
    let pid = d.child.as_ref().unwrap().id();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A `tail --follow` whose client hangs up ends, even when no event would ever be written to
/// it, and gives its connection back (4,096 such would otherwise lock every client out).
#[test]
fn a_follow_whose_client_hangs_up_ends_and_gives_its_connection_back() {
    let d = Daemon::start_with_config(POLICY);
    assert_eq!(d.client().call(json!({"op": "hello"}))["ok"], json!(true));
    let before = open_descriptors(&d);
    let mut followers = Vec::new();
    for _ in 0..20 {
        let mut f = d.client();
        f.send(&json!({"op": "tail", "follow": true, "types": ["budget_exhausted"]}));
        followers.push(f);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_descriptors(&d) < before + 15 {
        assert!(Instant::now() < deadline, "the follows never all opened");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(followers);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_descriptors(&d) > before + 2 {
        assert!(
            Instant::now() < deadline,
            "{} descriptors open, {before} before the follows",
            open_descriptors(&d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
