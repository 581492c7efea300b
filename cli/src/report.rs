//! `bursar report` (SPEC §11): a report's rows as a table, as CSV, and as the series of a
//! chart (cost per period by group).

use crate::render::{usd, Table};
use bursar_schemas::wire::{ReportAnswer, ReportRow};
use std::collections::BTreeMap;

/// A period's label: its start in the report's zone, as long as the unit needs (`2026-11-23`
/// for a day or a week, `2026-11-23 13:00` for an hour, `2026-11` for a month).
pub fn period_label(every: &str, period_start: &str) -> String {
    let date = period_start.get(..10).unwrap_or(period_start);
    match every {
        "hour" => format!("{date} {}", period_start.get(11..16).unwrap_or_default()),
        "month" => period_start.get(..7).unwrap_or(period_start).to_string(),
        _ => date.to_string(),
    }
}

/// A row's group as `k=v,k=v` (`(none)` for usage without the label; `(all)` without
/// `group_by`).
pub fn group_label(row: &ReportRow) -> String {
    if row.group.is_empty() {
        return "(all)".to_string();
    }
    row.group
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(none)")))
        .collect::<Vec<_>>()
        .join(",")
}

/// The rows as a table with one column per `group_by` label, and a total line.
pub fn table(a: &ReportAnswer, group_by: &[String]) -> String {
    if a.rows.is_empty() {
        return "no usage in this period\n".to_string();
    }
    let mut columns: Vec<String> = vec!["PERIOD".into()];
    columns.extend(group_by.iter().map(|k| k.to_uppercase()));
    for c in [
        ">COST",
        ">INPUT",
        ">CACHED",
        ">OUTPUT",
        ">REQUESTS",
        ">DENIED",
    ] {
        columns.push(c.into());
    }
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    let mut t = Table::new(&names);
    let mut total = ReportRow {
        period_start: String::new(),
        group: BTreeMap::new(),
        cost_micros: 0,
        input_tokens: 0,
        cached_input_tokens: 0,
        output_tokens: 0,
        requests: 0,
        denied: 0,
    };
    for r in &a.rows {
        let mut cells = vec![period_label(&a.every, &r.period_start)];
        for k in group_by {
            cells.push(
                r.group
                    .get(k)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "(none)".into()),
            );
        }
        cells.extend(figures(r));
        t.row(cells);
        total.cost_micros = total.cost_micros.saturating_add(r.cost_micros);
        total.input_tokens = total.input_tokens.saturating_add(r.input_tokens);
        total.cached_input_tokens = total
            .cached_input_tokens
            .saturating_add(r.cached_input_tokens);
        total.output_tokens = total.output_tokens.saturating_add(r.output_tokens);
        total.requests = total.requests.saturating_add(r.requests);
        total.denied = total.denied.saturating_add(r.denied);
    }
    let mut cells = vec!["TOTAL".to_string()];
    cells.extend(group_by.iter().map(|_| String::new()));
    cells.extend(figures(&total));
    t.row(cells);
    let mut out = t.render();
    if a.truncated {
        out.push_str(&format!(
            "(showing {} of {} rows; narrow it with --since, --label or a longer --every)\n",
            a.rows.len(),
            a.total_rows
        ));
    }
    for f in &a.subscriptions {
        out.push_str(&format!(
            "subscription {}: {} per {} × {} = {} in flat fees (not in COST)\n",
            f.id,
            usd(f.fee_micros),
            f.fee_period,
            f.periods,
            usd(f.fee_total_micros)
        ));
    }
    out
}

fn figures(r: &ReportRow) -> [String; 6] {
    [
        usd(r.cost_micros),
        r.input_tokens.to_string(),
        r.cached_input_tokens.to_string(),
        r.output_tokens.to_string(),
        r.requests.to_string(),
        r.denied.to_string(),
    ]
}

/// The CSV columns.
pub const CSV_COLUMNS: [&str; 9] = [
    "period_start",
    "group",
    "cost_micros",
    "cost_usd",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "requests",
    "denied",
];

/// The rows as CSV (RFC 4180 by the `csv` crate; label values a spreadsheet would run as a
/// formula neutralised, as in exports).
pub fn write_csv(a: &ReportAnswer, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let io = |e: csv::Error| std::io::Error::other(e.to_string());
    w.write_record(CSV_COLUMNS).map_err(io)?;
    for r in &a.rows {
        let group = group_label(r);
        w.write_record([
            r.period_start.as_str(),
            &crate::csv::neutralise(&group),
            &r.cost_micros.to_string(),
            &bursar_core::money::format_usd(r.cost_micros),
            &r.input_tokens.to_string(),
            &r.cached_input_tokens.to_string(),
            &r.output_tokens.to_string(),
            &r.requests.to_string(),
            &r.denied.to_string(),
        ])
        .map_err(io)?;
    }
    w.flush()
}

/// Cost per period by group, for a chart: the periods in order, and each group's cost in
/// each period (groups by total cost, largest first).
pub fn series(a: &ReportAnswer) -> (Vec<String>, Vec<(String, Vec<i64>)>) {
    let mut periods: Vec<&str> = a.rows.iter().map(|r| r.period_start.as_str()).collect();
    periods.dedup();
    let index: BTreeMap<&str, usize> = periods.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let mut groups: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &a.rows {
        let costs = groups
            .entry(group_label(r))
            .or_insert_with(|| vec![0; periods.len()]);
        if let Some(c) = index
            .get(r.period_start.as_str())
            .and_then(|&i| costs.get_mut(i))
        {
            *c = c.saturating_add(r.cost_micros);
        }
    }
    let mut series: Vec<(String, Vec<i64>)> = groups.into_iter().collect();
    series.sort_by_key(|(name, costs)| {
        (
            std::cmp::Reverse(costs.iter().fold(0i64, |s, c| s.saturating_add(*c))),
            name.clone(),
        )
    });
    (
        periods.iter().map(|p| period_label(&a.every, p)).collect(),
        series,
    )
}
