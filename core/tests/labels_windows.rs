//! Labels, scope keys, selectors, globs (SPEC §3) and windows (SPEC §5), tested through the
//! public API of `bursar_core::labels` and `bursar_core::window`.

// Helpers outside `#[test]` functions unwrap too; a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bursar_core::labels::*;
use bursar_core::window::*;
use bursar_schemas::policy::{CalendarUnit, WindowSpec};
use bursar_schemas::Labels;
use proptest::prelude::*;

const S: i64 = MICROS_PER_SECOND;
const MINUTE: i64 = 60 * S;
const HOUR: i64 = 3600 * S;
const DAY: i64 = 86_400 * S;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Unix microseconds of an RFC 3339 instant.
fn at(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_micros()
}

fn field_of(l: &Labels) -> String {
    validate_client_labels(l).unwrap_err().field
}

// ---------------------------------------------------------------- label validation

#[test]
fn ordinary_labels_are_accepted() {
    let l = labels(&[
        ("org", "acme"),
        ("team", "search"),
        ("agent", "planner"),
        ("user", "u-17"),
        ("k8s.pod_name-2", "Ünïcödé with spaces ✓"),
    ]);
    assert_eq!(validate_client_labels(&l), Ok(()));
    assert_eq!(validate_client_labels(&Labels::new()), Ok(()));
}

#[test]
fn bad_key_characters_are_rejected_naming_the_label() {
    for key in [
        "Team",
        "team name",
        "1team",
        "_team",
        "-team",
        "team/x",
        "tëam",
        "team:x",
    ] {
        let err = validate_client_labels(&labels(&[(key, "x")])).unwrap_err();
        assert_eq!(err.field, format!("labels.{key}"), "key {key:?}");
        assert!(err.message.contains("[a-z]"), "{err}");
    }
    assert_eq!(field_of(&labels(&[("", "x")])), "labels.");
}

#[test]
fn key_of_64_chars_is_accepted_and_65_is_rejected() {
    let key64 = format!("k{}", "x".repeat(63));
    let key65 = format!("k{}", "x".repeat(64));
    assert_eq!(validate_client_labels(&labels(&[(&key64, "v")])), Ok(()));
    assert_eq!(
        field_of(&labels(&[(&key65, "v")])),
        format!("labels.{key65}")
    );
}

#[test]
fn empty_value_is_rejected() {
    let err = validate_client_labels(&labels(&[("team", "")])).unwrap_err();
    assert_eq!(err.field, "labels.team");
    assert!(err.message.contains("empty"), "{err}");
    assert!(validate_label_value("").is_err());
}

#[test]
fn value_of_256_bytes_is_accepted_and_257_is_rejected() {
    let ok = "v".repeat(256);
    let too_long = "v".repeat(257);
    assert_eq!(validate_client_labels(&labels(&[("team", &ok)])), Ok(()));
    let err = validate_client_labels(&labels(&[("team", &too_long)])).unwrap_err();
    assert_eq!(err.field, "labels.team");
    assert!(err.message.contains("257"), "{err}");
    // The limit is in bytes, not characters: 128 × "é" is 256 bytes, 129 is 258.
    assert_eq!(validate_label_value(&"é".repeat(128)), Ok(()));
    assert!(validate_label_value(&"é".repeat(129)).is_err());
}

#[test]
fn control_characters_in_values_are_rejected() {
    for value in [
        "a\nb",
        "a\tb",
        "\0",
        "bell\u{7}",
        "del\u{7f}",
        "c1\u{85}",
        "\r",
    ] {
        let err = validate_client_labels(&labels(&[("team", value)])).unwrap_err();
        assert_eq!(err.field, "labels.team", "value {value:?}");
        assert!(err.message.contains("control"), "{err}");
    }
}

#[test]
fn at_most_32_labels() {
    let mut l: Labels = (0..32).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    assert_eq!(validate_client_labels(&l), Ok(()));
    l.insert("k32".to_owned(), "v".to_owned());
    let err = validate_client_labels(&l).unwrap_err();
    assert_eq!(err.field, "labels");
    assert!(
        err.message.contains("33") && err.message.contains("32"),
        "{err}"
    );
}

#[test]
fn clients_may_not_set_reserved_labels() {
    for key in RESERVED_LABELS {
        let err = validate_client_labels(&labels(&[("team", "a"), (key, "gpt-4o")])).unwrap_err();
        assert_eq!(err.field, format!("labels.{key}"));
        assert!(err.message.contains("reserved"), "{err}");
    }
}

#[test]
fn error_displays_field_then_message() {
    let err = validate_client_labels(&labels(&[("model", "x")])).unwrap_err();
    assert!(err.to_string().starts_with("labels.model: "), "{err}");
}

#[test]
fn control_characters_in_a_bad_key_are_escaped_in_the_field() {
    let err = validate_client_labels(&labels(&[("a\nb", "x")])).unwrap_err();
    assert_eq!(err.field, "labels.a\\nb");
}

// ---------------------------------------------------------------- scope keys

#[test]
fn scope_key_follows_group_by_order() {
    let l = labels(&[("org", "acme"), ("team", "search"), ("user", "u-17")]);
    assert_eq!(
        scope_key(&strings(&["team", "user"]), &l).as_deref(),
        Some("team=search,user=u-17")
    );
    assert_eq!(
        scope_key(&strings(&["user", "team"]), &l).as_deref(),
        Some("user=u-17,team=search")
    );
}

#[test]
fn scope_key_is_none_when_a_group_by_label_is_missing() {
    let l = labels(&[("team", "search")]);
    assert_eq!(scope_key(&strings(&["team", "user"]), &l), None);
}

#[test]
fn empty_group_by_gives_the_empty_key() {
    let l = labels(&[("team", "search")]);
    assert_eq!(scope_key(&[], &l).as_deref(), Some(""));
    assert_eq!(parse_scope_key(""), Some(vec![]));
}

#[test]
fn separators_and_percent_in_values_are_encoded() {
    let l = labels(&[("team", "a,b=c%d"), ("user", "ü 1")]);
    assert_eq!(
        scope_key(&strings(&["team", "user"]), &l).as_deref(),
        Some("team=a%2Cb%3Dc%25d,user=ü 1")
    );
}

#[test]
fn control_and_invisible_characters_are_encoded() {
    let l = labels(&[("v", "a\nb\u{7f}c\u{200b}d\u{202e}")]);
    assert_eq!(
        scope_key(&strings(&["v"]), &l).as_deref(),
        Some("v=a%0Ab%7Fc%E2%80%8Bd%E2%80%AE")
    );
}

#[test]
fn a_value_cannot_impersonate_another_label() {
    let injected = labels(&[("team", "a,user=b"), ("user", "c")]);
    let honest = labels(&[("team", "a"), ("user", "b")]);
    let group_by = strings(&["team", "user"]);
    let k1 = scope_key(&group_by, &injected).unwrap();
    let k2 = scope_key(&group_by, &honest).unwrap();
    assert_ne!(k1, k2);
    assert_eq!(
        parse_scope_key(&k1).unwrap(),
        vec![
            ("team".to_owned(), "a,user=b".to_owned()),
            ("user".to_owned(), "c".to_owned())
        ]
    );
}

#[test]
fn parse_rejects_what_scope_key_never_produces() {
    for bad in [
        "team",      // no '='
        "team=a,",   // empty pair
        ",team=a",   // empty pair
        "team=a=b",  // raw '=' in a value
        "team=%2c",  // lower-case hex
        "team=%41",  // an encoded plain letter
        "team=%4",   // truncated escape
        "team=%ZZ",  // not hex
        "team=%E2",  // not UTF-8 once decoded
        "team=a\nb", // raw control character
        "team=a%",   // lone percent
    ] {
        assert_eq!(parse_scope_key(bad), None, "{bad:?}");
    }
    assert_eq!(
        parse_scope_key("team=search,user=u-17"),
        Some(vec![
            ("team".to_owned(), "search".to_owned()),
            ("user".to_owned(), "u-17".to_owned())
        ])
    );
}

fn tricky_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => prop::sample::select(vec![',', '=', '%', 'a', '2', 'C', 'E', ' ', '\n', '\u{200b}']),
            1 => any::<char>(),
        ],
        0..8,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #[test]
    fn scope_keys_are_injective(
        a in proptest::collection::vec(tricky_value(), 3),
        b in proptest::collection::vec(tricky_value(), 3),
    ) {
        let group_by = strings(&["team", "user", "plan"]);
        let to_labels = |values: &[String]| -> Labels {
            group_by.iter().cloned().zip(values.iter().cloned()).collect()
        };
        let ka = scope_key(&group_by, &to_labels(&a)).unwrap();
        let kb = scope_key(&group_by, &to_labels(&b)).unwrap();
        prop_assert_eq!(a == b, ka == kb, "{:?} / {:?} -> {} / {}", a, b, ka, kb);
    }

    #[test]
    fn parse_scope_key_inverts_scope_key(
        pairs in proptest::collection::btree_map("[a-z][a-z0-9_.-]{0,8}", tricky_value(), 0..5),
    ) {
        let group_by: Vec<String> = pairs.keys().rev().cloned().collect();
        let key = scope_key(&group_by, &pairs).unwrap();
        let expected: Vec<(String, String)> = group_by
            .iter()
            .map(|k| (k.clone(), pairs[k].clone()))
            .collect();
        prop_assert_eq!(parse_scope_key(&key), Some(expected));
    }

    #[test]
    fn parse_scope_key_never_panics_and_round_trips(text in "[a-z=,%0-9A-Fa-f\u{e9}]{0,24}") {
        if let Some(pairs) = parse_scope_key(&text) {
            let group_by: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
            let l: Labels = pairs.iter().cloned().collect();
            // Duplicate names cannot go through a label map; the rest must render back exactly.
            if l.len() == pairs.len() {
                prop_assert_eq!(scope_key(&group_by, &l), Some(text));
            }
        }
    }
}

// ---------------------------------------------------------------- selectors

#[test]
fn selector_exact_value_must_match() {
    let selector = labels(&[("org", "acme")]);
    assert!(selector_matches(
        &selector,
        &labels(&[("org", "acme"), ("team", "x")])
    ));
    assert!(!selector_matches(&selector, &labels(&[("org", "acme-2")])));
}

#[test]
fn selector_star_means_present_with_any_value() {
    let selector = labels(&[("org", "acme"), ("user", "*")]);
    assert!(selector_matches(
        &selector,
        &labels(&[("org", "acme"), ("user", "u-1")])
    ));
    assert!(selector_matches(
        &selector,
        &labels(&[("org", "acme"), ("user", "*")])
    ));
    assert!(!selector_matches(&selector, &labels(&[("org", "acme")])));
}

#[test]
fn selector_missing_label_does_not_match_and_empty_selector_matches_all() {
    let selector = labels(&[("team", "search")]);
    assert!(!selector_matches(&selector, &labels(&[("org", "acme")])));
    assert!(!selector_matches(&selector, &Labels::new()));
    assert!(selector_matches(&BTreeMap::new(), &Labels::new()));
    assert!(selector_matches(&BTreeMap::new(), &labels(&[("a", "b")])));
}

// ---------------------------------------------------------------- globs

#[test]
fn glob_star_matches_any_run() {
    assert!(glob_match("gpt-4o*", "gpt-4o"));
    assert!(glob_match("gpt-4o*", "gpt-4o-mini-2024-07-18"));
    assert!(!glob_match("gpt-4o*", "gpt-4"));
    assert!(glob_match("*sonnet*", "claude-sonnet-4-5"));
    assert!(glob_match("claude-*-4-5", "claude-sonnet-4-5"));
    assert!(!glob_match("claude-*-4-5", "claude-sonnet-4-5-x"));
    assert!(glob_match("*", ""));
    assert!(glob_match("exact", "exact"));
    assert!(!glob_match("exact", "exact2"));
    assert!(!glob_match("exact", "exac"));
    assert!(glob_match("ollama/*", "ollama/llama3:8b"));
}

#[test]
fn glob_other_characters_are_literal() {
    assert!(glob_match("a?c", "a?c"));
    assert!(!glob_match("a?c", "abc"));
    assert!(glob_match("[x]*", "[x]yz"));
    assert!(!glob_match("[x]*", "xyz"));
    assert!(glob_match("é*ü", "é-ü"));
}

#[test]
fn glob_pathological_pattern_is_fast() {
    let text = "a".repeat(100_000);
    let started = Instant::now();
    assert!(!glob_match("*a*a*a*a*a*a*b", &text));
    assert!(glob_match("*a*a*a*a*a*a*", &text));
    assert!(!glob_match(&format!("{}b", "*a".repeat(1_000)), &text));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn glob_validation() {
    assert!(validate_glob("").is_err());
    assert!(validate_glob("gpt\n*").is_err());
    assert_eq!(validate_glob("*"), Ok(()));
    assert_eq!(validate_glob("gpt-4o?[x]*"), Ok(()));
}

fn naive_glob(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|i| naive_glob(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && naive_glob(rest, &text[1..]),
    }
}

proptest! {
    #[test]
    fn glob_agrees_with_a_naive_matcher(pattern in "[ab*é]{0,7}", text in "[abé]{0,10}") {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        prop_assert_eq!(glob_match(&pattern, &text), naive_glob(&p, &t));
    }
}

// ---------------------------------------------------------------- fixed windows

fn fixed(seconds: u64, offset_seconds: i64) -> WindowSpec {
    WindowSpec::Fixed {
        seconds,
        offset_seconds,
    }
}

#[test]
fn fixed_event_at_the_boundary_belongs_to_the_new_window() {
    let daily = fixed(86_400, 0);
    let midnight = at("2026-11-24T00:00:00Z");
    assert_eq!(
        window_bounds(&daily, midnight),
        (midnight, Some(midnight + DAY))
    );
    assert_eq!(
        window_bounds(&daily, midnight - 1),
        (midnight - DAY, Some(midnight))
    );
}

#[test]
fn fixed_window_with_offset_aligns_to_local_midnight() {
    // Offset -7200 s: days start at 22:00 UTC (local midnight at UTC+02:00).
    let daily = fixed(86_400, -7_200);
    let boundary = at("2026-03-10T22:00:00Z");
    assert_eq!(
        window_bounds(&daily, boundary),
        (boundary, Some(boundary + DAY))
    );
    assert_eq!(
        window_bounds(&daily, boundary - 1),
        (boundary - DAY, Some(boundary))
    );
    assert_eq!(
        window_bounds(&daily, at("2026-03-11T12:00:00+02:00")).0,
        at("2026-03-11T00:00:00+02:00")
    );
    // An offset larger than the window is the same alignment as its remainder.
    assert_eq!(
        window_bounds(&fixed(3_600, 3_600 * 5 + 900), at("2026-03-10T10:20:00Z")),
        (at("2026-03-10T10:15:00Z"), Some(at("2026-03-10T11:15:00Z")))
    );
}

#[test]
fn fixed_windows_before_1970_are_floored_not_truncated() {
    let hourly = fixed(3_600, 0);
    assert_eq!(window_bounds(&hourly, -1), (-HOUR, Some(0)));
    assert_eq!(window_bounds(&hourly, -HOUR), (-HOUR, Some(0)));
    assert_eq!(window_bounds(&hourly, -HOUR - 1), (-2 * HOUR, Some(-HOUR)));
}

#[test]
fn extreme_timestamps_and_specs_do_not_panic() {
    let specs = [
        fixed(1, 0),
        fixed(0, 0),
        fixed(u64::MAX, i64::MIN),
        fixed(u64::MAX, i64::MAX),
        fixed(7, i64::MIN),
        WindowSpec::Rolling {
            seconds: u64::MAX,
            resolution_seconds: 1,
        },
        WindowSpec::Rolling {
            seconds: 0,
            resolution_seconds: 0,
        },
        WindowSpec::Rolling {
            seconds: 1,
            resolution_seconds: u64::MAX,
        },
        WindowSpec::Calendar {
            unit: CalendarUnit::Month,
            utc_offset_seconds: i32::MAX,
        },
        WindowSpec::Calendar {
            unit: CalendarUnit::Week,
            utc_offset_seconds: i32::MIN,
        },
        WindowSpec::Calendar {
            unit: CalendarUnit::Day,
            utc_offset_seconds: 0,
        },
        WindowSpec::Cumulative,
    ];
    for spec in &specs {
        for ts in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX] {
            let (start, end) = window_bounds(spec, ts);
            assert!(start <= ts, "{spec:?} at {ts}: start {start}");
            assert!(end.is_none_or(|e| e > ts), "{spec:?} at {ts}: end {end:?}");
        }
    }
    assert_eq!(window_bounds(&fixed(1, 0), i64::MAX).1, None);
    // The window holding i64::MIN starts before it: the start is clamped.
    assert_eq!(window_bounds(&fixed(1, 0), i64::MIN).0, i64::MIN);
}

#[test]
fn zero_length_fixed_window_never_resets() {
    assert_eq!(window_bounds(&fixed(0, 0), 12_345), (i64::MIN, None));
}

#[test]
fn cumulative_never_resets() {
    assert_eq!(
        window_bounds(&WindowSpec::Cumulative, at("2026-11-23T10:00:00Z")),
        (i64::MIN, None)
    );
}

fn any_spec() -> impl Strategy<Value = WindowSpec> {
    prop_oneof![
        (1u64..=10_000_000, -1_000_000_000i64..=1_000_000_000).prop_map(|(s, o)| fixed(s, o)),
        (0u64..=1_000_000, 0u64..=10_000).prop_map(|(seconds, resolution_seconds)| {
            WindowSpec::Rolling {
                seconds,
                resolution_seconds,
            }
        }),
        (
            prop::sample::select(vec![
                CalendarUnit::Day,
                CalendarUnit::Week,
                CalendarUnit::Month
            ]),
            -50_400i32..=50_400
        )
            .prop_map(|(unit, utc_offset_seconds)| WindowSpec::Calendar {
                unit,
                utc_offset_seconds
            }),
        Just(WindowSpec::Cumulative),
    ]
}

proptest! {
    #[test]
    fn a_window_contains_its_timestamp_and_tiles_time(
        spec in any_spec(),
        ts in -4_000_000_000_000_000i64..4_000_000_000_000_000,
    ) {
        let (start, end) = window_bounds(&spec, ts);
        prop_assert!(start <= ts);
        if let WindowSpec::Rolling { seconds, resolution_seconds } = spec {
            // A rolling window spans n slots and ends at the next slot boundary.
            let res = resolution_seconds.max(1) as i64 * S;
            let n = seconds.div_ceil(resolution_seconds.max(1)).max(1) as i64;
            prop_assert_eq!(end, Some(start + n * res));
            prop_assert!(ts < start + n * res && ts >= start + (n - 1) * res);
        } else if let Some(end) = end {
            prop_assert!(ts < end);
            // The start belongs to this window; the end starts the next one.
            prop_assert_eq!(window_bounds(&spec, start), (start, Some(end)));
            prop_assert_eq!(window_bounds(&spec, end).0, end);
            prop_assert_eq!(window_bounds(&spec, end - 1), (start, Some(end)));
        }
    }
}

// ---------------------------------------------------------------- calendar windows

fn calendar(unit: CalendarUnit, utc_offset_seconds: i32) -> WindowSpec {
    WindowSpec::Calendar {
        unit,
        utc_offset_seconds,
    }
}

const PLUS_2: i32 = 7_200;
const MINUS_5: i32 = -18_000;

#[test]
fn calendar_day_at_plus_two() {
    let day = calendar(CalendarUnit::Day, PLUS_2);
    // 23:30 UTC is already 01:30 the next local day.
    assert_eq!(
        window_bounds(&day, at("2026-05-15T23:30:00Z")),
        (
            at("2026-05-16T00:00:00+02:00"),
            Some(at("2026-05-17T00:00:00+02:00"))
        )
    );
    let midnight = at("2026-05-16T00:00:00+02:00");
    assert_eq!(window_bounds(&day, midnight).0, midnight);
    assert_eq!(window_bounds(&day, midnight - 1).1, Some(midnight));
}

#[test]
fn calendar_day_at_minus_five() {
    let day = calendar(CalendarUnit::Day, MINUS_5);
    // 03:00 UTC on the 16th is 22:00 on the 15th in UTC-05:00.
    assert_eq!(
        window_bounds(&day, at("2026-05-16T03:00:00Z")),
        (
            at("2026-05-15T00:00:00-05:00"),
            Some(at("2026-05-16T00:00:00-05:00"))
        )
    );
}

#[test]
fn calendar_week_starts_on_monday() {
    let week = calendar(CalendarUnit::Week, PLUS_2);
    // 2026-05-17 is a Sunday; 23:30 UTC that day is Monday 01:30 at +02:00.
    assert_eq!(
        window_bounds(&week, at("2026-05-17T23:30:00Z")),
        (
            at("2026-05-18T00:00:00+02:00"),
            Some(at("2026-05-25T00:00:00+02:00"))
        )
    );
    // Thursday, Sunday 23:59:59.999999 local: the week that began Monday the 11th.
    for local in [
        "2026-05-14T12:00:00+02:00",
        "2026-05-17T23:59:59.999999+02:00",
    ] {
        assert_eq!(
            window_bounds(&week, at(local)),
            (
                at("2026-05-11T00:00:00+02:00"),
                Some(at("2026-05-18T00:00:00+02:00"))
            ),
            "{local}"
        );
    }
    let week = calendar(CalendarUnit::Week, MINUS_5);
    // Monday 03:00 UTC is still Sunday 22:00 at -05:00.
    assert_eq!(
        window_bounds(&week, at("2026-05-18T03:00:00Z")),
        (
            at("2026-05-11T00:00:00-05:00"),
            Some(at("2026-05-18T00:00:00-05:00"))
        )
    );
    // The epoch was a Thursday: the week containing it began Monday 1969-12-29.
    assert_eq!(
        window_bounds(&calendar(CalendarUnit::Week, 0), 0).0,
        at("1969-12-29T00:00:00Z")
    );
}

#[test]
fn calendar_month_rolls_over_from_january_31_into_a_leap_february() {
    let month = calendar(CalendarUnit::Month, PLUS_2);
    let feb_1 = at("2024-02-01T00:00:00+02:00");
    assert_eq!(
        window_bounds(&month, feb_1 - 1),
        (at("2024-01-01T00:00:00+02:00"), Some(feb_1))
    );
    let (start, end) = window_bounds(&month, feb_1);
    assert_eq!((start, end), (feb_1, Some(at("2024-03-01T00:00:00+02:00"))));
    assert_eq!(end.unwrap() - start, 29 * DAY, "2024 is a leap year");
    // 2026-02-29 does not exist.
    let (start, end) = window_bounds(&month, at("2026-02-15T00:00:00Z"));
    assert_eq!(end.unwrap() - start, 28 * DAY);
}

#[test]
fn calendar_month_rolls_over_from_december_to_january() {
    let month = calendar(CalendarUnit::Month, MINUS_5);
    // 04:59:59 UTC on Jan 1 is still Dec 31 at -05:00.
    assert_eq!(
        window_bounds(&month, at("2027-01-01T04:59:59.999999Z")),
        (
            at("2026-12-01T00:00:00-05:00"),
            Some(at("2027-01-01T00:00:00-05:00"))
        )
    );
    assert_eq!(
        window_bounds(&month, at("2027-01-01T05:00:00Z")),
        (
            at("2027-01-01T00:00:00-05:00"),
            Some(at("2027-02-01T00:00:00-05:00"))
        )
    );
}

#[test]
fn calendar_month_before_1970() {
    let month = calendar(CalendarUnit::Month, 0);
    assert_eq!(
        window_bounds(&month, -1),
        (at("1969-12-01T00:00:00Z"), Some(0))
    );
}

// ---------------------------------------------------------------- rolling windows

fn spend(micros: i64) -> Amounts {
    Amounts {
        micros,
        tokens: 10,
        requests: 1,
    }
}

#[test]
fn rolling_amount_expires_after_the_window_at_slot_granularity() {
    // One hour at one-minute resolution: 60 slots.
    let (w, r) = (3_600, 60);
    let t = at("2026-11-23T10:00:00Z");
    let mut counter = RollingCounter::default();
    counter.add(w, r, t, spend(500));
    assert_eq!(counter.total(w, r, t), spend(500));
    assert_eq!(counter.total(w, r, t + HOUR - MINUTE), spend(500));
    assert_eq!(counter.total(w, r, t + HOUR - 1), spend(500));
    assert_eq!(counter.total(w, r, t + HOUR), Amounts::default());

    // An event in the middle of a slot leaves with its whole slot, at the slot boundary.
    let mut counter = RollingCounter::default();
    counter.add(w, r, t + 30 * S, spend(7));
    assert_eq!(counter.total(w, r, t + HOUR - 1), spend(7));
    assert_eq!(counter.total(w, r, t + HOUR), Amounts::default());
}

#[test]
fn rolling_window_bounds_match_the_counter() {
    let spec = WindowSpec::Rolling {
        seconds: 3_600,
        resolution_seconds: 60,
    };
    let now = at("2026-11-23T10:30:15Z");
    let (start, end) = window_bounds(&spec, now);
    assert_eq!(start, at("2026-11-23T09:31:00Z"));
    assert_eq!(end, Some(at("2026-11-23T10:31:00Z")));
    let mut counter = RollingCounter::default();
    counter.add(3_600, 60, start, spend(1));
    counter.add(3_600, 60, start - 1, spend(100));
    assert_eq!(counter.total(3_600, 60, now), spend(1));
    assert_eq!(counter.total(3_600, 60, end.unwrap() - 1), spend(1));
    assert_eq!(counter.total(3_600, 60, end.unwrap()), Amounts::default());
}

#[test]
fn rolling_window_not_a_multiple_of_resolution_rounds_up() {
    // 150 s at 60 s resolution: n = 3 slots.
    let mut counter = RollingCounter::default();
    counter.add(150, 60, 0, spend(1));
    assert_eq!(counter.total(150, 60, 3 * MINUTE - 1), spend(1));
    assert_eq!(counter.total(150, 60, 3 * MINUTE), Amounts::default());
}

#[test]
fn rolling_total_never_counts_dropped_slots() {
    let (w, r) = (600, 60);
    let mut counter = RollingCounter::default();
    counter.add(w, r, 0, spend(1));
    counter.add(w, r, 5 * MINUTE, spend(2));
    // A later event pushes the first slot out of the window.
    counter.add(w, r, 10 * MINUTE, spend(4));
    assert_eq!(counter.total(w, r, 10 * MINUTE), spend(2) + spend(4));
    // Asking about an earlier time does not bring the dropped slot back.
    assert_eq!(counter.total(w, r, 5 * MINUTE), spend(2));
    // Far in the future nothing is counted, even though no add has pruned yet.
    assert_eq!(counter.total(w, r, 1_000 * MINUTE), Amounts::default());
    // An event older than the window when it arrives is not counted at all.
    counter.add(w, r, 0, spend(1_000));
    assert_eq!(counter.total(w, r, 10 * MINUTE), spend(2) + spend(4));
    // One within the window lands in its own slot.
    counter.add(w, r, 7 * MINUTE, spend(8));
    assert_eq!(
        counter.total(w, r, 10 * MINUTE),
        spend(2) + spend(4) + spend(8)
    );
    // It then expires with its own slot, not with the newest one.
    assert_eq!(counter.total(w, r, 16 * MINUTE), spend(4) + spend(8));
    assert_eq!(counter.total(w, r, 17 * MINUTE), spend(4));
}

#[test]
fn rolling_counter_holds_at_most_n_slots() {
    let (w, r) = (600, 60); // n = 10
    let mut counter = RollingCounter::default();
    for minute in 0..1_000 {
        counter.add(w, r, minute * MINUTE, spend(1));
    }
    let json = serde_json::to_value(&counter).unwrap();
    let slots = json["slots"].as_array().unwrap().len();
    assert_eq!(slots, 10);
    assert_eq!(counter.total(w, r, 999 * MINUTE).requests, 10);
}

#[test]
fn rolling_counter_before_1970_and_empty() {
    let mut counter = RollingCounter::default();
    assert!(counter.is_empty());
    assert_eq!(counter.total(60, 1, 0), Amounts::default());
    counter.add(60, 1, -1, spend(3));
    assert!(!counter.is_empty());
    // ts = -1 µs is in slot -1 ([-1 s, 0)); it is gone 59 s later.
    assert_eq!(counter.total(60, 1, 58 * S + 999_999), spend(3));
    assert_eq!(counter.total(60, 1, 59 * S), Amounts::default());
}

#[test]
fn rolling_counter_round_trips_through_serde() {
    let mut counter = RollingCounter::default();
    counter.add(600, 60, 0, spend(1));
    counter.add(600, 60, MINUTE, spend(2));
    let json = serde_json::to_string(&counter).unwrap();
    let back: RollingCounter = serde_json::from_str(&json).unwrap();
    assert_eq!(back, counter);
}

#[test]
fn amounts_arithmetic_saturates() {
    let big = Amounts {
        micros: i64::MAX,
        tokens: u64::MAX,
        requests: u64::MAX,
    };
    assert_eq!(big + spend(1), big);
    assert_eq!(big.saturating_add(big), big);
    let mut sum = spend(2);
    sum += spend(3);
    assert_eq!(
        sum,
        Amounts {
            micros: 5,
            tokens: 20,
            requests: 2
        }
    );
    assert_eq!(
        spend(1) - sum,
        Amounts {
            micros: -4,
            tokens: 0,
            requests: 0
        }
    );
    let low = Amounts {
        micros: i64::MIN,
        ..Amounts::default()
    };
    assert_eq!((low - spend(1)).micros, i64::MIN);
}

fn slot_of(ts: i64, res_seconds: u64) -> i64 {
    ts.div_euclid(res_seconds as i64 * S)
}

proptest! {
    /// In time order, the counter's total equals a naive sum over the events in the window.
    #[test]
    fn rolling_total_equals_naive_sum(
        window in 0u64..=900,
        res in 1u64..=120,
        mut events in proptest::collection::vec(
            (-2_000 * S..2_000 * S, 0i64..1_000_000, 0u64..10_000),
            0..60,
        ),
        later in 0i64..1_000 * S,
    ) {
        events.sort_by_key(|e| e.0);
        let n = window.div_ceil(res).max(1) as i64;
        let mut counter = RollingCounter::default();
        for (i, &(ts, micros, tokens)) in events.iter().enumerate() {
            counter.add(window, res, ts, Amounts { micros, tokens, requests: 1 });
            // After every add, the total at that moment is the naive sum so far.
            let c = slot_of(ts, res);
            let naive = events[..=i]
                .iter()
                .filter(|e| slot_of(e.0, res) > c - n)
                .fold(Amounts::default(), |a, e| a + Amounts { micros: e.1, tokens: e.2, requests: 1 });
            prop_assert_eq!(counter.total(window, res, ts), naive);
        }
        let now = events.last().map_or(0, |e| e.0) + later;
        let c = slot_of(now, res);
        let naive = events
            .iter()
            .filter(|e| slot_of(e.0, res) > c - n)
            .fold(Amounts::default(), |a, e| a + Amounts { micros: e.1, tokens: e.2, requests: 1 });
        prop_assert_eq!(counter.total(window, res, now), naive);
    }

    /// In any order and at any `now`: an event counts when its slot is in the window at `now`
    /// and was not already out of the window ending at the newest slot ever added.
    #[test]
    fn rolling_total_equals_naive_model_out_of_order(
        window in 0u64..=900,
        res in 1u64..=120,
        events in proptest::collection::vec((-2_000 * S..2_000 * S, 0i64..1_000_000), 0..60),
        now in -3_000 * S..3_000 * S,
    ) {
        let n = window.div_ceil(res).max(1) as i64;
        let mut counter = RollingCounter::default();
        let mut newest = i64::MIN;
        let mut kept: Vec<(i64, i64)> = Vec::new();
        for &(ts, micros) in &events {
            counter.add(window, res, ts, Amounts { micros, tokens: 0, requests: 1 });
            let slot = slot_of(ts, res);
            newest = newest.max(slot);
            if slot > newest - n {
                kept.push((slot, micros));
            }
            kept.retain(|&(k, _)| k > newest - n);
        }
        let c = slot_of(now, res);
        let naive = kept
            .iter()
            .filter(|&&(k, _)| k > c - n && k <= c)
            .fold(Amounts::default(), |a, &(_, m)| a + Amounts { micros: m, tokens: 0, requests: 1 });
        prop_assert_eq!(counter.total(window, res, now), naive);
    }
}

// --- Calendar windows in an IANA time zone (SPEC §4 `timezone`, revision 2) -----------------

fn zoned(unit: CalendarUnit, zone: &str) -> WindowSpec {
    WindowSpec::CalendarZone {
        unit,
        timezone: zone.to_string(),
    }
}

#[test]
fn new_york_spring_forward_day_is_23_hours_and_starts_at_local_midnight() {
    // 2026-03-08: clocks go from 02:00 EST to 03:00 EDT. The day starts at midnight EST
    // (05:00Z) and the next one at midnight EDT (04:00Z the day after).
    let spec = zoned(CalendarUnit::Day, "America/New_York");
    let (start, end) = window_bounds(&spec, at("2026-03-08T12:00:00-04:00"));
    assert_eq!(start, at("2026-03-08T05:00:00Z"));
    assert_eq!(end, Some(at("2026-03-09T04:00:00Z")));
    assert_eq!(end.unwrap() - start, 23 * HOUR);
    // A minute before local midnight is still the day before; midnight itself the new day.
    let (prev, prev_end) = window_bounds(&spec, at("2026-03-08T04:59:00Z"));
    assert_eq!(prev_end, Some(start));
    assert_eq!(start - prev, DAY);
    assert_eq!(window_bounds(&spec, start).0, start);
}

#[test]
fn new_york_fall_back_day_is_25_hours() {
    // 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST.
    let spec = zoned(CalendarUnit::Day, "America/New_York");
    let (start, end) = window_bounds(&spec, at("2026-11-01T01:30:00-05:00"));
    assert_eq!(start, at("2026-11-01T04:00:00Z"));
    assert_eq!(end, Some(at("2026-11-02T05:00:00Z")));
    assert_eq!(end.unwrap() - start, 25 * HOUR);
    // Both 01:30s (EDT, then EST) are the same day.
    assert_eq!(
        window_bounds(&spec, at("2026-11-01T01:30:00-04:00")).0,
        start
    );
}

#[test]
fn berlin_days_weeks_and_months_follow_daylight_saving_time() {
    let day = zoned(CalendarUnit::Day, "Europe/Berlin");
    // Summer (CEST, +02:00): the day starts at 22:00Z the evening before, not 23:00Z as a fixed
    // +01:00 offset would say for half the year.
    let (start, end) = window_bounds(&day, at("2026-07-15T00:30:00+02:00"));
    assert_eq!(start, at("2026-07-14T22:00:00Z"));
    assert_eq!(end, Some(at("2026-07-15T22:00:00Z")));
    // 2026-03-29 (spring forward at 02:00 CET): 23 hours; 2026-10-25 (fall back): 25 hours.
    let (s, e) = window_bounds(&day, at("2026-03-29T12:00:00+02:00"));
    assert_eq!(
        (s, e),
        (at("2026-03-28T23:00:00Z"), Some(at("2026-03-29T22:00:00Z")))
    );
    let (s, e) = window_bounds(&day, at("2026-10-25T12:00:00+01:00"));
    assert_eq!(
        (s, e),
        (at("2026-10-24T22:00:00Z"), Some(at("2026-10-25T23:00:00Z")))
    );
    // The week of the spring change (Monday 2026-03-23 to Monday 2026-03-30) is 167 hours.
    let week = zoned(CalendarUnit::Week, "Europe/Berlin");
    let (s, e) = window_bounds(&week, at("2026-03-29T12:00:00+02:00"));
    assert_eq!(s, at("2026-03-23T00:00:00+01:00"));
    assert_eq!(e, Some(at("2026-03-30T00:00:00+02:00")));
    assert_eq!(e.unwrap() - s, 7 * DAY - HOUR);
    // October 2026 runs from midnight CEST to midnight CET: 31 days and an hour.
    let month = zoned(CalendarUnit::Month, "Europe/Berlin");
    let (s, e) = window_bounds(&month, at("2026-10-31T23:59:00+01:00"));
    assert_eq!(s, at("2026-10-01T00:00:00+02:00"));
    assert_eq!(e, Some(at("2026-11-01T00:00:00+01:00")));
    assert_eq!(e.unwrap() - s, 31 * DAY + HOUR);
}

#[test]
fn a_zone_that_skips_midnight_starts_its_day_when_the_gap_ends() {
    // America/Santiago moved its clocks forward at 00:00 on 2025-09-07: local midnight never
    // happened, the day began at 01:00 -03:00 (04:00Z).
    let spec = zoned(CalendarUnit::Day, "America/Santiago");
    let (start, end) = window_bounds(&spec, at("2025-09-07T12:00:00-03:00"));
    assert_eq!(start, at("2025-09-07T04:00:00Z"));
    assert_eq!(end, Some(at("2025-09-08T03:00:00Z")));
    // The day before ends exactly there.
    assert_eq!(
        window_bounds(&spec, at("2025-09-06T23:59:00-04:00")).1,
        Some(start)
    );
}

proptest! {
    /// For any instant, the zoned day contains it, is 23, 24 or 25 hours long, and the next day
    /// starts exactly where it ends.
    #[test]
    fn zoned_days_tile_time_without_gaps(t in -2_000_000_000i64..4_000_000_000i64, z in 0usize..4) {
        let zone = ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"][z];
        let spec = zoned(CalendarUnit::Day, zone);
        let ts = t * S;
        let (start, end) = window_bounds(&spec, ts);
        let end = end.unwrap();
        prop_assert!(start <= ts && ts < end, "{zone} {ts}: [{start}, {end})");
        let len = end - start;
        prop_assert!((23 * HOUR..=25 * HOUR).contains(&len), "{zone}: {len}");
        prop_assert_eq!(window_bounds(&spec, end).0, end);
    }
}
