//! The chain check's hashing (SPEC §7): 64 links of one record, each `BLAKE3(prev ‖ bytes)`,
//! one at a time (`chain_hash`) and side by side (`chain_hash_many`), at the sizes of the
//! bench's events (~400 bytes) and of a mix from 100 to 900 bytes.
//!
//! Run: `cargo bench -p bursar-schemas --bench chain`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use bursar_schemas::event::{chain_hash, chain_hash_many, Hash32};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn links(lens: impl Iterator<Item = usize>) -> (Vec<Hash32>, Vec<Vec<u8>>) {
    let data: Vec<Vec<u8>> = lens
        .enumerate()
        .map(|(s, n)| (0..n).map(|i| (i * 7 + s) as u8).collect())
        .collect();
    let prevs = (0..data.len()).map(|s| Hash32([s as u8; 32])).collect();
    (prevs, data)
}

fn chain(c: &mut Criterion) {
    let mut group = c.benchmark_group("chain_hash");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(64));
    for (name, (prevs, data)) in [
        ("400 B", links((0..64).map(|i| 390 + i % 20))),
        ("100-900 B", links((0..64).map(|i| 100 + (i * 97) % 800))),
    ] {
        let l: Vec<(&Hash32, &[u8])> = prevs.iter().zip(&data).map(|(p, d)| (p, &d[..])).collect();
        assert_eq!(
            chain_hash_many(&l),
            l.iter().map(|(p, d)| chain_hash(p, d)).collect::<Vec<_>>()
        );
        group.bench_function(format!("one at a time, 64 links of {name}"), |b| {
            b.iter(|| {
                black_box(&l)
                    .iter()
                    .map(|(p, d)| chain_hash(p, d))
                    .collect::<Vec<_>>()
            })
        });
        group.bench_function(format!("side by side, 64 links of {name}"), |b| {
            b.iter(|| chain_hash_many(black_box(&l)))
        });
    }
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
