//! Durability and concurrency against real processes: kill -9 under load, restart, races.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{record, reserve, Client, Daemon};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const METER: &str = r#"
[[budget]]
id = "all"
group_by = ["team"]
"#;

fn status_of(c: &mut Client) -> Value {
    let mut s = c.call(json!({"op":"status"}));
    // Figures only: window_end may differ by nothing, but keep the comparison about money.
    s.as_object_mut().unwrap().remove("req");
    s
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_event() {
    let mut d = Daemon::start_with_config(METER);
    // Phase 1: quiesced writes, then a status; after kill -9 and restart it must be identical.
    let mut c = d.client();
    for i in 0..200 {
        let a = c.call(record(
            &format!("q-{i}"),
            json!({"team": format!("t{}", i % 7)}),
            "gpt-4o-mini",
            1000,
            200,
        ));
        assert_eq!(a["ok"], true);
    }
    let before = status_of(&mut c);
    d.restart_after_kill();
    assert_eq!(
        status_of(&mut d.client()),
        before,
        "status after kill -9 equals the pre-crash answer"
    );

    // Phase 2: several pipelining writers; kill -9 while they run.
    // (event id, request, answer) of every acknowledged write.
    let acked: Arc<Mutex<Vec<(String, Value, Value)>>> = Arc::default();
    let socket = d.socket.clone();
    let mut threads = Vec::new();
    for w in 0..4 {
        let acked = acked.clone();
        let socket = socket.clone();
        threads.push(std::thread::spawn(move || {
            let Ok(mut c) = Client::connect(&socket) else {
                return;
            };
            let mut i = 0;
            loop {
                // Pipeline 16 requests, then read what comes back until the connection dies.
                let batch: Vec<Value> = (0..16)
                    .map(|k| {
                        record(
                            &format!("w{w}-{}", i + k),
                            json!({"team": format!("t{}", (i + k) % 5)}),
                            "gpt-4o-mini",
                            500,
                            50,
                        )
                    })
                    .collect();
                for r in &batch {
                    c.send(r);
                }
                for r in &batch {
                    match c.try_recv() {
                        Some(a) if a["ok"] == true => acked.lock().unwrap().push((
                            r["event_id"].as_str().unwrap().into(),
                            r.clone(),
                            a,
                        )),
                        _ => return,
                    }
                }
                i += 16;
            }
        }));
    }
    // The kill comes in the middle of the load: once more than 100 writes were acknowledged
    // (at least 700 ms in; a loaded machine may need longer to get there).
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(700)
        || (acked.lock().unwrap().len() <= 100 && started.elapsed() < Duration::from_secs(30))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    for t in threads {
        let _ = t.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the load ran ({} acknowledged)",
        acked.len()
    );
    d.spawn().expect("restart after kill -9");
    let mut c = d.client();
    c.send(&json!({"op":"export"}));
    let (events, _) = c.read_stream();
    let logged: HashSet<String> = events
        .iter()
        .filter(|e| e["type"] == "usage_recorded")
        .map(|e| {
            e["body"]["usage_recorded"]["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for (id, _, _) in &acked {
        assert!(
            logged.contains(id),
            "acknowledged event {id} is missing after kill -9"
        );
    }
    // The meter's figures are exactly the fold of what is logged.
    let total: i64 = events
        .iter()
        .filter_map(|e| e["cost_micros"].as_i64())
        .sum();
    let st = c.call(json!({"op":"status"}));
    let spent: i64 = st["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["spent_micros"].as_i64().unwrap())
        .sum();
    assert_eq!(spent, total);
    // Retrying acknowledged ids after the restart are duplicates, with the original answer.
    for (_, req, original) in acked.iter().step_by(acked.len() / 50 + 1) {
        let mut a = c.call(req.clone());
        assert_eq!(a["duplicate"], true, "{a}");
        a["duplicate"] = false.into();
        assert_eq!(&a, original);
    }
    let v = c.call(json!({"op":"verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["events"].as_u64().unwrap(), events.len() as u64);
}

#[test]
fn hundred_concurrent_clients_never_overspend_one_budget() {
    // gpt-4o: 1,000 in + 0 out = 2,500 µUSD per hold; 100,000 µUSD allows exactly 40 holds.
    let d = Daemon::start_with_config(
        r#"
[[budget]]
id = "shared"
max_usd = 0.1
"#,
    );
    let socket = d.socket.clone();
    let start = Arc::new(std::sync::Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let socket = socket.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                start.wait();
                let a = c.call(reserve(&format!("r-{i}"), json!({}), "gpt-4o", 1000, 0));
                a["decision"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let decisions: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = decisions.iter().filter(|d| *d != "deny").count();
    assert_eq!(admitted, 40, "exactly what the limit allows: {decisions:?}");
    let st = d.client().call(json!({"op":"status"}));
    let b = &st["budgets"][0];
    assert_eq!(b["held_micros"], 100_000);
    assert!(b["held_micros"].as_i64().unwrap() <= b["limit_micros"].as_i64().unwrap());
}

#[test]
fn holds_expire_by_an_event_and_a_late_commit_is_flagged() {
    let d = Daemon::start_with_config(
        r#"
[[budget]]
id = "cap"
max_usd = 1
"#,
    );
    let mut c = d.client();
    let mut r = reserve("r-1", json!({}), "gpt-4o", 1000, 100);
    r["ttl_seconds"] = json!(1);
    assert_eq!(c.call(r)["decision"], "allow");
    assert!(
        c.call(json!({"op":"status"}))["budgets"][0]["held_micros"]
            .as_i64()
            .unwrap()
            > 0
    );
    // The reaper appends reservation_expired without any client traffic.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.send(&json!({"op":"export"}));
        let (events, _) = c.read_stream();
        if events.iter().any(|e| e["type"] == "reservation_expired") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reservation_expired was appended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        c.call(json!({"op":"status"}))["budgets"][0]["held_micros"],
        0
    );
    let late = c.call(json!({"op":"commit","reservation_id":"r-1","event_id":"e-1","usage":{"input_tokens":1000,"output_tokens":10}}));
    assert_eq!(late["late"], true, "{late}");
    assert_eq!(late["cost_micros"], 2600);
    let ext = c.call(json!({"op":"extend","reservation_id":"r-1","ttl_seconds":5}));
    assert_eq!(ext["error"]["code"], "not_found");
}

#[test]
fn fixed_window_resets_at_its_boundary() {
    let d = Daemon::start_with_config(
        r#"
[[budget]]
id = "per-2s"
window = "fixed"
window_seconds = 2
max_requests = 1
"#,
    );
    let mut c = d.client();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    // From the start of a window not used yet; again when the two requests straddled its end
    // (a loaded machine).
    let mut used = None;
    let mut attempts = 0;
    let window = loop {
        attempts += 1;
        assert!(attempts <= 5, "never two requests within one 2 s window");
        while now_ms() % 2000 >= 500 || used == Some(now_ms() / 2000) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let window = now_ms() / 2000;
        used = Some(window);
        let a = c.call(record(
            &format!("e-{window}"),
            json!({}),
            "gpt-4o-mini",
            1,
            1,
        ));
        // A check: a reserve allowed in the next window would hold its request there.
        let denied = c.call(json!({"op": "check", "labels": {}, "model": "gpt-4o-mini",
            "estimate": {"input_tokens": 1, "max_output_tokens": 1}}));
        if now_ms() / 2000 != window {
            continue;
        }
        assert_eq!(a["state"], "exhausted", "{a}");
        assert_eq!(denied["decision"], "deny", "{denied}");
        break window;
    };
    // The next window.
    while now_ms() / 2000 == window {
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = c.call(reserve("r-2", json!({}), "gpt-4o-mini", 1, 1));
    assert_eq!(r["decision"], "allow", "a new window: {r}");
}

/// `n` records (`<prefix>-<i>`, 100 + 10 tokens of gpt-4o) spread over `teams` teams.
fn record_for_teams(c: &mut Client, prefix: &str, n: usize, teams: usize) {
    for i in 0..n {
        c.call(record(
            &format!("{prefix}-{i}"),
            json!({"team": format!("t{}", i % teams)}),
            "gpt-4o",
            100,
            10,
        ));
    }
}

#[test]
fn startup_from_snapshot_plus_tail_equals_a_full_fold_of_the_log() {
    let mut d = Daemon::start_with_config(METER);
    let mut c = d.client();
    record_for_teams(&mut c, "a", 50, 4);
    // A clean stop writes a snapshot; more events after the restart form the tail.
    assert!(d.terminate().success());
    d.spawn().unwrap();
    let mut c = d.client();
    record_for_teams(&mut c, "b", 30, 6);
    c.call(reserve("held", json!({"team":"t1"}), "gpt-4o", 100, 100));
    let live = status_of(&mut c);
    d.kill9();
    {
        let store = bursard::log::SledLog::open(&d.data_dir).unwrap();
        use bursard::log::LogStore;
        assert!(
            store.latest_snapshot().unwrap().is_some(),
            "a snapshot was written at the clean stop"
        );
        let recovered = bursard::writer::recover(&store).unwrap();
        let full = bursar_core::ledger::fold(|| store.read_from(1)).unwrap();
        assert_eq!(recovered, full, "snapshot + tail equals a full fold");
    }
    d.spawn().unwrap();
    assert_eq!(status_of(&mut d.client()), live);
}

/// A start that had to fold the log past its newest snapshot (here: a daemon killed before it
/// ever took one) leaves a snapshot behind at its clean stop even when nothing was written
/// meanwhile, so the next start does not fold the same log again.
#[test]
fn a_start_that_folded_the_log_leaves_a_snapshot_at_a_clean_stop_without_new_writes() {
    let mut d = Daemon::start_with_config(METER);
    let mut c = d.client();
    record_for_teams(&mut c, "k", 40, 4);
    let live = status_of(&mut c);
    d.kill9();
    let snapshot_seq = |dir: &std::path::Path| {
        use bursard::log::LogStore;
        let store = bursard::log::SledLog::open(dir).unwrap();
        let head = store.head().map(|h| h.0);
        (store.latest_snapshot().unwrap().map(|(seq, _)| seq), head)
    };
    let (before, head) = snapshot_seq(&d.data_dir);
    assert_eq!(before, None, "killed before its first snapshot");
    d.spawn().unwrap();
    assert_eq!(status_of(&mut d.client()), live);
    assert!(d.terminate().success());
    let (after, head_after) = snapshot_seq(&d.data_dir);
    assert_eq!(head_after, head, "nothing was written after the restart");
    assert_eq!(
        after, head,
        "the clean stop left a snapshot of the whole log"
    );
    d.spawn().unwrap();
    assert_eq!(status_of(&mut d.client()), live);
}

#[test]
fn no_argument_start_uses_the_embedded_defaults_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let mut child = std::process::Command::new(bursar_tests::bin("bursard"))
        .current_dir(dir.path())
        .env("XDG_RUNTIME_DIR", &runtime)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = runtime.join("bursar.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        if let Ok(c) = Client::connect(&socket) {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no socket at $XDG_RUNTIME_DIR/bursar.sock"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let a = c.call(record(
        "e-1",
        json!({"team":"x"}),
        "claude-sonnet-4-5",
        1000,
        1000,
    ));
    assert_eq!(a["cost_micros"], 18_000);
    // The default policy meters spend per model per day without limiting anything.
    assert_eq!(a["budgets"][0]["budget"], "model-daily");
    assert_eq!(a["budgets"][0]["key"], "model=claude-sonnet-4-5");
    assert!(a["budgets"][0].get("limit_micros").is_none());
    assert!(
        dir.path().join("bursar-data").is_dir(),
        "data in ./bursar-data"
    );
    let _ = child.kill();
    let _ = child.wait();
}
