//! Labels and scope keys (SPEC §3): validation of client labels, the canonical injection-safe
//! scope key of a budget's `group_by` values, label selectors and the model-name glob.
//!
//! Architecture invariant: a scope key is a pure function of `(group_by, labels)`, and
//! [`parse_scope_key`] inverts it exactly, so two different value tuples never share a bucket.

use bursar_schemas::event::SUBSCRIPTION_LABEL;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use bursar_schemas::Labels;

/// Most labels one event may carry.
pub const MAX_LABELS: usize = 32;
/// Longest label value, in bytes of UTF-8.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Longest label key, in bytes (`[a-z][a-z0-9_.-]{0,63}`).
const MAX_LABEL_KEY_BYTES: usize = 64;
/// Room reserved up front for a scope key, so that a typical one is rendered without regrowing.
const SCOPE_KEY_CAPACITY: usize = 48;
/// Labels the daemon derives (from the event's model, and `subscription` from the policy's
/// `[[subscription]]` matches); clients may not set them.
pub const RESERVED_LABELS: [&str; 4] = ["model", "provider", "tier", SUBSCRIPTION_LABEL];

/// A label that is not acceptable, naming where it is (`labels.team`, or `labels` for the map).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct LabelError {
    /// Where the problem is: `labels.<key>` or `labels`.
    pub field: String,
    /// What is wrong, for a human.
    pub message: String,
}

/// True when `key` matches `[a-z][a-z0-9_.-]{0,63}`.
pub fn is_valid_label_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    key.len() <= MAX_LABEL_KEY_BYTES
        && first.is_ascii_lowercase()
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
        })
}

/// Checks a label value: 1..=256 bytes of UTF-8 with no control characters.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("value must not be empty".to_owned());
    }
    if value.len() > MAX_LABEL_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes; at most {MAX_LABEL_VALUE_BYTES} are allowed",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "value contains a control character ({})",
            c.escape_unicode()
        ));
    }
    Ok(())
}

/// Checks the labels a client sent: at most [`MAX_LABELS`], every key and value valid, and none
/// of [`RESERVED_LABELS`] (the daemon derives those from the model).
pub fn validate_client_labels(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError {
            field: "labels".to_owned(),
            message: format!(
                "{} labels given; at most {MAX_LABELS} are allowed",
                labels.len()
            ),
        });
    }
    for (key, value) in labels {
        let error = |message: String| LabelError {
            field: format!("labels.{}", printable_key(key)),
            message,
        };
        if !is_valid_label_key(key) {
            return Err(error(
                "invalid label key: must match [a-z][a-z0-9_.-]{0,63}".to_owned(),
            ));
        }
        if RESERVED_LABELS.contains(&key.as_str()) {
            return Err(error(format!(
                "label {key:?} is reserved: the daemon derives model, provider and tier from the \
                 event's model, and subscription from the policy's subscriptions"
            )));
        }
        validate_label_value(value).map_err(error)?;
    }
    Ok(())
}

/// The labels a request carried, from an event's: without the derived ones
/// ([`RESERVED_LABELS`]).
pub fn client_part(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| !RESERVED_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A key as it may appear in an error: control characters escaped, at most 128 characters.
fn printable_key(key: &str) -> String {
    const SHOWN_CHARS: usize = 128;
    let mut shown: String = key.chars().take(SHOWN_CHARS).collect();
    if shown.len() < key.len() {
        shown.push('…');
    }
    shown.escape_debug().to_string()
}

/// The canonical scope key of `labels` under `group_by`: `name=value` pairs in `group_by` order,
/// joined by `,`, with `,` `=` `%`, control and invisible characters percent-encoded (per UTF-8
/// byte, upper-case hex). `None` if any `group_by` label is missing; `Some("")` for an empty
/// `group_by`.
pub fn scope_key(group_by: &[String], labels: &Labels) -> Option<String> {
    let mut out = String::with_capacity(SCOPE_KEY_CAPACITY);
    scope_key_into(&mut out, group_by, labels).then_some(out)
}

/// [`scope_key`] appended to `out`; false (and `out` as it was) if a `group_by` label is
/// missing. A key never holds a control character such as `\n` (they are encoded).
pub fn scope_key_into(out: &mut String, group_by: &[String], labels: &Labels) -> bool {
    let start = out.len();
    for (index, name) in group_by.iter().enumerate() {
        let Some(value) = labels.get(name) else {
            out.truncate(start);
            return false;
        };
        if index > 0 {
            out.push(',');
        }
        percent_encode_into(out, name);
        out.push('=');
        percent_encode_into(out, value);
    }
    true
}

/// The `(name, value)` pairs of a scope key, in order; the exact inverse of [`scope_key`].
/// `None` for any text [`scope_key`] would never produce (including non-canonical encodings
/// such as `%2c` or an encoded plain letter), so a parsed key always renders back to itself.
pub fn parse_scope_key(key: &str) -> Option<Vec<(String, String)>> {
    if key.is_empty() {
        return Some(Vec::new());
    }
    let mut pairs = Vec::new();
    for part in key.split(',') {
        let (name, value) = part.split_once('=')?;
        pairs.push((percent_decode(name)?, percent_decode(value)?));
    }
    let canonical = render_pairs(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    (canonical == key).then_some(pairs)
}

fn render_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (index, (name, value)) in pairs.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        percent_encode_into(&mut out, name);
        out.push('=');
        percent_encode_into(&mut out, value);
    }
    out
}

/// Characters that are encoded in a scope key: the separators, `%` itself, and anything a reader
/// of a key could not see or that could break a line or reorder text.
fn needs_encoding(c: char) -> bool {
    matches!(c, ',' | '=' | '%')
        || c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

fn percent_encode_into(out: &mut String, text: &str) {
    // Fast path: printable ASCII other than the separators and `%` is never encoded (every
    // ASCII whitespace but the space is a control character).
    if text
        .bytes()
        .all(|b| matches!(b, 0x20..=0x7e) && !matches!(b, b',' | b'=' | b'%'))
    {
        out.push_str(text);
        return;
    }
    percent_encode_chars(out, text);
}

fn percent_encode_chars(out: &mut String, text: &str) {
    for c in text.chars() {
        if needs_encoding(c) {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(b) = input.next() {
        if b == b'%' {
            let high = hex_value(input.next()?)?;
            let low = hex_value(input.next()?)?;
            bytes.push((high << 4) | low);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// True when every `(key, value)` of `selector` holds for `labels`: the label is present with
/// exactly that value, or with any value when the selector's value is `"*"`. An empty selector
/// matches everything.
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &Labels) -> bool {
    selector.iter().all(|(key, wanted)| match labels.get(key) {
        Some(value) => wanted == "*" || value == wanted,
        None => false,
    })
}

/// Checks a glob pattern (tier patterns): non-empty and free of control characters. Only `*` is
/// special; every other character, `?` and `[` included, matches itself.
pub fn validate_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("pattern must not be empty".to_owned());
    }
    if pattern.chars().any(char::is_control) {
        return Err("pattern must not contain control characters".to_owned());
    }
    Ok(())
}

/// True when `pattern` matches all of `text`; `*` matches any run of characters (including
/// none). Runs in time linear in the lengths (no backtracking): the literal pieces between stars
/// are matched leftmost-first, which is optimal for star-only globs.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or("");
    let Some(rest) = text.strip_prefix(first) else {
        return false;
    };
    let middle: Vec<&str> = pieces.collect();
    let Some((last, middle)) = middle.split_last() else {
        // No star at all: the whole text must be the pattern.
        return rest.is_empty();
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    for piece in middle.iter().filter(|p| !p.is_empty()) {
        match rest.split_once(piece) {
            Some((_, after)) => rest = after,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_grammar_boundaries() {
        assert!(is_valid_label_key("a"));
        assert!(is_valid_label_key(&format!("a{}", "b".repeat(63))));
        assert!(!is_valid_label_key(&format!("a{}", "b".repeat(64))));
        assert!(!is_valid_label_key(""));
        assert!(!is_valid_label_key("1team"));
        assert!(!is_valid_label_key("_team"));
        assert!(!is_valid_label_key("Team"));
        assert!(!is_valid_label_key("team name"));
        assert!(!is_valid_label_key("tëam"));
        assert!(is_valid_label_key("k8s.pod_name-x"));
    }

    #[test]
    fn ascii_fast_path_encodes_like_the_general_one() {
        for byte in 0u8..=0x7f {
            let text = format!("a{}b", char::from(byte));
            let (mut fast, mut general) = (String::new(), String::new());
            percent_encode_into(&mut fast, &text);
            percent_encode_chars(&mut general, &text);
            assert_eq!(fast, general, "byte {byte:#04x}");
        }
    }

    #[test]
    fn glob_pieces_do_not_overlap() {
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("ab*ba", "abba"));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("**", ""));
    }
}
