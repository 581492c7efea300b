//! Snapshots: one written now reads back and decides exactly as the ledger it was taken of; one
//! of an older format is set aside (recovery then folds the log).
//!
//! `fixtures/snapshot-format-v1.bin` is a snapshot (`encode_snapshot`) of the ledger
//! `make_ledger` builds, written by commit `95a42f3` (before buckets moved into slabs and the
//! ledger gained derived data that snapshots leave out). It is frozen: never regenerate it.
//! It was made once with `BURSAR_WRITE_FIXTURE=1 cargo test -p bursard --test
//! snapshot_format_fixture` on that commit (which refuses to overwrite an existing file).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_core::ledger::{Command, Ledger};
use bursar_core::policy::parse_policy;
use bursar_schemas::event::{EventBody, PolicyApplied};
use bursar_schemas::wire::{
    CommitRequest, Estimate, ExtendRequest, RecordRequest, ReleaseRequest, ReserveRequest,
    StatusRequest, Usage,
};
use bursar_schemas::Labels;
use bursard::writer::{decode_snapshot, encode_snapshot};
use std::path::PathBuf;

/// Every kind of window, limits in every dimension, `warn_at`, a meter.
const POLICY: &str = r#"
[[budget]]
id = "team-daily"
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 2
warn_at = 0.5

[[budget]]
id = "user-tpm"
group_by = ["user"]
window = "rolling"
window_seconds = 60
resolution_seconds = 10
max_tokens = 1000000

[[budget]]
id = "org-month"
group_by = ["org"]
window = "calendar"
calendar = "month"
utc_offset = "+02:00"
max_usd = 100
max_requests = 1000

[[budget]]
id = "user-slots"
group_by = ["user"]
max_concurrent = 3

[[budget]]
id = "model-meter"
group_by = ["model"]
window = "fixed"
window_seconds = 3600
"#;

const T0: i64 = 1_795_392_000_000_000;
const SEC: i64 = 1_000_000;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-format-v1.bin")
}

fn labels(team: &str, user: &str) -> Labels {
    [("org", "acme"), ("team", team), ("user", user)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        requests: 1,
    }
}

fn reserve(id: &str, team: &str, user: &str) -> ReserveRequest {
    ReserveRequest {
        reservation_id: id.into(),
        labels: labels(team, user),
        model: Some("gpt-4o".into()),
        estimate: Estimate {
            input_tokens: 20_000,
            max_output_tokens: Some(2_000),
        },
        ttl_seconds: Some(600),
        candidates: None,
        require: None,
        wait_ms: None,
    }
}

fn record(id: &str, team: &str, user: &str, input: u64) -> RecordRequest {
    RecordRequest {
        event_id: id.into(),
        labels: labels(team, user),
        model: "gpt-4o-mini".into(),
        usage: usage(input, input / 4),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    }
}

/// A ledger with usage in every window, live, ended and denied holds, warnings and crossings.
fn make_ledger() -> (Ledger, ()) {
    let loaded = parse_policy(POLICY, "fixture.toml", &|_| Err("no imports".into())).unwrap();
    let mut l = Ledger::new();
    let body = EventBody::PolicyApplied(PolicyApplied {
        policy_version: 1,
        source: "fixture.toml".into(),
        source_hash: loaded.source_hash.clone(),
        policy: loaded.resolved,
    });
    l.apply(1, T0, &body).unwrap();
    let mut now = T0;
    let run = |l: &mut Ledger, cmd: Command<'_>, now: i64| {
        let step = l.execute(cmd, now);
        assert!(!step.answer.is_error(), "{:?}", step.answer);
    };
    for (n, (team, user)) in [("a", "u1"), ("b", "u2"), ("a", "u3"), ("a", "u1")]
        .into_iter()
        .cycle()
        .take(12)
        .enumerate()
    {
        now += 7 * SEC;
        let r = record(&format!("e{n}"), team, user, 40_000 + 10_000 * n as u64);
        run(&mut l, Command::Record(&r), now);
    }
    now += SEC;
    run(&mut l, Command::Reserve(&reserve("r-live", "b", "u2")), now);
    now += SEC;
    run(
        &mut l,
        Command::Reserve(&reserve("r-released", "a", "u3")),
        now,
    );
    now += SEC;
    let release = ReleaseRequest {
        reservation_id: "r-released".into(),
    };
    run(&mut l, Command::Release(&release), now);
    now += SEC;
    run(
        &mut l,
        Command::Reserve(&reserve("r-committed", "a", "u1")),
        now,
    );
    now += SEC;
    let commit = CommitRequest {
        reservation_id: "r-committed".into(),
        event_id: "c1".into(),
        usage: usage(18_000, 1_500),
        labels: None,
        model: None,
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    run(&mut l, Command::Commit(&commit), now);
    now += SEC;
    let extend = ExtendRequest {
        reservation_id: "r-live".into(),
        ttl_seconds: 900,
    };
    run(&mut l, Command::Extend(&extend), now);
    now += SEC;
    // Denied (no price for the model): remembered, so that a commit of it is recorded against
    // what it asked for.
    let denied = ReserveRequest {
        model: Some("no-such-model".into()),
        ..reserve("r-denied", "a", "u3")
    };
    let step = l.execute(Command::Reserve(&denied), now);
    assert!(step.answer.to_line(None).contains(r#""decision":"deny""#));
    (l, ())
}

/// What this version decides next, from `l`: a line per answer and the status after.
fn next_answers(mut l: Ledger, _: ()) -> Vec<String> {
    let mut out = Vec::new();
    let mut now = l.last_ts() + 30 * SEC;
    for n in 0..6 {
        now += 11 * SEC;
        let (team, user) = [("a", "u1"), ("b", "u2"), ("c", "u4")][n % 3];
        let r = record(&format!("n{n}"), team, user, 90_000);
        let step = l.execute(Command::Record(&r), now);
        out.push(step.answer.to_line(None));
        out.extend(step.events.iter().map(|(_, _, b)| format!("{b:?}")));
    }
    let step = l.execute(Command::Reserve(&reserve("r-next", "a", "u1")), now);
    out.push(step.answer.to_line(None));
    let commit = CommitRequest {
        reservation_id: "r-denied".into(),
        event_id: "c-denied".into(),
        usage: usage(1_000, 100),
        labels: None,
        model: Some("gpt-4o-mini".into()),
        occurred_at: None,
        reported_cost_usd: None,
        headers: None,
    };
    let step = l.execute(Command::Commit(&commit), now);
    out.push(step.answer.to_line(None));
    out.extend(step.events.iter().map(|(_, _, b)| format!("{b:?}")));
    out.push(format!("{:?}", l.status(&StatusRequest::default(), now)));
    out
}

/// Snapshots are a cache of the log's fold. Since format 2 (prices with several long-context
/// tiers, policies stored as JSON inside), a snapshot of the first format is set aside, never
/// misread: recovery folds the log instead (`tests/tests/upgrade.rs` starts a daemon on a data
/// dir holding one).
#[test]
fn a_snapshot_of_the_first_format_is_set_aside_not_misread() {
    let path = fixture();
    if std::env::var_os("BURSAR_WRITE_FIXTURE").is_some() && !path.exists() {
        let (l, _) = make_ledger();
        std::fs::write(&path, encode_snapshot(&l, Default::default()).unwrap()).unwrap();
    }
    let bytes = std::fs::read(&path).expect("the frozen snapshot fixture");
    assert_eq!(bytes.first(), Some(&bursard::writer::SNAPSHOT_FORMAT_V1));
    assert!(decode_snapshot(&bytes).is_none());
}

#[test]
fn a_snapshot_without_quota_observations_is_set_aside() {
    // Format 4 has no observations and holds without their input tokens: read as format 7 it
    // would misplace every field after them, so it is never decoded.
    let (l, ()) = make_ledger();
    let mut v4 = encode_snapshot(&l, Default::default()).unwrap();
    v4[0] = bursard::writer::SNAPSHOT_FORMAT_V4;
    assert!(decode_snapshot(&v4).is_none());
}

#[test]
fn a_snapshot_without_report_rollups_is_set_aside() {
    // Format 3 is format 4 without the rollups: read as format 7 its ledger would miss every
    // report figure of the events before it, so it is never decoded.
    let (l, ()) = make_ledger();
    let mut v3 = encode_snapshot(&l, Default::default()).unwrap();
    v3[0] = bursard::writer::SNAPSHOT_FORMAT_V3;
    assert!(decode_snapshot(&v3).is_none());
}

#[test]
fn a_snapshot_written_now_reads_back_equal() {
    let (l, ()) = make_ledger();
    let head = bursar_schemas::event::Hash32([7; 32]);
    let (back, back_head) = decode_snapshot(&encode_snapshot(&l, head).unwrap()).unwrap();
    assert_eq!(back, l);
    assert_eq!(back_head, head);
    let answers = next_answers(back, ());
    assert!(
        answers
            .iter()
            .any(|a| a.contains(r#""reservation":"denied""#)),
        "the denial was remembered: {answers:?}"
    );
    assert_eq!(answers, next_answers(l, ()));
}

/// Formats 5 (an LZ4 block of the whole bincode) and 6 (the same bincode, a zstd stream) are
/// set aside: their ledgers forgot the reservations denied before them, which a fold of the log
/// remembers (a commit of one is then recorded against what it asked for, not as an unknown
/// reservation's). Recovery folds the log instead, once.
///
/// `fixtures/snapshot-format-v5.bin`: `encode_snapshot(make_ledger(), [5; 32])` written by
/// commit e3b4242 (the last to write format 5). Frozen: never regenerate it.
#[test]
fn a_snapshot_of_format_5_or_6_is_set_aside_for_the_denials_it_forgot() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-format-v5.bin");
    let bytes = std::fs::read(&path).expect("the frozen format-5 snapshot fixture");
    assert_eq!(bytes.first(), Some(&bursard::writer::SNAPSHOT_FORMAT_V5));
    assert!(decode_snapshot(&bytes).is_none());
    // A format-6 snapshot is format 7's bytes under another tag: a ledger taken before a
    // denial was remembered would read back whole, and wrong. Its tag alone sets it aside.
    let (l, ()) = make_ledger();
    let mut v6 = encode_snapshot(&l, Default::default()).unwrap();
    assert!(decode_snapshot(&v6).is_some());
    v6[0] = bursard::writer::SNAPSHOT_FORMAT_V6;
    assert!(decode_snapshot(&v6).is_none());
}

/// Snapshots are streams: what `write_snapshot` writes into a file is what `encode_snapshot`
/// returns, and a damaged one (cut short, with bytes after its end, a flipped byte) is set
/// aside (recovery folds the log), never a panic or a wrong ledger.
#[test]
fn a_damaged_snapshot_is_set_aside() {
    let (l, ()) = make_ledger();
    let head = bursar_schemas::event::Hash32([6; 32]);
    let bytes = encode_snapshot(&l, head).unwrap();
    assert_eq!(bytes[0], bursard::writer::SNAPSHOT_FORMAT_V7);
    let mut streamed = Vec::new();
    bursard::writer::write_snapshot(&l, head, &mut streamed).unwrap();
    assert_eq!(streamed, bytes);
    for cut in [1, 33, 40, bytes.len() / 2, bytes.len() - 1] {
        assert!(decode_snapshot(&bytes[..cut]).is_none(), "cut at {cut}");
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&bytes[33..]);
    assert!(
        decode_snapshot(&longer).is_none(),
        "a second stream after the first"
    );
    // The stream carries a checksum of its contents: a byte flipped after the head's hash is
    // found, or changes nothing the stream decompresses to (bits zstd does not read); one in
    // the hash itself is found by recovery, which checks it against the log.
    for at in 33..bytes.len() {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x40;
        assert!(
            decode_snapshot(&flipped).is_none_or(|(back, h)| back == l && h == head),
            "byte {at} flipped read as another ledger"
        );
    }
}

/// A snapshot is decoded only while its decompressed bytes stay within a bound of its
/// stored size (1,024 times in the daemon): a damaged or hostile stream cannot make start-up
/// decompress gigabytes. Shown with the bound just under and just over what this snapshot
/// needs: under it the snapshot is set aside, over it it reads back as its ledger.
#[test]
fn a_snapshot_decompressing_past_its_bound_is_set_aside() {
    let (l, ()) = make_ledger();
    let head = bursar_schemas::event::Hash32([6; 32]);
    let bytes = encode_snapshot(&l, head).unwrap();
    let stored = bytes.len() - 33;
    let decompressed = zstd::stream::decode_all(&bytes[33..]).unwrap().len();
    // The largest ratio whose bound falls short of the decompressed size.
    let short = (decompressed - 1) / stored;
    assert!(
        short >= 2,
        "the fixture compresses ({decompressed} from {stored} bytes)"
    );
    assert!(bursard::writer::decode_snapshot_within(&bytes, short).is_none());
    let (back, h) = bursard::writer::decode_snapshot_within(&bytes, short + 1).unwrap();
    assert!(back == l && h == head);
    assert!(decode_snapshot(&bytes).is_some_and(|(back, _)| back == l));
}

/// The most virtual memory this process has had mapped at once (`VmPeak`), in bytes.
fn vm_peak() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmPeak:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A damaged length in a small snapshot is a miss, not an allocation of what it claims: a
/// string of 3 GiB claimed inside a snapshot of a few KiB is refused before anything is
/// allocated for it (bincode allocates a claimed length before reading; on a host that cannot
/// map that much the allocation would abort the daemon instead of folding the log).
#[test]
fn a_damaged_length_in_a_small_snapshot_allocates_nothing_of_what_it_claims() {
    let (l, ()) = make_ledger();
    let mut plain = bincode::serde::encode_to_vec(&l, bincode::config::standard()).unwrap();
    // The id of a released reservation, remembered among the ended ones: its length byte
    // becomes a varint of 3 GiB (0xFC, then a u32).
    let id = b"\x0ar-released";
    let at = plain
        .windows(id.len())
        .position(|w| w == id)
        .expect("the ledger's bincode holds the released reservation's id");
    plain.splice(at..at + 1, [0xFC, 0x00, 0x00, 0x00, 0xC0]);
    let mut damaged = vec![bursard::writer::SNAPSHOT_FORMAT_V7];
    damaged.extend_from_slice(&[6; 32]);
    damaged.extend_from_slice(&zstd::encode_all(&plain[..], 1).unwrap());
    assert!(damaged.len() < 32 << 10, "a small snapshot");

    let before = vm_peak();
    assert!(decode_snapshot(&damaged).is_none());
    let grew = vm_peak().saturating_sub(before);
    assert!(
        grew < 1 << 30,
        "decoding mapped {} MiB at once for a claim of 3 GiB",
        grew >> 20
    );
}

/// A valid snapshot decodes whatever its bincode claims as it decodes (bincode's limit counts
/// what it builds: each integer its whole size, a real ledger 2–5 times its bytes): 20,000
/// usage events over 5,000 users and the ids they answered.
#[test]
fn a_valid_snapshot_of_many_events_decodes() {
    let (mut l, ()) = make_ledger();
    let mut now = T0 + 3_600 * SEC;
    for i in 0..20_000u64 {
        now += SEC / 10;
        let user = format!("u{}", i % 5_000);
        let r = record(&format!("bulk-{i}"), "a", &user, 100 + i % 7);
        let step = l.execute(Command::Record(&r), now);
        assert!(!step.answer.is_error(), "{:?}", step.answer);
    }
    let head = bursar_schemas::event::Hash32([5; 32]);
    let bytes = encode_snapshot(&l, head).unwrap();
    let (back, _) = decode_snapshot(&bytes).expect("the snapshot decodes");
    assert!(back == l);
}
