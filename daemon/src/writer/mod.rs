//! The writer: ONE thread that owns every decision and every append.
//!
//! It drains a bounded channel of jobs, decides and folds a batch through `bursar-core`,
//! appends the batch as one record, syncs it to the device, and only then answers the batch
//! (group commit). A failed append or sync poisons it: from then on every write answers
//! `unavailable` (fail closed) while reads keep working.
//!
//! Its concerns, apart: this module runs the loop, stages and seals events and commits batches
//! (the log writer's side; the store and the log reader are `crate::log`); `snapshots` takes
//! and decodes snapshots; `recovery` rebuilds the ledger at start; `reload` applies policies;
//! `replay` re-prices the log; `first_release` reads the idempotency index of data dirs the
//! first release wrote; `waiters` is the line of `reserve`s waiting with `wait_ms`; `give_way`
//! says when the writer yields its CPU between jobs.

mod first_release;
mod give_way;
mod recovery;
mod reload;
mod replay;
mod snapshots;
mod waiters;

use first_release::first_release_id;
pub use first_release::{first_release_answer, id_key};
pub use recovery::{recover, recover_counted};
pub use reload::PolicyToApply;
pub use snapshots::{
    decode_snapshot, decode_snapshot_within, encode_snapshot, write_snapshot, SNAPSHOT_FORMAT_V1,
    SNAPSHOT_FORMAT_V2, SNAPSHOT_FORMAT_V3, SNAPSHOT_FORMAT_V4, SNAPSHOT_FORMAT_V5,
    SNAPSHOT_FORMAT_V6, SNAPSHOT_FORMAT_V7,
};

use crate::log::{LogError, LogStore};
use bursar_core::ledger::{self, Answer, Command, Keyed, Ledger, Renderer};
use bursar_core::policy::LoadedPolicy;
use bursar_schemas::event::{Actor, EventBody, Hash32, Sealed};
use bursar_schemas::wire::{
    CommitRequest, ErrorCode, ExtendRequest, ObserveRequest, RecordRequest, ReleaseRequest,
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
/// How often waiting requests are decided again while nothing else happens.
pub const WAIT_RETRY_EVERY: Duration = waiters::RETRY_EVERY;
/// Longest the writer sleeps without checking for due expiries.
pub const REAPER_TICK: Duration = Duration::from_millis(250);

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
    /// `observe`.
    Observe(ObserveRequest),
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
            WriteCmd::Observe(r) => Command::Observe(r),
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
pub type WriteReply = tokio::sync::oneshot::Sender<Outcome>;

/// What the writer answers a write with, once its batch is durable.
#[derive(Debug)]
pub enum Outcome {
    /// The answer itself (an error, a duplicate to resolve, `extend`'s).
    Answer(Answer),
    /// The event that answers it (its scope keys taken and its labels dropped on the writer),
    /// with the renderer of the policy it was decided under: the answer is rendered by whoever
    /// receives it, off the writer.
    Event {
        /// The event, with its receipt.
        keyed: Keyed,
        /// The budgets it was decided under.
        renderer: Arc<Renderer>,
    },
    /// The answer of a request that said `wait_ms`, with how long it waited (ms).
    Waited(Box<Outcome>, u64),
}

impl Outcome {
    /// The typed answer.
    pub fn render(self) -> Answer {
        match self {
            Outcome::Answer(a) => a,
            Outcome::Waited(inner, waited_ms) => match inner.render() {
                Answer::Decision(mut d) => {
                    d.waited_ms = Some(waited_ms);
                    Answer::Decision(d)
                }
                other => other,
            },
            Outcome::Event { keyed, renderer } => {
                let seq = keyed.seq();
                renderer.render_keyed(keyed).unwrap_or_else(|| {
                    Answer::Error(WireError::new(
                        ErrorCode::Internal,
                        format!("event {seq} renders no answer"),
                    ))
                })
            }
        }
    }
}

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
        /// The policy, or None to re-read the config file (boxed: a policy is large).
        policy: Option<Box<PolicyToApply>>,
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
    /// Cluster mode: finish the queue and stop, as another node takes the partition over:
    /// whoever waits in line is answered `unavailable` (nothing appended for them), so that
    /// their resend reaches the next writer.
    Handover,
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
    /// `write_ledger`).
    pub readers_waiting: std::sync::atomic::AtomicUsize,
    /// Events between two snapshots ([`SNAPSHOT_EVERY_EVENTS`]; tests lower it).
    pub snapshot_every_events: AtomicU64,
    /// Whether a snapshot also waits for as many events as the state holds entries (see
    /// `Writer::snapshot`); tests that want snapshots every few events turn it off.
    pub snapshot_amortized: AtomicBool,
    /// Prometheus metrics, when `metrics_listen` is set (SPEC §12).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Most `reserve`s waiting in line (`[daemon] max_waiters`).
    pub max_waiters: std::sync::atomic::AtomicUsize,
    /// `reserve`s waiting in line now.
    pub waiting: std::sync::atomic::AtomicUsize,
    /// `check`s waiting now (they count against `max_waiters` too).
    pub waiting_checks: std::sync::atomic::AtomicUsize,
    /// Events the start folded past the newest snapshot: the writer that starts first takes
    /// them (once) towards its next snapshot, so that a start that had to fold a long log
    /// leaves a snapshot behind (at the latest at a clean stop) even when nothing is written
    /// meanwhile. (A cluster node counts what it folded at start, not what it follows later.)
    pub folded_past_snapshot: AtomicU64,
}

impl Shared {
    /// The state shared with a writer that starts on `ledger` (recovered from `store`).
    pub fn new(ledger: Ledger, store: Box<dyn LogStore>) -> Self {
        let head = ledger.last_seq();
        Shared {
            ledger: RwLock::new(ledger),
            store: Mutex::new(store),
            poisoned: AtomicBool::new(false),
            durable: tokio::sync::watch::channel(head).0,
            appended: AtomicU64::new(0),
            readers_waiting: Default::default(),
            snapshot_every_events: AtomicU64::new(SNAPSHOT_EVERY_EVENTS),
            snapshot_amortized: AtomicBool::new(true),
            metrics: None,
            max_waiters: std::sync::atomic::AtomicUsize::new(
                bursar_core::policy::DEFAULT_MAX_WAITERS,
            ),
            waiting: Default::default(),
            waiting_checks: Default::default(),
            folded_past_snapshot: AtomicU64::new(0),
        }
    }
}

/// An answer line for an error.
pub fn error_line(code: ErrorCode, message: impl Into<String>, req: Option<Value>) -> String {
    Answer::Error(WireError::new(code, message)).to_line(req)
}

/// Lock helpers that survive a poisoned std lock (a panic elsewhere must not stop the ledger).
pub fn read_ledger(s: &Shared) -> std::sync::RwLockReadGuard<'_, Ledger> {
    s.readers_waiting.fetch_add(1, Ordering::SeqCst);
    let guard = spin_for(READ_SPIN_MICROS, || match s.ledger.try_read() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    })
    .unwrap_or_else(|| s.ledger.read().unwrap_or_else(|e| e.into_inner()));
    s.readers_waiting.fetch_sub(1, Ordering::SeqCst);
    guard
}

/// How long a read spins for the ledger, and the writer for the reads to end, before either
/// sleeps on the lock. The writer holds the ledger a few µs per write; a thread that sleeps on
/// the lock instead must be woken by the other's unlock (a futex wake: on this VM an
/// inter-processor interrupt, tens of µs on the waker's path and on the sleeper's).
const READ_SPIN_MICROS: u64 = 30;
const WRITE_SPIN_MICROS: u64 = 30;

/// `attempt` until it gives something, for at most `micros`.
fn spin_for<G>(micros: u64, mut attempt: impl FnMut() -> Option<G>) -> Option<G> {
    let started = std::time::Instant::now();
    loop {
        for _ in 0..32 {
            if let Some(g) = attempt() {
                return Some(g);
            }
            std::hint::spin_loop();
        }
        if started.elapsed() >= Duration::from_micros(micros) {
            return None;
        }
    }
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
    spin_for(WRITE_SPIN_MICROS, || match s.ledger.try_write() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    })
    .unwrap_or_else(|| s.ledger.write().unwrap_or_else(|e| e.into_inner()))
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
    /// A handle whose writer is gone: every job answers `unavailable` (the server's handle in
    /// cluster mode, where each partition has its own writer).
    pub fn closed() -> WriterHandle {
        let (tx, _) = crossbeam_channel::bounded(1);
        WriterHandle { tx }
    }

    /// Queue a job: `overloaded` when the queue is full, `unavailable` when the writer is gone.
    pub fn submit(&self, job: Job) -> Result<(), ErrorCode> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ErrorCode::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(ErrorCode::Unavailable),
        }
    }
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
    snapshotter: snapshots::Snapshotter,
    /// The store holds the first release's idempotency index (consulted, never written).
    first_release_ids: bool,
    /// `reserve`s waiting in line (`wait_ms`).
    waiters: waiters::Waiters,
    /// When the last job came, if freed memory was not given back since (see
    /// [`Writer::idle`]).
    last_job: Option<std::time::Instant>,
    /// When the writer steps aside for threads waiting for its CPU (before a job).
    give_way: give_way::GiveWay,
    /// What a refused write is told once the writer is poisoned: [`UNAVAILABLE`], or why the
    /// ledger cannot be trusted ([`Ledger::fault`]).
    refusal: String,
}

/// How long the writer has had no job before it gives freed memory back.
const GIVE_BACK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Start the writer thread. Appends `policy_applied` first when `policy` differs from the one
/// the log ends with.
pub fn start(
    shared: Arc<Shared>,
    policy: &LoadedPolicy,
    clock: Clock,
    reload: Arc<dyn Fn() -> Result<LoadedPolicy, String> + Send + Sync>,
) -> Result<(WriterHandle, std::thread::JoinHandle<()>), String> {
    start_with(shared, Some(policy), clock, reload)
}

/// [`start`], appending `policy` only when given (a cluster node taking a partition over
/// keeps the policy the partition's log holds).
pub fn start_with(
    shared: Arc<Shared>,
    policy: Option<&LoadedPolicy>,
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
    let own = crate::config::own_actor();
    let snapshotter = snapshots::Snapshotter::start(shared.clone());
    let since_snapshot = shared.folded_past_snapshot.swap(0, Ordering::Relaxed);
    let mut w = Writer {
        shared,
        rx,
        clock,
        own,
        prev_hash,
        reload,
        since_snapshot,
        last_snapshot: std::time::Instant::now(),
        snapshotter,
        first_release_ids,
        waiters: Default::default(),
        last_job: None,
        give_way: give_way::GiveWay::new(std::time::Instant::now()),
        refusal: UNAVAILABLE.to_string(),
    };
    if let Some(fault) = w.fault() {
        // The log folds to a state that cannot be (a bug of the fold): serve reads, append
        // nothing, the policy included.
        w.refuse_from_now_on(Some(&fault));
        tracing::error!("{}", w.refusal);
    } else if let Some(policy) = policy {
        w.apply_policy_if_changed(&PolicyToApply::from(policy.clone()))?;
    }
    let thread = std::thread::Builder::new()
        .name("bursar-writer".into())
        .spawn(move || w.run())
        .map_err(|e| format!("cannot start the writer thread: {e}"))?;
    Ok((WriterHandle { tx }, thread))
}

impl Writer {
    fn run(mut self) {
        loop {
            let sleep = self.sleep_for();
            let waiting = std::time::Instant::now();
            let sleep = self
                .waiters
                .sleep_for(waiting)
                .map_or(sleep, |w| w.min(sleep));
            let got = self.rx.recv_timeout(sleep);
            let now = std::time::Instant::now();
            self.give_way
                .waited(now.saturating_duration_since(waiting), now);
            let first = match got {
                Ok(j) => Some(j),
                Err(RecvTimeoutError::Timeout) => {
                    self.idle();
                    None
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut jobs = Vec::new();
            let mut stop = false;
            if first.is_some() {
                self.last_job = Some(now);
            }
            if let Some(j) = first {
                jobs.push(j);
                while jobs.len() < MAX_BATCH_JOBS {
                    match self.rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
            }
            let mut handover = false;
            if let Some(pos) = jobs
                .iter()
                .position(|j| matches!(j, Job::Shutdown | Job::Handover))
            {
                stop = true;
                handover = matches!(jobs[pos], Job::Handover);
                // Jobs after Shutdown in this batch are still served; Shutdown itself is dropped.
                jobs.remove(pos);
            }
            self.process(jobs);
            if stop {
                // Serve whatever is still queued, then stop.
                let rest: Vec<Job> = self
                    .rx
                    .try_iter()
                    .filter(|j| !matches!(j, Job::Shutdown | Job::Handover))
                    .collect();
                if !rest.is_empty() {
                    self.process(rest);
                }
                if handover {
                    for w in self.waiters.take() {
                        let _ = w.reply.send(Outcome::Answer(Answer::Error(WireError::new(
                            ErrorCode::Unavailable,
                            "the partition's writer moved to another node while this waited; \
                             resend it (nothing was recorded for it)",
                        ))));
                    }
                    self.shared.waiting.store(0, Ordering::Relaxed);
                }
                // Whoever still waits in line gets the decision of now (a deny is appended).
                self.finish_waiters();
                self.snapshot(true);
                break;
            }
        }
    }

    /// A wait ended without a job: once work was done and no job came for
    /// [`GIVE_BACK_AFTER_IDLE`], give the memory it freed back to the OS. (A wait can be short
    /// under load, up to a waiting reserve's deadline or a hold's expiry: the quiet second, not
    /// the wait, is what keeps this off a busy writer.) mimalloc keeps freed pages for later
    /// allocations, and a daemon that went quiet makes none: after `bursar-bench memory`'s
    /// 200,000 records its RSS stayed at 598 bytes a bucket; given back when the writer goes
    /// idle, 560–574 three seconds later (benches/README.md, "Memory per bucket"). It costs a
    /// few ms of this thread, once per quiet spell. (On a cluster node with a memory reserve,
    /// nothing: it keeps what it frees, `memory::keep_freed_memory`.)
    fn idle(&mut self) {
        if self
            .last_job
            .is_some_and(|t| t.elapsed() >= GIVE_BACK_AFTER_IDLE)
        {
            crate::memory::give_back_freed_memory();
            self.last_job = None;
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
        self.seal(batch, seq, ts, actor, &body);
    }

    /// Encode the event once, as it is stored, chained to the one before it.
    fn seal(&mut self, batch: &mut Batch, seq: u64, ts: TsMicros, actor: Actor, body: &EventBody) {
        match bursar_schemas::event::seal(seq, ts, &actor, self.prev_hash, body) {
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
                if !expired.is_empty() {
                    self.waiters.changed();
                }
                for (seq, ts, body) in expired {
                    self.seal(&mut batch, seq, ts, self.own, &body);
                }
                self.maybe_retry_waiters(&mut batch);
            } else if !self.waiters.is_empty() {
                for w in self.waiters.take() {
                    let _ = w.reply.send(Outcome::Answer(self.unavailable()));
                }
                self.shared.waiting.store(0, Ordering::Relaxed);
            }
            for job in jobs {
                self.give_way.before_job();
                match job {
                    Job::Shutdown | Job::Handover => {}
                    Job::Write { reply, .. } if poisoned => {
                        let _ = reply.send(Outcome::Answer(self.unavailable()));
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
                                batch
                                    .replies
                                    .push(Replier::Answer(reply, Outcome::Answer(answer)));
                                continue;
                            }
                        }
                        let wait = waiters::wait_of(&cmd);
                        if matches!(cmd, WriteCmd::Reserve(_)) {
                            // Those in line first: a later reserve must not take what was
                            // freed for them.
                            self.maybe_retry_waiters(&mut batch);
                        }
                        let may_wait = wait.is_some_and(|w| !w.is_zero());
                        let frees = frees_capacity(&cmd);
                        match self.decide_write(&mut batch, &cmd, &digest, actor, may_wait) {
                            Some(outcome) if wait.is_some() => batch
                                .replies
                                .push(Replier::Answer(reply, waiters::waited(outcome, 0))),
                            Some(outcome) => batch.replies.push(Replier::Answer(reply, outcome)),
                            None => self.park(cmd, digest, actor, reply, wait),
                        }
                        if frees {
                            self.waiters.changed();
                        }
                    }
                    Job::Reload {
                        policy,
                        actor,
                        req,
                        reply,
                    } => {
                        let echo = req.clone();
                        let mut l = write_ledger(&shared);
                        let line = self.reload(&mut l, &mut batch, policy, actor, req, poisoned);
                        drop(l);
                        if let Some(r) = reply {
                            batch.replies.push(Replier::Line(r, line, echo));
                        }
                        // Another policy may let waiters through.
                        self.waiters.changed();
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
        if !poisoned {
            // Whatever this batch freed goes to the line before its answers leave.
            self.maybe_retry_waiters(&mut batch);
        }
        if batch.sealed.is_empty() {
            batch.answer();
            return;
        }
        let fault = self.fault();
        if let Err(e) = self.commit(&mut batch, fault) {
            tracing::error!("log write failed, refusing writes from now on (fail closed): {e}");
        }
        self.snapshot(false);
    }

    /// Decide one write at the clock's now and seal its events into `batch`: its outcome, or
    /// `None` when it waits in line (`may_wait`: a `reserve` with `wait_ms` that only limits
    /// freeing up by themselves stand in the way of; nothing of it was appended).
    fn decide_write(
        &mut self,
        batch: &mut Batch,
        cmd: &WriteCmd,
        digest: &[u8; 16],
        actor: Actor,
        may_wait: bool,
    ) -> Option<Outcome> {
        let shared = self.shared.clone();
        let now = (self.clock)();
        let command = match cmd {
            WriteCmd::Reserve(r) if may_wait => Command::ReserveOrWait(r),
            other => other.command(),
        };
        let (decided, renderer) = {
            let mut l = write_ledger(&shared);
            let d = l.decide_digested(command, digest, now);
            (d, l.renderer())
        };
        if decided
            .events
            .iter()
            .any(|(_, _, b)| matches!(b, EventBody::ReservationExpired(_)))
        {
            // A hold expired on the way: its slot is the line's first.
            self.waiters.changed();
        }
        let answer_at = match decided.reply {
            ledger::Reply::Ready(a) => {
                // Its events (expiries reaped first) are appended all the same.
                for (seq, ts, body) in decided.events {
                    self.seal(batch, seq, ts, actor, &body);
                }
                return Some(Outcome::Answer(a));
            }
            ledger::Reply::Wait => {
                for (seq, ts, body) in decided.events {
                    self.seal(batch, seq, ts, actor, &body);
                }
                return None;
            }
            ledger::Reply::Event(i) => i,
        };
        let mut answering = None;
        for (i, (seq, ts, body)) in decided.events.into_iter().enumerate() {
            self.seal(batch, seq, ts, actor, &body);
            if i == answer_at {
                answering = Some(Outcome::Event {
                    keyed: renderer.keyed(seq, ts, body),
                    renderer: renderer.clone(),
                });
            }
        }
        Some(answering.unwrap_or_else(|| {
            // Impossible: core names one of its own events.
            debug_assert!(false, "the answering event is missing");
            Outcome::Answer(Answer::Error(WireError::new(
                ErrorCode::Internal,
                "the answering event is missing",
            )))
        }))
    }

    /// Put a request that waits at the end of the line (`overloaded` when the line is full).
    fn park(
        &mut self,
        cmd: WriteCmd,
        digest: [u8; 16],
        actor: Actor,
        reply: WriteReply,
        wait: Option<Duration>,
    ) {
        let max = self.shared.max_waiters.load(Ordering::Relaxed);
        let checks = self.shared.waiting_checks.load(Ordering::Relaxed);
        if self.waiters.len() + checks >= max {
            let _ = reply.send(Outcome::Answer(Answer::Error(WireError::new(
                ErrorCode::Overloaded,
                format!("{max} requests already wait in line ([daemon] max_waiters); retry later"),
            ))));
            return;
        }
        let since = std::time::Instant::now();
        self.waiters.push(waiters::Waiter {
            cmd,
            digest,
            actor,
            reply,
            since,
            deadline: since + wait.unwrap_or_default(),
        });
        self.shared
            .waiting
            .store(self.waiters.len(), Ordering::Relaxed);
    }

    /// [`Writer::retry_waiters`] when something may have freed capacity since the last time
    /// (a commit, release, expiry, observation or policy change), when a tick has passed
    /// (rolling windows slide, observations reset), or when a waiter's time is up.
    fn maybe_retry_waiters(&mut self, batch: &mut Batch) {
        if self.waiters.due(std::time::Instant::now()) {
            self.retry_waiters(batch, false);
        }
    }

    /// Decide every waiter again, in arrival order: those that fit now (or whose time is up, or
    /// all of them with `last`) are answered with this batch; the others keep their place.
    fn retry_waiters(&mut self, batch: &mut Batch, last: bool) {
        let now = std::time::Instant::now();
        for w in self.waiters.take() {
            if w.reply.is_closed() {
                // The client is gone: nothing was appended for it, nothing will be.
                continue;
            }
            let final_try = last || now >= w.deadline;
            match self.decide_write(batch, &w.cmd, &w.digest, w.actor, !final_try) {
                Some(outcome) => {
                    let waited_ms = w.waited_ms();
                    batch.replies.push(Replier::Answer(
                        w.reply,
                        waiters::waited(outcome, waited_ms),
                    ));
                }
                None => self.waiters.push(w),
            }
        }
        self.waiters.retried(now);
        self.shared
            .waiting
            .store(self.waiters.len(), Ordering::Relaxed);
    }

    /// At shutdown: decide whoever still waits, append and answer.
    fn finish_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        if self.shared.poisoned.load(Ordering::SeqCst) {
            for w in self.waiters.take() {
                let _ = w.reply.send(Outcome::Answer(self.unavailable()));
            }
            return;
        }
        self.retry_waiters(&mut batch, true);
        let fault = self.fault();
        if batch.sealed.is_empty() {
            batch.answer();
        } else if let Err(e) = self.commit(&mut batch, fault) {
            tracing::error!("log write failed at shutdown: {e}");
        }
    }

    /// The impossible state the shared ledger met, if it met one ([`Ledger::fault`]).
    fn fault(&self) -> Option<String> {
        read_ledger(&self.shared).fault().map(str::to_owned)
    }

    /// Append and sync the batch, then answer it. Nothing is appended when the batch is broken
    /// or `fault` is the impossible state the ledger its events were folded into met
    /// ([`Writer::fault`], or [`Ledger::fault`] under the ledger's lock). On failure, poison
    /// and answer `unavailable`.
    fn commit(&mut self, batch: &mut Batch, fault: Option<String>) -> Result<(), LogError> {
        // (Where the impossible state was met, debug builds asserted it already.)
        let refused = batch.broken.take().or(fault);
        let result = {
            let mut store = lock_store(&self.shared);
            match &refused {
                // Nothing of a broken batch is appended; the writer is poisoned below.
                Some(why) => Err(LogError::Refused {
                    seq: batch.sealed.first().map_or(0, |s| s.seq),
                    reason: why.clone(),
                }),
                None => store.append(&batch.sealed).and_then(|_| {
                    let t = std::time::Instant::now();
                    store.sync()?;
                    if let Some(m) = &self.shared.metrics {
                        m.synced(batch.sealed.len(), t.elapsed());
                    }
                    Ok(())
                }),
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
                self.refuse_from_now_on(refused.as_deref());
                for r in batch.replies.drain(..) {
                    match r {
                        Replier::Line(reply, _, req) => {
                            let _ = reply.send(error_line(
                                ErrorCode::Unavailable,
                                self.refusal.clone(),
                                req,
                            ));
                        }
                        Replier::Answer(reply, _) => {
                            let _ = reply.send(Outcome::Answer(self.unavailable()));
                        }
                    }
                }
                batch.sealed.clear();
                Err(e)
            }
        }
    }

    /// Poison the writer: every write from now on is refused, told that the log cannot be
    /// written, or the impossible state met (`impossible`).
    fn refuse_from_now_on(&mut self, impossible: Option<&str>) {
        self.refusal = match impossible {
            Some(why) => {
                format!(
                    "the daemon met an impossible state and refuses writes (fail closed): {why}"
                )
            }
            None => UNAVAILABLE.to_string(),
        };
        self.shared.poisoned.store(true, Ordering::SeqCst);
    }

    /// The answer of a write refused by a poisoned writer.
    fn unavailable(&self) -> Answer {
        Answer::Error(WireError::new(ErrorCode::Unavailable, self.refusal.clone()))
    }
}

pub(crate) const UNAVAILABLE: &str =
    "the log cannot be written; the daemon refuses writes (fail closed) until it is restarted";

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
    Answer(WriteReply, Outcome),
}

/// True for the writes after which a waiter may fit: they end a hold, or change what a
/// provider's quota allows.
fn frees_capacity(cmd: &WriteCmd) -> bool {
    matches!(
        cmd,
        WriteCmd::Commit(_) | WriteCmd::Release(_) | WriteCmd::Observe(_)
    )
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
