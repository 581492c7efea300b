//! bursard as a systemd service (examples/systemd/bursard.service): the unit's own command
//! lines run against a real daemon that reports readiness over `$NOTIFY_SOCKET` (sd_notify), and
//! the unit file as `systemd-analyze verify` reads it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bin, Client, Running};
use serde_json::json;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples/systemd/bursard.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The unit's paths moved into `root`: the installed binaries are the built ones, and
/// /etc/bursar, /var/lib/bursar and /run/bursar are directories under `root`.
fn relocate(text: &str, root: &Path) -> String {
    let bins = bin("bursard").parent().unwrap().display().to_string();
    text.replace("/usr/local/bin", &bins)
        .replace("/etc/bursar", &root.join("etc").display().to_string())
        .replace("/var/lib/bursar", &root.join("state").display().to_string())
        .replace("/run/bursar", &root.join("run").display().to_string())
}

/// The words of the unit's `key=` line (the unit quotes nothing).
fn command_line(unit: &str, key: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}= line"));
    line.split_whitespace().map(str::to_string).collect()
}

/// The next datagram on the notify socket, as text.
fn next_notification(notify: &UnixDatagram, what: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification while waiting for {what}: {e}"));
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn says(message: &str, assignment: &str) -> bool {
    message.lines().any(|l| l == assignment)
}

#[test]
fn the_units_daemon_says_ready_once_its_socket_answers_reloads_and_says_stopping_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let unit = relocate(&unit_text(), root.path());
    std::fs::create_dir(root.path().join("etc")).unwrap();
    std::fs::copy(
        examples().join("bursar.toml"),
        root.path().join("etc/bursar.toml"),
    )
    .unwrap();
    // What systemd makes before ExecStart: StateDirectory= (0700) and RuntimeDirectory=.
    std::fs::create_dir(root.path().join("state")).unwrap();
    std::fs::create_dir(root.path().join("run")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.path().join("state"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let socket = root.path().join("run/bursar.sock");
    let notify_path = root.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let start = command_line(&unit, "ExecStart");
    let log = root.path().join("bursard.log");
    let mut daemon = Running(
        Command::new(&start[0])
            .args(&start[1..])
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();

    // READY=1, and at that very moment the socket accepts a connection and answers.
    loop {
        let message = next_notification(&notify, "READY=1");
        assert!(!says(&message, "STOPPING=1"), "{message}");
        if says(&message, "READY=1") {
            break;
        }
    }
    let mut client = Client::connect(&socket).unwrap_or_else(|e| {
        panic!(
            "READY=1 arrived but {} refuses connections ({e}): {}",
            socket.display(),
            stderr()
        )
    });
    let hello = client.call(json!({"op":"hello"}));
    assert_eq!(hello["ok"], true, "{hello}");
    assert_eq!(hello["policy_version"], 1, "{hello}");

    // ExecReload= reloads the (unchanged) policy and succeeds.
    let reload = command_line(&unit, "ExecReload");
    let out = Command::new(&reload[0])
        .args(&reload[1..])
        .env_remove("BURSAR_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ExecReload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "policy version 1 in force (unchanged)\n"
    );
    // A bad policy file makes `systemctl reload` fail, and the running policy stays.
    std::fs::write(
        root.path().join("etc/bursar.toml"),
        "[[budget]]\nid = \"x\"\nmax_usd = \"lots\"\n",
    )
    .unwrap();
    let out = Command::new(&reload[0])
        .args(&reload[1..])
        .env_remove("BURSAR_SOCKET")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "ExecReload accepted a bad policy: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let hello = client.call(json!({"op":"hello"}));
    assert_eq!(hello["policy_version"], 1, "{hello}");

    // systemctl stop: SIGTERM (KillSignal=). STOPPING=1, then a clean exit.
    let pid = daemon.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    loop {
        let message = next_notification(&notify, "STOPPING=1");
        assert!(!says(&message, "READY=1"), "READY=1 again: {message}");
        if says(&message, "STOPPING=1") {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}: {}", stderr());
    assert!(!socket.exists(), "the socket is removed on a clean stop");
}

#[test]
fn a_daemon_that_cannot_start_never_says_ready() {
    let root = tempfile::tempdir().unwrap();
    let notify_path = root.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // The data dir is a file: bursard exits 1 and systemd must see a failed start.
    let not_a_dir = root.path().join("data");
    std::fs::write(&not_a_dir, "not a data dir").unwrap();
    let out = Command::new(bin("bursard"))
        .arg("--data-dir")
        .arg(&not_a_dir)
        .arg("--socket")
        .arg(root.path().join("bursar.sock"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    notify.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(!says(&message, "READY=1"), "READY=1 from a failed start");
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[test]
fn the_example_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian: apt-get install systemd), so \
             examples/systemd/bursard.service was not verified"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // verify checks that every Exec*= program exists: point them at the built binaries.
    let unit = unit_text();
    assert!(unit.contains("ExecStart=/usr/local/bin/bursard "), "{unit}");
    let bins = bin("bursard").parent().unwrap().display().to_string();
    let path = dir.path().join("bursard.service");
    std::fs::write(&path, unit.replace("/usr/local/bin", &bins)).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // systemd ignores what it cannot parse (an unknown key, a bad value) with a warning only.
    assert!(
        stderr.trim().is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify warned:\n{stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
