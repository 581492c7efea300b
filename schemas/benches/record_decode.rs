//! A stored record's decode as recovery's reading thread does it (SPEC §7 format 2): 64 events
//! like `bursar-bench replay`'s log (60 % plain `usage_recorded`, the rest holds and the
//! commits of earlier holds, seven labels each from 1,000 scopes, a receipt of three lines),
//! label sets shared and receipts left unread.
//!
//! Run: `cargo bench -p bursar-schemas --bench record_decode`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Duration;

use bursar_schemas::event::receipts::without_receipts;
use bursar_schemas::event::{
    decode_record_deferred, encode_record, Actor, Envelope, EventBody, Hash32, Receipt,
    ReservationCreated, ReservationLink, SharingLabels, UsageRecorded,
};
use bursar_schemas::wire::Usage;
use bursar_schemas::Labels;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "../tests/props/mod.rs"]
mod props;

const EVENTS: u64 = 64;

fn labels(n: u64) -> Labels {
    let s = n % 1000;
    let mut l = Labels::new();
    for (k, v) in [
        ("org", format!("o{}", s % 4)),
        ("team", format!("t{}", s % 10)),
        ("user", format!("u{}", s / 4)),
        ("session", format!("s{s}")),
        ("model", "gpt-4o-mini".to_string()),
        ("provider", "openai".to_string()),
        ("tier", "standard".to_string()),
    ] {
        l.insert(k.into(), v);
    }
    l
}

/// The tests' sample receipt (of `props::sample_envelopes`'s `usage_recorded`), its line three
/// times, one per budget of the bench policy, as the log generator's receipts have: recovery
/// leaves receipts unread, so only their length matters here.
fn sample_receipt() -> Receipt {
    let mut r = props::sample_envelopes()
        .into_iter()
        .find_map(|e| match e.body {
            EventBody::UsageRecorded(u) => u.receipt,
            _ => None,
        })
        .expect("the samples hold a usage_recorded with a receipt");
    r.lines = vec![r.lines[0]; 3];
    r
}

fn body(n: u64, receipt: &Receipt) -> EventBody {
    let usage = Usage {
        input_tokens: 500 + n * 37 % 2500,
        output_tokens: 50 + n * 13 % 1000,
        ..Usage::default()
    };
    let digest = [(n % 251) as u8; 16];
    // Six plain records in ten, two holds, two commits of earlier holds.
    let (event_id, reservation_id, reservation, scope) = match n % 10 {
        6 | 7 => {
            return EventBody::ReservationCreated(ReservationCreated {
                reservation_id: format!("r-{}", 1_000_000 + n),
                labels: labels(n * 7919).into(),
                model: "gpt-4o-mini".into(),
                input_tokens: usage.input_tokens,
                max_output_tokens: 4096,
                hold_micros: 2_000 + (n % 1000) as i64,
                expires_at: 1_800_000_000_000_000,
                payload_digest: digest,
                receipt: Some(receipt.clone()),
            })
        }
        0..=5 => (
            format!("e-{}", 1_000_000 + n),
            None,
            ReservationLink::None,
            n * 7919,
        ),
        _ => (
            format!("c-{}", 1_000_000 + n),
            Some(format!("r-{}", 999_000 + n)),
            ReservationLink::Known,
            n * 104_729,
        ),
    };
    EventBody::UsageRecorded(UsageRecorded {
        event_id,
        reservation_id,
        reservation,
        late: false,
        labels: labels(scope).into(),
        model: "gpt-4o-mini".into(),
        usage,
        occurred_at: None,
        reported_cost_usd: None,
        payload_digest: digest,
        receipt: Some(receipt.clone()),
    })
}

fn record() -> Vec<u8> {
    let receipt = sample_receipt();
    let mut prev = Hash32([7; 32]);
    let mut envs = Vec::new();
    for n in 0..EVENTS {
        let seq = 5_000_000 + n;
        let e = Envelope::seal(
            seq,
            1_765_000_000_000_000 + seq as i64 * 1_000,
            Actor {
                uid: 1000,
                gid: 1000,
                pid: 4242,
            },
            prev,
            body(n, &receipt),
        )
        .expect("seal");
        prev = e.hash;
        envs.push(e);
    }
    encode_record(&envs).expect("encode")
}

fn decode(c: &mut Criterion) {
    let rec = record();
    let mut group = c.benchmark_group("record_decode");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .throughput(Throughput::Elements(EVENTS));
    let _sharing = SharingLabels::start();
    group.bench_function("64 events, as recovery reads them", |b| {
        b.iter(|| without_receipts(|| decode_record_deferred(black_box(&rec)).expect("decode")))
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
