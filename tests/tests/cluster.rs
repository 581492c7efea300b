//! Cluster mode (SPEC §13, issue 15) end to end: three `bursard` nodes over a real 3-node NATS
//! JetStream cluster (`sync_interval: always`), agents on every node sharing one budget.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::nats::{nats_server, NatsCluster};
use bursar_tests::{eventually, Client, Daemon};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// One cluster at a time (three NATS servers and three daemons on two cores).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// $0.01 a day for org acme: 13 reservations of 750 µ$ fit (gpt-4o-mini, 1000 in + 1000 out).
fn policy(urls: &[String], node: &str, prefix: &str) -> String {
    let nats: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        r#"
[cluster]
nats = [{}]
node = "{node}"
partition_by = "org"
partitions = 2
replicas = 3
stream_prefix = "{prefix}"

[[budget]]
id = "org-daily"
group_by = ["org"]
window = "fixed"
window_seconds = 86400
max_usd = 0.01

[[budget]]
id = "gpu"
match = {{ pool = "gpu" }}
group_by = ["org"]
max_concurrent = 1
"#,
        nats.join(", ")
    )
}

struct Nodes {
    nodes: Vec<Daemon>,
    nats: NatsCluster,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// Three nodes `a`, `b`, `c`, each with its own data dir and socket, once every partition has
/// a writer; `None` (after saying why) where no nats-server can be had.
fn start(prefix: &str) -> Option<Nodes> {
    start_with(prefix, "")
}

/// [`start`], with `extra` appended to every node's file.
fn start_with(prefix: &str, extra: &str) -> Option<Nodes> {
    let turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(why) = nats_server() {
        eprintln!("skipped: {why}");
        return None;
    }
    let nats = NatsCluster::start(3).expect("a 3-node NATS cluster");
    let urls = nats.urls();
    let nodes: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|n| Daemon::start_with_config(&(policy(&urls, n, prefix) + extra)))
        .collect();
    let cluster = Nodes {
        nodes,
        nats,
        _turn: turn,
    };
    cluster.wait_for_writers(Duration::from_secs(30));
    Some(cluster)
}

impl Nodes {
    fn status(&self, i: usize) -> Value {
        self.nodes[i].client().call(json!({"op": "cluster_status"}))
    }

    /// Wait until every partition has a holder that reports itself its writer.
    fn wait_for_writers(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_none() {
                    continue;
                }
                let s = self.status(i);
                let holders: Vec<Option<String>> = s["partitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        let h = p["holder"].as_str()?;
                        p["nodes"]
                            .as_array()?
                            .iter()
                            .any(|n| {
                                n["node"] == h
                                    && n["writer"] == true
                                    && n["reported_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
                            })
                            .then(|| h.to_string())
                    })
                    .collect();
                if !holders.is_empty() && holders.iter().all(Option::is_some) {
                    return holders.into_iter().flatten().collect();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no writer for every partition within {within:?}: {}\n{}",
                self.status(0),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|d| {
                let log = d.stderr();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    fn index_of(&self, node: &str) -> usize {
        ["a", "b", "c"].iter().position(|n| *n == node).unwrap()
    }
}

/// An org whose events go to partition 0, and one for partition 1.
fn org_on_each_partition() -> Vec<String> {
    (0..2)
        .map(|p| {
            (0..)
                .map(|n| format!("org{n}"))
                .find(|o| bursard::cluster::partition_of(o, 2) == p)
                .unwrap()
        })
        .collect()
}

fn reserve(id: &str, org: &str) -> Value {
    json!({"op": "reserve", "reservation_id": id, "labels": {"org": org},
           "model": "gpt-4o-mini", "estimate": {"input_tokens": 1000, "max_output_tokens": 1000}})
}

/// A commit's answer has a line of the org's daily budget: it was recorded against `org`.
fn assert_counts_against_org(commit: &Value, org: &str) {
    let line = commit["budgets"]
        .as_array()
        .and_then(|b| b.iter().find(|l| l["budget"] == "org-daily"))
        .unwrap_or_else(|| panic!("no org-daily line: {commit}"));
    assert!(
        line["key"].as_str().is_some_and(|k| k.contains(org)),
        "{commit}"
    );
}

/// The org's budget as node `c` sees it: (spent, held).
fn budget_of(c: &mut Client, org: &str) -> Option<(i64, i64)> {
    let s = c.call(json!({"op": "status"}));
    s["budgets"].as_array()?.iter().find_map(|b| {
        (b["key"].as_str()?.contains(org)).then(|| {
            (
                b["spent_micros"].as_i64().unwrap_or(0),
                b["held_micros"].as_i64().unwrap_or(0),
            )
        })
    })
}

/// Every event of partition `p` in a stopped node's local copy, checked with `bursar verify`.
fn local_copy(d: &Daemon, p: u32) -> Vec<Value> {
    let dir = d.data_dir.join(format!("p{p}"));
    let dir = dir.to_str().unwrap();
    bursar_tests::bursar(&["--data-dir", dir, "verify"]).ok();
    bursar_tests::bursar(&["--data-dir", dir, "--json", "export"])
        .ok()
        .json_lines()
}

#[test]
fn racing_reservations_through_three_nodes_never_overspend_and_every_node_folds_the_same_log() {
    let Some(mut cluster) = start("race") else {
        return;
    };
    // 500 reservations for one budget from agents on all three nodes at once.
    let allowed: Vec<(String, i64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..15)
            .map(|t| {
                let node = &cluster.nodes[t % 3];
                s.spawn(move || {
                    let mut c = node.client();
                    let mut mine = Vec::new();
                    for k in 0..34 {
                        let n = t * 34 + k;
                        if n >= 500 {
                            break;
                        }
                        let id = format!("r{n}");
                        let a = c.call(reserve(&id, "acme"));
                        assert_eq!(a["ok"], true, "{a}");
                        if a["decision"] == "allow" {
                            mine.push((id, a["hold_micros"].as_i64().unwrap()));
                        }
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let held: i64 = allowed.iter().map(|(_, h)| h).sum();
    assert_eq!(allowed[0].1, 750);
    assert!(held <= 10_000, "overspent: {held} µ$ held of 10000");
    assert_eq!(allowed.len(), 13, "the budget fills exactly");

    // The writers spread over the nodes: two partitions, three nodes, two different writers.
    eventually(Duration::from_secs(30), Duration::from_millis(500), || {
        let holders = cluster.wait_for_writers(Duration::from_secs(30));
        match holders[0] != holders[1] {
            true => Ok(()),
            false => Err(format!(
                "one node still writes both partitions: {holders:?}"
            )),
        }
    });

    // A resend through any node is a duplicate with the original's answer.
    let first = cluster.nodes[0].client().call(reserve("dup", "beta"));
    for i in 1..3 {
        let again = cluster.nodes[i].client().call(reserve("dup", "beta"));
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!(again["seq"], first["seq"]);
    }

    // Read-your-writes on each node's connection, writer or not.
    for (i, d) in cluster.nodes.iter().enumerate() {
        let mut c = d.client();
        let org = format!("ryw{i}");
        let before = budget_of(&mut c, &org).map_or(0, |b| b.0);
        let r = c.call(bursar_tests::record(
            &format!("e-ryw-{i}"),
            json!({"org": org}),
            "gpt-4o-mini",
            1000,
            0,
        ));
        assert_eq!(r["ok"], true, "{r}");
        let after = budget_of(&mut c, &org).expect("the budget shows at once").0;
        assert_eq!(after - before, 150, "node {i} reads its own write at once");
        let check = c.call(
            json!({"op": "check", "labels": {"org": org}, "model": "gpt-4o-mini",
            "estimate": {"input_tokens": 1, "max_output_tokens": 1}}),
        );
        assert!(
            check["lag_ms"].is_u64(),
            "a check in cluster mode says its lag: {check}"
        );
    }

    // Short holds expire; the writer appends each expiry once.
    for k in 0..3 {
        let mut r = reserve(&format!("short{k}"), "beta");
        r["ttl_seconds"] = json!(1);
        assert_eq!(cluster.nodes[k].client().call(r)["decision"], "allow");
    }
    // Every node folds the three expiries (a writer sweeps expired holds every few hundred ms).
    for (i, d) in cluster.nodes.iter().enumerate() {
        eventually(Duration::from_secs(20), Duration::from_millis(200), || {
            let mut c = d.client();
            c.send(&json!({"op": "export"}));
            let (events, _) = c.read_stream();
            let expiries = events
                .iter()
                .filter(|e| {
                    e["type"] == "reservation_expired"
                        && e["body"]["reservation_expired"]["reservation_id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with("short"))
                })
                .count();
            (expiries >= 3)
                .then_some(())
                .ok_or_else(|| format!("node {i}: {expiries} of the 3 expiries"))
        });
    }
    let status = bursar_tests::bursar_command(&["cluster", "status"])
        .env("BURSAR_SOCKET", &cluster.nodes[2].socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success() && text.contains("writer"), "{text}");

    // Every node's copy of every partition: the same events, each chain verified.
    let mut copies: BTreeMap<u32, Vec<Vec<Value>>> = BTreeMap::new();
    for d in cluster.nodes.iter_mut() {
        assert!(d.terminate().success());
    }
    for d in &cluster.nodes {
        for p in 0..2 {
            copies.entry(p).or_default().push(local_copy(d, p));
        }
    }
    let mut expired = BTreeMap::new();
    for (p, per_node) in &copies {
        let longest = per_node.iter().map(Vec::len).max().unwrap();
        for copy in per_node {
            // A node stopped a moment before the last writer's final events may hold a prefix.
            assert_eq!(
                copy[..],
                per_node[0][..copy.len().min(per_node[0].len())],
                "partition {p}"
            );
            assert!(
                copy.len() + 5 >= longest,
                "partition {p}: a copy far behind"
            );
        }
        let longest = per_node.iter().max_by_key(|c| c.len()).unwrap();
        for e in longest {
            if e["type"] == "reservation_expired" {
                let id = e["body"]["reservation_expired"]["reservation_id"].to_string();
                *expired.entry(id).or_insert(0) += 1;
            }
        }
    }
    let shorts: BTreeSet<&String> = expired.keys().filter(|k| k.contains("short")).collect();
    assert_eq!(shorts.len(), 3, "{expired:?}");
    assert!(
        expired.values().all(|n| *n == 1),
        "each expiry once: {expired:?}"
    );
    drop(cluster.nats);
}

/// What an agent saw acknowledged: `record`s (event ids) and allowed `reserve`s (ids).
#[derive(Default)]
struct Acked {
    records: Vec<String>,
    allowed: Vec<String>,
}

/// Agents on `nodes` writing until `stop`: records for orgs acme and beta, reserves for acme.
fn agents(
    sockets: &[(usize, std::path::PathBuf)],
    round: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Acked {
    std::thread::scope(|s| {
        let handles: Vec<_> = sockets
            .iter()
            .map(|(i, socket)| {
                let i = *i;
                s.spawn(move || {
                    let mut acked = Acked::default();
                    let Ok(mut c) = Client::connect(socket) else {
                        return acked;
                    };
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        n += 1;
                        let id = format!("f{round}-{i}-{n}");
                        let org = if n % 2 == 0 { "acme" } else { "beta" };
                        let req = if n % 3 == 0 {
                            reserve(&id, "acme")
                        } else {
                            bursar_tests::record(&id, json!({"org": org}), "gpt-4o-mini", 10, 0)
                        };
                        c.send(&req);
                        let Some(a) = c.try_recv() else { break };
                        if a["ok"] == true && req["op"] == "record" {
                            acked.records.push(id);
                        } else if a["decision"] == "allow" {
                            acked.allowed.push(id);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    acked
                })
            })
            .collect();
        let mut all = Acked::default();
        for h in handles {
            let a = h.join().unwrap();
            all.records.extend(a.records);
            all.allowed.extend(a.allowed);
        }
        all
    })
}

/// How long until a record for `org` through node `via` is acknowledged.
fn time_to_write(cluster: &Nodes, via: usize, org: &str, tag: &str) -> Duration {
    let t = Instant::now();
    let mut c = cluster.nodes[via].client();
    for n in 0.. {
        let a = c.call(bursar_tests::record(
            &format!("probe-{tag}-{n}"),
            json!({"org": org}),
            "gpt-4o-mini",
            10,
            0,
        ));
        if a["ok"] == true {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no write within 60 s: {a}"
        );
    }
    unreachable!()
}

/// The partition org `acme` lies in, and its writer.
fn acme_writer(cluster: &Nodes) -> (usize, usize) {
    cluster.wait_for_writers(Duration::from_secs(30));
    let via = (0..3).find(|i| cluster.nodes[*i].child.is_some()).unwrap();
    let s = cluster.status(via);
    let p = cluster.nodes[via]
        .client()
        .call(reserve("where-acme", "acme"));
    assert_eq!(p["ok"], true, "{p}");
    // Both partitions' holders; acme's is whichever partition knows "where-acme".
    let holders: Vec<String> = s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["holder"].as_str().unwrap_or("").to_string())
        .collect();
    let acme_p = bursard::cluster::partition_of("acme", 2) as usize;
    (acme_p, cluster.index_of(&holders[acme_p]))
}

/// Every node folds the same: each answers `status` with the same budgets once caught up
/// (within 20 s).
fn wait_until_the_folds_agree(cluster: &Nodes, when: &str) {
    eventually(Duration::from_secs(20), Duration::from_millis(200), || {
        let views: Vec<Value> = (0..3)
            .map(|i| cluster.nodes[i].client().call(json!({"op": "status"}))["budgets"].clone())
            .collect();
        match views.iter().all(|v| *v == views[0]) {
            true => Ok(()),
            false => Err(format!("{when}: the nodes' folds differ: {views:?}")),
        }
    });
}

#[test]
fn faults_lose_no_acknowledged_write_never_overspend_and_fail_over_within_ten_seconds() {
    let Some(mut cluster) = start("fault") else {
        return;
    };
    let rounds: usize = std::env::var("BURSAR_CLUSTER_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut acked = Acked::default();
    let mut failovers = Vec::new();
    let kinds = [
        "kill the writer",
        "kill a follower",
        "kill the stream leader",
        "kill a NATS node that does not lead the stream",
        "pause the writer",
    ];
    for round in 0..rounds * kinds.len() {
        let kind = kinds[round % kinds.len()];
        let (acme_p, writer) = acme_writer(&cluster);
        let follower = (0..3).find(|i| *i != writer).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (victim, live): (Option<usize>, Vec<usize>) = match kind {
            "kill the writer" | "pause the writer" => {
                (Some(writer), (0..3).filter(|i| *i != writer).collect())
            }
            "kill a follower" => (Some(follower), (0..3).filter(|i| *i != follower).collect()),
            _ => (None, (0..3).collect()),
        };
        let sockets: Vec<(usize, std::path::PathBuf)> = live
            .iter()
            .map(|i| (*i, cluster.nodes[*i].socket.clone()))
            .collect();
        let got = std::thread::scope(|s| {
            let load = s.spawn(|| agents(&sockets, round, &stop));
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            match kind {
                "kill the writer" | "kill a follower" => {
                    let pid = cluster.nodes[victim.unwrap()].child.as_ref().unwrap().id();
                    let _ = std::process::Command::new("kill")
                        .args(["-9", &pid.to_string()])
                        .status();
                }
                "pause the writer" => cluster.nodes[writer].signal(19),
                "kill the stream leader" => {
                    let leader = cluster
                        .nats
                        .stream_leader(&format!("fault-p{acme_p}"))
                        .expect("the stream has a leader");
                    cluster.nats.kill_node(leader);
                }
                _ => {
                    let stream = format!("fault-p{acme_p}");
                    let leader = cluster
                        .nats
                        .stream_leader(&stream)
                        .expect("the stream has a leader");
                    cluster.nats.kill_node((leader + 1) % 3);
                    if cluster.nats.stream_leader(&stream) != Some(leader) {
                        // The leader named was a server's stale view: the round killed the
                        // leader after all (still a fault, but not the one it names).
                        eprintln!("round {round}: the stream's leader changed with the kill");
                    }
                }
            }
            eprintln!("{kind} at {:?}", std::time::SystemTime::now());
            let via = live[0];
            let took = time_to_write(&cluster, via, "acme", &format!("{round}"));
            if kind != "kill a follower" && kind != "kill the stream leader" {
                // Writes go on within 10 s of a writer's death or pause (SPEC §13: "another
                // node takes over within 10 seconds"), and within 20 s of a NATS node's that did
                // not lead the stream (no lease holder died: the nodes connected to it
                // reconnect to another server, which may need a few seconds to route to the
                // stream's leader again; usually a few ms, 1.5 s when it did).
                failovers.push((kind, took, t.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            load.join().unwrap()
        });
        acked.records.extend(got.records);
        acked.allowed.extend(got.allowed);
        // Heal: the paused writer resumes (it must not append: its lease is gone), killed
        // processes come back and follow the streams again.
        match kind {
            "pause the writer" => {
                cluster.nodes[writer].signal(18);
                // Its next append is refused; it steps down and follows.
                std::thread::sleep(Duration::from_secs(2));
            }
            "kill the writer" | "kill a follower" => {
                let v = victim.unwrap();
                cluster.nodes[v].child = None;
                cluster.nodes[v].spawn().expect("the node rejoins");
            }
            _ => {
                for i in 0..3 {
                    cluster.nats.start_node(i).unwrap();
                }
                cluster.nats.wait_ready(Duration::from_secs(30)).unwrap();
                // The restarted server caught up, so that the next round's NATS kill leaves
                // the streams their quorum.
                cluster
                    .nats
                    .wait_streams_current(Duration::from_secs(30))
                    .unwrap();
            }
        }
        // After each round: a writer for every partition again, every node's fold the same,
        // every node's copies verified. (Lost writes and overspending are checked over the
        // whole logs at the end: a log only grows, so one lost or overspent in a round is
        // still so then.)
        cluster.wait_for_writers(Duration::from_secs(30));
        wait_until_the_folds_agree(&cluster, &format!("after round {round} ({kind})"));
        for i in 0..3 {
            let v = cluster.nodes[i].client().call(json!({"op": "verify"}));
            assert_eq!(v["ok"], true, "node {i} after round {round} ({kind}): {v}");
        }
    }
    for (kind, took, _) in &failovers {
        let bound = if kind.starts_with("kill a NATS node") {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(10)
        };
        assert!(
            *took <= bound,
            "{kind}: failover took {took:?} (at most {bound:?})\n{}",
            cluster.logs()
        );
    }
    eprintln!("failovers: {failovers:?}");

    for d in cluster.nodes.iter_mut() {
        assert!(d.terminate().success());
    }
    // Nothing acknowledged was lost; the chains verify; the budget was never overspent.
    let mut events: BTreeSet<String> = BTreeSet::new();
    let mut allowed: BTreeSet<String> = BTreeSet::new();
    let mut acme_log = Vec::new();
    for p in 0..2 {
        let copies: Vec<Vec<Value>> = cluster.nodes.iter().map(|d| local_copy(d, p)).collect();
        let longest = copies.iter().max_by_key(|c| c.len()).unwrap();
        for c in &copies {
            assert_eq!(c[..], longest[..c.len()], "partition {p}: the copies agree");
        }
        if p == bursard::cluster::partition_of("acme", 2) {
            acme_log = longest.clone();
        }
        for e in longest {
            if let Some(id) = e["body"]["usage_recorded"]["event_id"].as_str() {
                events.insert(id.to_string());
            }
            if e["type"] == "reservation_created" {
                allowed.insert(
                    e["body"]["reservation_created"]["reservation_id"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
        }
    }
    let lost: Vec<&String> = acked
        .records
        .iter()
        .filter(|id| !events.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged records lost: {lost:?}");
    let lost: Vec<&String> = acked
        .allowed
        .iter()
        .filter(|id| !allowed.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged reservations lost: {lost:?}");
    // Never more held for acme than its $0.01 at any point of its log (holds made in long runs
    // expire after the default TTL and free their part: counted as they go).
    let (mut live, mut most) = (BTreeSet::new(), 0usize);
    for e in &acme_log {
        let body = &e["body"];
        if let Some(r) = body.get("reservation_created") {
            if r["labels"]["org"] == "acme" {
                live.insert(r["reservation_id"].to_string());
            }
        }
        for end in ["reservation_expired", "reservation_released"] {
            if let Some(r) = body.get(end) {
                live.remove(&r["reservation_id"].to_string());
            }
        }
        most = most.max(live.len());
    }
    assert!(
        most <= 13,
        "acme's $0.01 overspent: {most} holds of 750 µ$ live at once"
    );
    assert!(
        acked.records.len() > 20,
        "the agents wrote through the faults"
    );
}

#[test]
fn without_a_quorum_writes_fail_closed_and_reads_say_how_stale_they_are() {
    let Some(mut cluster) = start("quorum") else {
        return;
    };
    let mut c = cluster.nodes[1].client();
    let ok = c.call(bursar_tests::record(
        "before",
        json!({"org": "acme"}),
        "gpt-4o-mini",
        1000,
        0,
    ));
    assert_eq!(ok["ok"], true, "{ok}");
    // Every node folded it (a follower gets it a moment after the writer answered).
    for (i, d) in cluster.nodes.iter().enumerate() {
        let mut c = d.client();
        eventually(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || match budget_of(&mut c, "acme").map(|b| b.0) {
                Some(150) => Ok(()),
                seen => Err(format!("node {i} never folded the write: {seen:?}")),
            },
        );
    }
    // Two of the three NATS servers gone: no stream has a quorum.
    cluster.nats.kill_node(0);
    cluster.nats.kill_node(1);
    for (i, d) in cluster.nodes.iter().enumerate() {
        let mut c = d.client();
        let a = c.call(bursar_tests::record(
            &format!("no-quorum-{i}"),
            json!({"org": "acme"}),
            "gpt-4o-mini",
            1000,
            0,
        ));
        assert_eq!(a["ok"], false, "node {i} wrote without a quorum: {a}");
        assert_eq!(a["error"]["code"], "unavailable", "{a}");
    }
    // Reads go on from each node's fold, saying how stale it may be: a second and more, once
    // the servers left have seen that they lost their quorum (the one that led a stream may
    // answer for it a few seconds more).
    for (i, d) in cluster.nodes.iter().enumerate() {
        let mut c = d.client();
        eventually(Duration::from_secs(30), Duration::from_millis(200), || {
            let check = c.call(
                json!({"op": "check", "labels": {"org": "acme"}, "model": "gpt-4o-mini",
                "estimate": {"input_tokens": 1, "max_output_tokens": 1}}),
            );
            assert_eq!(check["ok"], true, "{check}");
            (check["lag_ms"].as_u64().unwrap() >= 1000)
                .then_some(())
                .ok_or_else(|| format!("node {i}: {check}"))
        });
        let (spent, _) = budget_of(&mut c, "acme").unwrap();
        assert_eq!(spent, 150, "node {i} still reads what was written");
        let status = c.call(json!({"op": "status"}));
        assert!(status["lag_ms"].as_u64().unwrap() >= 1000, "{status}");
    }
    // The quorum back: writes go on.
    cluster.nats.start_node(0).unwrap();
    cluster.nats.start_node(1).unwrap();
    cluster.nats.wait_ready(Duration::from_secs(30)).unwrap();
    let took = time_to_write(&cluster, 0, "acme", "after");
    assert!(
        took < Duration::from_secs(30),
        "writes came back after {took:?}"
    );
}

/// SPEC §13: without NATS "reads go on from the local fold and say how stale they are" — also
/// on a node restarted while NATS is down: it serves reads from its copies, answers writes
/// `unavailable`, and joins the cluster once NATS is back.
#[test]
fn a_node_restarted_while_nats_is_down_reads_from_its_copies_and_joins_when_nats_is_back() {
    let Some(mut cluster) = start("offline") else {
        return;
    };
    let ok = cluster.nodes[0].client().call(bursar_tests::record(
        "before",
        json!({"org": "acme"}),
        "gpt-4o-mini",
        1000,
        0,
    ));
    assert_eq!(ok["ok"], true, "{ok}");
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match budget_of(&mut cluster.nodes[2].client(), "acme").map(|b| b.0) {
            Some(150) => Ok(()),
            seen => Err(format!("node c never folded the write: {seen:?}")),
        },
    );
    // Node c stops, then two NATS servers go (no quorum: NATS answers, JetStream cannot),
    // then node c starts again; then the third server goes too and node c starts once more.
    for (gone, says) in [
        (vec![0, 1], "cannot join through NATS"),
        (vec![2], "cannot reach NATS"),
    ] {
        assert!(cluster.nodes[2].terminate().success());
        for i in gone {
            cluster.nats.kill_node(i);
        }
        std::thread::sleep(Duration::from_secs(1));
        let before = cluster.nodes[2].stderr().len();
        cluster.nodes[2]
            .spawn()
            .expect("a node with copies of every partition starts without NATS");
        let log = cluster.nodes[2].stderr()[before..].to_string();
        assert!(
            log.contains(says) && log.contains("serving reads from this node's copies"),
            "{log}"
        );
        let mut c = cluster.nodes[2].client();
        assert_eq!(budget_of(&mut c, "acme").map(|b| b.0), Some(150));
    }
    // Its [cluster] changed while NATS is away: nothing can check it, so it does not serve.
    assert!(cluster.nodes[2].terminate().success());
    let file = cluster.nodes[2].config.clone().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("replicas = 3", "replicas = 1")).unwrap();
    let err = cluster.nodes[2].spawn().unwrap_err();
    assert!(
        err.contains("differ from the ones it last joined with"),
        "{err}"
    );
    std::fs::write(&file, text).unwrap();
    cluster.nodes[2].spawn().unwrap();
    let mut c = cluster.nodes[2].client();
    let check = c.call(
        json!({"op": "check", "labels": {"org": "acme"}, "model": "gpt-4o-mini",
        "estimate": {"input_tokens": 1, "max_output_tokens": 1}}),
    );
    assert_eq!(check["ok"], true, "{check}");
    assert!(check["lag_ms"].as_u64().unwrap() >= 1000, "{check}");
    let refused = c.call(bursar_tests::record(
        "while-down",
        json!({"org": "acme"}),
        "gpt-4o-mini",
        1000,
        0,
    ));
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    let status = c.call(json!({"op": "cluster_status"}));
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["partitions"][0]["nodes"][0]["node"], "c", "{status}");

    // NATS back: node c joins, follows every partition and writes through the cluster.
    for i in 0..3 {
        cluster.nats.start_node(i).unwrap();
    }
    cluster.nats.wait_ready(Duration::from_secs(30)).unwrap();
    time_to_write(&cluster, 2, "acme", "after");
    let ok = cluster.nodes[0].client().call(bursar_tests::record(
        "through-a",
        json!({"org": "acme"}),
        "gpt-4o-mini",
        1000,
        0,
    ));
    assert_eq!(ok["ok"], true, "{ok}");
    // Node a reads its own write; node c, following again, comes to the same.
    let want = budget_of(&mut cluster.nodes[0].client(), "acme").map(|b| b.0);
    assert!(want.is_some_and(|w| w > 300), "{want:?}");
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match budget_of(&mut c, "acme") {
            seen if seen.map(|b| b.0) == want => Ok(()),
            seen => Err(format!(
                "node c does not follow: {seen:?}\n{}",
                cluster.logs()
            )),
        },
    );
    cluster.wait_for_writers(Duration::from_secs(30));
}

/// A commit names only its reservation: a node routes it to the partition that knows it. A
/// reservation denied (or ended) is remembered for an hour, longer than a short idempotency
/// window remembers its id: its commit still reaches that partition, through any node, and is
/// recorded against what the reservation asked for, not as an unknown reservation's on
/// partition 0.
#[test]
fn a_commit_of_a_reservation_denied_past_the_id_window_reaches_its_partition() {
    let Some(cluster) = start_with("denied", "\n[daemon]\nidempotency_window_seconds = 1\n") else {
        return;
    };
    let org = &org_on_each_partition()[1];
    let mut a = cluster.nodes[0].client();
    // $0.15 of input against the org's $0.01 a day.
    let big = json!({"op": "reserve", "reservation_id": "r-big", "labels": {"org": org},
        "model": "gpt-4o-mini", "estimate": {"input_tokens": 1_000_000, "max_output_tokens": 10}});
    let denied = a.call(big);
    assert_eq!(denied["decision"], "deny", "{denied}");
    std::thread::sleep(Duration::from_millis(1500));
    // A later event of that partition: its fold forgets the denial's id.
    let r = a.call(
        json!({"op": "record", "event_id": "e-later", "labels": {"org": org},
        "model": "gpt-4o-mini", "usage": {"input_tokens": 1, "output_tokens": 0}}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let mut c = cluster.nodes[2].client();
    let commit = c.call(
        json!({"op": "commit", "reservation_id": "r-big", "event_id": "e-big",
        "usage": {"input_tokens": 1000, "output_tokens": 10}}),
    );
    assert_eq!(commit["ok"], true, "{commit}");
    assert_eq!(commit["reservation"], "denied", "{commit}");
    assert_counts_against_org(&commit, org);
}

/// A `commit` without labels and a `release` through a node that has not folded their
/// reservations yet (catching up after a restart) reach the partition that holds them: the
/// node waits until its fold has caught up rather than sending them to partition 0.
#[test]
fn a_commit_and_a_release_through_a_node_still_catching_up_reach_the_reservations_partition() {
    let Some(mut cluster) = start("catchup") else {
        return;
    };
    let org = org_on_each_partition()[1].clone();
    // Another org of the same partition, for the filling events (each org has its own budget).
    let filler = (0..)
        .map(|i| format!("filler{i}"))
        .find(|o| bursard::cluster::partition_of(o, 2) == 1)
        .unwrap();
    cluster.wait_for_writers(Duration::from_secs(30));
    assert!(cluster.nodes[2].terminate().success());
    // While node c is away: many large events on the org's partition (a second or more for
    // node c to catch up with), then the two holds, through a.
    let mut a = cluster.nodes[0].client();
    let mut labels = json!({"org": filler});
    for k in 0..24 {
        labels[format!("k{k}")] = json!(format!("{k:02}").repeat(100));
    }
    let n = 12_000;
    for chunk in 0..n / 100 {
        for i in 0..100 {
            a.send(&bursar_tests::record(
                &format!("fill-{chunk}-{i}"),
                labels.clone(),
                "gpt-4o-mini",
                1,
                0,
            ));
        }
        for _ in 0..100 {
            let r = a.recv();
            assert_eq!(r["ok"], true, "{r}");
        }
    }
    for id in ["late-commit", "late-hold"] {
        let held = a.call(reserve(id, &org));
        assert_eq!(held["decision"], "allow", "{held}");
    }
    // Node c back: its socket is up before its fold has caught up with the partition.
    cluster.nodes[2].spawn().expect("node c starts again");
    let started = Instant::now();
    let mut c = cluster.nodes[2].client();
    // A node still behind after 5 s says so (`unavailable`): the agent resends.
    let mut resent = |request: Value| loop {
        let answer = c.call(request.clone());
        if answer["error"]["code"] != "unavailable" || started.elapsed() > Duration::from_secs(60) {
            return answer;
        }
    };
    let committed = resent(
        json!({"op": "commit", "reservation_id": "late-commit", "event_id": "late-usage",
        "usage": {"input_tokens": 100, "output_tokens": 10}}),
    );
    eprintln!("committed after {:?}: {committed}", started.elapsed());
    assert_eq!(committed["ok"], true, "{committed}");
    // Recorded against the hold's org (on partition 0 it would count against no org).
    assert_counts_against_org(&committed, &org);
    let released = resent(json!({"op": "release", "reservation_id": "late-hold"}));
    assert_eq!(released["ok"], true, "{released}");
    // Both on their partition: resends through node a are their duplicates, and no hold is
    // left.
    let again = a.call(json!({"op": "release", "reservation_id": "late-hold"}));
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["seq"], released["seq"], "{again}");
    assert_eq!(
        budget_of(&mut a, &org).map(|b| b.1),
        Some(0),
        "no hold left"
    );
}

/// `partitions`, `partition_by` and `replicas` are fixed when the cluster is created (SPEC
/// §13): a node whose file says otherwise would create partitions the others never write or
/// follow, and give a scope a second writer. It refuses to start (exit 1, one line naming the
/// settings) and writes nothing; one that agrees joins.
#[test]
fn a_node_whose_partitions_differ_from_the_clusters_refuses_to_start() {
    let Some(cluster) = start("settings") else {
        return;
    };
    let urls = cluster.nats.urls();
    for (change, from, to) in [
        ("partitions", "partitions = 2", "partitions = 3"),
        // The budgets' `group_by` too, so that the file is valid on its own.
        ("partition_by", "\"org\"", "\"team\""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("bursar.toml");
        std::fs::write(&cfg, policy(&urls, "d", "settings").replace(from, to)).unwrap();
        let data = dir.path().join("data");
        let socket = dir.path().join("s.sock");
        let flag = std::ffi::OsStr::new;
        let (status, err) = bursar_tests::bursard_until_exit(&[
            flag("--config"),
            cfg.as_os_str(),
            flag("--data-dir"),
            data.as_os_str(),
            flag("--socket"),
            socket.as_os_str(),
        ]);
        assert_eq!(status.code(), Some(1), "{change}: {err}");
        assert!(
            err.contains("differ from the ones the cluster was created with"),
            "{err}"
        );
        assert!(!socket.exists(), "{change}: served");
        assert!(!data.exists(), "{change}: wrote its data dir");
    }
    // The three nodes agree: every partition still has its writer.
    cluster.wait_for_writers(Duration::from_secs(10));
}

#[test]
fn reload_on_one_node_applies_that_nodes_file_to_every_partition_on_every_node() {
    let Some(mut cluster) = start("reload") else {
        return;
    };
    // Asked: a node that does not write every partition, so that at least one partition's
    // writer is another node, whose own file is left as it was.
    let holders = cluster.wait_for_writers(Duration::from_secs(10));
    let asked = if holders.iter().all(|h| *h == holders[0]) {
        (0..3).find(|i| ["a", "b", "c"][*i] != holders[0]).unwrap()
    } else {
        cluster.index_of(&holders[0])
    };
    let urls = cluster.nats.urls();
    let file = |text: String| std::fs::write(cluster.nodes[asked].config.as_ref().unwrap(), text);
    let node = ["a", "b", "c"][asked];
    // Each node keeps in its data dir that the partitions took its file, once its fold of
    // every partition holds that policy (a node's first second).
    for d in &cluster.nodes {
        let record = d.data_dir.join("policy-file-read.json");
        eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            (record.exists())
                .then_some(())
                .ok_or_else(|| format!("{} not written", record.display()))
        });
    }

    // A file that does not parse is refused, and nothing changes anywhere.
    file(policy(&urls, node, "reload").replace("max_usd = 0.01", "max_usd = \"lots\"")).unwrap();
    let refused = cluster.nodes[asked].client().call(json!({"op": "reload"}));
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_usd")),
        "{refused}"
    );

    // A file whose [cluster] is not the cluster's, or that has none (its budgets then never
    // checked against the partitioning), is refused too.
    let base = policy(&urls, node, "reload");
    let without_cluster = base[base.find("[[budget]]").unwrap()..].to_string();
    for (text, says) in [
        (
            base.replace("partitions = 2", "partitions = 3"),
            "differ from the cluster's",
        ),
        (without_cluster, "has no [cluster]"),
    ] {
        file(text).unwrap();
        let refused = cluster.nodes[asked].client().call(json!({"op": "reload"}));
        assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{refused}"
        );
    }

    // The new file on the asked node only, then one `reload` through it.
    file(policy(&urls, node, "reload").replace("max_usd = 0.01", "max_usd = 0.02")).unwrap();
    let answer = cluster.nodes[asked].client().call(json!({"op": "reload"}));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["partitions"], 2, "{answer}");
    assert_eq!(answer["policy_version"], 2, "{answer}");
    // An org on each partition, read through every node.
    let orgs = org_on_each_partition();
    let every_node_reads = |cluster: &Nodes, limit: u64| {
        for (i, d) in cluster.nodes.iter().enumerate() {
            for org in &orgs {
                eventually(Duration::from_secs(10), Duration::from_millis(100), || {
                    let check = d
                        .client()
                        .call(json!({"op": "check", "labels": {"org": org},
                        "model": "gpt-4o-mini",
                        "estimate": {"input_tokens": 1, "max_output_tokens": 1}}));
                    (check["budgets"][0]["limit_micros"] == limit)
                        .then_some(())
                        .ok_or_else(|| {
                            format!(
                                "node {i}, org {org}: not the limit {limit} (asked node \
                                 {asked}, writers {holders:?}): {check}"
                            )
                        })
                });
            }
        }
    };
    every_node_reads(&cluster, 20_000);
    // Each partition's log says where the new policy came from: the asked node's file (read
    // through another node).
    let source = cluster.nodes[asked]
        .config
        .as_ref()
        .unwrap()
        .display()
        .to_string();
    let mut c = cluster.nodes[(asked + 1) % 3].client();
    c.send(&json!({"op": "export"}));
    let (events, _) = c.read_stream();
    for p in 0..2u64 {
        let applied: Vec<&Value> = events
            .iter()
            .filter(|e| e["partition"] == p && e["type"] == "policy_applied")
            .collect();
        assert_eq!(applied.len(), 2, "partition {p}: {applied:?}");
        assert_eq!(
            applied[1]["body"]["policy_applied"]["source"],
            source.as_str(),
            "partition {p}"
        );
    }

    // A SIGHUP to another node, whose file is as it read it at start (stale): nothing is put
    // back anywhere (the node says so).
    let other = (asked + 1) % 3;
    let says_unchanged = |cluster: &Nodes, i: usize| {
        eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            let log = cluster.nodes[i].stderr();
            log.contains("is as this node last read it: nothing to apply")
                .then_some(())
                .ok_or_else(|| format!("node {i} never said its file was unchanged: {log}"))
        });
    };
    cluster.nodes[other].signal(1);
    says_unchanged(&cluster, other);
    every_node_reads(&cluster, 20_000);
    // The third node restarted with its file as stale: its first SIGHUP puts nothing back
    // either (its data dir remembers how the file last read).
    let third = (asked + 2) % 3;
    assert!(cluster.nodes[third].terminate().success());
    cluster.nodes[third].spawn().expect("the node starts again");
    assert_eq!(
        cluster.nodes[third].client().call(json!({"op": "hello"}))["ok"],
        true
    );
    cluster.nodes[third].signal(1);
    says_unchanged(&cluster, third);
    every_node_reads(&cluster, 20_000);
    // Its file edited, a SIGHUP applies it cluster-wide.
    let other_file = cluster.nodes[other].config.as_ref().unwrap();
    let other_text = std::fs::read_to_string(other_file).unwrap();
    std::fs::write(
        other_file,
        other_text.replace("max_usd = 0.01", "max_usd = 0.03"),
    )
    .unwrap();
    cluster.nodes[other].signal(1);
    every_node_reads(&cluster, 30_000);
    // A file deployed before a restart, the cluster running another policy: the node's first
    // SIGHUP applies it.
    assert!(cluster.nodes[other].terminate().success());
    let other_file = cluster.nodes[other].config.clone().unwrap();
    let other_text = std::fs::read_to_string(&other_file).unwrap();
    std::fs::write(
        &other_file,
        other_text.replace("max_usd = 0.03", "max_usd = 0.04"),
    )
    .unwrap();
    cluster.nodes[other].spawn().expect("the node starts again");
    // Serving: its signal handler is in place.
    assert_eq!(
        cluster.nodes[other].client().call(json!({"op": "hello"}))["ok"],
        true
    );
    every_node_reads(&cluster, 30_000);
    cluster.nodes[other].signal(1);
    every_node_reads(&cluster, 40_000);
}

#[test]
fn a_reserve_waiting_in_line_through_a_follower_gets_its_slot_after_longer_than_a_forward_may_take()
{
    let Some(cluster) = start("wait") else {
        return;
    };
    let (_, writer) = acme_writer(&cluster);
    let follower = (0..3).find(|i| *i != writer).unwrap();
    let gpu = |id: &str, wait_ms: Option<u64>| {
        let mut r = json!({"op": "reserve", "reservation_id": id,
            "labels": {"org": "acme", "pool": "gpu"}, "model": "gpt-4o-mini",
            "estimate": {"input_tokens": 1, "max_output_tokens": 1}});
        if let Some(w) = wait_ms {
            r["wait_ms"] = json!(w);
        }
        r
    };
    let first = cluster.nodes[writer].client().call(gpu("slot-1", None));
    assert_eq!(first["decision"], "allow", "{first}");
    let waiter = cluster.nodes[follower].socket.clone();
    let waited = std::thread::spawn(move || {
        let t = Instant::now();
        let a = Client::connect(&waiter)
            .unwrap()
            .call(gpu("slot-2", Some(30_000)));
        (a, t.elapsed())
    });
    // Longer than a forwarded write may take without `wait_ms` (12 s).
    std::thread::sleep(Duration::from_secs(13));
    let released = cluster.nodes[writer]
        .client()
        .call(json!({"op": "release", "reservation_id": "slot-1"}));
    assert_eq!(released["ok"], true, "{released}");
    let (answer, took) = waited.join().unwrap();
    assert_eq!(answer["decision"], "allow", "{answer}");
    // (`waited_ms` counts from its arrival at the writer that decided it: a writer that hands
    // the partition over meanwhile sends it to the next one, where it waits again.)
    assert!(answer["waited_ms"].is_u64(), "{answer}");
    assert!(
        took >= Duration::from_secs(13),
        "answered after {took:?}: {answer}"
    );
}

#[test]
fn every_node_tails_exports_verifies_and_reports_every_partition_through_its_socket() {
    // Per-bucket gauges for the most utilized bucket only, over both partitions.
    let Some(cluster) = start_with(
        "reads",
        "\n[daemon]\nmetrics_listen = \"127.0.0.1:0\"\nmetrics_max_buckets = 1\n",
    ) else {
        return;
    };
    let orgs = org_on_each_partition();
    // A follower of every partition, through node c, before anything is written.
    let mut follower = cluster.nodes[2].client();
    follower.send(&json!({"op": "tail", "follow": true, "types": ["usage_recorded"]}));
    // Three usages on partition 0's org and two on partition 1's, written through node a.
    let mut a = cluster.nodes[0].client();
    for (org, n) in [(&orgs[0], 3), (&orgs[1], 2)] {
        for i in 0..n {
            let r = a.call(bursar_tests::record(
                &format!("{org}-{i}"),
                json!({"org": org}),
                "gpt-4o-mini",
                1000,
                500,
            ));
            assert_eq!(r["ok"], true, "{r}");
        }
    }
    // The follower sees all five, each with its partition, as they are folded on node c.
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    while seen.values().sum::<usize>() < 5 {
        let line = follower.recv();
        let e = &line["event"];
        assert_eq!(e["type"], "usage_recorded", "{line}");
        let p = e["partition"].as_u64().expect("a partition on each line");
        assert_eq!(
            e["body"]["usage_recorded"]["labels"]["org"], orgs[p as usize],
            "{line}"
        );
        *seen.entry(p).or_default() += 1;
    }
    assert_eq!(seen, BTreeMap::from([(0, 3), (1, 2)]));

    // Export through node b: every partition, one after the other, each an unbroken chain
    // (once node b folded all five: it follows both partitions a moment behind their writers).
    let mut b = cluster.nodes[1].client();
    for (org, n) in [(&orgs[0], 3), (&orgs[1], 2)] {
        eventually(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || match budget_of(&mut b, &format!("org={org}")).map(|s| s.0) {
                seen if seen == Some(n * 450) => Ok(()),
                seen => Err(format!("node b never folded {org}'s usage: {seen:?}")),
            },
        );
    }
    b.send(&json!({"op": "export"}));
    let (events, end) = b.read_stream();
    assert_eq!(end["count"], events.len(), "{end}");
    let mut chains: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for e in &events {
        chains
            .entry(e["partition"].as_u64().unwrap())
            .or_default()
            .push(e);
    }
    let partitions: Vec<u64> = events
        .iter()
        .map(|e| e["partition"].as_u64().unwrap())
        .collect();
    assert!(
        partitions.windows(2).all(|w| w[0] <= w[1]),
        "partition after partition"
    );
    for (p, chain) in &chains {
        for (i, e) in chain.iter().enumerate() {
            assert_eq!(e["seq"], i as u64 + 1, "partition {p}: dense seqs from 1");
            if i > 0 {
                assert_eq!(
                    e["prev_hash"],
                    chain[i - 1]["hash"],
                    "partition {p} chained"
                );
            }
        }
    }
    // The same export as CSV through the CLI: a `partition` column tells the seqs apart.
    let csv = cluster.nodes[1]
        .cli(&["export", "--format", "csv"])
        .ok()
        .stdout;
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows[0].first(), Some(&"seq"), "{csv}");
    assert_eq!(rows[0].last(), Some(&"partition"), "{csv}");
    assert_eq!(rows.len(), events.len() + 1, "{csv}");
    for (row, e) in rows[1..].iter().zip(&events) {
        assert_eq!(row[0], e["seq"].to_string(), "{csv}");
        assert_eq!(
            row.last().copied(),
            Some(e["partition"].to_string().as_str())
        );
    }
    b.send(&json!({"op": "export", "partition": 1}));
    let (one, _) = b.read_stream();
    assert_eq!(one.len(), chains[&1].len());
    assert!(one.iter().all(|e| e["partition"] == 1));

    // Verify through node b: each partition's copy, and the events the export showed.
    let v = b.call(json!({"op": "verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["events"], events.len(), "{v}");
    for (p, chain) in &chains {
        let part = &v["partitions"][*p as usize];
        assert_eq!(part["events"], chain.len(), "{v}");
        assert_eq!(part["head"], chain.last().unwrap()["hash"], "{v}");
    }
    let text = cluster.nodes[1].cli(&["verify"]).ok().stdout;
    assert!(
        text.contains("in 2 partitions, every chain intact"),
        "{text}"
    );

    // Status through node b: the most utilized bucket over both partitions first.
    let st = b.call(json!({"op": "status", "limit": 1}));
    assert_eq!(st["budgets"][0]["key"], format!("org={}", orgs[0]), "{st}");
    assert_eq!(st["truncated"], true, "{st}");
    assert_eq!(st["budgets"].as_array().unwrap().len(), 1, "{st}");

    // A report through node a: each org's usage from its own partition, costs as exported.
    let report = a.call(json!({"op": "report", "group_by": ["org"]}));
    assert_eq!(report["ok"], true, "{report}");
    for (p, org) in orgs.iter().enumerate() {
        let cost: i64 = chains[&(p as u64)]
            .iter()
            .filter_map(|e| e["cost_micros"].as_i64())
            .sum();
        let rows: Vec<&Value> = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["group"]["org"] == *org)
            .collect();
        let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
        let reported: i64 = rows
            .iter()
            .map(|r| r["cost_micros"].as_i64().unwrap())
            .sum();
        assert_eq!(requests, [3, 2][p], "{report}");
        assert_eq!(reported, cost, "{report}");
    }

    // What a cluster node cannot answer, it says, naming the field.
    let e = b.call(json!({"op": "tail", "from_seq": 1}));
    assert_eq!(
        (e["error"]["code"].as_str(), e["error"]["field"].as_str()),
        (Some("bad_request"), Some("partition")),
        "{e}"
    );
    let e = b.call(json!({"op": "export", "partition": 2}));
    assert_eq!(e["error"]["field"], "partition", "{e}");
    let text = cluster.nodes[1].cli(&["tail", "-n", "2"]);
    assert_ne!(text.code, Some(0));
    assert!(text.stderr.contains("--partition"), "{}", text.stderr);
    let text = cluster.nodes[1]
        .cli(&["--json", "tail", "-n", "2", "--partition", "0"])
        .ok();
    let lines = text.json_lines();
    assert_eq!(lines.len(), 2, "{}", text.stdout);
    assert!(lines.iter().all(|l| l["partition"] == 0));

    // Each node serves metrics: its folds per partition, the writers, the requests it answered.
    let writers = cluster.wait_for_writers(Duration::from_secs(10));
    for (i, d) in cluster.nodes.iter().enumerate() {
        let text = bursar_tests::metrics::scrape(&bursar_tests::metrics::metrics_addr(d));
        let sample = |series: &str| bursar_tests::metrics::sample(&text, series);
        for p in 0..2 {
            let head = sample(&format!("bursar_log_head_seq{{partition=\"{p}\"}}"))
                .unwrap_or_else(|| panic!("node {i}: no head of partition {p}:\n{text}"));
            assert_eq!(head, chains[&p].len() as f64, "node {i}, partition {p}");
            let writer = sample(&format!("bursar_cluster_writer{{partition=\"{p}\"}}")).unwrap();
            assert_eq!(
                writer == 1.0,
                writers[p as usize] == ["a", "b", "c"][i],
                "node {i}"
            );
            assert!(sample(&format!(
                "bursar_cluster_lag_milliseconds{{partition=\"{p}\"}}"
            ))
            .is_some());
        }
        if i == 0 {
            let records = sample(r#"bursar_requests_total{op="record",outcome="ok"}"#);
            assert_eq!(
                records,
                Some(5.0),
                "node a answered the five records:\n{text}"
            );
        }
        // The most utilized bucket of both partitions (partition 0's org: 3 usages to 2), and
        // the other counted as not exported.
        let spent: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("bursar_bucket_spent_micros{"))
            .collect();
        assert_eq!(
            spent,
            [format!(
                "bursar_bucket_spent_micros{{budget=\"org-daily\",key=\"org={}\"}} 1350",
                orgs[0]
            )],
            "node {i}:\n{text}"
        );
        assert_eq!(sample("bursar_live_buckets"), Some(2.0), "node {i}");
        assert_eq!(sample("bursar_buckets_not_exported"), Some(1.0), "node {i}");
    }
    // A dry-run repricing through node b: every partition's usage priced again (450 → 900 µ$
    // a record), each org's bucket in the diff; nothing changes.
    let prices =
        json!({"models": {"gpt-4o-mini": {"input_per_mtok": 0.3, "output_per_mtok": 1.2}}});
    let dry = b.call(json!({"op": "replay", "pricing": prices}));
    assert_eq!(dry["ok"], true, "{dry}");
    assert_eq!(dry["events"], events.len(), "{dry}");
    assert_eq!(dry["total_delta_micros"], 5 * 450, "{dry}");
    assert_eq!(dry["applied"], false, "{dry}");
    let diff_keys: BTreeSet<String> = dry["diff"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        diff_keys,
        orgs.iter().map(|o| format!("org={o}")).collect(),
        "{dry}"
    );
    // A what-if through node b with a $0.001 budget: partition 0's org (3 × 450 µ$) runs out,
    // partition 1's (2 × 450) does not.
    let urls = cluster.nats.urls();
    let text = policy(&urls, "b", "reads").replace("max_usd = 0.01", "max_usd = 0.001");
    let what_if = b.call(json!({"op": "replay", "policy": text}));
    assert_eq!(what_if["ok"], true, "{what_if}");
    assert_eq!(what_if["events"], events.len(), "{what_if}");
    assert_eq!(what_if["exhausted_total"], 1, "{what_if}");
    assert_eq!(
        what_if["exhausted"][0]["key"],
        format!("org={}", orgs[0]),
        "{what_if}"
    );
    // Applied through node c: each partition's writer appends the new prices and folds again;
    // every node then reads the repriced spend.
    let applied = cluster.nodes[2]
        .client()
        .call(json!({"op": "replay", "pricing": prices, "apply": true}));
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(applied["applied"], true, "{applied}");
    assert_eq!(applied["total_delta_micros"], 5 * 450, "{applied}");
    for (i, d) in cluster.nodes.iter().enumerate() {
        let mut c = d.client();
        eventually(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || match budget_of(&mut c, &format!("org={}", orgs[0])).map(|b| b.0) {
                seen if seen == Some(3 * 900) => Ok(()),
                _ => Err(format!(
                    "node {i}: not repriced: {}",
                    c.call(json!({"op": "status"}))
                )),
            },
        );
        let v = c.call(json!({"op": "verify"}));
        assert_eq!(v["ok"], true, "{v}");
    }
    // A check with wait_ms through node c waits for the gpu slot that a reserve through node a
    // holds, and is allowed once a release through node b reaches node c's fold.
    let gpu = json!({"org": orgs[1], "pool": "gpu"});
    let held = a.call(bursar_tests::reserve(
        "gpu-1",
        gpu.clone(),
        "gpt-4o-mini",
        10,
        10,
    ));
    assert_eq!(held["decision"], "allow", "{held}");
    let mut waiter = cluster.nodes[2].client();
    let check = json!({"op": "check", "labels": gpu, "model": "gpt-4o-mini",
        "estimate": {"input_tokens": 10, "max_output_tokens": 10}});
    // Once node c folded the hold (a follower reads a moment behind the writer).
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match waiter.call(check.clone()) {
            a if a["decision"] == "deny" => Ok(()),
            a => Err(format!("node c never folded the hold: {a}")),
        },
    );
    let mut waiting = check.clone();
    waiting["wait_ms"] = json!(10_000);
    waiter.send(&waiting);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        waiter.poll_recv().is_none(),
        "the check waits while the slot is held"
    );
    let released = b.call(json!({"op": "release", "reservation_id": "gpu-1"}));
    assert_eq!(released["ok"], true, "{released}");
    let waited = waiter.recv();
    assert_eq!(waited["decision"], "allow", "{waited}");
    // At least half the 800 ms it was seen waiting (its line may reach node c late).
    assert!(waited["waited_ms"].as_u64().unwrap() >= 400, "{waited}");
    assert!(waited["lag_ms"].is_u64(), "{waited}");
}
