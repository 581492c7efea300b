//! The hand-written JSON of usage and decision answers and their budget lines (`write_json`)
//! is byte for byte what `serde_json` writes for them, whatever the strings, numbers and
//! options hold.
#![allow(clippy::unwrap_used)]

use bursar_schemas::policy::Enforce;
use bursar_schemas::wire::{
    BucketState, BudgetReport, Decision, DecisionAnswer, Reason, SkipReason, Skipped, UsageAnswer,
};
use proptest::prelude::*;

/// Strings with what JSON must escape (quotes, backslashes, control characters), what it must
/// not (`/`, DEL, non-ASCII), and plain ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9=,._-]{0,24}",
        "\\PC{0,12}",
        prop::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('/'),
                Just('\u{7f}'),
                Just('é'),
                Just('😀'),
                (0u8..0x20).prop_map(char::from),
                Just('a'),
            ],
            0..12
        )
        .prop_map(|cs| cs.into_iter().collect()),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(-0.0),
        Just(1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(1e9),
        Just(1e-7),
        Just(f64::MIN_POSITIVE),
        Just(f64::MAX),
        (0u64..10_000_000).prop_map(|ppm| ppm as f64 / 1e6),
        any::<f64>(),
    ]
}

fn state() -> impl Strategy<Value = BucketState> {
    prop_oneof![
        Just(BucketState::Ok),
        Just(BucketState::Warn),
        Just(BucketState::Exhausted)
    ]
}

prop_compose! {
    fn report()(
        budget in text(),
        key in text(),
        limits in (
            prop::option::of(any::<i64>()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
        ),
        remaining in (
            prop::option::of(any::<i64>()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
        ),
        spent in (any::<i64>(), any::<i64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        utilization in float(),
        state in state(),
        deny in any::<bool>(),
        window in text(),
        window_end in prop::option::of(text()),
    ) -> BudgetReport {
        BudgetReport {
            budget,
            key,
            limit_micros: limits.0,
            spent_micros: spent.0,
            held_micros: spent.1,
            remaining_micros: remaining.0,
            limit_tokens: limits.1,
            spent_tokens: spent.2,
            held_tokens: spent.3,
            remaining_tokens: remaining.1,
            limit_requests: limits.2,
            spent_requests: spent.4,
            remaining_requests: remaining.2,
            limit_concurrent: limits.3,
            live_holds: spent.5,
            remaining_concurrent: remaining.3,
            utilization,
            state,
            enforce: if deny { Enforce::Deny } else { Enforce::Warn },
            window,
            window_end,
        }
    }
}

prop_compose! {
    fn answer()(
        numbers in (any::<u64>(), any::<i64>(), prop::option::of(any::<i64>())),
        flags in (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        state in state(),
        budgets in prop::collection::vec(report(), 0..4),
        reservation in prop::option::of(text()),
        req in prop::option::of(prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            text().prop_map(serde_json::Value::from),
        ]),
    ) -> UsageAnswer {
        UsageAnswer {
            ok: flags.0,
            seq: numbers.0,
            duplicate: flags.1,
            cost_micros: numbers.1,
            state,
            budgets,
            priced_at_max: flags.2,
            late: flags.3,
            reservation,
            overrun_micros: numbers.2,
            req,
        }
    }
}

fn req() -> impl Strategy<Value = Option<serde_json::Value>> {
    prop::option::of(prop_oneof![
        Just(serde_json::Value::Null),
        any::<i64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ])
}

prop_compose! {
    fn reason()(
        code in text(),
        message in text(),
        budget in prop::option::of(text()),
        key in prop::option::of(text()),
    ) -> Reason {
        Reason { code, message, budget, key }
    }
}

prop_compose! {
    fn skipped()(model in text(), why in 0u8..4, detail in text()) -> Skipped {
        let reason = match why {
            0 => SkipReason::MissingCapability,
            1 => SkipReason::Budget,
            2 => SkipReason::TierCap,
            _ => SkipReason::UnknownModel,
        };
        Skipped { model, reason, detail }
    }
}

prop_compose! {
    fn decision_answer()(
        ok in any::<bool>(),
        seq in prop::option::of(any::<u64>()),
        duplicate in any::<bool>(),
        decision in prop_oneof![Just(Decision::Allow), Just(Decision::Warn), Just(Decision::Deny)],
        model in prop::option::of(text()),
        hold_micros in any::<i64>(),
        max_output_tokens in prop::option::of(any::<u64>()),
        expires_at in prop::option::of(text()),
        budgets in prop::collection::vec(report(), 0..3),
        skipped in prop::collection::vec(skipped(), 0..3),
        reason in reason(),
        req in req(),
    ) -> DecisionAnswer {
        DecisionAnswer {
            ok, seq, duplicate, decision, model, hold_micros, max_output_tokens, expires_at,
            budgets, skipped, reason, req,
            waited_ms: None,
            lag_ms: None,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn budget_lines_are_written_as_serde_json_writes_them(r in report()) {
        let mut fast = Vec::new();
        r.write_json(&mut fast);
        prop_assert_eq!(String::from_utf8(fast).unwrap(), serde_json::to_string(&r).unwrap());
    }

    #[test]
    fn decision_answers_are_written_as_serde_json_writes_them(a in decision_answer()) {
        let mut fast = Vec::new();
        a.write_json(&mut fast);
        prop_assert_eq!(String::from_utf8(fast).unwrap(), serde_json::to_string(&a).unwrap());
    }

    #[test]
    fn usage_answers_are_written_as_serde_json_writes_them(a in answer()) {
        let mut fast = Vec::new();
        a.write_json(&mut fast);
        prop_assert_eq!(String::from_utf8(fast).unwrap(), serde_json::to_string(&a).unwrap());
    }
}
