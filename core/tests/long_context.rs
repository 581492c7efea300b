//! Long-context tiers (SPEC §2, revision 2): the tier is chosen on the whole prompt (uncached
//! input, cache reads and cache writes together), as providers bill it; a model may have several
//! tiers, and the one with the highest threshold exceeded applies; the LiteLLM importer keeps
//! every threshold; `[[pricing.models."x".tiers]]` in `bursar.toml` says the same.

use bursar_core::policy::parse_policy;
use bursar_core::pricing::{
    builtin_table, import_litellm, table_to_toml, usage_cost, worst_case_cost,
};
use bursar_schemas::pricing::ModelPrice;
use bursar_schemas::wire::Usage;

fn usage(input: u64, cached: u64, cache_write: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        cache_write_tokens: cache_write,
        requests: 1,
    }
}

#[allow(clippy::panic)]
fn builtin(name: &str) -> ModelPrice {
    match builtin_table().models.get(name) {
        Some(p) => p.clone(),
        None => panic!("{name} is not in the built-in table"),
    }
}

#[test]
fn gemini_2_5_pro_prices_a_prompt_long_with_cached_input_at_its_long_context_tier() {
    // LiteLLM's gemini-2.5-pro: $1.25 in / $10 out, cache reads $0.125; above 200k prompt tokens
    // $2.50 in / $15 out, cache reads $0.25. 150,000 input + 100,000 cached = a 250,000-token
    // prompt: 150,000 × 2.5 + 100,000 × 0.25 + 1,000 × 15 = 375,000 + 25,000 + 15,000.
    let p = builtin("gemini-2.5-pro");
    assert_eq!(usage_cost(&p, &usage(150_000, 100_000, 0, 1_000)), 415_000);
    // It was 210,000 when only uncached input chose the tier.
    // The same prompt all uncached, and a prompt of exactly 200,000 (base prices).
    assert_eq!(
        usage_cost(&p, &usage(250_000, 0, 0, 1_000)),
        625_000 + 15_000
    );
    assert_eq!(
        usage_cost(&p, &usage(100_000, 100_000, 0, 1_000)),
        125_000 + 12_500 + 10_000
    );
}

#[test]
fn gpt_5_4_prices_a_prompt_long_with_cached_input_at_its_long_context_tier() {
    // LiteLLM's gpt-5.4: $2.50 in / $15 out, cache reads $0.25; above 272k prompt tokens $5 /
    // $22.50 / $0.50. 200,000 + 100,000 cached = 300,000 > 272,000:
    // 200,000 × 5 + 100,000 × 0.5 + 1,000 × 22.5 = 1,000,000 + 50,000 + 22,500.
    let p = builtin("gpt-5.4");
    assert_eq!(
        usage_cost(&p, &usage(200_000, 100_000, 0, 1_000)),
        1_072_500
    );
}

#[test]
fn cache_writes_count_toward_the_prompt_that_picks_the_tier() {
    let p = builtin("gemini-2.5-pro");
    // 150,000 input + 60,000 cache writes: 210,000 > 200,000, so the tier's prices.
    assert_eq!(
        usage_cost(&p, &usage(150_000, 0, 60_000, 0)),
        375_000 + 15_000
    );
}

/// LiteLLM's entry for `kyma/qwen3.7-flash`, verbatim: two thresholds (32k and 256k).
const TWO_TIERS: &str = r#"{"kyma/qwen3.7-flash": {
    "max_input_tokens": 1000000, "max_output_tokens": 8192,
    "input_cost_per_token": 4.35e-08, "cache_read_input_token_cost": 8.1e-09,
    "output_cost_per_token": 1.886e-07,
    "input_cost_per_token_above_32k_tokens": 1.35e-07,
    "output_cost_per_token_above_32k_tokens": 5.4e-07,
    "input_cost_per_token_above_256k_tokens": 2.7e-07,
    "output_cost_per_token_above_256k_tokens": 1.08e-06,
    "litellm_provider": "kyma", "mode": "chat", "supports_function_calling": true,
    "supports_vision": true, "supports_prompt_caching": true, "supports_reasoning": true,
    "supports_response_schema": true, "supports_pdf_input": false}}"#;

#[allow(clippy::panic)]
fn two_tiers() -> ModelPrice {
    match import_litellm(TWO_TIERS) {
        Ok(i) => i.table.models["kyma/qwen3.7-flash"].clone(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_litellm_importer_keeps_every_threshold_of_a_model() {
    let p = two_tiers();
    let thresholds: Vec<u64> = p.tiers.iter().map(|t| t.above_tokens).collect();
    assert_eq!(thresholds, vec![32_000, 256_000]);
    // A 100,000-token prompt with 100,000 output tokens is in the 32k tier:
    // 100,000 × 0.135 + 100,000 × 0.54 = 13,500 + 54,000. The importer used to keep only the
    // lowest threshold with the highest prices (0.27 / 1.08): 135,000, twice the bill.
    assert_eq!(usage_cost(&p, &usage(100_000, 0, 0, 100_000)), 67_500);
    // Below the first threshold, base prices; above the second, the second tier's.
    assert_eq!(
        usage_cost(&p, &usage(32_000, 0, 0, 1_000)),
        1_392 + 189 // 32,000 × 0.0435 = 1,392; 1,000 × 0.1886 = 188.6 → rounded up once
    );
    assert_eq!(
        usage_cost(&p, &usage(300_000, 0, 0, 10_000)),
        81_000 + 10_800
    );
    // A reservation's worst case is priced on its prompt the same way.
    assert_eq!(worst_case_cost(&p, 300_000, 10_000), 81_000 + 10_800);
    assert_eq!(worst_case_cost(&p, 100_000, 100_000), 67_500);
}

/// Two entries of LiteLLM's map as published (2026-12), with prices only in `tiered_pricing`
/// ranges (dashscope) and with base prices and ranges (opencode_go).
const RANGES: &str = r#"{
 "dashscope/qwen-flash": {"litellm_provider": "dashscope", "max_input_tokens": 997952, "max_output_tokens": 32768, "mode": "chat", "supports_function_calling": true, "tiered_pricing": [{"input_cost_per_token": 5e-08, "output_cost_per_token": 4e-07, "range": [0, 256000.0]}, {"input_cost_per_token": 2.5e-07, "output_cost_per_token": 2e-06, "range": [256000.0, 1000000.0]}]},
 "opencode_go/claude-haiku-5-5": {"litellm_provider": "opencode_go", "mode": "chat", "input_cost_per_token": 1.0000000000000001e-07, "output_cost_per_token": 5e-07, "cache_read_input_token_cost": 1e-08, "cache_creation_input_token_cost": 1.25e-07, "max_output_tokens": 128000, "max_input_tokens": 1000000, "tiered_pricing": [{"range": [0, 100000], "input_cost_per_token": 1.0000000000000001e-07, "output_cost_per_token": 5e-07, "cache_read_input_token_cost": 1e-08, "cache_creation_input_token_cost": 1.25e-07}, {"range": [100000, 1000000], "input_cost_per_token": 5e-07, "output_cost_per_token": 2.5e-06, "cache_read_input_token_cost": 5.0000000000000004e-08, "cache_creation_input_token_cost": 6.25e-07}]}
}"#;

/// LiteLLM's other form of long-context prices, `tiered_pricing` ranges, is read too (SPEC §2:
/// "keeps every threshold a model has"): a model priced only by ranges is imported, not skipped
/// (it was an unknown model: denied, or priced at the table's maximum), and a long prompt is
/// priced by its range, never under-charged at the base prices.
#[test]
fn the_litellm_importer_reads_tiered_pricing_ranges_as_tiers() {
    let import = match import_litellm(RANGES) {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    };
    assert!(import.skipped.is_empty(), "{:?}", import.skipped);
    let qwen = &import.table.models["dashscope/qwen-flash"];
    assert_eq!(
        (qwen.input_per_mtok, qwen.output_per_mtok),
        (50_000, 400_000)
    );
    let thresholds: Vec<u64> = qwen.tiers.iter().map(|t| t.above_tokens).collect();
    assert_eq!(thresholds, vec![256_000]);
    // 300,000 × 0.25 + 1,000 × 2 at the range from 256k; 200,000 × 0.05 + 1,000 × 0.4 below.
    assert_eq!(
        usage_cost(qwen, &usage(300_000, 0, 0, 1_000)),
        75_000 + 2_000
    );
    assert_eq!(usage_cost(qwen, &usage(200_000, 0, 0, 1_000)), 10_000 + 400);
    assert_eq!(worst_case_cost(qwen, 300_000, 1_000), 77_000);
    // Its ranges give no cache price: cache reads are billed at the range's input price, as
    // LiteLLM bills them (at the base's they would be a fifth).
    assert_eq!(usage_cost(qwen, &usage(200_000, 100_000, 0, 0)), 75_000);

    let haiku = &import.table.models["opencode_go/claude-haiku-5-5"];
    // A 150,000-token prompt (100,000 uncached, 50,000 cache reads) is in the range from 100k:
    // 100,000 × 0.5 + 50,000 × 0.05 + 1,000 × 2.5, and 1 for LiteLLM's 5.0000000000000004e-08
    // (a price a hair over $0.05 a Mtok is rounded up, never down). It was 10,000 + 500 + 500
    // at base prices.
    assert_eq!(
        usage_cost(haiku, &usage(100_000, 50_000, 0, 1_000)),
        50_000 + 2_500 + 2_500 + 1
    );
    // Below: 50,000 × 0.1 (1.0000000000000001e-07 rounded up: +1) + 1,000 × 0.5.
    assert_eq!(
        usage_cost(haiku, &usage(50_000, 0, 0, 1_000)),
        5_000 + 1 + 500
    );

    // A malformed range skips its entry, naming what is wrong.
    let bad = r#"{"m": {"mode": "chat", "tiered_pricing": [{"range": [0.5, 10], "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}]}}"#;
    let import = match import_litellm(bad) {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    };
    assert!(import.table.models.is_empty());
    assert!(
        import.skipped[0].1.contains("tiered_pricing[0].range"),
        "{:?}",
        import.skipped
    );
}

#[allow(clippy::panic)]
fn load(text: &str) -> bursar_core::policy::LoadedPolicy {
    match parse_policy(text, "bursar.toml", &|p| Err(format!("no {p}"))) {
        Ok(l) => l,
        Err(e) => panic!("{e:#?}"),
    }
}

#[test]
fn several_tiers_are_written_in_bursar_toml_and_exported_back_the_same() {
    let l = load(
        r#"
[pricing.models."my-llm"]
input_per_mtok = 1
output_per_mtok = 2
[[pricing.models."my-llm".tiers]]
above_tokens = 256000
input_per_mtok = 4
output_per_mtok = 8
[[pricing.models."my-llm".tiers]]
above_tokens = 32000
input_per_mtok = 2
"#,
    );
    let p = &l.resolved.pricing.models["my-llm"];
    let thresholds: Vec<u64> = p.tiers.iter().map(|t| t.above_tokens).collect();
    assert_eq!(thresholds, vec![32_000, 256_000], "kept in ascending order");
    // 40,000 tokens: the 32k tier's input price, the base output price (the tier gives none).
    assert_eq!(usage_cost(p, &usage(40_000, 0, 0, 1_000)), 80_000 + 2_000);
    assert_eq!(
        usage_cost(p, &usage(300_000, 0, 0, 1_000)),
        1_200_000 + 8_000
    );
    // Exported as TOML, the tiers read back into the same table.
    let text = table_to_toml(&l.resolved.pricing);
    let again = load(&text);
    assert_eq!(again.resolved.pricing.models["my-llm"], *p, "{text}");
}

#[test]
fn the_one_tier_keys_add_or_change_a_tier_and_cannot_be_mixed_with_tiers() {
    // gemini-2.5-pro has one tier at 200k; `above_tokens` names it and changes its price.
    let l = load(
        r#"
[pricing.models."gemini-2.5-pro"]
above_tokens = 200000
output_per_mtok_above = 20
"#,
    );
    let p = &l.resolved.pricing.models["gemini-2.5-pro"];
    assert_eq!(p.tiers.len(), 1);
    assert_eq!(p.tiers[0].output_per_mtok, Some(20_000_000));
    assert_eq!(p.tiers[0].input_per_mtok, Some(2_500_000), "the rest kept");
    // A new threshold adds a tier.
    let l = load(
        r#"
[pricing.models."gemini-2.5-pro"]
above_tokens = 1000000
input_per_mtok_above = 9
"#,
    );
    let p = &l.resolved.pricing.models["gemini-2.5-pro"];
    let thresholds: Vec<u64> = p.tiers.iter().map(|t| t.above_tokens).collect();
    assert_eq!(thresholds, vec![200_000, 1_000_000]);
    // Both forms at once is an error naming `tiers`.
    let errs = match parse_policy(
        r#"
[pricing.models."x"]
input_per_mtok = 1
output_per_mtok = 1
above_tokens = 10
tiers = [{ above_tokens = 20, input_per_mtok = 2 }]
"#,
        "bursar.toml",
        &|p| Err(format!("no {p}")),
    ) {
        Ok(_) => panic!("accepted both forms"),
        Err(e) => e,
    };
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].key, "pricing.models.\"x\".tiers", "{errs:#?}");
    // Two tiers at the same threshold are an error too.
    let errs = match parse_policy(
        r#"
[pricing.models."x"]
input_per_mtok = 1
output_per_mtok = 1
tiers = [{ above_tokens = 20, input_per_mtok = 2 }, { above_tokens = 20, input_per_mtok = 3 }]
"#,
        "bursar.toml",
        &|p| Err(format!("no {p}")),
    ) {
        Ok(_) => panic!("accepted two tiers at one threshold"),
        Err(e) => e,
    };
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].key.starts_with("pricing.models.\"x\".tiers"),
        "{errs:#?}"
    );
}
