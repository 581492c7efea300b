//! Cost tiers as entities (SPEC §10): the built-in tiers, which tier a model is in, the models
//! a tier holds, and the price-range warnings of `policy check`.
//!
//! Resolving `[tiers]` (the defs, `remove`, the undefined-tier errors) is in [`crate::policy`];
//! this module works on the resolved [`ResolvedTiers`].

use crate::labels::glob_match;
use crate::policy::DEFAULT_TIER;
use bursar_schemas::policy::{ResolvedPolicy, ResolvedTiers, TierDef, TierOrigin, TierPriceRange};
use bursar_schemas::pricing::{ModelPrice, PriceTable};
use bursar_schemas::Micros;

/// Ids of the built-in tiers, cheapest first.
pub const BUILTIN_TIER_IDS: [&str; 4] = ["low", "medium", "high", "premium"];

const MICROS_PER_USD: Micros = 1_000_000;

/// The built-in tiers, cheapest first. Their price ranges (USD per million input tokens) meet
/// at their ends: low 0–0.50, medium 0.50–3, high 3–10, premium 10–1000.
pub fn builtin_tiers() -> Vec<TierDef> {
    let def =
        |id: &str, name: &str, description: &str, min: Micros, max: Micros, color: &str| TierDef {
            id: id.to_string(),
            origin: TierOrigin::Builtin,
            display_name: Some(name.to_string()),
            description: Some(description.to_string()),
            price_range: Some(TierPriceRange {
                min_input_per_mtok: min,
                max_input_per_mtok: max,
            }),
            color: Some(color.to_string()),
            icon: None,
        };
    vec![
        def(
            "low",
            "Low",
            "Small, fast models for simple, high-volume work",
            0,
            MICROS_PER_USD / 2,
            "#2e7d32",
        ),
        def(
            "medium",
            "Medium",
            "General-purpose models for everyday work",
            MICROS_PER_USD / 2,
            3 * MICROS_PER_USD,
            "#1565c0",
        ),
        def(
            "high",
            "High",
            "Strong models for hard reasoning and long tasks",
            3 * MICROS_PER_USD,
            10 * MICROS_PER_USD,
            "#ef6c00",
        ),
        def(
            "premium",
            "Premium",
            "The most capable and most expensive models",
            10 * MICROS_PER_USD,
            1000 * MICROS_PER_USD,
            "#6a1b9a",
        ),
    ]
}

/// True for the id of a built-in tier.
pub fn is_builtin(id: &str) -> bool {
    BUILTIN_TIER_IDS.contains(&id)
}

/// An implicit tier: an id and no metadata.
pub fn implicit(id: &str) -> TierDef {
    TierDef {
        id: id.to_string(),
        origin: TierOrigin::Implicit,
        display_name: None,
        description: None,
        price_range: None,
        color: None,
        icon: None,
    }
}

/// The tier of `model`: the first pattern that matches it, else the default tier.
pub fn tier_of<'a>(tiers: &'a ResolvedTiers, model: &str) -> &'a str {
    tiers
        .patterns
        .iter()
        .find(|(pat, _)| glob_match(pat, model))
        .map_or(tiers.default.as_str(), |(_, t)| t.as_str())
}

/// Every tier of `tiers`. A policy logged before tiers had metadata has no `defs`: its tiers
/// are then the names it uses (the default tier, the patterns' tiers, the caps' tiers), all
/// implicit.
pub fn all_tiers(tiers: &ResolvedTiers) -> Vec<TierDef> {
    if !tiers.defs.is_empty() {
        return tiers.defs.clone();
    }
    let mut out: Vec<TierDef> = Vec::new();
    let names = std::iter::once(tiers.default.as_str())
        .chain(tiers.patterns.iter().map(|(_, t)| t.as_str()))
        .chain(tiers.caps.keys().map(String::as_str));
    for name in names {
        if !out.iter().any(|d| d.id == name) {
            out.push(implicit(name));
        }
    }
    out
}

/// The key that puts `model` in its tier: `tiers.patterns[i]` or `tiers.default`.
pub fn placing_key(tiers: &ResolvedTiers, model: &str) -> String {
    tiers
        .patterns
        .iter()
        .position(|(pat, _)| glob_match(pat, model))
        .map_or_else(
            || "tiers.default".to_string(),
            |i| format!("tiers.patterns[{i}]"),
        )
}

/// A model of the price table in a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierModel {
    /// Model name.
    pub model: String,
    /// Its price.
    pub price: ModelPrice,
}

/// A tier with the models of `pricing` it holds, in model-name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierListing {
    /// The tier.
    pub tier: TierDef,
    /// True for the default tier (it holds every model no pattern matches).
    pub is_default: bool,
    /// Its models.
    pub models: Vec<TierModel>,
}

/// Each tier of `policy` with the models of its price table it holds (by the patterns, the
/// default tier holding the rest), in the order of the policy's tiers.
pub fn listing(policy: &ResolvedPolicy) -> Vec<TierListing> {
    listing_with(&policy.tiers, &policy.pricing)
}

/// [`listing`] with an explicit price table.
pub fn listing_with(tiers: &ResolvedTiers, pricing: &PriceTable) -> Vec<TierListing> {
    let mut out: Vec<TierListing> = all_tiers(tiers)
        .into_iter()
        .map(|tier| TierListing {
            is_default: tier.id == tiers.default,
            tier,
            models: Vec::new(),
        })
        .collect();
    for (model, price) in &pricing.models {
        let id = tier_of(tiers, model);
        // Every tier a pattern or the default names is in the set (policy resolution makes
        // sure of it); an old logged policy's implicit set includes them too.
        if let Some(l) = out.iter_mut().find(|l| l.tier.id == id) {
            l.models.push(TierModel {
                model: model.clone(),
                price: price.clone(),
            });
        } else {
            debug_assert!(false, "tier {id:?} of {model:?} is not in the tier set");
        }
    }
    out
}

/// A model whose input price lies outside its tier's price range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceOutsideRange {
    /// Model name.
    pub model: String,
    /// Its input price, micro-USD per million tokens.
    pub input_per_mtok: Micros,
    /// Its tier.
    pub tier: String,
    /// The tier's range.
    pub range: TierPriceRange,
    /// The key that puts the model in the tier: `tiers.patterns[i]` (the first pattern that
    /// matches it) or `tiers.default`.
    pub key: String,
}

/// Every model of the policy's price table whose (base) input price lies outside its tier's
/// `price_range`, in model-name order.
pub fn prices_outside_ranges(policy: &ResolvedPolicy) -> Vec<PriceOutsideRange> {
    let mut out = Vec::new();
    for l in listing(policy) {
        let Some(range) = l.tier.price_range else {
            continue;
        };
        for m in l.models {
            let p = m.price.input_per_mtok;
            if p < range.min_input_per_mtok || p > range.max_input_per_mtok {
                out.push(PriceOutsideRange {
                    key: placing_key(&policy.tiers, &m.model),
                    model: m.model,
                    input_per_mtok: p,
                    tier: l.tier.id.clone(),
                    range,
                });
            }
        }
    }
    out.sort_by(|a, b| a.model.cmp(&b.model));
    out
}

/// A tier named in a file without `[tiers.defs]` that is neither built in nor defined (SPEC
/// §10: `policy check` warns about it): the tier and the first key that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndefinedTier {
    /// The tier id.
    pub tier: String,
    /// The key naming it: `tiers.default` or `tiers.patterns[i].tier`.
    pub key: String,
}

/// The implicit tiers of `tiers` other than the tier `default` (which needs no definition),
/// each with the first key that names it.
pub fn undefined_tiers(tiers: &ResolvedTiers) -> Vec<UndefinedTier> {
    tiers
        .defs
        .iter()
        .filter(|d| d.origin == TierOrigin::Implicit && d.id != DEFAULT_TIER)
        .map(|d| {
            let key = if tiers.default == d.id {
                "tiers.default".to_string()
            } else {
                tiers
                    .patterns
                    .iter()
                    .position(|(_, t)| *t == d.id)
                    .map_or_else(
                        || "tiers".to_string(),
                        |i| format!("tiers.patterns[{i}].tier"),
                    )
            };
            UndefinedTier {
                tier: d.id.clone(),
                key,
            }
        })
        .collect()
}
