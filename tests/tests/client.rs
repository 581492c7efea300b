//! The Rust client library (`bursar_cli::Client`) against a real daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_cli::{Client, ClientError};
use bursar_schemas::wire::{
    Decision, ErrorCode, Estimate, ExportRequest, RecordRequest, ReleaseRequest, Request,
    ReserveRequest, StatusRequest, TailRequest, Usage,
};
use bursar_schemas::Labels;
use bursar_tests::Daemon;

const POLICY: &str = r#"
[[budget]]
id = "team-daily"
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 0.01
"#;

fn team(t: &str) -> Labels {
    [("team".to_string(), t.to_string())].into()
}

fn record(id: &str) -> RecordRequest {
    RecordRequest {
        event_id: id.into(),
        labels: team("a"),
        model: "gpt-4o".into(),
        usage: Usage {
            input_tokens: 100,
            output_tokens: 10,
            ..Usage::default()
        },
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    }
}

#[test]
fn typed_calls_pipelining_and_streams() {
    let d = Daemon::start_with_config(POLICY);
    let mut c = Client::connect(&d.socket).unwrap();
    let hello = c.hello(Some("client-test")).unwrap();
    assert_eq!(hello.protocol, 1);

    // 600 records in windows of 256 in flight; answers in order.
    let reqs: Vec<Request> = (0..600)
        .map(|i| Request::Record(record(&format!("p-{i}"))))
        .collect();
    let answers = c.pipeline(&reqs).unwrap();
    assert_eq!(answers.len(), 600);
    let seqs: Vec<u64> = answers.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
    // (Crossing the limit appends one budget_exhausted event between two records.)
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "in request order");
    assert_eq!(answers[599]["seq"], 602);
    // 600 × $0.00035 = $0.21 > $0.01: recorded anyway, exhausted.
    assert_eq!(answers[599]["state"], "exhausted");

    // A deny is an Ok answer.
    let deny = c
        .reserve(ReserveRequest {
            reservation_id: "r-1".into(),
            labels: team("a"),
            model: Some("gpt-4o".into()),
            estimate: Estimate {
                input_tokens: 10,
                max_output_tokens: Some(10),
            },
            ttl_seconds: None,
            candidates: None,
            require: None,
            wait_ms: None,
        })
        .unwrap();
    assert_eq!(deny.decision, Decision::Deny);
    assert_eq!(deny.reason.budget.as_deref(), Some("team-daily"));

    // An error answer is ClientError::Server with the daemon's code and field.
    let err = c
        .release(ReleaseRequest {
            reservation_id: "r-404".into(),
        })
        .unwrap_err();
    let wire = err.wire().unwrap();
    assert_eq!(wire.code, ErrorCode::NotFound);
    assert_eq!(wire.field.as_deref(), Some("reservation_id"));
    assert!(err.to_string().starts_with("not_found: "), "{err}");

    // The connection is still usable after an error answer.
    let status = c.status(StatusRequest::default()).unwrap();
    assert_eq!(status.budgets[0].spent_micros, 600 * 350);

    // Streams: export yields every event, then its end line with the count.
    let mut exported = 0u64;
    let mut stream = c
        .stream(&Request::Export(ExportRequest::default()))
        .unwrap();
    for ev in stream.by_ref() {
        let ev = ev.unwrap();
        exported += 1;
        assert_eq!(ev.seq, exported);
    }
    assert_eq!(stream.end().unwrap().count, Some(exported));
    let verify = c.verify().unwrap();
    assert_eq!(verify.events, exported);

    let tail: Vec<_> = c
        .stream(&Request::Tail(TailRequest::default()))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tail.len(), 10);
    assert_eq!(tail.last().unwrap().seq, exported);

    // Not a streaming op.
    assert!(matches!(
        c.stream(&Request::Verify),
        Err(ClientError::Protocol(_))
    ));
}

#[test]
fn a_missing_daemon_is_a_clear_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    let err = Client::connect(&path).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "cannot connect to bursard at {}: No such file or directory (is the daemon running? \
             start it with `bursard`)",
            path.display()
        )
    );
}

#[test]
fn a_daemon_that_stops_mid_conversation_is_reported() {
    let mut d = Daemon::start();
    let mut c = Client::connect(&d.socket).unwrap();
    c.record(record("e-1")).unwrap();
    d.kill9();
    let err = c.record(record("e-2")).unwrap_err();
    assert!(
        matches!(err, ClientError::Closed | ClientError::Io(_)),
        "{err:?}"
    );
}
