//! The socket server: JSON Lines over a Unix stream socket (SPEC §6).
//!
//! One task reads a connection's lines and queues one pending answer per request; a second task
//! writes the answers strictly in request order. Reads (`hello`, `status`, `check`) are evaluated
//! when their turn to be answered comes, so a connection always reads its own earlier writes,
//! and they never wait for a disk sync. Writes go to the single writer thread.

use crate::conn_socket::{ReadHalf, WriteHalf};
use crate::writer::{error_line, lock_store, read_ledger, Job, Shared, WriteCmd, WriterHandle};
use bursar_core::ledger::{self, Answer};
use bursar_schemas::event::Actor;
use bursar_schemas::event::EventBody;
use bursar_schemas::wire::{
    decode_request, CheckRequest, ErrorCode, HelloAnswer, ReplayRequest, Request, RequestLine,
    StreamEnd, VerifyAnswer, WireError, MAX_LINE_BYTES,
};
use serde_json::Value;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Most simultaneous connections; more are answered `overloaded` and closed.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most requests of one connection waiting for their answers; the reader pauses beyond it.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// Read and write buffer of each connection (a line may still grow to 64 KiB).
pub const CONNECTION_BUFFER_BYTES: usize = 8 * 1024;
/// Events read from the log per lock of the store when streaming.
pub const STREAM_CHUNK_EVENTS: usize = 1024;
/// Default number of recent events `tail` shows without `from_seq` and without `follow`.
pub const TAIL_DEFAULT_EVENTS: u64 = 10;

/// What a connection handler needs.
pub struct Ctx {
    /// Ledger and store.
    pub shared: Arc<Shared>,
    /// The writer.
    pub writer: WriterHandle,
    /// Uids allowed to `reload` and `replay` with `apply`.
    pub admin_uids: Vec<u32>,
    /// The clock.
    pub clock: crate::writer::Clock,
    /// Flips to true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// True while a dry-run `replay` runs (at most one at a time).
    pub dry_run_busy: std::sync::atomic::AtomicBool,
    /// Cluster mode (SPEC §13): the partitions, their writers and followers. `shared` and
    /// `writer` are then partition 0's and unused for requests.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

type ReadFn = Box<dyn FnOnce(&Ctx) -> String + Send>;

/// An answer waiting for its turn.
enum Pending {
    /// Known already.
    Ready(String),
    /// From the writer.
    Wait(oneshot::Receiver<String>),
    /// A write's typed answer from the writer, rendered here with its `req`.
    Answer(oneshot::Receiver<crate::writer::Outcome>, Option<Value>),
    /// Evaluated at its turn.
    Read(ReadFn),
    /// Evaluated at its turn, on a blocking thread.
    Blocking(ReadFn),
    /// A stream of lines (tail, export) produced at its turn.
    Stream(StreamKind, Option<Value>),
    /// A `check` with `wait_ms`, evaluated at its turn and again as capacity frees (SPEC §10).
    WaitingCheck(Box<CheckRequest>, Option<Value>),
}

use crate::streams::Kind as StreamKind;

/// Accept connections until shutdown, each served on one of `threads`.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    threads: &crate::connections::ConnectionThreads,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        tokio::spawn(async move {
                            let mut s = stream;
                            let line = error_line(ErrorCode::Overloaded, format!("too many connections (max {MAX_CONNECTIONS})"), None);
                            let _ = s.write_all(format!("{line}\n").as_bytes()).await;
                        });
                        continue;
                    }
                };
                let actor = actor_of(&stream);
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cannot hand a connection to its thread: {e}");
                        continue;
                    }
                };
                let ctx = ctx.clone();
                threads.serve(stream, move |rd, wr| async move {
                    handle(rd, wr, actor, ctx).await;
                    drop(permit);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}

fn actor_of(stream: &UnixStream) -> Actor {
    match stream.peer_cred() {
        Ok(c) => Actor {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        },
        Err(_) => Actor::default(),
    }
}

/// Read consistency on one connection (SPEC §5): a read reflects exactly the requests before
/// it. Reads are evaluated when their turn to be answered comes (after every earlier answer,
/// hence after every earlier write); this gate keeps the writes *after* a read from reaching
/// the writer before that read has been evaluated, even when they were pipelined in the same
/// packet.
#[derive(Default)]
struct ReadGate {
    /// Reads (and streams) of the connection evaluated so far.
    evaluated: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl ReadGate {
    fn evaluated_one(&self) {
        self.evaluated
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Wait until the first `reads` reads of the connection have been evaluated.
    async fn wait_for(&self, reads: u64) {
        loop {
            let changed = self.changed.notified();
            if self.evaluated.load(std::sync::atomic::Ordering::SeqCst) >= reads {
                return;
            }
            changed.await;
        }
    }
}

async fn handle(rd: ReadHalf, wr: WriteHalf, actor: Actor, ctx: Arc<Ctx>) {
    let (qtx, qrx) = mpsc::channel::<(Pending, Meter)>(MAX_IN_FLIGHT_PER_CONNECTION);
    let writer_ctx = ctx.clone();
    let gate = Arc::new(ReadGate::default());
    let mut reads_queued = 0u64;
    // Answers go out through one buffer: the answer task writes the queued ones in order; a
    // read that comes when nothing is queued or being written is answered here at once (one
    // task hand-off less for an agent that asks and waits).
    let out = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        CONNECTION_BUFFER_BYTES,
        wr,
    )));
    let outstanding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Set once the client has hung up (see the end of this function).
    let (gone_tx, gone) = tokio::sync::watch::channel(false);
    let answers = tokio::spawn(write_answers(
        out.clone(),
        outstanding.clone(),
        qrx,
        writer_ctx,
        gate.clone(),
        gone,
    ));
    let mut reader = BufReader::with_capacity(CONNECTION_BUFFER_BYTES, rd);
    let mut line: Vec<u8> = Vec::new();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let read = tokio::select! {
            r = read_line(&mut reader, &mut line) => r,
            _ = shutdown.changed() => break,
        };
        match read {
            LineRead::Line => {
                let decoded = decode(&line);
                let meter = Meter::start(&ctx, decoded.as_ref().ok().map(|d| &d.request), &line);
                // Cluster mode forwards a write's line as it came.
                let raw = ctx.cluster.as_ref().map(|_| line.clone());
                line.clear();
                if let Ok(d) = &decoded {
                    if goes_to_writer(&d.request) && reads_queued > 0 {
                        // Not before the reads queued ahead of it have seen the ledger.
                        tokio::select! {
                            () = gate.wait_for(reads_queued) => {}
                            _ = shutdown.changed() => break,
                            // A read ahead of it may wait long (a `check` with `wait_ms`).
                            () = until_hung_up(reader.get_ref()) => {
                                meter.hung_up(&ctx);
                                break;
                            }
                        }
                    }
                }
                let pending = match (&ctx.cluster, raw) {
                    (Some(c), Some(raw)) => cluster_dispatch(c, decoded, raw, actor, &ctx),
                    _ => dispatch(decoded, actor, &ctx),
                };
                if let Pending::Read(f) = pending {
                    if outstanding.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                        // Nothing before it is unanswered: it sees exactly the requests before
                        // it, and its answer goes out in order.
                        let answer = f(&ctx);
                        meter.answered(&ctx, &answer);
                        let mut w = out.lock().await;
                        if !put(&mut *w, &answer).await || w.flush().await.is_err() {
                            break;
                        }
                        continue;
                    }
                    reads_queued += 1;
                    outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if !queue(&qtx, (Pending::Read(f), meter), reader.get_ref(), &ctx).await {
                        break;
                    }
                    continue;
                }
                if matches!(
                    pending,
                    Pending::Blocking(_) | Pending::Stream(..) | Pending::WaitingCheck(..)
                ) {
                    reads_queued += 1;
                }
                outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if !queue(&qtx, (pending, meter), reader.get_ref(), &ctx).await {
                    break;
                }
            }
            LineRead::TooLarge => {
                let e = WireError::new(
                    ErrorCode::TooLarge,
                    format!("line longer than {MAX_LINE_BYTES} bytes; closing the connection"),
                );
                outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = qtx
                    .send((
                        Pending::Ready(Answer::Error(e).to_line(None)),
                        Meter::start(&ctx, None, b""),
                    ))
                    .await;
                break;
            }
            LineRead::Eof => break,
        }
    }
    drop(qtx);
    // The client may have closed only its writing side and still read what it is owed. Once
    // it has hung up, nothing more is waited for on its behalf (`write_answers`): a `reserve`
    // or `check` waiting in line leaves it (nothing is appended for it), a `tail --follow`
    // ends; work already under way finishes, and the connection keeps its place until then.
    let mut answers = answers;
    tokio::select! {
        _ = &mut answers => {}
        () = until_hung_up(reader.get_ref()) => {
            let _ = gone_tx.send(true);
            let _ = answers.await;
        }
    }
}

/// Queue a request's answer behind the ones before it: false when the answer task ended (its
/// client gone), or when the queue stayed full (a long read or a follow ahead) until the client
/// hung up; the request is then counted as `hung_up`.
async fn queue(
    qtx: &mpsc::Sender<(Pending, Meter)>,
    item: (Pending, Meter),
    rd: &ReadHalf,
    ctx: &Ctx,
) -> bool {
    let item = match qtx.try_send(item) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(item)) => {
            item.1.hung_up(ctx);
            return false;
        }
        Err(mpsc::error::TrySendError::Full(item)) => item,
    };
    tokio::select! {
        permit = qtx.reserve() => match permit {
            Ok(permit) => {
                permit.send(item);
                true
            }
            Err(_) => {
                item.1.hung_up(ctx);
                false
            }
        },
        () = until_hung_up(rd) => {
            item.1.hung_up(ctx);
            false
        }
    }
}

/// How often a connection whose client closed its writing side looks whether it hung up.
const HANG_UP_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Return once the peer of `rd` has hung up (see [`ReadHalf::peer_hung_up`]), looked at every
/// [`HANG_UP_EVERY`] from the first on: a wait that ends sooner costs no system call.
async fn until_hung_up(rd: &ReadHalf) {
    loop {
        tokio::time::sleep(HANG_UP_EVERY).await;
        if rd.peer_hung_up() {
            return;
        }
    }
}

enum LineRead {
    Line,
    TooLarge,
    Eof,
}

/// Read one line into `line` (without the newline), refusing lines over the limit. A final
/// line without a newline at end of stream still counts as a line.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, line: &mut Vec<u8>) -> LineRead {
    loop {
        let buf = match r.fill_buf().await {
            Ok(b) => b,
            Err(_) => return LineRead::Eof,
        };
        if buf.is_empty() {
            return if line.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            };
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            if line.len() + i > MAX_LINE_BYTES {
                return LineRead::TooLarge;
            }
            line.extend_from_slice(&buf[..i]);
            r.consume(i + 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return LineRead::Line;
        }
        let n = buf.len();
        if line.len() + n > MAX_LINE_BYTES {
            return LineRead::TooLarge;
        }
        line.extend_from_slice(buf);
        r.consume(n);
    }
}

fn submit(ctx: &Ctx, job: Job, rx: oneshot::Receiver<String>, req: Option<Value>) -> Pending {
    match ctx.writer.submit(job) {
        Ok(()) => Pending::Wait(rx),
        Err(code) => {
            let msg = if code == ErrorCode::Overloaded {
                "the writer's queue is full; retry shortly"
            } else {
                "the writer has stopped"
            };
            Pending::Ready(error_line(code, msg, req))
        }
    }
}

/// What the metrics need of a request (SPEC §12): its op and when its line was read; nothing
/// when metrics are off.
struct Meter(Option<(&'static str, std::time::Instant)>);

impl Meter {
    /// A request read now from `line` (`None`: a line that is no valid request, counted under
    /// the op it names if it names one, else as op `invalid`).
    fn start(ctx: &Ctx, request: Option<&Request>, line: &[u8]) -> Meter {
        Meter(ctx.shared.metrics.as_ref().map(|_| {
            let op = match request {
                Some(r) => r.op(),
                None => crate::metrics::op_named_in(line),
            };
            (op, std::time::Instant::now())
        }))
    }

    fn answered(&self, ctx: &Ctx, line: &str) {
        if let (Some((op, t)), Some(m)) = (self.0, &ctx.shared.metrics) {
            m.answered(op, line, Some(t));
        }
    }

    /// A write's typed answer: its decision (`reserve`).
    fn decided(&self, ctx: &Ctx, answer: &Answer) {
        if let (Some((op, _)), Some(m)) = (self.0, &ctx.shared.metrics) {
            m.decided(op, answer);
        }
    }

    /// The client hung up before its answer was written: counted under outcome `hung_up`,
    /// not timed (the answer, if any, was never given).
    fn hung_up(&self, ctx: &Ctx) {
        if let (Some((op, _)), Some(m)) = (self.0, &ctx.shared.metrics) {
            m.hung_up(op);
        }
    }

    /// A stream ended (counted, not timed).
    fn streamed(&self, ctx: &Ctx) {
        if let (Some((op, _)), Some(m)) = (self.0, &ctx.shared.metrics) {
            m.answered(op, r#"{"ok":true}"#, None);
        }
    }
}

/// Decode a line; an error is the answer line.
fn decode(line: &[u8]) -> Result<RequestLine, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(
            Answer::Error(WireError::new(ErrorCode::BadRequest, "empty line")).to_line(None),
        );
    }
    decode_request(line).map_err(|(e, req)| Answer::Error(e).to_line(req))
}

/// True for the requests the writer thread serves.
fn goes_to_writer(r: &Request) -> bool {
    matches!(
        r,
        Request::Record(_)
            | Request::Reserve(_)
            | Request::Commit(_)
            | Request::Release(_)
            | Request::Extend(_)
            | Request::Observe(_)
            | Request::Reload
            | Request::Replay(_)
    )
}

fn dispatch(decoded: Result<RequestLine, String>, actor: Actor, ctx: &Ctx) -> Pending {
    let decoded = match decoded {
        Ok(d) => d,
        Err(line) => return Pending::Ready(line),
    };
    let req = decoded.req;
    let write = |cmd: WriteCmd| {
        // The idempotency digest here, off the writer thread.
        let digest = cmd.digest();
        let (tx, rx) = oneshot::channel();
        let job = Job::Write {
            cmd,
            digest,
            actor,
            reply: tx,
        };
        match ctx.writer.submit(job) {
            Ok(()) => Pending::Answer(rx, req.clone()),
            Err(code) => {
                let msg = if code == ErrorCode::Overloaded {
                    "the writer's queue is full; retry shortly"
                } else {
                    "the writer has stopped"
                };
                Pending::Ready(error_line(code, msg, req.clone()))
            }
        }
    };
    match decoded.request {
        Request::Hello(_) => Pending::Read(Box::new(move |ctx: &Ctx| {
            let l = read_ledger(&ctx.shared);
            serde_json::to_string(&HelloAnswer {
                ok: true,
                server: format!("bursard {}", env!("CARGO_PKG_VERSION")),
                protocol: bursar_schemas::PROTOCOL_VERSION,
                policy_version: l.policy_version(),
                req,
            })
            .unwrap_or_default()
        })),
        // On a blocking thread: a status weighs every matching bucket (its `limit` only cuts
        // the rows shown), and the connection's thread serves other connections meanwhile.
        Request::Status(s) => Pending::Blocking(Box::new(move |ctx: &Ctx| {
            let now = (ctx.clock)();
            let answer = read_ledger(&ctx.shared).status(&s, now);
            echoed(answer, req, |a, req| a.req = req)
        })),
        // On a blocking thread: a report over months of rollups takes tens to hundreds of ms.
        Request::Report(r) => Pending::Blocking(Box::new(move |ctx: &Ctx| {
            let now = (ctx.clock)();
            // Read under the ledger's read lock from the rollups; rendered after it.
            let answer = read_ledger(&ctx.shared).report(&r, now);
            echoed(answer, req, |a, req| a.req = req)
        })),
        Request::Check(c) if c.wait_ms.is_some_and(|w| w > 0) => {
            Pending::WaitingCheck(Box::new(c), req)
        }
        Request::Check(c) => Pending::Read(Box::new(move |ctx: &Ctx| {
            let now = (ctx.clock)();
            // Decide under the read lock; serialise after it is released.
            let answer = read_ledger(&ctx.shared).check(&c, now);
            if let Some(m) = &ctx.shared.metrics {
                m.decided("check", &answer);
            }
            answer.to_line(req)
        })),
        Request::Record(r) => write(WriteCmd::Record(r)),
        Request::Reserve(r) => write(WriteCmd::Reserve(r)),
        Request::Commit(r) => write(WriteCmd::Commit(r)),
        Request::Release(r) => write(WriteCmd::Release(r)),
        Request::Extend(r) => write(WriteCmd::Extend(r)),
        Request::Observe(r) => write(WriteCmd::Observe(r)),
        Request::ClusterStatus => Pending::Ready(
            Answer::Error(WireError::bad_field(
                "op",
                "this bursard runs single-host: cluster_status needs [cluster] (SPEC §13)",
            ))
            .to_line(req),
        ),
        Request::Reload => {
            if !ctx.admin_uids.contains(&actor.uid) {
                return Pending::Ready(forbidden("reload", actor, req));
            }
            let (tx, rx) = oneshot::channel();
            submit(
                ctx,
                Job::Reload {
                    policy: None,
                    actor,
                    req: req.clone(),
                    reply: Some(tx),
                },
                rx,
                req,
            )
        }
        Request::Replay(r) => {
            let admin = ctx.admin_uids.contains(&actor.uid);
            if r.apply && !admin {
                return Pending::Ready(forbidden("replay with apply", actor, req));
            }
            if r.pricing.import.is_some() && !admin {
                // Never a word on whether the path exists (SPEC §6).
                return Pending::Ready(forbidden(
                    "pricing.import (a path the daemon would read)",
                    actor,
                    req,
                ));
            }
            Pending::Blocking(Box::new(move |ctx: &Ctx| replay(ctx, r, actor, req)))
        }
        Request::Verify => Pending::Blocking(Box::new(move |ctx: &Ctx| {
            let answer = verify_log(&ctx.shared).map(|(events, head)| VerifyAnswer {
                ok: true,
                events,
                head: head.to_hex(),
                partitions: Vec::new(),
                req: req.clone(),
            });
            match answer {
                Ok(a) => serde_json::to_string(&a).unwrap_or_default(),
                Err(e) => Answer::Error(e).to_line(req),
            }
        })),
        Request::Tail(t) => stream_request(StreamKind::Tail(t), None, req),
        Request::Export(e) => stream_request(StreamKind::Export(e), None, req),
    }
}

/// Check a log's chain up to what it holds durably (folded, in cluster mode): its events and
/// head.
fn verify_log(shared: &Shared) -> Result<(u64, bursar_schemas::event::Hash32), WireError> {
    let durable = *shared.durable.borrow();
    crate::log::verify_chain_in_chunks(|| lock_store(shared), durable).map_err(|e| WireError {
        code: ErrorCode::Internal,
        message: format!("verify failed at seq {}: {e}", e.seq()),
        field: None,
    })
}

/// `verify` on a cluster node: each partition's copy, and the cluster's head (BLAKE3 over the
/// partitions' heads in order).
fn cluster_verify(c: &crate::cluster::Cluster) -> Result<VerifyAnswer, WireError> {
    let mut partitions = Vec::new();
    let mut heads = blake3::Hasher::new();
    let mut events = 0u64;
    for (i, p) in c.parts.iter().enumerate() {
        let (n, head) = verify_log(&p.shared).map_err(|mut e| {
            e.message = format!("partition {i}: {}", e.message);
            e
        })?;
        heads.update(&head.0);
        events += n;
        partitions.push(bursar_schemas::wire::PartitionVerified {
            partition: u32::try_from(i).unwrap_or(u32::MAX),
            events: n,
            head: head.to_hex(),
        });
    }
    Ok(VerifyAnswer {
        ok: true,
        events,
        head: bursar_schemas::event::Hash32(*heads.finalize().as_bytes()).to_hex(),
        partitions,
        req: None,
    })
}

/// `report` on a cluster node: each partition's report, rows of the same period and group
/// summed (a group's usage may lie in several partitions), in the order one log's report has
/// (by period, then by group values).
fn cluster_report(
    c: &crate::cluster::Cluster,
    r: &bursar_schemas::wire::ReportRequest,
    now: bursar_schemas::TsMicros,
) -> Result<bursar_schemas::wire::ReportAnswer, WireError> {
    use bursar_schemas::wire::{ReportRow, REPORT_MAX_ROWS};
    type Key = (bursar_schemas::TsMicros, Vec<Option<String>>);
    let mut merged: Option<bursar_schemas::wire::ReportAnswer> = None;
    let mut rows: std::collections::BTreeMap<Key, ReportRow> = Default::default();
    let mut left_out = 0u64;
    for p in &c.parts {
        let mut a = read_ledger(&p.shared).report(r, now)?;
        left_out += a.total_rows.saturating_sub(a.rows.len() as u64);
        for row in std::mem::take(&mut a.rows) {
            let start = bursar_core::time::parse_ts(&row.period_start).unwrap_or_default();
            let values = r
                .group_by
                .iter()
                .map(|k| row.group.get(k).cloned().flatten());
            match rows.entry((start, values.collect())) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(row);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let m = o.get_mut();
                    m.cost_micros += row.cost_micros;
                    m.input_tokens += row.input_tokens;
                    m.cached_input_tokens += row.cached_input_tokens;
                    m.output_tokens += row.output_tokens;
                    m.requests += row.requests;
                    m.denied += row.denied;
                }
            }
        }
        match &mut merged {
            None => merged = Some(a),
            Some(m) => {
                // The same policy everywhere: the same subscriptions; the partition whose
                // usage starts first covers the most fee periods.
                for (mine, theirs) in m.subscriptions.iter_mut().zip(a.subscriptions) {
                    if theirs.periods > mine.periods {
                        *mine = theirs;
                    }
                }
            }
        }
    }
    let mut answer = merged.ok_or_else(|| WireError::new(ErrorCode::Internal, "no partitions"))?;
    // Rows a partition left out are counted as rows of their own (at most that many more).
    answer.total_rows = rows.len() as u64 + left_out;
    answer.rows = rows.into_values().take(REPORT_MAX_ROWS).collect();
    answer.truncated = answer.total_rows > answer.rows.len() as u64;
    Ok(answer)
}

/// A `tail` or `export`, checked (`partitions`: the cluster's, `None` single-host).
fn stream_request(kind: StreamKind, partitions: Option<usize>, req: Option<Value>) -> Pending {
    match kind.check(partitions) {
        Ok(()) => Pending::Stream(kind, req),
        Err(e) => Pending::Ready(Answer::Error(e).to_line(req)),
    }
}

/// A request in cluster mode (SPEC §13): writes go to their partition's writer (here or
/// forwarded), reads are answered from this node's fold of their partition with `lag_ms`.
fn cluster_dispatch(
    c: &Arc<crate::cluster::Cluster>,
    decoded: Result<RequestLine, String>,
    raw: Vec<u8>,
    actor: Actor,
    ctx: &Ctx,
) -> Pending {
    let decoded = match decoded {
        Ok(d) => d,
        Err(line) => return Pending::Ready(line),
    };
    let req = decoded.req;
    let spawned = |f: std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>| {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(f.await);
        });
        Pending::Wait(rx)
    };
    match decoded.request {
        Request::Hello(h) => dispatch(
            Ok(RequestLine {
                request: Request::Hello(h),
                req,
            }),
            actor,
            ctx,
        ),
        Request::Check(ch) => {
            let labels = Some(&ch.labels);
            let i = match c.partition_for_labels(labels) {
                Ok(i) => i,
                Err(e) => return Pending::Ready(Answer::Error(e).to_line(req)),
            };
            if ch.wait_ms.is_some_and(|w| w > 0) {
                return Pending::WaitingCheck(Box::new(ch), req);
            }
            let p = c.parts[i].clone();
            Pending::Read(Box::new(move |ctx: &Ctx| {
                let now = (ctx.clock)();
                let answer = read_ledger(&p.shared).check(&ch, now);
                match answer {
                    Answer::Decision(mut d) => {
                        d.lag_ms = Some(p.lag_ms());
                        Answer::Decision(d).to_line(req)
                    }
                    other => other.to_line(req),
                }
            }))
        }
        Request::Status(s) => {
            let c = c.clone();
            // On a blocking thread, as a single node's (`dispatch`).
            Pending::Blocking(Box::new(move |ctx: &Ctx| {
                let now = (ctx.clock)();
                let mut merged: Option<bursar_schemas::wire::StatusAnswer> = None;
                let mut lag = 0u64;
                for p in &c.parts {
                    lag = lag.max(p.lag_ms());
                    let answer = read_ledger(&p.shared).status(&s, now);
                    let Ok(a) = answer else {
                        return echoed(answer, req, |a, req| a.req = req);
                    };
                    match &mut merged {
                        None => merged = Some(a),
                        Some(m) => crate::cluster::merge_status(m, a),
                    }
                }
                let Some(mut m) = merged else {
                    return error_line(ErrorCode::Internal, "no partitions", req);
                };
                // One log's order and default limit over them all (each partition applied
                // the limit to its own).
                let limit = s.limit.unwrap_or(ledger::DEFAULT_STATUS_LIMIT);
                crate::cluster::keep_most_utilized(&mut m, limit);
                m.lag_ms = Some(lag);
                echoed(Ok(m), req, |a, req| a.req = req)
            }))
        }
        request @ (Request::Record(_)
        | Request::Reserve(_)
        | Request::Commit(_)
        | Request::Release(_)
        | Request::Extend(_)
        | Request::Observe(_)) => {
            let c = c.clone();
            spawned(Box::pin(c.write(request, raw, actor, req)))
        }
        Request::Reload => {
            if !ctx.admin_uids.contains(&actor.uid) {
                return Pending::Ready(forbidden("reload", actor, req));
            }
            spawned(Box::pin(c.clone().reload(actor, req)))
        }
        Request::ClusterStatus => spawned(Box::pin(c.clone().status(req))),
        Request::Tail(t) => stream_request(StreamKind::Tail(t), Some(c.parts.len()), req),
        Request::Export(e) => stream_request(StreamKind::Export(e), Some(c.parts.len()), req),
        Request::Verify => {
            let c = c.clone();
            Pending::Blocking(Box::new(move |_: &Ctx| {
                echoed(cluster_verify(&c), req, |a, req| a.req = req)
            }))
        }
        Request::Report(r) => {
            let c = c.clone();
            Pending::Blocking(Box::new(move |ctx: &Ctx| {
                let now = (ctx.clock)();
                echoed(cluster_report(&c, &r, now), req, |a, req| a.req = req)
            }))
        }
        Request::Replay(r) => {
            let admin = ctx.admin_uids.contains(&actor.uid);
            cluster_replay(c, r, raw, actor, req, admin)
        }
    }
}

/// `replay`, on a blocking thread: an admin's `pricing.import` is read here (never on the
/// writer thread); `apply` goes to the writer, a dry run is folded here from the log alone, at
/// most one at a time.
fn replay(ctx: &Ctx, request: ReplayRequest, actor: Actor, req: Option<Value>) -> String {
    let import_text = match &request.pricing.import {
        Some(path) => match read_import(path) {
            Ok(text) => Some(text),
            Err(msg) => {
                return Answer::Error(WireError::bad_field("pricing.import", msg)).to_line(req)
            }
        },
        None => None,
    };
    if let Some(text) = &request.policy {
        return what_if(ctx, text, &request, req);
    }
    if request.apply {
        let (tx, rx) = oneshot::channel();
        let job = Job::Replay {
            request,
            import_text,
            actor,
            req: req.clone(),
            reply: tx,
        };
        return match ctx.writer.submit(job) {
            Ok(()) => rx.blocking_recv().unwrap_or_else(|_| {
                error_line(
                    ErrorCode::Unavailable,
                    "the writer stopped before answering",
                    req,
                )
            }),
            Err(code) => error_line(code, "the writer's queue is full; retry shortly", req),
        };
    }
    let _busy = match DryRunSlot::take(ctx, &req) {
        Ok(slot) => slot,
        Err(line) => return line,
    };
    dry_run(ctx, &request, import_text.as_deref(), req)
}

/// The one dry run (repricing or what-if) allowed at a time, given back when dropped, even
/// if the dry run panics.
struct DryRunSlot<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> DryRunSlot<'a> {
    /// The slot, or the `overloaded` answer line while another dry run holds it.
    fn take(ctx: &'a Ctx, req: &Option<Value>) -> Result<DryRunSlot<'a>, String> {
        if ctx
            .dry_run_busy
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(error_line(
                ErrorCode::Overloaded,
                "another dry-run replay is running; retry when it is done",
                req.clone(),
            ));
        }
        Ok(DryRunSlot(&ctx.dry_run_busy))
    }
}

impl Drop for DryRunSlot<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A what-if `replay` (SPEC §11): the log up to the durable head decided again under the
/// policy `text`, off the writer thread, at most one dry run at a time. Changes nothing.
fn what_if(ctx: &Ctx, text: &str, request: &ReplayRequest, req: Option<Value>) -> String {
    let (policy, since) = match what_if_policy(text, request) {
        Ok(p) => p,
        Err(e) => return Answer::Error(e).to_line(req),
    };
    let _busy = match DryRunSlot::take(ctx, &req) {
        Ok(slot) => slot,
        Err(line) => return line,
    };
    echoed(what_if_on(&ctx.shared, &policy, since), req, |a, req| {
        a.req = req
    })
}

/// A what-if's policy and `since`, checked.
fn what_if_policy(
    text: &str,
    request: &ReplayRequest,
) -> Result<(bursar_schemas::policy::ResolvedPolicy, i64), WireError> {
    if request.apply {
        return Err(WireError::bad_field(
            "apply",
            "a what-if replay never applies its policy; `reload` applies a policy",
        ));
    }
    if request.pricing != Default::default() {
        return Err(WireError::bad_field(
            "pricing",
            "give either pricing (a repricing) or policy (a what-if), not both",
        ));
    }
    let since = since_of(request)?;
    // A policy sent over the socket never makes the daemon read a file it names.
    let no_import = |p: &str| -> Result<String, String> {
        Err(format!(
            "a what-if policy cannot import {p:?}: the daemon reads no file a request names; put the prices in [pricing.models] instead"
        ))
    };
    match bursar_core::policy::parse_policy(text, "replay.policy", &no_import) {
        Ok(l) => Ok((l.resolved, since)),
        Err(errs) => {
            let msg = errs
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Err(WireError::bad_field("policy", msg))
        }
    }
}

/// A what-if on one log, up to what it holds durably.
fn what_if_on(
    shared: &Shared,
    policy: &bursar_schemas::policy::ResolvedPolicy,
    since: i64,
) -> Result<bursar_schemas::wire::WhatIfAnswer, WireError> {
    let _sharing = bursar_schemas::event::SharingLabels::start();
    let head = *shared.durable.borrow();
    ledger::collect_epochs(LogChunks::new(shared, head))
        .and_then(|epochs| {
            ledger::what_if_with(&epochs, LogChunks::new(shared, head), policy, since)
        })
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
}

/// A `replay`'s `since` (default: the start of the log), or the error naming it.
fn since_of(request: &ReplayRequest) -> Result<i64, WireError> {
    match &request.since {
        None => Ok(i64::MIN),
        Some(s) => bursar_core::time::parse_ts(s)
            .ok_or_else(|| WireError::bad_field("since", "since must be an RFC 3339 time")),
    }
}

/// A read's answer line: the answer with `req` echoed (`echo` puts it in), or its error.
fn echoed<A: serde::Serialize>(
    answer: Result<A, WireError>,
    req: Option<Value>,
    echo: impl FnOnce(&mut A, Option<Value>),
) -> String {
    match answer {
        Ok(mut a) => {
            echo(&mut a, req);
            serde_json::to_string(&a).unwrap_or_default()
        }
        Err(e) => Answer::Error(e).to_line(req),
    }
}

/// Largest `pricing.import` file a `replay` reads.
pub const MAX_IMPORT_BYTES: u64 = 64 << 20;

/// Read an admin's `pricing.import`: a regular file of at most [`MAX_IMPORT_BYTES`]. Opened
/// without blocking, so a FIFO or a device is refused instead of hanging or streaming for ever.
fn read_import(path: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    if meta.len() > MAX_IMPORT_BYTES {
        return Err(format!(
            "{path} is {} bytes; the limit is {MAX_IMPORT_BYTES}",
            meta.len()
        ));
    }
    let mut text = String::new();
    file.take(MAX_IMPORT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if text.len() as u64 > MAX_IMPORT_BYTES {
        return Err(format!("{path} grew past {MAX_IMPORT_BYTES} bytes"));
    }
    Ok(text)
}

/// A dry-run replay off the writer thread: the log up to the durable head is folded twice
/// side by side (as it is, and under the new prices); the ledger is only read for the prices
/// in force.
fn dry_run(
    ctx: &Ctx,
    request: &ReplayRequest,
    import_text: Option<&str>,
    req: Option<Value>,
) -> String {
    let answer = since_of(request)
        .and_then(|since| dry_run_on(&ctx.shared, (ctx.clock)(), request, since, import_text));
    echoed(answer, req, |a, req| a.req = req)
}

/// A dry-run repricing of one log, up to what it holds durably.
fn dry_run_on(
    shared: &Shared,
    now: bursar_schemas::TsMicros,
    request: &ReplayRequest,
    since: i64,
    import_text: Option<&str>,
) -> Result<bursar_schemas::wire::ReplayAnswer, WireError> {
    let (head, base) = {
        let l = read_ledger(shared);
        (
            *shared.durable.borrow(),
            l.current_prices().cloned().unwrap_or_default(),
        )
    };
    let table = bursar_core::policy::parse_pricing_section(
        &request.pricing,
        &base,
        "replay.pricing",
        &|_| Ok(import_text.unwrap_or_default().to_string()),
    )
    .map_err(|errs| {
        let msg = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        WireError::bad_field("pricing", msg)
    })?;
    let internal = |e: &dyn std::fmt::Display| WireError::new(ErrorCode::Internal, e.to_string());
    let _sharing = bursar_schemas::event::SharingLabels::start();
    let epochs = ledger::collect_epochs(LogChunks::new(shared, head)).map_err(|e| internal(&e))?;
    ledger::replay_from_log(&epochs, LogChunks::new(shared, head), &table, since, now)
        .map(|outcome| outcome.answer)
        .map_err(|e| internal(&e))
}

/// `replay` on a cluster node (SPEC §11, §13). A dry run (repricing or what-if) folds every
/// partition's copy here and puts the answers together; `apply` goes to each partition's
/// writer, here or forwarded, and sums their answers.
fn cluster_replay(
    c: &Arc<crate::cluster::Cluster>,
    r: ReplayRequest,
    raw: Vec<u8>,
    actor: Actor,
    req: Option<Value>,
    admin: bool,
) -> Pending {
    if r.apply && !admin {
        return Pending::Ready(forbidden("replay with apply", actor, req));
    }
    if r.pricing.import.is_some() && !admin {
        return Pending::Ready(forbidden(
            "pricing.import (a path the daemon would read)",
            actor,
            req,
        ));
    }
    if r.apply && r.policy.is_none() {
        if r.pricing.import.is_some() {
            return Pending::Ready(
                Answer::Error(WireError::bad_field(
                    "pricing.import",
                    "in cluster mode an applied replay takes its prices in the request \
                     (pricing.models): each partition's writer applies it on its own host",
                ))
                .to_line(req),
            );
        }
        let (tx, rx) = oneshot::channel();
        let c = c.clone();
        tokio::spawn(async move {
            let _ = tx.send(c.replay_apply(r, raw, actor, req).await);
        });
        return Pending::Wait(rx);
    }
    let c = c.clone();
    Pending::Blocking(Box::new(move |ctx: &Ctx| {
        let import_text = match &r.pricing.import {
            Some(path) => match read_import(path) {
                Ok(text) => Some(text),
                Err(msg) => {
                    return Answer::Error(WireError::bad_field("pricing.import", msg)).to_line(req)
                }
            },
            None => None,
        };
        let checked = match &r.policy {
            Some(text) => what_if_policy(text, &r).map(|(p, since)| (Some(p), since)),
            None => since_of(&r).map(|since| (None, since)),
        };
        let (policy, since) = match checked {
            Ok(c) => c,
            Err(e) => return Answer::Error(e).to_line(req),
        };
        let _busy = match DryRunSlot::take(ctx, &req) {
            Ok(slot) => slot,
            Err(line) => return line,
        };
        let now = (ctx.clock)();
        match policy {
            Some(policy) => {
                let answers = c
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| what_if_on(&p.shared, &policy, since).map(|a| (i, a)));
                echoed(
                    answers
                        .collect::<Result<Vec<_>, _>>()
                        .map(crate::cluster::merge_what_ifs),
                    req,
                    |a, req| a.req = req,
                )
            }
            None => {
                let answers = c
                    .parts
                    .iter()
                    .map(|p| dry_run_on(&p.shared, now, &r, since, import_text.as_deref()));
                echoed(
                    answers
                        .collect::<Result<Vec<_>, _>>()
                        .map(crate::cluster::merge_replays),
                    req,
                    |a, req| a.req = req,
                )
            }
        }
    }))
}

/// The log from seq 1 up to `last`, read a chunk at a time with the store locked only per
/// chunk (the writer appends in between).
struct LogChunks<'a> {
    shared: &'a Shared,
    next: u64,
    last: u64,
    buffer: std::collections::VecDeque<bursar_schemas::event::Envelope>,
    failed: bool,
}

impl<'a> LogChunks<'a> {
    fn new(shared: &'a Shared, last: u64) -> Self {
        LogChunks {
            shared,
            next: 1,
            last,
            buffer: Default::default(),
            failed: false,
        }
    }
}

impl Iterator for LogChunks<'_> {
    type Item = Result<bursar_schemas::event::Envelope, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.buffer.is_empty() && self.next <= self.last {
            let store = lock_store(self.shared);
            for item in store.read_from(self.next).take(STREAM_CHUNK_EVENTS) {
                match item {
                    Ok(env) if env.seq <= self.last => {
                        self.next = env.seq + 1;
                        self.buffer.push_back(env);
                    }
                    Ok(_) => break,
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e.to_string()));
                    }
                }
            }
            if self.buffer.is_empty() {
                // The log ends before `last`: it cannot (`last` was durable).
                self.failed = true;
                return Some(Err(format!(
                    "the log ends at seq {} before the durable seq {}",
                    self.next.saturating_sub(1),
                    self.last
                )));
            }
        }
        self.buffer.pop_front().map(Ok)
    }
}

/// The original answer of a resent request, whose event is at `seq`: rendered again from the
/// event and its receipt (events of the first release carry none: their answer is read from
/// that release's `ids` tree), with `duplicate: true`.
pub fn original_answer(shared: &Shared, seq: u64, req: Option<Value>) -> String {
    let event = {
        let store = lock_store(shared);
        let first = store.read_from(seq).next();
        first
    };
    let env = match event {
        Some(Ok(env)) if env.seq == seq => env,
        Some(Err(e)) => {
            return error_line(
                ErrorCode::Internal,
                format!("reading event {seq} for a duplicate: {e}"),
                req,
            )
        }
        _ => {
            return error_line(
                ErrorCode::Internal,
                format!("event {seq} of a duplicate is not in the log"),
                req,
            )
        }
    };
    if let Some(answer) = read_ledger(shared).render_event(env.seq, env.ts, &env.body, true) {
        return answer.to_line(req);
    }
    let key = match &env.body {
        EventBody::UsageRecorded(u) => format!("e/{}", u.event_id),
        EventBody::ReservationCreated(r) => format!("r/{}", r.reservation_id),
        EventBody::ReservationDenied(r) => format!("r/{}", r.reservation_id),
        EventBody::ReservationReleased(r) => format!("x/{}", r.reservation_id),
        _ => String::new(),
    };
    let old = {
        let store = lock_store(shared);
        crate::writer::first_release_answer(store.as_ref(), &key)
    };
    match old.and_then(|(_, text)| serde_json::from_str::<Value>(&text).ok()) {
        Some(Value::Object(mut m)) => {
            m.insert("duplicate".into(), Value::Bool(true));
            if let Some(r) = req {
                m.insert("req".into(), r);
            }
            serde_json::to_string(&m).unwrap_or_default()
        }
        _ => error_line(
            ErrorCode::Internal,
            format!("the original answer of event {seq} was not found"),
            req,
        ),
    }
}

fn forbidden(what: &str, actor: Actor, req: Option<Value>) -> String {
    error_line(
        ErrorCode::Forbidden,
        format!("{what} is for admin uids only (peer uid {})", actor.uid),
        req,
    )
}

type Out = Arc<tokio::sync::Mutex<BufWriter<WriteHalf>>>;

async fn write_answers(
    out: Out,
    outstanding: Arc<std::sync::atomic::AtomicUsize>,
    mut rx: mpsc::Receiver<(Pending, Meter)>,
    ctx: Arc<Ctx>,
    gate: Arc<ReadGate>,
    mut gone: tokio::sync::watch::Receiver<bool>,
) {
    // The client's socket failed: nothing more is taken (the queue is closed), and what is
    // still queued is dropped as below.
    let mut socket_failed = false;
    while let Some((p, meter)) = rx.recv().await {
        if socket_failed || *gone.borrow() {
            // The client hung up: answers are dropped (the writer still makes every write
            // sent to it; a waiting `reserve` whose answer nobody awaits leaves the line), but
            // work that runs on a blocking thread (a `replay` with `apply` among it) is still
            // done, with the connection's place held until it ends.
            if let Pending::Blocking(f) = p {
                let c = ctx.clone();
                let _ = tokio::task::spawn_blocking(move || f(&c)).await;
            }
            meter.hung_up(&ctx);
            continue;
        }
        let mut out = out.lock().await;
        let ok = match p {
            Pending::Ready(line) => {
                meter.answered(&ctx, &line);
                put(&mut *out, &line).await
            }
            Pending::Wait(r) => {
                let Some(r) = or_gone(&mut gone, r).await else {
                    meter.hung_up(&ctx);
                    continue;
                };
                let line = r.unwrap_or_else(|_| {
                    error_line(
                        ErrorCode::Unavailable,
                        "the writer stopped before answering",
                        None,
                    )
                });
                meter.answered(&ctx, &line);
                put(&mut *out, &line).await
            }
            Pending::Answer(r, req) => {
                let Some(r) = or_gone(&mut gone, r).await else {
                    meter.hung_up(&ctx);
                    continue;
                };
                // Rendered here, after every lock is released.
                let answer = r.map(crate::writer::Outcome::render).unwrap_or_else(|_| {
                    Answer::Error(WireError::new(
                        ErrorCode::Unavailable,
                        "the writer stopped before answering",
                    ))
                });
                meter.decided(&ctx, &answer);
                let line = match answer {
                    Answer::Duplicate { seq } => {
                        let c = ctx.clone();
                        tokio::task::spawn_blocking(move || original_answer(&c.shared, seq, req))
                            .await
                            .unwrap_or_else(|_| {
                                error_line(ErrorCode::Internal, "internal error", None)
                            })
                    }
                    answer => answer.to_line(req),
                };
                meter.answered(&ctx, &line);
                put(&mut *out, &line).await
            }
            Pending::Read(f) => {
                let line = f(&ctx);
                gate.evaluated_one();
                meter.answered(&ctx, &line);
                put(&mut *out, &line).await
            }
            Pending::Blocking(f) => {
                let c = ctx.clone();
                let line = tokio::task::spawn_blocking(move || f(&c))
                    .await
                    .unwrap_or_else(|_| error_line(ErrorCode::Internal, "internal error", None));
                gate.evaluated_one();
                meter.answered(&ctx, &line);
                put(&mut *out, &line).await
            }
            Pending::WaitingCheck(c, req) => {
                let Some(answer) = or_gone(&mut gone, waiting_check(&ctx, &c)).await else {
                    meter.hung_up(&ctx);
                    continue;
                };
                gate.evaluated_one();
                meter.decided(&ctx, &answer);
                let line = answer.to_line(req);
                meter.answered(&ctx, &line);
                put(&mut *out, &line).await
            }
            Pending::Stream(kind, req) => {
                // A follow ends when its client hangs up: its usual end, counted as one.
                let follows = matches!(&kind, StreamKind::Tail(t) if t.follow);
                let Some(ok) = or_gone(&mut gone, stream(&mut *out, kind, req, &ctx, &gate)).await
                else {
                    if follows {
                        meter.streamed(&ctx);
                    } else {
                        meter.hung_up(&ctx);
                    }
                    continue;
                };
                meter.streamed(&ctx);
                ok
            }
        };
        if !ok || (rx.is_empty() && out.flush().await.is_err()) {
            rx.close();
            socket_failed = true;
            continue;
        }
        outstanding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    if !socket_failed {
        let _ = out.lock().await.flush().await;
    }
}

/// `f`'s output, or `None` once the connection's client has hung up.
async fn or_gone<F: std::future::Future>(
    gone: &mut tokio::sync::watch::Receiver<bool>,
    f: F,
) -> Option<F::Output> {
    tokio::select! {
        v = f => Some(v),
        _ = gone.wait_for(|g| *g) => None,
    }
}

/// A `check` with `wait_ms` (SPEC §10): decided now and again every 5 ms (a release shows
/// within a tick; rolling windows slide, observations reset) until it fits, its deny is one
/// waiting cannot see through, or its time is up. Nothing is appended; the answer says
/// `waited_ms`. Waiting checks count against `[daemon] max_waiters` with the waiting reserves.
async fn waiting_check(ctx: &Arc<Ctx>, c: &CheckRequest) -> Answer {
    /// A place in the line, given back however the wait ends (the connection may go away).
    struct Slot<'a>(&'a Shared);
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            self.0
                .waiting_checks
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let since = std::time::Instant::now();
    let deadline = since + std::time::Duration::from_millis(c.wait_ms.unwrap_or(0));
    let mut shutdown = ctx.shutdown.clone();
    // A cluster node decides it on the fold of the labels' partition, which moves as this
    // node copies the partition's log (a release on any node shows here once copied).
    let partition = match &ctx.cluster {
        Some(cl) => match cl.partition_for_labels(Some(&c.labels)) {
            Ok(i) => cl.parts.get(i).cloned(),
            Err(e) => return Answer::Error(e),
        },
        None => None,
    };
    let shared: &Shared = partition.as_ref().map_or(&ctx.shared, |p| &p.shared);
    let mut slot: Option<Slot<'_>> = None;
    loop {
        let now = (ctx.clock)();
        let (answer, waitable) = read_ledger(shared).check_waitable(c, now);
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !waitable || left.is_zero() {
            return match answer {
                Answer::Decision(mut d) => {
                    d.waited_ms =
                        Some(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX));
                    d.lag_ms = partition.as_ref().map(|p| p.lag_ms());
                    Answer::Decision(d)
                }
                other => other,
            };
        }
        if slot.is_none() {
            use std::sync::atomic::Ordering::Relaxed;
            let max = shared.max_waiters.load(Relaxed);
            let checks = shared.waiting_checks.fetch_add(1, Relaxed);
            slot = Some(Slot(shared));
            if checks + shared.waiting.load(Relaxed) >= max {
                return Answer::Error(WireError::new(
                    ErrorCode::Overloaded,
                    format!("{max} requests already wait ([daemon] max_waiters); retry later"),
                ));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(left.min(crate::writer::WAIT_RETRY_EVERY)) => {}
            _ = shutdown.changed() => {
                return Answer::Error(WireError::new(
                    ErrorCode::Unavailable,
                    "the daemon is stopping",
                ));
            }
        }
    }
}

async fn put<W: AsyncWriteExt + Unpin>(out: &mut W, line: &str) -> bool {
    out.write_all(line.as_bytes()).await.is_ok() && out.write_all(b"\n").await.is_ok()
}

/// A `tail` or `export`: the lines of its producers ([`crate::streams`]), then the end line.
async fn stream<W: AsyncWriteExt + Unpin>(
    out: &mut W,
    kind: StreamKind,
    req: Option<Value>,
    ctx: &Arc<Ctx>,
    gate: &ReadGate,
) -> bool {
    let all = match &ctx.cluster {
        Some(c) => c
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| crate::streams::Source {
                shared: p.shared.clone(),
                partition: u32::try_from(i).ok(),
            })
            .collect(),
        None => vec![crate::streams::Source {
            shared: ctx.shared.clone(),
            partition: None,
        }],
    };
    let mut lines = crate::streams::start(&kind, kind.sources(all), ctx.shutdown.clone());
    // A stream that does not follow shows the log as it is now (fixed by `start`), not the
    // writes the connection sends after it; those may go ahead from here.
    gate.evaluated_one();
    let mut count = 0u64;
    while let Some(item) = lines.recv().await {
        match item {
            crate::streams::Item::Line(text) => {
                if !put(out, &text).await {
                    return false;
                }
                count += 1;
            }
            crate::streams::Item::Failed(e) => {
                return put(out, &error_line(ErrorCode::Internal, e, req)).await;
            }
        }
        if lines.is_empty() && out.flush().await.is_err() {
            return false;
        }
    }
    let end = StreamEnd {
        ok: true,
        end: true,
        count: kind.counts().then_some(count),
        req,
    };
    put(out, &serde_json::to_string(&end).unwrap_or_default()).await
}
