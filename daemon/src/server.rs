//! The socket server: JSON Lines over a Unix stream socket (SPEC §6).
//!
//! One task reads a connection's lines and queues one pending answer per request; a second task
//! writes the answers strictly in request order. Reads (`hello`, `status`, `check`) are evaluated
//! when their turn to be answered comes, so a connection always reads its own earlier writes,
//! and they never wait for a disk sync. Writes go to the single writer thread.

use crate::writer::{error_line, lock_store, read_ledger, Job, Shared, WriteCmd, WriterHandle};
use bursar_core::ledger::Answer;
use bursar_schemas::event::Actor;
use bursar_schemas::wire::{
    decode_request, ErrorCode, EventLine, ExportRequest, ExportedEvent, HelloAnswer, Request,
    StreamEnd, TailRequest, VerifyAnswer, WireError, MAX_LINE_BYTES,
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
}

type ReadFn = Box<dyn FnOnce(&Ctx) -> String + Send>;

/// An answer waiting for its turn.
enum Pending {
    /// Known already.
    Ready(String),
    /// From the writer.
    Wait(oneshot::Receiver<String>),
    /// Evaluated at its turn.
    Read(ReadFn),
    /// Evaluated at its turn, on a blocking thread.
    Blocking(ReadFn),
    /// A stream of lines (tail, export) produced at its turn.
    Stream(StreamKind, Option<Value>),
}

enum StreamKind {
    Tail(TailRequest),
    Export(ExportRequest),
}

/// Accept connections until shutdown.
pub async fn serve(listener: UnixListener, ctx: Arc<Ctx>) {
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
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    handle(stream, ctx).await;
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

async fn handle(stream: UnixStream, ctx: Arc<Ctx>) {
    let actor = actor_of(&stream);
    let (rd, wr) = stream.into_split();
    let (qtx, qrx) = mpsc::channel::<Pending>(MAX_IN_FLIGHT_PER_CONNECTION);
    let writer_ctx = ctx.clone();
    let answers = tokio::spawn(write_answers(wr, qrx, writer_ctx));
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
                let pending = dispatch(&line, actor, &ctx);
                line.clear();
                if qtx.send(pending).await.is_err() {
                    break;
                }
            }
            LineRead::TooLarge => {
                let e = WireError::new(
                    ErrorCode::TooLarge,
                    format!("line longer than {MAX_LINE_BYTES} bytes; closing the connection"),
                );
                let _ = qtx
                    .send(Pending::Ready(Answer::Error(e).to_line(None)))
                    .await;
                break;
            }
            LineRead::Eof => break,
        }
    }
    drop(qtx);
    let _ = answers.await;
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

fn dispatch(line: &[u8], actor: Actor, ctx: &Ctx) -> Pending {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Pending::Ready(
            Answer::Error(WireError::new(ErrorCode::BadRequest, "empty line")).to_line(None),
        );
    }
    let decoded = match decode_request(line) {
        Ok(d) => d,
        Err((e, req)) => return Pending::Ready(Answer::Error(e).to_line(req)),
    };
    let req = decoded.req;
    let write = |cmd: WriteCmd| {
        let (tx, rx) = oneshot::channel();
        let job = Job::Write {
            cmd,
            actor,
            req: req.clone(),
            reply: tx,
        };
        submit(ctx, job, rx, req.clone())
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
        Request::Status(s) => Pending::Read(Box::new(move |ctx: &Ctx| {
            let now = (ctx.clock)();
            let answer = read_ledger(&ctx.shared).status(&s, now);
            match answer {
                Ok(mut a) => {
                    a.req = req;
                    serde_json::to_string(&a).unwrap_or_default()
                }
                Err(e) => Answer::Error(e).to_line(req),
            }
        })),
        Request::Check(c) => Pending::Read(Box::new(move |ctx: &Ctx| {
            let now = (ctx.clock)();
            // Decide under the read lock; serialise after it is released.
            let answer = read_ledger(&ctx.shared).check(&c, now);
            answer.to_line(req)
        })),
        Request::Record(r) => write(WriteCmd::Record(r)),
        Request::Reserve(r) => write(WriteCmd::Reserve(r)),
        Request::Commit(r) => write(WriteCmd::Commit(r)),
        Request::Release(r) => write(WriteCmd::Release(r)),
        Request::Extend(r) => write(WriteCmd::Extend(r)),
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
            if r.apply && !ctx.admin_uids.contains(&actor.uid) {
                return Pending::Ready(forbidden("replay with apply", actor, req));
            }
            let (tx, rx) = oneshot::channel();
            submit(
                ctx,
                Job::Replay {
                    request: r,
                    actor,
                    req: req.clone(),
                    reply: tx,
                },
                rx,
                req,
            )
        }
        Request::Verify => Pending::Blocking(Box::new(move |ctx: &Ctx| {
            let store = lock_store(&ctx.shared);
            match crate::log::verify_chain(store.as_ref()) {
                Ok((events, head)) => serde_json::to_string(&VerifyAnswer {
                    ok: true,
                    events,
                    head: head.to_hex(),
                    req,
                })
                .unwrap_or_default(),
                Err(e) => Answer::Error(WireError {
                    code: ErrorCode::Internal,
                    message: format!("verify failed at seq {}: {e}", e.seq()),
                    field: None,
                })
                .to_line(req),
            }
        })),
        Request::Tail(t) => Pending::Stream(StreamKind::Tail(t), req),
        Request::Export(e) => {
            for (field, v) in [("since", &e.since), ("until", &e.until)] {
                if let Some(t) = v {
                    if bursar_core::time::parse_ts(t).is_none() {
                        return Pending::Ready(
                            Answer::Error(WireError::bad_field(
                                field,
                                format!("{field} must be an RFC 3339 time"),
                            ))
                            .to_line(req),
                        );
                    }
                }
            }
            Pending::Stream(StreamKind::Export(e), req)
        }
    }
}

fn forbidden(what: &str, actor: Actor, req: Option<Value>) -> String {
    error_line(
        ErrorCode::Forbidden,
        format!("{what} is for admin uids only (peer uid {})", actor.uid),
        req,
    )
}

async fn write_answers(
    wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Pending>,
    ctx: Arc<Ctx>,
) {
    let mut out = BufWriter::with_capacity(CONNECTION_BUFFER_BYTES, wr);
    while let Some(p) = rx.recv().await {
        let ok = match p {
            Pending::Ready(line) => put(&mut out, &line).await,
            Pending::Wait(r) => {
                let line = r.await.unwrap_or_else(|_| {
                    error_line(
                        ErrorCode::Unavailable,
                        "the writer stopped before answering",
                        None,
                    )
                });
                put(&mut out, &line).await
            }
            Pending::Read(f) => put(&mut out, &f(&ctx)).await,
            Pending::Blocking(f) => {
                let c = ctx.clone();
                let line = tokio::task::spawn_blocking(move || f(&c))
                    .await
                    .unwrap_or_else(|_| error_line(ErrorCode::Internal, "internal error", None));
                put(&mut out, &line).await
            }
            Pending::Stream(kind, req) => stream(&mut out, kind, req, &ctx).await,
        };
        if !ok {
            return;
        }
        if rx.is_empty() && out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.flush().await;
}

async fn put<W: AsyncWriteExt + Unpin>(out: &mut W, line: &str) -> bool {
    out.write_all(line.as_bytes()).await.is_ok() && out.write_all(b"\n").await.is_ok()
}

/// Read up to a chunk of events from `from` on a blocking thread.
async fn read_chunk(
    ctx: &Arc<Ctx>,
    from: u64,
) -> Result<Vec<bursar_schemas::event::Envelope>, String> {
    let c = ctx.clone();
    tokio::task::spawn_blocking(move || {
        let store = lock_store(&c.shared);
        store
            .read_from(from)
            .take(STREAM_CHUNK_EVENTS)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn stream<W: AsyncWriteExt + Unpin>(
    out: &mut W,
    kind: StreamKind,
    req: Option<Value>,
    ctx: &Arc<Ctx>,
) -> bool {
    let pricer = read_ledger(&ctx.shared).pricer();
    let head = *ctx.shared.durable.borrow();
    let (mut from, follow, filter) = match &kind {
        StreamKind::Tail(t) => {
            let from = t.from_seq.unwrap_or(if t.follow {
                head + 1
            } else {
                head.saturating_sub(TAIL_DEFAULT_EVENTS - 1).max(1)
            });
            (from.max(1), t.follow, None)
        }
        StreamKind::Export(e) => (1, false, Some(e.clone())),
    };
    let since = filter
        .as_ref()
        .and_then(|e| e.since.as_deref())
        .and_then(bursar_core::time::parse_ts);
    let until = filter
        .as_ref()
        .and_then(|e| e.until.as_deref())
        .and_then(bursar_core::time::parse_ts);
    let labels = filter.as_ref().and_then(|e| e.labels.clone());
    let mut durable = ctx.shared.durable.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let mut count = 0u64;
    loop {
        let limit = *durable.borrow_and_update();
        let chunk = match read_chunk(ctx, from).await {
            Ok(c) => c,
            Err(e) => {
                return put(
                    out,
                    &error_line(ErrorCode::Internal, format!("reading the log: {e}"), req),
                )
                .await
            }
        };
        let mut any = false;
        for env in chunk {
            // Only durable events are shown.
            if env.seq > limit {
                break;
            }
            any = true;
            from = env.seq + 1;
            if since.is_some_and(|s| env.ts < s) || until.is_some_and(|u| env.ts >= u) {
                continue;
            }
            if let Some(want) = &labels {
                let ok = env
                    .body
                    .labels()
                    .is_some_and(|l| want.iter().all(|(k, v)| l.get(k) == Some(v)));
                if !ok {
                    continue;
                }
            }
            let (cost, version) = match &env.body {
                bursar_schemas::event::EventBody::UsageRecorded(u) => {
                    let (c, _, v) = pricer.usage_cost(&u.model, &u.usage, env.ts);
                    (Some(c), Some(v))
                }
                _ => (None, None),
            };
            let line = EventLine {
                event: ExportedEvent {
                    seq: env.seq,
                    ts: env.ts,
                    time: bursar_core::time::format_ts(env.ts),
                    actor: env.actor,
                    kind: env.body.kind().to_string(),
                    cost_micros: cost,
                    price_version: version,
                    prev_hash: env.prev_hash,
                    hash: env.hash,
                    body: env.body,
                },
            };
            let text = serde_json::to_string(&line).unwrap_or_default();
            if !put(out, &text).await {
                return false;
            }
            count += 1;
        }
        if any {
            continue;
        }
        if !follow {
            break;
        }
        if out.flush().await.is_err() {
            return false;
        }
        tokio::select! {
            changed = durable.changed() => if changed.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
    let end = StreamEnd {
        ok: true,
        end: true,
        count: matches!(kind, StreamKind::Export(_)).then_some(count),
        req,
    };
    put(out, &serde_json::to_string(&end).unwrap_or_default()).await
}
