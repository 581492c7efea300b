//! [`SledLog`]: the log on sled 0.34 (trees `log`, `ids`; snapshots as files beside it, and the
//! `snapshots` tree of earlier releases read), made durable by
//! sled's flush followed by our own `fdatasync` of sled's files.

use super::{
    check_sealed, check_tail, decode_checked_at, head_of_sealed, key_seq, pack_sealed, records_of,
    seq_key, Head, LogError, LogStore, StoredRecords, SNAPSHOTS_KEPT,
};
use bursar_schemas::event::{Envelope, Hash32, Sealed};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// sled's data file inside the data dir.
const DATA_FILE: &str = "db";
/// sled's config file inside the data dir.
const CONF_FILE: &str = "conf";
/// sled writes large pages as separate files here (and never syncs them).
const BLOBS_DIR: &str = "blobs";
/// The durable mark's file in the data dir (see [`LogStore::mark_durable`]): one line,
/// `<seq> <hash hex>`, replaced atomically.
const DURABLE_MARK_FILE: &str = "durable-head";
/// Records kept in memory after they are appended (a few MiB: a record holds one group commit,
/// ~3 KiB compressed under `bursar-bench record`). sled splits an overfull node when a read
/// walks through it, which writes; once the disk is full those splits fail, and with them
/// every read of the newest nodes: up to 470 events of the tail were unreadable after 16
/// writers filled a 4 MiB tmpfs. Reads then take these records instead (SPEC §7: reads keep
/// working while writes fail, and export everything that was answered).
const RECENT_RECORDS: usize = 1024;
/// Bytes of a file written between two syncs (see [`replace_file`]).
const SNAPSHOT_SYNC_CHUNK: usize = 1 << 20;

/// The event log stored with sled in one data dir (which it locks against other processes).
pub struct SledLog {
    dir: PathBuf,
    db: sled::Db,
    log: sled::Tree,
    ids: sled::Tree,
    snapshots: sled::Tree,
    head: Option<Head>,
    /// sled's data file, opened by us for `fdatasync`.
    data_file: File,
    /// Blob files already synced (pruned to the ones still present at each sync).
    synced_blobs: HashSet<OsString>,
    /// The last [`RECENT_RECORDS`] records appended, as stored: reads fall back on them when
    /// sled fails to read the newest nodes (see [`SledLog::read_from`]).
    recent: VecDeque<(u64, sled::IVec)>,
    /// Dropped after the sled handles above.
    _claim: DirClaim,
}

impl std::fmt::Debug for SledLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledLog")
            .field("dir", &self.dir)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

fn storage(op: &'static str) -> impl Fn(sled::Error) -> LogError {
    move |source| LogError::Storage { op, source }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How long an open waits for a data-dir lock that this process itself held until a moment
/// ago. sled releases its `flock` only when its last internal reference goes, and some of those
/// are dropped later by its epoch-based reclamation (measured: tens of ms under load), so
/// "close, then reopen" in one process would otherwise fail now and then. A dir held by a live
/// store of this process, or by another process, is refused at once.
pub const RELEASE_WAIT: Duration = Duration::from_secs(5);
const RELEASE_POLL: Duration = Duration::from_millis(5);

/// Data dirs opened by this process: `true` while open, `false` once closed.
static OPENED_DIRS: Mutex<BTreeMap<PathBuf, bool>> = Mutex::new(BTreeMap::new());

fn opened_dirs() -> MutexGuard<'static, BTreeMap<PathBuf, bool>> {
    OPENED_DIRS.lock().unwrap_or_else(|p| p.into_inner())
}

fn canonical(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

/// Marks a data dir as open by this process until dropped. Must be dropped after the sled
/// handles (declare it after them).
#[derive(Debug)]
pub(crate) struct DirClaim(PathBuf);

impl Drop for DirClaim {
    fn drop(&mut self) {
        opened_dirs().insert(std::mem::take(&mut self.0), false);
    }
}

/// sled's page cache. Its default (1 GiB) let a daemon's RSS grow by ~4 MiB/s with the log
/// under load (`bursar-bench churn`: 256 → 483 MiB over a million records). The log is
/// appended at its end and read back rarely (tail, export, replay, start-up, a duplicate's
/// original event), each read a scan or one record: what a cache keeps is the end the writer
/// appends to and the newest records. 4 MiB (64 before 2026-12-04): `record` 3.26–3.67× Redis
/// against 3.31–3.50× at 64 MiB in the same session, `reserve-commit` 3.49× against
/// 3.43–3.51×; a running daemon after 200,000 records held 16.5 MB of the log's records at
/// 64 MiB (heaptrack): ~65 bytes a bucket, about what a running daemon then held over a
/// restarted one three seconds after the writes (benches/README.md, "sled's cache").
pub const SLED_CACHE_BYTES: u64 = 4 << 20;

/// Open sled at `dir`, telling a held lock apart from other failures (see [`RELEASE_WAIT`]).
pub(crate) fn open_db(dir: &Path) -> Result<(sled::Db, DirClaim), LogError> {
    let started = Instant::now();
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
        {
            Ok(db) => {
                let key = canonical(dir);
                opened_dirs().insert(key.clone(), true);
                return Ok((db, DirClaim(key)));
            }
            Err(source) if is_lock_error(&source) => {
                let ours_closed = opened_dirs().get(&canonical(dir)) == Some(&false);
                if !ours_closed || started.elapsed() >= RELEASE_WAIT {
                    return Err(LogError::Locked {
                        dir: dir.to_path_buf(),
                    });
                }
                std::thread::sleep(RELEASE_POLL);
            }
            Err(source @ sled::Error::Corruption { .. }) => {
                return Err(LogError::Damaged {
                    file: dir.join(DATA_FILE),
                    source,
                })
            }
            Err(source) => {
                return Err(LogError::Open {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// sled 0.34 reports a held `flock` on `<dir>/db` as an `Other` I/O error with this text.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(e)
        if e.kind() == ErrorKind::Other && e.to_string().contains("could not acquire lock"))
}

/// Mode of the data dir and of every directory in it (SPEC §7).
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file in the data dir.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Make the data dir and everything in it private to its owner (SPEC §7): a directory or file
/// that its group or others may use is set to [`PRIVATE_DIR_MODE`] / [`PRIVATE_FILE_MODE`], and
/// each change is logged. Symlinks are left alone. A mode that cannot be changed is logged too;
/// the dir is still used.
pub fn make_private(dir: &Path) {
    tighten(dir, PRIVATE_DIR_MODE, 0);
}

fn tighten(path: &Path, dir_mode: u32, depth: u32) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = path.symlink_metadata() else {
        return;
    };
    let (is_dir, want) = if meta.is_dir() {
        (true, dir_mode)
    } else if meta.is_file() {
        (false, PRIVATE_FILE_MODE)
    } else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)) {
            Ok(()) => tracing::warn!(
                "{} was accessible to other users (mode {mode:04o}); tightened to {want:04o}",
                path.display()
            ),
            Err(e) => tracing::warn!(
                "{} is accessible to other users (mode {mode:04o}) and cannot be tightened: {e}",
                path.display()
            ),
        }
    }
    // sled nests at most one level (`blobs/`); a bound keeps a hostile tree from recursing far.
    if is_dir && depth < 2 {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                tighten(&entry.path(), dir_mode, depth + 1);
            }
        }
    }
}

/// `fsync` a directory so the entries created in it survive a machine crash.
fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

impl SledLog {
    /// The stored records from the one holding `seq` on (the newest from memory when sled
    /// cannot read them), for [`LogStore::read_from`] and [`LogStore::read_records_from`].
    fn records_holding(&self, seq: u64) -> StoredRecords<'_> {
        // The record holding `seq` is the last one keyed at or before it.
        let start = match self.log.range(..=seq_key(seq)).next_back() {
            None => None,
            Some(Ok((k, _))) => Some(k),
            Some(Err(e @ sled::Error::Io(_))) => {
                // The holder among the kept records, when the first of them is at or before
                // `seq` (kept records are consecutive: then the last such one holds it).
                let holder = self
                    .recent
                    .iter()
                    .rposition(|(k, _)| *k <= seq)
                    .filter(|_| self.recent.front().is_some_and(|(k, _)| *k <= seq));
                let Some(i) = holder else {
                    return Box::new(std::iter::once(Err(storage("read log")(e))));
                };
                tracing::warn!(
                    "sled cannot read the log's newest records ({}); reading them from memory",
                    super::sled_text(&e)
                );
                return Box::new(self.recent.iter().skip(i).map(|(k, v)| Ok((*k, v.clone()))));
            }
            // A checksum that fails is damage, never read around.
            Some(Err(e)) => return Box::new(std::iter::once(Err(storage("read log")(e)))),
        };
        let first = match &start {
            Some(k) => key_seq(k).ok(),
            None => Some(1),
        };
        let records = match start {
            Some(k) => self.log.range(k..),
            None => self.log.iter(),
        };
        Box::new(WithRecent {
            sled: records,
            recent: &self.recent,
            last: None,
            start: first,
            from_recent: None,
        })
    }

    /// Open (or create) the log in `data_dir`. Fails with [`LogError::Locked`] when another
    /// process holds the dir (or a live store in this one; a store of this process closed a moment
    /// ago is waited for, up to [`RELEASE_WAIT`]), and with [`LogError::Corrupt`] when the last record does not
    /// decode, is not stored under its first seq, or does not chain (hashes recompute and link
    /// to the record before it).
    pub fn open(data_dir: &Path) -> Result<SledLog, LogError> {
        let created = !data_dir.exists();
        if !created {
            make_private(data_dir);
        }
        let (db, claim) = open_db(data_dir)?;
        // What sled created or found; files it creates later are private by the daemon's umask.
        make_private(data_dir);
        let log = db.open_tree("log").map_err(storage("open tree log"))?;
        let ids = db.open_tree("ids").map_err(storage("open tree ids"))?;
        let snapshots = db
            .open_tree("snapshots")
            .map_err(storage("open tree snapshots"))?;
        let head = read_head(&log).map_err(|e| match e {
            LogError::Storage {
                source: source @ sled::Error::Corruption { .. },
                ..
            } => LogError::Damaged {
                file: data_dir.join(DATA_FILE),
                source,
            },
            other => other,
        })?;

        // sled neither syncs its config file nor the directory entries it creates.
        let conf = data_dir.join(CONF_FILE);
        if conf.exists() {
            File::open(&conf)
                .and_then(|f| f.sync_all())
                .map_err(io("fsync", &conf))?;
        }
        sync_dir(data_dir)?;
        if created {
            if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let data_path = data_dir.join(DATA_FILE);
        let data_file = File::open(&data_path).map_err(io("open", &data_path))?;

        Ok(SledLog {
            dir: data_dir.to_path_buf(),
            db,
            log,
            ids,
            snapshots,
            head,
            data_file,
            synced_blobs: HashSet::new(),
            recent: VecDeque::with_capacity(RECENT_RECORDS),
            _claim: claim,
        })
    }

    /// Store one record's value under its key as it is, unchecked and without moving the head
    /// (salvage copies checked records this way into a new store, then opens it again).
    pub(crate) fn put_raw_record(&mut self, key: u64, value: &[u8]) -> Result<(), LogError> {
        self.log
            .insert(seq_key(key), value)
            .map(|_| ())
            .map_err(storage("copy record"))
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// sled `flush()`, then `fdatasync` of every blob file not in `synced` (and of the blobs dir
/// when there were new ones), then of the data file: [`LogStore::sync`] of a [`SledLog`], and
/// what its [`LogStore::syncer`] runs, also while another thread appends. The blob files are
/// listed *before* the flush: a blob being written then belongs to a write the flush waits for,
/// so it is whole when synced after it; one that appears later (a write begun after the flush)
/// may be half written, and is left for the next sync instead of being counted as synced.
fn sync_sled(
    db: &sled::Db,
    dir: &Path,
    data_file: &File,
    synced: &mut HashSet<OsString>,
) -> Result<(), LogError> {
    let blobs = dir.join(BLOBS_DIR);
    let listed = list_blobs(&blobs)?;
    db.flush().map_err(storage("flush"))?;
    sync_new_blobs(&blobs, listed, synced)?;
    data_file.sync_data().map_err(|source| LogError::Io {
        op: "fdatasync",
        path: dir.join(DATA_FILE),
        source,
    })
}

/// The blob files in `blobs` (none when the directory does not exist).
fn list_blobs(blobs: &Path) -> Result<Vec<OsString>, LogError> {
    let entries = match std::fs::read_dir(blobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", blobs)(e)),
    };
    entries
        .map(|e| e.map(|e| e.file_name()).map_err(io("list", blobs)))
        .collect()
}

/// `fdatasync` every file of `listed` (in the blobs directory `blobs`) not in `synced`, then
/// the directory if any was new; `synced` becomes the listed files that still exist.
fn sync_new_blobs(
    blobs: &Path,
    listed: Vec<OsString>,
    synced: &mut HashSet<OsString>,
) -> Result<(), LogError> {
    let mut present = HashSet::with_capacity(listed.len());
    let mut new_files = false;
    for name in listed {
        if !synced.contains(&name) {
            let path = blobs.join(&name);
            match File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => new_files = true,
                // Garbage-collected by sled since it was listed: nothing to make durable.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("fdatasync", &path)(e)),
            }
        }
        present.insert(name);
    }
    if new_files {
        sync_dir(blobs)?;
    }
    *synced = present;
    Ok(())
}

/// The durable mark of the data dir `dir` (see [`LogStore::mark_durable`]), if it has a
/// readable one.
pub(crate) fn read_durable_mark(dir: &Path) -> Option<(u64, Hash32)> {
    let path = dir.join(DURABLE_MARK_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let parsed = text
        .trim()
        .split_once(' ')
        .and_then(|(seq, hex)| Some((seq.parse::<u64>().ok()?, Hash32::from_hex(hex)?)));
    if parsed.is_none() {
        tracing::warn!("{} is unreadable; ignored", path.display());
    }
    parsed
}

/// Read and validate the head from the last record (and the one before it).
fn read_head(log: &sled::Tree) -> Result<Option<Head>, LogError> {
    let Some((last_key, last)) = log.last().map_err(storage("read last record"))? else {
        return Ok(None);
    };
    let last_seq = key_seq(&last_key)?;
    let prev = log
        .get_lt(&last_key)
        .map_err(storage("read record before last"))?;
    let prev = match &prev {
        Some((k, v)) => Some((key_seq(k)?, v.as_ref())),
        None => None,
    };
    check_tail(last_seq, &last, prev).map(Some)
}

impl LogStore for SledLog {
    fn append(&mut self, sealed: &[Sealed]) -> Result<(), LogError> {
        if sealed.is_empty() {
            return Ok(());
        }
        check_sealed(self.head, sealed)?;
        let mut kept = Vec::new();
        for record in records_of(sealed) {
            if let Some(first) = record.first() {
                kept.push((first.seq, sled::IVec::from(pack_sealed(record))));
            }
        }
        // One record (a group commit's usual size) is one `insert`, atomic on its own. A
        // `sled::Batch` costs a disk round trip more: sled puts a batch's manifest in a log
        // buffer of its own (`pin_log`) and writes it (`pwrite` + `sync_file_range`, on this
        // thread: vendor/README.md) as the batch completes, before `sync`'s flush writes the
        // records. Measured in benches/README.md, "One record, one insert".
        if let [(seq, value)] = kept.as_slice() {
            self.log
                .insert(seq_key(*seq), value.clone())
                .map_err(storage("append a record"))?;
        } else {
            let mut batch = sled::Batch::default();
            for (seq, value) in &kept {
                batch.insert(&seq_key(*seq), value.clone());
            }
            self.log
                .apply_batch(batch)
                .map_err(storage("append records"))?;
        }
        for (key, value) in kept {
            if self.recent.len() == RECENT_RECORDS {
                self.recent.pop_front();
            }
            self.recent.push_back((key, value));
        }
        self.head = head_of_sealed(sealed);
        Ok(())
    }

    fn append_record(&mut self, key: u64, bytes: &[u8], envs: &[Envelope]) -> Result<(), LogError> {
        // Verbatim only when the events are the whole record stored under its first seq.
        if envs.first().map(|e| e.seq) != Some(key) {
            return self.append(&super::sealed_of(envs)?);
        }
        super::check_continues(self.head, envs)?;
        let value = sled::IVec::from(bytes);
        self.log
            .insert(seq_key(key), value.clone())
            .map_err(storage("append a record"))?;
        if self.recent.len() == RECENT_RECORDS {
            self.recent.pop_front();
        }
        self.recent.push_back((key, value));
        self.head = super::head_of(envs);
        Ok(())
    }

    /// sled `flush()` (which ends in `sync_file_range`, short of the device cache), then
    /// `fdatasync` of every blob file sled wrote since the last sync (and of the blobs dir when
    /// there were new ones), then `fdatasync` of the data file `<dir>/db`.
    fn sync(&mut self) -> Result<(), LogError> {
        sync_sled(&self.db, &self.dir, &self.data_file, &mut self.synced_blobs)
    }

    /// The same steps as [`sync`](LogStore::sync), on handles of their own: sled's `flush`
    /// may run while other threads append (what it makes durable is what was appended before
    /// it began).
    fn syncer(&self) -> Option<crate::log::Syncer> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        let data_file = self.data_file.try_clone().ok()?;
        let mut synced = self.synced_blobs.clone();
        Some(Box::new(move || {
            sync_sled(&db, &dir, &data_file, &mut synced)
        }))
    }

    fn head(&self) -> Option<Head> {
        self.head
    }

    fn has_ids(&self) -> bool {
        !self.ids.is_empty()
    }

    fn get_id(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self
            .ids
            .get(key)
            .map_err(storage("read id"))?
            .map(|v| v.to_vec()))
    }

    fn read_records_from(&self, seq: u64) -> StoredRecords<'_> {
        self.records_holding(seq)
    }

    /// Reads the raw value of every record keyed before `before` (2 M events in 0.33 s on the
    /// 2-core bench machine, a twentieth of decoding them), so that sled checks the CRC of
    /// every page that holds one.
    fn readability_check(
        &self,
        before: u64,
    ) -> Box<dyn FnOnce() -> Result<u64, LogError> + Send + '_> {
        let log = self.log.clone();
        Box::new(move || {
            let mut read = 0u64;
            // The last record read: where the first unreadable seq is found from.
            let mut last: Option<(u64, sled::IVec)> = None;
            for item in log.range(..seq_key(before)) {
                match item {
                    Ok((k, v)) => {
                        last = Some((key_seq(&k)?, v));
                        read += 1;
                    }
                    Err(e) => {
                        let seq = match &last {
                            None => 1,
                            Some((key, bytes)) => decode_checked_at(*key, bytes)?
                                .last()
                                .map_or(*key, |c| c.env.seq + 1),
                        };
                        return Err(LogError::Corrupt {
                            seq,
                            reason: format!(
                                "the record holding it cannot be read: {}",
                                super::sled_text(&e)
                            ),
                        });
                    }
                }
            }
            Ok(read)
        })
    }

    /// Writes `<dir>/durable-head` through a temporary file, `fdatasync`ed, then renamed: a
    /// crash leaves the old mark or the new one (one small write per snapshot).
    fn mark_durable(&mut self, seq: u64, hash: Hash32) -> Result<(), LogError> {
        let path = self.dir.join(DURABLE_MARK_FILE);
        let line = format!("{seq} {}\n", hash.to_hex());
        replace_file(&path, &mut |w| w.write_all(line.as_bytes()))
            .map_err(io("write the durable mark", &path))
    }

    fn durable_mark(&self) -> Option<(u64, Hash32)> {
        read_durable_mark(&self.dir)
    }

    /// Snapshots are files in the data dir, `snapshot-<seq>.bin` (a temporary file, synced,
    /// renamed, the dir synced: durable at once), not sled values: stored in sled, each
    /// snapshot (tens of MiB under `bursar-bench churn`) stayed in sled's memory and the
    /// daemon's RSS grew from ~300 to ~900 MiB over 3 M sessions; as files it stays at ~300.
    /// Snapshots an older release stored in sled's `snapshots` tree are still read when no
    /// file snapshot exists (nothing writes that tree now).
    fn put_snapshot(&mut self, seq: u64, bytes: &[u8]) -> Result<(), LogError> {
        write_snapshot_file(&self.dir, seq, bytes)
    }

    fn snapshot_dir(&self) -> Option<PathBuf> {
        Some(self.dir.clone())
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        if let Some(found) = latest_snapshot_file(&self.dir)? {
            return Ok(Some(found));
        }
        match self.snapshots.last().map_err(storage("read snapshot"))? {
            None => Ok(None),
            Some((k, v)) => Ok(Some((key_seq(&k)?, v.to_vec()))),
        }
    }
}

/// The records of a sled range, falling back on the records kept in memory once sled fails to
/// read (see [`RECENT_RECORDS`]): after the last record read, the kept ones that follow it, if
/// they reach back far enough; else sled's error.
struct WithRecent<'a> {
    sled: sled::Iter,
    recent: &'a VecDeque<(u64, sled::IVec)>,
    /// Key of the last record yielded.
    last: Option<u64>,
    /// Key of the first record of the range (`Some(1)` for the whole log).
    start: Option<u64>,
    /// Index in `recent` of the next record to yield, once sled failed.
    from_recent: Option<usize>,
}

impl Iterator for WithRecent<'_> {
    type Item = Result<(u64, sled::IVec), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(i) = self.from_recent {
            let (k, v) = self.recent.get(i)?;
            self.from_recent = Some(i + 1);
            return Some(Ok((*k, v.clone())));
        }
        match self.sled.next()? {
            Ok((k, v)) => {
                let key = match key_seq(&k) {
                    Ok(key) => key,
                    Err(e) => return Some(Err(e)),
                };
                self.last = Some(key);
                Some(Ok((key, v)))
            }
            // Only a failed I/O (a full disk) is read around; a checksum that fails is damage.
            Err(e @ sled::Error::Io(_)) => {
                // Continue with the kept records only where nothing between the last record
                // read and them can be missing: the kept record at the key sled should have
                // yielded next is the one after the last read (kept records are consecutive),
                // or, when sled failed at once, the one the range starts at.
                // The last kept record is the log's last (this store appended it): after it,
                // the log ends.
                let at = match self.last {
                    Some(last) => self
                        .recent
                        .iter()
                        .position(|(k, _)| *k == last)
                        .map(|i| i + 1),
                    None => self.recent.iter().position(|(k, _)| Some(*k) == self.start),
                };
                match at {
                    Some(i) => {
                        tracing::warn!(
                            "sled cannot read the log's newest records ({}); reading them from \
                             memory",
                            super::sled_text(&e)
                        );
                        self.from_recent = Some(i);
                        self.next()
                    }
                    None => Some(Err(storage("read log")(e))),
                }
            }
            Err(e) => Some(Err(storage("read log")(e))),
        }
    }
}

/// The file of the snapshot taken after event `seq`.
fn snapshot_file_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.bin")
}

/// Seqs of the snapshot files in `dir`.
fn snapshot_files(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let name = name.to_str()?;
            name.strip_prefix("snapshot-")?
                .strip_suffix(".bin")?
                .parse()
                .ok()
        })
        .collect()
}

/// Replace the file `path` by one holding what `contents` writes, never half-written: a
/// private temporary file beside it (`<path>.tmp`, removed on failure), synced every
/// `SNAPSHOT_SYNC_CHUNK` bytes and at the end, then renamed over `path`. In synced chunks: on ext4 (ordered data), the writer's
/// `fdatasync` of the log waits for every dirty page a journal commit must cover, so a
/// snapshot of tens of MiB written in one go slowed every group commit while it was flushed
/// (churn bench: 63,400 records/s with one sync at the end, 76,000 with none at all, 121,000
/// to 133,000 synced per MiB).
pub fn replace_file(
    path: &Path,
    contents: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut write = || -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        let mut out = SyncedEvery {
            file: f,
            unsynced: 0,
        };
        contents(&mut out)?;
        out.file.sync_data()?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A file synced every [`SNAPSHOT_SYNC_CHUNK`] bytes written.
struct SyncedEvery {
    file: std::fs::File,
    unsynced: usize,
}

impl Write for SyncedEvery {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n;
        if self.unsynced >= SNAPSHOT_SYNC_CHUNK {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The newest snapshot file in `dir` (see [`write_snapshot_file`]) and the seq it was taken
/// at.
pub(crate) fn latest_snapshot_file(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    let Some(seq) = snapshot_files(dir).into_iter().max() else {
        return Ok(None);
    };
    let path = dir.join(snapshot_file_name(seq));
    let bytes = std::fs::read(&path).map_err(io("read snapshot", &path))?;
    Ok(Some((seq, bytes)))
}

/// Write the snapshot taken after event `seq` into the data dir `dir` (see
/// [`LogStore::snapshot_dir`]): a temporary file, synced, renamed, the dir synced; then only
/// the [`SNAPSHOTS_KEPT`] newest are kept.
pub fn write_snapshot_file(dir: &Path, seq: u64, bytes: &[u8]) -> Result<(), LogError> {
    write_snapshot_file_with(dir, seq, &mut |w| w.write_all(bytes))
}

/// [`write_snapshot_file`] with the bytes `contents` writes, written as they come (a snapshot
/// is encoded straight into its file).
pub fn write_snapshot_file_with(
    dir: &Path,
    seq: u64,
    contents: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), LogError> {
    let path = dir.join(snapshot_file_name(seq));
    replace_file(&path, contents).map_err(io("write snapshot", &path))?;
    sync_dir(dir)?;
    // A snapshot file left half-written by a crash (its `.tmp`) is never read: remove it.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("snapshot-") && name.ends_with(".bin.tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut seqs = snapshot_files(dir);
    seqs.sort_unstable();
    let drop_count = seqs.len().saturating_sub(SNAPSHOTS_KEPT);
    for old in seqs.into_iter().take(drop_count) {
        let _ = std::fs::remove_file(dir.join(snapshot_file_name(old)));
    }
    Ok(())
}

#[cfg(test)]
mod append_record_tests {
    use super::*;
    use crate::log::testing::write_sample_batches;
    use crate::log::verify_chain;

    /// A follower's copy takes each record of the shared log verbatim: the same bytes under the
    /// same key, the head moved, the chain intact; a record that does not continue the head is
    /// refused and leaves the copy as it was.
    #[test]
    fn a_copy_stores_records_verbatim_and_refuses_one_that_does_not_continue_it() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut shared = SledLog::open(a.path()).unwrap();
        write_sample_batches(&mut shared, &[3, 40, 1]);
        let records: Vec<(u64, Vec<u8>)> = shared
            .log
            .iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (key_seq(&k).unwrap(), v.to_vec())
            })
            .collect();
        let mut copy = SledLog::open(b.path()).unwrap();
        // The second record first: it does not continue an empty copy.
        let (k1, b1) = &records[1];
        let envs1 = crate::log::decode_at(*k1, b1).unwrap();
        assert!(matches!(
            copy.append_record(*k1, b1, &envs1),
            Err(LogError::Refused { .. })
        ));
        assert_eq!(copy.head(), None);
        for (k, bytes) in &records {
            let envs = crate::log::decode_at(*k, bytes).unwrap();
            copy.append_record(*k, bytes, &envs).unwrap();
        }
        copy.sync().unwrap();
        assert_eq!(copy.head(), shared.head());
        assert_eq!(verify_chain(&copy).unwrap().0, 44);
        for (k, bytes) in &records {
            assert_eq!(
                copy.log.get(seq_key(*k)).unwrap().unwrap().to_vec(),
                *bytes,
                "record {k} stored as the shared log holds it"
            );
        }
    }

    /// The records kept in memory for reads that sled fails (a full disk, [`RECENT_RECORDS`])
    /// are the ones sled stores, key and bytes, whether a commit was one record (one `insert`)
    /// or several (one batch); past the cap, the newest.
    #[test]
    fn the_records_kept_for_reads_are_the_ones_stored_for_one_record_and_several() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SledLog::open(tmp.path()).unwrap();
        let stored = |log: &SledLog| -> Vec<(u64, sled::IVec)> {
            log.log
                .iter()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (key_seq(&k).unwrap(), v)
                })
                .collect()
        };
        // One-record commits, a commit of several records, one-record commits again.
        write_sample_batches(&mut log, &[3, 1, 5000, 2]);
        let all = stored(&log);
        assert!(
            all.len() > 4,
            "the 5,000-event commit is cut into several records"
        );
        assert_eq!(log.recent.iter().cloned().collect::<Vec<_>>(), all);
        // Past the cap only the newest are kept, still as stored.
        let commits = vec![1; RECENT_RECORDS + 10];
        write_sample_batches(&mut log, &commits);
        let all = stored(&log);
        assert_eq!(log.recent.len(), RECENT_RECORDS);
        assert_eq!(
            log.recent.iter().cloned().collect::<Vec<_>>(),
            all[all.len() - RECENT_RECORDS..]
        );
    }
}
