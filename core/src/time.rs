//! Timestamps: Unix microseconds as values, formatted and parsed as RFC 3339 (no clock reads).

use bursar_schemas::TsMicros;
use chrono::{DateTime, SecondsFormat};

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;

/// RFC 3339 in UTC with as many fractional digits as needed (`2026-11-24T00:00:00Z`).
pub fn format_ts(ts: TsMicros) -> String {
    match DateTime::from_timestamp_micros(ts) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => ts.to_string(),
    }
}

/// Parse RFC 3339 into Unix microseconds.
pub fn parse_ts(text: &str) -> Option<TsMicros> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.timestamp_micros())
}

/// `seconds` as microseconds, saturating.
pub fn seconds(s: u64) -> i64 {
    i64::try_from(s)
        .unwrap_or(i64::MAX)
        .saturating_mul(MICROS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_parse_roundtrip() {
        let ts = 1_795_478_400_000_000; // 2026-11-24T00:00:00Z
        assert_eq!(format_ts(ts), "2026-11-24T00:00:00Z");
        assert_eq!(parse_ts("2026-11-24T00:00:00Z"), Some(ts));
        assert_eq!(parse_ts("2026-11-24T02:00:00+02:00"), Some(ts));
        assert_eq!(format_ts(ts + 1500), "2026-11-24T00:00:00.001500Z");
        assert_eq!(parse_ts("yesterday"), None);
    }
}
