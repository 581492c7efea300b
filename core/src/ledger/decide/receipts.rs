//! Idempotency and answers: a resent request is a duplicate (its original answer is that of
//! its event) or a conflict; a write's answer is rendered from the event it appended and the
//! event's receipt, the same way for a new request and for a duplicate.

use super::super::buckets::Figures;
use super::super::buckets::Limits;
use super::super::ids::IdEntry;
use super::super::report::{bucket_state, report, WindowEnds};
use super::super::{Ledger, UsageDecision, OVERFLOW_KEY};
use super::candidates::ok_reason;
use crate::labels::scope_key_into;
use crate::time::format_ts;
use crate::window::Amounts;
use bursar_schemas::answer::Answer;
use bursar_schemas::event::{EventBody, EventLabels, Receipt, ReceiptLine, ReservationLink};
use bursar_schemas::policy::ResolvedBudget;
use bursar_schemas::wire::{
    BucketState, BudgetReport, Decision, DecisionAnswer, ErrorCode, Reason, ReleaseAnswer,
    UsageAnswer, WireError,
};
use bursar_schemas::Labels;
use bursar_schemas::TsMicros;

/// A budget line of an answer before it is rendered: the budget, the bucket's scope key and
/// the figures shown.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Shown {
    pub(super) budget: u32,
    pub(super) key: String,
    pub(super) figures: Figures,
}

impl Shown {
    pub(super) fn receipt_line(&self) -> ReceiptLine {
        receipt_line(self.budget, self.key == OVERFLOW_KEY, &self.figures)
    }
}

pub(super) fn receipt_line(budget: u32, overflow: bool, f: &Figures) -> ReceiptLine {
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

pub(super) fn figures_of(line: &ReceiptLine) -> Figures {
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

/// A resent request (the same id and digest: its original answer) or a conflict (the same id,
/// another request).
pub(super) fn dup_or_conflict(
    entry: Option<&IdEntry>,
    digest: &[u8; 16],
    field: &str,
) -> Option<Answer> {
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

/// The receipt of an event that answers a request by id with budget lines.
fn receipt_of(body: &EventBody) -> Option<&Receipt> {
    match body {
        EventBody::UsageRecorded(u) => u.receipt.as_ref(),
        EventBody::ReservationCreated(r) => r.receipt.as_ref(),
        EventBody::ReservationDenied(r) => r.receipt.as_ref(),
        _ => None,
    }
}

/// The scope key of each line of `receipt` (of a budget of `budgets`), from the event's labels,
/// one after the other in one string, each ended by `\n` (which no key holds: control
/// characters are encoded): the connection reads one string from the writer's cache instead
/// of one per line, and copies each key into its answer ([`Renderer::keyed`]).
fn line_keys(budgets: &[ResolvedBudget], receipt: &Receipt, labels: &Labels) -> String {
    let mut keys = String::with_capacity(32 * receipt.lines.len());
    for line in &receipt.lines {
        match budgets.get(line.budget as usize) {
            Some(_) if line.overflow => keys.push_str(OVERFLOW_KEY),
            Some(b) => {
                scope_key_into(&mut keys, &b.group_by, labels);
            }
            None => {}
        }
        keys.push('\n');
    }
    keys
}

/// Render the answer of an event from its receipt, with the budgets of the receipt's policy
/// version (`budgets_of`).
fn render_with<'a>(
    budgets_of: impl FnOnce(u64) -> Option<Budgets<'a>>,
    seq: u64,
    ts: TsMicros,
    body: &EventBody,
    duplicate: bool,
) -> Option<Answer> {
    let keys = match receipt_of(body) {
        Some(receipt) => {
            let budgets = budgets_of(receipt.policy_version)?;
            let keys = line_keys(budgets.budgets, receipt, body.labels()?);
            Some((budgets, keys))
        }
        None => None,
    };
    render_keyed(keys, seq, ts, body, duplicate)
}

/// The budgets of the policy version an answer was decided under, and their compiled limits
/// where the caller keeps them (a [`Renderer`], or the ledger for the policy in force; an
/// older version's are compiled line by line as they are shown).
struct Budgets<'a> {
    budgets: &'a [ResolvedBudget],
    limits: Option<&'a [Limits]>,
}

impl Budgets<'_> {
    /// The state of budget `i`'s bucket with figures `f`.
    fn state(&self, i: usize, f: &Figures) -> Option<BucketState> {
        let b = self.budgets.get(i)?;
        Some(match self.limits.and_then(|l| l.get(i)) {
            Some(limits) => limits.state(f),
            None => bucket_state(b, f),
        })
    }
}

/// [`render_with`] with the budgets of the receipt's policy version and each line's scope key
/// found already (`None` for an event without a receipt).
fn render_keyed(
    keys: Option<(Budgets<'_>, String)>,
    seq: u64,
    ts: TsMicros,
    body: &EventBody,
    duplicate: bool,
) -> Option<Answer> {
    if let EventBody::ReservationReleased(_) = body {
        return Some(Answer::Release(ReleaseAnswer {
            ok: true,
            seq,
            duplicate,
            req: None,
        }));
    }
    let receipt = receipt_of(body)?;
    let (budgets, keys) = keys?;
    let mut ends = WindowEnds::default();
    let mut state = BucketState::Ok;
    let reports: Vec<BudgetReport> = receipt
        .lines
        .iter()
        .zip(keys.split_terminator('\n'))
        .filter_map(|(line, key)| {
            let i = line.budget as usize;
            let (b, f) = (budgets.budgets.get(i)?, figures_of(line));
            let r = report(b, budgets.state(i, &f)?, key.to_string(), &f, ts, &mut ends);
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
            reservation: match u.reservation {
                ReservationLink::Unknown => Some("unknown".to_string()),
                ReservationLink::Denied => Some("denied".to_string()),
                ReservationLink::None | ReservationLink::Known => None,
            },
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
                waited_ms: None,
                lag_ms: None,
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
            waited_ms: None,
            lag_ms: None,
        }),
        _ => return None,
    })
}

/// What rendering a new answer needs: the budgets of the policy in force. The writer hands one
/// (an `Arc`, shared until the policy changes) with each event it answers, and the connection
/// renders the answer after every lock is released.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Renderer {
    version: u64,
    budgets: Vec<ResolvedBudget>,
    /// The budgets' limits, compiled once (each answer's lines would compile them again): the
    /// ledger's own, shared.
    limits: std::sync::Arc<[Limits]>,
}

/// An event that answers a request, made ready by [`Renderer::keyed`] to be rendered on
/// another thread: each budget line's scope key is taken from its labels, and the labels are
/// dropped on the thread that made them.
#[derive(Debug)]
pub struct Keyed {
    seq: u64,
    ts: TsMicros,
    body: EventBody,
    keys: Option<String>,
}

impl Keyed {
    /// The event's seq.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Renderer {
    /// The renderer of `budgets` at policy `version`, with their compiled `limits`.
    pub(in crate::ledger) fn new(
        version: u64,
        budgets: Vec<ResolvedBudget>,
        limits: std::sync::Arc<[Limits]>,
    ) -> Self {
        Renderer {
            version,
            budgets,
            limits,
        }
    }

    /// Take what the answer of the event at `seq` (stamped `ts`) needs of its labels, each
    /// budget line's scope key, and drop the labels here: the writer, whose cache holds them,
    /// finds the keys for less than the connection would, and frees the labels where they
    /// were made. At depth 1 the connection threads, not the writer, bound the rate
    /// (measured: `bursar-bench record`, 64 clients, 2.81× → 3.17× Redis over four rounds
    /// with the limits compiled once; benches/README.md, "Answers keyed on the writer").
    pub fn keyed(&self, seq: u64, ts: TsMicros, mut body: EventBody) -> Keyed {
        let keys = match (receipt_of(&body), body.labels()) {
            (Some(receipt), Some(labels)) if receipt.policy_version == self.version => {
                Some(line_keys(&self.budgets, receipt, labels))
            }
            _ => None,
        };
        if let Some(labels) = body.labels_mut() {
            *labels = EventLabels::default();
        }
        Keyed {
            seq,
            ts,
            body,
            keys,
        }
    }

    /// The new answer of a [`Renderer::keyed`] event decided under this renderer's policy
    /// (`None` for an event that answers nothing, or one of another policy version).
    pub fn render_keyed(&self, keyed: Keyed) -> Option<Answer> {
        let Keyed {
            seq,
            ts,
            body,
            keys,
        } = keyed;
        let budgets = Budgets {
            budgets: &self.budgets,
            limits: Some(&self.limits),
        };
        render_keyed(keys.map(|k| (budgets, k)), seq, ts, &body, false)
    }
}

impl Ledger {
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
        let budgets_of = |v| {
            Some(Budgets {
                budgets: self.budgets_of_version(v)?,
                limits: (v == self.policy_version).then_some(&self.limits[..]),
            })
        };
        render_with(budgets_of, seq, ts, body, duplicate)
    }

    /// The renderer of answers decided now.
    pub fn renderer(&self) -> std::sync::Arc<Renderer> {
        self.renderer.clone()
    }

    /// Render the event at `index` of `events` (this step's own), as a new answer.
    pub(super) fn answer_of(&self, events: &[(u64, TsMicros, EventBody)], index: usize) -> Answer {
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
}

/// The budgets of policy `version`, for rendering a receipt.
impl Ledger {
    pub(super) fn budgets_of_version(&self, version: u64) -> Option<&[ResolvedBudget]> {
        if version == self.policy_version {
            return self.policy.as_ref().map(|p| &p.budgets[..]);
        }
        self.old_budgets.get(&version).map(|b| &b[..])
    }

    /// The receipt lines of a usage event's buckets at `ts` (the figures its answer shows).
    pub(super) fn usage_lines(&self, decided: &UsageDecision, ts: TsMicros) -> Vec<ReceiptLine> {
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
