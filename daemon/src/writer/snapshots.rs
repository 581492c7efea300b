//! Snapshots: a cache of the log's fold, taken every SNAPSHOT_EVERY_EVENTS events or
//! SNAPSHOT_EVERY_SECONDS, so that a start folds only the log after the newest one.

use super::{lock_store, read_ledger, Shared, Writer, SNAPSHOT_EVERY_SECONDS};
use bursar_core::ledger::Ledger;
use bursar_schemas::event::Hash32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Format tag of the snapshots of the first release (ignored now: recovery folds the log).
pub const SNAPSHOT_FORMAT_V1: u8 = 1;
/// Format tag of the snapshots whose idempotency index was keyed by text (never released;
/// ignored like the first release's).
pub const SNAPSHOT_FORMAT_V2: u8 = 2;
/// Format tag of the snapshots before report rollups (ignored now: recovery folds the log
/// once, which rebuilds the rollups of every event).
pub const SNAPSHOT_FORMAT_V3: u8 = 3;
/// Format tag of the snapshots before provider-quota observations (and holds that remember
/// their input tokens): ignored now, recovery folds the log.
pub const SNAPSHOT_FORMAT_V4: u8 = 4;
/// Format tag of a snapshot value: the hash of the last event folded into it (32 bytes: the
/// head it continues, which recovery checks against the log), then LZ4 (block, size
/// prepended) of the bincode of the ledger, its policy and price tables as JSON inside (so
/// that they can grow keys without a new format), its idempotency index keyed by 128-bit id
/// hashes, its report rollups, each `[[quota]]`'s last observation. Ignored now (see
/// [`SNAPSHOT_FORMAT_V7`]).
pub const SNAPSHOT_FORMAT_V5: u8 = 5;
/// Format tag of format 5's hash and bincode, compressed as one zstd stream instead of an LZ4
/// block, so that a snapshot is encoded into its file and decoded from its bytes without a
/// buffer of the whole bincode (and, writing, of its compressed copy): those two buffers were
/// 105 MB of a daemon's 289 MB peak at 200,000 label sets (heaptrack, benches/README.md
/// "Memory per bucket"). Ignored now (see [`SNAPSHOT_FORMAT_V7`]).
pub const SNAPSHOT_FORMAT_V6: u8 = 6;
/// Format tag of the snapshots written now: format 6, whose ledger also remembers the
/// reservations denied in the last hour (as ended ones), so that a commit of one is recorded
/// against what it asked for. A format-5 or -6 snapshot would decode (the bincode is the same
/// but for a new kind of end), but its ledger has forgotten the denials before it, which a
/// fold of the log remembers: recovery folds the log instead, once.
pub const SNAPSHOT_FORMAT_V7: u8 = 7;

/// zstd level of snapshots (`1`: fast; a snapshot is written off the writer).
const SNAPSHOT_ZSTD_LEVEL: i32 = 1;
/// Buffer between bincode and the zstd stream, either way.
const STREAM_BUFFER: usize = 64 << 10;

/// Write a snapshot of `l`, whose last event (`l.last_seq()`) has hash `head_hash`, into `out`.
pub fn write_snapshot(
    l: &Ledger,
    head_hash: Hash32,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    out.write_all(&[SNAPSHOT_FORMAT_V7])?;
    out.write_all(&head_hash.0)?;
    let mut z = zstd::stream::write::Encoder::new(out, SNAPSHOT_ZSTD_LEVEL)?;
    // A damaged snapshot is then told apart from one that decodes to another ledger.
    z.include_checksum(true)?;
    // bincode writes field by field: buffered, so that zstd sees 64 KiB at a time.
    let mut w = std::io::BufWriter::with_capacity(STREAM_BUFFER, z);
    bincode::serde::encode_into_std_write(l, &mut w, bincode::config::standard())
        .map_err(std::io::Error::other)?;
    w.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .finish()?;
    Ok(())
}

/// Encode a snapshot of `l` into memory (see [`write_snapshot`]).
pub fn encode_snapshot(l: &Ledger, head_hash: Hash32) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    write_snapshot(l, head_hash, &mut out).ok()?;
    Some(out)
}

/// Largest decompressed snapshot accepted.
const MAX_SNAPSHOT_BYTES: usize = 4 << 30;
/// Largest ratio of a snapshot's decompressed size to its stored size accepted.
const MAX_SNAPSHOT_RATIO: usize = 1024;

/// The bincode limit for a snapshot of at most `bound` bytes of bincode: the smallest of the
/// tiers [`SNAPSHOT_LIMIT_TIERS`] at or above what decoding them can claim.
fn snapshot_limit(bound: usize) -> usize {
    let claims = bound.saturating_mul(CLAIMS_PER_BYTE);
    SNAPSHOT_LIMIT_TIERS
        .into_iter()
        .find(|t| *t >= claims)
        .unwrap_or(MAX_SNAPSHOT_BYTES)
}

/// Most that bincode's limit counts per byte it decodes: it counts what it builds, not what it
/// reads (each integer its whole size, a `u128` 16 bytes for a varint of one; a string its
/// length). A real ledger claims 2–5 times its bincode (a stranger's review, 2026-12-05: 7.0 MB
/// of bincode needed a 32 MiB limit); tiers picked by the bincode's size alone refused valid
/// format-5 snapshots from a few MB up.
const CLAIMS_PER_BYTE: usize = 16;

/// bincode limits for decoding a snapshot, by the most its bincode can claim. bincode allocates
/// a string's or an array's length as claimed, before reading its bytes: with one limit of 4
/// GiB for every snapshot, a damaged length in a snapshot of a few KiB asked for up to 4 GiB at
/// once, and on a host that cannot map that much the allocation aborts the daemon. The bincode
/// a snapshot can hold is at most 1,024 times its stored size, so a snapshot of up to 4 KiB
/// decodes within 64 MiB, one of up to 32 KiB within 512 MiB. Limits are constants in bincode:
/// three tiers, three copies of the ledger's decoder.
const SNAPSHOT_LIMIT_TIERS: [usize; 3] = [64 << 20, 512 << 20, MAX_SNAPSHOT_BYTES];

/// Run `$decode` with `$cfg` bound to bincode's standard configuration limited to
/// [`snapshot_limit`]`($bound)`.
macro_rules! within_tier {
    ($bound:expr, |$cfg:ident| $decode:expr) => {{
        let std = bincode::config::standard();
        match snapshot_limit($bound) {
            l if l == SNAPSHOT_LIMIT_TIERS[0] => {
                let $cfg = std.with_limit::<{ SNAPSHOT_LIMIT_TIERS[0] }>();
                $decode
            }
            l if l == SNAPSHOT_LIMIT_TIERS[1] => {
                let $cfg = std.with_limit::<{ SNAPSHOT_LIMIT_TIERS[1] }>();
                $decode
            }
            _ => {
                let $cfg = std.with_limit::<{ SNAPSHOT_LIMIT_TIERS[2] }>();
                $decode
            }
        }
    }};
}

/// Decode a snapshot: the ledger and the hash of its last event. A snapshot is a cache of the
/// log's fold: one of an older format (or a damaged one) is `None`, and recovery folds the log
/// instead.
pub fn decode_snapshot(bytes: &[u8]) -> Option<(Ledger, Hash32)> {
    decode_snapshot_within(bytes, MAX_SNAPSHOT_RATIO)
}

/// [`decode_snapshot`], decoding a snapshot only while its decompressed bytes stay within
/// `max_ratio` times its stored size (the daemon's bound is 1,024; tests show the bound holds
/// with others).
#[doc(hidden)]
pub fn decode_snapshot_within(bytes: &[u8], max_ratio: usize) -> Option<(Ledger, Hash32)> {
    let (tag, rest) = bytes.split_first()?;
    if *tag != SNAPSHOT_FORMAT_V7 {
        return None;
    }
    let head_hash = Hash32(rest.get(..32)?.try_into().ok()?);
    let rest = rest.get(32..)?;
    let z = zstd::stream::read::Decoder::with_buffer(rest).ok()?;
    // A damaged or hostile file cannot make start-up decode more than this: snapshots compress
    // ~5:1 (benches/README.md), far from the bound.
    let most = MAX_SNAPSHOT_BYTES.min(rest.len().saturating_mul(max_ratio));
    // One byte over the bound is read, so that a stream ending exactly at it is still read to
    // its real end (and its checksum checked) and one longer is told apart.
    let z = std::io::Read::take(z, most as u64 + 1);
    let mut z = std::io::BufReader::with_capacity(STREAM_BUFFER, z);
    let l = within_tier!(most, |cfg| bincode::serde::decode_from_std_read::<
        Ledger,
        _,
        _,
    >(&mut z, cfg))
    .ok()?;
    // Nothing may follow the ledger in the stream; reading to its end checks its checksum.
    let mut more = [0u8; 1];
    match std::io::Read::read(&mut z, &mut more) {
        Ok(0) if z.into_inner().limit() > 0 => Some((l, head_hash)),
        _ => None,
    }
}

/// A snapshot to encode and store off the writer: the ledger as of `seq`, whose event has
/// `hash`.
pub(super) struct SnapshotJob {
    seq: u64,
    hash: Hash32,
    ledger: Box<Ledger>,
}

/// The thread that encodes and stores snapshots, so that the writer only copies the ledger.
/// Encoding a snapshot is O(state) (the idempotency index grows with the write rate: ~350,000
/// ids after 12 s of `bursar-bench record`), and on the writer it took 10 % of its time during
/// that run, every write of the batch after it waiting; copying the ledger costs a fraction.
pub(super) struct Snapshotter {
    tx: Option<std::sync::mpsc::SyncSender<SnapshotJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// A snapshot is being encoded or stored.
    busy: Arc<AtomicBool>,
}

impl Snapshotter {
    pub(super) fn start(shared: Arc<Shared>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<SnapshotJob>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let flag = busy.clone();
        let thread = std::thread::Builder::new()
            .name("bursar-snapshot".into())
            .spawn(move || {
                for job in rx {
                    store_snapshot(&shared, job.seq, &job.ledger, job.hash);
                    drop(job);
                    flag.store(false, Ordering::SeqCst);
                }
            });
        match thread {
            Ok(t) => Self {
                tx: Some(tx),
                thread: Some(t),
                busy,
            },
            Err(e) => {
                // Snapshots are then taken on the writer (slower batches, nothing lost).
                tracing::warn!("cannot start the snapshot thread ({e}); snapshots on the writer");
                Self {
                    tx: None,
                    thread: None,
                    busy,
                }
            }
        }
    }

    /// Wait for the snapshot in progress, if any, and stop the thread.
    fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Encode and store a snapshot (durable at the store's next sync). Returns whether it was
/// stored.
fn store_snapshot(shared: &Shared, seq: u64, l: &Ledger, hash: Hash32) -> bool {
    if shared.poisoned.load(Ordering::SeqCst) {
        return false;
    }
    // A store that keeps snapshots as files gets them encoded into the file here, without its
    // lock; another is handed the encoded bytes.
    let dir = lock_store(shared).snapshot_dir();
    let stored = match dir {
        Some(dir) => {
            crate::log::write_snapshot_file_with(&dir, seq, &mut |w| write_snapshot(l, hash, w))
        }
        None => {
            let Some(bytes) = encode_snapshot(l, hash) else {
                tracing::warn!("cannot encode a snapshot");
                return false;
            };
            lock_store(shared).put_snapshot(seq, &bytes)
        }
    };
    match stored {
        Ok(()) => {
            tracing::debug!("snapshot at seq {seq}");
            // Snapshots are taken between batches: every event up to `seq` is durable.
            if let Err(e) = lock_store(shared).mark_durable(seq, hash) {
                tracing::warn!("cannot mark seq {seq} durable (the log is intact): {e}");
            }
            true
        }
        Err(e) => {
            tracing::warn!("snapshot failed (the log is intact): {e}");
            false
        }
    }
}

impl Writer {
    /// Take a snapshot when one is due (or `force`d and anything is new): the ledger is copied
    /// here, between batches, and encoded and stored by the snapshot thread; a `force`d one (at
    /// shutdown) waits for the one in progress and is taken here.
    pub(super) fn snapshot(&mut self, force: bool) {
        let every = self.shared.snapshot_every_events.load(Ordering::Relaxed);
        // A snapshot costs O(state) (a copy on the writer, then encoding and storing), so one
        // is taken only after at least as many events as the state holds entries: its cost
        // per event stays bounded whatever the state's size. `bursar-bench churn` (~100,000
        // live sessions, ids remembered 5 s: ~700,000 entries) took one every second with a
        // fixed 100,000 and the daemon's RSS grew from 260 to 960 MiB over 2 M sessions (flat
        // at ~285 MiB without snapshots); a start then folds at most about the state's size
        // of events after the snapshot, a few seconds at worst.
        let every = if self.since_snapshot >= every
            && self.shared.snapshot_amortized.load(Ordering::Relaxed)
        {
            let l = read_ledger(&self.shared);
            every.max((l.bucket_count() + l.ids().len()) as u64)
        } else {
            every
        };
        let due = self.since_snapshot >= every
            || (self.since_snapshot > 0
                && self.last_snapshot.elapsed() >= Duration::from_secs(SNAPSHOT_EVERY_SECONDS))
            || (force && self.since_snapshot > 0);
        if !due || self.shared.poisoned.load(Ordering::SeqCst) {
            if force {
                self.snapshotter.finish();
            }
            return;
        }
        if force || self.snapshotter.tx.is_none() {
            self.snapshotter.finish();
            let stored = {
                let l = read_ledger(&self.shared);
                // Called between batches: every event the ledger folded is committed, the last
                // one with `prev_hash`.
                store_snapshot(&self.shared, l.last_seq(), &l, self.prev_hash)
            };
            if stored {
                self.since_snapshot = 0;
                self.last_snapshot = std::time::Instant::now();
            }
            return;
        }
        if self.snapshotter.busy.load(Ordering::SeqCst) {
            return; // the one in progress first; this one at a later batch
        }
        let ledger = Box::new(read_ledger(&self.shared).clone());
        let job = SnapshotJob {
            seq: ledger.last_seq(),
            hash: self.prev_hash,
            ledger,
        };
        self.snapshotter.busy.store(true, Ordering::SeqCst);
        let sent = self.snapshotter.tx.as_ref().map(|tx| tx.try_send(job));
        if !matches!(sent, Some(Ok(()))) {
            self.snapshotter.busy.store(false, Ordering::SeqCst);
            return;
        }
        // Counted from the copy: a snapshot that then fails is only a slower next start.
        self.since_snapshot = 0;
        self.last_snapshot = std::time::Instant::now();
    }
}
