//! `bursar policy show`: render a logged (resolved) policy back as `bursar.toml` text that
//! `bursar policy check` accepts and that resolves to the same policy.
//!
//! The `[daemon]` keys that are not part of the logged policy (`socket`, `data_dir`,
//! `socket_mode`, `socket_group`, `admin_uids`) are not known from the log and are not shown.
//! Prices are shown only on request (the built-in table alone has dozens of models).

use bursar_core::money::format_usd;
use bursar_core::pricing::table_to_toml;
use bursar_schemas::policy::{
    is_allowance, is_quota_limit, CalendarUnit, Enforce, ResolvedBudget, ResolvedPolicy,
    ResolvedSubscription, TierOrigin, UnknownModels, WindowSpec,
};

/// A TOML basic string, escaped.
pub fn toml_str(s: &str) -> String {
    bursar_core::toml_text::string(s)
}

/// A key, bare when TOML allows it.
pub fn toml_key(s: &str) -> String {
    bursar_core::toml_text::key(s)
}

/// `"+02:00"` from seconds east of UTC.
fn utc_offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let s = seconds.unsigned_abs();
    format!("{sign}{:02}:{:02}", s / 3600, (s % 3600) / 60)
}

/// A fraction in parts per million as a TOML float (`900000` → `0.9`).
fn ppm_fraction(ppm: u32) -> String {
    let text = format_usd(i64::from(ppm));
    let trimmed = text.trim_end_matches('0');
    if trimmed.ends_with('.') {
        format!("{trimmed}0")
    } else {
        trimmed.to_string()
    }
}

fn budget_toml(b: &ResolvedBudget, out: &mut String) {
    out.push_str("[[budget]]\n");
    out.push_str(&format!("id = {}\n", toml_str(&b.id)));
    if !b.match_labels.is_empty() {
        let pairs: Vec<String> = b
            .match_labels
            .iter()
            .map(|(k, v)| format!("{} = {}", toml_key(k), toml_str(v)))
            .collect();
        out.push_str(&format!("match = {{ {} }}\n", pairs.join(", ")));
    }
    if !b.group_by.is_empty() {
        let keys: Vec<String> = b.group_by.iter().map(|k| toml_str(k)).collect();
        out.push_str(&format!("group_by = [{}]\n", keys.join(", ")));
    }
    window_and_limits(b, out);
    let enforce = match b.enforce {
        Enforce::Deny => "deny",
        Enforce::Warn => "warn",
    };
    out.push_str(&format!("enforce = \"{enforce}\"\n"));
    if b.max_micros.is_none()
        && b.max_tokens.is_none()
        && b.max_requests.is_none()
        && b.max_concurrent.is_none()
    {
        out.push_str("# no limit: a meter (reports, never warns or denies)\n");
    }
}

/// A subscription and its allowances (whose budgets `p.budgets` holds by id).
fn subscription_toml(s: &ResolvedSubscription, p: &ResolvedPolicy, out: &mut String) {
    out.push_str("[[subscription]]\n");
    out.push_str(&format!("id = {}\n", toml_str(&s.id)));
    let pairs: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{} = {}", toml_key(k), toml_str(v)))
        .collect();
    out.push_str(&format!("match = {{ {} }}\n", pairs.join(", ")));
    let allowances: Vec<&ResolvedBudget> = s
        .allowances
        .iter()
        .filter_map(|id| p.budgets.iter().find(|b| b.id == *id))
        .collect();
    if let Some(first) = allowances.first() {
        if !first.group_by.is_empty() {
            let keys: Vec<String> = first.group_by.iter().map(|k| toml_str(k)).collect();
            out.push_str(&format!("group_by = [{}]\n", keys.join(", ")));
        }
    }
    out.push_str(&format!("fee_usd = \"{}\"\n", format_usd(s.fee_micros)));
    out.push_str(&format!("fee_period = \"{}\"\n", unit_name(&s.fee_period)));
    if let Some(tz) = &s.timezone {
        out.push_str(&format!("timezone = {}\n", toml_str(tz)));
    }
    for b in allowances {
        out.push_str("[[subscription.allowance]]\n");
        window_and_limits(b, out);
    }
}

fn unit_name(unit: &CalendarUnit) -> &'static str {
    match unit {
        CalendarUnit::Day => "day",
        CalendarUnit::Week => "week",
        CalendarUnit::Month => "month",
    }
}

/// A budget's window and limit keys (shared by `[[budget]]` and `[[subscription.allowance]]`).
fn window_and_limits(b: &ResolvedBudget, out: &mut String) {
    match &b.window {
        WindowSpec::Fixed {
            seconds,
            offset_seconds,
        } => {
            out.push_str("window = \"fixed\"\n");
            out.push_str(&format!("window_seconds = {seconds}\n"));
            if *offset_seconds != 0 {
                out.push_str(&format!("window_offset_seconds = {offset_seconds}\n"));
            }
        }
        WindowSpec::Rolling {
            seconds,
            resolution_seconds,
        } => {
            out.push_str("window = \"rolling\"\n");
            out.push_str(&format!("window_seconds = {seconds}\n"));
            out.push_str(&format!("resolution_seconds = {resolution_seconds}\n"));
        }
        WindowSpec::Calendar {
            unit,
            utc_offset_seconds,
        } => {
            out.push_str("window = \"calendar\"\n");
            let unit = match unit {
                CalendarUnit::Day => "day",
                CalendarUnit::Week => "week",
                CalendarUnit::Month => "month",
            };
            out.push_str(&format!("calendar = \"{unit}\"\n"));
            out.push_str(&format!(
                "utc_offset = \"{}\"\n",
                utc_offset(*utc_offset_seconds)
            ));
        }
        WindowSpec::CalendarZone { unit, timezone } => {
            out.push_str("window = \"calendar\"\n");
            let unit = match unit {
                CalendarUnit::Day => "day",
                CalendarUnit::Week => "week",
                CalendarUnit::Month => "month",
            };
            out.push_str(&format!("calendar = \"{unit}\"\n"));
            out.push_str(&format!("timezone = {}\n", toml_str(timezone)));
        }
        WindowSpec::Cumulative => out.push_str("window = \"cumulative\"\n"),
    }
    if let Some(m) = b.max_micros {
        out.push_str(&format!("max_usd = \"{}\"\n", format_usd(m)));
    }
    if let Some(t) = b.max_tokens {
        out.push_str(&format!("max_tokens = {t}\n"));
    }
    if let Some(r) = b.max_requests {
        out.push_str(&format!("max_requests = {r}\n"));
    }
    if let Some(c) = b.max_concurrent {
        out.push_str(&format!("max_concurrent = {c}\n"));
    }
    if let Some(ppm) = b.warn_at_ppm {
        out.push_str(&format!("warn_at = {}\n", ppm_fraction(ppm)));
    }
}

/// The policy as `bursar.toml` text. With `prices`, the full price table follows as
/// `[pricing.models."NAME"]` sections.
pub fn policy_to_toml(p: &ResolvedPolicy, prices: bool) -> String {
    let mut out = String::new();
    out.push_str("[daemon]\n");
    out.push_str(&format!(
        "reservation_ttl_seconds = {}\n",
        p.reservation_ttl_seconds
    ));
    out.push_str(&format!(
        "max_keys_per_budget = {}\n",
        p.max_keys_per_budget
    ));
    let unknown = match p.unknown_models {
        UnknownModels::Deny => "deny",
        UnknownModels::PriceAtMax => "price_at_max",
    };
    out.push_str(&format!("unknown_models = \"{unknown}\"\n\n"));

    out.push_str("[tiers]\n");
    out.push_str(&format!("default = {}\n", toml_str(&p.tiers.default)));
    if p.tiers.patterns.is_empty() {
        out.push_str("patterns = []\n");
    } else {
        out.push_str("patterns = [\n");
        for (pat, tier) in &p.tiers.patterns {
            out.push_str(&format!(
                "  {{ match = {}, tier = {} }},\n",
                toml_str(pat),
                toml_str(tier)
            ));
        }
        out.push_str("]\n");
    }
    // Built-in tiers the policy lacks, or has redefined afresh, were removed.
    let removed: Vec<String> = bursar_core::tiers::BUILTIN_TIER_IDS
        .iter()
        .filter(|id| {
            !p.tiers.defs.is_empty()
                && !p.tiers.defs.iter().any(|d| {
                    d.id == **id && matches!(d.origin, TierOrigin::Builtin | TierOrigin::Changed)
                })
        })
        .map(|id| toml_str(id))
        .collect();
    if !removed.is_empty() {
        out.push_str(&format!("remove = [{}]\n", removed.join(", ")));
    }
    for d in &p.tiers.defs {
        if !matches!(d.origin, TierOrigin::Changed | TierOrigin::Defined) {
            continue;
        }
        out.push_str(&format!("[tiers.defs.{}]\n", toml_key(&d.id)));
        for (key, value) in [
            ("display_name", &d.display_name),
            ("description", &d.description),
            ("color", &d.color),
            ("icon", &d.icon),
        ] {
            if let Some(v) = value {
                out.push_str(&format!("{key} = {}\n", toml_str(v)));
            }
        }
        if let Some(r) = d.price_range {
            out.push_str(&format!(
                "price_range = [\"{}\", \"{}\"]\n",
                format_usd(r.min_input_per_mtok),
                format_usd(r.max_input_per_mtok)
            ));
        }
    }
    for (name, cap) in &p.tiers.caps {
        out.push_str(&format!("[tiers.caps.{}]\n", toml_key(name)));
        if let Some(m) = cap.max_call_micros {
            out.push_str(&format!("max_call_usd = \"{}\"\n", format_usd(m)));
        }
        if let Some(t) = cap.max_call_output_tokens {
            out.push_str(&format!("max_call_output_tokens = {t}\n"));
        }
    }
    for b in p
        .budgets
        .iter()
        .filter(|b| !is_allowance(&b.id) && !is_quota_limit(&b.id))
    {
        out.push('\n');
        budget_toml(b, &mut out);
    }
    for s in &p.subscriptions {
        out.push('\n');
        subscription_toml(s, p, &mut out);
    }
    for q in &p.quotas {
        out.push_str("\n[[quota]]\n");
        out.push_str(&format!("id = {}\n", toml_str(&q.id)));
        out.push_str(&format!("provider = {}\n", toml_str(&q.provider)));
        if !q.match_labels.is_empty() {
            let pairs: Vec<String> = q
                .match_labels
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml_str(v)))
                .collect();
            out.push_str(&format!("match = {{ {} }}\n", pairs.join(", ")));
        }
        if let Some(r) = q.requests_per_minute {
            out.push_str(&format!("requests_per_minute = {r}\n"));
        }
        if let Some(t) = q.tokens_per_minute {
            out.push_str(&format!("tokens_per_minute = {t}\n"));
        }
    }
    out.push('\n');
    if prices {
        out.push_str("[pricing]\n");
        out.push_str(&table_to_toml(&p.pricing));
    } else {
        out.push_str(&format!(
            "# [pricing]: {} priced models in force (`bursar policy show --prices` lists them)\n",
            p.pricing.models.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bursar_core::policy::{default_policy, parse_policy};

    fn roundtrip(text: &str) {
        let loaded = parse_policy(text, "t.toml", &|_| Err("no imports".into())).unwrap();
        let shown = policy_to_toml(&loaded.resolved, true);
        let back = parse_policy(&shown, "shown.toml", &|_| Err("no imports".into()))
            .unwrap_or_else(|e| panic!("{e:?}\n{shown}"));
        assert_eq!(back.resolved, loaded.resolved, "{shown}");
    }

    #[test]
    fn subscriptions_quotas_and_allowances_roundtrip() {
        roundtrip(
            r#"
[[budget]]
id = "team"
max_usd = 5
[[subscription]]
id = "chat-pro"
match = { account = "chat-pro", model = "claude-*" }
group_by = ["user"]
fee_usd = 20
fee_period = "week"
timezone = "Europe/Paris"
[[subscription.allowance]]
window = "rolling"
window_seconds = 18000
max_requests = 45
[[subscription.allowance]]
window = "calendar"
calendar = "week"
max_tokens = 5000000
warn_at = 0.8
[[subscription]]
id = "free"
match = { account = "free" }
[[quota]]
id = "openai-prod"
provider = "openai"
match = { account = "prod" }
requests_per_minute = 10000
tokens_per_minute = 2000000
[[quota]]
id = "anthropic"
provider = "anthropic"
"#,
        );
    }

    #[test]
    fn default_policy_roundtrips() {
        let p = default_policy();
        let shown = policy_to_toml(&p.resolved, true);
        let back = parse_policy(&shown, "shown.toml", &|_| Err("no imports".into())).unwrap();
        assert_eq!(back.resolved, p.resolved);
    }

    #[test]
    fn every_window_and_limit_roundtrips() {
        roundtrip(
            r#"
[daemon]
reservation_ttl_seconds = 120
unknown_models = "price_at_max"
max_keys_per_budget = 50
[tiers]
default = "small"
patterns = [ { match = "gpt-4o-mini*", tier = "small" }, { match = "gpt-4o*", tier = "frontier" } ]
[tiers.caps.frontier]
max_call_usd = 0.5
max_call_output_tokens = 16000
[pricing.models."my model"]
provider = "custom"
input_per_mtok = "0.000001"
output_per_mtok = 3
[[budget]]
id = "a"
match = { org = "acme", "odd.key" = "*" }
group_by = ["team", "user"]
window = "fixed"
window_seconds = 86400
window_offset_seconds = -7200
max_usd = "12.345678"
warn_at = 0.875
[[budget]]
id = "b"
window = "rolling"
window_seconds = 60
resolution_seconds = 1
max_tokens = 100000
[[budget]]
id = "c"
window = "calendar"
calendar = "month"
utc_offset = "-03:30"
max_requests = 10
enforce = "warn"
warn_at = 1
[[budget]]
id = "d"
max_concurrent = 2
[[budget]]
id = "meter"
group_by = ["model"]
"#,
        );
    }

    #[test]
    fn tier_definitions_changes_and_removals_roundtrip() {
        roundtrip(
            r##"
[tiers]
default = "low"
patterns = [ { match = "gpt-4o*", tier = "frontier" }, { match = "o1*", tier = "premium" } ]
remove = ["medium", "high"]
[tiers.defs.frontier]
display_name = "Frontier \"max\""
description = "The best there is"
price_range = [2, 20.5]
color = "#abc"
icon = "*"
[tiers.defs.premium]
display_name = "Top"
[tiers.defs.high]
description = "high, defined afresh"
[tiers.caps.frontier]
max_call_usd = 1
"##,
        );
    }

    #[test]
    fn a_legacy_tiers_section_roundtrips_without_definitions() {
        roundtrip(
            r#"
[tiers]
default = "small"
patterns = [ { match = "gpt-4o*", tier = "frontier" } ]
remove = ["premium"]
"#,
        );
    }
}
