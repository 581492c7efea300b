//! The systems under test as child processes: `bursard` (from next to this binary) and
//! `redis-server` (AOF with `appendfsync always`), each in its own temp dir, plus /proc readings.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a child may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(900);

/// A process we started; killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its temp dir (kept alive as long as the process, removed on drop).
    pub _dir: Option<tempfile::TempDir>,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its stderr/stdout log.
    pub log: PathBuf,
    /// From spawn to the first answer on its socket.
    pub ready_after: Duration,
}

impl Proc {
    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop with SIGTERM and wait (at most `timeout`, then SIGKILL).
    pub fn stop(&mut self, timeout: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// `bursard` next to this binary (target/release when run with `cargo run --release`).
pub fn bursard_path() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no exe dir")?;
    let p = dir.join("bursard");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build it first (`cargo build --release -p bursard`)",
            p.display()
        ))
    }
}

/// Start `bursard` with the bench policy in a new temp dir (or on `data_dir`, when given).
pub fn start_bursard(data_dir: Option<&Path>) -> Result<Proc, String> {
    let dir = tempfile::Builder::new()
        .prefix("bursar-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let socket = dir.path().join("bursar.sock");
    let data = match data_dir {
        Some(d) => d.to_path_buf(),
        None => dir.path().join("data"),
    };
    let config = dir.path().join("bursar.toml");
    let toml = crate::workload::policy_toml(&socket.to_string_lossy(), &data.to_string_lossy());
    std::fs::write(&config, toml).map_err(|e| e.to_string())?;
    let log = dir.path().join("bursard.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let bin = bursard_path()?;
    let spawned = Instant::now();
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start bursard: {e}"))?;
    let mut p = Proc {
        child,
        socket,
        _dir: Some(dir),
        data_dir: data,
        log,
        ready_after: Duration::ZERO,
    };
    wait_hello(&mut p, START_TIMEOUT)?;
    p.ready_after = spawned.elapsed();
    Ok(p)
}

/// Start `bursard` with the config file `config` (which names `socket` and `data`), its log in
/// `dir`.
pub fn start_bursard_with(
    config: &Path,
    dir: &Path,
    socket: &Path,
    data: &Path,
) -> Result<Proc, String> {
    let log = dir.join("bursard.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let spawned = Instant::now();
    let child = Command::new(bursard_path()?)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start bursard: {e}"))?;
    let mut p = Proc {
        child,
        socket: socket.to_path_buf(),
        _dir: None,
        data_dir: data.to_path_buf(),
        log,
        ready_after: Duration::ZERO,
    };
    wait_hello(&mut p, START_TIMEOUT)?;
    p.ready_after = spawned.elapsed();
    Ok(p)
}

/// Wait until the daemon answers `hello`; returns the time it took.
pub fn wait_hello(p: &mut Proc, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            return Err(format!("bursard exited ({status}) before answering: {log}"));
        }
        if let Ok(s) = UnixStream::connect(&p.socket) {
            if hello(s).is_ok() {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > timeout {
            return Err("bursard did not answer hello in time".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn hello(mut s: UnixStream) -> Result<String, String> {
    s.write_all(b"{\"op\":\"hello\",\"client\":\"bursar-bench\"}\n")
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.starts_with("{\"ok\":true") {
        Ok(line)
    } else {
        Err(line)
    }
}

/// Send one request line and read one answer line.
pub fn request(socket: &Path, line: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(b"\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

/// Find `redis-server`; if missing, try `apt-get install -y redis-server` once.
pub fn redis_server() -> Option<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("redis-server"))
                .find(|p| p.exists())
        })
    };
    if let Some(p) = find() {
        return Some(p);
    }
    eprintln!("redis-server not found; trying `apt-get install -y redis-server`");
    let install = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install(&["install", "-y", "redis-server"]) {
        let _ = install(&["update"]);
        let _ = install(&["install", "-y", "redis-server"]);
    }
    find()
}

/// Start `redis-server` in a temp dir: Unix socket only, AOF on, fsync before every answer.
pub fn start_redis(bin: &Path) -> Result<Proc, String> {
    let dir = tempfile::Builder::new()
        .prefix("bursar-bench-redis-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let mut p = start_redis_in(bin, dir.path())?;
    p._dir = Some(dir);
    Ok(p)
}

/// Start `redis-server` on `dir` (its AOF, if any, is loaded first); `ready_after` is the time
/// from spawn to the first answered PING.
pub fn start_redis_in(bin: &Path, dir: &Path) -> Result<Proc, String> {
    let socket = dir.join("redis.sock");
    let conf = dir.join("redis.conf");
    let text = format!(
        "port 0\nunixsocket {}\nunixsocketperm 700\ndir {}\nappendonly yes\nappendfsync always\n\
         save \"\"\ndaemonize no\nmaxclients 10000\nlogfile \"\"\n",
        socket.display(),
        dir.display()
    );
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    let log = dir.join("redis.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let spawned = Instant::now();
    let child = Command::new(bin)
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let mut p = Proc {
        child,
        socket,
        _dir: None,
        data_dir: dir.to_path_buf(),
        log,
        ready_after: Duration::ZERO,
    };
    let start = Instant::now();
    loop {
        if let Ok(crate::resp::Reply::Status(s)) = crate::resp::call(&p.socket, &[b"PING"]) {
            if s == "PONG" {
                break;
            }
        }
        if start.elapsed() > START_TIMEOUT {
            return Err("redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    p.ready_after = spawned.elapsed();
    Ok(p)
}

/// Resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) of a process so far, seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture we run on.
    Some((utime + stime) / 100.0)
}

/// Bytes allocated on disk to all files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                // Allocated blocks, like du(1).
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
