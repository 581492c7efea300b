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
    map: HashMap<String, IdEntry, rustc_hash::FxBuildHasher>,
    order: VecDeque<(TsMicros, String)>,
}

impl IdIndex {
    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<&IdEntry> {
        self.map.get(key)
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remember `key` (a later event with the same id, which the writer never appends, would
    /// take its place).
    pub fn insert(&mut self, key: String, entry: IdEntry) {
        self.order.push_back((entry.ts, key.clone()));
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
