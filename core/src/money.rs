//! Money: exact conversion of dollar amounts to integer micro-USD, and cost arithmetic.
//!
//! Architecture invariant: no floating point is used for accounting. A TOML float is converted
//! through its shortest round-trip decimal text (`0.1` → `"0.1"`), then parsed as a decimal.

use bursar_schemas::policy::Dollars;
use bursar_schemas::Micros;

/// Micro-USD in one USD.
pub const MICROS_PER_USD: i64 = 1_000_000;
/// Tokens in one "million tokens" price unit.
pub const TOKENS_PER_MTOK: u128 = 1_000_000;
const TOKENS_PER_MTOK_NARROW: u64 = 1_000_000;
/// Largest dollar amount accepted anywhere (one trillion USD).
pub const MAX_USD: i64 = 1_000_000_000_000;

/// Why a dollar amount is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Below zero.
    #[error("must not be negative")]
    Negative,
    /// NaN or infinite.
    #[error("must be a finite number")]
    NotFinite,
    /// More than six decimals.
    #[error("has more than 6 decimal places (money is counted in whole micro-USD)")]
    TooPrecise,
    /// Not a decimal number.
    #[error("is not a decimal number: {0:?}")]
    NotANumber(String),
    /// Too large.
    #[error("is larger than {MAX_USD} USD")]
    TooLarge,
}

/// Convert a dollar amount exactly to micro-USD.
pub fn dollars_to_micros(d: &Dollars) -> Result<Micros, MoneyError> {
    match d {
        Dollars::Int(i) => {
            if *i < 0 {
                return Err(MoneyError::Negative);
            }
            if *i > MAX_USD {
                return Err(MoneyError::TooLarge);
            }
            Ok(i * MICROS_PER_USD)
        }
        Dollars::Float(f) => {
            if !f.is_finite() {
                return Err(MoneyError::NotFinite);
            }
            // `{}` prints the shortest text that round-trips, never exponent notation.
            decimal_to_micros(&format!("{f}"))
        }
        Dollars::Text(s) => decimal_to_micros(s),
    }
}

/// Parse a plain decimal string (`"12"`, `"12.5"`, `"0.000001"`) into micro-USD.
pub fn decimal_to_micros(text: &str) -> Result<Micros, MoneyError> {
    let s = text.trim();
    let lower = s.to_ascii_lowercase();
    if lower.contains("nan") || lower.contains("inf") {
        return Err(MoneyError::NotFinite);
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int_part, frac_part) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return Err(MoneyError::NotANumber(text.to_string()));
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > 6 {
        return Err(MoneyError::TooPrecise);
    }
    let int_trimmed = int_part.trim_start_matches('0');
    if int_trimmed.len() > 13 {
        return Err(MoneyError::TooLarge);
    }
    let whole: i64 = if int_trimmed.is_empty() {
        0
    } else {
        int_trimmed
            .parse()
            .map_err(|_| MoneyError::NotANumber(text.to_string()))?
    };
    if whole > MAX_USD {
        return Err(MoneyError::TooLarge);
    }
    let mut frac: i64 = 0;
    for (i, b) in frac_trimmed.bytes().enumerate() {
        let digit = i64::from(b - b'0');
        frac += digit * 10_i64.pow(5 - i as u32);
    }
    let micros = whole * MICROS_PER_USD + frac;
    if neg && micros != 0 {
        return Err(MoneyError::Negative);
    }
    Ok(micros)
}

/// Render micro-USD as an exact dollar string: `6000` → `"0.006"`, `50000000` → `"50.00"`.
pub fn format_usd(micros: Micros) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let whole = abs / 1_000_000;
    let frac = abs % 1_000_000;
    let mut frac_text = format!("{frac:06}");
    while frac_text.len() > 2 && frac_text.ends_with('0') {
        frac_text.pop();
    }
    format!("{sign}{whole}.{frac_text}")
}

/// `tokens × price_per_mtok` summed over parts, divided by one million, rounded up once.
///
/// Each part is `(tokens, micro-USD per million tokens)`. Computed in 128-bit integers; the
/// result saturates at `i64::MAX` (unreachable with the 10^12-token cap on an event).
pub fn cost_micros(parts: &[(u64, i64)]) -> Micros {
    let mut numerator: u128 = 0;
    for &(tokens, price) in parts {
        let price = u128::try_from(price.max(0)).unwrap_or(0);
        numerator = numerator.saturating_add(u128::from(tokens).saturating_mul(price));
    }
    // The same quotient by a hardware division when the numerator fits in 64 bits (it does
    // for every ordinary call), instead of a 128-bit division routine.
    let rounded_up = match u64::try_from(numerator) {
        Ok(narrow) => u128::from(narrow.div_ceil(TOKENS_PER_MTOK_NARROW)),
        Err(_) => numerator.div_ceil(TOKENS_PER_MTOK),
    };
    i64::try_from(rounded_up).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_convert_exactly() {
        assert_eq!(dollars_to_micros(&Dollars::Float(12.5)), Ok(12_500_000));
        assert_eq!(dollars_to_micros(&Dollars::Float(0.1)), Ok(100_000));
        assert_eq!(dollars_to_micros(&Dollars::Float(2.5)), Ok(2_500_000));
        assert_eq!(
            dollars_to_micros(&Dollars::Text("12.50".into())),
            Ok(12_500_000)
        );
        assert_eq!(dollars_to_micros(&Dollars::Int(50)), Ok(50_000_000));
        assert_eq!(dollars_to_micros(&Dollars::Text("0.000001".into())), Ok(1));
        assert_eq!(dollars_to_micros(&Dollars::Text(".5".into())), Ok(500_000));
        assert_eq!(
            dollars_to_micros(&Dollars::Text("1.1000000".into())),
            Ok(1_100_000)
        );
    }

    #[test]
    fn bad_dollars_are_rejected() {
        assert_eq!(
            dollars_to_micros(&Dollars::Float(-1.0)),
            Err(MoneyError::Negative)
        );
        assert_eq!(
            dollars_to_micros(&Dollars::Int(-1)),
            Err(MoneyError::Negative)
        );
        assert_eq!(
            dollars_to_micros(&Dollars::Float(f64::NAN)),
            Err(MoneyError::NotFinite)
        );
        assert_eq!(
            dollars_to_micros(&Dollars::Float(f64::INFINITY)),
            Err(MoneyError::NotFinite)
        );
        assert_eq!(
            dollars_to_micros(&Dollars::Float(0.0000001)),
            Err(MoneyError::TooPrecise)
        );
        assert_eq!(
            dollars_to_micros(&Dollars::Text("1.0000001".into())),
            Err(MoneyError::TooPrecise)
        );
        assert!(matches!(
            dollars_to_micros(&Dollars::Text("12,5".into())),
            Err(MoneyError::NotANumber(_))
        ));
        assert!(matches!(
            dollars_to_micros(&Dollars::Text("".into())),
            Err(MoneyError::NotANumber(_))
        ));
        assert!(matches!(
            dollars_to_micros(&Dollars::Text("1e3".into())),
            Err(MoneyError::NotANumber(_))
        ));
        assert_eq!(
            dollars_to_micros(&Dollars::Text("99999999999999999999".into())),
            Err(MoneyError::TooLarge)
        );
    }

    #[test]
    fn cost_rounds_up_once() {
        // gpt-4o: 1,200 in at $2.50 + 300 out at $10.00 = 6,000 micros exactly.
        assert_eq!(cost_micros(&[(1200, 2_500_000), (300, 10_000_000)]), 6000);
        // One token at $0.15/Mtok is 0.15 micros: rounded up to 1.
        assert_eq!(cost_micros(&[(1, 150_000)]), 1);
        // Two parts of 0.5 micros each are 1 micro, not 2 (rounded once, not per part).
        assert_eq!(cost_micros(&[(1, 500_000), (1, 500_000)]), 1);
        assert_eq!(cost_micros(&[]), 0);
    }

    #[test]
    fn usd_formatting_is_exact() {
        assert_eq!(format_usd(6000), "0.006");
        assert_eq!(format_usd(50_000_000), "50.00");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(-1_500_000), "-1.50");
    }
}
