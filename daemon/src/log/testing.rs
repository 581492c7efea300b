//! Test backends and helpers, public so other crates' tests can use them.
//!
//! - [`MemDisk`] + [`MemLog`]: an in-memory store that keeps "appended" apart from "durable"
//!   (only `sync` moves staged records, ids and snapshots to the disk), and can
//!   [`crash`](MemDisk::crash) and be reopened with only the durable part.
//! - [`FaultyLog`] wraps any [`LogStore`] and fails the Nth `sync` or `append` as told through
//!   a shared [`FaultControl`], which a test keeps while a writer thread owns the store.
//! - [`tamper_rewrite`] / [`tamper_delete`] alter a stored sled log offline without fixing
//!   hashes, so that [`verify_chain`](super::verify_chain) can be shown to catch it.

use super::sled_store::open_db;
use super::{
    check_sealed, check_tail, decode_at, head_of_sealed, key_seq, records_of, seq_key, Head,
    LogError, LogStore, SNAPSHOTS_KEPT,
};
use bursar_schemas::event::{
    encode_record, encode_sealed, Actor, Envelope, EventBody, Hash32, ReservationReleased, Sealed,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not hide the state from the others.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a store holds.
#[derive(Clone, Default, Debug)]
struct Tables {
    log: BTreeMap<u64, Vec<u8>>,
    ids: BTreeMap<Vec<u8>, Vec<u8>>,
    snapshots: BTreeMap<u64, Vec<u8>>,
}

/// A staged change.
#[derive(Clone, Debug)]
enum Op {
    Record {
        key: u64,
        bytes: Vec<u8>,
        ids: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Snapshot {
        seq: u64,
        bytes: Vec<u8>,
    },
}

impl Tables {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Record { key, bytes, ids } => {
                self.log.insert(*key, bytes.clone());
                self.ids.extend(ids.iter().cloned());
            }
            Op::Snapshot { seq, bytes } => {
                self.snapshots.insert(*seq, bytes.clone());
                while self.snapshots.len() > SNAPSHOTS_KEPT {
                    self.snapshots.pop_first();
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct DiskState {
    durable: Tables,
    /// Bumped by every open and every crash; a `MemLog` of an older generation is dead.
    generation: u64,
    open: bool,
}

/// The "disk" of [`MemLog`]: what survives a crash. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct MemDisk(Arc<Mutex<DiskState>>);

impl MemDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Crash: everything appended but not synced is lost, the open [`MemLog`] (if any) answers
    /// [`LogError::Crashed`] from then on, and the disk can be opened again.
    pub fn crash(&self) {
        let mut d = lock(&self.0);
        d.generation = d.generation.wrapping_add(1);
        d.open = false;
    }

    /// Last durable seq (0 for none).
    pub fn durable_last_seq(&self) -> u64 {
        let d = lock(&self.0);
        d.durable
            .log
            .last_key_value()
            .and_then(|(k, v)| decode_at(*k, v).ok())
            .and_then(|envs| envs.last().map(|e| e.seq))
            .unwrap_or(0)
    }

    /// Number of durable snapshots.
    pub fn durable_snapshot_count(&self) -> usize {
        lock(&self.0).durable.snapshots.len()
    }
}

/// An in-memory [`LogStore`] on a [`MemDisk`]. One may be open per disk at a time.
#[derive(Debug)]
pub struct MemLog {
    disk: MemDisk,
    generation: u64,
    /// Durable plus staged.
    view: Tables,
    /// Staged since the last sync.
    pending: Vec<Op>,
    head: Option<Head>,
}

impl MemLog {
    /// Open the durable state of `disk`, validating the last record like [`super::SledLog`].
    /// [`LogError::Locked`] when another `MemLog` has it open.
    pub fn open(disk: &MemDisk) -> Result<MemLog, LogError> {
        let mut d = lock(&disk.0);
        if d.open {
            return Err(LogError::Locked {
                dir: PathBuf::from("<memory>"),
            });
        }
        let view = d.durable.clone();
        let mut records = view.log.iter().rev();
        let head = match records.next() {
            None => None,
            Some((k, v)) => {
                let prev = records.next().map(|(pk, pv)| (*pk, pv.as_slice()));
                Some(check_tail(*k, v, prev)?)
            }
        };
        d.generation = d.generation.wrapping_add(1);
        d.open = true;
        Ok(MemLog {
            disk: disk.clone(),
            generation: d.generation,
            view,
            pending: Vec::new(),
            head,
        })
    }

    fn alive(&self) -> Result<(), LogError> {
        if lock(&self.disk.0).generation == self.generation {
            Ok(())
        } else {
            Err(LogError::Crashed)
        }
    }

    fn stage(&mut self, op: Op) {
        self.view.apply(&op);
        self.pending.push(op);
    }
}

impl Drop for MemLog {
    fn drop(&mut self) {
        let mut d = lock(&self.disk.0);
        if d.generation == self.generation {
            d.open = false;
        }
    }
}

impl LogStore for MemLog {
    fn append(&mut self, sealed: &[Sealed]) -> Result<(), LogError> {
        self.alive()?;
        if sealed.is_empty() {
            return Ok(());
        }
        check_sealed(self.head, sealed)?;
        for record in records_of(sealed) {
            if let Some(first) = record.first() {
                self.stage(Op::Record {
                    key: first.seq,
                    bytes: encode_sealed(record),
                    ids: Vec::new(),
                });
            }
        }
        self.head = head_of_sealed(sealed);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let mut d = lock(&self.disk.0);
        if d.generation != self.generation {
            return Err(LogError::Crashed);
        }
        for op in self.pending.drain(..) {
            d.durable.apply(&op);
        }
        Ok(())
    }

    fn head(&self) -> Option<Head> {
        self.head
    }

    fn has_ids(&self) -> bool {
        !self.view.ids.is_empty()
    }

    fn get_id(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        self.alive()?;
        Ok(self.view.ids.get(key).cloned())
    }

    fn read_records_from(&self, seq: u64) -> super::StoredRecords<'_> {
        if let Err(e) = self.alive() {
            return Box::new(std::iter::once(Err(e)));
        }
        let start = self
            .view
            .log
            .range(..=seq)
            .next_back()
            .map_or(0, |(k, _)| *k);
        Box::new(
            self.view
                .log
                .range(start..)
                .map(|(k, v)| Ok((*k, sled::IVec::from(v.as_slice())))),
        )
    }

    fn put_snapshot(&mut self, seq: u64, bytes: &[u8]) -> Result<(), LogError> {
        self.alive()?;
        self.stage(Op::Snapshot {
            seq,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        self.alive()?;
        Ok(self
            .view
            .snapshots
            .last_key_value()
            .map(|(k, v)| (*k, v.clone())))
    }
}

/// What a failing `sync` did before reporting its error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncFault {
    /// Nothing was made durable (the inner store is not synced).
    #[default]
    Lost,
    /// The inner store was synced, yet an error is reported: the data may be there after a
    /// restart even though nobody was told it was written.
    PersistedAnyway,
}

#[derive(Debug, Default)]
struct Faults {
    syncs: u64,
    appends: u64,
    fail_sync_number: Option<u64>,
    fail_all_syncs: bool,
    fail_append_number: Option<u64>,
    fail_all_appends: bool,
    sync_fault: SyncFault,
}

/// Shared switches of a [`FaultyLog`]. Clones share them; counts run over the control's life.
#[derive(Clone, Debug, Default)]
pub struct FaultControl(Arc<Mutex<Faults>>);

impl FaultControl {
    /// No faults.
    pub fn new() -> Self {
        Self::default()
    }
    /// Fail the `n`th call to `sync` (1-based, counted over this control's life).
    pub fn fail_sync_number(&self, n: u64) {
        lock(&self.0).fail_sync_number = Some(n);
    }
    /// Fail every `sync` from now on (`false`: stop).
    pub fn fail_all_syncs(&self, on: bool) {
        lock(&self.0).fail_all_syncs = on;
    }
    /// What a failing sync does to the inner store.
    pub fn set_sync_fault(&self, fault: SyncFault) {
        lock(&self.0).sync_fault = fault;
    }
    /// Fail the `n`th call to `append` (1-based). A failed append stages nothing.
    pub fn fail_append_number(&self, n: u64) {
        lock(&self.0).fail_append_number = Some(n);
    }
    /// Fail every `append` from now on (`false`: stop).
    pub fn fail_all_appends(&self, on: bool) {
        lock(&self.0).fail_all_appends = on;
    }
    /// Calls to `sync` so far.
    pub fn syncs(&self) -> u64 {
        lock(&self.0).syncs
    }
    /// Calls to `append` so far.
    pub fn appends(&self) -> u64 {
        lock(&self.0).appends
    }
}

/// A [`LogStore`] that fails when its [`FaultControl`] says so, and otherwise forwards.
#[derive(Debug)]
pub struct FaultyLog<L> {
    inner: L,
    control: FaultControl,
}

impl<L: LogStore> FaultyLog<L> {
    /// Wrap `inner`.
    pub fn new(inner: L, control: FaultControl) -> Self {
        Self { inner, control }
    }
    /// The wrapped store.
    pub fn inner(&self) -> &L {
        &self.inner
    }
    /// Unwrap.
    pub fn into_inner(self) -> L {
        self.inner
    }
}

impl<L: LogStore> LogStore for FaultyLog<L> {
    fn append(&mut self, sealed: &[Sealed]) -> Result<(), LogError> {
        let fail = {
            let mut f = lock(&self.control.0);
            f.appends = f.appends.saturating_add(1);
            f.fail_all_appends || f.fail_append_number == Some(f.appends)
        };
        if fail {
            return Err(LogError::Injected("append"));
        }
        self.inner.append(sealed)
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let (fail, fault) = {
            let mut f = lock(&self.control.0);
            f.syncs = f.syncs.saturating_add(1);
            (
                f.fail_all_syncs || f.fail_sync_number == Some(f.syncs),
                f.sync_fault,
            )
        };
        if !fail {
            return self.inner.sync();
        }
        if fault == SyncFault::PersistedAnyway {
            self.inner.sync()?;
        }
        Err(LogError::Injected("sync"))
    }

    fn head(&self) -> Option<Head> {
        self.inner.head()
    }

    fn has_ids(&self) -> bool {
        self.inner.has_ids()
    }

    fn get_id(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        self.inner.get_id(key)
    }

    fn read_records_from(&self, seq: u64) -> super::StoredRecords<'_> {
        self.inner.read_records_from(seq)
    }

    fn put_snapshot(&mut self, seq: u64, bytes: &[u8]) -> Result<(), LogError> {
        self.inner.put_snapshot(seq, bytes)
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        self.inner.latest_snapshot()
    }

    fn snapshot_dir(&self) -> Option<std::path::PathBuf> {
        self.inner.snapshot_dir()
    }

    fn mark_durable(&mut self, seq: u64, hash: Hash32) -> Result<(), LogError> {
        self.inner.mark_durable(seq, hash)
    }

    fn durable_mark(&self) -> Option<(u64, Hash32)> {
        self.inner.durable_mark()
    }

    fn readability_check(
        &self,
        before: u64,
    ) -> Box<dyn FnOnce() -> Result<u64, LogError> + Send + '_> {
        self.inner.readability_check(before)
    }
}

/// Offline (the dir must not be open): run `f` on the raw sled database of a data dir (trees
/// `log`, `ids`, `snapshots`), then flush it. For tests that must reach under [`super::SledLog`],
/// e.g. to swap two records or write garbage.
pub fn with_raw_db<T>(data_dir: &Path, f: impl FnOnce(&sled::Db) -> T) -> Result<T, LogError> {
    let (db, claim) = open_db(data_dir)?;
    let out = f(&db);
    let flushed = db.flush();
    drop(db);
    drop(claim);
    flushed.map_err(|source| LogError::Storage {
        op: "flush raw db",
        source,
    })?;
    Ok(out)
}

fn storage(source: sled::Error) -> LogError {
    LogError::Storage {
        op: "tamper",
        source,
    }
}

/// Find the record holding `seq` in the raw `log` tree, change its envelopes with `f` and store
/// them again under the seq of the (new) first one, WITHOUT fixing hashes.
fn tamper(
    data_dir: &Path,
    seq: u64,
    f: impl FnOnce(&mut Vec<Envelope>, usize),
) -> Result<(), LogError> {
    with_raw_db(data_dir, |db| {
        let log = db.open_tree("log").map_err(storage)?;
        let (k, v) = log
            .range(..=seq_key(seq))
            .next_back()
            .transpose()
            .map_err(storage)?
            .ok_or(LogError::NotFound { seq })?;
        let key = key_seq(&k)?;
        let mut envs = decode_at(key, &v)?;
        let index = envs
            .iter()
            .position(|e| e.seq == seq)
            .ok_or(LogError::NotFound { seq })?;
        f(&mut envs, index);
        let mut batch = sled::Batch::default();
        batch.remove(&seq_key(key)[..]);
        if let Some(first) = envs.first() {
            let bytes = encode_record(&envs).map_err(LogError::Encode)?;
            batch.insert(&seq_key(first.seq)[..], bytes);
        }
        log.apply_batch(batch).map_err(storage)
    })?
}

/// Offline (the dir must not be open): change the stored event `seq` with `f` and re-encode
/// its record WITHOUT fixing any hash. The record stays under the seq of its first event.
pub fn tamper_rewrite(
    data_dir: &Path,
    seq: u64,
    f: impl FnOnce(&mut Envelope),
) -> Result<(), LogError> {
    tamper(data_dir, seq, |envs, index| {
        if let Some(env) = envs.get_mut(index) {
            f(env);
        }
    })
}

/// Offline (the dir must not be open): remove the stored event `seq` from its record WITHOUT
/// fixing any hash; the rest of the record is re-keyed by its new first seq, an emptied record
/// is removed.
pub fn tamper_delete(data_dir: &Path, seq: u64) -> Result<(), LogError> {
    tamper(data_dir, seq, |envs, index| {
        envs.remove(index);
    })
}

// ---- sample data shared by the log tests and the `log_child` example ----------------------

/// A sample event body.
pub fn sample_body(seq: u64) -> EventBody {
    EventBody::ReservationReleased(ReservationReleased {
        reservation_id: format!("res-{seq}"),
        reason: "cancelled".into(),
        payload_digest: [0; 16],
    })
}

/// `n` sealed envelopes continuing `head`.
#[allow(clippy::expect_used)]
pub fn sample_batch(head: Option<Head>, n: u64) -> Vec<Envelope> {
    let (mut seq, mut prev, mut ts) = head.unwrap_or((0, Hash32::default(), 1_000_000));
    (0..n)
        .map(|_| {
            seq += 1;
            ts += 7;
            let actor = Actor {
                uid: 1000,
                gid: 1000,
                pid: 42,
            };
            let e = Envelope::seal(seq, ts, actor, prev, sample_body(seq)).expect("sample data");
            prev = e.hash;
            e
        })
        .collect()
}

/// Append one synced batch per size; returns every envelope.
#[allow(clippy::expect_used)]
pub fn write_sample_batches(store: &mut dyn LogStore, sizes: &[u64]) -> Vec<Envelope> {
    let mut all = Vec::new();
    for &n in sizes {
        let envs = sample_batch(store.head(), n);
        let sealed = super::sealed_of(&envs).expect("sample data");
        store.append(&sealed).expect("sample data");
        store.sync().expect("sample data");
        all.extend(envs);
    }
    all
}
