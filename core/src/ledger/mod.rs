//! The ledger: the projections that a fold of the log produces, and the decisions made on them.
//!
//! - [`Ledger::apply`] folds one event. Live serving and replay both use it, so a fold of the
//!   whole log always equals the live state.
//! - [`Ledger::execute`] decides one write command at time `now`, stamps the resulting events
//!   (dense `seq`, strictly increasing `ts`), applies them and returns the answer.
//! - [`Ledger::check`] and [`Ledger::status`] are read-only and never show an expired hold.
//!
//! Architecture invariant: nothing here reads a clock or touches I/O.

mod buckets;
mod decide;
mod replay;
mod report;

pub use decide::{Answer, Command, IdLookup, IdRecord, Step};
pub use replay::{
    collect_epochs, diff_rows, fold, fold_into, replay, EpochDecl, FoldError, ReplayOutcome,
};

use crate::labels::{scope_key, selector_matches};
use crate::pricing;
use crate::window::Amounts;
use buckets::Bucket;
use bursar_schemas::event::{EventBody, ReservationLink};
use bursar_schemas::policy::{ResolvedPolicy, UnknownModels};
use bursar_schemas::pricing::{ModelPrice, PriceTable};
use bursar_schemas::wire::Usage;
use bursar_schemas::{Labels, Micros, TsMicros};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

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

/// A price table in force from `effective_from`, introduced by the event at `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceEpoch {
    /// Events with `ts >= effective_from` may use this table.
    pub effective_from: TsMicros,
    /// The event that introduced it; also the table's version.
    pub seq: u64,
    /// The table.
    pub table: PriceTable,
    /// Highest prices of the table, for unknown models.
    pub max: ModelPrice,
}

/// A live hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Labels including derived ones.
    pub labels: Labels,
    /// Model.
    pub model: String,
    /// Held amounts (micros, tokens, one request).
    pub amounts: Amounts,
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
}

/// A reservation that ended recently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Labels including derived ones.
    pub labels: Labels,
    /// Model.
    pub model: String,
    /// Money it held.
    pub hold_micros: Micros,
    /// How it ended.
    pub how: EndKind,
    /// When.
    pub at: TsMicros,
}

/// The buckets of one budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetState {
    /// Scope key to bucket.
    pub buckets: HashMap<String, Bucket>,
}

/// All projections. A fold of the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    last_seq: u64,
    last_ts: TsMicros,
    policy_version: u64,
    policy: Option<ResolvedPolicy>,
    epochs: Vec<PriceEpoch>,
    budgets: Vec<BudgetState>,
    holds: BTreeMap<String, Hold>,
    expiries: BTreeSet<(TsMicros, String)>,
    ended: HashMap<String, Ended>,
    ended_queue: VecDeque<(TsMicros, String)>,
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

    /// Seq of the last folded event.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// `ts` of the last folded event.
    pub fn last_ts(&self) -> TsMicros {
        self.last_ts
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

    /// Total number of buckets over all budgets.
    pub fn bucket_count(&self) -> usize {
        self.budgets.iter().map(|b| b.buckets.len()).sum()
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
        self.epochs.push(PriceEpoch {
            effective_from,
            seq,
            max: pricing::max_price(table),
            table: table.clone(),
        });
        self.epochs.sort_by_key(|e| e.seq);
    }

    /// Price of `model` at `ts`: `(price, priced_at_max, price_version)`.
    pub fn price_at(&self, model: &str, ts: TsMicros) -> Option<(&ModelPrice, bool, u64)> {
        price_at(&self.epochs, model, ts)
    }

    /// Cost of usage of `model` at `ts`: `(cost, priced_at_max, price_version)`.
    pub fn usage_cost(&self, model: &str, usage: &Usage, ts: TsMicros) -> (Micros, bool, u64) {
        usage_cost(&self.epochs, model, usage, ts)
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

    /// Every `(budget index, scope key)` an event with these labels counts in.
    fn matching(&self, labels: &Labels) -> Vec<(usize, String)> {
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, b) in policy.budgets.iter().enumerate() {
            if selector_matches(&b.match_labels, labels) {
                if let Some(key) = scope_key(&b.group_by, labels) {
                    out.push((i, key));
                }
            }
        }
        out
    }

    /// The bucket for `(budget, key)`, created if new; a new key beyond `max_keys_per_budget`
    /// lands in the overflow bucket.
    fn bucket_mut(&mut self, budget: usize, key: &str) -> Option<(&mut Bucket, String)> {
        let max_keys = self
            .policy
            .as_ref()
            .map_or(u64::MAX, |p| p.max_keys_per_budget);
        let state = self.budgets.get_mut(budget)?;
        let key = if state.buckets.contains_key(key)
            || (state.buckets.len() as u64) < max_keys
            || key.is_empty()
        {
            key.to_string()
        } else {
            OVERFLOW_KEY.to_string()
        };
        let bucket = state.buckets.entry(key.clone()).or_default();
        Some((bucket, key))
    }

    /// Fold one event.
    pub fn apply(&mut self, seq: u64, ts: TsMicros, body: &EventBody) -> Result<(), ApplyError> {
        if seq != self.last_seq + 1 {
            return Err(ApplyError::Gap {
                last: self.last_seq,
                got: seq,
            });
        }
        self.last_seq = seq;
        self.last_ts = self.last_ts.max(ts);
        match body {
            EventBody::PolicyApplied(p) => {
                self.policy_version = p.policy_version;
                self.preload_epoch(ts, seq, &p.policy.pricing);
                self.install_policy(p.policy.clone());
            }
            EventBody::PricingChanged(p) => {
                self.preload_epoch(p.effective_from, seq, &p.pricing);
            }
            EventBody::UsageRecorded(u) => {
                let (cost, _, _) = self.usage_cost(&u.model, &u.usage, ts);
                let amounts = Amounts {
                    micros: cost,
                    tokens: total_tokens(&u.usage),
                    requests: u.usage.requests,
                };
                let specs: Vec<_> = self.matching(&u.labels);
                for (i, key) in specs {
                    let spec = self
                        .policy
                        .as_ref()
                        .and_then(|p| p.budgets.get(i))
                        .map(|b| b.window.clone());
                    if let (Some(spec), Some((bucket, _))) = (spec, self.bucket_mut(i, &key)) {
                        bucket.add_spent(&spec, ts, amounts);
                    }
                }
                if u.reservation == ReservationLink::Known {
                    if let Some(rid) = &u.reservation_id {
                        let how = EndKind::Committed(u.event_id.clone());
                        if !self.end_hold(rid, how.clone(), ts) {
                            if let Some(e) = self.ended.get_mut(rid) {
                                e.how = how;
                            }
                        }
                    }
                }
            }
            EventBody::ReservationCreated(r) => {
                let amounts = Amounts {
                    micros: r.hold_micros,
                    tokens: r.input_tokens.saturating_add(r.max_output_tokens),
                    requests: 1,
                };
                let mut refs = Vec::new();
                for (i, key) in self.matching(&r.labels) {
                    if let Some((bucket, key)) = self.bucket_mut(i, &key) {
                        bucket.hold(amounts, 1);
                        refs.push((i, key));
                    }
                }
                self.expiries
                    .insert((r.expires_at, r.reservation_id.clone()));
                self.holds.insert(
                    r.reservation_id.clone(),
                    Hold {
                        labels: r.labels.clone(),
                        model: r.model.clone(),
                        amounts,
                        expires_at: r.expires_at,
                        buckets: refs,
                    },
                );
            }
            EventBody::ReservationDenied(_) => {}
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
            EventBody::BudgetWarned(c) | EventBody::BudgetExhausted(c) => {
                let warned = matches!(body, EventBody::BudgetWarned(_));
                let idx = self
                    .policy
                    .as_ref()
                    .and_then(|p| p.budgets.iter().position(|b| b.id == c.budget));
                if let Some(bucket) = idx
                    .and_then(|i| self.budgets.get_mut(i))
                    .and_then(|s| s.buckets.get_mut(&c.key))
                {
                    if warned {
                        bucket.warned_window = Some(c.window_start);
                    } else {
                        bucket.exhausted_window = Some(c.window_start);
                    }
                }
            }
        }
        self.forget_ended(ts);
        Ok(())
    }

    /// Remove a live hold from its buckets and remember how it ended. False if it was not live.
    fn end_hold(&mut self, rid: &str, how: EndKind, ts: TsMicros) -> bool {
        let Some(hold) = self.holds.remove(rid) else {
            return false;
        };
        self.expiries.remove(&(hold.expires_at, rid.to_string()));
        for (i, key) in &hold.buckets {
            if let Some(b) = self
                .budgets
                .get_mut(*i)
                .and_then(|s| s.buckets.get_mut(key))
            {
                b.unhold(hold.amounts, 1);
            }
        }
        self.ended.insert(
            rid.to_string(),
            Ended {
                labels: hold.labels,
                model: hold.model,
                hold_micros: hold.amounts.micros,
                how,
                at: ts,
            },
        );
        self.ended_queue.push_back((ts, rid.to_string()));
        true
    }

    fn forget_ended(&mut self, now: TsMicros) {
        let horizon = now.saturating_sub(crate::time::seconds(
            ENDED_RESERVATION_MEMORY_SECONDS as u64,
        ));
        while let Some((at, _)) = self.ended_queue.front() {
            if *at >= horizon {
                break;
            }
            if let Some((at, rid)) = self.ended_queue.pop_front() {
                if self.ended.get(&rid).is_some_and(|e| e.at == at) {
                    self.ended.remove(&rid);
                }
            }
        }
    }

    /// Install a new policy: budgets whose id, selector, grouping and window are unchanged keep
    /// their buckets; the others start empty. Live holds are re-counted under the new budgets.
    fn install_policy(&mut self, new: ResolvedPolicy) {
        // Take every live hold out of the old buckets.
        let hold_ids: Vec<String> = self.holds.keys().cloned().collect();
        for rid in &hold_ids {
            if let Some(h) = self.holds.get(rid) {
                let (amounts, refs) = (h.amounts, h.buckets.clone());
                for (i, key) in refs {
                    if let Some(b) = self
                        .budgets
                        .get_mut(i)
                        .and_then(|s| s.buckets.get_mut(&key))
                    {
                        b.unhold(amounts, 1);
                    }
                }
            }
        }
        let old_policy = self.policy.take();
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
        self.policy = Some(new);
        // Count live holds again, in the new budgets.
        for rid in hold_ids {
            let Some(h) = self.holds.get(&rid) else {
                continue;
            };
            let (amounts, labels) = (h.amounts, h.labels.clone());
            let mut refs = Vec::new();
            for (i, key) in self.matching(&labels) {
                if let Some((bucket, key)) = self.bucket_mut(i, &key) {
                    bucket.hold(amounts, 1);
                    refs.push((i, key));
                }
            }
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
    match epoch.table.models.get(model) {
        Some(p) => Some((p, false, epoch.seq)),
        None => Some((&epoch.max, true, epoch.seq)),
    }
}

fn usage_cost(
    epochs: &[PriceEpoch],
    model: &str,
    usage: &Usage,
    ts: TsMicros,
) -> (Micros, bool, u64) {
    match price_at(epochs, model, ts) {
        Some((price, at_max, version)) => (pricing::usage_cost(price, usage), at_max, version),
        None => (0, true, 0),
    }
}

/// The price timeline of a ledger, detached from it.
#[derive(Debug, Clone, Default)]
pub struct Pricer {
    epochs: Vec<PriceEpoch>,
}

impl Pricer {
    /// Cost of usage of `model` at `ts`: `(cost, priced_at_max, price_version)`.
    pub fn usage_cost(&self, model: &str, usage: &Usage, ts: TsMicros) -> (Micros, bool, u64) {
        usage_cost(&self.epochs, model, usage, ts)
    }
}

/// All tokens of a usage, added.
pub fn total_tokens(u: &Usage) -> u64 {
    u.input_tokens
        .saturating_add(u.output_tokens)
        .saturating_add(u.cached_input_tokens)
        .saturating_add(u.cache_write_tokens)
}
