//! The durable, hash-chained event log (SPEC §7) behind the small [`LogStore`] trait.
//!
//! One writer thread owns a store. It stages a group-commit batch with [`LogStore::append`]
//! (the events as the writer sealed them, in records of at most [`RECORD_RAW_BYTES`], each
//! compressed ([`STORED_ZSTD`]; older data dirs' [`STORED_LZ4`] records still read) and keyed by the big-endian seq of its first event, all or
//! none), then makes it durable with [`LogStore::sync`] before answering anybody.
//!
//! - [`SledLog`] is the real store (sled trees `log` and `snapshots`, and the read-only `ids`
//!   of first-release data dirs; `sync` = sled flush followed by `fdatasync` of sled's files,
//!   see [`SledLog::sync`]).
//! - [`testing`] holds an in-memory store that keeps "appended" and "durable" apart and can
//!   crash, a fault-injecting wrapper for any store, and offline tamper helpers.
//! - [`verify_chain`] walks a whole log and names the first bad seq.
//!
//! Architecture Invariant: the records of one append are either all stored or all absent, and
//! nothing is durable until `sync` returned `Ok`.

pub mod follow;
pub mod jetstream;
pub mod lease;
mod salvage;
mod sled_store;
pub mod testing;

pub use salvage::{salvage, SalvageError, Salvaged};

pub use sled_store::{
    make_private, replace_file, write_snapshot_file, write_snapshot_file_with, SledLog,
    PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, RELEASE_WAIT, SLED_CACHE_BYTES,
};

use bursar_schemas::event::{
    decode_record_checked, decode_record_deferred, encode_sealed, Checked, CodecError, Deferred,
    Envelope, Hash32, Sealed,
};
use bursar_schemas::TsMicros;
use std::path::PathBuf;

/// The last stored event: its seq, its hash and its ts.
pub type Head = (u64, Hash32, TsMicros);

/// See [`LogStore::syncer`].
pub type Syncer = Box<dyn FnMut() -> Result<(), LogError> + Send>;

/// Storage of the event log, the idempotency index and snapshots. Used by one writer thread.
pub trait LogStore: Send {
    /// Stage one group commit, conditionally on the head: `sealed` are consecutive events,
    /// each encoded once by the writer, that must continue the store's head (seq dense from
    /// `head + 1`, the first `prev_hash` the head's hash, ts never going back) — a fence, so
    /// that a writer that is not the log's last writer cannot append (cluster mode builds on
    /// it). Their bytes are stored as they are, in records of at most [`RECORD_RAW_BYTES`]
    /// keyed by the big-endian seq of their first event, all or none. Nothing is durable until
    /// [`sync`](LogStore::sync). An empty `sealed` is a no-op; a refused batch leaves the store
    /// unchanged.
    fn append(&mut self, sealed: &[Sealed]) -> Result<(), LogError>;

    /// Append one record stored elsewhere (a follower's copy of a shared log): `bytes` as the
    /// record holds them, `envs` its events, decoded and checked against those bytes (their
    /// hashes) by the caller. They must continue the head, as in [`append`](LogStore::append).
    /// The default seals the events again and appends them; a store that keeps records as
    /// bytes stores these verbatim (no second encoding and compression of each event).
    fn append_record(&mut self, key: u64, bytes: &[u8], envs: &[Envelope]) -> Result<(), LogError> {
        let _ = (key, bytes);
        self.append(&sealed_of(envs)?)
    }

    /// Make everything appended (and every snapshot put) so far durable.
    fn sync(&mut self) -> Result<(), LogError>;

    /// A handle that, each time it is called, makes durable what was appended to this store
    /// before the call, without the store: another thread can sync while this one appends (a
    /// cluster follower syncs its copy off the thread that folds). It keeps the store's files
    /// open: drop it before the store is closed or opened again. `None`: only
    /// [`sync`](LogStore::sync) does.
    fn syncer(&self) -> Option<Syncer> {
        None
    }

    /// Last seq, its hash and its ts (`None` for an empty log). Includes staged records.
    fn head(&self) -> Option<Head>;

    /// Look up an entry of the first release's idempotency index (read only: nothing writes it
    /// now; the index is a projection of the log).
    fn get_id(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError>;

    /// True when the store holds entries of the first release's idempotency index (a data dir
    /// written by it), which writes then consult for ids of that time.
    fn has_ids(&self) -> bool;

    /// Envelopes with `seq >= seq`, in order; a record straddling `seq` yields only its tail.
    /// The iterator stops after the first error it yields.
    fn read_from(
        &self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<Envelope, LogError>> + Send + '_> {
        Box::new(RecordEnvelopes::new(self.read_records_from(seq), seq))
    }

    /// The stored records from the one holding `seq` on, in order, each under its first seq
    /// and as stored (compressed): [`read_from`](LogStore::read_from) decodes and checks them
    /// (`RecordEnvelopes`); recovery decodes them on two threads (`ChainCheck`).
    fn read_records_from(&self, seq: u64) -> StoredRecords<'_>;

    /// Store a snapshot taken after event `seq` (durable at the next `sync`); only the newest
    /// [`SNAPSHOTS_KEPT`] are kept.
    fn put_snapshot(&mut self, seq: u64, bytes: &[u8]) -> Result<(), LogError>;

    /// The newest snapshot and the seq it was taken at.
    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, LogError>;

    /// The directory this store keeps snapshots in as files, when it does: the snapshot
    /// thread then writes them with [`write_snapshot_file`] without holding the store (a
    /// snapshot of tens of MiB synced under the store's lock would stall the writer).
    fn snapshot_dir(&self) -> Option<PathBuf> {
        None
    }

    /// Note that every event up to `seq` (whose hash is `hash`) is durable, outside the log
    /// itself, so that a store that later loses acknowledged events (a file cut short, which
    /// sled takes for a crash and silently recovers to an older state) is found out at start:
    /// see [`check_durable_mark`]. Called after a snapshot; an error is only logged.
    fn mark_durable(&mut self, seq: u64, hash: Hash32) -> Result<(), LogError> {
        let _ = (seq, hash);
        Ok(())
    }

    /// The last [`mark_durable`](LogStore::mark_durable) mark, if any (and readable).
    fn durable_mark(&self) -> Option<(u64, Hash32)> {
        None
    }

    /// A check, to run on any thread, that every stored record holding events before `before`
    /// can still be read, without decoding it: the store's own checksums (sled's CRC of every
    /// page it reads) run over the part of the log a snapshot covers, which recovery does not
    /// fold. Returns how many records were read, or [`LogError::Corrupt`] naming the first seq
    /// that cannot be read. A store that keeps no checksums of its own reads nothing.
    fn readability_check(
        &self,
        before: u64,
    ) -> Box<dyn FnOnce() -> Result<u64, LogError> + Send + '_> {
        let _ = before;
        Box::new(|| Ok(0))
    }
}

/// sled's error as a sentence: its corruption error without the empty backtrace it prints.
pub(crate) fn sled_text(e: &sled::Error) -> String {
    match e {
        sled::Error::Corruption { at: Some(at), .. } => {
            format!("a checksum does not match at {at:?} in the data file")
        }
        sled::Error::Corruption { at: None, .. } => {
            "a checksum does not match in the data file".to_string()
        }
        other => other.to_string(),
    }
}

/// How many snapshots a store keeps.
pub const SNAPSHOTS_KEPT: usize = 2;

/// Errors of a log store.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another process (or another open store in this one) holds the data dir.
    #[error("data dir {} is locked: another bursard is already using it", dir.display())]
    Locked {
        /// The data dir.
        dir: PathBuf,
    },
    /// sled could not open the data dir.
    #[error("cannot open the log in {}: {}", dir.display(), sled_text(source))]
    Open {
        /// The data dir.
        dir: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// sled found its data file damaged while opening the store.
    #[error(
        "the store file {} is damaged ({}): restore the data dir from a backup, or copy what \
         can still be read with `bursar salvage --data-dir DIR --to NEW_DIR`",
        file.display(),
        sled_text(source)
    )]
    Damaged {
        /// The damaged file (`<data dir>/db`).
        file: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// A sled operation failed.
    #[error("log storage failed during {op}: {}", sled_text(source))]
    Storage {
        /// What was being done.
        op: &'static str,
        /// sled's error.
        source: sled::Error,
    },
    /// A file operation failed (e.g. `fdatasync`).
    #[error("{op} failed on {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A stored record is unreadable or inconsistent.
    #[error("log corrupt at seq {seq}: {reason}")]
    Corrupt {
        /// The seq (record key or event) where the problem is.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The events read do not form a chain (every reader of the log checks it as it goes).
    #[error("log chain broken at seq {seq}: {0}", seq = .0.seq())]
    Chain(ChainBreak),
    /// Encoding a record failed.
    #[error("cannot encode record: {0}")]
    Encode(#[source] CodecError),
    /// An appended batch does not continue the log.
    #[error("append refused at seq {seq}: {reason}")]
    Refused {
        /// The offending envelope's seq.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// No stored event has this seq (tamper helpers).
    #[error("no stored event with seq {seq}")]
    NotFound {
        /// The seq asked for.
        seq: u64,
    },
    /// The shared log (cluster mode's JetStream stream) could not be reached, or did not
    /// store a record on a quorum in time.
    #[error("shared log: cannot {op}: {reason}")]
    Shared {
        /// What was being done.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A fault injected by [`testing::FaultyLog`].
    #[error("injected fault: {0}")]
    Injected(&'static str),
    /// The in-memory store was crashed by [`testing::MemDisk::crash`].
    #[error("the store was crashed; reopen it")]
    Crashed,
}

/// How the events read from a log fail to form its chain. Every variant names the bad seq.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// The event at `seq` is not the one expected next (a gap, a reordering or a duplicate).
    #[error("expected seq {expected}, found seq {seq} (missing or out-of-order events)")]
    Gap {
        /// The seq found.
        seq: u64,
        /// The seq that should have been there.
        expected: u64,
    },
    /// `prev_hash` of `seq` is not the hash of the event before it.
    #[error("prev_hash does not match the hash of the event before it")]
    PrevHash {
        /// The bad seq.
        seq: u64,
    },
    /// The stored hash of `seq` is not the hash of its stored bytes (the event was altered).
    #[error("stored hash does not match its contents")]
    Hash {
        /// The bad seq.
        seq: u64,
    },
    /// `ts` went backwards.
    #[error("ts {ts} is before the previous event's ts {prev_ts}")]
    TsBackwards {
        /// The bad seq.
        seq: u64,
        /// Its ts.
        ts: TsMicros,
        /// The ts before it.
        prev_ts: TsMicros,
    },
}

impl ChainBreak {
    /// The bad seq.
    pub fn seq(&self) -> u64 {
        match self {
            ChainBreak::Gap { seq, .. }
            | ChainBreak::PrevHash { seq }
            | ChainBreak::Hash { seq }
            | ChainBreak::TsBackwards { seq, .. } => *seq,
        }
    }

    /// Check that `next` (whose bytes hash to `content_hash`) follows `prev` (seq, hash, ts;
    /// `None` at the start of the log).
    pub fn check(prev: Option<Head>, next: &Checked) -> Result<(), ChainBreak> {
        Self::check_hashed(prev, &next.env, next.content_hash)
    }

    /// [`check`](Self::check) of an event and the hash of its bytes as stored.
    pub fn check_hashed(
        prev: Option<Head>,
        env: &Envelope,
        content_hash: Hash32,
    ) -> Result<(), ChainBreak> {
        let (expected, prev_hash) = match prev {
            Some((seq, hash, _)) => (seq.saturating_add(1), hash),
            None => (1, Hash32::default()),
        };
        if env.seq != expected {
            return Err(ChainBreak::Gap {
                seq: env.seq,
                expected,
            });
        }
        if env.prev_hash != prev_hash {
            return Err(ChainBreak::PrevHash { seq: env.seq });
        }
        if content_hash != env.hash {
            return Err(ChainBreak::Hash { seq: env.seq });
        }
        if let Some((_, _, prev_ts)) = prev {
            if env.ts < prev_ts {
                return Err(ChainBreak::TsBackwards {
                    seq: env.seq,
                    ts: env.ts,
                    prev_ts,
                });
            }
        }
        Ok(())
    }
}

/// Why [`verify_chain`] rejected a log. Every variant names the first bad seq.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The event at `seq` is not the one expected next (a gap, a reordering or a duplicate).
    #[error("seq {seq}: expected seq {expected} (missing or out-of-order events)")]
    Gap {
        /// The seq found.
        seq: u64,
        /// The seq that should have been there.
        expected: u64,
    },
    /// `prev_hash` of `seq` is not the hash of the event before it.
    #[error("seq {seq}: prev_hash does not match the hash of seq {}", seq.saturating_sub(1))]
    PrevHash {
        /// The bad seq.
        seq: u64,
    },
    /// The stored hash of `seq` does not recompute (the event was altered).
    #[error("seq {seq}: stored hash does not match its contents")]
    Hash {
        /// The bad seq.
        seq: u64,
    },
    /// `ts` went backwards.
    #[error("seq {seq}: ts {ts} is before the previous event's ts {prev_ts}")]
    TsBackwards {
        /// The bad seq.
        seq: u64,
        /// Its ts.
        ts: TsMicros,
        /// The ts before it.
        prev_ts: TsMicros,
    },
    /// The log could not be read at `seq`.
    #[error("seq {seq}: unreadable: {source}")]
    Unreadable {
        /// The seq where reading failed (the next expected seq when the store did not say).
        seq: u64,
        /// The store's error.
        source: LogError,
    },
}

impl VerifyError {
    /// The first bad seq.
    pub fn seq(&self) -> u64 {
        match self {
            VerifyError::Gap { seq, .. }
            | VerifyError::PrevHash { seq }
            | VerifyError::Hash { seq }
            | VerifyError::TsBackwards { seq, .. }
            | VerifyError::Unreadable { seq, .. } => *seq,
        }
    }
}

/// Walk the whole log: seq dense from 1, each `prev_hash` equal to the previous `hash` (zeros
/// for seq 1), each `hash` recomputes, ts non-decreasing. Returns the number of events and the
/// head hash (zeros for an empty log).
pub fn verify_chain(store: &dyn LogStore) -> Result<(u64, Hash32), VerifyError> {
    verify_chain_to(store, u64::MAX)
}

/// [`verify_chain`] of the events up to seq `last` only: a running daemon verifies what is
/// durable, not a batch whose sync is in progress or failed (SPEC §7: reads keep working
/// while writes fail).
pub fn verify_chain_to(store: &dyn LogStore, last: u64) -> Result<(u64, Hash32), VerifyError> {
    let mut head = None;
    verify_events(store.read_from(0), &mut head, last)?;
    Ok(head.map_or((0, Hash32::default()), |h| (h.0, h.1)))
}

/// [`verify_chain_to`] on a store that a running daemon's writer appends to: `lock` gives the
/// store only to copy out the next [`VERIFY_CHUNK_RECORDS`] stored records (sled hands out
/// shared buffers: no bytes are copied), which are decoded and checked with the store
/// unlocked, so that no write waits for the log to be walked (a hostile client's audit,
/// 2026-12-07: one `verify`, which any uid may send, held every write for the whole walk).
pub fn verify_chain_in_chunks<G>(
    lock: impl Fn() -> G,
    last: u64,
) -> Result<(u64, Hash32), VerifyError>
where
    G: std::ops::Deref<Target = Box<dyn LogStore>>,
{
    let mut head: Option<Head> = None;
    loop {
        let from = head.map_or(0, |h| h.0.saturating_add(1));
        let records: Vec<_> = lock()
            .read_records_from(from)
            .take(VERIFY_CHUNK_RECORDS)
            .collect();
        let whole_chunk = records.len() == VERIFY_CHUNK_RECORDS;
        let more = verify_events(
            RecordEnvelopes::new(records.into_iter(), from),
            &mut head,
            last,
        )?;
        if !more || !whole_chunk {
            break;
        }
    }
    Ok(head.map_or((0, Hash32::default()), |h| (h.0, h.1)))
}

/// Stored records a running daemon's `verify` copies out per hold of the store.
pub const VERIFY_CHUNK_RECORDS: usize = 64;

/// Check `events` (read after `head`, the last event checked; `None` before the first), none
/// past `last`, each against the one before it (the first against `head`): whether the log
/// may go on past them.
fn verify_events(
    events: impl Iterator<Item = Result<Envelope, LogError>>,
    head: &mut Option<Head>,
    last: u64,
) -> Result<bool, VerifyError> {
    // The reader checks each event's hash against the hash of its bytes as stored (nothing is
    // encoded again), and the chain within what it reads; each event is checked here against
    // the one before it too, so that chunks read apart still form one chain.
    for item in events {
        // Nothing after `last` is read: a batch not yet durable cannot fail this.
        if head.is_some_and(|h| h.0 >= last) {
            return Ok(false);
        }
        let env = item.map_err(|source| match source {
            LogError::Chain(b) => VerifyError::from(b),
            source => VerifyError::Unreadable {
                seq: match &source {
                    LogError::Corrupt { seq, .. } => *seq,
                    _ => head.map_or(1, |h| h.0.saturating_add(1)),
                },
                source,
            },
        })?;
        ChainBreak::check_hashed(*head, &env, env.hash)?;
        *head = Some((env.seq, env.hash, env.ts));
    }
    Ok(!head.is_some_and(|h| h.0 >= last))
}

/// Check the store against its durable mark (see [`LogStore::mark_durable`]): the log must
/// hold the marked event with the marked hash. [`LogError::Corrupt`] names the first seq the
/// store lost (or the marked one, when it differs).
pub fn check_durable_mark(store: &dyn LogStore) -> Result<(), LogError> {
    let Some((seq, hash)) = store.durable_mark() else {
        return Ok(());
    };
    let head = store.head().map_or(0, |h| h.0);
    if head < seq {
        return Err(LogError::Corrupt {
            seq: head + 1,
            reason: format!(
                "the log ends at seq {head}, but events up to seq {seq} were durable (the \
                 store's durable mark): the store lost them (a data file cut short or restored \
                 in part)"
            ),
        });
    }
    match store.read_from(seq).next() {
        Some(Ok(env)) if env.seq == seq && env.hash == hash => Ok(()),
        Some(Err(e)) => Err(e),
        _ => Err(LogError::Corrupt {
            seq,
            reason: "the log's event differs from the one marked durable (its hash)".into(),
        }),
    }
}

impl From<ChainBreak> for VerifyError {
    fn from(b: ChainBreak) -> Self {
        match b {
            ChainBreak::Gap { seq, expected } => VerifyError::Gap { seq, expected },
            ChainBreak::PrevHash { seq } => VerifyError::PrevHash { seq },
            ChainBreak::Hash { seq } => VerifyError::Hash { seq },
            ChainBreak::TsBackwards { seq, ts, prev_ts } => {
                VerifyError::TsBackwards { seq, ts, prev_ts }
            }
        }
    }
}

// ---- helpers shared by the stores ------------------------------------------------------------

/// Big-endian key of a record.
pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Seq from a record key.
pub(crate) fn key_seq(key: &[u8]) -> Result<u64, LogError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| LogError::Corrupt {
        seq: 0,
        reason: format!("log key of {} bytes, expected 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// First byte of a record stored LZ4-compressed (block, size prepended) by earlier builds: its
/// [`encode_record`](bursar_schemas::event::encode_record) bytes. A record's own format byte is
/// 1 or 2 (`RECORD_FORMAT_V1`, `_V2`), so uncompressed records (written before compression, or
/// by the tamper helpers) still read as they are. The hash chain covers the envelopes, not the
/// stored bytes, so compression changes no hash.
pub const STORED_LZ4: u8 = 0xC4;

/// First byte of a record as this build stores it: the record's size (u32 LE), then a zstd
/// frame (level [`ZSTD_LEVEL`]) of its bytes.
pub const STORED_ZSTD: u8 = 0xC5;

/// zstd's level for log records: -1 (fast). Measured on a loaded daemon's records (179,536
/// events, 2026-12-04): 149 bytes per event against LZ4's 173 and level 1's 143, compressing in
/// 0.78 µs per event (LZ4 0.45, level 1 1.45) and decompressing in 0.24 µs (LZ4 0.10, level 1
/// 0.55), with contexts reused per thread.
pub const ZSTD_LEVEL: i32 = -1;

/// Largest decompressed record accepted (the decoder's own limit).
const MAX_RECORD_BYTES: usize = 256 << 20;

thread_local! {
    /// zstd contexts, reused: creating one per record cost 3× the compression itself.
    static ZSTD: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, zstd::bulk::Decompressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `f` with this thread's zstd contexts (`None` when zstd could not make them).
fn with_zstd<T>(
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>, &mut zstd::bulk::Decompressor<'static>) -> T,
) -> Option<T> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?;
            let d = zstd::bulk::Decompressor::new().ok()?;
            *slot = Some((c, d));
        }
        let (c, d) = slot.as_mut()?;
        Some(f(c, d))
    })
}

/// The stored form of `sealed`: their record (the bytes each was sealed with), compressed.
pub(crate) fn pack_sealed(sealed: &[Sealed]) -> Vec<u8> {
    pack_raw(&encode_sealed(sealed))
}

/// The stored value of an encoded record: zstd-compressed behind its tag and size (LZ4 should
/// zstd fail, which only an allocation failure could make it do).
pub(crate) fn pack_raw(raw: &[u8]) -> Vec<u8> {
    let size = u32::try_from(raw.len()).ok();
    let zstd = size.and_then(|size| {
        with_zstd(|c, _| c.compress(raw).ok())
            .flatten()
            .map(|frame| (size, frame))
    });
    match zstd {
        Some((size, frame)) => {
            let mut out = Vec::with_capacity(frame.len() + 5);
            out.push(STORED_ZSTD);
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&frame);
            out
        }
        None => {
            let mut out = Vec::with_capacity(raw.len() / 2 + 16);
            out.push(STORED_LZ4);
            out.extend_from_slice(&lz4_flex::block::compress_prepend_size(raw));
            out
        }
    }
}

/// The bytes [`pack_raw`] packed (a policy forwarded in cluster mode), at most `max`.
pub(crate) fn unpack_raw(bytes: &[u8], max: usize) -> Result<Vec<u8>, String> {
    // The size a packed value claims, refused before anything is allocated for it.
    let claimed = match bytes.split_first() {
        Some((&(STORED_ZSTD | STORED_LZ4), packed)) => packed
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| usize::try_from(u32::from_le_bytes(b)).unwrap_or(usize::MAX)),
        _ => Some(bytes.len()),
    };
    if let Some(c) = claimed.filter(|c| *c > max) {
        return Err(format!("it claims {c} bytes; at most {max} are taken"));
    }
    let out = match unpack_record(0, bytes) {
        Ok(b) => b.into_owned(),
        Err(LogError::Corrupt { reason, .. }) => return Err(reason),
        Err(e) => return Err(e.to_string()),
    };
    if out.len() > max {
        return Err(format!(
            "{} bytes unpacked; at most {max} are taken",
            out.len()
        ));
    }
    Ok(out)
}

/// The record bytes of a stored value (decompressed when it is compressed).
fn unpack_record(key: u64, bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, LogError> {
    let corrupt = |reason: String| LogError::Corrupt { seq: key, reason };
    let size_of = |packed: &[u8]| {
        packed
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .map(|s| usize::try_from(s).unwrap_or(usize::MAX))
            .ok_or_else(|| corrupt("compressed record without its size".into()))
    };
    match bytes.split_first() {
        Some((&STORED_ZSTD, packed)) => {
            let size = size_of(packed)?;
            let frame = packed.get(4..).unwrap_or_default();
            // The frame says its own size too: a damaged size is refused before any allocation.
            let framed = zstd::zstd_safe::get_frame_content_size(frame)
                .ok()
                .flatten();
            if size > MAX_RECORD_BYTES || framed != Some(size as u64) {
                return Err(corrupt(format!(
                    "compressed record claims {size} bytes, its frame {framed:?}"
                )));
            }
            let out = with_zstd(|_, d| d.decompress(frame, size))
                .ok_or_else(|| corrupt("no zstd context".into()))?
                .map_err(|e| corrupt(format!("compressed record does not decompress: {e}")))?;
            if out.len() != size {
                return Err(corrupt(format!(
                    "compressed record gave {} bytes, not {size}",
                    out.len()
                )));
            }
            Ok(std::borrow::Cow::Owned(out))
        }
        Some((&STORED_LZ4, packed)) => {
            let size = size_of(packed)?;
            // LZ4 expands at most ~255 times; a larger claim is damage, not data.
            if size > MAX_RECORD_BYTES || size > packed.len().saturating_mul(255) {
                return Err(corrupt(format!("compressed record claims {size} bytes")));
            }
            lz4_flex::block::decompress_size_prepended(packed)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| corrupt(format!("compressed record does not decompress: {e}")))
        }
        _ => Ok(std::borrow::Cow::Borrowed(bytes)),
    }
}

/// Decode a stored record and check that it is non-empty and stored under its first seq.
pub(crate) fn decode_at(key: u64, bytes: &[u8]) -> Result<Vec<Envelope>, LogError> {
    decode_checked_at(key, bytes).map(|v| v.into_iter().map(|c| c.env).collect())
}

/// [`decode_at`], with the hash of each event's bytes as stored (which must equal its `hash`).
pub(crate) fn decode_checked_at(
    key: u64,
    bytes: &[u8],
) -> Result<Vec<bursar_schemas::event::Checked>, LogError> {
    let raw = unpack_record(key, bytes)?;
    let envs = decode_record_checked(&raw).map_err(|e| LogError::Corrupt {
        seq: key,
        reason: e.to_string(),
    })?;
    stored_under_its_first_seq(key, envs.first().map(|c| &c.env))?;
    Ok(envs)
}

/// [`decode_checked_at`] without hashing (see [`Deferred`]): the record's bytes as decoded
/// (decompressed), which the events' hashes are computed over, and its events.
pub(crate) fn decode_deferred_at(
    key: u64,
    bytes: &[u8],
) -> Result<(Vec<u8>, Vec<Deferred>), LogError> {
    let raw = unpack_record(key, bytes)?.into_owned();
    let envs = decode_record_deferred(&raw).map_err(|e| LogError::Corrupt {
        seq: key,
        reason: e.to_string(),
    })?;
    stored_under_its_first_seq(key, envs.first().map(|d| &d.env))?;
    Ok((raw, envs))
}

/// A record must hold events and be stored under the seq of its first.
fn stored_under_its_first_seq(key: u64, first: Option<&Envelope>) -> Result<(), LogError> {
    match first {
        None => Err(LogError::Corrupt {
            seq: key,
            reason: "record holds no events".into(),
        }),
        Some(first) if first.seq != key => Err(LogError::Corrupt {
            seq: key,
            reason: format!(
                "record stored under seq {key} starts with seq {}",
                first.seq
            ),
        }),
        Some(_) => Ok(()),
    }
}

/// Check that `sealed` continue `head` (dense seq, linked hashes, ts non-decreasing).
pub(crate) fn check_sealed(head: Option<Head>, sealed: &[Sealed]) -> Result<(), LogError> {
    let (mut next, mut prev_hash, mut prev_ts) = match head {
        Some((seq, hash, ts)) => (seq.saturating_add(1), hash, Some(ts)),
        None => (1, Hash32::default(), None),
    };
    for e in sealed {
        if e.seq != next {
            return Err(LogError::Refused {
                seq: e.seq,
                reason: format!("expected seq {next}"),
            });
        }
        if e.prev_hash != prev_hash {
            return Err(LogError::Refused {
                seq: e.seq,
                reason: "prev_hash is not the hash of the event before it".into(),
            });
        }
        if prev_ts.is_some_and(|t| e.ts < t) {
            return Err(LogError::Refused {
                seq: e.seq,
                reason: "ts goes backwards".into(),
            });
        }
        next = next.saturating_add(1);
        prev_hash = e.hash;
        prev_ts = Some(e.ts);
    }
    Ok(())
}

/// The head after `sealed`, when non-empty.
pub(crate) fn head_of_sealed(sealed: &[Sealed]) -> Option<Head> {
    sealed.last().map(|e| (e.seq, e.hash, e.ts))
}

/// Largest record (before compression) a batch is cut into. sled stores a tree node holding
/// more than ~128 KiB as a separate blob file, and a leaf holds up to 16 records: records
/// that stay near 12 KiB raw (4–6 KiB compressed) keep every node of the log inline, so the
/// append path never writes blob files (a 4096-event group commit used to).
pub const RECORD_RAW_BYTES: usize = 12 * 1024;

/// `sealed` cut into consecutive records of at most [`RECORD_RAW_BYTES`] (one event per record
/// at least).
pub(crate) fn records_of(sealed: &[Sealed]) -> impl Iterator<Item = &[Sealed]> {
    let mut rest = sealed;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut size = 0usize;
        let mut n = 0usize;
        for s in rest {
            size += s.bytes.len() + 40;
            if n > 0 && size > RECORD_RAW_BYTES {
                break;
            }
            n += 1;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

/// Seal envelopes again (their bytes re-encoded): for tests and tools that build envelopes;
/// the writer seals each event once.
pub fn sealed_of(envs: &[Envelope]) -> Result<Vec<Sealed>, LogError> {
    envs.iter()
        .map(|e| {
            let mut s = e.to_sealed().map_err(LogError::Encode)?;
            // As given, even when it does not match (tests of tampering).
            s.hash = e.hash;
            s.prev_hash = e.prev_hash;
            Ok(s)
        })
        .collect()
}

/// Check that `envs` continue `head` (dense seq, linked hashes, ts non-decreasing).
pub(crate) fn check_continues(head: Option<Head>, envs: &[Envelope]) -> Result<(), LogError> {
    let (mut next, mut prev_hash, mut prev_ts) = match head {
        Some((seq, hash, ts)) => (seq.saturating_add(1), hash, Some(ts)),
        None => (1, Hash32::default(), None),
    };
    for e in envs {
        if e.seq != next {
            return Err(LogError::Refused {
                seq: e.seq,
                reason: format!("expected seq {next}"),
            });
        }
        if e.prev_hash != prev_hash {
            return Err(LogError::Refused {
                seq: e.seq,
                reason: "prev_hash is not the hash of the event before it".into(),
            });
        }
        if prev_ts.is_some_and(|t| e.ts < t) {
            return Err(LogError::Refused {
                seq: e.seq,
                reason: "ts goes backwards".into(),
            });
        }
        next = next.saturating_add(1);
        prev_hash = e.hash;
        prev_ts = Some(e.ts);
    }
    Ok(())
}

/// The head after `envs`, when non-empty.
pub(crate) fn head_of(envs: &[Envelope]) -> Option<Head> {
    envs.last().map(|e| (e.seq, e.hash, e.ts))
}

/// Validate the last record of a log on open: it decodes, is internally chained with hashes
/// that recompute, and links to the record before it (`prev`, already decoded), or starts the
/// log. Returns the head.
pub(crate) fn check_tail(
    last_key: u64,
    last: &[u8],
    prev: Option<(u64, &[u8])>,
) -> Result<Head, LogError> {
    let checked = decode_checked_at(last_key, last)?;
    let before = match prev {
        Some((k, bytes)) => head_of(&decode_at(k, bytes)?),
        None => None,
    };
    for c in &checked {
        if c.content_hash != c.env.hash {
            return Err(LogError::Corrupt {
                seq: c.env.seq,
                reason: "stored hash does not match its contents".into(),
            });
        }
    }
    let envs: Vec<Envelope> = checked.into_iter().map(|c| c.env).collect();
    check_continues(before, &envs).map_err(|e| match e {
        LogError::Refused { seq, reason } => LogError::Corrupt { seq, reason },
        other => other,
    })?;
    head_of(&envs).ok_or(LogError::Corrupt {
        seq: last_key,
        reason: "record holds no events".into(),
    })
}

/// Stored records, each under its first seq, as [`LogStore::read_records_from`] reads them.
pub type StoredRecords<'a> =
    Box<dyn Iterator<Item = Result<(u64, sled::IVec), LogError>> + Send + 'a>;

/// Turns an iterator of stored records into the envelopes from `from` on, checking the chain as
/// it goes: from the first event of the first record read (the start of the log when `from` is
/// 0 or 1), each event must follow the one before it and its stored hash must be the hash of its
/// bytes as stored (computed while decoding, so the check costs two comparisons). The first
/// break ends the iteration with [`LogError::Chain`].
pub(crate) struct RecordEnvelopes<I> {
    records: I,
    current: std::vec::IntoIter<Checked>,
    chain: ChainCheck,
}

impl<I> RecordEnvelopes<I> {
    pub(crate) fn new(records: I, from: u64) -> Self {
        Self {
            records,
            current: Vec::new().into_iter(),
            chain: ChainCheck::new(from),
        }
    }
}

impl<I, B> Iterator for RecordEnvelopes<I>
where
    I: Iterator<Item = Result<(u64, B), LogError>>,
    B: AsRef<[u8]>,
{
    type Item = Result<Envelope, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.chain.done {
                return None;
            }
            if let Some(c) = self.current.next() {
                match self.chain.admit(c) {
                    Ok(None) => continue,
                    Ok(Some(env)) => return Some(Ok(env)),
                    Err(e) => return Some(Err(e)),
                }
            }
            let decoded = match self.records.next()? {
                Ok((key, bytes)) => decode_checked_at(key, bytes.as_ref()),
                Err(e) => Err(e),
            };
            match decoded {
                Ok(envs) => self.current = envs.into_iter(),
                Err(e) => return Some(Err(self.chain.fail(e))),
            }
        }
    }
}

/// The chain check of [`RecordEnvelopes`], one decoded event at a time (recovery decodes
/// records on two threads and checks the chain in order on one: `writer::recovery`).
pub(crate) struct ChainCheck {
    from: u64,
    /// The last event checked; `None` before the first.
    prev: Option<Head>,
    /// Whether the first event read must be the log's first.
    at_start: bool,
    done: bool,
}

impl ChainCheck {
    /// Check events from the first one read; yield those from `from` on.
    pub(crate) fn new(from: u64) -> Self {
        Self {
            from,
            prev: None,
            at_start: from <= 1,
            done: false,
        }
    }

    /// The next decoded event, in order: `Ok(Some)` to yield, `Ok(None)` before `from`, and
    /// the first break as an error (after which the check is done).
    pub(crate) fn admit(&mut self, c: Checked) -> Result<Option<Envelope>, LogError> {
        Ok(self.check(&c)?.then_some(c.env))
    }

    /// [`admit`](Self::admit) by reference: whether to yield the event.
    pub(crate) fn check(&mut self, c: &Checked) -> Result<bool, LogError> {
        self.check_hashed(&c.env, c.content_hash)
    }

    /// [`check`](Self::check) of an event and the hash of its bytes as stored.
    pub(crate) fn check_hashed(
        &mut self,
        env: &Envelope,
        content_hash: Hash32,
    ) -> Result<bool, LogError> {
        if self.prev.is_some() || self.at_start {
            if let Err(b) = ChainBreak::check_hashed(self.prev, env, content_hash) {
                return Err(self.fail(LogError::Chain(b)));
            }
        } else if content_hash != env.hash {
            return Err(self.fail(LogError::Chain(ChainBreak::Hash { seq: env.seq })));
        }
        self.prev = Some((env.seq, env.hash, env.ts));
        Ok(env.seq >= self.from)
    }

    /// End the check with `e` (a record that could not be read or decoded).
    pub(crate) fn fail(&mut self, e: LogError) -> LogError {
        self.stop();
        e
    }

    /// End the check: nothing is read after an error.
    pub(crate) fn stop(&mut self) {
        self.done = true;
    }
}

#[cfg(test)]
mod verify_tests {
    use super::testing::{write_sample_batches, MemDisk, MemLog};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn a_running_daemons_verify_holds_the_store_only_to_copy_a_chunk_and_finds_the_same_chain() {
        let mut log = MemLog::open(&MemDisk::new()).unwrap();
        let mut sizes = vec![50u64; 199];
        sizes.push(150);
        write_sample_batches(&mut log, &sizes);
        let whole = verify_chain(&log).unwrap();
        assert_eq!(whole.0, 10_100);
        let store: Mutex<Box<dyn LogStore>> = Mutex::new(Box::new(log));
        let holds = AtomicUsize::new(0);
        let lock = || {
            holds.fetch_add(1, Ordering::SeqCst);
            store.lock().unwrap()
        };
        assert_eq!(verify_chain_in_chunks(lock, u64::MAX).unwrap(), whole);
        let records = store.lock().unwrap().read_records_from(0).count();
        assert!(records >= 200, "a record a batch at least: {records}");
        assert_eq!(
            holds.load(Ordering::SeqCst),
            records / VERIFY_CHUNK_RECORDS + 1,
            "one hold of the store per chunk of records (the last one short)"
        );
        // Up to a durable seq only, as verify_chain_to.
        let to = verify_chain_in_chunks(|| store.lock().unwrap(), 4_500).unwrap();
        let guard = store.lock().unwrap();
        assert_eq!(to, verify_chain_to(guard.as_ref(), 4_500).unwrap());
        assert_eq!(to.0, 4_500);
    }
}
