//! A realistic month of agent traffic, for reports and charts (`examples/month-of-traffic.sh`).
//!
//! `month_of_traffic DATA_DIR [POLICY_FILE]` runs a real bursard in this process on DATA_DIR
//! with a clock it moves itself, from 2026-11-01 to 2026-12-01 UTC, and sends it what four
//! teams' agents would over that month through its socket: reservations and their commits,
//! plain records, busier on weekdays and in working hours, a research batch job on some
//! nights, a budget that runs out. Seeded: the same month every time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 2026-11-01T00:00:00Z.
const START: i64 = 1_793_491_200_000_000;
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const DAYS: i64 = 30;

const POLICY: &str = r#"
[[budget]]
id = "team-daily"
group_by = ["team"]
window = "calendar"
calendar = "day"
max_usd = 20
warn_at = 0.8

[[budget]]
id = "org-monthly"
group_by = ["org"]
window = "calendar"
calendar = "month"
max_usd = 3000
"#;

/// xorshift64*: a small deterministic generator (the month must be the same on every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A team: its agents' models (with weights), calls per working hour, tokens per call.
struct Team {
    name: &'static str,
    models: &'static [(&'static str, u64)],
    calls_per_hour: u64,
    input: (u64, u64),
    output: (u64, u64),
}

const TEAMS: [Team; 4] = [
    Team {
        name: "search",
        models: &[("gpt-4o", 6), ("gpt-4o-mini", 4)],
        calls_per_hour: 14,
        input: (2_000, 12_000),
        output: (200, 1_500),
    },
    Team {
        name: "support",
        models: &[("gpt-4o-mini", 7), ("claude-3-5-haiku-latest", 3)],
        calls_per_hour: 22,
        input: (1_000, 6_000),
        output: (100, 800),
    },
    Team {
        name: "ads",
        models: &[("gemini-2.5-flash", 5), ("gemini-2.5-pro", 2)],
        calls_per_hour: 8,
        input: (3_000, 20_000),
        output: (300, 2_000),
    },
    Team {
        name: "research",
        models: &[("claude-sonnet-4-5", 6), ("gpt-5", 4)],
        calls_per_hour: 5,
        input: (10_000, 60_000),
        output: (1_000, 8_000),
    },
];

fn pick<'a>(rng: &mut Rng, models: &'a [(&'a str, u64)]) -> &'a str {
    let total: u64 = models.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total);
    for (m, w) in models {
        if r < *w {
            return m;
        }
        r -= w;
    }
    models.first().map_or("gpt-4o-mini", |(m, _)| m)
}

fn between(rng: &mut Rng, (lo, hi): (u64, u64)) -> u64 {
    lo + rng.below(hi - lo + 1)
}

struct Conn {
    out: UnixStream,
    answers: BufReader<UnixStream>,
}

impl Conn {
    fn call(&mut self, line: &serde_json::Value) -> Result<serde_json::Value, String> {
        let mut text = line.to_string();
        text.push('\n');
        self.out
            .write_all(text.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut answer = String::new();
        self.answers
            .read_line(&mut answer)
            .map_err(|e| format!("answer: {e}"))?;
        serde_json::from_str(&answer).map_err(|e| format!("answer {answer:?}: {e}"))
    }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let Some(data_dir) = args.get(1) else {
        return Err("usage: month_of_traffic DATA_DIR [POLICY_FILE]".into());
    };
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = match args.get(2) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let p = work.path().join("bursar.toml");
            std::fs::write(&p, POLICY).map_err(|e| e.to_string())?;
            p
        }
    };
    let socket = work.path().join("bursar.sock");
    let config =
        bursard::config::Config::resolve(Some(policy), Some(socket.clone()), Some(data_dir.into()))
            .map_err(|e| e.to_string())?;
    let now = Arc::new(AtomicI64::new(START));
    let clock_now = now.clone();
    let clock: bursard::writer::Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
    let (stop, _) = tokio::sync::watch::channel(false);
    let stopper = stop.clone();
    let daemon = std::thread::spawn(move || bursard::run_with(config, clock, false, None, stopper));
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("the daemon did not start: {e}")),
        }
    };
    let mut conn = Conn {
        answers: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
        out: stream,
    };
    let mut rng = Rng(0x5eed_2026_1101);
    let (mut calls, mut denied) = (0u64, 0u64);
    // Every call of the month, in time order: (at, team index).
    let mut plan: Vec<(i64, usize)> = Vec::new();
    for day in 0..DAYS {
        // 2026-11-01 is a Sunday.
        let weekend = matches!(day % 7, 0 | 6);
        for hour in 0..24 {
            let working = (8..19).contains(&hour);
            for (t, team) in TEAMS.iter().enumerate() {
                let mut n = match (weekend, working) {
                    (false, true) => team.calls_per_hour,
                    (false, false) => team.calls_per_hour / 6,
                    (true, true) => team.calls_per_hour / 4,
                    (true, false) => team.calls_per_hour / 12,
                };
                // Research runs a batch job on some weeknights.
                if team.name == "research" && !weekend && (1..5).contains(&hour) && day % 3 == 1 {
                    n += 30;
                }
                for _ in 0..between(&mut rng, (n / 2, n + n / 2)) {
                    let at = START + day * DAY + hour * HOUR + (rng.below(HOUR as u64) as i64);
                    plan.push((at, t));
                }
            }
        }
    }
    plan.sort_unstable();
    for (i, (at, t)) in plan.iter().enumerate() {
        let team = &TEAMS[*t];
        now.store(*at, Ordering::SeqCst);
        let model = pick(&mut rng, team.models);
        let input = between(&mut rng, team.input);
        let output = between(&mut rng, team.output);
        let labels = serde_json::json!({
            "org": "acme",
            "team": team.name,
            "agent": format!("{}-agent-{}", team.name, rng.below(3) + 1),
            "session": format!("s-{}", i / 8),
        });
        if rng.chance(70) {
            let rid = format!("r-{i}");
            let a = conn.call(&serde_json::json!({
                "op": "reserve", "reservation_id": rid, "labels": labels, "model": model,
                "estimate": {"input_tokens": input, "max_output_tokens": team.output.1}
            }))?;
            if a["decision"] == "deny" {
                denied += 1;
                continue;
            }
            if a["ok"] != true {
                return Err(format!("reserve: {a}"));
            }
            now.store(
                *at + 1_000_000 + (rng.below(20_000_000) as i64),
                Ordering::SeqCst,
            );
            let c = conn.call(&serde_json::json!({
                "op": "commit", "reservation_id": rid, "event_id": format!("e-{i}"),
                "usage": {"input_tokens": input, "output_tokens": output}
            }))?;
            if c["ok"] != true {
                return Err(format!("commit: {c}"));
            }
        } else {
            let r = conn.call(&serde_json::json!({
                "op": "record", "event_id": format!("e-{i}"), "labels": labels, "model": model,
                "usage": {"input_tokens": input, "output_tokens": output}
            }))?;
            if r["ok"] != true {
                return Err(format!("record: {r}"));
            }
        }
        calls += 1;
    }
    drop(conn);
    stop.send_replace(true);
    match daemon.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("the daemon panicked".into()),
    }
    println!(
        "{calls} calls made and {denied} reservations denied from 2026-11-01 to 2026-12-01 \
         (UTC), in {data_dir}"
    );
    Ok(())
}
