//! The backup and archive recipes of docs/operations.md ("Backups and archives"), run as
//! written: a stopped daemon's data dir copied with `cp -a` is a complete data dir (it verifies
//! and a daemon serves the same figures from it), and JSON Lines exports taken in increments
//! with `--until T` / `--since T` hold every event once and chain one onto the next.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bursar, record, Daemon};
use serde_json::{json, Value};
use std::process::Command;

/// `n` usage events over two teams, all answered.
fn record_some(d: &Daemon, from: u64, n: u64) {
    let mut c = d.client();
    for i in from..from + n {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let answer = c.call(record(
            &format!("e-{i}"),
            json!({ "team": team }),
            "gpt-4o",
            1000 + i,
            100,
        ));
        assert_eq!(answer["ok"], true, "{answer}");
    }
}

fn spent(status: &Value) -> Vec<(String, Value)> {
    let mut rows: Vec<(String, Value)> = status["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                format!("{} {}", b["budget"], b["key"]),
                b["spent_micros"].clone(),
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[test]
fn a_stopped_daemons_data_dir_copied_with_cp_a_verifies_and_serves_the_same_figures() {
    let mut d = Daemon::start();
    record_some(&d, 0, 40);
    let before = d.cli_json(&["status"]);
    assert!(d.terminate().success());

    // The documented backup: `cp -a DATA_DIR BACKUP`, then `bursar --data-dir BACKUP verify`.
    let backup_root = tempfile::tempdir().unwrap();
    let backup = backup_root.path().join("bursar-data");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&d.data_dir)
        .arg(&backup)
        .status()
        .unwrap();
    assert!(cp.success());
    let backup_str = backup.to_str().unwrap();
    let verify = bursar(&["--data-dir", backup_str, "verify"]).ok().stdout;
    assert!(
        verify.starts_with("ok: 41 events, hash chain intact from seq 1 to 41"),
        "{verify}"
    );

    // The original goes on (its copy is not locked by it) ...
    d.spawn().unwrap();
    record_some(&d, 40, 5);
    let verify_while_running = bursar(&["--data-dir", backup_str, "verify"]);
    assert!(
        verify_while_running
            .ok()
            .stdout
            .starts_with("ok: 41 events"),
        "a backup verifies while the original daemon runs"
    );
    assert!(d.terminate().success());

    // ... and a restore is the copy put back: a daemon on it serves the figures of the backup.
    let mut restored = Daemon::start();
    assert!(restored.terminate().success());
    std::fs::remove_dir_all(&restored.data_dir).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&backup)
        .arg(&restored.data_dir)
        .status()
        .unwrap();
    assert!(cp.success());
    restored.spawn().unwrap();
    let after = restored.cli_json(&["status"]);
    assert_eq!(spent(&after), spent(&before));
    // A resend of an event the backup holds is still a duplicate.
    let mut c = restored.client();
    let again = c.call(record("e-3", json!({"team":"b"}), "gpt-4o", 1003, 100));
    assert_eq!(again["duplicate"], true, "{again}");
}

#[test]
fn jsonl_exports_in_increments_hold_every_event_once_and_chain_onto_each_other() {
    let d = Daemon::start();
    record_some(&d, 0, 30);
    let whole = d.cli(&["export", "--format", "jsonl"]).ok().json_lines();
    assert_eq!(whole.len(), 31);
    // Cut at the time of seq 17: `--until T` is everything before it, `--since T` the rest.
    let cut = whole[16]["time"].as_str().unwrap().to_string();
    let first = d
        .cli(&["export", "--format", "jsonl", "--until", &cut])
        .ok()
        .json_lines();
    let second = d
        .cli(&["export", "--format", "jsonl", "--since", &cut])
        .ok()
        .json_lines();
    assert_eq!(first.len(), 16);
    assert_eq!(first.len() + second.len(), whole.len());
    let joined: Vec<Value> = first.iter().chain(second.iter()).cloned().collect();
    assert_eq!(
        joined, whole,
        "the increments, concatenated, are the whole export"
    );
    // Each file's first event names the hash of the one before it: the archive is one chain.
    assert_eq!(second[0]["prev_hash"], first[15]["hash"]);
    for pair in joined.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
        assert_eq!(
            pair[1]["seq"].as_u64(),
            pair[0]["seq"].as_u64().map(|s| s + 1)
        );
    }
    let head = d.cli_json(&["verify"]);
    assert_eq!(
        json!(joined.last().unwrap()["hash"]),
        head["head"],
        "the last exported hash is the head `bursar verify` reports"
    );
}
