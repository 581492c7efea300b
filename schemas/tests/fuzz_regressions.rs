//! Inputs found or kept by fuzzing (`fuzz/README.md`), replayed in the normal test suite: every
//! file under `tests/fuzz-regressions/<target>/` must keep the target's properties
//! (`tests/props/mod.rs`), and the findings are pinned down by name below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_schemas::event::{
    decode_record, decode_record_checked, encode_record, CodecError, RECORD_FORMAT_V1,
    RECORD_FORMAT_V2,
};
use bursar_schemas::wire::{ErrorCode, Request};
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-regressions");

/// Every kept input of one target, by file name, sorted.
fn kept(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(DIR).join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no inputs in {}", dir.display());
    out
}

fn kept_one(target: &str, name: &str) -> Vec<u8> {
    std::fs::read(Path::new(DIR).join(target).join(name)).unwrap()
}

#[test]
fn every_kept_request_line_keeps_the_decoder_properties() {
    let mut decoded = 0;
    for (name, bytes) in kept("decode_request") {
        let outcome = std::panic::catch_unwind(|| props::request_line(&bytes));
        match outcome {
            Ok(Ok(_)) => decoded += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!("decode_request/{name} breaks a property"),
        }
    }
    // The kept corpus must keep exercising the success path, not only errors.
    assert!(decoded >= 10, "only {decoded} kept request lines decode");
}

#[test]
fn every_kept_record_keeps_the_decoder_properties() {
    let mut decoded = 0;
    for (name, bytes) in kept("decode_record") {
        match std::panic::catch_unwind(|| props::record(&bytes)) {
            Ok(Some(_)) => decoded += 1,
            Ok(None) => {}
            Err(_) => panic!("decode_record/{name} breaks a property"),
        }
    }
    assert!(decoded >= 5, "only {decoded} kept records decode");
}

/// Finding (by design, documented): bincode's varints accept non-minimal forms, so a record can
/// decode to envelopes whose encoding is other bytes. The envelopes round-trip; the bytes do not.
#[test]
fn a_non_minimal_varint_decodes_to_the_envelopes_of_its_canonical_form() {
    let bytes = kept_one("decode_record", "noncanonical-varint-seq");
    let envs = props::record(&bytes).expect("the fuzzer's record decodes");
    let canonical = encode_record(&envs).unwrap();
    assert_ne!(canonical, bytes);
    assert!(canonical.len() < bytes.len());
    assert_eq!(decode_record(&canonical).unwrap(), envs);

    // The same in a record of format 2, whose chain hash covers the bytes as stored: the
    // envelope's version written as a u16 varint (`251, 2, 0`) instead of one byte decodes to the
    // same event, but its bytes no longer hash to the stored hash, so the chain check fails.
    let env = props::sample_envelopes()[4].clone();
    let canonical = encode_record(std::slice::from_ref(&env)).unwrap();
    let (padded, at) = with_content_rewritten(&canonical, |content| {
        assert_eq!(content[0], 2, "version 2 in one byte");
        let mut c = vec![251, 2, 0];
        c.extend_from_slice(&content[1..]);
        c
    });
    let back = props::record(&padded).expect("non-minimal varints decode");
    assert_eq!(back, vec![env.clone()]);
    let checked = decode_record_checked(&padded).unwrap();
    assert_ne!(
        checked[0].content_hash, env.hash,
        "{at}: the stored bytes changed"
    );
    assert_eq!(
        decode_record_checked(&canonical).unwrap()[0].content_hash,
        env.hash
    );
}

/// A format-2 record of one envelope with its content bytes rewritten by `f` (the length
/// prefix follows); also the offset of the content.
fn with_content_rewritten(record: &[u8], f: impl FnOnce(&[u8]) -> Vec<u8>) -> (Vec<u8>, usize) {
    assert_eq!(record[0], RECORD_FORMAT_V2);
    let (head, mut events) = props::split_record(record);
    assert_eq!(events.len(), 1, "one envelope");
    events[0].1 = f(&events[0].1);
    let out = props::join_record(&head, &events);
    // The content is the record's last bytes.
    let content_at = out.len() - events[0].1.len();
    (out, content_at)
}

/// Position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:?} not found"))
}

/// Same finding for maps: label pairs stored out of order (or repeated) decode into the same
/// `BTreeMap` as the sorted pairs, so only `decode(encode(x)) == x` holds, not byte identity;
/// and since format 2 hashes the bytes stored, neither verifies.
#[test]
fn label_pairs_out_of_order_or_repeated_decode_into_the_canonical_map() {
    let env = props::sample_envelopes()[1].clone(); // usage_recorded, labels model + team
    let canonical = encode_record(std::slice::from_ref(&env)).unwrap();
    let model: &[u8] = b"\x05model\x06gpt-4o";
    let team: &[u8] = b"\x04team\x06search";
    let at = find(&canonical, model);
    assert_eq!(
        &canonical[at + model.len()..at + model.len() + team.len()],
        team
    );

    let mut swapped = canonical.clone();
    swapped[at..at + team.len()].copy_from_slice(team);
    swapped[at + team.len()..at + team.len() + model.len()].copy_from_slice(model);
    assert_ne!(swapped, canonical);
    let back = props::record(&swapped).expect("swapped labels decode");
    assert_eq!(back, vec![env.clone()]);
    assert_eq!(encode_record(&back).unwrap(), canonical);
    let checked = decode_record_checked(&swapped).unwrap();
    assert_ne!(
        checked[0].content_hash, env.hash,
        "swapped bytes do not verify"
    );

    // Both pairs named `model`: the map keeps the later one, and the hash no longer matches,
    // so `verify` fails.
    let (repeated, _) = with_content_rewritten(&canonical, |content| {
        let at = find(content, model);
        let mut c = content[..at].to_vec();
        c.extend_from_slice(model);
        c.extend_from_slice(b"\x05model\x06gpt-4x");
        c.extend_from_slice(&content[at + model.len() + team.len()..]);
        c
    });
    let back = props::record(&repeated).expect("repeated label keys decode");
    let labels = back[0].body.labels().unwrap();
    assert_eq!(labels.len(), 1);
    assert_eq!(labels["model"], "gpt-4x", "the later duplicate wins");
    let checked = decode_record_checked(&repeated).unwrap();
    assert_ne!(checked[0].content_hash, checked[0].env.hash);
}

#[test]
fn huge_length_prefixes_are_errors_without_allocating_them() {
    // Vec<Envelope> of u64::MAX elements; a string of 2^40 bytes inside the first envelope.
    let mut bytes = vec![RECORD_FORMAT_V1, 253];
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(decode_record(&bytes), Err(CodecError::Decode(_))));
    let first = encode_record(&props::sample_envelopes()[4..5]).unwrap(); // reservation_released
    let at = find(&first, b"\x03r-1");
    let mut bytes = first[..at].to_vec();
    bytes.push(253);
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bytes.extend_from_slice(&first[at + 1..]);
    assert!(props::record(&bytes).is_none());
}

/// Request shapes the fuzzer kept as interesting, with their outcome pinned.
#[test]
fn interesting_request_shapes_decode_or_fail_as_pinned() {
    // An i64-overflowing integer price is a float dollar amount and round-trips as one.
    let r = props::request_line(
        br#"{"op":"replay","pricing":{"models":{"m":{"input_per_mtok":18446744073709551615}}}}"#,
    );
    assert!(matches!(r, Ok(Request::Replay(_))), "{r:?}");
    // Nulls are absent: `to_json` drops them and decoding treats them the same.
    let r = props::request_line(br#"{"op":"status","labels":null,"budget":null,"req":null}"#);
    assert_eq!(r, Ok(Request::Status(Default::default())));
    // A `req` is echoed even when the op is unknown or the body is bad.
    let e = props::request_line(br#"{"req":{"a":[1]},"op":"\u0000"}"#).unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownOp);
    // Duplicate keys are refused (SPEC §6, revision 2; the last one used to win).
    let e = props::request_line(br#"{"op":"verify","op":"tail","follow":true}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("op"));
}

/// Finding (bounded property test `well_formed_requests_decode_and_round_trip`): serde_json's
/// default float parsing is best effort and may land one ulp off, so a replay price above
/// `i64::MAX` (decoded as a float) re-encoded and decoded to a neighbouring float. Fixed by
/// serde_json's `float_roundtrip` feature (workspace `Cargo.toml`); see also core's
/// `litellm_prices_are_parsed_to_the_float_their_text_denotes`.
#[test]
fn a_float_price_in_a_replay_request_round_trips_bit_for_bit() {
    use bursar_schemas::policy::Dollars;
    let line = kept_one("decode_request", "float-roundtrip-u64-price");
    let Ok(Request::Replay(replay)) = props::request_line(&line) else {
        panic!("the replay request does not decode");
    };
    let price = replay.pricing.models[""].output_per_mtok.clone();
    assert_eq!(
        price,
        Some(Dollars::Float(10_545_461_331_775_693_825_u64 as f64))
    );
    // Every finite float a client can send comes back as the same float.
    for f in [
        1.0545461331775694e19,
        2.9999900000000002e-06,
        5e-324,
        f64::MAX,
        0.1 + 0.2,
    ] {
        let line = format!(
            r#"{{"op":"replay","pricing":{{"models":{{"m":{{"input_per_mtok":{f:e}}}}}}}}}"#
        );
        let Ok(Request::Replay(r)) = props::request_line(line.as_bytes()) else {
            panic!("{line} does not decode");
        };
        let Some(Dollars::Float(got)) = r.pricing.models["m"].input_per_mtok else {
            panic!("{line}: not a float");
        };
        assert_eq!(got.to_bits(), f.to_bits(), "{line}");
    }
}

/// Finding (`decode_request`, 10-minute run with the dictionary): an empty key in the body of
/// `verify` or `reload` was reported as `field: ""`, a field that names nothing. It now has no
/// field, as an empty unknown key of any other op already had.
#[test]
fn an_empty_unknown_key_is_not_reported_as_an_empty_field() {
    let line = kept_one("decode_request", "empty-unknown-key-in-bodyless-op");
    let e = props::request_line(&line).unwrap_err();
    assert_eq!((e.code, e.field), (ErrorCode::BadRequest, None));
    assert!(e.message.contains("unknown field"), "{}", e.message);
    for line in [
        r#"{"op":"verify","":1}"#,
        r#"{"op":"hello","":1}"#,
        r#"{"":1,"op":"tail"}"#,
    ] {
        let e = props::request_line(line.as_bytes()).unwrap_err();
        assert_eq!(e.field, None, "{line}");
    }
    // A non-empty unknown key is still named.
    let e = props::request_line(br#"{"op":"verify","deep":true}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("deep"));
}
