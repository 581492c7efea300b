//! The writer: ONE thread that owns every decision and every append.
//!
//! It drains a bounded channel of jobs, decides and folds a batch through `bursar-core`,
//! appends the batch as one record, syncs it to the device, and only then answers the batch
//! (group commit). A failed append or sync poisons it: from then on every write answers
//! `unavailable` (fail closed) while reads keep working.

use crate::log::{LogError, LogStore};
use bursar_core::ledger::{self, Answer, Command, Ledger};
use bursar_core::policy::LoadedPolicy;
use bursar_schemas::event::{
    Actor, Envelope, EventBody, Hash32, PolicyApplied, PricingChanged, Sealed,
};
use bursar_schemas::wire::{
    CommitRequest, ErrorCode, ExtendRequest, RecordRequest, ReleaseRequest, ReloadAnswer,
    ReplayRequest, ReserveRequest, WireError,
};
use bursar_schemas::TsMicros;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::Value;
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
/// Format tag of the snapshots whose idempotency index was keyed by text (never released;
/// ignored like the first release's).
pub const SNAPSHOT_FORMAT_V2: u8 = 2;
/// Format tag of a snapshot value: LZ4 (block, size prepended) of the bincode of the ledger,
/// its policy and price tables as JSON inside (so that they can grow keys without a new
/// format), its idempotency index keyed by 128-bit id hashes.
pub const SNAPSHOT_FORMAT_V3: u8 = 3;

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

impl WriteCmd {
    /// The command as the core takes it.
    pub fn command(&self) -> Command<'_> {
        match self {
            WriteCmd::Record(r) => Command::Record(r),
            WriteCmd::Reserve(r) => Command::Reserve(r),
            WriteCmd::Commit(r) => Command::Commit(r),
            WriteCmd::Release(r) => Command::Release(r),
            WriteCmd::Extend(r) => Command::Extend(r),
        }
    }

    /// The request's idempotency digest (computed where it is decoded, off the writer thread).
    pub fn digest(&self) -> [u8; 16] {
        self.command().digest()
    }
}

/// Where an answer line goes.
pub type Reply = tokio::sync::oneshot::Sender<String>;
/// Where a write's typed answer goes (rendered to JSON by the connection, after every lock is
/// released).
pub type WriteReply = tokio::sync::oneshot::Sender<Answer>;

/// A job for the writer.
pub enum Job {
    /// A client write.
    Write {
        /// The command.
        cmd: WriteCmd,
        /// The request's idempotency digest, computed where it was decoded.
        digest: [u8; 16],
        /// Peer credentials.
        actor: Actor,
        /// Answer.
        reply: WriteReply,
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
    /// Reads waiting for the ledger: the writer lets them in between two jobs (see
    /// [`write_ledger`]).
    pub readers_waiting: std::sync::atomic::AtomicUsize,
}

/// An answer line for an error.
pub fn error_line(code: ErrorCode, message: impl Into<String>, req: Option<Value>) -> String {
    Answer::Error(WireError::new(code, message)).to_line(req)
}

/// Lock helpers that survive a poisoned std lock (a panic elsewhere must not stop the ledger).
pub fn read_ledger(s: &Shared) -> std::sync::RwLockReadGuard<'_, Ledger> {
    s.readers_waiting.fetch_add(1, Ordering::SeqCst);
    let guard = s.ledger.read().unwrap_or_else(|e| e.into_inner());
    s.readers_waiting.fetch_sub(1, Ordering::SeqCst);
    guard
}

/// Longest the writer stands back for waiting reads before it takes the ledger anyway.
const READERS_FIRST_MICROS: u64 = 50;

/// The ledger, for one job of the writer. The writer takes and releases it per job, and the
/// lock's own order would let it take it back at once, again and again, while a read waits
/// out the whole batch (p99 of `check` ~330 µs under 20,000 writes/s, benches/README.md):
/// reads that wait go first, for at most [`READERS_FIRST_MICROS`].
fn write_ledger(s: &Shared) -> std::sync::RwLockWriteGuard<'_, Ledger> {
    if s.readers_waiting.load(Ordering::SeqCst) > 0 {
        let started = std::time::Instant::now();
        while s.readers_waiting.load(Ordering::SeqCst) > 0
            && started.elapsed() < Duration::from_micros(READERS_FIRST_MICROS)
        {
            std::thread::yield_now();
        }
    }
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

/// Data dirs written by the first release kept an idempotency index of their own, the `ids`
/// tree: per id a locator (digest, batch seq, index) into a per-batch LZ4 blob of answers, or,
/// older still, the whole record. Their events carry no receipt, so the original answer of a
/// resend of one of their ids is read from there (read only: nothing writes the tree now).
const LOCATOR_TAG: u8 = 0xA1;
const LOCATOR_LEN: usize = 1 + 16 + 8 + 4;
/// Format byte of a batch's answer blob: LZ4 block (size prepended) of `bincode(Vec<String>)`.
const ANSWERS_FORMAT_V1: u8 = 1;
/// Largest decompressed answer blob accepted.
const MAX_ANSWERS_BYTES: usize = 256 * 1024 * 1024;

/// Key of the answers of the batch whose first event has `seq`: `a/` and the seq big-endian.
fn answers_key(seq: u64) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
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

/// A whole record of the oldest `ids` entries: the digest and the answer's JSON.
#[derive(serde::Deserialize)]
struct OldIdRecord {
    digest: [u8; 16],
    answer: String,
}

/// The request digest and the original answer (JSON without `req`) of `key` (`e/…`, `r/…`,
/// `x/…`) in the `ids` tree of a data dir written by the first release; `None` when it is not
/// there.
pub fn first_release_answer(store: &dyn LogStore, key: &str) -> Option<([u8; 16], String)> {
    let bytes = store.get_id(key.as_bytes()).ok()??;
    match decode_locator(&bytes) {
        Some((digest, batch, index)) => {
            let blob = store.get_id(&answers_key(batch)).ok()??;
            decode_answer(&blob, index).map(|a| (digest, a))
        }
        None => {
            bincode::serde::decode_from_slice::<OldIdRecord, _>(&bytes, bincode::config::standard())
                .ok()
                .map(|(r, _)| (r.digest, r.answer))
        }
    }
}

/// The idempotency key of a write (`None` for `extend`, which has none).
pub fn id_key(cmd: &WriteCmd) -> Option<String> {
    match cmd {
        WriteCmd::Record(r) => Some(format!("e/{}", r.event_id)),
        WriteCmd::Commit(c) => Some(format!("e/{}", c.event_id)),
        WriteCmd::Reserve(r) => Some(format!("r/{}", r.reservation_id)),
        WriteCmd::Release(r) => Some(format!("x/{}", r.reservation_id)),
        WriteCmd::Extend(_) => None,
    }
}

/// A write whose id the first release's `ids` tree knows: the first release remembered ids for
/// ever, so a resend of one of its requests stays a duplicate (the same digest) or a conflict.
fn first_release_id(store: &dyn LogStore, cmd: &WriteCmd, digest: &[u8; 16]) -> Option<Answer> {
    let key = id_key(cmd)?;
    let (had, answer) = first_release_answer(store, &key)?;
    if had != *digest {
        let field = if key.starts_with("e/") {
            "event_id"
        } else {
            "reservation_id"
        };
        return Some(Answer::Error(WireError {
            code: ErrorCode::Conflict,
            message: format!("{field} was already used for a different request"),
            field: Some(field.into()),
        }));
    }
    let seq = serde_json::from_str::<Value>(&answer)
        .ok()
        .and_then(|v| v.get("seq").and_then(Value::as_u64))?;
    Some(Answer::Duplicate { seq })
}

/// Encode a ledger snapshot.
pub fn encode_snapshot(l: &Ledger) -> Option<Vec<u8>> {
    let plain = bincode::serde::encode_to_vec(l, bincode::config::standard()).ok()?;
    let mut out = Vec::with_capacity(plain.len() / 3 + 16);
    out.push(SNAPSHOT_FORMAT_V3);
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
    Some(out)
}

/// Largest decompressed snapshot accepted.
const MAX_SNAPSHOT_BYTES: usize = 4 << 30;

/// Decode a ledger snapshot. A snapshot is a cache of the log's fold: one of an older format
/// (or a damaged one) is `None`, and recovery folds the log instead.
pub fn decode_snapshot(bytes: &[u8]) -> Option<Ledger> {
    let (tag, rest) = bytes.split_first()?;
    if *tag != SNAPSHOT_FORMAT_V3 {
        return None;
    }
    // A damaged size is a miss, not an allocation.
    let size = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if size > MAX_SNAPSHOT_BYTES || size > rest.len().saturating_mul(255) {
        return None;
    }
    let plain = lz4_flex::block::decompress_size_prepended(rest).ok()?;
    bincode::serde::decode_from_slice(
        &plain,
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
            None if matches!(
                bytes.first(),
                Some(&SNAPSHOT_FORMAT_V1 | &SNAPSHOT_FORMAT_V2)
            ) =>
            {
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
    /// The store holds the first release's idempotency index (consulted, never written).
    first_release_ids: bool,
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
    let (prev_hash, first_release_ids) = {
        let store = lock_store(&shared);
        (
            store.head().map(|h| h.1).unwrap_or_default(),
            store.has_ids(),
        )
    };
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
        first_release_ids,
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

    /// Fold `body` as the next event and seal it into the batch.
    fn stage(&mut self, l: &mut Ledger, batch: &mut Batch, actor: Actor, body: EventBody) {
        let seq = l.last_seq() + 1;
        let ts = l.stamp((self.clock)());
        if let Err(e) = l.apply(seq, ts, &body) {
            // Impossible (the seq follows by construction): never absorbed.
            debug_assert!(false, "cannot fold own event: {e}");
            batch.broken = Some(format!("cannot fold own event {seq}: {e}"));
            return;
        }
        self.seal(batch, seq, ts, actor, body);
    }

    /// Encode the event once, as it is stored, chained to the one before it.
    fn seal(&mut self, batch: &mut Batch, seq: u64, ts: TsMicros, actor: Actor, body: EventBody) {
        match bursar_schemas::event::seal(seq, ts, &actor, self.prev_hash, &body) {
            Ok(sealed) => {
                self.prev_hash = sealed.hash;
                batch.sealed.push(sealed);
            }
            Err(e) => {
                // An event that folded but does not encode is a bug: the batch is refused
                // and the writer poisoned, rather than the event dropped.
                debug_assert!(false, "cannot seal event {seq}: {e}");
                batch.broken = Some(format!("cannot seal event {seq}: {e}"));
            }
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
                    Job::Write { reply, .. } if poisoned => {
                        let _ = reply.send(unavailable());
                    }
                    Job::Write {
                        cmd,
                        digest,
                        actor,
                        reply,
                    } => {
                        if self.first_release_ids {
                            let known =
                                first_release_id(lock_store(&shared).as_ref(), &cmd, &digest);
                            if let Some(answer) = known {
                                batch.replies.push(Replier::Answer(reply, answer));
                                continue;
                            }
                        }
                        let now = (self.clock)();
                        let step =
                            write_ledger(&shared).execute_digested(cmd.command(), &digest, now);
                        for (seq, ts, body) in step.events {
                            self.seal(&mut batch, seq, ts, actor, body);
                        }
                        batch.replies.push(Replier::Answer(reply, step.answer));
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
                            batch.replies.push(Replier::Line(r, line, echo));
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
                        batch.replies.push(Replier::Line(reply, line, req));
                    }
                }
            }
        }
        if batch.sealed.is_empty() {
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
        if !batch.sealed.is_empty() {
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
            let mut store = lock_store(&self.shared);
            match batch.broken.take() {
                // Nothing of a broken batch is appended; the writer is poisoned below.
                Some(why) => Err(LogError::Refused {
                    seq: batch.sealed.first().map_or(0, |s| s.seq),
                    reason: why,
                }),
                None => store.append(&batch.sealed).and_then(|_| store.sync()),
            }
        };
        match result {
            Ok(()) => {
                let n = batch.sealed.len() as u64;
                self.since_snapshot += n;
                self.shared.appended.fetch_add(n, Ordering::Relaxed);
                if let Some(last) = batch.sealed.last() {
                    self.shared.durable.send_replace(last.seq);
                }
                batch.sealed.clear();
                batch.answer();
                Ok(())
            }
            Err(e) => {
                self.shared.poisoned.store(true, Ordering::SeqCst);
                for r in batch.replies.drain(..) {
                    match r {
                        Replier::Line(reply, _, req) => {
                            let _ =
                                reply.send(error_line(ErrorCode::Unavailable, UNAVAILABLE, req));
                        }
                        Replier::Answer(reply, _) => {
                            let _ = reply.send(unavailable());
                        }
                    }
                }
                batch.sealed.clear();
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

/// Sealed events and replies of one group commit.
#[derive(Default)]
struct Batch {
    /// Each event encoded once, with its hash.
    sealed: Vec<Sealed>,
    replies: Vec<Replier>,
    /// Why the batch must not be appended (an impossible state met while staging it).
    broken: Option<String>,
}

/// A reply waiting for its batch to be durable. (Kept inline: a batch holds one per job, and
/// boxing the larger variant would allocate for every write.)
#[allow(clippy::large_enum_variant)]
enum Replier {
    /// An answer line, with the request's `req` (for an `unavailable` answer).
    Line(Reply, String, Option<Value>),
    /// A write's typed answer (the connection renders it).
    Answer(WriteReply, Answer),
}

/// The answer of a write that the daemon refuses because its log cannot be written.
fn unavailable() -> Answer {
    Answer::Error(WireError::new(ErrorCode::Unavailable, UNAVAILABLE))
}

impl Batch {
    fn answer(&mut self) {
        for r in self.replies.drain(..) {
            match r {
                Replier::Line(reply, line, _) => {
                    let _ = reply.send(line);
                }
                Replier::Answer(reply, answer) => {
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn old_blob(answers: &[&str]) -> Vec<u8> {
        let plain = bincode::serde::encode_to_vec(answers, bincode::config::standard()).unwrap();
        let mut out = vec![ANSWERS_FORMAT_V1];
        out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
        out
    }

    #[test]
    fn a_damaged_blob_or_locator_of_the_first_release_is_a_miss_not_a_panic() {
        assert_eq!(decode_answer(&[], 0), None);
        assert_eq!(
            decode_answer(&[ANSWERS_FORMAT_V1, 0xff, 0xff, 0xff, 0x7f], 0),
            None
        );
        assert_eq!(decode_answer(&[9, 1, 2, 3], 0), None);
        let blob = old_blob(&["a", "b"]);
        assert_eq!(decode_answer(&blob, 1).as_deref(), Some("b"));
        assert_eq!(decode_answer(&blob, 2), None);
        let mut cut = blob.clone();
        cut.truncate(blob.len() - 1);
        assert_eq!(decode_answer(&cut, 0), None);
        assert_eq!(decode_locator(&[LOCATOR_TAG; 5]), None);
    }
}
