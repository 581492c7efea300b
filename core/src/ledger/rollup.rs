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
use std::sync::Arc;

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
/// Events come in time order (every `ts` is the daemon's, never earlier than the one before),
/// so a slot's cells stop changing once an event of a later slot comes: they are then
/// **sealed** into an immutable, packed `SealedSlot` shared by every clone. Only the newest
/// slot's cells are a map. Cloning the rollups (which the writer does for every snapshot) thus copies a list of
/// pointers and one slot, not months of cells, and folding an event touches one small map.
///
/// Serialised as the sets and every cell sorted by (slot, set), so that equal rollups encode
/// equally; the lookup tables are rebuilt when read back.
#[derive(Clone, Default, Deserialize)]
#[serde(from = "RollupIn")]
pub struct Rollups {
    /// The label sets, by id.
    sets: SetStore,
    /// (hash of its labels, set id) of every set, by that hash. The hash is kept so that
    /// growing the table does not hash every set's labels again (that rehash, on a fold's
    /// path, took ~10 ms at ~100,000 sets: benches/README.md "Follower lag"); 32 bits of it,
    /// so that an entry takes 8 bytes.
    index: hashbrown::HashTable<(u32, u32)>,
    /// Cells of slots that are over, slot by slot in time order.
    sealed: Vec<Arc<SealedSlot>>,
    /// The newest slot (when `open` has cells).
    open_slot: i64,
    /// Its cells, by set.
    open: OpenCells,
}

/// The rollups as written: the label sets, then every cell sorted by (slot, set).
#[cfg(test)]
#[derive(Serialize)]
struct RollupData {
    sets: Vec<Labels>,
    cells: Vec<(i64, u32, Cell)>,
}

/// [`RollupData`] as read back, its cells packed slot by slot as they come.
#[derive(Deserialize)]
#[serde(rename = "RollupData")]
struct RollupIn {
    sets: Vec<Labels>,
    cells: CellsIn,
}

impl From<RollupIn> for Rollups {
    fn from(d: RollupIn) -> Rollups {
        let mut sets = SetStore::default();
        for l in &d.sets {
            sets.push(l.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let mut index = hashbrown::HashTable::with_capacity(sets.len());
        for (id, labels) in sets.iter().enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            let hash = hash_of(labels.iter());
            index.insert_unique(spread(hash), (hash, id), |&(h, _)| spread(h));
        }
        let n = sets.len();
        let cells = d.cells;
        let sealed = if cells.in_order && cells.max_set.is_none_or(|m| (m as usize) < n) {
            cells.sealed
        } else {
            // Not as `Rollups` writes them (cells out of order, or of sets it does not have):
            // sorted, summed and those of unknown sets left out, as they always were.
            let mut all: Vec<(i64, u32, Cell)> = cells
                .sealed
                .iter()
                .flat_map(|s| s.iter().map(|(id, c)| (s.slot, id, c)))
                .collect();
            drop(cells.sealed);
            all.retain(|(_, set, _)| (*set as usize) < n);
            merge_in_place(&mut all);
            all.chunk_by(|a, b| a.0 == b.0)
                .map(|slot| {
                    let cells = slot.iter().map(|(_, set, cell)| (*set, *cell));
                    Arc::new(SealedSlot::of(slot[0].0, cells))
                })
                .collect()
        };
        Rollups {
            sets,
            index,
            sealed,
            open_slot: i64::MIN,
            open: Default::default(),
        }
    }
}

/// A snapshot's cells, packed slot by slot while they are read. Read into one `Vec` of
/// 64-byte cells first, the 4.4 M cells of the bench's 10 M-event log took 282 MB, grown by
/// doubling into fresh pages the kernel zeroes: 57 % of the samples of a start-up from that
/// log's snapshot (benches/README.md, "Replay: sealed slots packed").
struct CellsIn {
    sealed: Vec<Arc<SealedSlot>>,
    /// True while each (slot, set) came after the one before, as [`Rollups`] writes them.
    in_order: bool,
    /// The largest set id read.
    max_set: Option<u32>,
}

impl<'de> Deserialize<'de> for CellsIn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CellsIn, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CellsIn;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence of rollup cells")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CellsIn, A::Error> {
                let mut out = CellsIn {
                    sealed: Vec::new(),
                    in_order: true,
                    max_set: None,
                };
                // The cells of the slot being read.
                let mut slot_cells: Vec<(u32, Cell)> = Vec::new();
                let mut last: Option<(i64, u32)> = None;
                while let Some((slot, set, cell)) = seq.next_element::<(i64, u32, Cell)>()? {
                    if let Some((s, id)) = last {
                        out.in_order &= (slot, set) > (s, id);
                        if slot != s {
                            out.seal(s, &mut slot_cells);
                        }
                    }
                    out.max_set = out.max_set.max(Some(set));
                    slot_cells.push((set, cell));
                    last = Some((slot, set));
                }
                if let Some((s, _)) = last {
                    out.seal(s, &mut slot_cells);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

impl CellsIn {
    /// Pack `cells` as the slot `slot`, leaving `cells` empty.
    fn seal(&mut self, slot: i64, cells: &mut Vec<(u32, Cell)>) {
        let packed = SealedSlot::of(slot, cells.iter().copied());
        self.sealed.push(Arc::new(packed));
        cells.clear();
    }
}

/// Shards of the open slot's cells (a power of two), by the set id's low bits. One map of
/// every set's cell doubled in one go: at 114,688 label sets in a slot the insert that grew it
/// took 107–118 ms (`bursar-bench stalls`, benches/README.md "Follower lag"); a shard grows
/// alone.
const OPEN_SHARDS: usize = 256;
const OPEN_SHIFT: u32 = OPEN_SHARDS.trailing_zeros();

/// The open slot's cells by set id: shard `id % OPEN_SHARDS`, keyed there by `id /
/// OPEN_SHARDS` (dense, so the shard's own hash spreads them).
#[derive(Clone)]
struct OpenCells {
    shards: Box<[hashbrown::HashMap<u32, Cell, rustc_hash::FxBuildHasher>]>,
}

impl Default for OpenCells {
    fn default() -> OpenCells {
        OpenCells {
            shards: (0..OPEN_SHARDS).map(|_| Default::default()).collect(),
        }
    }
}

impl OpenCells {
    fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// The cell of `set`, made empty if new.
    fn cell(&mut self, set: u32) -> &mut Cell {
        self.shards[set as usize & (OPEN_SHARDS - 1)]
            .entry(set >> OPEN_SHIFT)
            .or_default()
    }

    /// Every (set, cell), emptying it (each shard keeps its room for the next slot).
    fn drain(&mut self) -> impl Iterator<Item = (u32, Cell)> + '_ {
        self.shards.iter_mut().enumerate().flat_map(|(i, shard)| {
            shard
                .drain()
                .map(move |(high, c)| ((high << OPEN_SHIFT) | i as u32, c))
        })
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &Cell)> + '_ {
        self.shards.iter().enumerate().flat_map(|(i, shard)| {
            shard
                .iter()
                .map(move |(high, c)| ((high << OPEN_SHIFT) | i as u32, c))
        })
    }
}

/// The cells of a slot that is over, packed: for each cell its set id, then its six sums, as
/// LEB128 numbers (the cost zigzagged, so that a negative one stays short), in no particular
/// order.
///
/// As `(slot, set, Cell)` a cell took 64 bytes: 4.4 M cells, 282 MB, in a ledger folded from
/// the bench's 10 M-event log, and the kernel zeroing fresh pages for them was 4.5 % of that
/// start-up's samples (benches/README.md, "Replay: sealed slots packed"). A typical cell packs
/// into ~10 bytes; a report reads them ~7 ns a cell slower.
struct SealedSlot {
    /// The slot (Unix seconds).
    slot: i64,
    /// Cells in `bytes`.
    cells: usize,
    bytes: Box<[u8]>,
}

/// The numbers a cell is packed as, in order.
fn cell_numbers(set: u32, c: &Cell) -> [u64; 7] {
    [
        u64::from(set),
        zigzag(c.cost_micros),
        c.input_tokens,
        c.cached_input_tokens,
        c.output_tokens,
        c.requests,
        c.denied,
    ]
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bytes of `v` as LEB128.
fn leb128_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Append `v` as LEB128 (7 bits a byte, low first; the high bit set on all but the last).
fn push_leb128(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The LEB128 number at the start of `bytes` and the bytes after it; `None` when it is cut
/// short or longer than 64 bits.
fn read_leb128(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((v, bytes.get(i + 1..)?));
        }
    }
    None
}

impl SealedSlot {
    /// Bytes the cell of `set` takes packed.
    fn packed_len(set: u32, c: &Cell) -> usize {
        cell_numbers(set, c).into_iter().map(leb128_len).sum()
    }

    /// `cells` packed into `bytes` bytes (their [`SealedSlot::packed_len`]s' sum): one
    /// allocation of its final size.
    fn with_len(slot: i64, cells: impl Iterator<Item = (u32, Cell)>, bytes: usize) -> SealedSlot {
        let mut out = Vec::with_capacity(bytes);
        let mut n = 0;
        for (set, c) in cells {
            for v in cell_numbers(set, &c) {
                push_leb128(&mut out, v);
            }
            n += 1;
        }
        debug_assert_eq!(out.len(), bytes, "sealed slot sized as packed");
        SealedSlot {
            slot,
            cells: n,
            bytes: out.into_boxed_slice(),
        }
    }

    /// `cells` packed.
    fn of(slot: i64, cells: impl Iterator<Item = (u32, Cell)> + Clone) -> SealedSlot {
        let bytes = cells.clone().map(|(s, c)| Self::packed_len(s, &c)).sum();
        Self::with_len(slot, cells, bytes)
    }

    /// Each (set, cell).
    fn iter(&self) -> impl Iterator<Item = (u32, Cell)> + '_ {
        let mut rest: &[u8] = &self.bytes;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let mut v = [0u64; 7];
            for n in &mut v {
                let Some((got, after)) = read_leb128(rest) else {
                    // Packed here, by `with_len`: never cut short.
                    debug_assert!(false, "a sealed slot's cells cut short");
                    return None;
                };
                (*n, rest) = (got, after);
            }
            let [set, cost, input, cached, output, requests, denied] = v;
            let cell = Cell {
                cost_micros: unzigzag(cost),
                input_tokens: input,
                cached_input_tokens: cached,
                output_tokens: output,
                requests,
                denied,
            };
            Some((u32::try_from(set).unwrap_or(u32::MAX), cell))
        })
    }
}

/// Sort `cells` by (slot, set) and sum the cells of equal keys into one.
fn merge_in_place(cells: &mut Vec<(i64, u32, Cell)>) {
    cells.sort_unstable_by_key(|(s, id, _)| (*s, *id));
    cells.dedup_by(|later, kept| {
        let same = later.0 == kept.0 && later.1 == kept.1;
        if same {
            kept.2.add(&later.2);
        }
        same
    });
}

/// Written as `RollupData` is, straight from the packed sets: through `RollupData` (serde's
/// `into`), a snapshot cloned the rollups and made every set a `BTreeMap` again, ~800 bytes a
/// set (heaptrack on a daemon with 200,000 sets: 141 MB of the snapshot's 369 MB peak).
impl Serialize for Rollups {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
        struct Set<'a>(LabelSet<'a>);
        impl Serialize for Set<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut m = serializer.serialize_map(Some(self.0.iter().count()))?;
                for (k, v) in self.0.iter() {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
        struct Sets<'a>(&'a SetStore);
        impl Serialize for Sets<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut q = serializer.serialize_seq(Some(self.0.len()))?;
                for set in self.0.iter() {
                    q.serialize_element(&Set(set))?;
                }
                q.end()
            }
        }
        let mut cells: Vec<(i64, u32, Cell)> = self.cells_by_set().collect();
        merge_in_place(&mut cells);
        let mut st = serializer.serialize_struct("RollupData", 2)?;
        st.serialize_field("sets", &Sets(&self.sets))?;
        st.serialize_field("cells", &cells)?;
        st.end()
    }
}

/// The form before [`Rollups`] serialized itself (the tests check both write the same bytes).
#[cfg(test)]
impl From<Rollups> for RollupData {
    fn from(r: Rollups) -> RollupData {
        let mut cells: Vec<(i64, u32, Cell)> = r.cells_by_set().collect();
        merge_in_place(&mut cells);
        RollupData {
            sets: r.sets.iter().map(|s| s.to_labels()).collect(),
            cells,
        }
    }
}

impl PartialEq for Rollups {
    fn eq(&self, o: &Self) -> bool {
        // By content: the same sums for the same labels and slots (ids may differ).
        let content = |r: &Rollups| -> std::collections::BTreeMap<(i64, Labels), Cell> {
            let mut m = std::collections::BTreeMap::new();
            for (slot, id, cell) in r.cells_by_set() {
                if let Some(l) = r.sets.get(id as usize) {
                    m.entry((slot, l.to_labels()))
                        .or_insert_with(Cell::default)
                        .add(&cell);
                }
            }
            m
        };
        content(self) == content(o)
    }
}

impl std::fmt::Debug for Rollups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rollups({} label sets, {} cells)",
            self.sets.len(),
            self.len()
        )
    }
}

fn hash_of<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> u32 {
    use std::hash::Hasher;
    let mut h = rustc_hash::FxHasher::default();
    for (k, v) in labels {
        h.write(k.as_bytes());
        h.write_u8(0xFF);
        h.write(v.as_bytes());
        h.write_u8(0xFF);
    }
    let h = h.finish();
    (h >> 32) as u32 ^ h as u32
}

/// The table hash of a set's 32-bit hash (hashbrown takes its control bits from the top).
fn spread(h: u32) -> u64 {
    u64::from(h).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// True when `labels` yields exactly the pairs of `set`, in order.
fn same<'a>(set: LabelSet<'_>, mut labels: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    for (k, v) in set.iter() {
        match labels.next() {
            Some((k2, v2)) if k == k2 && v == v2 => {}
            _ => return false,
        }
    }
    labels.next().is_none()
}

/// A label set packed: its (key, value) pairs in key order, each string after its length
/// (LEB128: one byte under 128). A `BTreeMap<String, String>` of the bench's four labels took
/// ~800 bytes (a B-tree leaf of capacity 11 and eight strings) and made the rollups most of a
/// ledger's memory per scope (`bursar-bench memory`: 1,125 bytes per bucket with rollups, 427
/// without); packed with u32 lengths, ~130 (heaptrack: 25.8 MB for 200,000 sets); one-byte
/// lengths take 24 of those off. The bytes live in a `SetStore`'s chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LabelSet<'a>(&'a [u8]);

/// Append `pairs` packed (see [`LabelSet`]) to `bytes`.
fn pack_into<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>, bytes: &mut Vec<u8>) {
    for (k, v) in pairs {
        for s in [k, v] {
            push_leb128(bytes, s.len() as u64);
            bytes.extend_from_slice(s.as_bytes());
        }
    }
}

impl<'a> LabelSet<'a> {
    /// The (key, value) pairs, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + Clone + 'a {
        let mut strings = Strings(self.0);
        std::iter::from_fn(move || Some((strings.next()?, strings.next()?)))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// As a label map.
    pub fn to_labels(&self) -> Labels {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

impl std::fmt::Debug for LabelSet<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Label sets per chunk of a [`SetStore`] (a power of two).
const SETS_PER_CHUNK: usize = 1024;

/// The interned label sets, by id: their packed bytes one after another in chunks of
/// [`SETS_PER_CHUNK`] sets, each chunk one allocation of bytes and one of ends. Each set in an
/// `Arc<[u8]>` of its own took 94 bytes a set (heaptrack, `bursar-bench memory-ledger 200000`:
/// 18.9 MB for 200,000 sets of ~60 packed bytes: the pointer, the counts, the allocator's size
/// class); here a set takes its bytes and 4 bytes of end. A full chunk is shared by every clone
/// (the writer clones the ledger for each snapshot) and never moves; only the last grows, and
/// a clone copies at most that one when it pushes.
#[derive(Clone, Default)]
struct SetStore {
    chunks: Vec<Arc<SetChunk>>,
    len: usize,
}

#[derive(Clone, Default)]
struct SetChunk {
    bytes: Vec<u8>,
    /// Where each set's bytes end in `bytes`.
    ends: Vec<u32>,
}

impl SetStore {
    fn len(&self) -> usize {
        self.len
    }

    /// Intern `pairs` as the next id.
    fn push<'a>(&mut self, pairs: impl Iterator<Item = (&'a str, &'a str)>) {
        if self
            .chunks
            .last()
            .is_none_or(|c| c.ends.len() >= SETS_PER_CHUNK)
        {
            if let Some(full) = self.chunks.last_mut().and_then(Arc::get_mut) {
                full.bytes.shrink_to_fit();
                full.ends.shrink_to_fit();
            }
            self.chunks.push(Arc::default());
        }
        if let Some(last) = self.chunks.last_mut() {
            let chunk = Arc::make_mut(last);
            pack_into(pairs, &mut chunk.bytes);
            chunk
                .ends
                .push(u32::try_from(chunk.bytes.len()).unwrap_or(u32::MAX));
            self.len += 1;
        }
    }

    fn get(&self, id: usize) -> Option<LabelSet<'_>> {
        let chunk = self.chunks.get(id / SETS_PER_CHUNK)?;
        let i = id % SETS_PER_CHUNK;
        let start = match i {
            0 => 0,
            _ => *chunk.ends.get(i - 1)? as usize,
        };
        let end = *chunk.ends.get(i)? as usize;
        chunk.bytes.get(start..end).map(LabelSet)
    }

    fn iter(&self) -> impl Iterator<Item = LabelSet<'_>> + '_ {
        (0..self.len).filter_map(|id| self.get(id))
    }
}

/// The strings of a packed [`LabelSet`], in order.
#[derive(Clone)]
struct Strings<'a>(&'a [u8]);

impl<'a> Iterator for Strings<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let (len, after) = read_leb128(self.0)?;
        let (s, rest) = after.split_at_checked(usize::try_from(len).ok()?)?;
        self.0 = rest;
        // Packed from `&str`s: always UTF-8.
        let s = std::str::from_utf8(s);
        debug_assert!(s.is_ok(), "a packed label set holds UTF-8");
        Some(s.unwrap_or(""))
    }
}

/// The slot holding `ts`.
pub fn slot_of(ts: TsMicros) -> i64 {
    ts.div_euclid(SLOT_MICROS) * SLOT_SECONDS
}

impl Rollups {
    /// The id of a label set given as its kept labels, if known.
    fn find<'a>(&self, labels: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> Option<u32> {
        let hash = hash_of(labels.clone());
        self.index
            .find(spread(hash), |&(h, id)| {
                h == hash
                    && self
                        .sets
                        .get(id as usize)
                        .is_some_and(|s| same(s, labels.clone()))
            })
            .map(|&(_, id)| id)
    }

    /// The id of `labels` without `exclude`, interned when new.
    pub(crate) fn set_of(&mut self, labels: &Labels, exclude: &[String]) -> u32 {
        let kept = labels
            .iter()
            .filter(|(k, _)| !exclude.contains(k))
            .map(|(k, v)| (k.as_str(), v.as_str()));
        if let Some(id) = self.find(kept.clone()) {
            return id;
        }
        let hash = hash_of(kept.clone());
        let id = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        self.index
            .insert_unique(spread(hash), (hash, id), |&(h, _)| spread(h));
        self.sets.push(kept);
        id
    }

    /// Add `cell` to the slot of `ts` of the set `set` (an id [`Rollups::set_of`] gave).
    pub(crate) fn add_to(&mut self, ts: TsMicros, set: u32, cell: &Cell) {
        self.cell_at(ts, set).add(cell);
    }

    /// Count a denied reservation at `ts`.
    pub fn add_denied(&mut self, ts: TsMicros, labels: &Labels, exclude: &[String]) {
        let id = self.set_of(labels, exclude);
        let cell = self.cell_at(ts, id);
        cell.denied = cell.denied.saturating_add(1);
    }

    /// The open cell of `set` in the slot of `ts`, sealing the slot before it when `ts` is in
    /// a later one.
    fn cell_at(&mut self, ts: TsMicros, set: u32) -> &mut Cell {
        let slot = slot_of(ts);
        if slot != self.open_slot {
            // Events come in time order, so an earlier slot never comes back; if one did (a
            // bug), its cell would stand in a sealed array of its own and still be counted.
            debug_assert!(
                slot > self.open_slot || self.open.is_empty(),
                "rollup slot {slot} after slot {}",
                self.open_slot
            );
            self.seal();
            self.open_slot = slot;
        }
        self.open.cell(set)
    }

    /// Move the open slot's cells into a sealed slot.
    fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let bytes = self
            .open
            .iter()
            .map(|(id, c)| SealedSlot::packed_len(id, c))
            .sum();
        let sealed = SealedSlot::with_len(self.open_slot, self.open.drain(), bytes);
        debug_assert!(self.open.is_empty());
        self.sealed.push(Arc::new(sealed));
    }

    /// The label sets, by id.
    pub fn sets(&self) -> impl Iterator<Item = LabelSet<'_>> + '_ {
        self.sets.iter()
    }

    /// Every cell with its slot (Unix seconds) and the id of its label set ([`Rollups::sets`]),
    /// in no particular order (a key may come more than once; its cells add up).
    /// Slots come in time order.
    pub fn cells_by_set(&self) -> impl Iterator<Item = (i64, u32, Cell)> + '_ {
        self.sealed
            .iter()
            .flat_map(|sealed| sealed.iter().map(|(id, c)| (sealed.slot, id, c)))
            .chain(self.open.iter().map(|(id, c)| (self.open_slot, id, *c)))
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.sealed.iter().map(|s| s.cells).sum::<usize>() + self.open.len()
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(team: &str, session: &str) -> Labels {
        [("team", team), ("session", session)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SLOT: TsMicros = SLOT_SECONDS * 1_000_000;

    #[test]
    fn rollups_write_the_bytes_their_data_form_did_and_read_back_equal() {
        let mut r = Rollups::default();
        let usage = Usage {
            input_tokens: 10,
            ..Usage::default()
        };
        let mut multi = labels("équipe-α", "s-1");
        multi.insert("".into(), "empty key".into());
        multi.insert("model".into(), "x".repeat(300));
        for (i, ts) in [0, 1, SLOT, SLOT + 5, 3 * SLOT].into_iter().enumerate() {
            let l = if i == 2 {
                multi.clone()
            } else {
                labels("a", &format!("s-{}", i % 2))
            };
            let id = r.set_of(&l, &[]);
            r.add_to(ts, id, &Cell::of_usage(100 + i as i64, &usage));
        }
        r.add_denied(3 * SLOT + 1, &labels("b", "s-9"), &[]);
        let config = bincode::config::standard();
        let ours = bincode::serde::encode_to_vec(&r, config).unwrap();
        let before = bincode::serde::encode_to_vec(RollupData::from(r.clone()), config).unwrap();
        assert_eq!(ours, before);
        let back: Rollups = bincode::serde::decode_from_slice(&ours, config).unwrap().0;
        assert_eq!(back, r);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::to_value(RollupData::from(r.clone())).unwrap()
        );
    }

    #[test]
    fn slots_that_are_over_are_sealed_and_shared_by_clones_and_read_back_equal() {
        let exclude = ["session".to_string()];
        let mut r = Rollups::default();
        let usage = Usage {
            input_tokens: 10,
            ..Usage::default()
        };
        for (i, ts) in [0, 1, SLOT, SLOT + 5, 3 * SLOT].into_iter().enumerate() {
            let id = r.set_of(&labels("a", &format!("s-{i}")), &exclude);
            r.add_to(ts, id, &Cell::of_usage(100, &usage));
        }
        r.add_denied(3 * SLOT + 1, &labels("b", "s-9"), &exclude);
        // Sessions are left out: two sets (team a, team b), one cell per slot and set.
        assert_eq!(r.sets().count(), 2);
        assert_eq!(r.len(), 4);
        assert_eq!(r.sealed.len(), 2, "the first two slots are over");
        let copy = r.clone();
        assert!(
            Arc::ptr_eq(&r.sealed[0], &copy.sealed[0]),
            "shared, not copied"
        );
        let mut grown = copy.clone();
        let id = grown.set_of(&labels("a", "x"), &exclude);
        grown.add_to(4 * SLOT, id, &Cell::of_usage(7, &usage));
        assert_ne!(grown, r);
        assert_eq!(copy, r);
        let sums: i64 = r.cells_by_set().map(|(_, _, c)| c.cost_micros).sum();
        assert_eq!(sums, 500);
        let back: Rollups = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.len(), r.len());
    }

    #[test]
    fn the_cells_of_many_sets_in_one_slot_are_each_counted_once_and_sealed_with_their_set() {
        let mut r = Rollups::default();
        let usage = Usage::default();
        let n = OPEN_SHARDS * 3 + 7;
        for round in 0..2i64 {
            for i in 0..n {
                let id = r.set_of(&labels(&format!("t-{i}"), "s"), &[]);
                assert_eq!(id as usize, i, "ids in order of first sight");
                r.add_to(round, id, &Cell::of_usage(i as i64 + 1, &usage));
            }
        }
        assert_eq!(r.len(), n, "one open cell per set");
        let mut open: Vec<(u32, i64)> = r
            .cells_by_set()
            .map(|(slot, id, c)| {
                assert_eq!(slot, 0);
                (id, c.cost_micros)
            })
            .collect();
        open.sort_unstable();
        let want: Vec<(u32, i64)> = (0..n).map(|i| (i as u32, 2 * (i as i64 + 1))).collect();
        assert_eq!(open, want, "each set's two usages in its own cell");
        // The next slot seals them with their sets.
        let id = r.set_of(&labels("t-0", "s"), &[]);
        r.add_to(SLOT, id, &Cell::of_usage(1, &usage));
        assert_eq!(r.sealed.len(), 1);
        assert_eq!(r.sealed[0].slot, 0);
        let mut sealed: Vec<(u32, i64)> = r.sealed[0]
            .iter()
            .map(|(id, c)| (id, c.cost_micros))
            .collect();
        sealed.sort_unstable();
        assert_eq!(sealed, want);
        assert_eq!(r.len(), n + 1);
    }

    /// Cells read back are packed slot by slot as they come; cells not as the rollups write
    /// them (out of order, repeated, or of a set the snapshot does not have) are sorted,
    /// summed and the unknown ones left out, in either format.
    #[test]
    fn cells_read_back_in_any_order_count_once_each_and_only_for_known_sets() {
        let sets = vec![labels("a", "s"), labels("b", "s")];
        let cell = |cost: i64| Cell {
            cost_micros: cost,
            requests: 1,
            ..Cell::default()
        };
        let written = |cells: Vec<(i64, u32, Cell)>| RollupData {
            sets: sets.clone(),
            cells,
        };
        let content = |r: &Rollups| {
            let mut c: Vec<(i64, u32, i64, u64)> = r
                .cells_by_set()
                .map(|(slot, set, c)| (slot, set, c.cost_micros, c.requests))
                .collect();
            c.sort_unstable();
            c
        };
        let in_order = vec![(0, 0, cell(1)), (0, 1, cell(2)), (900, 1, cell(3))];
        let shuffled = vec![
            (900, 1, cell(3)),
            (0, 1, cell(2)),
            (0, 0, cell(1)),
            (0, 7, cell(50)),
            (0, 1, cell(10)),
        ];
        let cfg = bincode::config::standard();
        for (cells, want) in [
            (in_order, vec![(0, 0, 1, 1), (0, 1, 2, 1), (900, 1, 3, 1)]),
            (shuffled, vec![(0, 0, 1, 1), (0, 1, 12, 2), (900, 1, 3, 1)]),
        ] {
            let data = written(cells);
            let bytes = bincode::serde::encode_to_vec(&data, cfg).unwrap();
            let back: Rollups = bincode::serde::decode_from_slice(&bytes, cfg).unwrap().0;
            assert_eq!(content(&back), want);
            assert_eq!(back.sealed.len(), 2, "one sealed slot per slot");
            assert!(back.sealed.windows(2).all(|w| w[0].slot < w[1].slot));
            let json: Rollups =
                serde_json::from_str(&serde_json::to_string(&data).unwrap()).unwrap();
            assert_eq!(content(&json), want);
        }
    }

    #[test]
    fn a_sealed_slot_gives_back_every_cell_it_packed_down_to_the_extremes() {
        let big = Cell {
            cost_micros: i64::MAX,
            input_tokens: u64::MAX,
            cached_input_tokens: 1 << 63,
            output_tokens: 127,
            requests: 128,
            denied: 16_384,
        };
        let small = Cell {
            cost_micros: i64::MIN,
            ..Cell::default()
        };
        let cells = vec![
            (u32::MAX, big),
            (0, Cell::default()),
            (7, small),
            (
                1 << 20,
                Cell {
                    cost_micros: -1,
                    ..big
                },
            ),
            (
                3,
                Cell::of_usage(
                    1_234,
                    &Usage {
                        input_tokens: 2_000,
                        output_tokens: 300,
                        ..Usage::default()
                    },
                ),
            ),
        ];
        let sealed = SealedSlot::of(-900, cells.iter().copied());
        assert_eq!(sealed.slot, -900);
        assert_eq!(sealed.cells, cells.len());
        assert_eq!(sealed.iter().collect::<Vec<_>>(), cells);
        // Packed as LEB128: the all-zero cell in 7 bytes, an everyday one in 13, the
        // extremes in up to 10 bytes a number.
        let len = |set, c| SealedSlot::packed_len(set, &c);
        assert_eq!(len(0, Cell::default()), 7);
        assert_eq!(len(3, cells[4].1), 1 + 2 + 2 + 1 + 2 + 1 + 1);
        assert_eq!(len(u32::MAX, big), 5 + 10 + 10 + 10 + 1 + 2 + 3);
        assert_eq!(
            sealed.bytes.len(),
            cells.iter().map(|(s, c)| len(*s, *c)).sum::<usize>()
        );
        // Zigzag keeps small costs of either sign short.
        for v in [0, 1, -1, 63, -64, 64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(leb128_len(zigzag(-64)), 1);
        assert_eq!(leb128_len(zigzag(64)), 2);
        // A number cut short, or longer than 64 bits, is not read.
        assert_eq!(read_leb128(&[0x80]), None);
        assert_eq!(read_leb128(&[0xFF; 11]), None);
        assert_eq!(read_leb128(&[0xAC, 0x02, 9]), Some((300, &[9u8][..])));
    }

    #[test]
    fn a_packed_label_set_reads_back_every_pair_in_key_order() {
        let mut l = labels("équipe-α", "");
        l.insert("model".into(), "gpt-4o".into());
        l.insert("".into(), "empty key".into());
        let mut store = SetStore::default();
        store.push(l.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        store.push(std::iter::empty());
        let set = store.get(0).unwrap();
        assert_eq!(set.to_labels(), l);
        let pairs: Vec<(&str, &str)> = set.iter().collect();
        assert_eq!(
            pairs,
            [
                ("", "empty key"),
                ("model", "gpt-4o"),
                ("session", ""),
                ("team", "équipe-α")
            ]
        );
        assert_eq!(set.get("team"), Some("équipe-α"));
        assert_eq!(set.get("session"), Some(""), "an empty value is a value");
        assert_eq!(set.get("org"), None);
        assert!(store.get(1).unwrap().iter().next().is_none());
        assert_eq!(format!("{set:?}").matches("gpt-4o").count(), 1);
        // Lengths of one, two and three bytes (127, 128, 16,384 and more).
        let mut long = Labels::new();
        for (k, n) in [
            ("a", 127),
            ("b", 128),
            ("c", 300),
            ("d", 16_384),
            ("e", 20_000),
        ] {
            long.insert(k.repeat(n), "v".repeat(n + 1));
        }
        store.push(long.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let set = store.get(2).unwrap();
        assert_eq!(set.to_labels(), long);
        assert_eq!(set.get(&"d".repeat(16_384)).map(str::len), Some(16_385));
        assert!(store.get(3).is_none());
    }

    #[test]
    fn interned_sets_keep_their_ids_across_chunks_and_a_clone_keeps_what_it_had() {
        let set = |i: usize| labels(&format!("team-{i}"), &format!("s-{}", i % 7));
        let mut store = SetStore::default();
        let n = SETS_PER_CHUNK * 2 + 10;
        for i in 0..n {
            let l = set(i);
            store.push(l.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        // A snapshot's clone shares the chunks; both then grow apart.
        let mut clone = store.clone();
        for i in n..n + SETS_PER_CHUNK {
            let l = set(i);
            store.push(l.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let other = labels("other", &i.to_string());
            clone.push(other.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        assert_eq!(store.len(), n + SETS_PER_CHUNK);
        assert_eq!(store.iter().count(), store.len());
        for (i, s) in store.iter().enumerate() {
            assert_eq!(s.to_labels(), set(i), "set {i}");
        }
        for i in 0..n + SETS_PER_CHUNK {
            let want = if i < n {
                set(i)
            } else {
                labels("other", &i.to_string())
            };
            assert_eq!(
                clone.get(i).unwrap().to_labels(),
                want,
                "the clone's set {i}"
            );
        }
    }
}
