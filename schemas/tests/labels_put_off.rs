//! While a thread shares label sets (`SharingLabels`: start-up, replay), a record's decoder looks
//! its events' label sets up only once the whole record is decoded, all together: each event
//! must still come back with its own labels, and a record that fails must not leave its sets
//! behind for the next one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod props;

use bursar_schemas::event::receipts::without_receipts;
use bursar_schemas::event::{
    decode_record, decode_record_deferred, encode_record, Envelope, EventLabels, SharingLabels,
};

/// The samples (one of every event body) three times over, each event that carries labels
/// with a set of its own in the first two rounds, and the third round repeating the first's:
/// a record whose sets differ from one event to the next and recur.
fn events_with_labels_of_their_own() -> Vec<Envelope> {
    let mut out = Vec::new();
    for round in 0..3 {
        for (i, mut e) in props::sample_envelopes().into_iter().enumerate() {
            let own = if round == 2 { 0 } else { round };
            if let Some(l) = e.body.labels_mut() {
                l.update(|m| m.insert("event".into(), format!("{own}-{i}")));
            }
            e.seq += (round * 100) as u64;
            out.push(e);
        }
    }
    out
}

fn labels_in(envs: &[Envelope]) -> Vec<EventLabels> {
    envs.iter()
        .filter_map(|e| e.body.event_labels().cloned())
        .collect()
}

#[test]
fn every_event_decoded_while_sharing_comes_back_with_its_own_labels() {
    let written = events_with_labels_of_their_own();
    let kinds: std::collections::BTreeSet<&str> = written
        .iter()
        .filter(|e| e.body.labels().is_some())
        .map(|e| e.body.kind())
        .collect();
    assert_eq!(
        kinds.len(),
        4,
        "every kind of event with labels is in the record: {kinds:?}"
    );
    for e in &written {
        assert_eq!(
            e.body.event_labels().is_some(),
            e.body.clone().labels_mut().is_some(),
            "{}: the two accessors know the same kinds",
            e.body.kind()
        );
    }
    let bytes = encode_record(&written).unwrap();
    let plain = decode_record(&bytes).unwrap();

    let _sharing = SharingLabels::start();
    for _ in 0..2 {
        let shared = decode_record(&bytes).unwrap();
        assert_eq!(shared, plain);
        let deferred = without_receipts(|| decode_record_deferred(&bytes)).unwrap();
        assert_eq!(deferred.len(), plain.len());
        for (d, p) in deferred.iter().zip(&plain) {
            assert_eq!(d.env.body.labels(), p.body.labels(), "seq {}", p.seq);
        }
        // The third round's sets are the first round's very copies; no two others are.
        let sets = labels_in(&shared);
        let third = sets.len() / 3;
        for (i, s) in sets.iter().enumerate() {
            for (j, t) in sets.iter().enumerate().skip(i + 1) {
                assert_eq!(
                    s.same_set(t),
                    j == i + 2 * third,
                    "sets {i} and {j}: {s:?} / {t:?}"
                );
            }
        }
    }
}

/// The record's bytes with the first `from` in them replaced by `to` (of the same length).
fn patched(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the text is in the record");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[test]
fn a_record_that_fails_leaves_no_label_set_behind_for_the_next() {
    let written = events_with_labels_of_their_own();
    let good = encode_record(&written).unwrap();
    let plain = decode_record(&good).unwrap();
    // A label value that is not UTF-8 (found when the record's sets are looked up, after every
    // event decoded), and an event whose bytes end early (found while the record is decoded,
    // with the sets of the events before it put off).
    let not_text = patched(&good, b"1-3", &[b'1', 0xFF, b'3']);
    let (head, mut events) = props::split_record(&good);
    let last = events.len() - 1;
    events[last].1.truncate(3);
    let cut = props::join_record(&head, &events);

    let damaged_seq = written
        .iter()
        .find(|e| {
            e.body
                .labels()
                .and_then(|l| l.get("event"))
                .map(String::as_str)
                == Some("1-3")
        })
        .map(|e| e.seq)
        .unwrap();

    let _sharing = SharingLabels::start();
    let e = decode_record(&not_text).unwrap_err().to_string();
    assert!(
        e.contains("UTF-8") && e.contains(&format!("event {damaged_seq}:")),
        "{e}"
    );
    assert!(decode_record(&cut).is_err());
    for bad in [&not_text, &cut, &not_text] {
        assert!(without_receipts(|| decode_record_deferred(bad)).is_err());
        assert_eq!(decode_record(&good).unwrap(), plain);
    }
    drop(_sharing);
    assert!(
        decode_record(&not_text).is_err(),
        "nor is it read without sharing"
    );
}
