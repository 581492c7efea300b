//! The reservations that ended recently ([`ENDED_RESERVATION_MEMORY_SECONDS`]), or were denied,
//! by id and in the order they ended.
//!
//! A long fold (start-up, replay) forgets most of them again within the fold, an hour of log
//! time after they ended. Indexing each by its id and finding it again an hour later (a cold
//! string hashed, a cold entry found and compared, then removed) was ~5.7 % of a 10 M-event
//! start-up's samples (benches/README.md, "Replay: sealed slots packed, ended reservations
//! deferred"). So while deferring ([`EndedIndex::defer`]) an ended reservation is only queued,
//! and forgetting one that was never indexed drops it from the queue's front. What is left is
//! indexed at [`EndedIndex::settle`], or when one is looked up meanwhile.
//!
//! [`ENDED_RESERVATION_MEMORY_SECONDS`]: super::ENDED_RESERVATION_MEMORY_SECONDS

use super::Ended;
use bursar_schemas::event::EventLabels;
use bursar_schemas::TsMicros;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

/// Most label sets [`EndedIndex`] keeps one copy of (emptied when full: sets already shared
/// stay shared). At ~1 KB a set, at most a few MiB kept alive past their reservations.
const SHARED_LABEL_SETS: usize = 4096;

/// Ended reservations by id, and `(when, id)` of each in the order they ended.
///
/// Serialised as those two, one after the other (the snapshot's form before the index had a
/// type of its own: the same bytes), with every deferred reservation indexed.
#[derive(Debug, Clone, Default)]
pub(crate) struct EndedIndex {
    /// The indexed ones. An id that ended twice is here with its latest end.
    map: HashMap<String, Ended>,
    /// `(when, id)` of every ended reservation remembered, indexed or deferred, oldest first.
    queue: VecDeque<(TsMicros, String)>,
    /// While deferring: the reservations of the last `deferred.len()` entries of `queue`, in
    /// the same order, not in `map`.
    deferred: VecDeque<Ended>,
    /// True between [`EndedIndex::defer`] and [`EndedIndex::settle`].
    deferring: bool,
    /// One copy of each label set the indexed reservations carry (derived: neither compared
    /// nor serialised). Every request builds its labels apart, so a client retrying a denied
    /// reservation in a loop left a copy of the same set per retry, remembered for the hour:
    /// 1,411 bytes per denial with four client labels, 98 before denials were remembered, and
    /// 356 with the copies shared (a ledger's RSS growth over 200,000 denials, release build).
    shared: HashSet<EventLabels, rustc_hash::FxBuildHasher>,
}

impl EndedIndex {
    /// Remember that reservation `rid` ended.
    pub(crate) fn insert(&mut self, rid: &str, ended: Ended) {
        if self.deferring && self.queue.back().is_some_and(|(last, _)| ended.at <= *last) {
            // An end stamped no later than the one before (the daemon stamps every event
            // later than the last, but a fold takes any log): forgetting an earlier end of the
            // same id would then depend on this one, not indexed yet (a stranger's review found
            // such a log folding differently). Deferring ends here, as the id index's does.
            self.settle();
        }
        self.queue.push_back((ended.at, rid.to_string()));
        if self.deferring {
            self.deferred.push_back(ended);
        } else {
            let ended = self.shared(ended);
            self.map.insert(rid.to_string(), ended);
        }
    }

    /// `ended` with its labels the copy this index keeps of an equal set, if it keeps one.
    fn shared(&mut self, mut ended: Ended) -> Ended {
        if let Some(copy) = self.shared.get(&ended.labels) {
            ended.labels = copy.clone();
        } else {
            if self.shared.len() >= SHARED_LABEL_SETS {
                self.shared.clear();
            }
            self.shared.insert(ended.labels.clone());
        }
        ended
    }

    /// How `rid` ended, if it is remembered.
    pub(crate) fn get(&self, rid: &str) -> Option<&Ended> {
        debug_assert!(
            self.deferred.is_empty(),
            "an ended reservation looked up while they are deferred: settle them first"
        );
        // Right all the same: the latest deferred end of the id is the one that counts.
        let ids = self.queue.iter().rev().map(|(_, id)| id);
        if let Some(found) = ids
            .zip(self.deferred.iter().rev())
            .find(|(id, _)| *id == rid)
        {
            return Some(found.1);
        }
        self.map.get(rid)
    }

    /// True when `rid` is remembered.
    #[cfg(test)]
    pub(crate) fn contains_key(&self, rid: &str) -> bool {
        self.get(rid).is_some()
    }

    /// How `rid` ended, to change, if it is remembered; the deferred ones are indexed first.
    pub(crate) fn get_mut(&mut self, rid: &str) -> Option<&mut Ended> {
        self.index_deferred();
        self.map.get_mut(rid)
    }

    /// Forget the reservations that ended before `horizon`.
    pub(crate) fn forget_before(&mut self, horizon: TsMicros) {
        while self.queue.front().is_some_and(|(at, _)| *at < horizon) {
            let indexed = self.queue.len() > self.deferred.len();
            let Some((at, rid)) = self.queue.pop_front() else {
                break;
            };
            if !indexed {
                // Never indexed: dropped unread (its end is the queue entry's own).
                let gone = self.deferred.pop_front();
                debug_assert!(gone.is_some_and(|e| e.at == at));
                continue;
            }
            // One lookup: a `get`, then a `remove`, hashed the id twice and found it twice
            // (6.1 → 5.3 % of a 10 M-event start-up's samples; the rest is the first touch of
            // the cold id and its entry).
            if let std::collections::hash_map::Entry::Occupied(e) = self.map.entry(rid) {
                // An id that ended again since is kept with its later end.
                if e.get().at == at {
                    e.remove();
                }
            }
        }
    }

    /// From now on, until [`EndedIndex::settle`], only queue the reservations that end: none is
    /// indexed, and those forgotten before the settle never are. Looking one up meanwhile
    /// indexes those queued so far; an end stamped no later than the one before settles them
    /// and ends the deferring.
    pub(crate) fn defer(&mut self) {
        self.deferring = true;
    }

    /// Index the reservations queued since [`EndedIndex::defer`], in their order, and stop
    /// deferring.
    pub(crate) fn settle(&mut self) {
        self.index_deferred();
        self.deferring = false;
    }

    /// Index every deferred reservation, in the order they ended (a later end of an id
    /// replaces an earlier one, as inserting each gives).
    fn index_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let first = self.queue.len() - self.deferred.len();
        // Taken out meanwhile: sharing labels changes the index.
        let (queue, deferred) = (
            std::mem::take(&mut self.queue),
            std::mem::take(&mut self.deferred),
        );
        for ((_, rid), ended) in queue.range(first..).zip(deferred) {
            let ended = self.shared(ended);
            self.map.insert(rid.clone(), ended);
        }
        self.queue = queue;
    }

    /// This index with every deferred reservation indexed (itself when none is).
    fn settled(&self) -> Cow<'_, EndedIndex> {
        if self.deferred.is_empty() {
            Cow::Borrowed(self)
        } else {
            let mut s = self.clone();
            s.settle();
            Cow::Owned(s)
        }
    }

    /// Reservations remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.settled().map.len()
    }
}

/// Compared by what it remembers, deferred or not.
impl PartialEq for EndedIndex {
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (self.settled(), o.settled());
        a.map == b.map && a.queue == b.queue
    }
}

impl Serialize for EndedIndex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let settled = self.settled();
        let mut t = serializer.serialize_tuple(2)?;
        t.serialize_element(&settled.map)?;
        t.serialize_element(&settled.queue)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for EndedIndex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        type Form = (HashMap<String, Ended>, VecDeque<(TsMicros, String)>);
        let (map, queue) = Form::deserialize(d)?;
        let mut index = EndedIndex {
            map: HashMap::with_capacity(map.len()),
            queue,
            ..EndedIndex::default()
        };
        for (rid, ended) in map {
            let ended = index.shared(ended);
            index.map.insert(rid, ended);
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::EndKind;
    use super::*;
    use bursar_schemas::event::EventLabels;

    fn ended(at: TsMicros, how: EndKind) -> Ended {
        Ended {
            labels: EventLabels::default(),
            model: "m".into(),
            hold_micros: at,
            how,
            at,
        }
    }

    /// A seeded mix of ends (ids often ending again), late commits found and changed, and
    /// forgetting: the same index deferred or not, compared while deferring and after.
    #[test]
    fn ends_deferred_then_settled_are_the_index_that_inserting_each_gives() {
        for seed in 0..200u64 {
            let mut rng = bursar_testkit::Rng::new(seed);
            let mut plain = EndedIndex::default();
            // Some indexed before deferring, as from a snapshot: the same in both.
            for at in 0..rng.below(20) as i64 {
                let rid = format!("r-{}", rng.below(30));
                plain.insert(&rid, ended(at, EndKind::Released));
            }
            let mut deferred = plain.clone();
            deferred.defer();
            let mut at = 20;
            for _ in 0..300 {
                // Now and then a step back (a fold takes any log), which ends the deferring.
                if rng.chance(2) {
                    at -= rng.below(30) as i64;
                } else {
                    at += rng.below(3) as i64;
                }
                let rid = format!("r-{}", rng.below(30));
                match rng.below(10) {
                    0..=5 => {
                        for l in [&mut plain, &mut deferred] {
                            l.insert(&rid, ended(at, EndKind::Expired));
                        }
                    }
                    6 => {
                        let how = EndKind::Committed(format!("e-{at}"));
                        let a = plain.get_mut(&rid).map(|e| e.how = how.clone());
                        let b = deferred.get_mut(&rid).map(|e| e.how = how.clone());
                        assert_eq!(a.is_some(), b.is_some(), "seed {seed}: {rid}");
                    }
                    _ => {
                        let horizon = at - rng.below(40) as i64;
                        plain.forget_before(horizon);
                        deferred.forget_before(horizon);
                    }
                }
                assert_eq!(deferred, plain, "seed {seed}: compared while deferring");
            }
            assert_eq!(deferred.len(), plain.len(), "seed {seed}");
            // Written while deferring, it reads back as the plain one.
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&deferred, cfg).unwrap();
            let back: EndedIndex = bincode::serde::decode_from_slice(&bytes, cfg).unwrap().0;
            assert_eq!(back.map, plain.map, "seed {seed}");
            assert_eq!(back.queue, plain.queue, "seed {seed}");
            deferred.settle();
            assert!(deferred.deferred.is_empty() && !deferred.deferring);
            assert_eq!(deferred.map, plain.map, "seed {seed}");
            assert_eq!(deferred.queue, plain.queue, "seed {seed}");
        }
    }

    /// Most of a long fold's ends are forgotten before it settles: those are never indexed.
    #[test]
    fn ends_forgotten_while_deferred_are_never_indexed() {
        let mut index = EndedIndex::default();
        index.insert("before", ended(1, EndKind::Released));
        index.defer();
        for at in 2..1_002 {
            index.insert(&format!("r-{at}"), ended(at, EndKind::Expired));
            index.forget_before(at - 10);
        }
        assert_eq!(
            index.map.len(),
            0,
            "the one indexed before is forgotten too"
        );
        assert_eq!(index.deferred.len(), 11);
        index.settle();
        assert_eq!(index.map.len(), 11);
        assert_eq!(index.get("r-1001").map(|e| e.at), Some(1_001));
        assert!(index.contains_key("r-991") && !index.contains_key("r-990"));
        // A late commit found while deferring indexes what is queued, and deferring goes on.
        index.defer();
        index.insert("r-2000", ended(2_000, EndKind::Expired));
        index.insert("r-2001", ended(2_001, EndKind::Expired));
        assert!(index.get_mut("r-2000").is_some());
        assert_eq!((index.map.len(), index.deferred.len()), (13, 0));
        index.insert("r-2002", ended(2_002, EndKind::Expired));
        assert_eq!((index.map.len(), index.deferred.len()), (13, 1));
    }

    /// An id ending again with a time that steps back: forgetting its earlier end must see
    /// the later one (a stranger's review: the long fold kept `a`, the plain one did not).
    #[test]
    fn an_end_stamped_before_the_last_ends_the_deferring_and_forgets_as_a_plain_index() {
        let mut plain = EndedIndex::default();
        plain.insert("a", ended(5, EndKind::Released));
        plain.insert("a", ended(7, EndKind::Released));
        let mut deferred = plain.clone();
        deferred.defer();
        for index in [&mut plain, &mut deferred] {
            index.insert("a", ended(5, EndKind::Expired));
            index.forget_before(6);
        }
        assert!(!deferred.deferring, "a step back ends the deferring");
        deferred.settle();
        assert_eq!(deferred.map, plain.map);
        assert!(!plain.contains_key("a") && !deferred.contains_key("a"));
        assert_eq!(deferred.queue, plain.queue);
    }

    /// The form a snapshot holds: the map, then the queue, as the ledger wrote them when they
    /// were two of its fields.
    #[test]
    fn the_index_is_written_as_the_two_fields_it_replaces() {
        #[derive(Serialize)]
        struct Before<'a> {
            ended: &'a HashMap<String, Ended>,
            ended_queue: &'a VecDeque<(TsMicros, String)>,
        }
        #[derive(Serialize)]
        struct After<'a> {
            ended: &'a EndedIndex,
        }
        let mut index = EndedIndex::default();
        index.insert("a", ended(5, EndKind::Committed("e-1".into())));
        index.defer();
        index.insert("b", ended(6, EndKind::Expired));
        let settled = index.settled().into_owned();
        let cfg = bincode::config::standard();
        let before = bincode::serde::encode_to_vec(
            Before {
                ended: &settled.map,
                ended_queue: &settled.queue,
            },
            cfg,
        )
        .unwrap();
        let after = bincode::serde::encode_to_vec(After { ended: &index }, cfg).unwrap();
        assert_eq!(after, before);
        let back: EndedIndex = bincode::serde::decode_from_slice(&after, cfg).unwrap().0;
        assert_eq!(back, index);
        assert_eq!(back.get("b").map(|e| e.at), Some(6));
    }

    /// Reservations whose requests built equal label sets apart (a client retrying a denied
    /// reservation in a loop) are remembered with one copy of the set, however they came in:
    /// indexed at once, deferred, or read back from a snapshot. Past [`SHARED_LABEL_SETS`]
    /// distinct sets the copies kept are let go, and every reservation still reads its own.
    #[test]
    fn equal_label_sets_are_remembered_once() {
        let set = |team: &str| -> EventLabels { [("team".to_string(), team.to_string())].into() };
        let with = |at: TsMicros, team: &str| Ended {
            labels: set(team),
            ..ended(at, EndKind::Denied)
        };
        let mut index = EndedIndex::default();
        index.insert("a", with(1, "x"));
        index.insert("b", with(2, "x"));
        index.defer();
        index.insert("c", with(3, "x"));
        index.settle();
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&index, cfg).unwrap();
        let back: EndedIndex = bincode::serde::decode_from_slice(&bytes, cfg).unwrap().0;
        for i in [&index, &back] {
            let a = &i.get("a").unwrap().labels;
            assert!(["b", "c"]
                .iter()
                .all(|id| i.get(id).unwrap().labels.same_set(a)));
            assert!(!a.same_set(&set("x")) && *a == set("x"));
        }

        for n in 0..SHARED_LABEL_SETS + 10 {
            index.insert(
                &format!("r-{n}"),
                with(10 + n as TsMicros, &format!("t-{n}")),
            );
        }
        assert!(index.shared.len() <= SHARED_LABEL_SETS);
        for n in 0..SHARED_LABEL_SETS + 10 {
            let got = &index.get(&format!("r-{n}")).unwrap().labels;
            assert_eq!(*got, set(&format!("t-{n}")));
        }
    }
}
