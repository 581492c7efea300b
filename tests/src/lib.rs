//! Test support: real `bursard` processes in temp dirs, and a small JSON Lines client.
//!
//! The binaries are found next to the test executable (`target/<profile>/`); `cargo test
//! --workspace` builds them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod nats;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Copy the directory `from` (files and subdirectories) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A child process killed and reaped when dropped, also when an assertion fails first (an
/// orphaned daemon would hold the test runner's output open).
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Path of a workspace binary (`bursard`, `bursar`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build it first (`cargo build --workspace`, which `cargo test --workspace` does)",
        path.display()
    );
    // `cargo test -p bursar-tests` rebuilds the daemon's library but not its binary: refuse a
    // binary older than any source it is made of, rather than test stale code.
    let crates: &[&str] = match name {
        "bursard" => &["daemon", "core", "schemas"],
        "bursar" => &["cli", "daemon", "core", "schemas"],
        _ => &[],
    };
    if let Ok(bin_time) = std::fs::metadata(&path).and_then(|m| m.modified()) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (i, krate) in crates.iter().enumerate() {
            let src = root.join(krate).join("src");
            // Another crate's binary (`daemon/src/main.rs` for `bursar`) is not made into it.
            let skip = (i > 0).then(|| src.join("main.rs"));
            if let Some((file, t)) = newest_source(&src, skip.as_deref()) {
                assert!(
                    bin_time >= t,
                    "{} is older than {}: run `cargo build --workspace` (or `cargo test --workspace`)",
                    path.display(),
                    file.display()
                );
            }
        }
    }
    path
}

/// Run `bursard` with `args` and wait for it to exit: a start that must fail. Its exit status
/// and stderr; a panic (after killing it) if it still runs after 30 s, i.e. it started.
pub fn bursard_until_exit<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (ExitStatus, String) {
    let mut child = Command::new(bin("bursard"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bursard");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait for bursard") {
            let out = child.wait_with_output().expect("bursard's stderr");
            return (status, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("bursard's stderr");
            panic!(
                "bursard started where it should have refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The most recently modified file under `dir`, recursively, but `skip`.
fn newest_source(dir: &Path, skip: Option<&Path>) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if Some(path.as_path()) == skip {
            None
        } else if path.is_dir() {
            newest_source(&path, skip)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (path, t))
        };
        if let Some((p, t)) = candidate {
            if newest.as_ref().is_none_or(|(_, n)| t > *n) {
                newest = Some((p, t));
            }
        }
    }
    newest
}

/// A running daemon in its own temp dir.
pub struct Daemon {
    /// The process.
    pub child: Option<Child>,
    /// Temp dir holding socket, data and config.
    pub dir: tempfile::TempDir,
    /// Socket path.
    pub socket: PathBuf,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Config file, if any.
    pub config: Option<PathBuf>,
    /// Stderr log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Start on the embedded default policy.
    pub fn start() -> Daemon {
        Self::start_with(None)
    }

    /// Start with this `bursar.toml` text.
    pub fn start_with_config(toml: &str) -> Daemon {
        Self::start_with(Some(toml))
    }

    fn start_with(toml: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bursar.sock");
        let data_dir = dir.path().join("data");
        let config = toml.map(|t| {
            let p = dir.path().join("bursar.toml");
            std::fs::write(&p, t).unwrap();
            p
        });
        let log = dir.path().join("bursard.log");
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            data_dir,
            config,
            log,
        };
        d.spawn().expect("daemon did not start");
        d
    }

    /// The command line this daemon runs with.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("bursard"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        // A test run under a service manager must not tell it about the daemons it starts.
        cmd.env("RUST_LOG", "info").env_remove("NOTIFY_SOCKET");
        cmd
    }

    /// Start the process and wait until it answers `hello`. Err carries its stderr.
    pub fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("bursard exited with {status}: {}", self.stderr()));
            }
            if let Ok(mut c) = Client::connect(&self.socket) {
                if c.call(json!({"op":"hello"}))["ok"] == true {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("bursard did not answer in time: {}", self.stderr()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect")
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            let pid = i32::try_from(c.id()).unwrap();
            // SAFETY-free: use the `kill` command rather than libc.
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(15);
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("bursard did not stop on SIGTERM: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kill -9 and start again on the same data.
    pub fn restart_after_kill(&mut self) {
        self.kill9();
        self.spawn().expect("restart");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking JSON Lines client.
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connect.
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Send one request without waiting.
    pub fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.writer.write_all(&line).unwrap();
    }

    /// Send one request without waiting; false when the daemon is gone (a killed daemon's
    /// socket: the crash loop's load stops there rather than panicking).
    pub fn try_send(&mut self, v: &Value) -> bool {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.writer.write_all(&line).is_ok()
    }

    /// Send raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Read one answer line.
    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read answer");
        assert!(n > 0, "connection closed by the daemon");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {line:?}"))
    }

    /// Read one line, or None at end of stream.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    /// An answer if one has started to arrive (waiting a few milliseconds at most), else `None`.
    pub fn poll_recv(&mut self) -> Option<Value> {
        use std::io::BufRead;
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(5)));
        let started = matches!(self.reader.fill_buf(), Ok(b) if !b.is_empty());
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)));
        started.then(|| self.recv())
    }

    /// Request and answer.
    pub fn call(&mut self, v: Value) -> Value {
        self.send(&v);
        self.recv()
    }

    /// Read stream lines until `{"ok":true,"end":true}`; returns (events, end line).
    pub fn read_stream(&mut self) -> (Vec<Value>, Value) {
        let mut events = Vec::new();
        loop {
            let v = self.recv();
            if v.get("event").is_some() {
                events.push(v["event"].clone());
            } else {
                return (events, v);
            }
        }
    }

    /// The underlying stream, for raw writes.
    pub fn raw_stream(&mut self) -> &mut UnixStream {
        &mut self.writer
    }

    /// Close the write side.
    pub fn shutdown_write(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }
}

/// A `record` request.
pub fn record(id: &str, labels: Value, model: &str, input: u64, output: u64) -> Value {
    json!({"op":"record","event_id":id,"labels":labels,"model":model,
           "usage":{"input_tokens":input,"output_tokens":output}})
}

/// A `reserve` request.
pub fn reserve(id: &str, labels: Value, model: &str, input: u64, max_out: u64) -> Value {
    json!({"op":"reserve","reservation_id":id,"labels":labels,"model":model,
           "estimate":{"input_tokens":input,"max_output_tokens":max_out}})
}

/// What one run of the `bursar` CLI did.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl CliOutput {
    /// Assert exit code 0 and return self.
    pub fn ok(self) -> CliOutput {
        assert_eq!(
            self.code,
            Some(0),
            "bursar failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// Stdout parsed as JSON Lines.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

/// A `bursar` command with a clean environment (no `BURSAR_SOCKET`), not yet run.
pub fn bursar_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("bursar"));
    cmd.args(args)
        .env_remove("BURSAR_SOCKET")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    cmd
}

/// Run `bursar` with exactly these arguments.
pub fn bursar(args: &[&str]) -> CliOutput {
    let out = bursar_command(args).output().expect("run bursar");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Daemon {
    /// Run `bursar --socket <this daemon's socket> ARGS`.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let socket = self.socket.to_str().expect("utf-8 path");
        let mut all = vec!["--socket", socket];
        all.extend_from_slice(args);
        bursar(&all)
    }

    /// Run `bursar --socket <socket> --json ARGS`, assert success, parse stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.cli(&all).ok().json()
    }

    /// Run `bursar --data-dir <this daemon's data dir> ARGS` (offline mode).
    pub fn offline(&self, args: &[&str]) -> CliOutput {
        let dir = self.data_dir.to_str().expect("utf-8 path");
        let mut all = vec!["--data-dir", dir];
        all.extend_from_slice(args);
        bursar(&all)
    }
}

/// Try `attempt` every `every` until it gives `Ok`, for at most `within`; past that, fail the
/// test with the last `Err` (what was seen instead).
pub fn eventually<T>(
    within: Duration,
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Ok(v) => return v,
            Err(seen) => assert!(Instant::now() < deadline, "after {within:?}: {seen}"),
        }
        std::thread::sleep(every);
    }
}

/// The daemon's Prometheus endpoint, scraped over loopback (`[daemon] metrics_listen`).
pub mod metrics {
    use crate::Daemon;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// The address the daemon says it serves metrics on (it binds port 0 here).
    pub fn metrics_addr(d: &Daemon) -> String {
        let log = d.stderr();
        log.split("metrics at http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no metrics address in the daemon's log: {log}"))
            .to_string()
    }

    /// One HTTP exchange: the status line and the body.
    pub fn get(addr: &str, request: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
        s.write_all(request.as_bytes()).expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// The body of `GET /metrics`.
    pub fn scrape(addr: &str) -> String {
        let (status, body) = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 200 OK");
        body
    }

    /// The value of the sample `name{labels}` (labels as printed, sorted by name), if present.
    pub fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Wait (up to 10 s) until `bursar_waiting_requests` on `addr` is `n`.
    pub fn wait_for_waiters(addr: &str, n: u64) {
        use std::time::Duration;
        super::eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || match sample(&scrape(addr), "bursar_waiting_requests") {
                now if now == Some(n as f64) => Ok(()),
                now => Err(format!("{now:?} requests wait, {n} expected")),
            },
        )
    }
}
