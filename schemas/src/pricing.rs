//! Price tables: integer micro-USD per million tokens.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The price of one model. All prices are micro-USD per million tokens
/// (2.50 USD/Mtok = 2 500 000).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Provider name, e.g. `openai`; becomes the derived `provider` label.
    pub provider: String,
    /// Price of (uncached) input tokens.
    pub input_per_mtok: i64,
    /// Price of output tokens.
    pub output_per_mtok: i64,
    /// Price of cached-input reads; `None` means the input price.
    pub cached_input_per_mtok: Option<i64>,
    /// Price of cache writes (cache creation); `None` means the input price.
    pub cache_write_per_mtok: Option<i64>,
    /// Long-context tier: when an event's `input_tokens` exceed this, the `_above`
    /// prices apply to the whole event.
    pub above_tokens: Option<u64>,
    /// Input price above `above_tokens`.
    pub input_per_mtok_above: Option<i64>,
    /// Output price above `above_tokens`.
    pub output_per_mtok_above: Option<i64>,
    /// Cached-input price above `above_tokens`; `None` means the base cached-input price.
    pub cached_input_per_mtok_above: Option<i64>,
    /// Cache-write price above `above_tokens`; `None` means the base cache-write price (which,
    /// when itself `None`, means the input price in force above the threshold).
    pub cache_write_per_mtok_above: Option<i64>,
    /// The model's own maximum output tokens per call, if known.
    pub max_output_tokens: Option<u64>,
    /// Capabilities such as `tools`, `vision`, `json`, `streaming`.
    pub capabilities: Vec<String>,
}

/// A full price table, model name to price.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// Model name (exact, as clients send it) to price.
    pub models: BTreeMap<String, ModelPrice>,
}
