//! `writer::recover` reads the log once (decoding on a second thread) and falls back to the
//! two-pass fold only for a retroactive `pricing_changed`: in every case it must equal a full
//! two-pass fold of the log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_core::ledger::{self, Command, Ledger};
use bursar_schemas::event::{Actor, Envelope, EventBody, Hash32, PolicyApplied, PricingChanged};
use bursar_schemas::wire::{RecordRequest, Usage};
use bursar_schemas::TsMicros;
use bursard::log::testing::{MemDisk, MemLog};
use bursard::log::LogStore;

const T0: TsMicros = 1_800_000_000_000_000;

/// Builds a log through a live ledger, one event per record, like the writer does.
struct Builder {
    ledger: Ledger,
    store: MemLog,
    prev: Hash32,
    now: TsMicros,
    n: u64,
}

impl Builder {
    fn new(disk: &MemDisk) -> Self {
        let mut b = Builder {
            ledger: Ledger::new(),
            store: MemLog::open(disk).unwrap(),
            prev: Hash32::default(),
            now: T0,
            n: 0,
        };
        let p = bursar_core::policy::default_policy();
        b.push(EventBody::PolicyApplied(PolicyApplied {
            policy_version: 1,
            source: p.source.clone(),
            source_hash: p.source_hash.clone(),
            policy: p.resolved.clone(),
        }));
        b
    }

    fn push(&mut self, body: EventBody) {
        self.now += 1_000_000;
        let seq = self.ledger.last_seq() + 1;
        let ts = self.ledger.stamp(self.now);
        self.ledger.apply(seq, ts, &body).unwrap();
        self.seal(vec![(seq, ts, body)]);
    }

    fn seal(&mut self, events: Vec<(u64, TsMicros, EventBody)>) {
        let mut envs = Vec::new();
        for (seq, ts, body) in events {
            let env = Envelope::seal(seq, ts, Actor::default(), self.prev, body).unwrap();
            self.prev = env.hash;
            envs.push(env);
        }
        self.store
            .append(&bursard::log::sealed_of(&envs).unwrap())
            .unwrap();
        self.store.sync().unwrap();
    }

    fn records(&mut self, k: u64) {
        for _ in 0..k {
            self.n += 1;
            self.now += 1_000_000;
            let req = RecordRequest {
                event_id: format!("e-{}", self.n),
                labels: [("team".to_string(), format!("t{}", self.n % 3))].into(),
                model: "gpt-4o".into(),
                usage: Usage {
                    input_tokens: 1000 + self.n,
                    output_tokens: 100,
                    ..Usage::default()
                },
                occurred_at: None,
                reported_cost_usd: None,
                headers: None,
            };
            let step = self.ledger.execute(Command::Record(&req), self.now);
            assert!(!step.answer.is_error(), "{:?}", step.answer);
            self.seal(step.events);
        }
    }

    /// A price change for gpt-4o (10× its input price), effective from `effective_from`.
    fn reprice(&mut self, effective_from: TsMicros) {
        let mut table = self.ledger.current_prices().cloned().unwrap();
        let p = table.models.get_mut("gpt-4o").unwrap();
        p.input_per_mtok *= 10;
        self.push(EventBody::PricingChanged(PricingChanged {
            effective_from,
            pricing: table,
        }));
    }

    fn full_fold(&self) -> Ledger {
        ledger::fold(|| self.store.read_from(1)).unwrap()
    }
}

#[test]
fn recovery_of_a_log_without_price_changes_equals_a_full_fold() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(10_000);
    let recovered = bursard::writer::recover(&b.store).unwrap();
    assert_eq!(recovered.last_seq(), b.ledger.last_seq());
    assert_eq!(recovered, b.full_fold());
}

#[test]
fn recovery_with_a_forward_price_change_equals_a_full_fold() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(50);
    let future = b.now + 10_000_000;
    b.reprice(future);
    b.records(50);
    let recovered = bursard::writer::recover(&b.store).unwrap();
    assert_eq!(recovered, b.full_fold());
}

#[test]
fn recovery_with_a_retroactive_price_change_equals_the_two_pass_fold() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(50);
    // Reaches back over the last 20 records: a one-pass fold would price them wrongly.
    let past = b.now - 20_500_000;
    b.reprice(past);
    b.records(50);
    let full = b.full_fold();
    let recovered = bursard::writer::recover(&b.store).unwrap();
    assert_eq!(recovered, full);
    // The live ledger priced those 20 records before it knew the change, so it differs.
    assert_ne!(b.ledger, full);
}

#[test]
fn recovery_from_a_snapshot_with_a_retroactive_change_in_the_tail_equals_a_full_fold() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(40);
    let head = b.store.head().unwrap().1;
    let snap = bursard::writer::encode_snapshot(&b.ledger, head).unwrap();
    b.store.put_snapshot(b.ledger.last_seq(), &snap).unwrap();
    b.store.sync().unwrap();
    b.records(10);
    let past = b.now - 30_500_000;
    b.reprice(past);
    b.records(10);
    let recovered = bursard::writer::recover(&b.store).unwrap();
    assert_eq!(recovered, b.full_fold());
}

/// Recovery tells the fold the log's last `ts`, and the fold does not even queue the ids that
/// event forgets under the window in force when each came. A last event that lengthens the
/// window keeps one the fold skipped (the id right at the horizon the event before forgot
/// up to): the fold says so, and recovery folds the log again keeping every id.
#[test]
fn recovery_of_a_log_whose_last_event_lengthens_the_id_window_keeps_every_id_it_covers() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    // 9,000 records a second apart: 2.5 hours, most of it past the window of one hour.
    b.records(9_000);
    let mut p = bursar_core::policy::default_policy();
    p.resolved.idempotency_window_seconds = 2 * 3_600;
    b.push(EventBody::PolicyApplied(PolicyApplied {
        policy_version: 2,
        source: p.source.clone(),
        source_hash: p.source_hash.clone(),
        policy: p.resolved.clone(),
    }));
    let recovered = bursard::writer::recover(&b.store).unwrap();
    let full = b.full_fold();
    assert!(recovered.ids().len() == full.ids().len(), "the same ids");
    assert!(recovered == full, "the same ledger");
}

#[test]
fn recovery_from_a_snapshot_plus_tail_equals_a_full_fold() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(40);
    let head = b.store.head().unwrap().1;
    let snap = bursard::writer::encode_snapshot(&b.ledger, head).unwrap();
    b.store.put_snapshot(b.ledger.last_seq(), &snap).unwrap();
    b.store.sync().unwrap();
    b.records(5000);
    let recovered = bursard::writer::recover(&b.store).unwrap();
    assert_eq!(recovered, b.full_fold());
}

/// A cluster follower copies a batch of records into its local copy and then folds them: when
/// the fold failed after the copy, the copy is ahead of the ledger, and the follower folds the
/// copy again before it follows on. A writer stepping down may hold events the stream did not
/// take: its ledger is ahead of the copy, and it too is replaced by the copy's fold.
#[test]
fn a_partition_whose_fold_and_local_copy_are_apart_is_folded_again_from_the_copy() {
    use bursard::cluster::fold_copy_again_if_apart;
    use bursard::writer::Shared;
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(30);
    let behind = b.ledger.clone();
    b.records(20);
    let copy = b.full_fold();
    let ahead = {
        let mut extra = Builder::new(&MemDisk::new());
        extra.records(60);
        extra.ledger
    };
    assert_ne!(behind, copy, "the test needs a fold behind its copy");
    let Builder { store, .. } = b;
    let shared = Shared::new(behind, Box::new(store));
    let refold = |anyway| {
        let store = bursard::writer::lock_store(&shared);
        fold_copy_again_if_apart(&shared, store.as_ref(), anyway).unwrap()
    };
    assert!(refold(false), "a fold behind its copy is folded again");
    assert_eq!(*bursard::writer::read_ledger(&shared), copy);
    assert!(!refold(false), "a fold at its copy's head is left as it is");
    *shared.ledger.write().unwrap() = ahead;
    assert!(refold(false), "a fold ahead of its copy is folded again");
    assert_eq!(*bursard::writer::read_ledger(&shared), copy);
    assert!(refold(true), "a poisoned writer's fold is not trusted");
    assert_eq!(*bursard::writer::read_ledger(&shared), copy);
}

/// A snapshot of format 6 (whose ledger forgot the reservations denied before it, which a fold
/// remembers for an hour) is set aside: recovery folds the whole log, once. The same snapshot
/// in format 7 is used, and only the tail after it is folded.
#[test]
fn a_snapshot_of_format_6_is_set_aside_and_the_whole_log_folded() {
    let disk = MemDisk::new();
    let mut b = Builder::new(&disk);
    b.records(40);
    let head = b.store.head().unwrap().1;
    let at = b.ledger.last_seq();
    let v7 = bursard::writer::encode_snapshot(&b.ledger, head).unwrap();
    let mut v6 = v7.clone();
    v6[0] = bursard::writer::SNAPSHOT_FORMAT_V6;
    b.store.put_snapshot(at, &v6).unwrap();
    b.store.sync().unwrap();
    b.records(10);
    let (recovered, folded) = bursard::writer::recover_counted(&b.store).unwrap();
    assert_eq!(folded, b.ledger.last_seq(), "every event folded");
    assert_eq!(recovered, b.full_fold());

    b.store.put_snapshot(at, &v7).unwrap();
    b.store.sync().unwrap();
    let (recovered, folded) = bursard::writer::recover_counted(&b.store).unwrap();
    assert_eq!(folded, b.ledger.last_seq() - at, "the tail folded");
    assert_eq!(recovered, b.full_fold());
}
