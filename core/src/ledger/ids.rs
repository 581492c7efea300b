//! The idempotency index: which request ids the log has seen, with the digest of each request
//! and the seq of the event that answered it.
//!
//! It is a projection like any other: `apply` adds the id of every `usage_recorded`
//! (`e/<event_id>`), `reservation_created` and `reservation_denied` (`r/<reservation_id>`) and
//! `reservation_released` (`x/<reservation_id>`), so a fold of the log rebuilds it, snapshots
//! carry it, and nothing but the log is written for it. An id is remembered for the policy's
//! `idempotency_window_seconds` of ledger time after its event; a request resent later counts
//! as new. The original answer of a duplicate is rendered from its event (and the event's
//! receipt), which the caller reads from the log by seq.

use bursar_schemas::TsMicros;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{HashMap, VecDeque};
use std::fmt;

/// Which kind of id: ids of different kinds never collide (an `event_id` may equal a
/// `reservation_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// `usage_recorded`'s `event_id` (record, and commit's usage).
    Event,
    /// `reservation_created` / `reservation_denied`'s `reservation_id` (reserve).
    Reservation,
    /// `reservation_released`'s `reservation_id` (release).
    Release,
}

/// The key an id is remembered under: 128 bits of BLAKE3 over its kind and text. The index
/// holds no strings: a replay of 10 M events spent 2% of its time inserting `String` keys and
/// each key cost ~60 B of heap twice (map and order); a 128-bit hash collides with odds of
/// about n²/2¹²⁹, under 10⁻²⁰ for the 10⁹ ids of a busy year.
pub fn id_key(kind: IdKind, id: &str) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&[match kind {
        IdKind::Event => b'e',
        IdKind::Reservation => b'r',
        IdKind::Release => b'x',
    }]);
    h.update(id.as_bytes());
    let bytes = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&bytes.as_bytes()[..16]);
    u128::from_le_bytes(k)
}

/// What the index knows of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdEntry {
    /// Digest of the request that used it.
    pub digest: [u8; 16],
    /// The event that answered it.
    pub seq: u64,
    /// That event's `ts`.
    pub ts: TsMicros,
}

/// Shards of the id map (a power of two), chosen by the key's top bits. One map of every id
/// doubled in one go: at a few hundred thousand ids, the insert that grew it copied the whole
/// table into fresh (zeroed) pages, and a cluster follower folding 20,000 events/s stalled for
/// 100–450 ms on it (perf: `reserve_rehash` and huge-page zeroing under `IdIndex::insert`,
/// benches/README.md "Follower lag"). A shard grows alone: at 10 M ids a growth copies ~10 K
/// entries (~0.5 MB), and a lookup is still one probe.
const SHARDS: usize = 1024;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// Entries per chunk of the id order: the order grows a chunk at a time instead of doubling
/// (and copying) one ring of every id.
const ORDER_CHUNK: usize = 4096;

type Shard = HashMap<u128, IdEntry, rustc_hash::FxBuildHasher>;

fn shard_of(key: u128) -> usize {
    // The key is a BLAKE3 hash: its top bits are as good as any; the low bits stay for the
    // shard's own hashing.
    (key >> (128 - SHARD_BITS)) as usize
}

/// Ids and their entries, oldest first in `order` for pruning.
///
/// Its serialized form is the one the snapshots have always had, `{ map, order }` as one map
/// and one sequence (snapshots written before the shards open unchanged).
#[derive(Debug, Clone)]
pub struct IdIndex {
    shards: Box<[Shard]>,
    order: Order,
}

impl Default for IdIndex {
    fn default() -> IdIndex {
        IdIndex {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            order: Order::default(),
        }
    }
}

/// Equal when they remember the same ids with the same entries, in the same order (however
/// their chunks fall).
impl PartialEq for IdIndex {
    fn eq(&self, other: &IdIndex) -> bool {
        self.shards == other.shards && self.order.iter().eq(other.order.iter())
    }
}

impl Eq for IdIndex {}

impl IdIndex {
    /// The entry of the id `id` of `kind`.
    pub fn get(&self, kind: IdKind, id: &str) -> Option<&IdEntry> {
        let key = id_key(kind, id);
        self.shards[shard_of(key)].get(&key)
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(Shard::is_empty)
    }

    /// Remember the id `id` of `kind` (a later event with the same id, which the writer never
    /// appends, would take its place).
    pub fn insert(&mut self, kind: IdKind, id: &str, entry: IdEntry) {
        let key = id_key(kind, id);
        self.order.push_back((entry.ts, key));
        self.put(key, entry);
    }

    fn put(&mut self, key: u128, entry: IdEntry) {
        self.shards[shard_of(key)].insert(key, entry);
    }

    /// Forget the ids whose event is older than `horizon`.
    pub fn forget_before(&mut self, horizon: TsMicros) {
        while let Some((ts, key)) = self.order.front() {
            if ts >= horizon {
                break;
            }
            self.order.pop_front();
            let shard = &mut self.shards[shard_of(key)];
            if shard.get(&key).is_some_and(|e| e.ts == ts) {
                shard.remove(&key);
            }
        }
    }
}

/// One id in the order: its event's `ts` and its key, in 24 bytes (a `(TsMicros, u128)` takes
/// 32: a `u128` is aligned to 16; 1.6 MB less at 200,000 ids).
#[derive(Debug, Clone, Copy)]
struct Ordered {
    ts: TsMicros,
    key: [u64; 2],
}

impl Ordered {
    fn new((ts, key): (TsMicros, u128)) -> Ordered {
        Ordered {
            ts,
            key: [key as u64, (key >> 64) as u64],
        }
    }

    fn get(self) -> (TsMicros, u128) {
        (
            self.ts,
            u128::from(self.key[0]) | (u128::from(self.key[1]) << 64),
        )
    }
}

/// A queue of (ts, key) in chunks of [`ORDER_CHUNK`].
#[derive(Debug, Clone, Default)]
struct Order {
    chunks: VecDeque<Vec<Ordered>>,
    /// Entries of the front chunk already popped.
    head: usize,
}

impl Order {
    fn push_back(&mut self, item: (TsMicros, u128)) {
        let item = Ordered::new(item);
        match self.chunks.back_mut() {
            Some(c) if c.len() < ORDER_CHUNK => c.push(item),
            _ => {
                let mut c = Vec::with_capacity(ORDER_CHUNK);
                c.push(item);
                self.chunks.push_back(c);
            }
        }
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum::<usize>() - self.head
    }

    fn front(&self) -> Option<(TsMicros, u128)> {
        self.chunks
            .front()
            .and_then(|c| c.get(self.head))
            .map(|o| o.get())
    }

    fn pop_front(&mut self) {
        let Some(front) = self.chunks.front() else {
            return;
        };
        debug_assert!(self.head < front.len(), "an empty chunk is never kept");
        self.head += 1;
        if self.head >= front.len() {
            self.chunks.pop_front();
            self.head = 0;
        }
    }

    fn iter(&self) -> impl Iterator<Item = (TsMicros, u128)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .flat_map(move |(i, c)| if i == 0 { &c[self.head..] } else { &c[..] })
            .map(|o| o.get())
    }
}

impl Serialize for IdIndex {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct AllShards<'a>(&'a IdIndex);
        impl Serialize for AllShards<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut m = serializer.serialize_map(Some(self.0.len()))?;
                for (k, v) in self.0.shards.iter().flat_map(|s| s.iter()) {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
        struct InOrder<'a>(&'a Order);
        impl Serialize for InOrder<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut q = serializer.serialize_seq(Some(self.0.len()))?;
                for item in self.0.iter() {
                    q.serialize_element(&item)?;
                }
                q.end()
            }
        }
        let mut st = serializer.serialize_struct("IdIndex", 2)?;
        st.serialize_field("map", &AllShards(self))?;
        st.serialize_field("order", &InOrder(&self.order))?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for IdIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<IdIndex, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "IdIndex")]
        struct Wire {
            map: IdMap,
            order: Order,
        }
        let Wire { map, order } = Wire::deserialize(deserializer)?;
        let mut index = map.0;
        index.order = order;
        Ok(index)
    }
}

/// The serialized `map` of an [`IdIndex`], read into its shards.
struct IdMap(IdIndex);

impl<'de> Deserialize<'de> for IdMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<IdMap, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IdMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of id keys to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<IdMap, A::Error> {
                let mut index = IdIndex::default();
                while let Some((k, v)) = access.next_entry::<u128, IdEntry>()? {
                    index.put(k, v);
                }
                Ok(IdMap(index))
            }
        }
        deserializer.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Order {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Order, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Order;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence of (ts, id key)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Order, A::Error> {
                let mut order = Order::default();
                while let Some(item) = access.next_element::<(TsMicros, u128)>()? {
                    order.push_back(item);
                }
                Ok(order)
            }
        }
        deserializer.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> IdEntry {
        IdEntry {
            digest: [seq as u8; 16],
            seq,
            ts: seq as TsMicros * 1_000,
        }
    }

    /// The form every snapshot before the shards holds.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Before {
        map: HashMap<u128, IdEntry, rustc_hash::FxBuildHasher>,
        order: VecDeque<(TsMicros, u128)>,
    }

    fn filled(n: u64) -> IdIndex {
        let mut ids = IdIndex::default();
        for seq in 1..=n {
            ids.insert(IdKind::Event, &format!("e-{seq}"), entry(seq));
        }
        ids
    }

    #[test]
    fn ids_are_forgotten_oldest_first_across_chunks_like_a_plain_map_and_queue() {
        let n = (ORDER_CHUNK * 2 + 17) as u64;
        let mut ids = filled(n);
        assert_eq!(ids.len(), n as usize);
        // A plain map and queue, the model.
        let mut model: HashMap<String, IdEntry> = (1..=n)
            .map(|seq| (format!("e-{seq}"), entry(seq)))
            .collect();
        for horizon_seq in [
            1,
            2,
            ORDER_CHUNK as u64,
            ORDER_CHUNK as u64 + 1,
            n - 3,
            n + 1,
        ] {
            ids.forget_before(horizon_seq as TsMicros * 1_000);
            model.retain(|_, e| e.seq >= horizon_seq);
            assert_eq!(ids.len(), model.len(), "at horizon {horizon_seq}");
            for seq in 1..=n {
                let id = format!("e-{seq}");
                assert_eq!(ids.get(IdKind::Event, &id), model.get(&id), "{id}");
            }
            assert_eq!(ids.order.len(), model.len());
        }
        assert!(ids.is_empty());
        // Filled again after being emptied.
        ids.insert(IdKind::Reservation, "r-1", entry(7));
        assert_eq!(ids.get(IdKind::Reservation, "r-1"), Some(&entry(7)));
        assert_eq!(ids.get(IdKind::Event, "r-1"), None, "kinds never collide");
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn a_snapshot_of_the_index_before_the_shards_opens_and_a_new_one_reads_as_before() {
        let ids = filled(5_000);
        let before = Before {
            map: (1..=5_000u64)
                .map(|seq| (id_key(IdKind::Event, &format!("e-{seq}")), entry(seq)))
                .collect(),
            order: (1..=5_000u64)
                .map(|seq| (entry(seq).ts, id_key(IdKind::Event, &format!("e-{seq}"))))
                .collect(),
        };
        let cfg = bincode::config::standard();
        let old_bytes = bincode::serde::encode_to_vec(&before, cfg).unwrap();
        let (read, _): (IdIndex, usize) =
            bincode::serde::decode_from_slice(&old_bytes, cfg).unwrap();
        assert_eq!(read, ids, "an old snapshot's ids, in their order");

        let new_bytes = bincode::serde::encode_to_vec(&ids, cfg).unwrap();
        assert_eq!(
            new_bytes.len(),
            old_bytes.len(),
            "the same encoding, entry for entry"
        );
        let (back, _): (Before, usize) =
            bincode::serde::decode_from_slice(&new_bytes, cfg).unwrap();
        assert_eq!(back, before);
        let (again, _): (IdIndex, usize) =
            bincode::serde::decode_from_slice(&new_bytes, cfg).unwrap();
        assert_eq!(again, ids);
    }

    #[test]
    fn two_indexes_with_the_same_ids_compare_equal_however_their_chunks_fall() {
        let mut a = filled(ORDER_CHUNK as u64 + 10);
        a.forget_before(11_000); // seqs 1..=10 forgotten: a's first chunk starts at 10
        let mut b = IdIndex::default();
        for seq in 11..=(ORDER_CHUNK as u64 + 10) {
            b.insert(IdKind::Event, &format!("e-{seq}"), entry(seq));
        }
        assert_eq!(a, b);
        b.insert(IdKind::Event, "one-more", entry(1));
        assert_ne!(a, b);
    }
}
