//! Reliability against real processes: a crash loop under mixed load, 500 racing clients,
//! tamper evidence, and resource limits. `BURSAR_CRASH_LOOPS=300` runs the long soak.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_core::ledger::Ledger;
use bursar_schemas::event::EventBody;
use bursar_schemas::wire::{ExportedEvent, StatusRequest};
use bursar_tests::{record, reserve, Client, Daemon};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CUMULATIVE: &str = r#"
[[budget]]
id = "team"
group_by = ["team"]
max_usd = 1000
[[budget]]
id = "all"
max_requests = 100000000
"#;

/// The shared seeded generator (`bursar-testkit`): failures reproduce from the seed.
use bursar_testkit::Rng;

/// Every event of the log, through the export stream.
fn export(c: &mut Client) -> Vec<ExportedEvent> {
    c.send(&json!({"op":"export"}));
    let (events, _) = c.read_stream();
    events
        .into_iter()
        .map(|e| serde_json::from_value(e).unwrap())
        .collect()
}

/// One writer: mixed record / reserve+commit / release, pipelined in small groups, until the
/// connection dies or `stop`. Acknowledged requests go to `acked` with their request.
fn mixed_load(
    socket: std::path::PathBuf,
    worker: u64,
    round: u64,
    acked: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut c) = Client::connect(&socket) else {
        return;
    };
    let mut rng = Rng::new(worker * 7919 + round * 104_729);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let team = json!({"team": format!("t{}", rng.below(6))});
        let id = format!("r{round}-w{worker}-{n}");
        n += 1;
        let reqs: Vec<Value> = match rng.below(3) {
            0 => vec![record(
                &format!("e-{id}"),
                team,
                "gpt-4o-mini",
                rng.below(5000),
                rng.below(500),
            )],
            1 => vec![
                reserve(&id, team, "gpt-4o-mini", 1000, 200),
                json!({"op":"commit","reservation_id":id,"event_id":format!("c-{id}"),"usage":{"input_tokens":900,"output_tokens":rng.below(300)}}),
            ],
            _ => vec![
                reserve(&id, team, "gpt-4o-mini", 100, 100),
                json!({"op":"release","reservation_id":id}),
            ],
        };
        for r in &reqs {
            if !c.try_send(r) {
                return;
            }
        }
        for r in reqs {
            match c.try_recv() {
                Some(a) if a["ok"] == true => acked.lock().unwrap().push(r),
                _ => return,
            }
        }
    }
}

#[test]
fn crash_loop_loses_nothing_acknowledged_and_status_is_always_the_fold() {
    let loops: u64 = std::env::var("BURSAR_CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut d = Daemon::start_with_config(CUMULATIVE);
    let mut rng = Rng::new(42);
    let all_acked: Arc<Mutex<Vec<Value>>> = Arc::default();
    // The test's own fold of the log, extended each round by the new events only.
    let mut folded_log = Ledger::new();
    let mut logged: HashSet<String> = HashSet::new();
    for round in 0..loops {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let (socket, acked, stop) = (d.socket.clone(), all_acked.clone(), stop.clone());
                std::thread::spawn(move || mixed_load(socket, w, round, acked, stop))
            })
            .collect();
        // Kill at a random moment: 20–220 ms into the load.
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        d.spawn()
            .unwrap_or_else(|e| panic!("restart {round} failed: {e}"));
        let mut c = d.client();
        c.send(&json!({"op":"tail","from_seq": folded_log.last_seq() + 1}));
        let (new, _) = c.read_stream();
        let new: Vec<ExportedEvent> = new
            .into_iter()
            .map(|e| serde_json::from_value(e).unwrap())
            .collect();
        for e in &new {
            folded_log
                .apply(e.seq, e.ts, &e.body)
                .unwrap_or_else(|err| panic!("round {round}: {err}"));
        }
        // verify passes and covers the whole log.
        let v = c.call(json!({"op":"verify"}));
        assert_eq!(v["ok"], true, "round {round}: {v}");
        assert_eq!(v["events"].as_u64().unwrap(), folded_log.last_seq());
        // Every acknowledged request left its event.
        logged.extend(new.iter().filter_map(|e| match &e.body {
            EventBody::UsageRecorded(u) => Some(u.event_id.clone()),
            EventBody::ReservationCreated(r) => Some(format!("hold:{}", r.reservation_id)),
            EventBody::ReservationReleased(r) => Some(format!("release:{}", r.reservation_id)),
            _ => None,
        }));
        for r in all_acked.lock().unwrap().iter() {
            let key = match r["op"].as_str().unwrap() {
                "record" | "commit" => r["event_id"].as_str().unwrap().to_string(),
                "reserve" => format!("hold:{}", r["reservation_id"].as_str().unwrap()),
                _ => format!("release:{}", r["reservation_id"].as_str().unwrap()),
            };
            assert!(
                logged.contains(&key),
                "round {round}: acknowledged {key} is missing"
            );
        }
        // Status equals a fresh fold of the log.
        let live = c.call(json!({"op":"status"}));
        let folded = folded_log
            .status(&StatusRequest::default(), folded_log.last_ts())
            .unwrap();
        let figures = |b: &Value| {
            (
                b["budget"].clone(),
                b["key"].clone(),
                b["spent_micros"].clone(),
                b["held_micros"].clone(),
                b["spent_requests"].clone(),
            )
        };
        let mut a: Vec<_> = live["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .map(figures)
            .collect();
        let mut b: Vec<_> = serde_json::to_value(&folded.budgets)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(figures)
            .collect();
        a.sort_by_key(|x| format!("{x:?}"));
        b.sort_by_key(|x| format!("{x:?}"));
        assert_eq!(
            a, b,
            "round {round}: status differs from the fold of the log"
        );
        // Retries of a few acknowledged usage ids are duplicates.
        let sample: Vec<Value> = all_acked
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["op"] == "record")
            .rev()
            .take(3)
            .cloned()
            .collect();
        for r in sample {
            assert_eq!(c.call(r)["duplicate"], true, "round {round}");
        }
    }
    assert!(
        all_acked.lock().unwrap().len() as u64 > loops * 10,
        "the load ran"
    );
}

#[test]
fn five_hundred_racing_clients_never_push_spent_plus_held_over_a_deny_limit() {
    let d = Daemon::start_with_config(
        r#"
[[budget]]
id = "team"
group_by = ["team"]
max_usd = 0.05
[[budget]]
id = "org"
max_usd = 0.12
max_concurrent = 40
"#,
    );
    let start = Arc::new(std::sync::Barrier::new(500));
    let threads: Vec<_> = (0..500u64)
        .map(|i| {
            let (socket, start) = (d.socket.clone(), start.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut c = Client::connect(&socket).unwrap();
                    let mut rng = Rng::new(i);
                    start.wait();
                    for k in 0..6 {
                        let id = format!("c{i}-{k}");
                        let team = json!({"team": format!("t{}", rng.below(4))});
                        let mut r = reserve(&id, team, "gpt-4o-mini", 2000 + rng.below(8000), 500);
                        // Some holds are left to expire.
                        r["ttl_seconds"] = json!(if rng.below(5) == 0 { 1 } else { 60 });
                        let a = c.call(r);
                        if a["decision"] == "deny" || a["ok"] != true {
                            continue;
                        }
                        match rng.below(3) {
                            // Commit within the hold (usage ≤ estimate).
                            0 => {
                                c.call(json!({"op":"commit","reservation_id":id,"event_id":format!("e-{id}"),"usage":{"input_tokens":1000,"output_tokens":100}}));
                            }
                            1 => {
                                c.call(json!({"op":"release","reservation_id":id}));
                            }
                            _ => {} // leave it: it expires or stays live
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut c = d.client();
    let events = export(&mut c);
    // Replay the exported log event by event: at no instant is a deny limit exceeded.
    let mut l = Ledger::new();
    for e in &events {
        l.apply(e.seq, e.ts, &e.body).unwrap();
        for b in l.status(&StatusRequest::default(), e.ts).unwrap().budgets {
            if let Some(limit) = b.limit_micros {
                assert!(
                    b.spent_micros + b.held_micros <= limit,
                    "seq {}: {b:?}",
                    e.seq
                );
            }
            if let Some(limit) = b.limit_concurrent {
                assert!(b.live_holds <= limit, "seq {}: {b:?}", e.seq);
            }
        }
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e.body, EventBody::ReservationDenied(_))),
        "the limits were reached"
    );
    // The final live state equals the fold.
    let live = c.call(json!({"op":"status"}));
    let folded = l
        .status(&StatusRequest::default(), events.last().unwrap().ts)
        .unwrap();
    let spent_live: i64 = live["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["spent_micros"].as_i64().unwrap())
        .sum();
    let spent_fold: i64 = folded.budgets.iter().map(|b| b.spent_micros).sum();
    assert_eq!(spent_live, spent_fold);
}

#[test]
fn tampering_with_one_stored_event_makes_verify_name_the_first_bad_seq() {
    let mut d = Daemon::start();
    let mut c = d.client();
    for i in 0..20 {
        c.call(record(&format!("e-{i}"), json!({}), "gpt-4o", 10, 10));
    }
    assert!(d.terminate().success());
    // Alter the body of seq 7 without fixing any hash.
    bursard::log::testing::tamper_rewrite(&d.data_dir, 7, |env| {
        if let EventBody::UsageRecorded(u) = &mut env.body {
            u.usage.input_tokens = 1;
        }
    })
    .unwrap();
    d.spawn().unwrap();
    let v = d.client().call(json!({"op":"verify"}));
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("seq 7"),
        "{v}"
    );
    assert!(d.terminate().success());
    // Dropping an event: the gap is named.
    bursard::log::testing::tamper_delete(&d.data_dir, 12).unwrap();
    let store = bursard::log::SledLog::open(&d.data_dir).unwrap();
    let err = bursard::log::verify_chain(&store).unwrap_err();
    assert_eq!(err.seq(), 7, "the first bad seq is still 7: {err}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn idle_connections_slow_readers_and_half_lines_do_not_stop_others() {
    let d = Daemon::start();
    let pid = d.child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    // 2,000 idle connections.
    let idle: Vec<_> = (0..2000)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap())
        .collect();
    // A client that sends half a line and stalls.
    let mut half = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    std::io::Write::write_all(&mut half, b"{\"op\":\"hel").unwrap();
    // A slow reader: pipelines many requests and never reads the answers.
    let mut slow = Client::connect(&d.socket).unwrap();
    let slow_handle = slow.raw_stream().try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let line = serde_json::to_vec(&json!({"op":"status"})).unwrap();
        let mut all = Vec::new();
        for _ in 0..20_000 {
            all.extend_from_slice(&line);
            all.push(b'\n');
        }
        // This blocks once the daemon stops reading (bounded in-flight answers).
        let _ = std::io::Write::write_all(slow.raw_stream(), &all);
    });
    std::thread::sleep(Duration::from_millis(300));
    // Everyone else is served promptly.
    let t = Instant::now();
    let mut c = d.client();
    for i in 0..50 {
        assert_eq!(
            c.call(record(&format!("e-{i}"), json!({}), "gpt-4o", 1, 1))["ok"],
            true
        );
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    let after = rss_kib(pid);
    assert!(
        after < before + 200 * 1024,
        "memory grew from {before} KiB to {after} KiB"
    );
    drop(idle);
    drop(half);
    drop(c);
    // The flood is blocked by back-pressure (the daemon stopped reading it): end it.
    let _ = slow_handle.shutdown(std::net::Shutdown::Both);
    flood.join().unwrap();
}

#[test]
fn a_clock_stepping_back_keeps_timestamps_increasing_and_budgets_intact() {
    use std::sync::atomic::AtomicI64;
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("bursar.toml");
    std::fs::write(&toml, "[[budget]]\nid = \"hourly\"\nwindow = \"fixed\"\nwindow_seconds = 3600\nmax_requests = 2\n").unwrap();
    let config = bursard::config::Config::resolve(
        Some(toml),
        Some(dir.path().join("s.sock")),
        Some(dir.path().join("data")),
    )
    .unwrap();
    // 10 s into an hour.
    let clock_value = Arc::new(AtomicI64::new(1_795_395_610_000_000));
    let cv = clock_value.clone();
    let clock: bursard::writer::Clock = Arc::new(move || cv.load(Ordering::SeqCst));
    let (stop, _) = tokio::sync::watch::channel(false);
    let stop2 = stop.clone();
    let t =
        std::thread::spawn(move || bursard::run_with(config, clock, false, None, stop2).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        if let Ok(c) = Client::connect(&dir.path().join("s.sock")) {
            break c;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        c.call(record("a", json!({}), "gpt-4o", 1, 1))["state"],
        "ok"
    );
    // The wall clock steps back 30 minutes, into the previous hour.
    clock_value.fetch_sub(1_800_000_000, Ordering::SeqCst);
    assert_eq!(
        c.call(record("b", json!({}), "gpt-4o", 1, 1))["state"],
        "exhausted",
        "still the same window"
    );
    assert_eq!(
        c.call(reserve("r", json!({}), "gpt-4o", 1, 1))["decision"],
        "deny",
        "no budget handed out twice"
    );
    let events = export(&mut c);
    assert!(
        events.windows(2).all(|w| w[0].ts < w[1].ts),
        "strictly increasing ts"
    );
    // When the clock passes the next hour, the window resets.
    clock_value.fetch_add(1_800_000_000 + 3_600_000_000, Ordering::SeqCst);
    assert_eq!(
        c.call(reserve("r2", json!({}), "gpt-4o", 1, 1))["decision"],
        "allow"
    );
    drop(c);
    stop.send_replace(true);
    t.join().unwrap();
}
