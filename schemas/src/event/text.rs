//! The event bodies' strings, decoded from the bytes they lie in.
//!
//! A stored event is decoded without a bincode limit: the limit's bookkeeping on every field
//! read was a quarter of decoding a record (`cargo bench -p bursar-schemas --bench
//! record_decode`: 39.3–39.5 µs for 64 events with it, 29.8–30.7 µs without and with the
//! strings read as here) and 1–2 s of a 10 M-event start-up (benches/README.md, "Start-up: events decoded
//! without a bincode limit"). The limit was what kept a damaged length from allocating:
//! bincode reads a `String` (and a `Vec<u8>`) by allocating the length it is told, before it
//! reads a byte. So no string of an event is read that way: each is borrowed from the event's
//! bytes first ([`owned`], [`owned_opt`], and the label maps and JSON bodies read as borrowed
//! bytes), and a length past the bytes is an error, not an allocation.
//! `tests/damaged_lengths.rs` damages every byte of an event of each kind in turn.
//!
//! What a decode allocates is thus bounded by the bytes it reads, not by a total: serde's own
//! sequences still reserve up to 1 MiB for a count (`size_hint::cautious`), and a record
//! crafted for it could make a decode hold ~24 times its bytes (an empty label, two bytes,
//! becomes a 48-byte pair), where the limit stopped at 256 MiB of claims. Random damage cannot
//! do that (sled checks every record it reads; the chain checks every event), and whoever can
//! write a data dir can fill its disk anyway.

use serde::de::{Deserializer, Error, Visitor};

struct Text;

impl<'de> Visitor<'de> for Text {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_string<E: Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

/// `deserialize_with` of a `String` field of an event body: read as a borrowed string.
pub(crate) fn owned<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(Text)
}

struct MaybeText;

impl<'de> Visitor<'de> for MaybeText {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string or nothing")
    }
    fn visit_none<E: Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_unit<E: Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        owned(d).map(Some)
    }
}

/// `deserialize_with` of an `Option<String>` field of an event body (with `default`, so that a
/// field left out still reads as `None`, as serde's own `Option` does).
pub(crate) fn owned_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_option(MaybeText)
}

/// A label name or value read by [`owned`] (a label map decoded without sharing).
pub(crate) struct OwnedText(pub(crate) String);

impl<'de> serde::Deserialize<'de> for OwnedText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        owned(d).map(OwnedText)
    }
}
