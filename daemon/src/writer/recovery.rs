//! Recovery: the ledger at start, from the newest usable snapshot and the log after it.

use super::snapshots::{
    decode_snapshot, SNAPSHOT_FORMAT_V1, SNAPSHOT_FORMAT_V2, SNAPSHOT_FORMAT_V3,
    SNAPSHOT_FORMAT_V4, SNAPSHOT_FORMAT_V5, SNAPSHOT_FORMAT_V6,
};
use crate::log::{check_durable_mark, decode_deferred_at, ChainCheck, LogError, LogStore};
use bursar_core::ledger::{self, Ledger};
use bursar_schemas::event::receipts::without_receipts;
use bursar_schemas::event::{self, Deferred, Envelope, EventBody, Hash32, SharingLabels};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Rebuild the ledger at start: the newest usable snapshot, then the log after it.
///
/// The log is read once: events are folded in order while every `pricing_changed` is checked
/// for retroactivity (an `effective_from` at or before the `ts` of an event already folded, which
/// a one-pass fold would have priced without it). Only then is the whole log folded again in
/// the two passes that define a fold (see `bursar_core::ledger::fold`). A log without a
/// retroactive price change is thus decoded once instead of twice.
pub fn recover(store: &dyn LogStore) -> Result<Ledger, String> {
    recover_counted(store).map(|(l, _)| l)
}

/// [`recover`], with the number of events it folded past the snapshot it started from (all of
/// them when it started from none): the writer counts them towards its next snapshot.
pub fn recover_counted(store: &dyn LogStore) -> Result<(Ledger, u64), String> {
    // A store that lost events it had made durable is damaged, even when sled opens it.
    check_durable_mark(store).map_err(|e| e.to_string())?;
    let from_snapshot = match store.latest_snapshot() {
        Ok(Some((seq, bytes))) => match decode_snapshot(&bytes) {
            Some((l, hash)) if l.last_seq() == seq => Some((l, hash)),
            None if matches!(
                bytes.first(),
                Some(
                    &SNAPSHOT_FORMAT_V1
                        | &SNAPSHOT_FORMAT_V2
                        | &SNAPSHOT_FORMAT_V3
                        | &SNAPSHOT_FORMAT_V4
                        | &SNAPSHOT_FORMAT_V5
                        | &SNAPSHOT_FORMAT_V6
                )
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
    let (mut l, anchor) = match from_snapshot {
        Some((l, hash)) => {
            let seq = l.last_seq();
            (l, Some((seq, hash)))
        }
        None => (Ledger::default(), None),
    };
    // The part of the log the snapshot covers is not folded: the store's own checks run over
    // it meanwhile (SPEC §7: a damaged store is never served silently).
    let check = store.readability_check(anchor.map_or(1, |a| a.0));
    let folded = std::thread::scope(|scope| {
        let checked = std::thread::Builder::new()
            .name("bursar-check".into())
            .spawn_scoped(scope, check)
            .map_err(|e| format!("cannot start the store check: {e}"))?;
        let folded = one_pass_fold(store, &mut l, anchor);
        match checked.join() {
            Ok(Ok(records)) => {
                tracing::debug!("{records} records before the snapshot read back");
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the store check panicked".to_string()),
        }
        folded
    })?;
    if folded {
        // The fold starts at the snapshot's event: it cannot end before it.
        let from = anchor.map_or(0, |a| a.0);
        let past = l.last_seq().checked_sub(from).ok_or_else(|| {
            format!(
                "the fold ends at seq {} before the snapshot it started from (seq {from})",
                l.last_seq()
            )
        })?;
        return Ok((l, past));
    }
    if had_snapshot {
        tracing::info!(
            "a retroactive pricing change follows the snapshot, or the ids its fold skipped \
             could not be vouched for; folding the whole log"
        );
    }
    let _sharing = SharingLabels::start();
    let l = ledger::fold(|| store.read_from(1)).map_err(|e| e.to_string())?;
    let past = l.last_seq();
    Ok((l, past))
}

/// Events per chunk handed from the decoding thread to the folding one at recovery: a chunk
/// (~1 MB decoded) is still in the caches when the fold reads it. 1,024 against 4,096, runs
/// paired (`bursar-bench replay`, 2026-12-05): 2 M events 690–766 K against 590–699 K
/// events/s, 10 M 524–606 K against 513–516 K.
const RECOVER_CHUNK_EVENTS: usize = 1024;
/// Chunks decoded ahead of the fold at recovery.
const RECOVER_CHUNKS_AHEAD: usize = 8;
/// The reading thread hashes the events of the next chunk itself while at least this many
/// chunks it sent are not folded yet (it is ahead); else the fold hashes them ([`decode_ahead`]).
const RECOVER_HASH_AHEAD: usize = RECOVER_CHUNKS_AHEAD / 2;

/// Records decoded on the reading thread, in log order, each with its bytes as decoded (the
/// hashes of its events and their chain not yet checked); an error ends them.
type Chunk = Vec<Result<(Vec<u8>, Vec<Deferred>), LogError>>;

/// Fold the log after `l` into `l` in one pass. Returns false (leaving `l` half-folded) when a
/// `pricing_changed` turned out to be retroactive, or the ids the fold skipped could not be
/// vouched for (`Ledger::begin_long_fold_until`: times that step back, a window that grew), so
/// the caller must fold in two passes.
///
/// Every event folded is checked first (its hash against its bytes, its link to the one
/// before: `crate::log::ChainCheck`); after a snapshot, `anchor` is the seq and hash of the
/// snapshot's last event, which the log must hold.
///
/// The records are read and decoded on a second thread, a few chunks ahead of the fold,
/// without receipts, which the fold never reads, each recurring label set decoded once and
/// each event's bytes hashed there ([`decode_ahead`]); the folding thread checks the chain, folds each event
/// where it lies, and hands each chunk back to be freed on the thread that allocated it
/// (freeing another thread's allocations goes through that heap's queue in mimalloc).
/// Measured in benches/README.md, "Replay: two threads, each its share".
fn one_pass_fold(
    store: &dyn LogStore,
    l: &mut Ledger,
    anchor: Option<(u64, Hash32)>,
) -> Result<bool, String> {
    let from = anchor.map_or(1, |a| a.0);
    // Chunks folded so far: the reading thread reads from it how far ahead it is.
    let folded_chunks = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(RECOVER_CHUNKS_AHEAD);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Chunk>(RECOVER_CHUNKS_AHEAD);
        let folded_count = &folded_chunks;
        // Made here: the store is not shared with the thread, its reader is.
        let records = store.read_records_from(from);
        let decoder = std::thread::Builder::new()
            .name("bursar-recover".into())
            .spawn_scoped(scope, move || {
                // The label sets it decodes again and again, decoded once each.
                let _sharing = SharingLabels::start();
                without_receipts(|| decode_ahead(records, &tx, &done_rx, folded_count));
            })
            .map_err(|e| format!("cannot start the recovery reader: {e}"))?;
        // Most ids a long fold indexes it forgets again before its end: indexed once, at the
        // end; the shared label sets are matched by where they live
        // (`Ledger::begin_long_fold`).
        // Ids that the log's last event forgets are not even queued; if the fold cannot vouch
        // for that (its times step back, its window grew), it is done again without.
        match store.head() {
            Some((_, _, last_ts)) => l.begin_long_fold_until(last_ts),
            None => l.begin_long_fold(),
        }
        let folded = fold_chunks(l, anchor, from, &rx, &done_tx, &folded_chunks);
        let complete = l.end_long_fold();
        let folded = match folded {
            Ok(true) if !complete => {
                tracing::info!(
                    "the ids the fold skipped could not be vouched for (times that step back, \
                     a window that grew): folding the log again, every id kept"
                );
                Ok(false)
            }
            other => other,
        };
        drop(rx);
        drop(done_tx);
        decoder
            .join()
            .map_err(|_| "the recovery reader panicked".to_string())?;
        folded
    })
}

/// The reading thread: decode `records` into chunks for the fold, and free what it hands back.
///
/// Hashing each event's bytes for the chain check (BLAKE3, a sixth of this thread's work) is
/// done on whichever thread has the time: here while this thread is ahead (at least
/// [`RECOVER_HASH_AHEAD`] of the chunks it sent not folded yet, counted by `folded`), else on
/// the folding thread, which hashes whatever was not hashed here. Either thread may be the
/// busier one: the reading one on the bench's log, where label sets recur, the folding one
/// where each event brings a scope of its own (benches/README.md, "Replay: hashing where
/// there is time").
fn decode_ahead(
    records: crate::log::StoredRecords<'_>,
    tx: &std::sync::mpsc::SyncSender<Chunk>,
    done: &std::sync::mpsc::Receiver<Chunk>,
    folded: &AtomicUsize,
) {
    let mut chunk = Chunk::new();
    let mut events = 0usize;
    let mut sent = 0usize;
    let mut hash_here = false;
    for r in records {
        let mut decoded = r.and_then(|(key, bytes)| decode_deferred_at(key, &bytes));
        if let (true, Ok((bytes, record))) = (hash_here, &mut decoded) {
            // A hash that cannot be computed is left to the fold, which reports it.
            event::hash_all(bytes, record);
        }
        let failed = decoded.is_err();
        events += decoded.as_ref().map_or(1, |(_, v)| v.len());
        chunk.push(decoded);
        if events >= RECOVER_CHUNK_EVENTS || failed {
            events = 0;
            if tx.send(std::mem::take(&mut chunk)).is_err() {
                // The fold stopped early (a retroactive price change, an error): stop reading.
                return;
            }
            if failed {
                return;
            }
            sent += 1;
            // The fold may count a chunk before `sent` does: not behind then.
            let behind = sent.saturating_sub(folded.load(Ordering::Relaxed));
            hash_here = behind >= RECOVER_HASH_AHEAD;
            while let Ok(returned) = done.try_recv() {
                drop(returned);
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(chunk);
    }
    // What the fold hands back from now on is freed there.
}

/// The folding thread: check and fold the chunks in order. Ok(false) at a retroactive
/// `pricing_changed` (not folded).
fn fold_chunks(
    l: &mut Ledger,
    anchor: Option<(u64, Hash32)>,
    from: u64,
    rx: &std::sync::mpsc::Receiver<Chunk>,
    done: &std::sync::mpsc::SyncSender<Chunk>,
    folded: &AtomicUsize,
) -> Result<bool, String> {
    let mut chain = ChainCheck::new(from);
    let mut anchored = anchor.is_none();
    let mut last_ts = l.last_ts();
    let mut folded_any = l.last_seq() > 0;
    for mut chunk in rx.iter() {
        for record in &mut chunk {
            let (bytes, events) = match record {
                Ok(r) => r,
                Err(e) => return Err(from_the_log(e)),
            };
            // What the reading thread left, side by side (`chain_hash_many`).
            event::hash_all(bytes, events);
            for d in events.iter() {
                let env = &d.env;
                let hash = d.content_hash(bytes).map_err(|e| {
                    from_the_log(&LogError::Corrupt {
                        seq: env.seq,
                        reason: e.to_string(),
                    })
                })?;
                if !chain
                    .check_hashed(env, hash)
                    .map_err(|e| from_the_log(&e))?
                {
                    continue;
                }
                if !anchored {
                    anchored = true;
                    // The snapshot's last event, as the log holds it (checked against the
                    // events before it in its record): not folded again.
                    match at_anchor(anchor, env) {
                        Some(e) => return Err(from_the_log(&e)),
                        None => continue,
                    }
                }
                if let EventBody::PricingChanged(p) = &env.body {
                    if folded_any && p.effective_from <= last_ts {
                        return Ok(false);
                    }
                }
                last_ts = last_ts.max(env.ts);
                folded_any = true;
                l.apply(env.seq, env.ts, &env.body)
                    .map_err(|e| ledger::FoldError::from(e).to_string())?;
            }
        }
        folded.fetch_add(1, Ordering::Relaxed);
        // Freed on the reading thread; here when it has stopped taking them.
        let _ = done.try_send(chunk);
    }
    if !anchored {
        if let Some((seq, _)) = anchor {
            return Err(from_the_log(&LogError::Corrupt {
                seq,
                reason: "the snapshot was taken after this event, which the log does not hold"
                    .into(),
            }));
        }
    }
    Ok(true)
}

/// A failed read as a fold reports it.
fn from_the_log(e: &LogError) -> String {
    ledger::FoldError::Source(e.to_string()).to_string()
}

/// `None` when `first`, the first event read after a snapshot, is the snapshot's last one
/// (`anchor`), else the error.
fn at_anchor(anchor: Option<(u64, Hash32)>, first: &Envelope) -> Option<LogError> {
    let (seq, hash) = anchor?;
    if first.seq == seq && first.hash == hash {
        None
    } else if first.seq == seq {
        Some(LogError::Corrupt {
            seq,
            reason: "the log's event differs from the one the snapshot was taken after (its \
                     hash)"
                .into(),
        })
    } else {
        Some(LogError::Corrupt {
            seq,
            reason: "the snapshot was taken after this event, which the log does not hold".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::log::testing::{tamper_rewrite, write_sample_batches};
    use crate::log::SledLog;
    use bursar_schemas::event::ReservationExpired;

    /// Fold a log of 10,000 events in records of 100, the event at `seq` rewritten: its error.
    ///
    /// A chunk is 11 records (1,100 events, the first past 1,024). The reader runs to the end
    /// before the fold begins (room for every chunk), so nothing is folded while it reads: it
    /// leaves the first four chunks to the fold and hashes the fifth on (seqs from 4,401)
    /// itself, whatever the machine's speed.
    fn fold_after_reader_with_event_rewritten(seq: u64) -> String {
        let tmp = tempfile::tempdir().unwrap();
        write_sample_batches(&mut SledLog::open(tmp.path()).unwrap(), &[100; 100]);
        tamper_rewrite(tmp.path(), seq, |e| {
            e.body = EventBody::ReservationExpired(ReservationExpired {
                reservation_id: "someone else's".into(),
            })
        })
        .unwrap();
        let store = SledLog::open(tmp.path()).unwrap();
        let records = store.read_records_from(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(64);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Chunk>(RECOVER_CHUNKS_AHEAD);
        let folded = AtomicUsize::new(0);
        decode_ahead(records, &tx, &done_rx, &folded);
        drop(tx);
        let mut l = Ledger::default();
        fold_chunks(&mut l, None, 1, &rx, &done_tx, &folded).unwrap_err()
    }

    /// Either side of the boundary between the chunks the fold hashes and those the reading
    /// thread hashes, and the last full chunk (the store opens only with its last record
    /// sound): a rewritten event stops the fold, naming its seq, whichever thread hashed it.
    #[test]
    fn a_damaged_event_stops_the_fold_whichever_thread_hashed_it() {
        for seq in [1, 4_400, 4_401, 6_000, 9_900] {
            let err = fold_after_reader_with_event_rewritten(seq);
            assert!(err.contains(&format!("seq {seq}")), "{seq}: {err}");
        }
    }
}
