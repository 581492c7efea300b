//! SPEC §5 on the buckets one candidate counts in: allow, warn or deny, per bucket and in all,
//! with the figures of each line with and without the hold ([`Ledger::decide`], a
//! [`Verdict`]), and the lines and reason an answer shows.

use super::super::buckets::Figures;
use super::super::report::{adjust, report, Adjust, WindowEnds};
use super::super::{ref_budget, ref_slot, Ledger, NO_SLOT};
use super::candidates::ok_reason;
use super::receipts::Shown;
use crate::labels::scope_key;
use crate::window::Amounts;
use bursar_schemas::wire::{BudgetReport, Decision, Reason};
use bursar_schemas::{Labels, TsMicros};

/// What [`Ledger::decide`] concluded: the decision and the contributing buckets with the
/// verdict of each. Rendered into an answer by [`Ledger::render_verdict`] while the ledger is
/// unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub(super) decision: Decision,
    pub(super) probe: Amounts,
    pub(super) lines: Vec<VerdictLine>,
    /// `(line, scope key)` of the lines whose bucket does not exist yet.
    pub(super) new_keys: Vec<(usize, String)>,
    /// Index of the first line that denies.
    pub(super) deny: Option<usize>,
}

impl Verdict {
    /// Allow, warn or deny.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// Number of budgets that contributed (one line each in the answer).
    pub fn budgets(&self) -> usize {
        self.lines.len()
    }
}

/// Why a verdict's line decided as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// Within every limit (maybe past `warn_at`).
    Fits,
    /// Over a limit.
    OverLimit,
    /// A new scope key beyond `max_keys_per_budget`.
    MaxKeys,
}

/// One contributing bucket of a [`Verdict`] (its figures are read again when the verdict is
/// rendered: the ledger has not changed since).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct VerdictLine {
    pub(super) budget: u32,
    /// Slot of the bucket, or `NO_SLOT` when it does not exist yet.
    pub(super) slot: u32,
    pub(super) why: Why,
}

/// `f` with a hold of `probe` (and one concurrency slot) added.
pub(super) fn with_probe(f: &Figures, probe: Amounts) -> Figures {
    Figures {
        spent: f.spent,
        held: f.held + probe,
        live_holds: f.live_holds.saturating_add(1),
    }
}

impl Ledger {
    /// The decision of SPEC §5 on holding `probe` (plus one concurrency slot) in every budget
    /// an event with `labels` (client and derived labels) counts in, at `now`: allow, warn or
    /// deny (the most severe verdict of any budget wins), with the figures of every
    /// contributing bucket with and without the probe. Nothing is rendered: the answer's budget
    /// lines are made from the verdict only when an answer needs them
    /// ([`Ledger::render_verdict`]). `check` and `reserve` decide through it.
    pub fn decide(&self, labels: &Labels, probe: Amounts, now: TsMicros) -> Verdict {
        self.decide_adjusted(labels, probe, now, &Adjust::none())
    }

    /// [`Ledger::decide`], without the holds in `adj` (expired, not yet reaped).
    pub(super) fn decide_adjusted(
        &self,
        labels: &Labels,
        probe: Amounts,
        now: TsMicros,
        adj: &Adjust,
    ) -> Verdict {
        let mut verdict = Verdict {
            decision: Decision::Allow,
            probe,
            lines: Vec::new(),
            new_keys: Vec::new(),
            deny: None,
        };
        let Some(policy) = &self.policy else {
            return verdict;
        };
        self.with_matching(labels, |refs| {
            verdict.lines.reserve_exact(refs.len());
            for &r in refs {
                let (i, known) = (ref_budget(r), ref_slot(r));
                let (Some(limits), Some(state)) = (self.limits.get(i), self.budgets.get(i)) else {
                    continue;
                };
                // A bucket the match does not know yet: found (or not) by its key.
                let mut new_key = None;
                // A remembered slot is its bucket's, or vacant (swept): then found by its key.
                let slot = if known == NO_SLOT || state.at(known).is_none() {
                    let group_by = policy.budgets.get(i).map(|b| &b.group_by[..]);
                    let key = scope_key(group_by.unwrap_or_default(), labels).unwrap_or_default();
                    let slot = state.slot(&key);
                    if slot.is_none() {
                        new_key = Some(key);
                    }
                    slot
                } else {
                    Some(known)
                };
                let bucket = slot.and_then(|slot| state.at(slot));
                let mut f = bucket
                    .map(|bucket| bucket.figures_in(&limits.window, limits.rolling, now))
                    .unwrap_or_default();
                let key = new_key.as_deref().or_else(|| slot.map(|s| state.key(s)));
                adjust(&mut f, bucket, adj, i, key.unwrap_or_default());
                let after = with_probe(&f, probe);
                // Only live scopes count (SPEC §5): ended buckets not swept yet do not.
                let full = new_key.as_ref().is_some_and(|k| !k.is_empty())
                    && state.len() as u64 >= policy.max_keys_per_budget
                    && state.live_count(limits, now, |key| adj.expired_in(i, key)) as u64
                        >= policy.max_keys_per_budget;
                let (line, why) = if full && limits.limited && limits.deny {
                    (Decision::Deny, Why::MaxKeys)
                } else if limits.over(&after) {
                    if limits.deny {
                        (Decision::Deny, Why::OverLimit)
                    } else {
                        (Decision::Warn, Why::OverLimit)
                    }
                } else if limits.warns(&after) {
                    (Decision::Warn, Why::Fits)
                } else {
                    (Decision::Allow, Why::Fits)
                };
                if line == Decision::Deny && verdict.deny.is_none() {
                    verdict.deny = Some(verdict.lines.len());
                }
                verdict.decision = verdict.decision.max(line);
                if let Some(key) = new_key {
                    verdict.new_keys.push((verdict.lines.len(), key));
                }
                verdict.lines.push(VerdictLine {
                    budget: u32::try_from(i).unwrap_or(u32::MAX),
                    slot: slot.unwrap_or(NO_SLOT),
                    why,
                });
            }
        });
        if verdict.deny.is_some() {
            verdict.decision = Decision::Deny;
        }
        verdict
    }

    /// The scope key of line `n` of a verdict.
    pub(super) fn line_key<'a>(&'a self, verdict: &'a Verdict, n: usize) -> &'a str {
        let Some(line) = verdict.lines.get(n) else {
            return "";
        };
        match self.budgets.get(line.budget as usize) {
            Some(state) if line.slot != NO_SLOT => state.key(line.slot),
            _ => verdict
                .new_keys
                .iter()
                .find(|(at, _)| *at == n)
                .map_or("", |(_, key)| key.as_str()),
        }
    }

    /// The figures of line `n` of a verdict at `now` without the probe, less the holds in
    /// `adj` (as the verdict saw them: the ledger has not changed since).
    pub(super) fn line_figures(
        &self,
        verdict: &Verdict,
        n: usize,
        now: TsMicros,
        adj: &Adjust,
    ) -> Figures {
        let Some(line) = verdict.lines.get(n) else {
            return Figures::default();
        };
        let i = line.budget as usize;
        let mut f = if line.slot == NO_SLOT {
            Figures::default()
        } else {
            self.figures_at(i, line.slot, now)
        };
        let bucket = self.budgets.get(i).and_then(|s| s.at(line.slot));
        adjust(&mut f, bucket, adj, i, self.line_key(verdict, n));
        f
    }

    /// The answer's parts of a verdict decided at `now`: the decision, a budget line per
    /// contributing bucket (figures without the probe when denied, with it otherwise) and the
    /// reason.
    pub fn render_verdict(
        &self,
        verdict: &Verdict,
        now: TsMicros,
    ) -> (Decision, Vec<BudgetReport>, Reason) {
        let (decision, shown, reason) = self.verdict_lines(verdict, now, &Adjust::none());
        (decision, self.reports(&shown, now), reason)
    }

    /// The budget lines `shown`, rendered at `now` under the policy in force.
    pub(super) fn reports(&self, shown: &[Shown], now: TsMicros) -> Vec<BudgetReport> {
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        let mut ends = WindowEnds::default();
        shown
            .iter()
            .filter_map(|l| {
                let i = l.budget as usize;
                let (b, limits) = (policy.budgets.get(i)?, self.limits.get(i)?);
                let state = limits.state(&l.figures);
                Some(report(b, state, l.key.clone(), &l.figures, now, &mut ends))
            })
            .collect()
    }

    /// [`Ledger::render_verdict`] of a verdict decided without the holds in `adj`, its lines
    /// not rendered yet.
    pub(super) fn verdict_lines(
        &self,
        verdict: &Verdict,
        now: TsMicros,
        adj: &Adjust,
    ) -> (Decision, Vec<Shown>, Reason) {
        let Some(policy) = &self.policy else {
            return (Decision::Allow, Vec::new(), ok_reason(Decision::Allow));
        };
        let denied = verdict.deny.is_some();
        let shown = verdict
            .lines
            .iter()
            .enumerate()
            .map(|(n, line)| {
                let without = self.line_figures(verdict, n, now, adj);
                let figures = if denied {
                    without
                } else {
                    with_probe(&without, verdict.probe)
                };
                Shown {
                    budget: line.budget,
                    key: self.line_key(verdict, n).to_string(),
                    figures,
                }
            })
            .collect();
        let deny = verdict.deny.and_then(|n| {
            let line = verdict.lines.get(n)?;
            let b = policy.budgets.get(line.budget as usize)?;
            let key = self.line_key(verdict, n);
            let message = match line.why {
                Why::MaxKeys => format!(
                    "budget {} already tracks max_keys_per_budget = {} scopes; new scope {key:?} is refused (fail closed)",
                    b.id, policy.max_keys_per_budget
                ),
                Why::OverLimit | Why::Fits => {
                    let without = self.line_figures(verdict, n, now, adj);
                    first_over(b, &with_probe(&without, verdict.probe)).unwrap_or_default()
                }
            };
            Some(Reason {
                code: if line.why == Why::MaxKeys {
                    "max_keys".into()
                } else if bursar_schemas::policy::is_allowance(&b.id)
                    || bursar_schemas::policy::is_quota_limit(&b.id)
                {
                    // A subscription's allowance or a provider's quota ran out (SPEC §10).
                    "quota".into()
                } else {
                    "budget".into()
                },
                message,
                budget: Some(b.id.clone()),
                key: Some(key.to_string()),
            })
        });
        match deny {
            Some(r) => (Decision::Deny, shown, r),
            None => (verdict.decision, shown, ok_reason(verdict.decision)),
        }
    }

    /// Judge a hold of `probe` (plus one concurrency slot) against every matching budget, and
    /// render the answer's parts.
    pub(super) fn judge(
        &self,
        labels: &Labels,
        probe: Amounts,
        now: TsMicros,
        adj: &Adjust,
    ) -> (Decision, Vec<Shown>, Reason, bool) {
        let verdict = self.decide_adjusted(labels, probe, now, adj);
        let (decision, shown, reason) = self.verdict_lines(&verdict, now, adj);
        let waitable = decision == Decision::Deny && self.verdict_waitable(&verdict, now, adj);
        (decision, shown, reason, waitable)
    }

    /// True when every bucket that denies `verdict` would let it through once limits that free
    /// up by themselves have (SPEC §10 `wait_ms`): concurrency, rolling windows, other holds,
    /// and any limit of a subscription's allowance or a provider's quota — never a request
    /// larger than a limit itself.
    fn verdict_waitable(&self, verdict: &Verdict, now: TsMicros, adj: &Adjust) -> bool {
        let Some(policy) = &self.policy else {
            return false;
        };
        verdict.lines.iter().enumerate().all(|(n, line)| {
            let i = line.budget as usize;
            let (Some(limits), Some(b)) = (self.limits.get(i), policy.budgets.get(i)) else {
                return true;
            };
            let after = with_probe(&self.line_figures(verdict, n, now, adj), verdict.probe);
            let denies = line.why == Why::MaxKeys || (limits.deny && limits.over(&after));
            !denies
                || (line.why == Why::OverLimit
                    && limits.fits_empty(verdict.probe)
                    && (bursar_schemas::policy::is_allowance(&b.id)
                        || bursar_schemas::policy::is_quota_limit(&b.id)
                        || limits.frees_by_itself(&after, verdict.probe)))
        })
    }
}

/// First limit that `figures` exceed, described.
pub(super) fn first_over(
    b: &bursar_schemas::policy::ResolvedBudget,
    f: &Figures,
) -> Option<String> {
    let fmt = crate::money::format_usd;
    if let Some(l) = b.max_micros {
        let used = i128::from(f.spent.micros) + i128::from(f.held.micros);
        if used > i128::from(l) {
            return Some(format!(
                "budget {} would exceed max_usd: spent {} + held {} > {}",
                b.id,
                fmt(f.spent.micros),
                fmt(f.held.micros),
                fmt(l)
            ));
        }
    }
    if let Some(l) = b.max_tokens {
        if u128::from(f.spent.tokens) + u128::from(f.held.tokens) > u128::from(l) {
            return Some(format!(
                "budget {} would exceed max_tokens: {} used + {} held > {l}",
                b.id, f.spent.tokens, f.held.tokens
            ));
        }
    }
    if let Some(l) = b.max_requests {
        if u128::from(f.spent.requests) + u128::from(f.held.requests) > u128::from(l) {
            return Some(format!(
                "budget {} would exceed max_requests: {} made + {} held > {l}",
                b.id, f.spent.requests, f.held.requests
            ));
        }
    }
    if let Some(l) = b.max_concurrent {
        if f.live_holds > l {
            return Some(format!(
                "budget {} would exceed max_concurrent: {} live holds > {l}",
                b.id, f.live_holds
            ));
        }
    }
    None
}
