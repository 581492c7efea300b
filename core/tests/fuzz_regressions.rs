//! Inputs found or kept by fuzzing (`fuzz/README.md`), replayed in the normal test suite: every
//! file under `tests/fuzz-regressions/<target>/` must keep the target's properties
//! (`tests/props/mod.rs`), and the findings are pinned down by name below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_core::policy::TOP_LEVEL_KEY;
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-regressions");

/// Every kept input of one target, by file name, sorted.
fn kept(target: &str) -> Vec<(String, String)> {
    let dir = Path::new(DIR).join(target);
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no inputs in {}", dir.display());
    out
}

fn kept_one(target: &str, name: &str) -> String {
    std::fs::read_to_string(Path::new(DIR).join(target).join(name)).unwrap()
}

#[test]
fn every_kept_policy_keeps_the_parser_properties() {
    let mut accepted = 0;
    for (name, text) in kept("policy_parse") {
        match std::panic::catch_unwind(|| props::policy(&text)) {
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!("policy_parse/{name} breaks a property"),
        }
    }
    assert!(accepted >= 3, "only {accepted} kept policies parse");
}

#[test]
fn every_kept_litellm_file_keeps_the_importer_properties() {
    let mut imported = 0;
    for (name, text) in kept("litellm_import") {
        match std::panic::catch_unwind(|| props::litellm(&text)) {
            Ok(Ok(import)) => imported += import.table.models.len(),
            Ok(Err(_)) => {}
            Err(_) => panic!("litellm_import/{name} breaks a property"),
        }
    }
    assert!(
        imported >= 3,
        "only {imported} models imported from the kept files"
    );
}

/// Finding 1 (crash of `policy_parse` within a minute): a TOML syntax error on a line with no
/// `=` and no table header was reported with an empty key (`fuzz.toml:8: : expected ...`).
#[test]
fn a_syntax_error_on_a_line_without_a_key_names_the_table_in_force() {
    let text = kept_one("policy_parse", "syntax-error-line-without-key.toml");
    let errors = props::policy(&text).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(8));
    // The only `[` header text above line 8 is inside a comment: no table is in force.
    assert_eq!(errors[0].key, TOP_LEVEL_KEY);

    let errors = props::policy("[daemon]\nsocket = \"s\"\ngarbage\n").unwrap_err();
    assert_eq!(
        (errors[0].line, errors[0].key.as_str()),
        (Some(3), "daemon")
    );
    let errors = props::policy("[[budget]]\nid = \"a\"\n\n= 5\n").unwrap_err();
    assert_eq!(
        (errors[0].line, errors[0].key.as_str()),
        (Some(4), "budget")
    );
    // Above the first header there is no table to name.
    let errors = props::policy("garbage\n[daemon]\n").unwrap_err();
    assert_eq!(
        (errors[0].line, errors[0].key.as_str()),
        (Some(1), TOP_LEVEL_KEY)
    );
    assert_eq!(
        errors[0].to_string(),
        format!("fuzz.toml:1: {TOP_LEVEL_KEY}: {}", errors[0].message)
    );
    // A line that has a key still names it, as before.
    let errors = props::policy("[daemon]\ndata_dir = \n").unwrap_err();
    assert_eq!(errors[0].key, "data_dir");
}

/// Finding 2 (from the bounded property test of request lines, then checked against the real
/// LiteLLM file): serde_json's default float parsing is "best effort" and can be one ulp off.
/// 11 of the 18,644 float prices in LiteLLM's file parsed to a neighbour of the value their text
/// denotes, e.g. databricks-claude-sonnet-4-1's `2.9999900000000002e-06` as `2.99999e-06`, which
/// imported as 2,999,990 instead of 2,999,991 micro-USD per Mtok (an under-charge, where the
/// importer promises to round up). Fixed by serde_json's `float_roundtrip` feature.
#[test]
fn litellm_prices_are_parsed_to_the_float_their_text_denotes() {
    let json = r#"{"databricks/databricks-claude-sonnet-4-1": {
        "cache_creation_input_token_cost": 3.74997e-06,
        "cache_read_input_token_cost": 3.0002e-07,
        "input_cost_per_token": 2.9999900000000002e-06,
        "output_cost_per_token": 1.5000049999999999e-05,
        "litellm_provider": "databricks", "mode": "chat"}}"#;
    let import = props::litellm(json).unwrap();
    let p = &import.table.models["databricks/databricks-claude-sonnet-4-1"];
    assert_eq!(p.input_per_mtok, 2_999_991);
    assert_eq!(p.output_per_mtok, 15_000_050);
    assert_eq!(p.cached_input_per_mtok, Some(300_020));
    assert_eq!(p.cache_write_per_mtok, Some(3_749_970));
}

#[test]
fn hostile_policy_shapes_are_errors_with_keys() {
    for (text, key) in [
        // Nesting deeper than the TOML parser's recursion limit.
        (format!("a = {}1{}\n", "[".repeat(200), "]".repeat(200)), None),
        // Huge and negative numbers where whole numbers are expected.
        ("[daemon]\nreservation_ttl_seconds = -1\n".to_string(), Some("daemon.reservation_ttl_seconds")),
        ("[[budget]]\nid = \"b\"\nmax_usd = 1e300\n".to_string(), Some("budget[0].max_usd")),
        ("[[budget]]\nid = \"b\"\nmax_usd = nan\n".to_string(), Some("budget[0].max_usd")),
        ("[[budget]]\nid = \"b\"\nwarn_at = inf\nmax_tokens = 1\n".to_string(), Some("budget[0].warn_at")),
        ("[[budget]]\nid = \"b\"\nwindow = \"fixed\"\nwindow_seconds = 10\nwindow_offset_seconds = -9223372036854775808\n".to_string(),
         Some("budget[0].window_offset_seconds")),
        ("[[budget]]\nid = \"b\"\nwindow = \"rolling\"\nwindow_seconds = 3153600000\nresolution_seconds = 1\n".to_string(),
         Some("budget[0].resolution_seconds")),
        ("[[budget]]\nid = \"b\"\nwindow = \"calendar\"\ncalendar = \"day\"\nutc_offset = \"+\u{e9}:00\"\n".to_string(),
         Some("budget[0].utc_offset")),
        ("[pricing]\nimport = \"prices.txt\"\n".to_string(), Some("pricing.import")),
        ("[pricing.models.\"\"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n".to_string(), Some("pricing.models.\"\"")),
        ("[tiers.caps.\"\\u0000\"]\nmax_call_usd = 1\n".to_string(), Some("tiers.caps.\"\\u0000\"")),
    ] {
        let errors = props::policy(&text).unwrap_err();
        if let Some(key) = key {
            assert!(errors.iter().any(|e| e.key == key), "{text:?}: {errors:#?}");
        }
    }
}

#[test]
fn the_fixed_import_file_merges_into_the_builtin_table() {
    let loaded = props::policy("[pricing]\nimport = \"prices.json\"\n").unwrap();
    let models = &loaded.resolved.pricing.models;
    assert_eq!(models["acme/house-model"].input_per_mtok, 400_000);
    assert_eq!(
        models["acme/long"]
            .tiers
            .iter()
            .map(|t| t.above_tokens)
            .collect::<Vec<_>>(),
        vec![200_000]
    );
    assert_eq!(
        models["acme/long"]
            .tiers
            .first()
            .and_then(|t| t.cache_write_per_mtok),
        Some(3_000_000)
    );
    assert!(models.contains_key("gpt-4o"));
    assert!(!models.contains_key("acme/image"));
}

/// Finding 2 (`policy_parse`): a key without a value at the end of the file (`C=`) is a TOML
/// error for which toml_edit gives an empty message, so the error read `fuzz.toml:1: C: `.
#[test]
fn a_key_without_a_value_at_the_end_of_the_file_has_a_message() {
    let text = kept_one("policy_parse", "key-without-value-at-eof.toml");
    for text in [text.as_str(), "C=", "[daemon]\nsocket ="] {
        let errors = props::policy(text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("missing"), "{:?}", errors[0]);
    }
    let errors = props::policy("[daemon]\nsocket =").unwrap_err();
    assert_eq!(
        (errors[0].line, errors[0].key.as_str()),
        (Some(2), "socket")
    );
}
