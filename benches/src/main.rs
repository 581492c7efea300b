//! `bursar-bench`: bursar's load generator and baselines.
//!
//! `cargo run --release -p bursar-bench -- all [--quick]` runs everything: the socket workloads
//! against a fresh `bursard` and, side by side in the same run, against `redis-server` with
//! `appendfsync always` and one Lua script per operation; then the log-side figures (replay,
//! start-up, memory, disk). See `benches/README.md` for figures and how to read them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod churn;
mod cluster;
mod load;
mod logbench;
mod procs;
mod resp;
mod workload;

/// The daemon's allocator, so that in-process figures (replay, memory) match the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand};
use load::{Group, RunResult, Target, PAIR};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use workload::{Encoder, Mix, OpKind};

#[derive(Parser, Debug)]
#[command(
    name = "bursar-bench",
    about = "bursar's load generator, Redis baseline, replay and start-up figures"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Everything: every workload against bursar and Redis, then replay, start-up, memory, disk.
    All(Opts),
    /// Durable `record` throughput.
    Record(Opts),
    /// `reserve` + `commit` pairs.
    ReserveCommit(Opts),
    /// `check` latency of one client while writes run in the background at a fixed rate.
    Check(Opts),
    /// 70 % check, 20 % reserve+commit, 10 % record.
    Mixed(Opts),
    /// What the client can drive at most: pipelined `hello` (Redis: PING), no disk involved.
    Ceiling(Opts),
    /// Generate a log and fold it completely.
    Replay(Opts),
    /// Generate a log; start-up to the first answered hello without and with a snapshot.
    Startup(Opts),
    /// Memory per active bucket.
    Memory(Opts),
    /// Cluster mode: three nodes over a 3-node NATS cluster, one partition (issue 15).
    Cluster(Opts),
    /// RSS of a daemon while a million sessions churn through many short windows (SPEC §5,
    /// live scopes): it must stay flat.
    Churn {
        /// Sessions, one durable record each.
        #[arg(long, default_value_t = 1_000_000)]
        sessions: u64,
        /// Client connections.
        #[arg(long, default_value_t = 16)]
        conns: usize,
        /// Requests in flight per connection.
        #[arg(long, default_value_t = 64)]
        depth: usize,
        /// Length of the per-session windows, seconds.
        #[arg(long, default_value_t = 1)]
        window_seconds: u64,
    },
    /// (internal) The in-process ledger memory figure, in a fresh process so that memory freed
    /// by earlier steps does not hide the growth; prints `buckets bytes_per_bucket`.
    #[command(hide = true)]
    MemoryLedger {
        /// Scopes to touch.
        scopes: u64,
    },
    /// The time of each `record` decided and applied in process, one after the other (the
    /// writer's and a follower's fold path, no socket, no disk): its tail is what growing the
    /// ledger costs, a stall every write of the batch (and every follower read) waits for.
    Stalls {
        /// Records, each with a new id.
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        /// Scopes (sessions) the records are spread over.
        #[arg(long, default_value_t = 200_000)]
        scopes: u64,
    },
    /// Print the bench policy (bursar.toml) for a daemon started by hand (e.g. under a profiler).
    Policy {
        /// Socket path to write into the policy.
        #[arg(long, default_value = "bursar.sock")]
        socket: String,
        /// Data dir to write into the policy.
        #[arg(long, default_value = "bursar-data")]
        data_dir: String,
    },
}

#[derive(Args, Debug, Clone)]
struct Opts {
    /// Small sizes and short runs (under a minute for `all`).
    #[arg(long)]
    quick: bool,
    /// Rounds per workload, bursar and Redis alternating which goes first (a machine whose
    /// speed drifts over minutes then weighs on both alike); the figures are over all rounds,
    /// and each round's ratio is printed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Client connections.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Requests in flight per connection (pipelining depth).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Open loop: total requests per second (default: closed loop, as fast as answers come).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds measured per run (default 10; quick 3).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up before measuring (default 2; quick 1).
    #[arg(long)]
    warmup: Option<f64>,
    /// Scopes (sessions) the labels are spread over.
    #[arg(long, default_value_t = 10_000)]
    scopes: u64,
    /// OS threads of the load generator (each a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// `check`: background writes per second.
    #[arg(long, default_value_t = 20_000.0)]
    bg_rate: f64,
    /// `check`: connections carrying the background writes.
    #[arg(long, default_value_t = 8)]
    bg_conns: usize,
    /// Target a running bursard on this socket instead of starting one (no Redis baseline).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Skip the Redis baseline.
    #[arg(long)]
    no_redis: bool,
    /// Events in the generated log (default 10,000,000; quick 200,000).
    #[arg(long)]
    events: Option<u64>,
    /// Events per group-commit record in the generated log.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Hours of log time the generated log's events are spread over (ending now).
    #[arg(long, default_value_t = 168.0)]
    span_hours: f64,
    /// Keep the generated log here (default: a temp dir; an existing one is reused).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl Opts {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.unwrap_or(if self.quick { 3.0 } else { 10.0 }))
    }
    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup.unwrap_or(if self.quick { 1.0 } else { 2.0 }))
    }
    fn events(&self) -> u64 {
        self.events
            .unwrap_or(if self.quick { 200_000 } else { 10_000_000 })
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bursar-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One figure of the final summary.
#[derive(Debug, Clone)]
struct Figure {
    name: String,
    target: String,
    bursar: String,
    redis: Option<String>,
    ratio: Option<f64>,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(
        &mut self,
        name: &str,
        target: &str,
        bursar: String,
        redis: Option<String>,
        ratio: Option<f64>,
    ) {
        self.figures.push(Figure {
            name: name.into(),
            target: target.into(),
            bursar,
            redis,
            ratio,
        });
    }

    fn print(&self) {
        println!();
        println!("== summary ==");
        println!(
            "| figure | target | bursar | redis baseline | bursar / redis |\n|---|---|---|---|---|"
        );
        for f in &self.figures {
            println!(
                "| {} | {} | {} | {} | {} |",
                f.name,
                f.target,
                f.bursar,
                f.redis.clone().unwrap_or_else(|| "—".into()),
                f.ratio
                    .map(|r| format!("{r:.2}×"))
                    .unwrap_or_else(|| "—".into())
            );
        }
    }
}

fn run(cmd: Cmd) -> Result<(), String> {
    let mut report = Report::default();
    if let Cmd::Policy { socket, data_dir } = &cmd {
        print!("{}", workload::policy_toml(socket, data_dir));
        return Ok(());
    }
    if let Cmd::Churn {
        sessions,
        conns,
        depth,
        window_seconds,
    } = &cmd
    {
        return churn::churn(&churn::ChurnOpts {
            sessions: *sessions,
            conns: *conns,
            depth: *depth,
            window_seconds: *window_seconds,
        });
    }
    if let Cmd::Stalls { events, scopes } = &cmd {
        return logbench::stalls(*events, *scopes);
    }
    if let Cmd::MemoryLedger { scopes } = &cmd {
        let (buckets, per) = logbench::memory_inprocess(*scopes)?;
        println!("{buckets} {per}");
        return Ok(());
    }
    let opts = match &cmd {
        Cmd::Policy { .. } | Cmd::MemoryLedger { .. } | Cmd::Churn { .. } | Cmd::Stalls { .. } => {
            return Ok(())
        }
        Cmd::All(o)
        | Cmd::Record(o)
        | Cmd::ReserveCommit(o)
        | Cmd::Check(o)
        | Cmd::Mixed(o)
        | Cmd::Ceiling(o)
        | Cmd::Replay(o)
        | Cmd::Startup(o)
        | Cmd::Memory(o)
        | Cmd::Cluster(o) => o.clone(),
    };
    print_machine();
    let redis = redis_bin(&opts);
    match cmd {
        Cmd::All(o) => {
            ceiling(&o, redis.as_ref(), &mut report)?;
            workload(&o, redis.as_ref(), Mix::Record, &mut report)?;
            workload(&o, redis.as_ref(), Mix::ReserveCommit, &mut report)?;
            check(&o, redis.as_ref(), &mut report)?;
            workload(&o, redis.as_ref(), Mix::Mixed, &mut report)?;
            // The summary is printed even when a log-side step fails.
            if let Err(e) = log_figures(&o, true, true, &mut report) {
                println!("log figures failed: {e}");
            }
            if let Err(e) = memory(&o, &mut report) {
                println!("memory figures failed: {e}");
            }
        }
        Cmd::Record(o) => workload(&o, redis.as_ref(), Mix::Record, &mut report)?,
        Cmd::ReserveCommit(o) => workload(&o, redis.as_ref(), Mix::ReserveCommit, &mut report)?,
        Cmd::Mixed(o) => workload(&o, redis.as_ref(), Mix::Mixed, &mut report)?,
        Cmd::Check(o) => check(&o, redis.as_ref(), &mut report)?,
        Cmd::Ceiling(o) => ceiling(&o, redis.as_ref(), &mut report)?,
        Cmd::Replay(o) => log_figures(&o, true, false, &mut report)?,
        Cmd::Startup(o) => log_figures(&o, true, true, &mut report)?,
        Cmd::Memory(o) => memory(&o, &mut report)?,
        Cmd::Cluster(o) => cluster::cluster(&o, &mut report)?,
        Cmd::Policy { .. } | Cmd::MemoryLedger { .. } | Cmd::Churn { .. } | Cmd::Stalls { .. } => {}
    }
    report.print();
    println!("\nload average at the end: {}", procs::loadavg());
    Ok(())
}

fn print_machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "machine: {cores} cores, {cpu}, kernel {kernel}; load average {}",
        procs::loadavg()
    );
}

fn redis_bin(o: &Opts) -> Option<PathBuf> {
    if o.no_redis || o.socket.is_some() {
        if o.socket.is_some() {
            println!("baseline: skipped (--socket targets an existing daemon)");
        } else {
            println!("baseline: skipped (--no-redis)");
        }
        return None;
    }
    match procs::redis_server() {
        Some(p) => {
            let version = std::process::Command::new(&p)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            println!("baseline: {version} (appendonly yes, appendfsync always, Unix socket)");
            Some(p)
        }
        None => {
            println!(
                "BASELINE SKIPPED: redis-server is not installed and `apt-get install -y redis-server` failed"
            );
            None
        }
    }
}

/// One system under test, started for one workload.
struct Sut {
    target: Target,
    pid: u32,
    proc_: Option<procs::Proc>,
}

fn bursar_sut(o: &Opts, run: u32) -> Result<Sut, String> {
    let encoder = Encoder::Bursar { run };
    match &o.socket {
        Some(s) => Ok(Sut {
            target: Target {
                socket: s.clone(),
                encoder,
                parse: workload::parse_bursar,
            },
            pid: 0,
            proc_: None,
        }),
        None => {
            let p = procs::start_bursard(None)?;
            Ok(Sut {
                target: Target {
                    socket: p.socket.clone(),
                    encoder,
                    parse: workload::parse_bursar,
                },
                pid: p.pid(),
                proc_: Some(p),
            })
        }
    }
}

fn redis_sut(bin: &std::path::Path, run: u32) -> Result<Sut, String> {
    let p = procs::start_redis(bin)?;
    let shas = resp::load_scripts(&p.socket)?;
    Ok(Sut {
        target: Target {
            socket: p.socket.clone(),
            encoder: Encoder::Redis { run, shas },
            parse: resp::parse_reply,
        },
        pid: p.pid(),
        proc_: Some(p),
    })
}

fn describe(g: &Group) -> String {
    match g.rate {
        Some(r) => format!("{} connections, open loop at {r:.0}/s", g.conns),
        None => format!("{} connections, depth {}, closed loop", g.conns, g.depth),
    }
}

fn fmt_rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_us(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Print per-op rows of one group for both systems, with ratios.
fn print_rows(label: &str, b: &RunResult, r: Option<&RunResult>, gi: usize) {
    let rows: Vec<(usize, &str)> = OpKind::ALL
        .iter()
        .map(|k| (k.index(), k.name()))
        .chain(std::iter::once((PAIR, "pair")))
        .collect();
    println!(
        "{:<8} {:<7} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
        label, "system", "ops/s", "p50 µs", "p99 µs", "p999 µs", "denied", "errors"
    );
    for (i, name) in rows {
        let line = |sys: &str, res: &RunResult| -> Option<(f64, [f64; 3])> {
            let g = res.groups.get(gi)?;
            let s = g.ops.get(i)?;
            if s.ok == 0 && s.errors == 0 && s.denied == 0 {
                return None;
            }
            let rate = s.ok as f64 / res.window.as_secs_f64();
            let q = [s.us(0.5), s.us(0.99), s.us(0.999)];
            println!(
                "{:<8} {:<7} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
                name,
                sys,
                fmt_rate(rate),
                fmt_us(q[0]),
                fmt_us(q[1]),
                fmt_us(q[2]),
                s.denied,
                s.errors
            );
            Some((rate, q))
        };
        let bl = line("bursar", b);
        let rl = r.and_then(|r| line("redis", r));
        if let (Some((br, bq)), Some((rr, rq))) = (bl, rl) {
            println!(
                "{:<8} {:<7} {:>9.2}× {:>8.2}× {:>8.2}× {:>8.2}×",
                name,
                "ratio",
                br / rr.max(1e-9),
                bq[0] / rq[0].max(1e-9),
                bq[1] / rq[1].max(1e-9),
                bq[2] / rq[2].max(1e-9)
            );
        }
    }
    let cpu = |res: &RunResult| {
        format!(
            "server {:.2} cores, load generator {:.2} cores",
            res.server_cpu / res.window.as_secs_f64(),
            res.client_cpu / res.window.as_secs_f64()
        )
    };
    let mut line = format!("cpu: bursar run: {}", cpu(b));
    if let Some(r) = r {
        let _ = write!(line, "; redis run: {}", cpu(r));
    }
    println!("{line}");
    for (sys, res) in std::iter::once(("bursar", b)).chain(r.map(|r| ("redis", r))) {
        for g in &res.groups {
            if let Some(e) = &g.first_error {
                println!("first error from {sys}: {e}");
            }
            if g.skipped > 0 {
                println!(
                    "{sys}: {} open-loop sends skipped (too many in flight)",
                    g.skipped
                );
            }
        }
    }
}

fn rate_of(res: &RunResult, gi: usize, row: usize) -> f64 {
    res.groups
        .get(gi)
        .and_then(|g| g.ops.get(row))
        .map(|s| s.ok as f64 / res.window.as_secs_f64())
        .unwrap_or(0.0)
}

fn total_rate(res: &RunResult, gi: usize) -> f64 {
    OpKind::ALL
        .iter()
        .map(|k| rate_of(res, gi, k.index()))
        .sum()
}

/// Run `groups` against bursar and (when available) Redis, each on a fresh server, for
/// `--rounds` rounds. Both systems' results over every round, the last round's two servers,
/// still running (dropping them stops them), and the last Redis round's own result (what its
/// server holds).
type Both = (
    RunResult,
    Option<RunResult>,
    Option<procs::Proc>,
    Option<procs::Proc>,
    Option<RunResult>,
);

fn both(o: &Opts, redis: Option<&PathBuf>, groups: &[Group]) -> Result<Both, String> {
    let rounds = o.rounds.max(1);
    let mut all: Option<(RunResult, Option<RunResult>)> = None;
    // The last round's servers and Redis result.
    let mut last = None;
    for round in 0..rounds {
        // Ids of their own in every round (a daemon given by `--socket` sees them all); the
        // first round's are those of a single run.
        let run_tag = std::process::id() % 100_000 + round * 100_000;
        // Alternating, and the last round bursar first, as a single run is (the disk and
        // start-up figures are taken on the last round's servers).
        let redis_first = (rounds - 1 - round) % 2 == 1 && redis.is_some();
        // The earlier round's servers stopped before this one starts.
        drop(last.take());
        let Round {
            bursar,
            bursar_proc,
            redis: redis_run,
            redis_proc,
        } = one_round(o, redis, groups, run_tag, redis_first)?;
        if rounds > 1 {
            let b_rate = total_rate(&bursar, 0);
            let r_rate = redis_run.as_ref().map(|r| total_rate(r, 0));
            println!(
                "round {} of {rounds} ({} first): bursar {} ops/s{}",
                round + 1,
                if redis_first { "Redis" } else { "bursar" },
                fmt_rate(b_rate),
                r_rate.map_or(String::new(), |r| format!(
                    ", Redis {} ops/s, ratio {:.2}×",
                    fmt_rate(r),
                    b_rate / r.max(1e-9)
                ))
            );
        }
        all = Some(match all.take() {
            None => (bursar, redis_run.clone()),
            Some((mut b, r)) => {
                b.merge(bursar);
                let r = match (r, redis_run.clone()) {
                    (Some(mut r), Some(rr)) => {
                        r.merge(rr);
                        Some(r)
                    }
                    (r, _) => r,
                };
                (b, r)
            }
        });
        last = Some((bursar_proc, redis_proc, redis_run));
    }
    let ((b, r), (bursar_proc, redis_proc, redis_run)) = all.zip(last).ok_or("no round ran")?;
    Ok((b, r, bursar_proc, redis_proc, redis_run))
}

/// One round's results, and its servers, still running.
struct Round {
    bursar: RunResult,
    bursar_proc: Option<procs::Proc>,
    redis: Option<RunResult>,
    redis_proc: Option<procs::Proc>,
}

/// One round: the same load against bursar and (when available) Redis, Redis first when
/// `redis_first`.
fn one_round(
    o: &Opts,
    redis: Option<&PathBuf>,
    groups: &[Group],
    run_tag: u32,
    redis_first: bool,
) -> Result<Round, String> {
    // The same load, against either system.
    let run_on = |target: &Target, pid| {
        load::run(
            target,
            pid,
            groups,
            o.scopes,
            o.warmup(),
            o.duration(),
            o.seed,
        )
    };
    let on_redis = || -> Result<Option<(RunResult, Option<procs::Proc>)>, String> {
        match redis {
            Some(bin) => {
                let mut r = redis_sut(bin, run_tag)?;
                let res = run_on(&r.target, r.pid)?;
                Ok(Some((res, r.proc_.take())))
            }
            None => Ok(None),
        }
    };
    let first = if redis_first { on_redis()? } else { None };
    let mut b = bursar_sut(o, run_tag)?;
    let bursar = run_on(&b.target, b.pid)?;
    let bursar_proc = b.proc_.take();
    let (redis, redis_proc) = match if redis_first { first } else { on_redis()? } {
        Some((res, p)) => (Some(res), p),
        None => (None, None),
    };
    Ok(Round {
        bursar,
        bursar_proc,
        redis,
        redis_proc,
    })
}

fn ratio(b: f64, r: Option<f64>) -> Option<f64> {
    r.map(|r| b / r.max(1e-9))
}

fn workload(
    o: &Opts,
    redis: Option<&PathBuf>,
    mix: Mix,
    report: &mut Report,
) -> Result<(), String> {
    let g = Group {
        conns: o.conns,
        depth: o.depth,
        rate: o.rate,
        mix,
        threads: o.client_threads,
    };
    let name = match mix {
        Mix::Record => "record",
        Mix::ReserveCommit => "reserve+commit",
        Mix::Mixed => "mixed (70 % check, 20 % reserve+commit, 10 % record)",
        Mix::Check => "check",
        Mix::Hello => "hello",
    };
    println!(
        "\n== {name}: {}, {} scopes, {:.0} s measured after {:.0} s warm-up ==",
        describe(&g),
        o.scopes,
        o.duration().as_secs_f64(),
        o.warmup().as_secs_f64()
    );
    let (b, r, bproc, rproc, r_last) = both(o, redis, std::slice::from_ref(&g))?;
    print_rows("op", &b, r.as_ref(), 0);
    let clients = format!(
        "{} clients{}",
        o.conns,
        if o.depth > 1 {
            format!(", depth {}", o.depth)
        } else {
            String::new()
        }
    );
    match mix {
        Mix::Record => {
            let br = rate_of(&b, 0, OpKind::Record.index());
            let rr = r.as_ref().map(|r| rate_of(r, 0, OpKind::Record.index()));
            report.add(
                &format!("durable `record` throughput, {clients}"),
                "≥ 3× Redis (issue 14)",
                format!("{} events/s", fmt_rate(br)),
                rr.map(|x| format!("{} events/s", fmt_rate(x))),
                ratio(br, rr),
            );
            let lat = |res: &RunResult| res.groups[0].ops[OpKind::Record.index()].us(0.99);
            report.add(
                "`record` p99 latency (same run)",
                "—",
                format!("{} µs", fmt_us(lat(&b))),
                r.as_ref().map(|r| format!("{} µs", fmt_us(lat(r)))),
                r.as_ref().map(|r| lat(&b) / lat(r).max(1e-9)),
            );
            if let Some(p) = bproc {
                // The last round's Redis holds that round's events only.
                let redis = match (redis, rproc, r_last.as_ref()) {
                    (Some(bin), Some(rp), Some(rr)) => {
                        Some((bin, rp, rr.groups[0].ops[OpKind::Record.index()].ok_total))
                    }
                    _ => None,
                };
                disk_of_run(p, redis, report)?;
            }
        }
        Mix::ReserveCommit => {
            let br = rate_of(&b, 0, PAIR);
            let rr = r.as_ref().map(|r| rate_of(r, 0, PAIR));
            report.add(
                &format!("`reserve+commit` pairs, {clients}"),
                "≥ 3× Redis (issue 14)",
                format!("{} pairs/s", fmt_rate(br)),
                rr.map(|x| format!("{} pairs/s", fmt_rate(x))),
                ratio(br, rr),
            );
        }
        Mix::Mixed => {
            let br = total_rate(&b, 0);
            let rr = r.as_ref().map(|r| total_rate(r, 0));
            report.add(
                &format!("mixed ops (70/20/10), {clients}"),
                "—",
                format!("{} ops/s", fmt_rate(br)),
                rr.map(|x| format!("{} ops/s", fmt_rate(x))),
                ratio(br, rr),
            );
        }
        Mix::Check | Mix::Hello => {}
    }
    Ok(())
}

/// Bytes on disk per event and start-up after a crash, on the record run's data: bursard's
/// data dir (idempotency index and all) and Redis's AOF dir, each over its own acknowledged
/// events.
fn disk_of_run(
    mut p: procs::Proc,
    redis: Option<(&PathBuf, procs::Proc, u64)>,
    report: &mut Report,
) -> Result<(), String> {
    let answer = procs::request(
        &p.socket,
        r#"{"op":"record","event_id":"disk-probe","labels":{},"model":"gpt-4o-mini","usage":{"input_tokens":1,"output_tokens":1}}"#,
    )?;
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
    let events = v["seq"].as_u64().unwrap_or(0);
    let bytes = procs::dir_bytes(&p.data_dir);
    let per = bytes as f64 / events.max(1) as f64;
    println!(
        "disk: bursard data dir after the record run: {} bytes for {} events = {per:.0} bytes/event",
        fmt_rate(bytes as f64),
        fmt_rate(events as f64)
    );
    // Crash (SIGKILL) and restart on the same data: what start-up costs after this run.
    let _ = p.child.kill();
    let _ = p.child.wait();
    std::thread::sleep(Duration::from_millis(300));
    let restarted = procs::start_bursard(Some(&p.data_dir))?;
    let b_start = restarted.ready_after;
    drop(restarted);
    println!(
        "start-up after kill -9 on that data dir: {:.0} ms to the first answered hello",
        b_start.as_secs_f64() * 1000.0
    );
    let mut r_fig = None;
    if let Some((bin, mut rp, acked)) = redis {
        let rbytes = procs::dir_bytes(&rp.data_dir);
        let rper = rbytes as f64 / acked.max(1) as f64;
        println!(
            "disk: redis dir (AOF) after the record run: {} bytes for {} acknowledged records = {rper:.0} bytes/event",
            fmt_rate(rbytes as f64),
            fmt_rate(acked as f64)
        );
        let _ = rp.child.kill();
        let _ = rp.child.wait();
        let dir = rp.data_dir.clone();
        let again = procs::start_redis_in(bin, &dir)?;
        let r_start = again.ready_after;
        drop(again);
        drop(rp);
        println!(
            "redis start-up after kill -9 (AOF load): {:.0} ms to the first answered PING",
            r_start.as_secs_f64() * 1000.0
        );
        r_fig = Some((rper, r_start));
    }
    report.add(
        "disk per event (data dir after the record run, idempotency index included)",
        "≤ 300 bytes",
        format!("{per:.0} bytes"),
        r_fig.map(|(x, _)| format!("{x:.0} bytes (AOF)")),
        r_fig.map(|(x, _)| per / x.max(1e-9)),
    );
    report.add(
        &format!(
            "start-up after kill -9 on the record run's data ({} events)",
            fmt_rate(events as f64)
        ),
        "—",
        format!("{:.0} ms", b_start.as_secs_f64() * 1000.0),
        r_fig.map(|(_, t)| format!("{:.0} ms (AOF load)", t.as_secs_f64() * 1000.0)),
        r_fig.map(|(_, t)| b_start.as_secs_f64() / t.as_secs_f64().max(1e-9)),
    );
    Ok(())
}

fn ceiling(o: &Opts, redis: Option<&PathBuf>, report: &mut Report) -> Result<(), String> {
    let depth = o.depth.max(16);
    let g = Group {
        conns: o.conns,
        depth,
        rate: None,
        mix: Mix::Hello,
        threads: o.client_threads,
    };
    println!(
        "\n== client ceiling: pipelined hello (Redis: PING), {} ==",
        describe(&g)
    );
    let (b, r, _, _, _) = both(o, redis, std::slice::from_ref(&g))?;
    print_rows("op", &b, r.as_ref(), 0);
    let br = rate_of(&b, 0, OpKind::Hello.index());
    let rr = r.as_ref().map(|r| rate_of(r, 0, OpKind::Hello.index()));
    report.add(
        &format!(
            "client ceiling: pipelined `hello`, {} clients, depth {depth}",
            o.conns
        ),
        "(well above every write figure)",
        format!("{} ops/s", fmt_rate(br)),
        rr.map(|x| format!("{} ops/s (PING)", fmt_rate(x))),
        ratio(br, rr),
    );
    Ok(())
}

fn check(o: &Opts, redis: Option<&PathBuf>, report: &mut Report) -> Result<(), String> {
    let groups = [
        Group {
            conns: 1,
            depth: 1,
            rate: None,
            mix: Mix::Check,
            threads: 1,
        },
        Group {
            conns: o.bg_conns,
            depth: 1,
            rate: Some(o.bg_rate),
            mix: Mix::Record,
            threads: 1,
        },
    ];
    println!(
        "\n== check: 1 client, closed loop, while {} background `record`s/s run on {} connections; {} scopes ==",
        fmt_rate(o.bg_rate),
        o.bg_conns,
        o.scopes
    );
    let (b, r, _, _, _) = both(o, redis, &groups)?;
    println!("-- foreground");
    print_rows("op", &b, r.as_ref(), 0);
    println!("-- background writes");
    print_rows("op", &b, r.as_ref(), 1);
    let q = |res: &RunResult, p: f64| res.groups[0].ops[OpKind::Check.index()].us(p);
    let bg = |res: &RunResult| rate_of(res, 1, OpKind::Record.index());
    report.add(
        &format!(
            "`check` p50, 1 client, while {} writes/s run (achieved: {})",
            fmt_rate(o.bg_rate),
            fmt_rate(bg(&b))
        ),
        "≤ 20 µs",
        format!("{} µs", fmt_us(q(&b, 0.5))),
        r.as_ref().map(|r| {
            format!(
                "{} µs (writes achieved {})",
                fmt_us(q(r, 0.5)),
                fmt_rate(bg(r))
            )
        }),
        r.as_ref().map(|r| q(&b, 0.5) / q(r, 0.5).max(1e-9)),
    );
    report.add(
        "`check` p99, same run",
        "≤ 100 µs",
        format!("{} µs", fmt_us(q(&b, 0.99))),
        r.as_ref().map(|r| format!("{} µs", fmt_us(q(r, 0.99)))),
        r.as_ref().map(|r| q(&b, 0.99) / q(r, 0.99).max(1e-9)),
    );
    report.add(
        "`check` p999, same run",
        "—",
        format!("{} µs", fmt_us(q(&b, 0.999))),
        r.as_ref().map(|r| format!("{} µs", fmt_us(q(r, 0.999)))),
        r.as_ref().map(|r| q(&b, 0.999) / q(r, 0.999).max(1e-9)),
    );
    Ok(())
}

fn log_figures(o: &Opts, replay: bool, startup: bool, report: &mut Report) -> Result<(), String> {
    let events = o.events();
    let tmp = tempfile::Builder::new()
        .prefix("bursar-bench-log-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = o.log_dir.clone().unwrap_or_else(|| tmp.path().join("data"));
    let reuse = dir.exists();
    if reuse {
        println!("\n== log: reusing {} ==", dir.display());
    } else {
        println!(
        "\n== log: generating {} events ({} per record, {} scopes, spread over {} h) through bursard::log::SledLog ==",
        fmt_rate(events as f64),
        o.batch,
        o.scopes,
        o.span_hours
    );
    }
    if !reuse {
        let g = logbench::generate(
            &dir,
            events,
            o.batch,
            o.scopes,
            o.seed,
            Duration::from_secs_f64(o.span_hours * 3600.0),
        )?;
        let per = g.disk_bytes as f64 / g.events.max(1) as f64;
        println!(
            "generated {} events in {:.1} s ({} events/s); data dir {} bytes = {per:.0} bytes/event",
            fmt_rate(g.events as f64),
            g.secs,
            fmt_rate(g.events as f64 / g.secs),
            fmt_rate(g.disk_bytes as f64)
        );
        report.add(
            &format!(
                "disk per event (generated log of {} events, log tree only)",
                fmt_rate(g.events as f64)
            ),
            "≤ 300 bytes",
            format!("{per:.0} bytes"),
            None,
            None,
        );
    }
    if replay || startup {
        let r = logbench::replay(&dir)?;
        let rate = r.events as f64 / r.fold_secs;
        println!(
            "replay: sled open {:.2} s; writer::recover {:.2} s for {} events = {} events/s; {} buckets, {} live holds",
            r.open_secs,
            r.fold_secs,
            fmt_rate(r.events as f64),
            fmt_rate(rate),
            fmt_rate(r.buckets as f64),
            fmt_rate(r.holds as f64)
        );
        println!(
            "  of which the log alone (read, decode, chain check; one thread, no fold): {:.2} s = {} events/s",
            r.decode_secs,
            fmt_rate(r.events as f64 / r.decode_secs)
        );
        println!(
            "snapshot of that ledger: {} bytes ({:.0} bytes/bucket), encoded in {:.2} s",
            fmt_rate(r.snapshot_bytes as f64),
            r.snapshot_bytes as f64 / r.buckets.max(1) as f64,
            r.snapshot_encode_secs
        );
        for (what, secs, rows) in &r.reports {
            println!(
                "report {what}: {:.0} ms, {} rows, from the rollups of {} events",
                secs * 1000.0,
                fmt_rate(*rows as f64),
                fmt_rate(r.events as f64)
            );
            report.add(
                &format!("report {what} ({} events)", fmt_rate(r.events as f64)),
                "≤ 1 s",
                format!("{:.0} ms", secs * 1000.0),
                None,
                None,
            );
        }
        report.add(
            &format!("full replay ({} events)", fmt_rate(r.events as f64)),
            "≥ 1,000,000 events/s",
            format!("{} events/s", fmt_rate(rate)),
            None,
            None,
        );
        if startup {
            let s = logbench::startup_cycle(&dir)?;
            println!(
                "start-up without a snapshot: {:.0} ms to the first answered hello (RSS then {} MiB)",
                s.without.as_secs_f64() * 1000.0,
                s.rss_without / (1 << 20)
            );
            println!(
                "start-up with the daemon's own snapshot: {:.0} ms (RSS then {} MiB)",
                s.with.as_secs_f64() * 1000.0,
                s.rss_with / (1 << 20)
            );
            report.add(
                &format!(
                    "start-up, {} events logged, no snapshot",
                    fmt_rate(r.events as f64)
                ),
                "≤ 10 s",
                format!("{:.0} ms", s.without.as_secs_f64() * 1000.0),
                None,
                None,
            );
            report.add(
                &format!(
                    "start-up, {} events logged, with snapshot",
                    fmt_rate(r.events as f64)
                ),
                "≤ 500 ms",
                format!("{:.0} ms", s.with.as_secs_f64() * 1000.0),
                None,
                None,
            );
        }
    }
    Ok(())
}

/// [`logbench::memory_inprocess`] in a fresh copy of this program (see `Cmd::MemoryLedger`).
fn memory_ledger_child(scopes: u64) -> Result<(usize, f64), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let out = std::process::Command::new(exe)
        .args(["memory-ledger", &scopes.to_string()])
        .output()
        .map_err(|e| format!("cannot run the memory child: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (
        words.next().and_then(|w| w.parse().ok()),
        words.next().and_then(|w| w.parse().ok()),
    ) {
        (Some(buckets), Some(per)) if out.status.success() => Ok((buckets, per)),
        _ => Err(format!(
            "the memory child failed ({}): {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn memory(o: &Opts, report: &mut Report) -> Result<(), String> {
    let scopes = if o.quick { 50_000 } else { 200_000 };
    println!(
        "\n== memory: one record per scope over {} scopes ==",
        fmt_rate(scopes as f64)
    );
    let (buckets, per) = memory_ledger_child(scopes)?;
    println!(
        "ledger alone (in-process fold): {} buckets, {per:.0} bytes per bucket (RSS growth / buckets)",
        fmt_rate(buckets as f64)
    );
    let d = logbench::memory_daemon(scopes)?;
    println!(
        "daemon: {} buckets; running, after the last answer {:.0} / 3 s later {:.0} bytes per bucket; restarted from its snapshot, at the first hello {:.0} / 3 s later {:.0} (RSS delta / buckets)",
        fmt_rate(d.buckets as f64),
        d.running.0,
        d.running.1,
        d.restarted.0,
        d.restarted.1
    );
    report.add(
        "memory per active bucket (ledger)",
        "≤ 512 bytes",
        format!("{per:.0} bytes"),
        None,
        None,
    );
    report.add(
        "memory per active bucket (daemon RSS after restart, at the first hello / 3 s later)",
        "≤ 512 bytes",
        format!("{:.0} / {:.0} bytes", d.restarted.0, d.restarted.1),
        None,
        None,
    );
    report.add(
        "memory per active bucket (daemon RSS while running: after the writes / 3 s later)",
        "≤ 512 bytes",
        format!("{:.0} / {:.0} bytes", d.running.0, d.running.1),
        None,
        None,
    );
    Ok(())
}
