//! Snapshots: a cache of the log's fold, taken every SNAPSHOT_EVERY_EVENTS events or
//! SNAPSHOT_EVERY_SECONDS, so that a start folds only the log after the newest one.

use super::{lock_store, read_ledger, Writer, SNAPSHOT_EVERY_EVENTS, SNAPSHOT_EVERY_SECONDS};
use bursar_core::ledger::Ledger;
use bursar_schemas::event::Hash32;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Format tag of the snapshots of the first release (ignored now: recovery folds the log).
pub const SNAPSHOT_FORMAT_V1: u8 = 1;
/// Format tag of the snapshots whose idempotency index was keyed by text (never released;
/// ignored like the first release's).
pub const SNAPSHOT_FORMAT_V2: u8 = 2;
/// Format tag of a snapshot value: the hash of the last event folded into it (32 bytes: the
/// head it continues, which recovery checks against the log), then LZ4 (block, size
/// prepended) of the bincode of the ledger, its policy and price tables as JSON inside (so
/// that they can grow keys without a new format), its idempotency index keyed by 128-bit id
/// hashes.
pub const SNAPSHOT_FORMAT_V3: u8 = 3;

/// Encode a snapshot of `l`, whose last event (`l.last_seq()`) has hash `head_hash`.
pub fn encode_snapshot(l: &Ledger, head_hash: Hash32) -> Option<Vec<u8>> {
    let plain = bincode::serde::encode_to_vec(l, bincode::config::standard()).ok()?;
    let mut out = Vec::with_capacity(plain.len() / 3 + 48);
    out.push(SNAPSHOT_FORMAT_V3);
    out.extend_from_slice(&head_hash.0);
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
    Some(out)
}

/// Largest decompressed snapshot accepted.
const MAX_SNAPSHOT_BYTES: usize = 4 << 30;

/// Decode a snapshot: the ledger and the hash of its last event. A snapshot is a cache of the
/// log's fold: one of an older format (or a damaged one) is `None`, and recovery folds the log
/// instead.
pub fn decode_snapshot(bytes: &[u8]) -> Option<(Ledger, Hash32)> {
    let (tag, rest) = bytes.split_first()?;
    if *tag != SNAPSHOT_FORMAT_V3 {
        return None;
    }
    let head_hash = Hash32(rest.get(..32)?.try_into().ok()?);
    let rest = rest.get(32..)?;
    // A damaged size is a miss, not an allocation.
    let size = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if size > MAX_SNAPSHOT_BYTES || size > rest.len().saturating_mul(255) {
        return None;
    }
    let plain = lz4_flex::block::decompress_size_prepended(rest).ok()?;
    bincode::serde::decode_from_slice(
        &plain,
        bincode::config::standard().with_limit::<{ 4 << 30 }>(),
    )
    .ok()
    .map(|(l, _)| (l, head_hash))
}

impl Writer {
    /// Take a snapshot when one is due (or `force`d and anything is new).
    pub(super) fn snapshot(&mut self, force: bool) {
        let due = self.since_snapshot >= SNAPSHOT_EVERY_EVENTS
            || (self.since_snapshot > 0
                && self.last_snapshot.elapsed() >= Duration::from_secs(SNAPSHOT_EVERY_SECONDS))
            || (force && self.since_snapshot > 0);
        if !due || self.shared.poisoned.load(Ordering::SeqCst) {
            return;
        }
        let (seq, bytes) = {
            let l = read_ledger(&self.shared);
            // Called between batches: every event the ledger folded is committed, the last one
            // with `prev_hash`.
            (l.last_seq(), encode_snapshot(&l, self.prev_hash))
        };
        let Some(bytes) = bytes else {
            tracing::warn!("cannot encode a snapshot");
            return;
        };
        match lock_store(&self.shared).put_snapshot(seq, &bytes) {
            Ok(()) => {
                tracing::debug!("snapshot at seq {seq} ({} bytes)", bytes.len());
                self.since_snapshot = 0;
                self.last_snapshot = std::time::Instant::now();
            }
            Err(e) => tracing::warn!("snapshot failed (the log is intact): {e}"),
        }
    }
}
