//! Cluster mode (SPEC §13, issue 15): many hosts, one set of budgets, on NATS JetStream.
//!
//! Every node runs the same machinery per partition: a [`Shared`] (the partition's ledger and
//! its store) whose store is a [`PartitionStore`] — the node's verified local copy of the
//! partition's log (a sled data dir, `DATA/p<N>`) and, while this node holds the partition's
//! lease, the partition's JetStream stream in front of it.
//!
//! - **Follower** (no lease): a thread per partition reads the stream through an ordered
//!   consumer, checks each record (hash chain, dense seq), appends it to the local copy and
//!   folds it with the same `apply` as everywhere. Reads are answered from that fold, saying how
//!   stale it may be (`lag_ms`: how long since the node last knew it held the whole stream).
//! - **Writer** (lease holder): the single-host writer thread, unchanged, on a store whose
//!   `append` publishes each record to the stream conditionally on the last stream sequence
//!   (the fence) and whose `sync` waits for the quorum's acknowledgement, then appends the
//!   records to the local copy. The store refuses to append once the node's view of its lease
//!   has ended. A refused or failed append poisons the writer (fail closed): the node steps
//!   down, rebuilds the partition's ledger from its local copy (which holds only what the
//!   stream acknowledged) and follows again.
//! - **Forwarding**: a write that reaches a node which is not the partition's writer is sent as
//!   its request line over NATS (`<prefix>.p<N>.write`, a request with the agent's credentials
//!   in headers) to the holder, which answers it like a local write; the forwarding node waits
//!   until its own fold holds the answered event before passing the answer on, so the next
//!   read on any of its connections sees the write (read-your-writes).
//! - **Leases** ([`crate::log::lease`]): a coordinator thread renews the leases this node holds
//!   and takes free ones; a holder that dies loses its lease after [`LEASE_TTL`].
//! - **Routing**: a request goes to the partition of its `partition_by` label's value
//!   ([`partition_of`]); `commit`, `release` and `extend` go to the partition that knows the
//!   reservation.

use crate::log::jetstream::{seq_header, JetStreamLog, JetStreamOptions, Nats, SEQ_HEADER};
use crate::log::lease::{Held, Leases};
use crate::log::{Head, LogError, LogStore, RecordEnvelopes, SledLog};
use crate::writer::{
    self, error_line, lock_store, read_ledger, Clock, Job, Outcome, PolicyToApply, Shared,
    WriteCmd, WriterHandle,
};
use bursar_core::ledger::{Answer, IdKind};
use bursar_core::policy::{ClusterSettings, LoadedPolicy};
use bursar_schemas::event::{Actor, Envelope, Sealed};
use bursar_schemas::wire::{
    decode_request, ClusterNodeLag, ClusterPartitionStatus, ClusterStatusAnswer, ErrorCode,
    ReplayAnswer, Request, WhatIfAnswer, WireError,
};
use futures_util::StreamExt;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A lease's time to live: a dead holder's partitions are taken over within about this long
/// (SPEC §13: within 10 s).
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the coordinator renews held leases and tries free ones.
pub const LEASE_TICK: Duration = Duration::from_millis(500);
/// How long a forwarded write may take, retries included, before it answers `unavailable`
/// (covers a takeover: [`LEASE_TTL`] and a catch-up).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(12);
/// How long one attempt of a forwarded write waits for the writer's answer before it is sent
/// again (a resend is answered as a duplicate): a writer paused or cut off is replaced within
/// [`LEASE_TTL`], and the next attempt reaches the new one.
pub const FORWARD_ATTEMPT: Duration = Duration::from_secs(2);
/// How long a forwarded `replay` with `apply` may take at the partition's writer (it folds
/// the partition's log again) before it is sent again.
pub const REPLAY_APPLY_WAIT: Duration = Duration::from_secs(600);
/// Pause before a forwarded write is sent again after an `unavailable` answer.
pub const FORWARD_RETRY: Duration = Duration::from_millis(200);
/// How long a request to the NATS cluster may take before it fails.
pub const NATS_TIMEOUT: Duration = Duration::from_secs(5);
/// The first time limit on each request that starts following a stream. A request lost
/// while NATS repairs its routes after a server died (the client's server has no route to the
/// stream's leader for a few seconds) is asked again after this rather than waited for until
/// [`NATS_TIMEOUT`]: a 5 s wait here once took a failover past 10 s in CI.
pub const FOLLOW_FIRST_ATTEMPT: Duration = Duration::from_secs(1);
/// How long a forwarding node waits for its own fold to hold a forwarded write before it
/// answers anyway.
pub const FOLD_WAIT: Duration = Duration::from_secs(5);
/// How long a follower waits on a consumer that delivers nothing while the stream holds more
/// before it makes the consumer again.
pub const FOLLOW_STALL: Duration = Duration::from_secs(1);
/// Most records a follower takes from its consumer in one batch.
pub const FOLLOW_BATCH_RECORDS: usize = 256;
/// How often a follower syncs its local copy (the stream holds every record; a copy that lost
/// its last records in a crash follows them again).
pub const FOLLOW_SYNC_EVERY: Duration = Duration::from_millis(1000);
/// A node whose last report is older than this is not counted among the live ones when the
/// writers are shared out.
pub const LIVE_REPORT_AGE: Duration = Duration::from_secs(3);
/// Most often a node gives a lease back to even out the writers.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(5);
/// How often each node publishes its lag per partition (for `cluster status`).
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often a node that started without NATS says in its log that it still cannot reach it.
const OFFLINE_SAY_EVERY: Duration = Duration::from_secs(30);
/// Largest policy a forwarded `reload` may carry, unpacked (LiteLLM's whole map resolves to a
/// few MiB).
const MAX_FORWARDED_POLICY_BYTES: usize = 64 << 20;
/// Header of a forwarded `reload` whose payload is the policy to apply ([`PolicyToApply`],
/// JSON packed as a log record is), not a request line.
const POLICY_HEADER: &str = "Bursar-Policy";

/// The partition a label value belongs to: the first 8 bytes of its BLAKE3 hash (little
/// endian) modulo the number of partitions. Fixed: changing it would move budgets.
pub fn partition_of(value: &str, partitions: u32) -> u32 {
    let h = blake3::hash(value.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_le_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// Unix microseconds now (wall clock; for lag only, never for accounting).
fn wall_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The stream in front of a partition's local copy, while this node writes the partition.
type StreamSlot = Arc<Mutex<Option<JetStreamLog>>>;

fn slot(s: &StreamSlot) -> std::sync::MutexGuard<'_, Option<JetStreamLog>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A partition's store on this node: its local copy, and the stream while this node writes.
pub struct PartitionStore {
    local: SledLog,
    stream: StreamSlot,
    /// Events published to the stream and not yet acknowledged (appended to the local copy
    /// once they are).
    staged: Vec<Sealed>,
    lease: Arc<Mutex<Option<Instant>>>,
    /// Wakes the coordinator when an append or sync to the stream fails (the writer is then
    /// poisoned; its ledger may hold the failed batch until the node steps down).
    wake: crossbeam_channel::Sender<()>,
}

impl PartitionStore {
    fn lease_valid(&self) -> bool {
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }
}

impl LogStore for PartitionStore {
    fn append(&mut self, sealed: &[Sealed]) -> Result<(), LogError> {
        let valid = self.lease_valid();
        let stream = self.stream.clone();
        let mut stream = slot(&stream);
        match stream.as_mut() {
            Some(js) => {
                if !valid {
                    return Err(LogError::Refused {
                        seq: sealed.first().map_or(0, |s| s.seq),
                        reason: "this node's lease on the partition has ended".into(),
                    });
                }
                if let Err(e) = js.append(sealed) {
                    let _ = self.wake.try_send(());
                    return Err(e);
                }
                self.staged.extend_from_slice(sealed);
                Ok(())
            }
            None => {
                // Whatever was published and never acknowledged is not the log's.
                self.staged.clear();
                self.local.append(sealed)
            }
        }
    }

    fn append_record(&mut self, key: u64, bytes: &[u8], envs: &[Envelope]) -> Result<(), LogError> {
        if slot(&self.stream).is_some() {
            return self.append(&crate::log::sealed_of(envs)?);
        }
        self.staged.clear();
        self.local.append_record(key, bytes, envs)
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let stream = self.stream.clone();
        let mut stream = slot(&stream);
        let staged = std::mem::take(&mut self.staged);
        if let Some(js) = stream.as_mut() {
            if let Err(e) = js.sync() {
                let _ = self.wake.try_send(());
                return Err(e);
            }
            // Stored on a quorum: now the local copy.
            self.local.append(&staged)?;
        }
        self.local.sync()
    }

    fn head(&self) -> Option<Head> {
        match slot(&self.stream).as_ref() {
            Some(js) => js.head(),
            None => self.local.head(),
        }
    }

    fn get_id(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        self.local.get_id(key)
    }

    fn has_ids(&self) -> bool {
        false
    }

    fn read_records_from(&self, seq: u64) -> crate::log::StoredRecords<'_> {
        self.local.read_records_from(seq)
    }

    fn put_snapshot(&mut self, seq: u64, bytes: &[u8]) -> Result<(), LogError> {
        self.local.put_snapshot(seq, bytes)
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        self.local.latest_snapshot()
    }

    fn snapshot_dir(&self) -> Option<PathBuf> {
        self.local.snapshot_dir()
    }

    /// The local copy's, while no stream is attached (a follower): with one, what is appended
    /// reaches the copy only at [`sync`](LogStore::sync).
    fn syncer(&self) -> Option<crate::log::Syncer> {
        if slot(&self.stream).is_some() {
            return None;
        }
        self.local.syncer()
    }
}

/// A follower's copy synced on a thread of its own: the fold no longer waits for the copy's
/// `fdatasync`. (Synced on the following thread under the copy's lock, once a second, the
/// follower's fold stood still for the length of each sync: a write visible on a follower after
/// the writer's ack p99 8.65–11.11 ms at 20,000 records/s over six runs, 4.82–10.56 ms over
/// seven with this; benches/README.md, "Follower lag: the copy's sync off the fold".) The copy
/// is only the node's cache of the stream: what a crash takes from it is followed again.
struct CopySync {
    request: Option<crossbeam_channel::Sender<()>>,
    failed: Arc<Mutex<Option<LogError>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    partition: u32,
}

impl CopySync {
    /// Start syncing with `syncer` when asked.
    fn start(mut syncer: crate::log::Syncer, partition: u32) -> std::io::Result<CopySync> {
        // One request waiting at most: asks while a sync runs fold into the next one.
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let failed = Arc::new(Mutex::new(None));
        let failure = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("bursar-sync-p{partition}"))
            .spawn(move || {
                for () in rx {
                    if let Err(e) = syncer() {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            })?;
        Ok(CopySync {
            request: Some(tx),
            failed,
            thread: Some(thread),
            partition,
        })
    }

    /// Sync what was appended so far, soon.
    fn ask(&self) {
        if let Some(tx) = &self.request {
            let _ = tx.try_send(());
        }
    }

    /// A sync that failed (the thread then stops).
    fn failure(&self) -> Option<LogError> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for CopySync {
    /// Waits for a sync under way (the syncer holds the copy's files open); a sync that failed
    /// since the follower last looked is logged.
    fn drop(&mut self) {
        drop(self.request.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(e) = self.failure() {
            tracing::warn!(
                "partition {}: syncing the local copy failed: {e} (it is followed again from \
                 its head)",
                self.partition
            );
        }
    }
}

/// What a node runs a partition as.
enum Role {
    Follower {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    },
    Writer {
        held: Held,
        writer: WriterHandle,
        thread: std::thread::JoinHandle<()>,
        forward: tokio::task::JoinHandle<()>,
    },
    Idle,
}

/// One partition on this node.
pub struct Partition {
    /// Its number.
    pub index: u32,
    /// Its stream (`<prefix>-p<N>`).
    pub stream: String,
    /// Its stream's subject.
    pub subject: String,
    /// Ledger and store.
    pub shared: Arc<Shared>,
    /// The writer, while this node holds the lease.
    writer: Mutex<Option<WriterHandle>>,
    role: Mutex<Role>,
    lease: Arc<Mutex<Option<Instant>>>,
    /// The stream slot of its store.
    stream_slot: StreamSlot,
    /// When (Unix µs) this node last knew its fold held the whole stream.
    confirmed_at: AtomicI64,
    /// The stream sequence of the last record folded (followers).
    stream_seq: AtomicU64,
    /// Since when this node has seen the lease free while at its fair share.
    free_since: Mutex<Option<Instant>>,
    /// Follower lag (µs): from the record's storage in the stream (its leader's timestamp) to
    /// its fold here, for records that arrived once this node had caught up.
    fold_lag: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Partition {
    /// How stale this node's fold of the partition may be (ms).
    pub fn lag_ms(&self) -> u64 {
        if self.is_writer() {
            return 0;
        }
        let at = self.confirmed_at.load(Ordering::Relaxed);
        u64::try_from((wall_micros() - at) / 1000).unwrap_or(0)
    }

    /// Whether this node writes the partition now (holds its lease, writer not failed).
    pub fn is_writer(&self) -> bool {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            && !self.shared.poisoned.load(Ordering::SeqCst)
    }

    fn confirm(&self) {
        self.confirmed_at
            .fetch_max(wall_micros(), Ordering::Relaxed);
    }

    /// The fold held the whole stream as it was at `at` (wall micros, never later than now).
    fn confirm_as_of(&self, at: i64) {
        self.confirmed_at
            .fetch_max(at.min(wall_micros()), Ordering::Relaxed);
    }

    fn folded_to(&self, seq: u64) {
        self.shared.durable.send_if_modified(|s| {
            let moved = seq > *s;
            *s = seq.max(*s);
            moved
        });
    }

    /// Wait (at most `within`) until this node's fold holds event `seq` (as a follower, or as
    /// the writer it became meanwhile: both move `durable`).
    async fn wait_folded(&self, seq: u64, within: Duration) -> bool {
        let mut rx = self.shared.durable.subscribe();
        tokio::time::timeout(within, rx.wait_for(|s| *s >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// This node's view of the cluster.
pub struct Cluster {
    /// `[cluster]`.
    pub settings: ClusterSettings,
    /// The partitions, by number.
    pub parts: Vec<Arc<Partition>>,
    nats: Arc<Nats>,
    client: async_nats::Client,
    /// The lease and node buckets, once NATS answered (at start, or later for a node that
    /// started without it and served reads from its copies meanwhile).
    online: std::sync::OnceLock<Online>,
    /// Why this node will not join the cluster it reached later (its settings differ).
    refused: Mutex<Option<String>>,
    /// When an offline node last said in its log that NATS is still unreachable.
    offline_said: Mutex<Instant>,
    /// This node's policy file as every partition last took it from this node, and whether
    /// the data dir keeps that ([`FileRead`]). A SIGHUP applies the file unless it reads as
    /// this says.
    file_read: Mutex<FileRead>,
    /// Held through a whole `reload` (or SIGHUP): two at once would interleave partition by
    /// partition, and the last to finish would say its file is what every partition took.
    reloading: tokio::sync::Mutex<()>,
    config: Arc<crate::config::Config>,
    clock: Clock,
    stopping: AtomicBool,
    /// Woken by a partition store whose stream append failed, and by a stop.
    wake: crossbeam_channel::Receiver<()>,
    wake_tx: crossbeam_channel::Sender<()>,
    /// Nodes (this one included) that reported in the last [`LIVE_REPORT_AGE`].
    live_nodes: std::sync::atomic::AtomicUsize,
    /// When this node last gave a lease back to even out the writers.
    last_rebalance: Mutex<Instant>,
}

/// What a node has once NATS answered.
struct Online {
    leases: Leases,
    nodes: async_nats::jetstream::kv::Store,
}

/// Why a node could not join the cluster through NATS.
enum JoinError {
    /// NATS did not answer (or not yet): try again.
    Unreachable(String),
    /// This node's `[cluster]` settings differ from the cluster's: never join.
    Differ(String),
}

/// Open the lease and node buckets and check that this node's settings are the cluster's.
fn join_nats(nats: &Arc<Nats>, settings: &ClusterSettings) -> Result<Online, JoinError> {
    let replicas = settings.replicas as usize;
    let unreachable = |e: String| JoinError::Unreachable(format!("cluster: {e}"));
    let leases = Leases::open(
        nats.clone(),
        &format!("{}-leases", settings.stream_prefix),
        LEASE_TTL,
        replicas,
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let nodes_bucket = format!("{}-nodes", settings.stream_prefix);
    let nodes = nats
        .retrying("open the nodes bucket", || {
            kv_bucket(
                nats,
                &nodes_bucket,
                Some(Duration::from_secs(3600)),
                replicas,
            )
        })
        .map_err(|e| unreachable(e.to_string()))?;
    check_settings_agree(nats, settings)?;
    Ok(Online { leases, nodes })
}

/// The file in a node's data dir that keeps the cluster's settings as this node last joined
/// with them (what an offline start is checked against).
const JOINED_SETTINGS_FILE: &str = "cluster-settings.json";

/// Whether this node may serve reads from its copies without NATS: it holds a copy of every
/// partition and last joined the cluster with the settings it says now (NATS cannot check them,
/// and copies of other partitions would answer for the wrong scopes). Else why not.
fn may_serve_offline(data_dir: &Path, settings: &ClusterSettings) -> Result<(), String> {
    if let Some(i) =
        (0..settings.partitions).find(|i| !Cluster::partition_dir(data_dir, *i).is_dir())
    {
        return Err(format!("it has no copy of partition {i}"));
    }
    let file = data_dir.join(JOINED_SETTINGS_FILE);
    let joined = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    match joined {
        Some(j) if j == shared_settings(settings) => Ok(()),
        Some(j) => Err(format!(
            "its [cluster] settings {} differ from the ones it last joined with, {j}",
            shared_settings(settings)
        )),
        None => Err(format!(
            "it has never joined the cluster ({} is missing)",
            file.display()
        )),
    }
}

/// Whether a node that cannot join now (`why`) serves reads from its copies meanwhile (it says
/// so in its log), or why not ([`may_serve_offline`]).
fn serve_offline(data_dir: &Path, settings: &ClusterSettings, why: &str) -> Result<(), String> {
    match may_serve_offline(data_dir, settings) {
        Ok(()) => {
            tracing::warn!(
                "cluster: {why}; serving reads from this node's copies (writes answered \
                 `unavailable`) until it can"
            );
            Ok(())
        }
        Err(not) => Err(format!(
            "cluster: {why}; this node cannot serve reads meanwhile: {not}"
        )),
    }
}

/// Keep the settings this node joined the cluster with ([`may_serve_offline`]).
fn save_joined_settings(data_dir: &Path, settings: &ClusterSettings) -> std::io::Result<()> {
    save_in_data_dir(data_dir, JOINED_SETTINGS_FILE, &shared_settings(settings))
}

/// Write `value` as the file `name` of the data dir, whole or not at all
/// ([`crate::log::replace_file`]), and sync the directory so that the rename holds.
fn save_in_data_dir(data_dir: &Path, name: &str, value: &Value) -> std::io::Result<()> {
    let text = value.to_string();
    crate::log::replace_file(&data_dir.join(name), &mut |w| w.write_all(text.as_bytes()))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// The file in a node's data dir that says how its policy file read when every partition last
/// took it from this node (`Cluster::file_read`), so that a node restarted with that file
/// still unchanged (stale, when another node's file was reloaded since) does not put it back
/// at its first SIGHUP.
const FILE_READ_FILE: &str = "policy-file-read.json";

/// What [`FILE_READ_FILE`] holds for a file read as `hash` that resolved to `resolved`: the
/// text's hash, and a BLAKE3 of the resolved policy's JSON (a changed price file that the
/// text imports changes it; every map in it is ordered, so the JSON is the same each time).
fn file_read_record(hash: &str, resolved: &bursar_schemas::policy::ResolvedPolicy) -> Value {
    let json = serde_json::to_vec(resolved).unwrap_or_default();
    serde_json::json!({
        "source_hash": hash,
        "resolved_blake3": blake3::hash(&json).to_hex().to_string(),
    })
}

/// Keep (or, with `None`, forget) how this node's file last read when every partition took
/// it ([`file_read_record`]). A node that cannot write it goes on: its next start then counts
/// its file as read only when the logs hold it, and says so here.
fn save_file_read(data_dir: &Path, record: Option<&Value>) {
    let saved = match record {
        Some(record) => save_in_data_dir(data_dir, FILE_READ_FILE, record),
        None => match std::fs::remove_file(data_dir.join(FILE_READ_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    };
    if let Err(e) = saved {
        tracing::warn!(
            "cluster: cannot keep how this node's policy file last read in {}: {e} (after a \
             restart, a SIGHUP may apply that file even if it is unchanged)",
            data_dir.join(FILE_READ_FILE).display()
        );
    }
}

/// Whether [`FILE_READ_FILE`] holds `record` ([`file_read_record`]). A record that cannot be
/// read is said in the log and counts as none.
fn file_read_saved_as(data_dir: &Path, record: &Value) -> bool {
    let file = data_dir.join(FILE_READ_FILE);
    let saved = match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) => Err(e.to_string()),
    };
    match saved {
        Ok(saved) => saved == *record,
        Err(e) => {
            tracing::warn!(
                "cluster: cannot read {}: {e}; this node's policy file counts as read only if \
                 the logs hold it",
                file.display()
            );
            false
        }
    }
}

/// This node's policy file as every partition last took it from this node.
struct FileRead {
    /// Its [`file_read_record`] (its text's hash, and that of the policy resolved from it,
    /// prices imported from other files included): at start, when every partition's log
    /// holds that policy (or none yet) or the data dir's record says so ([`FILE_READ_FILE`]);
    /// at each reload every partition applied. `None` after a reload some partition failed,
    /// or when the node started with a file that neither the logs nor the record hold.
    read: Option<Value>,
    /// Whether `read` is settled and the record says it (or `read` is `None`). The record is
    /// written at each reload every partition applied, and for a file read at start the first
    /// time every partition's fold holds a policy, if that is the file's (not while a copy is
    /// still empty: a node joining a running cluster has not had its file taken).
    kept: bool,
}

/// The NATS key-value bucket `bucket` (one value a key), made if it is not there yet; its
/// entries live `max_age` (for ever without).
async fn kv_bucket(
    nats: &Nats,
    bucket: &str,
    max_age: Option<Duration>,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, String> {
    match nats.js.get_key_value(bucket).await {
        Ok(kv) => Ok(kv),
        Err(_) => nats
            .js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: bucket.to_string(),
                history: 1,
                max_age: max_age.unwrap_or_default(),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The settings every node of a cluster must share (SPEC §13: `partitions` "fixed when the
/// cluster's streams are created"), as the first node to start wrote them into the bucket
/// `PREFIX-settings`.
fn shared_settings(settings: &ClusterSettings) -> serde_json::Value {
    serde_json::json!({
        "partitions": settings.partitions,
        "partition_by": settings.partition_by,
        "replicas": settings.replicas,
    })
}

/// Refuse to start a node whose `partitions`, `partition_by` or `replicas` differ from what
/// the cluster was created with: a node with more partitions would create streams that the
/// others neither write nor follow, and route a scope to a partition another writer does not
/// own (two writers of one budget: overspend); another `partition_by` routes the same scope
/// elsewhere; fewer replicas weaken what an acknowledged write survives. The first node to
/// start (of a cluster created before this check: the first after the upgrade) writes them;
/// every later one compares.
fn check_settings_agree(nats: &Nats, settings: &ClusterSettings) -> Result<(), JoinError> {
    let bucket = format!("{}-settings", settings.stream_prefix);
    let settings_value = shared_settings(settings);
    let mine = settings_value.to_string();
    let theirs = nats
        .retrying("agree on the cluster's settings", || async {
            let kv = kv_bucket(nats, &bucket, None, settings.replicas as usize).await?;
            if kv.create("cluster", mine.clone().into()).await.is_ok() {
                return Ok(mine.clone());
            }
            match kv.get("cluster").await {
                Ok(Some(v)) => Ok(String::from_utf8_lossy(&v).into_owned()),
                Ok(None) => Err("the settings were neither written nor there".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .map_err(|e| JoinError::Unreachable(format!("cluster: {e}")))?;
    if serde_json::from_str::<serde_json::Value>(&theirs).is_ok_and(|v| v == settings_value) {
        return Ok(());
    }
    Err(JoinError::Differ(format!(
        "cluster: this node's [cluster] settings {mine} differ from the ones the cluster was \
         created with, {theirs} (NATS bucket {bucket:?}): every node must say the same \
         partitions, partition_by and replicas"
    )))
}

fn shared_err(op: &'static str) -> impl Fn(String) -> LogError {
    move |reason| LogError::Shared { op, reason }
}

/// Why a request that starts following a stream failed.
#[derive(Debug)]
enum StartFailed {
    /// No answer within its time limit (lost, or slow): the next start allows a second more.
    NoAnswer(LogError),
    /// An answer that was an error (no responders, a stream not found while NATS elects
    /// leaders, ...): asked again with the same limit.
    Answered(LogError),
}

/// `request`'s answer, or a failure of `op` (its reason after `what`) when it errs or takes
/// longer than `limit`.
async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    op: &'static str,
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StartFailed> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StartFailed::Answered(shared_err(op)(format!("{what}{e}")))),
        Err(_) => Err(StartFailed::NoAnswer(shared_err(op)(format!(
            "{what}no answer within {limit:?}"
        )))),
    }
}

impl Cluster {
    /// Connect to NATS, open every partition's local copy and fold it, and follow every
    /// partition. Leases are taken by [`Cluster::start_coordinator`].
    pub fn open(
        config: Arc<crate::config::Config>,
        settings: ClusterSettings,
        clock: Clock,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Arc<Cluster>, crate::DaemonError> {
        let start = |e: String| crate::DaemonError::Start(e);
        // A node that ran before serves reads from its copies until NATS (or a quorum of it)
        // answers (SPEC §13: "reads go on from the local fold and say how stale they are").
        let offline = |why: String| serve_offline(&config.data_dir, &settings, &why).map_err(start);
        let (nats, online) = match Nats::connect(&settings.nats, NATS_TIMEOUT) {
            Ok(nats) => match join_nats(&nats, &settings) {
                Ok(online) => (nats, Some(online)),
                Err(JoinError::Unreachable(e)) => {
                    offline(format!("cannot join through NATS ({e})"))?;
                    (nats, None)
                }
                Err(JoinError::Differ(e)) => return Err(start(e)),
            },
            Err(e) => {
                offline(format!("cannot reach NATS: {e}"))?;
                let nats = Nats::connect_in_background(&settings.nats, NATS_TIMEOUT)
                    .map_err(|e| start(format!("cluster: {e}")))?;
                (nats, None)
            }
        };
        let client = nats.js.client();
        // Created only once NATS answered: a node that cannot reach it writes nothing.
        if !config.data_dir.exists() {
            std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                start(format!(
                    "cannot create data dir {}: {e}",
                    config.data_dir.display()
                ))
            })?;
            use std::os::unix::fs::PermissionsExt;
            let _ =
                std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
        }
        let (wake_tx, wake) = crossbeam_channel::bounded(1);
        let mut parts = Vec::new();
        for i in 0..settings.partitions {
            let dir = Cluster::partition_dir(&config.data_dir, i);
            let local = crate::open_store(&dir)?;
            let lease = Arc::new(Mutex::new(None));
            let stream_slot: StreamSlot = Arc::new(Mutex::new(None));
            let store = PartitionStore {
                local,
                stream: stream_slot.clone(),
                staged: Vec::new(),
                lease: lease.clone(),
                wake: wake_tx.clone(),
            };
            let (ledger, folded_past_snapshot) = writer::recover_counted(&store).map_err(|e| {
                start(format!(
                    "cluster: cannot rebuild partition {i} from its local copy {}: {e} (remove \
                     the directory: the node follows the stream again)",
                    dir.display()
                ))
            })?;
            let mut shared = Shared::new(ledger, Box::new(store));
            shared.folded_past_snapshot = std::sync::atomic::AtomicU64::new(folded_past_snapshot);
            shared.max_waiters =
                std::sync::atomic::AtomicUsize::new(config.policy.daemon.max_waiters);
            // One set of counters for the node: every partition's writer adds to them.
            shared.metrics = metrics.clone();
            let shared = Arc::new(shared);
            parts.push(Arc::new(Partition {
                index: i,
                stream: format!("{}-p{i}", settings.stream_prefix),
                subject: format!("{}.p{i}.log", settings.stream_prefix),
                shared,
                writer: Mutex::new(None),
                role: Mutex::new(Role::Idle),
                lease,
                stream_slot,
                confirmed_at: AtomicI64::new(0),
                stream_seq: AtomicU64::new(0),
                free_since: Mutex::new(None),
                fold_lag: Mutex::new(
                    hdrhistogram::Histogram::new(3)
                        .map_err(|e| start(format!("cluster: a histogram: {e}")))?,
                ),
            }));
        }
        // The file as every partition last took it from this node, so that a SIGHUP with it
        // unchanged applies nothing: the file in force, or the one this node's data dir says
        // it last read (stale now when another node's file was reloaded since). A file
        // neither holds (deployed before a restart) is applied by the first SIGHUP.
        let in_force = parts.iter().all(|p| {
            read_ledger(&p.shared)
                .policy()
                .is_none_or(|p| *p == config.policy.resolved)
        });
        let record = file_read_record(&config.policy.source_hash, &config.policy.resolved);
        let kept = file_read_saved_as(&config.data_dir, &record);
        let file_read = FileRead {
            read: (in_force || kept).then_some(record),
            kept,
        };
        let cluster = Arc::new(Cluster {
            settings,
            parts,
            nats,
            client,
            online: std::sync::OnceLock::new(),
            refused: Mutex::new(None),
            offline_said: Mutex::new(Instant::now()),
            file_read: Mutex::new(file_read),
            reloading: tokio::sync::Mutex::new(()),
            config,
            clock,
            stopping: AtomicBool::new(false),
            wake,
            wake_tx,
            live_nodes: std::sync::atomic::AtomicUsize::new(1),
            last_rebalance: Mutex::new(Instant::now()),
        });
        // Every partition's recovery buffers are freed (see `crate::memory`).
        crate::memory::recovery_done();
        let online = match online {
            Some(online) => match cluster.go_online(online) {
                Ok(()) => true,
                // NATS answered the join but not the streams (a quorum lost right then): as a
                // start without it; the coordinator joins once it can.
                Err(e) => {
                    let why = format!("cannot join through NATS ({e})");
                    serve_offline(&cluster.config.data_dir, &cluster.settings, &why)
                        .map_err(start)?;
                    false
                }
            },
            None => false,
        };
        if !online {
            for p in &cluster.parts {
                let l = read_ledger(&p.shared);
                if l.policy_version() == 0 {
                    return Err(start(format!(
                        "cluster: cannot reach NATS, and this node's copy of partition {} \
                         holds no policy yet: nothing to serve reads from",
                        p.index
                    )));
                }
                // Not confirmed since it started: as stale as its newest event is old at
                // least (a clock ahead on the node that wrote it never makes it fresher
                // than this start).
                p.confirmed_at
                    .store(l.last_ts().min(wall_micros()), Ordering::Relaxed);
            }
        }
        Ok(cluster)
    }

    /// The lease and node buckets, once this node has reached NATS.
    fn online(&self) -> Option<&Online> {
        self.online.get()
    }

    /// Make every partition's stream where it is missing, follow every partition, and keep
    /// `online`: from then on this node may take leases.
    fn go_online(self: &Arc<Self>, online: Online) -> Result<(), LogError> {
        for p in &self.parts {
            self.ensure_stream(p)?;
        }
        if let Err(e) = save_joined_settings(&self.config.data_dir, &self.settings) {
            // Only an offline start needs it: this one goes on, a later one without NATS exits.
            tracing::warn!("cluster: cannot keep the settings it joined with: {e}");
        }
        if self.online.set(online).is_ok() {
            for p in &self.parts {
                self.follow(p);
            }
        }
        Ok(())
    }

    /// For a node that started without NATS: join once NATS answers (called by the
    /// coordinator's tick until it has).
    fn try_to_join(self: &Arc<Self>) {
        if self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return;
        }
        if !self.nats.is_connected() {
            self.say_offline(|| {
                format!(
                    "cluster: NATS still unreachable ({:?}); reads from this node's copies, \
                     writes `unavailable`",
                    self.settings.nats
                )
            });
            return;
        }
        let joined = join_nats(&self.nats, &self.settings).and_then(|online| {
            self.go_online(online)
                .map_err(|e| JoinError::Unreachable(format!("cluster: {e}")))
        });
        match joined {
            Ok(()) => {
                tracing::info!("cluster: NATS reached; following every partition");
                // Report at once: until this node has read the others' reports it counts
                // itself alone, and its fair share would be every partition.
                self.report();
            }
            // NATS answers but cannot serve (no quorum): tried every tick.
            Err(JoinError::Unreachable(e)) => self.say_offline(|| format!("{e}; trying again")),
            Err(JoinError::Differ(e)) => {
                tracing::error!("{e}; this node serves reads from its copies and never writes");
                *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }

    /// Log why this node is still offline, at most every [`OFFLINE_SAY_EVERY`].
    fn say_offline(&self, why: impl FnOnce() -> String) {
        let mut last = self.offline_said.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= OFFLINE_SAY_EVERY {
            *last = Instant::now();
            tracing::warn!("{}", why());
        }
    }

    fn js_options(&self, p: &Partition) -> JetStreamOptions {
        JetStreamOptions {
            servers: self.settings.nats.clone(),
            stream: p.stream.clone(),
            subject: p.subject.clone(),
            replicas: self.settings.replicas as usize,
            snapshot_dir: self
                .config
                .data_dir
                .join(format!("p{}", p.index))
                .join("js-snapshots"),
            timeout: NATS_TIMEOUT,
        }
    }

    /// Create the partition's stream when it does not exist yet.
    fn ensure_stream(&self, p: &Partition) -> Result<(), LogError> {
        JetStreamLog::open_on(self.nats.clone(), self.js_options(p)).map(|_| ())
    }

    /// Start following `p` (it must not be written by this node).
    fn follow(self: &Arc<Self>, p: &Arc<Partition>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, part, s) = (self.clone(), p.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("bursar-follow-p{}", p.index))
            .spawn(move || c.follow_loop(&part, &s));
        match thread {
            Ok(thread) => {
                *p.role.lock().unwrap_or_else(|e| e.into_inner()) = Role::Follower { stop, thread }
            }
            Err(e) => tracing::error!("partition {}: cannot start its follower: {e}", p.index),
        }
    }

    /// Follow the stream until `stop`: (re)start an ordered consumer after the local head, fold
    /// each record, confirm the lag.
    fn follow_loop(&self, p: &Partition, stop: &AtomicBool) {
        let mut attempt = FOLLOW_FIRST_ATTEMPT;
        while !stop.load(Ordering::SeqCst) {
            if let Err(e) = self.follow_once(p, stop, &mut attempt) {
                tracing::warn!("partition {}: following the stream: {e}; retrying", p.index);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// Follow `p` from the copy's head until `stop` or a failure. Each request that starts
    /// following (four, and a few dozen to find the copy's head in a long stream) may take
    /// `attempt`. A start that failed for want of an answer adds a second to it, up to
    /// [`NATS_TIMEOUT`] (a slow network still gets its answers); one that was answered with an
    /// error leaves it (those come fast and often while NATS elects leaders, and must not
    /// bring the 5 s wait back); one that succeeds sets it back to [`FOLLOW_FIRST_ATTEMPT`].
    /// (Doubling was not kept: when requests are lost rather than slow, a long limit only
    /// waits longer for an answer that never comes.)
    fn follow_once(
        &self,
        p: &Partition,
        stop: &AtomicBool,
        attempt: &mut Duration,
    ) -> Result<(), LogError> {
        let rt = &self.nats.rt;
        let err = shared_err("follow the stream");
        let head = {
            // The copy holds records the fold does not (a fold that failed after they were
            // copied): fold the copy again before following on from its end.
            let store = lock_store(&p.shared);
            let head = store.head().map_or(0, |h| h.0);
            fold_copy_again_if_apart(&p.shared, store.as_ref(), false).map_err(|reason| {
                LogError::Refused {
                    seq: head,
                    reason: format!("cannot fold the copy again: {reason}"),
                }
            })?;
            head
        };
        let (stream, mut messages) = match rt.block_on(self.start_following(p, head, *attempt)) {
            Ok(s) => {
                *attempt = FOLLOW_FIRST_ATTEMPT;
                s
            }
            Err(StartFailed::NoAnswer(e)) => {
                *attempt = (*attempt + Duration::from_secs(1)).min(NATS_TIMEOUT);
                return Err(e);
            }
            Err(StartFailed::Answered(e)) => return Err(e),
        };
        let mut last_poll = Instant::now();
        // Lag is counted once this follower holds the whole stream (a catch-up is not lag).
        let mut live = false;
        let syncer = lock_store(&p.shared).syncer();
        let copy_sync = match syncer {
            Some(s) => Some(
                CopySync::start(s, p.index)
                    .map_err(|e| err(format!("cannot start the copy's sync: {e}")))?,
            ),
            None => None,
        };
        // Sync the copy (on its own thread when it has one).
        let sync_copy = || match &copy_sync {
            Some(s) => {
                s.ask();
                Ok(())
            }
            None => lock_store(&p.shared).sync(),
        };
        let mut last_sync = Instant::now();
        // Since when the stream has held records past this fold with none arriving.
        let mut behind_since: Option<Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            // The first record (waiting up to 100 ms), then every record already delivered: one
            // batch, folded under one lock. (One record at a time, each synced, left the
            // followers seconds behind a writer at 8,000 records/s: benches/README.md.)
            let batch = rt.block_on(async {
                use futures_util::FutureExt;
                let first = tokio::time::timeout(Duration::from_millis(100), messages.next()).await;
                let mut batch = match first {
                    Ok(Some(m)) => vec![m],
                    Ok(None) => return Err("the consumer ended".to_string()),
                    Err(_) => return Ok(Vec::new()),
                };
                while batch.len() < FOLLOW_BATCH_RECORDS {
                    match messages.next().now_or_never() {
                        Some(Some(m)) => batch.push(m),
                        _ => break,
                    }
                }
                Ok(batch)
            });
            let batch = batch.map_err(&err)?;
            if let Some(e) = copy_sync.as_ref().and_then(CopySync::failure) {
                return Err(e);
            }
            let mut records = Vec::with_capacity(batch.len());
            let mut caught_up = false;
            for msg in batch {
                let msg = msg.map_err(|e| err(e.to_string()))?;
                let i = msg.info().map_err(|e| err(e.to_string()))?;
                let published_us =
                    i64::try_from(i.published.unix_timestamp_nanos() / 1000).unwrap_or(0);
                let (sequence, pending) = (i.stream_sequence, i.pending);
                let key = seq_header(msg.headers.as_ref(), sequence)?;
                caught_up = pending == 0;
                records.push((key, msg.payload.to_vec(), sequence, published_us));
            }
            if let Some(&(_, _, sequence, _)) = records.last() {
                self.fold_records(p, &records)?;
                p.stream_seq.store(sequence, Ordering::Relaxed);
                behind_since = None;
                if live {
                    let now = wall_micros();
                    let mut h = p.fold_lag.lock().unwrap_or_else(|e| e.into_inner());
                    for (_, _, _, published_us) in &records {
                        let _ = h.record(u64::try_from(now - published_us).unwrap_or(0));
                    }
                }
                if caught_up {
                    // As of the last record's publication: nothing followed it in the stream
                    // when it was delivered, so nothing did then either.
                    if let Some(&(_, _, _, published_us)) = records.last() {
                        p.confirm_as_of(published_us);
                    }
                    live = true;
                    last_poll = Instant::now();
                }
            }
            if last_sync.elapsed() >= FOLLOW_SYNC_EVERY {
                sync_copy()?;
                last_sync = Instant::now();
            }
            if last_poll.elapsed() >= Duration::from_millis(250) {
                // Nothing new for a while: ask the stream's leader for its last record (only a
                // leader with a quorum answers; a replica cut off from it does not), so the
                // lag says how long this node has not known.
                last_poll = Instant::now();
                // What the answer says held when it was asked.
                let asked = wall_micros();
                let last = rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.get_last_raw_message_by_subject(&p.subject),
                    )
                    .await
                });
                let folded = p.stream_seq.load(Ordering::Relaxed);
                match last {
                    Ok(Ok(m)) if m.sequence <= folded => {
                        p.confirm_as_of(asked);
                        live = true;
                        behind_since = None;
                    }
                    Ok(Ok(_)) => {
                        // The stream holds more and nothing arrives: a consumer that stalled
                        // (its server or the stream's leader changed) is made again from the
                        // copy's head rather than waited out.
                        let since = *behind_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= FOLLOW_STALL {
                            tracing::warn!(
                                "partition {}: the stream holds more than this node folded and \
                                 nothing arrived for {FOLLOW_STALL:?}: following it again",
                                p.index
                            );
                            return Ok(());
                        }
                    }
                    Ok(Err(e))
                        if folded == 0
                            && e.kind()
                                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        p.confirm_as_of(asked);
                        live = true;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The stream and an ordered consumer of it from the record holding event `head + 1`;
    /// each request may take `limit`.
    async fn start_following(
        &self,
        p: &Partition,
        head: u64,
        limit: Duration,
    ) -> Result<
        (
            async_nats::jetstream::stream::Stream,
            async_nats::jetstream::consumer::pull::Ordered,
        ),
        StartFailed,
    > {
        use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
        let op = "follow the stream";
        let stream = within(limit, op, "", self.nats.js.get_stream(&p.stream)).await?;
        let end = within(limit, op, "", stream.get_info())
            .await?
            .state
            .last_sequence;
        let start = locate(&stream, head + 1, end, limit).await?;
        let config = OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ..Default::default()
        };
        let consumer = within(limit, op, "", stream.create_consumer(config)).await?;
        let messages = within(limit, op, "", consumer.messages()).await?;
        Ok((stream, messages))
    }

    /// Check records of the stream, append them to the local copy (synced by the caller, on
    /// its own thread: the copy is a cache of the stream, followed again from its head after a
    /// crash) and fold them.
    fn fold_records(
        &self,
        p: &Partition,
        records: &[(u64, Vec<u8>, u64, i64)],
    ) -> Result<(), LogError> {
        let mut folded = Vec::new();
        {
            let mut store = lock_store(&p.shared);
            for (key, bytes, _, _) in records {
                let head = store.head().map_or(0, |h| h.0);
                let envs: Vec<Envelope> =
                    RecordEnvelopes::new(std::iter::once(Ok((*key, bytes.clone()))), head + 1)
                        .collect::<Result<_, _>>()?;
                if envs.is_empty() {
                    continue;
                }
                store.append_record(*key, bytes, &envs)?;
                folded.extend(envs);
            }
        }
        if folded.is_empty() {
            return Ok(());
        }
        let last = {
            // Folded without the store's lock (readers of the copy go on meanwhile).
            fold_copied(p, None, &folded).map_err(|reason| LogError::Refused {
                seq: folded.first().map_or(0, |e| e.seq),
                reason,
            })?
        };
        p.folded_to(last);
        Ok(())
    }

    /// Stop following `p` (waits for its thread).
    fn stop_following(&self, p: &Partition) {
        let role = std::mem::replace(
            &mut *p.role.lock().unwrap_or_else(|e| e.into_inner()),
            Role::Idle,
        );
        match role {
            Role::Follower { stop, thread } => {
                stop.store(true, Ordering::SeqCst);
                let _ = thread.join();
            }
            other => *p.role.lock().unwrap_or_else(|e| e.into_inner()) = other,
        }
    }

    /// Become `p`'s writer with the lease `held`: catch up with the stream, put the stream in
    /// front of the local copy, start the writer and the forward service.
    fn take_over(self: &Arc<Self>, p: &Arc<Partition>, held: Held) -> Result<(), String> {
        self.stop_following(p);
        let result = (|| -> Result<(), String> {
            let js = JetStreamLog::open_on(self.nats.clone(), self.js_options(p))
                .map_err(|e| e.to_string())?;
            {
                let mut store = lock_store(&p.shared);
                let mut folded = Vec::new();
                crate::log::follow::catch_up(&js, store.as_mut(), |e| folded.push(e.clone()))
                    .map_err(|e| e.to_string())?;
                fold_copied(p, Some(store.as_ref()), &folded)?;
                if store.head() != js.head() {
                    return Err("the local copy does not end where the stream does".into());
                }
                *p.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(held.valid_until);
                *slot(&p.stream_slot) = Some(js);
            }
            let last = read_ledger(&p.shared).last_seq();
            p.folded_to(last);
            p.shared.poisoned.store(false, Ordering::SeqCst);
            // The log's policy is the cluster's: a node's own file is applied only to a
            // partition whose log has none yet (`reload` changes it everywhere).
            let has_policy = read_ledger(&p.shared).policy_version() > 0;
            let policy = (!has_policy).then_some(&self.config.policy);
            let cfg = self.config.clone();
            let reload = Arc::new(move || cfg.reload_policy().map_err(|e| e.to_string()));
            let (handle, thread) =
                writer::start_with(p.shared.clone(), policy, self.clock.clone(), reload)?;
            let forward = self.nats.rt.spawn(serve_forwarded(
                self.client.clone(),
                p.clone(),
                handle.clone(),
                format!("{}.p{}.write", self.settings.stream_prefix, p.index),
                self.settings.partition_by.clone(),
            ));
            *p.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.clone());
            *p.role.lock().unwrap_or_else(|e| e.into_inner()) = Role::Writer {
                held,
                writer: handle,
                thread,
                forward,
            };
            p.confirm();
            tracing::info!("partition {}: this node is its writer", p.index);
            Ok(())
        })();
        if result.is_err() {
            *p.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.reset_to_local(p);
            self.follow(p);
        }
        result
    }

    /// Drop the stream from `p`'s store and rebuild its ledger from the local copy when the
    /// writer left it ahead of what was stored.
    fn reset_to_local(&self, p: &Partition) {
        let store = lock_store(&p.shared);
        *slot(&p.stream_slot) = None;
        let poisoned = p.shared.poisoned.load(Ordering::SeqCst);
        if let Err(e) = fold_copy_again_if_apart(&p.shared, store.as_ref(), poisoned) {
            tracing::error!(
                "partition {}: cannot rebuild from the local copy: {e}",
                p.index
            );
        }
        p.shared.poisoned.store(false, Ordering::SeqCst);
    }

    /// Stop writing `p`: stop the forward service and the writer, give the lease back when
    /// `release`, rebuild from the local copy, follow again (unless the node stops).
    fn step_down(self: &Arc<Self>, p: &Arc<Partition>, release: bool) {
        let role = std::mem::replace(
            &mut *p.role.lock().unwrap_or_else(|e| e.into_inner()),
            Role::Idle,
        );
        let Role::Writer {
            held,
            writer,
            thread,
            forward,
        } = role
        else {
            *p.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
            return;
        };
        forward.abort();
        *p.writer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = writer.submit(Job::Handover);
        drop(writer);
        let _ = thread.join();
        *p.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // The ledger back to what the stream holds before anything that may wait on NATS.
        self.reset_to_local(p);
        if let (true, Some(online)) = (release, self.online()) {
            let _ = online.leases.release(held);
        }
        tracing::info!("partition {}: this node no longer writes it", p.index);
        if !self.stopping.load(Ordering::SeqCst) {
            self.follow(p);
        }
    }

    /// Settle the file read at start (the config's: a reload settles its own at once) the
    /// first time every partition's fold holds a policy ([`FileRead::kept`]): its own on
    /// every partition, kept in the data dir's record; else no partition took it from this
    /// node (it started with empty copies and another node's file was applied), and a SIGHUP
    /// applies it.
    fn keep_file_read(&self) {
        let mut file_read = self.file_read.lock().unwrap_or_else(|e| e.into_inner());
        let FileRead {
            read: Some(read),
            kept: false,
        } = &*file_read
        else {
            return;
        };
        // Cheap until then: the versions only.
        if self
            .parts
            .iter()
            .any(|p| read_ledger(&p.shared).policy_version() == 0)
        {
            return;
        }
        let started_with = &self.config.policy.resolved;
        let held = self
            .parts
            .iter()
            .all(|p| read_ledger(&p.shared).policy() == Some(started_with));
        if held {
            save_file_read(&self.config.data_dir, Some(read));
        } else {
            file_read.read = None;
        }
        file_read.kept = true;
    }

    /// Renew held leases, step down where one is lost or the writer failed, take free ones.
    fn tick(self: &Arc<Self>) {
        self.keep_file_read();
        let Some(online) = self.online() else {
            self.try_to_join();
            return;
        };
        // Failed writers first: their ledgers may hold what the stream refused.
        for p in &self.parts {
            let failed = matches!(
                *p.role.lock().unwrap_or_else(|e| e.into_inner()),
                Role::Writer { .. }
            ) && p.shared.poisoned.load(Ordering::SeqCst);
            if failed {
                tracing::warn!("partition {}: its writer failed; stepping down", p.index);
                self.step_down(p, true);
            }
        }
        for p in &self.parts {
            let mut lost = false;
            {
                let mut role = p.role.lock().unwrap_or_else(|e| e.into_inner());
                if let Role::Writer { held, .. } = &mut *role {
                    if p.shared.poisoned.load(Ordering::SeqCst) {
                        lost = true;
                    } else {
                        match online.leases.renew(held) {
                            Ok(true) => {
                                *p.lease.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(held.valid_until);
                                p.confirm();
                            }
                            Ok(false) => lost = true,
                            Err(e) => {
                                tracing::warn!("partition {}: renewing its lease: {e}", p.index);
                                lost = !held.is_valid(Instant::now());
                            }
                        }
                    }
                    if !lost {
                        continue;
                    }
                }
            }
            if lost {
                tracing::warn!(
                    "partition {}: lease lost or writer failed; stepping down",
                    p.index
                );
                self.step_down(p, true);
                continue;
            }
            if !self.may_take(online, p) {
                continue;
            }
            match online
                .leases
                .try_acquire(&p.index.to_string(), &self.settings.node)
            {
                Ok(Some(held)) => {
                    if let Err(e) = self.take_over(p, held) {
                        tracing::warn!("partition {}: cannot take over: {e}", p.index);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("partition {}: {e}", p.index),
            }
        }
        self.rebalance();
    }

    /// Partitions this node writes now.
    fn held(&self) -> usize {
        self.parts
            .iter()
            .filter(|q| {
                matches!(
                    *q.role.lock().unwrap_or_else(|e| e.into_inner()),
                    Role::Writer { .. }
                )
            })
            .count()
    }

    /// This node's fair share of the partitions' writers: all of them divided among the nodes
    /// that reported in the last few seconds, rounded up.
    fn fair_share(&self) -> usize {
        let live = self.live_nodes.load(Ordering::Relaxed).max(1);
        (self.parts.len()).div_ceil(live)
    }

    /// Whether to try for `p`'s free lease: when under its fair share, or when the lease has
    /// been free for two TTLs (no node under its share took it).
    fn may_take(&self, online: &Online, p: &Partition) -> bool {
        let mut free_since = p.free_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.held() < self.fair_share() {
            *free_since = None;
            return true;
        }
        match online.leases.holder_now(&p.index.to_string()) {
            Ok(Some(_)) | Err(_) => {
                *free_since = None;
                false
            }
            Ok(None) => {
                let since = *free_since.get_or_insert_with(Instant::now);
                since.elapsed() >= 2 * LEASE_TTL
            }
        }
    }

    /// Give one lease back (at most every [`REBALANCE_EVERY`]) while this node writes more
    /// than its fair share: a node under its share takes it within a tick.
    fn rebalance(self: &Arc<Self>) {
        let mut last = self
            .last_rebalance
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < REBALANCE_EVERY || self.held() <= self.fair_share() {
            return;
        }
        *last = Instant::now();
        drop(last);
        let writing = self.parts.iter().rev().find(|q| {
            matches!(
                *q.role.lock().unwrap_or_else(|e| e.into_inner()),
                Role::Writer { .. }
            )
        });
        if let Some(p) = writing {
            tracing::info!(
                "partition {}: giving its lease back ({} writers here, fair share {})",
                p.index,
                self.held(),
                self.fair_share()
            );
            self.step_down(p, true);
        }
    }

    /// This node's fold and lag per partition, as `report` publishes it.
    fn own_report(&self) -> Value {
        let parts: Vec<Value> = self
            .parts
            .iter()
            .map(|p| {
                let h = p.fold_lag.lock().unwrap_or_else(|e| e.into_inner());
                let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
                serde_json::json!({
                    "partition": p.index,
                    "folded_seq": read_ledger(&p.shared).last_seq(),
                    "lag_ms": p.lag_ms(),
                    "writer": p.is_writer(),
                    "fold_lag_p50_us": q(0.5),
                    "fold_lag_p99_us": q(0.99),
                    "fold_lag_records": h.len(),
                })
            })
            .collect();
        serde_json::json!({"at": wall_micros(), "partitions": parts})
    }

    /// Publish this node's fold and lag per partition (read by `cluster status`).
    fn report(&self) {
        let Some(online) = self.online() else {
            return;
        };
        let body = self.own_report().to_string();
        let node = self.settings.node.clone();
        let now = wall_micros();
        let live = self.nats.rt.block_on(async {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), online.nodes.put(node, body.into()))
                    .await;
            tokio::time::timeout(Duration::from_secs(1), async {
                let mut live = 0usize;
                let mut keys = online.nodes.keys().await.ok()?;
                while let Some(Ok(k)) = keys.next().await {
                    let fresh = online
                        .nodes
                        .get(k)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
                        .and_then(|v| v["at"].as_i64())
                        .is_some_and(|at| {
                            now - at < i64::try_from(LIVE_REPORT_AGE.as_micros()).unwrap_or(0)
                        });
                    live += usize::from(fresh);
                }
                Some(live)
            })
            .await
            .ok()
            .flatten()
        });
        if let Some(live) = live {
            self.live_nodes.store(live.max(1), Ordering::Relaxed);
        }
    }

    /// Run the coordinator until the node stops.
    pub fn start_coordinator(self: &Arc<Self>) -> Result<std::thread::JoinHandle<()>, String> {
        let c = self.clone();
        std::thread::Builder::new()
            .name("bursar-cluster".into())
            .spawn(move || {
                let mut last_report = Instant::now() - REPORT_EVERY;
                while !c.stopping.load(Ordering::SeqCst) {
                    c.tick();
                    if last_report.elapsed() >= REPORT_EVERY {
                        c.report();
                        last_report = Instant::now();
                    }
                    // A failed writer wakes this at once: its partition's ledger may hold the
                    // batch the stream refused until the node steps down and rebuilds it.
                    let _ = c.wake.recv_timeout(LEASE_TICK);
                }
            })
            .map_err(|e| format!("cannot start the cluster thread: {e}"))
    }

    /// Stop coordinating: the coordinator ends after the tick under way. The caller joins it
    /// before [`stop`](Cluster::stop), so that no tick takes a partition over or starts a
    /// follower (a failed take-over follows again) once `stop` has stepped down and stopped
    /// following.
    pub fn stop_coordinating(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.wake_tx.try_send(());
    }

    /// Stop: writers drain and give their leases back; followers stop.
    pub fn stop(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::SeqCst);
        for p in &self.parts {
            self.step_down(p, true);
            self.stop_following(p);
            let _ = lock_store(&p.shared).sync();
        }
    }

    /// The partition a request with `labels` goes to.
    pub fn partition_for_labels(
        &self,
        labels: Option<&bursar_schemas::Labels>,
    ) -> Result<usize, WireError> {
        let key = &self.settings.partition_by;
        match labels.and_then(|l| l.get(key)) {
            Some(v) => Ok(partition_of(v, self.settings.partitions) as usize),
            None => Err(WireError::bad_field(
                format!("labels.{key}"),
                format!(
                    "cluster mode: every request carries the partition label {key:?} \
                     ([cluster] partition_by)"
                ),
            )),
        }
    }

    /// The partition that knows reservation `rid`, if any does on this node: holds it, has
    /// its id in the idempotency window, or remembers it ended or was denied (for the hour, even
    /// when `idempotency_window_seconds` is shorter: a late commit, or a commit of a denied one,
    /// is then recorded where it was reserved).
    ///
    /// A live hold first: a denied id may be reserved again (in another partition, with other
    /// labels), and its commit belongs with the hold.
    fn partition_of_reservation(&self, rid: &str) -> Option<usize> {
        let knows = |held: bool| {
            self.parts.iter().position(|p| {
                let l = read_ledger(&p.shared);
                if held {
                    return l.hold(rid).is_some();
                }
                l.ids().get(IdKind::Reservation, rid).is_some()
                    || l.ended_reservation(rid).is_some()
            })
        };
        knows(true).or_else(|| knows(false))
    }

    /// Where a write goes: its partition.
    async fn route(&self, request: &Request) -> Result<usize, WireError> {
        let (rid, labels) = match request {
            Request::Record(r) => return self.partition_for_labels(Some(&r.labels)),
            Request::Reserve(r) => return self.partition_for_labels(Some(&r.labels)),
            Request::Observe(r) => return self.partition_for_labels(Some(&r.labels)),
            Request::Commit(c) => (&c.reservation_id, c.labels.as_ref()),
            Request::Release(r) => (&r.reservation_id, None),
            Request::Extend(e) => (&e.reservation_id, None),
            _ => return Ok(0),
        };
        if let Some(i) = self.partition_of_reservation(rid) {
            return Ok(i);
        }
        // A commit whose labels name its partition goes there (its writer knows the hold).
        if let Ok(i) = self.partition_for_labels(labels) {
            return Ok(i);
        }
        if self.online().is_none() {
            // Every write is answered `unavailable` at once (`forward`).
            return Ok(0);
        }
        // A reservation made through another node may not be folded here yet: wait at least
        // 500 ms, and until every partition's fold has held its whole stream since this
        // request arrived (a node catching up after a restart), at most FOLD_WAIT.
        let arrived = wall_micros();
        let started = Instant::now();
        let behind = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(i) = self.partition_of_reservation(rid) {
                return Ok(i);
            }
            let behind = self
                .parts
                .iter()
                .find(|p| !p.is_writer() && p.confirmed_at.load(Ordering::Relaxed) < arrived);
            let waited = started.elapsed();
            if (behind.is_none() && waited >= Duration::from_millis(500)) || waited >= FOLD_WAIT {
                break behind;
            }
        };
        if let Some(p) = behind {
            // Still behind: sending it to partition 0 would record a `commit` there, unlabelled,
            // and answer a `release` `not_found` for good.
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!(
                    "this node does not know reservation {rid:?} and has not caught up with \
                     partition {} within {FOLD_WAIT:?} (lag {} ms): resend it (the same id is \
                     answered once), or through another node",
                    p.index,
                    p.lag_ms()
                ),
            ));
        }
        // Unknown everywhere: any partition's writer answers `not_found` (a `commit` without
        // labels is recorded there as usage of an unknown reservation).
        Ok(0)
    }

    /// A write, answered through this node: its partition's writer here, or forwarded.
    pub async fn write(
        self: Arc<Self>,
        request: Request,
        line: Vec<u8>,
        actor: Actor,
        req: Option<Value>,
    ) -> String {
        let i = match self.route(&request).await {
            Ok(i) => i,
            Err(e) => return Answer::Error(e).to_line(req),
        };
        // A reserve that waits in line (`wait_ms`) is answered that much later.
        let waits = match &request {
            Request::Reserve(r) => Duration::from_millis(r.wait_ms.unwrap_or(0)),
            _ => Duration::ZERO,
        };
        let p = self.parts[i].clone();
        let local = p.writer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = local {
            if let Some(cmd) = write_cmd(request) {
                let line = local_write(&p, &w, cmd, actor, req.clone()).await;
                if !is_unavailable(&line) {
                    return line;
                }
                // This node stopped writing the partition meanwhile: the next writer answers.
            }
        }
        self.forward(&p, line, actor, req, waits, false).await
    }

    /// Send a write to the partition's writer over NATS; wait for this node's fold to hold it.
    /// With `policy`, the payload is a policy for the writer to apply (packed JSON of
    /// [`PolicyToApply`], flagged by [`POLICY_HEADER`]) instead of a request line.
    async fn forward(
        &self,
        p: &Partition,
        line: Vec<u8>,
        actor: Actor,
        req: Option<Value>,
        waits: Duration,
        policy: bool,
    ) -> String {
        if self.online().is_none() {
            let why = match &*self.refused.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(refusal) => refusal.clone(),
                None => "this node has not reached NATS since it started; it answers reads \
                         from its copies, writes once NATS answers"
                    .to_string(),
            };
            return error_line(
                ErrorCode::Unavailable,
                format!("partition {}: {why}", p.index),
                req,
            );
        }
        let subject = format!("{}.p{}.write", self.settings.stream_prefix, p.index);
        let deadline = Instant::now() + FORWARD_TIMEOUT + waits;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Bursar-Actor",
            format!("{}:{}:{}", actor.uid, actor.gid, actor.pid).as_str(),
        );
        if policy {
            headers.insert(POLICY_HEADER, "1");
        }
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let request = async_nats::Request::new()
                .payload(line.clone().into())
                .headers(headers.clone())
                .timeout(Some(left.min(FORWARD_ATTEMPT + waits)));
            match self.client.send_request(subject.clone(), request).await {
                Ok(msg) => {
                    let seq = seq_header(msg.headers.as_ref(), 0).unwrap_or(0);
                    if seq > 0 && !p.wait_folded(seq, FOLD_WAIT).await {
                        tracing::warn!(
                            "partition {}: answered write {seq} not folded here within {FOLD_WAIT:?}",
                            p.index
                        );
                    }
                    let line = String::from_utf8_lossy(&msg.payload).into_owned();
                    if is_unavailable(&line) && Instant::now() + FORWARD_RETRY < deadline {
                        // A writer that failed or handed over: the next one answers (a resend
                        // of a recorded write is a duplicate).
                        last_error = line;
                        tokio::time::sleep(FORWARD_RETRY).await;
                        continue;
                    }
                    return line;
                }
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        error_line(
            ErrorCode::Unavailable,
            format!(
                "partition {}: no writer answered within {FORWARD_TIMEOUT:?} (no lease holder or \
                 no quorum: {last_error}); the write may or may not be recorded: resend it with \
                 the same id (a duplicate is answered as one)",
                p.index
            ),
            req,
        )
    }

    /// `reload`: this node reads its policy file once, and every partition's writer, here or
    /// on another node, applies that policy (SPEC §13: "`reload` on any node applies
    /// cluster-wide").
    pub async fn reload(self: Arc<Self>, actor: Actor, req: Option<Value>) -> String {
        self.reload_file(actor, req, false).await
    }

    /// SIGHUP: as `reload`, unless this node's file reads as `file_read` says every partition
    /// last took it from this node (at start, when the logs or the data dir's record hold it;
    /// at its last reload that every partition applied). A SIGHUP that reaches a
    /// node whose file is stale (sent to every node by a deploy tool, or to the wrong one)
    /// would otherwise put that older policy back on every partition; `bursar reload` through
    /// the node still applies its file whatever it holds.
    pub async fn reload_on_signal(self: Arc<Self>, actor: Actor) -> String {
        self.reload_file(actor, None, true).await
    }

    async fn reload_file(
        self: Arc<Self>,
        actor: Actor,
        req: Option<Value>,
        only_if_changed: bool,
    ) -> String {
        let _one_at_a_time = self.reloading.lock().await;
        let config = self.config.clone();
        // Off the connection's thread: a file importing LiteLLM's map parses for a while, and
        // how the file reads now (compared for a SIGHUP, kept if every partition takes it)
        // hashes all of it.
        let read = tokio::task::spawn_blocking(move || {
            config.reload_policy().map(|p| {
                let record = file_read_record(&p.source_hash, &p.resolved);
                (p, record)
            })
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        if let (Ok((p, record)), true) = (&read, only_if_changed) {
            let unchanged = {
                let last = self.file_read.lock().unwrap_or_else(|e| e.into_inner());
                last.read.as_ref() == Some(record)
            };
            if unchanged {
                let msg = format!(
                    "{} is as this node last read it: nothing to apply (the cluster's policy \
                     may be newer, from another node's file; `bursar reload` applies this \
                     node's file anyway)",
                    p.source
                );
                tracing::info!("{msg}");
                return serde_json::json!({"ok": true, "unchanged": true, "message": msg})
                    .to_string();
            }
        }
        let (policy, record) = match read.and_then(|(p, r)| Ok((self.fits_the_cluster(p)?, r))) {
            Ok((p, record)) => (PolicyToApply::from(p), record),
            Err(msg) => {
                tracing::error!("reload refused, keeping the running policy: {msg}");
                return Answer::Error(WireError::new(ErrorCode::BadRequest, msg)).to_line(req);
            }
        };
        let packed = match serde_json::to_vec(&policy) {
            Ok(json) => crate::log::pack_raw(&json),
            Err(e) => {
                return error_line(
                    ErrorCode::Internal,
                    format!("cannot encode the policy: {e}"),
                    req,
                )
            }
        };
        let mut answers = Vec::new();
        for p in self.parts.clone() {
            let local = p.writer.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let here = match local {
                Some(w) => Some(reload_on(&w, Some(Box::new(policy.clone())), actor, None).await),
                None => None,
            };
            let line = match here {
                Some(line) if !is_unavailable(&line) => line,
                // Not written here, or this node stopped writing it meanwhile.
                _ => {
                    self.forward(&p, packed.clone(), actor, None, Duration::ZERO, true)
                        .await
                }
            };
            answers.push(line);
        }
        // The first failure (naming its partition; the others answered as they did, each
        // logged), else the first answer (every partition applied the same policy).
        let failed = answers.iter().position(|a| a.starts_with(r#"{"ok":false"#));
        let chosen = answers
            .get(failed.unwrap_or(0))
            .cloned()
            .unwrap_or_default();
        for (i, a) in answers.iter().enumerate() {
            if a.starts_with(r#"{"ok":false"#) {
                tracing::error!("reload: partition {i} did not apply the policy: {a}");
            }
        }
        // What every partition applied; after a partial failure nothing is known to be in
        // force, and the next SIGHUP applies the file whatever it holds.
        let read = (failed.is_none() && !answers.is_empty()).then_some(record);
        {
            // Kept on disk under the lock, so that memory and the record agree.
            let mut last = self.file_read.lock().unwrap_or_else(|e| e.into_inner());
            save_file_read(&self.config.data_dir, read.as_ref());
            *last = FileRead { read, kept: true };
        }
        match serde_json::from_str::<Value>(&chosen) {
            Ok(Value::Object(mut m)) => {
                if let Some(i) = failed {
                    m.insert("partition".into(), Value::from(i));
                }
                m.insert("partitions".into(), Value::from(self.parts.len()));
                if let Some(r) = req {
                    m.insert("req".into(), r);
                }
                serde_json::to_string(&m).unwrap_or_default()
            }
            _ => error_line(ErrorCode::Internal, "no partition answered the reload", req),
        }
    }

    /// A reloaded file as the cluster may apply it: its `[cluster]` is the cluster's (without
    /// it the file's budgets were never checked against the partitioning, and other settings
    /// need a restart of every node), and nothing in it spans partitions.
    fn fits_the_cluster(&self, p: LoadedPolicy) -> Result<LoadedPolicy, String> {
        match &p.cluster {
            Some(c) if shared_settings(c) == shared_settings(&self.settings) => {}
            Some(c) => {
                return Err(format!(
                    "the file's [cluster] settings {} differ from the cluster's {}: they change \
                     only with a restart of every node, never by `reload`",
                    shared_settings(c),
                    shared_settings(&self.settings)
                ))
            }
            None => {
                return Err(
                    "the file has no [cluster]: a cluster node reloads only a file \
                            with the cluster's own [cluster] section"
                        .to_string(),
                )
            }
        }
        match bursar_core::policy::spanning_partitions(&p.resolved, &self.settings.partition_by) {
            Some(why) => Err(why),
            None => Ok(p),
        }
    }

    /// `replay` with `apply` (new prices) on every partition, through each one's writer
    /// (here or forwarded), as `reload` goes: one answer, the partitions' summed, or the first
    /// failure.
    pub async fn replay_apply(
        self: Arc<Self>,
        request: bursar_schemas::wire::ReplayRequest,
        raw: Vec<u8>,
        actor: Actor,
        req: Option<Value>,
    ) -> String {
        let mut answers = Vec::new();
        for p in self.parts.clone() {
            let local = p.writer.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let line = match local {
                Some(w) => replay_on(&w, request.clone(), actor, None).await,
                // A repricing folds the partition's whole log again on its writer: seconds
                // on a large log. It is given that long before it would be sent again (a
                // resend would append the same prices a second time).
                None => {
                    self.forward(&p, raw.clone(), actor, None, REPLAY_APPLY_WAIT, false)
                        .await
                }
            };
            match serde_json::from_str::<ReplayAnswer>(&line) {
                Ok(a) => answers.push(a),
                Err(_) => {
                    let mut failed: Value = serde_json::from_str(&line).unwrap_or_default();
                    if let Value::Object(m) = &mut failed {
                        m.insert("partition".into(), Value::from(p.index));
                        if let Some(r) = req {
                            m.insert("req".into(), r);
                        }
                        return serde_json::to_string(&m).unwrap_or_default();
                    }
                    return error_line(ErrorCode::Internal, "a writer answered nothing", req);
                }
            }
        }
        let mut all = merge_replays(answers);
        all.req = req;
        serde_json::to_string(&all).unwrap_or_default()
    }

    /// `cluster_status`: each partition's lease holder and each node's fold and lag.
    pub async fn status(self: Arc<Self>, req: Option<Value>) -> String {
        let mut reports: Vec<(String, Value)> = Vec::new();
        match self.online() {
            Some(online) => {
                if let Ok(mut keys) = online.nodes.keys().await {
                    while let Some(Ok(k)) = keys.next().await {
                        if let Ok(Some(v)) = online.nodes.get(k.clone()).await {
                            if let Ok(v) = serde_json::from_slice::<Value>(&v) {
                                reports.push((k, v));
                            }
                        }
                    }
                }
            }
            // Not joined yet: what this node knows, its own fold.
            None => reports.push((self.settings.node.clone(), self.own_report())),
        }
        let now = wall_micros();
        let mut partitions = Vec::new();
        for p in &self.parts {
            let kv = self.leases_kv_holder(p.index).await;
            let nodes = reports
                .iter()
                .filter_map(|(node, v)| {
                    let at = v["at"].as_i64()?;
                    let part = v["partitions"]
                        .as_array()?
                        .iter()
                        .find(|x| x["partition"] == p.index)?;
                    Some(ClusterNodeLag {
                        node: node.clone(),
                        folded_seq: part["folded_seq"].as_u64().unwrap_or(0),
                        lag_ms: part["lag_ms"].as_u64().unwrap_or(0),
                        writer: part["writer"].as_bool().unwrap_or(false),
                        reported_ms_ago: u64::try_from((now - at) / 1000).unwrap_or(0),
                        fold_lag_p50_us: part["fold_lag_p50_us"].as_u64(),
                        fold_lag_p99_us: part["fold_lag_p99_us"].as_u64(),
                        fold_lag_records: part["fold_lag_records"].as_u64().unwrap_or(0),
                    })
                })
                .collect();
            partitions.push(ClusterPartitionStatus {
                partition: p.index,
                stream: p.stream.clone(),
                holder: kv.as_ref().map(|(h, _)| h.clone()),
                lease_revision: kv.map(|(_, r)| r),
                nodes,
            });
        }
        serde_json::to_string(&ClusterStatusAnswer {
            ok: true,
            node: self.settings.node.clone(),
            partition_by: self.settings.partition_by.clone(),
            partitions,
            req,
        })
        .unwrap_or_default()
    }

    async fn leases_kv_holder(&self, index: u32) -> Option<(String, u64)> {
        self.online()?;
        let bucket = format!("{}-leases", self.settings.stream_prefix);
        let kv = self.nats.js.get_key_value(&bucket).await.ok()?;
        let e = kv.entry(index.to_string()).await.ok()??;
        (e.operation == async_nats::jetstream::kv::Operation::Put)
            .then(|| (String::from_utf8_lossy(&e.value).into_owned(), e.revision))
    }

    /// The directory of partition `i`'s local copy.
    pub fn partition_dir(data_dir: &Path, i: u32) -> PathBuf {
        data_dir.join(format!("p{i}"))
    }
}

/// The stream sequence of the record holding event `seq` (the last record when the stream
/// ends before it; 1 for an empty stream): a binary search over the records' first seqs.
async fn locate(
    stream: &async_nats::jetstream::stream::Stream,
    seq: u64,
    end: u64,
    limit: Duration,
) -> Result<u64, StartFailed> {
    if end == 0 {
        return Ok(1);
    }
    let first_of = |sequence: u64| async move {
        let what = format!("stream sequence {sequence}: ");
        let msg = within(
            limit,
            "read a record",
            &what,
            stream.get_raw_message(sequence),
        )
        .await?;
        seq_header(Some(&msg.headers), sequence).map_err(StartFailed::Answered)
    };
    if first_of(end).await? <= seq {
        // In the last record, or past the stream's end: the last record is read again (the
        // events the copy holds already are skipped).
        return Ok(end);
    }
    let (mut lo, mut hi) = (1u64, end);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if first_of(mid).await? <= seq {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}

/// `reload` on this node's writer of a partition, applying `policy` (`None`: the writer reads
/// this node's policy file again): the answer line.
async fn reload_on(
    writer: &WriterHandle,
    policy: Option<Box<PolicyToApply>>,
    actor: Actor,
    req: Option<Value>,
) -> String {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job::Reload {
        policy,
        actor,
        req: req.clone(),
        reply: Some(tx),
    };
    match writer.submit(job) {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| error_line(ErrorCode::Unavailable, "the writer stopped", req)),
        Err(code) => error_line(code, "the writer is not accepting jobs", req),
    }
}

/// Put the fold of `store` (a partition's local copy, whose lock the caller holds) in place of
/// `shared`'s ledger when the two are apart — the ledger not at the copy's head: a follower's
/// fold that failed after its records were copied (behind), or a writer stepping down whose
/// ledger holds events the stream did not take (ahead) — or when `anyway` (a poisoned writer's
/// ledger is not trusted). Whether it folded again.
pub fn fold_copy_again_if_apart(
    shared: &Shared,
    store: &dyn LogStore,
    anyway: bool,
) -> Result<bool, String> {
    let head = store.head().map_or(0, |h| h.0);
    if !anyway && read_ledger(shared).last_seq() == head {
        return Ok(false);
    }
    let fresh = writer::recover(store)?;
    *shared.ledger.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    Ok(true)
}

/// Fold events this node copied from the stream (already in `store`, its copy) into `p`'s
/// ledger; the seq folded to. A `pricing_changed` reprices usage folded before it (`replay`
/// with `apply`, SPEC §8): the ledger is then folded again from the copy, as at start (where
/// the writer that appended it refolded its own). `store`: the copy when the caller holds its
/// lock (else it is locked for a refold only).
fn fold_copied(
    p: &Partition,
    store: Option<&dyn LogStore>,
    events: &[Envelope],
) -> Result<u64, String> {
    use bursar_schemas::event::EventBody;
    if events
        .iter()
        .any(|e| matches!(e.body, EventBody::PricingChanged(_)))
    {
        let fresh = match store {
            Some(s) => writer::recover(s),
            None => writer::recover(lock_store(&p.shared).as_ref()),
        }
        .map_err(|e| format!("cannot fold again after new prices: {e}"))?;
        let mut l = p.shared.ledger.write().unwrap_or_else(|e| e.into_inner());
        *l = fresh;
        return Ok(l.last_seq());
    }
    let mut l = p.shared.ledger.write().unwrap_or_else(|e| e.into_inner());
    for e in events {
        l.apply(e.seq, e.ts, &e.body)
            .map_err(|e2| format!("cannot fold event {}: {e2}", e.seq))?;
    }
    Ok(l.last_seq())
}

/// An applied repricing (`replay` with `apply`) on this node's writer of a partition.
async fn replay_on(
    writer: &WriterHandle,
    request: bursar_schemas::wire::ReplayRequest,
    actor: Actor,
    req: Option<Value>,
) -> String {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job::Replay {
        request,
        import_text: None,
        actor,
        req: req.clone(),
        reply: tx,
    };
    match writer.submit(job) {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| error_line(ErrorCode::Unavailable, "the writer stopped", req)),
        Err(code) => error_line(code, "the writer is not accepting jobs", req),
    }
}

/// Put another partition's `status` into `into`: its buckets beside (a bucket lies in one
/// partition; the caller orders them), counts summed; of a quota the partitions both report,
/// the later observation (observations reach the partition of the labels they came with).
/// Subscriptions and tiers are the policy's, the same in every partition.
pub fn merge_status(
    into: &mut bursar_schemas::wire::StatusAnswer,
    other: bursar_schemas::wire::StatusAnswer,
) {
    into.budgets.extend(other.budgets);
    into.total += other.total;
    into.truncated |= other.truncated;
    for q in other.quotas {
        match into.quotas.iter_mut().find(|x| x.id == q.id) {
            Some(mine) if q.observed_at > mine.observed_at => *mine = q,
            Some(_) => {}
            None => into.quotas.push(q),
        }
    }
}

/// Order `status`'s buckets most utilized first over every partition, as one log's status
/// orders them (the display ratio of the same integers; ties by budget, then key), and keep
/// at most `limit` of them (`truncated` when some were cut).
pub fn keep_most_utilized(status: &mut bursar_schemas::wire::StatusAnswer, limit: usize) {
    status.budgets.sort_by(|a, b| {
        b.utilization
            .total_cmp(&a.utilization)
            .then_with(|| a.budget.cmp(&b.budget))
            .then_with(|| a.key.cmp(&b.key))
    });
    if status.budgets.len() > limit {
        status.budgets.truncate(limit);
        status.truncated = true;
    }
}

/// Each partition's dry-run repricing as one answer: every bucket lies in one partition, so
/// the diffs side by side; events and the cost's change summed.
pub fn merge_replays(answers: Vec<ReplayAnswer>) -> ReplayAnswer {
    let mut all = ReplayAnswer {
        ok: true,
        events: 0,
        diff: Vec::new(),
        total_delta_micros: 0,
        applied: !answers.is_empty(),
        seq: None,
        req: None,
    };
    for a in answers {
        all.events += a.events;
        all.diff.extend(a.diff);
        all.total_delta_micros += a.total_delta_micros;
        all.applied &= a.applied;
    }
    all
}

/// Each partition's what-if (`(partition, answer)`) as one answer: counts summed, denials and
/// exhaustions in time order (each denial naming its partition), each budget's highest peak.
pub fn merge_what_ifs(answers: Vec<(usize, WhatIfAnswer)>) -> WhatIfAnswer {
    use bursar_schemas::wire::WHAT_IF_MAX_DENIALS;
    let mut all = WhatIfAnswer::empty();
    for (i, a) in answers {
        all.events += a.events;
        all.reservations += a.reservations;
        all.denied_total += a.denied_total;
        all.denied_hold_micros += a.denied_hold_micros;
        all.usage_left_out += a.usage_left_out;
        all.usage_left_out_micros += a.usage_left_out_micros;
        all.exhausted_total += a.exhausted_total;
        all.denied.extend(a.denied.into_iter().map(|mut d| {
            d.partition = u32::try_from(i).ok();
            d
        }));
        all.exhausted.extend(a.exhausted);
        for peak in a.peaks {
            match all.peaks.iter_mut().find(|p| p.budget == peak.budget) {
                // Display figures: the decisions were made on integers.
                Some(p) if peak.utilization > p.utilization => *p = peak,
                Some(_) => {}
                None => all.peaks.push(peak),
            }
        }
    }
    // RFC 3339 in UTC: text order is time order.
    all.denied.sort_by(|a, b| a.ts.cmp(&b.ts));
    all.denied.truncate(WHAT_IF_MAX_DENIALS);
    all.exhausted.sort_by(|a, b| a.at.cmp(&b.at));
    all.exhausted.truncate(WHAT_IF_MAX_DENIALS);
    all.peaks.sort_by(|a, b| a.budget.cmp(&b.budget));
    all
}

/// Whether an answer line is an `unavailable` error.
fn is_unavailable(line: &str) -> bool {
    line.starts_with(r#"{"ok":false"#) && line.contains(r#""code":"unavailable""#)
}

/// The writer-side command of a write request.
fn write_cmd(request: Request) -> Option<WriteCmd> {
    Some(match request {
        Request::Record(r) => WriteCmd::Record(r),
        Request::Reserve(r) => WriteCmd::Reserve(r),
        Request::Commit(r) => WriteCmd::Commit(r),
        Request::Release(r) => WriteCmd::Release(r),
        Request::Extend(r) => WriteCmd::Extend(r),
        Request::Observe(r) => WriteCmd::Observe(r),
        _ => return None,
    })
}

/// A write on this node's writer of `p`: its answer line.
async fn local_write(
    p: &Arc<Partition>,
    w: &WriterHandle,
    cmd: WriteCmd,
    actor: Actor,
    req: Option<Value>,
) -> String {
    let digest = cmd.digest();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job::Write {
        cmd,
        digest,
        actor,
        reply: tx,
    };
    if let Err(code) = w.submit(job) {
        return error_line(code, "the partition's writer is not accepting writes", req);
    }
    let answer = rx.await.map(Outcome::render).unwrap_or_else(|_| {
        Answer::Error(WireError::new(
            ErrorCode::Unavailable,
            "the partition's writer stopped before answering (it lost its lease); resend",
        ))
    });
    match answer {
        Answer::Duplicate { seq } => {
            let shared = p.shared.clone();
            tokio::task::spawn_blocking(move || crate::server::original_answer(&shared, seq, req))
                .await
                .unwrap_or_else(|_| error_line(ErrorCode::Internal, "internal error", None))
        }
        answer => answer.to_line(req),
    }
}

/// The lease holder's side of forwarding: answer each forwarded write line with this node's
/// writer of `p`, with the partition's durable seq in a header.
async fn serve_forwarded(
    client: async_nats::Client,
    p: Arc<Partition>,
    writer: WriterHandle,
    subject: String,
    partition_by: String,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("partition {}: cannot serve forwarded writes: {e}", p.index);
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (client, p, writer) = (client.clone(), p.clone(), writer.clone());
        let partition_by = partition_by.clone();
        tokio::spawn(async move {
            let actor = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Bursar-Actor"))
                .and_then(|v| {
                    let mut it = v.as_str().split(':').map(|x| x.parse::<u32>().ok());
                    Some(Actor {
                        uid: it.next()??,
                        gid: it.next()??,
                        pid: it.next()??,
                    })
                })
                .unwrap_or_default();
            let carries_policy = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(POLICY_HEADER))
                .is_some();
            let line = if carries_policy {
                match forwarded_policy(&msg.payload, &partition_by) {
                    Ok(policy) => reload_on(&writer, Some(Box::new(policy)), actor, None).await,
                    Err(e) => error_line(
                        ErrorCode::BadRequest,
                        format!("partition {}: a forwarded policy refused: {e}", p.index),
                        None,
                    ),
                }
            } else {
                match decode_request(&msg.payload) {
                    Err((e, req)) => Answer::Error(e).to_line(req),
                    Ok(d) => match d.request {
                        // From a node of an older release: its writer's own file, as before.
                        Request::Reload => reload_on(&writer, None, actor, d.req).await,
                        Request::Replay(r) if r.apply && r.policy.is_none() => {
                            replay_on(&writer, r, actor, d.req).await
                        }
                        request => match write_cmd(request) {
                            Some(cmd) => local_write(&p, &writer, cmd, actor, d.req).await,
                            None => error_line(ErrorCode::BadRequest, "not a write", d.req),
                        },
                    },
                }
            };
            let durable = *p.shared.durable.borrow();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(SEQ_HEADER, durable.to_string().as_str());
            let _ = client
                .publish_with_headers(reply, headers, line.into_bytes().into())
                .await;
        });
    }
}

/// The policy a forwarded `reload` carries (see [`Cluster::reload`]).
fn forwarded_policy(payload: &[u8], partition_by: &str) -> Result<PolicyToApply, String> {
    let json = crate::log::unpack_raw(payload, MAX_FORWARDED_POLICY_BYTES)?;
    let policy: PolicyToApply = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
    match bursar_core::policy::spanning_partitions(&policy.resolved, partition_by) {
        Some(why) => Err(why),
        None => Ok(policy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bursar_schemas::wire::{QuotaLimitReport, QuotaReport, StatusAnswer};

    fn status(quota_seen: Option<&str>, remaining: u64) -> StatusAnswer {
        StatusAnswer {
            ok: true,
            budgets: Vec::new(),
            total: 1,
            truncated: false,
            subscriptions: Vec::new(),
            quotas: vec![QuotaReport {
                id: "openai-prod".into(),
                provider: "openai".into(),
                observed_at: quota_seen.map(str::to_string),
                limits: vec![QuotaLimitReport {
                    limit: "requests".into(),
                    of: Some(100),
                    observed_remaining: remaining,
                    remaining,
                    reset_at: "2026-12-04T10:01:00Z".into(),
                }],
            }],
            tiers: Vec::new(),
            lag_ms: None,
            req: None,
        }
    }

    fn bucket(budget: &str, key: &str, spent: i64) -> bursar_schemas::wire::BudgetReport {
        bursar_schemas::wire::BudgetReport {
            budget: budget.into(),
            key: key.into(),
            limit_micros: Some(1_000),
            spent_micros: spent,
            held_micros: 0,
            remaining_micros: Some(1_000 - spent),
            limit_tokens: None,
            spent_tokens: 0,
            held_tokens: 0,
            remaining_tokens: None,
            limit_requests: None,
            spent_requests: 1,
            remaining_requests: None,
            limit_concurrent: None,
            live_holds: 0,
            remaining_concurrent: None,
            utilization: spent as f64 / 1_000.0,
            state: bursar_schemas::wire::BucketState::Ok,
            enforce: bursar_schemas::policy::Enforce::Deny,
            window: "cumulative".into(),
            window_end: None,
        }
    }

    fn policy_to_apply(budgets: &str) -> PolicyToApply {
        let text = format!(
            "[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\nnode = \"a\"\npartition_by = \"org\"\n\
             partitions = 2\n\n{budgets}"
        );
        let loaded =
            bursar_core::policy::parse_policy(&text, "test.toml", &|_| Err("no".into())).unwrap();
        PolicyToApply::from(loaded)
    }

    #[test]
    fn the_policy_file_record_matches_only_the_file_it_was_written_for_and_a_bad_one_matches_none()
    {
        let dir = tempfile::tempdir().unwrap();
        let one = policy_to_apply("[[budget]]\nid = \"a\"\ngroup_by = [\"org\"]\nmax_usd = 1\n");
        let two = policy_to_apply("[[budget]]\nid = \"a\"\ngroup_by = [\"org\"]\nmax_usd = 2\n");
        let saved_as = |p: &PolicyToApply| {
            file_read_saved_as(dir.path(), &file_read_record(&p.source_hash, &p.resolved))
        };
        assert!(!saved_as(&one), "no record yet");
        save_file_read(
            dir.path(),
            Some(&file_read_record(&one.source_hash, &one.resolved)),
        );
        assert!(saved_as(&one));
        assert!(!saved_as(&two), "another file");
        // The same text resolving to another policy (a changed price file it imports).
        assert!(!file_read_saved_as(
            dir.path(),
            &file_read_record(&one.source_hash, &two.resolved)
        ));
        // After a reload some partition failed, nothing is on record.
        save_file_read(dir.path(), None);
        assert!(!dir.path().join(FILE_READ_FILE).exists());
        assert!(!saved_as(&one));
        save_file_read(dir.path(), None);
        // A record cut short or not JSON counts as none (and says so in the log).
        for bad in ["{\"source_hash\":", "not json", ""] {
            std::fs::write(dir.path().join(FILE_READ_FILE), bad).unwrap();
            assert!(!saved_as(&one), "{bad:?}");
        }
    }

    #[test]
    fn a_forwarded_policy_is_taken_only_when_it_decodes_is_small_enough_and_keeps_to_the_partitions(
    ) {
        let good =
            policy_to_apply("[[budget]]\nid = \"org-daily\"\ngroup_by = [\"org\"]\nmax_usd = 1\n");
        let packed = crate::log::pack_raw(&serde_json::to_vec(&good).unwrap());
        assert_eq!(forwarded_policy(&packed, "org"), Ok(good.clone()));

        // Partitioned by another label, the same budgets would span partitions.
        let err = forwarded_policy(&packed, "team").unwrap_err();
        assert!(
            err.contains("budget \"org-daily\"") && err.contains("team"),
            "{err}"
        );

        // Not a packed policy at all.
        let err = forwarded_policy(br#"{"op":"reload"}"#, "org").unwrap_err();
        assert!(!err.is_empty());
        let err = forwarded_policy(&crate::log::pack_raw(b"[1,2"), "org").unwrap_err();
        assert!(!err.is_empty());

        // A claim larger than a policy may be is refused before anything is unpacked.
        let mut huge = packed.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = forwarded_policy(&huge, "org").unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn the_buckets_of_every_partition_are_cut_to_the_most_utilized_as_one_log_orders_them() {
        let mut a = status(None, 1);
        a.budgets = vec![bucket("org", "org=a", 100), bucket("org", "org=c", 900)];
        let mut b = status(None, 1);
        b.budgets = vec![
            bucket("org", "org=b", 900),
            bucket("team", "team=x", 500),
            bucket("org", "org=d", 10),
        ];
        merge_status(&mut a, b);
        let mut all = a.clone();
        keep_most_utilized(&mut all, 10);
        let order: Vec<&str> = all.budgets.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(order, ["org=b", "org=c", "team=x", "org=a", "org=d"]);
        assert!(!all.truncated, "nothing cut");
        keep_most_utilized(&mut a, 3);
        let kept: Vec<&str> = a.budgets.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(
            kept,
            ["org=b", "org=c", "team=x"],
            "ties by budget, then key"
        );
        assert!(a.truncated, "the answer says some were cut");
    }

    /// Wait up to 10 s for `f` to hold.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_follower_asking_for_a_sync_gets_one_and_hears_of_one_that_failed() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let failing = Arc::new(AtomicBool::new(false));
        let fail = failing.clone();
        let s = CopySync::start(
            Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                if fail.load(Ordering::SeqCst) {
                    return Err(LogError::Refused {
                        seq: 7,
                        reason: "the disk went away".into(),
                    });
                }
                Ok(())
            }),
            0,
        )
        .unwrap();
        s.ask();
        assert!(
            eventually(|| calls.load(Ordering::SeqCst) >= 1),
            "no sync ran"
        );
        assert!(s.failure().is_none());
        failing.store(true, Ordering::SeqCst);
        let before = calls.load(Ordering::SeqCst);
        s.ask();
        assert!(eventually(|| calls.load(Ordering::SeqCst) > before));
        let mut failed = None;
        assert!(eventually(|| {
            failed = s.failure();
            failed.is_some()
        }));
        assert!(
            matches!(failed, Some(LogError::Refused { seq: 7, .. })),
            "{failed:?}"
        );
        // Dropping it joins its thread (it stopped at the failure).
        drop(s);
    }

    #[test]
    fn a_quota_heard_of_in_two_partitions_shows_what_its_provider_said_last() {
        let mut merged = status(Some("2026-12-04T10:00:05Z"), 40);
        merge_status(&mut merged, status(Some("2026-12-04T10:00:09Z"), 12));
        merge_status(&mut merged, status(None, 99));
        merge_status(&mut merged, status(Some("2026-12-04T10:00:01Z"), 70));
        assert_eq!(merged.quotas.len(), 1);
        assert_eq!(merged.quotas[0].limits[0].remaining, 12);
        assert_eq!(merged.total, 4, "bucket counts summed");
    }
}
