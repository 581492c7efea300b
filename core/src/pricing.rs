//! Pricing: the built-in price table, the LiteLLM importer, `[pricing.models]` sections, and the
//! cost of a usage event (SPEC §2) or of a reservation's worst case (SPEC §5).
//!
//! Prices are integer micro-USD per million tokens. Costs are computed with
//! [`money::cost_micros`] in 128-bit integers and rounded up once per event.
//!
//! Billing rules (the same for every caller):
//! - `cached_input_tokens` and `cache_write_tokens` are billed in addition to `input_tokens`
//!   (which are the uncached input tokens).
//! - A cached-input or cache-write price of `None` means the input price.
//! - Long-context tiers are chosen on the whole prompt, as providers bill it: `input_tokens +
//!   cached_input_tokens + cache_write_tokens`. When it exceeds a tier's `above_tokens`, that
//!   tier's prices apply to the whole event (input, output, cached input and cache writes); of
//!   several tiers, the one with the highest threshold exceeded. A tier's missing price means
//!   the base price of the same kind; a cached-input or cache-write price that is `None` both in
//!   the tier and at the base means the input price in force, which is the tier's input price.
//!
//! LiteLLM import: prices in LiteLLM's file are USD per token as JSON floats (`2.5e-06`). Each is
//! converted exactly through the float's shortest decimal text (`format!("{f}")` →
//! `"0.0000025"`) times 10^12; if digits remain below one micro-USD per million tokens, the price
//! is rounded **up** to the next whole micro-USD per million tokens (never under-charge).

use crate::money::{self, MoneyError, MAX_USD, MICROS_PER_USD};
use bursar_schemas::policy::{Dollars, ModelPriceSection};
use bursar_schemas::pricing::{ModelPrice, PriceTable, PriceTier};
use bursar_schemas::wire::Usage;
use bursar_schemas::Micros;
use serde_json::{Map, Value};

/// The curated LiteLLM subset compiled into the binary (see `core/data/make-builtin-subset.py`).
const BUILTIN_SUBSET_JSON: &str = include_str!("../data/builtin-litellm-subset.json");

/// Provider of a model created by a `[pricing.models."NAME"]` section that names none.
pub const CUSTOM_PROVIDER: &str = "custom";
/// Provider of the price used for models missing from the table.
pub const UNKNOWN_PROVIDER: &str = "unknown";
/// Provider of the local models priced at zero.
pub const LOCAL_PROVIDER: &str = "ollama";
/// Longest model name accepted (a model name becomes the `model` label value, SPEC §3).
pub const MAX_MODEL_NAME_BYTES: usize = 256;
/// Largest price accepted, in micro-USD per million tokens (one trillion USD per Mtok).
pub const MAX_PRICE_MICROS_PER_MTOK: i64 = MAX_USD * MICROS_PER_USD;

/// LiteLLM modes whose prices are per token; every other mode is skipped on import.
const TOKEN_MODES: [&str; 4] = ["chat", "completion", "responses", "embedding"];

/// Local models (served by ollama) priced at zero: `(name, supports tools)`. Each is added as
/// `ollama/NAME`; the ones in [`LOCAL_BARE_NAMES`] also under their bare name.
const LOCAL_MODELS: [(&str, bool); 17] = [
    ("llama3", false),
    ("llama3.1", true),
    ("llama3.2", true),
    ("llama3.3", true),
    ("qwen2.5", true),
    ("qwen2.5-coder", true),
    ("qwen3", true),
    ("gemma2", false),
    ("gemma3", false),
    ("phi3", false),
    ("phi4", false),
    ("mistral", true),
    ("mistral-nemo", true),
    ("deepseek-r1", false),
    ("codellama", false),
    ("gpt-oss", true),
    ("nomic-embed-text", false),
];

/// Local model names also priced at zero without the `ollama/` prefix. Names that a hosted
/// provider might also use bare (`mistral`, `deepseek-r1`, `gpt-oss`) are deliberately left out.
const LOCAL_BARE_NAMES: [&str; 11] = [
    "llama3",
    "llama3.1",
    "llama3.2",
    "llama3.3",
    "qwen2.5",
    "qwen2.5-coder",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "phi4",
];

/// The built-in price table: the curated LiteLLM subset, plus local (ollama) models at zero.
pub fn builtin_table() -> PriceTable {
    let mut table = match import_litellm(BUILTIN_SUBSET_JSON) {
        Ok(import) => import.table,
        // Unreachable: a unit test imports the embedded subset without errors or skips.
        Err(_) => PriceTable::default(),
    };
    for (name, tools) in LOCAL_MODELS {
        let mut capabilities = vec!["streaming".to_string()];
        if tools {
            capabilities.push("tools".to_string());
        }
        let price = ModelPrice {
            provider: LOCAL_PROVIDER.to_string(),
            input_per_mtok: 0,
            output_per_mtok: 0,
            cached_input_per_mtok: None,
            cache_write_per_mtok: None,
            tiers: Vec::new(),
            max_output_tokens: None,
            capabilities,
        };
        if LOCAL_BARE_NAMES.contains(&name) {
            table.models.insert(name.to_string(), price.clone());
        }
        table.models.insert(format!("ollama/{name}"), price);
    }
    table
}

/// The result of importing a LiteLLM price file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LitellmImport {
    /// Every token-priced model of the file.
    pub table: PriceTable,
    /// Entries not imported, as `(model, reason)`, in file order.
    pub skipped: Vec<(String, String)>,
}

/// Import LiteLLM's `model_prices_and_context_window.json` format.
///
/// Keeps models of the token-priced modes (`chat`, `completion`, `responses`, `embedding`, and
/// entries without a mode that have token prices); every other entry is recorded in `skipped`
/// with a reason. Errors only when the text is not a JSON object. Never panics.
pub fn import_litellm(json: &str) -> Result<LitellmImport, String> {
    let root: Value =
        serde_json::from_str(json).map_err(|e| format!("not a LiteLLM price file: {e}"))?;
    let Value::Object(entries) = root else {
        return Err(
            "not a LiteLLM price file: the top level must be a JSON object of model entries"
                .to_string(),
        );
    };
    let mut import = LitellmImport {
        table: PriceTable::default(),
        skipped: Vec::new(),
    };
    for (name, entry) in &entries {
        match import_entry(name, entry) {
            Ok(price) => {
                import.table.models.insert(name.clone(), price);
            }
            Err(reason) => import.skipped.push((name.clone(), reason)),
        }
    }
    Ok(import)
}

/// Check a model name: it becomes the `model` label value (1..=256 bytes, no control chars).
pub(crate) fn check_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("model name is empty".to_string());
    }
    if name.len() > MAX_MODEL_NAME_BYTES {
        return Err(format!(
            "model name is longer than {MAX_MODEL_NAME_BYTES} bytes"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("model name contains a control character".to_string());
    }
    Ok(())
}

fn import_entry(name: &str, entry: &Value) -> Result<ModelPrice, String> {
    if name == "sample_spec" {
        return Err("LiteLLM's documentation entry, not a model".to_string());
    }
    check_model_name(name)?;
    let Value::Object(obj) = entry else {
        return Err("entry is not a JSON object".to_string());
    };
    let mode = match obj.get("mode") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.as_str()),
        Some(_) => return Err("mode is not a string".to_string()),
    };
    if let Some(m) = mode {
        if !TOKEN_MODES.contains(&m) {
            return Err(format!("mode {m:?} is not priced per token"));
        }
    }
    let ranges = tiered_pricing(obj)?;
    // A model priced only by ranges takes its first range's prices as its base.
    let base = |key: &str| -> Result<Option<i64>, String> {
        match price_field(obj, key)? {
            Some(p) => Ok(Some(p)),
            None => Ok(ranges.first().and_then(|(from, prices)| {
                (*from == 0).then_some(prices.get(key).copied()).flatten()
            })),
        }
    };
    let input = match base("input_cost_per_token")? {
        Some(p) => p,
        None if mode.is_none() => return Err("no mode and no token prices".to_string()),
        None => return Err("missing input_cost_per_token".to_string()),
    };
    let output = match base("output_cost_per_token")? {
        Some(p) => p,
        // Embeddings produce no output tokens; LiteLLM often leaves the price out.
        None if mode == Some("embedding") => 0,
        None => return Err("missing output_cost_per_token".to_string()),
    };
    let cached = base("cache_read_input_token_cost")?;
    let cache_write = base("cache_creation_input_token_cost")?;
    let tiers = long_context_tiers(obj, &ranges)?;
    let provider = match obj.get("litellm_provider") {
        None | Some(Value::Null) => UNKNOWN_PROVIDER.to_string(),
        Some(Value::String(p)) if p.trim().is_empty() => UNKNOWN_PROVIDER.to_string(),
        Some(Value::String(p))
            if p.len() > MAX_MODEL_NAME_BYTES || p.chars().any(char::is_control) =>
        {
            return Err("litellm_provider is not a valid label value".to_string())
        }
        Some(Value::String(p)) => p.clone(),
        Some(_) => return Err("litellm_provider is not a string".to_string()),
    };
    let max_output_tokens = match obj.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Some(v),
            None => return Err("max_output_tokens is not a whole non-negative number".to_string()),
        },
        Some(_) => return Err("max_output_tokens is not a number".to_string()),
    };
    let flag = |key: &str| matches!(obj.get(key), Some(Value::Bool(true)));
    let mut capabilities = Vec::new();
    if flag("supports_function_calling") {
        capabilities.push("tools".to_string());
    }
    if matches!(mode, Some("chat") | Some("responses")) {
        capabilities.push("streaming".to_string());
    }
    if flag("supports_vision") {
        capabilities.push("vision".to_string());
    }
    if flag("supports_response_schema") {
        capabilities.push("json".to_string());
    }
    Ok(ModelPrice {
        provider,
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: cached,
        cache_write_per_mtok: cache_write,
        tiers,
        max_output_tokens,
        capabilities,
    })
}

/// Read the long-context tiers. LiteLLM writes `input_cost_per_token_above_200k_tokens` (and
/// the `output_cost_per_token_…`, `cache_read_input_token_cost_…` and
/// `cache_creation_input_token_cost_…` variants), where `200k` means a prompt of 200,000 tokens.
/// Only keys of exactly the form `PREFIX` + digits + `k_tokens` count. Service-tier variants
/// (`…_priority`, `…_batches`, `…_flex`, …) are ignored: bursar prices the standard tier. So
/// are the cache-TTL keys `cache_creation_input_token_cost_above_1hr` (and
/// `…_above_1hr_above_200k_tokens`, `…_above_12hr…`): `1hr` is a cache lifetime, not a token
/// threshold, and bursar bills cache writes at the default-TTL price. Every threshold a model
/// has becomes a tier of its own (SPEC §2), in ascending order.
///
/// The ranges of `tiered_pricing` (see [`tiered_pricing`]) above 0 are tiers too: a range from N
/// tokens is a tier above N, its prices for what the keys above leave unset.
fn long_context_tiers(
    obj: &Map<String, Value>,
    ranges: &[Range],
) -> Result<Vec<PriceTier>, String> {
    const PREFIXES: [&str; 4] = [
        "input_cost_per_token_above_",
        "output_cost_per_token_above_",
        "cache_read_input_token_cost_above_",
        "cache_creation_input_token_cost_above_",
    ];
    let mut tiers: std::collections::BTreeMap<u64, PriceTier> = Default::default();
    for key in obj.keys() {
        for (kind, prefix) in PREFIXES.iter().enumerate() {
            let Some(rest) = key.strip_prefix(prefix) else {
                continue;
            };
            let Some(thousands) = rest.strip_suffix("k_tokens") else {
                continue;
            };
            if thousands.is_empty() || !thousands.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Some(above) = thousands
                .parse::<u64>()
                .ok()
                .and_then(|k| k.checked_mul(1000))
            else {
                return Err(format!("{key}: threshold is too large"));
            };
            let Some(price) = price_field(obj, key)? else {
                continue;
            };
            *tier_price(&mut tiers, above, kind) = Some(price);
        }
    }
    for (from, prices) in ranges.iter().filter(|(from, _)| *from > 0) {
        for (kind, key) in RANGE_KEYS.iter().enumerate() {
            let slot = tier_price(&mut tiers, *from, kind);
            if slot.is_none() {
                *slot = prices.get(key).copied();
            }
        }
    }
    Ok(tiers.into_values().collect())
}

/// The price of kind `kind` (the order of [`RANGE_KEYS`]: input, output, cache reads, cache
/// writes) of the tier above `above` tokens, the tier made (with no prices) if there is none.
fn tier_price(
    tiers: &mut std::collections::BTreeMap<u64, PriceTier>,
    above: u64,
    kind: usize,
) -> &mut Option<i64> {
    let t = tiers.entry(above).or_insert(PriceTier {
        above_tokens: above,
        input_per_mtok: None,
        output_per_mtok: None,
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
    });
    match kind {
        0 => &mut t.input_per_mtok,
        1 => &mut t.output_per_mtok,
        2 => &mut t.cached_input_per_mtok,
        _ => &mut t.cache_write_per_mtok,
    }
}

/// A range of `tiered_pricing`: where it starts (tokens of prompt) and its token prices by key,
/// micro-USD per million tokens.
type Range = (u64, std::collections::BTreeMap<&'static str, i64>);

/// The token prices a range of `tiered_pricing` may give.
const RANGE_KEYS: [&str; 4] = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
];

/// LiteLLM's other form of long-context prices: `"tiered_pricing": [{"range": [0, 256000],
/// "input_cost_per_token": …, …}, {"range": [256000, 1000000], …}]`, the prices of a prompt
/// whose size falls in each range (56 entries of the map in 2026-12, 49 of them with no price
/// outside the ranges). Each range's start (a whole number of tokens) and its token prices, in
/// micro-USD per million tokens, by start; empty without the key. A range from N applies to a
/// prompt over N tokens, as a `_above_Nk_tokens` key does (so a prompt of exactly N tokens is
/// priced by the range below, as LiteLLM's `start < tokens <= end` does). A range without a
/// cache price bills cache reads and writes at its input price, as LiteLLM does. Other keys
/// of a range (per-query prices of search models, reasoning-token prices, which bursar does
/// not tell apart from output) are not read.
fn tiered_pricing(obj: &Map<String, Value>) -> Result<Vec<Range>, String> {
    let ranges = match obj.get("tiered_pricing") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("tiered_pricing is not an array".to_string()),
    };
    let mut out = Vec::with_capacity(ranges.len());
    for (i, range) in ranges.iter().enumerate() {
        let Value::Object(r) = range else {
            return Err(format!("tiered_pricing[{i}] is not an object"));
        };
        let from = match r
            .get("range")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| {
                    format!("tiered_pricing[{i}].range starts at {n}, not a whole number of tokens")
                })?,
            _ => return Err(format!("tiered_pricing[{i}].range is not [from, to]")),
        };
        let mut prices = std::collections::BTreeMap::new();
        for key in RANGE_KEYS {
            if let Some(p) = price_field(r, key).map_err(|e| format!("tiered_pricing[{i}].{e}"))? {
                prices.insert(key, p);
            }
        }
        // A range without a cache price bills cached and cache-write tokens at its own input
        // price, as LiteLLM does (`tier_rate`): the base's cache price would under-charge.
        if let Some(&input) = prices.get(RANGE_KEYS[0]) {
            for key in &RANGE_KEYS[2..] {
                prices.entry(key).or_insert(input);
            }
        }
        if out.iter().any(|(f, _)| *f == from) {
            return Err(format!("tiered_pricing[{i}]: a second range from {from}"));
        }
        out.push((from, prices));
    }
    out.sort_by_key(|(from, _)| *from);
    Ok(out)
}

/// Read an optional per-token USD price and convert it to micro-USD per million tokens.
fn price_field(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let text = if let Some(u) = n.as_u64() {
                u.to_string()
            } else if let Some(i) = n.as_i64() {
                i.to_string()
            } else if let Some(f) = n.as_f64() {
                if !f.is_finite() {
                    return Err(format!("{key} is not a finite number"));
                }
                // Display of an f64 is its shortest round-trip decimal, never exponent form.
                format!("{f}")
            } else {
                return Err(format!("{key} is not a number"));
            };
            per_token_usd_to_micros_per_mtok(&text)
                .map(Some)
                .map_err(|e| format!("{key} {e}"))
        }
        Some(_) => Err(format!("{key} is not a number")),
    }
}

/// Convert a plain decimal text of USD per token to micro-USD per million tokens
/// (× 10^12), rounding up any remainder below one unit.
fn per_token_usd_to_micros_per_mtok(text: &str) -> Result<i64, String> {
    const SHIFT: usize = 12;
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int_part, frac_part) = body.split_once('.').unwrap_or((body, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty()) || !digits(int_part) || !digits(frac_part) {
        return Err(format!("is not a decimal number: {text:?}"));
    }
    let int_trimmed = int_part.trim_start_matches('0');
    let is_zero = int_trimmed.is_empty() && frac_part.bytes().all(|b| b == b'0');
    if negative && !is_zero {
        return Err("is negative".to_string());
    }
    let too_large = || "is too large".to_string();
    if int_trimmed.len() > 7 {
        return Err(too_large());
    }
    let whole: i128 = if int_trimmed.is_empty() {
        0
    } else {
        int_trimmed.parse().map_err(|_| too_large())?
    };
    let (kept, rest) = frac_part.split_at(frac_part.len().min(SHIFT));
    let mut frac: i128 = 0;
    for (i, b) in kept.bytes().enumerate() {
        let place = u32::try_from(SHIFT - 1 - i).unwrap_or(0);
        frac += i128::from(b - b'0') * 10_i128.pow(place);
    }
    let round_up = i128::from(rest.bytes().any(|b| b != b'0'));
    let value = whole * 10_i128.pow(SHIFT as u32) + frac + round_up;
    match i64::try_from(value) {
        Ok(v) if v <= MAX_PRICE_MICROS_PER_MTOK => Ok(v),
        _ => Err(too_large()),
    }
}

/// Merge a `[pricing.models."NAME"]` section over an existing price, or create a new one.
///
/// Prices in the section are USD per million tokens and convert exactly to micro-USD per
/// million tokens (at most 6 decimals). A field in a tier is named `tiers[I].KEY`. A new model
/// needs `input_per_mtok` and
/// `output_per_mtok`; its provider defaults to `"custom"`. Given capabilities replace the
/// existing list (duplicates dropped, order kept). The error names the offending field (an
/// empty field when the model name itself is unusable: empty, over 256 bytes, control chars).
pub fn apply_section(
    name: &str,
    base: Option<&ModelPrice>,
    section: &ModelPriceSection,
) -> Result<ModelPrice, (String, String)> {
    check_model_name(name).map_err(|m| (String::new(), m))?;
    let field_err = |field: &str, message: String| (field.to_string(), message);
    let money = |field: &str, value: &Option<Dollars>| -> Result<Option<i64>, (String, String)> {
        match value {
            None => Ok(None),
            Some(d) => money::dollars_to_micros(d)
                .map(Some)
                .map_err(|e| field_err(field, money_message(&e))),
        }
    };
    let input = money("input_per_mtok", &section.input_per_mtok)?;
    let output = money("output_per_mtok", &section.output_per_mtok)?;
    let cached = money("cached_input_per_mtok", &section.cached_input_per_mtok)?;
    let cache_write = money("cache_write_per_mtok", &section.cache_write_per_mtok)?;
    let input_above = money("input_per_mtok_above", &section.input_per_mtok_above)?;
    let output_above = money("output_per_mtok_above", &section.output_per_mtok_above)?;
    let cached_above = money(
        "cached_input_per_mtok_above",
        &section.cached_input_per_mtok_above,
    )?;
    let cache_write_above = money(
        "cache_write_per_mtok_above",
        &section.cache_write_per_mtok_above,
    )?;
    let given_tiers = match &section.tiers {
        None => None,
        Some(list) => {
            let mut out: Vec<PriceTier> = Vec::with_capacity(list.len());
            for (i, t) in list.iter().enumerate() {
                let field = |f: &str| format!("tiers[{i}].{f}");
                let m = |f: &str, v: &Option<Dollars>| match v {
                    None => Ok(None),
                    Some(d) => money::dollars_to_micros(d)
                        .map(Some)
                        .map_err(|e| (field(f), money_message(&e))),
                };
                let tier = PriceTier {
                    above_tokens: t.above_tokens,
                    input_per_mtok: m("input_per_mtok", &t.input_per_mtok)?,
                    output_per_mtok: m("output_per_mtok", &t.output_per_mtok)?,
                    cached_input_per_mtok: m("cached_input_per_mtok", &t.cached_input_per_mtok)?,
                    cache_write_per_mtok: m("cache_write_per_mtok", &t.cache_write_per_mtok)?,
                };
                if out.iter().any(|o| o.above_tokens == tier.above_tokens) {
                    return Err((
                        field("above_tokens"),
                        format!("two tiers above {} tokens", tier.above_tokens),
                    ));
                }
                out.push(tier);
            }
            out.sort_by_key(|t| t.above_tokens);
            Some(out)
        }
    };
    if given_tiers.is_some()
        && (section.above_tokens.is_some()
            || input_above.is_some()
            || output_above.is_some()
            || cached_above.is_some()
            || cache_write_above.is_some())
    {
        return Err(field_err(
            "tiers",
            "give either `tiers` or the one-tier keys (`above_tokens`, `*_above`), not both"
                .to_string(),
        ));
    }
    let provider = match &section.provider {
        Some(p) if p.trim().is_empty() => {
            return Err(field_err("provider", "must not be empty".to_string()))
        }
        Some(p) if p.len() > MAX_MODEL_NAME_BYTES || p.chars().any(char::is_control) => {
            return Err(field_err(
                "provider",
                format!("must be 1..={MAX_MODEL_NAME_BYTES} bytes without control characters"),
            ))
        }
        other => other.clone(),
    };
    let capabilities = match &section.capabilities {
        None => None,
        Some(list) => {
            let mut out: Vec<String> = Vec::with_capacity(list.len());
            for cap in list {
                if cap.trim().is_empty() {
                    return Err(field_err(
                        "capabilities",
                        "a capability must not be empty".to_string(),
                    ));
                }
                if !out.contains(cap) {
                    out.push(cap.clone());
                }
            }
            Some(out)
        }
    };
    let mut price = match base {
        Some(b) => b.clone(),
        None => {
            let Some(input) = input else {
                return Err(field_err(
                    "input_per_mtok",
                    format!("is required for model {name:?}, which is not in the price table"),
                ));
            };
            let Some(output) = output else {
                return Err(field_err(
                    "output_per_mtok",
                    format!("is required for model {name:?}, which is not in the price table"),
                ));
            };
            ModelPrice {
                provider: CUSTOM_PROVIDER.to_string(),
                input_per_mtok: input,
                output_per_mtok: output,
                cached_input_per_mtok: None,
                cache_write_per_mtok: None,
                tiers: Vec::new(),
                max_output_tokens: None,
                capabilities: Vec::new(),
            }
        }
    };
    if let Some(p) = provider {
        price.provider = p;
    }
    if let Some(v) = input {
        price.input_per_mtok = v;
    }
    if let Some(v) = output {
        price.output_per_mtok = v;
    }
    if cached.is_some() {
        price.cached_input_per_mtok = cached;
    }
    if cache_write.is_some() {
        price.cache_write_per_mtok = cache_write;
    }
    if let Some(tiers) = given_tiers {
        price.tiers = tiers;
    }
    // The one-tier keys: `above_tokens` names the tier they set (added when new); without it,
    // they change the model's only tier.
    let one_tier = [input_above, output_above, cached_above, cache_write_above];
    if section.above_tokens.is_some() || one_tier.iter().any(Option::is_some) {
        let at = match section.above_tokens {
            Some(a) => match price.tiers.iter().position(|t| t.above_tokens == a) {
                Some(i) => i,
                None => {
                    price.tiers.push(PriceTier {
                        above_tokens: a,
                        input_per_mtok: None,
                        output_per_mtok: None,
                        cached_input_per_mtok: None,
                        cache_write_per_mtok: None,
                    });
                    price.tiers.sort_by_key(|t| t.above_tokens);
                    price
                        .tiers
                        .iter()
                        .position(|t| t.above_tokens == a)
                        .unwrap_or(0)
                }
            },
            None if price.tiers.len() == 1 => 0,
            None => {
                let field = [
                    "input_per_mtok_above",
                    "output_per_mtok_above",
                    "cached_input_per_mtok_above",
                    "cache_write_per_mtok_above",
                ]
                .iter()
                .zip(one_tier)
                .find(|(_, v)| v.is_some())
                .map_or("above_tokens", |(f, _)| *f);
                let message = if price.tiers.is_empty() {
                    "needs above_tokens (the long-context threshold)".to_string()
                } else {
                    format!(
                        "needs above_tokens: model {name:?} has {} long-context tiers",
                        price.tiers.len()
                    )
                };
                return Err(field_err(field, message));
            }
        };
        if let Some(t) = price.tiers.get_mut(at) {
            for (slot, v) in [
                (&mut t.input_per_mtok, input_above),
                (&mut t.output_per_mtok, output_above),
                (&mut t.cached_input_per_mtok, cached_above),
                (&mut t.cache_write_per_mtok, cache_write_above),
            ] {
                if v.is_some() {
                    *slot = v;
                }
            }
        }
    }
    if section.max_output_tokens.is_some() {
        price.max_output_tokens = section.max_output_tokens;
    }
    if let Some(caps) = capabilities {
        price.capabilities = caps;
    }
    Ok(price)
}

/// A money error as a config message ("must not be negative", ...).
pub(crate) fn money_message(e: &MoneyError) -> String {
    e.to_string()
}

/// The tier in force for a prompt of `prompt_tokens`: the one with the highest threshold the
/// prompt exceeds.
pub fn tier_for(price: &ModelPrice, prompt_tokens: u64) -> Option<&PriceTier> {
    price
        .tiers
        .iter()
        .filter(|t| prompt_tokens > t.above_tokens)
        .max_by_key(|t| t.above_tokens)
}

/// The prices of `tier` (or of the base, without one): `(input, output, cached input, cache
/// write)`.
fn prices_of(price: &ModelPrice, tier: Option<&PriceTier>) -> (i64, i64, i64, i64) {
    match tier {
        Some(t) => {
            let input = t.input_per_mtok.unwrap_or(price.input_per_mtok);
            let output = t.output_per_mtok.unwrap_or(price.output_per_mtok);
            let cached = t
                .cached_input_per_mtok
                .or(price.cached_input_per_mtok)
                .unwrap_or(input);
            let cache_write = t
                .cache_write_per_mtok
                .or(price.cache_write_per_mtok)
                .unwrap_or(input);
            (input, output, cached, cache_write)
        }
        None => {
            let input = price.input_per_mtok;
            (
                input,
                price.output_per_mtok,
                price.cached_input_per_mtok.unwrap_or(input),
                price.cache_write_per_mtok.unwrap_or(input),
            )
        }
    }
}

/// The prices in force for an event whose whole prompt is `prompt_tokens` tokens.
fn effective_prices(price: &ModelPrice, prompt_tokens: u64) -> (i64, i64, i64, i64) {
    prices_of(price, tier_for(price, prompt_tokens))
}

/// The whole prompt of a usage event, as providers bill long context: uncached input, cache
/// reads and cache writes together.
pub fn prompt_tokens(usage: &Usage) -> u64 {
    usage
        .input_tokens
        .saturating_add(usage.cached_input_tokens)
        .saturating_add(usage.cache_write_tokens)
}

/// The cost of one usage event (SPEC §2): exact in 128-bit integers, rounded up once.
pub fn usage_cost(price: &ModelPrice, usage: &Usage) -> Micros {
    let (input, output, cached, cache_write) = effective_prices(price, prompt_tokens(usage));
    money::cost_micros(&[
        (usage.input_tokens, input),
        (usage.output_tokens, output),
        (usage.cached_input_tokens, cached),
        (usage.cache_write_tokens, cache_write),
    ])
}

/// The worst-case cost a reservation holds (SPEC §5):
/// `input_tokens × input price + max_output_tokens × output price`, with the long-context tier
/// of a prompt of `input_tokens` (the estimate's whole prompt). Capping `max_output_tokens` at
/// the model's maximum is the caller's job.
pub fn worst_case_cost(price: &ModelPrice, input_tokens: u64, max_output_tokens: u64) -> Micros {
    let (input, output, _, _) = effective_prices(price, input_tokens);
    money::cost_micros(&[(input_tokens, input), (max_output_tokens, output)])
}

/// The price of a model missing from the table (`unknown_models = "price_at_max"`, and records
/// of unknown models): the table's highest input and output prices, and highest cached-input
/// and cache-write prices (each taken over base and long-context prices, a `None` counting as
/// the input price it stands for, so an unknown model is never priced below any known one).
/// Provider `"unknown"`, no long-context tier, no maximum output, no capabilities.
pub fn max_price(table: &PriceTable) -> ModelPrice {
    let mut input = 0;
    let mut output = 0;
    let mut cached = 0;
    let mut cache_write = 0;
    for p in table.models.values() {
        let tiers = std::iter::once(None).chain(p.tiers.iter().map(Some));
        for tier in tiers {
            let (i, o, c, w) = prices_of(p, tier);
            input = input.max(i);
            output = output.max(o);
            cached = cached.max(c);
            cache_write = cache_write.max(w);
        }
    }
    ModelPrice {
        provider: UNKNOWN_PROVIDER.to_string(),
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: Some(cached),
        cache_write_per_mtok: Some(cache_write),
        tiers: Vec::new(),
        max_output_tokens: None,
        capabilities: Vec::new(),
    }
}

/// Render a price table as `[pricing.models."NAME"]` sections (USD per million tokens, exact),
/// which the policy parser reads back into the identical table.
pub fn table_to_toml(table: &PriceTable) -> String {
    let mut out = String::new();
    for (name, p) in &table.models {
        out.push_str(&format!(
            "[pricing.models.{}]\n",
            crate::toml_text::string(name)
        ));
        out.push_str(&format!(
            "provider = {}\n",
            crate::toml_text::string(&p.provider)
        ));
        push_usd(&mut out, "input_per_mtok", Some(p.input_per_mtok));
        push_usd(&mut out, "output_per_mtok", Some(p.output_per_mtok));
        push_usd(&mut out, "cached_input_per_mtok", p.cached_input_per_mtok);
        push_usd(&mut out, "cache_write_per_mtok", p.cache_write_per_mtok);
        if let Some(m) = p.max_output_tokens {
            out.push_str(&format!("max_output_tokens = {m}\n"));
        }
        let caps: Vec<String> = p
            .capabilities
            .iter()
            .map(|c| crate::toml_text::string(c))
            .collect();
        out.push_str(&format!("capabilities = [{}]\n\n", caps.join(", ")));
        for t in &p.tiers {
            out.push_str(&format!(
                "[[pricing.models.{}.tiers]]\nabove_tokens = {}\n",
                crate::toml_text::string(name),
                t.above_tokens
            ));
            push_usd(&mut out, "input_per_mtok", t.input_per_mtok);
            push_usd(&mut out, "output_per_mtok", t.output_per_mtok);
            push_usd(&mut out, "cached_input_per_mtok", t.cached_input_per_mtok);
            push_usd(&mut out, "cache_write_per_mtok", t.cache_write_per_mtok);
            out.push('\n');
        }
    }
    out
}

/// `key = 2.5` when a TOML float round-trips the amount exactly, else `key = "2.500001"`.
fn push_usd(out: &mut String, key: &str, micros: Option<i64>) {
    let Some(m) = micros else {
        return;
    };
    let text = money::format_usd(m);
    let float_is_exact = text
        .parse::<f64>()
        .ok()
        .is_some_and(|f| money::dollars_to_micros(&Dollars::Float(f)) == Ok(m));
    if float_is_exact {
        out.push_str(&format!("{key} = {text}\n"));
    } else {
        out.push_str(&format!("{key} = \"{text}\"\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usage(input: u64, output: u64, cached: u64, cache_write: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            cache_write_tokens: cache_write,
            requests: 1,
        }
    }

    fn price(input: i64, output: i64) -> ModelPrice {
        ModelPrice {
            provider: "test".into(),
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: None,
            cache_write_per_mtok: None,
            tiers: vec![],
            max_output_tokens: None,
            capabilities: vec![],
        }
    }

    /// The tier above `above` tokens of `p`, created with no prices of its own if new.
    fn tier_mut(p: &mut ModelPrice, above: u64) -> &mut PriceTier {
        if !p.tiers.iter().any(|t| t.above_tokens == above) {
            p.tiers.push(PriceTier {
                above_tokens: above,
                input_per_mtok: None,
                output_per_mtok: None,
                cached_input_per_mtok: None,
                cache_write_per_mtok: None,
            });
            p.tiers.sort_by_key(|t| t.above_tokens);
        }
        match p.tiers.iter_mut().find(|t| t.above_tokens == above) {
            Some(t) => t,
            None => unreachable!(),
        }
    }

    /// The only tier of `p`.
    fn only_tier_mut(p: &mut ModelPrice) -> &mut PriceTier {
        assert_eq!(p.tiers.len(), 1);
        &mut p.tiers[0]
    }

    fn builtin(name: &str) -> ModelPrice {
        let table = builtin_table();
        match table.models.get(name) {
            Some(p) => p.clone(),
            None => panic!("{name} missing from the built-in table"),
        }
    }

    #[test]
    fn gpt_4o_1200_in_300_out_costs_6000_micros() {
        assert_eq!(
            usage_cost(&builtin("gpt-4o"), &usage(1200, 300, 0, 0)),
            6000
        );
    }

    #[test]
    fn claude_sonnet_4_5_with_cached_input_costs_18600_micros() {
        let p = builtin("claude-sonnet-4-5");
        assert_eq!(usage_cost(&p, &usage(1000, 1000, 2000, 0)), 18_600);
    }

    #[test]
    fn cache_writes_are_billed_on_top_of_input() {
        // claude-sonnet-4-5: cache writes at $3.75/Mtok.
        let p = builtin("claude-sonnet-4-5");
        assert_eq!(p.cache_write_per_mtok, Some(3_750_000));
        assert_eq!(usage_cost(&p, &usage(0, 0, 0, 1_000_000)), 3_750_000);
        assert_eq!(usage_cost(&p, &usage(1000, 0, 0, 1000)), 3000 + 3750);
    }

    #[test]
    fn missing_cached_and_cache_write_prices_mean_the_input_price() {
        let p = price(2_000_000, 8_000_000);
        assert_eq!(usage_cost(&p, &usage(0, 0, 1000, 1000)), 4000);
    }

    #[test]
    fn one_token_at_a_fraction_of_a_micro_rounds_up_to_one_micro() {
        let p = price(150_000, 600_000);
        assert_eq!(usage_cost(&p, &usage(1, 0, 0, 0)), 1);
        assert_eq!(usage_cost(&p, &usage(0, 0, 0, 0)), 0);
    }

    #[test]
    fn long_context_tier_applies_to_the_whole_event_only_above_the_threshold() {
        // gemini-2.5-pro: $1.25/$10 up to 200k input tokens, $2.50/$15 above.
        let p = builtin("gemini-2.5-pro");
        assert_eq!(
            p.tiers.iter().map(|t| t.above_tokens).collect::<Vec<_>>(),
            vec![200_000]
        );
        assert_eq!(
            p.tiers.first().and_then(|t| t.input_per_mtok),
            Some(2_500_000)
        );
        assert_eq!(
            p.tiers.first().and_then(|t| t.output_per_mtok),
            Some(15_000_000)
        );
        // Exactly at the threshold: base prices.
        assert_eq!(
            usage_cost(&p, &usage(200_000, 1000, 0, 0)),
            250_000 + 10_000
        );
        // One token above: tier prices for input and output.
        assert_eq!(
            usage_cost(&p, &usage(200_001, 1000, 0, 0)),
            500_003 + 15_000
        );
        assert_eq!(worst_case_cost(&p, 200_001, 1000), 500_003 + 15_000);
        assert_eq!(worst_case_cost(&p, 200_000, 1000), 250_000 + 10_000);
    }

    #[test]
    fn missing_above_price_falls_back_to_the_base_price() {
        let mut p = price(1_000_000, 2_000_000);
        tier_mut(&mut p, 10);
        only_tier_mut(&mut p).input_per_mtok = Some(3_000_000);
        assert_eq!(usage_cost(&p, &usage(11, 1_000_000, 0, 0)), 33 + 2_000_000);
        // Cached reads with no prices fall back to the tier's input price.
        assert_eq!(usage_cost(&p, &usage(11, 0, 1_000_000, 0)), 33 + 3_000_000);
    }

    #[test]
    fn cache_writes_above_the_threshold_use_the_above_cache_write_price() {
        // claude-sonnet-4-20250514 as in LiteLLM's file (entry
        // `anthropic.claude-sonnet-4-20250514-v1:0`): input_cost_per_token 3e-06 ($3/Mtok),
        // cache_creation_input_token_cost 3.75e-06 ($3.75/Mtok); above 200k input tokens:
        // input_cost_per_token_above_200k_tokens 6e-06 ($6/Mtok),
        // cache_creation_input_token_cost_above_200k_tokens 7.5e-06 ($7.50/Mtok).
        let p = builtin("claude-sonnet-4-20250514");
        assert_eq!(
            p.tiers.iter().map(|t| t.above_tokens).collect::<Vec<_>>(),
            vec![200_000]
        );
        assert_eq!(p.input_per_mtok, 3_000_000);
        assert_eq!(p.cache_write_per_mtok, Some(3_750_000));
        assert_eq!(
            p.tiers.first().and_then(|t| t.input_per_mtok),
            Some(6_000_000)
        );
        assert_eq!(
            p.tiers.first().and_then(|t| t.cache_write_per_mtok),
            Some(7_500_000)
        );
        // The tier is chosen on the whole prompt, cache writes included (SPEC §2). A prompt of
        // exactly 200,000 tokens, base prices:
        //   100,000 × $3/Mtok = 300,000 micros; 100,000 cache writes × $3.75/Mtok = 375,000.
        assert_eq!(
            usage_cost(&p, &usage(100_000, 0, 0, 100_000)),
            300_000 + 375_000
        );
        // One token more, the tier prices for the whole event:
        //   100,001 × $6/Mtok = 600,006 micros; 100,000 × $7.50/Mtok = 750,000.
        assert_eq!(
            usage_cost(&p, &usage(100_001, 0, 0, 100_000)),
            600_006 + 750_000
        );
        // A single cache-write token tips 200,000 input tokens over: 200,000 × $6 = 1,200,000
        // and 7.5 micros, rounded up once to 1,200,008.
        assert_eq!(usage_cost(&p, &usage(200_000, 0, 0, 1)), 1_200_008);
        assert_eq!(usage_cost(&p, &usage(200_000, 0, 0, 0)), 600_000);
    }

    #[test]
    fn missing_cache_write_tier_price_falls_back_to_the_base_cache_write_price() {
        let mut p = price(1_000_000, 2_000_000);
        tier_mut(&mut p, 2_000_000);
        only_tier_mut(&mut p).input_per_mtok = Some(3_000_000);
        let above = usage(1_000_001, 0, 0, 1_000_000); // a prompt of 2,000,001 tokens
        let at = usage(1_000_000, 0, 0, 1_000_000); // 2,000,000: not above
                                                    // No cache-write price at all: the tier's input price.
        assert_eq!(usage_cost(&p, &above), 3_000_003 + 3_000_000);
        // A base cache-write price only: that price, above the threshold too.
        p.cache_write_per_mtok = Some(500_000);
        assert_eq!(usage_cost(&p, &above), 3_000_003 + 500_000);
        assert_eq!(usage_cost(&p, &at), 1_000_000 + 500_000);
        // A tier price: only above the threshold.
        only_tier_mut(&mut p).cache_write_per_mtok = Some(4_000_000);
        assert_eq!(usage_cost(&p, &above), 3_000_003 + 4_000_000);
        assert_eq!(usage_cost(&p, &at), 1_000_000 + 500_000);
    }

    #[test]
    fn max_price_includes_the_above_cache_write_price() {
        let mut table = PriceTable::default();
        let mut a = price(1_000_000, 1_000_000);
        a.cache_write_per_mtok = Some(1_250_000);
        tier_mut(&mut a, 100);
        only_tier_mut(&mut a).input_per_mtok = Some(2_000_000);
        only_tier_mut(&mut a).cache_write_per_mtok = Some(9_000_000);
        table.models.insert("a".into(), a.clone());
        let m = max_price(&table);
        assert_eq!(m.input_per_mtok, 2_000_000);
        assert_eq!(m.cache_write_per_mtok, Some(9_000_000));
        assert_eq!(m.tiers.first().and_then(|t| t.cache_write_per_mtok), None);
        let u = usage(101, 0, 0, 1000);
        assert!(usage_cost(&m, &u) >= usage_cost(&a, &u));
    }

    #[test]
    fn one_hour_cache_ttl_keys_are_not_a_long_context_tier() {
        // `cache_creation_input_token_cost_above_1hr` is the 1-hour cache-TTL write price, not a
        // token threshold; it and its variants must not create or change a tier.
        let json = r#"{
            "ttl-only": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                         "cache_creation_input_token_cost": 3.75e-06,
                         "cache_creation_input_token_cost_above_1hr": 6e-06,
                         "cache_creation_input_token_cost_above_12hr": 9e-06,
                         "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
                         "cache_creation_input_token_cost_above_272k_tokens_priority": 2e-05,
                         "mode": "chat"},
            "ttl-and-tier": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                             "cache_creation_input_token_cost": 3.75e-06,
                             "cache_creation_input_token_cost_above_1hr": 6e-06,
                             "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
                             "cache_creation_input_token_cost_above_200k_tokens": 7.5e-06,
                             "cache_creation_input_token_cost_above_200k_tokens_batches": 9e-05,
                             "mode": "chat"}
        }"#;
        let import = match import_litellm(json) {
            Ok(i) => i,
            Err(e) => panic!("{e}"),
        };
        assert!(import.skipped.is_empty(), "{:?}", import.skipped);
        let ttl = &import.table.models["ttl-only"];
        assert_eq!(ttl.cache_write_per_mtok, Some(3_750_000));
        assert!(ttl.tiers.is_empty());
        assert_eq!(ttl.tiers.first().and_then(|t| t.cache_write_per_mtok), None);
        let tier = &import.table.models["ttl-and-tier"];
        assert_eq!(tier.cache_write_per_mtok, Some(3_750_000));
        assert_eq!(
            tier.tiers
                .iter()
                .map(|t| t.above_tokens)
                .collect::<Vec<_>>(),
            vec![200_000]
        );
        assert_eq!(
            tier.tiers.first().and_then(|t| t.cache_write_per_mtok),
            Some(7_500_000)
        );
        assert_eq!(tier.tiers.first().and_then(|t| t.input_per_mtok), None);
        // The built-in claude-sonnet-4-5 carries only the 1hr key: no tier.
        let sonnet = builtin("claude-sonnet-4-5");
        assert!(sonnet.tiers.is_empty());
        assert_eq!(
            sonnet.tiers.first().and_then(|t| t.cache_write_per_mtok),
            None
        );
        assert_eq!(sonnet.cache_write_per_mtok, Some(3_750_000));
    }

    #[test]
    fn worst_case_is_input_plus_max_output() {
        // gpt-4o, 1,200 in, 800 max out: 3,000 + 8,000 = 11,000 micros (SPEC §6 example).
        assert_eq!(worst_case_cost(&builtin("gpt-4o"), 1200, 800), 11_000);
    }

    #[test]
    fn max_price_takes_the_highest_prices_of_the_table() {
        let mut table = PriceTable::default();
        let mut a = price(1_000_000, 9_000_000);
        a.cached_input_per_mtok = Some(100_000);
        let mut b = price(5_000_000, 2_000_000);
        tier_mut(&mut b, 100);
        only_tier_mut(&mut b).input_per_mtok = Some(6_000_000);
        b.max_output_tokens = Some(100);
        b.capabilities = vec!["tools".into()];
        table.models.insert("a".into(), a);
        table.models.insert("b".into(), b);
        let m = max_price(&table);
        assert_eq!(m.provider, "unknown");
        assert_eq!(m.input_per_mtok, 6_000_000);
        assert_eq!(m.output_per_mtok, 9_000_000);
        assert_eq!(m.cached_input_per_mtok, Some(6_000_000));
        assert_eq!(m.cache_write_per_mtok, Some(6_000_000));
        assert!(m.tiers.is_empty());
        assert_eq!(m.max_output_tokens, None);
        assert!(m.capabilities.is_empty());
        // An unknown model never costs less than a known one.
        for p in table.models.values() {
            let u = usage(1000, 1000, 1000, 1000);
            assert!(usage_cost(&m, &u) >= usage_cost(p, &u));
        }
    }

    #[test]
    fn builtin_subset_imports_without_skips_and_has_the_major_models() {
        let import = match import_litellm(BUILTIN_SUBSET_JSON) {
            Ok(i) => i,
            Err(e) => panic!("embedded subset does not import: {e}"),
        };
        assert!(import.skipped.is_empty(), "skipped: {:?}", import.skipped);
        let table = builtin_table();
        for name in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o3",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "claude-sonnet-4-5",
            "claude-opus-4-1",
            "claude-haiku-4-5",
            "claude-3-7-sonnet-latest",
            "claude-3-5-haiku-latest",
            "gemini-2.5-pro",
            "gemini/gemini-2.5-flash",
            "mistral/mistral-large-latest",
            "deepseek/deepseek-chat",
            "deepseek-reasoner",
            "ollama/llama3.1",
            "llama3.1",
            "ollama/qwen2.5",
        ] {
            assert!(table.models.contains_key(name), "{name} missing");
        }
        let count = table.models.len();
        assert!((60..=120).contains(&count), "{count} models");
        let sonnet = &table.models["claude-sonnet-4-5"];
        assert_eq!(sonnet.provider, "anthropic");
        assert_eq!(sonnet.max_output_tokens, Some(64_000));
        for cap in ["tools", "streaming", "vision", "json"] {
            assert!(sonnet.capabilities.iter().any(|c| c == cap), "{cap}");
        }
        let local = &table.models["ollama/llama3.1"];
        assert_eq!((local.input_per_mtok, local.output_per_mtok), (0, 0));
        assert_eq!(local.provider, "ollama");
        assert_eq!(usage_cost(local, &usage(1_000_000, 1_000_000, 0, 0)), 0);
    }

    #[test]
    fn per_token_floats_convert_exactly_or_round_up() {
        assert_eq!(per_token_usd_to_micros_per_mtok("0.0000025"), Ok(2_500_000));
        assert_eq!(per_token_usd_to_micros_per_mtok("0"), Ok(0));
        assert_eq!(per_token_usd_to_micros_per_mtok("1"), Ok(1_000_000_000_000));
        assert_eq!(per_token_usd_to_micros_per_mtok("0.000000000001"), Ok(1));
        // 2.9999900000000002e-06 USD/token: below a micro per Mtok remains, rounded up.
        assert_eq!(
            per_token_usd_to_micros_per_mtok(&format!("{}", 2.9999900000000002e-06_f64)),
            Ok(2_999_991)
        );
        assert!(per_token_usd_to_micros_per_mtok("-0.1").is_err());
        assert!(per_token_usd_to_micros_per_mtok("99999999").is_err());
    }

    #[test]
    fn odd_litellm_entries_are_skipped_with_a_reason() {
        let json = r#"{
            "sample_spec": {"input_cost_per_token": 0.0, "mode": "one of: chat"},
            "good": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                     "mode": "chat", "litellm_provider": "acme", "max_output_tokens": 100,
                     "supports_function_calling": true, "supports_vision": "yes"},
            "embed": {"input_cost_per_token": 2e-08, "mode": "embedding"},
            "nomode": {"input_cost_per_token": 1e-07, "output_cost_per_token": 1e-07},
            "nomode-noprice": {},
            "image": {"mode": "image_generation", "output_cost_per_image": 0.04},
            "neg": {"input_cost_per_token": -1e-06, "output_cost_per_token": 1e-06},
            "text": {"input_cost_per_token": "1e-06", "output_cost_per_token": 1e-06},
            "noout": {"input_cost_per_token": 1e-06, "mode": "chat"},
            "num": 5,
            "badmax": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                       "max_output_tokens": "lots"},
            "": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}
        }"#;
        let import = match import_litellm(json) {
            Ok(i) => i,
            Err(e) => panic!("{e}"),
        };
        let names: Vec<&str> = import.table.models.keys().map(String::as_str).collect();
        assert_eq!(names, ["embed", "good", "nomode"]);
        let good = &import.table.models["good"];
        assert_eq!(good.input_per_mtok, 1_000_000);
        assert_eq!(good.output_per_mtok, 2_000_000);
        assert_eq!(good.provider, "acme");
        assert_eq!(good.max_output_tokens, Some(100));
        assert_eq!(good.capabilities, ["tools", "streaming"]);
        assert_eq!(import.table.models["embed"].output_per_mtok, 0);
        assert_eq!(import.table.models["nomode"].provider, "unknown");
        let reason = |n: &str| {
            import
                .skipped
                .iter()
                .find(|(m, _)| m == n)
                .map(|(_, r)| r.clone())
                .unwrap_or_default()
        };
        assert!(reason("sample_spec").contains("documentation"));
        assert!(reason("image").contains("image_generation"));
        assert!(reason("neg").contains("negative"));
        assert!(reason("text").contains("not a number"));
        assert!(reason("noout").contains("output_cost_per_token"));
        assert!(reason("num").contains("not a JSON object"));
        assert!(reason("nomode-noprice").contains("no token prices"));
        assert!(reason("badmax").contains("max_output_tokens"));
        assert!(reason("").contains("empty"));
        assert_eq!(import.skipped.len(), 9);
    }

    #[test]
    fn non_object_json_is_an_error() {
        assert!(import_litellm("[1,2]").is_err());
        assert!(import_litellm("not json").is_err());
        assert!(import_litellm("").is_err());
        assert!(import_litellm("{}").is_ok_and(|i| i.table.models.is_empty()));
    }

    #[test]
    fn full_litellm_file_imports_thousands_of_models() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/litellm-model-prices.json"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("SKIPPED full_litellm_file_imports_thousands_of_models: {path} not found");
            return;
        };
        let import = match import_litellm(&text) {
            Ok(i) => i,
            Err(e) => panic!("full LiteLLM file does not import: {e}"),
        };
        assert!(
            import.table.models.len() > 3000,
            "{} models",
            import.table.models.len()
        );
        assert!(import
            .skipped
            .iter()
            .any(|(_, r)| r.contains("image_generation")));
        assert!(import.skipped.iter().any(|(m, _)| m == "sample_spec"));
        // Every non-token mode is skipped; nothing is both imported and skipped.
        for (m, _) in &import.skipped {
            assert!(!import.table.models.contains_key(m));
        }
        assert_eq!(
            usage_cost(&import.table.models["gpt-4o"], &usage(1200, 300, 0, 0)),
            6000
        );
        // Models priced by `tiered_pricing` ranges only are imported, with a tier per range.
        let qwen = &import.table.models["dashscope/qwen-flash"];
        assert_eq!(qwen.tiers.len(), 1);
        assert!(!import
            .skipped
            .iter()
            .any(|(_, r)| r.contains("tiered_pricing")));
        // The cache-write tier is read; the 1hr cache-TTL key is not.
        let bedrock_sonnet_4 = &import.table.models["anthropic.claude-sonnet-4-20250514-v1:0"];
        assert_eq!(
            bedrock_sonnet_4
                .tiers
                .iter()
                .map(|t| t.above_tokens)
                .collect::<Vec<_>>(),
            vec![200_000]
        );
        assert_eq!(
            bedrock_sonnet_4
                .tiers
                .first()
                .and_then(|t| t.cache_write_per_mtok),
            Some(7_500_000)
        );
        assert!(import.table.models.values().all(|p| p
            .tiers
            .windows(2)
            .all(|w| w[0].above_tokens < w[1].above_tokens)));
        // The built-in subset agrees with the full file for directly copied entries.
        let builtin = builtin_table();
        for name in [
            "gpt-4o",
            "claude-sonnet-4-5",
            "gemini-2.5-pro",
            "deepseek-chat",
        ] {
            assert_eq!(
                builtin.models.get(name),
                import.table.models.get(name),
                "{name}"
            );
        }
    }

    #[test]
    fn apply_section_creates_and_merges() {
        let section = ModelPriceSection {
            input_per_mtok: Some(Dollars::Float(2.5)),
            output_per_mtok: Some(Dollars::Text("10.00".into())),
            ..Default::default()
        };
        let created = match apply_section("my-model", None, &section) {
            Ok(p) => p,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(created.provider, "custom");
        assert_eq!(created.input_per_mtok, 2_500_000);
        assert_eq!(created.output_per_mtok, 10_000_000);

        let only_output = ModelPriceSection {
            output_per_mtok: Some(Dollars::Int(20)),
            capabilities: Some(vec!["tools".into(), "tools".into()]),
            ..Default::default()
        };
        let base = builtin("gpt-4o");
        let merged = match apply_section("gpt-4o", Some(&base), &only_output) {
            Ok(p) => p,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(merged.input_per_mtok, 2_500_000);
        assert_eq!(merged.output_per_mtok, 20_000_000);
        assert_eq!(merged.capabilities, ["tools"]);
        assert_eq!(merged.provider, "openai");

        let err = apply_section("new", None, &only_output);
        assert_eq!(err.map_err(|e| e.0), Err("input_per_mtok".to_string()));
        let neg = ModelPriceSection {
            cached_input_per_mtok: Some(Dollars::Float(-1.0)),
            ..Default::default()
        };
        assert_eq!(
            apply_section("gpt-4o", Some(&base), &neg).map_err(|e| e.0),
            Err("cached_input_per_mtok".to_string())
        );
        let above_without_threshold = ModelPriceSection {
            output_per_mtok_above: Some(Dollars::Int(1)),
            ..Default::default()
        };
        assert_eq!(
            apply_section("gpt-4o", Some(&base), &above_without_threshold).map_err(|e| e.0),
            Err("output_per_mtok_above".to_string())
        );
        let cache_write_above_without_threshold = ModelPriceSection {
            cache_write_per_mtok_above: Some(Dollars::Float(7.5)),
            ..Default::default()
        };
        assert_eq!(
            apply_section("gpt-4o", Some(&base), &cache_write_above_without_threshold)
                .map_err(|e| e.0),
            Err("cache_write_per_mtok_above".to_string())
        );
        let cache_write_above = ModelPriceSection {
            above_tokens: Some(128_000),
            cache_write_per_mtok_above: Some(Dollars::Float(7.5)),
            ..Default::default()
        };
        let tiered = match apply_section("gpt-4o", Some(&base), &cache_write_above) {
            Ok(p) => p,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(
            tiered
                .tiers
                .iter()
                .map(|t| t.above_tokens)
                .collect::<Vec<_>>(),
            vec![128_000]
        );
        assert_eq!(
            tiered.tiers.first().and_then(|t| t.cache_write_per_mtok),
            Some(7_500_000)
        );
        assert_eq!(tiered.cache_write_per_mtok, base.cache_write_per_mtok);
    }

    #[test]
    fn toml_rendering_is_exact() {
        let mut out = String::new();
        push_usd(&mut out, "a", Some(2_500_000));
        push_usd(&mut out, "b", Some(1));
        push_usd(&mut out, "c", Some(123_456_789_012_345_678));
        assert_eq!(out, "a = 2.50\nb = 0.000001\nc = \"123456789012.345678\"\n");
        assert_eq!(
            crate::toml_text::string("a\"b\\c\u{1}"),
            "\"a\\\"b\\\\c\\u0001\""
        );
    }

    proptest! {
        #[test]
        fn import_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
            let _ = import_litellm(&s);
        }

        #[test]
        fn import_never_panics_on_json_like_text(
            s in r#"\{("[a-z_]{0,12}": ?(\{("[a-z_]{0,30}": ?(-?[0-9]{0,25}(\.[0-9]{0,25})?(e-?[0-9]{1,3})?|"[a-z]*"|true|null|\[\]|\{\}),? ?){0,6}\}|[0-9.e-]{1,10}|"x"|null),? ?){0,4}\}"#
        ) {
            let _ = import_litellm(&s);
        }

        #[test]
        fn every_litellm_entry_is_imported_or_skipped_never_lost(
            entries in proptest::collection::btree_map(
                "[a-z/.-]{0,12}",
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("mode"), Just("input_cost_per_token"), Just("output_cost_per_token"),
                        Just("cache_read_input_token_cost"), Just("cache_creation_input_token_cost"),
                        Just("input_cost_per_token_above_200k_tokens"),
                        Just("cache_creation_input_token_cost_above_200k_tokens"),
                        Just("cache_creation_input_token_cost_above_1hr"),
                        Just("output_cost_per_token_above_99999999999999999k_tokens"),
                        Just("max_output_tokens"), Just("litellm_provider"),
                        Just("supports_vision"),
                    ],
                    prop_oneof![
                        any::<f64>().prop_map(|f| serde_json::json!(f)),
                        any::<i64>().prop_map(|i| serde_json::json!(i)),
                        (0.0f64..0.001).prop_map(|f| serde_json::json!(f)),
                        prop_oneof![Just("chat"), Just("embedding"), Just("rerank"), Just("")]
                            .prop_map(|m| serde_json::json!(m)),
                        any::<bool>().prop_map(|b| serde_json::json!(b)),
                        Just(Value::Null),
                        Just(serde_json::json!([1, {"a": 2}])),
                    ],
                    0..8,
                ),
                0..6,
            )
        ) {
            let json = serde_json::json!(entries).to_string();
            let import = match import_litellm(&json) {
                Ok(i) => i,
                Err(e) => return Err(TestCaseError::fail(e)),
            };
            prop_assert_eq!(import.table.models.len() + import.skipped.len(), entries.len());
            for p in import.table.models.values() {
                prop_assert!(p.input_per_mtok >= 0 && p.output_per_mtok >= 0);
            }
        }

        #[test]
        fn cost_is_never_below_the_exact_cost_nor_one_micro_above(
            input in 0u64..10_000_000, output in 0u64..10_000_000,
            cached in 0u64..10_000_000, write in 0u64..10_000_000,
            pin in 0i64..200_000_000, pout in 0i64..600_000_000,
        ) {
            let p = price(pin, pout);
            let cost = usage_cost(&p, &usage(input, output, cached, write));
            let exact_numerator = u128::from(input + cached + write) * pin as u128
                + u128::from(output) * pout as u128;
            let c = cost as u128 * 1_000_000;
            prop_assert!(c >= exact_numerator);
            prop_assert!(c < exact_numerator + 1_000_000);
        }
    }
}
