//! Decisions: validation, idempotency, candidate evaluation, and the write commands.
//!
//! A write's answer is rendered from the events it appended (their receipts say what the
//! budget lines showed): [`Ledger::render_event`] makes the answer of a new request and, with
//! `duplicate`, the original answer of a resent one, so the two cannot differ.

use super::buckets::{crossing_window, Figures};
use super::ids::IdEntry;
use super::report::{report, utilization_ppm, Adjust, WindowEnds};
use super::{
    ref_budget, ref_slot, EndKind, Ledger, UsageDecision, DEFAULT_MAX_OUTPUT_TOKENS,
    MAX_EVENT_TOKENS, MAX_ID_BYTES, NO_SLOT, OVERFLOW_KEY,
};
use crate::labels::{glob_match, scope_key, validate_client_labels};
use crate::policy::MAX_RESERVATION_TTL_SECONDS;
use crate::pricing;
use crate::time::{format_ts, parse_ts, seconds};
use crate::window::Amounts;
pub use bursar_schemas::answer::Answer;
use bursar_schemas::event::{
    BudgetCrossing, EventBody, Receipt, ReceiptLine, ReservationCreated, ReservationDenied,
    ReservationExpired, ReservationExtended, ReservationLink, ReservationReleased, UsageRecorded,
};
use bursar_schemas::policy::ResolvedBudget;
use bursar_schemas::wire::{
    request_digest, BucketState, BudgetReport, CheckRequest, CommitRequest, Decision,
    DecisionAnswer, ErrorCode, Estimate, ExtendAnswer, ExtendRequest, Reason, RecordRequest,
    ReleaseAnswer, ReleaseRequest, ReserveRequest, SkipReason, Skipped, Usage, UsageAnswer,
    WireError,
};
use bursar_schemas::{Labels, Micros, TsMicros};

/// Most candidates a request may name.
pub const MAX_CANDIDATES: usize = 16;
/// Most required capabilities a request may name.
pub const MAX_REQUIRE: usize = 16;

/// A write command for the single writer.
#[derive(Debug, Clone, Copy)]
pub enum Command<'a> {
    /// `record`.
    Record(&'a RecordRequest),
    /// `reserve`.
    Reserve(&'a ReserveRequest),
    /// `commit`.
    Commit(&'a CommitRequest),
    /// `release`.
    Release(&'a ReleaseRequest),
    /// `extend`.
    Extend(&'a ExtendRequest),
}

impl Command<'_> {
    /// The request's idempotency digest ([`request_digest`]); the daemon computes it where the
    /// request is decoded, off the writer thread.
    pub fn digest(&self) -> [u8; 16] {
        match self {
            Command::Record(r) => request_digest("record", r),
            Command::Reserve(r) => request_digest("reserve", r),
            Command::Commit(r) => request_digest("commit", r),
            Command::Release(r) => request_digest("release", r),
            // `extend` is not idempotent by id: no digest is kept.
            Command::Extend(_) => [0; 16],
        }
    }
}

/// The outcome of one write command: its answer and the events to append (already folded into
/// the ledger, in order, receipts included).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The answer.
    pub answer: Answer,
    /// `(seq, ts, body)` of every event, in order.
    pub events: Vec<(u64, TsMicros, EventBody)>,
}

impl Step {
    fn new(answer: Answer) -> Self {
        Step {
            answer,
            events: Vec::new(),
        }
    }
}

/// A budget line of an answer before it is rendered: the budget, the bucket's scope key and
/// the figures shown.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    budget: u32,
    key: String,
    figures: Figures,
}

impl Shown {
    fn receipt_line(&self) -> ReceiptLine {
        receipt_line(self.budget, self.key == OVERFLOW_KEY, &self.figures)
    }
}

fn receipt_line(budget: u32, overflow: bool, f: &Figures) -> ReceiptLine {
    ReceiptLine {
        budget,
        overflow,
        spent_micros: f.spent.micros,
        spent_tokens: f.spent.tokens,
        spent_requests: f.spent.requests,
        held_micros: f.held.micros,
        held_tokens: f.held.tokens,
        held_requests: f.held.requests,
        live_holds: f.live_holds,
    }
}

fn figures_of(line: &ReceiptLine) -> Figures {
    Figures {
        spent: Amounts {
            micros: line.spent_micros,
            tokens: line.spent_tokens,
            requests: line.spent_requests,
        },
        held: Amounts {
            micros: line.held_micros,
            tokens: line.held_tokens,
            requests: line.held_requests,
        },
        live_holds: line.live_holds,
    }
}

fn check_id(field: &str, id: &str) -> Result<(), WireError> {
    if id.is_empty() {
        return Err(WireError::bad_field(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(WireError::bad_field(
            field,
            format!("{field} is longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(WireError::bad_field(
            field,
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

fn check_model(field: &str, model: &str) -> Result<(), WireError> {
    check_id(field, model)
}

fn check_labels(labels: &Labels) -> Result<(), WireError> {
    validate_client_labels(labels).map_err(|e| WireError::bad_field(e.field, e.message))
}

fn check_usage(u: &Usage) -> Result<(), WireError> {
    let total = u128::from(u.input_tokens)
        + u128::from(u.output_tokens)
        + u128::from(u.cached_input_tokens)
        + u128::from(u.cache_write_tokens);
    if total > u128::from(MAX_EVENT_TOKENS) {
        return Err(WireError::bad_field(
            "usage",
            format!("an event's token total must not exceed {MAX_EVENT_TOKENS}"),
        ));
    }
    if u.requests > MAX_EVENT_TOKENS {
        return Err(WireError::bad_field(
            "usage.requests",
            "usage.requests is absurdly large",
        ));
    }
    Ok(())
}

fn check_audit(occurred_at: &Option<String>, reported: &Option<String>) -> Result<(), WireError> {
    if let Some(t) = occurred_at {
        if parse_ts(t).is_none() {
            return Err(WireError::bad_field(
                "occurred_at",
                "occurred_at must be an RFC 3339 time",
            ));
        }
    }
    if let Some(c) = reported {
        crate::money::decimal_to_micros(c).map_err(|e| {
            WireError::bad_field("reported_cost_usd", format!("reported_cost_usd {e}"))
        })?;
    }
    Ok(())
}

fn check_ttl(field: &str, ttl: u64) -> Result<(), WireError> {
    if ttl == 0 || ttl > MAX_RESERVATION_TTL_SECONDS {
        return Err(WireError::bad_field(
            field,
            format!("{field} must be between 1 and {MAX_RESERVATION_TTL_SECONDS}"),
        ));
    }
    Ok(())
}

fn check_estimate(e: &Estimate) -> Result<(), WireError> {
    let total = u128::from(e.input_tokens) + u128::from(e.max_output_tokens.unwrap_or(0));
    if total > u128::from(MAX_EVENT_TOKENS) {
        return Err(WireError::bad_field(
            "estimate",
            format!("an estimate's token total must not exceed {MAX_EVENT_TOKENS}"),
        ));
    }
    Ok(())
}

/// Models to consider: `candidates` if given, else `model`.
fn candidate_list(
    model: &Option<String>,
    candidates: &Option<Vec<String>>,
) -> Result<Vec<String>, WireError> {
    let list = match (candidates, model) {
        (Some(c), _) if !c.is_empty() => c.clone(),
        (_, Some(m)) => vec![m.clone()],
        _ => {
            return Err(WireError::bad_field(
                "model",
                "give `model` or a non-empty `candidates` list",
            ))
        }
    };
    if list.len() > MAX_CANDIDATES {
        return Err(WireError::bad_field(
            "candidates",
            format!("at most {MAX_CANDIDATES} candidates"),
        ));
    }
    for (i, m) in list.iter().enumerate() {
        let field = if candidates.as_ref().is_some_and(|c| !c.is_empty()) {
            format!("candidates[{i}]")
        } else {
            "model".to_string()
        };
        check_model(&field, m)?;
    }
    Ok(list)
}

fn check_require(require: &Option<Vec<String>>) -> Result<Vec<String>, WireError> {
    let r = require.clone().unwrap_or_default();
    if r.len() > MAX_REQUIRE {
        return Err(WireError::bad_field(
            "require",
            format!("at most {MAX_REQUIRE} capabilities"),
        ));
    }
    Ok(r)
}

/// A resent request (the same id and digest: its original answer) or a conflict (the same id,
/// another request).
fn dup_or_conflict(entry: Option<&IdEntry>, digest: &[u8; 16], field: &str) -> Option<Answer> {
    let entry = entry?;
    if entry.digest == *digest {
        Some(Answer::Duplicate { seq: entry.seq })
    } else {
        Some(Answer::Error(WireError {
            code: ErrorCode::Conflict,
            message: format!("{field} was already used for a different request"),
            field: Some(field.into()),
        }))
    }
}

/// What [`Ledger::decide`] concluded: the decision and the contributing buckets with the
/// verdict of each. Rendered into an answer by [`Ledger::render_verdict`] while the ledger is
/// unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    decision: Decision,
    probe: Amounts,
    lines: Vec<VerdictLine>,
    /// `(line, scope key)` of the lines whose bucket does not exist yet.
    new_keys: Vec<(usize, String)>,
    /// Index of the first line that denies.
    deny: Option<usize>,
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
enum Why {
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
struct VerdictLine {
    budget: u32,
    /// Slot of the bucket, or `NO_SLOT` when it does not exist yet.
    slot: u32,
    why: Why,
}

/// Take the holds `adj` counts for `(budget, key)` out of `f`.
fn adjust(f: &mut Figures, adj: &Adjust, budget: usize, key: &str) {
    if let Some((amounts, holds)) = adj.get(&(budget, key.to_string())) {
        f.held = f.held - *amounts;
        f.live_holds = f.live_holds.saturating_sub(*holds);
    }
}

/// `f` with a hold of `probe` (and one concurrency slot) added.
fn with_probe(f: &Figures, probe: Amounts) -> Figures {
    Figures {
        spent: f.spent,
        held: f.held + probe,
        live_holds: f.live_holds.saturating_add(1),
    }
}

/// What a check or reservation asks for.
#[derive(Clone, Copy)]
struct Ask<'a> {
    client: &'a Labels,
    models: &'a [String],
    require: &'a [String],
    est: &'a Estimate,
    report_skips: bool,
}

/// Result of evaluating a check or reservation.
#[derive(Debug, Clone)]
struct Evaluation {
    decision: Decision,
    model: Option<String>,
    labels: Labels,
    hold: Amounts,
    input_tokens: u64,
    max_output_tokens: u64,
    budgets: Vec<Shown>,
    skipped: Vec<Skipped>,
    reason: Reason,
}

fn ok_reason(decision: Decision) -> Reason {
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
    /// The tier of `model` under the policy in force (the default tier when no pattern matches).
    pub fn tier_of(&self, model: &str) -> String {
        match &self.policy {
            Some(p) => p
                .tiers
                .patterns
                .iter()
                .find(|(pat, _)| glob_match(pat, model))
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| p.tiers.default.clone()),
            None => "default".into(),
        }
    }

    /// Client labels plus the derived `model`, `provider` and `tier`.
    pub fn derived_labels(&self, client: &Labels, model: &str, now: TsMicros) -> Labels {
        let mut labels = client.clone();
        let provider = self
            .price_at(model, now)
            .filter(|(_, at_max, _)| !at_max)
            .map(|(p, _, _)| p.provider.clone())
            .unwrap_or_else(|| "unknown".into());
        labels.insert("model".into(), model.to_string());
        labels.insert("provider".into(), provider);
        labels.insert("tier".into(), self.tier_of(model));
        labels
    }

    /// Append `body` at `now`: stamp it, fold it, and queue it for the log.
    fn emit(
        &mut self,
        now: TsMicros,
        body: EventBody,
        out: &mut Vec<(u64, TsMicros, EventBody)>,
    ) -> (u64, TsMicros) {
        self.emit_with(now, body, None, out)
    }

    /// [`Ledger::emit`]; what folding a `usage_recorded` decided goes into `decided`.
    fn emit_with(
        &mut self,
        now: TsMicros,
        body: EventBody,
        decided: Option<&mut UsageDecision>,
        out: &mut Vec<(u64, TsMicros, EventBody)>,
    ) -> (u64, TsMicros) {
        let seq = self.last_seq + 1;
        let ts = self.stamp(now);
        // `seq` follows `last_seq` by construction, so `apply` cannot fail here.
        let _ = self.apply_with(seq, ts, &body, decided);
        out.push((seq, ts, body));
        (seq, ts)
    }

    /// Expire every hold due at `now`: the reaper's events.
    pub fn reap(&mut self, now: TsMicros) -> Vec<(u64, TsMicros, EventBody)> {
        let now = self.effective_now(now);
        let mut out = Vec::new();
        self.reap_into(now, &mut out);
        out
    }

    /// Expire every hold due by the time its `reservation_expired` is stamped (`stamp(now)`,
    /// which is later than `now` when the clock lags the log), so that nothing decided next at
    /// `stamp(now)` still counts a hold that is over by then.
    fn reap_into(&mut self, now: TsMicros, out: &mut Vec<(u64, TsMicros, EventBody)>) {
        loop {
            let at_most = self.stamp(now);
            let due = match self.expiries.iter().next() {
                Some((at, rid)) if *at <= at_most => rid.clone(),
                _ => break,
            };
            self.emit(
                now,
                EventBody::ReservationExpired(ReservationExpired {
                    reservation_id: due,
                }),
                out,
            );
        }
    }

    /// Next hold expiry, for the reaper's timer.
    pub fn next_expiry(&self) -> Option<TsMicros> {
        self.expiries.iter().next().map(|(at, _)| *at)
    }

    /// The `budget_warned` / `budget_exhausted` events a decision found due.
    fn usage_crossings(&self, decided: &UsageDecision, ts: TsMicros) -> Vec<EventBody> {
        let mut due = Vec::new();
        let Some(policy) = &self.policy else {
            return due;
        };
        for line in decided
            .lines
            .iter()
            .filter(|l| l.warn_due || l.exhausted_due)
        {
            let i = line.budget();
            let (Some(b), Some(state)) = (policy.budgets.get(i), self.budgets.get(i)) else {
                continue;
            };
            let f = self.figures_at(i, line.slot, ts);
            let crossing = BudgetCrossing {
                budget: b.id.clone(),
                key: state.key(line.slot).to_string(),
                window_start: crossing_window(&b.window, ts),
                spent_micros: f.spent.micros,
                held_micros: f.held.micros,
                utilization_ppm: utilization_ppm(b, &f),
            };
            if line.warn_due {
                due.push(EventBody::BudgetWarned(crossing.clone()));
            }
            if line.exhausted_due {
                due.push(EventBody::BudgetExhausted(crossing));
            }
        }
        due
    }

    /// Evaluate a check or reservation at `now` (no state change).
    fn evaluate(&self, ask: &Ask<'_>, now: TsMicros, adj: &Adjust) -> Evaluation {
        let Ask {
            client,
            models,
            require,
            est,
            report_skips,
        } = *ask;
        let mut skipped = Vec::new();
        let mut last: Option<Evaluation> = None;
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
            let hold_micros = pricing::worst_case_cost(price, est.input_tokens, max_out);
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
            let (decision, reports, reason) = self.judge(&eval.labels, eval.hold, now, adj);
            eval.decision = decision;
            eval.budgets = reports;
            if decision == Decision::Deny {
                let detail = match (&reason.budget, &reason.key) {
                    (Some(b), Some(k)) if !k.is_empty() => format!("{b} ({k})"),
                    (Some(b), _) => b.clone(),
                    _ => reason.message.clone(),
                };
                eval.reason = reason;
                last = Some(skip(SkipReason::Budget, detail, eval, &mut skipped));
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
            reason: Reason {
                code: "no_candidate".into(),
                message: "no model to consider".into(),
                budget: None,
                key: None,
            },
        });
        eval.decision = Decision::Deny;
        eval.skipped = if report_skips { skipped } else { Vec::new() };
        eval
    }

    /// The decision of SPEC §5 on holding `probe` (plus one concurrency slot) in every budget
    /// an event with `labels` (client and derived labels) counts in, at `now`: allow, warn or
    /// deny (the most severe verdict of any budget wins), with the figures of every
    /// contributing bucket with and without the probe. Nothing is rendered: the answer's budget
    /// lines are made from the verdict only when an answer needs them
    /// ([`Ledger::render_verdict`]). `check` and `reserve` decide through it.
    pub fn decide(&self, labels: &Labels, probe: Amounts, now: TsMicros) -> Verdict {
        self.decide_adjusted(labels, probe, now, &Adjust::new())
    }

    /// [`Ledger::decide`], without the holds in `adj` (expired, not yet reaped).
    fn decide_adjusted(
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
                let mut f = slot
                    .and_then(|slot| state.at(slot))
                    .map(|bucket| bucket.figures_in(&limits.window, limits.rolling, now))
                    .unwrap_or_default();
                if !adj.is_empty() {
                    let key = new_key.as_deref().or_else(|| slot.map(|s| state.key(s)));
                    adjust(&mut f, adj, i, key.unwrap_or_default());
                }
                let after = with_probe(&f, probe);
                // Only live scopes count (SPEC §5): ended buckets not swept yet do not.
                let full = new_key.as_ref().is_some_and(|k| !k.is_empty())
                    && state.len() as u64 >= policy.max_keys_per_budget
                    && state.live_count(limits, now) as u64 >= policy.max_keys_per_budget;
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
    fn line_key<'a>(&'a self, verdict: &'a Verdict, n: usize) -> &'a str {
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
    fn line_figures(&self, verdict: &Verdict, n: usize, now: TsMicros, adj: &Adjust) -> Figures {
        let Some(line) = verdict.lines.get(n) else {
            return Figures::default();
        };
        let i = line.budget as usize;
        let mut f = if line.slot == NO_SLOT {
            Figures::default()
        } else {
            self.figures_at(i, line.slot, now)
        };
        if !adj.is_empty() {
            adjust(&mut f, adj, i, self.line_key(verdict, n));
        }
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
        let (decision, shown, reason) = self.verdict_lines(verdict, now, &Adjust::new());
        (decision, self.reports(&shown, now), reason)
    }

    /// The budget lines `shown`, rendered at `now` under the policy in force.
    fn reports(&self, shown: &[Shown], now: TsMicros) -> Vec<BudgetReport> {
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        let mut ends = WindowEnds::default();
        shown
            .iter()
            .filter_map(|l| {
                let b = policy.budgets.get(l.budget as usize)?;
                Some(report(b, l.key.clone(), &l.figures, now, &mut ends))
            })
            .collect()
    }

    /// [`Ledger::render_verdict`] of a verdict decided without the holds in `adj`, its lines
    /// not rendered yet.
    fn verdict_lines(
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
    fn judge(
        &self,
        labels: &Labels,
        probe: Amounts,
        now: TsMicros,
        adj: &Adjust,
    ) -> (Decision, Vec<Shown>, Reason) {
        let verdict = self.decide_adjusted(labels, probe, now, adj);
        self.verdict_lines(&verdict, now, adj)
    }

    /// `check`: what `reserve` would decide now. Appends nothing.
    pub fn check(&self, req: &CheckRequest, now: TsMicros) -> Answer {
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
            Err(e) => return Answer::Error(e),
        };
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
        Answer::Decision(decision_answer(eval, budgets, None, None))
    }

    fn validate_decision(
        &self,
        labels: &Labels,
        model: &Option<String>,
        candidates: &Option<Vec<String>>,
        require: &Option<Vec<String>>,
        estimate: &Estimate,
    ) -> Result<Vec<String>, WireError> {
        check_labels(labels)?;
        check_estimate(estimate)?;
        check_require(require)?;
        candidate_list(model, candidates)
    }

    /// Decide and fold one write command at `now`. Due holds are expired first.
    ///
    /// The command is decided at the `ts` its event gets (`stamp(now)`), not at `now`: when the
    /// clock lags the log (several events in one microsecond, a clock stepped back), the
    /// buckets already hold usage stamped after `now`, possibly in a window that `now` has not
    /// reached; judging at `now` would not see that usage and could overspend the window the
    /// event lands in.
    pub fn execute(&mut self, cmd: Command<'_>, now: TsMicros) -> Step {
        let digest = cmd.digest();
        self.execute_digested(cmd, &digest, now)
    }

    /// [`Ledger::execute`] with the request's digest computed already (by the daemon, where
    /// the request was decoded).
    pub fn execute_digested(&mut self, cmd: Command<'_>, digest: &[u8; 16], now: TsMicros) -> Step {
        let mut events = Vec::new();
        self.reap_into(now, &mut events);
        let now = self.stamp(now);
        let mut step = match cmd {
            Command::Record(r) => self.record(r, digest, now),
            Command::Reserve(r) => self.reserve(r, digest, now),
            Command::Commit(c) => self.commit(c, digest, now),
            Command::Release(r) => self.release(r, digest, now),
            Command::Extend(e) => self.extend(e, now),
        };
        if !events.is_empty() {
            events.append(&mut step.events);
            step.events = events;
        }
        step
    }

    /// The answer an event gave (the event at `seq`, stamped `ts`, with its receipt), rendered
    /// again: for a new request, or (`duplicate`) the original answer of a resent one. `None`
    /// for an event that answers no request by id, or one without a receipt (written by the
    /// first release).
    pub fn render_event(
        &self,
        seq: u64,
        ts: TsMicros,
        body: &EventBody,
        duplicate: bool,
    ) -> Option<Answer> {
        let receipt = match body {
            EventBody::UsageRecorded(u) => u.receipt.as_ref(),
            EventBody::ReservationCreated(r) => r.receipt.as_ref(),
            EventBody::ReservationDenied(r) => r.receipt.as_ref(),
            EventBody::ReservationReleased(_) => {
                return Some(Answer::Release(ReleaseAnswer {
                    ok: true,
                    seq,
                    duplicate,
                    req: None,
                }))
            }
            _ => return None,
        }?;
        let budgets = self.budgets_of_version(receipt.policy_version)?;
        let labels = body.labels()?;
        let mut ends = WindowEnds::default();
        let mut state = BucketState::Ok;
        let reports: Vec<BudgetReport> = receipt
            .lines
            .iter()
            .filter_map(|line| {
                let b = budgets.get(line.budget as usize)?;
                let key = if line.overflow {
                    OVERFLOW_KEY.to_string()
                } else {
                    scope_key(&b.group_by, labels).unwrap_or_default()
                };
                let r = report(b, key, &figures_of(line), ts, &mut ends);
                state = state.max(r.state);
                Some(r)
            })
            .collect();
        Some(match body {
            EventBody::UsageRecorded(u) => Answer::Usage(UsageAnswer {
                ok: true,
                seq,
                duplicate,
                cost_micros: receipt.cost_micros,
                state,
                budgets: reports,
                priced_at_max: receipt.priced_at_max,
                late: u.late,
                reservation: (u.reservation == ReservationLink::Unknown)
                    .then(|| "unknown".to_string()),
                overrun_micros: receipt.overrun_micros,
                req: None,
            }),
            EventBody::ReservationCreated(r) => {
                let decision = receipt.decision.unwrap_or(Decision::Allow);
                Answer::Decision(DecisionAnswer {
                    ok: true,
                    seq: Some(seq),
                    duplicate,
                    decision,
                    model: Some(r.model.clone()),
                    hold_micros: r.hold_micros,
                    max_output_tokens: (r.max_output_tokens > 0).then_some(r.max_output_tokens),
                    expires_at: Some(format_ts(r.expires_at)),
                    budgets: reports,
                    skipped: receipt.skipped.clone(),
                    reason: ok_reason(decision),
                    req: None,
                })
            }
            EventBody::ReservationDenied(r) => Answer::Decision(DecisionAnswer {
                ok: true,
                seq: Some(seq),
                duplicate,
                decision: Decision::Deny,
                model: (!r.model.is_empty()).then(|| r.model.clone()),
                hold_micros: r.hold_micros,
                max_output_tokens: (r.max_output_tokens > 0).then_some(r.max_output_tokens),
                expires_at: None,
                budgets: reports,
                skipped: receipt.skipped.clone(),
                reason: Reason {
                    code: r.reason.clone(),
                    message: receipt.message.clone().unwrap_or_default(),
                    budget: r.budget.clone(),
                    key: r.key.clone(),
                },
                req: None,
            }),
            _ => return None,
        })
    }

    /// Render the event at `index` of `events` (this step's own), as a new answer.
    fn answer_of(&self, events: &[(u64, TsMicros, EventBody)], index: usize) -> Answer {
        match events.get(index) {
            Some((seq, ts, body)) => {
                self.render_event(*seq, *ts, body, false)
                    .unwrap_or_else(|| {
                        Answer::Error(WireError::new(
                            ErrorCode::Internal,
                            format!("event {seq} renders no answer"),
                        ))
                    })
            }
            None => Answer::Error(WireError::new(
                ErrorCode::Internal,
                "no event to answer with",
            )),
        }
    }

    fn usage_step(
        &mut self,
        now: TsMicros,
        body: UsageRecorded,
        overrun_of: Option<Micros>,
    ) -> Step {
        let mut events = Vec::new();
        let mut decided = UsageDecision::default();
        self.emit_with(
            now,
            EventBody::UsageRecorded(body),
            Some(&mut decided),
            &mut events,
        );
        let main = events.len() - 1;
        let ts = events.get(main).map_or(now, |e| e.1);
        let receipt = Receipt {
            policy_version: self.policy_version,
            lines: self.usage_lines(&decided, ts),
            cost_micros: decided.cost_micros,
            priced_at_max: decided.priced_at_max,
            overrun_micros: overrun_of
                .map(|h| decided.cost_micros - h)
                .filter(|o| *o > 0),
            decision: None,
            skipped: Vec::new(),
            message: None,
        };
        if let Some((_, _, EventBody::UsageRecorded(u))) = events.get_mut(main) {
            u.receipt = Some(receipt);
        }
        // The fold looked at each bucket once, for the crossings and the answer both:
        // appending a crossing changes no figure.
        for body in self.usage_crossings(&decided, ts) {
            self.emit(now, body, &mut events);
        }
        Step {
            answer: self.answer_of(&events, main),
            events,
        }
    }

    fn record(&mut self, r: &RecordRequest, digest: &[u8; 16], now: TsMicros) -> Step {
        let valid = check_id("event_id", &r.event_id)
            .and_then(|_| check_labels(&r.labels))
            .and_then(|_| check_model("model", &r.model))
            .and_then(|_| check_usage(&r.usage))
            .and_then(|_| check_audit(&r.occurred_at, &r.reported_cost_usd));
        if let Err(e) = valid {
            return Step::new(Answer::Error(e));
        }
        let key = format!("e/{}", r.event_id);
        if let Some(a) = dup_or_conflict(self.ids.get(&key), digest, "event_id") {
            return Step::new(a);
        }
        let body = UsageRecorded {
            event_id: r.event_id.clone(),
            reservation_id: None,
            reservation: ReservationLink::None,
            late: false,
            labels: self.derived_labels(&r.labels, &r.model, now),
            model: r.model.clone(),
            usage: r.usage,
            occurred_at: r.occurred_at.clone(),
            reported_cost_usd: r.reported_cost_usd.clone(),
            payload_digest: *digest,
            receipt: None,
        };
        self.usage_step(now, body, None)
    }

    fn commit(&mut self, c: &CommitRequest, digest: &[u8; 16], now: TsMicros) -> Step {
        let valid = check_id("reservation_id", &c.reservation_id)
            .and_then(|_| check_id("event_id", &c.event_id))
            .and_then(|_| c.labels.as_ref().map_or(Ok(()), check_labels))
            .and_then(|_| c.model.as_ref().map_or(Ok(()), |m| check_model("model", m)))
            .and_then(|_| check_usage(&c.usage))
            .and_then(|_| check_audit(&c.occurred_at, &c.reported_cost_usd));
        if let Err(e) = valid {
            return Step::new(Answer::Error(e));
        }
        let key = format!("e/{}", c.event_id);
        if let Some(a) = dup_or_conflict(self.ids.get(&key), digest, "event_id") {
            return Step::new(a);
        }
        let rid = &c.reservation_id;
        let (labels, model, link, late, hold) = if let Some(h) = self.holds.get(rid) {
            (
                h.labels.clone(),
                h.model.clone(),
                ReservationLink::Known,
                false,
                Some(h.amounts.micros),
            )
        } else if let Some(e) = self.ended.get(rid) {
            if let EndKind::Committed(by) = &e.how {
                return Step::new(Answer::Error(WireError {
                    code: ErrorCode::Conflict,
                    message: format!("reservation {rid:?} was already committed by event {by:?}"),
                    field: Some("reservation_id".into()),
                }));
            }
            (
                e.labels.clone(),
                e.model.clone(),
                ReservationLink::Known,
                true,
                Some(e.hold_micros),
            )
        } else {
            let model = c.model.clone().unwrap_or_else(|| "unknown".into());
            let client = c.labels.clone().unwrap_or_default();
            (
                self.derived_labels(&client, &model, now),
                model,
                ReservationLink::Unknown,
                false,
                None,
            )
        };
        let body = UsageRecorded {
            event_id: c.event_id.clone(),
            reservation_id: Some(rid.clone()),
            reservation: link,
            late,
            labels,
            model,
            usage: c.usage,
            occurred_at: c.occurred_at.clone(),
            reported_cost_usd: c.reported_cost_usd.clone(),
            payload_digest: *digest,
            receipt: None,
        };
        self.usage_step(now, body, hold)
    }

    fn reserve(&mut self, r: &ReserveRequest, digest: &[u8; 16], now: TsMicros) -> Step {
        let ttl = r.ttl_seconds.unwrap_or_else(|| {
            self.policy
                .as_ref()
                .map_or(crate::policy::DEFAULT_RESERVATION_TTL_SECONDS, |p| {
                    p.reservation_ttl_seconds
                })
        });
        let models = check_id("reservation_id", &r.reservation_id)
            .and_then(|_| check_ttl("ttl_seconds", ttl))
            .and_then(|_| {
                self.validate_decision(&r.labels, &r.model, &r.candidates, &r.require, &r.estimate)
            });
        let models = match models {
            Ok(m) => m,
            Err(e) => return Step::new(Answer::Error(e)),
        };
        let key = format!("r/{}", r.reservation_id);
        if let Some(a) = dup_or_conflict(self.ids.get(&key), digest, "reservation_id") {
            return Step::new(a);
        }
        if self.holds.contains_key(&r.reservation_id) || self.ended.contains_key(&r.reservation_id)
        {
            return Step::new(Answer::Error(WireError {
                code: ErrorCode::Conflict,
                message: format!("reservation_id {:?} is already in use", r.reservation_id),
                field: Some("reservation_id".into()),
            }));
        }
        let require = r.require.clone().unwrap_or_default();
        let mut eval = self.evaluate(
            &Ask {
                client: &r.labels,
                models: &models,
                require: &require,
                est: &r.estimate,
                report_skips: r.candidates.is_some(),
            },
            now,
            &Adjust::new(),
        );
        let mut events = Vec::new();
        let receipt = Receipt {
            policy_version: self.policy_version,
            lines: eval.budgets.iter().map(Shown::receipt_line).collect(),
            cost_micros: 0,
            priced_at_max: false,
            overrun_micros: None,
            decision: Some(eval.decision),
            skipped: std::mem::take(&mut eval.skipped),
            message: (eval.decision == Decision::Deny).then(|| eval.reason.message.clone()),
        };
        if eval.decision == Decision::Deny {
            let body = EventBody::ReservationDenied(ReservationDenied {
                reservation_id: r.reservation_id.clone(),
                labels: std::mem::take(&mut eval.labels),
                model: eval.model.clone().unwrap_or_default(),
                hold_micros: eval.hold.micros,
                reason: eval.reason.code.clone(),
                budget: eval.reason.budget.clone(),
                key: eval.reason.key.clone(),
                payload_digest: *digest,
                max_output_tokens: eval.max_output_tokens,
                receipt: Some(receipt),
            });
            self.emit(now, body, &mut events);
        } else {
            let expires_at = self.stamp(now).saturating_add(seconds(ttl));
            let body = EventBody::ReservationCreated(ReservationCreated {
                reservation_id: r.reservation_id.clone(),
                labels: std::mem::take(&mut eval.labels),
                model: eval.model.clone().unwrap_or_default(),
                input_tokens: eval.input_tokens,
                max_output_tokens: eval.max_output_tokens,
                hold_micros: eval.hold.micros,
                expires_at,
                payload_digest: *digest,
                receipt: Some(receipt),
            });
            self.emit(now, body, &mut events);
            // The hold's buckets judged as a usage event's are: the crossings it caused.
            let due = match self.holds.get(&r.reservation_id) {
                Some(h) => {
                    let held = self.decide_buckets(&self.slots_of(&h.buckets), self.last_ts);
                    self.usage_crossings(&held, self.last_ts)
                }
                None => Vec::new(),
            };
            for body in due {
                self.emit(now, body, &mut events);
            }
        }
        Step {
            answer: self.answer_of(&events, 0),
            events,
        }
    }

    fn release(&mut self, r: &ReleaseRequest, digest: &[u8; 16], now: TsMicros) -> Step {
        if let Err(e) = check_id("reservation_id", &r.reservation_id) {
            return Step::new(Answer::Error(e));
        }
        let key = format!("x/{}", r.reservation_id);
        if let Some(a) = dup_or_conflict(self.ids.get(&key), digest, "reservation_id") {
            return Step::new(a);
        }
        if !self.holds.contains_key(&r.reservation_id) {
            return Step::new(Answer::Error(self.not_live(&r.reservation_id)));
        }
        let mut events = Vec::new();
        let body = EventBody::ReservationReleased(ReservationReleased {
            reservation_id: r.reservation_id.clone(),
            reason: "cancelled".into(),
            payload_digest: *digest,
        });
        self.emit(now, body, &mut events);
        Step {
            answer: self.answer_of(&events, 0),
            events,
        }
    }

    fn extend(&mut self, e: &ExtendRequest, now: TsMicros) -> Step {
        let valid = check_id("reservation_id", &e.reservation_id)
            .and_then(|_| check_ttl("ttl_seconds", e.ttl_seconds));
        if let Err(err) = valid {
            return Step::new(Answer::Error(err));
        }
        if !self.holds.contains_key(&e.reservation_id) {
            return Step::new(Answer::Error(self.not_live(&e.reservation_id)));
        }
        let expires_at = self.stamp(now).saturating_add(seconds(e.ttl_seconds));
        let mut events = Vec::new();
        let body = EventBody::ReservationExtended(ReservationExtended {
            reservation_id: e.reservation_id.clone(),
            expires_at,
        });
        let (seq, _) = self.emit(now, body, &mut events);
        Step {
            answer: Answer::Extend(ExtendAnswer {
                ok: true,
                seq,
                expires_at: format_ts(expires_at),
                req: None,
            }),
            events,
        }
    }

    fn not_live(&self, rid: &str) -> WireError {
        let message = match self.ended.get(rid).map(|e| &e.how) {
            Some(EndKind::Committed(by)) => {
                format!("reservation {rid:?} was already committed by event {by:?}")
            }
            Some(EndKind::Released) => format!("reservation {rid:?} was already released"),
            Some(EndKind::Expired) => format!("reservation {rid:?} has expired"),
            None => format!("no live reservation {rid:?}"),
        };
        WireError {
            code: ErrorCode::NotFound,
            message,
            field: Some("reservation_id".into()),
        }
    }
}

/// First limit that `figures` exceed, described.
fn first_over(b: &bursar_schemas::policy::ResolvedBudget, f: &Figures) -> Option<String> {
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

fn decision_answer(
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
    }
}

/// The budgets of policy `version`, for rendering a receipt.
impl Ledger {
    fn budgets_of_version(&self, version: u64) -> Option<&[ResolvedBudget]> {
        if version == self.policy_version {
            return self.policy.as_ref().map(|p| &p.budgets[..]);
        }
        self.old_budgets.get(&version).map(|b| &b[..])
    }

    /// The receipt lines of a usage event's buckets at `ts` (the figures its answer shows).
    fn usage_lines(&self, decided: &UsageDecision, ts: TsMicros) -> Vec<ReceiptLine> {
        decided
            .lines
            .iter()
            .map(|line| {
                let i = line.budget();
                let f = self.figures_at(i, line.slot, ts);
                let overflow = self
                    .budgets
                    .get(i)
                    .is_some_and(|s| s.key(line.slot) == OVERFLOW_KEY);
                receipt_line(line.budget, overflow, &f)
            })
            .collect()
    }
}
