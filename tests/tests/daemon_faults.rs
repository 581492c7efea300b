//! Fault injection through the log trait: an in-process daemon on a store whose syncs fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{record, reserve, Client};
use bursard::config::Config;
use bursard::log::testing::{FaultControl, FaultyLog, MemDisk, MemLog, SyncFault};
use bursard::log::LogStore;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

struct InProcess {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(dir: &Path, store: Box<dyn LogStore>) -> InProcess {
        let config =
            Config::resolve(None, Some(dir.join("s.sock")), Some(dir.join("unused"))).unwrap();
        let (stop, _) = tokio::sync::watch::channel(false);
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            bursard::run_with(
                config,
                bursard::writer::system_clock(),
                false,
                Some(store),
                stop2,
            )
            .unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&dir.join("s.sock")).is_err() {
            assert!(Instant::now() < deadline, "in-process daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        InProcess {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

#[test]
fn a_failing_sync_fails_closed_and_nothing_unacknowledged_survives() {
    let dir = tempfile::tempdir().unwrap();
    let disk = MemDisk::new();
    let control = FaultControl::new();
    control.set_sync_fault(SyncFault::Lost);
    let store = FaultyLog::new(MemLog::open(&disk).unwrap(), control.clone());
    let d = InProcess::start(dir.path(), Box::new(store));
    let mut c = Client::connect(&dir.path().join("s.sock")).unwrap();
    for i in 0..5 {
        assert_eq!(
            c.call(record(&format!("ok-{i}"), json!({}), "gpt-4o", 10, 10))["ok"],
            true
        );
    }
    control.fail_all_syncs(true);
    let a = c.call(record("lost", json!({}), "gpt-4o", 10, 10));
    assert_eq!(a["error"]["code"], "unavailable", "{a}");
    // Poisoned: later writes and reservations are refused even once the disk recovers.
    control.fail_all_syncs(false);
    let r = c.call(reserve("r-1", json!({}), "gpt-4o", 10, 10));
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    // Reads keep working.
    assert_eq!(c.call(json!({"op":"hello"}))["ok"], true);
    assert_eq!(c.call(json!({"op":"status"}))["ok"], true);
    drop(c);
    d.stop();
    // Crash: whatever was not durable is gone. Restart on the same disk without faults.
    disk.crash();
    let d = InProcess::start(dir.path(), Box::new(MemLog::open(&disk).unwrap()));
    let mut c = Client::connect(&dir.path().join("s.sock")).unwrap();
    c.send(&json!({"op":"export"}));
    let (events, _) = c.read_stream();
    let ids: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "usage_recorded")
        .map(|e| {
            e["body"]["usage_recorded"]["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, vec!["ok-0", "ok-1", "ok-2", "ok-3", "ok-4"]);
    assert_eq!(c.call(json!({"op":"verify"}))["ok"], true);
    // After the restart, writes work again, and the unacknowledged id is new, not a duplicate.
    let a = c.call(record("lost", json!({}), "gpt-4o", 10, 10));
    assert_eq!(a["duplicate"], false, "{a}");
    drop(c);
    d.stop();
}

#[test]
fn a_failing_append_is_refused_without_half_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = MemDisk::new();
    let control = FaultControl::new();
    let store = FaultyLog::new(MemLog::open(&disk).unwrap(), control.clone());
    let d = InProcess::start(dir.path(), Box::new(store));
    let mut c = Client::connect(&dir.path().join("s.sock")).unwrap();
    assert_eq!(c.call(record("a", json!({}), "gpt-4o", 1, 1))["ok"], true);
    control.fail_all_appends(true);
    assert_eq!(
        c.call(record("b", json!({}), "gpt-4o", 1, 1))["error"]["code"],
        "unavailable"
    );
    drop(c);
    d.stop();
    disk.crash();
    assert_eq!(
        disk.durable_last_seq(),
        2,
        "policy + the one acknowledged record"
    );
}
