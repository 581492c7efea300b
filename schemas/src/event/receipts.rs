//! Decoding events without their receipts, for the fold.
//!
//! A receipt ([`Receipt`]) is what the daemon answered; the fold never reads one (a duplicate's
//! answer is rendered from the event read back by seq). Recovery and a follower's fold decode
//! every event of a log, and a receipt's lines are one allocation, a few hundred bytes copied
//! and freed again per event. On a thread inside [`without_receipts`], bincode decoding reads
//! each receipt's bytes and keeps nothing (`receipt: None`); everywhere else (export, tail,
//! verify, duplicates) receipts are decoded as they are.

use super::{Receipt, ReceiptLine};
use crate::wire::{Decision, Skipped};
use crate::Micros;
use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    static SKIP: Cell<bool> = const { Cell::new(false) };
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

/// `deserialize_with` of the `receipt` fields.
pub(super) fn maybe_skipped<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Receipt>, D::Error> {
    if !d.is_human_readable() && SKIP.with(Cell::get) {
        Option::<ReceiptRead>::deserialize(d).map(|_| None)
    } else {
        Option::<Receipt>::deserialize(d)
    }
}

/// A [`Receipt`]'s encoding, read and dropped: its fields in [`Receipt`]'s order and types
/// (kept in step by the test `a_receipt_left_out_leaves_the_event_as_it_was`, which decodes a
/// receipt with every field set both ways).
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct ReceiptRead {
    policy_version: u64,
    lines: Dropped<ReceiptLine>,
    cost_micros: Micros,
    priced_at_max: bool,
    overrun_micros: Option<Micros>,
    decision: Option<Decision>,
    skipped: Dropped<Skipped>,
    message: Option<Dropped<u8>>,
}

/// A sequence read element by element and kept nowhere.
struct Dropped<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Dropped<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Dropped<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Dropped<T>, A::Error> {
                while seq.next_element::<T>()?.is_some() {}
                Ok(Dropped(PhantomData))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}
