//! The writer: ONE thread that owns every decision and every append.
//!
//! It drains a bounded channel of jobs, decides and folds a batch through `bursar-core`,
//! appends the batch as one record, syncs it to the device, and only then answers the batch
//! (group commit). A failed append or sync poisons it: from then on every write answers
//! `unavailable` (fail closed) while reads keep working.

use crate::log::{LogError, LogStore};
use bursar_core::ledger::{self, Answer, Command, IdLookup, IdRecord, Ledger, Step};
use bursar_core::policy::LoadedPolicy;
use bursar_schemas::event::{Actor, Envelope, EventBody, Hash32, PolicyApplied, PricingChanged};
use bursar_schemas::wire::{
    CommitRequest, ErrorCode, ExtendRequest, RecordRequest, ReleaseRequest, ReloadAnswer,
    ReplayRequest, ReserveRequest, WireError,
};
use bursar_schemas::TsMicros;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Most jobs folded into one group commit.
pub const MAX_BATCH_JOBS: usize = 4096;
/// Depth of the writer's queue; a full queue answers `overloaded`.
pub const WRITE_QUEUE_DEPTH: usize = 65_536;
/// Take a snapshot after this many events…
pub const SNAPSHOT_EVERY_EVENTS: u64 = 100_000;
/// …or after this long with any new event.
pub const SNAPSHOT_EVERY_SECONDS: u64 = 300;
/// Longest the writer sleeps without checking for due expiries.
pub const REAPER_TICK: Duration = Duration::from_millis(250);
/// Format tag of the snapshots of the first release (ignored now: recovery folds the log).
pub const SNAPSHOT_FORMAT_V1: u8 = 1;
/// Format tag of a snapshot value: bincode of the ledger, its policy and price tables as JSON
/// inside (so that they can grow keys without a new format).
pub const SNAPSHOT_FORMAT_V2: u8 = 2;

/// A clock: Unix microseconds.
pub type Clock = Arc<dyn Fn() -> TsMicros + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
    })
}

/// A write request, owned.
#[derive(Debug, Clone)]
pub enum WriteCmd {
    /// `record`.
    Record(RecordRequest),
    /// `reserve`.
    Reserve(ReserveRequest),
    /// `commit`.
    Commit(CommitRequest),
    /// `release`.
    Release(ReleaseRequest),
    /// `extend`.
    Extend(ExtendRequest),
}

/// Where an answer line goes.
pub type Reply = tokio::sync::oneshot::Sender<String>;

/// A job for the writer.
pub enum Job {
    /// A client write.
    Write {
        /// The command.
        cmd: WriteCmd,
        /// Peer credentials.
        actor: Actor,
        /// `req` echo.
        req: Option<Value>,
        /// Answer.
        reply: Reply,
    },
    /// Apply a new policy (`reload`, SIGHUP). `None` means: read the config again.
    Reload {
        /// The policy, or None to re-read the config file.
        policy: Option<LoadedPolicy>,
        /// Peer credentials.
        actor: Actor,
        /// `req` echo.
        req: Option<Value>,
        /// Answer, if anyone waits.
        reply: Option<Reply>,
    },
    /// `replay`, dry run or apply.
    Replay {
        /// The request.
        request: ReplayRequest,
        /// The text of `request.pricing.import`, read off the writer thread.
        import_text: Option<String>,
        /// Peer credentials.
        actor: Actor,
        /// `req` echo.
        req: Option<Value>,
        /// Answer.
        reply: Reply,
    },
    /// Finish the queue, sync, and stop.
    Shutdown,
}

/// State shared between the writer and the readers.
pub struct Shared {
    /// The projections; the writer updates them before syncing, so reads are never older
    /// than any answered write.
    pub ledger: RwLock<Ledger>,
    /// The log. The writer holds it for append+sync; readers take it per chunk.
    pub store: Mutex<Box<dyn LogStore>>,
    /// Set after a failed append or sync.
    pub poisoned: AtomicBool,
    /// Seq of the last durable event (tail followers watch it).
    pub durable: tokio::sync::watch::Sender<u64>,
    /// Events appended since start (for tests and stats).
    pub appended: AtomicU64,
}

/// An answer line for an error.
pub fn error_line(code: ErrorCode, message: impl Into<String>, req: Option<Value>) -> String {
    Answer::Error(WireError::new(code, message)).to_line(req)
}

/// Lock helpers that survive a poisoned std lock (a panic elsewhere must not stop the ledger).
pub fn read_ledger(s: &Shared) -> std::sync::RwLockReadGuard<'_, Ledger> {
    s.ledger.read().unwrap_or_else(|e| e.into_inner())
}
fn write_ledger(s: &Shared) -> std::sync::RwLockWriteGuard<'_, Ledger> {
    s.ledger.write().unwrap_or_else(|e| e.into_inner())
}
/// Lock the store.
pub fn lock_store(s: &Shared) -> std::sync::MutexGuard<'_, Box<dyn LogStore>> {
    s.store.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer's handle for submitting jobs.
#[derive(Clone)]
pub struct WriterHandle {
    tx: Sender<Job>,
}

impl WriterHandle {
    /// Queue a job: `overloaded` when the queue is full, `unavailable` when the writer is gone.
    pub fn submit(&self, job: Job) -> Result<(), ErrorCode> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ErrorCode::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(ErrorCode::Unavailable),
        }
    }
}

/// Id lookups: not-yet-written entries of this batch, then the store.
struct Ids<'a> {
    pending: &'a Pending,
    store: &'a dyn LogStore,
}

impl IdLookup for Ids<'_> {
    fn get(&self, key: &str) -> Option<IdRecord> {
        if let Some(r) = self.pending.get(key) {
            return Some(r.clone());
        }
        match self.store.get_id(key.as_bytes()) {
            Ok(Some(bytes)) => decode_id(self.store, &bytes),
            Ok(None) => None,
            Err(e) => {
                tracing::error!("idempotency index read failed for {key:?}: {e}");
                None
            }
        }
    }
}

/// The answer line of a write. A new (non-duplicate, non-error) answer was already serialised
/// once by the ledger for the idempotency index (`IdRecord::answer`, JSON without `req`); the
/// line is that text with `req` appended, which is byte for byte what `Answer::to_line` gives
/// (`req` is the last field of every answer struct), without cloning and serialising the
/// answer a second time.
fn answer_line(step: &Step, req: Option<Value>) -> String {
    let stored = match (&step.answer, step.ids.as_slice()) {
        (
            Answer::Usage(_) | Answer::Decision(_) | Answer::Release(_) | Answer::Extend(_),
            [(_, rec)],
        ) => Some(rec.answer.as_str()),
        _ => None,
    };
    match stored {
        Some(text) if text.ends_with('}') && text.len() > 2 => match req {
            None => text.to_string(),
            Some(r) => match serde_json::to_string(&r) {
                Ok(r) => {
                    let mut line = String::with_capacity(text.len() + r.len() + 8);
                    line.push_str(&text[..text.len() - 1]);
                    line.push_str(",\"req\":");
                    line.push_str(&r);
                    line.push('}');
                    line
                }
                Err(_) => step.answer.to_line(Some(r)),
            },
        },
        _ => step.answer.to_line(req),
    }
}

/// The idempotency index keeps, per id, the request digest and where the original answer is;
/// the answers of one group commit are stored together, compressed, under one key. One small
/// entry per id and one blob per batch cost sled far less than a 1-2 KB answer per id (the
/// answer of a `record` names every matched budget).
///
/// A locator: [`LOCATOR_TAG`], the digest, the blob's batch seq (big-endian) and the answer's
/// index in it (big-endian). Entries written before answers were batched hold
/// `bincode(IdRecord)`: 16 digest bytes, a varint length and an answer of at least 20 bytes
/// (`{"ok":true,"seq":1,…}`), so never exactly [`LOCATOR_LEN`] bytes; both are read.
const LOCATOR_TAG: u8 = 0xA1;
const LOCATOR_LEN: usize = 1 + 16 + 8 + 4;
/// Format byte of a batch's answer blob: LZ4 block (size prepended) of `bincode(Vec<String>)`.
const ANSWERS_FORMAT_V1: u8 = 1;
/// Largest decompressed answer blob accepted (a batch is at most `MAX_BATCH_JOBS` answers).
const MAX_ANSWERS_BYTES: usize = 256 * 1024 * 1024;

/// Key of the answers of the batch whose first event has `seq`: `a/` and the seq big-endian.
/// Ids keys start with `e/`, `r/` or `x/`, so the two never meet.
fn answers_key(seq: u64) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn encode_locator(digest: &[u8; 16], batch: u64, index: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(LOCATOR_LEN);
    v.push(LOCATOR_TAG);
    v.extend_from_slice(digest);
    v.extend_from_slice(&batch.to_be_bytes());
    v.extend_from_slice(&index.to_be_bytes());
    v
}

/// `(digest, batch seq, index)` of a locator; `None` for anything else.
fn decode_locator(bytes: &[u8]) -> Option<([u8; 16], u64, u32)> {
    if bytes.len() != LOCATOR_LEN || bytes.first() != Some(&LOCATOR_TAG) {
        return None;
    }
    let digest: [u8; 16] = bytes.get(1..17)?.try_into().ok()?;
    let batch = u64::from_be_bytes(bytes.get(17..25)?.try_into().ok()?);
    let index = u32::from_be_bytes(bytes.get(25..29)?.try_into().ok()?);
    Some((digest, batch, index))
}

fn encode_answers(answers: &[&str]) -> Option<Vec<u8>> {
    let plain = bincode::serde::encode_to_vec(answers, bincode::config::standard()).ok()?;
    let mut out = vec![ANSWERS_FORMAT_V1];
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
    Some(out)
}

fn decode_answer(blob: &[u8], index: u32) -> Option<String> {
    let (format, packed) = blob.split_first()?;
    if *format != ANSWERS_FORMAT_V1 {
        return None;
    }
    let size = u32::from_le_bytes(packed.get(..4)?.try_into().ok()?) as usize;
    if size > MAX_ANSWERS_BYTES {
        return None;
    }
    let plain = lz4_flex::block::decompress_size_prepended(packed).ok()?;
    let (mut answers, _): (Vec<String>, _) =
        bincode::serde::decode_from_slice(&plain, bincode::config::standard()).ok()?;
    let index = usize::try_from(index).ok()?;
    (index < answers.len()).then(|| answers.swap_remove(index))
}

/// The index entries of one commit: a locator per id and the batch's answer blob, keyed by the
/// seq of the batch's first event. Empty when the batch has no ids.
fn encode_ids(first_seq: Option<u64>, pending: &[(String, IdRecord)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Some(first) = first_seq.filter(|_| !pending.is_empty()) else {
        return Vec::new();
    };
    let answers: Vec<&str> = pending.iter().map(|(_, r)| r.answer.as_str()).collect();
    let Some(blob) = encode_answers(&answers) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(pending.len() + 1);
    for (index, (key, rec)) in pending.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        out.push((
            key.clone().into_bytes(),
            encode_locator(&rec.digest, first, index),
        ));
    }
    out.push((answers_key(first), blob));
    out
}

/// An id entry as stored: a locator (the answer is fetched from its batch's blob) or, from
/// older data dirs, the whole record.
fn decode_id(store: &dyn LogStore, bytes: &[u8]) -> Option<IdRecord> {
    match decode_locator(bytes) {
        Some((digest, batch, index)) => {
            let blob = match store.get_id(&answers_key(batch)) {
                Ok(Some(blob)) => blob,
                Ok(None) => {
                    tracing::error!("idempotency index: the answers of batch {batch} are missing");
                    return None;
                }
                Err(e) => {
                    tracing::error!("idempotency index read failed for batch {batch}: {e}");
                    return None;
                }
            };
            match decode_answer(&blob, index) {
                Some(answer) => Some(IdRecord { digest, answer }),
                None => {
                    tracing::error!(
                        "idempotency index: answer {index} of batch {batch} is unreadable"
                    );
                    None
                }
            }
        }
        None => bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .ok()
            .map(|(r, _)| r),
    }
}

/// Encode a ledger snapshot.
pub fn encode_snapshot(l: &Ledger) -> Option<Vec<u8>> {
    let mut out = vec![SNAPSHOT_FORMAT_V2];
    bincode::serde::encode_into_std_write(l, &mut out, bincode::config::standard()).ok()?;
    Some(out)
}

/// Decode a ledger snapshot. A snapshot is a cache of the log's fold: one of an older format
/// (or a damaged one) is `None`, and recovery folds the log instead.
pub fn decode_snapshot(bytes: &[u8]) -> Option<Ledger> {
    let (tag, rest) = bytes.split_first()?;
    if *tag != SNAPSHOT_FORMAT_V2 {
        return None;
    }
    bincode::serde::decode_from_slice(
        rest,
        bincode::config::standard().with_limit::<{ 4 << 30 }>(),
    )
    .ok()
    .map(|(l, _)| l)
}

/// Rebuild the ledger at start: the newest usable snapshot, then the log after it.
///
/// The log is read once: events are folded in order while every `pricing_changed` is checked
/// for retroactivity (an `effective_from` at or before the `ts` of an event already folded, which
/// a one-pass fold would have priced without it). Only then is the whole log folded again in
/// the two passes that define a fold (see `bursar_core::ledger::fold`). A log without a
/// retroactive price change is thus decoded once instead of twice.
pub fn recover(store: &dyn LogStore) -> Result<Ledger, String> {
    let from_snapshot = match store.latest_snapshot() {
        Ok(Some((seq, bytes))) => match decode_snapshot(&bytes) {
            Some(l) if l.last_seq() == seq => Some(l),
            None if bytes.first() == Some(&SNAPSHOT_FORMAT_V1) => {
                tracing::info!(
                    "the snapshot at seq {seq} is of an older format; folding the whole log"
                );
                None
            }
            _ => {
                tracing::warn!("snapshot at seq {seq} is unusable; folding the whole log");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("cannot read snapshots ({e}); folding the whole log");
            None
        }
    };
    let had_snapshot = from_snapshot.is_some();
    let mut l = from_snapshot.unwrap_or_default();
    if one_pass_fold(store, &mut l)? {
        return Ok(l);
    }
    if had_snapshot {
        tracing::info!("a retroactive pricing change follows the snapshot; folding the whole log");
    }
    ledger::fold(|| store.read_from(1)).map_err(|e| e.to_string())
}

/// Events per chunk handed from the decoding thread to the folding one at recovery.
const RECOVER_CHUNK_EVENTS: usize = 4096;
/// Chunks decoded ahead of the fold at recovery.
const RECOVER_CHUNKS_AHEAD: usize = 8;

/// Fold the log after `l` into `l` in one pass. Returns false (leaving `l` half-folded) when a
/// `pricing_changed` turned out to be retroactive, so the caller must fold in two passes.
///
/// Reading and decoding the log runs on a second thread, a few chunks ahead of the fold, so
/// the two halves of the work (about equal) overlap on two cores.
fn one_pass_fold(store: &dyn LogStore, l: &mut Ledger) -> Result<bool, String> {
    let mut last_ts = l.last_ts();
    let mut folded_any = l.last_seq() > 0;
    let mut retroactive = false;
    let source = store.read_from(l.last_seq() + 1);
    std::thread::scope(|scope| {
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Vec<Result<Envelope, LogError>>>(RECOVER_CHUNKS_AHEAD);
        let decoder = std::thread::Builder::new()
            .name("bursar-recover".into())
            .spawn_scoped(scope, move || {
                let mut chunk = Vec::with_capacity(RECOVER_CHUNK_EVENTS);
                for item in source {
                    chunk.push(item);
                    if chunk.len() == RECOVER_CHUNK_EVENTS {
                        let full =
                            std::mem::replace(&mut chunk, Vec::with_capacity(RECOVER_CHUNK_EVENTS));
                        // The fold stopped early (a retroactive price change): stop reading.
                        if tx.send(full).is_err() {
                            return;
                        }
                    }
                }
                if !chunk.is_empty() {
                    let _ = tx.send(chunk);
                }
            })
            .map_err(|e| format!("cannot start the recovery reader: {e}"))?;
        let events = rx.iter().flatten().map_while(|item| {
            if let Ok(env) = &item {
                if let EventBody::PricingChanged(p) = &env.body {
                    if folded_any && p.effective_from <= last_ts {
                        retroactive = true;
                        return None;
                    }
                }
                last_ts = last_ts.max(env.ts);
                folded_any = true;
            }
            Some(item)
        });
        let folded = ledger::fold_into(l, &[], events).map_err(|e| e.to_string());
        drop(rx);
        decoder
            .join()
            .map_err(|_| "the recovery reader panicked".to_string())?;
        folded
    })?;
    Ok(!retroactive)
}

/// The writer thread's state.
pub struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Job>,
    clock: Clock,
    own: Actor,
    prev_hash: Hash32,
    reload: Arc<dyn Fn() -> Result<LoadedPolicy, String> + Send + Sync>,
    since_snapshot: u64,
    last_snapshot: std::time::Instant,
}

/// Start the writer thread. Appends `policy_applied` first when `policy` differs from the one
/// the log ends with.
pub fn start(
    shared: Arc<Shared>,
    policy: &LoadedPolicy,
    clock: Clock,
    reload: Arc<dyn Fn() -> Result<LoadedPolicy, String> + Send + Sync>,
) -> Result<(WriterHandle, std::thread::JoinHandle<()>), String> {
    let (tx, rx) = crossbeam_channel::bounded(WRITE_QUEUE_DEPTH);
    let prev_hash = lock_store(&shared).head().map(|h| h.1).unwrap_or_default();
    let own = Actor {
        uid: crate::config::own_uid(),
        gid: 0,
        pid: std::process::id(),
    };
    let mut w = Writer {
        shared,
        rx,
        clock,
        own,
        prev_hash,
        reload,
        since_snapshot: 0,
        last_snapshot: std::time::Instant::now(),
    };
    w.apply_policy_if_changed(policy)?;
    let thread = std::thread::Builder::new()
        .name("bursar-writer".into())
        .spawn(move || w.run())
        .map_err(|e| format!("cannot start the writer thread: {e}"))?;
    Ok((WriterHandle { tx }, thread))
}

impl Writer {
    fn apply_policy_if_changed(&mut self, p: &LoadedPolicy) -> Result<(), String> {
        let (same, version) = {
            let l = read_ledger(&self.shared);
            (l.policy() == Some(&p.resolved), l.policy_version())
        };
        if same {
            return Ok(());
        }
        let body = policy_body(p, version + 1);
        let mut batch = Batch::default();
        {
            let shared = self.shared.clone();
            let mut l = write_ledger(&shared);
            self.stage(&mut l, &mut batch, self.own, body);
        }
        self.commit(&mut batch)
            .map_err(|e| format!("cannot write the policy to the log: {e}"))
    }

    fn run(mut self) {
        loop {
            let first = match self.rx.recv_timeout(self.sleep_for()) {
                Ok(j) => Some(j),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut jobs = Vec::new();
            let mut stop = false;
            if let Some(j) = first {
                jobs.push(j);
                while jobs.len() < MAX_BATCH_JOBS {
                    match self.rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
            }
            if let Some(pos) = jobs.iter().position(|j| matches!(j, Job::Shutdown)) {
                stop = true;
                // Jobs after Shutdown in this batch are still served; Shutdown itself is dropped.
                jobs.remove(pos);
            }
            self.process(jobs);
            if stop {
                // Serve whatever is still queued, then stop.
                let rest: Vec<Job> = self
                    .rx
                    .try_iter()
                    .filter(|j| !matches!(j, Job::Shutdown))
                    .collect();
                if !rest.is_empty() {
                    self.process(rest);
                }
                self.snapshot(true);
                break;
            }
        }
    }

    fn sleep_for(&self) -> Duration {
        // A poisoned writer appends nothing, not even expiries, so a due hold stays due: waking
        // for it at once would spin. It only waits for jobs to refuse.
        if self.shared.poisoned.load(Ordering::SeqCst) {
            return REAPER_TICK;
        }
        let now = (self.clock)();
        match read_ledger(&self.shared).next_expiry() {
            Some(at) if at > now => {
                Duration::from_micros(u64::try_from(at - now).unwrap_or(0)).min(REAPER_TICK)
            }
            Some(_) => Duration::ZERO,
            None => REAPER_TICK,
        }
    }

    /// Seal `body` as the next envelope of the batch.
    fn stage(&mut self, l: &mut Ledger, batch: &mut Batch, actor: Actor, body: EventBody) {
        let seq = l.last_seq() + 1;
        let ts = l.stamp((self.clock)());
        if let Err(e) = l.apply(seq, ts, &body) {
            tracing::error!("internal: cannot fold own event: {e}");
            return;
        }
        self.seal(batch, seq, ts, actor, body);
    }

    fn seal(&mut self, batch: &mut Batch, seq: u64, ts: TsMicros, actor: Actor, body: EventBody) {
        match Envelope::seal(seq, ts, actor, self.prev_hash, body) {
            Ok(env) => {
                self.prev_hash = env.hash;
                batch.envs.push(env);
            }
            Err(e) => tracing::error!("internal: cannot seal event {seq}: {e}"),
        }
    }

    fn process(&mut self, jobs: Vec<Job>) {
        let poisoned = self.shared.poisoned.load(Ordering::SeqCst);
        let mut batch = Batch::default();
        {
            // The ledger is locked per job, not per batch: a read (`check`, `status`) waits for
            // at most one job's decision, never for a whole batch (up to MAX_BATCH_JOBS).
            let shared = self.shared.clone();
            let now = (self.clock)();
            if !poisoned {
                let expired = write_ledger(&shared).reap(now);
                for (seq, ts, body) in expired {
                    self.seal(&mut batch, seq, ts, self.own, body);
                }
            }
            for job in jobs {
                match job {
                    Job::Shutdown => {}
                    Job::Write { req, reply, .. } if poisoned => {
                        let _ = reply.send(error_line(ErrorCode::Unavailable, UNAVAILABLE, req));
                    }
                    Job::Write {
                        cmd,
                        actor,
                        req,
                        reply,
                    } => {
                        let now = (self.clock)();
                        let step = {
                            let mut l = write_ledger(&shared);
                            let store = lock_store(&shared);
                            let ids = Ids {
                                pending: &batch.pending_ids,
                                store: store.as_ref(),
                            };
                            let c = match &cmd {
                                WriteCmd::Record(r) => Command::Record(r),
                                WriteCmd::Reserve(r) => Command::Reserve(r),
                                WriteCmd::Commit(r) => Command::Commit(r),
                                WriteCmd::Release(r) => Command::Release(r),
                                WriteCmd::Extend(r) => Command::Extend(r),
                            };
                            l.execute(c, now, &ids)
                        };
                        let line = answer_line(&step, req.clone());
                        for (seq, ts, body) in step.events {
                            self.seal(&mut batch, seq, ts, actor, body);
                        }
                        for (k, v) in step.ids {
                            batch.pending_ids.insert(k, v);
                        }
                        batch.replies.push((reply, line, req));
                    }
                    Job::Reload {
                        policy,
                        actor,
                        req,
                        reply,
                    } => {
                        let echo = req.clone();
                        let mut l = write_ledger(&shared);
                        let line = if poisoned {
                            error_line(ErrorCode::Unavailable, UNAVAILABLE, req)
                        } else {
                            let loaded = match policy {
                                Some(p) => Ok(p),
                                None => (self.reload)(),
                            };
                            match loaded {
                                Ok(p) if l.policy() == Some(&p.resolved) => {
                                    tracing::info!(
                                        "reload: policy unchanged (version {})",
                                        l.policy_version()
                                    );
                                    serde_json::to_string(&ReloadAnswer {
                                        ok: true,
                                        policy_version: l.policy_version(),
                                        req,
                                    })
                                    .unwrap_or_default()
                                }
                                Ok(p) => {
                                    let version = l.policy_version() + 1;
                                    self.stage(&mut l, &mut batch, actor, policy_body(&p, version));
                                    tracing::info!(
                                        "policy version {version} applied from {}",
                                        p.source
                                    );
                                    serde_json::to_string(&ReloadAnswer {
                                        ok: true,
                                        policy_version: version,
                                        req,
                                    })
                                    .unwrap_or_default()
                                }
                                Err(msg) => {
                                    tracing::error!(
                                        "reload refused, keeping the running policy: {msg}"
                                    );
                                    Answer::Error(WireError::new(ErrorCode::BadRequest, msg))
                                        .to_line(req)
                                }
                            }
                        };
                        if let Some(r) = reply {
                            batch.replies.push((r, line, echo));
                        }
                    }
                    Job::Replay {
                        request,
                        import_text,
                        actor,
                        req,
                        reply,
                    } => {
                        let mut l = write_ledger(&shared);
                        let line = self.replay(
                            &mut l,
                            &mut batch,
                            (request, import_text),
                            actor,
                            req.clone(),
                            poisoned,
                        );
                        batch.replies.push((reply, line, req));
                    }
                }
            }
        }
        if batch.envs.is_empty() {
            batch.answer();
            return;
        }
        if let Err(e) = self.commit(&mut batch) {
            tracing::error!("log write failed, refusing writes from now on (fail closed): {e}");
        }
        self.snapshot(false);
    }

    fn replay(
        &mut self,
        l: &mut Ledger,
        batch: &mut Batch,
        (request, import_text): (ReplayRequest, Option<String>),
        actor: Actor,
        req: Option<Value>,
        poisoned: bool,
    ) -> String {
        if request.apply && poisoned {
            return error_line(ErrorCode::Unavailable, UNAVAILABLE, req);
        }
        let since = match &request.since {
            Some(s) => match bursar_core::time::parse_ts(s) {
                Some(t) => t,
                None => {
                    return Answer::Error(WireError::bad_field(
                        "since",
                        "since must be an RFC 3339 time",
                    ))
                    .to_line(req)
                }
            },
            None => i64::MIN,
        };
        let base = l.current_prices().cloned().unwrap_or_default();
        let table = match bursar_core::policy::parse_pricing_section(
            &request.pricing,
            &base,
            "replay.pricing",
            // The file was read by the connection, off this thread (never a client-named path
            // opened here).
            &|p| {
                import_text
                    .clone()
                    .ok_or_else(|| format!("{p} was not read"))
            },
        ) {
            Ok(t) => t,
            Err(errs) => {
                let msg = errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Answer::Error(WireError::bad_field("pricing", msg)).to_line(req);
            }
        };
        // Everything staged in this batch is folded but not yet in the store: replay after it.
        if !batch.envs.is_empty() {
            if let Err(e) = self.commit(batch) {
                return error_line(
                    ErrorCode::Unavailable,
                    format!("log write failed: {e}"),
                    req,
                );
            }
        }
        let now = (self.clock)();
        let outcome = {
            let store = lock_store(&self.shared);
            let epochs = match ledger::collect_epochs(store.read_from(1)) {
                Ok(e) => e,
                Err(e) => return error_line(ErrorCode::Internal, e.to_string(), req),
            };
            match ledger::replay(l, &epochs, store.read_from(1), &table, since, now) {
                Ok(o) => o,
                Err(e) => return error_line(ErrorCode::Internal, e.to_string(), req),
            }
        };
        let mut answer = outcome.answer;
        if request.apply {
            let mut after = outcome.after;
            let body = EventBody::PricingChanged(PricingChanged {
                effective_from: outcome.effective_from,
                pricing: table,
            });
            self.stage(&mut after, batch, actor, body);
            answer.applied = true;
            answer.seq = Some(after.last_seq());
            *l = after;
        }
        answer.req = req;
        serde_json::to_string(&answer).unwrap_or_default()
    }

    /// Append and sync the batch, then answer it. On failure, poison and answer `unavailable`.
    fn commit(&mut self, batch: &mut Batch) -> Result<(), LogError> {
        let result = {
            let ids = encode_ids(batch.envs.first().map(|e| e.seq), &batch.pending_ids.list);
            let mut store = lock_store(&self.shared);
            store.append(&batch.envs, &ids).and_then(|_| store.sync())
        };
        match result {
            Ok(()) => {
                let n = batch.envs.len() as u64;
                self.since_snapshot += n;
                self.shared.appended.fetch_add(n, Ordering::Relaxed);
                if let Some(last) = batch.envs.last() {
                    self.shared.durable.send_replace(last.seq);
                }
                batch.envs.clear();
                batch.pending_ids.clear();
                batch.answer();
                Ok(())
            }
            Err(e) => {
                self.shared.poisoned.store(true, Ordering::SeqCst);
                for (reply, _, req) in batch.replies.drain(..) {
                    let _ = reply.send(error_line(ErrorCode::Unavailable, UNAVAILABLE, req));
                }
                batch.envs.clear();
                batch.pending_ids.clear();
                Err(e)
            }
        }
    }

    fn snapshot(&mut self, force: bool) {
        let due = self.since_snapshot >= SNAPSHOT_EVERY_EVENTS
            || (self.since_snapshot > 0
                && self.last_snapshot.elapsed() >= Duration::from_secs(SNAPSHOT_EVERY_SECONDS))
            || (force && self.since_snapshot > 0);
        if !due || self.shared.poisoned.load(Ordering::SeqCst) {
            return;
        }
        let (seq, bytes) = {
            let l = read_ledger(&self.shared);
            (l.last_seq(), encode_snapshot(&l))
        };
        let Some(bytes) = bytes else {
            tracing::warn!("cannot encode a snapshot");
            return;
        };
        match lock_store(&self.shared).put_snapshot(seq, &bytes) {
            Ok(()) => {
                tracing::debug!("snapshot at seq {seq} ({} bytes)", bytes.len());
                self.since_snapshot = 0;
                self.last_snapshot = std::time::Instant::now();
            }
            Err(e) => tracing::warn!("snapshot failed (the log is intact): {e}"),
        }
    }
}

const UNAVAILABLE: &str =
    "the log cannot be written; the daemon refuses writes (fail closed) until it is restarted";

fn policy_body(p: &LoadedPolicy, version: u64) -> EventBody {
    EventBody::PolicyApplied(PolicyApplied {
        policy_version: version,
        source: p.source.clone(),
        source_hash: p.source_hash.clone(),
        policy: p.resolved.clone(),
    })
}

/// Envelopes, id entries and replies of one group commit.
#[derive(Default)]
struct Batch {
    envs: Vec<Envelope>,
    pending_ids: Pending,
    /// Each reply with its answer line and the request's `req` (for an `unavailable` answer).
    replies: Vec<(Reply, String, Option<Value>)>,
}

/// The id entries of a batch not yet written, in order, with an index by key.
#[derive(Default)]
struct Pending {
    list: Vec<(String, IdRecord)>,
    index: HashMap<String, usize>,
}

impl Pending {
    fn get(&self, key: &str) -> Option<&IdRecord> {
        self.index
            .get(key)
            .and_then(|i| self.list.get(*i))
            .map(|(_, r)| r)
    }

    /// Add an entry; a key already pending (never: an id is new when its entry is made)
    /// keeps its first record.
    fn insert(&mut self, key: String, rec: IdRecord) {
        if self.index.contains_key(&key) {
            return;
        }
        self.index.insert(key.clone(), self.list.len());
        self.list.push((key, rec));
    }

    fn clear(&mut self) {
        self.list.clear();
        self.index.clear();
    }
}

impl Batch {
    fn answer(&mut self) {
        for (reply, line, _) in self.replies.drain(..) {
            let _ = reply.send(line);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use bursar_schemas::wire::{RecordRequest, ReleaseRequest, ReserveRequest, Usage};

    fn ledger() -> Ledger {
        let p = bursar_core::policy::default_policy();
        let mut l = Ledger::new();
        let body = policy_body(&p, 1);
        l.apply(1, 1_000, &body).unwrap();
        l
    }

    fn lines_agree(l: &mut Ledger, cmd: Command<'_>) {
        let ids: HashMap<String, IdRecord> = HashMap::new();
        let step = l.execute(cmd, 2_000_000, &ids);
        assert!(!step.answer.is_error(), "{:?}", step.answer);
        for req in [
            None,
            Some(serde_json::json!(7)),
            Some(serde_json::json!({"trace": "a\"b", "n": [1, 2.5, null]})),
        ] {
            assert_eq!(answer_line(&step, req.clone()), step.answer.to_line(req));
        }
    }

    #[test]
    fn the_spliced_answer_line_equals_to_line_for_every_new_answer() {
        let mut l = ledger();
        let labels: bursar_schemas::Labels = [("team".to_string(), "t1".to_string())].into();
        let record = RecordRequest {
            event_id: "e-1".into(),
            labels: labels.clone(),
            model: "gpt-4o".into(),
            usage: Usage {
                input_tokens: 1200,
                output_tokens: 300,
                ..Usage::default()
            },
            occurred_at: None,
            reported_cost_usd: None,
        };
        lines_agree(&mut l, Command::Record(&record));
        let reserve = ReserveRequest {
            reservation_id: "r-1".into(),
            labels,
            model: Some("gpt-4o".into()),
            estimate: bursar_schemas::wire::Estimate {
                input_tokens: 100,
                max_output_tokens: Some(100),
            },
            ttl_seconds: Some(60),
            candidates: None,
            require: None,
        };
        lines_agree(&mut l, Command::Reserve(&reserve));
        let release = ReleaseRequest {
            reservation_id: "r-1".into(),
        };
        lines_agree(&mut l, Command::Release(&release));
    }

    fn rec(i: u64) -> IdRecord {
        IdRecord {
            digest: [i as u8; 16],
            answer: format!(
                r#"{{"ok":true,"seq":{i},"duplicate":false,"cost_micros":{}}}"#,
                i * 7
            ),
        }
    }

    fn lookup(store: &dyn LogStore, key: &str) -> Option<IdRecord> {
        let pending = Pending::default();
        Ids {
            pending: &pending,
            store,
        }
        .get(key)
    }

    #[test]
    fn batched_answers_come_back_exactly_per_id_across_batches_and_reopen() {
        use crate::log::testing::{sample_batch, MemDisk, MemLog};
        let disk = MemDisk::new();
        let mut store = MemLog::open(&disk).unwrap();
        let mut n = 0u64;
        for size in [1u64, 3, 64] {
            let envs = sample_batch(store.head(), size);
            let pending: Vec<(String, IdRecord)> = envs
                .iter()
                .map(|e| (format!("e/id-{}", e.seq), rec(e.seq)))
                .collect();
            let ids = encode_ids(envs.first().map(|e| e.seq), &pending);
            assert_eq!(
                ids.len(),
                pending.len() + 1,
                "a locator per id and one blob"
            );
            store.append(&envs, &ids).unwrap();
            store.sync().unwrap();
            n += size;
        }
        drop(store);
        let store = MemLog::open(&disk).unwrap();
        for seq in 1..=n {
            assert_eq!(
                lookup(&store, &format!("e/id-{seq}")),
                Some(rec(seq)),
                "id of seq {seq}"
            );
        }
        assert_eq!(lookup(&store, "e/id-unknown"), None);
    }

    #[test]
    fn entries_of_the_older_whole_record_format_still_read() {
        use crate::log::testing::{sample_batch, MemDisk, MemLog};
        let disk = MemDisk::new();
        let mut store = MemLog::open(&disk).unwrap();
        let envs = sample_batch(store.head(), 2);
        let old =
            |r: &IdRecord| bincode::serde::encode_to_vec(r, bincode::config::standard()).unwrap();
        store
            .append(
                &envs,
                &[
                    (b"e/old-1".to_vec(), old(&rec(1))),
                    (b"r/old-2".to_vec(), old(&rec(2))),
                ],
            )
            .unwrap();
        store.sync().unwrap();
        assert_eq!(lookup(&store, "e/old-1"), Some(rec(1)));
        assert_eq!(lookup(&store, "r/old-2"), Some(rec(2)));
        // The shortest possible old entry is longer than a locator.
        let shortest = old(&IdRecord {
            digest: [0; 16],
            answer: r#"{"ok":true,"seq":1}"#.into(),
        });
        assert!(shortest.len() > LOCATOR_LEN);
    }

    #[test]
    fn a_damaged_blob_or_locator_is_a_miss_not_a_panic() {
        assert_eq!(decode_answer(&[], 0), None);
        assert_eq!(
            decode_answer(&[ANSWERS_FORMAT_V1, 0xff, 0xff, 0xff, 0x7f], 0),
            None
        );
        assert_eq!(decode_answer(&[9, 1, 2, 3], 0), None);
        let blob = encode_answers(&["a", "b"]).unwrap();
        assert_eq!(decode_answer(&blob, 1).as_deref(), Some("b"));
        assert_eq!(decode_answer(&blob, 2), None);
        let mut cut = blob.clone();
        cut.truncate(blob.len() - 1);
        assert_eq!(decode_answer(&cut, 0), None);
        assert_eq!(decode_locator(&[LOCATOR_TAG; 5]), None);
    }
}
