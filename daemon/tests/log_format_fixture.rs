//! Logs written by earlier versions must still be read and replayed by this one.
//!
//! `fixtures/log-format-v1.bin` is a log written by the first release's format (envelope
//! version 1, record format 1): a sequence of `u32` big-endian length + record bytes, exactly
//! what sled holds under each key. It is frozen: never regenerate it. When the format changes,
//! add a new fixture next to it and keep this test reading the old one.
//!
//! The fixture was made once with `BURSAR_WRITE_FIXTURE=1 cargo test -p bursard --test
//! log_format_fixture` (which refuses to overwrite an existing file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_core::ledger::{fold, Command, Ledger};
use bursar_core::policy::parse_policy;
use bursar_schemas::event::{
    decode_record, decode_record_checked, decode_record_deferred, encode_record, Actor, Envelope,
    EventBody, Hash32, PolicyApplied,
};
use bursar_schemas::wire::{
    Estimate, RecordRequest, ReleaseRequest, ReserveRequest, StatusRequest, Usage,
};
use std::path::PathBuf;

const POLICY: &str = r#"
[[budget]]
id = "team"
match = { org = "acme" }
group_by = ["team"]
window = "cumulative"
max_usd = 1
warn_at = 0.5
"#;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-format-v1.bin")
}

/// The log the fixture holds: a policy, usage, a hold and its release, a warning.
fn make_log() -> Vec<Vec<Envelope>> {
    let loaded = parse_policy(POLICY, "fixture.toml", &|_| Err("no imports".into())).unwrap();
    let mut l = Ledger::new();
    let t0 = 1_795_392_000_000_000;
    let mut records = Vec::new();
    let mut prev = Hash32::default();
    let seal = |events: Vec<(u64, i64, EventBody)>, prev: &mut Hash32| -> Vec<Envelope> {
        events
            .into_iter()
            .map(|(seq, ts, body)| {
                let e = Envelope::seal(
                    seq,
                    ts,
                    Actor {
                        uid: 1000,
                        gid: 1000,
                        pid: 42,
                    },
                    *prev,
                    body,
                )
                .unwrap();
                *prev = e.hash;
                e
            })
            .collect()
    };
    let body = EventBody::PolicyApplied(PolicyApplied {
        policy_version: 1,
        source: "fixture.toml".into(),
        source_hash: loaded.source_hash.clone(),
        policy: loaded.resolved,
    });
    l.apply(1, t0, &body).unwrap();
    records.push(seal(vec![(1, t0, body)], &mut prev));
    let labels = |team: &str| {
        [
            ("org".to_string(), "acme".to_string()),
            ("team".to_string(), team.to_string()),
        ]
        .into()
    };
    for (i, team) in ["search", "ads", "search"].iter().enumerate() {
        let r = RecordRequest {
            event_id: format!("e-{i}"),
            labels: labels(team),
            model: "gpt-4o".into(),
            usage: Usage {
                input_tokens: 100_000,
                output_tokens: 10_000,
                ..Usage::default()
            },
            occurred_at: None,
            reported_cost_usd: None,
            headers: None,
        };
        let step = l.execute(Command::Record(&r), t0 + 1_000_000 * (i as i64 + 1));
        records.push(seal(step.events, &mut prev));
    }
    let r = ReserveRequest {
        reservation_id: "r-1".into(),
        labels: labels("ads"),
        model: Some("gpt-4o-mini".into()),
        estimate: Estimate {
            input_tokens: 1000,
            max_output_tokens: Some(500),
        },
        ttl_seconds: Some(60),
        candidates: None,
        require: None,
        wait_ms: None,
    };
    let step = l.execute(Command::Reserve(&r), t0 + 10_000_000);
    let mut batch = seal(step.events, &mut prev);
    let step = l.execute(
        Command::Release(&ReleaseRequest {
            reservation_id: "r-1".into(),
        }),
        t0 + 11_000_000,
    );
    batch.extend(seal(step.events, &mut prev));
    records.push(batch);
    records
}

#[test]
fn the_v1_log_fixture_still_decodes_verifies_and_replays() {
    let path = fixture();
    if std::env::var_os("BURSAR_WRITE_FIXTURE").is_some() {
        assert!(
            !path.exists(),
            "the fixture is frozen; add a new one instead"
        );
        let mut out = Vec::new();
        for r in make_log() {
            let bytes = encode_record(&r).unwrap();
            out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
            out.extend_from_slice(&bytes);
        }
        std::fs::write(&path, out).unwrap();
    }
    let data = std::fs::read(&path).unwrap();
    let mut envs: Vec<Envelope> = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let (len, tail) = rest.split_at(4);
        let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
        let (rec, tail) = tail.split_at(len);
        // Recovery's decode (hashes computed later, on the folding thread) gives the same
        // events and hashes.
        let deferred = decode_record_deferred(rec).unwrap();
        let checked = decode_record_checked(rec).unwrap();
        assert_eq!(deferred.len(), checked.len());
        for (d, c) in deferred.iter().zip(&checked) {
            assert_eq!(d.env, c.env);
            assert_eq!(d.content_hash(rec).unwrap(), c.content_hash);
            assert_eq!(c.content_hash, c.env.hash, "seq {}", c.env.seq);
        }
        envs.extend(decode_record(rec).unwrap());
        rest = tail;
    }
    // The chain verifies.
    let mut prev = Hash32::default();
    for (i, e) in envs.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.prev_hash, prev, "seq {}", e.seq);
        assert_eq!(e.compute_hash().unwrap(), e.hash, "seq {}", e.seq);
        prev = e.hash;
    }
    let kinds: Vec<_> = envs.iter().map(|e| e.body.kind()).collect();
    assert_eq!(
        kinds,
        [
            "policy_applied",
            "usage_recorded",
            "usage_recorded",
            "usage_recorded",
            "budget_warned",
            "reservation_created",
            "reservation_released"
        ]
    );
    // It replays to the figures it was written with: gpt-4o at $2.50 / $10.00 per Mtok.
    let l = fold(|| envs.iter().cloned().map(Ok::<_, String>)).unwrap();
    let st = l
        .status(&StatusRequest::default(), envs.last().unwrap().ts)
        .unwrap();
    let search = st.budgets.iter().find(|b| b.key == "team=search").unwrap();
    assert_eq!(search.spent_micros, 2 * 350_000);
    assert_eq!(search.state, bursar_schemas::wire::BucketState::Warn);
    let ads = st.budgets.iter().find(|b| b.key == "team=ads").unwrap();
    assert_eq!((ads.spent_micros, ads.held_micros), (350_000, 0));
}
