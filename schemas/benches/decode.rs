//! Request decoding (`wire::decode_request`) of typical `record` and `reserve` lines: the work the
//! daemon's connection tasks do for every request before the writer sees it.
//!
//! Run: `cargo bench -p bursar-schemas --bench decode`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use bursar_schemas::wire::{decode_request, Request};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// A `record` as an agent sends it: six labels, full usage, client time and a `req` tag.
const RECORD: &str = r#"{"op":"record","req":17,"event_id":"e-7c1f0a92-33","labels":{"org":"acme","team":"search","agent":"planner","user":"u-17","plan":"p-9","session":"s-3"},"model":"gpt-4o","usage":{"input_tokens":1200,"output_tokens":300,"cached_input_tokens":512,"cache_write_tokens":0,"requests":1},"occurred_at":"2026-11-23T10:00:00Z"}"#;

/// A `reserve` with fallback candidates and required capabilities.
const RESERVE: &str = r#"{"op":"reserve","req":"r-18","reservation_id":"r-7c1f0a92-34","labels":{"org":"acme","team":"search","agent":"planner","user":"u-17","plan":"p-9","session":"s-3"},"model":"gpt-4o","estimate":{"input_tokens":1200,"max_output_tokens":800},"ttl_seconds":120,"candidates":["gpt-4o","gpt-4o-mini"],"require":["tools"]}"#;

fn decode(c: &mut Criterion) {
    assert!(matches!(
        decode_request(RECORD.as_bytes()).unwrap().request,
        Request::Record(_)
    ));
    assert!(matches!(
        decode_request(RESERVE.as_bytes()).unwrap().request,
        Request::Reserve(_)
    ));
    let mut group = c.benchmark_group("decode_request");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    group.bench_function("record line", |b| {
        b.iter(|| decode_request(black_box(RECORD.as_bytes())))
    });
    group.bench_function("reserve line", |b| {
        b.iter(|| decode_request(black_box(RESERVE.as_bytes())))
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
