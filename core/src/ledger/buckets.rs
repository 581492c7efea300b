//! One budget bucket: what was spent in its current window and what live holds keep back.

use super::chunked::Chunked;
use crate::window::{window_bounds, Amounts, RollingShape, RollingSlots};
use bursar_schemas::policy::WindowSpec;
use bursar_schemas::wire::BucketState;
use bursar_schemas::TsMicros;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Spent and held figures of one `(budget, scope key)`.
///
/// Its serialized form is the one snapshots have always had: the fields below in order, the
/// two windows of [`Marks`] as two `Option<TsMicros>` at the end, `window_end` left out.
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    /// Start of the window `spent` belongs to (fixed/calendar).
    pub window_start: TsMicros,
    /// End (exclusive) of that window, once computed: derived from `window_start` and the
    /// budget's window, so that an event inside the current window needs no window
    /// arithmetic. 0 (the default, also after a snapshot is read) means "not known yet": no
    /// timestamp is in `[window_start, 0)` unless the window really is there, so it is
    /// computed again. Not serialised, not compared.
    pub window_end: TsMicros,
    /// Spent in that window (fixed/calendar), or ever (cumulative).
    pub spent: Amounts,
    /// Spent per slot (rolling budgets; allocated on first use).
    pub rolling: RollingSlots,
    /// What live holds keep back (see [`Holds`]).
    pub holds: Holds,
    /// The windows in which `budget_warned` and `budget_exhausted` were last appended.
    pub marks: Marks,
}

/// What a bucket's live holds keep back and how many they are, allocated while there are
/// any: most buckets hold nothing most of the time (a `record` never holds), and inline the
/// figures took 32 of a bucket's 88 bytes (`bursar-bench memory`, 254,004 buckets; exact, as
/// [`HeldSums`], they take a box of 64). Empty (`None`) exactly when nothing is held, so that
/// equal figures are equal boxes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds(Option<Box<HeldSums>>);

/// The sums of a bucket's live holds, wide enough never to stop at a largest value: 2⁶⁴ holds
/// of the largest `Amounts` still fit. So ending a hold gives back exactly what placing it
/// added, and ending more than was placed is seen, never hidden by a sum that saturated on
/// the way (an `i64` sum of micro-USD did: 10¹² tokens at ~$9.2 M a million reach its cap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeldSums {
    micros: i128,
    tokens: u128,
    requests: u128,
    live: u64,
}

impl HeldSums {
    /// The sums of `live` holds that hold `amounts` together (as a snapshot stores a bucket's
    /// figures, and as one hold of `amounts` is counted with `live` 1).
    pub fn of(amounts: Amounts, live: u64) -> HeldSums {
        HeldSums {
            micros: i128::from(amounts.micros),
            tokens: u128::from(amounts.tokens),
            requests: u128::from(amounts.requests),
            live,
        }
    }

    /// Count one more hold of `amounts` taking `slots`.
    pub fn add(&mut self, amounts: Amounts, slots: u64) {
        let o = HeldSums::of(amounts, slots);
        self.micros += o.micros;
        self.tokens += o.tokens;
        self.requests += o.requests;
        self.live += o.live;
    }

    /// Take holds summing to `o` out; false (and nothing changed) when less than that is held,
    /// which no correct fold meets (a hold's figures are never negative: prices are not, a
    /// price table refuses a negative one).
    #[must_use]
    pub fn take(&mut self, o: &HeldSums) -> bool {
        let fits = self.micros >= o.micros
            && self.tokens >= o.tokens
            && self.requests >= o.requests
            && self.live >= o.live;
        if fits {
            self.micros -= o.micros;
            self.tokens -= o.tokens;
            self.requests -= o.requests;
            self.live -= o.live;
        }
        fits
    }

    /// The sums as a bucket reports (and a snapshot stores) them: each at most its type's
    /// largest value (none is ever below zero: `take` refuses to go there).
    pub fn held(&self) -> Amounts {
        Amounts {
            micros: i64::try_from(self.micros).unwrap_or(i64::MAX),
            tokens: u64::try_from(self.tokens).unwrap_or(u64::MAX),
            requests: u64::try_from(self.requests).unwrap_or(u64::MAX),
        }
    }

    /// Live holds.
    pub fn live(&self) -> u64 {
        self.live
    }

    fn is_zero(&self) -> bool {
        *self == HeldSums::default()
    }
}

impl Holds {
    /// The figures as stored; `held` and `live_holds` both zero means none.
    pub fn of(held: Amounts, live_holds: u64) -> Holds {
        Holds::of_sums(HeldSums::of(held, live_holds))
    }

    /// Exactly `sums`.
    pub fn of_sums(sums: HeldSums) -> Holds {
        Holds((!sums.is_zero()).then(|| Box::new(sums)))
    }

    /// The exact sums.
    pub fn sums(&self) -> HeldSums {
        self.0.as_deref().copied().unwrap_or_default()
    }

    /// Held by live holds (each figure at most its type's largest value).
    pub fn held(&self) -> Amounts {
        self.0.as_ref().map_or_else(Amounts::default, |h| h.held())
    }

    /// Live holds.
    pub fn live_holds(&self) -> u64 {
        self.0.as_ref().map_or(0, |h| h.live)
    }

    /// True when nothing is held (no box: see [`Holds`]).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Change the sums in place (allocating them when there were none), then let them go if
    /// nothing is held any more.
    fn change<T>(&mut self, f: impl FnOnce(&mut HeldSums) -> T) -> T {
        let sums = self.0.get_or_insert_with(Box::default);
        let out = f(sums);
        if sums.is_zero() {
            self.0 = None;
        }
        out
    }
}

/// The windows in which a bucket's `budget_warned` and `budget_exhausted` were last appended,
/// allocated when the first is: most buckets never cross a threshold, and inline the two
/// `Option<TsMicros>` took 32 of a bucket's 112 bytes (`bursar-bench memory`, 254,004 buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks(Option<Box<[Option<TsMicros>; 2]>>);

impl Marks {
    /// Window in which `budget_warned` was last appended.
    pub fn warned(&self) -> Option<TsMicros> {
        self.0.as_ref().and_then(|m| m[0])
    }

    /// Window in which `budget_exhausted` was last appended.
    pub fn exhausted(&self) -> Option<TsMicros> {
        self.0.as_ref().and_then(|m| m[1])
    }

    /// A `budget_warned` was appended for the window starting at `window`.
    pub fn set_warned(&mut self, window: TsMicros) {
        self.0.get_or_insert_with(Box::default)[0] = Some(window);
    }

    /// A `budget_exhausted` was appended for the window starting at `window`.
    pub fn set_exhausted(&mut self, window: TsMicros) {
        self.0.get_or_insert_with(Box::default)[1] = Some(window);
    }

    fn of(warned: Option<TsMicros>, exhausted: Option<TsMicros>) -> Marks {
        Marks((warned.is_some() || exhausted.is_some()).then(|| Box::new([warned, exhausted])))
    }
}

impl Serialize for Bucket {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut st = serializer.serialize_struct("Bucket", 7)?;
        st.serialize_field("window_start", &self.window_start)?;
        st.serialize_field("spent", &self.spent)?;
        st.serialize_field("rolling", &self.rolling)?;
        st.serialize_field("held", &self.holds.held())?;
        st.serialize_field("live_holds", &self.holds.live_holds())?;
        st.serialize_field("warned_window", &self.marks.warned())?;
        st.serialize_field("exhausted_window", &self.marks.exhausted())?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Bucket {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Bucket, D::Error> {
        /// The fields as snapshots hold them.
        #[derive(Deserialize)]
        #[serde(rename = "Bucket")]
        struct Wire {
            window_start: TsMicros,
            spent: Amounts,
            rolling: RollingSlots,
            held: Amounts,
            live_holds: u64,
            warned_window: Option<TsMicros>,
            exhausted_window: Option<TsMicros>,
        }
        let w = Wire::deserialize(deserializer)?;
        Ok(Bucket {
            window_start: w.window_start,
            window_end: 0,
            spent: w.spent,
            rolling: w.rolling,
            holds: Holds::of(w.held, w.live_holds),
            marks: Marks::of(w.warned_window, w.exhausted_window),
        })
    }
}

impl PartialEq for Bucket {
    fn eq(&self, other: &Self) -> bool {
        // `window_end` is derived: left out.
        self.window_start == other.window_start
            && self.spent == other.spent
            && self.rolling == other.rolling
            && self.holds == other.holds
            && self.marks.warned() == other.marks.warned()
            && self.marks.exhausted() == other.marks.exhausted()
    }
}

impl Eq for Bucket {}

/// What a bucket looks like at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Spent in the current window.
    pub spent: Amounts,
    /// Held by live holds.
    pub held: Amounts,
    /// Live holds.
    pub live_holds: u64,
}

impl Bucket {
    /// Add usage at `ts`, rolling the window over first when `ts` is in a new one; `shape` is
    /// that of a rolling window, computed already (or not: `None`).
    pub fn add_spent_in(
        &mut self,
        spec: &WindowSpec,
        shape: Option<RollingShape>,
        ts: TsMicros,
        amounts: Amounts,
    ) {
        match spec {
            WindowSpec::Rolling {
                seconds,
                resolution_seconds,
            } => self.rolling.add_in(
                shape.unwrap_or_else(|| RollingShape::new(*seconds, *resolution_seconds)),
                ts,
                amounts,
            ),
            WindowSpec::Cumulative => self.spent += amounts,
            WindowSpec::Fixed { .. }
            | WindowSpec::Calendar { .. }
            | WindowSpec::CalendarZone { .. } => {
                if !self.in_current_window(ts) {
                    let (start, end) = window_bounds(spec, ts);
                    if start != self.window_start {
                        self.window_start = start;
                        self.spent = Amounts::default();
                    }
                    self.window_end = end.unwrap_or(TsMicros::MAX);
                }
                self.spent += amounts;
            }
        }
    }

    /// Move a fixed or calendar bucket into the window containing `ts` (its spending starts
    /// again at zero when that is a new window); nothing for rolling and cumulative ones. A
    /// bucket in which a hold is placed is live until the end of that hold's window (SPEC §5),
    /// also when nothing is ever spent in it.
    pub fn enter_window(&mut self, spec: &WindowSpec, ts: TsMicros) {
        if let WindowSpec::Fixed { .. }
        | WindowSpec::Calendar { .. }
        | WindowSpec::CalendarZone { .. } = spec
        {
            self.add_spent_in(spec, None, ts, Amounts::default());
        }
    }

    /// True when `ts` is known to be in the window starting at `window_start` (fixed and
    /// calendar windows; false when the window's end is not known yet).
    fn in_current_window(&self, ts: TsMicros) -> bool {
        self.window_start <= ts && ts < self.window_end
    }

    /// Count a hold.
    pub fn hold(&mut self, amounts: Amounts, slots: u64) {
        self.holds.change(|sums| sums.add(amounts, slots));
    }

    /// Stop counting a hold; false (and nothing changed) when the bucket holds less than it,
    /// which no correct fold meets: the ledger reports it (`Ledger::fault`).
    #[must_use]
    pub fn unhold(&mut self, amounts: Amounts, slots: u64) -> bool {
        self.holds
            .change(|sums| sums.take(&HeldSums::of(amounts, slots)))
    }

    /// Spent in the window containing `now` (`shape` as for [`Bucket::add_spent_in`]).
    fn spent_in(&self, spec: &WindowSpec, shape: Option<RollingShape>, now: TsMicros) -> Amounts {
        match spec {
            WindowSpec::Rolling {
                seconds,
                resolution_seconds,
            } => self.rolling.total_in(
                shape.unwrap_or_else(|| RollingShape::new(*seconds, *resolution_seconds)),
                now,
            ),
            WindowSpec::Cumulative => self.spent,
            WindowSpec::Fixed { .. }
            | WindowSpec::Calendar { .. }
            | WindowSpec::CalendarZone { .. } => {
                if self.in_current_window(now) || window_bounds(spec, now).0 == self.window_start {
                    self.spent
                } else {
                    Amounts::default()
                }
            }
        }
    }

    /// When this bucket stops being live, holds aside: the end of the window its spending is
    /// in (fixed, calendar), the moment its newest slot leaves the window (rolling), never
    /// (cumulative: `TsMicros::MAX`).
    pub fn ends_at(&self, limits: &Limits) -> TsMicros {
        match &limits.window {
            WindowSpec::Cumulative => TsMicros::MAX,
            WindowSpec::Rolling {
                seconds,
                resolution_seconds,
            } => self
                .rolling
                .ends_at(
                    limits
                        .rolling
                        .unwrap_or_else(|| RollingShape::new(*seconds, *resolution_seconds)),
                )
                .unwrap_or(TsMicros::MIN),
            spec => {
                if self.window_end != 0 {
                    self.window_end
                } else {
                    window_bounds(spec, self.window_start)
                        .1
                        .unwrap_or(TsMicros::MAX)
                }
            }
        }
    }

    /// True when the bucket is no longer live at `ts` (SPEC §5, live scopes): its window has
    /// ended (or, rolling, every slot has left it) and it holds no live reservation. Such a
    /// bucket reads as an empty one from then on, so it may leave memory.
    pub fn ended(&self, limits: &Limits, ts: TsMicros) -> bool {
        self.ended_on_read(limits, ts, 0)
    }

    /// [`Bucket::ended`] as a read sees it: `expired` of its live holds, past their expiry but
    /// not reaped yet, do not keep it live (SPEC §5: reads never show such a hold).
    pub fn ended_on_read(&self, limits: &Limits, ts: TsMicros, expired: u64) -> bool {
        self.holds.live_holds() <= expired && self.ends_at(limits) <= ts
    }

    /// Figures at `now`.
    pub fn figures(&self, spec: &WindowSpec, now: TsMicros) -> Figures {
        self.figures_in(spec, None, now)
    }

    /// [`Bucket::figures`], with the shape of a rolling window computed already.
    pub fn figures_in(
        &self,
        spec: &WindowSpec,
        shape: Option<RollingShape>,
        now: TsMicros,
    ) -> Figures {
        Figures {
            spent: self.spent_in(spec, shape, now),
            held: self.holds.held(),
            live_holds: self.holds.live_holds(),
        }
    }
}

/// The limits of one budget compiled for deciding: per dimension (money, tokens, requests,
/// concurrency) the limit and the `warn_at` threshold as plain integers, so that judging a
/// bucket is a few comparisons. Derived from the policy when it is installed (or read back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The limit per dimension; `i128::MAX` where the budget sets none.
    limit: [i128; 4],
    /// The smallest use that reaches `warn_at` per dimension: `ceil(warn_at × limit)`, exact
    /// (`used × 10^6 >= ppm × limit` holds exactly when `used >= ceil(ppm × limit / 10^6)`);
    /// `i128::MAX` without `warn_at` or without a limit.
    warn: [i128; 4],
    /// True when the budget sets any limit (a meter sets none).
    pub limited: bool,
    /// True when it sets `warn_at` (and a limit).
    pub has_warn: bool,
    /// True when it denies (`enforce = "deny"`).
    pub deny: bool,
    /// Its window.
    pub window: WindowSpec,
    /// The shape of a rolling window.
    pub rolling: Option<RollingShape>,
}

impl Limits {
    /// The compiled limits of `b`.
    pub fn of(b: &bursar_schemas::policy::ResolvedBudget) -> Limits {
        const PPM: i128 = 1_000_000;
        let dims = [
            b.max_micros.map(i128::from),
            b.max_tokens.map(i128::from),
            b.max_requests.map(i128::from),
            b.max_concurrent.map(i128::from),
        ];
        let mut out = Limits {
            limit: [i128::MAX; 4],
            warn: [i128::MAX; 4],
            limited: dims.iter().any(Option::is_some),
            has_warn: b.warn_at_ppm.is_some() && dims.iter().any(Option::is_some),
            deny: b.enforce == bursar_schemas::policy::Enforce::Deny,
            window: b.window.clone(),
            rolling: match b.window {
                WindowSpec::Rolling {
                    seconds,
                    resolution_seconds,
                } => Some(RollingShape::new(seconds, resolution_seconds)),
                _ => None,
            },
        };
        for ((limit, warn), dim) in out.limit.iter_mut().zip(out.warn.iter_mut()).zip(dims) {
            if let Some(l) = dim {
                *limit = l;
                if let Some(ppm) = b.warn_at_ppm {
                    let scaled = i128::from(ppm).saturating_mul(l);
                    // Ceiling division (rounds toward +infinity for either sign).
                    *warn = scaled.div_euclid(PPM) + i128::from(scaled.rem_euclid(PPM) != 0);
                }
            }
        }
        out
    }

    /// What a bucket uses of each dimension with `f`: spent plus held, and live holds.
    fn used(f: &Figures) -> [i128; 4] {
        [
            i128::from(f.spent.micros) + i128::from(f.held.micros),
            i128::from(f.spent.tokens) + i128::from(f.held.tokens),
            i128::from(f.spent.requests) + i128::from(f.held.requests),
            i128::from(f.live_holds),
        ]
    }

    /// True when some dimension of `used` is at least `bound`'s (written out: four compares).
    fn reaches(used: &[i128; 4], bound: &[i128; 4]) -> bool {
        (used[0] >= bound[0])
            | (used[1] >= bound[1])
            | (used[2] >= bound[2])
            | (used[3] >= bound[3])
    }

    /// True when `f` exceeds a limit (`spent + held > limit`).
    pub fn over(&self, f: &Figures) -> bool {
        let u = Self::used(f);
        let l = &self.limit;
        self.limited && ((u[0] > l[0]) | (u[1] > l[1]) | (u[2] > l[2]) | (u[3] > l[3]))
    }

    /// True when `probe` (and one concurrency slot) would fit an empty bucket: a request that
    /// does not is never let through by waiting.
    pub fn fits_empty(&self, probe: Amounts) -> bool {
        let p = [
            i128::from(probe.micros),
            i128::from(probe.tokens),
            i128::from(probe.requests),
            1,
        ];
        (0..4).all(|d| p[d] <= self.limit[d])
    }

    /// True when every limit `after` (a bucket's figures with a probe held) exceeds frees up by
    /// itself (SPEC §10 `wait_ms`): a concurrency slot, anything in a rolling window, or what
    /// other holds keep (`spent + probe` alone fits). Money, tokens or requests already spent
    /// in a fixed, calendar or cumulative window do not come back by waiting.
    pub fn frees_by_itself(&self, after: &Figures, probe: Amounts) -> bool {
        let u = Self::used(after);
        let spent = [
            i128::from(after.spent.micros) + i128::from(probe.micros),
            i128::from(after.spent.tokens) + i128::from(probe.tokens),
            i128::from(after.spent.requests) + i128::from(probe.requests),
            1,
        ];
        (0..4).all(|d| {
            u[d] <= self.limit[d] || d == 3 || self.rolling.is_some() || spent[d] <= self.limit[d]
        })
    }

    /// True when `f` reaches `warn_at` of some limit.
    pub fn warns(&self, f: &Figures) -> bool {
        self.has_warn && Self::reaches(&Self::used(f), &self.warn)
    }

    /// The state of a bucket with figures `f`: exhausted when `spent + held >= limit` for some
    /// limit, warn when it reaches `warn_at` of some limit, else ok.
    pub fn state(&self, f: &Figures) -> BucketState {
        if !self.limited {
            return BucketState::Ok;
        }
        let used = Self::used(f);
        if Self::reaches(&used, &self.limit) {
            BucketState::Exhausted
        } else if self.has_warn && Self::reaches(&used, &self.warn) {
            BucketState::Warn
        } else {
            BucketState::Ok
        }
    }
}

/// The identifier of the window a crossing belongs to, for "once per bucket per window".
/// Rolling windows have no edges: a rolling bucket may cross once per `window_seconds` period.
pub fn crossing_window(spec: &WindowSpec, ts: TsMicros) -> TsMicros {
    match spec {
        WindowSpec::Cumulative => 0,
        WindowSpec::Rolling { seconds, .. } => {
            let w = crate::time::seconds(*seconds).max(1);
            ts.div_euclid(w).saturating_mul(w)
        }
        _ => window_bounds(spec, ts).0,
    }
}

/// A budget sweeps its ended buckets once it holds this many, or twice as many as its last
/// sweep kept, whichever is more (see [`BudgetState::sweep_due`]): memory stays within about
/// twice the live buckets, and a sweep's cost is paid for by the inserts before it.
pub const SWEEP_MIN_BUCKETS: usize = 1024;

/// The buckets of one budget: a slab of buckets, each with its scope key, and an index from
/// key to slot. A bucket keeps its slot while it exists, so a remembered slot finds it again
/// without hashing its key.
///
/// Buckets whose window has ended and that hold nothing leave (SPEC §5, live scopes) when the
/// budget is swept ([`BudgetState::sweep`]): at `max_keys_per_budget`, before a new scope is
/// refused, and to keep memory bounded while scopes churn. A swept slot is reused only after
/// [`BudgetState::release_slots`], which the ledger calls when it empties its match cache, so
/// a remembered slot is always either its own bucket or vacant, never another key's.
///
/// Serialised as the map from scope key to bucket; compared as that map (slots are an
/// in-memory detail: a ledger read back from a snapshot may number its buckets differently).
#[derive(Debug, Clone)]
pub struct BudgetState {
    /// Slot of each key, hashed by key.
    index: hashbrown::HashTable<u32>,
    /// Key of each slot (`None`: vacant).
    keys: Chunked<Option<Box<str>>>,
    /// Bucket of each slot.
    slab: Chunked<Bucket>,
    /// Vacant slots that may be reused.
    vacant: Vec<u32>,
    /// Slots vacated by a sweep, reusable once remembered slots are forgotten.
    released: Vec<u32>,
    /// Buckets the last sweep kept (paces the next one).
    kept_by_sweep: usize,
    /// No bucket ends before this (a lower bound; `TsMicros::MIN` when unknown).
    next_end: TsMicros,
}

impl Default for BudgetState {
    fn default() -> Self {
        BudgetState {
            index: Default::default(),
            keys: Chunked::default(),
            slab: Chunked::default(),
            vacant: Vec::new(),
            released: Vec::new(),
            kept_by_sweep: 0,
            next_end: TsMicros::MIN,
        }
    }
}

fn key_hash(key: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = rustc_hash::FxHasher::default();
    h.write(key.as_bytes());
    h.write_u8(0xFF);
    h.finish()
}

impl BudgetState {
    /// Number of buckets (live or not yet swept).
    pub fn len(&self) -> usize {
        self.slab.len() - self.vacant.len() - self.released.len()
    }

    /// Slot of `key`'s bucket.
    pub fn slot(&self, key: &str) -> Option<u32> {
        let keys = &self.keys;
        self.index
            .find(key_hash(key), |&s| {
                keys.get(s as usize)
                    .is_some_and(|k| k.as_deref() == Some(key))
            })
            .copied()
    }

    /// The bucket of `key`.
    pub fn get(&self, key: &str) -> Option<&Bucket> {
        self.slot(key).and_then(|s| self.slab.get(s as usize))
    }

    /// The bucket of `key`, to change.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Bucket> {
        let slot = self.slot(key)?;
        self.slab.get_mut(slot as usize)
    }

    fn occupied(&self, slot: u32) -> bool {
        self.keys.get(slot as usize).is_some_and(Option::is_some)
    }

    /// The bucket in `slot` (`None` for a vacant slot).
    pub fn at(&self, slot: u32) -> Option<&Bucket> {
        if !self.occupied(slot) {
            return None;
        }
        self.slab.get(slot as usize)
    }

    /// The scope key and the bucket of `slot`, the bucket to change (`None` for a vacant slot).
    pub fn entry_mut(&mut self, slot: u32) -> Option<(&str, &mut Bucket)> {
        let key = self.keys.get(slot as usize)?.as_deref()?;
        Some((key, self.slab.get_mut(slot as usize)?))
    }

    /// The scope key of `slot` (empty for a slot that does not exist or is vacant).
    pub fn key(&self, slot: u32) -> &str {
        self.keys
            .get(slot as usize)
            .and_then(Option::as_deref)
            .unwrap_or("")
    }

    /// Slot of `key`'s bucket, created empty if new.
    pub fn slot_or_insert(&mut self, key: &str) -> u32 {
        if let Some(slot) = self.slot(key) {
            return slot;
        }
        self.insert(key.to_string(), Bucket::default())
    }

    /// Add a bucket for a key that has none; its slot.
    fn insert(&mut self, key: String, bucket: Bucket) -> u32 {
        let slot = match self.vacant.pop() {
            Some(s) => s,
            None => {
                let s = u32::try_from(self.slab.len()).unwrap_or(u32::MAX);
                self.keys.push(None);
                self.slab.push(Bucket::default());
                s
            }
        };
        let keys = &self.keys;
        self.index.insert_unique(key_hash(&key), slot, |&s| {
            key_hash(
                keys.get(s as usize)
                    .and_then(Option::as_deref)
                    .unwrap_or(""),
            )
        });
        if let Some(k) = self.keys.get_mut(slot as usize) {
            // A `Box<str>`: 16 bytes a slot instead of a `String`'s 24.
            *k = Some(key.into_boxed_str());
        }
        if let Some(b) = self.slab.get_mut(slot as usize) {
            *b = bucket;
        }
        slot
    }

    /// Note that a bucket may end from `ts` on (a new one, or one whose holds went): the next
    /// sweep is not skipped before it.
    pub fn may_end_from(&mut self, ts: TsMicros) {
        self.next_end = self.next_end.min(ts);
    }

    /// True when no bucket can have ended by `ts`.
    fn none_ended_by(&self, ts: TsMicros) -> bool {
        ts < self.next_end
    }

    /// True when a sweep at `ts` is due for memory's sake: the budget holds many more buckets
    /// than its last sweep kept, and some may have ended.
    pub fn sweep_due(&self, ts: TsMicros) -> bool {
        self.len() >= SWEEP_MIN_BUCKETS.max(2 * self.kept_by_sweep) && !self.none_ended_by(ts)
    }

    /// Remove every bucket that has ended by `ts` (see [`Bucket::ended`]); how many went.
    /// Their slots are reusable after [`BudgetState::release_slots`].
    pub fn sweep(&mut self, limits: &Limits, ts: TsMicros) -> usize {
        if self.none_ended_by(ts) {
            return 0;
        }
        let mut gone = 0;
        let mut next_end = TsMicros::MAX;
        for slot in 0..self.slab.len() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            if !self.occupied(slot) {
                continue;
            }
            let Some(bucket) = self.slab.get(slot as usize) else {
                continue;
            };
            if bucket.ended(limits, ts) {
                self.evict(slot);
                gone += 1;
            } else {
                // One that ended but holds a reservation may go once that ends, which says so
                // through `may_end_from`.
                let end = bucket.ends_at(limits);
                if end > ts {
                    next_end = next_end.min(end);
                }
            }
        }
        self.next_end = next_end;
        self.kept_by_sweep = self.len();
        gone
    }

    fn evict(&mut self, slot: u32) {
        let Some(key) = self.keys.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        if let Ok(entry) = self.index.find_entry(key_hash(&key), |&s| s == slot) {
            entry.remove();
        }
        if let Some(b) = self.slab.get_mut(slot as usize) {
            *b = Bucket::default();
        }
        self.released.push(slot);
    }

    /// Make the slots of swept buckets reusable (every remembered slot has been forgotten).
    pub fn release_slots(&mut self) {
        self.vacant.append(&mut self.released);
    }

    /// How many buckets are live at `now` (exact: ended ones not yet swept are not counted), as
    /// a read sees them: `expired(key)` of a bucket's live holds are past their expiry and not
    /// reaped yet ([`Bucket::ended_on_read`]).
    pub fn live_count(
        &self,
        limits: &Limits,
        now: TsMicros,
        expired: impl Fn(&str) -> u64,
    ) -> usize {
        if self.none_ended_by(now) {
            return self.len();
        }
        self.iter()
            .filter(|(key, b)| !b.ended_on_read(limits, now, expired(key)))
            .count()
    }

    /// `(key, bucket)` of every bucket, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bucket)> {
        self.keys
            .iter()
            .zip(self.slab.iter())
            .filter_map(|(k, b)| Some((k.as_deref()?, b)))
    }

    /// Every scope key, in slot order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().filter_map(|k| k.as_deref())
    }
}

impl PartialEq for BudgetState {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, b)| other.get(k) == Some(b))
    }
}

impl Serialize for BudgetState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // The same shape as the `{ buckets: HashMap<String, Bucket> }` of earlier versions.
        struct Map<'a>(&'a BudgetState);
        impl Serialize for Map<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                // The length up front: bincode needs it (`iter` skips vacant slots, so its size
                // hint is not exact).
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (k, b) in self.0.iter() {
                    map.serialize_entry(k, b)?;
                }
                map.end()
            }
        }
        let mut s = serializer.serialize_struct("BudgetState", 1)?;
        s.serialize_field("buckets", &Map(self))?;
        s.end()
    }
}

impl<'de> Deserialize<'de> for BudgetState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "BudgetState")]
        struct Stored {
            buckets: Buckets,
        }
        Ok(Stored::deserialize(deserializer)?.buckets.0)
    }
}

/// The key → bucket map of a serialised [`BudgetState`], read straight into the slab (sized
/// from the map's length when the format tells it; a duplicate key is an error).
struct Buckets(BudgetState);

impl<'de> Deserialize<'de> for Buckets {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Buckets;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map from scope key to bucket")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Buckets, A::Error> {
                let mut state = BudgetState::default();
                // Bounded: a hostile length must not allocate up front.
                let n = map.size_hint().unwrap_or(0).min(1 << 20);
                let keys = &state.keys;
                state.index.reserve(n, |&s| {
                    key_hash(
                        keys.get(s as usize)
                            .and_then(Option::as_deref)
                            .unwrap_or(""),
                    )
                });
                state.keys.reserve(n);
                state.slab.reserve(n);
                while let Some((key, bucket)) = map.next_entry::<String, Bucket>()? {
                    if state.slot(&key).is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "scope key {key:?} appears twice"
                        )));
                    }
                    state.insert(key, bucket);
                }
                Ok(Buckets(state))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bursar_schemas::policy::{Enforce, ResolvedBudget};

    /// A bucket as the derive wrote it before its rolling counter and marks were boxed.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct BucketBefore {
        window_start: TsMicros,
        spent: Amounts,
        rolling: crate::window::RollingCounter,
        held: Amounts,
        live_holds: u64,
        warned_window: Option<TsMicros>,
        exhausted_window: Option<TsMicros>,
    }

    fn bincode_of<T: Serialize>(v: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
    }

    fn decoded<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .unwrap()
            .0
    }

    #[test]
    fn a_bucket_takes_64_bytes_and_lets_its_holds_go_when_the_last_one_ends() {
        // The memory figure of issue 14 (≤ 512 bytes per live bucket) counts on it.
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        let amounts = Amounts {
            micros: 9,
            tokens: 4,
            requests: 1,
        };
        let mut b = Bucket::default();
        b.hold(amounts, 1);
        b.hold(amounts, 1);
        assert_eq!(
            b.figures(&WindowSpec::Cumulative, 0).held,
            amounts + amounts
        );
        assert_eq!(b.figures(&WindowSpec::Cumulative, 0).live_holds, 2);
        assert!(b.unhold(amounts, 1));
        assert!(!b.holds.is_empty(), "one hold is still live");
        assert!(b.unhold(amounts, 1));
        assert!(b.holds.is_empty());
        assert_eq!(b, Bucket::default());
        assert_eq!(bincode_of(&b), bincode_of(&Bucket::default()));
    }

    #[test]
    fn ending_more_than_a_bucket_holds_is_refused_and_changes_nothing() {
        let one = Amounts {
            micros: 9,
            tokens: 4,
            requests: 1,
        };
        let mut b = Bucket::default();
        b.hold(one, 1);
        let before = b.clone();
        let more = Amounts { micros: 10, ..one };
        assert!(!b.unhold(more, 1), "more money than held");
        assert!(!b.unhold(one, 2), "more holds than live");
        assert_eq!(b, before);
        assert!(b.unhold(one, 1));
        assert!(!b.unhold(one, 1), "nothing is held any more");
        assert!(b.holds.is_empty());
    }

    /// A sum past the largest `i64` is reported at that value and still ends exactly: hold
    /// `i64::MAX - 1`, then 10, end the 10, then the first.
    #[test]
    fn a_hold_sum_past_the_largest_amount_comes_back_down_exactly() {
        let huge = Amounts {
            micros: i64::MAX - 1,
            tokens: u64::MAX,
            requests: 1,
        };
        let ten = Amounts {
            micros: 10,
            tokens: 10,
            requests: 1,
        };
        let mut b = Bucket::default();
        b.hold(huge, 1);
        b.hold(ten, 1);
        let held = b.figures(&WindowSpec::Cumulative, 0).held;
        assert_eq!(
            (held.micros, held.tokens),
            (i64::MAX, u64::MAX),
            "reported at the cap"
        );
        assert!(b.unhold(ten, 1));
        assert_eq!(b.figures(&WindowSpec::Cumulative, 0).held, huge);
        assert!(b.unhold(huge, 1));
        assert_eq!(b, Bucket::default());
    }

    #[test]
    fn a_bucket_is_stored_as_before_its_counter_and_marks_were_boxed() {
        let shape = RollingShape::new(60, 10);
        let amounts = Amounts {
            micros: 7,
            tokens: 3,
            requests: 1,
        };
        for (warned, exhausted, rolling) in [
            (None, None, false),
            (Some(1_000), None, false),
            (None, Some(2_000), true),
            (Some(3_000), Some(3_000), true),
        ] {
            let mut b = Bucket {
                window_start: 500,
                spent: amounts,
                holds: Holds::of(amounts, 2),
                ..Bucket::default()
            };
            let mut counter = crate::window::RollingCounter::default();
            if rolling {
                b.rolling.add_in(shape, 61_000_000, amounts);
                counter.add_in(shape, 61_000_000, amounts);
            }
            if let Some(w) = warned {
                b.marks.set_warned(w);
            }
            if let Some(w) = exhausted {
                b.marks.set_exhausted(w);
            }
            let before = BucketBefore {
                window_start: 500,
                spent: amounts,
                rolling: counter,
                held: amounts,
                live_holds: 2,
                warned_window: warned,
                exhausted_window: exhausted,
            };
            assert_eq!(bincode_of(&b), bincode_of(&before));
            let back: Bucket = decoded(&bincode_of(&before));
            assert_eq!(back, b);
            assert_eq!(back.marks.warned(), warned);
            assert_eq!(back.marks.exhausted(), exhausted);
            assert_eq!(decoded::<BucketBefore>(&bincode_of(&b)), before);
        }
    }

    fn budget() -> ResolvedBudget {
        ResolvedBudget {
            id: "b".into(),
            match_labels: Default::default(),
            group_by: Vec::new(),
            window: WindowSpec::Cumulative,
            max_micros: None,
            max_tokens: None,
            max_requests: None,
            max_concurrent: None,
            warn_at_ppm: None,
            enforce: Enforce::Deny,
        }
    }

    fn figures(micros: i64, tokens: u64, requests: u64, live_holds: u64) -> Figures {
        Figures {
            spent: Amounts {
                micros,
                tokens,
                requests,
            },
            held: Amounts::default(),
            live_holds,
        }
    }

    /// The definitions the compiled limits must agree with, for some dimension: over when
    /// `used > limit`, warn when `used × 10^6 >= ppm × limit`, exhausted when
    /// `used >= limit`.
    fn reference(b: &ResolvedBudget, f: &Figures) -> (bool, bool, bool) {
        let used = [
            i128::from(f.spent.micros),
            i128::from(f.spent.tokens),
            i128::from(f.spent.requests),
            i128::from(f.live_holds),
        ];
        let limits = [
            b.max_micros.map(i128::from),
            b.max_tokens.map(i128::from),
            b.max_requests.map(i128::from),
            b.max_concurrent.map(i128::from),
        ];
        let pairs = used.iter().zip(limits).filter_map(|(u, l)| Some((*u, l?)));
        let over = pairs.clone().any(|(u, l)| u > l);
        let exhausted = pairs.clone().any(|(u, l)| u >= l);
        let warn = b.warn_at_ppm.is_some_and(|ppm| {
            pairs
                .clone()
                .any(|(u, l)| u * 1_000_000 >= i128::from(ppm) * l)
        });
        (over, warn, exhausted)
    }

    #[test]
    fn compiled_limits_agree_with_the_definitions_at_every_edge() {
        let mut checked = 0;
        for limit in [
            0u64,
            1,
            3,
            7,
            10,
            999_999,
            1_000_000,
            1_000_001,
            123_456_789,
        ] {
            for ppm in [
                None,
                Some(0),
                Some(1),
                Some(333_333),
                Some(800_000),
                Some(999_999),
            ] {
                for dim in 0..4 {
                    let mut b = budget();
                    b.warn_at_ppm = ppm;
                    match dim {
                        0 => b.max_micros = Some(limit as i64),
                        1 => b.max_tokens = Some(limit),
                        2 => b.max_requests = Some(limit),
                        _ => b.max_concurrent = Some(limit),
                    }
                    let compiled = Limits::of(&b);
                    assert!(compiled.limited);
                    // Every use around the limit and around the warn threshold.
                    let threshold =
                        ppm.map_or(0, |p| (u128::from(p) * u128::from(limit)) / 1_000_000);
                    let mut uses: Vec<u64> = vec![0, 1, limit.saturating_sub(1), limit, limit + 1];
                    for t in [threshold as u64, limit / 2] {
                        uses.extend([t.saturating_sub(1), t, t + 1]);
                    }
                    for used in uses {
                        let mut v = [0u64; 4];
                        v[dim] = used;
                        let f = figures(v[0] as i64, v[1], v[2], v[3]);
                        let (over, warn, exhausted) = reference(&b, &f);
                        assert_eq!(compiled.over(&f), over, "over: {b:?} {f:?}");
                        assert_eq!(compiled.warns(&f), warn, "warn: {b:?} {f:?}");
                        let state = match (exhausted, warn) {
                            (true, _) => BucketState::Exhausted,
                            (false, true) => BucketState::Warn,
                            (false, false) => BucketState::Ok,
                        };
                        assert_eq!(compiled.state(&f), state, "state: {b:?} {f:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 1000);
        // A meter sets no limit: never over, never warns.
        let meter = Limits::of(&budget());
        assert!(!meter.limited);
        assert!(!meter.over(&figures(i64::MAX, u64::MAX, u64::MAX, u64::MAX)));
        assert!(!meter.warns(&figures(i64::MAX, u64::MAX, u64::MAX, u64::MAX)));
    }
}
