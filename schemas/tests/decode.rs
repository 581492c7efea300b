//! Request-line decoding: every malformed input is a structured error naming the field.
#![allow(clippy::unwrap_used, clippy::panic)]

use bursar_schemas::wire::{decode_request, ErrorCode, Request, MAX_LINE_BYTES};

fn err(line: &str) -> (ErrorCode, Option<String>, String) {
    let (e, _) = decode_request(line.as_bytes()).unwrap_err();
    (e.code, e.field, e.message)
}

#[test]
fn record_decodes_with_defaults_and_req_echo() {
    let line = r#"{"op":"record","req":[1,"x"],"event_id":"e-1","labels":{"team":"search"},"model":"gpt-4o","usage":{"input_tokens":1200,"output_tokens":300}}"#;
    let got = decode_request(line.as_bytes()).unwrap();
    assert_eq!(got.req, Some(serde_json::json!([1, "x"])));
    let Request::Record(r) = got.request else {
        panic!("not a record")
    };
    assert_eq!(r.usage.input_tokens, 1200);
    assert_eq!(r.usage.requests, 1);
    assert_eq!(r.usage.cached_input_tokens, 0);
}

#[test]
fn misspelt_nested_field_is_named() {
    let (code, field, msg) = err(
        r#"{"op":"record","event_id":"e","model":"m","usage":{"input_tokens":1,"output_token":5}}"#,
    );
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(field.as_deref(), Some("usage.output_token"));
    assert!(msg.contains("output_token"), "{msg}");
}

#[test]
fn negative_tokens_name_the_field() {
    let (code, field, _) =
        err(r#"{"op":"record","event_id":"e","model":"m","usage":{"input_tokens":-1}}"#);
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(field.as_deref(), Some("usage.input_tokens"));
}

#[test]
fn missing_field_is_named() {
    let (_, field, _) = err(r#"{"op":"record","model":"m","usage":{}}"#);
    assert_eq!(field.as_deref(), Some("event_id"));
    let (_, field, _) = err(r#"{"op":"release"}"#);
    assert_eq!(field.as_deref(), Some("reservation_id"));
}

#[test]
fn unknown_op_and_missing_op() {
    let (code, field, _) = err(r#"{"op":"launch"}"#);
    assert_eq!(code, ErrorCode::UnknownOp);
    assert_eq!(field.as_deref(), Some("op"));
    let (code, field, _) = err(r#"{"event_id":"x"}"#);
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(field.as_deref(), Some("op"));
    let (_, field, _) = err(r#"{"op":7}"#);
    assert_eq!(field.as_deref(), Some("op"));
}

#[test]
fn garbage_is_bad_request() {
    for line in ["", "{", "[]", "null", "\"op\"", "{\"op\":\"hello\"", "{}}"] {
        let (code, _, _) = err(line);
        assert_eq!(code, ErrorCode::BadRequest, "{line:?}");
    }
    let (e, _) = decode_request(&[0xff, 0xfe, b'{']).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("UTF-8"));
}

#[test]
fn over_long_line_is_too_large() {
    let line = vec![b' '; MAX_LINE_BYTES + 1];
    let (e, _) = decode_request(&line).unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
}

#[test]
fn verify_rejects_extra_fields_and_req_is_kept_on_error() {
    let (e, req) = decode_request(br#"{"op":"verify","req":5,"deep":true}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("deep"));
    assert_eq!(req, Some(serde_json::json!(5)));
}

#[test]
fn request_to_json_roundtrips() {
    let line = r#"{"op":"reserve","reservation_id":"r-7","labels":{"team":"a"},"model":"gpt-4o","estimate":{"input_tokens":1200,"max_output_tokens":800},"ttl_seconds":120,"candidates":["gpt-4o","gpt-4o-mini"],"require":["tools"]}"#;
    let a = decode_request(line.as_bytes()).unwrap().request;
    let again = serde_json::to_vec(&a.to_json()).unwrap();
    let b = decode_request(&again).unwrap().request;
    assert_eq!(a, b);
}

#[test]
fn a_key_named_twice_is_refused_wherever_it_is_and_named() {
    // SPEC §6: a proxy that reads the first value must not see other numbers than the daemon.
    for (line, field) in [
        (
            r#"{"op":"record","event_id":"e","model":"m","usage":{"input_tokens":5,"input_tokens":7}}"#,
            "usage.input_tokens",
        ),
        (r#"{"op":"frob","op":"hello"}"#, "op"),
        (r#"{"op":"hello","op":"hello"}"#, "op"),
        (
            r#"{"op":"record","event_id":"e","event_id":"f","model":"m","usage":{}}"#,
            "event_id",
        ),
        (
            r#"{"op":"record","event_id":"e","labels":{"team":"a","team":"b"},"model":"m","usage":{}}"#,
            "labels.team",
        ),
        (
            r#"{"op":"status","labels":{"team":"a","team":"a"}}"#,
            "labels.team",
        ),
        (r#"{"op":"hello","req":1,"req":2}"#, "req"),
        (r#"{"op":"hello","req":{"a":1,"a":2}}"#, "req.a"),
        (
            r#"{"op":"replay","pricing":{"models":{"m":{"input_per_mtok":1,"output_per_mtok":1},"m":{"input_per_mtok":9,"output_per_mtok":9}}}}"#,
            "pricing.models.m",
        ),
        // The same with the body before `op` (the slow path).
        (
            r#"{"usage":{"input_tokens":5,"input_tokens":7},"op":"record","event_id":"e","model":"m"}"#,
            "usage.input_tokens",
        ),
    ] {
        let (e, _) = decode_request(line.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{line}");
        assert_eq!(e.field.as_deref(), Some(field), "{line}: {e:?}");
        assert!(e.message.contains("more than once"), "{line}: {e:?}");
    }
}

#[test]
fn a_duplicate_elsewhere_still_echoes_req() {
    let (e, req) =
        decode_request(br#"{"op":"status","req":"r-1","labels":{"a":"1","a":"2"}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("labels.a"));
    assert_eq!(req, Some(serde_json::json!("r-1")));
}

#[test]
fn op_anywhere_in_the_line_decodes_the_same() {
    let first = r#"{"op":"record","req":3,"event_id":"e-1","labels":{"team":"a"},"model":"gpt-4o","usage":{"input_tokens":5}}"#;
    let last = r#"{"req":3,"event_id":"e-1","labels":{"team":"a"},"model":"gpt-4o","usage":{"input_tokens":5},"op":"record"}"#;
    let middle = r#"{"event_id":"e-1","op":"record","labels":{"team":"a"},"req":3,"model":"gpt-4o","usage":{"input_tokens":5}}"#;
    let a = decode_request(first.as_bytes()).unwrap();
    assert_eq!(decode_request(last.as_bytes()).unwrap(), a);
    assert_eq!(decode_request(middle.as_bytes()).unwrap(), a);
    assert_eq!(a.req, Some(serde_json::json!(3)));
}

/// docs/protocol.md: "`null` and an absent optional field mean the same" — for every field that
/// has a default, not only for the `Option`s: a client that writes `null` for what it does not
/// set (JavaScript's `undefined`, a Go pointer, a model dumped with its `None`s) is not refused.
#[test]
fn null_reads_as_an_absent_field_in_every_request_that_has_defaults() {
    let pairs = [
        (
            r#"{"op":"record","event_id":"e","labels":null,"model":"m","usage":{"input_tokens":null,"output_tokens":null,"cached_input_tokens":null,"cache_write_tokens":null,"requests":null}}"#,
            r#"{"op":"record","event_id":"e","model":"m","usage":{}}"#,
        ),
        (
            r#"{"op":"reserve","reservation_id":"r","labels":null,"model":"m","estimate":{"input_tokens":null,"max_output_tokens":null}}"#,
            r#"{"op":"reserve","reservation_id":"r","model":"m","estimate":{}}"#,
        ),
        (
            r#"{"op":"check","labels":null,"model":"m","estimate":{"input_tokens":null}}"#,
            r#"{"op":"check","model":"m","estimate":{}}"#,
        ),
        (
            r#"{"op":"observe","provider":"acme","labels":null}"#,
            r#"{"op":"observe","provider":"acme"}"#,
        ),
        (r#"{"op":"tail","follow":null}"#, r#"{"op":"tail"}"#),
        (
            r#"{"op":"replay","policy":"","pricing":null,"apply":null}"#,
            r#"{"op":"replay","policy":""}"#,
        ),
        (
            r#"{"op":"replay","pricing":{"import":null,"models":null}}"#,
            r#"{"op":"replay","pricing":{}}"#,
        ),
        // The slow path (a body key before `op`) reads them the same way.
        (
            r#"{"labels":null,"op":"check","model":"m","estimate":{"input_tokens":null}}"#,
            r#"{"op":"check","model":"m","estimate":{}}"#,
        ),
        (r#"{"op":"report","group_by":null}"#, r#"{"op":"report"}"#),
    ];
    for (with_nulls, without) in pairs {
        let a = decode_request(with_nulls.as_bytes())
            .unwrap_or_else(|(e, _)| panic!("{with_nulls}: {e:?}"))
            .request;
        let b = decode_request(without.as_bytes()).unwrap().request;
        assert_eq!(a, b, "{with_nulls}");
    }
    // `requests` defaults to 1 whether absent or null.
    let Request::Record(r) =
        decode_request(br#"{"op":"record","event_id":"e","model":"m","usage":{"requests":null}}"#)
            .unwrap()
            .request
    else {
        panic!("not a record")
    };
    assert_eq!(r.usage.requests, 1);
    // A value of the wrong type is still refused, naming the field.
    let (code, field, _) =
        err(r#"{"op":"record","event_id":"e","labels":5,"model":"m","usage":{}}"#);
    assert_eq!(
        (code, field.as_deref()),
        (ErrorCode::BadRequest, Some("labels"))
    );
    let (code, field, _) =
        err(r#"{"op":"record","event_id":"e","model":"m","usage":{"output_tokens":"9"}}"#);
    assert_eq!(
        (code, field.as_deref()),
        (ErrorCode::BadRequest, Some("usage.output_tokens"))
    );
}
