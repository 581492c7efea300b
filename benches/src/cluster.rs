//! `bursar-bench cluster`: cluster mode (SPEC §13, issue 15 point 6) on this machine — three
//! `bursard` nodes over a real 3-node NATS JetStream cluster on loopback (every server with
//! `sync_interval: always`, streams R3), one partition, the bench policy with `org` in every
//! budget's scope.
//!
//! Figures: durable `record`s per second through the partition's writer (depth 1 and 16),
//! forwarded `record` latency through a follower (p50/p99, the follower's own fold of the write
//! included: it answers once it could read it), follower lag (from a record's storage in the
//! stream to its fold on each follower, as the nodes report it in `cluster_status`), and
//! failover (kill -9 of the writer to the first acknowledged write through a follower).

use super::{fmt_rate, fmt_us, rate_of, Opts, Report};
use crate::load::{self, Group, Target};
use crate::procs::{self, Proc};
use crate::workload::{self, Encoder, Mix, OpKind};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The bench policy as a cluster file: every budget scoped by `org` (the partition label).
fn policy(socket: &str, data: &str, urls: &[String], node: &str) -> String {
    let base = workload::policy_toml(socket, data)
        .replace(r#"group_by = ["team"]"#, r#"group_by = ["org", "team"]"#)
        .replace(r#"group_by = ["user"]"#, r#"group_by = ["org", "user"]"#)
        .replace(
            r#"group_by = ["session"]"#,
            r#"group_by = ["org", "session"]"#,
        );
    let nats: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "{base}\n[cluster]\nnats = [{}]\nnode = \"{node}\"\npartition_by = \"org\"\n\
         partitions = 1\nreplicas = 3\nstream_prefix = \"bench\"\n",
        nats.join(", ")
    )
}

fn status(p: &Proc) -> Option<Value> {
    let line = procs::request(&p.socket, r#"{"op":"cluster_status"}"#).ok()?;
    serde_json::from_str(&line).ok()
}

/// The node holding partition 0's lease, once it reports itself its writer.
fn writer_of(nodes: &[Proc], names: &[&str], within: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = status(&nodes[0]) {
            let p = &s["partitions"][0];
            if let Some(h) = p["holder"].as_str() {
                let reports_writer = p["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|n| n["node"] == h && n["writer"] == true);
                if reports_writer {
                    if let Some(i) = names.iter().position(|n| *n == h) {
                        return Ok(i);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no writer within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A connection that sends a line and reads its answer.
struct Conn(std::io::BufReader<std::os::unix::net::UnixStream>);

impl Conn {
    fn open(socket: &std::path::Path) -> Result<Conn, String> {
        let s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
        Ok(Conn(std::io::BufReader::new(s)))
    }

    fn call(&mut self, line: &str) -> Result<String, String> {
        use std::io::{BufRead, Write};
        let s = self.0.get_mut();
        s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        s.write_all(b"\n").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        self.0.read_line(&mut answer).map_err(|e| e.to_string())?;
        Ok(answer)
    }
}

/// Visibility lag: a `record` for a new org acknowledged by the writer, then `check` on the
/// follower every 100 µs, until the follower's fold shows it. Returns the lags (µs) from the
/// writer's acknowledgement to the first answer that shows the write, every `every` until
/// `stop`.
fn visibility_probe(
    writer: &std::path::Path,
    follower: &std::path::Path,
    tag: u32,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Vec<u64>, String> {
    let (mut w, mut f) = (Conn::open(writer)?, Conn::open(follower)?);
    let mut lags = Vec::new();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        let labels = format!(r#"{{"org":"probe{tag}-{n}","team":"t","user":"u","session":"s"}}"#);
        let a = w.call(&format!(
            r#"{{"op":"record","event_id":"probe-{tag}-{n}","labels":{labels},"model":"gpt-4o-mini","usage":{{"input_tokens":1000,"output_tokens":0}}}}"#
        ))?;
        let acked = Instant::now();
        if !a.starts_with(r#"{"ok":true"#) {
            continue;
        }
        let check = format!(
            r#"{{"op":"check","labels":{labels},"model":"gpt-4o-mini","estimate":{{"input_tokens":1,"max_output_tokens":1}}}}"#
        );
        loop {
            let c = f.call(&check)?;
            if c.contains(r#""spent_micros":150"#) {
                lags.push(u64::try_from(acked.elapsed().as_micros()).unwrap_or(u64::MAX));
                break;
            }
            if acked.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "probe {n} not visible on the follower within 10 s: {c}"
                ));
            }
            // Asked again after 100 µs rather than back to back: a probe spinning on the
            // follower's socket took CPU from the follower it measures (two cores).
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(every);
    }
    Ok(lags)
}

fn quantile_us(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)] as f64
}

/// The worse follower's lag (p50, p99 in µs, its name), as the followers report it.
fn follower_lag(writer: &Proc) -> Option<(u64, u64, String)> {
    let s = status(writer)?;
    let mut worst: Option<(u64, u64, String)> = None;
    for n in s["partitions"][0]["nodes"].as_array().into_iter().flatten() {
        if n["writer"] == true {
            continue;
        }
        let (Some(p50), Some(p99)) = (n["fold_lag_p50_us"].as_u64(), n["fold_lag_p99_us"].as_u64())
        else {
            continue;
        };
        let name = n["node"].as_str().unwrap_or("?").to_string();
        println!(
            "  follower {name}: lag p50 {:.2} ms, p99 {:.2} ms over {} records",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            n["fold_lag_records"].as_u64().unwrap_or(0)
        );
        if worst.as_ref().is_none_or(|w| p99 > w.1) {
            worst = Some((p50, p99, name));
        }
    }
    worst
}

/// Run the cluster figures into `report`.
pub fn cluster(o: &Opts, report: &mut Report) -> Result<(), String> {
    let nats = bursar_tests::nats::NatsCluster::start(3)?;
    let urls = nats.urls();
    let names = ["a", "b", "c"];
    let dirs: Vec<tempfile::TempDir> = names
        .iter()
        .map(|_| {
            tempfile::Builder::new()
                .prefix("bursar-bench-cluster-")
                .tempdir()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    let mut paths = Vec::new();
    for (name, dir) in names.iter().zip(&dirs) {
        let socket = dir.path().join("bursar.sock");
        let data = dir.path().join("data");
        let config = dir.path().join("bursar.toml");
        let text = policy(
            &socket.to_string_lossy(),
            &data.to_string_lossy(),
            &urls,
            name,
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        nodes.push(procs::start_bursard_with(
            &config,
            dir.path(),
            &socket,
            &data,
        )?);
        paths.push((config, dir.path().to_path_buf(), socket, data));
    }
    let writer = writer_of(&nodes, &names, Duration::from_secs(30))?;
    let follower = (0..3).find(|i| *i != writer).unwrap_or(0);
    println!(
        "\n== cluster: 3 nodes over a 3-node NATS cluster (sync_interval always, R3), 1 partition; \
         writer {}, {} scopes, {:.0} s measured after {:.0} s warm-up ==",
        names[writer],
        o.scopes,
        o.duration().as_secs_f64(),
        o.warmup().as_secs_f64()
    );
    let run_tag = std::process::id() % 100_000;
    let target = |p: &Proc, run: u32| Target {
        socket: p.socket.clone(),
        encoder: Encoder::Bursar { run },
        parse: workload::parse_bursar,
    };
    let record = OpKind::Record.index();
    // Follower lag at fixed rates (open loop): each follower restarted first, so that its lag
    // figures (kept since it started, once caught up) are this rate's alone.
    for (k, rate) in [5_000.0f64, 20_000.0].into_iter().enumerate() {
        for i in (0..3).filter(|i| *i != writer) {
            nodes[i].stop(Duration::from_secs(10));
            let (config, dir, socket, data) = &paths[i];
            nodes[i] = procs::start_bursard_with(config, dir, socket, data)?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let g = Group {
            conns: o.conns,
            depth: 16,
            rate: Some(rate),
            mix: Mix::Record,
            threads: o.client_threads,
        };
        let follower_socket = nodes[(0..3).find(|i| *i != writer).unwrap_or(0)]
            .socket
            .clone();
        let writer_socket = nodes[writer].socket.clone();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (res, probe) = std::thread::scope(|s| {
            let probe = s.spawn(|| {
                std::thread::sleep(o.warmup());
                visibility_probe(
                    &writer_socket,
                    &follower_socket,
                    run_tag + k as u32,
                    Duration::from_millis(5),
                    &stop,
                )
            });
            let res = load::run(
                &target(&nodes[writer], run_tag + 10 + k as u32),
                nodes[writer].pid(),
                &[g],
                o.scopes,
                o.warmup(),
                o.duration(),
                o.seed,
            );
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (res, probe.join())
        });
        let res = res?;
        let mut lags = probe.map_err(|_| "the probe panicked".to_string())??;
        std::thread::sleep(Duration::from_millis(1500));
        let got = rate_of(&res, 0, record);
        println!(
            "open loop {} records/s asked, {} durable records/s done, {} skipped",
            fmt_rate(rate),
            fmt_rate(got),
            res.groups[0].skipped
        );
        let (v50, v99) = (quantile_us(&mut lags, 0.5), quantile_us(&mut lags, 0.99));
        println!(
            "  visible on a follower after the writer's ack: p50 {:.2} ms, p99 {:.2} ms over {} probes",
            v50 / 1000.0,
            v99 / 1000.0,
            lags.len()
        );
        report.add(
            &format!(
                "cluster: a write visible on a follower after the writer's ack, p50 / p99, at {} records/s",
                fmt_rate(got)
            ),
            "p99 ≤ 10 ms (issue 15: follower lag)",
            format!("{:.2} / {:.2} ms", v50 / 1000.0, v99 / 1000.0),
            None,
            None,
        );
        if let Some((p50, p99, name)) = follower_lag(&nodes[writer]) {
            report.add(
                &format!(
                    "cluster: follower lag p50 / p99 at {} records/s (stream storage to fold; the worse follower)",
                    fmt_rate(got)
                ),
                // Not the lag of issue 15's target: it starts at the stream leader's timestamp,
                // before the quorum commit (an fsync on two servers) that the writer's ack also
                // waits for; the row above is how far a follower is behind acknowledged writes.
                "— (from before the quorum commit)",
                format!("{:.2} / {:.2} ms ({name})", p50 as f64 / 1000.0, p99 as f64 / 1000.0),
                None,
                None,
            );
        }
    }

    for (k, depth) in [1usize, 16].into_iter().enumerate() {
        let g = Group {
            conns: o.conns,
            depth,
            rate: None,
            mix: Mix::Record,
            threads: o.client_threads,
        };
        let res = load::run(
            &target(&nodes[writer], run_tag + k as u32),
            nodes[writer].pid(),
            &[g],
            o.scopes,
            o.warmup(),
            o.duration(),
            o.seed,
        )?;
        let rate = rate_of(&res, 0, record);
        let st = &res.groups[0].ops[record];
        println!(
            "writer, {} clients depth {depth}: {} durable records/s, p50 {} µs, p99 {} µs, errors {}{}",
            o.conns,
            fmt_rate(rate),
            fmt_us(st.us(0.5)),
            fmt_us(st.us(0.99)),
            st.errors,
            res.groups[0]
                .first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        report.add(
            &format!(
                "cluster: durable `record`s/s on one partition's writer, {} clients, depth {depth}",
                o.conns
            ),
            "≥ 20,000 events/s per partition (issue 15)",
            format!("{} events/s", fmt_rate(rate)),
            None,
            None,
        );
    }
    // Forwarded: agents on a follower; each answer waits for the follower's own fold of it.
    let g = Group {
        conns: 16,
        depth: 1,
        rate: None,
        mix: Mix::Record,
        threads: o.client_threads,
    };
    let res = load::run(
        &target(&nodes[follower], run_tag + 7),
        nodes[follower].pid(),
        &[g],
        o.scopes,
        o.warmup(),
        o.duration(),
        o.seed + 1,
    )?;
    let st = &res.groups[0].ops[record];
    println!(
        "forwarded through follower {}, 16 clients depth 1: {} records/s, p50 {} µs, p99 {} µs, errors {}",
        names[follower],
        fmt_rate(rate_of(&res, 0, record)),
        fmt_us(st.us(0.5)),
        fmt_us(st.us(0.99)),
        st.errors
    );
    report.add(
        "cluster: forwarded `record` latency p50 / p99 (16 clients on a follower)",
        "—",
        format!("{} / {} µs", fmt_us(st.us(0.5)), fmt_us(st.us(0.99))),
        None,
        None,
    );
    // Failover: kill -9 the writer; the first acknowledged write through the follower.
    let killed = Instant::now();
    let _ = nodes[writer].child.kill();
    let _ = nodes[writer].child.wait();
    let mut n = 0u64;
    let took = loop {
        n += 1;
        let line = format!(
            r#"{{"op":"record","event_id":"failover-{run_tag}-{n}","labels":{{"org":"org0","team":"team0","user":"user0","session":"s0"}},"model":"gpt-4o-mini","usage":{{"input_tokens":10,"output_tokens":0}}}}"#
        );
        if let Ok(a) = procs::request(&nodes[follower].socket, &line) {
            if a.starts_with(r#"{"ok":true"#) {
                break killed.elapsed();
            }
        }
        if killed.elapsed() > Duration::from_secs(60) {
            return Err("no write within 60 s of the writer's kill".into());
        }
    };
    println!(
        "failover: first acknowledged write {:.2} s after kill -9 of the writer",
        took.as_secs_f64()
    );
    report.add(
        "cluster: failover (kill -9 of the writer → first acknowledged write via a follower)",
        "≤ 10 s (SPEC §13)",
        format!("{:.2} s", took.as_secs_f64()),
        None,
        None,
    );
    for (i, p) in nodes.iter_mut().enumerate() {
        if i != writer {
            p.stop(Duration::from_secs(10));
        }
    }
    drop(nats);
    Ok(())
}
