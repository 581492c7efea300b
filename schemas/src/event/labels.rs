//! The labels an event carries, shared between the copies of one label set.
//!
//! A fold of a long log decodes the same few label sets over and over (an agent's session makes
//! many calls): each decode built a `BTreeMap` of owned strings and the fold copied it into a
//! hold and dropped it again, ~25 % of the decoding thread and ~7 % of the folding one in a
//! replay of 2 M events (benches/README.md, "Replay: label sets shared"). [`EventLabels`] is
//! the same map behind an `Arc`: encoded exactly as the map (the log's format is unchanged),
//! cloned by a count, and, while a thread decodes with [`SharingLabels`] in force, decoded
//! into the copy it already made of the same set when it has one.

use crate::Labels;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hasher as _;
use std::ops::Deref;
use std::sync::Arc;

/// The derived label that a `[[subscription]]` carried the call (SPEC §10); clients cannot
/// set it.
pub const SUBSCRIPTION_LABEL: &str = "subscription";

/// An event's labels: a [`Labels`] map, shared by its copies. Compares, prints and encodes as
/// the map.
#[derive(Clone, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct EventLabels(Arc<Labels>, Subscription);

/// Whether the map holds [`SUBSCRIPTION_LABEL`], found once when the map is made: the fold
/// prices every usage event by it, and by then the map's nodes and keys are rarely in cache
/// (looking it up was 8 % of a 10 M-event start-up's samples: benches/README.md "Replay: the
/// links hashed side by side"). A function of the map, so comparing it changes nothing.
#[derive(Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
struct Subscription(bool);

impl Subscription {
    fn of(map: &Labels) -> Subscription {
        Subscription(map.contains_key(SUBSCRIPTION_LABEL))
    }
}

impl EventLabels {
    /// Change the map (copied first when another copy shares it).
    pub fn update<R>(&mut self, change: impl FnOnce(&mut Labels) -> R) -> R {
        let map = Arc::make_mut(&mut self.0);
        let r = change(map);
        self.1 = Subscription::of(map);
        r
    }

    /// The map itself (copied when another copy shares it).
    pub fn into_labels(self) -> Labels {
        Arc::try_unwrap(self.0).unwrap_or_else(|shared| (*shared).clone())
    }

    /// Whether a `[[subscription]]` carried the call: the map holds [`SUBSCRIPTION_LABEL`].
    pub fn carries_subscription(&self) -> bool {
        self.1 .0
    }

    /// Where the shared map lives: the same for every copy of one set, and no other set's
    /// while a copy lives.
    pub fn addr(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// True when `other` is a copy of this very set (not merely an equal one).
    pub fn same_set(&self, other: &EventLabels) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether another copy shares this set (decoded while `SharingLabels` was in force, say).
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

impl Deref for EventLabels {
    type Target = Labels;
    fn deref(&self) -> &Labels {
        &self.0
    }
}

impl AsRef<Labels> for EventLabels {
    fn as_ref(&self) -> &Labels {
        &self.0
    }
}

impl From<Labels> for EventLabels {
    fn from(labels: Labels) -> EventLabels {
        let subscription = Subscription::of(&labels);
        EventLabels(Arc::new(labels), subscription)
    }
}

impl<const N: usize> From<[(String, String); N]> for EventLabels {
    fn from(entries: [(String, String); N]) -> EventLabels {
        EventLabels::from(Labels::from(entries))
    }
}

impl FromIterator<(String, String)> for EventLabels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> EventLabels {
        EventLabels::from(iter.into_iter().collect::<Labels>())
    }
}

impl<'a> IntoIterator for &'a EventLabels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl PartialEq<Labels> for EventLabels {
    fn eq(&self, other: &Labels) -> bool {
        *self.0 == *other
    }
}

impl std::fmt::Debug for EventLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for EventLabels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl JsonSchema for EventLabels {
    fn inline_schema() -> bool {
        Labels::inline_schema()
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        Labels::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        Labels::schema_id()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Labels::json_schema(g)
    }
}

/// Label sets a sharing thread remembers at most; past it, it starts again from none. A set is
/// a few hundred bytes with its table entry (~170): at most ~40 MB, and only while
/// [`SharingLabels`] is in force.
const SHARED_SETS: usize = 65_536;

/// What a sharing thread remembers: each set it decoded, by the hash of its entries packed.
#[derive(Default)]
struct Shared {
    /// Hash of the packed entries → the packed entries and the set.
    sets: HashMap<u64, Remembered, rustc_hash::FxBuildHasher>,
    /// The entries being decoded, packed (`name 0xFF value 0xFF …`; 0xFF is in no UTF-8 text,
    /// so two different lists of entries never pack into the same bytes).
    packed: Packing,
    /// Packed bytes of the sets remembered.
    bytes: usize,
    /// Lookups that found / did not find their set since the sets were last forgotten.
    hits: u64,
    misses: u64,
    /// Set when a full round of remembering found fewer sets than it missed: a log whose sets
    /// do not recur (a label per request) decodes them plainly from then on (sharing decoded a
    /// unique set ~4× slower than the plain map: a stranger's review, 2026-12-05).
    off: bool,
    /// The sets of the record being decoded, while their lookups are put off
    /// ([`PutOffLookups`]).
    put_off: PutOff,
}

/// Label sets decoded but not looked up yet ([`PutOffLookups`]): each one's hash and where its
/// packed entries lie in `bytes`, in the order they were decoded.
#[derive(Default)]
struct PutOff {
    /// Whether lookups are put off now (a [`PutOffLookups`] lives).
    on: bool,
    sets: Vec<(u64, std::ops::Range<usize>)>,
    bytes: Vec<u8>,
    /// What each of them decodes to until it is looked up: one empty map, not one each.
    stand_in: Option<EventLabels>,
}

/// A remembered set: its packed entries and the set. The entries of a set up to
/// [`INLINE_SET_BYTES`] are kept in the table's entry itself, so the load that finds the entry
/// brings the bytes it is compared with: kept apart (`Box<[u8]>`), the comparison was a cache
/// miss of its own, `memcmp` ~11 % of the reading thread in a 10 M-event start-up
/// (benches/README.md, "Start-up: remembered label sets kept inline").
struct Remembered {
    bytes: RememberedBytes,
    labels: EventLabels,
}

/// A remembered set's packed entries: in the entry up to [`INLINE_SET_BYTES`], apart past it.
enum RememberedBytes {
    /// The first `.0` bytes of `.1`.
    Inline(u8, [u8; INLINE_SET_BYTES]),
    Long(Box<[u8]>),
}

/// Packed bytes of a set kept in its [`Remembered`] entry: a set of the org / team / user /
/// session labels and the derived `model`, `provider` and `tier` packs into ~90 bytes.
const INLINE_SET_BYTES: usize = 128;

impl Remembered {
    fn new(packed: &[u8], labels: EventLabels) -> Remembered {
        let mut inline = [0u8; INLINE_SET_BYTES];
        let bytes = match (inline.get_mut(..packed.len()), u8::try_from(packed.len())) {
            (Some(at), Ok(len)) => {
                at.copy_from_slice(packed);
                RememberedBytes::Inline(len, inline)
            }
            _ => RememberedBytes::Long(packed.into()),
        };
        Remembered { bytes, labels }
    }

    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            RememberedBytes::Inline(len, inline) => {
                inline.get(..usize::from(*len)).unwrap_or_default()
            }
            RememberedBytes::Long(long) => long,
        }
    }
}

/// Packed bytes of the sets a thread remembers at most (with their maps, a few times this in
/// memory, besides the table's ~170 bytes an entry: ~22 MB when it holds `SHARED_SETS`), and
/// the largest set it remembers: the count alone let 65,536 of the largest sets a
/// client may send keep 1.4 GiB alive (a stranger's review, 2026-12-05).
const SHARED_BYTES: usize = 4 << 20;
const SHARED_SET_BYTES: usize = 4 << 10;

thread_local! {
    /// `None` when this thread is not sharing.
    static SHARED: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// While it lives, labels decoded on this thread are shared with an equal set decoded before
/// (a fold of many events: start-up, replay). Dropping it forgets the sets.
pub struct SharingLabels {
    was: bool,
    /// Not `Send`: dropped on another thread it would end that thread's sharing, not this one's.
    _here: std::marker::PhantomData<*const ()>,
}

impl SharingLabels {
    /// Share the labels this thread decodes from now on, until the value is dropped.
    pub fn start() -> SharingLabels {
        let was = SHARED.with(|s| {
            let mut s = s.borrow_mut();
            let was = s.is_some();
            if !was {
                *s = Some(Shared::default());
            }
            was
        });
        SharingLabels {
            was,
            _here: std::marker::PhantomData,
        }
    }
}

impl Drop for SharingLabels {
    fn drop(&mut self) {
        if !self.was {
            SHARED.with(|s| *s.borrow_mut() = None);
        }
    }
}

/// Bytes being packed: `bytes[..len]`, with `bytes` kept initialised past `len`, so that a
/// short string is written by a few fixed-size moves ([`copy_short`]) instead of a `memcpy`
/// call each (`Vec::extend_from_slice`: `memmove` under the label decoding was 4.3 % of a 10
/// M-event start-up's samples, ~14 strings an event).
#[derive(Default)]
struct Packing {
    bytes: Vec<u8>,
    len: usize,
}

impl Packing {
    fn clear(&mut self) {
        self.len = 0;
    }

    /// Append `v`, then `end`.
    fn push(&mut self, v: &[u8], end: u8) {
        let stop = self.len + v.len();
        if stop >= self.bytes.len() {
            self.bytes
                .resize((stop + 1).max(2 * self.bytes.len()).max(256), 0);
        }
        debug_assert!(
            stop < self.bytes.len(),
            "packing sized before it is written"
        );
        if let Some(at) = self.bytes.get_mut(self.len..stop) {
            copy_short(at, v);
        }
        if let Some(b) = self.bytes.get_mut(stop) {
            *b = end;
        }
        self.len = stop + 1;
    }

    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.get_mut(..self.len).unwrap_or_default()
    }

    /// Room kept for the next set.
    fn capacity(&self) -> usize {
        self.bytes.len()
    }
}

/// `dst.copy_from_slice(src)` (of the same length) for the short strings labels are:
/// fixed-size moves, the last one overlapping the one before, instead of a `memcpy` call.
/// Nothing is written when the lengths differ.
pub fn copy_short(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    if dst.len() != n {
        return;
    }
    match n {
        0 => {}
        1 => dst[0] = src[0],
        2..=3 => {
            dst[..2].copy_from_slice(&src[..2]);
            dst[n - 2..].copy_from_slice(&src[n - 2..]);
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// A string of the input, appended to a packed set: borrowed from the input where the format
/// allows, so a set already known costs no allocation. From bincode, read as bytes, unchecked:
/// a set equal to one remembered is valid text as that one was, and a new one is checked when
/// it is unpacked (checking each string as it was read was ~3 % of a 10 M-event start-up).
struct PackedText<'a>(&'a mut Packing);

impl<'de> serde::de::DeserializeSeed<'de> for PackedText<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        struct V<'a>(&'a mut Packing);
        impl<'de> serde::de::Visitor<'de> for V<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
                self.visit_bytes(v.as_bytes())
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<(), E> {
                self.0.push(v, 0xFF);
                Ok(())
            }
        }
        // Text formats check more than UTF-8 when they read a string (JSON: no control
        // characters), so they read one; bincode's string is its bytes.
        if d.is_human_readable() {
            d.deserialize_str(V(self.0))
        } else {
            d.deserialize_bytes(V(self.0))
        }
    }
}

/// Bytes before the packed entries: their count (a `u32`), so that text that is not UTF-8
/// (which may hold 0xFF) never packs into the bytes of a valid set of another count.
const PACKED_COUNT: usize = 4;

/// The map of the packed entries `packed` (after their count; a later duplicate name wins, as
/// inserting them one by one gives): built in bulk (`BTreeMap::from_iter`: one sort check and
/// no search per entry; building it entry by entry was ~12 % of decoding a log,
/// benches/README.md "Where replay's time goes"). `None` when a text is not UTF-8.
fn unpack(packed: &[u8]) -> Option<EventLabels> {
    let count = u32::from_le_bytes(packed.get(..PACKED_COUNT)?.try_into().ok()?);
    let texts = packed.get(PACKED_COUNT..)?;
    // Two texts an entry, each ended by 0xFF: one more 0xFF is inside a text (not UTF-8).
    if texts.iter().filter(|b| **b == 0xFF).count() != 2 * count as usize {
        return None;
    }
    let mut texts = texts
        .split(|b| *b == 0xFF)
        .map(|t| std::str::from_utf8(t).map(str::to_owned));
    let mut entries = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let (Some(Ok(k)), Some(Ok(v))) = (texts.next(), texts.next()) else {
            return None;
        };
        entries.push((k, v));
    }
    Some(entries.into_iter().collect())
}

impl Shared {
    /// The set whose entries pack into `packed` (hashed to `hash`): the remembered copy when
    /// there is one, else a new one, remembered. `None` when a text is not UTF-8.
    fn share(&mut self, packed: &[u8], hash: u64) -> Option<EventLabels> {
        if let Some(known) = self.sets.get(&hash).filter(|r| r.bytes() == packed) {
            self.hits += 1;
            return Some(known.labels.clone());
        }
        self.misses += 1;
        let labels = unpack(packed)?;
        if packed.len() > SHARED_SET_BYTES {
            return Some(labels);
        }
        if self.sets.len() >= SHARED_SETS || self.bytes + packed.len() > SHARED_BYTES {
            self.off = self.hits < self.misses;
            self.sets = HashMap::default();
            (self.bytes, self.hits, self.misses) = (0, 0, 0);
        }
        if !self.off {
            self.bytes += packed.len();
            let old = self
                .sets
                .insert(hash, Remembered::new(packed, labels.clone()));
            if let Some(old) = old {
                self.bytes -= old.bytes().len();
            }
        }
        Some(labels)
    }
}

/// While it lives (and this thread shares label sets: [`SharingLabels`]), each label set this
/// thread decodes is packed and hashed but not looked up: it decodes to a stand-in (an empty
/// map), and [`PutOffLookups::resolve`] looks the sets up afterwards, together, and puts each
/// in its place. A record's decoder puts its events' lookups off: the remembered sets of the
/// record's events are first only read, one after another, so that their cache misses overlap
/// instead of each waiting for the one before (on the bench's 10,000 scopes, the misses on a
/// set's table entry and then on its shared map were ~13 % of a 10 M-event start-up's reading
/// thread: benches/README.md, "Start-up: a record's label sets looked up together").
pub(crate) struct PutOffLookups {
    on: bool,
    /// What an enclosing one had put off (none today: kept rather than mixed with this one's).
    outer: Option<PutOff>,
    _here: std::marker::PhantomData<*const ()>,
}

/// Why [`PutOffLookups::resolve`] failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PutOffError {
    /// The `.0`-th set put off holds a text that is not UTF-8 (in the record's bytes).
    NotText(usize),
    /// The sets put off and their places are not as many: a labels field
    /// `EventBody::labels_mut` does not know of (a bug, not the bytes).
    Places,
    /// The thread's remembered sets were let go, or are in use, while lookups were put off
    /// (a bug, not the bytes).
    Lost,
}

/// A record's scratch kept for the next one up to these sizes, let go past them (a record may
/// be up to `MAX_RECORD_BYTES`): ~700 sets of the bench's ~90 bytes.
const PUT_OFF_KEPT_BYTES: usize = 64 << 10;
const PUT_OFF_KEPT_SETS: usize = 4096;

impl PutOff {
    /// Forget the sets put off; their scratch is kept for the next record unless it is large.
    fn clear(&mut self) {
        self.sets.clear();
        self.bytes.clear();
        if self.bytes.capacity() > PUT_OFF_KEPT_BYTES {
            self.bytes = Vec::new();
        }
        if self.sets.capacity() > PUT_OFF_KEPT_SETS {
            self.sets = Vec::new();
        }
    }
}

impl PutOffLookups {
    /// Put this thread's lookups off, if it shares sets (and has not turned sharing off).
    pub(crate) fn start() -> PutOffLookups {
        let mut outer = None;
        let on = SHARED.with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else {
                return false;
            };
            let Some(shared) = s.as_mut().filter(|x| !x.off) else {
                return false;
            };
            if shared.put_off.on {
                outer = Some(std::mem::take(&mut shared.put_off));
            }
            shared.put_off.on = true;
            true
        });
        PutOffLookups {
            on,
            outer,
            _here: std::marker::PhantomData,
        }
    }

    /// Look up the sets decoded since [`PutOffLookups::start`], and put each in the place of
    /// its stand-in: `places` are the label sets decoded, in the order they were. Ends the
    /// putting off, whether it succeeds or not.
    pub(crate) fn resolve<'a>(
        self,
        places: impl Iterator<Item = &'a mut EventLabels>,
    ) -> Result<(), PutOffError> {
        if !self.on {
            return Ok(());
        }
        let result = SHARED.with(|s| {
            let Some(shared) = s
                .try_borrow_mut()
                .ok()
                .and_then(|s| std::cell::RefMut::filter_map(s, Option::as_mut).ok())
            else {
                // Only a bug could make it so: the sets live as long as this does.
                debug_assert!(false, "lookups put off without the sets to look them up in");
                return Err(PutOffError::Lost);
            };
            let mut shared = shared;
            let mut put_off = std::mem::take(&mut shared.put_off);
            // Read only, each independent of the one before: the misses overlap.
            for (hash, _) in &put_off.sets {
                if let Some(r) = shared.sets.get(hash) {
                    std::hint::black_box((r.bytes().last(), r.labels.is_shared()));
                }
            }
            let mut places = places;
            let mut result = Ok(());
            for (i, (hash, at)) in put_off.sets.iter().enumerate() {
                let Some(place) = places.next() else {
                    result = Err(PutOffError::Places);
                    break;
                };
                let packed = put_off.bytes.get(at.clone()).unwrap_or_default();
                match shared.share(packed, *hash) {
                    Some(labels) => *place = labels,
                    None => {
                        result = Err(PutOffError::NotText(i));
                        break;
                    }
                }
            }
            if result.is_ok() && places.next().is_some() {
                result = Err(PutOffError::Places);
            }
            put_off.clear();
            shared.put_off = put_off;
            result
        });
        debug_assert_ne!(
            result,
            Err(PutOffError::Places),
            "a label set decoded where no place is known"
        );
        result
    }
}

impl Drop for PutOffLookups {
    fn drop(&mut self) {
        if self.on {
            SHARED.with(|s| {
                if let Some(shared) = s.try_borrow_mut().ok().as_mut().and_then(|s| s.as_mut()) {
                    shared.put_off.clear();
                    shared.put_off.on = false;
                    if let Some(outer) = self.outer.take() {
                        shared.put_off = outer;
                    }
                }
            });
        }
    }
}

impl<'de> Deserialize<'de> for EventLabels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EventLabels, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EventLabels;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of label names to values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<EventLabels, A::Error> {
                // The packing buffer, taken out so that no borrow of the thread's state is held
                // while the input is read (a label map decoded inside another then works).
                let buffer = SHARED.with(|s| {
                    s.try_borrow_mut().ok().and_then(|mut s| {
                        s.as_mut()
                            .filter(|x| !x.off)
                            .map(|x| std::mem::take(&mut x.packed))
                    })
                });
                let Some(mut packed) = buffer else {
                    let mut entries = Vec::with_capacity(m.size_hint().unwrap_or(0).min(64));
                    while let Some((k, v)) =
                        m.next_entry::<super::text::OwnedText, super::text::OwnedText>()?
                    {
                        entries.push((k.0, v.0));
                    }
                    return Ok(entries.into_iter().collect());
                };
                packed.clear();
                packed.push(&[0; PACKED_COUNT - 1], 0);
                let mut count = 0u32;
                while m.next_key_seed(PackedText(&mut packed))?.is_some() {
                    m.next_value_seed(PackedText(&mut packed))?;
                    count = count.wrapping_add(1);
                }
                if let Some(at) = packed.as_mut_slice().get_mut(..PACKED_COUNT) {
                    at.copy_from_slice(&count.to_le_bytes());
                }
                let mut h = rustc_hash::FxHasher::default();
                h.write(packed.as_slice());
                let hash = h.finish();
                let labels = SHARED.with(|s| {
                    let Ok(mut s) = s.try_borrow_mut() else {
                        return unpack(packed.as_slice());
                    };
                    let Some(shared) = s.as_mut() else {
                        return unpack(packed.as_slice());
                    };
                    let labels = if shared.put_off.on {
                        let put_off = &mut shared.put_off;
                        let start = put_off.bytes.len();
                        put_off.bytes.extend_from_slice(packed.as_slice());
                        put_off.sets.push((hash, start..put_off.bytes.len()));
                        Some(
                            put_off
                                .stand_in
                                .get_or_insert_with(Default::default)
                                .clone(),
                        )
                    } else {
                        shared.share(packed.as_slice(), hash)
                    };
                    if packed.capacity() <= 2 * SHARED_SET_BYTES {
                        shared.packed = std::mem::take(&mut packed);
                    }
                    labels
                });
                labels.ok_or_else(|| {
                    serde::de::Error::custom("a label name or value is not valid UTF-8")
                })
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length a label string has up to well past the fixed-size moves, packed one after
    /// another across the buffer's growth: the bytes are the strings, each followed by 0xFF.
    #[test]
    fn strings_packed_in_place_are_their_bytes_whatever_their_length() {
        let mut packing = Packing::default();
        let mut want = Vec::new();
        for round in 0..2 {
            packing.clear();
            want.clear();
            for n in 0..70usize {
                let s: Vec<u8> = (0..n).map(|i| (i * 7 + n + round) as u8 % 0xFE).collect();
                packing.push(&s, 0xFF);
                want.extend_from_slice(&s);
                want.push(0xFF);
                assert_eq!(packing.as_slice(), &want[..], "length {n}, round {round}");
            }
        }
        let mut dst = [0u8; 5];
        copy_short(&mut dst, b"abc");
        assert_eq!(dst, [0; 5], "lengths that differ write nothing");
    }

    fn labels(entries: &[(&str, &str)]) -> Labels {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn bincode_of(l: &Labels) -> Vec<u8> {
        bincode::serde::encode_to_vec(l, bincode::config::standard()).unwrap()
    }

    fn decode(bytes: &[u8]) -> EventLabels {
        bincode::serde::borrow_decode_from_slice(bytes, bincode::config::standard())
            .unwrap()
            .0
    }

    #[test]
    fn event_labels_encode_exactly_as_the_map_they_hold() {
        let l = labels(&[("model", "gpt-4o"), ("team", "search"), ("user", "ada")]);
        let shared = EventLabels::from(l.clone());
        let cfg = bincode::config::standard();
        assert_eq!(
            bincode::serde::encode_to_vec(&shared, cfg).unwrap(),
            bincode_of(&l)
        );
        assert_eq!(
            serde_json::to_string(&shared).unwrap(),
            serde_json::to_string(&l).unwrap()
        );
        assert_eq!(decode(&bincode_of(&l)), l);
        let from_json: EventLabels =
            serde_json::from_str(r#"{"team":"a\"b","user":"ada"}"#).unwrap();
        assert_eq!(from_json, labels(&[("team", "a\"b"), ("user", "ada")]));
        assert_eq!(format!("{shared:?}"), format!("{l:?}"));
    }

    #[test]
    fn while_sharing_an_equal_set_decodes_into_the_same_copy_and_a_different_one_does_not() {
        let a = labels(&[("session", "s1"), ("team", "search")]);
        let b = labels(&[("session", "s2"), ("team", "search")]);
        let before = (decode(&bincode_of(&a)), decode(&bincode_of(&a)));
        assert!(
            !Arc::ptr_eq(&before.0 .0, &before.1 .0),
            "not shared unless asked"
        );
        let sharing = SharingLabels::start();
        let (a1, a2, b1) = (
            decode(&bincode_of(&a)),
            decode(&bincode_of(&a)),
            decode(&bincode_of(&b)),
        );
        assert!(Arc::ptr_eq(&a1.0, &a2.0), "one copy of an equal set");
        assert!(!Arc::ptr_eq(&a1.0, &b1.0));
        assert_eq!(
            (a1.clone(), b1.clone()),
            (EventLabels::from(a.clone()), b.clone().into())
        );
        // A set with a prefix of another's entries, an empty one and one with more entries.
        let longer = labels(&[("session", "s1"), ("team", "search"), ("user", "u")]);
        assert_eq!(decode(&bincode_of(&longer)), longer);
        assert_eq!(decode(&bincode_of(&Labels::new())), Labels::new());
        drop(sharing);
        let after = (decode(&bincode_of(&a)), decode(&bincode_of(&a)));
        assert!(
            !Arc::ptr_eq(&after.0 .0, &after.1 .0),
            "forgotten when dropped"
        );
    }

    #[test]
    fn a_remembered_set_gives_back_its_bytes_whatever_their_length() {
        for n in [
            0,
            1,
            INLINE_SET_BYTES - 1,
            INLINE_SET_BYTES,
            INLINE_SET_BYTES + 1,
            300,
        ] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
            let r = Remembered::new(&bytes, EventLabels::default());
            assert_eq!(r.bytes(), &bytes[..], "length {n}");
            assert_eq!(
                matches!(r.bytes, RememberedBytes::Long(_)),
                n > INLINE_SET_BYTES,
                "length {n}"
            );
        }
    }

    /// Remembered sets are kept in their table entry up to `INLINE_SET_BYTES` packed, and
    /// apart past it: sets on either side of the bound, and sets that differ only in their last
    /// byte, each share their own copy and never another's.
    #[test]
    fn sets_kept_inline_or_apart_share_only_their_own_copy() {
        // One entry ("k", v) packs into 4 + 2 + v's length + 1 bytes.
        let lengths = [
            1,
            INLINE_SET_BYTES - 8,
            INLINE_SET_BYTES - 7,
            INLINE_SET_BYTES - 6,
            300,
        ];
        let sets: Vec<Labels> = lengths
            .iter()
            .flat_map(|&n| {
                ['a', 'b'].map(|last| labels(&[("k", &format!("{}{last}", "v".repeat(n - 1)))]))
            })
            .collect();
        let _sharing = SharingLabels::start();
        let first: Vec<EventLabels> = sets.iter().map(|s| decode(&bincode_of(s))).collect();
        for (i, s) in sets.iter().enumerate() {
            let again = decode(&bincode_of(s));
            assert_eq!(again, *s, "set {i} decodes as itself");
            for (j, f) in first.iter().enumerate() {
                assert_eq!(
                    Arc::ptr_eq(&again.0, &f.0),
                    i == j,
                    "set {i} shares the copy of set {j} only if it is that set"
                );
            }
        }
    }

    #[test]
    fn a_set_whose_entries_are_out_of_order_or_repeated_decodes_as_the_map_would() {
        // Not what bursar writes, but what a hand-made input may hold: the map is what
        // inserting the entries one by one gives, shared or not.
        let _sharing = SharingLabels::start();
        for json in [
            r#"{"user":"b","team":"a"}"#,
            r#"{"team":"a","team":"b"}"#,
            r#"{"team":"a","team":"b"}"#,
            r#"{"team":"équipe ✓","user":"\u00ff"}"#,
            r#"{"team":"équipe ✓","user":"\u00ff"}"#,
        ] {
            let shared: EventLabels = serde_json::from_str(json).unwrap();
            let plain: Labels = serde_json::from_str(json).unwrap();
            assert_eq!(shared, plain, "{json}");
        }
    }

    #[test]
    fn sets_that_do_not_recur_turn_sharing_off_once_their_bytes_fill_it() {
        let sharing = SharingLabels::start();
        let big = |i: usize| labels(&[("id", &format!("{i:04}{}", "x".repeat(4_000)))]);
        // Each ~4 KB: a little over 1,000 fill the 4 MiB, with no set decoded twice.
        for i in 0..1_100 {
            assert_eq!(decode(&bincode_of(&big(i))), big(i));
        }
        let small = labels(&[("team", "search")]);
        let (a, b) = (decode(&bincode_of(&small)), decode(&bincode_of(&small)));
        assert_eq!(
            (&a, &b),
            (&EventLabels::from(small.clone()), &small.clone().into())
        );
        assert!(!Arc::ptr_eq(&a.0, &b.0), "decoded plainly from then on");
        drop(sharing);
        // A new guard shares again.
        let _again = SharingLabels::start();
        let (a, b) = (decode(&bincode_of(&small)), decode(&bincode_of(&small)));
        assert!(Arc::ptr_eq(&a.0, &b.0));
    }

    /// Decodes `sets` with their lookups put off, then resolves them: the sets, in order.
    fn decode_put_off(sets: &[Labels]) -> Result<Vec<EventLabels>, PutOffError> {
        let put_off = PutOffLookups::start();
        let mut decoded: Vec<EventLabels> = sets.iter().map(|l| decode(&bincode_of(l))).collect();
        put_off.resolve(decoded.iter_mut())?;
        Ok(decoded)
    }

    #[test]
    fn lookups_put_off_decode_to_a_stand_in_until_resolved_then_to_the_shared_set() {
        let a = labels(&[("session", "s1"), ("team", "search")]);
        let _sharing = SharingLabels::start();
        let known = decode(&bincode_of(&a));
        let put_off = PutOffLookups::start();
        let mut got = [decode(&bincode_of(&a)), decode(&bincode_of(&a))];
        assert_eq!(
            got,
            [Labels::new(), Labels::new()],
            "stand-ins until resolved"
        );
        assert!(got[0].same_set(&got[1]), "one stand-in, not one each");
        put_off.resolve(got.iter_mut()).unwrap();
        assert_eq!(got[0], a);
        assert!(
            got.iter().all(|g| g.same_set(&known)),
            "the remembered copy"
        );
        assert!(
            decode(&bincode_of(&a)).same_set(&known),
            "looked up at once again"
        );
        // Without sharing nothing is put off.
        drop(_sharing);
        let put_off = PutOffLookups::start();
        assert_eq!(decode(&bincode_of(&a)), a);
        assert_eq!(put_off.resolve(std::iter::empty()), Ok(()));
    }

    #[test]
    fn lookups_put_off_inside_others_keep_each_ones_sets_apart() {
        let (a, b) = (labels(&[("team", "a")]), labels(&[("team", "b")]));
        let _sharing = SharingLabels::start();
        let outer = PutOffLookups::start();
        let mut outer_got = [decode(&bincode_of(&a))];
        let inner = PutOffLookups::start();
        let mut inner_got = [decode(&bincode_of(&b)), decode(&bincode_of(&b))];
        assert_eq!(inner.resolve(inner_got.iter_mut()), Ok(()));
        assert_eq!(inner_got, [b.clone(), b]);
        assert_eq!(outer_got, [Labels::new()], "still put off");
        assert_eq!(outer.resolve(outer_got.iter_mut()), Ok(()));
        assert_eq!(outer_got[0], a);
        assert!(
            decode(&bincode_of(&a)).same_set(&outer_got[0]),
            "none put off now"
        );
    }

    #[test]
    fn sets_put_off_across_the_table_filling_up_each_come_back_as_decoded() {
        let _sharing = SharingLabels::start();
        let big = |i: usize| labels(&[("id", &format!("{i:04}{}", "x".repeat(4_000)))]);
        let small = labels(&[("team", "search")]);
        // ~4 KB each: the table fills up and is emptied partway through one record's sets,
        // and sharing turns off (none recurred); a small set before, amid and after them.
        let mut sets = vec![small.clone()];
        sets.extend((0..1_100).map(big));
        sets.push(small.clone());
        sets.extend((0..5).map(big));
        sets.push(small.clone());
        let put_off = PutOffLookups::start();
        let mut got: Vec<EventLabels> = sets.iter().map(|l| decode(&bincode_of(l))).collect();
        assert!(got.iter().all(|g| g.is_empty()), "all put off");
        put_off.resolve(got.iter_mut()).unwrap();
        assert_eq!(got.len(), sets.len());
        for (g, want) in got.iter().zip(&sets) {
            assert_eq!(g, want);
        }
        // Once off, nothing is put off any more: decoded plainly, each its own copy.
        let put_off = PutOffLookups::start();
        let (a, b) = (decode(&bincode_of(&small)), decode(&bincode_of(&small)));
        assert_eq!((&a, &b), (&EventLabels::from(small.clone()), &small.into()));
        assert!(!a.same_set(&b));
        drop(put_off);
    }

    #[test]
    fn a_set_put_off_that_is_not_text_fails_by_its_place_and_leaves_nothing_behind() {
        let _sharing = SharingLabels::start();
        let good = labels(&[("team", "search")]);
        let mut bad = bincode_of(&labels(&[("team", "sea?ch")]));
        let at = bad.iter().position(|b| *b == b'?').unwrap();
        bad[at] = 0xFF;
        let put_off = PutOffLookups::start();
        let mut got = [
            decode(&bincode_of(&good)),
            decode(&bad),
            decode(&bincode_of(&good)),
        ];
        assert_eq!(
            put_off.resolve(got.iter_mut()),
            Err(PutOffError::NotText(1))
        );
        let again = decode_put_off(&[good.clone(), good.clone()]).unwrap();
        assert_eq!(again, [good.clone(), good]);
        // Nor was the bad set remembered as if it were text.
        let put_off = PutOffLookups::start();
        let mut bad_again = [decode(&bad)];
        assert_eq!(
            put_off.resolve(bad_again.iter_mut()),
            Err(PutOffError::NotText(0))
        );
        assert!(bincode::serde::borrow_decode_from_slice::<EventLabels, _>(
            &bad,
            bincode::config::standard()
        )
        .is_err());
    }

    /// The fold prices a usage event by whether its labels carry a subscription: the answer
    /// is the map's whichever way the labels were made, decoded or changed.
    #[test]
    fn whether_labels_carry_a_subscription_follows_their_map() {
        let plain = labels(&[("team", "search")]);
        let with = labels(&[("subscription", "max"), ("team", "search")]);
        assert!(!EventLabels::from(plain.clone()).carries_subscription());
        assert!(EventLabels::from(with.clone()).carries_subscription());
        let _sharing = SharingLabels::start();
        for _ in 0..2 {
            // Made, then found among the sets remembered.
            assert!(!decode(&bincode_of(&plain)).carries_subscription());
            assert!(decode(&bincode_of(&with)).carries_subscription());
        }
        let mut l = decode(&bincode_of(&plain));
        l.update(|m| m.insert("subscription".into(), "max".into()));
        assert!(l.carries_subscription());
        assert!(
            !decode(&bincode_of(&plain)).carries_subscription(),
            "the shared set unchanged"
        );
        l.update(|m| m.remove("subscription"));
        assert!(!l.carries_subscription());
    }

    /// Text that is not UTF-8 and holds 0xFF, the packing's separator, could pack into the
    /// very bytes of a remembered set of more entries: it is refused, not read as that set.
    #[test]
    fn text_that_is_not_utf8_is_refused_even_where_it_packs_like_a_remembered_set() {
        let _sharing = SharingLabels::start();
        let two = labels(&[("a", "b"), ("c", "d")]);
        assert_eq!(decode(&bincode_of(&two)), two);
        let mut one = bincode_of(&labels(&[("a", "b~c~d")]));
        for b in one.iter_mut().filter(|b| **b == b'~') {
            *b = 0xFF;
        }
        let cfg = bincode::config::standard();
        for _ in 0..2 {
            assert!(bincode::serde::borrow_decode_from_slice::<EventLabels, _>(&one, cfg).is_err());
            assert!(bincode::serde::borrow_decode_from_slice::<Labels, _>(&one, cfg).is_err());
        }
    }

    #[test]
    fn a_changed_copy_leaves_the_shared_set_as_it_was() {
        let _sharing = SharingLabels::start();
        let l = labels(&[("team", "search")]);
        let mut one = decode(&bincode_of(&l));
        let other = decode(&bincode_of(&l));
        one.update(|m| m.insert("user".into(), "ada".into()));
        assert_eq!(other, l);
        assert_eq!(decode(&bincode_of(&l)), l);
        assert_eq!(one.into_labels().len(), 2);
    }

    /// Whatever the input — sets that recur, sets sharing a prefix, text with escapes and
    /// non-ASCII, bytes damaged on the way — decoding with sharing on gives what decoding the
    /// plain map gives: the same map, or an error where the map errs.
    mod sharing_on_decodes_as_the_plain_map {
        use super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-d]{0,3}",
                "[a-zA-Z0-9_\\-]{1,12}",
                ".{0,6}",
                Just("\"\\\u{0}".to_string()),
            ]
        }

        fn set() -> impl Strategy<Value = Labels> {
            proptest::collection::btree_map(text(), text(), 0..6)
        }

        /// Sets drawn from a small pool, so that they recur, some encodings damaged.
        fn inputs() -> impl Strategy<Value = Vec<(usize, Option<(usize, u8)>)>> {
            proptest::collection::vec(
                (
                    0..8usize,
                    proptest::option::weighted(0.2, (0..64usize, any::<u8>())),
                ),
                1..40,
            )
        }

        /// `bytes` decoded from bincode, limited as the log's records are: a damaged length
        /// is an error, not an allocation of what it claims.
        fn bincode_as<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
            let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
            bincode::serde::borrow_decode_from_slice::<T, _>(bytes, cfg)
                .map(|(v, _)| v)
                .map_err(|e| e.to_string())
        }

        fn damaged(mut bytes: Vec<u8>, damage: Option<(usize, u8)>) -> Vec<u8> {
            if let Some((at, b)) = damage {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
            }
            bytes
        }

        proptest! {
            #[test]
            fn from_bincode(pool in proptest::collection::vec(set(), 8), seq in inputs()) {
                let inputs: Vec<Vec<u8>> = seq
                    .iter()
                    .map(|(i, d)| damaged(bincode_of(&pool[*i]), *d))
                    .collect();
                let plain: Vec<Result<Labels, String>> =
                    inputs.iter().map(|b| bincode_as(b)).collect();
                let _sharing = SharingLabels::start();
                for (b, want) in inputs.iter().zip(&plain) {
                    let got = bincode_as::<EventLabels>(b).map(EventLabels::into_labels);
                    prop_assert_eq!(got.is_ok(), want.is_ok(), "{:?} / {:?}", got, want);
                    if let (Ok(g), Ok(w)) = (&got, want) {
                        prop_assert_eq!(g, w);
                    }
                }
            }

            /// As a record's decoder does: the sets of a few events decoded with their lookups
            /// put off, then resolved; a record fails when any of its sets does.
            #[test]
            fn from_bincode_put_off(
                pool in proptest::collection::vec(set(), 8),
                seq in inputs(),
                per_record in 1..6usize,
            ) {
                let inputs: Vec<Vec<u8>> = seq
                    .iter()
                    .map(|(i, d)| damaged(bincode_of(&pool[*i]), *d))
                    .collect();
                let _sharing = SharingLabels::start();
                for record in inputs.chunks(per_record) {
                    let plain: Result<Vec<Labels>, String> =
                        record.iter().map(|b| bincode_as(b)).collect();
                    let put_off = PutOffLookups::start();
                    let got: Result<Vec<EventLabels>, String> =
                        record.iter().map(|b| bincode_as(b)).collect();
                    // A record that fails to decode is never resolved: its guard is dropped.
                    let got = match got {
                        Ok(mut got) => put_off
                            .resolve(got.iter_mut())
                            .map(|()| got)
                            .map_err(|e| format!("{e:?}")),
                        Err(e) => Err(e),
                    };
                    prop_assert_eq!(got.is_ok(), plain.is_ok(), "{:?} / {:?}", got, plain);
                    if let (Ok(g), Ok(w)) = (&got, &plain) {
                        prop_assert_eq!(g.len(), w.len());
                        for (g, w) in g.iter().zip(w) {
                            prop_assert_eq!(g, w);
                        }
                    }
                }
            }

            #[test]
            fn from_json(pool in proptest::collection::vec(set(), 8), seq in inputs()) {
                let inputs: Vec<Vec<u8>> = seq
                    .iter()
                    .map(|(i, d)| damaged(serde_json::to_vec(&pool[*i]).unwrap(), *d))
                    .collect();
                let plain: Vec<Result<Labels, String>> = inputs
                    .iter()
                    .map(|b| serde_json::from_slice::<Labels>(b).map_err(|e| e.to_string()))
                    .collect();
                let _sharing = SharingLabels::start();
                for (b, want) in inputs.iter().zip(&plain) {
                    let got = serde_json::from_slice::<EventLabels>(b)
                        .map(|l| l.into_labels())
                        .map_err(|e| e.to_string());
                    prop_assert_eq!(got.is_ok(), want.is_ok(), "{:?} / {:?}", got, want);
                    if let (Ok(g), Ok(w)) = (&got, want) {
                        prop_assert_eq!(g, w);
                    }
                }
            }
        }
    }
}
