//! The load generator: groups of connections, each a closed loop with a pipelining window or an
//! open loop at a fixed rate, on small single-threaded tokio runtimes.
//!
//! Only answers count: a write counts when its acknowledgement arrives (bursar answers a write
//! only after the batch holding it is durable; Redis with `appendfsync always` only after the
//! AOF is fsynced). Throughput counts answers received inside the measurement window; latency
//! histograms hold requests sent inside it, measured from the write of the request to the
//! arrival of its answer.

use crate::workload::{commit_of, Encoder, Mix, Op, OpGen, OpKind, Outcome};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Open loop: most requests one connection may have unanswered before it skips sends.
const OPEN_LOOP_MAX_IN_FLIGHT: usize = 4096;
/// Rows of per-op tables: the ops, then the reserve→commit pair.
pub const ROWS: usize = 6;
/// Row of the reserve→commit pair.
pub const PAIR: usize = 5;

/// Where and how to talk.
#[derive(Clone)]
pub struct Target {
    /// Socket path.
    pub socket: PathBuf,
    /// Request encoder.
    pub encoder: Encoder,
    /// Answer parser: one complete answer at the start of the buffer.
    pub parse: fn(&[u8]) -> Option<(usize, Outcome)>,
}

/// A group of connections doing the same thing.
#[derive(Debug, Clone)]
pub struct Group {
    /// Connections.
    pub conns: usize,
    /// Requests in flight per connection (closed loop).
    pub depth: usize,
    /// Total requests per second over the group (open loop), or `None` (closed loop).
    pub rate: Option<f64>,
    /// What to send.
    pub mix: Mix,
    /// OS threads (each a current-thread runtime) serving this group's connections.
    pub threads: usize,
}

/// Counts and latencies of one op (or the pair).
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Latency, nanoseconds, of requests sent in the window.
    pub hist: Histogram<u64>,
    /// Successful answers received in the window.
    pub ok: u64,
    /// Denied answers received in the window.
    pub denied: u64,
    /// Error answers received at any time.
    pub errors: u64,
    /// Successful answers over the whole run (warm-up included).
    pub ok_total: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            hist: new_hist(),
            ok: 0,
            denied: 0,
            errors: 0,
            ok_total: 0,
        }
    }
}

fn new_hist() -> Histogram<u64> {
    // Auto-resizing; `new` fails only for more than 5 significant figures.
    Histogram::new(3).expect("a histogram with 3 significant figures")
}

impl OpStats {
    fn merge(&mut self, o: &OpStats) {
        let _ = self.hist.add(&o.hist);
        self.ok += o.ok;
        self.denied += o.denied;
        self.errors += o.errors;
        self.ok_total += o.ok_total;
    }
    /// Quantile in microseconds.
    pub fn us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The outcome of one group.
#[derive(Debug, Clone, Default)]
pub struct GroupResult {
    /// Per-op rows (`OpKind::index`, then [`PAIR`]).
    pub ops: [OpStats; ROWS],
    /// First error answer seen, for the report.
    pub first_error: Option<String>,
    /// Sends skipped because an open-loop connection had too much in flight.
    pub skipped: u64,
}

impl GroupResult {
    fn merge(&mut self, o: GroupResult) {
        for (a, b) in self.ops.iter_mut().zip(o.ops.iter()) {
            a.merge(b);
        }
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.skipped += o.skipped;
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Per group.
    pub groups: Vec<GroupResult>,
    /// Length of the measurement window.
    pub window: Duration,
    /// CPU seconds the server used in the window.
    pub server_cpu: f64,
    /// CPU seconds this process used in the window.
    pub client_cpu: f64,
}

impl RunResult {
    /// Add another run of the same groups: its counts and latencies, its window and CPU
    /// seconds (rates over the two windows together).
    pub fn merge(&mut self, o: RunResult) {
        if self.groups.len() < o.groups.len() {
            self.groups.resize(o.groups.len(), GroupResult::default());
        }
        for (a, b) in self.groups.iter_mut().zip(o.groups) {
            a.merge(b);
        }
        self.window += o.window;
        self.server_cpu += o.server_cpu;
        self.client_cpu += o.client_cpu;
    }
}

#[derive(Clone, Copy)]
struct Times {
    from: Instant,
    to: Instant,
}

struct Flight {
    op: Op,
    sent: Instant,
    pair_start: Instant,
}

/// Run the groups against `target` (whose server process is `server_pid`): warm up, then measure.
pub fn run(
    target: &Target,
    server_pid: u32,
    groups: &[Group],
    scopes: u64,
    warmup: Duration,
    duration: Duration,
    seed: u64,
) -> Result<RunResult, String> {
    let start = Instant::now() + Duration::from_millis(50);
    let times = Times {
        from: start + warmup,
        to: start + warmup + duration,
    };
    let mut handles = Vec::new();
    let mut conn_id = 0u32;
    for (gi, g) in groups.iter().enumerate() {
        let threads = g.threads.clamp(1, g.conns.max(1));
        for t in 0..threads {
            let mine: Vec<u32> = (0..g.conns)
                .filter(|c| c % threads == t)
                .map(|c| conn_id + c as u32)
                .collect();
            let target = target.clone();
            let g = g.clone();
            let h = std::thread::Builder::new()
                .name(format!("load-{gi}-{t}"))
                .spawn(move || -> Result<(usize, GroupResult), String> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    let result = rt.block_on(async move {
                        let mut tasks = Vec::new();
                        for c in mine {
                            let target = target.clone();
                            let g = g.clone();
                            tasks.push(tokio::spawn(async move {
                                conn_loop(target, g, c, scopes, seed, start, times).await
                            }));
                        }
                        let mut total = GroupResult::default();
                        for t in tasks {
                            match t.await {
                                Ok(Ok(r)) => total.merge(r),
                                Ok(Err(e)) => return Err(e),
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                        Ok(total)
                    })?;
                    Ok((gi, result))
                })
                .map_err(|e| e.to_string())?;
            handles.push(h);
        }
        conn_id += g.conns as u32;
    }
    // Sample CPU use over the window.
    sleep_until(times.from);
    let s0 = crate::procs::cpu_seconds(server_pid).unwrap_or(0.0);
    let c0 = crate::procs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    sleep_until(times.to);
    let s1 = crate::procs::cpu_seconds(server_pid).unwrap_or(0.0);
    let c1 = crate::procs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let mut results = vec![GroupResult::default(); groups.len()];
    for h in handles {
        let (gi, r) = h
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
        if let Some(slot) = results.get_mut(gi) {
            slot.merge(r);
        }
    }
    Ok(RunResult {
        groups: results,
        window: duration,
        server_cpu: s1 - s0,
        client_cpu: c1 - c0,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

async fn conn_loop(
    target: Target,
    g: Group,
    conn: u32,
    scopes: u64,
    seed: u64,
    start: Instant,
    t: Times,
) -> Result<GroupResult, String> {
    let stream = tokio::net::UnixStream::connect(&target.socket)
        .await
        .map_err(|e| format!("connect {}: {e}", target.socket.display()))?;
    // Reading and writing go on together: a client that only reads after writing everything
    // deadlocks with a server whose answers fill the socket buffer. Registered for reading
    // only, as bursard's connections are: registered for writing as well (tokio's own halves),
    // the client's thread is woken each time the server reads a request, with nothing to do
    // (benches/README.md, "Sockets registered for reading only"). The same for either system.
    let stream = stream.into_std().map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = bursard::conn_socket::split(stream).map_err(|e| e.to_string())?;
    let mut written = 0usize;
    let mut gen = OpGen::new(g.mix, scopes, conn, seed);
    let mut res = GroupResult::default();
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut inbuf: Vec<u8> = vec![0; 256 * 1024];
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut inflight: VecDeque<Flight> = VecDeque::new();
    let mut follow: VecDeque<(Op, Instant)> = VecDeque::new();
    let interval = g
        .rate
        .map(|r| Duration::from_secs_f64(g.conns.max(1) as f64 / r.max(1e-9)));
    // Spread the connections' schedules over one interval.
    let mut next_due = match interval {
        Some(iv) => start + iv.mul_f64(f64::from(conn % 997) / 997.0),
        None => start,
    };
    tokio::time::sleep_until(start.into()).await;
    loop {
        let now = Instant::now();
        if now >= t.to {
            break;
        }
        match interval {
            None => {
                while inflight.len() < g.depth.max(1) {
                    let (op, pair_start) =
                        follow.pop_front().unwrap_or_else(|| (gen.next_op(), now));
                    target.encoder.encode(&op, &mut out);
                    inflight.push_back(Flight {
                        op,
                        sent: now,
                        pair_start,
                    });
                }
            }
            Some(iv) => {
                while let Some((op, pair_start)) = follow.pop_front() {
                    target.encoder.encode(&op, &mut out);
                    inflight.push_back(Flight {
                        op,
                        sent: now,
                        pair_start,
                    });
                }
                while next_due <= now {
                    next_due += iv;
                    if inflight.len() >= OPEN_LOOP_MAX_IN_FLIGHT {
                        res.skipped += 1;
                        continue;
                    }
                    let op = gen.next_op();
                    target.encoder.encode(&op, &mut out);
                    inflight.push_back(Flight {
                        op,
                        sent: now,
                        pair_start: now,
                    });
                }
            }
        }
        if written > 0 && written == out.len() {
            out.clear();
            written = 0;
        }
        if hi == inbuf.len() {
            if lo > 0 {
                inbuf.copy_within(lo..hi, 0);
                hi -= lo;
                lo = 0;
            } else {
                inbuf.resize(inbuf.len() * 2, 0);
            }
        }
        let wake = match interval {
            Some(_) => next_due.min(t.to),
            None => t.to,
        };
        let pending = written < out.len();
        let n = tokio::select! {
            r = rd.read(&mut inbuf[hi..]) => r.map_err(|e| format!("read: {e}"))?,
            w = wr.write(&out[written..]), if pending => {
                written += w.map_err(|e| format!("write: {e}"))?;
                continue;
            }
            _ = tokio::time::sleep_until(wake.into()) => continue,
        };
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        hi += n;
        let now = Instant::now();
        while let Some((len, outcome)) = (target.parse)(&inbuf[lo..hi]) {
            let line = &inbuf[lo..lo + len];
            lo += len;
            let Some(f) = inflight.pop_front() else {
                return Err("an answer without a request".into());
            };
            let k = f.op.kind.index();
            let in_window = now >= t.from && now <= t.to;
            let sent_in_window = f.sent >= t.from;
            let Some(row) = res.ops.get_mut(k) else {
                continue;
            };
            match outcome {
                Outcome::Ok => {
                    row.ok_total += 1;
                    if in_window {
                        row.ok += 1;
                    }
                    if sent_in_window && in_window {
                        let _ = row.hist.record(nanos(now - f.sent));
                    }
                    if f.op.kind == OpKind::Reserve {
                        follow.push_back((commit_of(&f.op), f.pair_start));
                    }
                    if f.op.kind == OpKind::Commit {
                        let pair = &mut res.ops[PAIR];
                        pair.ok_total += 1;
                        if in_window {
                            pair.ok += 1;
                        }
                        if f.pair_start >= t.from && in_window {
                            let _ = pair.hist.record(nanos(now - f.pair_start));
                        }
                    }
                }
                Outcome::Denied => {
                    if in_window {
                        row.denied += 1;
                    }
                }
                Outcome::Error => {
                    row.errors += 1;
                    if res.first_error.is_none() {
                        res.first_error = Some(String::from_utf8_lossy(line).trim().to_string());
                    }
                }
            }
        }
        if lo == hi {
            lo = 0;
            hi = 0;
        }
    }
    Ok(res)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(ok: u64, latency_us: u64, secs: u64, server_cpu: f64) -> RunResult {
        let mut g = GroupResult::default();
        g.ops[0].ok = ok;
        g.ops[0].ok_total = ok;
        g.ops[0].hist.record(latency_us * 1000).unwrap();
        RunResult {
            groups: vec![g],
            window: Duration::from_secs(secs),
            server_cpu,
            client_cpu: 0.0,
        }
    }

    /// Rounds merged give rates over all their windows together, and latencies of every round.
    #[test]
    fn merged_rounds_count_every_round_over_their_windows_together() {
        let mut all = RunResult::default();
        all.merge(run_of(40_000, 100, 8, 8.0));
        all.merge(run_of(60_000, 300, 8, 10.0));
        let rate = all.groups[0].ops[0].ok as f64 / all.window.as_secs_f64();
        assert_eq!(rate, 6_250.0);
        assert_eq!(all.server_cpu / all.window.as_secs_f64(), 1.125);
        assert!(all.groups[0].ops[0].us(1.0) >= 299.0);
        assert!(all.groups[0].ops[0].us(0.0) <= 101.0);
    }
}
