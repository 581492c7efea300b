//! Cost tiers as entities (SPEC §10) as a user meets them in `bursar.toml`: the built-in tiers,
//! `[tiers.defs.ID]` definitions and changes, `remove`, the undefined-tier errors that come
//! with `[tiers.defs]` (and only with it), and what `policy check` and `bursar tiers` are built
//! on (which models a tier holds, prices outside a tier's range).
#![allow(clippy::panic)]

use bursar_core::policy::{default_policy, parse_policy, LoadedPolicy, PolicyError};
use bursar_core::tiers::{listing, prices_outside_ranges, undefined_tiers};
use bursar_schemas::policy::{TierDef, TierOrigin, TierPriceRange};

fn no_import(path: &str) -> Result<String, String> {
    Err(format!("no such file: {path}"))
}

fn file(lines: &[&str]) -> String {
    lines.join("\n") + "\n"
}

fn parse(text: &str) -> LoadedPolicy {
    match parse_policy(text, "bursar.toml", &no_import) {
        Ok(p) => p,
        Err(e) => panic!("{e:#?}\n{text}"),
    }
}

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_policy(text, "bursar.toml", &no_import) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errs) => errs,
    }
}

/// The only error; asserts its key and line.
fn error_at(text: &str, key: &str, line: usize) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert_eq!(errs[0].key, key, "{}", errs[0]);
    assert_eq!(errs[0].line, Some(line), "{}", errs[0]);
    errs[0].message.clone()
}

fn tier<'a>(p: &'a LoadedPolicy, id: &str) -> &'a TierDef {
    p.resolved
        .tiers
        .defs
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("no tier {id} in {:#?}", p.resolved.tiers.defs))
}

fn ids(p: &LoadedPolicy) -> Vec<&str> {
    p.resolved
        .tiers
        .defs
        .iter()
        .map(|d| d.id.as_str())
        .collect()
}

fn range(min: i64, max: i64) -> Option<TierPriceRange> {
    Some(TierPriceRange {
        min_input_per_mtok: min,
        max_input_per_mtok: max,
    })
}

#[test]
fn the_four_built_in_tiers_come_with_names_descriptions_ranges_and_colours() {
    for p in [default_policy(), parse(""), parse("[tiers]\n")] {
        assert_eq!(
            ids(&p),
            ["low", "medium", "high", "premium", "default"],
            "{:#?}",
            p.resolved.tiers.defs
        );
        let low = tier(&p, "low");
        assert_eq!(low.origin, TierOrigin::Builtin);
        assert_eq!(low.display_name.as_deref(), Some("Low"));
        assert!(low.description.is_some() && low.color.is_some());
        assert_eq!(low.price_range, range(0, 500_000));
        assert_eq!(
            tier(&p, "premium").price_range,
            range(10_000_000, 1_000_000_000)
        );
        // The default tier needs no definition and carries no metadata.
        let default = tier(&p, "default");
        assert_eq!(default.origin, TierOrigin::Implicit);
        assert_eq!(default.display_name, None);
    }
}

#[test]
fn a_definition_parses_with_its_price_range_in_micros_per_mtok() {
    let p = parse(&file(&[
        "[tiers]",
        "default = \"low\"",
        "patterns = [ { match = \"gpt-4o*\", tier = \"frontier\" } ]",
        "[tiers.defs.frontier]",
        "display_name = \"Frontier\"",
        "description = \"The best models there are\"",
        "price_range = [2.5, \"12.25\"]",
        "color = \"#6a1b9a\"",
        "icon = \"★\"",
    ]));
    let f = tier(&p, "frontier");
    assert_eq!(
        *f,
        TierDef {
            id: "frontier".into(),
            origin: TierOrigin::Defined,
            display_name: Some("Frontier".into()),
            description: Some("The best models there are".into()),
            price_range: range(2_500_000, 12_250_000),
            color: Some("#6a1b9a".into()),
            icon: Some("★".into()),
        }
    );
    // Built-ins first, then definitions; no implicit `default` tier when `default` is set.
    assert_eq!(ids(&p), ["low", "medium", "high", "premium", "frontier"]);
}

#[test]
fn a_definition_with_a_built_in_id_changes_only_the_keys_it_gives() {
    let p = parse(&file(&[
        "[tiers.defs.high]",
        "display_name = \"Heavy\"",
        "price_range = [4, 8]",
    ]));
    let high = tier(&p, "high");
    assert_eq!(high.origin, TierOrigin::Changed);
    assert_eq!(high.display_name.as_deref(), Some("Heavy"));
    assert_eq!(high.price_range, range(4_000_000, 8_000_000));
    let builtin = bursar_core::tiers::builtin_tiers();
    let shipped = builtin
        .iter()
        .find(|d| d.id == "high")
        .map(|d| &d.description);
    assert_eq!(Some(&high.description), shipped, "the description stays");
    assert_eq!(high.color.as_deref(), Some("#ef6c00"));
}

#[test]
fn removed_built_in_tiers_are_gone_and_can_be_defined_afresh() {
    let p = parse(&file(&[
        "[tiers]",
        "remove = [\"premium\", \"medium\"]",
        "[tiers.defs.medium]",
        "description = \"ours\"",
    ]));
    assert_eq!(ids(&p), ["low", "high", "medium", "default"]);
    let medium = tier(&p, "medium");
    assert_eq!(medium.origin, TierOrigin::Defined);
    assert_eq!(medium.display_name, None, "nothing of the built-in is kept");
    assert_eq!(medium.description.as_deref(), Some("ours"));

    let text = file(&["[tiers]", "remove = [\"low\", \"cheap\"]"]);
    let msg = error_at(&text, "tiers.remove[1]", 2);
    assert!(msg.contains("\"cheap\" is not a built-in tier"), "{msg}");
}

#[test]
fn with_definitions_a_pattern_naming_an_undefined_tier_is_an_error() {
    let text = file(&[
        "[tiers]",
        "patterns = [ { match = \"gpt-4o*\", tier = \"frontier\" }, { match = \"o1*\", tier = \"fronteir\" } ]",
        "[tiers.defs.frontier]",
    ]);
    let msg = error_at(&text, "tiers.patterns[1].tier", 2);
    assert!(msg.contains("no tier named \"fronteir\""), "{msg}");
    assert!(
        msg.contains("\"frontier\""),
        "the defined tiers are listed: {msg}"
    );

    // An empty `defs` table asks for the check too; the default tier and caps are checked.
    let text = file(&["[tiers]", "default = \"small\"", "defs = {}"]);
    error_at(&text, "tiers.default", 2);
    let text = file(&[
        "[tiers]",
        "defs = {}",
        "[tiers.caps.huge]",
        "max_call_usd = 1",
    ]);
    error_at(&text, "tiers.caps.huge", 3);
    // A removed built-in tier is undefined.
    let text = file(&[
        "[tiers]",
        "remove = [\"premium\"]",
        "patterns = [ { match = \"o1*\", tier = \"premium\" } ]",
        "defs = {}",
    ]);
    error_at(&text, "tiers.patterns[0].tier", 3);
    // Built-in tiers and the tier `default` need no definition.
    let p = parse(&file(&[
        "[tiers]",
        "patterns = [ { match = \"o1*\", tier = \"premium\" }, { match = \"x*\", tier = \"default\" } ]",
        "defs = {}",
        "[tiers.caps.low]",
        "max_call_usd = 1",
    ]));
    assert_eq!(p.resolved.tiers.default, "default");
}

#[test]
fn a_file_without_definitions_keeps_its_tier_names_as_before() {
    let text = file(&[
        "[tiers]",
        "default = \"small\"",
        "patterns = [ { match = \"gpt-4o-mini*\", tier = \"small\" }, { match = \"gpt-4o*\", tier = \"frontier\" } ]",
        "[tiers.caps.frontier]",
        "max_call_usd = 0.5",
    ]);
    let p = parse(&text);
    assert_eq!(p.resolved.tiers.default, "small");
    assert_eq!(
        ids(&p),
        ["low", "medium", "high", "premium", "small", "frontier"]
    );
    assert_eq!(tier(&p, "frontier").origin, TierOrigin::Implicit);
    // `policy check` warns about them (SPEC §10), naming the key that names each first.
    let undefined: Vec<(String, String)> = undefined_tiers(&p.resolved.tiers)
        .into_iter()
        .map(|u| (u.tier, u.key))
        .collect();
    assert_eq!(
        undefined,
        [
            ("small".to_string(), "tiers.default".to_string()),
            ("frontier".to_string(), "tiers.patterns[1].tier".to_string())
        ]
    );
    // A cap still has to name a tier that exists.
    let text = file(&[
        "[tiers]",
        "default = \"small\"",
        "[tiers.caps.big]",
        "max_call_usd = 1",
    ]);
    let msg = error_at(&text, "tiers.caps.big", 3);
    assert!(msg.contains("no tier named \"big\""), "{msg}");
}

#[test]
fn a_price_range_must_be_two_amounts_min_first() {
    let base = |range: &str| file(&["[tiers.defs.x]", &format!("price_range = {range}")]);
    let msg = error_at(&base("[5, 2]"), "tiers.defs.x.price_range", 2);
    assert!(msg.contains("min 5.00 USD is above max 2.00 USD"), "{msg}");
    let msg = error_at(&base("[1]"), "tiers.defs.x.price_range", 2);
    assert!(msg.contains("[min, max]"), "{msg}");
    error_at(&base("[1, -2]"), "tiers.defs.x.price_range[1]", 2);
    error_at(&base("[\"abc\", 2]"), "tiers.defs.x.price_range[0]", 2);
    let p = parse(&base("[0, 0]"));
    assert_eq!(tier(&p, "x").price_range, range(0, 0));
}

#[test]
fn tier_metadata_is_checked_field_by_field() {
    let def = |line: &str| file(&["[tiers.defs.x]", line]);
    error_at(&def("color = \"#12345\""), "tiers.defs.x.color", 2);
    error_at(&def("color = \"Green!\""), "tiers.defs.x.color", 2);
    parse(&def("color = \"dark-green\""));
    parse(&def("color = \"#ABC\""));
    error_at(&def("display_name = \"\""), "tiers.defs.x.display_name", 2);
    error_at(
        &def("description = \"a\\nb\""),
        "tiers.defs.x.description",
        2,
    );
    error_at(
        &def("icon = \"an icon name far longer than thirty-two bytes\""),
        "tiers.defs.x.icon",
        2,
    );
    error_at(&def("display_nam = \"X\""), "tiers.defs.x.display_nam", 2);
    let many: Vec<String> = (0..1001).map(|i| format!("[tiers.defs.t{i}]")).collect();
    let errs = errors(&(many.join("\n") + "\n"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].key, "tiers.defs");
    assert!(errs[0].message.contains("at most 1000 tiers"), "{errs:#?}");
    let long_id = "t".repeat(300);
    let errs = errors(&file(&[&format!("[tiers.defs.{long_id}]")]));
    assert!(errs[0].message.contains("tier name"), "{errs:#?}");
}

#[test]
fn a_tier_holds_the_models_its_patterns_match_and_the_default_tier_the_rest() {
    let p = parse(&file(&[
        "[tiers]",
        "default = \"low\"",
        "patterns = [ { match = \"gpt-4o-mini*\", tier = \"low\" }, { match = \"gpt-4o*\", tier = \"high\" } ]",
    ]));
    let l = listing(&p.resolved);
    let models = |id: &str| -> Vec<String> {
        l.iter()
            .find(|t| t.tier.id == id)
            .map(|t| t.models.iter().map(|m| m.model.clone()).collect())
            .unwrap_or_default()
    };
    let high = models("high");
    assert!(high.contains(&"gpt-4o".to_string()), "{high:?}");
    assert!(!high.contains(&"gpt-4o-mini".to_string()), "{high:?}");
    let low = models("low");
    assert!(low.contains(&"gpt-4o-mini".to_string()));
    assert!(
        low.contains(&"o1".to_string()),
        "unmatched models are in the default tier"
    );
    assert!(models("premium").is_empty());
    let total: usize = l.iter().map(|t| t.models.len()).sum();
    assert_eq!(
        total,
        p.resolved.pricing.models.len(),
        "every model in one tier"
    );
    assert!(l
        .iter()
        .find(|t| t.tier.id == "low")
        .is_some_and(|t| t.is_default));
}

#[test]
fn a_model_priced_outside_its_tiers_range_is_named_with_its_price_tier_and_key() {
    let p = parse(&file(&[
        "[tiers]",
        "default = \"medium\"",
        "patterns = [ { match = \"gpt-4o*\", tier = \"low\" }, { match = \"my-*\", tier = \"medium\" } ]",
        "[pricing.models.\"my-model\"]",
        "input_per_mtok = 2",
        "output_per_mtok = 8",
        "[pricing.models.\"my-cheap\"]",
        "input_per_mtok = 0.1",
        "output_per_mtok = 0.2",
    ]));
    let outside = prices_outside_ranges(&p.resolved);
    let gpt4o = outside.iter().find(|w| w.model == "gpt-4o");
    let Some(w) = gpt4o else {
        panic!("gpt-4o ($2.50) is not low ($0–$0.50): {outside:#?}")
    };
    assert_eq!(w.input_per_mtok, 2_500_000);
    assert_eq!(w.tier, "low");
    assert_eq!(w.range, range(0, 500_000).unwrap_or_else(|| unreachable!()));
    assert_eq!(w.key, "tiers.patterns[0]");
    assert!(
        outside.iter().all(|w| w.model != "gpt-4o-mini"),
        "$0.15 is low"
    );
    assert!(
        outside.iter().all(|w| w.model != "my-model"),
        "$2 is medium"
    );
    let cheap = outside.iter().find(|w| w.model == "my-cheap");
    assert_eq!(cheap.map(|w| w.key.as_str()), Some("tiers.patterns[1]"));
    // A tier without a range warns about nothing.
    let p = parse(&file(&["[tiers]", "default = \"anything\""]));
    assert!(prices_outside_ranges(&p.resolved).is_empty());
}

#[test]
fn a_policy_logged_before_tier_metadata_still_decodes_and_lists_its_tiers() {
    // A `policy_applied` of an earlier release: `tiers` without `defs`.
    let mut v = match serde_json::to_value(
        &parse(&file(&[
            "[tiers]",
            "default = \"small\"",
            "patterns = [ { match = \"gpt-4o*\", tier = \"frontier\" } ]",
        ]))
        .resolved,
    ) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    if let Some(t) = v.get_mut("tiers").and_then(|t| t.as_object_mut()) {
        t.remove("defs");
    }
    let old: bursar_schemas::policy::ResolvedPolicy = match serde_json::from_value(v) {
        Ok(p) => p,
        Err(e) => panic!("an old policy must decode: {e}"),
    };
    assert!(old.tiers.defs.is_empty());
    let l = listing(&old);
    let listed: Vec<(&str, TierOrigin)> = l
        .iter()
        .map(|t| (t.tier.id.as_str(), t.tier.origin))
        .collect();
    assert_eq!(
        listed,
        [
            ("small", TierOrigin::Implicit),
            ("frontier", TierOrigin::Implicit)
        ]
    );
}
