//! TOML text that bursar writes (`bursar pricing import`, `bursar policy show`, keys in policy
//! errors): strings and keys through `toml_write`, the writer of `toml_edit`.

use toml_write::{ToTomlKey, ToTomlValue, TomlKeyBuilder, TomlStringBuilder};

/// A TOML basic string (`"..."`, escaped), also valid as a quoted key.
pub fn string(s: &str) -> String {
    TomlStringBuilder::new(s).as_basic().to_toml_value()
}

/// A key: bare when TOML allows it, else a basic string.
pub fn key(s: &str) -> String {
    let builder = TomlKeyBuilder::new(s);
    builder
        .as_unquoted()
        .unwrap_or_else(|| builder.as_basic())
        .to_toml_key()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_basic_strings_that_toml_reads_back() {
        for s in [
            "gpt-4o",
            "a\"b\\c\u{1}",
            "tab\there\nnewline",
            "é ü 日本",
            "",
            "'",
        ] {
            let text = string(s);
            assert!(text.starts_with('"') && text.ends_with('"'), "{text}");
            let parsed: toml::Value = match toml::from_str(&format!("k = {text}")) {
                Ok(v) => v,
                Err(e) => panic!("{text}: {e}"),
            };
            assert_eq!(parsed.get("k").and_then(|v| v.as_str()), Some(s), "{text}");
        }
        assert_eq!(string("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\u0001\"");
    }

    #[test]
    fn keys_are_bare_when_they_can_be() {
        assert_eq!(key("team_a-1"), "team_a-1");
        assert_eq!(key("gpt-4o.mini"), "\"gpt-4o.mini\"");
        assert_eq!(key(""), "\"\"");
        assert_eq!(key("a\"b"), "\"a\\\"b\"");
    }
}
