//! Bounded property tests of the policy parser and the LiteLLM importer, the CI-sized versions
//! of the fuzz targets (`fuzz/`): the same properties (`tests/props/mod.rs`) on arbitrary text,
//! TOML-shaped policy files and JSON-shaped price files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use proptest::prelude::*;

const HEADERS: &[&str] = &[
    "[daemon]",
    "[pricing]",
    "[pricing.models.\"gpt-4o\"]",
    "[pricing.models.\"new-model\"]",
    "[pricing.models.\"\"]",
    "[tiers]",
    "[tiers.caps.small]",
    "[tiers.caps.frontier]",
    "[[budget]]",
    "[[tiers.patterns]]",
    "[budget]",
    "[\"daemon\"]",
];

const KEYS: &[&str] = &[
    "socket",
    "data_dir",
    "socket_mode",
    "socket_group",
    "admin_uids",
    "reservation_ttl_seconds",
    "max_keys_per_budget",
    "unknown_models",
    "metrics_listen",
    "metrics_max_buckets",
    "import",
    "provider",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "above_tokens",
    "input_per_mtok_above",
    "cache_write_per_mtok_above",
    "output_per_mtok_above",
    "cached_input_per_mtok_above",
    "max_output_tokens",
    "capabilities",
    "default",
    "patterns",
    "max_call_usd",
    "max_call_output_tokens",
    "id",
    "match",
    "group_by",
    "window",
    "window_seconds",
    "window_offset_seconds",
    "resolution_seconds",
    "calendar",
    "utc_offset",
    "max_usd",
    "max_tokens",
    "max_requests",
    "max_concurrent",
    "warn_at",
    "enforce",
    "tier",
    "models.x",
    "\"quoted key\"",
    "team",
];

const WORDS: &[&str] = &[
    "\"deny\"",
    "\"warn\"",
    "\"price_at_max\"",
    "\"fixed\"",
    "\"rolling\"",
    "\"calendar\"",
    "\"cumulative\"",
    "\"day\"",
    "\"week\"",
    "\"month\"",
    "\"+02:00\"",
    "\"-05:30\"",
    "\"+24:00\"",
    "\"0600\"",
    "\"0o777\"",
    "\"1777\"",
    "\"prices.json\"",
    "\"prices.txt\"",
    "\"12.50\"",
    "\"0.0000001\"",
    "\"-1\"",
    "\"\"",
    "\"*\"",
    "\"gpt-4o*\"",
    "\"?\"",
    "\"small\"",
    "\"frontier\"",
    "\"team-daily\"",
    "\"Bad Id\"",
    "true",
    "false",
    "nan",
    "inf",
    "-inf",
    "1979-05-27T07:32:00Z",
    "0.9",
    "1.5",
    "-0.0",
    "1e300",
    "0.1234567",
];

fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        prop::sample::select(WORDS).prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "\"\\PC{0,10}\"".prop_map(|s| s.replace('\\', "\\\\")),
    ];
    scalar.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..3).prop_map(|kv| {
                let pairs: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", pairs.join(", "))
            }),
        ]
    })
}

fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(HEADERS).prop_map(str::to_string),
        8 => (prop::sample::select(KEYS), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "\\PC{0,20}",
        1 => Just(String::new()),
        1 => Just("# comment".to_string()),
    ]
}

/// A policy file that starts from a valid budget, so that validation (not only the TOML
/// parser) is exercised.
fn toml_file() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(toml_line(), 0..14)).prop_map(|(budget, lines)| {
        let mut text = if budget {
            "[[budget]]\nid = \"b\"\nmax_usd = 5\n".to_string()
        } else {
            String::new()
        };
        text.push_str(&lines.join("\n"));
        text.push('\n');
        text
    })
}

/// Valid policy files with generated numbers: they parse, or fail with keyed errors.
fn mostly_valid_file() -> impl Strategy<Value = String> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        prop::option::of(1u64..200_000),
        0u32..=1_000_001,
        prop::sample::select(vec!["fixed", "rolling", "calendar", "cumulative"]),
        any::<u32>(),
    )
        .prop_map(|(ttl, seconds, offset, resolution, warn_ppm, window, usd)| {
            let mut text = format!(
                "[daemon]\nreservation_ttl_seconds = {}\n[[budget]]\nid = \"b\"\nwindow = \"{window}\"\nmax_usd = {usd}\nwarn_at = {}\n",
                ttl % 100_000,
                f64::from(warn_ppm) / 1e6,
            );
            if matches!(window, "fixed" | "rolling") {
                text.push_str(&format!("window_seconds = {}\n", seconds % 4_000_000_000));
            }
            if window == "fixed" {
                text.push_str(&format!("window_offset_seconds = {offset}\n"));
            }
            if let (Some(r), "rolling") = (resolution, window) {
                text.push_str(&format!("resolution_seconds = {r}\n"));
            }
            if window == "calendar" {
                text.push_str("calendar = \"week\"\nutc_offset = \"-05:30\"\n");
            }
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn policies_of_arbitrary_text(text in "\\PC{0,300}") {
        let _ = props::policy(&text);
    }

    #[test]
    fn toml_shaped_policies(text in toml_file()) {
        let _ = props::policy(&text);
    }

    #[test]
    fn generated_numbers_in_valid_policies(text in mostly_valid_file()) {
        let _ = props::policy(&text);
    }

    #[test]
    fn litellm_files_of_arbitrary_text(text in "\\PC{0,300}") {
        let _ = props::litellm(&text);
    }

    #[test]
    fn json_shaped_litellm_files(
        text in r#"\{("[a-z/._-]{0,12}": ?(\{("(mode|input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|cache_creation_input_token_cost|(input_cost_per_token|cache_creation_input_token_cost)_above_[0-9]{1,4}k_tokens|max_output_tokens|litellm_provider|supports_vision)": ?(-?[0-9]{0,20}(\.[0-9]{0,20})?(e-?[0-9]{1,3})?|"[a-z]{0,6}"|true|null|\[\]),? ?){0,6}\}|[0-9.e-]{1,10}|null),? ?){0,4}\}"#
    ) {
        let _ = props::litellm(&text);
    }
}
