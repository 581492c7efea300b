//! Human-readable output: dollar amounts, tables, utilization bars, event one-liners.
//!
//! Money is always shown exactly (`$0.0035`, never rounded): [`usd`] renders micro-USD with as
//! many decimals as needed. Machine output (`--json`) does not come through here.

use bursar_core::money::format_usd;
use bursar_core::tiers::TierListing;
use bursar_core::time::parse_ts;
use bursar_schemas::event::EventBody;
use bursar_schemas::policy::{Enforce, TierOrigin, TierPriceRange};
use bursar_schemas::wire::{
    BucketState, BudgetReport, Decision, DecisionAnswer, DiffRow, ExportedEvent, ReplayAnswer,
    StatusAnswer, UsageAnswer,
};
use bursar_schemas::{Labels, Micros, TsMicros};

/// Width of the utilization bar, in characters between the brackets.
pub const BAR_WIDTH: usize = 20;

/// `$0.0035`, `-$1.20`: exact dollars.
pub fn usd(micros: Micros) -> String {
    let text = format_usd(micros);
    match text.strip_prefix('-') {
        Some(rest) => format!("-${rest}"),
        None => format!("${text}"),
    }
}

/// `+$0.0035`, `-$0.0035`, `$0.00`: a signed change.
pub fn usd_delta(micros: Micros) -> String {
    if micros > 0 {
        format!("+{}", usd(micros))
    } else {
        usd(micros)
    }
}

/// `[########------------]  42%`.
pub fn bar(utilization: f64) -> String {
    let u = if utilization.is_finite() {
        utilization.max(0.0)
    } else {
        1.0
    };
    // Rounded down: the bar is full only when the budget is (98 % is 19 of 20).
    let filled = ((u.min(1.0) * BAR_WIDTH as f64).floor() as usize).min(BAR_WIDTH);
    let pct = (u * 100.0).floor();
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        pct as u64
    )
}

/// A plain text table: a header row and rows, columns separated by two spaces, numbers
/// right-aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles; a title starting with `>` is right-aligned.
    pub fn new(columns: &[&str]) -> Table {
        Table {
            header: columns
                .iter()
                .map(|c| c.trim_start_matches('>').to_string())
                .collect(),
            right: columns.iter().map(|c| c.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Add a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in a newline: `comfy-table` lays it
    /// out by display width (a CJK character takes two columns) with its border-less preset,
    /// columns two spaces apart, trailing spaces trimmed.
    pub fn render(&self) -> String {
        use comfy_table::{CellAlignment, ContentArrangement};
        let n = self.header.len();
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(self.header.iter().map(String::as_str));
        for r in &self.rows {
            t.add_row((0..n).map(|i| r.get(i).map(String::as_str).unwrap_or("")));
        }
        for (i, right) in self.right.iter().enumerate() {
            if let Some(c) = t.column_mut(i) {
                c.set_padding((u16::from(i > 0), u16::from(i + 1 < n)));
                if *right {
                    c.set_cell_alignment(CellAlignment::Right);
                }
            }
        }
        let mut out = String::new();
        for line in t.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `spent / limit` over every limit the budget sets (`$1.20 / $50.00`, `1200 / 5000 tok`,
/// `3 / 10 req`, `1 / 2 live`); a meter shows what it measured.
pub fn spent_vs_limit(b: &BudgetReport) -> String {
    let mut parts = Vec::new();
    if let Some(l) = b.limit_micros {
        parts.push(format!("{} / {}", usd(b.spent_micros), usd(l)));
    }
    if let Some(l) = b.limit_tokens {
        parts.push(format!("{} / {} tok", b.spent_tokens, l));
    }
    if let Some(l) = b.limit_requests {
        parts.push(format!("{} / {} req", b.spent_requests, l));
    }
    if let Some(l) = b.limit_concurrent {
        parts.push(format!("{} / {} live", b.live_holds, l));
    }
    if parts.is_empty() {
        parts.push(usd(b.spent_micros));
    }
    parts.join(", ")
}

/// What live holds take from the bucket, in the units of its limits (dollars unless the
/// budget only limits tokens).
pub fn held(b: &BudgetReport) -> String {
    match (b.limit_micros, b.limit_tokens) {
        (None, Some(_)) => format!("{} tok", b.held_tokens),
        (Some(_), Some(_)) => format!("{}, {} tok", usd(b.held_micros), b.held_tokens),
        _ => usd(b.held_micros),
    }
}

/// What is left of every limit the budget sets, in that limit's units (`$48.79`, `4000 tok`,
/// `3 req`, `1 slot`); `-` for a meter.
pub fn remaining(b: &BudgetReport) -> String {
    let mut parts = Vec::new();
    if b.limit_micros.is_some() {
        parts.push(b.remaining_micros.map_or_else(|| "?".to_string(), usd));
    }
    if b.limit_tokens.is_some() {
        parts.push(match b.remaining_tokens {
            Some(r) => format!("{r} tok"),
            None => "? tok".to_string(),
        });
    }
    if b.limit_requests.is_some() {
        parts.push(match b.remaining_requests {
            Some(r) => format!("{r} req"),
            None => "? req".to_string(),
        });
    }
    if b.limit_concurrent.is_some() {
        parts.push(match b.remaining_concurrent {
            Some(1) => "1 slot".to_string(),
            Some(r) => format!("{r} slots"),
            None => "? slots".to_string(),
        });
    }
    if parts.is_empty() {
        return "-".to_string();
    }
    parts.join(", ")
}

/// The line under a `status` table that was cut at its limit: how many buckets there were.
pub fn status_cut(a: &StatusAnswer) -> String {
    format!(
        "showing {} of {} buckets (the most utilized); a larger --limit shows more",
        a.budgets.len(),
        a.total
    )
}

/// True for a budget without any limit: it only measures.
pub fn is_meter(b: &BudgetReport) -> bool {
    b.limit_micros.is_none()
        && b.limit_tokens.is_none()
        && b.limit_requests.is_none()
        && b.limit_concurrent.is_none()
}

/// The bucket's state, with `(soft)` for a warn-only budget.
pub fn state_text(b: &BudgetReport) -> String {
    let s = bucket_state(b.state);
    if b.enforce == Enforce::Warn {
        format!("{s} (soft)")
    } else {
        s.to_string()
    }
}

/// `ok`, `warn`, `exhausted`.
pub fn bucket_state(s: BucketState) -> &'static str {
    match s {
        BucketState::Ok => "ok",
        BucketState::Warn => "warn",
        BucketState::Exhausted => "exhausted",
    }
}

/// `allow`, `warn`, `deny`.
pub fn decision(d: Decision) -> &'static str {
    match d {
        Decision::Allow => "allow",
        Decision::Warn => "warn",
        Decision::Deny => "deny",
    }
}

/// When the window resets: `2026-11-24T00:00:00Z (in 8h16m)`, or `never` for a cumulative
/// budget.
pub fn next_reset(window_end: Option<&str>, now: TsMicros) -> String {
    match window_end {
        None => "never".to_string(),
        Some(t) => match parse_ts(t) {
            Some(end) if end > now && end - now < 1_000_000 => format!("{t} (in <1s)"),
            Some(end) if end > now => format!("{t} (in {})", duration((end - now) / 1_000_000)),
            _ => t.to_string(),
        },
    }
}

/// `45s`, `8m05s`, `8h16m`, `3d04h`.
pub fn duration(seconds: i64) -> String {
    let s = seconds.max(0);
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// The budget table of `status` (and of answers): budget, scope, spent / limit, held, what
/// remains of each limit, a utilization bar, state, next reset.
pub fn budgets_table(budgets: &[BudgetReport], now: TsMicros) -> String {
    let mut t = Table::new(&[
        "BUDGET",
        "SCOPE",
        ">SPENT / LIMIT",
        ">HELD",
        ">REMAINING",
        "UTILIZATION",
        "STATE",
        "NEXT RESET",
    ]);
    for b in budgets {
        t.row(vec![
            b.budget.clone(),
            if b.key.is_empty() {
                "(all)".to_string()
            } else {
                b.key.clone()
            },
            spent_vs_limit(b),
            held(b),
            remaining(b),
            if is_meter(b) {
                "meter (no limit)".to_string()
            } else {
                bar(b.utilization)
            },
            state_text(b),
            if b.window == "rolling" {
                // A rolling window never resets: its calls age out one slot at a time.
                "rolling (slides)".to_string()
            } else {
                next_reset(b.window_end.as_deref(), now)
            },
        ]);
    }
    t.render()
}

/// A `record` / `commit` answer.
pub fn usage_answer(verb: &str, event_id: &str, a: &UsageAnswer, now: TsMicros) -> String {
    let mut out = format!(
        "{verb} {event_id} (seq {}): cost {}, state {}",
        a.seq,
        usd(a.cost_micros),
        bucket_state(a.state)
    );
    let mut notes = Vec::new();
    if a.duplicate {
        notes.push("duplicate: already recorded, counted once".to_string());
    }
    if a.late {
        notes.push("late: the hold had already expired".to_string());
    }
    match a.reservation.as_deref() {
        Some("unknown") => notes.push("the daemon never saw this reservation".to_string()),
        Some("denied") => {
            notes.push("this reservation was denied: spent without a hold".to_string())
        }
        _ => {}
    }
    if a.priced_at_max {
        notes.push("unknown model, priced at the table's highest prices".to_string());
    }
    if let Some(o) = a.overrun_micros {
        notes.push(format!("overran its hold by {}", usd(o)));
    }
    if !notes.is_empty() {
        out.push_str(&format!(" ({})", notes.join("; ")));
    }
    out.push('\n');
    if !a.budgets.is_empty() {
        out.push_str(&budgets_table(&a.budgets, now));
    }
    out
}

/// A `reserve` / `check` answer.
pub fn decision_answer(reservation_id: Option<&str>, a: &DecisionAnswer, now: TsMicros) -> String {
    let model = a.model.as_deref().unwrap_or("-");
    let mut out = format!("{}: {model}", decision(a.decision));
    let held = if reservation_id.is_some() && a.decision != Decision::Deny {
        "holds"
    } else {
        "would hold"
    };
    out.push_str(&format!(", {held} {}", usd(a.hold_micros)));
    if let Some(m) = a.max_output_tokens {
        out.push_str(&format!(" (max_output_tokens {m})"));
    }
    if let Some(w) = a.waited_ms.filter(|w| *w > 0) {
        out.push_str(&format!(", after waiting in line {w} ms"));
    }
    out.push('\n');
    if let Some(rid) = reservation_id {
        match (&a.expires_at, a.decision) {
            (_, Decision::Deny) => out.push_str(&format!("reservation {rid}: denied")),
            (Some(exp), _) => out.push_str(&format!("reservation {rid}: expires {exp}")),
            (None, _) => out.push_str(&format!("reservation {rid}")),
        }
        if let Some(seq) = a.seq {
            out.push_str(&format!(" (seq {seq})"));
        }
        if a.duplicate {
            out.push_str(" (duplicate: the original answer)");
        }
        out.push('\n');
    }
    if a.reason.code != "ok" || a.decision == Decision::Warn {
        out.push_str(&format!("reason: {}\n", a.reason.message));
    }
    for s in &a.skipped {
        let reason = serde_json::to_value(s.reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!("skipped {}: {reason} ({})\n", s.model, s.detail));
    }
    if !a.budgets.is_empty() {
        out.push_str(&budgets_table(&a.budgets, now));
    }
    out
}

/// A bucket's figures in the units of its budget's limits when it sets limits and none is in
/// dollars (`1100 tok`, `3 req`, `1 live`), with the zero change a price change makes to them
/// (`0 tok`); `None` for a budget with a dollar limit and for a meter, which are shown in
/// dollars (as `status` does).
pub fn own_units(b: &BudgetReport) -> Option<(String, String)> {
    if b.limit_micros.is_some() {
        return None;
    }
    let mut figures = Vec::new();
    let mut zeros = Vec::new();
    for (limit, spent, unit) in [
        (b.limit_tokens, b.spent_tokens, "tok"),
        (b.limit_requests, b.spent_requests, "req"),
        (b.limit_concurrent, b.live_holds, "live"),
    ] {
        if limit.is_some() {
            figures.push(format!("{spent} {unit}"));
            zeros.push(format!("0 {unit}"));
        }
    }
    (!figures.is_empty()).then(|| (figures.join(", "), zeros.join(", ")))
}

/// Per (budget, scope key): figures and zero change in the units of a budget without a dollar
/// limit, as [`own_units`] gives them.
pub type OwnUnits = std::collections::BTreeMap<(String, String), (String, String)>;

/// The diff table of `replay`: budget, scope, before, after, delta, state change; then the
/// total delta. `units` gives, for a row's budget and scope, its figures in the units of a
/// budget without a dollar limit (see [`own_units`]); other rows are in dollars.
pub fn replay_answer(
    a: &ReplayAnswer,
    since: Option<&str>,
    offline: bool,
    units: &OwnUnits,
) -> String {
    let mut out = String::new();
    if a.diff.is_empty() {
        out.push_str("no bucket's current figures change\n");
    } else {
        let mut t = Table::new(&["BUDGET", "SCOPE", ">BEFORE", ">AFTER", ">DELTA", "STATE"]);
        let mut in_own_units = false;
        for r in &a.diff {
            let own = units.get(&(r.budget.clone(), r.key.clone())).cloned();
            in_own_units |= own.is_some();
            t.row(diff_cells(r, own));
        }
        out.push_str(&t.render());
        if in_own_units {
            out.push_str(
                "(budgets without a dollar limit are shown in the units of their limits, which \
                 new prices do not change)\n",
            );
        }
    }
    let from = since
        .map(|s| format!("since {s}"))
        .unwrap_or_else(|| "over the whole log".into());
    out.push_str(&format!(
        "total delta {from}: {} ({} events folded)\n",
        usd_delta(a.total_delta_micros),
        a.events
    ));
    if a.applied {
        match a.seq {
            Some(seq) => out.push_str(&format!(
                "applied: pricing_changed appended at seq {seq}; live figures follow the new prices\n"
            )),
            None => out.push_str("applied\n"),
        }
    } else if offline {
        out.push_str("dry run (offline): nothing was changed\n");
    } else {
        out.push_str("dry run: nothing was changed; add --apply to make it so\n");
    }
    out
}

fn diff_cells(r: &DiffRow, own_units: Option<(String, String)>) -> Vec<String> {
    let state = if r.state_before == r.state_after {
        bucket_state(r.state_after).to_string()
    } else {
        format!(
            "{} -> {}",
            bucket_state(r.state_before),
            bucket_state(r.state_after)
        )
    };
    let mut cells = vec![
        r.budget.clone(),
        if r.key.is_empty() {
            "(all)".into()
        } else {
            r.key.clone()
        },
    ];
    match own_units {
        Some((figures, zero)) => cells.extend([figures.clone(), figures, zero]),
        None => cells.extend([
            usd(r.before_micros),
            usd(r.after_micros),
            usd_delta(r.delta_micros),
        ]),
    }
    cells.push(state);
    cells
}

/// Labels as `k=v,k=v`, without the derived `model`, `provider` and `tier`.
pub fn client_labels(labels: &Labels) -> String {
    labels
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "model" | "provider" | "tier"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One line for `tail`: `seq  time  type  summary`.
pub fn event_line(e: &ExportedEvent) -> String {
    // Cluster mode: `p1:42` is seq 42 of partition 1's log.
    let seq = match e.partition {
        Some(p) => format!("p{p}:{}", e.seq),
        None => e.seq.to_string(),
    };
    format!("{seq:>6}  {}  {:<20}  {}", e.time, e.kind, summary(e))
}

/// What an event says, in a few words.
pub fn summary(e: &ExportedEvent) -> String {
    let labels = |l: &Labels| {
        let t = client_labels(l);
        if t.is_empty() {
            String::new()
        } else {
            format!(" [{t}]")
        }
    };
    match &e.body {
        EventBody::UsageRecorded(u) => {
            let mut s = format!(
                "{} {} in={} out={}",
                u.event_id, u.model, u.usage.input_tokens, u.usage.output_tokens
            );
            if u.usage.cached_input_tokens > 0 {
                s.push_str(&format!(" cached={}", u.usage.cached_input_tokens));
            }
            if u.usage.cache_write_tokens > 0 {
                s.push_str(&format!(" cache_write={}", u.usage.cache_write_tokens));
            }
            if let Some(c) = e.cost_micros {
                s.push_str(&format!(" {}", usd(c)));
            }
            if let Some(r) = &u.reservation_id {
                s.push_str(&format!(" commit of {r}"));
            }
            if u.late {
                s.push_str(" (late)");
            }
            s.push_str(&labels(&u.labels));
            s
        }
        EventBody::ReservationCreated(r) => format!(
            "{} {} holds {} until {}{}",
            r.reservation_id,
            r.model,
            usd(r.hold_micros),
            bursar_core::time::format_ts(r.expires_at),
            labels(&r.labels)
        ),
        EventBody::ReservationDenied(r) => {
            let mut s = format!("{} {} denied ({})", r.reservation_id, r.model, r.reason);
            if let Some(b) = &r.budget {
                s.push_str(&format!(" by {b}"));
                if let Some(k) = r.key.as_deref().filter(|k| !k.is_empty()) {
                    s.push_str(&format!(" [{k}]"));
                }
            }
            s.push_str(&labels(&r.labels));
            s
        }
        EventBody::ReservationReleased(r) => format!("{} {}", r.reservation_id, r.reason),
        EventBody::ReservationExtended(r) => format!(
            "{} until {}",
            r.reservation_id,
            bursar_core::time::format_ts(r.expires_at)
        ),
        EventBody::ReservationExpired(r) => r.reservation_id.clone(),
        EventBody::BudgetWarned(c) | EventBody::BudgetExhausted(c) => {
            let key = if c.key.is_empty() {
                String::new()
            } else {
                format!(" [{}]", c.key)
            };
            format!(
                "{}{key} at {}% (spent {}, held {})",
                c.budget,
                c.utilization_ppm / 10_000,
                usd(c.spent_micros),
                usd(c.held_micros)
            )
        }
        EventBody::PolicyApplied(p) => format!(
            "version {} from {} ({} budgets, {} priced models)",
            p.policy_version,
            p.source,
            p.policy.budgets.len(),
            p.policy.pricing.models.len()
        ),
        EventBody::PricingChanged(p) => format!(
            "{} priced models, effective from {}",
            p.pricing.models.len(),
            bursar_core::time::format_ts(p.effective_from)
        ),
        EventBody::QuotaObserved(q) => {
            let mut s = format!("{} ({}): {}", q.quota, q.provider, observed_limits(q));
            if let Some(id) = &q.event_id {
                s.push_str(&format!(" with {id}"));
            }
            if !q.ignored.is_empty() {
                s.push_str(&format!(" ({} headers ignored)", q.ignored.len()));
            }
            s
        }
        EventBody::QuotaExhausted(q) => format!(
            "{} {} until {} (observed at seq {})",
            q.quota,
            q.limit,
            bursar_core::time::format_ts(q.reset_at),
            q.observed_seq
        ),
    }
}

/// `requests 0/10000 until T, tokens 1999000/2000000 until T`: each limit a `quota_observed`
/// carries (remaining, of the limit when known).
pub fn observed_limits(q: &bursar_schemas::event::QuotaObserved) -> String {
    let all = [&q.requests, &q.tokens, &q.input_tokens, &q.output_tokens];
    let parts: Vec<String> = bursar_core::ledger::quotas::LIMIT_NAMES
        .iter()
        .zip(all)
        .filter_map(|(name, l)| {
            l.map(|l| {
                let of = l.limit.map(|n| format!("/{n}")).unwrap_or_default();
                format!(
                    "{name} {}{of} until {}",
                    l.remaining,
                    bursar_core::time::format_ts(l.reset_at)
                )
            })
        })
        .collect();
    parts.join(", ")
}

/// Now, in Unix microseconds.
pub fn now_micros() -> TsMicros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A what-if `replay` (SPEC §11) as tables: the reservations the policy would have denied, the
/// buckets it would have exhausted, each budget's peak.
pub fn what_if_answer(
    a: &bursar_schemas::wire::WhatIfAnswer,
    policy: &str,
    since: Option<&str>,
) -> String {
    let mut out = String::new();
    let from = since
        .map(|s| format!("since {s}"))
        .unwrap_or_else(|| "over the whole log".into());
    out.push_str(&format!(
        "what-if under {policy}, {from}: {} events read, {} reservations decided again\n",
        a.events, a.reservations
    ));
    if a.denied_total == 0 {
        out.push_str("\nno reservation granted in the log would have been denied\n");
    } else {
        out.push_str(&format!(
            "\nWOULD HAVE DENIED: {} reservations, holding {}\n",
            a.denied_total,
            usd(a.denied_hold_micros)
        ));
        let mut t = Table::new(&[
            ">SEQ",
            "TIME",
            "RESERVATION",
            "MODEL",
            ">HOLD",
            "BUDGET",
            "SCOPE",
            "LABELS",
        ]);
        for d in &a.denied {
            t.row(vec![
                // Cluster mode: `p1:42` is seq 42 of partition 1's log.
                d.partition
                    .map_or_else(|| d.seq.to_string(), |p| format!("p{p}:{}", d.seq)),
                d.ts.clone(),
                d.reservation_id.clone(),
                d.model.clone(),
                usd(d.hold_micros),
                d.budget.clone().unwrap_or_else(|| d.reason.clone()),
                d.key.clone().unwrap_or_default(),
                client_labels(&d.labels),
            ]);
        }
        out.push_str(&t.render());
        if (a.denied.len() as u64) < a.denied_total {
            out.push_str(&format!(
                "(showing the first {} of {}; --json has them as data)\n",
                a.denied.len(),
                a.denied_total
            ));
        }
        if a.usage_left_out > 0 {
            out.push_str(&format!(
                "usage committed against them, left out (the calls would not have been made): {} \
                 events, {}\n",
                a.usage_left_out,
                usd(a.usage_left_out_micros)
            ));
        }
    }
    if a.exhausted.is_empty() {
        out.push_str("\nno bucket would have been exhausted\n");
    } else {
        out.push_str(&format!(
            "\nWOULD HAVE BEEN EXHAUSTED: {} times\n",
            a.exhausted_total
        ));
        let mut t = Table::new(&["BUDGET", "SCOPE", "AT", "WINDOW FROM"]);
        for x in &a.exhausted {
            t.row(vec![
                x.budget.clone(),
                x.key.clone(),
                x.at.clone(),
                x.window_start.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !a.peaks.is_empty() {
        out.push_str("\nPEAK UTILIZATION\n");
        let mut t = Table::new(&["BUDGET", "SCOPE", ">PEAK", "AT"]);
        for p in &a.peaks {
            t.row(vec![
                p.budget.clone(),
                if p.key.is_empty() {
                    "(all)".into()
                } else {
                    p.key.clone()
                },
                format!("{:.0}%", p.utilization * 100.0),
                p.at.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push_str("\nwhat-if: nothing was changed; `bursar reload` applies a policy\n");
    out
}

/// `$0.50–$3.00`, or `-` without a range.
pub fn tier_range(range: Option<TierPriceRange>) -> String {
    range.map_or_else(
        || "-".to_string(),
        |r| {
            format!(
                "{}–{}",
                usd(r.min_input_per_mtok),
                usd(r.max_input_per_mtok)
            )
        },
    )
}

/// `bursar tiers`: a table of the tiers, then each tier's models with their prices (USD per
/// million tokens), a model outside its tier's input price range marked.
pub fn tiers_table(listing: &[TierListing]) -> String {
    let mut t = Table::new(&[
        "TIER",
        "NAME",
        ">INPUT $/MTOK",
        ">MODELS",
        "COLOR",
        "ICON",
        "ORIGIN",
        "DESCRIPTION",
    ]);
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_string());
    for l in listing {
        let origin = match l.tier.origin {
            TierOrigin::Builtin => "built in",
            TierOrigin::Changed => "built in, changed",
            TierOrigin::Defined => "defined",
            TierOrigin::Implicit => "named only",
        };
        t.row(vec![
            if l.is_default {
                format!("{} (default)", l.tier.id)
            } else {
                l.tier.id.clone()
            },
            dash(&l.tier.display_name),
            tier_range(l.tier.price_range),
            l.models.len().to_string(),
            dash(&l.tier.color),
            dash(&l.tier.icon),
            origin.to_string(),
            dash(&l.tier.description),
        ]);
    }
    let mut out = t.render();
    for l in listing.iter().filter(|l| !l.models.is_empty()) {
        out.push('\n');
        out.push_str(&format!(
            "{}{}: {} model{}{}\n",
            l.tier.id,
            l.tier
                .display_name
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            l.models.len(),
            if l.models.len() == 1 { "" } else { "s" },
            if l.is_default {
                ", those no pattern matches"
            } else {
                ""
            },
        ));
        let mut m = Table::new(&[
            "MODEL",
            "PROVIDER",
            ">INPUT $/MTOK",
            ">OUTPUT $/MTOK",
            "NOTE",
        ]);
        for model in &l.models {
            let p = &model.price;
            let outside = l.tier.price_range.is_some_and(|r| {
                !(r.min_input_per_mtok..=r.max_input_per_mtok).contains(&p.input_per_mtok)
            });
            m.row(vec![
                model.model.clone(),
                p.provider.clone(),
                usd(p.input_per_mtok),
                usd(p.output_per_mtok),
                if outside {
                    format!("outside {}", tier_range(l.tier.price_range))
                } else {
                    String::new()
                },
            ]);
        }
        out.push_str(&m.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact() {
        assert_eq!(usd(3500), "$0.0035");
        assert_eq!(usd(50_000_000), "$50.00");
        assert_eq!(usd(-1), "-$0.000001");
        assert_eq!(usd_delta(1), "+$0.000001");
        assert_eq!(usd_delta(0), "$0.00");
    }

    #[test]
    fn bars() {
        assert_eq!(bar(0.0), "[--------------------]   0%");
        assert_eq!(bar(0.5), "[##########----------]  50%");
        assert_eq!(bar(1.5), "[####################] 150%");
        assert_eq!(bar(0.98), "[###################-]  98%");
        assert_eq!(bar(1.0), "[####################] 100%");
    }

    #[test]
    fn a_rolling_window_slides_rather_than_resetting() {
        let b: BudgetReport = serde_json::from_value(serde_json::json!({
            "budget": "rpm", "key": "", "spent_micros": 0, "held_micros": 0,
            "spent_tokens": 0, "held_tokens": 0, "limit_requests": 60, "spent_requests": 3,
            "remaining_requests": 57, "live_holds": 0, "utilization": 0.05, "state": "ok",
            "enforce": "deny", "window": "rolling", "window_end": "2026-12-03T10:00:00.5Z"
        }))
        .unwrap();
        let now = parse_ts("2026-12-03T10:00:00Z").unwrap();
        let table = budgets_table(&[b], now);
        assert!(table.contains("rolling (slides)"), "{table}");
        assert!(!table.contains("<1s"), "{table}");
    }

    #[test]
    fn wide_characters_take_two_columns() {
        let mut t = Table::new(&["SCOPE", ">N"]);
        t.row(vec!["team=検索チーム".into(), "1".into()]);
        t.row(vec!["team=search".into(), "100".into()]);
        // `team=検索チーム` is 15 columns wide (five wide characters); every line ends in column 20.
        let text = t.render();
        let ends: Vec<usize> = text
            .lines()
            .map(unicode_width::UnicodeWidthStr::width)
            .collect();
        assert_eq!(ends, vec![20, 20, 20], "{text}");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["A", ">N"]);
        t.row(vec!["xyz".into(), "1".into()]);
        t.row(vec!["q".into(), "100".into()]);
        assert_eq!(t.render(), "A      N\nxyz    1\nq    100\n");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(485), "8m05s");
        assert_eq!(duration(8 * 3600 + 16 * 60), "8h16m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d04h");
    }
}
