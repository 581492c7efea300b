//! The log as the writer and `bursar verify` see it: durability, locking, idempotency ids,
//! chain verification against tampering, fault injection and snapshots.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_schemas::event::{Envelope, EventBody, Hash32, ReservationExpired};
use bursard::log::testing::{
    sample_batch as batch, tamper_delete, tamper_rewrite, with_raw_db,
    write_sample_batches as write_batches, FaultControl, FaultyLog, MemDisk, MemLog, SyncFault,
};
use bursard::log::{
    verify_chain, LogError, LogStore, SledLog, VerifyError, STORED_LZ4, STORED_ZSTD,
};
use std::path::Path;
use std::process::{Command, Output};

/// Envelopes as the writer stores them: each encoded once, with its hash.
fn sealed(envs: &[Envelope]) -> Vec<bursar_schemas::event::Sealed> {
    bursard::log::sealed_of(envs).unwrap()
}

fn read_all(store: &dyn LogStore, from: u64) -> Vec<Envelope> {
    store.read_from(from).collect::<Result<_, _>>().unwrap()
}

fn seqs(store: &dyn LogStore, from: u64) -> Vec<u64> {
    read_all(store, from).iter().map(|e| e.seq).collect()
}

/// Run `f` on the raw `log` tree of a closed data dir.
fn with_raw_log<T>(dir: &Path, f: impl FnOnce(&sled::Tree) -> T) -> T {
    with_raw_db(dir, |db| f(&db.open_tree("log").unwrap())).unwrap()
}

// ---- SledLog: durability and reading -------------------------------------------------------

#[test]
fn batches_survive_reopen_and_read_from_starts_mid_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let written = {
        let mut log = SledLog::open(&dir).unwrap();
        assert_eq!(log.head(), None);
        write_batches(&mut log, &[3, 1, 4])
    };
    let last = written.last().unwrap();

    let log = SledLog::open(&dir).unwrap();
    assert_eq!(log.head(), Some((8, last.hash, last.ts)));
    assert_eq!(read_all(&log, 1), written);
    assert_eq!(read_all(&log, 0), written);
    assert_eq!(seqs(&log, 2), vec![2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(seqs(&log, 4), vec![4, 5, 6, 7, 8]);
    assert_eq!(seqs(&log, 6), vec![6, 7, 8]);
    assert_eq!(seqs(&log, 8), vec![8]);
    assert!(seqs(&log, 9).is_empty());
    drop(log);

    // One stored record per group-commit batch, keyed by its first seq.
    let keys: Vec<u64> = with_raw_log(&dir, |raw| {
        raw.iter()
            .keys()
            .map(|k| u64::from_be_bytes(k.unwrap().as_ref().try_into().unwrap()))
            .collect()
    });
    assert_eq!(keys, vec![1, 4, 5]);
}

#[test]
fn records_are_stored_compressed_and_lz4_and_uncompressed_records_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let written = {
        let mut log = SledLog::open(&dir).unwrap();
        write_batches(&mut log, &[64, 2])
    };
    // Stored compressed, and smaller than the record itself.
    let first = with_raw_log(&dir, |raw| raw.get(1u64.to_be_bytes()).unwrap().unwrap());
    assert_eq!(first[0], STORED_ZSTD);
    let plain = bursar_schemas::event::encode_record(&written[..64]).unwrap();
    assert!(
        first.len() < plain.len(),
        "{} stored bytes for a {}-byte record",
        first.len(),
        plain.len()
    );
    // A data dir of the builds that stored LZ4: the same records, LZ4-compressed.
    let mut lz4 = vec![STORED_LZ4];
    lz4.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
    with_raw_log(&dir, |raw| {
        raw.insert(1u64.to_be_bytes(), lz4).unwrap();
    });
    let log = SledLog::open(&dir).unwrap();
    assert_eq!(read_all(&log, 1), written);
    drop(log);
    // A data dir written before compression: the same records, stored as they are.
    with_raw_log(&dir, |raw| {
        raw.insert(1u64.to_be_bytes(), plain.clone()).unwrap();
    });
    let log = SledLog::open(&dir).unwrap();
    assert_eq!(read_all(&log, 1), written);
    assert_eq!(verify_chain(&log).unwrap().0, written.len() as u64);
    drop(log);
    // A compressed record whose size does not match its frame is damage, refused before any
    // allocation of the size it claims.
    let good = with_raw_log(&dir, |raw| {
        raw.get(65u64.to_be_bytes()).unwrap().unwrap().to_vec()
    });
    with_raw_log(&dir, |raw| {
        let mut bad = good.clone();
        let size = u32::from_le_bytes(bad[1..5].try_into().unwrap());
        bad[1..5].copy_from_slice(&(size + 1).to_le_bytes());
        raw.insert(65u64.to_be_bytes(), bad).unwrap();
    });
    match SledLog::open(&dir) {
        Err(LogError::Corrupt { seq: 65, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A damaged compressed record is named, not trusted and not a panic.
    with_raw_log(&dir, |raw| {
        let mut bad = raw.get(65u64.to_be_bytes()).unwrap().unwrap().to_vec();
        bad[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        raw.insert(65u64.to_be_bytes(), bad).unwrap();
    });
    match SledLog::open(&dir) {
        Err(LogError::Corrupt { seq: 65, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// `n` events after `head` whose ids do not compress (a log many times sled's cache in a few
/// thousand events).
fn wide_batch(head: Option<(u64, Hash32, i64)>, n: u64) -> Vec<Envelope> {
    let (mut seq, mut prev, mut ts) = head.unwrap_or((0, Hash32::default(), 1_000_000));
    (0..n)
        .map(|_| {
            seq += 1;
            ts += 7;
            let id: String = (0..6)
                .map(|i: u64| {
                    blake3::hash(&(seq * 8 + i).to_le_bytes())
                        .to_hex()
                        .to_string()
                })
                .collect();
            let body = EventBody::ReservationReleased(bursar_schemas::event::ReservationReleased {
                reservation_id: id,
                reason: "cancelled".into(),
                payload_digest: [0; 16],
            });
            let e = Envelope::seal(seq, ts, Default::default(), prev, body).unwrap();
            prev = e.hash;
            e
        })
        .collect()
}

#[test]
fn a_log_many_times_the_cache_reads_back_whole_after_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = SledLog::open(tmp.path()).unwrap();
    let mut written = Vec::new();
    // Each id carries 192 bytes that no compression removes: three times the cache in those.
    let events = 3 * bursard::log::SLED_CACHE_BYTES / 192;
    while (written.len() as u64) < events {
        let envs = wide_batch(log.head(), 500);
        log.append(&sealed(&envs)).unwrap();
        log.sync().unwrap();
        written.extend(envs);
    }
    // Read back twice while open (the second pass after the first evicted pages) and once
    // after reopening.
    assert_eq!(read_all(&log, 1), written);
    assert_eq!(read_all(&log, 1), written);
    drop(log);
    let log = SledLog::open(tmp.path()).unwrap();
    assert_eq!(read_all(&log, 1), written);
    assert_eq!(verify_chain(&log).unwrap().0, written.len() as u64);
}

#[test]
fn appending_after_reopen_continues_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let mut written = write_batches(&mut SledLog::open(tmp.path()).unwrap(), &[2]);
    let mut log = SledLog::open(tmp.path()).unwrap();
    written.extend(write_batches(&mut log, &[3]));
    assert_eq!(read_all(&log, 1), written);
    assert_eq!(verify_chain(&log).unwrap(), (5, written[4].hash));
}

#[test]
fn a_big_batch_is_cut_into_records_that_sled_keeps_inline_and_roundtrips() {
    // 5000 events in one group commit used to be one record, which sled wrote as a separate
    // blob file (and whole tree nodes with it) on the append path; cut into small records, the
    // append path writes no blob file.
    let tmp = tempfile::tempdir().unwrap();
    let written = write_batches(&mut SledLog::open(tmp.path()).unwrap(), &[5000, 2]);
    let blobs = std::fs::read_dir(tmp.path().join("blobs")).map_or(0, |d| d.count());
    assert_eq!(blobs, 0, "the append path wrote {blobs} blob files");
    let log = SledLog::open(tmp.path()).unwrap();
    assert_eq!(log.head().map(|h| h.0), Some(5002));
    assert_eq!(read_all(&log, 4999), written[4998..].to_vec());
    assert_eq!(verify_chain(&log).unwrap().0, 5002);
}

#[test]
fn second_open_of_a_data_dir_is_locked_until_the_first_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let first = SledLog::open(tmp.path()).unwrap();
    let err = SledLog::open(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, LogError::Locked { dir } if dir == tmp.path()),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    assert!(msg.contains("another bursard"), "{msg}");
    drop(first);
    SledLog::open(tmp.path()).unwrap();
}

#[test]
fn closing_and_reopening_in_one_process_always_works() {
    // sled lets go of its file lock a little after the store is dropped (later still when other
    // threads use sled at the same time); open waits for that.
    let threads: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(|| {
                let tmp = tempfile::tempdir().unwrap();
                let mut written = Vec::new();
                for _ in 0..20 {
                    let mut log = SledLog::open(tmp.path()).unwrap();
                    assert_eq!(log.head().map_or(0, |h| h.0), written.len() as u64);
                    written.extend(write_batches(&mut log, &[40]));
                }
                assert_eq!(read_all(&SledLog::open(tmp.path()).unwrap(), 1), written);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

// ---- across processes (the test binary re-runs one of its ignored tests as a child) ----------

/// The `log_child` example (built by `cargo test`), which opens or writes a log in another
/// process: `log_child open DIR` or `log_child sync-abort DIR [unsynced]`.
fn log_child() -> Command {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("examples").join("log_child");
    assert!(
        path.exists(),
        "{} is missing; `cargo test` builds it",
        path.display()
    );
    Command::new(path)
}

fn run_child(mode: &str, dir: &Path, extra: &[&str]) -> Output {
    log_child().arg(mode).arg(dir).args(extra).output().unwrap()
}

#[test]
fn another_process_is_refused_while_the_dir_is_open() {
    let tmp = tempfile::tempdir().unwrap();
    let held = SledLog::open(tmp.path()).unwrap();
    let out = run_child("open", tmp.path(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!("CHILD: locked: data dir {} is locked", tmp.path().display());
    assert!(stdout.contains(&expected), "{stdout}");
    drop(held);
    // Once released, another process opens it.
    let out = run_child("open", tmp.path(), &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD: opened"));
}

#[test]
fn synced_batches_survive_the_process_aborting() {
    // The same deterministic batches, written in memory, are what must be on disk.
    let expected = write_batches(&mut MemLog::open(&MemDisk::new()).unwrap(), &[3, 2, 4]);
    for with_unsynced_tail in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let extra: &[&str] = if with_unsynced_tail {
            &["unsynced"]
        } else {
            &[]
        };
        let out = run_child("sync-abort", tmp.path(), extra);
        assert!(!out.status.success(), "the child did not abort");

        let log = SledLog::open(tmp.path()).unwrap();
        let stored = read_all(&log, 1);
        assert!(stored.len() >= 9, "only {} events survived", stored.len());
        assert_eq!(stored[..9], expected[..]);
        // An unsynced batch is all there or not at all.
        let whole_tail = stored.len() == 14 && with_unsynced_tail;
        assert!(
            stored.len() == 9 || whole_tail,
            "{} events survived",
            stored.len()
        );
        assert_eq!(verify_chain(&log).unwrap().0, stored.len() as u64);
    }
}

#[test]
fn what_the_syncer_made_durable_while_another_thread_appended_survives_the_process_aborting() {
    let expected = write_batches(&mut MemLog::open(&MemDisk::new()).unwrap(), &[3; 300]);
    for _ in 0..3 {
        let tmp = tempfile::tempdir().unwrap();
        let out = run_child("syncer-abort", tmp.path(), &[]);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(6),
            "the child did not abort: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let durable: usize = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CHILD: durable "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no durable seq in {stdout}"));
        assert!(durable >= 3, "no sync round after an append: {stdout}");
        let log = SledLog::open(tmp.path()).unwrap();
        let stored = read_all(&log, 1);
        assert!(
            stored.len() >= durable,
            "the syncer said {durable} events were durable; {} survived",
            stored.len()
        );
        assert_eq!(stored[..], expected[..stored.len()]);
        assert_eq!(verify_chain(&log).unwrap().0, stored.len() as u64);
    }
}

// ---- idempotency ids -------------------------------------------------------------------------

#[test]
fn a_batch_that_does_not_continue_the_head_is_refused_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = SledLog::open(tmp.path()).unwrap();
    write_batches(&mut log, &[2]);
    let head = log.head();

    // A gap: starts at seq 4 instead of 3.
    let gap = batch(Some((3, head.unwrap().1, head.unwrap().2)), 1);
    let err = log.append(&sealed(&gap)).unwrap_err();
    assert!(matches!(err, LogError::Refused { seq: 4, .. }), "{err:?}");

    // Right seq, wrong prev_hash.
    let unlinked = batch(Some((2, Hash32([9; 32]), 0)), 1);
    let err = log.append(&sealed(&unlinked)).unwrap_err();
    assert!(matches!(err, LogError::Refused { seq: 3, .. }), "{err:?}");

    log.sync().unwrap();
    drop(log);
    let log = SledLog::open(tmp.path()).unwrap();
    assert_eq!(log.head(), head);
}

#[test]
fn a_staged_batch_is_lost_when_crashing_before_sync() {
    let disk = MemDisk::new();
    let mut log = MemLog::open(&disk).unwrap();
    let durable = write_batches(&mut log, &[2]);
    let staged = batch(log.head(), 2);
    log.append(&sealed(&staged)).unwrap();
    // Before the crash the staged batch is visible to the writer itself.
    assert_eq!(log.head().map(|h| h.0), Some(4));

    disk.crash();
    assert!(matches!(
        log.append(&sealed(&batch(log.head(), 1))),
        Err(LogError::Crashed)
    ));
    drop(log);

    let log = MemLog::open(&disk).unwrap();
    assert_eq!(read_all(&log, 1), durable);
    assert_eq!(log.head().map(|h| h.0), Some(2));
}

#[test]
fn memlog_allows_one_open_per_disk() {
    let disk = MemDisk::new();
    let first = MemLog::open(&disk).unwrap();
    assert!(matches!(MemLog::open(&disk), Err(LogError::Locked { .. })));
    drop(first);
    MemLog::open(&disk).unwrap();
}

// ---- verify_chain ----------------------------------------------------------------------------

/// Sled log with records at keys 1 (2 events), 3 (3 events: 3,4,5), 6, 8 and 10 (2 each):
/// 11 events. Opening checks the last two records, so tests tamper before key 8.
fn tamperable_log(dir: &Path) -> Vec<Envelope> {
    write_batches(&mut SledLog::open(dir).unwrap(), &[2, 3, 2, 2, 2])
}

fn verify_dir(dir: &Path) -> Result<(u64, Hash32), VerifyError> {
    verify_chain(&SledLog::open(dir).unwrap())
}

#[test]
fn verify_accepts_a_good_log_and_reports_its_head() {
    let tmp = tempfile::tempdir().unwrap();
    let written = tamperable_log(tmp.path());
    let log = SledLog::open(tmp.path()).unwrap();
    assert_eq!(verify_chain(&log).unwrap(), (11, written[10].hash));
    assert_eq!(log.head().unwrap().1, written[10].hash);

    let empty = MemLog::open(&MemDisk::new()).unwrap();
    assert_eq!(verify_chain(&empty).unwrap(), (0, Hash32::default()));
}

#[test]
fn verify_names_an_event_whose_body_was_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    tamper_rewrite(tmp.path(), 4, |e| {
        e.body = EventBody::ReservationExpired(ReservationExpired {
            reservation_id: "res-4".into(),
        })
    })
    .unwrap();
    let err = verify_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, VerifyError::Hash { seq: 4 }), "{err:?}");
    assert_eq!(err.seq(), 4);
    assert!(err.to_string().contains("seq 4"), "{err}");
}

#[test]
fn verify_names_the_event_after_one_rewritten_with_a_fresh_hash() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    tamper_rewrite(tmp.path(), 5, |e| {
        e.ts += 1;
        e.hash = e.compute_hash().unwrap();
    })
    .unwrap();
    let err = verify_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, VerifyError::PrevHash { seq: 6 }), "{err:?}");
}

#[test]
fn verify_names_the_seq_after_a_deleted_event() {
    for (deleted, expected_bad) in [(4, 5), (3, 4), (6, 7)] {
        let tmp = tempfile::tempdir().unwrap();
        tamperable_log(tmp.path());
        tamper_delete(tmp.path(), deleted).unwrap();
        let err = verify_dir(tmp.path()).unwrap_err();
        assert!(
            matches!(err, VerifyError::Gap { seq, expected } if seq == expected_bad && expected == deleted),
            "deleting {deleted}: {err:?}"
        );
    }
}

#[test]
fn verify_rejects_two_records_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    with_raw_log(tmp.path(), |raw| {
        let a = raw.get(3u64.to_be_bytes()).unwrap().unwrap();
        let b = raw.get(6u64.to_be_bytes()).unwrap().unwrap();
        raw.insert(3u64.to_be_bytes(), b).unwrap();
        raw.insert(6u64.to_be_bytes(), a).unwrap();
    });
    let err = verify_dir(tmp.path()).unwrap_err();
    assert_eq!(err.seq(), 3, "{err:?}");
}

#[test]
fn verify_rejects_time_going_backwards() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    // Re-seal seq 4 with an old ts; its own hash is fine, and the ts check comes before the
    // broken link of seq 5.
    tamper_rewrite(tmp.path(), 4, |e| {
        e.ts = 0;
        e.hash = e.compute_hash().unwrap();
    })
    .unwrap();
    let err = verify_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(err, VerifyError::TsBackwards { seq: 4, ts: 0, .. }),
        "{err:?}"
    );
}

/// Recovery decodes records on its reading thread and checks their chain on the folding one,
/// event by event, in order (`writer::recovery`): an event rewritten in any record stops the
/// start naming its seq; so does one deleted, and records swapped.
#[test]
fn recovery_names_a_damaged_event_wherever_it_lies() {
    // 24 records of 2 events: seqs 2k+1 and 2k+2 in record k (the first of each is its key).
    let sizes = [2u64; 24];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("good");
    write_batches(&mut SledLog::open(&dir).unwrap(), &sizes);
    let good = bursard::writer::recover(&SledLog::open(&dir).unwrap()).unwrap();
    assert_eq!(good.last_seq(), 48);
    // In records 0..=21 (the last two are checked when the log opens): first and second
    // events of records, the log's first event and record boundaries.
    for seq in [1, 4, 13, 15, 16, 17, 31, 32, 33, 40] {
        let dir = tmp.path().join(format!("rewritten-{seq}"));
        write_batches(&mut SledLog::open(&dir).unwrap(), &sizes);
        tamper_rewrite(&dir, seq, |e| {
            e.body = EventBody::ReservationExpired(ReservationExpired {
                reservation_id: "someone else's".into(),
            })
        })
        .unwrap();
        let err = bursard::writer::recover(&SledLog::open(&dir).unwrap()).unwrap_err();
        assert!(
            err.contains(&format!("seq {seq}")),
            "rewritten {seq}: {err}"
        );
    }
    for (deleted, named) in [(15, 16), (16, 17), (30, 31)] {
        let dir = tmp.path().join(format!("deleted-{deleted}"));
        write_batches(&mut SledLog::open(&dir).unwrap(), &sizes);
        tamper_delete(&dir, deleted).unwrap();
        let err = bursard::writer::recover(&SledLog::open(&dir).unwrap()).unwrap_err();
        assert!(
            err.contains(&format!("seq {named}")),
            "deleted {deleted}: {err}"
        );
    }
    let dir = tmp.path().join("swapped");
    write_batches(&mut SledLog::open(&dir).unwrap(), &sizes);
    with_raw_log(&dir, |raw| {
        let a = raw.get(13u64.to_be_bytes()).unwrap().unwrap();
        let b = raw.get(15u64.to_be_bytes()).unwrap().unwrap();
        raw.insert(13u64.to_be_bytes(), b).unwrap();
        raw.insert(15u64.to_be_bytes(), a).unwrap();
    });
    let err = bursard::writer::recover(&SledLog::open(&dir).unwrap()).unwrap_err();
    assert!(err.contains("seq 13"), "swapped: {err}");
}

#[test]
fn tampering_with_a_missing_seq_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    assert!(matches!(
        tamper_delete(tmp.path(), 12),
        Err(LogError::NotFound { seq: 12 })
    ));
}

#[test]
fn open_reports_a_corrupt_last_record() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    tamper_rewrite(tmp.path(), 11, |e| e.actor.uid = 0).unwrap();
    let err = SledLog::open(tmp.path()).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { seq: 11, .. }), "{err:?}");

    with_raw_log(tmp.path(), |raw| {
        raw.insert(10u64.to_be_bytes(), &[1u8, 0xff, 0xff][..])
            .unwrap();
    });
    let err = SledLog::open(tmp.path()).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { seq: 10, .. }), "{err:?}");
    assert!(err.to_string().contains("seq 10"), "{err}");
}

// ---- fault injection -------------------------------------------------------------------------

const SIZES: [u64; 6] = [1, 3, 2, 5, 1, 4];

/// Write `SIZES` batches through a FaultyLog failing the `n`th sync; stop at the first error
/// like a poisoned writer. Returns the disk and the events of the batches whose sync succeeded.
fn run_until_sync_fails(n: u64, fault: SyncFault) -> (MemDisk, Vec<Envelope>, Vec<Envelope>) {
    let disk = MemDisk::new();
    let control = FaultControl::new();
    control.fail_sync_number(n);
    control.set_sync_fault(fault);
    let mut log = FaultyLog::new(MemLog::open(&disk).unwrap(), control.clone());
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    for &size in &SIZES {
        let envs = batch(log.head(), size);
        log.append(&sealed(&envs)).unwrap();
        match log.sync() {
            Ok(()) => acked.extend(envs),
            Err(e) => {
                assert!(matches!(e, LogError::Injected("sync")), "{e:?}");
                assert_eq!(control.syncs(), n);
                failed = envs;
                break;
            }
        }
    }
    disk.crash();
    (disk, acked, failed)
}

#[test]
fn after_a_failed_sync_and_a_crash_only_the_synced_prefix_remains() {
    for n in 1..=SIZES.len() as u64 {
        let (disk, acked, failed) = run_until_sync_fails(n, SyncFault::Lost);
        assert!(!failed.is_empty(), "sync {n} did not fail");
        let log = MemLog::open(&disk).unwrap();
        assert_eq!(read_all(&log, 0), acked, "failing sync {n}");
        assert_eq!(log.head().map_or(0, |h| h.0), acked.len() as u64);
        assert_eq!(disk.durable_last_seq(), acked.len() as u64);
        assert_eq!(verify_chain(&log).unwrap().0, acked.len() as u64);
    }
}

#[test]
fn a_failed_sync_may_still_have_persisted_its_batch() {
    for n in 1..=SIZES.len() as u64 {
        let (disk, acked, failed) = run_until_sync_fails(n, SyncFault::PersistedAnyway);
        let log = MemLog::open(&disk).unwrap();
        let mut expected = acked;
        expected.extend(failed.iter().cloned());
        assert_eq!(read_all(&log, 0), expected, "failing sync {n}");
    }
}

#[test]
fn a_failed_append_stages_nothing() {
    let disk = MemDisk::new();
    let control = FaultControl::new();
    control.fail_append_number(2);
    let mut log = FaultyLog::new(MemLog::open(&disk).unwrap(), control.clone());
    let first = write_batches(&mut log, &[2]);
    let second = batch(log.head(), 2);
    assert!(matches!(
        log.append(&sealed(&second)),
        Err(LogError::Injected("append"))
    ));
    log.sync().unwrap();
    assert_eq!(log.head().map(|h| h.0), Some(2));

    control.fail_all_appends(true);
    assert!(log.append(&sealed(&second)).is_err());
    control.fail_all_appends(false);
    log.append(&sealed(&second)).unwrap();
    log.sync().unwrap();
    assert_eq!(control.appends(), 4);

    disk.crash();
    let log = MemLog::open(&disk).unwrap();
    assert_eq!(read_all(&log, 0), [first, second].concat());
}

#[test]
fn faults_can_be_switched_while_a_writer_thread_owns_the_store() {
    let disk = MemDisk::new();
    let control = FaultControl::new();
    let log = FaultyLog::new(MemLog::open(&disk).unwrap(), control.clone());
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (res_tx, res_rx) = std::sync::mpsc::channel::<bool>();
    let writer = std::thread::spawn(move || {
        let mut log = log;
        while go_rx.recv().is_ok() {
            let envs = batch(log.head(), 2);
            let ok = log.append(&sealed(&envs)).is_ok() && log.sync().is_ok();
            res_tx.send(ok).unwrap();
        }
    });
    let step = |expect: bool| {
        go_tx.send(()).unwrap();
        assert_eq!(res_rx.recv().unwrap(), expect);
    };
    step(true);
    step(true);
    control.fail_all_syncs(true);
    step(false);
    step(false);
    drop(go_tx);
    writer.join().unwrap();
    assert_eq!(control.syncs(), 4);
    disk.crash();
    assert_eq!(disk.durable_last_seq(), 4);
}

// ---- snapshots -------------------------------------------------------------------------------

#[test]
fn only_the_two_newest_snapshots_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut log = SledLog::open(tmp.path()).unwrap();
        assert_eq!(log.latest_snapshot().unwrap(), None);
        log.put_snapshot(10, b"at ten").unwrap();
        log.put_snapshot(20, b"at twenty").unwrap();
        assert_eq!(
            log.latest_snapshot().unwrap(),
            Some((20, b"at twenty".to_vec()))
        );
        log.put_snapshot(30, b"at thirty").unwrap();
        log.sync().unwrap();
        assert_eq!(
            log.latest_snapshot().unwrap(),
            Some((30, b"at thirty".to_vec()))
        );
    }
    let log = SledLog::open(tmp.path()).unwrap();
    assert_eq!(
        log.latest_snapshot().unwrap(),
        Some((30, b"at thirty".to_vec()))
    );
    drop(log);
    // Snapshots are files beside sled's (not sled values, which stayed in its memory).
    let mut kept: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with("snapshot-"))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        vec![
            "snapshot-00000000000000000020.bin",
            "snapshot-00000000000000000030.bin"
        ]
    );
}

/// A data dir whose snapshots an earlier release stored in sled's `snapshots` tree still
/// starts from its newest one, until a file snapshot is newer.
#[test]
fn a_snapshot_stored_in_sled_by_an_earlier_release_is_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    drop(SledLog::open(tmp.path()).unwrap());
    with_raw_db(tmp.path(), |db| {
        db.open_tree("snapshots")
            .unwrap()
            .insert(7u64.to_be_bytes(), b"old".to_vec())
            .unwrap();
    })
    .unwrap();
    let mut log = SledLog::open(tmp.path()).unwrap();
    assert_eq!(log.latest_snapshot().unwrap(), Some((7, b"old".to_vec())));
    log.put_snapshot(9, b"new").unwrap();
    assert_eq!(log.latest_snapshot().unwrap(), Some((9, b"new".to_vec())));
}

#[test]
fn memlog_snapshots_are_durable_only_after_sync_and_two_are_kept() {
    let disk = MemDisk::new();
    let mut log = MemLog::open(&disk).unwrap();
    for seq in [1, 2, 3] {
        log.put_snapshot(seq, &[seq as u8]).unwrap();
    }
    assert_eq!(disk.durable_snapshot_count(), 0);
    log.sync().unwrap();
    assert_eq!(disk.durable_snapshot_count(), 2);
    log.put_snapshot(4, &[4]).unwrap();
    disk.crash();
    let log = MemLog::open(&disk).unwrap();
    assert_eq!(log.latest_snapshot().unwrap(), Some((3, vec![3])));
}

// ---- the chain checked by every reader, and at start ------------------------------------------

#[test]
fn recovery_refuses_a_log_with_an_altered_event_and_names_its_seq() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    tamper_rewrite(tmp.path(), 4, |e| {
        e.body = EventBody::ReservationExpired(ReservationExpired {
            reservation_id: "res-4".into(),
        })
    })
    .unwrap();
    let log = SledLog::open(tmp.path()).unwrap();
    let err = bursard::writer::recover(&log).unwrap_err();
    assert!(err.contains("seq 4"), "{err}");
    assert!(err.contains("hash"), "{err}");
}

#[test]
fn a_read_from_the_middle_of_a_record_still_checks_the_events_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    // Records hold seqs 1-2, 3-5, 6-7, 8-9, 10-11: seq 3 is in the record a read from 5 opens.
    tamper_rewrite(tmp.path(), 3, |e| e.ts += 1).unwrap();
    let log = SledLog::open(tmp.path()).unwrap();
    let first = log.read_from(5).next().unwrap();
    assert!(
        matches!(first, Err(LogError::Chain(ref b)) if b.seq() == 3),
        "{first:?}"
    );
}

#[test]
fn recovery_checks_the_snapshots_last_event_against_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    tamperable_log(tmp.path());
    let mut log = SledLog::open(tmp.path()).unwrap();
    let full = bursard::writer::recover(&log).unwrap();
    let head = log.head().unwrap();
    // A snapshot recorded after a different event 11 than the log's.
    let wrong = bursard::writer::encode_snapshot(&full, Hash32([9; 32])).unwrap();
    log.put_snapshot(head.0, &wrong).unwrap();
    log.sync().unwrap();
    let err = bursard::writer::recover(&log).unwrap_err();
    assert!(err.contains("seq 11"), "{err}");
    // The right one is taken, and equals the full fold.
    let right = bursard::writer::encode_snapshot(&full, head.1).unwrap();
    log.put_snapshot(head.0, &right).unwrap();
    log.sync().unwrap();
    assert_eq!(bursard::writer::recover(&log).unwrap(), full);
}

// ---- salvage ---------------------------------------------------------------------------------

/// Salvage copies everything before the first bad seq, names that seq (the one expected, not
/// the one found after a gap), and its copy verifies; the intact events of the record holding
/// the break are kept.
#[test]
fn salvage_keeps_the_intact_prefix_and_names_the_first_missing_seq() {
    for (deleted, copied) in [(4u64, 3u64), (6, 5), (3, 2)] {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("from");
        tamperable_log(&from);
        tamper_delete(&from, deleted).unwrap();
        let to = tmp.path().join("to");
        let s = bursard::log::salvage(&from, &to).unwrap();
        assert_eq!(s.copied, copied, "deleting {deleted}: {s:?}");
        assert_eq!(
            s.left_behind.as_ref().map(|l| l.0),
            Some(deleted),
            "deleting {deleted}: {s:?}"
        );
        assert_eq!(verify_dir(&to).unwrap().0, copied);
    }
}

#[test]
fn salvage_refuses_a_dir_without_a_store_and_a_destination_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let nothing = tmp.path().join("typo");
    let err = bursard::log::salvage(&nothing, &tmp.path().join("to")).unwrap_err();
    assert!(err.to_string().contains("not a bursar data dir"), "{err}");
    assert!(!nothing.exists(), "nothing created at a mistyped path");
    let from = tmp.path().join("from");
    tamperable_log(&from);
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let err = bursard::log::salvage(&from, &busy).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(busy.join("keep.txt")).unwrap(),
        "mine"
    );
}
