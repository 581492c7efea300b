//! `replay`: fold the log again under other prices, as a dry run (which the connection folds
//! off the writer) or applied (a `pricing_changed` event, decided here on the writer).

use super::{error_line, lock_store, Batch, Writer};
use bursar_core::ledger::{self, Answer, Ledger};
use bursar_schemas::event::{Actor, EventBody, PricingChanged};
use bursar_schemas::wire::{ErrorCode, ReplayRequest, WireError};
use serde_json::Value;

impl Writer {
    pub(super) fn replay(
        &mut self,
        l: &mut Ledger,
        batch: &mut Batch,
        (request, import_text): (ReplayRequest, Option<String>),
        actor: Actor,
        req: Option<Value>,
        poisoned: bool,
    ) -> String {
        if request.apply && poisoned {
            return error_line(ErrorCode::Unavailable, self.refusal.clone(), req);
        }
        let since = match &request.since {
            Some(s) => match bursar_core::time::parse_ts(s) {
                Some(t) => t,
                None => {
                    return Answer::Error(WireError::bad_field(
                        "since",
                        "since must be an RFC 3339 time",
                    ))
                    .to_line(req)
                }
            },
            None => i64::MIN,
        };
        let base = l.current_prices().cloned().unwrap_or_default();
        let table = match bursar_core::policy::parse_pricing_section(
            &request.pricing,
            &base,
            "replay.pricing",
            // The file was read by the connection, off this thread (never a client-named path
            // opened here).
            &|p| {
                import_text
                    .clone()
                    .ok_or_else(|| format!("{p} was not read"))
            },
        ) {
            Ok(t) => t,
            Err(errs) => {
                let msg = errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Answer::Error(WireError::bad_field("pricing", msg)).to_line(req);
            }
        };
        // Everything staged in this batch is folded but not yet in the store: replay after it.
        if !batch.sealed.is_empty() {
            if let Err(e) = self.commit(batch, l.fault().map(str::to_owned)) {
                return error_line(
                    ErrorCode::Unavailable,
                    format!("log write failed: {e}"),
                    req,
                );
            }
        }
        let now = (self.clock)();
        let outcome = {
            let store = lock_store(&self.shared);
            let _sharing = bursar_schemas::event::SharingLabels::start();
            let epochs = match ledger::collect_epochs(store.read_from(1)) {
                Ok(e) => e,
                Err(e) => return error_line(ErrorCode::Internal, e.to_string(), req),
            };
            match ledger::replay(l, &epochs, store.read_from(1), &table, since, now) {
                Ok(o) => o,
                Err(e) => return error_line(ErrorCode::Internal, e.to_string(), req),
            }
        };
        let mut answer = outcome.answer;
        if request.apply {
            let mut after = outcome.after;
            let body = EventBody::PricingChanged(PricingChanged {
                effective_from: outcome.effective_from,
                pricing: table,
            });
            self.stage(&mut after, batch, actor, body);
            answer.applied = true;
            answer.seq = Some(after.last_seq());
            *l = after;
        }
        answer.req = req;
        serde_json::to_string(&answer).unwrap_or_default()
    }
}
