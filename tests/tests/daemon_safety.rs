//! One daemon per data dir, socket hygiene, permissions, signals, and hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bin, record, Client, Daemon};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused_with_a_clear_message() {
    let d = Daemon::start();
    let other_socket = d.dir.path().join("other.sock");
    let out = Command::new(bin("bursard"))
        .arg("--data-dir")
        .arg(&d.data_dir)
        .arg("--socket")
        .arg(&other_socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") || err.contains("locked") || err.contains("another"),
        "{err}"
    );
    assert!(!other_socket.exists());
    // The first one still serves.
    assert_eq!(d.client().call(json!({"op":"hello"}))["ok"], true);
}

#[test]
fn a_live_socket_is_never_touched_and_a_stale_one_is_replaced() {
    let mut d = Daemon::start();
    // Another data dir, same socket: refused, and the live daemon keeps its socket.
    let out = Command::new(bin("bursard"))
        .arg("--data-dir")
        .arg(d.dir.path().join("data2"))
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another daemon is listening"));
    assert!(
        !d.dir.path().join("data2").exists(),
        "a daemon refused for its socket creates no data dir"
    );
    assert_eq!(d.client().call(json!({"op":"hello"}))["ok"], true);
    // kill -9 leaves a stale socket file; the next start replaces it.
    d.kill9();
    assert!(d.socket.exists(), "kill -9 leaves the socket file behind");
    d.spawn().expect("start over a stale socket");
    assert_eq!(d.client().call(json!({"op":"hello"}))["ok"], true);
}

#[test]
fn a_daemon_refused_because_its_socket_is_in_use_appends_nothing_to_its_data_dir() {
    let d = Daemon::start();
    // A stopped daemon's data dir, and a new policy for it: a start would log `policy_applied`.
    let mut other = Daemon::start();
    other.terminate();
    let before = other.offline(&["--json", "verify"]).ok().json();
    let cfg = other.dir.path().join("new.toml");
    std::fs::write(&cfg, "[[budget]]\nid = \"x\"\nmax_usd = 3\n").unwrap();
    let out = Command::new(bin("bursard"))
        .arg("--data-dir")
        .arg(&other.data_dir)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another daemon is listening"), "{err}");
    let after = other.offline(&["--json", "verify"]).ok().json();
    assert_eq!(before, after, "the refused daemon appended to the log");
    assert_eq!(d.client().call(json!({"op":"hello"}))["ok"], true);
}

#[test]
fn socket_is_created_with_mode_0600() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

#[test]
fn sigterm_drains_and_exits_zero_removing_the_socket() {
    let mut d = Daemon::start();
    let mut c = d.client();
    for i in 0..20 {
        c.send(&record(&format!("e-{i}"), json!({}), "gpt-4o", 1, 1));
    }
    for _ in 0..20 {
        assert_eq!(c.recv()["ok"], true);
    }
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists());
    d.spawn().unwrap();
    let v = d.client().call(json!({"op":"verify"}));
    assert_eq!(v["events"], 21);
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_running_policy() {
    let mut d = Daemon::start_with_config("[[budget]]\nid = \"a\"\nmax_usd = 1\n");
    assert_eq!(d.client().call(json!({"op":"hello"}))["policy_version"], 1);
    let cfg = d.config.clone().unwrap();
    std::fs::write(&cfg, "[[budget]]\nid = \"a\"\nmax_usd = 2\n").unwrap();
    d.signal(1);
    let wait_version = |d: &Daemon, v: u64| {
        for _ in 0..200 {
            if d.client().call(json!({"op":"hello"}))["policy_version"] == v {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    };
    assert!(wait_version(&d, 2), "SIGHUP applied the new file");
    std::fs::write(&cfg, "[[budget]]\nid = \"a\"\nmax_usd = -2\n").unwrap();
    d.signal(1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        d.client().call(json!({"op":"hello"}))["policy_version"],
        2,
        "bad file: old policy kept"
    );
    let r = d.client().call(json!({"op":"reload"}));
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("max_usd"),
        "{r}"
    );
    assert!(d.stderr().contains("max_usd"), "the error is logged");
    let _ = &mut d;
}

#[test]
fn non_admin_reload_and_replay_apply_are_forbidden() {
    // Only root can connect as another uid; elsewhere there is nothing to test.
    if std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(1)
        != 0
    {
        eprintln!("skipped: not running as root, cannot connect as another uid");
        return;
    }
    let d = Daemon::start_with_config("[daemon]\nsocket_mode = \"0666\"\n");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = r#"
import socket, sys, json
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rwb')
for r in ({"op":"reload"}, {"op":"replay","pricing":{},"apply":True}, {"op":"status"}):
    f.write((json.dumps(r) + "\n").encode()); f.flush(); print(f.readline().decode().strip())
"#;
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&d.socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0]["error"]["code"], "forbidden");
    assert_eq!(lines[1]["error"]["code"], "forbidden");
    assert_eq!(lines[2]["ok"], true, "non-admins may still read");
    // The actor of an event is the peer's uid, not anything the client says.
    let d2 = &d;
    let mut c = d2.client();
    c.call(record("mine", json!({}), "gpt-4o", 1, 1));
    c.send(&json!({"op":"export"}));
    let (events, _) = c.read_stream();
    assert_eq!(events.last().unwrap()["actor"]["uid"], 0);
}

#[test]
fn bad_input_gets_structured_errors_and_the_connection_stays_usable() {
    let d = Daemon::start();
    let mut c = d.client();
    let cases: Vec<(&[u8], &str, Option<&str>)> = vec![
        (b"\x00\x01\x02\xff garbage\n", "bad_request", None),
        (b"\xff\xfe{\"op\":\"hello\"}\n", "bad_request", None),
        (b"{\"op\":\"record\",\"event_id\":\"x\"\n", "bad_request", None),
        (b"{\"op\":\"record\",\"event_id\":\"x\",\"model\":\"m\",\"usage\":{\"input_tokens\":-5}}\n", "bad_request", Some("usage.input_tokens")),
        (b"{\"op\":\"record\",\"event_id\":\"x\",\"model\":\"m\",\"usage\":{\"input_tokens\":1e30}}\n", "bad_request", Some("usage.input_tokens")),
        (b"{\"op\":\"record\",\"event_id\":\"x\",\"model\":\"m\",\"usage\":{\"input_tokens\":999999999999999}}\n", "bad_request", Some("usage")),
        (b"{\"op\":\"record\",\"event_id\":\"x\",\"model\":\"m\",\"usage\":{\"output_token\":5}}\n", "bad_request", Some("usage.output_token")),
        (b"{\"op\":\"record\",\"event_id\":\"x\",\"model\":\"m\",\"labels\":{\"tier\":\"free\"},\"usage\":{}}\n", "bad_request", Some("labels.tier")),
        (b"{\"op\":\"record\",\"event_id\":\"x\",\"model\":\"m\",\"labels\":{\"Bad Key\":\"v\"},\"usage\":{}}\n", "bad_request", Some("labels.Bad Key")),
        (b"{\"op\":\"fly\"}\n", "unknown_op", Some("op")),
        (b"{\"op\":\"status\",\"colour\":\"red\"}\n", "bad_request", Some("colour")),
        (b"[1,2,3]\n", "bad_request", None),
        (b"\n", "bad_request", None),
        (b"{\"op\":\"extend\",\"reservation_id\":\"r\",\"ttl_seconds\":999999}\n", "bad_request", Some("ttl_seconds")),
    ];
    for (line, code, field) in cases {
        c.send_raw(line);
        let a = c.recv();
        assert_eq!(a["ok"], false, "{line:?} → {a}");
        assert_eq!(a["error"]["code"], code, "{line:?} → {a}");
        if let Some(f) = field {
            assert_eq!(a["error"]["field"], f, "{line:?} → {a}");
        }
    }
    assert_eq!(c.call(json!({"op":"hello"}))["ok"], true, "still usable");
    // Nothing was appended for any of it.
    assert_eq!(c.call(json!({"op":"verify"}))["events"], 1);
}

#[test]
fn an_over_long_line_is_too_large_and_closes_only_that_connection() {
    let d = Daemon::start();
    let mut other = d.client();
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let big = vec![b'x'; 70 * 1024];
    let _ = s.write_all(&big);
    let _ = s.write_all(b"\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["error"]["code"], "too_large");
    assert_eq!(
        other.call(json!({"op":"hello"}))["ok"],
        true,
        "other clients are unaffected"
    );
}

#[test]
fn a_half_closed_socket_still_gets_its_answers() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.socket).unwrap();
    c.send(&record("h-1", json!({}), "gpt-4o", 1, 1));
    c.send_raw(b"{\"op\":\"hello\"}"); // no newline: the last line at end of stream still counts
    c.shutdown_write();
    assert_eq!(c.recv()["ok"], true);
    assert_eq!(c.recv()["protocol"], 1);
    assert!(c.try_recv().is_none());
}

/// A bad or missing config file is a start-up failure like any other (SPEC §8): exit 1 with
/// one line naming the file (and the line and key), and nothing touched.
#[test]
fn a_bad_or_missing_config_exits_1_with_one_line_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bursar.toml");
    std::fs::write(&cfg, "[[budget]]\nid = \"x\"\nwindow = \"sometimes\"\n").unwrap();
    for (file, names) in [
        (cfg.clone(), ["bursar.toml:3", "window"]),
        (dir.path().join("missing.toml"), ["missing.toml", "config"]),
    ] {
        let out = Command::new(bin("bursard"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(names.iter().all(|n| err.contains(n)), "{err}");
        assert!(
            !dir.path().join("d").exists(),
            "a bad config touches no data"
        );
    }
}

#[test]
fn socket_mode_0660_with_socket_group_gives_the_group_access() {
    // chown to a group needs root (or membership); elsewhere there is nothing to test.
    if std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(1)
        != 0
    {
        eprintln!("skipped: not running as root, cannot chown the socket to a group");
        return;
    }
    let d =
        Daemon::start_with_config("[daemon]\nsocket_mode = \"0660\"\nsocket_group = \"65534\"\n");
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    assert_eq!(d.client().call(json!({"op":"hello"}))["ok"], true);
}

/// Start `bursard` (config in `dir`) with this stderr and wait until it answers `hello`.
fn spawn_with_stderr(
    dir: &std::path::Path,
    stderr: Stdio,
) -> (std::process::Child, std::path::PathBuf) {
    let socket = dir.join("s.sock");
    let mut child = Command::new(bin("bursard"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--config")
        .arg(dir.join("bursar.toml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    // Close the reading end of a piped stderr at once: every later log line meets a closed pipe.
    drop(child.stderr.take());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("bursard exited with {status} before serving");
        }
        if let Ok(mut c) = Client::connect(&socket) {
            if c.call(json!({"op":"hello"}))["ok"] == true {
                return (child, socket);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bursard never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn send_signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_stderr_that_cannot_be_written_stops_neither_serving_nor_signals() {
    type MakeStderr = fn() -> Stdio;
    let cases: [(&str, MakeStderr); 2] = [
        ("a pipe whose reader is gone", Stdio::piped),
        ("/dev/full", || {
            Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            )
        }),
    ];
    for (what, stderr) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("bursar.toml");
        std::fs::write(&cfg, "[[budget]]\nid = \"a\"\nmax_usd = 1\n").unwrap();
        let (mut child, socket) = spawn_with_stderr(dir.path(), stderr());
        let mut c = Client::connect(&socket).unwrap();
        assert_eq!(
            c.call(record("e-1", json!({}), "gpt-4o", 1, 1))["ok"],
            true,
            "{what}: serves"
        );
        // SIGHUP still reloads (the signal thread logs as it does so).
        std::fs::write(&cfg, "[[budget]]\nid = \"a\"\nmax_usd = 2\n").unwrap();
        send_signal(&child, "HUP");
        let mut version = 0;
        for _ in 0..500 {
            version = c.call(json!({"op":"hello"}))["policy_version"]
                .as_u64()
                .unwrap();
            if version == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(version, 2, "{what}: SIGHUP reloads");
        // SIGTERM stops it, cleanly.
        send_signal(&child, "TERM");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{what}: bursard ignored SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "{what}: {status}");
    }
}

/// Every directory and file under `dir`, with its permission bits.
fn modes_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32, bool)> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        out.push((
            entry.path(),
            meta.permissions().mode() & 0o7777,
            meta.is_dir(),
        ));
        if meta.is_dir() {
            out.extend(modes_under(&entry.path()));
        }
    }
    out
}

fn assert_private(data: &std::path::Path) {
    let mode = std::fs::metadata(data).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
    let entries = modes_under(data);
    assert!(
        entries.iter().any(|(p, _, _)| p.ends_with("db")),
        "{entries:?}"
    );
    for (path, mode, is_dir) in entries {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", path.display());
    }
}

#[test]
fn a_data_dir_others_can_read_is_made_private_and_the_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = Daemon {
        child: None,
        socket: dir.path().join("s.sock"),
        data_dir: data_dir.clone(),
        config: None,
        log: dir.path().join("d.log"),
        dir,
    };
    d.spawn().unwrap();
    assert!(d.stderr().contains("tightened"), "{}", d.stderr());
    // Files sled creates while the daemon runs (blobs, its snapshots) are private too: they are
    // created under the daemon's umask.
    let pid = d.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "Umask:\t0077"),
        "the daemon's umask: {status}"
    );
    let mut c = d.client();
    for i in 0..50 {
        assert_eq!(
            c.call(record(&format!("p-{i}"), json!({}), "gpt-4o", 1, 1))["ok"],
            true
        );
    }
    drop(c);
    assert!(d.terminate().success());
    assert_private(&data_dir);
    // A data dir whose files are readable by others (copied with a loose umask) is tightened.
    for (path, _, is_dir) in modes_under(&data_dir) {
        let loose = if is_dir { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
    }
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.spawn().unwrap();
    assert_eq!(d.client().call(json!({"op":"verify"}))["events"], 51);
    assert!(d.terminate().success());
    assert_private(&data_dir);
    assert!(
        d.stderr().matches("tightened").count() >= 3,
        "every change is logged: {}",
        d.stderr()
    );
}
