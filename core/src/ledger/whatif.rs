//! What-if (SPEC §11): what another policy would have done with the same requests.
//!
//! The log records requests' outcomes, and from them the requests: a `usage_recorded` is a
//! `record` (or a `commit`), a `reservation_created` a `reserve` of its model and estimate, a
//! `reservation_released` a `release`, a `reservation_extended` an `extend`. A second ledger
//! runs the log's events up to `since` as they are, then the policy in question, then those
//! requests again, at their times, through the daemon's own [`Ledger::execute`]: so the
//! what-if decides exactly as a daemon under that policy would have, expiries, crossings and
//! all. The events that ledger emits are thrown away; what differs from the log is reported.
//!
//! Rules where the world diverges: a reservation the policy denies is not placed, and the
//! usage committed against it in the log is left out (the call would not have been made;
//! counted in `usage_left_out`). Reservations denied in the log are not asked again (their
//! input estimate is not logged), nor are the log's own expiries, crossings and later
//! `policy_applied` (the policy in question stays in force); `pricing_changed` events apply.

use super::replay::{collect_epochs, EpochDecl, FoldError};
use super::{Answer, Command, Ledger};
use crate::time::format_ts;
use bursar_schemas::event::{Envelope, EventBody, PolicyApplied, ReservationLink};
use bursar_schemas::policy::ResolvedPolicy;
use bursar_schemas::wire::{
    BudgetReport, CommitRequest, Decision, Estimate, ExtendRequest, RecordRequest, ReleaseRequest,
    ReserveRequest, WhatIfAnswer, WhatIfDenial, WhatIfExhausted, WhatIfPeak, WHAT_IF_MAX_DENIALS,
};
use bursar_schemas::TsMicros;
use std::collections::{BTreeMap, HashSet};

/// Run the what-if over a whole log (read twice: once for its price epochs, as a fold is).
pub fn what_if<E: std::fmt::Display, I: Iterator<Item = Result<Envelope, E>>>(
    mut source: impl FnMut() -> I,
    policy: &ResolvedPolicy,
    since: TsMicros,
) -> Result<WhatIfAnswer, FoldError> {
    let epochs = collect_epochs(source())?;
    what_if_with(&epochs, source(), policy, since)
}

/// [`what_if`] with the log's price epochs known already.
pub fn what_if_with<E: std::fmt::Display>(
    epochs: &[EpochDecl],
    events: impl Iterator<Item = Result<Envelope, E>>,
    policy: &ResolvedPolicy,
    since: TsMicros,
) -> Result<WhatIfAnswer, FoldError> {
    let mut run = Run::new(epochs);
    for ev in events {
        let ev = ev.map_err(|e| FoldError::Source(e.to_string()))?;
        run.event(&ev, policy, since)?;
    }
    Ok(run.finish())
}

struct Run {
    ledger: Ledger,
    /// The policy in question is in force.
    switched: bool,
    /// Reservations it denied (their commits, releases and extensions are not asked).
    denied_ids: HashSet<String>,
    answer: WhatIfAnswer,
    /// Peak per budget: utilization, key, ts.
    peaks: BTreeMap<String, (f64, String, TsMicros)>,
}

impl Run {
    fn new(epochs: &[EpochDecl]) -> Run {
        let mut ledger = Ledger::without_rollups();
        for (eff, seq, table) in epochs {
            ledger.preload_epoch(*eff, *seq, table);
        }
        Run {
            ledger,
            switched: false,
            denied_ids: HashSet::new(),
            answer: WhatIfAnswer::empty(),
            peaks: BTreeMap::new(),
        }
    }

    /// Fold an event the ledger emits itself (a policy, prices), next in its own sequence.
    fn own(&mut self, ts: TsMicros, body: &EventBody) {
        let ts = self.ledger.stamp(ts);
        self.ledger.fold_next(ts, body, None);
    }

    fn event(
        &mut self,
        ev: &Envelope,
        policy: &ResolvedPolicy,
        since: TsMicros,
    ) -> Result<(), FoldError> {
        self.answer.events += 1;
        if !self.switched && ev.ts >= since {
            self.switched = true;
            let body = EventBody::PolicyApplied(PolicyApplied {
                policy_version: self.ledger.policy_version() + 1,
                source: "what-if".into(),
                source_hash: String::new(),
                policy: policy.clone(),
            });
            self.own(ev.ts, &body);
        }
        if !self.switched {
            self.own(ev.ts, &ev.body);
            return Ok(());
        }
        match &ev.body {
            // Prices and what providers said are facts under any policy.
            EventBody::PricingChanged(_) | EventBody::QuotaObserved(_) => self.own(ev.ts, &ev.body),
            EventBody::UsageRecorded(u) => {
                let rid = u.reservation_id.as_ref();
                if u.reservation == ReservationLink::Known
                    && rid.is_some_and(|r| self.denied_ids.contains(r))
                {
                    self.answer.usage_left_out += 1;
                    let (cost, _, _) = self.ledger.event_cost(u, ev.ts);
                    self.answer.usage_left_out_micros =
                        self.answer.usage_left_out_micros.saturating_add(cost);
                    return Ok(());
                }
                let answer = match rid {
                    Some(r) => {
                        // A commit without a hold (of an unknown reservation, or of one
                        // denied in the log, which is not asked again) was recorded with the
                        // labels and model the event has: given again, it is recorded so.
                        let given = u.reservation != ReservationLink::Known;
                        let c = CommitRequest {
                            reservation_id: r.clone(),
                            event_id: u.event_id.clone(),
                            usage: u.usage,
                            labels: given.then(|| crate::labels::client_part(&u.labels)),
                            model: given.then(|| u.model.clone()),
                            occurred_at: u.occurred_at.clone(),
                            reported_cost_usd: u.reported_cost_usd.clone(),
                            // The observations its headers gave follow in the log.
                            headers: None,
                        };
                        self.execute(Command::Commit(&c), ev.ts)
                    }
                    None => {
                        let r = RecordRequest {
                            event_id: u.event_id.clone(),
                            labels: crate::labels::client_part(&u.labels),
                            model: u.model.clone(),
                            usage: u.usage,
                            occurred_at: u.occurred_at.clone(),
                            reported_cost_usd: u.reported_cost_usd.clone(),
                            headers: None,
                        };
                        self.execute(Command::Record(&r), ev.ts)
                    }
                };
                if let Answer::Usage(a) = &answer {
                    self.peak(&a.budgets, ev.ts);
                }
            }
            EventBody::ReservationCreated(r) => {
                self.answer.reservations += 1;
                let req = ReserveRequest {
                    reservation_id: r.reservation_id.clone(),
                    labels: crate::labels::client_part(&r.labels),
                    model: Some(r.model.clone()),
                    estimate: Estimate {
                        input_tokens: r.input_tokens,
                        max_output_tokens: Some(r.max_output_tokens),
                    },
                    ttl_seconds: Some(ttl_seconds(r.expires_at, ev.ts)),
                    candidates: None,
                    require: None,
                    wait_ms: None,
                };
                match self.execute(Command::Reserve(&req), ev.ts) {
                    Answer::Decision(d) if d.decision == Decision::Deny => {
                        self.denied_ids.insert(r.reservation_id.clone());
                        self.answer.denied_total += 1;
                        self.answer.denied_hold_micros =
                            self.answer.denied_hold_micros.saturating_add(d.hold_micros);
                        if self.answer.denied.len() < WHAT_IF_MAX_DENIALS {
                            self.answer.denied.push(WhatIfDenial {
                                seq: ev.seq,
                                ts: format_ts(ev.ts),
                                reservation_id: r.reservation_id.clone(),
                                labels: (*r.labels).clone(),
                                model: r.model.clone(),
                                hold_micros: d.hold_micros,
                                reason: d.reason.code,
                                budget: d.reason.budget,
                                key: d.reason.key,
                                partition: None,
                            });
                        }
                    }
                    Answer::Decision(d) => self.peak(&d.budgets, ev.ts),
                    _ => {}
                }
            }
            EventBody::ReservationReleased(r) => {
                if !self.denied_ids.contains(&r.reservation_id) {
                    let req = ReleaseRequest {
                        reservation_id: r.reservation_id.clone(),
                    };
                    self.execute(Command::Release(&req), ev.ts);
                }
            }
            EventBody::ReservationExtended(r) => {
                if !self.denied_ids.contains(&r.reservation_id) {
                    let req = ExtendRequest {
                        reservation_id: r.reservation_id.clone(),
                        ttl_seconds: ttl_seconds(r.expires_at, ev.ts),
                    };
                    self.execute(Command::Extend(&req), ev.ts);
                }
            }
            // The policy in question stays in force; its own expiries and crossings come from
            // the requests above; a request denied in the log is not asked again.
            EventBody::PolicyApplied(_)
            | EventBody::ReservationExpired(_)
            | EventBody::ReservationDenied(_)
            | EventBody::BudgetWarned(_)
            | EventBody::BudgetExhausted(_)
            | EventBody::QuotaExhausted(_) => {}
        }
        Ok(())
    }

    /// Decide a request at `ts` as the daemon would; note the exhaustions it caused.
    fn execute(&mut self, cmd: Command<'_>, ts: TsMicros) -> Answer {
        let step = self.ledger.execute(cmd, ts);
        for (_, at, body) in &step.events {
            if let EventBody::BudgetExhausted(c) = body {
                self.answer.exhausted_total += 1;
                if self.answer.exhausted.len() >= WHAT_IF_MAX_DENIALS {
                    continue;
                }
                self.answer.exhausted.push(WhatIfExhausted {
                    budget: c.budget.clone(),
                    key: c.key.clone(),
                    at: format_ts(*at),
                    window_start: format_ts(c.window_start),
                });
            }
        }
        step.answer
    }

    /// Keep each budget's highest utilization (the first time it was reached).
    fn peak(&mut self, lines: &[BudgetReport], ts: TsMicros) {
        for b in lines {
            let higher = self
                .peaks
                .get(&b.budget)
                .is_none_or(|(u, _, _)| b.utilization > *u);
            if higher {
                self.peaks
                    .insert(b.budget.clone(), (b.utilization, b.key.clone(), ts));
            }
        }
    }

    fn finish(mut self) -> WhatIfAnswer {
        self.answer.peaks = self
            .peaks
            .into_iter()
            .map(|(budget, (utilization, key, ts))| WhatIfPeak {
                budget,
                key,
                utilization,
                at: format_ts(ts),
            })
            .collect();
        self.answer
    }
}

/// The `ttl_seconds` a request asked for, from the expiry its event got at `ts` (whole seconds,
/// within the bounds a request may ask).
fn ttl_seconds(expires_at: TsMicros, ts: TsMicros) -> u64 {
    let micros = u64::try_from(expires_at.saturating_sub(ts)).unwrap_or(0);
    micros.div_ceil(1_000_000).clamp(1, 86_400)
}
