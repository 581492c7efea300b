//! JSON Schema generation for the wire messages, events and the policy file.
//!
//! The committed files under `schemas/json/` are checked against these in a test; regenerate them
//! with `BURSAR_BLESS=1 cargo test -p bursar-schemas`.

use schemars::schema_for;

/// `(file name, pretty JSON)` for every published schema.
pub fn all() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut push = |name: &'static str, schema: schemars::Schema| {
        let text = serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n";
        out.push((name, text));
    };
    use crate::{event, policy, wire};
    push("policy-file.schema.json", schema_for!(policy::PolicyFile));
    push("event-envelope.schema.json", schema_for!(event::Envelope));
    push("request-hello.schema.json", schema_for!(wire::HelloRequest));
    push(
        "request-record.schema.json",
        schema_for!(wire::RecordRequest),
    );
    push(
        "request-reserve.schema.json",
        schema_for!(wire::ReserveRequest),
    );
    push("request-check.schema.json", schema_for!(wire::CheckRequest));
    push(
        "request-commit.schema.json",
        schema_for!(wire::CommitRequest),
    );
    push(
        "request-release.schema.json",
        schema_for!(wire::ReleaseRequest),
    );
    push(
        "request-extend.schema.json",
        schema_for!(wire::ExtendRequest),
    );
    push(
        "request-status.schema.json",
        schema_for!(wire::StatusRequest),
    );
    push("request-tail.schema.json", schema_for!(wire::TailRequest));
    push(
        "request-export.schema.json",
        schema_for!(wire::ExportRequest),
    );
    push(
        "request-replay.schema.json",
        schema_for!(wire::ReplayRequest),
    );
    push(
        "request-report.schema.json",
        schema_for!(wire::ReportRequest),
    );
    push(
        "request-observe.schema.json",
        schema_for!(wire::ObserveRequest),
    );
    push("answer-error.schema.json", schema_for!(wire::ErrorAnswer));
    push("answer-hello.schema.json", schema_for!(wire::HelloAnswer));
    push("answer-usage.schema.json", schema_for!(wire::UsageAnswer));
    push(
        "answer-decision.schema.json",
        schema_for!(wire::DecisionAnswer),
    );
    push(
        "answer-release.schema.json",
        schema_for!(wire::ReleaseAnswer),
    );
    push("answer-extend.schema.json", schema_for!(wire::ExtendAnswer));
    push("answer-status.schema.json", schema_for!(wire::StatusAnswer));
    push(
        "answer-stream-end.schema.json",
        schema_for!(wire::StreamEnd),
    );
    push("answer-replay.schema.json", schema_for!(wire::ReplayAnswer));
    push(
        "answer-what-if.schema.json",
        schema_for!(wire::WhatIfAnswer),
    );
    push("answer-report.schema.json", schema_for!(wire::ReportAnswer));
    push("answer-verify.schema.json", schema_for!(wire::VerifyAnswer));
    push(
        "answer-observe.schema.json",
        schema_for!(wire::ObserveAnswer),
    );
    push("answer-reload.schema.json", schema_for!(wire::ReloadAnswer));
    push(
        "answer-event-line.schema.json",
        schema_for!(wire::EventLine),
    );
    out
}
