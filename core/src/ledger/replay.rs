//! Folding the log, and repricing: fold again under a new price table from `since`.
//!
//! A `pricing_changed` event may take effect before it was appended (`effective_from` in the
//! past). The fold is therefore defined in two passes: first every price epoch in the log is
//! made known, then the events are applied in order; a usage event at `ts` is priced by the
//! newest-introduced epoch with `effective_from <= ts`. A live ledger that never saw a
//! retroactive epoch reaches the same state in one pass.

use super::report::bucket_state;
use super::Ledger;
use bursar_schemas::event::{Envelope, EventBody};
use bursar_schemas::pricing::PriceTable;
use bursar_schemas::wire::{DiffRow, ReplayAnswer};
use bursar_schemas::TsMicros;
use std::collections::BTreeMap;

/// Why a fold stopped.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// An event could not be folded.
    #[error(transparent)]
    Apply(#[from] super::ApplyError),
    /// The event source failed.
    #[error("reading the log: {0}")]
    Source(String),
}

/// A price epoch found in the log: `(effective_from, seq, table)`.
pub type EpochDecl = (TsMicros, u64, PriceTable);

/// Fold events into `ledger` after preloading the given epochs.
pub fn fold_into<E: std::fmt::Display>(
    ledger: &mut Ledger,
    epochs: &[EpochDecl],
    events: impl Iterator<Item = Result<Envelope, E>>,
) -> Result<(), FoldError> {
    for (eff, seq, table) in epochs {
        ledger.preload_epoch(*eff, *seq, table);
    }
    ledger.begin_long_fold();
    let folded = events.into_iter().try_for_each(|ev| {
        let ev = ev.map_err(|e| FoldError::Source(e.to_string()))?;
        ledger.apply(ev.seq, ev.ts, &ev.body)?;
        Ok::<(), FoldError>(())
    });
    let complete = ledger.end_long_fold();
    folded?;
    if !complete {
        // Told no last event, the fold skips no id: this cannot be.
        return Err(FoldError::Source(
            "the fold skipped ids it remembers (a bug)".into(),
        ));
    }
    Ok(())
}

/// Collect the retroactive-capable epochs (`pricing_changed`) of a log.
pub fn collect_epochs<E: std::fmt::Display>(
    events: impl Iterator<Item = Result<Envelope, E>>,
) -> Result<Vec<EpochDecl>, FoldError> {
    let mut out = Vec::new();
    for ev in events {
        let ev = ev.map_err(|e| FoldError::Source(e.to_string()))?;
        if let EventBody::PricingChanged(p) = &ev.body {
            out.push((p.effective_from, ev.seq, p.pricing.clone()));
        }
    }
    Ok(out)
}

/// Fold a whole log from scratch (two passes over `source()`).
pub fn fold<E: std::fmt::Display, I: Iterator<Item = Result<Envelope, E>>>(
    mut source: impl FnMut() -> I,
) -> Result<Ledger, FoldError> {
    let epochs = collect_epochs(source())?;
    let mut ledger = Ledger::new();
    fold_into(&mut ledger, &epochs, source())?;
    Ok(ledger)
}

/// A replay: the refolded ledger and the answer describing the change.
#[derive(Debug)]
pub struct ReplayOutcome {
    /// The ledger as a fold with the new prices gives it (what `apply` makes live).
    pub after: Ledger,
    /// Diff and totals.
    pub answer: ReplayAnswer,
    /// The effective_from used.
    pub effective_from: TsMicros,
}

/// Refold `events` (the whole log, which `before` is the fold of) with `table` in force from
/// `since`, as if a `pricing_changed` were appended at seq `before.last_seq() + 1`, and report
/// every bucket whose current figures change at `now`.
pub fn replay<E: std::fmt::Display>(
    before: &Ledger,
    known_epochs: &[EpochDecl],
    events: impl Iterator<Item = Result<Envelope, E>>,
    table: &PriceTable,
    since: TsMicros,
    now: TsMicros,
) -> Result<ReplayOutcome, FoldError> {
    let mut epochs = known_epochs.to_vec();
    epochs.push((since, before.last_seq() + 1, table.clone()));
    let mut after = Ledger::new();
    for (eff, seq, t) in &epochs {
        after.preload_epoch(*eff, *seq, t);
    }
    let mut count = 0u64;
    let mut total_delta: i64 = 0;
    for ev in events {
        let ev = ev.map_err(|e| FoldError::Source(e.to_string()))?;
        total_delta = total_delta.saturating_add(refold(before, &mut after, &ev, since)?);
        count += 1;
    }
    Ok(outcome(before, after, count, total_delta, since, now))
}

/// A dry-run [`replay`] from the log alone: the ledger as it is (`before`, the fold of
/// `events`) and as it would be with `table` from `since` are folded side by side in one pass,
/// so nothing of the live ledger is needed (the daemon runs this off its writer thread, on
/// the log up to a seq it chose). `known_epochs` are the log's own `pricing_changed` epochs
/// ([`collect_epochs`] of the same events).
pub fn replay_from_log<E: std::fmt::Display>(
    known_epochs: &[EpochDecl],
    events: impl Iterator<Item = Result<Envelope, E>>,
    table: &PriceTable,
    since: TsMicros,
    now: TsMicros,
) -> Result<ReplayOutcome, FoldError> {
    let mut before = Ledger::new();
    for (eff, seq, t) in known_epochs {
        before.preload_epoch(*eff, *seq, t);
    }
    let mut after = Ledger::new();
    // The new table's version is the seq its event would get, after the whole log, which is
    // not known before the log is read; the seq only ranks the epochs (the newest-introduced
    // in force wins), so any seq past every event of the log does the same.
    let mut epochs = known_epochs.to_vec();
    epochs.push((since, u64::MAX, table.clone()));
    for (eff, seq, t) in &epochs {
        after.preload_epoch(*eff, *seq, t);
    }
    let mut count = 0u64;
    let mut total_delta: i64 = 0;
    for ev in events {
        let ev = ev.map_err(|e| FoldError::Source(e.to_string()))?;
        before.apply(ev.seq, ev.ts, &ev.body)?;
        total_delta = total_delta.saturating_add(refold(&before, &mut after, &ev, since)?);
        count += 1;
    }
    Ok(outcome(&before, after, count, total_delta, since, now))
}

/// Fold `ev` into `after`; the change of its cost from `before`'s when it is usage at or after
/// `since`.
fn refold(
    before: &Ledger,
    after: &mut Ledger,
    ev: &Envelope,
    since: TsMicros,
) -> Result<i64, FoldError> {
    // The refold may not have seen the policy epoch yet; apply first, then price.
    after.apply(ev.seq, ev.ts, &ev.body)?;
    if let EventBody::UsageRecorded(u) = &ev.body {
        if ev.ts >= since {
            let (old, _, _) = before.event_cost(u, ev.ts);
            let (new, _, _) = after.event_cost(u, ev.ts);
            return Ok(new.saturating_sub(old));
        }
    }
    Ok(0)
}

fn outcome(
    before: &Ledger,
    after: Ledger,
    events: u64,
    total_delta_micros: i64,
    since: TsMicros,
    now: TsMicros,
) -> ReplayOutcome {
    let diff = diff_rows(before, &after, now);
    ReplayOutcome {
        after,
        answer: ReplayAnswer {
            ok: true,
            events,
            diff,
            total_delta_micros,
            applied: false,
            seq: None,
            req: None,
        },
        effective_from: since,
    }
}

/// Buckets whose current-window spend or state differ between two ledgers at `now`.
pub fn diff_rows(before: &Ledger, after: &Ledger, now: TsMicros) -> Vec<DiffRow> {
    let Some(policy) = after.policy.as_ref().or(before.policy.as_ref()) else {
        return Vec::new();
    };
    let (adj_b, adj_a) = (before.expired_adjust(now), after.expired_adjust(now));
    let mut keys: BTreeMap<(usize, String), ()> = BTreeMap::new();
    for l in [before, after] {
        for (i, s) in l.budgets.iter().enumerate() {
            for k in s.keys() {
                keys.insert((i, k.to_string()), ());
            }
        }
    }
    let mut rows = Vec::new();
    for (i, key) in keys.into_keys() {
        let Some(b) = policy.budgets.get(i) else {
            continue;
        };
        let fb = before.figures(i, &key, now, &adj_b);
        let fa = after.figures(i, &key, now, &adj_a);
        let (sb, sa) = (bucket_state(b, &fb), bucket_state(b, &fa));
        if fb.spent.micros != fa.spent.micros || sb != sa {
            rows.push(DiffRow {
                budget: b.id.clone(),
                key,
                before_micros: fb.spent.micros,
                after_micros: fa.spent.micros,
                delta_micros: fa.spent.micros - fb.spent.micros,
                state_before: sb,
                state_after: sa,
            });
        }
    }
    rows
}
