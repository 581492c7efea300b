//! Log-side figures: generate a realistic log through the daemon's own log layer, then measure
//! full replay, start-up to the first answered `hello` with and without a snapshot, memory per
//! active bucket and bytes on disk per event.

use crate::procs;
use crate::workload::{self, Rng, Scope, MAX_OUTPUT, MODEL};
use bursar_core::ledger::{Command, Ledger};
use bursar_schemas::event::{
    Actor, EventBody, Hash32, PolicyApplied, Receipt, ReceiptLine, Sealed,
};
use bursar_schemas::wire::{RecordRequest, Usage};
use bursar_schemas::{Labels, TsMicros};
use bursard::log::{LogStore, SledLog};
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

fn now_micros() -> TsMicros {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn labels(s: &Scope) -> Labels {
    let mut l = Labels::new();
    l.insert("org".into(), format!("o{}", s.org));
    l.insert("team".into(), format!("t{}", s.team));
    l.insert("user".into(), format!("u{}", s.user));
    l.insert("session".into(), format!("s{}", s.session));
    l
}

/// The bench policy as the daemon loads it.
pub fn bench_policy(data_dir: &Path) -> Result<bursar_core::policy::LoadedPolicy, String> {
    let toml = workload::policy_toml("bench.sock", &data_dir.to_string_lossy());
    bursar_core::policy::parse_policy(&toml, "bench.toml", &|p| Err(format!("no import {p}")))
        .map_err(|errs| {
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
}

/// Folds commands into a ledger and seals the events into group-commit batches, like the writer.
struct Producer {
    ledger: Ledger,
    prev: Hash32,
    actor: Actor,
    envs: Vec<Sealed>,
}

impl Producer {
    fn new(policy: &bursar_core::policy::LoadedPolicy) -> Result<Self, String> {
        Self::new_at(policy, now_micros())
    }

    /// A producer whose `policy_applied` is stamped at `at` (the start of a generated log).
    fn new_at(policy: &bursar_core::policy::LoadedPolicy, at: TsMicros) -> Result<Self, String> {
        let mut p = Producer {
            ledger: Ledger::new(),
            prev: Hash32::default(),
            actor: Actor {
                uid: 1000,
                gid: 1000,
                pid: 4242,
            },
            envs: Vec::new(),
        };
        let body = EventBody::PolicyApplied(PolicyApplied {
            policy_version: 1,
            source: policy.source.clone(),
            source_hash: policy.source_hash.clone(),
            policy: policy.resolved.clone(),
        });
        let ts = p.ledger.stamp(at);
        p.ledger.apply(1, ts, &body).map_err(|e| e.to_string())?;
        p.seal(vec![(1, ts, body)])?;
        Ok(p)
    }

    fn seal(&mut self, events: Vec<(u64, TsMicros, EventBody)>) -> Result<(), String> {
        for (seq, ts, body) in events {
            let sealed = bursar_schemas::event::seal(seq, ts, &self.actor, self.prev, &body)
                .map_err(|e| e.to_string())?;
            self.prev = sealed.hash;
            self.envs.push(sealed);
        }
        Ok(())
    }
}

/// What [`generate`] made.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Events in the log.
    pub events: u64,
    /// Seconds it took.
    pub secs: f64,
    /// Bytes of the data dir on disk (allocated blocks) after a clean close.
    pub disk_bytes: u64,
}

/// The `usage_recorded` that commits hold `r-<id>` of the generated log.
fn commit_of(id: u64, labels: Labels, usage: Usage, payload_digest: [u8; 16]) -> EventBody {
    use bursar_schemas::event::{ReservationLink, UsageRecorded};
    EventBody::UsageRecorded(UsageRecorded {
        event_id: format!("c-{id}"),
        reservation_id: Some(format!("r-{id}")),
        reservation: ReservationLink::Known,
        late: false,
        labels: labels.into(),
        model: MODEL.into(),
        usage,
        occurred_at: None,
        reported_cost_usd: None,
        payload_digest,
        receipt: Some(receipt(id, None)),
    })
}

/// A receipt like the daemon's for an event of the bench policy: a line per budget (the bench
/// policy's three), figures of the size a busy bucket has, so that the log is as large as a
/// live one (the fold never reads receipts).
fn receipt(n: u64, decision: Option<bursar_schemas::wire::Decision>) -> Receipt {
    let line = |budget: u32| ReceiptLine {
        budget,
        overflow: false,
        spent_micros: i64::try_from(n % 9_000_000).unwrap_or(0) + 1_000,
        spent_tokens: n % 50_000_000,
        spent_requests: n % 100_000,
        held_micros: i64::try_from(n % 70_000).unwrap_or(0),
        held_tokens: n % 30_000,
        held_requests: n % 7,
        live_holds: n % 7,
    };
    Receipt {
        policy_version: 1,
        lines: (0..3).map(line).collect(),
        cost_micros: i64::try_from(n % 5_000).unwrap_or(0),
        priced_at_max: false,
        overrun_micros: None,
        decision,
        skipped: Vec::new(),
        message: None,
    }
}

/// Write a log of about `events` realistic events into `data_dir` through `SledLog`, in
/// group-commit-sized records of `batch` events: 60 % `usage_recorded` of a plain `record`,
/// 40 % `reservation_created` followed a little later by the `usage_recorded` that commits the
/// same hold, over `scopes` scopes, after the bench policy's `policy_applied`, with times
/// spread over `span` up to now.
///
/// The bodies are built directly (labels with the derived `model`, `provider` and `tier` as the
/// ledger derives them, the hold priced as the daemon prices it) and sealed into the hash chain
/// like the writer seals them; they are not decided one by one (that would take the daemon's
/// full write path per event, minutes for 10 M). The idempotency index is not written (replay
/// and start-up never read it; the daemon run's disk figure includes it).
pub fn generate(
    data_dir: &Path,
    events: u64,
    batch: usize,
    scopes: u64,
    seed: u64,
    span: Duration,
) -> Result<Generated, String> {
    use bursar_schemas::event::{ReservationCreated, ReservationLink, UsageRecorded};
    let started = Instant::now();
    let policy = bench_policy(data_dir)?;
    let mut store = bursard::open_store(data_dir).map_err(|e| e.to_string())?;
    // The events' times are spread evenly over `span`, ending now: a log of millions of events
    // accumulates over days, and the ledger keeps ended reservations for an hour of log time.
    // The policy is applied at the start, before the first event.
    let span_micros = i64::try_from(span.as_micros()).unwrap_or(i64::MAX);
    let step = (span_micros / i64::try_from(events.max(1)).unwrap_or(1)).max(1);
    let start = now_micros() - span_micros;
    let mut p = Producer::new_at(&policy, start - 1)?;
    let mut rng = Rng::new(seed);
    let mut open: VecDeque<(u64, Labels, u64, u64)> = VecDeque::new();
    let mut seq = p.ledger.last_seq();
    let mut ts = p.ledger.last_ts();
    let mut n = 0u64;
    let digest = |rng: &mut Rng| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        d[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        d
    };
    let usage = |input: u64, output: u64| Usage {
        input_tokens: input,
        output_tokens: output,
        ..Usage::default()
    };
    while seq < events {
        n += 1;
        seq += 1;
        ts = (start + step * i64::try_from(seq).unwrap_or(0)).max(ts + 1);
        let input = rng.range(500, 3000);
        let output = rng.range(50, MAX_OUTPUT);
        let commit_now = open.len() > 256 || (!open.is_empty() && rng.below(100) < 40);
        // Only a hold that is committed now leaves the queue.
        let due = if commit_now { open.pop_front() } else { None };
        let body = match due {
            Some((id, labels, input, output)) => {
                commit_of(id, labels, usage(input, output), digest(&mut rng))
            }
            None => {
                let s = workload::scope(rng.below(scopes), scopes);
                let labels = p.ledger.derived_labels(&labels(&s), MODEL, ts);
                if rng.below(100) < 60 {
                    EventBody::UsageRecorded(UsageRecorded {
                        event_id: format!("e-{n}"),
                        reservation_id: None,
                        reservation: ReservationLink::None,
                        late: false,
                        labels: labels.into(),
                        model: MODEL.into(),
                        usage: usage(input, output),
                        occurred_at: None,
                        reported_cost_usd: None,
                        payload_digest: digest(&mut rng),
                        receipt: Some(receipt(n, None)),
                    })
                } else {
                    let hold = (input * workload::PRICE_IN + MAX_OUTPUT * workload::PRICE_OUT)
                        .div_ceil(1_000_000);
                    open.push_back((n, labels.clone(), input, output));
                    EventBody::ReservationCreated(ReservationCreated {
                        reservation_id: format!("r-{n}"),
                        labels: labels.into(),
                        model: MODEL.into(),
                        input_tokens: input,
                        max_output_tokens: MAX_OUTPUT,
                        hold_micros: i64::try_from(hold).unwrap_or(i64::MAX),
                        expires_at: ts + 300_000_000,
                        payload_digest: digest(&mut rng),
                        receipt: Some(receipt(n, Some(bursar_schemas::wire::Decision::Allow))),
                    })
                }
            }
        };
        p.seal(vec![(seq, ts, body)])?;
        if p.envs.len() >= batch {
            store.append(&p.envs).map_err(|e| e.to_string())?;
            p.envs.clear();
        }
    }
    while let Some((id, labels, input, output)) = open.pop_front() {
        ts += 1;
        seq += 1;
        let body = commit_of(id, labels, usage(input, output), digest(&mut rng));
        p.seal(vec![(seq, ts, body)])?;
    }
    if !p.envs.is_empty() {
        store.append(&p.envs).map_err(|e| e.to_string())?;
    }
    store.sync().map_err(|e| e.to_string())?;
    drop(store);
    // sled lets go of its files a moment after the handle.
    std::thread::sleep(Duration::from_millis(200));
    Ok(Generated {
        events: seq,
        secs: started.elapsed().as_secs_f64(),
        disk_bytes: procs::dir_bytes(data_dir),
    })
}

/// Full replay figures.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Seconds to open sled.
    pub open_secs: f64,
    /// Seconds of `writer::recover` (the daemon's start without a snapshot: the log read,
    /// decoded and chain-checked on one thread, folded on another).
    pub fold_secs: f64,
    /// Seconds to read, decode and chain-check the log alone, on one thread (no fold): the
    /// share of the work that is the log's.
    pub decode_secs: f64,
    /// Events folded.
    pub events: u64,
    /// Buckets in the result.
    pub buckets: usize,
    /// Live holds in the result (the generated log commits every hold: 0).
    pub holds: usize,
    /// Snapshot size, bytes.
    pub snapshot_bytes: usize,
    /// Seconds to encode the snapshot.
    pub snapshot_encode_secs: f64,
    /// Report queries on the folded ledger: (what, seconds, rows).
    pub reports: Vec<(String, f64, u64)>,
}

/// Time `report` on `ledger` (its rollups) for a few typical questions over the whole log.
fn time_reports(ledger: &bursar_core::ledger::Ledger) -> Vec<(String, f64, u64)> {
    use bursar_schemas::wire::ReportRequest;
    let ask = |what: &str, group_by: &[&str], every: &str, zone: Option<&str>| {
        let req = ReportRequest {
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            every: Some(every.into()),
            timezone: zone.map(str::to_string),
            since: None,
            until: None,
            labels: None,
        };
        let t = Instant::now();
        let rows = ledger
            .report(&req, now_micros())
            .map(|a| a.total_rows)
            .unwrap_or(0);
        (what.to_string(), t.elapsed().as_secs_f64(), rows)
    };
    vec![
        ask("by team per day (UTC)", &["team"], "day", None),
        ask(
            "by user and model per hour",
            &["user", "model"],
            "hour",
            None,
        ),
        ask(
            "by org per week, Europe/Paris",
            &["org"],
            "week",
            Some("Europe/Paris"),
        ),
    ]
    .into_iter()
    .map(|(what, secs, rows)| {
        (
            format!("{what}, {} rollup cells", ledger.rollup_cells()),
            secs,
            rows,
        )
    })
    .collect()
}

/// Open the log and fold it completely (no snapshot), as the daemon does at start; also time
/// encoding a snapshot of the result (nothing is stored).
pub fn replay(data_dir: &Path) -> Result<Replay, String> {
    let t = Instant::now();
    let store = open_retry(data_dir)?;
    let open_secs = t.elapsed().as_secs_f64();
    if store
        .latest_snapshot()
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("the log already has a snapshot; replay needs a log without one".into());
    }
    let t = Instant::now();
    let mut decoded = 0u64;
    for item in store.read_from(1) {
        item.map_err(|e| e.to_string())?;
        decoded += 1;
    }
    let decode_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ledger = bursard::writer::recover(&store)?;
    let fold_secs = t.elapsed().as_secs_f64();
    if decoded != ledger.last_seq() {
        return Err(format!(
            "read {decoded} events but folded {}",
            ledger.last_seq()
        ));
    }
    let t = Instant::now();
    let head = store.head().map(|h| h.1).unwrap_or_default();
    let bytes =
        bursard::writer::encode_snapshot(&ledger, head).ok_or("cannot encode a snapshot")?;
    let r = Replay {
        open_secs,
        fold_secs,
        decode_secs,
        events: ledger.last_seq(),
        buckets: ledger.bucket_count(),
        holds: ledger.live_holds(),
        snapshot_bytes: bytes.len(),
        snapshot_encode_secs: t.elapsed().as_secs_f64(),
        reports: time_reports(&ledger),
    };
    drop(bytes);
    drop(ledger);
    drop(store);
    std::thread::sleep(Duration::from_millis(200));
    Ok(r)
}

/// Start-up figures.
#[derive(Debug, Clone)]
pub struct Startup {
    /// Spawn to first answered hello, no snapshot (a full fold of the log).
    pub without: Duration,
    /// Same with the daemon's own snapshot.
    pub with: Duration,
    /// RSS of the daemon started from the snapshot.
    pub rss_with: u64,
    /// RSS of the daemon that folded the whole log, at its first answered hello.
    pub rss_without: u64,
}

/// Start `bursard` on the log (no snapshot yet) and time it to the first answered `hello`; write
/// one event and stop it with SIGTERM, so that it takes its own snapshot on the way out; start
/// it again and time that.
pub fn startup_cycle(data_dir: &Path) -> Result<Startup, String> {
    let mut p = procs::start_bursard(Some(data_dir))?;
    let without = p.ready_after;
    let rss_without = procs::rss_bytes(p.pid()).unwrap_or(0);
    let answer = procs::request(
        &p.socket,
        r#"{"op":"record","event_id":"startup-probe","labels":{"org":"o0"},"model":"gpt-4o-mini","usage":{"input_tokens":1,"output_tokens":1}}"#,
    )?;
    if !answer.starts_with(r#"{"ok":true"#) {
        return Err(format!("probe record failed: {answer}"));
    }
    p.stop(Duration::from_secs(300));
    drop(p);
    std::thread::sleep(Duration::from_millis(300));
    let mut p = procs::start_bursard(Some(data_dir))?;
    let with = p.ready_after;
    let rss_with = procs::rss_bytes(p.pid()).unwrap_or(0);
    p.stop(Duration::from_secs(300));
    Ok(Startup {
        without,
        with,
        rss_with,
        rss_without,
    })
}

fn open_retry(dir: &Path) -> Result<SledLog, String> {
    let start = Instant::now();
    loop {
        match SledLog::open(dir) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A `record` of 1,000 input and 100 output tokens for scope `i` of `scopes`.
fn scope_record(event_id: String, i: u64, scopes: u64) -> RecordRequest {
    RecordRequest {
        event_id,
        labels: labels(&workload::scope(i, scopes)),
        model: MODEL.into(),
        usage: Usage {
            input_tokens: 1000,
            output_tokens: 100,
            ..Usage::default()
        },
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    }
}

/// Memory per active bucket of the ledger alone: fold one `record` per scope over `scopes`
/// scopes in this process and divide the RSS growth by the buckets created.
pub fn memory_inprocess(scopes: u64) -> Result<(usize, f64), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = bench_policy(dir.path())?;
    let mut p = Producer::new(&policy)?;
    p.envs.clear();
    let before = procs::rss_bytes(std::process::id()).unwrap_or(0);
    let base_buckets = p.ledger.bucket_count();
    for i in 0..scopes {
        let req = scope_record(format!("m-{i}"), i, scopes);
        let step = p.ledger.execute(Command::Record(&req), now_micros());
        drop(step);
    }
    let after = procs::rss_bytes(std::process::id()).unwrap_or(0);
    let buckets = p.ledger.bucket_count() - base_buckets;
    let per = after.saturating_sub(before) as f64 / buckets.max(1) as f64;
    drop(p);
    Ok((buckets, per))
}

/// `bursar-bench stalls`: `events` records with new ids over `scopes` scopes, each decided and
/// applied through `Ledger::execute` and timed alone; prints the distribution, the slowest
/// records (which record, how long) and how many took over 1 ms and over 10 ms.
pub fn stalls(events: u64, scopes: u64) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = bench_policy(dir.path())?;
    let mut p = Producer::new(&policy)?;
    p.envs.clear();
    let mut h = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut worst: Vec<(u64, u64)> = Vec::new();
    let (mut over_1ms, mut over_10ms) = (0u64, 0u64);
    let ts0 = now_micros();
    let started = Instant::now();
    for i in 0..events {
        let req = scope_record(format!("s-{i}"), i % scopes, scopes);
        // 20,000 records per second of ledger time, as the cluster bench's writer runs.
        let ts = ts0 + i64::try_from(i).unwrap_or(i64::MAX) * 50;
        let t = Instant::now();
        let step = p.ledger.execute(Command::Record(&req), ts);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        drop(step);
        let _ = h.record(ns);
        over_1ms += u64::from(ns > 1_000_000);
        over_10ms += u64::from(ns > 10_000_000);
        if ns > 1_000_000 {
            worst.push((ns, i));
        }
    }
    let total = started.elapsed();
    worst.sort_unstable_by(|a, b| b.cmp(a));
    println!(
        "{events} records over {scopes} scopes in {:.1} s ({:.0} records/s): p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.2} ms; {over_1ms} over 1 ms, {over_10ms} over 10 ms",
        total.as_secs_f64(),
        events as f64 / total.as_secs_f64(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e6,
    );
    for (ns, i) in worst.iter().take(10) {
        println!("  record {i}: {:.2} ms", *ns as f64 / 1e6);
    }
    Ok(())
}

/// The daemon's RSS per bucket (RSS with `scopes` scopes less RSS with one, over the buckets
/// the difference makes): while it runs, right after the records were answered and 3 s
/// later; and after a restart from its snapshot, at the first `hello` and 3 s later.
pub struct DaemonMemory {
    /// Buckets the difference makes.
    pub buckets: usize,
    /// Running: right after the last answer, and [`SETTLE`] later.
    pub running: (f64, f64),
    /// Restarted: at the first `hello`, and [`SETTLE`] later.
    pub restarted: (f64, f64),
}

pub fn memory_daemon(scopes: u64) -> Result<DaemonMemory, String> {
    // (running, running settled, restarted, restarted settled) for 1 scope, then `scopes`.
    let mut rss: Vec<[u64; 4]> = Vec::new();
    for n in [1, scopes] {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let mut r = [0u64; 4];
        {
            let mut d = procs::start_bursard(Some(&data))?;
            send_records(&d.socket, n)?;
            r[0] = procs::rss_bytes(d.pid()).unwrap_or(0);
            std::thread::sleep(SETTLE);
            r[1] = procs::rss_bytes(d.pid()).unwrap_or(0);
            d.stop(Duration::from_secs(60));
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut p = procs::start_bursard(Some(&data))?;
        r[2] = procs::rss_bytes(p.pid()).unwrap_or(0);
        std::thread::sleep(SETTLE);
        r[3] = procs::rss_bytes(p.pid()).unwrap_or(0);
        p.stop(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
        rss.push(r);
    }
    let buckets = (workload::buckets_for(scopes) - workload::buckets_for(1)).max(1) as f64;
    let per = |i: usize| {
        (rss.get(1).map_or(0, |r| r[i]) as f64 - rss.first().map_or(0, |r| r[i]) as f64) / buckets
    };
    Ok(DaemonMemory {
        buckets: buckets as usize,
        running: (per(0), per(1)),
        restarted: (per(2), per(3)),
    })
}

/// How long the daemon idles after start-up before its RSS is read again (mimalloc's
/// `purge_delay` is 1 s, but it purges on later allocations, which an idle daemon does not make).
const SETTLE: Duration = Duration::from_secs(3);

/// One `record` per scope over one pipelined connection.
fn send_records(socket: &Path, scopes: u64) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || -> Result<u64, String> {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut n = 0;
        while n < scopes {
            line.clear();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("daemon closed the connection".into());
            }
            if !line.starts_with("{\"ok\":true") {
                return Err(format!("record failed: {line}"));
            }
            n += 1;
        }
        Ok(n)
    });
    let enc = workload::Encoder::Bursar { run: 7 };
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..scopes {
        let op = workload::Op {
            kind: workload::OpKind::Record,
            scope: workload::scope(i, scopes),
            n: i,
            conn: 0,
            input: 1000,
            output: 100,
        };
        enc.encode(&op, &mut buf);
        if buf.len() > (1 << 19) {
            w.write_all(&buf).map_err(|e| e.to_string())?;
            buf.clear();
        }
    }
    w.write_all(&buf).map_err(|e| e.to_string())?;
    reader.join().map_err(|_| "reader panicked".to_string())??;
    Ok(())
}
