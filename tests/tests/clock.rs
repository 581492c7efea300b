//! A wall clock that jumps: ledger time follows it, and the daemon says so (SPEC §2, §8).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bin, record, Client};
use serde_json::json;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an in-process daemon logs, as its stderr would show it.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

const TEN_YEARS_MICROS: i64 = 3_652 * 86_400 * 1_000_000;

#[test]
fn a_clock_jumping_years_ahead_is_followed_and_logged_as_a_warning() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("bursar.toml");
    std::fs::write(
        &toml,
        "[[budget]]\nid = \"daily\"\nwindow = \"fixed\"\nwindow_seconds = 86400\nmax_requests = 1\n",
    )
    .unwrap();
    let (socket, data) = (dir.path().join("s.sock"), dir.path().join("data"));
    let config =
        bursard::config::Config::resolve(Some(toml), Some(socket.clone()), Some(data.clone()))
            .unwrap();
    // Ten years before now, so that a real daemon started afterwards is ten years ahead.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let clock_value = Arc::new(AtomicI64::new(now - TEN_YEARS_MICROS));
    let cv = clock_value.clone();
    let clock: bursard::writer::Clock = Arc::new(move || cv.load(Ordering::SeqCst));
    let (stop, _) = tokio::sync::watch::channel(false);
    let stop2 = stop.clone();
    let t =
        std::thread::spawn(move || bursard::run_with(config, clock, false, None, stop2).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        if let Ok(c) = Client::connect(&socket) {
            break c;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    };
    let first = c.call(record("a", json!({}), "gpt-4o", 1, 1));
    assert_eq!(first["state"], "exhausted", "{first}");
    assert!(!logs.text().contains("clock jump"), "{}", logs.text());

    // The wall clock jumps ten years ahead and stays there: ledger time follows it (the daily
    // window rolls over), and the daemon says so.
    clock_value.fetch_add(TEN_YEARS_MICROS, Ordering::SeqCst);
    let r = c.call(json!({"op":"check","labels":{},"model":"gpt-4o",
                          "estimate":{"input_tokens":1,"max_output_tokens":1}}));
    assert_eq!(r["decision"], "allow", "a new window: {r}");
    let text = logs.text();
    let warning = text
        .lines()
        .find(|l| l.contains("clock jump"))
        .unwrap_or_else(|| panic!("no warning about the jump in:\n{text}"));
    assert!(
        warning.contains("WARN") && warning.contains("3652 days"),
        "{warning}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("clock jump")).count(),
        1,
        "logged once, not at every reading:\n{text}"
    );
    drop(c);
    stop.send_replace(true);
    t.join().unwrap();

    // A real daemon started on that log ten years later warns at start, on its stderr.
    let mut back = Command::new(bin("bursard"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("d.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    // Its first event is the default policy's `policy_applied`, at today's date.
    let stderr = loop {
        let text = std::fs::read_to_string(dir.path().join("d.log")).unwrap();
        if text.contains("listening") {
            break text;
        }
        assert!(back.try_wait().unwrap().is_none(), "bursard exited: {text}");
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = back.kill();
    let _ = back.wait();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("past the log's last event")),
        "{stderr}"
    );
}
