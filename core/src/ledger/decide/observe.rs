//! `observe` (SPEC §10): what a provider said about its rate limits, normalised or as the
//! response's raw headers, recorded as one `quota_observed` per `[[quota]]` it governs; and the
//! same for the headers a `commit` or `record` brings along.

use super::super::quotas::LIMIT_NAMES;
use super::super::Ledger;
use super::validate::{check_id, check_labels};
use super::{Decided, Reply};
use crate::quota::{parse_headers, HeaderProblem, Window};
use crate::time::{format_ts, parse_ts, seconds};
use bursar_schemas::answer::Answer;
use bursar_schemas::event::{EventBody, IgnoredHeader, ObservedLimit, QuotaObserved};
use bursar_schemas::wire::{
    ErrorCode, ObserveAnswer, ObserveRequest, ObservedQuota, ObservedWindow, WireError,
};
use bursar_schemas::{Labels, TsMicros};
use std::collections::BTreeMap;

/// How long an observed limit without a reset time binds.
pub const DEFAULT_OBSERVATION_SECONDS: u64 = 60;

/// Farthest reset an observation may name (a month and a day): a provider's limits reset within
/// minutes, hours or a monthly cap; a reset years ahead would bind the quota for good.
pub const MAX_OBSERVATION_SECONDS: u64 = 31 * 86_400 + 86_400;

/// The four limits of an observation, in [`LIMIT_NAMES`] order.
type Limits4 = [Option<ObservedLimit>; 4];

/// A header family's window as a limit: it needs `remaining`; without a reset it binds for
/// [`DEFAULT_OBSERVATION_SECONDS`].
fn limit_of(w: &Option<Window>, now: TsMicros) -> Option<ObservedLimit> {
    let w = w.as_ref()?;
    Some(ObservedLimit {
        limit: w.limit,
        remaining: w.remaining?,
        reset_at: w
            .reset_at
            .unwrap_or_else(|| now.saturating_add(seconds(DEFAULT_OBSERVATION_SECONDS))),
    })
}

/// Read raw headers at `now`.
fn from_headers(
    headers: &BTreeMap<String, String>,
    now: TsMicros,
) -> (Limits4, Vec<IgnoredHeader>) {
    let (obs, problems) = parse_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())), now);
    let mut limits = [
        limit_of(&obs.requests, now),
        limit_of(&obs.tokens, now),
        limit_of(&obs.input_tokens, now),
        limit_of(&obs.output_tokens, now),
    ];
    let latest = now.saturating_add(seconds(MAX_OBSERVATION_SECONDS));
    let mut far = Vec::new();
    for (i, slot) in limits.iter_mut().enumerate() {
        if let Some(l) = slot.filter(|l| l.reset_at > latest) {
            far.push(IgnoredHeader {
                header: format!("{} reset", LIMIT_NAMES[i]),
                value: format_ts(l.reset_at),
                reason: "a reset more than 32 days ahead is not believed".into(),
            });
            *slot = None;
        }
    }
    let ignored = problems
        .into_iter()
        .map(
            |HeaderProblem {
                 header,
                 value,
                 reason,
             }| IgnoredHeader {
                header,
                value,
                reason,
            },
        )
        .chain(far)
        .collect();
    (limits, ignored)
}

/// Read a normalised observation; errors name the field.
fn from_quota(q: &ObservedQuota, now: TsMicros) -> Result<Limits4, WireError> {
    let latest = now.saturating_add(seconds(MAX_OBSERVATION_SECONDS));
    let mut out = [None; 4];
    let given = [&q.requests, &q.tokens, &q.input_tokens, &q.output_tokens];
    for (i, w) in given.iter().enumerate() {
        let Some(w) = w else { continue };
        let field = |f: &str| format!("quota.{}.{f}", LIMIT_NAMES[i]);
        let Some(reset_at) = parse_ts(&w.reset_at) else {
            return Err(WireError::bad_field(
                field("reset_at"),
                format!("{} is not an RFC 3339 time", field("reset_at")),
            ));
        };
        if reset_at > latest {
            return Err(WireError::bad_field(
                field("reset_at"),
                format!(
                    "{} is more than 32 days ahead: a provider's limit resets sooner",
                    field("reset_at")
                ),
            ));
        }
        if w.limit.is_some_and(|l| w.remaining > l) {
            return Err(WireError::bad_field(
                field("remaining"),
                format!("{} is more than its limit", field("remaining")),
            ));
        }
        out[i] = Some(ObservedLimit {
            limit: w.limit,
            remaining: w.remaining,
            reset_at,
        });
    }
    Ok(out)
}

/// The wire form of what was read.
fn wire_of(limits: &Limits4) -> ObservedQuota {
    let w = |l: &Option<ObservedLimit>| {
        l.map(|l| ObservedWindow {
            limit: l.limit,
            remaining: l.remaining,
            reset_at: format_ts(l.reset_at),
        })
    };
    ObservedQuota {
        requests: w(&limits[0]),
        tokens: w(&limits[1]),
        input_tokens: w(&limits[2]),
        output_tokens: w(&limits[3]),
    }
}

impl Ledger {
    /// Append one `quota_observed` per quota of `ids`, then the `quota_exhausted` of each limit
    /// that has nothing left.
    #[allow(clippy::too_many_arguments)]
    fn append_observations(
        &mut self,
        ids: &[String],
        provider: &str,
        labels: &Labels,
        event_id: Option<&str>,
        limits: &Limits4,
        ignored: &[IgnoredHeader],
        now: TsMicros,
        events: &mut Vec<(u64, TsMicros, EventBody)>,
    ) {
        for id in ids {
            let body = EventBody::QuotaObserved(QuotaObserved {
                quota: id.clone(),
                provider: provider.to_string(),
                labels: labels.clone().into(),
                event_id: event_id.map(str::to_string),
                requests: limits[0],
                tokens: limits[1],
                input_tokens: limits[2],
                output_tokens: limits[3],
                ignored: ignored.to_vec(),
            });
            self.emit(now, body, events);
        }
        self.emit_quota_crossings(ids, now, events);
    }

    /// Append the `quota_exhausted` of every limit of the quotas `ids` that has nothing left.
    fn emit_quota_crossings(
        &mut self,
        ids: &[String],
        now: TsMicros,
        events: &mut Vec<(u64, TsMicros, EventBody)>,
    ) {
        for e in self.quota_crossings(ids, self.last_ts) {
            self.emit(now, EventBody::QuotaExhausted(e), events);
        }
    }

    /// `observe`.
    pub(super) fn observe(&mut self, r: &ObserveRequest, now: TsMicros) -> Decided {
        let valid = check_id("provider", &r.provider).and_then(|_| check_labels(&r.labels));
        if let Err(e) = valid {
            return Decided::new(Answer::Error(e));
        }
        let (limits, ignored) =
            match (&r.quota, &r.headers) {
                (Some(q), None) => match from_quota(q, now) {
                    Ok(l) => (l, Vec::new()),
                    Err(e) => return Decided::new(Answer::Error(e)),
                },
                (None, Some(h)) => from_headers(h, now),
                (None, None) => return Decided::new(Answer::Error(WireError::bad_field(
                    "quota",
                    "observe needs `quota` (normalised limits) or `headers` (a response's headers)",
                ))),
                (Some(_), Some(_)) => {
                    return Decided::new(Answer::Error(WireError::bad_field(
                        "headers",
                        "give `quota` or `headers`, not both",
                    )))
                }
            };
        let mut labels = r.labels.clone();
        labels.insert("provider".into(), r.provider.clone());
        let ids: Vec<String> = self.governing_ids(&labels);
        if ids.is_empty() {
            return Decided::new(Answer::Error(WireError {
                code: ErrorCode::NotFound,
                message: format!(
                    "no [[quota]] of the policy in force governs provider {:?} with these labels",
                    r.provider
                ),
                field: Some("provider".into()),
            }));
        }
        let mut events = Vec::new();
        let observed_any = limits.iter().any(Option::is_some);
        if observed_any {
            self.append_observations(
                &ids,
                &r.provider,
                &r.labels,
                None,
                &limits,
                &ignored,
                now,
                &mut events,
            );
        }
        let answer = ObserveAnswer {
            ok: true,
            seq: events.last().map(|e| e.0),
            quotas: if observed_any { ids } else { Vec::new() },
            observed: wire_of(&limits),
            ignored,
            req: None,
        };
        Decided {
            reply: Reply::Ready(Answer::Observe(answer)),
            events,
        }
    }

    /// The observations a commit's or record's rate-limit headers give, appended after its
    /// usage (whose derived labels pick the quotas): nothing when no quota governs the call or
    /// no header says anything.
    pub(super) fn observe_usage_headers(
        &mut self,
        labels: &Labels,
        event_id: &str,
        headers: &BTreeMap<String, String>,
        now: TsMicros,
        events: &mut Vec<(u64, TsMicros, EventBody)>,
    ) {
        let ids: Vec<String> = self.governing_ids(labels);
        if ids.is_empty() {
            return;
        }
        let (limits, ignored) = from_headers(headers, self.stamp(now));
        if limits.iter().all(Option::is_none) {
            return;
        }
        let provider = labels.get("provider").cloned().unwrap_or_default();
        self.append_observations(
            &ids,
            &provider,
            labels,
            Some(event_id),
            &limits,
            &ignored,
            now,
            events,
        );
    }

    /// The `quota_exhausted` events a usage event (with these derived labels) made due.
    pub(super) fn usage_quota_crossings(
        &mut self,
        labels: &Labels,
        now: TsMicros,
        events: &mut Vec<(u64, TsMicros, EventBody)>,
    ) {
        if self.observed.is_empty() {
            return;
        }
        let ids: Vec<String> = self.governing_ids(labels);
        self.emit_quota_crossings(&ids, now, events);
    }
}
