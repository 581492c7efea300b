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

/// The samples with a receipt in every event that has the field (a field added after `receipt`
/// could read a `None`'s single 0 as its own and still come back as written).
fn with_every_receipt(
    mut envs: Vec<bursar_schemas::event::Envelope>,
) -> Vec<bursar_schemas::event::Envelope> {
    let some = envs
        .iter()
        .find_map(|e| {
            let mut b = e.body.clone();
            receipts_of(&mut b).and_then(|r| r.take())
        })
        .expect("a sample with a receipt");
    for e in &mut envs {
        if let Some(r) = receipts_of(&mut e.body) {
            r.get_or_insert_with(|| some.clone());
        }
    }
    envs
}

#[test]
fn a_receipt_left_out_leaves_the_event_as_it_was() {
    // The samples hold receipts with every field set (lines, an overrun, a decision, skipped
    // candidates, a message) and events without one; then every event that can have one has
    // one. A receipt is left unread as the last field of its event: a field after it would be
    // read from the receipt's bytes, and the events would not come back as written.
    for written in [
        props::sample_envelopes(),
        with_every_receipt(props::sample_envelopes()),
    ] {
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
        // The chain check still covers the bytes as stored, receipts included: the same hash
        // as a decode that reads them (the samples' own hashes are of the unchanged samples).
        let full = decode_record_checked(&bytes).unwrap();
        for ((c, want), f) in lean.iter().zip(&expected).zip(&full) {
            assert_eq!(&c.env, want);
            assert_eq!(c.content_hash, f.content_hash, "seq {}", c.env.seq);
        }
        if written == props::sample_envelopes() {
            assert!(full.iter().all(|f| f.content_hash == f.env.hash));
        }

        // Outside, receipts are decoded (export, tail, verify and duplicates read them).
        assert_eq!(decode_record(&bytes).unwrap(), written);
    }
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

/// The fold takes the bytes after an event whose receipt it left unread as that receipt, as long
/// as they can be one (`None`: exactly a 0; `Some`: a 1 and more), and leaves the rest of the
/// receipt to every other reader: a receipt that does not decode fails `decode_record` (export,
/// verify). After an event without a receipt field, or where the receipt is missing, bytes left
/// over or missing are an error in the fold as outside it.
#[test]
fn bytes_after_an_event_are_refused_unless_they_can_be_its_unread_receipt() {
    let written = props::sample_envelopes();
    let bytes = encode_record(&written).unwrap();
    assert_eq!(props::split_record(&bytes).1.len(), written.len());
    assert_eq!(
        props::join_record(
            &props::split_record(&bytes).0,
            &props::split_record(&bytes).1
        ),
        bytes
    );
    let lean = |record: &[u8]| without_receipts(|| decode_record_deferred(record));
    // (left to verify, refused with `None`'s receipt, refused without the field)
    let mut tried = (0, 0, 0);
    for (i, env) in written.iter().enumerate() {
        let mut body = env.body.clone();
        let receipt = receipts_of(&mut body).map(|r| r.is_some());
        let (head, events) = props::split_record(&bytes);
        let mut longer = events.clone();
        longer[i].1.push(0xA5);
        let longer = props::join_record(&head, &longer);
        assert!(
            decode_record(&longer).is_err(),
            "event {i}: read in full, a stray byte is an error"
        );
        match receipt {
            Some(true) => {
                let folded = lean(&longer).unwrap_or_else(|e| panic!("event {i}: {e}"));
                assert_eq!(folded.len(), written.len());
                tried.0 += 1;
            }
            Some(false) => {
                assert!(
                    lean(&longer).is_err(),
                    "event {i}: a receipt of `None` is one byte"
                );
                let mut shorter = events.clone();
                assert_eq!(
                    shorter[i].1.pop(),
                    Some(0),
                    "event {i}: `None` is written as a 0"
                );
                let shorter = props::join_record(&head, &shorter);
                assert!(lean(&shorter).is_err(), "event {i}: without its receipt");
                assert!(decode_record(&shorter).is_err());
                tried.1 += 1;
            }
            None => {
                assert!(
                    lean(&longer).is_err(),
                    "event {i} has no receipt: a stray byte is an error"
                );
                tried.2 += 1;
            }
        }
    }
    assert!(tried.0 >= 2 && tried.1 >= 1 && tried.2 >= 2, "{tried:?}");
}
