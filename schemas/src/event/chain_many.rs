//! The chain hashes of many links at once, for the check of a whole log at start (SPEC §7).
//!
//! One link, `BLAKE3(prev ‖ bytes)` over ~430 bytes, is seven 64-byte blocks compressed one
//! after another, each waiting on the one before: 11.5 % of a 2 M-event start-up's samples
//! (`_blake3_compress_in_place_avx512`, benches/README.md "Replay: the links hashed side by
//! side"). The links of a record are independent of each other (each is checked against the
//! hash stored before it), so their blocks are compressed side by side: blake3's own SIMD
//! `hash_many` (AVX-512: 16 links at once, AVX2: 8) takes every block but the last of links
//! with as many blocks, and each link's last block is compressed on its own after.
//!
//! `blake3::platform` is public but undocumented ("for benchmarks only"): the workspace pins
//! blake3 to the exact version this was written against, and `chain_hash_many` is checked
//! against [`chain_hash`] for every length from 0 to past a chunk and for links in any mix of
//! lengths (tests below, and `schemas/tests/chain_many.rs`).

use super::{chain_hash, Hash32};
use blake3::platform::{words_from_le_bytes_32, Platform};
use blake3::IncrementCounter;

/// BLAKE3's initial chaining value (its spec, §2.2: SHA-256's IV).
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
/// Block flags (BLAKE3 spec, §2.1).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const ROOT: u8 = 1 << 3;
const BLOCK_LEN: usize = blake3::BLOCK_LEN;
/// Links longer than one chunk are hashed one at a time (a tree of chunks).
const CHUNK_LEN: usize = blake3::CHUNK_LEN;
/// Blocks before the last one of a link of at most one chunk: 0..=15.
const MAX_LEADING_BLOCKS: usize = CHUNK_LEN / BLOCK_LEN - 1;
/// Links handed to `hash_many` per call (its widest degree).
const BATCH: usize = 16;

/// `out[i] = chain_hash(links[i].0, links[i].1)`, for every `i`.
pub fn chain_hash_many(links: &[(&Hash32, &[u8])]) -> Vec<Hash32> {
    if let [(prev, bytes)] = links {
        return vec![chain_hash(prev, bytes)];
    }
    let mut out = vec![Hash32([0; 32]); links.len()];
    // The links by how many blocks come before their last one.
    let mut by_blocks: [Vec<usize>; MAX_LEADING_BLOCKS + 1] = Default::default();
    for (i, (prev, bytes)) in links.iter().enumerate() {
        let len = prev.0.len() + bytes.len();
        if len > CHUNK_LEN {
            out[i] = chain_hash(prev, bytes);
        } else {
            by_blocks[(len - 1) / BLOCK_LEN].push(i);
        }
    }
    let platform = Platform::detect();
    let mut scratch = Vec::new();
    for (blocks, group) in by_blocks.iter().enumerate() {
        if group.is_empty() {
            continue;
        }
        if blocks == 0 || group.len() == 1 {
            // Nothing to compress side by side.
            for &i in group {
                out[i] = chain_hash(links[i].0, links[i].1);
            }
            continue;
        }
        // `hash_many` takes arrays of one length, known when compiled: one instance per count
        // of leading blocks.
        macro_rules! leading {
            ($($n:literal)*) => {
                match blocks {
                    $($n => hash_group::<{ $n * BLOCK_LEN }>(platform, links, group, &mut scratch, &mut out),)*
                    _ => {
                        for &i in group {
                            out[i] = chain_hash(links[i].0, links[i].1);
                        }
                    }
                }
            };
        }
        leading!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    }
    out
}

/// Hash the links `group` of `links`, each of more than `N` bytes with its `prev` and at most
/// one chunk: their first `N` bytes side by side, then each one's last block.
fn hash_group<const N: usize>(
    platform: Platform,
    links: &[(&Hash32, &[u8])],
    group: &[usize],
    scratch: &mut Vec<u8>,
    out: &mut [Hash32],
) {
    let prev_len = std::mem::size_of::<Hash32>();
    for batch in group.chunks(BATCH) {
        scratch.clear();
        for &i in batch {
            let (prev, bytes) = links[i];
            scratch.extend_from_slice(&prev.0);
            scratch.extend_from_slice(&bytes[..N - prev_len]);
        }
        let none = [0u8; N];
        let mut inputs: [&[u8; N]; BATCH] = [&none; BATCH];
        let mut n = 0;
        for (slot, first) in inputs.iter_mut().zip(scratch.chunks_exact(N)) {
            if let Ok(first) = first.try_into() {
                *slot = first;
                n += 1;
            }
        }
        debug_assert_eq!(n, batch.len());
        let mut cvs = [0u8; 32 * BATCH];
        platform.hash_many(
            &inputs[..n],
            &IV,
            0,
            IncrementCounter::No,
            0,
            CHUNK_START,
            0,
            &mut cvs,
        );
        for (k, &i) in batch.iter().enumerate() {
            let tail = &links[i].1[N - prev_len..];
            let mut block = [0u8; BLOCK_LEN];
            block[..tail.len()].copy_from_slice(tail);
            let mut cv_bytes = [0u8; 32];
            cv_bytes.copy_from_slice(&cvs[32 * k..32 * (k + 1)]);
            let mut cv = words_from_le_bytes_32(&cv_bytes);
            // 1..=64 bytes, so it fits the u8.
            platform.compress_in_place(&mut cv, &block, tail.len() as u8, 0, CHUNK_END | ROOT);
            let mut h = [0u8; 32];
            for (w, b) in cv.iter().zip(h.chunks_exact_mut(4)) {
                b.copy_from_slice(&w.to_le_bytes());
            }
            out[i] = Hash32(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn every_length_up_to_past_a_chunk_hashes_as_one_link_at_a_time() {
        let prev = Hash32([7; 32]);
        // Twenty links of each length, so that every group goes through `hash_many`.
        for len in 0..=1100usize {
            let data: Vec<Vec<u8>> = (0..20).map(|s| bytes(len, s as u8)).collect();
            let links: Vec<(&Hash32, &[u8])> = data.iter().map(|d| (&prev, &d[..])).collect();
            let want: Vec<Hash32> = links.iter().map(|(p, b)| chain_hash(p, b)).collect();
            assert_eq!(chain_hash_many(&links), want, "length {len}");
        }
    }
}
