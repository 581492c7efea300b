//! Decoding events without their receipts, for the fold.
//!
//! A receipt ([`Receipt`]) is what the daemon answered; the fold never reads one (a duplicate's
//! answer is rendered from the event read back by seq). Recovery decodes every event of a log.
//! On a thread inside [`without_receipts`], bincode decoding does not read a receipt at all
//! (`receipt: None`): a receipt is the last field of its event, so its bytes are the last ones
//! of the event as stored, and the record's decoder takes the bytes left after an event whose
//! receipt was left unread as that receipt's (`left_unread`), checking only that they start
//! as one does (`could_be_receipt`). Reading past a receipt's fields one by one (its lines are
//! nine fields each, and bincode's encoding has no length to skip them by) was ~10 % of the
//! reading thread of a 10 M-event start-up (benches/README.md, "Start-up: receipts left
//! unread"). The chain's hash still covers those bytes, and everywhere else (export, tail,
//! verify, duplicates) receipts are decoded as they are, so a receipt that does not decode is
//! found by `bursar verify`, not by a start.

use super::Receipt;
use serde::de::{Deserialize, Deserializer};
use std::cell::Cell;

thread_local! {
    static SKIP: Cell<bool> = const { Cell::new(false) };
    /// Receipts this thread has left unread, ever (compared before and after one event).
    static LEFT: Cell<u64> = const { Cell::new(0) };
}

/// Run `f` with receipts left out of every event this thread decodes from bincode.
pub fn without_receipts<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SKIP.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SKIP.with(|s| s.replace(true)));
    f()
}

/// `deserialize_with` of the `receipt` fields (each the last field of its event).
pub(super) fn maybe_skipped<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Receipt>, D::Error> {
    if !d.is_human_readable() && SKIP.with(Cell::get) {
        LEFT.with(|n| n.set(n.get().wrapping_add(1)));
        Ok(None)
    } else {
        Option::<Receipt>::deserialize(d)
    }
}

/// Whether `rest`, the bytes of an event after the fields before its receipt, can be its
/// `Option<Receipt>` as bincode writes it: `None` is the one byte 0, `Some` a 1 and the
/// receipt's fields (which are not read here).
pub(super) fn could_be_receipt(rest: &[u8]) -> bool {
    matches!(rest, [0] | [1, _, ..])
}

/// How many receipts this thread has left unread: a decode that sees it change knows that the
/// event's remaining bytes are a receipt's.
pub(super) fn left_unread() -> u64 {
    LEFT.with(Cell::get)
}
