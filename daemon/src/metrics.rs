//! Prometheus metrics (SPEC §12): `[daemon] metrics_listen = "127.0.0.1:9464"` serves the
//! Prometheus text format (0.0.4) at `/metrics` from a small HTTP/1.1 listener on the daemon's
//! tokio runtime. Off by default.
//!
//! Counters and histograms are updated where things happen (the connection's answer task, the
//! writer after a sync); gauges of the state (live buckets and holds, the log's head and size,
//! the per-bucket figures) are read at scrape time from the ledger the writer publishes, under
//! its read lock, like a `status`. Cardinality is bounded: label values come from fixed sets
//! (ops, outcomes, decisions, reasons) except the per-bucket gauges, of which there are at most
//! `metrics_max_buckets` (most utilized first; `bursar_buckets_not_exported` counts the rest).

use crate::writer::{read_ledger, Shared};
use bursar_schemas::answer::Answer;
use bursar_schemas::wire::{BudgetReport, Decision, ErrorCode, StatusRequest};
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest request head the endpoint reads.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a scraper may take to send its request, and to read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrapes served at once (more wait for the listener's backlog).
const MAX_SCRAPERS: usize = 16;

/// The daemon's counters and histograms.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    decisions: IntCounterVec,
    latency: HistogramVec,
    events: IntCounter,
    batch: Histogram,
    sync: Histogram,
    max_buckets: usize,
    data_dir: PathBuf,
}

/// Why a metric could not be set up (a bug: names and buckets are constants).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Counters at zero; per-bucket gauges for at most `max_buckets` buckets; the size of
    /// `data_dir` as the log's size.
    pub fn new(max_buckets: usize, data_dir: PathBuf) -> Result<Self, MetricsError> {
        let registry = Registry::new_custom(Some("bursar".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by op and outcome (ok, the error code, or hung_up: the \
                 client left before its answer).",
            ),
            &["op", "outcome"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "decisions_total",
                "Decisions of check and reserve, by op, decision and reason code.",
            ),
            &["op", "decision", "reason"],
        )?;
        // 10 µs .. ~5 s.
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from a request's line read to its answer queued for the socket, by op.",
            )
            .buckets(exponential_buckets(1e-5, 2.5, 15)?),
            &["op"],
        )?;
        let events = IntCounter::new(
            "events_appended_total",
            "Events appended to the log and made durable.",
        )?;
        let batch = Histogram::with_opts(
            HistogramOpts::new("batch_events", "Events per group commit (one sync each).")
                .buckets(exponential_buckets(1.0, 2.0, 14)?),
        )?;
        // 50 µs .. ~6.5 s.
        let sync = Histogram::with_opts(
            HistogramOpts::new(
                "fdatasync_duration_seconds",
                "Time to make a group commit durable (the store's flush and fdatasync).",
            )
            .buckets(exponential_buckets(5e-5, 2.0, 18)?),
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(batch.clone()))?;
        registry.register(Box::new(sync.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            decisions,
            latency,
            events,
            batch,
            sync,
            max_buckets,
            data_dir,
        })
    }

    /// A request of `op` was answered with `line`, `started` when its line was read. Streams
    /// (`tail`, `export`) are counted without a duration (a follower's lasts for hours).
    pub fn answered(&self, op: &'static str, line: &str, started: Option<Instant>) {
        self.requests
            .with_label_values(&[op, outcome_of(line)])
            .inc();
        if let Some(t) = started {
            self.latency
                .with_label_values(&[op])
                .observe(t.elapsed().as_secs_f64());
        }
    }

    /// A request of `op` whose client hung up before it was answered (a write sent to the
    /// writer is still made; its answer is not given).
    pub fn hung_up(&self, op: &'static str) {
        self.requests.with_label_values(&[op, "hung_up"]).inc();
    }

    /// A typed answer of `op`: its decision, when it is one.
    pub fn decided(&self, op: &'static str, answer: &Answer) {
        if let Answer::Decision(d) = answer {
            if d.duplicate {
                return;
            }
            let decision = match d.decision {
                Decision::Allow => "allow",
                Decision::Warn => "warn",
                Decision::Deny => "deny",
            };
            self.decisions
                .with_label_values(&[op, decision, reason_label(&d.reason.code)])
                .inc();
        }
    }

    /// A group commit of `events` was made durable in `took`.
    pub fn synced(&self, events: usize, took: Duration) {
        self.events.inc_by(events as u64);
        self.batch.observe(events as f64);
        self.sync.observe(took.as_secs_f64());
    }

    /// The text exposition: counters, histograms, and the state's gauges read now.
    pub fn render(&self, scope: &Scope, now: bursar_schemas::TsMicros) -> String {
        let mut families = self.registry.gather();
        match self.state_gauges(scope, now) {
            Ok(more) => families.extend(more),
            Err(e) => tracing::warn!("metrics: cannot gather the state's gauges: {e}"),
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!("metrics: cannot encode: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn state_gauges(
        &self,
        scope: &Scope,
        now: bursar_schemas::TsMicros,
    ) -> Result<Vec<prometheus::proto::MetricFamily>, prometheus::Error> {
        let r = Registry::new_custom(Some("bursar".into()), None)?;
        let gauge = |name: &str, help: &str, v: i64| -> Result<(), prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            g.set(v);
            r.register(Box::new(g))
        };
        let per_bucket = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["budget", "key"])?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        // Each log read once, under its ledger's read lock: (partition, shared, live holds,
        // head, status).
        let logs: Vec<(Option<String>, &Shared, u64, u64, _)> = scope
            .logs()
            .into_iter()
            .map(|(partition, shared)| {
                let l = read_ledger(shared);
                let status = l.status(
                    &StatusRequest {
                        limit: Some(self.max_buckets),
                        ..Default::default()
                    },
                    now,
                );
                (
                    partition,
                    shared,
                    l.live_holds() as u64,
                    l.last_seq(),
                    status,
                )
            })
            .collect();
        // A figure of each log: one gauge on one host, one per partition (label `partition`)
        // on a cluster node.
        let each = |name: &str,
                    help: &str,
                    v: &dyn Fn(&Shared, u64, u64) -> i64|
         -> Result<(), prometheus::Error> {
            if let [(None, shared, holds, head, _)] = logs.as_slice() {
                return gauge(name, help, v(shared, *holds, *head));
            }
            let g = IntGaugeVec::new(Opts::new(name, help), &["partition"])?;
            r.register(Box::new(g.clone()))?;
            for (p, shared, holds, head, _) in &logs {
                g.with_label_values(&[p.as_deref().unwrap_or("0")])
                    .set(v(shared, *holds, *head));
            }
            Ok(())
        };
        each(
            "live_holds",
            "Reservations holding money or a slot now.",
            &|_, holds, _| saturate(holds),
        )?;
        each(
            "log_head_seq",
            "Seq of the last event folded (events in the log).",
            &|_, _, head| saturate(head),
        )?;
        each(
            "waiting_requests",
            "Reserves and checks waiting in line now (wait_ms, SPEC §10; [daemon] max_waiters).",
            &|s, _, _| {
                let reserves = s.waiting.load(Ordering::Relaxed);
                saturate((reserves + s.waiting_checks.load(Ordering::Relaxed)) as u64)
            },
        )?;
        each(
            "writer_poisoned",
            "1 when the log could not be written and writes are refused (fail closed).",
            &|s, _, _| i64::from(s.poisoned.load(Ordering::SeqCst)),
        )?;
        each(
            "durable_seq",
            "Seq of the last event made durable (on a cluster node: folded from the stream).",
            &|s, _, _| saturate(*s.durable.borrow()),
        )?;
        if let Scope::Cluster(c) = scope {
            let lag = IntGaugeVec::new(
                Opts::new(
                    "cluster_lag_milliseconds",
                    "How stale this node's fold of the partition may be (0 on its writer).",
                ),
                &["partition"],
            )?;
            let writer = IntGaugeVec::new(
                Opts::new(
                    "cluster_writer",
                    "1 while this node holds the partition's lease and writes it.",
                ),
                &["partition"],
            )?;
            r.register(Box::new(lag.clone()))?;
            r.register(Box::new(writer.clone()))?;
            for p in &c.parts {
                let label = p.index.to_string();
                lag.with_label_values(&[label.as_str()])
                    .set(saturate(p.lag_ms()));
                writer
                    .with_label_values(&[label.as_str()])
                    .set(i64::from(p.is_writer()));
            }
        }
        // A bucket lies in one partition: the partitions' buckets side by side; of a quota,
        // the latest observation (as `status` shows them).
        let mut status: Option<bursar_schemas::wire::StatusAnswer> = None;
        for (_, _, _, _, st) in logs {
            let Ok(st) = st else { continue };
            match &mut status {
                None => status = Some(st),
                Some(m) => crate::cluster::merge_status(m, st),
            }
        }
        if let Some(status) = &status {
            let remaining = IntGaugeVec::new(
                Opts::new(
                    "quota_remaining",
                    "What a provider's observed limit still allows until its reset (SPEC §10): \
                     the observed remaining less the usage and holds since.",
                ),
                &["quota", "limit"],
            )?;
            r.register(Box::new(remaining.clone()))?;
            for q in &status.quotas {
                for l in &q.limits {
                    remaining
                        .with_label_values(&[q.id.as_str(), l.limit.as_str()])
                        .set(saturate(l.remaining));
                }
            }
        }
        gauge(
            "log_bytes",
            "Bytes the data dir takes on disk (log, snapshots, marks).",
            saturate(dir_bytes(&self.data_dir)),
        )?;
        if let Some(mut status) = status {
            // Most utilized first over every partition, at most `metrics_max_buckets` in all.
            crate::cluster::keep_most_utilized(&mut status, self.max_buckets);
            gauge(
                "live_buckets",
                "Buckets live now (in their window, or holding something).",
                saturate(status.total),
            )?;
            gauge(
                "buckets_not_exported",
                "Live buckets left out of the per-bucket gauges (metrics_max_buckets).",
                saturate(status.total.saturating_sub(status.budgets.len() as u64)),
            )?;
            let utilization = GaugeVec::new(
                Opts::new(
                    "bucket_utilization_ratio",
                    "Utilization of the bucket's tightest limit, spent and held (1 = 100 %).",
                ),
                &["budget", "key"],
            )?;
            r.register(Box::new(utilization.clone()))?;
            let money = [
                per_bucket(
                    "bucket_spent_micros",
                    "Money spent in the bucket's window, micro-USD.",
                )?,
                per_bucket(
                    "bucket_held_micros",
                    "Money held by live reservations, micro-USD.",
                )?,
                per_bucket(
                    "bucket_limit_micros",
                    "The bucket's money limit, micro-USD.",
                )?,
            ];
            let tokens = [
                per_bucket(
                    "bucket_spent_tokens",
                    "Tokens spent in the bucket's window.",
                )?,
                per_bucket("bucket_held_tokens", "Tokens held by live reservations.")?,
                per_bucket("bucket_limit_tokens", "The bucket's token limit.")?,
            ];
            let requests = [
                per_bucket("bucket_spent_requests", "Requests in the bucket's window.")?,
                per_bucket(
                    "bucket_held_requests",
                    "Requests held by live reservations (one each).",
                )?,
                per_bucket("bucket_limit_requests", "The bucket's request limit.")?,
            ];
            let concurrent = [
                per_bucket(
                    "bucket_held_concurrent",
                    "Live reservations holding a slot of the bucket's concurrency limit.",
                )?,
                per_bucket(
                    "bucket_limit_concurrent",
                    "The bucket's concurrency limit (max_concurrent).",
                )?,
            ];
            for b in &status.budgets {
                let labels = [b.budget.as_str(), b.key.as_str()];
                // Display only: decisions never use the float.
                utilization.with_label_values(&labels).set(b.utilization);
                put_bucket(&money, &tokens, &requests, &concurrent, &labels, b);
            }
        }
        Ok(r.gather())
    }
}

/// Set one bucket's figures: spent, held and limit of the units its budget limits, and money
/// always (every bucket accounts money); a concurrency limit's held slots are its live holds.
fn put_bucket(
    money: &[IntGaugeVec; 3],
    tokens: &[IntGaugeVec; 3],
    requests: &[IntGaugeVec; 3],
    concurrent: &[IntGaugeVec; 2],
    labels: &[&str; 2],
    b: &BudgetReport,
) {
    let [spent, held, limit] = money;
    spent.with_label_values(labels).set(b.spent_micros);
    held.with_label_values(labels).set(b.held_micros);
    if let Some(l) = b.limit_micros {
        limit.with_label_values(labels).set(l);
    }
    if let Some(l) = b.limit_tokens {
        let [spent, held, limit] = tokens;
        spent
            .with_label_values(labels)
            .set(saturate(b.spent_tokens));
        held.with_label_values(labels).set(saturate(b.held_tokens));
        limit.with_label_values(labels).set(saturate(l));
    }
    if let Some(l) = b.limit_requests {
        let [spent, held, limit] = requests;
        spent
            .with_label_values(labels)
            .set(saturate(b.spent_requests));
        held.with_label_values(labels).set(saturate(b.live_holds));
        limit.with_label_values(labels).set(saturate(l));
    }
    if let Some(l) = b.limit_concurrent {
        let [held, limit] = concurrent;
        held.with_label_values(labels).set(saturate(b.live_holds));
        limit.with_label_values(labels).set(saturate(l));
    }
}

/// A display figure as a gauge value (a count beyond `i64::MAX` cannot occur in practice; it
/// is shown as the largest gauge value rather than wrapped).
fn saturate<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// The outcome label of an answer line: `ok`, or its error code. Every answer line the daemon
/// writes starts with `{"ok":`; an error's code is the first `"code":` after it.
fn outcome_of(line: &str) -> &'static str {
    if !line.starts_with(r#"{"ok":false"#) {
        return "ok";
    }
    let code = line
        .split_once(r#""code":""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(code, _)| code);
    code.and_then(|c| serde_json::from_value::<ErrorCode>(serde_json::Value::from(c)).ok())
        .map_or("error", ErrorCode::as_str)
}

/// The ops of SPEC §6 (label values of `op`).
const OPS: [&str; 16] = [
    "hello",
    "record",
    "reserve",
    "check",
    "commit",
    "release",
    "extend",
    "status",
    "tail",
    "export",
    "replay",
    "report",
    "verify",
    "reload",
    "observe",
    "cluster_status",
];

/// The op an invalid request line names, when it is one of `OPS`; else `invalid` (only
/// lines that fail to decode come here, so the second parse costs nothing on the hot path).
pub fn op_named_in(line: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct OpOnly {
        op: String,
    }
    serde_json::from_slice::<OpOnly>(line)
        .ok()
        .and_then(|o| OPS.into_iter().find(|k| *k == o.op))
        .unwrap_or("invalid")
}

/// A decision's reason code as a label value from a fixed set.
fn reason_label(code: &str) -> &'static str {
    const KNOWN: [&str; 8] = [
        "ok",
        "budget",
        "tier_cap",
        "unknown_model",
        "missing_capability",
        "max_keys",
        "max_concurrent",
        "quota",
    ];
    KNOWN.into_iter().find(|k| *k == code).unwrap_or("other")
}

/// Bytes allocated on disk for the files of `dir` (one level deep, and sled's `blobs`).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![(dir.to_path_buf(), 0u8)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() && depth < 2 {
                stack.push((e.path(), depth + 1));
            } else if m.is_file() {
                total = total.saturating_add(m.blocks().saturating_mul(512));
            }
        }
    }
    total
}

/// What the endpoint reads: the one log, or each partition's on a cluster node (SPEC §13).
#[derive(Clone)]
pub enum Scope {
    /// A single-host daemon's log.
    Single(Arc<Shared>),
    /// A cluster node's partitions.
    Cluster(Arc<crate::cluster::Cluster>),
}

impl Scope {
    /// Each log, with its partition's number on a cluster node.
    fn logs(&self) -> Vec<(Option<String>, &Shared)> {
        match self {
            Scope::Single(s) => vec![(None, s.as_ref())],
            Scope::Cluster(c) => c
                .parts
                .iter()
                .map(|p| (Some(p.index.to_string()), p.shared.as_ref()))
                .collect(),
        }
    }
}

/// Bind the endpoint (at start, so that a taken port stops the daemon with a clear error).
pub fn bind(addr: std::net::SocketAddr) -> Result<std::net::TcpListener, String> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen for metrics on {addr} (metrics_listen): {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    Ok(l)
}

/// Serve `/metrics` until `shutdown` turns true.
pub async fn serve(
    listener: std::net::TcpListener,
    shared: Scope,
    metrics: Arc<Metrics>,
    clock: crate::writer::Clock,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics listener: {e}");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let (shared, metrics, clock) = (shared.clone(), metrics.clone(), clock.clone());
        tokio::spawn(async move {
            scrape(stream, &shared, &metrics, &clock).await;
            drop(permit);
        });
    }
}

/// One HTTP/1.1 exchange: `GET /metrics` (or `HEAD`), then the connection is closed.
async fn scrape(
    mut stream: tokio::net::TcpStream,
    shared: &Scope,
    metrics: &Arc<Metrics>,
    clock: &crate::writer::Clock,
) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(h)) => h,
        _ => return,
    };
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_ascii_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let (s, m, c) = (shared.clone(), metrics.clone(), clock.clone());
            let body = tokio::task::spawn_blocking(move || m.render(&s, c()))
                .await
                .unwrap_or_default();
            ("200 OK", prometheus::TEXT_FORMAT, body)
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "bursard serves metrics at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    // A scraper that stops reading gives its slot back after the timeout.
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The request head (up to the blank line), or `None` if it is too long or not UTF-8.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(chunk.get(..n)?);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_is_counted_under_its_code_and_anything_else_as_ok() {
        let err = r#"{"ok":false,"error":{"code":"unavailable","message":"x \"code\":\"bad\""}}"#;
        assert_eq!(outcome_of(err), "unavailable");
        assert_eq!(
            outcome_of(r#"{"ok":false,"error":{"code":"nonsense","message":"m"}}"#),
            "error"
        );
        assert_eq!(outcome_of(r#"{"ok":true,"seq":3}"#), "ok");
    }

    #[test]
    fn a_reason_outside_the_known_set_is_one_label_value() {
        assert_eq!(reason_label("budget"), "budget");
        assert_eq!(reason_label("made-up-by-a-future-version"), "other");
    }

    #[test]
    fn an_invalid_line_is_counted_under_the_op_it_names_if_that_is_an_op() {
        assert_eq!(op_named_in(br#"{"op":"record","labels":5}"#), "record");
        assert_eq!(op_named_in(br#"{"op":"launch_missiles"}"#), "invalid");
        assert_eq!(op_named_in(b"not json"), "invalid");
    }
}
