//! Bucket figures as answers report them, bucket states, and the `status` read.

use super::buckets::{Bucket, Figures, HeldSums, Limits};
use super::quotas::{governs, Need, QuotaHeld};
use super::Ledger;
use crate::labels::parse_scope_key;
use crate::time::format_ts;
use crate::window::window_bounds;
use bursar_schemas::policy::{ResolvedBudget, WindowSpec};
use bursar_schemas::wire::{
    BucketState, BudgetReport, ErrorCode, StatusAnswer, StatusRequest, SubscriptionReport,
    WireError,
};
use bursar_schemas::{Labels, TsMicros};
use std::collections::HashMap;

/// Default `limit` of a `status` answer.
pub const DEFAULT_STATUS_LIMIT: usize = 1000;

/// Holds that expired but whose `reservation_expired` is not folded yet: what they hold per
/// bucket and per quota, which reads leave out (SPEC §5: reads never show a hold past its
/// expiry). Made in one pass over the expired holds per read ([`Ledger::expired_adjust`]).
#[derive(Debug, Default)]
pub(super) struct Adjust {
    buckets: HashMap<(usize, String), HeldSums>,
    quotas: HashMap<String, QuotaHeld>,
}

impl Adjust {
    /// Nothing to leave out.
    pub(super) fn none() -> Adjust {
        Adjust::default()
    }

    /// What the expired holds of `(budget, key)` hold, if any. No key is allocated in the
    /// usual case, where no bucket holds an expired hold.
    fn bucket(&self, budget: usize, key: &str) -> Option<&HeldSums> {
        if self.buckets.is_empty() {
            return None;
        }
        self.buckets.get(&(budget, key.to_string()))
    }

    /// How many of the live holds of `(budget, key)` are past their expiry.
    pub(super) fn expired_in(&self, budget: usize, key: &str) -> u64 {
        self.bucket(budget, key).map_or(0, HeldSums::live)
    }

    /// What the expired holds governed by quota `id` hold, if any.
    pub(super) fn quota(&self, id: &str) -> Option<&QuotaHeld> {
        self.quotas.get(id)
    }
}

/// Take the expired holds `adj` counts for `(budget, key)` out of `f`, the figures of
/// `bucket` (exactly: from the bucket's exact sums, which its figures report at most at each
/// type's largest value).
pub(super) fn adjust(
    f: &mut Figures,
    bucket: Option<&Bucket>,
    adj: &Adjust,
    budget: usize,
    key: &str,
) {
    if let Some(expired) = adj.bucket(budget, key) {
        let mut sums = bucket.map_or_else(HeldSums::default, |b| b.holds.sums());
        // Expired holds are counted in their buckets until their event is folded; were they
        // not (a bug, which folding that event notes as `Ledger::fault`), the figures stay as
        // they are: more held, never less.
        let counted = sums.take(expired);
        debug_assert!(counted, "expired holds not counted in ({budget}, {key:?})");
        if counted {
            f.held = sums.held();
            f.live_holds = sums.live();
        }
    }
}

const PPM: i128 = 1_000_000;
const PPM_NARROW: i64 = 1_000_000;

/// `(used, limit)` pairs of every limit a budget sets, in common integer units (at most four:
/// money, tokens, requests, concurrency), without allocating.
struct Dimensions {
    pairs: [(i128, i128); 4],
    len: usize,
}

impl Dimensions {
    fn iter(&self) -> impl Iterator<Item = &(i128, i128)> {
        self.pairs.iter().take(self.len)
    }

    fn push(&mut self, pair: (i128, i128)) {
        if let Some(slot) = self.pairs.get_mut(self.len) {
            *slot = pair;
            self.len += 1;
        }
    }
}

fn dimensions(b: &ResolvedBudget, f: &Figures) -> Dimensions {
    let mut out = Dimensions {
        pairs: [(0, 0); 4],
        len: 0,
    };
    if let Some(l) = b.max_micros {
        out.push((
            i128::from(f.spent.micros) + i128::from(f.held.micros),
            i128::from(l),
        ));
    }
    if let Some(l) = b.max_tokens {
        out.push((
            i128::from(f.spent.tokens) + i128::from(f.held.tokens),
            i128::from(l),
        ));
    }
    if let Some(l) = b.max_requests {
        out.push((
            i128::from(f.spent.requests) + i128::from(f.held.requests),
            i128::from(l),
        ));
    }
    if let Some(l) = b.max_concurrent {
        out.push((i128::from(f.live_holds), i128::from(l)));
    }
    out
}

/// State of a bucket of budget `b` with figures `f` (see [`Limits::state`], the one definition).
pub(super) fn bucket_state(b: &ResolvedBudget, f: &Figures) -> BucketState {
    Limits::of(b).state(f)
}

/// Utilization in parts per million, the highest over the limits (0 for a meter).
pub(super) fn utilization_ppm(b: &ResolvedBudget, f: &Figures) -> u64 {
    dimensions(b, f)
        .iter()
        .map(|(used, limit)| {
            if *limit <= 0 {
                if *used > 0 {
                    u64::MAX
                } else {
                    PPM as u64
                }
            } else {
                // In `i64` (a hardware division) when the product fits; the same quotient.
                let narrow = i64::try_from(*used)
                    .ok()
                    .and_then(|u| u.checked_mul(PPM_NARROW))
                    .zip(i64::try_from(*limit).ok())
                    .map(|(scaled, limit)| i128::from(scaled / limit));
                let ppm = narrow.unwrap_or_else(|| used.saturating_mul(PPM) / limit);
                u64::try_from(ppm).unwrap_or(u64::MAX)
            }
        })
        .max()
        .unwrap_or(0)
}

/// Window ends already rendered as RFC 3339, so that the budgets of one answer that share a
/// window end (all daily budgets, say) format it once.
#[derive(Default)]
pub(super) struct WindowEnds(Vec<(TsMicros, String)>);

impl WindowEnds {
    fn render(&mut self, end: TsMicros) -> String {
        if let Some((_, text)) = self.0.iter().find(|(t, _)| *t == end) {
            return text.clone();
        }
        let text = format_ts(end);
        self.0.push((end, text.clone()));
        text
    }
}

/// A row of `status` before it is cut: utilization, budget, key, figures and state.
type Row<'a> = (u64, &'a ResolvedBudget, &'a str, Figures, BucketState);

/// A report line of a bucket in `state` (`Limits::state` of its figures); window ends are
/// rendered through `ends`.
pub(super) fn report(
    b: &ResolvedBudget,
    state: BucketState,
    key: String,
    f: &Figures,
    now: TsMicros,
    ends: &mut WindowEnds,
) -> BudgetReport {
    let ppm = utilization_ppm(b, f);
    let window_end = match &b.window {
        WindowSpec::Cumulative => None,
        spec => window_bounds(spec, now).1.map(|end| ends.render(end)),
    };
    BudgetReport {
        budget: b.id.clone(),
        key,
        limit_micros: b.max_micros,
        spent_micros: f.spent.micros,
        held_micros: f.held.micros,
        remaining_micros: b.max_micros.map(|l| {
            l.saturating_sub(f.spent.micros)
                .saturating_sub(f.held.micros)
                .max(0)
        }),
        limit_tokens: b.max_tokens,
        spent_tokens: f.spent.tokens,
        held_tokens: f.held.tokens,
        remaining_tokens: b.max_tokens.map(|l| {
            l.saturating_sub(f.spent.tokens)
                .saturating_sub(f.held.tokens)
        }),
        limit_requests: b.max_requests,
        spent_requests: f.spent.requests,
        remaining_requests: b.max_requests.map(|l| {
            l.saturating_sub(f.spent.requests)
                .saturating_sub(f.held.requests)
        }),
        limit_concurrent: b.max_concurrent,
        live_holds: f.live_holds,
        remaining_concurrent: b.max_concurrent.map(|l| l.saturating_sub(f.live_holds)),
        utilization: if ppm == u64::MAX {
            f64::INFINITY.min(1e9)
        } else {
            ppm as f64 / 1e6
        },
        state,
        enforce: b.enforce,
        window: match &b.window {
            WindowSpec::Fixed { .. } => "fixed",
            WindowSpec::Rolling { .. } => "rolling",
            WindowSpec::Calendar { .. } | WindowSpec::CalendarZone { .. } => "calendar",
            WindowSpec::Cumulative => "cumulative",
        }
        .to_string(),
        window_end,
    }
}

impl Ledger {
    /// What the holds past their expiry at `now` that are still counted (not yet reaped) hold,
    /// per bucket and per quota.
    pub(super) fn expired_adjust(&self, now: TsMicros) -> Adjust {
        let mut adj = Adjust::none();
        let quotas = self.policy.as_ref().map_or(&[][..], |p| &p.quotas[..]);
        for (at, rid) in &self.expiries {
            if *at > now {
                break;
            }
            if let Some(h) = self.holds.get(rid) {
                for r in &h.buckets {
                    adj.buckets.entry(r.clone()).or_default().add(h.amounts, 1);
                }
                // Counted in the quotas of the policy in force that govern it (see
                // `Ledger::quota_hold`).
                for q in quotas.iter().filter(|q| governs(q, &h.labels)) {
                    adj.quotas
                        .entry(q.id.clone())
                        .or_default()
                        .add(&Need::of_held(h));
                }
            }
        }
        adj
    }

    /// Figures of `(budget, key)` at `now`, without holds that expired by then.
    pub(super) fn figures(&self, budget: usize, key: &str, now: TsMicros, adj: &Adjust) -> Figures {
        let Some(spec) = self
            .policy
            .as_ref()
            .and_then(|p| p.budgets.get(budget))
            .map(|b| &b.window)
        else {
            return Figures::default();
        };
        let bucket = self.budgets.get(budget).and_then(|s| s.get(key));
        let mut f = bucket.map(|b| b.figures(spec, now)).unwrap_or_default();
        adjust(&mut f, bucket, adj, budget, key);
        f
    }

    /// Figures of the bucket in `slot` of `budget` at `now` (no expired-hold adjustment).
    pub(super) fn figures_at(&self, budget: usize, slot: u32, now: TsMicros) -> Figures {
        let spec = self
            .policy
            .as_ref()
            .and_then(|p| p.budgets.get(budget))
            .map(|b| &b.window);
        spec.zip(self.budgets.get(budget).and_then(|s| s.at(slot)))
            .map(|(spec, b)| b.figures(spec, now))
            .unwrap_or_default()
    }

    /// `status` (SPEC §6): buckets, most utilized first, at most `limit` of them, with how many
    /// matched in all. `budget` keeps one budget (an id the policy in force does not have is
    /// `not_found`); `labels` keeps a bucket when every given label is a `group_by` label of its
    /// budget with that value in the bucket's key, or is pinned to that value by the budget's
    /// `match` (a `"*"` in `match` pins nothing).
    pub fn status(&self, req: &StatusRequest, now: TsMicros) -> Result<StatusAnswer, WireError> {
        let budgets = self
            .policy
            .as_ref()
            .map(|p| p.budgets.as_slice())
            .unwrap_or_default();
        if let Some(id) = &req.budget {
            if !budgets.iter().any(|b| b.id == *id) {
                return Err(WireError {
                    code: ErrorCode::NotFound,
                    message: format!("no budget `{id}` in the policy in force"),
                    field: Some("budget".into()),
                });
            }
        }
        let now = self.effective_now(now);
        let adj = self.expired_adjust(now);
        let limit = req.limit.unwrap_or(DEFAULT_STATUS_LIMIT);
        // Every matching bucket as (utilization, budget, key, figures, state); rendered once
        // cut.
        let mut rows: Vec<Row> = Vec::new();
        for (i, b) in budgets.iter().enumerate() {
            if req.budget.as_ref().is_some_and(|id| *id != b.id) {
                continue;
            }
            let Some(state) = self.budgets.get(i) else {
                continue;
            };
            let Some(in_key) = key_filter(b, req.labels.as_ref()) else {
                continue;
            };
            let limits = self.limits.get(i);
            for (key, bucket) in state.iter() {
                // A scope whose window has ended and that holds nothing (but holds past their
                // expiry) is no longer live (SPEC §5): it is not listed, whether or not it has
                // left memory yet.
                if limits.is_some_and(|l| bucket.ended_on_read(l, now, adj.expired_in(i, key))) {
                    continue;
                }
                if !in_key.is_empty() {
                    let pairs = parse_scope_key(key).unwrap_or_default();
                    let all = in_key
                        .iter()
                        .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v));
                    if !all {
                        continue;
                    }
                }
                let f = self.figures(i, key, now, &adj);
                let state = limits.map_or_else(|| bucket_state(b, &f), |l| l.state(&f));
                rows.push((utilization_ppm(b, &f), b, key, f, state));
            }
        }
        let total = rows.len();
        let by_utilization = |a: &Row, b: &Row| {
            b.0.cmp(&a.0)
                .then_with(|| a.1.id.cmp(&b.1.id))
                .then_with(|| a.2.cmp(b.2))
        };
        if limit < total {
            // Only the first `limit` need to be in order.
            rows.select_nth_unstable_by(limit, by_utilization);
            rows.truncate(limit);
        }
        rows.sort_unstable_by(by_utilization);
        let mut ends = WindowEnds::default();
        Ok(StatusAnswer {
            ok: true,
            budgets: rows
                .into_iter()
                .map(|(_, b, key, f, state)| report(b, state, key.to_string(), &f, now, &mut ends))
                .collect(),
            total: total as u64,
            truncated: total > limit,
            subscriptions: self.subscription_reports(now),
            quotas: self.quota_reports(now, &adj),
            tiers: self
                .policy
                .as_ref()
                .map(|p| crate::tiers::all_tiers(&p.tiers))
                .unwrap_or_default(),
            lag_ms: None,
            req: None,
        })
    }

    /// Each subscription of the policy in force with its fee and the fee period holding `now`.
    pub fn subscription_reports(&self, now: TsMicros) -> Vec<SubscriptionReport> {
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        policy
            .subscriptions
            .iter()
            .map(|s| {
                let period = match &s.timezone {
                    Some(timezone) => WindowSpec::CalendarZone {
                        unit: s.fee_period,
                        timezone: timezone.clone(),
                    },
                    None => WindowSpec::Calendar {
                        unit: s.fee_period,
                        utc_offset_seconds: 0,
                    },
                };
                let (start, end) = window_bounds(&period, now);
                SubscriptionReport {
                    id: s.id.clone(),
                    fee_micros: s.fee_micros,
                    fee_period: crate::policy::calendar_unit_name(s.fee_period).to_string(),
                    period_start: format_ts(start),
                    period_end: end.map(format_ts).unwrap_or_default(),
                    allowances: s.allowances.clone(),
                }
            })
            .collect()
    }
}

/// Which of the `status` filter's labels a bucket of budget `b` must carry in its scope key:
/// those the budget's `match` does not pin to the wanted value. `None` when one of them is not
/// a `group_by` label of `b`, so that no bucket of `b` can match.
fn key_filter<'a>(
    b: &ResolvedBudget,
    labels: Option<&'a Labels>,
) -> Option<Vec<(&'a str, &'a str)>> {
    let mut in_key = Vec::new();
    for (k, v) in labels.into_iter().flatten() {
        let pinned = b.match_labels.get(k).is_some_and(|m| m != "*" && m == v);
        if pinned {
            continue;
        }
        if !b.group_by.iter().any(|g| g == k) {
            return None;
        }
        in_key.push((k.as_str(), v.as_str()));
    }
    Some(in_key)
}
