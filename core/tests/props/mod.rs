//! The properties that the policy parser and the LiteLLM importer must keep on any input.
//! Shared by the fuzz targets (`fuzz/fuzz_targets/*.rs` include this file), the fuzz regression
//! tests and the bounded property tests, so all three check the same thing.
//!
//! Each check panics (fails) when a property is broken and otherwise returns what it produced.

#![allow(dead_code)]

use bursar_core::policy::{parse_policy, LoadedPolicy, PolicyError, MAX_RESERVATION_TTL_SECONDS};
use bursar_core::pricing::{import_litellm, usage_cost, LitellmImport, MAX_PRICE_MICROS_PER_MTOK};
use bursar_schemas::event::{
    decode_record, encode_record, Actor, Envelope, EventBody, Hash32, PolicyApplied,
};
use bursar_schemas::policy::ResolvedPolicy;
use bursar_schemas::pricing::ModelPrice;
use bursar_schemas::wire::Usage;
use serde_json::Value;
use std::collections::BTreeSet;

/// File name the policy checks parse under.
pub const POLICY_FILE: &str = "fuzz.toml";

/// The small LiteLLM file every `[pricing] import = "*.json"` reads.
pub const LITELLM_JSON: &str = r#"{
  "sample_spec": {"input_cost_per_token": 0.0, "mode": "one of: chat, embedding"},
  "acme/house-model": {"input_cost_per_token": 4e-07, "output_cost_per_token": 1.6e-06,
    "litellm_provider": "acme", "max_output_tokens": 8192, "mode": "chat",
    "supports_function_calling": true},
  "acme/long": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
    "input_cost_per_token_above_200k_tokens": 2.5e-06,
    "output_cost_per_token_above_200k_tokens": 1.5e-05,
    "cache_read_input_token_cost": 3.1e-07, "cache_creation_input_token_cost": 1.5e-06,
    "cache_creation_input_token_cost_above_200k_tokens": 3e-06,
    "litellm_provider": "acme", "mode": "chat"},
  "acme/embed": {"input_cost_per_token": 2e-08, "mode": "embedding"},
  "acme/image": {"mode": "image_generation", "output_cost_per_image": 0.04}
}"#;

/// `read_import` of the checks: a `.json` path reads [`LITELLM_JSON`], anything else fails.
pub fn read_import(path: &str) -> Result<String, String> {
    if path.ends_with(".json") {
        Ok(LITELLM_JSON.to_string())
    } else {
        Err(format!("no such file: {path}"))
    }
}

/// `parse_policy` on any text: never panics; every error names the file, a non-empty key, a
/// message and (when it has one) a line of the text; an accepted policy is sane, parses the
/// same way twice, and can be logged (its `policy_applied` envelope round-trips through the log
/// encoding and JSON).
pub fn policy(text: &str) -> Result<LoadedPolicy, Vec<PolicyError>> {
    match parse_policy(text, POLICY_FILE, &read_import) {
        Ok(loaded) => {
            assert_eq!(loaded.source, POLICY_FILE);
            assert_eq!(loaded.source_hash.len(), 64);
            resolved_policy(&loaded.resolved);
            match parse_policy(text, POLICY_FILE, &read_import) {
                Ok(again) => assert_eq!(again, loaded, "parsing is not deterministic"),
                Err(e) => panic!("second parse failed: {e:?}"),
            }
            Ok(loaded)
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "Err without errors");
            let last_line = 1 + text.matches('\n').count();
            for e in &errors {
                assert_eq!(e.file, POLICY_FILE, "{e}");
                assert!(!e.key.trim().is_empty(), "error without a key: {e:?}");
                assert!(
                    !e.message.trim().is_empty(),
                    "error without a message: {e:?}"
                );
                if let Some(line) = e.line {
                    assert!((1..=last_line).contains(&line), "line out of range: {e:?}");
                }
            }
            Err(errors)
        }
    }
}

fn resolved_policy(p: &ResolvedPolicy) {
    assert!((1..=MAX_RESERVATION_TTL_SECONDS).contains(&p.reservation_ttl_seconds));
    assert!(p.max_keys_per_budget >= 1);
    let mut ids = BTreeSet::new();
    for b in &p.budgets {
        assert!(!b.id.is_empty());
        assert!(ids.insert(b.id.as_str()), "duplicate budget id {:?}", b.id);
        if let Some(m) = b.max_micros {
            assert!(m >= 0, "negative limit in {}", b.id);
        }
        if let Some(w) = b.warn_at_ppm {
            assert!((1..=1_000_000).contains(&w));
        }
    }
    for price in p.pricing.models.values() {
        model_price(price);
    }
    // The resolved policy is logged in `policy_applied`: bincode and JSON must both round-trip.
    let body = EventBody::PolicyApplied(PolicyApplied {
        policy_version: 1,
        source: POLICY_FILE.to_string(),
        source_hash: "0".repeat(64),
        policy: p.clone(),
    });
    let env = match Envelope::seal(1, 1, Actor::default(), Hash32::default(), body) {
        Ok(env) => env,
        Err(e) => panic!("policy_applied cannot be sealed: {e}"),
    };
    let bytes = match encode_record(std::slice::from_ref(&env)) {
        Ok(b) => b,
        Err(e) => panic!("policy_applied cannot be encoded: {e}"),
    };
    match decode_record(&bytes) {
        Ok(back) => assert_eq!(back, vec![env], "policy_applied changes through the log"),
        Err(e) => panic!("policy_applied does not decode: {e}"),
    }
    let json = match serde_json::to_string(p) {
        Ok(j) => j,
        Err(e) => panic!("resolved policy is not JSON-encodable: {e}"),
    };
    match serde_json::from_str::<ResolvedPolicy>(&json) {
        Ok(back) => assert_eq!(&back, p, "resolved policy changes through JSON"),
        Err(e) => panic!("resolved policy JSON does not decode: {e}"),
    }
}

fn model_price(p: &ModelPrice) {
    let prices = [
        Some(p.input_per_mtok),
        Some(p.output_per_mtok),
        p.cached_input_per_mtok,
        p.cache_write_per_mtok,
    ];
    let tiers = p.tiers.iter().flat_map(|t| {
        [
            t.input_per_mtok,
            t.output_per_mtok,
            t.cached_input_per_mtok,
            t.cache_write_per_mtok,
        ]
    });
    assert!(
        p.tiers
            .windows(2)
            .all(|w| w[0].above_tokens < w[1].above_tokens),
        "tiers out of order in {p:?}"
    );
    for price in prices.into_iter().chain(tiers).flatten() {
        assert!(
            (0..=MAX_PRICE_MICROS_PER_MTOK).contains(&price),
            "price {price} out of range in {p:?}"
        );
    }
    assert!(!p.provider.trim().is_empty(), "empty provider: {p:?}");
    let most = Usage {
        input_tokens: u64::MAX,
        output_tokens: u64::MAX,
        cached_input_tokens: u64::MAX,
        cache_write_tokens: u64::MAX,
        requests: u64::MAX,
    };
    assert!(usage_cost(p, &most) >= 0);
    assert!(usage_cost(p, &Usage::default()) == 0);
}

/// `import_litellm` on any text: never panics; a JSON object imports, every entry either as a
/// price or as a skip with a reason; every imported model name is a valid label value and every
/// price is in range; anything else is an error with a message.
pub fn litellm(json: &str) -> Result<LitellmImport, String> {
    let parsed = serde_json::from_str::<Value>(json);
    match import_litellm(json) {
        Ok(import) => {
            let Ok(Value::Object(entries)) = parsed else {
                panic!("imported text that is not a JSON object");
            };
            assert_eq!(
                import.table.models.len() + import.skipped.len(),
                entries.len(),
                "an entry was lost or counted twice"
            );
            for (name, price) in &import.table.models {
                assert!(entries.contains_key(name));
                assert!(!name.is_empty() && name.len() <= 256, "{name:?}");
                assert!(!name.chars().any(char::is_control), "{name:?}");
                model_price(price);
            }
            for (name, reason) in &import.skipped {
                assert!(entries.contains_key(name));
                assert!(
                    !import.table.models.contains_key(name),
                    "{name:?} both ways"
                );
                assert!(
                    !reason.trim().is_empty(),
                    "skip of {name:?} without a reason"
                );
            }
            Ok(import)
        }
        Err(e) => {
            assert!(!e.trim().is_empty());
            assert!(
                !matches!(parsed, Ok(Value::Object(_))),
                "a JSON object was refused: {e}"
            );
            Err(e)
        }
    }
}
