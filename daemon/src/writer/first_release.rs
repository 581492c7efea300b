//! Data dirs of the first release: their `ids` tree, read (never written) so that a resend of
//! one of their requests is still answered as a duplicate or refused as a conflict.

use super::WriteCmd;
use crate::log::LogStore;
use bursar_core::ledger::Answer;
use bursar_schemas::wire::{ErrorCode, WireError};
use serde_json::Value;

/// Data dirs written by the first release kept an idempotency index of their own, the `ids`
/// tree: per id a locator (digest, batch seq, index) into a per-batch LZ4 blob of answers, or,
/// older still, the whole record. Their events carry no receipt, so the original answer of a
/// resend of one of their ids is read from there (read only: nothing writes the tree now).
const LOCATOR_TAG: u8 = 0xA1;
const LOCATOR_LEN: usize = 1 + 16 + 8 + 4;
/// Format byte of a batch's answer blob: LZ4 block (size prepended) of `bincode(Vec<String>)`.
const ANSWERS_FORMAT_V1: u8 = 1;
/// Largest decompressed answer blob accepted.
const MAX_ANSWERS_BYTES: usize = 256 * 1024 * 1024;

/// Key of the answers of the batch whose first event has `seq`: `a/` and the seq big-endian.
fn answers_key(seq: u64) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `(digest, batch seq, index)` of a locator; `None` for anything else.
fn decode_locator(bytes: &[u8]) -> Option<([u8; 16], u64, u32)> {
    if bytes.len() != LOCATOR_LEN || bytes.first() != Some(&LOCATOR_TAG) {
        return None;
    }
    let digest: [u8; 16] = bytes.get(1..17)?.try_into().ok()?;
    let batch = u64::from_be_bytes(bytes.get(17..25)?.try_into().ok()?);
    let index = u32::from_be_bytes(bytes.get(25..29)?.try_into().ok()?);
    Some((digest, batch, index))
}

fn decode_answer(blob: &[u8], index: u32) -> Option<String> {
    let (format, packed) = blob.split_first()?;
    if *format != ANSWERS_FORMAT_V1 {
        return None;
    }
    let size = u32::from_le_bytes(packed.get(..4)?.try_into().ok()?) as usize;
    if size > MAX_ANSWERS_BYTES {
        return None;
    }
    let plain = lz4_flex::block::decompress_size_prepended(packed).ok()?;
    // Limited: a damaged length must not make bincode allocate what it claims (it aborted).
    let (mut answers, _): (Vec<String>, _) = bincode::serde::decode_from_slice(
        &plain,
        bincode::config::standard().with_limit::<MAX_ANSWERS_BYTES>(),
    )
    .ok()?;
    let index = usize::try_from(index).ok()?;
    (index < answers.len()).then(|| answers.swap_remove(index))
}

/// A whole record of the oldest `ids` entries: the digest and the answer's JSON.
#[derive(serde::Deserialize)]
struct OldIdRecord {
    digest: [u8; 16],
    answer: String,
}

/// The request digest and the original answer (JSON without `req`) of `key` (`e/…`, `r/…`,
/// `x/…`) in the `ids` tree of a data dir written by the first release; `None` when it is not
/// there.
pub fn first_release_answer(store: &dyn LogStore, key: &str) -> Option<([u8; 16], String)> {
    let bytes = store.get_id(key.as_bytes()).ok()??;
    match decode_locator(&bytes) {
        Some((digest, batch, index)) => {
            let blob = store.get_id(&answers_key(batch)).ok()??;
            decode_answer(&blob, index).map(|a| (digest, a))
        }
        None => decode_old_record(&bytes),
    }
}

/// A whole record of the oldest `ids` entries, `None` when damaged.
fn decode_old_record(bytes: &[u8]) -> Option<([u8; 16], String)> {
    // Limited: a damaged length must not make bincode allocate what it claims (it aborted).
    bincode::serde::decode_from_slice::<OldIdRecord, _>(
        bytes,
        bincode::config::standard().with_limit::<MAX_ANSWERS_BYTES>(),
    )
    .ok()
    .map(|(r, _)| (r.digest, r.answer))
}

/// The idempotency key of a write (`None` for `extend`, which has none).
pub fn id_key(cmd: &WriteCmd) -> Option<String> {
    match cmd {
        WriteCmd::Record(r) => Some(format!("e/{}", r.event_id)),
        WriteCmd::Commit(c) => Some(format!("e/{}", c.event_id)),
        WriteCmd::Reserve(r) => Some(format!("r/{}", r.reservation_id)),
        WriteCmd::Release(r) => Some(format!("x/{}", r.reservation_id)),
        WriteCmd::Extend(_) | WriteCmd::Observe(_) => None,
    }
}

/// A write whose id the first release's `ids` tree knows: the first release remembered ids for
/// ever, so a resend of one of its requests stays a duplicate (the same digest) or a conflict.
pub(super) fn first_release_id(
    store: &dyn LogStore,
    cmd: &WriteCmd,
    digest: &[u8; 16],
) -> Option<Answer> {
    let key = id_key(cmd)?;
    let (had, answer) = first_release_answer(store, &key)?;
    if had != *digest {
        let field = if key.starts_with("e/") {
            "event_id"
        } else {
            "reservation_id"
        };
        return Some(Answer::Error(WireError {
            code: ErrorCode::Conflict,
            message: format!("{field} was already used for a different request"),
            field: Some(field.into()),
        }));
    }
    let seq = serde_json::from_str::<Value>(&answer)
        .ok()
        .and_then(|v| v.get("seq").and_then(Value::as_u64))?;
    Some(Answer::Duplicate { seq })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn old_blob(answers: &[&str]) -> Vec<u8> {
        let plain = bincode::serde::encode_to_vec(answers, bincode::config::standard()).unwrap();
        let mut out = vec![ANSWERS_FORMAT_V1];
        out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
        out
    }

    #[test]
    fn a_damaged_blob_or_locator_of_the_first_release_is_a_miss_not_a_panic() {
        assert_eq!(decode_answer(&[], 0), None);
        assert_eq!(
            decode_answer(&[ANSWERS_FORMAT_V1, 0xff, 0xff, 0xff, 0x7f], 0),
            None
        );
        assert_eq!(decode_answer(&[9, 1, 2, 3], 0), None);
        let blob = old_blob(&["a", "b"]);
        assert_eq!(decode_answer(&blob, 1).as_deref(), Some("b"));
        assert_eq!(decode_answer(&blob, 2), None);
        let mut cut = blob.clone();
        cut.truncate(blob.len() - 1);
        assert_eq!(decode_answer(&cut, 0), None);
        assert_eq!(decode_locator(&[LOCATOR_TAG; 5]), None);
    }

    /// A damaged length inside a blob or an old record claims a terabyte: a miss, not an
    /// abort of the daemon (bincode allocated what the length claimed).
    #[test]
    fn a_damaged_length_in_the_first_release_s_ids_is_a_miss_not_an_abort() {
        // One string claiming 2^40 bytes (bincode's varint: 253, then a little-endian u64).
        let huge = [253, 0, 0, 0, 0, 0, 1, 0, 0];
        let mut plain = vec![1];
        plain.extend_from_slice(&huge);
        let mut blob = vec![ANSWERS_FORMAT_V1];
        blob.extend_from_slice(&lz4_flex::block::compress_prepend_size(&plain));
        assert_eq!(decode_answer(&blob, 0), None);
        let mut record = vec![7u8; 16];
        record.extend_from_slice(&huge);
        assert_eq!(decode_old_record(&record), None);
        let mut good = vec![7u8; 16];
        good.extend_from_slice(&[2, b'o', b'k']);
        assert_eq!(decode_old_record(&good), Some(([7; 16], "ok".to_string())));
    }
}
