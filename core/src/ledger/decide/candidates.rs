//! Which model a `check` or `reserve` settles on: prices, required capabilities, the worst
//! case capped at the model's maximum output, tier caps, then the budgets' verdict; and
//! `check`, which decides without appending.

use super::super::quotas::Need;
use super::super::report::Adjust;
use super::super::{Ledger, DEFAULT_MAX_OUTPUT_TOKENS};
use super::receipts::Shown;
use crate::pricing;
use crate::time::format_ts;
use crate::window::Amounts;
use bursar_schemas::answer::Answer;
use bursar_schemas::event::SUBSCRIPTION_LABEL;
use bursar_schemas::wire::{
    BudgetReport, CheckRequest, Decision, DecisionAnswer, Estimate, Reason, SkipReason, Skipped,
};
use bursar_schemas::{Labels, TsMicros};

/// What a check or reservation asks for.
#[derive(Clone, Copy)]
pub(super) struct Ask<'a> {
    pub(super) client: &'a Labels,
    pub(super) models: &'a [String],
    pub(super) require: &'a [String],
    pub(super) est: &'a Estimate,
    pub(super) report_skips: bool,
}

/// Result of evaluating a check or reservation.
#[derive(Debug, Clone)]
pub(super) struct Evaluation {
    pub(super) decision: Decision,
    pub(super) model: Option<String>,
    pub(super) labels: Labels,
    pub(super) hold: Amounts,
    pub(super) input_tokens: u64,
    pub(super) max_output_tokens: u64,
    pub(super) budgets: Vec<Shown>,
    pub(super) skipped: Vec<Skipped>,
    pub(super) reason: Reason,
    /// A deny some candidate of which only limits that free up by themselves stand in the way
    /// of (SPEC §10 `wait_ms`).
    pub(super) waitable: bool,
}

pub(super) fn ok_reason(decision: Decision) -> Reason {
    Reason {
        code: "ok".into(),
        message: if decision == Decision::Warn {
            "allowed, near a limit".into()
        } else {
            "allowed".into()
        },
        budget: None,
        key: None,
    }
}

impl Ledger {
    /// Evaluate a check or reservation at `now` (no state change).
    pub(super) fn evaluate(&self, ask: &Ask<'_>, now: TsMicros, adj: &Adjust) -> Evaluation {
        let Ask {
            client,
            models,
            require,
            est,
            report_skips,
        } = *ask;
        let mut skipped = Vec::new();
        let mut last: Option<Evaluation> = None;
        let mut waitable = false;
        for model in models {
            let labels = self.derived_labels(client, model, now);
            let skip = |reason: SkipReason,
                        detail: String,
                        eval: Evaluation,
                        skipped: &mut Vec<Skipped>| {
                skipped.push(Skipped {
                    model: model.clone(),
                    reason,
                    detail,
                });
                eval
            };
            let mut eval = Evaluation {
                decision: Decision::Deny,
                model: Some(model.clone()),
                labels,
                hold: Amounts::default(),
                input_tokens: est.input_tokens,
                max_output_tokens: 0,
                budgets: Vec::new(),
                skipped: Vec::new(),
                reason: ok_reason(Decision::Allow),
                waitable: false,
            };
            let Some((price, at_max, _)) = self.price_at(model, now) else {
                eval.reason = Reason {
                    code: "unknown_model".into(),
                    message: "no price table is in force".into(),
                    budget: None,
                    key: None,
                };
                last = Some(skip(
                    SkipReason::UnknownModel,
                    "no price table".into(),
                    eval,
                    &mut skipped,
                ));
                continue;
            };
            if at_max && self.deny_unknown_models() {
                eval.reason = Reason {
                    code: "unknown_model".into(),
                    message: format!("model {model:?} has no price and unknown models are denied"),
                    budget: None,
                    key: None,
                };
                last = Some(skip(
                    SkipReason::UnknownModel,
                    format!("no price for {model}"),
                    eval,
                    &mut skipped,
                ));
                continue;
            }
            if let Some(missing) = require.iter().find(|c| !price.capabilities.contains(c)) {
                eval.reason = Reason {
                    code: "missing_capability".into(),
                    message: format!("model {model:?} lacks capability {missing:?}"),
                    budget: None,
                    key: None,
                };
                last = Some(skip(
                    SkipReason::MissingCapability,
                    missing.clone(),
                    eval,
                    &mut skipped,
                ));
                continue;
            }
            let max_out = match (est.max_output_tokens, price.max_output_tokens) {
                (Some(e), Some(m)) => e.min(m),
                (Some(e), None) => e,
                (None, Some(m)) => m,
                (None, None) => DEFAULT_MAX_OUTPUT_TOKENS,
            };
            // A call a subscription carries costs nothing per call (SPEC §10): it holds its
            // tokens and a request, no money.
            let hold_micros = if eval.labels.contains_key(SUBSCRIPTION_LABEL) {
                0
            } else {
                pricing::worst_case_cost(price, est.input_tokens, max_out)
            };
            eval.max_output_tokens = max_out;
            eval.hold = Amounts {
                micros: hold_micros,
                tokens: est.input_tokens.saturating_add(max_out),
                requests: 1,
            };
            let tier = self.tier_of(model);
            if let Some(cap) = self.policy.as_ref().and_then(|p| p.tiers.caps.get(&tier)) {
                let over_cost = cap.max_call_micros.filter(|c| hold_micros > *c).map(|c| {
                    format!(
                        "worst case {} USD exceeds tier {tier:?} max_call_usd {}",
                        crate::money::format_usd(hold_micros),
                        crate::money::format_usd(c)
                    )
                });
                let over_out = cap.max_call_output_tokens.filter(|c| max_out > *c).map(|c| {
                    format!("max_output_tokens {max_out} exceeds tier {tier:?} max_call_output_tokens {c}")
                });
                if let Some(detail) = over_cost.or(over_out) {
                    eval.reason = Reason {
                        code: "tier_cap".into(),
                        message: detail.clone(),
                        budget: None,
                        key: None,
                    };
                    last = Some(skip(SkipReason::TierCap, detail, eval, &mut skipped));
                    continue;
                }
            }
            // A provider's observed rate limit (SPEC §10): skipped with reason `quota`.
            let need = Need::of_hold(est.input_tokens, max_out);
            if let Some(b) = self.quota_block(&eval.labels, &need, now, adj) {
                let detail = format!(
                    "quota {}: {} of {} {} left until {}",
                    b.quota,
                    b.left,
                    b.need,
                    b.limit,
                    format_ts(b.reset_at)
                );
                eval.reason = Reason {
                    code: "quota".into(),
                    message: format!(
                        "the provider's {} limit of quota {:?} has {} left until {} (this call needs {})",
                        b.limit,
                        b.quota,
                        b.left,
                        format_ts(b.reset_at),
                        b.need
                    ),
                    budget: None,
                    key: None,
                };
                // An observation binds until its reset: waiting may see it through, unless the
                // call needs more than the whole limit.
                waitable |= b.of.is_none_or(|of| b.need <= of);
                last = Some(skip(SkipReason::Quota, detail, eval, &mut skipped));
                continue;
            }
            let (decision, reports, reason, frees) = self.judge(&eval.labels, eval.hold, now, adj);
            waitable |= frees;
            eval.decision = decision;
            eval.budgets = reports;
            if decision == Decision::Deny {
                let detail = match (&reason.budget, &reason.key) {
                    (Some(b), Some(k)) if !k.is_empty() => format!("{b} ({k})"),
                    (Some(b), _) => b.clone(),
                    _ => reason.message.clone(),
                };
                let why = if reason.code == "quota" {
                    SkipReason::Quota
                } else {
                    SkipReason::Budget
                };
                eval.reason = reason;
                last = Some(skip(why, detail, eval, &mut skipped));
                continue;
            }
            eval.reason = ok_reason(decision);
            eval.skipped = if report_skips { skipped } else { Vec::new() };
            return eval;
        }
        let mut eval = last.unwrap_or(Evaluation {
            decision: Decision::Deny,
            model: None,
            labels: client.clone(),
            hold: Amounts::default(),
            input_tokens: est.input_tokens,
            max_output_tokens: 0,
            budgets: Vec::new(),
            skipped: Vec::new(),
            waitable: false,
            reason: Reason {
                code: "no_candidate".into(),
                message: "no model to consider".into(),
                budget: None,
                key: None,
            },
        });
        eval.decision = Decision::Deny;
        eval.skipped = if report_skips { skipped } else { Vec::new() };
        eval.waitable = waitable;
        eval
    }

    /// `check`: what `reserve` would decide now. Appends nothing.
    pub fn check(&self, req: &CheckRequest, now: TsMicros) -> Answer {
        self.check_waitable(req, now).0
    }

    /// [`Ledger::check`], and whether its deny is one that waiting may see through (only
    /// limits that free up by themselves stand in the way: SPEC §10 `wait_ms`).
    pub fn check_waitable(&self, req: &CheckRequest, now: TsMicros) -> (Answer, bool) {
        // Judged when a `reserve` sent now would be (see `execute`).
        let now = self.stamp(now);
        let models = match self.validate_decision(
            &req.labels,
            &req.model,
            &req.candidates,
            &req.require,
            &req.estimate,
        ) {
            Ok(m) => m,
            Err(e) => return (Answer::Error(e), false),
        };
        if let Err(e) = super::validate::check_wait(req.wait_ms) {
            return (Answer::Error(e), false);
        }
        let require = req.require.clone().unwrap_or_default();
        let adj = self.expired_adjust(now);
        let eval = self.evaluate(
            &Ask {
                client: &req.labels,
                models: &models,
                require: &require,
                est: &req.estimate,
                report_skips: req.candidates.is_some(),
            },
            now,
            &adj,
        );
        let budgets = self.reports(&eval.budgets, now);
        let waitable = eval.decision == Decision::Deny && eval.waitable;
        let mut answer = decision_answer(eval, budgets, None, None);
        // An answer says `waited_ms` whenever its request had `wait_ms` (docs/protocol.md): 0
        // here, which a daemon that waited for the call to fit replaces.
        answer.waited_ms = req.wait_ms.map(|_| 0);
        (Answer::Decision(answer), waitable)
    }
}

pub(super) fn decision_answer(
    eval: Evaluation,
    budgets: Vec<BudgetReport>,
    seq: Option<u64>,
    expires: Option<TsMicros>,
) -> DecisionAnswer {
    DecisionAnswer {
        ok: true,
        seq,
        duplicate: false,
        decision: eval.decision,
        model: eval.model,
        hold_micros: eval.hold.micros,
        max_output_tokens: (eval.max_output_tokens > 0).then_some(eval.max_output_tokens),
        expires_at: expires.map(format_ts),
        budgets,
        skipped: eval.skipped,
        reason: eval.reason,
        req: None,
        waited_ms: None,
        lag_ms: None,
    }
}
