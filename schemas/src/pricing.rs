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
    /// Long-context tiers, in ascending order of `above_tokens` (none: one price whatever the
    /// prompt's size). When an event's whole prompt (`input_tokens + cached_input_tokens +
    /// cache_write_tokens`) exceeds a tier's `above_tokens`, that tier's prices apply to every
    /// token of the event; of several, the one with the highest threshold exceeded.
    #[serde(default)]
    pub tiers: Vec<PriceTier>,
    /// The model's own maximum output tokens per call, if known.
    pub max_output_tokens: Option<u64>,
    /// Capabilities such as `tools`, `vision`, `json`, `streaming`.
    pub capabilities: Vec<String>,
}

/// A long-context tier of a model's prices. A price left `None` is the model's base price of
/// the same kind; a cached-input or cache-write price that is `None` both here and at the base
/// is the tier's input price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceTier {
    /// The tier applies to prompts of more than this many tokens.
    pub above_tokens: u64,
    /// Input price.
    pub input_per_mtok: Option<i64>,
    /// Output price.
    pub output_per_mtok: Option<i64>,
    /// Cached-input price.
    pub cached_input_per_mtok: Option<i64>,
    /// Cache-write price.
    pub cache_write_per_mtok: Option<i64>,
}

/// A full price table, model name to price.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// Model name (exact, as clients send it) to price.
    pub models: BTreeMap<String, ModelPrice>,
}
