//! The writer: ONE thread that owns every decision and every append.
//!
//! It drains a bounded channel of jobs, decides and folds a batch through `bursar-core`,
//! appends the batch as one record, syncs it to the device, and only then answers the batch
//! (group commit). A failed append or sync poisons it: from then on every write answers
//! `unavailable` (fail closed) while reads keep working.

use crate::log::{LogError, LogStore};
use bursar_core::ledger::{self, Answer, Command, IdLookup, IdRecord, Ledger};
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
/// Format tag of a snapshot value.
pub const SNAPSHOT_FORMAT_V1: u8 = 1;

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
    pending: &'a HashMap<String, IdRecord>,
    store: &'a dyn LogStore,
}

impl IdLookup for Ids<'_> {
    fn get(&self, key: &str) -> Option<IdRecord> {
        if let Some(r) = self.pending.get(key) {
            return Some(r.clone());
        }
        match self.store.get_id(key.as_bytes()) {
            Ok(Some(bytes)) => decode_id(&bytes),
            Ok(None) => None,
            Err(e) => {
                tracing::error!("idempotency index read failed for {key:?}: {e}");
                None
            }
        }
    }
}

fn encode_id(r: &IdRecord) -> Vec<u8> {
    bincode::serde::encode_to_vec(r, bincode::config::standard()).unwrap_or_default()
}

fn decode_id(bytes: &[u8]) -> Option<IdRecord> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .ok()
        .map(|(r, _)| r)
}

/// Encode a ledger snapshot.
pub fn encode_snapshot(l: &Ledger) -> Option<Vec<u8>> {
    let mut out = vec![SNAPSHOT_FORMAT_V1];
    bincode::serde::encode_into_std_write(l, &mut out, bincode::config::standard()).ok()?;
    Some(out)
}

/// Decode a ledger snapshot.
pub fn decode_snapshot(bytes: &[u8]) -> Option<Ledger> {
    let (tag, rest) = bytes.split_first()?;
    if *tag != SNAPSHOT_FORMAT_V1 {
        return None;
    }
    bincode::serde::decode_from_slice(
        rest,
        bincode::config::standard().with_limit::<{ 4 << 30 }>(),
    )
    .ok()
    .map(|(l, _)| l)
}

/// Rebuild the ledger at start: the newest usable snapshot, then the log after it. A
/// retroactive `pricing_changed` in the tail forces a full two-pass fold.
pub fn recover(store: &dyn LogStore) -> Result<Ledger, String> {
    let from_snapshot = match store.latest_snapshot() {
        Ok(Some((seq, bytes))) => match decode_snapshot(&bytes) {
            Some(l) if l.last_seq() == seq => Some(l),
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
    if let Some(mut l) = from_snapshot {
        let snap_ts = l.last_ts();
        let tail_epochs =
            ledger::collect_epochs(store.read_from(l.last_seq() + 1)).map_err(|e| e.to_string())?;
        if tail_epochs.iter().all(|(eff, _, _)| *eff > snap_ts) {
            let from = l.last_seq() + 1;
            ledger::fold_into(&mut l, &[], store.read_from(from)).map_err(|e| e.to_string())?;
            return Ok(l);
        }
        tracing::info!("a retroactive pricing change follows the snapshot; folding the whole log");
    }
    ledger::fold(|| store.read_from(1)).map_err(|e| e.to_string())
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
            let shared = self.shared.clone();
            let mut l = write_ledger(&shared);
            let now = (self.clock)();
            if !poisoned {
                for (seq, ts, body) in l.reap(now) {
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
                        for (seq, ts, body) in step.events {
                            self.seal(&mut batch, seq, ts, actor, body);
                        }
                        for (k, v) in step.ids {
                            batch.ids.push((k.clone().into_bytes(), encode_id(&v)));
                            batch.pending_ids.insert(k, v);
                        }
                        let line = step.answer.to_line(req.clone());
                        batch.replies.push((reply, line, req));
                    }
                    Job::Reload {
                        policy,
                        actor,
                        req,
                        reply,
                    } => {
                        let echo = req.clone();
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
                        actor,
                        req,
                        reply,
                    } => {
                        let line =
                            self.replay(&mut l, &mut batch, request, actor, req.clone(), poisoned);
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
        request: ReplayRequest,
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
            &|p| std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}")),
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
            let mut store = lock_store(&self.shared);
            store
                .append(&batch.envs, &batch.ids)
                .and_then(|_| store.sync())
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
                batch.ids.clear();
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
                batch.ids.clear();
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
    ids: Vec<(Vec<u8>, Vec<u8>)>,
    pending_ids: HashMap<String, IdRecord>,
    /// Each reply with its answer line and the request's `req` (for an `unavailable` answer).
    replies: Vec<(Reply, String, Option<Value>)>,
}

impl Batch {
    fn answer(&mut self) {
        for (reply, line, _) in self.replies.drain(..) {
            let _ = reply.send(line);
        }
    }
}
