//! `report` (SPEC §11): spend per period, grouped and filtered by labels, from the rollups.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bursar_core::ledger::{fold, replay, Ledger};
use bursar_schemas::wire::{ReportAnswer, ReportRequest, ReportRow};
use common::*;

const HOUR: i64 = 3600 * SEC;

fn report(l: &Ledger, r: ReportRequest, now: i64) -> ReportAnswer {
    l.report(&r, now).unwrap()
}

fn by(keys: &[&str], every: &str) -> ReportRequest {
    ReportRequest {
        group_by: keys.iter().map(|k| k.to_string()).collect(),
        every: Some(every.into()),
        ..Default::default()
    }
}

fn row<'a>(a: &'a ReportAnswer, start: &str, group: &[(&str, &str)]) -> &'a ReportRow {
    a.rows
        .iter()
        .find(|r| {
            r.period_start == start
                && group
                    .iter()
                    .all(|(k, v)| r.group.get(*k).cloned().flatten().as_deref() == Some(*v))
        })
        .unwrap_or_else(|| panic!("no row {start} {group:?} in {:#?}", a.rows))
}

/// T0 is 2026-11-23T00:00:00Z. Team a spends at 01:00 and 23:30 UTC on the 23rd and at 10:00
/// on the 24th; team b at 22:30 on the 23rd. Model `m`: 1 µUSD per input token.
fn two_days() -> Harness {
    let mut h = Harness::new(policy(vec![]));
    for (at, team, session, input) in [
        (T0 + HOUR, "a", "s-1", 1000),
        (T0 + 22 * HOUR + 30 * 60 * SEC, "b", "s-2", 300),
        (T0 + 23 * HOUR + 30 * 60 * SEC, "a", "s-3", 20),
        (T0 + 34 * HOUR, "a", "s-4", 5),
    ] {
        h.now = at;
        h.record(
            &format!("e-{at}"),
            labels(&[("team", team), ("session", session)]),
            "m",
            usage(input, 0),
        );
    }
    h
}

#[test]
fn spend_per_day_by_team_in_utc() {
    let h = two_days();
    let a = report(&h.ledger, by(&["team"], "day"), h.now);
    assert_eq!(a.every, "day");
    assert_eq!(a.timezone, "UTC");
    assert_eq!(a.total_rows, 3);
    let first = row(&a, "2026-11-23T00:00:00Z", &[("team", "a")]);
    assert_eq!(
        (first.cost_micros, first.input_tokens, first.requests),
        (1020, 1020, 2)
    );
    assert_eq!(
        row(&a, "2026-11-23T00:00:00Z", &[("team", "b")]).cost_micros,
        300
    );
    assert_eq!(
        row(&a, "2026-11-24T00:00:00Z", &[("team", "a")]).cost_micros,
        5
    );
    // Rows come by period, then group.
    let order: Vec<(&str, Option<&str>)> = a
        .rows
        .iter()
        .map(|r| (r.period_start.as_str(), r.group["team"].as_deref()))
        .collect();
    assert_eq!(
        order,
        [
            ("2026-11-23T00:00:00Z", Some("a")),
            ("2026-11-23T00:00:00Z", Some("b")),
            ("2026-11-24T00:00:00Z", Some("a"))
        ]
    );
}

#[test]
fn days_of_a_time_zone_start_at_its_midnight() {
    let h = two_days();
    // In Tokyo (+09:00) 22:30 and 23:30 UTC on the 23rd are already the 24th.
    let mut r = by(&["team"], "day");
    r.timezone = Some("Asia/Tokyo".into());
    let a = report(&h.ledger, r, h.now);
    assert_eq!(
        row(&a, "2026-11-23T00:00:00+09:00", &[("team", "a")]).cost_micros,
        1000
    );
    assert_eq!(
        row(&a, "2026-11-24T00:00:00+09:00", &[("team", "a")]).cost_micros,
        25
    );
    assert_eq!(
        row(&a, "2026-11-24T00:00:00+09:00", &[("team", "b")]).cost_micros,
        300
    );
    // India is +05:30: its days are whole 15-minute slots too.
    let mut r = by(&[], "day");
    r.timezone = Some("Asia/Kolkata".into());
    let a = report(&h.ledger, r, h.now);
    let days: Vec<(&str, i64)> = a
        .rows
        .iter()
        .map(|r| (r.period_start.as_str(), r.cost_micros))
        .collect();
    assert_eq!(
        days,
        [
            ("2026-11-23T00:00:00+05:30", 1000),
            ("2026-11-24T00:00:00+05:30", 325)
        ]
    );
}

#[test]
fn hours_weeks_and_months_and_the_derived_labels() {
    let h = two_days();
    let a = report(&h.ledger, by(&["model", "provider"], "hour"), h.now);
    assert_eq!(a.total_rows, 4);
    let r = row(
        &a,
        "2026-11-23T01:00:00Z",
        &[("model", "m"), ("provider", "acme")],
    );
    assert_eq!(r.cost_micros, 1000);
    let a = report(&h.ledger, by(&["tier"], "week"), h.now);
    // 2026-11-23 is a Monday: one week.
    assert_eq!(a.rows.len(), 1);
    assert_eq!(a.rows[0].period_start, "2026-11-23T00:00:00Z");
    assert_eq!(a.rows[0].cost_micros, 1325);
    let a = report(&h.ledger, by(&[], "month"), h.now);
    assert_eq!(a.rows[0].period_start, "2026-11-01T00:00:00Z");
    assert_eq!(a.rows[0].requests, 4);
}

#[test]
fn since_until_and_labels_narrow_the_report() {
    let h = two_days();
    let mut r = by(&["team"], "day");
    r.since = Some("2026-11-23T12:00:00Z".into());
    r.until = Some("2026-11-24T00:00:00Z".into());
    let a = report(&h.ledger, r, h.now);
    let costs: Vec<i64> = a.rows.iter().map(|r| r.cost_micros).collect();
    assert_eq!(costs, [20, 300], "a's 23:30 and b's 22:30 only");
    let mut r = by(&[], "day");
    r.labels = Some(labels(&[("team", "b")]));
    let a = report(&h.ledger, r, h.now);
    let costs: Vec<i64> = a.rows.iter().map(|r| r.cost_micros).collect();
    assert_eq!(costs, [300, 0], "b spent nothing on the 24th");
}

/// SPEC §11: "rows ... for each period of `every` ... between `since` and `until`". Without
/// `group_by` a report has one row for every period, zeros where nothing was spent or denied
/// (a gap in a plotted series would read as missing data), from `since` (at the earliest the
/// first usage) to `until` (at the latest now).
#[test]
fn a_report_without_grouping_has_a_row_for_every_period_zeros_included() {
    let h = two_days();
    let a = report(&h.ledger, by(&[], "hour"), h.now);
    // 01:00 on the 23rd to 10:00 on the 24th: 34 hours, four of them with usage.
    assert_eq!((a.rows.len(), a.total_rows), (34, 34));
    assert_eq!(a.rows[0].period_start, "2026-11-23T01:00:00Z");
    assert_eq!(a.rows[33].period_start, "2026-11-24T10:00:00Z");
    assert_eq!(a.rows.iter().filter(|r| r.requests > 0).count(), 4);
    assert_eq!(row(&a, "2026-11-23T02:00:00Z", &[]).cost_micros, 0);
    assert_eq!(a.rows.iter().map(|r| r.cost_micros).sum::<i64>(), 1325);

    // Periods before the first usage and after now are left out, however far `since` and
    // `until` reach (any RFC 3339 year is taken: ten millennia of periods are not stepped).
    for every in ["hour", "day"] {
        let mut r = by(&[], every);
        r.since = Some("0001-01-01T00:00:00Z".into());
        r.until = Some("9999-12-31T00:00:00Z".into());
        let far = report(&h.ledger, r, h.now);
        assert_eq!(far.rows, report(&h.ledger, by(&[], every), h.now).rows);
    }
    let mut r = by(&[], "day");
    r.since = Some("2026-11-20T00:00:00Z".into());
    let days: Vec<(String, i64)> = report(&h.ledger, r, h.now)
        .rows
        .iter()
        .map(|r| (r.period_start[..10].to_string(), r.cost_micros))
        .collect();
    assert_eq!(
        days,
        [
            ("2026-11-23".to_string(), 1320),
            ("2026-11-24".to_string(), 5)
        ]
    );
    // Grouped, a group has rows where it spent or was denied.
    let a = report(&h.ledger, by(&["team"], "hour"), h.now);
    assert_eq!(a.total_rows, 4);
}

#[test]
fn a_label_left_out_of_the_rollups_is_refused_naming_the_field() {
    let h = two_days();
    let e = h
        .ledger
        .report(&by(&["session"], "day"), h.now)
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("group_by"));
    assert!(e.message.contains("exclude_labels"), "{}", e.message);
    let mut r = by(&[], "day");
    r.labels = Some(labels(&[("session", "s-1")]));
    assert_eq!(
        h.ledger.report(&r, h.now).unwrap_err().field.as_deref(),
        Some("labels")
    );
    for (field, r) in [
        ("every", by(&[], "fortnight")),
        (
            "timezone",
            ReportRequest {
                timezone: Some("Mars/Olympus".into()),
                ..Default::default()
            },
        ),
        (
            "since",
            ReportRequest {
                since: Some("yesterday".into()),
                ..Default::default()
            },
        ),
    ] {
        let e = h.ledger.report(&r, h.now).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
    }
}

#[test]
fn a_repricing_shows_in_reports_and_denials_are_counted() {
    let mut b = budget("cap");
    b.max_micros = Some(1500);
    let mut h = Harness::new(policy(vec![b]));
    h.now = T0 + HOUR;
    h.record("e-1", labels(&[("team", "a")]), "m", usage(1000, 0));
    h.now += SEC;
    let d = h.reserve("r-1", labels(&[("team", "a")]), "m", 1000, 100);
    assert_eq!(d.decision, bursar_schemas::wire::Decision::Deny);
    let a = report(&h.ledger, by(&["team"], "day"), h.now);
    assert_eq!((a.rows[0].cost_micros, a.rows[0].denied), (1000, 1));
    // The whole log at 3 µUSD per input token: the report follows the fold.
    let mut table = prices();
    if let Some(m) = table.models.get_mut("m") {
        m.input_per_mtok = 3_000_000;
    }
    let out = replay(
        &h.ledger,
        &[],
        h.log.iter().cloned().map(Ok::<_, String>),
        &table,
        i64::MIN,
        h.now,
    )
    .unwrap();
    let a = report(&out.after, by(&["team"], "day"), h.now);
    assert_eq!(a.rows[0].cost_micros, 3000);
    // And a fold of the log gives the rollups the live ledger has.
    let folded = fold(|| h.log.iter().cloned().map(Ok::<_, String>)).unwrap();
    assert_eq!(
        report(&folded, by(&["team"], "hour"), h.now),
        report(&h.ledger, by(&["team"], "hour"), h.now)
    );
}

/// Hours of a zone whose offset changes by half an hour (Lord Howe Island: +11:00 in summer,
/// +10:30 from 02:00 local on 2027-04-04, 15:00 UTC): every usage lands in a row, none twice,
/// and the rows follow each other.
#[test]
fn hours_across_a_half_hour_offset_change_lose_nothing() {
    let mut h = Harness::new(policy(vec![]));
    // 2027-04-03T12:00Z (23:00 local) to 2027-04-04T00:00Z, a record every 15 minutes.
    let start = 1_806_753_600 * SEC;
    for i in 0..48 {
        h.now = start + i * 15 * 60 * SEC;
        h.record(
            &format!("e-{i}"),
            labels(&[("team", "a")]),
            "m",
            usage(10 + i as u64, 0),
        );
    }
    let mut r = by(&[], "hour");
    r.timezone = Some("Australia/Lord_Howe".into());
    let a = report(&h.ledger, r, h.now);
    let total: i64 = (0..48).map(|i| 10 + i).sum();
    assert_eq!(a.rows.iter().map(|r| r.cost_micros).sum::<i64>(), total);
    assert_eq!(a.rows.iter().map(|r| r.requests).sum::<u64>(), 48);
    let starts: Vec<i64> = a
        .rows
        .iter()
        .map(|r| bursar_core::time::parse_ts(&r.period_start).unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{:?}", a.rows);
    assert!(a.rows.iter().any(|r| r.period_start.ends_with("+10:30")));
}
