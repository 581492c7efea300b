//! Recovery: the ledger at start, from the newest usable snapshot and the log after it.

use super::snapshots::{decode_snapshot, SNAPSHOT_FORMAT_V1, SNAPSHOT_FORMAT_V2};
use crate::log::{LogError, LogStore};
use bursar_core::ledger::{self, Ledger};
use bursar_schemas::event::{Envelope, EventBody};

/// Rebuild the ledger at start: the newest usable snapshot, then the log after it.
///
/// The log is read once: events are folded in order while every `pricing_changed` is checked
/// for retroactivity (an `effective_from` at or before the `ts` of an event already folded, which
/// a one-pass fold would have priced without it). Only then is the whole log folded again in
/// the two passes that define a fold (see `bursar_core::ledger::fold`). A log without a
/// retroactive price change is thus decoded once instead of twice.
pub fn recover(store: &dyn LogStore) -> Result<Ledger, String> {
    let from_snapshot = match store.latest_snapshot() {
        Ok(Some((seq, bytes))) => match decode_snapshot(&bytes) {
            Some(l) if l.last_seq() == seq => Some(l),
            None if matches!(
                bytes.first(),
                Some(&SNAPSHOT_FORMAT_V1 | &SNAPSHOT_FORMAT_V2)
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
    let mut l = from_snapshot.unwrap_or_default();
    if one_pass_fold(store, &mut l)? {
        return Ok(l);
    }
    if had_snapshot {
        tracing::info!("a retroactive pricing change follows the snapshot; folding the whole log");
    }
    ledger::fold(|| store.read_from(1)).map_err(|e| e.to_string())
}

/// Events per chunk handed from the decoding thread to the folding one at recovery.
const RECOVER_CHUNK_EVENTS: usize = 4096;
/// Chunks decoded ahead of the fold at recovery.
const RECOVER_CHUNKS_AHEAD: usize = 8;

/// Fold the log after `l` into `l` in one pass. Returns false (leaving `l` half-folded) when a
/// `pricing_changed` turned out to be retroactive, so the caller must fold in two passes.
///
/// Reading and decoding the log runs on a second thread, a few chunks ahead of the fold, so
/// the two halves of the work (about equal) overlap on two cores.
fn one_pass_fold(store: &dyn LogStore, l: &mut Ledger) -> Result<bool, String> {
    let mut last_ts = l.last_ts();
    let mut folded_any = l.last_seq() > 0;
    let mut retroactive = false;
    let source = store.read_from(l.last_seq() + 1);
    std::thread::scope(|scope| {
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Vec<Result<Envelope, LogError>>>(RECOVER_CHUNKS_AHEAD);
        let decoder = std::thread::Builder::new()
            .name("bursar-recover".into())
            .spawn_scoped(scope, move || {
                let mut chunk = Vec::with_capacity(RECOVER_CHUNK_EVENTS);
                for item in source {
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
