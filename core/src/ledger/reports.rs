//! `report` (SPEC §11): spend per hour, day, week or month of a time zone, grouped by labels,
//! read from the rollups (never from the log).

use super::rollup::{Cell, SLOT_SECONDS};
use super::Ledger;
use bursar_schemas::policy::CalendarUnit;
use bursar_schemas::policy::WindowSpec;
use bursar_schemas::wire::{ReportAnswer, ReportRequest, ReportRow, WireError, REPORT_MAX_ROWS};
use bursar_schemas::TsMicros;
use std::collections::HashMap;

/// A report's period unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Every {
    Hour,
    Calendar(CalendarUnit),
}

impl Every {
    fn parse(s: Option<&str>) -> Option<(Every, &'static str)> {
        Some(match s.unwrap_or("day") {
            "hour" => (Every::Hour, "hour"),
            "day" => (Every::Calendar(CalendarUnit::Day), "day"),
            "week" => (Every::Calendar(CalendarUnit::Week), "week"),
            "month" => (Every::Calendar(CalendarUnit::Month), "month"),
            _ => return None,
        })
    }
}

/// Start of the period of `every` in zone `tz` holding `ts`.
fn period_start(every: Every, tz: chrono_tz::Tz, zone: &str, ts: TsMicros) -> TsMicros {
    match every {
        Every::Calendar(unit) => crate::window::zoned_bounds(unit, zone, ts).0,
        Every::Hour => {
            use chrono::Timelike;
            let Some(utc) = chrono::DateTime::from_timestamp_micros(ts) else {
                return ts;
            };
            let local = utc.with_timezone(&tz);
            // Offsets are whole quarter hours: the local hour starts this many seconds ago.
            let into = i64::from(local.minute()) * 60 + i64::from(local.second());
            ts - into * 1_000_000 - i64::from(local.nanosecond() / 1000)
        }
    }
}

/// Add a period's sums into `periods` (a period met twice only if slots came out of order).
fn merge_into(
    periods: &mut std::collections::BTreeMap<
        TsMicros,
        HashMap<u32, Cell, rustc_hash::FxBuildHasher>,
    >,
    period: TsMicros,
    sums: HashMap<u32, Cell, rustc_hash::FxBuildHasher>,
) {
    let into = periods.entry(period).or_default();
    if into.is_empty() {
        *into = sums;
        return;
    }
    for (g, c) in sums {
        into.entry(g).or_default().add(&c);
    }
}

/// A report's row: a period's sums for a group.
fn report_row(
    period_start: String,
    group: std::collections::BTreeMap<String, Option<String>>,
    c: &Cell,
) -> ReportRow {
    ReportRow {
        period_start,
        group,
        cost_micros: c.cost_micros,
        input_tokens: c.input_tokens,
        cached_input_tokens: c.cached_input_tokens,
        output_tokens: c.output_tokens,
        requests: c.requests,
        denied: c.denied,
    }
}

fn period_text(tz: chrono_tz::Tz, ts: TsMicros) -> String {
    chrono::DateTime::from_timestamp_micros(ts)
        .map(|t| {
            t.with_timezone(&tz)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .unwrap_or_default()
}

impl Ledger {
    /// Answer a `report` at `now` from the rollups.
    pub fn report(&self, req: &ReportRequest, now: TsMicros) -> Result<ReportAnswer, WireError> {
        let (every, every_name) = Every::parse(req.every.as_deref()).ok_or_else(|| {
            WireError::bad_field(
                "every",
                "every must be \"hour\", \"day\", \"week\" or \"month\"",
            )
        })?;
        let zone = req.timezone.clone().unwrap_or_else(|| "UTC".to_string());
        let tz = crate::window::parse_zone(&zone).ok_or_else(|| {
            WireError::bad_field(
                "timezone",
                format!("{zone:?} is not an IANA time zone (e.g. \"Europe/Paris\")"),
            )
        })?;
        let time = |field: &str, v: &Option<String>| -> Result<Option<TsMicros>, WireError> {
            match v {
                None => Ok(None),
                Some(t) => crate::time::parse_ts(t).map(Some).ok_or_else(|| {
                    WireError::bad_field(field, format!("{field} must be an RFC 3339 time"))
                }),
            }
        };
        let since = time("since", &req.since)?.unwrap_or(TsMicros::MIN);
        let until = time("until", &req.until)?.unwrap_or(now.saturating_add(1));
        let excluded: &[String] = self
            .policy
            .as_ref()
            .map_or(&[], |p| p.report_exclude_labels.as_slice());
        for (field, key) in req
            .group_by
            .iter()
            .map(|k| ("group_by", k))
            .chain(req.labels.iter().flatten().map(|(k, _)| ("labels", k)))
        {
            if excluded.contains(key) {
                return Err(WireError::bad_field(
                    field,
                    format!(
                        "{key:?} is left out of report rollups ([reports] exclude_labels); \
                         `export` has every event with its labels"
                    ),
                ));
            }
        }
        // Slots are 15 minutes: `since` counts the slot it falls in, `until` the slots that
        // start before it.
        let first_slot = since.div_euclid(1_000_000).div_euclid(SLOT_SECONDS) * SLOT_SECONDS;
        // Per label set, once: its group (an id into `groups`), or `None` when `labels`
        // leaves it out. A report then costs one lookup and one addition per cell.
        let mut groups: Vec<Vec<Option<String>>> = Vec::new();
        let mut group_ids: HashMap<Vec<Option<String>>, u32> = HashMap::new();
        let set_group: Vec<Option<u32>> = self
            .rollups
            .sets()
            .map(|labels| {
                if let Some(want) = &req.labels {
                    if !want.iter().all(|(k, v)| labels.get(k) == Some(v.as_str())) {
                        return None;
                    }
                }
                let group: Vec<Option<String>> = req
                    .group_by
                    .iter()
                    .map(|k| labels.get(k).map(str::to_string))
                    .collect();
                let next = u32::try_from(groups.len()).unwrap_or(u32::MAX);
                let id = *group_ids.entry(group.clone()).or_insert_with(|| {
                    groups.push(group);
                    next
                });
                Some(id)
            })
            .collect();
        // Cells come slot by slot in time order (sealed slots, then the open one), so each
        // period's groups are summed in a small map of their own, moved into `periods` when the
        // next period starts (10 M events, 1.8 M rows: 2.0 s with one map for every row).
        type Sums = HashMap<u32, Cell, rustc_hash::FxBuildHasher>;
        let mut periods: std::collections::BTreeMap<TsMicros, Sums> = Default::default();
        let mut current: Option<(TsMicros, Sums)> = None;
        let mut last_slot: Option<(i64, TsMicros)> = None;
        for (slot, set, cell) in self.rollups.cells_by_set() {
            let Some(&Some(group)) = set_group.get(set as usize) else {
                continue;
            };
            let slot_ts = slot.saturating_mul(1_000_000);
            if slot < first_slot || slot_ts >= until {
                continue;
            }
            let start = match last_slot {
                Some((s, start)) if s == slot => start,
                _ => {
                    let start = period_start(every, tz, &zone, slot_ts);
                    last_slot = Some((slot, start));
                    start
                }
            };
            if current.as_ref().is_none_or(|(p, _)| *p != start) {
                if let Some((p, sums)) = current.take() {
                    merge_into(&mut periods, p, sums);
                }
                current = Some((start, periods.remove(&start).unwrap_or_default()));
            }
            if let Some((_, sums)) = current.as_mut() {
                sums.entry(group).or_default().add(&cell);
            }
        }
        if let Some((p, sums)) = current.take() {
            merge_into(&mut periods, p, sums);
        }
        // Rows by period, then by group values.
        let mut order: Vec<u32> = (0..u32::try_from(groups.len()).unwrap_or(u32::MAX)).collect();
        order.sort_by(|a, b| groups.get(*a as usize).cmp(&groups.get(*b as usize)));
        let mut rank = vec![0u32; groups.len()];
        for (r, g) in order.iter().enumerate() {
            if let Some(slot) = rank.get_mut(*g as usize) {
                *slot = u32::try_from(r).unwrap_or(u32::MAX);
            }
        }
        let (rows, total_rows) = if req.group_by.is_empty() {
            self.every_period(&periods, since, until, now, every, tz, &zone)
        } else {
            let total_rows: u64 = periods.values().map(|m| m.len() as u64).sum();
            let mut rows: Vec<ReportRow> = Vec::new();
            'periods: for (start, sums) in &periods {
                let mut in_period: Vec<(u32, u32)> = sums
                    .keys()
                    .map(|&g| (rank.get(g as usize).copied().unwrap_or(0), g))
                    .collect();
                in_period.sort_unstable();
                for (_, g) in in_period {
                    if rows.len() >= REPORT_MAX_ROWS {
                        break 'periods;
                    }
                    let (Some(c), Some(values)) = (sums.get(&g), groups.get(g as usize)) else {
                        continue;
                    };
                    let group = req.group_by.iter().cloned().zip(values.clone()).collect();
                    rows.push(report_row(period_text(tz, *start), group, c));
                }
            }
            (rows, total_rows)
        };
        // The range the fees cover: from `since`, but not before the first usage there is.
        let from = self.first_usage().map(|first| first.max(since));
        Ok(ReportAnswer {
            ok: true,
            every: every_name.to_string(),
            timezone: zone,
            truncated: total_rows > rows.len() as u64,
            rows,
            total_rows,
            subscriptions: self.subscription_fees(from, until),
            req: None,
        })
    }

    /// When the rollups start: the first slot with usage or a denial.
    fn first_usage(&self) -> Option<TsMicros> {
        self.rollups
            .cells_by_set()
            .next()
            .map(|(slot, _, _)| slot.saturating_mul(1_000_000))
    }

    /// The rows of a report without `group_by`: one for each period between `since` and
    /// `until` (SPEC §11: "for each period"), zeros where nothing was spent or denied, at most
    /// [`REPORT_MAX_ROWS`]; and how many periods there are in all. The range is clamped to the
    /// rollups' (from the first usage or denial to `now`): before the log began and after now
    /// every period is empty, and a range of ten millennia (any RFC 3339 year is taken) would
    /// cost a step per period under the ledger's read lock.
    #[allow(clippy::too_many_arguments)]
    fn every_period(
        &self,
        periods: &std::collections::BTreeMap<
            TsMicros,
            HashMap<u32, Cell, rustc_hash::FxBuildHasher>,
        >,
        since: TsMicros,
        until: TsMicros,
        now: TsMicros,
        every: Every,
        tz: chrono_tz::Tz,
        zone: &str,
    ) -> (Vec<ReportRow>, u64) {
        let mut rows = Vec::new();
        let mut total = 0u64;
        let Some(first) = self.first_usage() else {
            return (rows, total);
        };
        let until = until.min(now.saturating_add(1));
        let mut start = period_start(every, tz, zone, since.max(first));
        // Each period's sums (a period is the one group's: no `group_by`), and the periods
        // with data, merged in: a step that missed one (a zone whose offset changed by half an
        // hour) cannot drop its figures.
        let mut push = |at: TsMicros, sums: Option<&HashMap<u32, Cell, _>>| {
            if rows.len() < REPORT_MAX_ROWS {
                let mut c = Cell::default();
                for cell in sums.into_iter().flat_map(|p| p.values()) {
                    c.add(cell);
                }
                rows.push(report_row(period_text(tz, at), Default::default(), &c));
            }
            total += 1;
        };
        let mut data = periods.range(start..until).peekable();
        while start < until {
            while let Some((at, sums)) = data.next_if(|(at, _)| **at < start) {
                push(*at, Some(sums));
            }
            push(start, data.next_if(|(at, _)| **at == start).map(|(_, s)| s));
            let next = match every {
                // The next hour's start: 3,600 s on, or a half hour either way where the
                // zone's offset changes by one.
                Every::Hour => period_start(every, tz, zone, start.saturating_add(3_600_000_000)),
                Every::Calendar(unit) => crate::window::zoned_bounds(unit, zone, start)
                    .1
                    .unwrap_or(until),
            };
            if next <= start {
                break;
            }
            start = next;
        }
        for (at, sums) in data {
            push(*at, Some(sums));
        }
        (rows, total)
    }

    /// Each subscription's flat fee over `[from, until)`: the fee periods (calendar, in its
    /// time zone) that overlap it.
    pub fn subscription_fees(
        &self,
        from: Option<TsMicros>,
        until: TsMicros,
    ) -> Vec<bursar_schemas::wire::SubscriptionFee> {
        /// Most periods counted (a century of days).
        const MAX_PERIODS: u64 = 36_600;
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        policy
            .subscriptions
            .iter()
            .map(|s| {
                let spec = s.timezone.as_ref().map_or(
                    WindowSpec::Calendar {
                        unit: s.fee_period,
                        utc_offset_seconds: 0,
                    },
                    |timezone| WindowSpec::CalendarZone {
                        unit: s.fee_period,
                        timezone: timezone.clone(),
                    },
                );
                let mut periods = 0u64;
                let mut t = from.unwrap_or(until);
                while t < until && periods < MAX_PERIODS {
                    periods += 1;
                    match crate::window::window_bounds(&spec, t).1 {
                        Some(end) if end > t => t = end,
                        _ => break,
                    }
                }
                bursar_schemas::wire::SubscriptionFee {
                    id: s.id.clone(),
                    fee_micros: s.fee_micros,
                    fee_period: crate::policy::calendar_unit_name(s.fee_period).to_string(),
                    periods,
                    fee_total_micros: s
                        .fee_micros
                        .saturating_mul(i64::try_from(periods).unwrap_or(i64::MAX)),
                }
            })
            .collect()
    }
}
