//! A long fold (recovery, replay: `Ledger::begin_long_fold`) matches the label sets its events
//! share by where they live. It must fold exactly as a plain fold does, whatever the events
//! share and whenever their sets are freed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bursar_core::ledger::Ledger;
use bursar_schemas::event::{Envelope, EventBody, EventLabels};
use bursar_schemas::policy::{ResolvedBudget, WindowSpec};
use bursar_schemas::wire::StatusRequest;
use bursar_schemas::Labels;
use bursar_testkit::Rng;
use common::*;
use std::collections::BTreeMap;

/// Budgets per org, per team and per user, a cumulative and a windowed one.
fn budgets() -> Vec<ResolvedBudget> {
    let mut out = Vec::new();
    for (id, group) in [("org", "org"), ("team", "team"), ("user", "user")] {
        let mut b = budget(id);
        b.group_by = vec![group.into()];
        b.max_micros = Some(1_000_000_000);
        out.push(b);
    }
    let mut w = budget("user-hourly");
    w.group_by = vec!["user".into()];
    w.window = WindowSpec::Rolling {
        seconds: 3600,
        resolution_seconds: 60,
    };
    w.max_tokens = Some(10_000_000);
    out.push(w);
    out
}

fn set_of(i: u64) -> Labels {
    labels(&[
        ("org", &format!("o{}", i % 3)),
        ("team", &format!("t{}", i % 7)),
        ("user", &format!("u{i}")),
    ])
}

/// A log of records, reservations and commits over `sets` label sets, with the policy applied
/// again (the match cache emptied) now and then; an event a second.
fn log(seed: u64, events: usize, sets: u64) -> Vec<Envelope> {
    log_every(seed, events, sets, 1)
}

/// [`log`] with an event every `seconds`.
fn log_every(seed: u64, events: usize, sets: u64, seconds: i64) -> Vec<Envelope> {
    let mut rng = Rng::new(seed);
    let mut h = Harness::new(policy(budgets()));
    let mut open = Vec::new();
    for n in 0..events {
        h.now += seconds * SEC;
        let l = set_of(rng.below(sets));
        match rng.below(10) {
            0..=4 => {
                h.record(&format!("e{n}"), l, "m", usage(rng.range(1, 500), 10));
            }
            5..=7 => {
                h.reserve(&format!("r{n}"), l, "m", rng.range(1, 500), 100);
                open.push(format!("r{n}"));
            }
            8 if !open.is_empty() => {
                let rid = open.swap_remove(rng.below(open.len() as u64) as usize);
                h.commit(&rid, &format!("c{n}"), usage(10, 10));
            }
            _ if rng.chance(10) => {
                let mut p = policy(budgets());
                p.reservation_ttl_seconds = 300 + rng.below(100);
                h.apply_policy(p);
            }
            _ => {}
        }
    }
    h.log
}

fn plain_fold(log: &[Envelope]) -> Ledger {
    let mut l = Ledger::new();
    for e in log {
        l.apply(e.seq, e.ts, &e.body).unwrap();
    }
    l
}

/// `log` folded in one long fold, as recovery and replay fold it.
fn long_fold(log: &[Envelope]) -> Ledger {
    let mut long = Ledger::new();
    long.begin_long_fold();
    for e in log {
        long.apply(e.seq, e.ts, &e.body).unwrap();
    }
    assert!(long.end_long_fold());
    long
}

fn assert_same(a: &Ledger, b: &Ledger, what: &str) {
    assert!(a == b, "{what}: the ledgers differ");
    let req = StatusRequest::default();
    let (sa, sb) = (a.status(&req, a.last_ts()), b.status(&req, b.last_ts()));
    assert_eq!(
        serde_json::to_string(&sa.unwrap()).unwrap(),
        serde_json::to_string(&sb.unwrap()).unwrap(),
        "{what}: the status answers differ"
    );
}

/// Events whose equal sets are one shared copy (as the log's reader decodes them) fold in a
/// long fold to the ledger a plain fold of separate copies gives.
#[test]
fn a_long_fold_of_events_sharing_their_label_sets_folds_as_a_plain_one() {
    for seed in 0..40 {
        let log = log(seed, 600, 1 + seed % 30);
        let expected = plain_fold(&log);
        // One copy per distinct set, shared by every event with that set.
        let mut copies: BTreeMap<Labels, EventLabels> = BTreeMap::new();
        let shared: Vec<Envelope> = log
            .iter()
            .cloned()
            .map(|mut e| {
                if let Some(l) = e.body.labels_mut() {
                    let map = (**l).clone();
                    *l = copies
                        .entry(map.clone())
                        .or_insert_with(|| EventLabels::from(map))
                        .clone();
                }
                e
            })
            .collect();
        assert_same(&long_fold(&shared), &expected, &format!("seed {seed}"));
    }
}

/// Over hours of log time, reservations expire, are committed late (after they expired) and
/// are forgotten an hour after they ended: a long fold, which only queues the ended ones until
/// it ends or one is looked up, folds to the ledger a plain fold gives.
#[test]
fn a_long_fold_of_hours_of_ended_reservations_folds_as_a_plain_one() {
    let mut late_commits = 0;
    for seed in 0..8 {
        // 1,500 events 12 to 19 seconds apart: 5 to 8 hours; holds live 300-400 s.
        let log = log_every(seed, 1_500, 1 + seed % 30, 12 + seed as i64);
        late_commits += log
            .iter()
            .filter(|e| matches!(&e.body, EventBody::UsageRecorded(u) if u.late))
            .count();
        let expected = plain_fold(&log);
        assert_same(&long_fold(&log), &expected, &format!("seed {seed}"));
        // Told its last event's time (as recovery is, from the log's head), the fold does not
        // even queue the ids that event forgets: all but the last hour's.
        let last = log.last().map(|e| e.ts).unwrap();
        let mut told = Ledger::new();
        told.begin_long_fold_until(last);
        for e in &log {
            told.apply(e.seq, e.ts, &e.body).unwrap();
        }
        assert!(told.end_long_fold(), "seed {seed}: told the truth");
        assert_same(&told, &expected, &format!("seed {seed}, told its end"));
        // Told a later time than its last event's, it skips ids it keeps, and says so.
        let mut misled = Ledger::new();
        misled.begin_long_fold_until(last + 2 * 3_600 * SEC);
        for e in &log {
            misled.apply(e.seq, e.ts, &e.body).unwrap();
        }
        assert!(!misled.end_long_fold(), "seed {seed}: misled");
        assert!(misled != expected, "seed {seed}: the misled fold lacks ids");
    }
    assert!(late_commits > 200, "{late_commits} late commits");
}

/// Fold `log` in a long fold, each event with a fresh copy of its labels, shared (as decoded
/// sets are) while the event folds and freed after; `on_copy` sees each copy first.
fn long_fold_with_fresh_copies(log: &[Envelope], mut on_copy: impl FnMut(&EventLabels)) -> Ledger {
    let mut long = Ledger::new();
    long.begin_long_fold();
    for e in log {
        let mut body = e.body.clone();
        let held = body.labels_mut().map(|l| {
            *l = EventLabels::from((**l).clone());
            on_copy(l);
            l.clone()
        });
        long.apply(e.seq, e.ts, &body).unwrap();
        drop(body);
        drop(held);
    }
    assert!(long.end_long_fold());
    long
}

/// A set freed during a long fold leaves its address to the next set allocated, most likely
/// one of the same size: an event bringing that other set counts in its own buckets, never in
/// those of the set that lived there before.
#[test]
fn a_label_set_living_where_a_freed_one_lived_counts_in_its_own_buckets() {
    for seed in 0..10 {
        // Each event a user of its own: every set differs from the one before.
        let log = log(seed, 400, 1_000_000);
        let long = long_fold_with_fresh_copies(&log, |_| {});
        assert_same(&long, &plain_fold(&log), &format!("seed {seed}"));
    }
}

/// Sets that recur, each event bringing a fresh copy (shared while it folds, then freed): the
/// entry of a set keeps the newest copy and lets the one before go, whose address the next
/// copy allocated — most likely of *another* set — takes. That event must count in its own
/// buckets, not in those of the set whose stale `by_set` slot names the address.
#[test]
fn a_fresh_copy_of_another_recurring_set_at_a_freed_copy_s_address_counts_in_its_own_buckets() {
    let mut reused = 0;
    for seed in 0..20 {
        let log = log(seed, 600, 2 + seed % 6);
        let mut seen: BTreeMap<usize, Labels> = BTreeMap::new();
        let long = long_fold_with_fresh_copies(&log, |l| {
            if let Some(before) = seen.insert(l.addr(), (**l).clone()) {
                if before != **l {
                    reused += 1;
                }
            }
        });
        assert_same(&long, &plain_fold(&log), &format!("seed {seed}"));
    }
    assert!(
        reused > 100,
        "another set took a freed copy's address only {reused} times"
    );
}
