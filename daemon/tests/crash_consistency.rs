//! Crash consistency without processes, in the manner of redb's `crash_consistency` tests.
//!
//! The real writer (`writer::start` on a `Shared`) runs in this process on a
//! `FaultyLog<MemLog>`, a store that keeps "appended" apart from "durable" and fails the Nth
//! `sync`. Write jobs are submitted straight to the writer's queue, no socket involved. For
//! N = 1, 2, 3, … until a run in which no sync fails (about 31 with this workload), and for both
//! ways a sync can fail (nothing persisted, or persisted yet reported as failed):
//!
//! 1. a clean run writes a prefix and a durable snapshot (so recovery is snapshot + tail);
//! 2. the writer restarts under a changed policy (its `policy_applied` is the first sync) with
//!    sync N set to fail, and serves a deterministic mix of record / reserve / commit / release
//!    / extend in small group-committed rounds, with clock jumps that make holds expire (the
//!    writer appends `reservation_expired` itself);
//! 3. after the failure the writer is stopped, the disk crashes (everything not synced is
//!    lost), a store is reopened and the state recovered.
//!
//! Then: the chain verifies; the recovered state equals the fold of exactly the durable prefix;
//! every acknowledged write is in the durable log at the seq it was answered with, with its
//! idempotency entry; no unacknowledged write is partly there (event and id entry together or
//! not at all), and when the failed sync persisted nothing, none is there at all; a restarted
//! writer answers retries of acknowledged writes as duplicates of their original answers, and
//! retries of lost writes as new ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_core::ledger::{fold, Answer, IdKind, Ledger};
use bursar_core::policy::{parse_policy, LoadedPolicy};
use bursar_schemas::event::{Actor, Envelope, EventBody};
use bursar_schemas::wire::{
    CommitRequest, Estimate, ExtendRequest, RecordRequest, ReleaseRequest, ReserveRequest, Usage,
};
use bursar_schemas::Labels;
use bursard::log::testing::{FaultControl, FaultyLog, MemDisk, MemLog, SyncFault};
use bursard::log::{verify_chain, LogStore};
use bursard::writer::{self, Job, Shared, WriteCmd, WriterHandle};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// 2026-11-23T00:00:00Z.
const T0: i64 = 1_795_392_000_000_000;
const SEC: i64 = 1_000_000;
/// The sweep fails sync 1, 2, 3, … of the faulty phase until a run whose syncs all succeed
/// (N past the workload's last sync: about 31, more when the writer splits a round into several
/// batches). It gives up beyond this.
const MAX_SWEEP: u64 = 120;

/// The policy of the clean prefix (`team` limit 0.05 USD) and of the faulty phase (0.03 USD),
/// parsed once. The price table is cut down to the one model used, to keep events small.
fn policy(max_usd: &str) -> LoadedPolicy {
    static POLICIES: std::sync::OnceLock<Mutex<HashMap<String, LoadedPolicy>>> =
        std::sync::OnceLock::new();
    let cache = POLICIES.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    cache
        .entry(max_usd.to_string())
        .or_insert_with(|| parse(max_usd))
        .clone()
}

fn parse(max_usd: &str) -> LoadedPolicy {
    let text = format!(
        r#"
[daemon]
reservation_ttl_seconds = 60

[pricing.models."sim-model"]
provider = "acme"
input_per_mtok = 1.0
output_per_mtok = 2.0
max_output_tokens = 1000

[[budget]]
id = "team"
group_by = ["team"]
window = "fixed"
window_seconds = 3600
max_usd = {max_usd}
warn_at = 0.5

[[budget]]
id = "slots"
max_concurrent = 3
"#
    );
    let mut p = parse_policy(&text, "crash.toml", &|p| Err(format!("no import {p}"))).unwrap();
    p.resolved
        .pricing
        .models
        .retain(|model, _| model == "sim-model");
    p
}

// ---- the workload -------------------------------------------------------------------------

/// The shared seeded generator (`bursar-testkit`): failures reproduce from the seed.
use bursar_testkit::Rng;

fn team(t: u64) -> Labels {
    Labels::from([(
        "team".to_string(),
        ["search", "ads"][t as usize % 2].to_string(),
    )])
}

fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        ..Usage::default()
    }
}

/// Rounds of writes submitted together (so the writer group-commits them), and the clock jump
/// in seconds before each round. Deterministic: the same for every N.
fn workload(prefix: &str, rounds: usize, seed: u64) -> Vec<(i64, Vec<WriteCmd>)> {
    let mut rng = Rng::new(seed);
    let mut rids: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut n = 0;
    for round in 0..rounds {
        // Every seventh round comes after 90 s: holds with a 30–60 s ttl are due by then.
        let jump = if round % 7 == 6 { 90 } else { 1 };
        let mut cmds = Vec::new();
        for _ in 0..1 + rng.below(4) {
            n += 1;
            let pick = |rng: &mut Rng, rids: &[String]| -> String {
                if rids.is_empty() || rng.below(6) == 0 {
                    format!("{prefix}ghost-{n}")
                } else {
                    rids[rng.below(rids.len() as u64) as usize].clone()
                }
            };
            let cmd = match rng.below(20) {
                0..=6 => WriteCmd::Record(RecordRequest {
                    event_id: format!("{prefix}e-{n}"),
                    labels: team(rng.below(2)),
                    model: "sim-model".into(),
                    usage: usage(rng.below(3000), rng.below(1000)),
                    occurred_at: None,
                    reported_cost_usd: None,
                    headers: None,
                }),
                7..=12 => {
                    let rid = format!("{prefix}r-{n}");
                    rids.push(rid.clone());
                    WriteCmd::Reserve(ReserveRequest {
                        reservation_id: rid,
                        labels: team(rng.below(2)),
                        model: Some("sim-model".into()),
                        estimate: Estimate {
                            input_tokens: rng.below(2000),
                            max_output_tokens: Some(rng.below(1000)),
                        },
                        ttl_seconds: Some(30 + rng.below(31)),
                        candidates: None,
                        require: None,
                        wait_ms: None,
                    })
                }
                13..=16 => WriteCmd::Commit(CommitRequest {
                    reservation_id: pick(&mut rng, &rids),
                    event_id: format!("{prefix}c-{n}"),
                    usage: usage(rng.below(2000), rng.below(1200)),
                    labels: Some(team(rng.below(2))),
                    model: Some("sim-model".into()),
                    occurred_at: None,
                    reported_cost_usd: None,
                    headers: None,
                }),
                17..=18 => WriteCmd::Release(ReleaseRequest {
                    reservation_id: pick(&mut rng, &rids),
                }),
                _ => WriteCmd::Extend(ExtendRequest {
                    reservation_id: pick(&mut rng, &rids),
                    ttl_seconds: 30 + rng.below(31),
                }),
            };
            cmds.push(cmd);
        }
        out.push((jump, cmds));
    }
    out
}

/// An id and its kind, as the idempotency index knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct IdKey(IdKind, String);

impl std::fmt::Display for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.0, self.1)
    }
}

/// The idempotency key a write stores (none for `extend`).
fn id_key(cmd: &WriteCmd) -> Option<IdKey> {
    match cmd {
        WriteCmd::Record(r) => Some(IdKey(IdKind::Event, r.event_id.clone())),
        WriteCmd::Commit(c) => Some(IdKey(IdKind::Event, c.event_id.clone())),
        WriteCmd::Reserve(r) => Some(IdKey(IdKind::Reservation, r.reservation_id.clone())),
        WriteCmd::Release(r) => Some(IdKey(IdKind::Release, r.reservation_id.clone())),
        WriteCmd::Extend(_) | WriteCmd::Observe(_) => None,
    }
}

/// The same key, derived from the event a write appends first.
fn event_key(body: &EventBody) -> Option<IdKey> {
    match body {
        EventBody::UsageRecorded(u) => Some(IdKey(IdKind::Event, u.event_id.clone())),
        EventBody::ReservationCreated(r) => {
            Some(IdKey(IdKind::Reservation, r.reservation_id.clone()))
        }
        EventBody::ReservationDenied(r) => {
            Some(IdKey(IdKind::Reservation, r.reservation_id.clone()))
        }
        EventBody::ReservationReleased(r) => Some(IdKey(IdKind::Release, r.reservation_id.clone())),
        _ => None,
    }
}

/// True for events only a client write appends (not the writer's own reaper, crossings, policy).
fn client_event(body: &EventBody) -> bool {
    event_key(body).is_some() || matches!(body, EventBody::ReservationExtended(_))
}

// ---- an in-process writer -----------------------------------------------------------------

struct Running {
    shared: Arc<Shared>,
    writer: Option<(WriterHandle, JoinHandle<()>)>,
    /// Why `writer::start` failed (it writes the policy first), if it did.
    start_error: Option<String>,
}

/// A test clock: the writer reads the time the test sets.
fn clock_of(time: &Arc<AtomicI64>) -> writer::Clock {
    let time = time.clone();
    Arc::new(move || time.load(Ordering::SeqCst))
}

/// Events between two snapshots in the faulty run (the daemon's default is 100,000).
const SNAPSHOT_EVERY_EVENTS_HERE: u64 = 40;

/// Recover the state from `store` and start the writer on it under `policy`.
fn start(store: Box<dyn LogStore>, policy: &LoadedPolicy, clock: writer::Clock) -> Running {
    let ledger = writer::recover(store.as_ref()).unwrap();
    let shared = Arc::new(Shared::new(ledger, store));
    let reload = Arc::new(|| Err("no reload in this test".to_string()));
    match writer::start(shared.clone(), policy, clock, reload) {
        Ok(w) => Running {
            shared,
            writer: Some(w),
            start_error: None,
        },
        Err(e) => Running {
            shared,
            writer: None,
            start_error: Some(e),
        },
    }
}

impl Running {
    /// Submit `cmds` together, then wait for every answer (`None`: dropped unanswered).
    fn round(&self, cmds: &[WriteCmd]) -> Vec<Option<Value>> {
        let Some((handle, _)) = &self.writer else {
            return vec![None; cmds.len()];
        };
        let receivers: Vec<_> = cmds
            .iter()
            .map(|cmd| {
                let (reply, rx) = tokio::sync::oneshot::channel();
                let job = Job::Write {
                    cmd: cmd.clone(),
                    digest: cmd.digest(),
                    actor: Actor::default(),
                    reply,
                };
                handle.submit(job).map(|_| rx)
            })
            .collect();
        receivers
            .into_iter()
            .map(|rx| {
                let line = match rx.ok()?.blocking_recv().ok()?.render() {
                    Answer::Duplicate { seq } => {
                        bursard::server::original_answer(&self.shared, seq, None)
                    }
                    answer => answer.to_line(None),
                };
                Some(serde_json::from_str(&line).unwrap())
            })
            .collect()
    }

    /// Drain and stop the writer; returns the store.
    fn stop(mut self) -> Box<dyn LogStore> {
        if let Some((handle, thread)) = self.writer.take() {
            handle.submit(Job::Shutdown).unwrap();
            drop(handle);
            thread.join().unwrap();
        }
        let shared = Arc::try_unwrap(self.shared)
            .ok()
            .expect("the writer thread is gone, nobody else holds the state");
        shared.store.into_inner().unwrap()
    }
}

fn acked(answer: &Option<Value>) -> bool {
    answer.as_ref().is_some_and(|a| a["ok"] == true)
}

fn unavailable(answer: &Option<Value>) -> bool {
    answer
        .as_ref()
        .is_none_or(|a| a["error"]["code"] == "unavailable")
}

// ---- one scenario ---------------------------------------------------------------------------

/// What a scenario showed, for the sweep's own sanity checks.
#[derive(Default, Debug)]
struct Outcome {
    acked: usize,
    lost: usize,
    failed: bool,
    recovered_from_snapshot: bool,
    /// The snapshot recovery started from was taken during the faulty run (off the writer,
    /// between syncs), not at the clean prefix's stop.
    snapshot_from_faulty_run: bool,
    unacked_but_durable: usize,
    syncs: u64,
}

fn scenario(n: u64, fault: SyncFault) -> Outcome {
    let ctx = format!("fail sync {n} ({fault:?})");
    let disk = MemDisk::new();
    let clock = Arc::new(AtomicI64::new(T0));

    // 1. A clean prefix, then a durable snapshot: recovery below is snapshot + log tail.
    let prefix_policy = policy("0.05");
    let run = start(
        Box::new(MemLog::open(&disk).unwrap()),
        &prefix_policy,
        clock_of(&clock),
    );
    for (_, cmds) in workload("p-", 4, 7) {
        clock.fetch_add(SEC, Ordering::SeqCst);
        for a in run.round(&cmds) {
            assert!(!unavailable(&a), "{ctx}: the clean prefix failed: {a:?}");
        }
    }
    let mut store = run.stop();
    // The writer staged a snapshot when it stopped; make it durable, as its next batch would.
    store.sync().unwrap();
    assert_eq!(disk.durable_snapshot_count(), 1, "{ctx}");
    let prefix_end = disk.durable_last_seq();
    drop(store);

    // 2. Restart under a changed policy, failing the Nth sync.
    let control = FaultControl::new();
    control.set_sync_fault(fault);
    control.fail_sync_number(n);
    let faulty = FaultyLog::new(MemLog::open(&disk).unwrap(), control.clone());
    let run = start(Box::new(faulty), &policy("0.03"), clock_of(&clock));
    // Snapshots taken (off the writer) while the syncs run and fail, not only at a clean stop.
    run.shared
        .snapshot_every_events
        .store(SNAPSHOT_EVERY_EVENTS_HERE, Ordering::SeqCst);
    run.shared.snapshot_amortized.store(false, Ordering::SeqCst);
    let mut sent: Vec<(WriteCmd, Option<Value>)> = Vec::new();
    let mut rounds_after_failure = 0;
    for (jump, cmds) in workload("w-", 30, 11) {
        clock.fetch_add(jump * SEC, Ordering::SeqCst);
        let answers = run.round(&cmds);
        sent.extend(cmds.into_iter().zip(answers));
        if run.shared.poisoned.load(Ordering::SeqCst) {
            rounds_after_failure += 1;
            if rounds_after_failure > 2 {
                break;
            }
        }
    }
    let failed = run.shared.poisoned.load(Ordering::SeqCst);
    let syncs = control.syncs();
    assert_eq!(
        failed,
        control.syncs() >= n,
        "{ctx}: a failed sync poisons the writer, and only a failed sync"
    );
    // Fail closed: from the first refused write on, nothing more is acknowledged.
    if let Some(first) = sent.iter().position(|(_, a)| unavailable(a)) {
        assert!(failed, "{ctx}: refused without a failure");
        for (cmd, a) in &sent[first..] {
            assert!(
                unavailable(a),
                "{ctx}: {cmd:?} answered {a:?} after the failure"
            );
        }
    }
    let store = run.stop();

    // 3. Crash: only what was synced survives. Reopen and recover.
    disk.crash();
    drop(store);
    let store = MemLog::open(&disk).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
    let (count, _) =
        verify_chain(&store).unwrap_or_else(|e| panic!("{ctx}: the chain is broken: {e}"));
    assert_eq!(count, disk.durable_last_seq(), "{ctx}");
    let recovered = writer::recover(&store).unwrap();
    let folded: Ledger = fold(|| store.read_from(1)).unwrap();
    assert_eq!(
        recovered, folded,
        "{ctx}: the recovered state is not the fold of the durable log"
    );
    assert_eq!(recovered.last_seq(), count, "{ctx}");
    let snapshot_seq = store.latest_snapshot().unwrap().map(|(s, _)| s).unwrap();
    let durable: Vec<Envelope> = store.read_from(1).collect::<Result<_, _>>().unwrap();
    let by_seq: BTreeMap<u64, &Envelope> = durable.iter().map(|e| (e.seq, e)).collect();
    let durable_keys: HashSet<IdKey> = durable.iter().filter_map(|e| event_key(&e.body)).collect();

    // Every acknowledged write is durable, at the seq it was answered with, with its id entry.
    let mut acked_seqs = HashSet::new();
    let mut acked_keys = HashSet::new();
    for (cmd, a) in sent.iter().filter(|(_, a)| acked(a)) {
        let a = a.as_ref().unwrap();
        let seq = a["seq"].as_u64().unwrap();
        acked_seqs.insert(seq);
        let env = by_seq
            .get(&seq)
            .unwrap_or_else(|| panic!("{ctx}: acknowledged {cmd:?} (seq {seq}) is not durable"));
        match (cmd, &env.body) {
            (WriteCmd::Extend(x), EventBody::ReservationExtended(e)) => {
                assert_eq!(x.reservation_id, e.reservation_id, "{ctx}: seq {seq}");
            }
            (cmd, body) => {
                assert_eq!(
                    id_key(cmd),
                    event_key(body),
                    "{ctx}: seq {seq} holds {body:?}"
                );
            }
        }
        if let Some(key) = id_key(cmd) {
            // The idempotency index is a projection of the log: recovery rebuilt the id.
            assert_eq!(
                recovered.ids().get(key.0, &key.1).map(|e| e.seq),
                Some(seq),
                "{ctx}: acknowledged {key} is not in the recovered idempotency index"
            );
            acked_keys.insert(key);
        }
    }
    // No unacknowledged write is half there; with a lost sync, none is there at all.
    let mut unacked_but_durable = 0;
    for (cmd, a) in sent.iter().filter(|(_, a)| unavailable(a)) {
        let Some(key) = id_key(cmd) else { continue };
        if acked_keys.contains(&key) {
            continue; // e.g. a second release of the same hold
        }
        let has_event = durable_keys.contains(&key);
        let has_id = recovered.ids().get(key.0, &key.1).is_some();
        assert_eq!(
            has_event, has_id,
            "{ctx}: unacknowledged {key} ({a:?}) is half there: event {has_event}, id {has_id}"
        );
        if fault == SyncFault::Lost {
            assert!(
                !has_event,
                "{ctx}: unacknowledged {key} survived a lost sync"
            );
        }
        unacked_but_durable += usize::from(has_event);
    }
    if fault == SyncFault::Lost {
        // Of the events a client write appends, only acknowledged ones are durable (the
        // prefix's were all acknowledged; they precede the snapshot).
        for e in durable.iter().filter(|e| e.seq > snapshot_seq) {
            if client_event(&e.body) {
                assert!(
                    acked_seqs.contains(&e.seq),
                    "{ctx}: seq {} ({}) is durable but was never acknowledged",
                    e.seq,
                    e.body.kind()
                );
            }
        }
    }

    // 4. Restart without faults: retries of acknowledged writes are duplicates of their
    //    original answers; retries of lost records are new.
    let run = start(Box::new(store), &policy("0.03"), clock_of(&clock));
    assert!(run.start_error.is_none(), "{ctx}: {:?}", run.start_error);
    let retry: Vec<(WriteCmd, Value, bool)> = sent
        .iter()
        .filter_map(|(cmd, a)| {
            let key = id_key(cmd)?;
            if acked(a) {
                Some((cmd.clone(), a.clone().unwrap(), true))
            } else if unavailable(a)
                && matches!(cmd, WriteCmd::Record(_))
                && !durable_keys.contains(&key)
            {
                Some((cmd.clone(), Value::Null, false))
            } else {
                None
            }
        })
        .collect();
    let cmds: Vec<WriteCmd> = retry.iter().map(|(c, _, _)| c.clone()).collect();
    let answers = run.round(&cmds);
    let mut lost = 0;
    for ((cmd, original, was_acked), again) in retry.iter().zip(&answers) {
        let again = again.as_ref().unwrap();
        if *was_acked {
            let mut want = original.clone();
            want["duplicate"] = Value::Bool(true);
            assert_eq!(again, &want, "{ctx}: retry of acknowledged {cmd:?}");
        } else {
            assert_eq!(again["ok"], true, "{ctx}: retry of lost {cmd:?}: {again}");
            assert_eq!(again["duplicate"], false, "{ctx}: lost {cmd:?} came back");
            lost += 1;
        }
    }
    let store = run.stop();
    verify_chain(store.as_ref()).unwrap_or_else(|e| panic!("{ctx}: after retries: {e}"));

    Outcome {
        acked: sent.iter().filter(|(_, a)| acked(a)).count(),
        lost,
        failed,
        recovered_from_snapshot: snapshot_seq > 0,
        snapshot_from_faulty_run: snapshot_seq > prefix_end,
        unacked_but_durable,
        syncs,
    }
}

/// Outcomes for N = 1, 2, …, the last one a run in which no sync failed.
fn sweep(fault: SyncFault) -> Vec<Outcome> {
    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for n in 1..=MAX_SWEEP {
        let o = scenario(n, fault);
        let done = !o.failed;
        outcomes.push(o);
        if done {
            break;
        }
    }
    let last = outcomes.last().map(|o| (o.failed, o.syncs));
    assert_eq!(
        last.map(|(failed, _)| failed),
        Some(false),
        "the workload still failed a sync at N = {MAX_SWEEP}"
    );
    eprintln!(
        "{fault:?}: {} crashes checked in {:?}; the run without failure took {:?} syncs; \
         {} acknowledged writes checked, {} lost writes retried",
        outcomes.len(),
        started.elapsed(),
        last.map(|(_, syncs)| syncs),
        outcomes.iter().map(|o| o.acked).sum::<usize>(),
        outcomes.iter().map(|o| o.lost).sum::<usize>(),
    );
    outcomes
}

#[test]
fn after_a_lost_sync_and_a_crash_exactly_the_acknowledged_writes_survive() {
    let outcomes = sweep(SyncFault::Lost);
    // The sweep covers a failing policy write (N = 1), failures in the middle, and a run with
    // no failure.
    assert!(
        outcomes[0].failed && outcomes[0].acked == 0,
        "{:?}",
        outcomes[0]
    );
    assert!(outcomes.len() > 20, "{outcomes:?}");
    assert!(outcomes.iter().any(|o| o.failed && o.acked > 10));
    assert!(outcomes.iter().all(|o| o.recovered_from_snapshot));
    // A failed run is poisoned at its stop (no snapshot then): its snapshot came from the run.
    assert!(outcomes
        .iter()
        .any(|o| o.failed && o.snapshot_from_faulty_run));
    assert!(outcomes.iter().any(|o| o.lost > 0));
    assert!(outcomes.iter().all(|o| o.unacked_but_durable == 0));
}

#[test]
fn after_a_sync_that_persisted_but_failed_nothing_is_half_there() {
    let outcomes = sweep(SyncFault::PersistedAnyway);
    assert!(
        outcomes[0].failed && outcomes[0].acked == 0,
        "{:?}",
        outcomes[0]
    );
    assert!(outcomes.len() > 20, "{outcomes:?}");
    // Some failed batch made it to disk although nobody was told: present whole.
    assert!(outcomes.iter().any(|o| o.unacked_but_durable > 0));
    assert!(outcomes.iter().all(|o| o.recovered_from_snapshot));
}

#[test]
fn a_poisoned_writer_with_a_due_hold_waits_instead_of_spinning() {
    // A poisoned writer appends nothing, not even the expiry of a due hold; it must not wake
    // for that hold again and again (a core at 100 % until someone restarts the daemon).
    let disk = MemDisk::new();
    let control = FaultControl::new();
    control.fail_sync_number(2); // 1 is the policy, 2 the reservation
    let time = Arc::new(AtomicI64::new(T0));
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clock: writer::Clock = {
        let (time, reads) = (time.clone(), reads.clone());
        Arc::new(move || {
            reads.fetch_add(1, Ordering::SeqCst);
            time.load(Ordering::SeqCst)
        })
    };
    let faulty = FaultyLog::new(MemLog::open(&disk).unwrap(), control);
    let run = start(Box::new(faulty), &policy("0.03"), clock);
    let answers = run.round(&[WriteCmd::Reserve(ReserveRequest {
        reservation_id: "r-1".into(),
        labels: team(0),
        model: Some("sim-model".into()),
        estimate: Estimate {
            input_tokens: 10,
            max_output_tokens: Some(10),
        },
        ttl_seconds: Some(1),
        candidates: None,
        require: None,
        wait_ms: None,
    })]);
    assert!(unavailable(&answers[0]), "{answers:?}");
    assert!(run.shared.poisoned.load(Ordering::SeqCst));
    time.fetch_add(10 * SEC, Ordering::SeqCst);
    reads.store(0, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let woke = reads.load(Ordering::SeqCst);
    assert!(
        woke <= 10,
        "the poisoned writer read the clock {woke} times in 0.6 s"
    );
    // It still refuses writes, promptly.
    let again = run.round(&[WriteCmd::Release(ReleaseRequest {
        reservation_id: "r-1".into(),
    })]);
    assert!(unavailable(&again[0]), "{again:?}");
    run.stop();
}

fn record(id: &str) -> WriteCmd {
    WriteCmd::Record(RecordRequest {
        event_id: id.into(),
        labels: team(0),
        model: "sim-model".into(),
        usage: usage(100, 10),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    })
}

/// The fault every test here injects.
const FAULT: &str = "a bucket lost a hold";

/// `answer` refuses its write for the impossible state [`FAULT`], saying so.
fn assert_refused_for_the_fault(answer: &Option<Value>) {
    assert!(unavailable(answer), "{answer:?}");
    let why = answer.as_ref().unwrap()["error"]["message"]
        .as_str()
        .unwrap();
    assert!(
        why.contains("impossible state") && why.ends_with(FAULT),
        "{why}"
    );
}

/// A writer on a fresh disk that acknowledged one record, `e-1`.
fn running_with_one_record() -> (MemDisk, writer::Clock, Running) {
    let disk = MemDisk::new();
    let clock = clock_of(&Arc::new(AtomicI64::new(T0)));
    let run = start(
        Box::new(MemLog::open(&disk).unwrap()),
        &policy("10"),
        clock.clone(),
    );
    assert!(acked(&run.round(&[record("e-1")])[0]));
    (disk, clock, run)
}

#[test]
fn a_ledger_that_met_an_impossible_state_appends_nothing_and_refuses_writes_saying_why() {
    let (disk, clock, run) = running_with_one_record();
    let head = disk.durable_last_seq();
    // As if folding `e-1` had met a state that cannot be (a bug of the fold: release builds
    // go on, debug builds assert where the fold meets it).
    run.shared.ledger.write().unwrap().inject_fault(FAULT);
    let answers = run.round(&[record("e-2"), record("e-3")]);
    for a in &answers {
        assert_refused_for_the_fault(a);
    }
    assert_eq!(
        disk.durable_last_seq(),
        head,
        "nothing of the batch was appended"
    );
    assert!(run.shared.poisoned.load(Ordering::SeqCst));
    // Later writes are refused the same way.
    assert_refused_for_the_fault(&run.round(&[record("e-4")])[0]);
    // The log holds nothing of what the bad state would have appended: a restart folds it to
    // a sound state and takes the refused writes as new ones.
    let store = run.stop();
    drop(store);
    let again = start(Box::new(MemLog::open(&disk).unwrap()), &policy("10"), clock);
    assert_eq!(writer::read_ledger(&again.shared).fault(), None);
    let answers = again.round(&[record("e-1"), record("e-2")]);
    assert_eq!(
        answers[0].as_ref().unwrap()["duplicate"],
        true,
        "{answers:?}"
    );
    assert!(acked(&answers[1]), "{answers:?}");
    let second = answers[1].as_ref().unwrap();
    assert_eq!(second["duplicate"], false, "{answers:?}");
    assert_eq!(
        second["seq"],
        head + 1,
        "the next seq after the durable log's"
    );
    again.stop();
}

#[test]
fn a_writer_started_on_a_ledger_with_an_impossible_state_refuses_every_write_and_the_policy() {
    let (disk, clock, run) = running_with_one_record();
    drop(run.stop());
    let head = disk.durable_last_seq();
    // Recovery folded the log to a state that cannot be; the writer starts under another
    // policy, which it would otherwise append.
    let store: Box<dyn LogStore> = Box::new(MemLog::open(&disk).unwrap());
    let mut ledger = writer::recover(store.as_ref()).unwrap();
    ledger.inject_fault(FAULT);
    let shared = Arc::new(Shared::new(ledger, store));
    let reload = Arc::new(|| Err("no reload in this test".to_string()));
    let started = writer::start(shared.clone(), &policy("20"), clock, reload).unwrap();
    let run = Running {
        shared,
        writer: Some(started),
        start_error: None,
    };
    assert!(run.shared.poisoned.load(Ordering::SeqCst));
    assert_refused_for_the_fault(&run.round(&[record("e-2")])[0]);
    assert_eq!(
        disk.durable_last_seq(),
        head,
        "neither the policy nor the write appended"
    );
    run.stop();
}
