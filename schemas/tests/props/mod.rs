//! The properties that bursar's hostile-input decoders of `bursar-schemas` must keep, on any
//! input. Shared by the fuzz targets (`fuzz/fuzz_targets/*.rs` include this file), the fuzz
//! regression tests and the bounded property tests, so all three check the same thing.
//!
//! Each check panics (fails) when a property is broken and otherwise returns what it decoded, so
//! tests can also assert the expected outcome of a particular input.

#![allow(dead_code)]

use bursar_schemas::event::v1::ENVELOPE_VERSION_V1;
use bursar_schemas::event::{decode_record, encode_record, Envelope, ENVELOPE_VERSION};
use bursar_schemas::wire::{decode_request, ErrorCode, Request, WireError, MAX_LINE_BYTES};
use serde_json::Value;

/// `decode_request` on any bytes: never panics; an `Ok` request re-encodes
/// (`Request::to_json`) to a line that decodes to an equal request; an error has a code that
/// fits the input, a message, and a non-empty field when it names one; the `req` echo is the
/// line's `req` whenever the line is a JSON object.
pub fn request_line(line: &[u8]) -> Result<Request, WireError> {
    let outcome = decode_request(line);
    let parsed_req = if line.len() <= MAX_LINE_BYTES {
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(mut map)) => Some(map.remove("req")),
            _ => None,
        }
    } else {
        None
    };
    match outcome {
        Ok(decoded) => {
            let Some(expected_req) = parsed_req else {
                panic!("decoded a line that is not a JSON object: {line:?}");
            };
            assert_eq!(decoded.req, expected_req, "req echo differs");
            let json = decoded.request.to_json();
            assert_eq!(
                json.get("op").and_then(Value::as_str),
                Some(decoded.request.op()),
                "to_json names another op: {json}"
            );
            let again = json.to_string().into_bytes();
            // A request that re-encodes longer than a line may (defaults filled in, numbers
            // written out) cannot be sent back; everything else must round-trip.
            if again.len() <= MAX_LINE_BYTES {
                match decode_request(&again) {
                    Ok(back) => {
                        assert_eq!(
                            back.request,
                            decoded.request,
                            "round trip through {} changed the request",
                            String::from_utf8_lossy(&again)
                        );
                        assert_eq!(back.req, None);
                    }
                    Err((e, _)) => panic!(
                        "re-encoded request {} does not decode: {e}",
                        String::from_utf8_lossy(&again)
                    ),
                }
            }
            Ok(decoded.request)
        }
        Err((error, req)) => {
            assert!(!error.message.trim().is_empty(), "empty message: {error:?}");
            if let Some(field) = &error.field {
                assert!(!field.is_empty(), "empty field name: {error:?}");
            }
            match error.code {
                ErrorCode::TooLarge => assert!(line.len() > MAX_LINE_BYTES, "{error:?}"),
                ErrorCode::BadRequest | ErrorCode::UnknownOp => {
                    assert!(line.len() <= MAX_LINE_BYTES, "{error:?}");
                }
                other => panic!("decoding cannot fail with {other:?}: {error:?}"),
            }
            // A duplicated `req` (or one holding a duplicate key) is not echoed: which of its
            // values would be the echo?
            let req_named_twice = error
                .field
                .as_deref()
                .is_some_and(|f| f == "req" || f.starts_with("req."))
                && error.message.contains("more than once");
            match parsed_req {
                Some(_) if req_named_twice => assert_eq!(req, None, "{error:?}"),
                Some(expected) => assert_eq!(req, expected, "req echo lost on error {error:?}"),
                None => assert_eq!(req, None, "req echoed from a non-object line"),
            }
            Err(error)
        }
    }
}

/// `decode_record` on any bytes: never panics; decoded envelopes carry a version this build
/// reads and can be hashed; they re-encode to a record that decodes to the same envelopes, and
/// that re-encoding is canonical (encoding the decoded envelopes again gives the same bytes).
///
/// Re-encoding does NOT in general reproduce the input bytes: bincode's varints accept
/// non-minimal forms (`251, 5, 0` is 5 as well as `5`), and a label map stored with keys out of
/// order or repeated decodes into the same `BTreeMap` as the sorted one. In a record of format
/// 1 neither changes the chain hash (computed over the canonical encoding); in format 2 the
/// hash covers the bytes as stored, so such a record no longer verifies.
pub fn record(bytes: &[u8]) -> Option<Vec<Envelope>> {
    match decode_record(bytes) {
        Ok(envs) => {
            for env in &envs {
                assert!(
                    env.version == ENVELOPE_VERSION || env.version == ENVELOPE_VERSION_V1,
                    "{env:?}"
                );
                if let Err(e) = env.compute_hash() {
                    panic!("decoded envelope cannot be hashed: {e}");
                }
            }
            let again = match encode_record(&envs) {
                Ok(b) => b,
                Err(e) => panic!("decoded envelopes do not re-encode: {e}"),
            };
            match decode_record(&again) {
                Ok(back) => assert_eq!(back, envs, "decode(encode(x)) != x"),
                Err(e) => panic!("re-encoded record does not decode: {e}"),
            }
            match encode_record(&envs) {
                Ok(third) => assert_eq!(third, again, "encoding is not deterministic"),
                Err(e) => panic!("second encoding failed: {e}"),
            }
            Some(envs)
        }
        Err(e) => {
            assert!(!e.to_string().trim().is_empty());
            None
        }
    }
}

/// A chain of envelopes with one of every event body, like the daemon writes.
pub fn sample_envelopes() -> Vec<Envelope> {
    use bursar_schemas::event::*;
    use bursar_schemas::policy::*;
    use bursar_schemas::pricing::{ModelPrice, PriceTable};
    use bursar_schemas::wire::Usage;
    use bursar_schemas::Labels;

    let labels = Labels::from([
        ("model".to_string(), "gpt-4o".to_string()),
        ("team".to_string(), "search".to_string()),
    ]);
    let price = ModelPrice {
        provider: "openai".into(),
        input_per_mtok: 2_500_000,
        output_per_mtok: 10_000_000,
        cached_input_per_mtok: Some(1_250_000),
        cache_write_per_mtok: None,
        tiers: vec![
            bursar_schemas::pricing::PriceTier {
                above_tokens: 200_000,
                input_per_mtok: Some(5_000_000),
                output_per_mtok: None,
                cached_input_per_mtok: None,
                cache_write_per_mtok: Some(7_500_000),
            },
            bursar_schemas::pricing::PriceTier {
                above_tokens: 1_000_000,
                input_per_mtok: Some(9_000_000),
                output_per_mtok: Some(30_000_000),
                cached_input_per_mtok: None,
                cache_write_per_mtok: None,
            },
        ],
        max_output_tokens: Some(16_384),
        capabilities: vec!["tools".into(), "vision".into()],
    };
    let pricing = PriceTable {
        models: [("gpt-4o".to_string(), price)].into(),
    };
    let policy = ResolvedPolicy {
        reservation_ttl_seconds: 300,
        max_keys_per_budget: 100_000,
        idempotency_window_seconds: 7200,
        unknown_models: UnknownModels::PriceAtMax,
        tiers: ResolvedTiers {
            default: "small".into(),
            patterns: vec![("gpt-4o*".into(), "frontier".into())],
            caps: [(
                "frontier".to_string(),
                ResolvedTierCap {
                    max_call_micros: Some(500_000),
                    max_call_output_tokens: Some(16_000),
                },
            )]
            .into(),
            defs: vec![bursar_schemas::policy::TierDef {
                id: "frontier".into(),
                origin: bursar_schemas::policy::TierOrigin::Defined,
                display_name: Some("Frontier".into()),
                description: Some("the best".into()),
                price_range: Some(bursar_schemas::policy::TierPriceRange {
                    min_input_per_mtok: 2_000_000,
                    max_input_per_mtok: 20_000_000,
                }),
                color: Some("#6a1b9a".into()),
                icon: None,
            }],
        },
        budgets: vec![ResolvedBudget {
            id: "team-daily".into(),
            match_labels: [("org".to_string(), "acme".to_string())].into(),
            group_by: vec!["team".into()],
            window: WindowSpec::Calendar {
                unit: CalendarUnit::Month,
                utc_offset_seconds: -19_800,
            },
            max_micros: Some(50_000_000),
            max_tokens: Some(5_000_000),
            max_requests: None,
            max_concurrent: Some(8),
            warn_at_ppm: Some(900_000),
            enforce: Enforce::Warn,
        }],
        pricing: pricing.clone(),
        report_exclude_labels: vec!["session".into()],
        subscriptions: Vec::new(),
        quotas: Vec::new(),
    };
    let bodies = vec![
        EventBody::PolicyApplied(PolicyApplied {
            policy_version: 1,
            source: "bursar.toml".into(),
            source_hash: "ab".repeat(32),
            policy,
        }),
        EventBody::UsageRecorded(UsageRecorded {
            event_id: "e-1".into(),
            reservation_id: Some("r-1".into()),
            reservation: ReservationLink::Known,
            late: true,
            labels: labels.clone().into(),
            model: "gpt-4o".into(),
            usage: Usage {
                input_tokens: 1200,
                output_tokens: 300,
                cached_input_tokens: 70_000,
                cache_write_tokens: 5,
                requests: 1,
            },
            occurred_at: Some("2026-11-23T10:00:00Z".into()),
            reported_cost_usd: Some("0.006".into()),
            payload_digest: [7; 16],
            receipt: Some(Receipt {
                policy_version: 1,
                lines: vec![ReceiptLine {
                    budget: 0,
                    overflow: false,
                    spent_micros: 1_206_000,
                    spent_tokens: 71_505,
                    spent_requests: 3,
                    held_micros: 11_000,
                    held_tokens: 2_000,
                    held_requests: 1,
                    live_holds: 1,
                }],
                cost_micros: 6_000,
                priced_at_max: false,
                overrun_micros: Some(-5),
                decision: None,
                skipped: Vec::new(),
                message: None,
            }),
        }),
        EventBody::ReservationCreated(ReservationCreated {
            reservation_id: "r-1".into(),
            labels: labels.clone().into(),
            model: "gpt-4o".into(),
            input_tokens: 1200,
            max_output_tokens: 800,
            hold_micros: 11_000,
            expires_at: 1_790_000_000_000_000,
            payload_digest: [1; 16],
            receipt: None,
        }),
        EventBody::ReservationDenied(ReservationDenied {
            reservation_id: "r-2".into(),
            labels: labels.clone().into(),
            model: "o3".into(),
            hold_micros: 99_000_000,
            reason: "budget".into(),
            budget: Some("team-daily".into()),
            key: Some("team=search".into()),
            payload_digest: [2; 16],
            max_output_tokens: 100_000,
            receipt: Some(Receipt {
                policy_version: 3,
                lines: Vec::new(),
                cost_micros: 0,
                priced_at_max: true,
                overrun_micros: None,
                decision: Some(bursar_schemas::wire::Decision::Deny),
                skipped: vec![bursar_schemas::wire::Skipped {
                    model: "gpt-4o".into(),
                    reason: bursar_schemas::wire::SkipReason::TierCap,
                    detail: "worst case \"1\" exceeds".into(),
                }],
                message: Some("budget team-daily would exceed max_usd".into()),
            }),
        }),
        EventBody::ReservationReleased(ReservationReleased {
            reservation_id: "r-1".into(),
            reason: "cancelled".into(),
            payload_digest: [3; 16],
        }),
        EventBody::ReservationExtended(ReservationExtended {
            reservation_id: "r-1".into(),
            expires_at: -1,
        }),
        EventBody::ReservationExpired(ReservationExpired {
            reservation_id: "r-1".into(),
        }),
        EventBody::BudgetWarned(BudgetCrossing {
            budget: "team-daily".into(),
            key: "team=search".into(),
            window_start: 1_789_948_800_000_000,
            spent_micros: 45_000_000,
            held_micros: 11_000,
            utilization_ppm: 900_220,
        }),
        EventBody::BudgetExhausted(BudgetCrossing {
            budget: "total".into(),
            key: String::new(),
            window_start: 0,
            spent_micros: i64::MAX,
            held_micros: i64::MIN,
            utilization_ppm: u64::MAX,
        }),
        EventBody::PricingChanged(PricingChanged {
            effective_from: 1_789_948_800_000_000,
            pricing,
        }),
        EventBody::QuotaObserved(QuotaObserved {
            quota: "openai-prod".into(),
            provider: "openai".into(),
            labels: [("account".to_string(), "prod".to_string())].into(),
            event_id: Some("e-9".into()),
            requests: Some(ObservedLimit {
                limit: Some(10_000),
                remaining: 0,
                reset_at: 1_789_948_800_020_000,
            }),
            tokens: Some(ObservedLimit {
                limit: None,
                remaining: u64::MAX,
                reset_at: i64::MIN,
            }),
            input_tokens: None,
            output_tokens: None,
            ignored: vec![IgnoredHeader {
                header: "x-ratelimit-reset-tokens".into(),
                value: "soon".into(),
                reason: "not a duration such as 6m0s, 1s or 20ms".into(),
            }],
        }),
        EventBody::QuotaExhausted(QuotaExhausted {
            quota: "openai-prod".into(),
            limit: "requests".into(),
            observed_seq: 12,
            reset_at: 1_789_948_800_020_000,
        }),
        // A commit of a denied reservation: no hold, no receipt (events of envelope version 1
        // have none). Last, so the others keep their places.
        EventBody::UsageRecorded(UsageRecorded {
            event_id: "e-2".into(),
            reservation_id: Some("r-denied".into()),
            reservation: ReservationLink::Denied,
            late: false,
            labels: labels.clone().into(),
            model: "gpt-4o".into(),
            usage: Usage {
                input_tokens: 10,
                output_tokens: 3,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                requests: 1,
            },
            occurred_at: None,
            reported_cost_usd: None,
            payload_digest: [8; 16],
            receipt: None,
        }),
    ];
    let mut prev = Hash32::default();
    let mut out = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let actor = Actor {
            uid: 1000,
            gid: 1000,
            pid: u32::MAX,
        };
        match Envelope::seal(seq, 1_789_990_000_000_000 + seq as i64, actor, prev, body) {
            Ok(env) => {
                prev = env.hash;
                out.push(env);
            }
            Err(e) => panic!("sample envelope cannot be sealed: {e}"),
        }
    }
    out
}

/// An event as a format-2 record stores it: its hash and its bytes.
pub type Stored = ([u8; 32], Vec<u8>);

/// The events of a format-2 record as stored: `(hash, body)` each, after the tag and the
/// previous hash (`bursar_schemas::event`'s layout: LEB128 count, then LEB128 length, 32-byte
/// hash and bytes for each event).
pub fn split_record(bytes: &[u8]) -> (Vec<u8>, Vec<Stored>) {
    fn leb(bytes: &[u8], at: &mut usize) -> usize {
        let (mut v, mut shift) = (0usize, 0);
        loop {
            let b = bytes[*at];
            *at += 1;
            v |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }
    let head = bytes[..33].to_vec();
    let mut at = 33;
    let n = leb(bytes, &mut at);
    let events = (0..n)
        .map(|_| {
            let len = leb(bytes, &mut at);
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&bytes[at..at + 32]);
            at += 32;
            let body = bytes[at..at + len].to_vec();
            at += len;
            (hash, body)
        })
        .collect();
    assert_eq!(at, bytes.len());
    (head, events)
}

pub fn join_record(head: &[u8], events: &[Stored]) -> Vec<u8> {
    fn leb(out: &mut Vec<u8>, mut v: usize) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let mut out = head.to_vec();
    leb(&mut out, events.len());
    for (hash, body) in events {
        leb(&mut out, body.len());
        out.extend_from_slice(hash);
        out.extend_from_slice(body);
    }
    out
}
