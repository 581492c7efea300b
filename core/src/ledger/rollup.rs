//! Report rollups (SPEC §11): spend per 15-minute slot per label set, a projection of the log
//! folded with everything else, so that a report reads rollups instead of rescanning the log.
//!
//! A slot is [`SLOT_SECONDS`] long: every IANA zone's offset is a whole number of quarter
//! hours, so hours, days, weeks and months of any zone are whole slots. A label set is an
//! event's labels (the derived `model`, `provider` and `tier` included) without the policy's
//! `[reports] exclude_labels` (default `session`: sessions are many and short, and would make
//! one set each). Costs are those of the fold, so a repricing shows in reports.

use bursar_schemas::wire::Usage;
use bursar_schemas::{Labels, Micros, TsMicros};
use serde::{Deserialize, Serialize};

/// Length of a rollup slot.
pub const SLOT_SECONDS: i64 = 900;
const SLOT_MICROS: i64 = SLOT_SECONDS * 1_000_000;

/// Sums of one slot and label set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Cost, micro-USD.
    pub cost_micros: Micros,
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Cached-input tokens.
    pub cached_input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Requests.
    pub requests: u64,
    /// Reservations denied.
    pub denied: u64,
}

impl Cell {
    /// What a usage event costing `cost` adds.
    pub fn of_usage(cost: Micros, usage: &Usage) -> Cell {
        Cell {
            cost_micros: cost,
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_tokens: usage.output_tokens,
            requests: usage.requests,
            denied: 0,
        }
    }

    /// Add `o` into `self`.
    pub fn add(&mut self, o: &Cell) {
        self.cost_micros = self.cost_micros.saturating_add(o.cost_micros);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_add(o.cached_input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.requests = self.requests.saturating_add(o.requests);
        self.denied = self.denied.saturating_add(o.denied);
    }
}

/// The rollups: interned label sets and the cells of each slot.
///
/// Serialised as the sets and the cells sorted by (slot, set), so that equal rollups encode
/// equally; the lookup tables are rebuilt when read back.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(from = "RollupData", into = "RollupData")]
pub struct Rollups {
    sets: Vec<Labels>,
    /// Set ids by the hash of their labels.
    index: hashbrown::HashTable<u32>,
    cells: hashbrown::HashMap<(i64, u32), Cell, rustc_hash::FxBuildHasher>,
}

#[derive(Serialize, Deserialize)]
struct RollupData {
    sets: Vec<Labels>,
    cells: Vec<(i64, u32, Cell)>,
}

impl From<RollupData> for Rollups {
    fn from(d: RollupData) -> Rollups {
        let sets = d.sets;
        let mut index = hashbrown::HashTable::with_capacity(sets.len());
        for (id, labels) in sets.iter().enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            index.insert_unique(hash_of(labels.iter()), id, |&i| {
                sets.get(i as usize).map_or(0, |l| hash_of(l.iter()))
            });
        }
        let n = sets.len();
        let mut cells =
            hashbrown::HashMap::with_capacity_and_hasher(d.cells.len(), rustc_hash::FxBuildHasher);
        for (slot, set, cell) in d.cells {
            if (set as usize) < n {
                cells.insert((slot, set), cell);
            }
        }
        Rollups { sets, index, cells }
    }
}

impl From<Rollups> for RollupData {
    fn from(r: Rollups) -> RollupData {
        let mut cells: Vec<(i64, u32, Cell)> =
            r.cells.into_iter().map(|((s, id), c)| (s, id, c)).collect();
        cells.sort_unstable_by_key(|(s, id, _)| (*s, *id));
        RollupData {
            sets: r.sets,
            cells,
        }
    }
}

impl PartialEq for Rollups {
    fn eq(&self, o: &Self) -> bool {
        // By content: the same sums for the same labels and slots (ids may differ).
        if self.cells.len() != o.cells.len() {
            return false;
        }
        self.cells.iter().all(|((slot, id), cell)| {
            self.sets
                .get(*id as usize)
                .and_then(|l| o.find(l.iter()))
                .and_then(|oid| o.cells.get(&(*slot, oid)))
                == Some(cell)
        })
    }
}

impl std::fmt::Debug for Rollups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rollups({} label sets, {} cells)",
            self.sets.len(),
            self.cells.len()
        )
    }
}

fn hash_of<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> u64 {
    use std::hash::Hasher;
    let mut h = rustc_hash::FxHasher::default();
    for (k, v) in labels {
        h.write(k.as_bytes());
        h.write_u8(0xFF);
        h.write(v.as_bytes());
        h.write_u8(0xFF);
    }
    h.finish()
}

/// True when `labels` yields exactly the pairs of `set`, in order.
fn same<'a>(set: &Labels, mut labels: impl Iterator<Item = (&'a String, &'a String)>) -> bool {
    for (k, v) in set {
        match labels.next() {
            Some((k2, v2)) if k == k2 && v == v2 => {}
            _ => return false,
        }
    }
    labels.next().is_none()
}

/// The slot holding `ts`.
pub fn slot_of(ts: TsMicros) -> i64 {
    ts.div_euclid(SLOT_MICROS) * SLOT_SECONDS
}

impl Rollups {
    /// The id of a label set given as its kept labels, if known.
    fn find<'a>(
        &self,
        labels: impl Iterator<Item = (&'a String, &'a String)> + Clone,
    ) -> Option<u32> {
        let hash = hash_of(labels.clone());
        self.index
            .find(hash, |&id| {
                self.sets
                    .get(id as usize)
                    .is_some_and(|s| same(s, labels.clone()))
            })
            .copied()
    }

    /// The id of `labels` without `exclude`, interned when new.
    pub(crate) fn set_of(&mut self, labels: &Labels, exclude: &[String]) -> u32 {
        let kept = labels.iter().filter(|(k, _)| !exclude.contains(k));
        if let Some(id) = self.find(kept.clone()) {
            return id;
        }
        let owned: Labels = kept.map(|(k, v)| (k.clone(), v.clone())).collect();
        let hash = hash_of(owned.iter());
        let id = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        let sets = &self.sets;
        self.index.insert_unique(hash, id, |&i| {
            sets.get(i as usize).map_or(0, |l| hash_of(l.iter()))
        });
        self.sets.push(owned);
        id
    }

    /// Add `cell` to the slot of `ts` of the set `set` (an id [`Rollups::set_of`] gave).
    pub(crate) fn add_to(&mut self, ts: TsMicros, set: u32, cell: &Cell) {
        self.cells.entry((slot_of(ts), set)).or_default().add(cell);
    }

    /// Count a denied reservation at `ts`.
    pub fn add_denied(&mut self, ts: TsMicros, labels: &Labels, exclude: &[String]) {
        let id = self.set_of(labels, exclude);
        let cell = self.cells.entry((slot_of(ts), id)).or_default();
        cell.denied = cell.denied.saturating_add(1);
    }

    /// Every cell with its slot (Unix seconds) and labels, in no particular order.
    pub fn cells(&self) -> impl Iterator<Item = (i64, &Labels, &Cell)> + '_ {
        self.cells
            .iter()
            .filter_map(|((slot, id), cell)| self.sets.get(*id as usize).map(|l| (*slot, l, cell)))
    }

    /// The label sets, by id.
    pub fn sets(&self) -> &[Labels] {
        &self.sets
    }

    /// Every cell with its slot (Unix seconds) and the id of its label set ([`Rollups::sets`]),
    /// in no particular order.
    pub fn cells_by_set(&self) -> impl Iterator<Item = (i64, u32, &Cell)> + '_ {
        self.cells
            .iter()
            .map(|((slot, id), cell)| (*slot, *id, cell))
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}
