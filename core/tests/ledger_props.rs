//! Property tests of the ledger: live state equals the fold of the emitted events, no
//! interleaving of reservations admits more than a limit, replay under the same prices changes
//! nothing, and repricing reports exactly the change.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use bursar_core::ledger::{collect_epochs, fold, replay, replay_from_log, Answer, Command};
use bursar_schemas::event::{EventBody, PricingChanged};
use bursar_schemas::policy::WindowSpec;
use bursar_schemas::wire::*;
use common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Record {
        team: u8,
        input: u16,
        output: u16,
    },
    Reserve {
        id: u8,
        team: u8,
        input: u16,
        max_out: u16,
        ttl: u8,
    },
    Commit {
        id: u8,
        input: u16,
        output: u16,
    },
    Release {
        id: u8,
    },
    Extend {
        id: u8,
        ttl: u8,
    },
    Advance {
        seconds: u16,
    },
    Reap,
    Reload {
        limit: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 0u16..400, 0u16..200).prop_map(|(team, input, output)| Op::Record {
            team,
            input,
            output
        }),
        (0u8..20, 0u8..3, 0u16..300, 0u16..300, 1u8..60).prop_map(
            |(id, team, input, max_out, ttl)| Op::Reserve {
                id,
                team,
                input,
                max_out,
                ttl
            }
        ),
        (0u8..20, 0u16..300, 0u16..300).prop_map(|(id, input, output)| Op::Commit {
            id,
            input,
            output
        }),
        (0u8..20).prop_map(|id| Op::Release { id }),
        (0u8..20, 1u8..60).prop_map(|(id, ttl)| Op::Extend { id, ttl }),
        (0u16..90).prop_map(|seconds| Op::Advance { seconds }),
        Just(Op::Reap),
        (500u16..5000).prop_map(|limit| Op::Reload { limit }),
    ]
}

fn test_policy(limit: i64) -> bursar_schemas::policy::ResolvedPolicy {
    let mut team = budget("team");
    team.group_by = vec!["team".into()];
    team.max_micros = Some(limit);
    team.window = WindowSpec::Fixed {
        seconds: 120,
        offset_seconds: 0,
    };
    team.warn_at_ppm = Some(800_000);
    let mut all = budget("all");
    all.max_micros = Some(limit * 2);
    all.max_concurrent = Some(5);
    let mut rolling = budget("tpm");
    rolling.max_tokens = Some(3000);
    rolling.window = WindowSpec::Rolling {
        seconds: 60,
        resolution_seconds: 10,
    };
    policy(vec![team, all, rolling, budget("meter")])
}

fn run_op(h: &mut Harness, op: &Op, n: usize) {
    let team = |t: u8| labels(&[("team", ["a", "b", "c"][usize::from(t) % 3])]);
    match op {
        Op::Record {
            team: t,
            input,
            output,
        } => {
            h.record(
                &format!("e{n}"),
                team(*t),
                "m",
                usage((*input).into(), (*output).into()),
            );
        }
        Op::Reserve {
            id,
            team: t,
            input,
            max_out,
            ttl,
        } => {
            let mut r = h.reserve_req(
                &format!("r{id}"),
                team(*t),
                "m",
                (*input).into(),
                (*max_out).into(),
            );
            r.ttl_seconds = Some((*ttl).into());
            h.run(Command::Reserve(&r));
        }
        Op::Commit { id, input, output } => {
            h.commit(
                &format!("r{id}"),
                &format!("c{n}"),
                usage((*input).into(), (*output).into()),
            );
        }
        Op::Release { id } => {
            h.run(Command::Release(&ReleaseRequest {
                reservation_id: format!("r{id}"),
            }));
        }
        Op::Extend { id, ttl } => {
            h.run(Command::Extend(&ExtendRequest {
                reservation_id: format!("r{id}"),
                ttl_seconds: (*ttl).into(),
            }));
        }
        Op::Advance { seconds } => h.now += i64::from(*seconds) * SEC,
        Op::Reap => {
            let events = h.ledger.reap(h.now);
            for (seq, ts, body) in events {
                let prev = h.log.last().map(|e| e.hash).unwrap_or_default();
                h.log.push(
                    bursar_schemas::event::Envelope::seal(seq, ts, Default::default(), prev, body)
                        .unwrap(),
                );
            }
        }
        Op::Reload { limit } => h.apply_policy(test_policy(i64::from(*limit))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn live_state_equals_the_fold_of_the_emitted_events(ops in prop::collection::vec(op(), 1..120)) {
        let mut h = Harness::new(test_policy(2000));
        for (n, op) in ops.iter().enumerate() {
            run_op(&mut h, op, n);
        }
        let refolded = h.refold();
        prop_assert_eq!(&refolded, &h.ledger);
        prop_assert_eq!(refolded.status(&StatusRequest::default(), h.now), h.ledger.status(&StatusRequest::default(), h.now));
        // The emitted log is dense and strictly increasing in time.
        for w in h.log.windows(2) {
            prop_assert_eq!(w[1].seq, w[0].seq + 1);
            prop_assert!(w[1].ts > w[0].ts);
        }
    }

    #[test]
    fn no_interleaving_of_reservations_admits_more_than_the_limit(
        ops in prop::collection::vec(op(), 1..150)
    ) {
        // Only holds and commits that stay within their hold: spent + held never exceeds a limit.
        let mut h = Harness::new(test_policy(1500));
        let mut held: std::collections::HashMap<String, (u64, u64)> = Default::default();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Op::Record { .. } | Op::Reload { .. } => continue,
                Op::Commit { id, .. } => {
                    // Commit exactly the estimate of a hold that is still live: actual usage
                    // within the hold. (A late commit is money already spent and may exceed.)
                    let rid = format!("r{id}");
                    let live = h.ledger.hold(&rid).is_some_and(|x| x.expires_at > h.now);
                    if !live {
                        continue;
                    }
                    if let Some((i, o)) = held.remove(&rid) {
                        h.commit(&rid, &format!("c{n}"), usage(i, o));
                    }
                }
                Op::Reserve { id, input, max_out, .. } => {
                    let before = h.ledger.last_seq();
                    run_op(&mut h, op, n);
                    if h.ledger.last_seq() > before {
                        held.entry(format!("r{id}")).or_insert(((*input).into(), (*max_out).into()));
                    }
                }
                _ => run_op(&mut h, op, n),
            }
            for r in h.status() {
                if let Some(limit) = r.limit_micros {
                    prop_assert!(r.spent_micros + r.held_micros <= limit, "{r:?}");
                }
                if let Some(limit) = r.limit_concurrent {
                    prop_assert!(r.live_holds <= limit, "{r:?}");
                }
            }
        }
    }

    #[test]
    fn a_ledger_read_back_from_a_snapshot_decides_exactly_as_the_one_written(
        before in prop::collection::vec(op(), 1..60),
        after in prop::collection::vec(op(), 1..60),
    ) {
        // A snapshot keeps no derived data (compiled limits, price index, match cache, window
        // ends, rolling sums); what is rebuilt must decide exactly as the original does.
        let mut h = Harness::new(test_policy(2000));
        for (n, op) in before.iter().enumerate() {
            run_op(&mut h, op, n);
        }
        let json = serde_json::to_string(&h.ledger).unwrap();
        let back: bursar_core::ledger::Ledger = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &h.ledger);
        let mut g = Harness { ledger: back, log: h.log.clone(), now: h.now };
        for (n, op) in after.iter().enumerate() {
            run_op(&mut h, op, before.len() + n);
            run_op(&mut g, op, before.len() + n);
            prop_assert_eq!(g.status(), h.status());
        }
        prop_assert_eq!(&g.ledger, &h.ledger);
        // The same events (crossings included) and the same answers.
        prop_assert_eq!(&g.log, &h.log);
    }

    #[test]
    fn apply_usage_folds_as_apply_and_decides_as_the_answers_report(
        ops in prop::collection::vec(op(), 1..120)
    ) {
        let mut h = Harness::new(test_policy(2000));
        for (n, op) in ops.iter().enumerate() {
            run_op(&mut h, op, n);
        }
        // Fold the log twice: with `apply`, and with `apply_usage` (which also decides).
        let mut plain = bursar_core::ledger::Ledger::new();
        let mut deciding = bursar_core::ledger::Ledger::new();
        for (i, e) in h.log.iter().enumerate() {
            plain.apply(e.seq, e.ts, &e.body).unwrap();
            let decided = deciding.apply_usage(e.seq, e.ts, &e.body).unwrap();
            if let EventBody::UsageRecorded(u) = &e.body {
                // The crossings it finds due are exactly those the writer appended after it.
                let appended = h.log[i + 1..]
                    .iter()
                    .take_while(|n| matches!(n.body, EventBody::BudgetWarned(_) | EventBody::BudgetExhausted(_)))
                    .count();
                prop_assert_eq!(decided.crossings(), appended, "{:?}", u);
                prop_assert!(decided.budgets() > 0);
            } else {
                prop_assert_eq!(decided.budgets(), 0);
            }
        }
        prop_assert_eq!(&plain, &deciding);
        prop_assert_eq!(&plain, &h.ledger);
    }

    #[test]
    fn replay_under_the_same_prices_changes_nothing(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new(test_policy(2000));
        for (n, op) in ops.iter().enumerate() {
            run_op(&mut h, op, n);
        }
        let epochs = collect_epochs(h.log.iter().cloned().map(Ok::<_, String>)).unwrap();
        let out = replay(&h.ledger, &epochs, h.log.iter().cloned().map(Ok::<_, String>), &prices(), i64::MIN, h.now).unwrap();
        prop_assert!(out.answer.diff.is_empty(), "{:?}", out.answer.diff);
        prop_assert_eq!(out.answer.total_delta_micros, 0);
        prop_assert_eq!(out.answer.events, h.log.len() as u64);
        prop_assert_eq!(out.after.status(&StatusRequest::default(), h.now), h.ledger.status(&StatusRequest::default(), h.now));
    }

    /// The daemon's dry run folds the log alone, off its writer thread (SPEC §6): it must
    /// answer exactly as a replay against the live ledger.
    #[test]
    fn a_dry_run_folded_from_the_log_alone_answers_as_a_replay_of_the_live_ledger(
        ops in prop::collection::vec(op(), 1..80),
        factor in 1i64..4,
        since_at in 0usize..100,
    ) {
        let mut h = Harness::new(test_policy(2000));
        for (n, op) in ops.iter().enumerate() {
            run_op(&mut h, op, n);
        }
        let mut table = prices();
        for p in table.models.values_mut() {
            p.input_per_mtok *= factor;
            p.output_per_mtok += 7;
        }
        let since = h.log.get(since_at).map_or(i64::MIN, |e| e.ts);
        let log = || h.log.iter().cloned().map(Ok::<_, String>);
        let epochs = collect_epochs(log()).unwrap();
        let live = replay(&h.ledger, &epochs, log(), &table, since, h.now).unwrap();
        let dry = replay_from_log(&epochs, log(), &table, since, h.now).unwrap();
        prop_assert_eq!(&live.answer, &dry.answer);
        prop_assert_eq!(
            live.after.status(&StatusRequest::default(), h.now),
            dry.after.status(&StatusRequest::default(), h.now)
        );
    }
}

#[test]
fn repricing_from_since_reports_the_diff_and_applying_it_equals_a_full_fold() {
    let mut b = budget("cap");
    b.max_micros = Some(1000);
    let mut h = Harness::new(policy(vec![b]));
    h.record("e1", labels(&[]), "m", usage(300, 0)); // 300 at 1 µ/token
    h.now += 10 * SEC;
    let since = h.now;
    h.record("e2", labels(&[]), "m", usage(300, 0)); // 300 more
    h.now += 10 * SEC;
    let mut table = prices();
    table.models.get_mut("m").unwrap().input_per_mtok = 2_000_000; // doubled
    let epochs = collect_epochs(h.log.iter().cloned().map(Ok::<_, String>)).unwrap();
    let out = replay(
        &h.ledger,
        &epochs,
        h.log.iter().cloned().map(Ok::<_, String>),
        &table,
        since,
        h.now,
    )
    .unwrap();
    assert_eq!(out.answer.total_delta_micros, 300, "only e2 is repriced");
    assert_eq!(out.answer.diff.len(), 1);
    let row = &out.answer.diff[0];
    assert_eq!(
        (row.before_micros, row.after_micros, row.delta_micros),
        (600, 900, 300)
    );
    assert_eq!(
        (row.state_before, row.state_after),
        (BucketState::Ok, BucketState::Ok)
    );

    // Apply: append pricing_changed; the live ledger becomes the refold, and a full fold of the
    // log (which now holds a retroactive epoch) agrees.
    let mut live = out.after;
    let seq = live.last_seq() + 1;
    let ts = live.stamp(h.now);
    let body = EventBody::PricingChanged(PricingChanged {
        effective_from: since,
        pricing: table,
    });
    live.apply(seq, ts, &body).unwrap();
    let prev = h.log.last().unwrap().hash;
    h.log.push(
        bursar_schemas::event::Envelope::seal(seq, ts, Default::default(), prev, body).unwrap(),
    );
    let full = fold(|| h.log.iter().cloned().map(Ok::<_, String>)).unwrap();
    assert_eq!(full, live);
    assert_eq!(
        full.status(&StatusRequest::default(), h.now)
            .unwrap()
            .budgets[0]
            .spent_micros,
        900
    );
    // New usage is priced with the new table.
    h.ledger = live;
    let a = h.record("e3", labels(&[]), "m", usage(50, 0));
    assert_eq!(a.cost_micros, 100);
    assert_eq!(a.state, BucketState::Exhausted);
}

#[test]
fn exports_can_name_the_price_version_of_each_usage_event() {
    let mut h = Harness::new(policy(vec![budget("meter")]));
    h.record("e1", labels(&[]), "m", usage(1, 0));
    let (_, _, version) = h.ledger.usage_cost("m", &usage(1, 0), h.now);
    assert_eq!(
        version, 1,
        "the policy event at seq 1 introduced the table in force"
    );
    let a = h.run(Command::Record(&RecordRequest {
        event_id: "e1".into(),
        labels: labels(&[]),
        model: "m".into(),
        usage: usage(1, 0),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    }));
    assert!(matches!(&a, Answer::Usage(u) if u.duplicate), "{a:?}");
}
