//! The fold's decode leaves receipts out (`event::receipts::without_receipts`): every other
//! field of every event comes back as written, and everywhere else receipts are read as ever.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_schemas::event::receipts::without_receipts;
use bursar_schemas::event::{
    decode_record, decode_record_checked, decode_record_deferred, encode_record, EventBody,
};

fn receipts_of(body: &mut EventBody) -> Option<&mut Option<bursar_schemas::event::Receipt>> {
    match body {
        EventBody::UsageRecorded(u) => Some(&mut u.receipt),
        EventBody::ReservationCreated(r) => Some(&mut r.receipt),
        EventBody::ReservationDenied(r) => Some(&mut r.receipt),
        _ => None,
    }
}

#[test]
fn a_receipt_left_out_leaves_the_event_as_it_was() {
    let written = props::sample_envelopes();
    // The samples hold receipts with every field set (lines, an overrun, a decision, skipped
    // candidates, a message) and an event without one: each is read past to its last byte, or
    // the record's decode fails with trailing or missing bytes.
    let with: usize = written
        .iter()
        .filter(|e| {
            let mut b = e.body.clone();
            receipts_of(&mut b).is_some_and(|r| r.is_some())
        })
        .count();
    assert!(with >= 2, "the samples must hold receipts to leave out");
    let bytes = encode_record(&written).unwrap();

    let lean = without_receipts(|| decode_record_checked(&bytes)).unwrap();
    let mut expected = written.clone();
    for e in &mut expected {
        if let Some(r) = receipts_of(&mut e.body) {
            *r = None;
        }
    }
    assert_eq!(lean.len(), written.len());
    for (c, want) in lean.iter().zip(&expected) {
        assert_eq!(&c.env, want);
        // The chain check still covers the bytes as stored, receipts included.
        assert_eq!(c.content_hash, c.env.hash, "seq {}", c.env.seq);
    }

    // Outside, receipts are decoded (export, tail, verify and duplicates read them).
    assert_eq!(decode_record(&bytes).unwrap(), written);
}

#[test]
fn leaving_receipts_out_ends_with_the_closure_and_stays_on_its_thread() {
    let bytes = encode_record(&props::sample_envelopes()).unwrap();
    let full = decode_record(&bytes).unwrap();
    let (inside, other_thread) = without_receipts(|| {
        let inside = decode_record(&bytes).unwrap();
        let b = bytes.clone();
        let other = std::thread::spawn(move || decode_record(&b).unwrap())
            .join()
            .unwrap();
        (inside, other)
    });
    assert_ne!(inside, full);
    assert_eq!(other_thread, full);
    assert_eq!(decode_record(&bytes).unwrap(), full);
    // Also when the closure unwinds.
    let _ = std::panic::catch_unwind(|| without_receipts(|| panic!("inside")));
    assert_eq!(decode_record(&bytes).unwrap(), full);
}

/// Recovery decodes a record on one thread and hashes its events on another: the hash over the
/// bytes where the decode says they lie is the one a decode that hashes computes, for every
/// event, and it is refused for another record's bytes that end short of them.
#[test]
fn a_deferred_hash_is_the_hash_of_the_bytes_as_stored() {
    let written = props::sample_envelopes();
    let bytes = encode_record(&written).unwrap();
    let checked = decode_record_checked(&bytes).unwrap();
    let deferred = without_receipts(|| decode_record_deferred(&bytes)).unwrap();
    assert_eq!(deferred.len(), checked.len());
    for (d, c) in deferred.iter().zip(&checked) {
        assert_eq!(d.env.seq, c.env.seq);
        assert_eq!(d.content_hash(&bytes).unwrap(), c.content_hash);
        assert_eq!(c.content_hash, c.env.hash, "seq {}", c.env.seq);
    }
    let last = deferred.last().unwrap();
    assert!(last.content_hash(&bytes[..bytes.len() - 1]).is_err());
}
