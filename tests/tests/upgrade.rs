//! A data dir written by an earlier version (frozen in `daemon/tests/fixtures/datadir-v1/`, see
//! its README) still opens: the daemon folds it to the same figures, its chain verifies, and
//! every request it ever answered is answered again as a duplicate with its original answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bin, copy_dir, Client, Running};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/tests/fixtures/datadir-v1")
}

fn start(dir: &Path) -> (Running, PathBuf) {
    let socket = dir.join("s.sock");
    let child = Command::new(bin("bursard"))
        .arg("--config")
        .arg(dir.join("bursar.toml"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("bursard.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Client::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not start on the old data dir: {}",
            std::fs::read_to_string(dir.join("bursard.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (running, socket)
}

fn answers(name: &str) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixture().join(name)).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(m) => m,
        _ => panic!("{name} is not an object"),
    }
}

#[test]
fn a_data_dir_of_the_first_format_opens_folds_the_same_and_answers_its_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    let (_daemon, socket) = start(tmp.path());
    let mut c = Client::connect(&socket).unwrap();

    let verify = c.call(serde_json::json!({"op":"verify"}));
    assert_eq!(verify["ok"], true, "{verify}");
    // 80 events were written; the reaper may have appended expiries since.
    assert!(verify["events"].as_u64().unwrap() >= 80, "{verify}");

    // Cumulative figures do not depend on when they are read: they equal what the old daemon
    // reported last.
    let old_status = &answers("answers-2.json")["status-2"]["answer"]["budgets"];
    let now_status = c.call(serde_json::json!({"op":"status","budget":"user-total"}));
    let spent = |budgets: &Value| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = budgets
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["budget"] == "user-total")
            .map(|b| {
                (
                    b["key"].as_str().unwrap().to_string(),
                    b["spent_tokens"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(spent(&now_status["budgets"]), spent(old_status));
    assert_eq!(spent(old_status).len(), 10);

    // Every request answered then is a duplicate now, with its original answer.
    let mut checked = 0;
    for file in ["answers-1.json", "answers-2.json"] {
        for (key, entry) in answers(file) {
            let op = entry["request"]["op"].as_str().unwrap().to_string();
            if !["record", "reserve", "commit", "release"].contains(&op.as_str()) {
                continue;
            }
            let got = c.call(entry["request"].clone());
            let mut expected = entry["answer"].clone();
            expected["duplicate"] = Value::Bool(true);
            assert_eq!(got, expected, "{file} {key}");
            checked += 1;
        }
    }
    assert_eq!(checked, 78, "every write of the fixture is checked");
}
