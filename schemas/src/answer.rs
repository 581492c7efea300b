//! The typed answer to a request, as the core decides it, and its rendering to one JSON line.
//!
//! `bursar-core` returns an [`Answer`] and speaks no JSON; the daemon renders it on the
//! connection's side (after every lock is released), with the request's `req` echoed.

use crate::wire::{
    DecisionAnswer, ErrorAnswer, ExtendAnswer, ObserveAnswer, ReleaseAnswer, UsageAnswer, WireError,
};
use serde_json::Value;

/// Room for an answer's JSON without its budget lines.
const ANSWER_JSON_BYTES: usize = 256;
/// Room for one budget line of an answer's JSON (a typical one is 300 to 400 bytes).
const REPORT_JSON_BYTES: usize = 448;

/// An answer to send back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `record` / `commit`.
    Usage(UsageAnswer),
    /// `reserve` / `check`.
    Decision(DecisionAnswer),
    /// `release`.
    Release(ReleaseAnswer),
    /// `extend`.
    Extend(ExtendAnswer),
    /// `observe`.
    Observe(ObserveAnswer),
    /// A resent request: its original answer is that of the event at `seq`, rendered again
    /// from the log (with `duplicate: true`) by whoever can read the log.
    Duplicate {
        /// The event that answered the original request.
        seq: u64,
    },
    /// An error.
    Error(WireError),
}

/// Room for the JSON of an answer with `reports` budget lines.
pub fn answer_capacity(reports: usize) -> usize {
    ANSWER_JSON_BYTES.saturating_add(reports.saturating_mul(REPORT_JSON_BYTES))
}

impl Answer {
    /// The JSON line (without newline), with `req` echoed. A [`Answer::Duplicate`] not
    /// resolved into its original answer renders as an internal error (a bug).
    pub fn to_line(&self, req: Option<Value>) -> String {
        let out = match self {
            Answer::Usage(a) => {
                let mut bytes = Vec::with_capacity(answer_capacity(a.budgets.len()));
                a.write_json_with(req.as_ref(), &mut bytes);
                String::from_utf8(bytes).map_err(serde::ser::Error::custom)
            }
            Answer::Decision(a) => {
                let mut bytes = Vec::with_capacity(answer_capacity(a.budgets.len()));
                a.write_json_with(req.as_ref(), &mut bytes);
                String::from_utf8(bytes).map_err(serde::ser::Error::custom)
            }
            Answer::Release(a) => serde_json::to_string(&ReleaseAnswer { req, ..a.clone() }),
            Answer::Extend(a) => serde_json::to_string(&ExtendAnswer { req, ..a.clone() }),
            Answer::Observe(a) => serde_json::to_string(&ObserveAnswer { req, ..a.clone() }),
            Answer::Duplicate { seq } => serde_json::to_string(&ErrorAnswer::new(
                WireError::new(
                    crate::wire::ErrorCode::Internal,
                    format!("the original answer of event {seq} was not found"),
                ),
                req,
            )),
            Answer::Error(e) => serde_json::to_string(&ErrorAnswer::new(e.clone(), req)),
        };
        out.unwrap_or_else(|_| {
            r#"{"ok":false,"error":{"code":"internal","message":"answer encoding failed"}}"#.into()
        })
    }

    /// True for an error answer.
    pub fn is_error(&self) -> bool {
        matches!(self, Answer::Error(_))
    }
}
