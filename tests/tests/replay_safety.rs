//! `replay` as a hostile or careless client can use it (SPEC §6): no client-named path is opened
//! for a non-admin, an admin's import must be a bounded regular file, and a dry run runs off
//! the writer thread (other clients are served meanwhile), at most one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{record, Daemon};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A policy under which the test's own uid (the daemon's) is NOT an admin.
const NOT_ADMIN: &str = r#"
[daemon]
admin_uids = [4242424]

[[budget]]
id = "team"
group_by = ["team"]
max_usd = 100
"#;

fn replay_importing(path: &str) -> Value {
    json!({"op":"replay","pricing":{"import":path},"apply":false})
}

#[test]
fn a_non_admin_import_is_forbidden_without_saying_whether_the_file_exists() {
    let d = Daemon::start_with_config(NOT_ADMIN);
    let mut c = d.client();
    let existing = d.dir.path().join("bursar.toml");
    let answers: Vec<Value> = [
        existing.to_str().unwrap(),
        "/etc/shadow",
        "/no/such/file.json",
        "/dev/zero",
    ]
    .iter()
    .map(|p| c.call(replay_importing(p)))
    .collect();
    for a in &answers {
        assert_eq!(a["error"]["code"], "forbidden", "{a}");
    }
    let messages: Vec<&Value> = answers.iter().map(|a| &a["error"]["message"]).collect();
    assert!(
        messages.windows(2).all(|w| w[0] == w[1]),
        "the answer must not depend on the path: {messages:?}"
    );
    // A dry run without an import is for everyone.
    let a = c.call(json!({"op":"replay","pricing":{"models":{}}}));
    assert_eq!(a["ok"], true, "{a}");
}

#[test]
fn an_admin_import_must_be_a_bounded_regular_file_and_never_hangs_the_daemon() {
    let d = Daemon::start();
    let mut c = d.client();
    // /dev/zero used to grow the daemon's memory without end.
    let a = c.call(replay_importing("/dev/zero"));
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    assert_eq!(a["error"]["field"], "pricing.import");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{a}"
    );
    // A FIFO nobody writes to used to freeze every client, writes included.
    let fifo = d.dir.path().join("prices.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    let a = c.call(replay_importing(fifo.to_str().unwrap()));
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    let w = c.call(record(
        "after-fifo",
        json!({"team":"t"}),
        "gpt-4o-mini",
        1,
        1,
    ));
    assert_eq!(w["ok"], true, "writes go on: {w}");
    // Too large: one byte past 64 MiB (sparse, so the test writes nothing).
    let big = d.dir.path().join("big.json");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len((64 << 20) + 1).unwrap();
    let a = c.call(replay_importing(big.to_str().unwrap()));
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    assert!(
        a["error"]["message"].as_str().unwrap().contains("limit"),
        "{a}"
    );
    // A real file is read (and its errors are the admin's to see).
    let prices = d.dir.path().join("prices.json");
    std::fs::write(
        &prices,
        r#"{"gpt-4o-mini":{"litellm_provider":"openai","input_cost_per_token":0.000001,"output_cost_per_token":0.000002}}"#,
    )
    .unwrap();
    let a = c.call(replay_importing(prices.to_str().unwrap()));
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["applied"], false);
}

#[test]
fn a_dry_run_replay_never_stalls_other_clients_and_runs_one_at_a_time() {
    let d = Daemon::start();
    // A log long enough that folding it twice takes a while.
    let mut w = d.client();
    let n = 20_000;
    for chunk in 0..(n / 500) {
        let mut batch = Vec::new();
        for i in 0..500 {
            let id = chunk * 500 + i;
            let r = record(
                &format!("e-{id}"),
                json!({"team": format!("t{}", id % 50), "session": format!("s{id}")}),
                "gpt-4o-mini",
                100,
                10,
            );
            batch.extend_from_slice(r.to_string().as_bytes());
            batch.push(b'\n');
        }
        w.send_raw(&batch);
        for _ in 0..500 {
            assert_eq!(w.recv()["ok"], true);
        }
    }
    let dry = json!({"op":"replay","pricing":{"models":{"gpt-4o-mini":{"input_per_mtok":9.0,"output_per_mtok":9.0}}}});
    let mut a = d.client();
    a.send(&dry);
    // Another client's writes and reads are served while the dry run folds.
    let mut b = d.client();
    let started = Instant::now();
    let mut served_during = 0;
    let mut overloaded = None;
    loop {
        let r = b.call(record(
            &format!("during-{served_during}"),
            json!({"team":"x"}),
            "gpt-4o-mini",
            1,
            1,
        ));
        assert_eq!(r["ok"], true, "{r}");
        let s = b.call(json!({"op":"status","budget":"model-daily","limit":1}));
        assert_eq!(s["ok"], true, "{s}");
        served_during += 1;
        if overloaded.is_none() {
            // A second dry run while the first runs is refused, not queued.
            let second = b.call(dry.clone());
            overloaded = Some(second["error"]["code"] == "overloaded");
        }
        if let Some(answer) = a.poll_recv() {
            assert_eq!(answer["ok"], true, "{answer}");
            assert!(answer["events"].as_u64().unwrap() as usize > n, "{answer}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the dry run never answered"
        );
    }
    assert!(
        served_during >= 2,
        "other clients were served while the dry run ran ({served_during} rounds)"
    );
    assert_eq!(
        overloaded,
        Some(true),
        "a second dry run at the same time is overloaded"
    );
}
