//! Recovery: the ledger at start, from the newest usable snapshot and the log after it.

use super::snapshots::{
    decode_snapshot, SNAPSHOT_FORMAT_V1, SNAPSHOT_FORMAT_V2, SNAPSHOT_FORMAT_V3, SNAPSHOT_FORMAT_V4,
};
use crate::log::{check_durable_mark, LogError, LogStore};
use bursar_core::ledger::{self, Ledger};
use bursar_schemas::event::{Envelope, EventBody, Hash32};

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
        tracing::info!("a retroactive pricing change follows the snapshot; folding the whole log");
    }
    let l = ledger::fold(|| store.read_from(1)).map_err(|e| e.to_string())?;
    let past = l.last_seq();
    Ok((l, past))
}

/// Events per chunk handed from the decoding thread to the folding one at recovery.
const RECOVER_CHUNK_EVENTS: usize = 4096;
/// Chunks decoded ahead of the fold at recovery.
const RECOVER_CHUNKS_AHEAD: usize = 8;

/// Fold the log after `l` into `l` in one pass. Returns false (leaving `l` half-folded) when a
/// `pricing_changed` turned out to be retroactive, so the caller must fold in two passes.
///
/// Every event folded is checked as it is read (its hash against its bytes, its link to the
/// one before: see `crate::log::RecordEnvelopes`); after a snapshot, `anchor` is the seq and
/// hash of the snapshot's last event, which the log must hold.
///
/// Reading and decoding the log runs on a second thread, a few chunks ahead of the fold, so
/// the two halves of the work (about equal) overlap on two cores.
fn one_pass_fold(
    store: &dyn LogStore,
    l: &mut Ledger,
    anchor: Option<(u64, Hash32)>,
) -> Result<bool, String> {
    let mut last_ts = l.last_ts();
    let mut folded_any = l.last_seq() > 0;
    let mut retroactive = false;
    let mut source = store.read_from(anchor.map_or(1, |a| a.0));
    std::thread::scope(|scope| {
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Vec<Result<Envelope, LogError>>>(RECOVER_CHUNKS_AHEAD);
        let decoder = std::thread::Builder::new()
            .name("bursar-recover".into())
            .spawn_scoped(scope, move || {
                if let Some((seq, hash)) = anchor {
                    // The snapshot's last event, as the log holds it (checked against the
                    // events before it in its record).
                    let found = match source.next() {
                        Some(Ok(env)) if env.seq == seq && env.hash == hash => Ok(()),
                        Some(Ok(env)) if env.seq == seq => Err(LogError::Corrupt {
                            seq,
                            reason: "the log's event differs from the one the snapshot was \
                                     taken after (its hash)"
                                .into(),
                        }),
                        Some(Err(e)) => Err(e),
                        _ => Err(LogError::Corrupt {
                            seq,
                            reason: "the snapshot was taken after this event, which the log \
                                     does not hold"
                                .into(),
                        }),
                    };
                    if let Err(e) = found {
                        let _ = tx.send(vec![Err(e)]);
                        return;
                    }
                }
                let mut chunk = Vec::with_capacity(RECOVER_CHUNK_EVENTS);
                for item in source.by_ref() {
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
