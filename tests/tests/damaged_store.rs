//! A damaged store is never served and never a panic (SPEC §7): the daemon exits 1 naming the
//! first bad seq (or the damaged file), offline `verify` names the seq, and `bursar salvage`
//! copies the intact prefix into a new data dir.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bursar, copy_dir, record, CliOutput, Client, Daemon};
use serde_json::json;
use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitStatus;

const EVENTS: u64 = 3000;
/// The event whose page gets damaged, and its distinctive label value.
const MARKER_EVENT: u64 = 1500;
const MARKER: &str = "marker-team-0f1e2d3c";

/// A stopped daemon's data dir holding `EVENTS` records (and a snapshot taken at its stop).
fn stopped_daemon_with_a_log() -> Daemon {
    let mut d = Daemon::start();
    let mut c = d.client();
    for chunk in 0..EVENTS / 100 {
        for i in 0..100 {
            let n = chunk * 100 + i;
            let team = if n == MARKER_EVENT {
                MARKER.to_string()
            } else {
                format!("t{}", n % 7)
            };
            c.send(&record(
                &format!("e{n}"),
                json!({ "team": team }),
                "gpt-4o-mini",
                1000,
                100,
            ));
        }
        for _ in 0..100 {
            assert_eq!(c.recv()["ok"], true);
        }
    }
    assert!(d.terminate().success());
    d
}

/// Run `bursard` on `data` and wait for it to exit (it must not start serving).
fn run_daemon_expecting_exit(data: &Path, socket: &Path) -> (ExitStatus, String) {
    let args = [
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--socket"),
        socket.as_os_str(),
    ];
    bursar_tests::bursard_until_exit(&args)
}

/// `bursar salvage --data-dir FROM --to TO`.
fn salvage(from: &Path, to: &Path) -> CliOutput {
    bursar(&[
        "salvage",
        "--data-dir",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ])
}

/// The seq offline `verify` names in "verify failed at seq N".
fn failed_seq(stderr: &str) -> Option<u64> {
    let rest = stderr.split("verify failed at seq ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_damaged_page_stops_the_daemon_naming_the_first_bad_seq_and_salvage_keeps_the_prefix() {
    let d = stopped_daemon_with_a_log();
    // Damage the page holding one event in the middle of the log: its label is stored as
    // literal text in the compressed record, so flip a byte of every copy of it in sled's data
    // file (sled may keep stale copies of the page; one is the live one).
    let scratch = tempfile::tempdir().unwrap();
    let damaged = scratch.path().join("damaged");
    copy_dir(&d.data_dir, &damaged);
    let db = damaged.join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    let hits: Vec<usize> = bytes
        .windows(MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == MARKER.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "the marker label is not in the data file");
    for i in hits {
        bytes[i + 3] ^= 0xff;
    }
    std::fs::write(&db, bytes).unwrap();
    let v = bursar(&["--data-dir", damaged.to_str().unwrap(), "verify"]);
    assert_eq!(v.code, Some(1), "{v:?}");
    assert!(!v.stderr.contains("panicked"), "{}", v.stderr);
    let bad = failed_seq(&v.stderr).unwrap_or_else(|| panic!("verify names no seq: {v:?}"));
    assert!(
        bad > 1 && bad <= MARKER_EVENT + 2,
        "the first bad seq is at or before the damaged event (seq {}, after policy_applied): {v:?}",
        MARKER_EVENT + 2
    );

    // The daemon checks the store on start and refuses to serve it, naming the seq.
    let socket = scratch.path().join("s.sock");
    let (status, err) = run_daemon_expecting_exit(&damaged, &socket);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("seq {bad}")), "{err}");
    assert!(err.contains("bursar salvage"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // One error, in bursard's words (SPEC §8: "one clear line"), not sled's as well.
    assert_eq!(
        err.lines().filter(|l| l.contains("ERROR")).count(),
        0,
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("damaged")).count(),
        1,
        "{err}"
    );
    assert!(!socket.exists(), "nothing was served");

    // Salvage copies seqs 1..bad-1 and says what it left behind.
    let new_dir = scratch.path().join("salvaged");
    let s = salvage(&damaged, &new_dir).ok();
    assert!(
        s.stdout
            .contains(&format!("salvaged seq 1 to {} ", bad - 1)),
        "{}",
        s.stdout
    );
    assert!(
        s.stdout
            .contains(&format!("left behind: everything from seq {bad} on")),
        "{}",
        s.stdout
    );
    let v = bursar(&["--data-dir", new_dir.to_str().unwrap(), "verify"]).ok();
    assert!(
        v.stdout.contains(&format!("ok: {} events", bad - 1)),
        "{}",
        v.stdout
    );
    // A second salvage into the same dir is refused: it writes only into a new one.
    let again = salvage(&damaged, &new_dir);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);

    // A daemon serves the salvaged dir.
    let mut fresh = Daemon {
        child: None,
        dir: tempfile::tempdir().unwrap(),
        socket: scratch.path().join("fresh.sock"),
        data_dir: new_dir,
        config: None,
        log: scratch.path().join("fresh.log"),
    };
    fresh.spawn().expect("a daemon starts on the salvaged dir");
    let mut c = Client::connect(&fresh.socket).unwrap();
    let verified = c.call(json!({"op":"verify"}));
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(
        verified["events"].as_u64().unwrap() >= bad - 1,
        "{verified}"
    );
}

#[test]
fn a_store_cut_in_half_is_refused_by_the_daemon_verify_and_salvage_without_a_panic() {
    let d = stopped_daemon_with_a_log();
    let db = d.data_dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let data = d.data_dir.to_str().unwrap();

    let socket = d.dir.path().join("again.sock");
    let (status, err) = run_daemon_expecting_exit(&d.data_dir, &socket);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("sled::"), "sled's own lines: {err}");
    assert!(
        err.contains(&format!("{}", db.display())) || err.contains("seq "),
        "names the damaged file or the first bad seq: {err}"
    );

    let v = bursar(&["--data-dir", data, "verify"]);
    assert_eq!(v.code, Some(1), "{}", v.stderr);
    assert!(!v.stderr.contains("panicked"), "{}", v.stderr);

    let to = d.dir.path().join("salvaged");
    let s = salvage(&d.data_dir, &to);
    assert!(!s.stderr.contains("panicked"), "{}", s.stderr);
    assert!(
        s.code == Some(1) || s.stdout.contains("left behind: everything from seq"),
        "either nothing could be read (exit 1) or a prefix was salvaged: {s:?}"
    );
}
