//! `bursar-bench churn`: a daemon's memory while sessions churn through many windows.
//!
//! SPEC §5 (revision 2): a scope whose window has ended and that holds nothing is no longer
//! live, leaves memory and no longer counts against `max_keys_per_budget`. This drives a real
//! `bursard` with one durable `record` per new session (a million by default) against a
//! per-session budget of short fixed windows, plus a per-team daily budget, and samples the
//! daemon's RSS as it goes. Flat means: the RSS of the last quarter is no higher than that of
//! the first quarter (after warm-up) by more than a small margin, although the sessions seen
//! grew fourfold.

use crate::procs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The churn policy: per-session windows of `window_seconds`, capped at `max_keys` live
/// sessions, and a per-team day.
fn policy(socket: &str, data_dir: &str, window_seconds: u64, max_keys: u64) -> String {
    format!(
        r#"[daemon]
socket = "{socket}"
data_dir = "{data_dir}"
max_keys_per_budget = {max_keys}
# Ids are remembered for a short while here, so that what is measured is the buckets' memory
# (the idempotency index holds ~N bytes per id for its window; see benches/README.md).
idempotency_window_seconds = 5

[[budget]]
id = "session"
group_by = ["session"]
window = "fixed"
window_seconds = {window_seconds}
max_requests = 1000

[[budget]]
id = "team-daily"
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 1000000
"#
    )
}

/// Options of the churn run.
pub struct ChurnOpts {
    /// Sessions (one record each).
    pub sessions: u64,
    /// Client connections.
    pub conns: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Length of the per-session windows.
    pub window_seconds: u64,
}

/// Run it and print the RSS timeline and the verdict.
pub fn churn(o: &ChurnOpts) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("bursar-churn-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let socket = dir.path().join("bursar.sock");
    let data = dir.path().join("data");
    let config = dir.path().join("bursar.toml");
    // Room for every session live at once in one window, not for all of them.
    let max_keys = 100_000;
    std::fs::write(
        &config,
        policy(
            &socket.to_string_lossy(),
            &data.to_string_lossy(),
            o.window_seconds,
            max_keys,
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut p = procs::start_bursard_with(&config, dir.path(), &socket, &data)?;
    let pid = p.pid();
    let done = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let per_conn = o.sessions / o.conns as u64;
    let mut threads = Vec::new();
    for c in 0..o.conns {
        let (socket, done, refused) = (socket.clone(), done.clone(), refused.clone());
        let depth = o.depth;
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let s = UnixStream::connect(&socket).map_err(|e| e.to_string())?;
            let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            let mut w = s;
            let mut line = String::new();
            let mut i = 0u64;
            while i < per_conn {
                let n = (per_conn - i).min(depth as u64);
                let mut out = Vec::with_capacity(256 * n as usize);
                for k in i..i + n {
                    let session = c as u64 * per_conn + k;
                    writeln!(
                        out,
                        r#"{{"op":"record","event_id":"c{session}","labels":{{"team":"t{}","session":"s{session}"}},"model":"gpt-4o-mini","usage":{{"input_tokens":100,"output_tokens":10}}}}"#,
                        session % 50
                    )
                    .map_err(|e| e.to_string())?;
                }
                w.write_all(&out).map_err(|e| e.to_string())?;
                for _ in 0..n {
                    line.clear();
                    r.read_line(&mut line).map_err(|e| e.to_string())?;
                    if !line.starts_with("{\"ok\":true") {
                        return Err(format!("refused: {line}"));
                    }
                    if line.contains("\"key\":\"(overflow)\"") {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(n, Ordering::Relaxed);
                i += n;
            }
            Ok(())
        }));
    }
    // Sample RSS until the writers are done.
    let sampler = {
        let (done, stop) = (done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples: Vec<(f64, u64, u64)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = procs::rss_bytes(pid) {
                    samples.push((
                        started.elapsed().as_secs_f64(),
                        done.load(Ordering::Relaxed),
                        rss,
                    ));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        })
    };
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some("a client thread panicked".into()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| "the sampler panicked")?;
    let elapsed = started.elapsed().as_secs_f64();
    let total = done.load(Ordering::Relaxed);
    if let Some(e) = failed {
        return Err(e);
    }
    let status = procs::request(&socket, r#"{"op":"status","budget":"session","limit":1}"#)?;
    p.stop(Duration::from_secs(30));
    println!(
        "churn: {total} sessions (one durable record each) in {elapsed:.1} s = {:.0} records/s, \
         {} conns × depth {}, per-session windows of {} s ({:.0} windows), max_keys_per_budget \
         {max_keys}; {} records went to the overflow bucket",
        total as f64 / elapsed,
        o.conns,
        o.depth,
        o.window_seconds,
        elapsed / o.window_seconds as f64,
        refused.load(Ordering::Relaxed)
    );
    println!("sessions done   RSS (MiB)");
    let step = (samples.len() / 20).max(1);
    for (t, n, rss) in samples.iter().step_by(step) {
        println!(
            "{n:>13}   {:>8.1}   (t = {t:.1} s)",
            *rss as f64 / 1048576.0
        );
    }
    let quarter = |lo: u64, hi: u64| {
        samples
            .iter()
            .filter(|(_, n, _)| *n >= lo && *n < hi)
            .map(|(_, _, r)| *r)
            .max()
            .unwrap_or(0)
    };
    let q = total / 4;
    let (first, last) = (quarter(q / 2, q), quarter(3 * q, total + 1));
    println!(
        "RSS max in the first quarter (after {} sessions): {:.1} MiB; in the last quarter: {:.1} MiB \
         (ratio {:.2}); a status of the session budget now: {}",
        q / 2,
        first as f64 / 1048576.0,
        last as f64 / 1048576.0,
        last as f64 / first.max(1) as f64,
        status.trim()
    );
    Ok(())
}
