//! A stored event is decoded without a bincode limit (`event::text`): what its decode allocates
//! must then be bounded by its bytes. A length claiming a petabyte, written over every byte of
//! an event of each kind in turn, must make the record an error (or, where the bytes happen to
//! mean something else, another record), never an allocation of what it claims: that would
//! abort the process ("memory allocation of 1125899906842624 bytes failed"), and this test with
//! it: a regression shows as the test binary's abort, not as a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_schemas::event::receipts::without_receipts;
use bursar_schemas::event::{
    decode_record_checked, decode_record_deferred, encode_record, SharingLabels, EVENT_KINDS,
};

/// bincode's varint for `2^50`: the tag of a `u64` (253), then its bytes.
fn huge_length() -> Vec<u8> {
    let mut v = vec![253u8];
    v.extend_from_slice(&(1u64 << 50).to_le_bytes());
    v
}

fn decode_every_way(record: &[u8]) -> usize {
    let mut ok = 0;
    ok += usize::from(decode_record_checked(record).is_ok());
    ok += usize::from(without_receipts(|| decode_record_deferred(record)).is_ok());
    let _sharing = SharingLabels::start();
    ok += usize::from(decode_record_deferred(record).is_ok());
    ok += usize::from(without_receipts(|| decode_record_deferred(record)).is_ok());
    ok
}

#[test]
fn a_damaged_length_anywhere_in_an_event_is_an_error_not_an_allocation() {
    let envs = props::sample_envelopes();
    // The samples hold every kind of event (a kind added without a sample would go untested).
    let kinds: std::collections::BTreeSet<&str> = envs.iter().map(|e| e.body.kind()).collect();
    assert_eq!(kinds, EVENT_KINDS.into_iter().collect());
    let record = encode_record(&envs).unwrap();
    assert_eq!(decode_every_way(&record), 4, "the intact record decodes");
    let (head, events) = props::split_record(&record);
    let huge = huge_length();
    let mut damaged_records = 0;
    let mut refused = 0;
    for i in 0..events.len() {
        let len = events[i].1.len();
        for at in 0..len {
            let mut events = events.clone();
            let body = &mut events[i].1;
            for (k, b) in huge.iter().enumerate() {
                if let Some(slot) = body.get_mut(at + k) {
                    *slot = *b;
                }
            }
            let damaged = props::join_record(&head, &events);
            damaged_records += 1;
            if decode_every_way(&damaged) == 0 {
                refused += 1;
            }
        }
    }
    // Every kind of event was damaged at every byte, and most damage is refused outright.
    assert!(damaged_records > 1_000, "{damaged_records}");
    assert!(
        refused * 2 > damaged_records,
        "{refused} of {damaged_records}"
    );
}
