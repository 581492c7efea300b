//! Bounded property tests of the hostile-input decoders, the CI-sized versions of the fuzz
//! targets (`fuzz/`): the same properties (`tests/props/mod.rs`) on arbitrary bytes,
//! JSON-shaped request lines, mutated log records and arbitrary envelopes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_schemas::event::{decode_record, encode_record, Envelope, RECORD_FORMAT_V1};
use bursar_schemas::wire::Request;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const OPS: &[&str] = &[
    "hello", "record", "reserve", "check", "commit", "release", "extend", "status", "tail",
    "export", "replay", "verify", "reload", "", "HELLO",
];

/// Field names of every request (and of their nested objects), so that generated objects hit
/// the decoders' real paths and not only `unknown field`.
const FIELDS: &[&str] = &[
    "req",
    "client",
    "event_id",
    "labels",
    "model",
    "usage",
    "occurred_at",
    "reported_cost_usd",
    "reservation_id",
    "estimate",
    "ttl_seconds",
    "candidates",
    "require",
    "budget",
    "limit",
    "from_seq",
    "follow",
    "since",
    "until",
    "pricing",
    "apply",
    "import",
    "models",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "requests",
    "max_output_tokens",
    "input_per_mtok",
    "output_per_mtok",
    "above_tokens",
    "cache_write_per_mtok_above",
    "capabilities",
    "provider",
    "team",
    "gpt-4o",
    "",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        (0u64..2000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)), // NaN and infinities become null
        (-1e3f64..1e3).prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop::sample::select(FIELDS).prop_map(|s| json!(s)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(FIELDS), inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A request line: an object with an `op` and fields of the protocol, as JSON text.
fn request_object() -> impl Strategy<Value = String> {
    (
        prop::sample::select(OPS),
        prop::collection::btree_map(prop::sample::select(FIELDS), value(), 0..6),
    )
        .prop_map(|(op, fields)| {
            let mut map: Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            map.insert("op".into(), json!(op));
            Value::Object(map).to_string()
        })
}

/// A valid request of each op with generated content, as JSON text.
fn valid_request() -> impl Strategy<Value = String> {
    let text = || "\\PC{0,16}";
    let labels = || prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,8}", 0..3);
    let usage = || {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(i, o, c, w, r)| {
                json!({"input_tokens": i, "output_tokens": o, "cached_input_tokens": c,
                       "cache_write_tokens": w, "requests": r})
            })
    };
    let price = || {
        prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[0-9]{0,8}(\\.[0-9]{0,8})?".prop_map(|s| json!(s)),
        ]
    };
    prop_oneof![
        (text(), labels(), text(), usage()).prop_map(|(id, l, m, u)| json!({
            "op": "record", "event_id": id, "labels": l, "model": m, "usage": u
        })),
        (text(), labels(), any::<u64>(), any::<Option<u64>>(), any::<u64>(), prop::collection::vec(text(), 0..3))
            .prop_map(|(id, l, i, max, ttl, c)| json!({
                "op": "reserve", "reservation_id": id, "labels": l,
                "estimate": {"input_tokens": i, "max_output_tokens": max},
                "ttl_seconds": ttl, "candidates": c
            })),
        (text(), text(), usage(), any::<usize>()).prop_map(|(r, e, u, lim)| json!({
            "op": "commit", "reservation_id": r, "event_id": e, "usage": u, "req": lim
        })),
        (labels(), text(), any::<usize>()).prop_map(|(l, b, lim)| json!({
            "op": "status", "labels": l, "budget": b, "limit": lim
        })),
        (any::<u64>(), any::<bool>()).prop_map(|(s, f)| json!({
            "op": "tail", "from_seq": s, "follow": f
        })),
        (text(), price(), price(), any::<u64>(), any::<bool>()).prop_map(|(m, i, o, a, apply)| json!({
            "op": "replay", "apply": apply,
            "pricing": {"models": {m: {"input_per_mtok": i, "output_per_mtok": o, "above_tokens": a}}}
        })),
    ]
    .prop_map(|v| v.to_string())
}

/// Encoded records of the sample chain: single envelopes and group-commit frames.
fn sample_records() -> Vec<Vec<u8>> {
    let envs = props::sample_envelopes();
    let mut out: Vec<Vec<u8>> = envs
        .iter()
        .map(|e| encode_record(std::slice::from_ref(e)).unwrap())
        .collect();
    out.push(encode_record(&envs[..3]).unwrap());
    out.push(encode_record(&envs).unwrap());
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<usize>(),
            prop::sample::select(vec![0u8, 1, 2, 250, 251, 252, 253, 254, 255])
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match *m {
        Mutation::Set(i, b) => {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        Mutation::Insert(i, b) => {
            let n = bytes.len();
            bytes.insert(i % (n + 1), b);
        }
        Mutation::Remove(i) => {
            let n = bytes.len();
            bytes.remove(i % n);
        }
        Mutation::Truncate(i) => {
            let n = bytes.len();
            bytes.truncate(i % (n + 1));
        }
    }
}

fn envelope() -> impl Strategy<Value = Envelope> {
    // Arbitrary field values in a sample envelope of each kind.
    let samples = props::sample_envelopes();
    (
        prop::sample::select(samples),
        any::<u64>(),
        any::<i64>(),
        any::<(u32, u32, u32)>(),
        any::<[u8; 32]>(),
        "\\PC{0,24}",
        prop::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..4),
    )
        .prop_map(|(mut env, seq, ts, (uid, gid, pid), hash, text, labels)| {
            use bursar_schemas::event::EventBody::*;
            env.seq = seq;
            env.ts = ts;
            env.actor = bursar_schemas::event::Actor { uid, gid, pid };
            env.prev_hash = bursar_schemas::event::Hash32(hash);
            match &mut env.body {
                UsageRecorded(u) => {
                    u.event_id = text;
                    u.labels = labels.into();
                    u.usage.requests = seq;
                }
                ReservationCreated(r) => {
                    r.model = text;
                    r.labels = labels.into();
                    r.hold_micros = ts;
                }
                ReservationDenied(r) => {
                    r.key = Some(text);
                    r.labels = labels.into();
                }
                ReservationReleased(r) => r.reason = text,
                ReservationExtended(r) => r.expires_at = ts,
                ReservationExpired(r) => r.reservation_id = text,
                BudgetWarned(b) | BudgetExhausted(b) => {
                    b.key = text;
                    b.utilization_ppm = seq;
                }
                PolicyApplied(p) => {
                    p.source = text;
                    p.policy.budgets[0].match_labels = labels;
                }
                PricingChanged(p) => p.effective_from = ts,
                QuotaObserved(q) => {
                    q.quota = text;
                    q.labels = labels.into();
                    q.requests = Some(bursar_schemas::event::ObservedLimit {
                        limit: None,
                        remaining: seq,
                        reset_at: ts,
                    });
                }
                QuotaExhausted(q) => {
                    q.limit = text;
                    q.observed_seq = seq;
                    q.reset_at = ts;
                }
            }
            env.hash = env.compute_hash().unwrap();
            env
        })
}

/// `v` as JSON text with the `nth` object key met (depth first, in order) written twice: once
/// with its own value, once more with `other`.
fn with_key_twice(v: &Value, nth: usize, other: &Value) -> (String, bool) {
    fn go(v: &Value, nth: usize, seen: &mut usize, other: &Value, out: &mut String) -> bool {
        match v {
            Value::Object(m) => {
                let mut done = false;
                out.push('{');
                for (i, (k, val)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let key = serde_json::to_string(k).unwrap();
                    let here = *seen == nth;
                    *seen += 1;
                    out.push_str(&key);
                    out.push(':');
                    done |= go(val, nth, seen, other, out);
                    if here {
                        out.push(',');
                        out.push_str(&key);
                        out.push(':');
                        out.push_str(&other.to_string());
                        done = true;
                    }
                }
                out.push('}');
                done
            }
            Value::Array(a) => {
                let mut done = false;
                out.push('[');
                for (i, val) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    done |= go(val, nth, seen, other, out);
                }
                out.push(']');
                done
            }
            leaf => {
                out.push_str(&leaf.to_string());
                false
            }
        }
    }
    let mut out = String::new();
    let done = go(v, nth, &mut 0, other, &mut out);
    (out, done)
}

/// `v` (an object) as JSON text with its `op` key moved to the end.
fn op_last(v: &Value) -> String {
    let Value::Object(m) = v else {
        return v.to_string();
    };
    let mut parts: Vec<String> = m
        .iter()
        .filter(|(k, _)| k.as_str() != "op")
        .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
        .collect();
    if let Some(op) = m.get("op") {
        parts.push(format!("\"op\":{op}"));
    }
    format!("{{{}}}", parts.join(","))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn request_lines_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = props::request_line(&bytes);
    }

    #[test]
    fn request_lines_of_arbitrary_text(text in "\\PC{0,200}") {
        let _ = props::request_line(text.as_bytes());
    }

    #[test]
    fn json_shaped_request_lines(line in request_object()) {
        let _ = props::request_line(line.as_bytes());
    }

    #[test]
    fn well_formed_requests_decode_and_round_trip(line in valid_request()) {
        // Generated with valid types, so only the round trip can fail.
        let decoded = props::request_line(line.as_bytes());
        prop_assert!(decoded.is_ok(), "{line}: {decoded:?}");
        prop_assert!(!matches!(decoded, Ok(Request::Verify)));
    }


    #[test]
    fn a_key_named_twice_anywhere_is_refused(
        line in valid_request(),
        nth in 0usize..40,
        other in leaf(),
    ) {
        let v: Value = serde_json::from_str(&line).unwrap();
        fn keys(v: &Value) -> usize {
            match v {
                Value::Object(m) => m.len() + m.values().map(keys).sum::<usize>(),
                Value::Array(a) => a.iter().map(keys).sum(),
                _ => 0,
            }
        }
        let (text, doubled) = with_key_twice(&v, nth % keys(&v).max(1), &other);
        prop_assert!(doubled);
        let decoded = props::request_line(text.as_bytes());
        let Err(e) = decoded else {
            return Err(TestCaseError::fail(format!("{text}: accepted")));
        };
        prop_assert!(e.message.contains("more than once"), "{text}: {e:?}");
    }

    #[test]
    fn where_op_stands_in_the_line_does_not_change_the_request(line in valid_request()) {
        let v: Value = serde_json::from_str(&line).unwrap();
        let a = bursar_schemas::wire::decode_request(line.as_bytes());
        let b = bursar_schemas::wire::decode_request(op_last(&v).as_bytes());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn records_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut tagged = vec![RECORD_FORMAT_V1];
        tagged.extend_from_slice(&bytes);
        let _ = props::record(&tagged);
        let _ = props::record(&bytes);
    }

    #[test]
    fn mutated_records(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let records = sample_records();
        let mut bytes = which.get(&records).clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let _ = props::record(&bytes);
    }

    #[test]
    fn arbitrary_envelopes_round_trip(envs in prop::collection::vec(envelope(), 0..4)) {
        // A record of format 2 stores the first `prev_hash` only: each later one is the hash
        // before it. Chained envelopes (as the writer seals them) come back as they were.
        let mut chained = envs.clone();
        for i in 1..chained.len() {
            chained[i].prev_hash = chained[i - 1].hash;
        }
        let bytes = encode_record(&envs).unwrap();
        let back = props::record(&bytes);
        prop_assert_eq!(back.as_ref(), Some(&chained));
        prop_assert_eq!(decode_record(&encode_record(&chained).unwrap()).unwrap(), chained);
    }
}
