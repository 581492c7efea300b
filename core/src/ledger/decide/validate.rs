//! What a request must be before anything is decided: ids, labels, models, usage, audit
//! fields, ttls, estimates, candidates; every failure a `bad_request` naming the field.

use super::super::{Ledger, MAX_EVENT_TOKENS, MAX_ID_BYTES};
use super::{MAX_CANDIDATES, MAX_REQUIRE};
use crate::labels::validate_client_labels;
use crate::policy::MAX_RESERVATION_TTL_SECONDS;
use crate::time::parse_ts;
use bursar_schemas::wire::{Estimate, Usage, WireError};
use bursar_schemas::Labels;

pub(super) fn check_id(field: &str, id: &str) -> Result<(), WireError> {
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

pub(super) fn check_model(field: &str, model: &str) -> Result<(), WireError> {
    check_id(field, model)
}

pub(super) fn check_labels(labels: &Labels) -> Result<(), WireError> {
    validate_client_labels(labels).map_err(|e| WireError::bad_field(e.field, e.message))
}

pub(super) fn check_usage(u: &Usage) -> Result<(), WireError> {
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

pub(super) fn check_audit(
    occurred_at: &Option<String>,
    reported: &Option<String>,
) -> Result<(), WireError> {
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

pub(super) fn check_ttl(field: &str, ttl: u64) -> Result<(), WireError> {
    if ttl == 0 || ttl > MAX_RESERVATION_TTL_SECONDS {
        return Err(WireError::bad_field(
            field,
            format!("{field} must be between 1 and {MAX_RESERVATION_TTL_SECONDS}"),
        ));
    }
    Ok(())
}

pub(super) fn check_estimate(e: &Estimate) -> Result<(), WireError> {
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
pub(super) fn candidate_list(
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

pub(super) fn check_require(require: &Option<Vec<String>>) -> Result<Vec<String>, WireError> {
    let r = require.clone().unwrap_or_default();
    if r.len() > MAX_REQUIRE {
        return Err(WireError::bad_field(
            "require",
            format!("at most {MAX_REQUIRE} capabilities"),
        ));
    }
    Ok(r)
}

impl Ledger {
    pub(super) fn validate_decision(
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
}

/// Longest `wait_ms` (SPEC §10).
pub const MAX_WAIT_MS: u64 = 60_000;

pub(super) fn check_wait(wait_ms: Option<u64>) -> Result<(), WireError> {
    match wait_ms {
        Some(w) if w > MAX_WAIT_MS => Err(WireError::bad_field(
            "wait_ms",
            format!("wait_ms must be at most {MAX_WAIT_MS}"),
        )),
        _ => Ok(()),
    }
}
