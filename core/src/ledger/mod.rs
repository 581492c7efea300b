//! The ledger: the projections that a fold of the log produces, and the decisions made on them.
//!
//! - [`Ledger::apply`] folds one event (after checking that its seq follows the last). Live
//!   serving folds what it emits through the same fold (`fold_next`), so a fold of the whole
//!   log always equals the live state.
//! - [`Ledger::execute`] decides one write command at time `now`, stamps the resulting events
//!   (dense `seq`, strictly increasing `ts`), applies them and returns the answer.
//! - [`Ledger::check`] and [`Ledger::status`] are read-only and never show an expired hold.
//!
//! Architecture invariant: nothing here reads a clock or touches I/O.

mod buckets;
mod chunked;
mod decide;
mod ended;
mod ids;
pub mod quotas;
mod replay;
mod report;
mod reports;
pub mod rollup;
mod whatif;

pub use decide::{Answer, Command, Decided, Keyed, Renderer, Reply, Step, Verdict};
pub use ids::{id_key, IdEntry, IdIndex, IdKind};
pub use replay::{
    collect_epochs, diff_rows, fold, fold_into, replay, replay_from_log, EpochDecl, FoldError,
    ReplayOutcome,
};
pub use report::DEFAULT_STATUS_LIMIT;
pub use whatif::{what_if, what_if_with};

use crate::labels::{scope_key, selector_matches};
use crate::pricing;
use crate::window::Amounts;
use buckets::{Bucket, BudgetState, Figures, Limits};
use bursar_schemas::event::{
    copy_short, json_inside, EventBody, EventLabels, ReservationLink, UsageRecorded,
};
use bursar_schemas::policy::{ResolvedPolicy, UnknownModels};
use bursar_schemas::pricing::{ModelPrice, PriceTable};
use bursar_schemas::wire::{BucketState, Usage};
use bursar_schemas::{Labels, Micros, TsMicros};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Ended reservations are remembered this long after they end (late commits, duplicate
/// releases, double commits); a commit later than that counts as one of an unknown reservation.
pub const ENDED_RESERVATION_MEMORY_SECONDS: i64 = 3600;
/// Hold output tokens for a model whose maximum output is unknown and the caller gave none.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;
/// Largest token total of a single event.
pub const MAX_EVENT_TOKENS: u64 = 1_000_000_000_000;
/// Key of the bucket that collects usage of new scopes once a budget has `max_keys_per_budget`.
pub const OVERFLOW_KEY: &str = "(overflow)";
/// Longest id (event or reservation) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Label sets whose matching buckets are remembered (two generations of half this size).
/// An entry is the label set packed into one allocation plus 8 bytes (budget, slot) per
/// matching budget: about 300 bytes for a typical event's six labels and 14 matching budgets,
/// so at most ~20 MB in all. Sized for tens of thousands of agents, sessions or users active at
/// once: a working set larger than a generation is matched again on every pass.
pub const MATCH_CACHE_ENTRIES: usize = 65_536;

/// A bucket's slot that is not known yet (its bucket did not exist when it was matched, or the
/// key went to the overflow bucket).
const NO_SLOT: u32 = u32::MAX;

/// One bucket an event with some labels counts in, in one word: its budget index (high 32
/// bits) and, once known, its slot in the budget's slab (low 32 bits, `NO_SLOT` until then).
/// (The scope key is rendered from the labels when the slot is not known.)
type MatchRef = u64;

fn match_ref(budget: usize, slot: u32) -> MatchRef {
    (u64::from(u32::try_from(budget).unwrap_or(u32::MAX)) << 32) | u64::from(slot)
}

fn ref_budget(r: MatchRef) -> usize {
    (r >> 32) as usize
}

fn ref_slot(r: MatchRef) -> u32 {
    (r & u64::from(u32::MAX)) as u32
}

/// One remembered label set, in one allocation: its buckets, then the labels packed (`name
/// 0xFF value 0xFF …`, in order; UTF-8 never contains 0xFF, so the packing is injective) in
/// little-endian words padded with zero bytes. One allocation means one cache miss, not two,
/// for a label set that has not been seen for a while.
#[derive(Clone)]
struct MatchEntry {
    hash: u64,
    /// Bytes of the packed labels (without padding).
    packed_len: u32,
    /// Buckets at the start of `data`.
    refs: u32,
    data: Box<[u64]>,
    /// The id of this label set in the report rollups, once known ([`NO_ROLLUP_SET`] before):
    /// the rollups find a usage event's set without hashing its labels again.
    rollup_set: u32,
    /// During a long fold, the last shared copy of this set an event brought
    /// ([`MatchCache::by_set`]): kept alive here, so that no other set can live where it lives.
    kept: Option<EventLabels>,
}

/// [`MatchEntry::rollup_set`] not looked up yet.
const NO_ROLLUP_SET: u32 = u32::MAX;

impl MatchEntry {
    fn new(hash: u64, packed: &Packed<'_>, refs: Vec<MatchRef>) -> MatchEntry {
        let n = refs.len();
        let mut data = refs;
        data.extend(packed.words());
        MatchEntry {
            hash,
            packed_len: u32::try_from(packed.len).unwrap_or(u32::MAX),
            refs: u32::try_from(n).unwrap_or(u32::MAX),
            data: data.into_boxed_slice(),
            rollup_set: NO_ROLLUP_SET,
            kept: None,
        }
    }

    /// True when this entry keeps `labels`' very copy (so it is of that set).
    fn keeps(&self, labels: &EventLabels) -> bool {
        self.kept.as_ref().is_some_and(|k| k.same_set(labels))
    }

    /// True when this entry is of the label set `packed` (hashed to `hash`).
    fn is(&self, hash: u64, packed: &Packed<'_>) -> bool {
        self.hash == hash
            && self.packed_len as usize == packed.len
            && self
                .data
                .get(self.refs as usize..)
                .is_some_and(|words| words.iter().copied().eq(packed.words()))
    }

    fn refs(&self) -> &[MatchRef] {
        self.data.get(..self.refs as usize).unwrap_or_default()
    }

    #[cfg(test)]
    fn refs_mut(&mut self) -> &mut [MatchRef] {
        let n = self.refs as usize;
        self.data.get_mut(..n).unwrap_or_default()
    }

    fn refs_and_rollup_mut(&mut self) -> (&mut [MatchRef], &mut u32) {
        let n = self.refs as usize;
        (
            self.data.get_mut(..n).unwrap_or_default(),
            &mut self.rollup_set,
        )
    }
}

/// A label set packed: `bytes` holds the packing and zero bytes up to a multiple of 8.
struct Packed<'a> {
    bytes: &'a [u8],
    len: usize,
}

impl Packed<'_> {
    fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.bytes
            .chunks_exact(8)
            .map(|c| c.try_into().map_or(0, u64::from_le_bytes))
    }
}

/// Packed label sets up to this many bytes are built on the stack.
const PACK_INLINE_BYTES: usize = 256;

/// Run `f` on `labels` packed and the packing's hash. A typical label set packs into a buffer
/// on the stack.
fn with_packed<R>(labels: &Labels, f: impl FnOnce(&Packed<'_>, u64) -> R) -> R {
    fn hash(padded: &[u8], len: usize) -> u64 {
        use std::hash::Hasher;
        let mut h = rustc_hash::FxHasher::default();
        h.write(padded);
        h.write_usize(len);
        h.finish()
    }
    let mut inline = [0u8; PACK_INLINE_BYTES];
    if let Some(len) = pack_into(labels, &mut inline) {
        let packed = Packed {
            bytes: inline.get(..len.div_ceil(8) * 8).unwrap_or_default(),
            len,
        };
        return f(&packed, hash(packed.bytes, len));
    }
    // A label set too long for the stack buffer.
    let len: usize = labels.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let padded = len.div_ceil(8) * 8;
    let mut heap = vec![0u8; padded + 8];
    let len = pack_into(labels, &mut heap).unwrap_or(0);
    let packed = Packed {
        bytes: heap.get(..padded).unwrap_or_default(),
        len,
    };
    f(&packed, hash(packed.bytes, len))
}

/// Pack `labels` (`name 0xFF value 0xFF …`) into the start of `out`; the packed length, or
/// `None` when it does not fit (with room to spare for the last 8-byte word).
fn pack_into(labels: &Labels, out: &mut [u8]) -> Option<usize> {
    let room = out.len().saturating_sub(8);
    let mut at = 0;
    for (k, v) in labels {
        for part in [k.as_bytes(), v.as_bytes()] {
            let n = part.len();
            let end = at + n;
            if end >= room {
                return None;
            }
            copy_short(&mut out[at..end], part);
            out[end] = 0xFF;
            at = end + 1;
        }
    }
    Some(at)
}

/// Which buckets a label set counts in, under the policy in force: derived data, not state.
/// Matching means a selector check per budget and a scope key rendered per matching budget;
/// the same label set (one agent session, say) usually comes back many times, so the answer is
/// kept, with the slot of each bucket once it exists (slots never change while a policy is in
/// force). Two generations bound it: a hit in the old one moves up, and the old one is dropped
/// when the new one is full. Never serialised or compared, and emptied when a policy is
/// installed.
#[derive(Default)]
struct MatchCache {
    new: hashbrown::HashTable<MatchEntry>,
    old: hashbrown::HashTable<MatchEntry>,
    /// During a long fold only ([`Ledger::begin_long_fold`]): the hash of each label set shared
    /// among the fold's events (`SharingLabels`) by where the set lives, direct-mapped, so that
    /// the next event with that very copy finds its entry without packing and hashing its
    /// labels again (replay profile: packing, hashing and comparing were ~25 % of the folding
    /// thread). Sound because an entry is found this way only when it keeps that very copy
    /// ([`MatchEntry::kept`]), which it holds alive: an address another set reused after the
    /// copy was freed cannot match. `(0, 0)` is an empty slot.
    by_set: Option<Box<[(usize, u64)]>>,
}

/// A copy of a ledger in a long fold is not in one: it matches by labels, keeping no set.
impl Clone for MatchCache {
    fn clone(&self) -> MatchCache {
        let mut c = MatchCache {
            new: self.new.clone(),
            old: self.old.clone(),
            by_set: None,
        };
        for e in c.new.iter_mut().chain(c.old.iter_mut()) {
            e.kept = None;
        }
        c
    }
}

/// Packed bytes of the largest label set a long fold keeps to match by where it lives (the
/// bound `SharingLabels` remembers sets to, too): with 65,536 entries at most, under 300 MiB
/// of kept maps in the worst case, a few MiB for sets of typical size.
const KEPT_SET_BYTES: usize = 4 << 10;

/// Slots of [`MatchCache::by_set`] (a power of two; 16 bytes each).
const BY_SET_SLOTS: usize = 1 << 16;

/// The slot of [`MatchCache::by_set`] for a set living at `addr`.
fn by_set_slot(addr: usize) -> usize {
    ((addr as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BY_SET_SLOTS.trailing_zeros()))
        as usize
}

impl MatchCache {
    fn find<'a>(
        table: &'a hashbrown::HashTable<MatchEntry>,
        hash: u64,
        packed: &Packed<'_>,
    ) -> Option<&'a [MatchRef]> {
        table
            .find(hash, |e| e.is(hash, packed))
            .map(MatchEntry::refs)
    }

    fn get(&self, labels: &Labels) -> Option<&[MatchRef]> {
        with_packed(labels, |packed, hash| {
            Self::find(&self.new, hash, packed).or_else(|| Self::find(&self.old, hash, packed))
        })
    }

    /// The buckets of `labels` if remembered, moving an old entry up; else `compute`'s,
    /// remembered.
    #[cfg(test)]
    fn get_or_insert(
        &mut self,
        labels: &Labels,
        entries: usize,
        compute: impl FnOnce() -> Vec<MatchRef>,
    ) -> &mut [MatchRef] {
        match self.entry(labels, entries, compute) {
            Some(e) => e.refs_mut(),
            None => &mut [],
        }
    }

    /// The entry of `labels` if remembered, moving an old entry up; else a new one with
    /// `compute`'s buckets. `None` cannot happen (an entry just found or inserted is there).
    fn entry(
        &mut self,
        labels: &Labels,
        entries: usize,
        compute: impl FnOnce() -> Vec<MatchRef>,
    ) -> Option<&mut MatchEntry> {
        with_packed(labels, |packed, hash| {
            self.entry_packed(packed, hash, entries, compute)
        })
    }

    /// [`MatchCache::entry`] for an event's labels: during a long fold, a copy of a shared
    /// set is found by where it lives, and remembered so.
    fn entry_of(
        &mut self,
        labels: &EventLabels,
        entries: usize,
        compute: impl FnOnce() -> Vec<MatchRef>,
    ) -> Option<&mut MatchEntry> {
        let Some(by_set) = self.by_set.as_deref() else {
            return self.entry(labels, entries, compute);
        };
        if !labels.is_shared() {
            // A set no other event shares (nothing to find it by next time).
            return self.entry(labels, entries, compute);
        }
        let (addr, at) = (labels.addr(), by_set_slot(labels.addr()));
        if let Some(&(seen, hash)) = by_set.get(at).filter(|s| s.0 == addr) {
            debug_assert_eq!(seen, addr);
            let is = |e: &MatchEntry| e.hash == hash && e.keeps(labels);
            if self.new.find(hash, is).is_some() {
                return self.new.find_mut(hash, is);
            }
            if let Ok(e) = self.old.find_entry(hash, is) {
                let entry = e.remove().0;
                return Some(self.insert_new(hash, entry, entries));
            }
        }
        with_packed(labels, |packed, hash| {
            if packed.len > KEPT_SET_BYTES {
                // A large set is matched by its labels: keeping 65,536 of them alive could
                // hold hundreds of MiB (a stranger's review).
                return self.entry_packed(packed, hash, entries, compute);
            }
            if let Some(slot) = self.by_set.as_deref_mut().and_then(|b| b.get_mut(at)) {
                *slot = (addr, hash);
            }
            let e = self.entry_packed(packed, hash, entries, compute)?;
            e.kept = Some(labels.clone());
            Some(e)
        })
    }

    fn entry_packed(
        &mut self,
        packed: &Packed<'_>,
        hash: u64,
        entries: usize,
        compute: impl FnOnce() -> Vec<MatchRef>,
    ) -> Option<&mut MatchEntry> {
        let is = |e: &MatchEntry| e.is(hash, packed);
        if self.new.find(hash, is).is_none() {
            let old = self.old.find_entry(hash, is).ok().map(|e| e.remove().0);
            let entry = match old {
                Some(e) => e,
                None => MatchEntry::new(hash, packed, compute()),
            };
            return Some(self.insert_new(hash, entry, entries));
        }
        self.new.find_mut(hash, is)
    }

    /// Put `entry` in the new generation (not there yet), first dropping the old one when the
    /// new one is full.
    fn insert_new(&mut self, hash: u64, entry: MatchEntry, entries: usize) -> &mut MatchEntry {
        if self.new.len() >= entries / 2 {
            // The old generation goes; its table's room is reused for the new one.
            std::mem::swap(&mut self.old, &mut self.new);
            self.new.clear();
        }
        self.new.insert_unique(hash, entry, |e| e.hash).into_mut()
    }

    /// Find shared label sets by where they live ([`MatchCache::by_set`]) from now on, or
    /// (`false`) no longer, letting every kept copy go.
    fn by_set(&mut self, on: bool) {
        if on {
            self.by_set = Some(vec![(0, 0); BY_SET_SLOTS].into_boxed_slice());
            return;
        }
        self.by_set = None;
        for e in self.new.iter_mut().chain(self.old.iter_mut()) {
            e.kept = None;
        }
    }

    fn clear(&mut self) {
        self.new.clear();
        self.old.clear();
    }
}

impl std::fmt::Debug for MatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MatchCache({} + {})", self.new.len(), self.old.len())
    }
}

/// Match `labels` against every budget of `policy`; slots of buckets that exist are filled in.
fn match_labels(
    policy: &ResolvedPolicy,
    budgets: &[BudgetState],
    labels: &Labels,
) -> Vec<MatchRef> {
    let mut out = Vec::with_capacity(policy.budgets.len());
    for (i, b) in policy.budgets.iter().enumerate() {
        if selector_matches(&b.match_labels, labels) {
            if let Some(key) = scope_key(&b.group_by, labels) {
                let slot = budgets.get(i).and_then(|s| s.slot(&key)).unwrap_or(NO_SLOT);
                out.push(match_ref(i, slot));
            }
        }
    }
    out
}

/// The bucket `r` (of budget `b`, for an event with `labels`) counts in within `state`, created
/// if new: its slot, and whether it is the overflow bucket (a new key beyond `max_keys`). A
/// bucket of the key's own is remembered in `r`, so the next event with the same labels finds
/// it without rendering or hashing the key.
///
/// A new scope at `ts` may sweep the budget first (SPEC §5, live scopes): when the budget is at
/// `max_keys` (so that only live scopes count) or holds far more buckets than live ones (so
/// that memory stays bounded). `swept` is set when buckets went: remembered slots must then be
/// forgotten before any is reused.
#[inline]
#[allow(clippy::too_many_arguments)]
fn resolve(
    state: &mut BudgetState,
    limits: &Limits,
    group_by: impl FnOnce() -> Option<Vec<String>>,
    labels: &Labels,
    r: &mut MatchRef,
    max_keys: u64,
    ts: TsMicros,
    swept: &mut bool,
) -> (u32, bool) {
    let known = ref_slot(*r);
    if known != NO_SLOT && state.at(known).is_some() {
        return (known, false);
    }
    resolve_new(
        state,
        limits,
        &group_by().unwrap_or_default(),
        labels,
        r,
        max_keys,
        ts,
        swept,
    )
}

/// [`resolve`] of a bucket whose slot the match does not know yet.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn resolve_new(
    state: &mut BudgetState,
    limits: &Limits,
    group_by: &[String],
    labels: &Labels,
    r: &mut MatchRef,
    max_keys: u64,
    ts: TsMicros,
    swept: &mut bool,
) -> (u32, bool) {
    let key = scope_key(group_by, labels).unwrap_or_default();
    if let Some(slot) = state.slot(&key) {
        *r = match_ref(ref_budget(*r), slot);
        return (slot, false);
    }
    let full = |s: &BudgetState| (s.len() as u64) >= max_keys && !key.is_empty();
    if (full(state) || state.sweep_due(ts)) && state.sweep(limits, ts) > 0 {
        *swept = true;
    }
    if full(state) {
        return (state.slot_or_insert(OVERFLOW_KEY), true);
    }
    let slot = state.slot_or_insert(&key);
    state.may_end_from(ts);
    *r = match_ref(ref_budget(*r), slot);
    (slot, false)
}

/// A price table in force from `effective_from`, introduced by the event at `seq`. Compared
/// by what it says (its index is derived from its table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PriceEpoch {
    /// Events with `ts >= effective_from` may use this table.
    pub effective_from: TsMicros,
    /// The event that introduced it; also the table's version.
    pub seq: u64,
    /// The table (JSON inside a snapshot's bincode, so that prices can grow keys).
    #[serde(
        serialize_with = "json_inside::serialize",
        deserialize_with = "json_inside::deserialize"
    )]
    pub table: PriceTable,
    /// Highest prices of the table, for unknown models.
    #[serde(
        serialize_with = "json_inside::serialize",
        deserialize_with = "json_inside::deserialize"
    )]
    pub max: ModelPrice,
    /// The table's prices by model name in a hash map: derived, rebuilt when read back.
    #[serde(skip)]
    index: PriceIndex,
}

impl PriceEpoch {
    /// The epoch of `table`, in force from `effective_from`, introduced by the event at `seq`.
    pub fn new(effective_from: TsMicros, seq: u64, table: PriceTable) -> PriceEpoch {
        PriceEpoch {
            effective_from,
            seq,
            max: pricing::max_price(&table),
            index: PriceIndex::of(&table),
            table,
        }
    }

    /// The price of `model` in this table.
    fn get(&self, model: &str) -> Option<&ModelPrice> {
        if self.index.0.is_empty() {
            self.table.models.get(model)
        } else {
            self.index.0.get(model)
        }
    }
}

impl PartialEq for PriceEpoch {
    fn eq(&self, other: &Self) -> bool {
        self.effective_from == other.effective_from
            && self.seq == other.seq
            && self.table == other.table
            && self.max == other.max
    }
}

impl Eq for PriceEpoch {}

/// Model name to price, hashed (a `BTreeMap` lookup compares the name with a dozen others).
/// Derived from the table; never serialised or compared.
#[derive(Clone, Default)]
struct PriceIndex(HashMap<String, ModelPrice, rustc_hash::FxBuildHasher>);

impl PriceIndex {
    fn of(table: &PriceTable) -> PriceIndex {
        PriceIndex(
            table
                .models
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

impl std::fmt::Debug for PriceIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PriceIndex({})", self.0.len())
    }
}

/// A live hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Labels including derived ones (shared with the event's).
    pub labels: EventLabels,
    /// Model.
    pub model: String,
    /// Held amounts (micros, tokens, one request).
    pub amounts: Amounts,
    /// Input tokens of its estimate (the rest of `amounts.tokens` is output).
    pub input_tokens: u64,
    /// Expiry, Unix µs.
    pub expires_at: TsMicros,
    /// `(budget index, scope key)` of every bucket it is counted in.
    pub buckets: Vec<(usize, String)>,
}

/// How a reservation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndKind {
    /// Committed by this event id.
    Committed(String),
    /// Released (cancelled).
    Released,
    /// Expired.
    Expired,
    /// Denied: it ended as it was asked for, holding nothing. A commit of it (the call went
    /// ahead all the same) is recorded as usage flagged `denied`, and then it is `Committed`.
    Denied,
}

/// A reservation that ended recently (or was denied: see [`EndKind::Denied`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Labels including derived ones (shared with the event's).
    pub labels: EventLabels,
    /// Model (of a denied one: the last candidate it considered).
    pub model: String,
    /// Money it held (none for a denied one).
    pub hold_micros: Micros,
    /// How it ended.
    pub how: EndKind,
    /// When.
    pub at: TsMicros,
}

/// All projections. A fold of the log.
///
/// Serialised (for snapshots) without its derived data (the compiled limits and the match
/// cache), which is rebuilt when a ledger is read back. Compared by what it would answer: the
/// derived data aside, and buckets that have ended by its last event (which read as absent
/// ones and leave memory whenever a sweep comes) left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(try_from = "LedgerData")]
pub struct Ledger {
    last_seq: u64,
    last_ts: TsMicros,
    policy_version: u64,
    #[serde(serialize_with = "json_inside::serialize")]
    policy: Option<ResolvedPolicy>,
    epochs: Vec<PriceEpoch>,
    budgets: Vec<BudgetState>,
    holds: BTreeMap<String, Hold>,
    expiries: BTreeSet<(TsMicros, String)>,
    /// Reservations that ended within [`ENDED_RESERVATION_MEMORY_SECONDS`], by id and in order
    /// (written as the map and the queue it was before it had a type of its own).
    ended: ended::EndedIndex,
    /// Request ids within the idempotency window (see [`IdIndex`]).
    ids: IdIndex,
    /// Each `[[quota]]`'s last observation (SPEC §10), by quota id.
    observed: BTreeMap<String, quotas::Observed>,
    /// The budgets of earlier policy versions, by version: receipts refer to them.
    #[serde(
        serialize_with = "json_inside::serialize",
        deserialize_with = "json_inside::deserialize"
    )]
    old_budgets: BTreeMap<u64, Vec<bursar_schemas::policy::ResolvedBudget>>,
    /// Spend per 15-minute slot per label set, for reports (SPEC §11).
    rollups: rollup::Rollups,
    /// True for a ledger nobody reports from (a what-if's): its rollups stay empty.
    #[serde(skip)]
    no_rollups: bool,
    /// The policy's budgets' limits, compiled (derived from `policy`; shared with `renderer`).
    #[serde(skip)]
    limits: std::sync::Arc<[Limits]>,
    #[serde(skip)]
    matches: MatchCache,
    /// The renderer of answers under `policy` (derived from it).
    #[serde(skip)]
    renderer: std::sync::Arc<Renderer>,
    /// What the live holds governed by each quota hold (derived from `holds`).
    #[serde(skip)]
    quota_holds: BTreeMap<String, quotas::QuotaHeld>,
    /// The first impossible state met while folding (see [`Ledger::fault`]).
    #[serde(skip)]
    fault: Option<String>,
}

impl PartialEq for Ledger {
    fn eq(&self, o: &Self) -> bool {
        self.last_seq == o.last_seq
            && self.last_ts == o.last_ts
            && self.policy_version == o.policy_version
            && self.policy == o.policy
            && self.epochs == o.epochs
            && self.holds == o.holds
            && self.expiries == o.expiries
            && self.ended == o.ended
            && self.ids == o.ids
            && self.observed == o.observed
            && self.old_budgets == o.old_budgets
            && self.rollups == o.rollups
            && self.fault == o.fault
            && self.budgets.len() == o.budgets.len()
            && self
                .budgets
                .iter()
                .zip(&o.budgets)
                .zip(self.limits.iter())
                .all(|((a, b), limits)| {
                    let live = |s: &'_ BudgetState| {
                        s.iter()
                            .filter(|(_, bucket)| !bucket.ended(limits, self.last_ts))
                            .count()
                    };
                    live(a) == live(b)
                        && a.iter()
                            .filter(|(_, bucket)| !bucket.ended(limits, self.last_ts))
                            .all(|(k, bucket)| b.get(k) == Some(bucket))
                })
    }
}

/// A [`Ledger`] as serialised: every field but the derived ones, in the same order.
#[derive(Deserialize)]
#[serde(rename = "Ledger")]
struct LedgerData {
    last_seq: u64,
    last_ts: TsMicros,
    policy_version: u64,
    #[serde(deserialize_with = "json_inside::deserialize")]
    policy: Option<ResolvedPolicy>,
    epochs: Vec<PriceEpoch>,
    budgets: Vec<BudgetState>,
    holds: BTreeMap<String, Hold>,
    expiries: BTreeSet<(TsMicros, String)>,
    ended: ended::EndedIndex,
    ids: IdIndex,
    observed: BTreeMap<String, quotas::Observed>,
    #[serde(deserialize_with = "json_inside::deserialize")]
    old_budgets: BTreeMap<u64, Vec<bursar_schemas::policy::ResolvedBudget>>,
    rollups: rollup::Rollups,
}

impl TryFrom<LedgerData> for Ledger {
    type Error = String;

    /// A snapshot's ledger; refused when a bucket's hold figures are not the sums of the live
    /// holds counted in it (a damaged or wrongly written snapshot: the log is folded instead).
    fn try_from(d: LedgerData) -> Result<Ledger, String> {
        let mut epochs = d.epochs;
        for e in &mut epochs {
            e.index = PriceIndex::of(&e.table);
        }
        let limits = compile_limits(d.policy.as_ref());
        let renderer = std::sync::Arc::new(Renderer::new(
            d.policy_version,
            d.policy
                .as_ref()
                .map(|p| p.budgets.clone())
                .unwrap_or_default(),
            limits.clone(),
        ));
        let mut ledger = Ledger {
            limits,
            last_seq: d.last_seq,
            last_ts: d.last_ts,
            policy_version: d.policy_version,
            policy: d.policy,
            epochs,
            budgets: d.budgets,
            holds: d.holds,
            expiries: d.expiries,
            ended: d.ended,
            ids: d.ids,
            observed: d.observed,
            old_budgets: d.old_budgets,
            rollups: d.rollups,
            no_rollups: false,
            matches: MatchCache::default(),
            renderer,
            quota_holds: BTreeMap::new(),
            fault: None,
        };
        ledger.recount_held_sums()?;
        ledger.recount_quota_holds();
        Ok(ledger)
    }
}

/// The compiled limits of every budget of `policy`, by budget index.
fn compile_limits(policy: Option<&ResolvedPolicy>) -> std::sync::Arc<[Limits]> {
    policy.map_or_else(Default::default, |p| {
        p.budgets.iter().map(Limits::of).collect()
    })
}

/// What folding a usage event decided for the budgets it counts in ([`Ledger::apply_usage`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageDecision {
    /// The event's cost.
    pub cost_micros: Micros,
    /// True when its model had no price and it was priced at the table's highest prices.
    pub priced_at_max: bool,
    /// The most severe state of its buckets.
    pub state: BucketState,
    lines: SmallVec<[UsageLine; INLINE_LINES]>,
}

/// Budget lines a decision keeps without allocating.
const INLINE_LINES: usize = 16;

impl Default for UsageDecision {
    fn default() -> Self {
        UsageDecision {
            cost_micros: 0,
            priced_at_max: false,
            state: BucketState::Ok,
            lines: SmallVec::new(),
        }
    }
}

impl UsageDecision {
    /// Number of buckets the event counted in.
    pub fn budgets(&self) -> usize {
        self.lines.len()
    }

    /// Number of `budget_warned` / `budget_exhausted` events due.
    pub fn crossings(&self) -> usize {
        self.lines
            .iter()
            .map(|l| usize::from(l.warn_due) + usize::from(l.exhausted_due))
            .sum()
    }
}

/// One bucket of a [`UsageDecision`] (its figures are read again for the answer: the
/// ledger has not changed since).
#[derive(Debug, Clone, PartialEq)]
struct UsageLine {
    budget: u32,
    slot: u32,
    state: BucketState,
    warn_due: bool,
    exhausted_due: bool,
}

impl UsageLine {
    fn budget(&self) -> usize {
        self.budget as usize
    }

    /// The line of the bucket in `slot` of budget `budget`, whose figures at `ts` are `f`: its
    /// state and the crossings due (once per bucket per window, looked for only past a
    /// threshold).
    fn judge(
        budget: usize,
        slot: u32,
        limits: &Limits,
        bucket: &Bucket,
        f: &Figures,
        ts: TsMicros,
    ) -> UsageLine {
        let state = limits.state(f);
        let mut line = UsageLine {
            budget: u32::try_from(budget).unwrap_or(u32::MAX),
            slot,
            state,
            warn_due: false,
            exhausted_due: false,
        };
        if state != BucketState::Ok {
            let window = buckets::crossing_window(&limits.window, ts);
            line.warn_due = limits.has_warn && bucket.marks.warned() != Some(window);
            line.exhausted_due =
                state == BucketState::Exhausted && bucket.marks.exhausted() != Some(window);
        }
        line
    }
}

/// An event that cannot be folded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Seqs must be dense.
    #[error("event seq {got} does not follow {last}")]
    Gap {
        /// Last folded seq.
        last: u64,
        /// Seq offered.
        got: u64,
    },
}

impl Ledger {
    /// An empty ledger (no policy yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty ledger that keeps no report rollups (a what-if's: nobody reports from it, and
    /// on a long log they would be most of its memory).
    pub fn without_rollups() -> Self {
        Ledger {
            no_rollups: true,
            ..Self::default()
        }
    }

    /// Seq of the last folded event.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The first impossible state this ledger met while folding, if it met one: a hold ended in
    /// a bucket that did not count it, or a bucket a hold is counted in missing. No correct
    /// fold meets one (debug builds assert it where it is met); the daemon appends nothing
    /// once its ledger has one and refuses writes (fail closed), rather than go on from a
    /// state that is wrong.
    pub fn fault(&self) -> Option<&str> {
        self.fault.as_deref()
    }

    /// Note `what` as an impossible state the fold met, without the debug assertion: for tests
    /// of what the daemon does with such a ledger (feature `fault-injection`, which only the
    /// daemon's tests turn on).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_fault(&mut self, what: &str) {
        self.fault.get_or_insert_with(|| what.to_owned());
    }

    /// Note an impossible state met while folding the event `last_seq` (the first one is kept).
    fn impossible(&mut self, what: String) {
        let fault = format!("{what} (folding seq {})", self.last_seq);
        // Noted before the assertion, so that a debug build that goes on has it too.
        self.fault.get_or_insert_with(|| fault.clone());
        debug_assert!(false, "impossible state: {fault}");
    }

    /// Each bucket's hold figures made again from the live holds counted in it (exact sums,
    /// which a snapshot stores at most at each type's largest value); an error when the
    /// figures read differ from those sums or a hold is counted in a bucket that is not there.
    fn recount_held_sums(&mut self) -> Result<(), String> {
        let mut sums: BTreeMap<(usize, &str), buckets::HeldSums> = BTreeMap::new();
        for (rid, h) in &self.holds {
            for (i, key) in &h.buckets {
                if self.budgets.get(*i).and_then(|s| s.get(key)).is_none() {
                    return Err(format!(
                        "reservation {rid:?} is counted in a bucket ({i}, {key:?}) that is not there"
                    ));
                }
                sums.entry((*i, key.as_str()))
                    .or_default()
                    .add(h.amounts, 1);
            }
        }
        for (i, state) in self.budgets.iter().enumerate() {
            for (key, bucket) in state.iter() {
                let expected = sums.get(&(i, key)).copied().unwrap_or_default();
                if (bucket.holds.held(), bucket.holds.live_holds())
                    != (expected.held(), expected.live())
                {
                    return Err(format!(
                        "bucket ({i}, {key:?}) holds {:?} in {} holds; its live holds sum to {:?} in {}",
                        bucket.holds.held(),
                        bucket.holds.live_holds(),
                        expected.held(),
                        expected.live()
                    ));
                }
            }
        }
        for ((i, key), expected) in sums {
            if let Some(b) = self.budgets.get_mut(i).and_then(|s| s.get_mut(key)) {
                b.holds = buckets::Holds::of_sums(expected);
            }
        }
        Ok(())
    }

    /// `ts` of the last folded event.
    pub fn last_ts(&self) -> TsMicros {
        self.last_ts
    }

    /// Cells of the report rollups (15-minute slots × label sets seen in them).
    pub fn rollup_cells(&self) -> usize {
        self.rollups.len()
    }

    /// Version of the policy in force (0 before the first `policy_applied`).
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    /// The policy in force.
    pub fn policy(&self) -> Option<&ResolvedPolicy> {
        self.policy.as_ref()
    }

    /// Number of live holds.
    pub fn live_holds(&self) -> usize {
        self.holds.len()
    }

    /// A live hold (which may be past its expiry until the reaper's event is folded).
    pub fn hold(&self, reservation_id: &str) -> Option<&Hold> {
        self.holds.get(reservation_id)
    }

    /// How reservation `reservation_id` ended (or that it was denied), if it did within the
    /// last hour ([`ENDED_RESERVATION_MEMORY_SECONDS`]).
    pub fn ended_reservation(&self, reservation_id: &str) -> Option<&Ended> {
        self.ended.get(reservation_id)
    }

    /// Total number of buckets over all budgets.
    pub fn bucket_count(&self) -> usize {
        self.budgets.iter().map(BudgetState::len).sum()
    }

    /// The time decisions and reads use: `now`, but never before the last event. A wall clock
    /// that steps backwards therefore never makes a window look new (which would hand out a
    /// budget again); time stands still until the clock catches up.
    pub fn effective_now(&self, now: TsMicros) -> TsMicros {
        now.max(self.last_ts)
    }

    /// The timestamp the next event gets: `now`, but strictly after the last event.
    pub fn stamp(&self, now: TsMicros) -> TsMicros {
        now.max(self.last_ts.saturating_add(1))
    }

    /// Make known price epochs that appear later in the log (for a two-pass fold with a
    /// retroactive `pricing_changed`).
    pub fn preload_epoch(&mut self, effective_from: TsMicros, seq: u64, table: &PriceTable) {
        if self.epochs.iter().any(|e| e.seq == seq) {
            return;
        }
        self.epochs
            .push(PriceEpoch::new(effective_from, seq, table.clone()));
        self.epochs.sort_by_key(|e| e.seq);
    }

    /// Price of `model` at `ts`: `(price, priced_at_max, price_version)`.
    pub fn price_at(&self, model: &str, ts: TsMicros) -> Option<(&ModelPrice, bool, u64)> {
        price_at(&self.epochs, model, ts)
    }

    /// Cost of a usage event at `ts`: `(cost, priced_at_max, price_version)` ([`event_cost`]).
    pub fn event_cost(&self, u: &UsageRecorded, ts: TsMicros) -> (Micros, bool, u64) {
        event_cost(&self.epochs, u, ts)
    }

    /// Cost of `usage` of `model` at `ts` at the prices in force (no subscription):
    /// `(cost, priced_at_max, price_version)`.
    pub fn usage_cost(&self, model: &str, usage: &Usage, ts: TsMicros) -> (Micros, bool, u64) {
        match price_at(&self.epochs, model, ts) {
            Some((price, at_max, version)) => (pricing::usage_cost(price, usage), at_max, version),
            None => (0, true, 0),
        }
    }

    /// The price table introduced last (the one new events use unless a later-effective epoch
    /// says otherwise).
    pub fn current_prices(&self) -> Option<&PriceTable> {
        self.epochs.last().map(|e| &e.table)
    }

    /// A copy of the price timeline, for pricing events outside the writer (exports).
    pub fn pricer(&self) -> Pricer {
        Pricer {
            epochs: self.epochs.clone(),
        }
    }

    /// Whether unknown models are denied for reserve/check.
    fn deny_unknown_models(&self) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|p| p.unknown_models == UnknownModels::Deny)
    }

    /// Every bucket an event with these labels counts in (remembered or matched now).
    fn with_matching<R>(&self, labels: &Labels, f: impl FnOnce(&[MatchRef]) -> R) -> R {
        if let Some(refs) = self.matches.get(labels) {
            return f(refs);
        }
        match &self.policy {
            Some(policy) => f(&match_labels(policy, &self.budgets, labels)),
            None => f(&[]),
        }
    }

    /// Run `f` on every bucket an event with `labels` counts in, each created if new (a new key
    /// beyond `max_keys_per_budget` lands in the overflow bucket: `f`'s last argument is then
    /// true), with its budget index, compiled limits, slot and key. The matching is remembered.
    fn for_each_matching(
        &mut self,
        labels: &EventLabels,
        ts: TsMicros,
        rollup: Option<&rollup::Cell>,
        mut f: impl FnMut(usize, &Limits, u32, &str, &mut Bucket, bool),
    ) {
        let Some(policy) = &self.policy else {
            return;
        };
        let max_keys = policy.max_keys_per_budget;
        let budgets = &mut self.budgets;
        let mut swept = false;
        let Some(entry) = self.matches.entry_of(labels, MATCH_CACHE_ENTRIES, || {
            match_labels(policy, budgets, labels)
        }) else {
            debug_assert!(false, "a match cache entry just found or made is missing");
            return;
        };
        let (refs, rollup_set) = entry.refs_and_rollup_mut();
        if let Some(cell) = rollup.filter(|_| !self.no_rollups) {
            // The report rollups (SPEC §11): the set found once per cached label set.
            if *rollup_set == NO_ROLLUP_SET {
                *rollup_set = self.rollups.set_of(labels, &policy.report_exclude_labels);
            }
            self.rollups.add_to(ts, *rollup_set, cell);
        }
        for r in refs.iter_mut() {
            let i = ref_budget(*r);
            let (Some(limits), Some(state)) = (self.limits.get(i), budgets.get_mut(i)) else {
                continue;
            };
            let group_by = || policy.budgets.get(i).map(|b| b.group_by.clone());
            let (slot, overflow) =
                resolve(state, limits, group_by, labels, r, max_keys, ts, &mut swept);
            if let Some((key, bucket)) = state.entry_mut(slot) {
                f(i, limits, slot, key, bucket, overflow);
            }
        }
        if swept {
            self.forget_slots();
        }
    }

    /// Forget every remembered slot (the match cache), then let swept slots be reused.
    fn forget_slots(&mut self) {
        self.matches.clear();
        for state in &mut self.budgets {
            state.release_slots();
        }
    }

    /// `(budget, slot)` of the `(budget, scope key)` buckets that exist.
    fn slots_of(&self, refs: &[(usize, String)]) -> Vec<(usize, u32)> {
        refs.iter()
            .filter_map(|(i, key)| Some((*i, self.budgets.get(*i)?.slot(key)?)))
            .collect()
    }

    /// Hold `amounts` (and one concurrency slot) in every bucket an event with `labels` counts
    /// in; returns the `(budget index, scope key)` of each, the key being the one actually used
    /// (the overflow bucket's for a new key beyond `max_keys_per_budget`).
    ///
    /// `placed` is true when the hold is placed at `ts` (a reservation), false when a reload
    /// counts an existing hold again: a bucket in which a hold is placed is live until the end
    /// of that window (SPEC §5), and a reload moves no bucket into a window.
    fn hold_in_matching(
        &mut self,
        labels: &EventLabels,
        amounts: Amounts,
        ts: TsMicros,
        placed: bool,
    ) -> Vec<(usize, String)> {
        let mut refs = Vec::new();
        // The key of the bucket used: the overflow bucket's for an overflowing key.
        self.for_each_matching(labels, ts, None, |i, limits, _, key, bucket, _| {
            if placed {
                bucket.enter_window(&limits.window, ts);
            }
            bucket.hold(amounts, 1);
            refs.push((i, key.to_string()));
        });
        refs
    }

    /// Count usage of `amounts` at `ts` in every bucket an event with `labels` counts in;
    /// when `decided` is given, decide on each bucket in the same pass (see [`UsageDecision`]).
    fn spend_in_matching(
        &mut self,
        labels: &EventLabels,
        ts: TsMicros,
        amounts: Amounts,
        mut decided: Option<&mut UsageDecision>,
        rollup: &rollup::Cell,
    ) {
        // The buckets are judged in a second pass (`decide_usage_lines`), once the whole event
        // is folded: this loop stays short, so the cache misses of its buckets overlap.
        self.for_each_matching(labels, ts, Some(rollup), |i, limits, slot, _, bucket, _| {
            bucket.add_spent_in(&limits.window, limits.rolling, ts, amounts);
            if let Some(d) = decided.as_deref_mut() {
                d.lines.push(UsageLine {
                    budget: u32::try_from(i).unwrap_or(u32::MAX),
                    slot,
                    state: BucketState::Ok,
                    warn_due: false,
                    exhausted_due: false,
                });
            }
        });
    }

    /// The decision on the `(budget, slot)` buckets at `ts`, as [`Ledger::apply_usage`]
    /// makes it on a usage event's buckets.
    fn decide_buckets(&self, slots: &[(usize, u32)], ts: TsMicros) -> UsageDecision {
        let mut d = UsageDecision::default();
        d.lines.extend(slots.iter().map(|&(i, slot)| UsageLine {
            budget: u32::try_from(i).unwrap_or(u32::MAX),
            slot,
            state: BucketState::Ok,
            warn_due: false,
            exhausted_due: false,
        }));
        self.decide_usage_lines(&mut d, ts);
        d
    }

    /// Decide on each bucket of a folded usage event (its lines name them): figures and state
    /// at `ts`, and the crossings due (once per bucket per window, looked for only past a
    /// threshold).
    fn decide_usage_lines(&self, d: &mut UsageDecision, ts: TsMicros) {
        d.state = BucketState::Ok;
        for line in &mut d.lines {
            let i = line.budget();
            let (Some(limits), Some(bucket)) = (
                self.limits.get(i),
                self.budgets.get(i).and_then(|s| s.at(line.slot)),
            ) else {
                continue;
            };
            let figures = bucket.figures_in(&limits.window, limits.rolling, ts);
            *line = UsageLine::judge(i, line.slot, limits, bucket, &figures, ts);
            d.state = d.state.max(line.state);
        }
    }

    /// Fold a `usage_recorded` (as [`Ledger::apply`]) and decide, in the same pass over its
    /// buckets, what it means for every budget it counts in (SPEC §5): each bucket's figures
    /// and state right after it, the event's state (the most severe), and the buckets that
    /// crossed `warn_at` or a limit for the first time in their window (whose
    /// `budget_warned` / `budget_exhausted` the writer appends next). This is what the writer
    /// does for every `record` and `commit`. Any other event is folded as by `apply`, with an
    /// empty decision.
    pub fn apply_usage(
        &mut self,
        seq: u64,
        ts: TsMicros,
        body: &EventBody,
    ) -> Result<UsageDecision, ApplyError> {
        let mut decided = UsageDecision::default();
        self.apply_with(seq, ts, body, Some(&mut decided))?;
        Ok(decided)
    }

    /// Fold one event.
    pub fn apply(&mut self, seq: u64, ts: TsMicros, body: &EventBody) -> Result<(), ApplyError> {
        self.apply_with(seq, ts, body, None)
    }

    /// [`Ledger::apply`]; what folding a `usage_recorded` decided goes into `decided` when
    /// given. An event whose `seq` does not follow the last is refused, nothing folded.
    fn apply_with(
        &mut self,
        seq: u64,
        ts: TsMicros,
        body: &EventBody,
        decided: Option<&mut UsageDecision>,
    ) -> Result<(), ApplyError> {
        if seq != self.last_seq + 1 {
            return Err(ApplyError::Gap {
                last: self.last_seq,
                got: seq,
            });
        }
        self.fold_next(ts, body, decided);
        Ok(())
    }

    /// Fold `body` as the event after the last (`seq` = last + 1): the one way in for an event
    /// the ledger stamps itself ([`Ledger::emit_with`]), which cannot be out of order.
    pub(crate) fn fold_next(
        &mut self,
        ts: TsMicros,
        body: &EventBody,
        decided: Option<&mut UsageDecision>,
    ) {
        let seq = self.last_seq + 1;
        self.last_seq = seq;
        self.last_ts = self.last_ts.max(ts);
        match body {
            EventBody::PolicyApplied(p) => {
                let previous = self.policy_version;
                self.policy_version = p.policy_version;
                self.preload_epoch(ts, seq, &p.policy.pricing);
                self.install_policy(p.policy.clone(), previous);
            }
            EventBody::PricingChanged(p) => {
                self.preload_epoch(p.effective_from, seq, &p.pricing);
            }
            EventBody::UsageRecorded(u) => {
                let (cost, at_max, _) = self.event_cost(u, ts);
                let amounts = Amounts {
                    micros: cost,
                    tokens: total_tokens(&u.usage),
                    requests: u.usage.requests,
                };
                let mut decided = decided;
                if let Some(d) = decided.as_deref_mut() {
                    d.cost_micros = cost;
                    d.priced_at_max = at_max;
                }
                let counted = rollup::Cell::of_usage(cost, &u.usage);
                self.spend_in_matching(&u.labels, ts, amounts, decided.as_deref_mut(), &counted);
                self.quota_usage(&u.labels, &quotas::Need::of_usage(&u.usage), ts);
                if let (Some(rid), ReservationLink::Known | ReservationLink::Denied) =
                    (&u.reservation_id, u.reservation)
                {
                    let how = EndKind::Committed(u.event_id.clone());
                    if u.reservation == ReservationLink::Denied
                        || !self.end_hold(rid, how.clone(), ts)
                    {
                        if let Some(e) = self.ended.get_mut(rid) {
                            e.how = how;
                        }
                    }
                }
                // Decided on the event's whole effect (a commit's hold is released by now).
                if let Some(d) = decided {
                    self.decide_usage_lines(d, ts);
                }
            }
            EventBody::ReservationCreated(r) => {
                let amounts = Amounts {
                    micros: r.hold_micros,
                    tokens: r.input_tokens.saturating_add(r.max_output_tokens),
                    requests: 1,
                };
                let refs = self.hold_in_matching(&r.labels, amounts, ts, true);
                self.expiries
                    .insert((r.expires_at, r.reservation_id.clone()));
                let hold = Hold {
                    labels: r.labels.clone(),
                    model: r.model.clone(),
                    amounts,
                    input_tokens: r.input_tokens,
                    expires_at: r.expires_at,
                    buckets: refs,
                };
                self.quota_hold(&hold, true);
                self.holds.insert(r.reservation_id.clone(), hold);
            }
            EventBody::ReservationDenied(d) => {
                if let Some(p) = self.policy.as_ref().filter(|_| !self.no_rollups) {
                    self.rollups
                        .add_denied(ts, &d.labels, &p.report_exclude_labels);
                }
                // Remembered as ended ones are: a commit of it (the call went ahead without a
                // hold) is then recorded against what it asked for, not as an unknown one's.
                self.ended.insert(
                    &d.reservation_id,
                    Ended {
                        labels: d.labels.clone(),
                        model: d.model.clone(),
                        hold_micros: 0,
                        how: EndKind::Denied,
                        at: ts,
                    },
                );
            }
            EventBody::ReservationReleased(r) => {
                self.end_hold(&r.reservation_id, EndKind::Released, ts);
            }
            EventBody::ReservationExpired(r) => {
                self.end_hold(&r.reservation_id, EndKind::Expired, ts);
            }
            EventBody::ReservationExtended(r) => {
                if let Some(h) = self.holds.get_mut(&r.reservation_id) {
                    self.expiries
                        .remove(&(h.expires_at, r.reservation_id.clone()));
                    h.expires_at = r.expires_at;
                    self.expiries
                        .insert((r.expires_at, r.reservation_id.clone()));
                }
            }
            EventBody::QuotaObserved(q) => self.fold_observed(seq, ts, q),
            EventBody::QuotaExhausted(e) => self.fold_quota_exhausted(e),
            EventBody::BudgetWarned(c) | EventBody::BudgetExhausted(c) => {
                let warned = matches!(body, EventBody::BudgetWarned(_));
                let idx = self
                    .policy
                    .as_ref()
                    .and_then(|p| p.budgets.iter().position(|b| b.id == c.budget));
                if let Some(bucket) = idx
                    .and_then(|i| self.budgets.get_mut(i))
                    .and_then(|s| s.get_mut(&c.key))
                {
                    if warned {
                        bucket.marks.set_warned(c.window_start);
                    } else {
                        bucket.marks.set_exhausted(c.window_start);
                    }
                }
            }
        }
        self.remember_id(seq, ts, body);
        self.forget_ended(ts);
    }

    /// Forget the request ids older than the window at `ts`, and remember the one the event
    /// answered.
    fn remember_id(&mut self, seq: u64, ts: TsMicros, body: &EventBody) {
        let window = self.id_window();
        self.ids.forget_before(ts.saturating_sub(window));
        let (kind, id, digest) = match body {
            EventBody::UsageRecorded(u) => (IdKind::Event, &u.event_id, u.payload_digest),
            EventBody::ReservationCreated(r) => {
                (IdKind::Reservation, &r.reservation_id, r.payload_digest)
            }
            EventBody::ReservationDenied(r) => {
                (IdKind::Reservation, &r.reservation_id, r.payload_digest)
            }
            EventBody::ReservationReleased(r) => {
                (IdKind::Release, &r.reservation_id, r.payload_digest)
            }
            _ => return,
        };
        let entry = IdEntry { digest, seq, ts };
        self.ids.insert_in_window(kind, id, entry, window);
    }

    /// The idempotency window in force, µs.
    fn id_window(&self) -> TsMicros {
        crate::time::seconds(self.policy.as_ref().map_or(
            bursar_schemas::policy::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
            |p| p.idempotency_window_seconds,
        ))
    }

    /// For a fold of many events: queue the ids the events answer instead of indexing each,
    /// until [`Ledger::settle_ids`] (most are forgotten again within a long fold; see
    /// [`IdIndex::defer`]). Looking ids up meanwhile (deciding) is right but slow.
    pub fn defer_ids(&mut self) {
        self.ids.defer();
    }

    /// Index the ids queued since [`Ledger::defer_ids`]: the ledger is then the same as if
    /// they had never been deferred.
    pub fn settle_ids(&mut self) {
        self.ids.settle();
    }

    /// For a fold of many events read from a log (recovery, replay): ids and ended
    /// reservations deferred ([`Ledger::defer_ids`], `EndedIndex::defer`: most are forgotten
    /// again within the fold) and the label sets the events share (decoded while
    /// `SharingLabels` is in force) matched once each by where they live, until
    /// [`Ledger::end_long_fold`]. The ledger folds exactly as without.
    pub fn begin_long_fold(&mut self) {
        self.defer_ids();
        self.ended.defer();
        self.matches.by_set(true);
    }

    /// [`Ledger::begin_long_fold`] for a fold whose last event has the `ts` `last_ts` (the
    /// log's head): an id whose window ends before it is not even queued, as that event will
    /// forget it. [`Ledger::end_long_fold`] says whether that held.
    pub fn begin_long_fold_until(&mut self, last_ts: TsMicros) {
        self.begin_long_fold();
        self.ids.skip_until(last_ts);
    }

    /// The end of a long fold: ids and ended reservations indexed, the label sets kept for
    /// matching let go. False when ids were skipped ([`Ledger::begin_long_fold_until`]) that
    /// the fold may remember after all (an id stamped no later than the one before, or none of
    /// its events forgot ids up to the latest skipped: told a later `ts` than its last, or the
    /// window grew): this ledger lacks them, and the events must be folded again with
    /// [`Ledger::begin_long_fold`].
    #[must_use = "false: the ledger lacks ids; fold again without skipping"]
    pub fn end_long_fold(&mut self) -> bool {
        self.matches.by_set(false);
        self.ended.settle();
        let sound = self.ids.skipped_soundly();
        self.settle_ids();
        sound
    }

    /// The idempotency index (ids within the window, with their request digest and event).
    pub fn ids(&self) -> &IdIndex {
        &self.ids
    }

    /// Remove a live hold from its buckets and remember how it ended. False if it was not live.
    fn end_hold(&mut self, rid: &str, how: EndKind, ts: TsMicros) -> bool {
        let Some(hold) = self.holds.remove(rid) else {
            return false;
        };
        self.quota_hold(&hold, false);
        self.expiries.remove(&(hold.expires_at, rid.to_string()));
        for (i, key) in &hold.buckets {
            self.unhold_in(*i, key, rid, hold.amounts);
            if let Some(state) = self.budgets.get_mut(*i) {
                // Without its hold, the bucket may have ended already.
                state.may_end_from(ts);
            }
        }
        self.ended.insert(
            rid,
            Ended {
                labels: hold.labels,
                model: hold.model,
                hold_micros: hold.amounts.micros,
                how,
                at: ts,
            },
        );
        true
    }

    /// Take reservation `rid`'s hold of `amounts` out of bucket `(i, key)`, which counts it:
    /// an impossible state ([`Ledger::fault`]) when the bucket is not there or holds less.
    fn unhold_in(&mut self, i: usize, key: &str, rid: &str, amounts: Amounts) {
        match self.budgets.get_mut(i).and_then(|s| s.get_mut(key)) {
            Some(b) => {
                if !b.unhold(amounts, 1) {
                    let (held, live) = (b.holds.held(), b.holds.live_holds());
                    self.impossible(format!(
                        "reservation {rid:?} ends holding {amounts:?} in bucket ({i}, {key:?}), which holds {held:?} in {live} holds"
                    ));
                }
            }
            None => self.impossible(format!(
                "reservation {rid:?} is counted in a bucket ({i}, {key:?}) that is not there"
            )),
        }
    }

    fn forget_ended(&mut self, now: TsMicros) {
        let horizon = now.saturating_sub(crate::time::seconds(
            ENDED_RESERVATION_MEMORY_SECONDS as u64,
        ));
        self.ended.forget_before(horizon);
    }

    /// Install a new policy: budgets whose id, selector, grouping and window are unchanged keep
    /// their buckets; the others start empty. Live holds are re-counted under the new budgets.
    fn install_policy(&mut self, new: ResolvedPolicy, previous_version: u64) {
        // Take every live hold out of the old buckets.
        let hold_ids: Vec<String> = self.holds.keys().cloned().collect();
        for rid in &hold_ids {
            if let Some(h) = self.holds.get(rid) {
                let (amounts, refs) = (h.amounts, h.buckets.clone());
                for (i, key) in refs {
                    self.unhold_in(i, &key, rid, amounts);
                }
            }
        }
        let old_policy = self.policy.take();
        if let Some(old) = &old_policy {
            // Receipts of the outgoing version still render with its budgets.
            self.old_budgets
                .insert(previous_version, old.budgets.clone());
        }
        let mut old_states = std::mem::take(&mut self.budgets);
        let mut states = Vec::with_capacity(new.budgets.len());
        for b in &new.budgets {
            let kept = old_policy.as_ref().and_then(|op| {
                op.budgets.iter().position(|ob| {
                    ob.id == b.id
                        && ob.match_labels == b.match_labels
                        && ob.group_by == b.group_by
                        && ob.window == b.window
                })
            });
            let state = kept
                .and_then(|i| old_states.get_mut(i))
                .map(std::mem::take)
                .unwrap_or_default();
            states.push(state);
        }
        self.budgets = states;
        self.limits = compile_limits(Some(&new));
        self.renderer = std::sync::Arc::new(Renderer::new(
            self.policy_version,
            new.budgets.clone(),
            self.limits.clone(),
        ));
        self.policy = Some(new);
        self.matches.clear();
        // Count live holds again, in the new budgets and quotas.
        self.recount_quota_holds();
        for rid in hold_ids {
            let Some(h) = self.holds.get(&rid) else {
                continue;
            };
            let (amounts, labels) = (h.amounts, h.labels.clone());
            let refs = self.hold_in_matching(&labels, amounts, self.last_ts, false);
            if let Some(h) = self.holds.get_mut(&rid) {
                h.buckets = refs;
            }
        }
    }
}

/// The epoch pricing an event at `ts`: the newest-introduced table in force at `ts`.
fn price_at<'a>(
    epochs: &'a [PriceEpoch],
    model: &str,
    ts: TsMicros,
) -> Option<(&'a ModelPrice, bool, u64)> {
    let epoch = epochs.iter().rev().find(|e| e.effective_from <= ts)?;
    match epoch.get(model) {
        Some(p) => Some((p, false, epoch.seq)),
        None => Some((&epoch.max, true, epoch.seq)),
    }
}

/// Cost of a usage event at `ts`, `(cost, priced_at_max, price_version)`: its tokens at the
/// prices in force, or 0 when a subscription carried the call (the derived label
/// `subscription`, which clients cannot set: SPEC §10, "costs 0 µUSD against money budgets").
/// The fold, replay, exports and what-if all price events here, so they cannot disagree.
pub fn event_cost(epochs: &[PriceEpoch], u: &UsageRecorded, ts: TsMicros) -> (Micros, bool, u64) {
    match price_at(epochs, &u.model, ts) {
        Some((_, _, version)) if u.labels.carries_subscription() => (0, false, version),
        Some((price, at_max, version)) => (pricing::usage_cost(price, &u.usage), at_max, version),
        None => (0, true, 0),
    }
}

/// The price timeline of a ledger, detached from it.
#[derive(Debug, Clone, Default)]
pub struct Pricer {
    epochs: Vec<PriceEpoch>,
}

impl Pricer {
    /// Cost of a usage event at `ts`: `(cost, priced_at_max, price_version)` ([`event_cost`]).
    pub fn event_cost(&self, u: &UsageRecorded, ts: TsMicros) -> (Micros, bool, u64) {
        event_cost(&self.epochs, u, ts)
    }
}

/// All tokens of a usage, added.
pub fn total_tokens(u: &Usage) -> u64 {
    u.input_tokens
        .saturating_add(u.output_tokens)
        .saturating_add(u.cached_input_tokens)
        .saturating_add(u.cache_write_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger under one budget per team that counts holds (and one price of $5 M a million
    /// input tokens), and `reserve(ledger, id, input_tokens)` placing a hold for team `a`.
    fn ledger_with_a_team_budget() -> Ledger {
        let text = r#"
[pricing.models."m"]
provider = "acme"
input_per_mtok = 5000000
output_per_mtok = 1.0
max_output_tokens = 1

[[budget]]
id = "team"
group_by = ["team"]
max_concurrent = 10

[[quota]]
id = "acme"
provider = "acme"
"#;
        let p = crate::policy::parse_policy(text, "t.toml", &|p| Err(p.to_string())).unwrap();
        let mut l = Ledger::new();
        let body = EventBody::PolicyApplied(bursar_schemas::event::PolicyApplied {
            policy_version: 1,
            source: "test".into(),
            source_hash: String::new(),
            policy: p.resolved,
        });
        l.apply(1, T, &body).unwrap();
        l
    }

    const T: TsMicros = 1_700_000_000_000_000;

    fn reserve(l: &mut Ledger, id: &str, input_tokens: u64) {
        reserve_for(l, id, input_tokens, None);
    }

    fn reserve_for(l: &mut Ledger, id: &str, input_tokens: u64, ttl_seconds: Option<u64>) {
        let req = bursar_schemas::wire::ReserveRequest {
            reservation_id: id.into(),
            labels: Labels::from([("team".to_string(), "a".to_string())]),
            model: Some("m".into()),
            estimate: bursar_schemas::wire::Estimate {
                input_tokens,
                max_output_tokens: Some(1),
            },
            ttl_seconds,
            candidates: None,
            require: None,
            wait_ms: None,
        };
        let step = l.execute(Command::Reserve(&req), T);
        assert!(
            matches!(step.answer, Answer::Decision(ref d) if d.decision == bursar_schemas::wire::Decision::Allow),
            "{:?}",
            step.answer
        );
    }

    fn release(l: &mut Ledger, id: &str) {
        let req = bursar_schemas::wire::ReleaseRequest {
            reservation_id: id.into(),
        };
        l.execute(Command::Release(&req), T);
    }

    /// The bucket `id`'s hold is counted in.
    fn bucket_of<'a>(l: &'a mut Ledger, id: &str) -> &'a mut buckets::Bucket {
        let (i, key) = l.holds[id].buckets[0].clone();
        l.budgets[i].get_mut(&key).unwrap()
    }

    #[test]
    fn holds_summing_past_the_largest_amount_end_exactly_also_through_a_snapshot() {
        let mut l = ledger_with_a_team_budget();
        // ~10¹² tokens (the most an estimate may hold) at $5 M a million: ~5·10¹⁸ µUSD each,
        // past the largest i64 together.
        reserve(&mut l, "big-1", 999_999_999_999);
        reserve(&mut l, "big-2", 999_999_999_999);
        reserve(&mut l, "small", 10);
        assert_eq!(bucket_of(&mut l, "big-1").holds.held().micros, i64::MAX);
        let (i, key) = l.holds["big-1"].buckets[0].clone();
        let bytes = bincode::serde::encode_to_vec(&l, bincode::config::standard()).unwrap();
        let (mut read, _): (Ledger, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(read, l);
        for ledger in [&mut l, &mut read] {
            release(ledger, "small");
            release(ledger, "big-1");
            assert_eq!(ledger.fault(), None);
            let left = ledger.holds["big-2"].amounts;
            assert_eq!(
                bucket_of(ledger, "big-2").holds.held(),
                left,
                "exactly one hold left"
            );
            release(ledger, "big-2");
            assert_eq!(ledger.fault(), None);
            let b = ledger.budgets[i].get(&key).unwrap();
            assert!(b.holds.is_empty(), "nothing held: {:?}", b.holds);
        }
    }

    /// A hold that expired but whose event is not folded yet is taken out of what reads show,
    /// exactly, also when the bucket's sum is past the largest amount.
    #[test]
    fn expired_holds_come_out_of_a_sum_past_the_largest_amount_exactly() {
        let mut l = ledger_with_a_team_budget();
        reserve_for(&mut l, "short", 999_999_999_999, Some(1));
        reserve(&mut l, "big-1", 999_999_999_999);
        reserve(&mut l, "big-2", 10);
        let (i, key) = l.holds["big-1"].buckets[0].clone();
        let at = |l: &Ledger, now| {
            let adj = l.expired_adjust(now);
            l.figures(i, &key, now, &adj).held
        };
        assert_eq!(at(&l, T).micros, i64::MAX, "all three: past the cap");
        // "short" has expired 2 s later: big-1 and big-2 are left, below the cap.
        let left = l.holds["big-1"].amounts + l.holds["big-2"].amounts;
        assert!(left.micros < i64::MAX);
        assert_eq!(at(&l, T + 2_000_000), left);
    }

    /// Release `id`, which meets an impossible state: asserted in debug builds, noted in both;
    /// the fault noted.
    fn release_meeting_a_fault(l: &mut Ledger, id: &str) -> String {
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| release(l, id)));
        assert_eq!(
            ended.is_err(),
            cfg!(debug_assertions),
            "asserted in debug builds only"
        );
        l.fault().unwrap().to_string()
    }

    #[test]
    fn a_hold_ended_in_a_bucket_that_does_not_count_it_is_a_fault_asserted_in_debug_builds() {
        let mut l = ledger_with_a_team_budget();
        reserve(&mut l, "r1", 1000);
        // As a bug would: the bucket forgets the hold.
        bucket_of(&mut l, "r1").holds = buckets::Holds::default();
        let fault = release_meeting_a_fault(&mut l, "r1");
        assert!(
            fault.contains("reservation \"r1\" ends holding") && fault.contains("(folding seq 3)"),
            "{fault}"
        );
    }

    #[test]
    fn a_hold_ended_in_a_quota_that_does_not_count_it_is_a_fault_asserted_in_debug_builds() {
        let mut l = ledger_with_a_team_budget();
        reserve(&mut l, "r1", 1000);
        assert_eq!(
            l.quota_held("acme").0[0],
            1,
            "the hold counts in its provider's quota"
        );
        // As a bug would: the quota forgets the hold.
        l.quota_holds.clear();
        let fault = release_meeting_a_fault(&mut l, "r1");
        assert!(
            fault.contains("in quota \"acme\", which holds less"),
            "{fault}"
        );
    }

    #[test]
    fn a_snapshot_whose_hold_figures_are_not_the_sums_of_its_holds_is_refused() {
        let mut l = ledger_with_a_team_budget();
        reserve(&mut l, "r1", 1000);
        reserve(&mut l, "r2", 1000);
        let held = bucket_of(&mut l, "r1").holds.held();
        bucket_of(&mut l, "r1").holds = buckets::Holds::of(held, 1);
        let bytes = bincode::serde::encode_to_vec(&l, bincode::config::standard()).unwrap();
        let read: Result<(Ledger, usize), _> =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard());
        let e = read.unwrap_err().to_string();
        assert!(
            e.contains("holds") && e.contains("in 1 holds; its live holds sum to"),
            "{e}"
        );
    }

    fn set(i: usize) -> Labels {
        Labels::from([("user".to_string(), format!("u{i}"))])
    }

    fn refs(i: usize) -> Vec<MatchRef> {
        vec![match_ref(0, i as u32)]
    }

    #[test]
    fn the_match_cache_stays_within_its_bound_and_keeps_what_comes_back() {
        let mut cache = MatchCache::default();
        for i in 0..100 {
            assert_eq!(cache.get_or_insert(&set(i), 8, || refs(i)), &refs(i)[..]);
            // The label set used all along (0) is looked up, and moved up, every time.
            assert_eq!(cache.get_or_insert(&set(0), 8, || refs(999)), &refs(0)[..]);
            assert!(cache.new.len() + cache.old.len() <= 8);
        }
        assert_eq!(
            cache.get(&set(0)),
            Some(&refs(0)[..]),
            "a hot label set stays"
        );
        assert_eq!(
            cache.get(&set(99)),
            Some(&refs(99)[..]),
            "the newest is there"
        );
        assert_eq!(cache.get(&set(50)), None, "an old one is gone");
    }

    /// During a long fold a shared set's entry keeps that copy (so that no other set can live
    /// where it lives) and is found by it; at the fold's end every kept copy is let go.
    #[test]
    fn a_long_fold_keeps_the_shared_sets_it_matched_and_lets_them_go_at_its_end() {
        let mut cache = MatchCache::default();
        cache.by_set(true);
        let l = EventLabels::from(set(1));
        let copy = l.clone();
        assert_eq!(
            cache.entry_of(&l, 16, || refs(1)).unwrap().refs(),
            &refs(1)[..]
        );
        drop(copy);
        assert!(l.is_shared(), "kept by the cache during the fold");
        let again = cache.entry_of(&l, 16, || panic!("matched again")).unwrap();
        assert_eq!(again.refs(), &refs(1)[..]);
        // An equal set, another copy: found by its labels, and kept instead.
        let other = EventLabels::from(set(1));
        let shared = other.clone();
        assert_eq!(
            cache
                .entry_of(&other, 16, || panic!("matched again"))
                .unwrap()
                .refs(),
            &refs(1)[..]
        );
        drop(shared);
        assert!(!l.is_shared() && other.is_shared());
        // A copy of the cache is in no long fold: it keeps no set.
        let copy = cache.clone();
        assert!(copy.by_set.is_none());
        assert!(other.is_shared(), "the original still keeps it");
        drop(copy);
        cache.by_set(false);
        assert!(!other.is_shared(), "let go at the end of the fold");
        // A large set is not kept.
        cache.by_set(true);
        let big = EventLabels::from(Labels::from([("id".to_string(), "x".repeat(5_000))]));
        let also = big.clone();
        cache.entry_of(&big, 16, || refs(2)).unwrap();
        drop(also);
        assert!(
            !big.is_shared(),
            "a set over 4 KB is matched by its labels, not kept"
        );
    }

    #[test]
    fn packed_labels_match_only_the_same_set() {
        let a = Labels::from([("a".to_string(), "bc".to_string())]);
        let b = Labels::from([("ab".to_string(), "c".to_string())]);
        let two = Labels::from([
            ("a".to_string(), "bc".to_string()),
            ("d".to_string(), String::new()),
        ]);
        let pack = |l: &Labels| with_packed(l, |p, _| p.bytes[..p.len].to_vec());
        assert_eq!(pack(&a), b"a\xFFbc\xFF");
        assert_ne!(pack(&a), pack(&b));
        assert_ne!(pack(&a), pack(&two));
        assert!(pack(&Labels::new()).is_empty());
        // Longer than the stack buffer: packed on the heap, the same way.
        let long = Labels::from([("k".to_string(), "v".repeat(PACK_INLINE_BYTES))]);
        assert_eq!(pack(&long).len(), PACK_INLINE_BYTES + 3);
        assert_eq!(pack(&long).last(), Some(&0xFF));
    }
}
