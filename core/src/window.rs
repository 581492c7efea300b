//! Windows (SPEC §5): where the window containing a timestamp starts and ends, for fixed,
//! calendar, rolling and cumulative budgets, and the slotted counter behind rolling windows.
//!
//! Architecture invariant: time is always an argument (Unix microseconds, UTC); nothing here
//! reads a clock. All boundary arithmetic is done in `i128`, where no `i64` timestamp, `u64`
//! length or offset can overflow, and results are clamped back into `i64`.
//!
//! Degenerate specs (which policy validation rejects) never panic: a fixed window of 0 seconds
//! behaves as cumulative (it never resets, which fails closed), a rolling resolution of 0 is
//! treated as 1 second, and a rolling window always counts at least the current slot.

use std::collections::VecDeque;
use std::ops::{Add, AddAssign, Sub};

use bursar_schemas::policy::{CalendarUnit, WindowSpec};
use bursar_schemas::TsMicros;
use chrono::{Datelike, Months, NaiveDate};

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_SECOND_WIDE: i128 = 1_000_000;
const MICROS_PER_DAY: i128 = 86_400 * MICROS_PER_SECOND_WIDE;
/// `NaiveDate::num_days_from_ce` of 1970-01-01.
const UNIX_EPOCH_DAYS_FROM_CE: i128 = 719_163;
/// 1970-01-01 was a Thursday: three days after a Monday.
const EPOCH_DAYS_AFTER_MONDAY: i128 = 3;

/// What a bucket has counted: money, tokens and requests. Arithmetic saturates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Amounts {
    /// Micro-USD.
    pub micros: i64,
    /// Tokens.
    pub tokens: u64,
    /// Requests.
    pub requests: u64,
}

impl Amounts {
    /// Field-wise saturating sum.
    #[must_use]
    pub fn saturating_add(self, other: Amounts) -> Amounts {
        Amounts {
            micros: self.micros.saturating_add(other.micros),
            tokens: self.tokens.saturating_add(other.tokens),
            requests: self.requests.saturating_add(other.requests),
        }
    }
}

impl Amounts {
    /// True when a field has reached its largest value (a saturating sum may have lost some).
    pub fn saturated(&self) -> bool {
        self.micros == i64::MAX || self.tokens == u64::MAX || self.requests == u64::MAX
    }
}

impl Add for Amounts {
    type Output = Amounts;
    fn add(self, other: Amounts) -> Amounts {
        self.saturating_add(other)
    }
}

impl AddAssign for Amounts {
    fn add_assign(&mut self, other: Amounts) {
        *self = self.saturating_add(other);
    }
}

impl Sub for Amounts {
    type Output = Amounts;
    /// Field-wise saturating difference (token and request counts stop at zero).
    fn sub(self, other: Amounts) -> Amounts {
        Amounts {
            micros: self.micros.saturating_sub(other.micros),
            tokens: self.tokens.saturating_sub(other.tokens),
            requests: self.requests.saturating_sub(other.requests),
        }
    }
}

/// Start (inclusive) and end (exclusive) of the window containing `ts`.
///
/// - fixed: `start = floor((ts - offset) / W) * W + offset`, so an event exactly at a boundary
///   belongs to the new window;
/// - calendar: the local day, week (from Monday) or month containing `ts` at the fixed UTC
///   offset, as UTC instants;
/// - cumulative: `(i64::MIN, None)`;
/// - rolling: start = the start of the oldest slot still counted, end = the next slot boundary
///   (when that oldest slot drops out).
///
/// A start before `i64::MIN` is clamped to `i64::MIN`; an end after `i64::MAX` is `None`.
pub fn window_bounds(spec: &WindowSpec, ts: TsMicros) -> (TsMicros, Option<TsMicros>) {
    window_bounds_fast(spec, ts).unwrap_or_else(|| window_bounds_wide(spec, ts))
}

/// [`window_bounds`] computed in `i128`, for every input.
fn window_bounds_wide(spec: &WindowSpec, ts: TsMicros) -> (TsMicros, Option<TsMicros>) {
    let t = i128::from(ts);
    let (start, end) = match *spec {
        WindowSpec::Cumulative => return (TsMicros::MIN, None),
        WindowSpec::Fixed {
            seconds,
            offset_seconds,
        } => {
            let width = i128::from(seconds) * MICROS_PER_SECOND_WIDE;
            if width == 0 {
                return (TsMicros::MIN, None);
            }
            let offset = i128::from(offset_seconds) * MICROS_PER_SECOND_WIDE;
            let start = (t - offset).div_euclid(width) * width + offset;
            (start, start + width)
        }
        WindowSpec::Calendar {
            unit,
            utc_offset_seconds,
        } => {
            let offset = i128::from(utc_offset_seconds) * MICROS_PER_SECOND_WIDE;
            let day = (t + offset).div_euclid(MICROS_PER_DAY);
            let (start_day, end_day) = match unit {
                CalendarUnit::Day => (day, Some(day + 1)),
                CalendarUnit::Week => {
                    let monday = day - (day + EPOCH_DAYS_AFTER_MONDAY).rem_euclid(7);
                    (monday, Some(monday + 7))
                }
                CalendarUnit::Month => match month_days(day) {
                    Some(days) => days,
                    // Beyond chrono's calendar (about ±262 000 years): never resets.
                    None => return (TsMicros::MIN, None),
                },
            };
            let start = start_day * MICROS_PER_DAY - offset;
            match end_day {
                Some(end_day) => (start, end_day * MICROS_PER_DAY - offset),
                None => return (clamp_start(start), None),
            }
        }
        WindowSpec::CalendarZone { unit, ref timezone } => {
            return zoned_bounds(unit, timezone, ts);
        }
        WindowSpec::Rolling {
            seconds,
            resolution_seconds,
        } => {
            let shape = RollingShape::new(seconds, resolution_seconds);
            let current = shape.slot_of(ts);
            let oldest = shape.oldest_counted(current);
            (
                oldest * shape.slot_micros,
                (current + 1) * shape.slot_micros,
            )
        }
    };
    (clamp_start(start), i64::try_from(end).ok())
}

/// [`window_bounds`] of fixed and rolling windows in `i64` arithmetic (a hardware division
/// instead of a 128-bit one), when every intermediate value fits; `None` sends the caller to
/// the exact `i128` computation, so results never differ.
fn window_bounds_fast(spec: &WindowSpec, ts: TsMicros) -> Option<(TsMicros, Option<TsMicros>)> {
    match *spec {
        WindowSpec::Fixed {
            seconds,
            offset_seconds,
        } => {
            let width = i64::try_from(seconds)
                .ok()?
                .checked_mul(MICROS_PER_SECOND)?;
            if width == 0 {
                return None;
            }
            let offset = offset_seconds.checked_mul(MICROS_PER_SECOND)?;
            let start = ts
                .checked_sub(offset)?
                .div_euclid(width)
                .checked_mul(width)?
                .checked_add(offset)?;
            Some((start, Some(start.checked_add(width)?)))
        }
        WindowSpec::Rolling {
            seconds,
            resolution_seconds,
        } => {
            let resolution = resolution_seconds.max(1);
            let slot_micros = i64::try_from(resolution)
                .ok()?
                .checked_mul(MICROS_PER_SECOND)?;
            let slots = i64::try_from(seconds.div_ceil(resolution).max(1)).ok()?;
            let current = ts.div_euclid(slot_micros);
            let oldest = current.checked_sub(slots)?.checked_add(1)?;
            Some((
                oldest.checked_mul(slot_micros)?,
                Some(current.checked_add(1)?.checked_mul(slot_micros)?),
            ))
        }
        WindowSpec::Cumulative | WindowSpec::Calendar { .. } | WindowSpec::CalendarZone { .. } => {
            None
        }
    }
}

/// The IANA time zone `name` (as policy validation accepts it).
pub fn parse_zone(name: &str) -> Option<chrono_tz::Tz> {
    name.parse::<chrono_tz::Tz>().ok()
}

/// Bounds of the local day, week (from Monday) or month containing `ts` in the zone `name`, as
/// UTC instants: from the local midnight that starts the period to the one that starts the
/// next, so a day is 23 or 25 hours long across a daylight-saving change. A midnight that the
/// zone skips (a change at 00:00) starts the period at the first local instant after the gap.
/// An unknown zone (which validation rejects) behaves as UTC.
pub(crate) fn zoned_bounds(
    unit: CalendarUnit,
    name: &str,
    ts: TsMicros,
) -> (TsMicros, Option<TsMicros>) {
    use chrono::{Duration, TimeZone};
    let tz = parse_zone(name).unwrap_or(chrono_tz::UTC);
    let Some(utc) = chrono::DateTime::from_timestamp_micros(ts) else {
        return (TsMicros::MIN, None);
    };
    let local = utc.with_timezone(&tz).date_naive();
    let (start, end) = match unit {
        CalendarUnit::Day => (Some(local), local.succ_opt()),
        CalendarUnit::Week => {
            let monday = local.checked_sub_signed(Duration::days(i64::from(
                local.weekday().num_days_from_monday(),
            )));
            (
                monday,
                monday.and_then(|m| m.checked_add_signed(Duration::days(7))),
            )
        }
        CalendarUnit::Month => {
            let first = local.with_day(1);
            (
                first,
                first.and_then(|f| f.checked_add_months(Months::new(1))),
            )
        }
    };
    let midnight = |d: NaiveDate| -> Option<TsMicros> {
        let naive = d.and_hms_opt(0, 0, 0)?;
        match tz.from_local_datetime(&naive) {
            chrono::LocalResult::Single(t) => Some(t.timestamp_micros()),
            chrono::LocalResult::Ambiguous(first, _) => Some(first.timestamp_micros()),
            chrono::LocalResult::None => {
                // Midnight falls in a gap: the period starts when the gap ends, which is the
                // instant that midnight names under the offset in force before the gap.
                let before = naive.checked_sub_signed(Duration::hours(12))?;
                let offset = tz.offset_from_local_datetime(&before).earliest()?;
                let fixed = chrono::Offset::fix(&offset);
                Some(
                    naive
                        .and_local_timezone(fixed)
                        .earliest()?
                        .timestamp_micros(),
                )
            }
        }
    };
    match (start.and_then(midnight), end.and_then(midnight)) {
        (Some(s), e) => (s, e),
        // Beyond chrono's calendar: never resets.
        (None, _) => (TsMicros::MIN, None),
    }
}

/// First day of the local month containing `day` (days since 1970-01-01), and the first day of
/// the next month when it is representable.
fn month_days(day: i128) -> Option<(i128, Option<i128>)> {
    let days_from_ce = i32::try_from(day + UNIX_EPOCH_DAYS_FROM_CE).ok()?;
    let date = NaiveDate::from_num_days_from_ce_opt(days_from_ce)?;
    let first = date.with_day(1)?;
    let next = first.checked_add_months(Months::new(1));
    let to_days = |d: NaiveDate| i128::from(d.num_days_from_ce()) - UNIX_EPOCH_DAYS_FROM_CE;
    Some((to_days(first), next.map(to_days)))
}

fn clamp_start(start: i128) -> TsMicros {
    i64::try_from(start).unwrap_or(if start < 0 { i64::MIN } else { i64::MAX })
}

/// Slot size and count of a rolling window, normalised so that nothing divides by zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollingShape {
    /// Slot length in µs (at least one second).
    slot_micros: i128,
    /// Slots counted: `ceil(window / resolution)`, at least 1.
    slots: i128,
}

impl RollingShape {
    /// The shape of a rolling window of `window_seconds` at `resolution_seconds` (computed once
    /// per budget: it divides).
    pub fn new(window_seconds: u64, resolution_seconds: u64) -> RollingShape {
        let resolution = resolution_seconds.max(1);
        RollingShape {
            slot_micros: i128::from(resolution) * MICROS_PER_SECOND_WIDE,
            slots: i128::from(window_seconds.div_ceil(resolution).max(1)),
        }
    }

    /// Slot `k` covers `[k * res, (k + 1) * res)`.
    fn slot_of(self, ts: TsMicros) -> i128 {
        // The same floor division in `i64` (a hardware division) whenever the slot length fits.
        match i64::try_from(self.slot_micros) {
            Ok(slot_micros) => i128::from(ts.div_euclid(slot_micros)),
            Err(_) => i128::from(ts).div_euclid(self.slot_micros),
        }
    }

    /// [`RollingShape::slot_of`], without a division when `ts` is in slot `hint` (the newest
    /// slot a counter holds, usually).
    fn slot_near(self, ts: TsMicros, hint: Option<i64>) -> i128 {
        let in_hint = hint
            .zip(i64::try_from(self.slot_micros).ok())
            .and_then(|(k, width)| {
                let start = k.checked_mul(width)?;
                let into = ts.checked_sub(start)?;
                ((0..width).contains(&into)).then_some(k)
            });
        match in_hint {
            Some(k) => i128::from(k),
            None => self.slot_of(ts),
        }
    }

    /// The oldest slot still counted when the newest is `current`.
    fn oldest_counted(self, current: i128) -> i128 {
        current - self.slots + 1
    }
}

/// A bucket's [`RollingCounter`], allocated when something is first counted in it. Every
/// bucket has one, but only buckets of rolling budgets use it: inline it took 64 of a bucket's
/// 168 bytes in every budget (`bursar-bench memory`: 42 MB of bucket slots for 254,004 buckets,
/// of which four budgets in five have fixed or calendar windows).
///
/// Its serialized form is the counter's own (an empty one when none was allocated), so
/// snapshots read and write as before; equal when they count the same slots.
#[derive(Debug, Clone, Default)]
pub struct RollingSlots(Option<Box<RollingCounter>>);

impl RollingSlots {
    /// [`RollingCounter::add_in`], allocating the counter on first use.
    pub fn add_in(&mut self, shape: RollingShape, ts: TsMicros, amounts: Amounts) {
        self.0
            .get_or_insert_with(Box::default)
            .add_in(shape, ts, amounts);
    }

    /// [`RollingCounter::total_in`] (nothing when no counter was allocated).
    pub fn total_in(&self, shape: RollingShape, now: TsMicros) -> Amounts {
        self.0
            .as_ref()
            .map_or(Amounts::default(), |c| c.total_in(shape, now))
    }

    /// [`RollingCounter::ends_at`] (`None`, ended, when no counter was allocated).
    pub fn ends_at(&self, shape: RollingShape) -> Option<TsMicros> {
        self.0.as_ref()?.ends_at(shape)
    }
}

impl PartialEq for RollingSlots {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => a == b,
            (Some(c), None) | (None, Some(c)) => c.slots.is_empty(),
            (None, None) => true,
        }
    }
}

impl Eq for RollingSlots {}

impl serde::Serialize for RollingSlots {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(c) => c.serialize(s),
            None => RollingCounter::default().serialize(s),
        }
    }
}

impl<'de> serde::Deserialize<'de> for RollingSlots {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let c = RollingCounter::deserialize(d)?;
        Ok(RollingSlots((!c.slots.is_empty()).then(|| Box::new(c))))
    }
}

/// A rolling-window counter: amounts kept per slot of `resolution_seconds`. Slot `k` covers
/// `[k * res, (k + 1) * res)` in µs; at `now` in slot `c`, the window counts slots
/// `c - n + 1 ..= c` where `n = ceil(window_seconds / resolution_seconds)`.
///
/// The same `(window_seconds, resolution_seconds)` must be passed to every call on one counter.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RollingCounter {
    /// `(slot index, amounts)`, strictly increasing by slot, all within `n` of the newest.
    slots: VecDeque<(i64, Amounts)>,
    /// The (saturating) sum of every slot held, once known: derived, kept up to date by `add`,
    /// so that reading a window that holds no stale slot is one comparison. Not serialised
    /// (unknown after a snapshot is read until the next `add`), not compared.
    #[serde(skip)]
    sum: Option<Amounts>,
}

impl PartialEq for RollingCounter {
    fn eq(&self, other: &Self) -> bool {
        self.slots == other.slots
    }
}

impl Eq for RollingCounter {}

impl RollingCounter {
    /// Adds `amounts` to the slot of `ts`, then drops every slot that is out of the window
    /// ending at the newest slot seen. An event older than that window is dropped on arrival
    /// (a late timestamp after the clock moved on); one within it lands in its own slot. The
    /// counter never holds more than `n` slots.
    pub fn add(
        &mut self,
        window_seconds: u64,
        resolution_seconds: u64,
        ts: TsMicros,
        amounts: Amounts,
    ) {
        self.add_in(
            RollingShape::new(window_seconds, resolution_seconds),
            ts,
            amounts,
        );
    }

    /// [`RollingCounter::add`] with the window's shape computed already.
    pub fn add_in(&mut self, shape: RollingShape, ts: TsMicros, amounts: Amounts) {
        let slot = shape.slot_near(ts, self.slots.back().map(|&(k, _)| k));
        // The usual case: another event in the newest slot (nothing to prune: that happened
        // when the slot became the newest).
        if let Some((k, existing)) = self.slots.back_mut() {
            if i128::from(*k) == slot {
                *existing = existing.saturating_add(amounts);
                self.count(amounts);
                return;
            }
        }
        let newest = self
            .slots
            .back()
            .map_or(slot, |&(k, _)| slot.max(i128::from(k)));
        let oldest = shape.oldest_counted(newest);
        if slot < oldest {
            return;
        }
        // |slot| <= |ts| because a slot is at least one second long, so this always fits.
        let Ok(slot) = i64::try_from(slot) else {
            return;
        };
        // Pruned first, so that a counter whose slots all fell out reuses their room.
        while self
            .slots
            .front()
            .is_some_and(|&(k, _)| i128::from(k) < oldest)
        {
            self.slots.pop_front();
            // Added up again below: a saturated sum cannot be taken apart.
            self.sum = None;
        }
        if self.slots.back().is_none_or(|&(k, _)| k < slot) {
            self.slots.push_back((slot, amounts));
        } else {
            match self.slots.binary_search_by_key(&slot, |&(k, _)| k) {
                Ok(index) => {
                    if let Some((_, existing)) = self.slots.get_mut(index) {
                        *existing = existing.saturating_add(amounts);
                    }
                }
                Err(index) => self.slots.insert(index, (slot, amounts)),
            }
        }
        self.count(amounts);
    }

    /// Keep `sum` up to date after `amounts` went into a slot (or add every slot up when the
    /// sum is not known). Counted amounts are never negative, so a saturating running sum
    /// equals the saturating sum of the slots.
    fn count(&mut self, amounts: Amounts) {
        self.sum = Some(match self.sum {
            Some(sum) => sum.saturating_add(amounts),
            None => self
                .slots
                .iter()
                .fold(Amounts::default(), |sum, &(_, a)| sum.saturating_add(a)),
        });
    }

    /// The sum of the slots inside the window at `now` (slots `c - n + 1 ..= c`). Read-only:
    /// slots that have fallen out of the window are ignored even before an `add` prunes them.
    pub fn total(&self, window_seconds: u64, resolution_seconds: u64, now: TsMicros) -> Amounts {
        self.total_in(RollingShape::new(window_seconds, resolution_seconds), now)
    }

    /// The first instant at which no slot of the counter is in the window any more (its
    /// newest slot has left it); `None` for an empty counter (nothing counted: it has ended).
    pub fn ends_at(&self, shape: RollingShape) -> Option<TsMicros> {
        let &(newest, _) = self.slots.back()?;
        let end = (i128::from(newest) + shape.slots) * shape.slot_micros;
        Some(TsMicros::try_from(end).unwrap_or(TsMicros::MAX))
    }

    /// [`RollingCounter::total`] with the window's shape computed already.
    pub fn total_in(&self, shape: RollingShape, now: TsMicros) -> Amounts {
        let current = shape.slot_near(now, self.slots.back().map(|&(k, _)| k));
        let oldest = shape.oldest_counted(current);
        // No slot after `now` (the usual case): the running sum, less the slots that fell out
        // of the window since the last `add` (exact while the sum is not saturated).
        if let Some(sum) = self.sum {
            let none_later = self
                .slots
                .back()
                .is_none_or(|&(k, _)| i128::from(k) <= current);
            if none_later && !sum.saturated() {
                let mut stale = Amounts::default();
                let mut at = 0;
                while let Some(&(k, a)) = self.slots.get(at) {
                    if i128::from(k) >= oldest {
                        break;
                    }
                    stale = stale.saturating_add(a);
                    at += 1;
                }
                return sum - stale;
            }
        }
        // Slots are in increasing order: walk back from the newest to the oldest counted.
        self.slots
            .iter()
            .rev()
            .skip_while(|&&(k, _)| i128::from(k) > current)
            .take_while(|&&(k, _)| i128::from(k) >= oldest)
            .fold(Amounts::default(), |sum, &(_, amounts)| {
                sum.saturating_add(amounts)
            })
    }

    /// True when no slot is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Number of slots held (for tests of the bound).
    #[cfg(test)]
    fn slot_count(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = MICROS_PER_SECOND;

    fn bincode_of<T: serde::Serialize>(v: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
    }

    #[test]
    fn a_rolling_counter_allocated_on_first_use_is_stored_and_read_as_the_inline_one_was() {
        let shape = RollingShape::new(60, 10);
        let mut slots = RollingSlots::default();
        let mut inline = RollingCounter::default();
        // Nothing counted: no counter, the bytes of an empty one.
        assert_eq!(bincode_of(&slots), bincode_of(&inline));
        assert_eq!(slots.ends_at(shape), None);
        assert_eq!(slots.total_in(shape, 5 * S), Amounts::default());
        for (i, ts) in [3 * S, 4 * S, 25 * S, 61 * S].into_iter().enumerate() {
            let a = Amounts {
                micros: 10 + i as i64,
                tokens: 1,
                requests: 1,
            };
            slots.add_in(shape, ts, a);
            inline.add_in(shape, ts, a);
            assert_eq!(bincode_of(&slots), bincode_of(&inline));
            assert_eq!(slots.total_in(shape, ts), inline.total_in(shape, ts));
            assert_eq!(slots.ends_at(shape), inline.ends_at(shape));
        }
        // Snapshots written with the inline counter read back to the same slots.
        let (back, _): (RollingSlots, usize) =
            bincode::serde::decode_from_slice(&bincode_of(&inline), bincode::config::standard())
                .unwrap();
        assert_eq!(back, slots);
        assert_eq!(back.total_in(shape, 62 * S), inline.total_in(shape, 62 * S));
        // An empty counter reads back as none allocated, and equals one that was emptied.
        let (empty, _): (RollingSlots, usize) = bincode::serde::decode_from_slice(
            &bincode_of(&RollingCounter::default()),
            bincode::config::standard(),
        )
        .unwrap();
        assert!(empty.0.is_none());
        let allocated_empty = RollingSlots(Some(Box::default()));
        assert_eq!(allocated_empty, empty);
        assert_eq!(empty, allocated_empty);
        assert_ne!(slots, empty);
    }

    fn one_micro() -> Amounts {
        Amounts {
            micros: 1,
            tokens: 1,
            requests: 1,
        }
    }

    #[test]
    fn counter_never_holds_more_than_n_slots() {
        let mut counter = RollingCounter::default();
        // 10-minute window at 1-minute resolution: n = 10.
        for minute in 0..100 {
            counter.add(600, 60, minute * 60 * S, one_micro());
            assert!(counter.slot_count() <= 10);
        }
        assert_eq!(counter.slot_count(), 10);
        assert_eq!(counter.total(600, 60, 99 * 60 * S).requests, 10);
    }

    #[test]
    fn fast_bounds_equal_the_wide_computation() {
        let mut specs = Vec::new();
        for seconds in [
            0,
            1,
            59,
            60,
            3600,
            86_400,
            604_800,
            u64::MAX / 2_000_000,
            u64::MAX,
        ] {
            for offset_seconds in [0, 1, -7200, 3600, i64::MAX / 1_000_000, i64::MIN, i64::MAX] {
                specs.push(WindowSpec::Fixed {
                    seconds,
                    offset_seconds,
                });
            }
            for resolution_seconds in [0, 1, 5, 60, 86_400, u64::MAX] {
                specs.push(WindowSpec::Rolling {
                    seconds,
                    resolution_seconds,
                });
            }
        }
        let stamps = [
            i64::MIN,
            i64::MIN + 1,
            -86_400 * S - 1,
            -1,
            0,
            1,
            1_795_392_000_000_000,
            1_795_478_399_999_999,
            i64::MAX - 1,
            i64::MAX,
        ];
        for spec in &specs {
            for &ts in &stamps {
                if let Some(fast) = window_bounds_fast(spec, ts) {
                    assert_eq!(fast, window_bounds_wide(spec, ts), "{spec:?} at {ts}");
                }
            }
        }
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let mut counter = RollingCounter::default();
        for (window, res) in [(0, 0), (u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX)] {
            for ts in [i64::MIN, -1, 0, i64::MAX] {
                counter.add(window, res, ts, one_micro());
                let _ = counter.total(window, res, ts);
            }
        }
    }
}
