//! The idempotency index: which request ids the log has seen, with the digest of each request
//! and the seq of the event that answered it.
//!
//! It is a projection like any other: `apply` adds the id of every `usage_recorded`
//! (`e/<event_id>`), `reservation_created` and `reservation_denied` (`r/<reservation_id>`) and
//! `reservation_released` (`x/<reservation_id>`), so a fold of the log rebuilds it, snapshots
//! carry it, and nothing but the log is written for it. An id is remembered for the policy's
//! `idempotency_window_seconds` of ledger time after its event; a request resent later counts
//! as new. The original answer of a duplicate is rendered from its event (and the event's
//! receipt), which the caller reads from the log by seq.

use bursar_schemas::TsMicros;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Which kind of id: ids of different kinds never collide (an `event_id` may equal a
/// `reservation_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// `usage_recorded`'s `event_id` (record, and commit's usage).
    Event,
    /// `reservation_created` / `reservation_denied`'s `reservation_id` (reserve).
    Reservation,
    /// `reservation_released`'s `reservation_id` (release).
    Release,
}

/// The key an id is remembered under: 128 bits of BLAKE3 over its kind and text. The index
/// holds no strings: a replay of 10 M events spent 2% of its time inserting `String` keys and
/// each key cost ~60 B of heap twice (map and order); a 128-bit hash collides with odds of
/// about n²/2¹²⁹, under 10⁻²⁰ for the 10⁹ ids of a busy year.
pub fn id_key(kind: IdKind, id: &str) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&[match kind {
        IdKind::Event => b'e',
        IdKind::Reservation => b'r',
        IdKind::Release => b'x',
    }]);
    h.update(id.as_bytes());
    let bytes = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&bytes.as_bytes()[..16]);
    u128::from_le_bytes(k)
}

/// What the index knows of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdEntry {
    /// Digest of the request that used it.
    pub digest: [u8; 16],
    /// The event that answered it.
    pub seq: u64,
    /// That event's `ts`.
    pub ts: TsMicros,
}

/// Ids and their entries, oldest first in `order` for pruning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdIndex {
    map: HashMap<u128, IdEntry, rustc_hash::FxBuildHasher>,
    order: VecDeque<(TsMicros, u128)>,
}

impl IdIndex {
    /// The entry of the id `id` of `kind`.
    pub fn get(&self, kind: IdKind, id: &str) -> Option<&IdEntry> {
        self.map.get(&id_key(kind, id))
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remember the id `id` of `kind` (a later event with the same id, which the writer never
    /// appends, would take its place).
    pub fn insert(&mut self, kind: IdKind, id: &str, entry: IdEntry) {
        let key = id_key(kind, id);
        self.order.push_back((entry.ts, key));
        self.map.insert(key, entry);
    }

    /// Forget the ids whose event is older than `horizon`.
    pub fn forget_before(&mut self, horizon: TsMicros) {
        while let Some((ts, _)) = self.order.front() {
            if *ts >= horizon {
                break;
            }
            if let Some((ts, key)) = self.order.pop_front() {
                if self.map.get(&key).is_some_and(|e| e.ts == ts) {
                    self.map.remove(&key);
                }
            }
        }
    }
}
