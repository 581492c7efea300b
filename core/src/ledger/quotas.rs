//! What providers said about their rate limits (SPEC §10): each `[[quota]]`'s last
//! observation, folded from `quota_observed` events, and what it still allows.
//!
//! An observed limit binds until its reset: a candidate may use at most the observed remaining,
//! less the usage of that quota recorded since the observation, less what the quota's live holds
//! still hold (holds are counted so that racing reservations cannot each take the last request;
//! SPEC names only the usage, see docs/protocol.md). Past its reset an observation no longer
//! binds.

use super::report::Adjust;
use super::{total_tokens, Hold, Ledger};
use crate::time::format_ts;
use bursar_schemas::event::{ObservedLimit, QuotaExhausted, QuotaObserved};
use bursar_schemas::policy::ResolvedQuota;
use bursar_schemas::wire::{QuotaLimitReport, QuotaReport, Usage};
use bursar_schemas::{Labels, TsMicros};
use serde::{Deserialize, Serialize};

/// The four limits a provider reports, in this order everywhere.
pub const LIMIT_NAMES: [&str; 4] = ["requests", "tokens", "input_tokens", "output_tokens"];

/// Counts against each of the four limits (requests, tokens, input tokens, output tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need(pub [u64; 4]);

impl Need {
    /// What a usage event counts.
    pub fn of_usage(u: &Usage) -> Need {
        let total = total_tokens(u);
        Need([
            u.requests,
            total,
            total.saturating_sub(u.output_tokens),
            u.output_tokens,
        ])
    }

    /// What a hold (or a candidate about to hold) counts: one request and its worst case.
    pub fn of_hold(input_tokens: u64, max_output_tokens: u64) -> Need {
        Need([
            1,
            input_tokens.saturating_add(max_output_tokens),
            input_tokens,
            max_output_tokens,
        ])
    }

    /// What a live hold counts in the quotas that govern it.
    pub(super) fn of_held(hold: &Hold) -> Need {
        Need::of_hold(
            hold.input_tokens,
            hold.amounts.tokens.saturating_sub(hold.input_tokens),
        )
    }
}

/// What the live holds a quota governs hold, summed exactly (like a bucket's `HeldSums`: no
/// number of holds reaches the largest `u128`), so that uncounting a hold gives back exactly
/// what counting it added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(in crate::ledger) struct QuotaHeld([u128; 4]);

impl QuotaHeld {
    pub(super) fn add(&mut self, o: &Need) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += u128::from(b);
        }
    }

    /// Uncount `o`; false (and nothing changed) when less than that is held, which no correct
    /// fold meets (derived from the holds and rebuilt with them).
    #[must_use]
    fn take(&mut self, o: &Need) -> bool {
        self.take_all(&QuotaHeld(o.0.map(u128::from)))
    }

    /// Uncount what `o` sums; false (and nothing changed) when less than that is held.
    #[must_use]
    fn take_all(&mut self, o: &QuotaHeld) -> bool {
        let fits = self.0.iter().zip(o.0).all(|(a, b)| *a >= b);
        if fits {
            for (a, b) in self.0.iter_mut().zip(o.0) {
                *a -= b;
            }
        }
        fits
    }

    /// The sums as reported: each at most the largest `u64`.
    fn need(&self) -> Need {
        Need(self.0.map(|a| u64::try_from(a).unwrap_or(u64::MAX)))
    }
}

/// One observed limit and the usage counted against it since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    /// As observed.
    pub limit: ObservedLimit,
    /// Usage of the quota recorded since (until the reset).
    pub used: u64,
    /// True once its `quota_exhausted` was appended.
    pub noted: bool,
}

/// A quota's last observation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Seq of its `quota_observed`.
    pub seq: u64,
    /// When it was observed.
    pub at: TsMicros,
    /// Per limit ([`LIMIT_NAMES`]).
    pub bounds: [Option<Bound>; 4],
}

impl Observed {
    pub(super) fn of(seq: u64, at: TsMicros, q: &QuotaObserved) -> Observed {
        let b = |l: &Option<ObservedLimit>| {
            l.map(|limit| Bound {
                limit,
                used: 0,
                noted: false,
            })
        };
        Observed {
            seq,
            at,
            bounds: [
                b(&q.requests),
                b(&q.tokens),
                b(&q.input_tokens),
                b(&q.output_tokens),
            ],
        }
    }
}

/// Why a quota's observation refuses a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaBlock {
    /// The quota id.
    pub quota: String,
    /// Which limit.
    pub limit: &'static str,
    /// What is left of it (observed remaining less usage and holds since).
    pub left: u64,
    /// What the candidate needs.
    pub need: u64,
    /// The limit itself, when the provider said it.
    pub of: Option<u64>,
    /// When the observation stops binding.
    pub reset_at: TsMicros,
}

/// True when `q` governs a call with these (derived) labels.
pub fn governs(q: &ResolvedQuota, labels: &Labels) -> bool {
    labels.get("provider").is_some_and(|p| *p == q.provider)
        && crate::labels::selector_matches(&q.match_labels, labels)
}

impl Ledger {
    /// The `[[quota]]`s of the policy in force that govern a call with these labels.
    pub fn governing_quotas<'a>(
        &'a self,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a ResolvedQuota> + 'a {
        self.policy
            .iter()
            .flat_map(|p| p.quotas.iter())
            .filter(move |q| governs(q, labels))
    }

    /// The ids of [`Ledger::governing_quotas`].
    pub fn governing_ids(&self, labels: &Labels) -> Vec<String> {
        self.governing_quotas(labels)
            .map(|q| q.id.clone())
            .collect()
    }

    /// The last observation of quota `id`.
    pub fn observation(&self, id: &str) -> Option<&Observed> {
        self.observed.get(id)
    }

    /// What the holds governed by quota `id` hold, counting those past their expiry until their
    /// `reservation_expired` is folded (reads leave those out: `quota_held_now`).
    pub fn quota_held(&self, id: &str) -> Need {
        self.quota_holds
            .get(id)
            .map_or_else(Need::default, QuotaHeld::need)
    }

    /// [`Ledger::quota_held`] less what `adj` says its holds past their expiry hold (not
    /// reaped yet): reads leave them out as they leave them out of buckets, so that a `check`
    /// or `status` between a hold's expiry and its `reservation_expired` does not count it.
    fn quota_held_now(&self, id: &str, adj: &Adjust) -> Need {
        let Some(mut held) = self.quota_holds.get(id).copied() else {
            return Need::default();
        };
        if let Some(expired) = adj.quota(id) {
            // Counted until its event is folded; were it not (a bug, which folding that event
            // notes as `Ledger::fault`), the figure stays as it is: more held, never less.
            let counted = held.take_all(expired);
            debug_assert!(counted, "expired holds not counted in quota {id:?}");
        }
        held.need()
    }

    /// What is left of each limit of quota `id` at `now`, without the expired holds of `adj`
    /// (`None`: that limit does not bind).
    pub(super) fn quota_left(
        &self,
        id: &str,
        now: TsMicros,
        adj: &Adjust,
    ) -> [Option<(u64, TsMicros)>; 4] {
        let mut out = [None; 4];
        let Some(obs) = self.observed.get(id) else {
            return out;
        };
        let held = self.quota_held_now(id, adj);
        for (i, b) in obs.bounds.iter().enumerate() {
            let Some(b) = b.filter(|b| now < b.limit.reset_at) else {
                continue;
            };
            let taken = b.used.saturating_add(held.0[i]);
            out[i] = Some((b.limit.remaining.saturating_sub(taken), b.limit.reset_at));
        }
        out
    }

    /// Each `[[quota]]` of the policy in force with its observed limits that still bind at
    /// `now` (`status`).
    pub(super) fn quota_reports(&self, now: TsMicros, adj: &Adjust) -> Vec<QuotaReport> {
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        policy
            .quotas
            .iter()
            .map(|q| {
                let obs = self.observed.get(&q.id);
                let left = self.quota_left(&q.id, now, adj);
                let limits = obs
                    .map(|o| {
                        o.bounds
                            .iter()
                            .zip(left)
                            .enumerate()
                            .filter_map(|(i, (b, left))| {
                                let (b, (remaining, reset_at)) = (b.as_ref()?, left?);
                                Some(QuotaLimitReport {
                                    limit: LIMIT_NAMES[i].into(),
                                    of: b.limit.limit,
                                    observed_remaining: b.limit.remaining,
                                    remaining,
                                    reset_at: format_ts(reset_at),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                QuotaReport {
                    id: q.id.clone(),
                    provider: q.provider.clone(),
                    observed_at: obs.map(|o| format_ts(o.at)),
                    limits,
                }
            })
            .collect()
    }

    /// The first observed limit a candidate with these labels, needing `need`, would overrun
    /// at `now`.
    pub(super) fn quota_block(
        &self,
        labels: &Labels,
        need: &Need,
        now: TsMicros,
        adj: &Adjust,
    ) -> Option<QuotaBlock> {
        for q in self.governing_quotas(labels) {
            let of = self
                .observed
                .get(&q.id)
                .map(|o| o.bounds.map(|b| b.and_then(|b| b.limit.limit)));
            for (i, left) in self.quota_left(&q.id, now, adj).iter().enumerate() {
                let Some((left, reset_at)) = *left else {
                    continue;
                };
                if need.0[i] > left || left == 0 {
                    return Some(QuotaBlock {
                        quota: q.id.clone(),
                        limit: LIMIT_NAMES[i],
                        left,
                        need: need.0[i],
                        of: of.and_then(|o| o[i]),
                        reset_at,
                    });
                }
            }
        }
        None
    }

    /// Fold a `quota_observed`.
    pub(super) fn fold_observed(&mut self, seq: u64, ts: TsMicros, q: &QuotaObserved) {
        self.observed
            .insert(q.quota.clone(), Observed::of(seq, ts, q));
    }

    /// Fold a `quota_exhausted`: its limit's crossing is noted.
    pub(super) fn fold_quota_exhausted(&mut self, e: &QuotaExhausted) {
        let Some(obs) = self
            .observed
            .get_mut(&e.quota)
            .filter(|o| o.seq == e.observed_seq)
        else {
            return;
        };
        if let Some(i) = LIMIT_NAMES.iter().position(|n| *n == e.limit) {
            if let Some(b) = obs.bounds[i].as_mut() {
                b.noted = true;
            }
        }
    }

    /// Count a usage event (with these derived labels) against the observations of the
    /// quotas that govern it.
    pub(super) fn quota_usage(&mut self, labels: &Labels, need: &Need, ts: TsMicros) {
        if self.observed.is_empty() {
            return;
        }
        let ids: Vec<String> = self.governing_ids(labels);
        for id in ids {
            if let Some(obs) = self.observed.get_mut(&id) {
                for (i, b) in obs.bounds.iter_mut().enumerate() {
                    if let Some(b) = b.as_mut().filter(|b| ts < b.limit.reset_at) {
                        b.used = b.used.saturating_add(need.0[i]);
                    }
                }
            }
        }
    }

    /// Count (`add`) or uncount a hold in the quotas that govern it.
    pub(super) fn quota_hold(&mut self, hold: &Hold, add: bool) {
        let Some(policy) = &self.policy else {
            return;
        };
        if policy.quotas.is_empty() {
            return;
        }
        let need = Need::of_held(hold);
        let mut short = None;
        for q in policy.quotas.iter().filter(|q| governs(q, &hold.labels)) {
            let held = self.quota_holds.entry(q.id.clone()).or_default();
            if add {
                held.add(&need);
            } else if !held.take(&need) {
                short.get_or_insert_with(|| q.id.clone());
            }
        }
        if let Some(quota) = short {
            self.impossible(format!(
                "a reservation ends holding {need:?} in quota {quota:?}, which holds less"
            ));
        }
    }

    /// Count every live hold again in the quotas of the policy in force (derived data: after a
    /// policy change and when a snapshot is read).
    pub(super) fn recount_quota_holds(&mut self) {
        self.quota_holds.clear();
        let holds: Vec<Hold> = self.holds.values().cloned().collect();
        for h in &holds {
            self.quota_hold(h, true);
        }
    }

    /// The `quota_exhausted` events due after the quotas governing `labels` were used or
    /// observed at `ts`: each observed limit that has nothing left and was not noted yet.
    pub(super) fn quota_crossings(&self, ids: &[String], ts: TsMicros) -> Vec<QuotaExhausted> {
        let mut due = Vec::new();
        for id in ids {
            let Some(obs) = self.observed.get(id) else {
                continue;
            };
            for (i, b) in obs.bounds.iter().enumerate() {
                let Some(b) = b else { continue };
                if !b.noted && ts < b.limit.reset_at && b.used >= b.limit.remaining {
                    due.push(QuotaExhausted {
                        quota: id.clone(),
                        limit: LIMIT_NAMES[i].into(),
                        observed_seq: obs.seq,
                        reset_at: b.limit.reset_at,
                    });
                }
            }
        }
        due
    }
}
