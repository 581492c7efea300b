//! Decisions: the write commands and the events they append.
//!
//! - [`validate`]: what a request must be before anything is decided;
//! - [`receipts`]: idempotency (a duplicate or a conflict) and the answers rendered from events
//!   and their receipts: [`Ledger::render_event`] makes the original answer of a resent one
//!   (`duplicate`), and [`Renderer::keyed`] with [`Renderer::render_keyed`] the answer of a new
//!   request (its scope keys taken where it was decided, the rest rendered by the connection);
//!   both go through the same two steps, so the two cannot differ;
//! - [`candidates`]: which model a `check` or `reserve` settles on, and `check` itself;
//! - [`verdict`]: SPEC §5 on the buckets of one candidate ([`Ledger::decide`]);
//! - [`observe`]: what providers say about their rate limits (`observe`, and the headers a
//!   `commit` or `record` brings);
//! - here: the commands (`record`, `reserve`, `commit`, `release`, `extend`), the reaper and
//!   the crossings they append.

mod candidates;
mod observe;
mod receipts;
mod validate;
mod verdict;

use bursar_schemas::event::SUBSCRIPTION_LABEL;
use candidates::Ask;
use receipts::{dup_or_conflict, Shown};
pub use receipts::{Keyed, Renderer};
use validate::*;
pub use verdict::Verdict;

use super::buckets::crossing_window;
use super::report::{utilization_ppm, Adjust};
use super::{EndKind, IdKind, Ledger, UsageDecision};
use crate::time::{format_ts, seconds};
pub use bursar_schemas::answer::Answer;
use bursar_schemas::event::{
    BudgetCrossing, EventBody, Receipt, ReservationCreated, ReservationDenied, ReservationExpired,
    ReservationExtended, ReservationLink, ReservationReleased, UsageRecorded,
};
use bursar_schemas::wire::{
    request_digest, CommitRequest, Decision, ErrorCode, ExtendAnswer, ExtendRequest,
    ObserveRequest, RecordRequest, ReleaseRequest, ReserveRequest, WireError,
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
    /// `reserve`, decided now (its `wait_ms` aside).
    Reserve(&'a ReserveRequest),
    /// `reserve` that may wait in line (SPEC §10 `wait_ms`): a deny that only limits freeing up
    /// by themselves stand behind is [`Reply::Wait`], and appends nothing. The daemon asks
    /// again as capacity frees, and at the deadline as [`Command::Reserve`].
    ReserveOrWait(&'a ReserveRequest),
    /// `commit`.
    Commit(&'a CommitRequest),
    /// `release`.
    Release(&'a ReleaseRequest),
    /// `extend`.
    Extend(&'a ExtendRequest),
    /// `observe`.
    Observe(&'a ObserveRequest),
}

impl Command<'_> {
    /// The request's idempotency digest ([`request_digest`]); the daemon computes it where the
    /// request is decoded, off the writer thread.
    pub fn digest(&self) -> [u8; 16] {
        match self {
            Command::Record(r) => request_digest("record", r),
            Command::Reserve(r) | Command::ReserveOrWait(r) => reserve_digest(r),
            Command::Commit(r) => request_digest("commit", r),
            Command::Release(r) => request_digest("release", r),
            // `extend` and `observe` are not idempotent by id: no digest is kept.
            Command::Extend(_) | Command::Observe(_) => [0; 16],
        }
    }
}

/// The digest of a `reserve`, without its `wait_ms`: how long a client waits is no part of what
/// it asks for (a resend with another `wait_ms` is the same request).
fn reserve_digest(r: &ReserveRequest) -> [u8; 16] {
    if r.wait_ms.is_none() {
        return request_digest("reserve", r);
    }
    let plain = ReserveRequest {
        wait_ms: None,
        ..r.clone()
    };
    request_digest("reserve", &plain)
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

/// What a write answers, before it is rendered.
// Not boxed: a `Reply` lives on the stack for one command, and boxing the answer would allocate
// for every error and duplicate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// An answer that needs no event (an error, a duplicate, `extend`'s).
    Ready(Answer),
    /// The answer rendered from the event at this index of the step's events (and its
    /// receipt), by [`Renderer::keyed`](super::Renderer::keyed) and
    /// [`Renderer::render_keyed`](super::Renderer::render_keyed).
    Event(usize),
    /// No answer yet: a [`Command::ReserveOrWait`] waits in line (nothing of it was appended).
    Wait,
}

/// [`Step`] before its answer is rendered: what the writer takes, so that rendering (the
/// budget lines' reports: ~16 % of the writer's time under `bursar-bench record`) happens on
/// the connection's side, after every lock is released.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The answer, or which event renders it.
    pub reply: Reply,
    /// `(seq, ts, body)` of every event, in order.
    pub events: Vec<(u64, TsMicros, EventBody)>,
}

impl Decided {
    fn new(answer: Answer) -> Self {
        Decided {
            reply: Reply::Ready(answer),
            events: Vec::new(),
        }
    }
}

impl Ledger {
    /// The tier of `model` under the policy in force (the default tier when no pattern matches).
    pub fn tier_of(&self, model: &str) -> String {
        match &self.policy {
            Some(p) => crate::tiers::tier_of(&p.tiers, model).to_string(),
            None => crate::policy::DEFAULT_TIER.into(),
        }
    }

    /// Client labels plus the derived `model`, `provider` and `tier`, and `subscription` when a
    /// subscription carries the call.
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
        if let Some(sub) = self.subscription_of(&labels) {
            labels.insert(SUBSCRIPTION_LABEL.into(), sub.to_string());
        }
        labels
    }

    /// The subscription that carries a call with these (derived) labels: the first
    /// `[[subscription]]` of the policy in force whose `match` holds (SPEC §10).
    pub fn subscription_of(&self, labels: &Labels) -> Option<&str> {
        self.policy
            .as_ref()?
            .subscriptions
            .iter()
            .find(|s| crate::labels::selector_matches(&s.match_labels, labels))
            .map(|s| s.id.as_str())
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
        let ts = self.stamp(now);
        self.fold_next(ts, &body, decided);
        let seq = self.last_seq;
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
        let d = self.decide_digested(cmd, digest, now);
        let answer = match d.reply {
            Reply::Ready(a) => a,
            Reply::Event(i) => self.answer_of(&d.events, i),
            // Only the daemon's waiting line sends `ReserveOrWait`; here it is decided as is.
            Reply::Wait => Answer::Error(WireError::new(
                ErrorCode::Internal,
                "a waiting reserve has no answer yet",
            )),
        };
        Step {
            answer,
            events: d.events,
        }
    }

    /// [`Ledger::execute_digested`] without rendering the answer: the events are folded and
    /// the answer is left to [`Ledger::renderer`]'s `keyed` and `render_keyed`, wherever the
    /// caller likes.
    pub fn decide_digested(
        &mut self,
        cmd: Command<'_>,
        digest: &[u8; 16],
        now: TsMicros,
    ) -> Decided {
        let mut events = Vec::new();
        self.reap_into(now, &mut events);
        let now = self.stamp(now);
        let mut step = match cmd {
            Command::Record(r) => self.record(r, digest, now),
            Command::Reserve(r) => self.reserve(r, digest, now, false),
            Command::ReserveOrWait(r) => self.reserve(r, digest, now, true),
            Command::Commit(c) => self.commit(c, digest, now),
            Command::Release(r) => self.release(r, digest, now),
            Command::Extend(e) => self.extend(e, now),
            Command::Observe(o) => self.observe(o, now),
        };
        if !events.is_empty() {
            // The reaper's expiries come first: the answering event moves back by as many.
            if let Reply::Event(i) = &mut step.reply {
                *i += events.len();
            }
            events.append(&mut step.events);
            step.events = events;
        }
        step
    }

    fn usage_step(
        &mut self,
        now: TsMicros,
        body: UsageRecorded,
        overrun_of: Option<Micros>,
        headers: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Decided {
        let labels = (headers.is_some() || !self.observed.is_empty())
            .then(|| (body.labels.clone(), body.event_id.clone()));
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
        if let Some((labels, event_id)) = labels {
            self.usage_quota_crossings(&labels, now, &mut events);
            if let Some(h) = headers {
                self.observe_usage_headers(&labels, &event_id, h, now, &mut events);
            }
        }
        Decided {
            reply: Reply::Event(main),
            events,
        }
    }

    fn record(&mut self, r: &RecordRequest, digest: &[u8; 16], now: TsMicros) -> Decided {
        let valid = check_id("event_id", &r.event_id)
            .and_then(|_| check_labels(&r.labels))
            .and_then(|_| check_model("model", &r.model))
            .and_then(|_| check_usage(&r.usage))
            .and_then(|_| check_audit(&r.occurred_at, &r.reported_cost_usd));
        if let Err(e) = valid {
            return Decided::new(Answer::Error(e));
        }
        if let Some(a) =
            dup_or_conflict(self.ids.get(IdKind::Event, &r.event_id), digest, "event_id")
        {
            return Decided::new(a);
        }
        let body = UsageRecorded {
            event_id: r.event_id.clone(),
            reservation_id: None,
            reservation: ReservationLink::None,
            late: false,
            labels: self.derived_labels(&r.labels, &r.model, now).into(),
            model: r.model.clone(),
            usage: r.usage,
            occurred_at: r.occurred_at.clone(),
            reported_cost_usd: r.reported_cost_usd.clone(),
            payload_digest: *digest,
            receipt: None,
        };
        self.usage_step(now, body, None, r.headers.as_ref())
    }

    fn commit(&mut self, c: &CommitRequest, digest: &[u8; 16], now: TsMicros) -> Decided {
        let valid = check_id("reservation_id", &c.reservation_id)
            .and_then(|_| check_id("event_id", &c.event_id))
            .and_then(|_| c.labels.as_ref().map_or(Ok(()), check_labels))
            .and_then(|_| c.model.as_ref().map_or(Ok(()), |m| check_model("model", m)))
            .and_then(|_| check_usage(&c.usage))
            .and_then(|_| check_audit(&c.occurred_at, &c.reported_cost_usd));
        if let Err(e) = valid {
            return Decided::new(Answer::Error(e));
        }
        if let Some(a) =
            dup_or_conflict(self.ids.get(IdKind::Event, &c.event_id), digest, "event_id")
        {
            return Decided::new(a);
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
            match &e.how {
                EndKind::Committed(by) => {
                    return Decided::new(Answer::Error(WireError {
                        code: ErrorCode::Conflict,
                        message: format!(
                            "reservation {rid:?} was already committed by event {by:?}"
                        ),
                        field: Some("reservation_id".into()),
                    }))
                }
                // The call went ahead without a hold: the commit may say which model it used
                // (a denied reservation's is the last candidate it considered).
                EndKind::Denied => {
                    let model = c.model.clone().unwrap_or_else(|| e.model.clone());
                    let client = match &c.labels {
                        Some(l) => l.clone(),
                        None => crate::labels::client_part(&e.labels),
                    };
                    (
                        self.derived_labels(&client, &model, now).into(),
                        model,
                        ReservationLink::Denied,
                        false,
                        None,
                    )
                }
                EndKind::Released | EndKind::Expired => (
                    e.labels.clone(),
                    e.model.clone(),
                    ReservationLink::Known,
                    true,
                    Some(e.hold_micros),
                ),
            }
        } else {
            let model = c.model.clone().unwrap_or_else(|| "unknown".into());
            let client = c.labels.clone().unwrap_or_default();
            (
                self.derived_labels(&client, &model, now).into(),
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
        self.usage_step(now, body, hold, c.headers.as_ref())
    }

    fn reserve(
        &mut self,
        r: &ReserveRequest,
        digest: &[u8; 16],
        now: TsMicros,
        may_wait: bool,
    ) -> Decided {
        let ttl = r.ttl_seconds.unwrap_or_else(|| {
            self.policy
                .as_ref()
                .map_or(crate::policy::DEFAULT_RESERVATION_TTL_SECONDS, |p| {
                    p.reservation_ttl_seconds
                })
        });
        let models = check_id("reservation_id", &r.reservation_id)
            .and_then(|_| check_ttl("ttl_seconds", ttl))
            .and_then(|_| check_wait(r.wait_ms))
            .and_then(|_| {
                self.validate_decision(&r.labels, &r.model, &r.candidates, &r.require, &r.estimate)
            });
        let models = match models {
            Ok(m) => m,
            Err(e) => return Decided::new(Answer::Error(e)),
        };
        if let Some(a) = dup_or_conflict(
            self.ids.get(IdKind::Reservation, &r.reservation_id),
            digest,
            "reservation_id",
        ) {
            return Decided::new(a);
        }
        // A denied id (past the idempotency window) is not in use: it holds nothing, and a
        // commit of it would find the hold granted now.
        let ended = self.ended.get(&r.reservation_id);
        if self.holds.contains_key(&r.reservation_id)
            || ended.is_some_and(|e| e.how != EndKind::Denied)
        {
            return Decided::new(Answer::Error(WireError {
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
            &Adjust::none(),
        );
        if may_wait && eval.decision == Decision::Deny && eval.waitable {
            return Decided {
                reply: Reply::Wait,
                events: Vec::new(),
            };
        }
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
                labels: std::mem::take(&mut eval.labels).into(),
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
                labels: std::mem::take(&mut eval.labels).into(),
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
        Decided {
            reply: Reply::Event(0),
            events,
        }
    }

    fn release(&mut self, r: &ReleaseRequest, digest: &[u8; 16], now: TsMicros) -> Decided {
        if let Err(e) = check_id("reservation_id", &r.reservation_id) {
            return Decided::new(Answer::Error(e));
        }
        if let Some(a) = dup_or_conflict(
            self.ids.get(IdKind::Release, &r.reservation_id),
            digest,
            "reservation_id",
        ) {
            return Decided::new(a);
        }
        if !self.holds.contains_key(&r.reservation_id) {
            return Decided::new(Answer::Error(self.not_live(&r.reservation_id)));
        }
        let mut events = Vec::new();
        let body = EventBody::ReservationReleased(ReservationReleased {
            reservation_id: r.reservation_id.clone(),
            reason: "cancelled".into(),
            payload_digest: *digest,
        });
        self.emit(now, body, &mut events);
        Decided {
            reply: Reply::Event(0),
            events,
        }
    }

    fn extend(&mut self, e: &ExtendRequest, now: TsMicros) -> Decided {
        let valid = check_id("reservation_id", &e.reservation_id)
            .and_then(|_| check_ttl("ttl_seconds", e.ttl_seconds));
        if let Err(err) = valid {
            return Decided::new(Answer::Error(err));
        }
        if !self.holds.contains_key(&e.reservation_id) {
            return Decided::new(Answer::Error(self.not_live(&e.reservation_id)));
        }
        let expires_at = self.stamp(now).saturating_add(seconds(e.ttl_seconds));
        let mut events = Vec::new();
        let body = EventBody::ReservationExtended(ReservationExtended {
            reservation_id: e.reservation_id.clone(),
            expires_at,
        });
        let (seq, _) = self.emit(now, body, &mut events);
        Decided {
            reply: Reply::Ready(Answer::Extend(ExtendAnswer {
                ok: true,
                seq,
                expires_at: format_ts(expires_at),
                req: None,
            })),
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
            Some(EndKind::Denied) => format!("reservation {rid:?} was denied: it holds nothing"),
            None => format!("no live reservation {rid:?}"),
        };
        WireError {
            code: ErrorCode::NotFound,
            message,
            field: Some("reservation_id".into()),
        }
    }
}
