//! What a provider says about its rate limits (SPEC §10 `observe`): the response headers of
//! OpenAI (`x-ratelimit-*`) and Anthropic (`anthropic-ratelimit-*`), read into one normalised
//! [`Observation`]. Pure: the time the response arrived comes in as `now`.
//!
//! Malformed headers are skipped one by one and reported as [`HeaderProblem`]s, never fatal;
//! headers of neither family are ignored. A header given twice: the last one wins.

use crate::time::parse_ts;
use bursar_schemas::TsMicros;
use serde::{Deserialize, Serialize};

/// Longest header value read; longer ones are reported, not parsed.
pub const MAX_HEADER_VALUE_BYTES: usize = 64;

/// One limit as a provider reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// The limit per window.
    pub limit: Option<u64>,
    /// What is left of it now.
    pub remaining: Option<u64>,
    /// When it is whole again (Unix µs).
    pub reset_at: Option<TsMicros>,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset_at.is_none()
    }
}

/// A provider's rate limits as one response reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Requests.
    pub requests: Option<Window>,
    /// Tokens (all kinds).
    pub tokens: Option<Window>,
    /// Input tokens (Anthropic).
    pub input_tokens: Option<Window>,
    /// Output tokens (Anthropic).
    pub output_tokens: Option<Window>,
}

impl Observation {
    /// True when no header said anything.
    pub fn is_empty(&self) -> bool {
        self.requests.is_none()
            && self.tokens.is_none()
            && self.input_tokens.is_none()
            && self.output_tokens.is_none()
    }
}

/// A header that was recognised but could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderProblem {
    /// The header's name as it was sent.
    pub header: String,
    /// Its value (cut to [`MAX_HEADER_VALUE_BYTES`] characters).
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

#[derive(Clone, Copy)]
enum Which {
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
}

#[derive(Clone, Copy)]
enum Field {
    Limit,
    Remaining,
    /// OpenAI: a duration from now; Anthropic: an RFC 3339 time.
    ResetIn,
    ResetAt,
}

/// Which window and field a header name (lower case) stands for.
fn classify(name: &str) -> Option<(Which, Field)> {
    if let Some(rest) = name.strip_prefix("x-ratelimit-") {
        let (field, what) = if let Some(w) = rest.strip_prefix("limit-") {
            (Field::Limit, w)
        } else if let Some(w) = rest.strip_prefix("remaining-") {
            (Field::Remaining, w)
        } else if let Some(w) = rest.strip_prefix("reset-") {
            (Field::ResetIn, w)
        } else {
            return None;
        };
        let which = match what {
            "requests" => Which::Requests,
            "tokens" => Which::Tokens,
            _ => return None,
        };
        return Some((which, field));
    }
    let rest = name.strip_prefix("anthropic-ratelimit-")?;
    let (what, field) = rest.rsplit_once('-')?;
    let field = match field {
        "limit" => Field::Limit,
        "remaining" => Field::Remaining,
        "reset" => Field::ResetAt,
        _ => return None,
    };
    let which = match what {
        "requests" => Which::Requests,
        "tokens" => Which::Tokens,
        "input-tokens" => Which::InputTokens,
        "output-tokens" => Which::OutputTokens,
        _ => return None,
    };
    Some((which, field))
}

/// Read the rate-limit headers of one response that arrived at `now`.
pub fn parse_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    now: TsMicros,
) -> (Observation, Vec<HeaderProblem>) {
    let mut obs = Observation::default();
    let mut problems = Vec::new();
    for (name, value) in headers {
        let lower = name.trim().to_ascii_lowercase();
        let Some((which, field)) = classify(&lower) else {
            continue;
        };
        let problem = |reason: &str| HeaderProblem {
            header: name.to_string(),
            value: value.chars().take(MAX_HEADER_VALUE_BYTES).collect(),
            reason: reason.to_string(),
        };
        let text = value.trim();
        if text.len() > MAX_HEADER_VALUE_BYTES {
            problems.push(problem("longer than 64 bytes"));
            continue;
        }
        let window = match which {
            Which::Requests => &mut obs.requests,
            Which::Tokens => &mut obs.tokens,
            Which::InputTokens => &mut obs.input_tokens,
            Which::OutputTokens => &mut obs.output_tokens,
        };
        let w = window.get_or_insert_with(Window::default);
        match field {
            Field::Limit | Field::Remaining => match parse_count(text) {
                Some(n) if matches!(field, Field::Limit) => w.limit = Some(n),
                Some(n) => w.remaining = Some(n),
                None => problems.push(problem("not a whole number >= 0")),
            },
            Field::ResetIn => match parse_duration(text).and_then(|d| now.checked_add(d)) {
                Some(at) => w.reset_at = Some(at),
                None => problems.push(problem("not a duration such as 6m0s, 1s or 20ms")),
            },
            Field::ResetAt => match parse_ts(text) {
                Some(at) => w.reset_at = Some(at),
                None => problems.push(problem("not an RFC 3339 time")),
            },
        }
        if w.is_empty() {
            *window = None;
        }
    }
    (obs, problems)
}

/// A count: ASCII digits only (no sign, no fraction), within u64.
fn parse_count(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A Go-style duration (`6m0s`, `1h2m3.5s`, `20ms`, `250us`, `100ns`) or a plain number of
/// seconds (`30`, `0.5`), in microseconds rounded up. `None` when malformed or absurd.
pub fn parse_duration(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    // Work in nanoseconds (u128: no overflow while parsing), round up to µs at the end.
    let mut total: u128 = 0;
    let mut rest = text;
    let mut plain = true;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        if number.is_empty() || number.len() > 24 {
            return None;
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "" if plain && next.is_empty() => 1_000_000_000,
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        plain = false;
        total = total.checked_add(scaled(number, per_unit)?)?;
        rest = next;
    }
    let micros = total.div_ceil(1_000);
    i64::try_from(micros).ok()
}

/// `number` (digits with at most one `.`) times `per_unit` nanoseconds, rounded up.
fn scaled(number: &str, per_unit: u128) -> Option<u128> {
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) if !f.contains('.') => (w, f),
        Some(_) => return None,
        None => (number, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut out = whole.checked_mul(per_unit)?;
    if !frac.is_empty() {
        let frac = frac.get(..frac.len().min(12))?;
        let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
        let f: u128 = frac.parse().ok()?;
        out = out.checked_add(f.checked_mul(per_unit)?.div_ceil(scale))?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: TsMicros = 1_796_299_200_000_000; // 2026-12-03T12:00:00Z
    const S: i64 = 1_000_000;

    fn parse(h: &[(&str, &str)]) -> (Observation, Vec<HeaderProblem>) {
        parse_headers(h.iter().copied(), NOW)
    }

    #[test]
    fn openai_headers_give_requests_and_tokens_with_resets_from_now() {
        let (o, problems) = parse(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("content-type", "application/json"),
            ("retry-after", "20"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            o.requests,
            Some(Window {
                limit: Some(60),
                remaining: Some(59),
                reset_at: Some(NOW + S)
            })
        );
        assert_eq!(
            o.tokens,
            Some(Window {
                limit: Some(150_000),
                remaining: Some(149_984),
                reset_at: Some(NOW + 360 * S)
            })
        );
        assert_eq!(o.input_tokens, None);
    }

    #[test]
    fn anthropic_headers_give_every_family_with_rfc3339_resets() {
        let (o, problems) = parse(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-12-03T12:00:30Z"),
            ("anthropic-ratelimit-tokens-limit", "100000"),
            ("anthropic-ratelimit-tokens-remaining", "99000"),
            ("anthropic-ratelimit-tokens-reset", "2026-12-03T12:01:00Z"),
            ("anthropic-ratelimit-input-tokens-limit", "80000"),
            ("anthropic-ratelimit-input-tokens-remaining", "79500"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-12-03T12:00:05Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "16000"),
            ("anthropic-ratelimit-output-tokens-remaining", "15500"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-12-03T13:00:00+01:00",
            ),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        let w = |l, r, at| {
            Some(Window {
                limit: Some(l),
                remaining: Some(r),
                reset_at: Some(at),
            })
        };
        assert_eq!(o.requests, w(50, 49, NOW + 30 * S));
        assert_eq!(o.tokens, w(100_000, 99_000, NOW + 60 * S));
        assert_eq!(o.input_tokens, w(80_000, 79_500, NOW + 5 * S));
        assert_eq!(o.output_tokens, w(16_000, 15_500, NOW));
    }

    #[test]
    fn header_names_are_case_insensitive_and_the_last_of_a_repeated_one_wins() {
        let (o, problems) = parse(&[
            ("X-RateLimit-Remaining-Requests", "10"),
            ("x-ratelimit-remaining-requests", "9"),
        ]);
        assert!(problems.is_empty());
        assert_eq!(o.requests.and_then(|w| w.remaining), Some(9));
    }

    #[test]
    fn each_malformed_header_is_reported_and_the_others_are_still_read() {
        let (o, problems) = parse(&[
            ("x-ratelimit-limit-requests", "-1"),
            ("x-ratelimit-remaining-requests", "12.5"),
            ("x-ratelimit-reset-requests", "soon"),
            ("x-ratelimit-remaining-tokens", "99999999999999999999999"),
            ("anthropic-ratelimit-requests-reset", "tomorrow"),
            ("x-ratelimit-limit-tokens", &"9".repeat(100)),
            ("x-ratelimit-reset-tokens", "20ms"),
        ]);
        let named: Vec<&str> = problems.iter().map(|p| p.header.as_str()).collect();
        assert_eq!(
            named,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-requests-reset",
                "x-ratelimit-limit-tokens",
            ]
        );
        assert!(problems[2].reason.contains("duration"));
        assert!(problems[4].reason.contains("RFC 3339"));
        assert_eq!(o.requests, None, "nothing readable about requests");
        assert_eq!(o.tokens.and_then(|w| w.reset_at), Some(NOW + 20_000));
    }

    #[test]
    fn durations_read_like_go_prints_them_rounded_up_to_microseconds() {
        assert_eq!(parse_duration("6m0s"), Some(360 * S));
        assert_eq!(parse_duration("1s"), Some(S));
        assert_eq!(parse_duration("20ms"), Some(20_000));
        assert_eq!(parse_duration("1h2m3.5s"), Some(3723 * S + 500_000));
        assert_eq!(parse_duration("59.531s"), Some(59_531_000));
        assert_eq!(parse_duration("0.5s"), Some(500_000));
        assert_eq!(parse_duration("250us"), Some(250));
        assert_eq!(parse_duration("250µs"), Some(250));
        assert_eq!(parse_duration("100ns"), Some(1));
        assert_eq!(parse_duration("30"), Some(30 * S));
        assert_eq!(parse_duration("0.25"), Some(250_000));
        for bad in [
            "",
            "s",
            "1x",
            "1.2.3s",
            "-1s",
            "1s2",
            "ms",
            "99999999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic_and_problems_name_a_given_header(
            pairs in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("x-ratelimit-reset-tokens".to_string()),
                        Just("anthropic-ratelimit-tokens-reset".to_string()),
                        Just("X-RATELIMIT-LIMIT-REQUESTS".to_string()),
                        "\\PC{0,40}",
                    ],
                    "\\PC{0,80}",
                ),
                0..12,
            ),
            now in any::<i64>(),
        ) {
            let (_, problems) =
                parse_headers(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), now);
            for p in &problems {
                prop_assert!(pairs.iter().any(|(k, _)| *k == p.header));
            }
        }
    }
}
