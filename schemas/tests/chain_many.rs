//! The chain check's hashes computed side by side (`chain_hash_many`, `hash_all`) are the
//! hashes computed one link at a time, for links of any mix of lengths and for the events of
//! a stored record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_schemas::event::{
    chain_hash, chain_hash_many, decode_record_checked, decode_record_deferred, encode_record,
    hash_all, Hash32,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Up to 40 links of 0–1,500 bytes (past one chunk), with their own `prev`s: some lengths
    /// share a count of blocks and go through `hash_many` together, some stand alone.
    #[test]
    fn links_of_any_lengths_hash_side_by_side_as_one_at_a_time(
        links in prop::collection::vec(
            (any::<[u8; 32]>(), prop::collection::vec(any::<u8>(), 0..1500)),
            0..40,
        )
    ) {
        let prevs: Vec<Hash32> = links.iter().map(|(p, _)| Hash32(*p)).collect();
        let l: Vec<(&Hash32, &[u8])> =
            prevs.iter().zip(&links).map(|(p, (_, b))| (p, &b[..])).collect();
        let want: Vec<Hash32> = l.iter().map(|(p, b)| chain_hash(p, b)).collect();
        prop_assert_eq!(chain_hash_many(&l), want);
    }
}

/// A record's events hashed together (`hash_all`, what recovery does) carry the hashes a
/// decode that hashes each computes, which are the stored ones; an event whose bytes are not
/// in the record given is left for `content_hash` to refuse.
#[test]
fn a_record_s_events_hashed_together_carry_their_stored_hashes() {
    let written = props::sample_envelopes();
    let bytes = encode_record(&written).unwrap();
    let checked = decode_record_checked(&bytes).unwrap();
    let mut deferred = decode_record_deferred(&bytes).unwrap();
    assert!(deferred.len() >= 2, "several events to hash together");
    hash_all(&bytes, &mut deferred);
    // Hashed now: the record's bytes are no longer needed.
    for (d, c) in deferred.iter().zip(&checked) {
        assert_eq!(d.content_hash(&[]).unwrap(), c.content_hash);
        assert_eq!(c.content_hash, c.env.hash, "seq {}", c.env.seq);
    }

    let mut short = decode_record_deferred(&bytes).unwrap();
    hash_all(&bytes[..bytes.len() - 1], &mut short);
    let (last, rest) = short.split_last().unwrap();
    assert!(
        last.content_hash(&[]).is_err(),
        "the last event's bytes end past the record"
    );
    for (d, c) in rest.iter().zip(&checked) {
        assert_eq!(d.content_hash(&[]).unwrap(), c.content_hash);
    }
}
