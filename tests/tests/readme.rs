//! README.md cannot rot: every fenced ```sh block is run here against a real daemon.
//!
//! - The first block holds the two commands of the quick start. `cargo run --release -p
//!   bursard` is run as the built `bursard` with no arguments (its embedded defaults) in a temp
//!   dir; `cargo test --workspace` is this very suite.
//! - Every other block is the tour: they are joined into one bash script and run in a temp dir
//!   holding a copy of `examples/` (standing for the repository), with the built binaries first
//!   on `PATH`, `XDG_RUNTIME_DIR` pointing into the temp dir, `TMPDIR` too (the tour makes its
//!   own work dir with `mktemp -d`), `cargo build --release` mapped to a no-op (the binaries are
//!   built), and `set -euo pipefail`, so any failing command fails the test. Every line of output
//!   the tour's ```text blocks show must be printed (`…` stands for any text), and the tour's
//!   files must land in its work dir, not in the dir it started from.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursar_tests::{bin, bursar_command, copy_dir};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The ```sh blocks of README.md, in order.
fn sh_blocks() -> Vec<String> {
    fenced_blocks("sh")
}

/// The fenced blocks of README.md in this language (```sh, ```text), in order.
fn fenced_blocks(language: &str) -> Vec<String> {
    fenced_blocks_in(
        &std::fs::read_to_string(repo().join("README.md")).unwrap(),
        language,
    )
}

/// The ```text blocks of the tour's section: the output it shows.
fn tour_text_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = text
        .find("## A ten-minute tour")
        .expect("README.md has a section \"A ten-minute tour\"");
    let section = &text[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    fenced_blocks_in(&section[..end], "text")
}

fn fenced_blocks_in(text: &str, language: &str) -> Vec<String> {
    let fence = format!("```{language}");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_start() == fence => current = Some(String::new()),
            Some(_) if line.trim_start().starts_with("```") => {
                blocks.push(current.take().unwrap());
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "unclosed {fence} block in README.md");
    blocks
}

/// Whether `line` matches a line of output shown in the README, where `…` stands for any text
/// (ids, times, lines left out).
fn shown_line_matches(shown: &str, line: &str) -> bool {
    let mut rest = line.trim_end();
    for part in shown.trim_end().split('…') {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Commands of a block: comments and blank lines dropped.
fn commands(block: &str) -> Vec<String> {
    block
        .lines()
        .map(|l| match l.find(" #") {
            Some(i) => l[..i].trim().to_string(),
            None => l.trim().to_string(),
        })
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn bin_dir() -> PathBuf {
    bin("bursar").parent().unwrap().to_path_buf()
}

fn path_with_bins() -> String {
    format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    bursar_tests::eventually(Duration::from_secs(20), Duration::from_millis(20), || {
        ok().then_some(())
            .ok_or_else(|| format!("still waiting for {what}"))
    });
}

#[test]
fn readme_quick_start_runs_the_daemon_on_its_defaults() {
    let blocks = sh_blocks();
    assert!(
        blocks.len() >= 2,
        "README.md needs the quick start and a tour"
    );
    assert_eq!(
        commands(&blocks[0]),
        ["cargo run --release -p bursard", "cargo test --workspace"],
        "the first ```sh block of README.md is the two commands"
    );
    // `cargo test --workspace` is what runs this test. `cargo run --release -p bursard`:
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let mut daemon = Command::new(bin("bursard"))
        .current_dir(dir.path())
        .env("XDG_RUNTIME_DIR", &run)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cli = |args: &[&str]| {
        bursar_command(args)
            .current_dir(dir.path())
            .env("XDG_RUNTIME_DIR", &run)
            .output()
            .unwrap()
    };
    wait_for(
        || cli(&["status"]).status.success(),
        "the daemon on its default socket",
    );
    assert!(
        run.join("bursar.sock").exists(),
        "socket at $XDG_RUNTIME_DIR/bursar.sock"
    );
    assert!(
        dir.path().join("bursar-data").is_dir(),
        "data in ./bursar-data"
    );
    // The default policy meters spend per model per day and limits nothing.
    let record = cli(&[
        "record",
        "--model",
        "gpt-4o",
        "--input-tokens",
        "1000000",
        "--output-tokens",
        "1000000",
    ]);
    assert!(record.status.success());
    let text = String::from_utf8(record.stdout).unwrap();
    assert!(text.contains("model-daily"), "{text}");
    assert!(text.contains("meter (no limit)"), "{text}");
    // Ctrl-C (SIGINT) stops it cleanly.
    let _ = Command::new("kill")
        .args(["-INT", &daemon.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            panic!("bursard did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

const PRELUDE: &str = r#"set -euo pipefail
cargo() {
  case "$*" in
    "build --release") echo "(readme test: the binaries are already built)" ;;
    *) echo "readme test: no mapping for: cargo $*" >&2; return 1 ;;
  esac
}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
"#;

#[test]
fn readme_tour_runs_as_written() {
    let blocks = sh_blocks();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples"), &dir.path().join("examples"));
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut script = PRELUDE.to_string();
    for block in &blocks[1..] {
        script.push_str(block);
    }
    let script_path = dir.path().join("tour.sh");
    std::fs::write(&script_path, &script).unwrap();
    let stdout_path = dir.path().join("tour.out");
    let stderr_path = dir.path().join("tour.err");
    let mut child = Command::new("bash")
        .arg(&script_path)
        .current_dir(dir.path())
        .env("PATH", path_with_bins())
        .env("XDG_RUNTIME_DIR", &run)
        // `mktemp -d` (the tour's work dir) makes its dir in here, where the test finds it.
        .env("TMPDIR", &tmp)
        .env_remove("BURSAR_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!(
                "the README tour did not finish in time\nstdout:\n{}",
                std::fs::read_to_string(&stdout_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&stdout_path).unwrap();
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    // The tour works in a fresh dir of its own (`cd "$(mktemp -d)"`).
    let work_dirs: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let work = match work_dirs.as_slice() {
        [one] => one.clone(),
        other => panic!(
            "the tour should make one work dir with mktemp -d, made {other:?}\nstdout:\n{out}\nstderr:\n{err}"
        ),
    };
    let daemon_log = std::fs::read_to_string(work.join("bursard.log")).unwrap_or_default();
    assert!(
        status.success(),
        "the README tour failed ({status})\nstdout:\n{out}\nstderr:\n{err}\nbursard.log:\n{daemon_log}"
    );
    // What the prose around the blocks promises.
    for promise in [
        "recorded ",
        "(seq 2): cost $0.50, state ok",
        "reservation r-2: denied (seq 6)",
        "(6 events folded)",
        "warn: gpt-4o, holds $0.31",
        "cost $0.18, state ok",
        "deny: gpt-4o, would hold $0.41",
        "denied (exit 3)",
        "allow: gpt-4o-mini, would hold $0.0246",
        "skipped gpt-4o: budget",
        "$0.68 / $1.00",
        "budget_warned",
        "hash chain intact",
        "ok -> exhausted",
        "total delta over the whole log: +$0.68",
        "dry run: nothing was changed",
    ] {
        assert!(
            out.contains(promise),
            "README tour output lacks {promise:?}:\n{out}"
        );
    }
    // Every line of output the README shows is printed (`…` elides ids, times and lines).
    let printed: Vec<&str> = out.lines().chain(err.lines()).collect();
    for block in tour_text_blocks() {
        for shown in block.lines().filter(|l| l.trim() != "…") {
            assert!(
                printed.iter().any(|line| shown_line_matches(shown, line)),
                "README.md shows {shown:?}, which the tour did not print:\n{out}\n{err}"
            );
        }
    }
    assert!(err.contains("exported 6 events to audit.csv"), "{err}");
    // Its files are in its work dir, none in the dir it started from (the repository).
    for file in ["audit.csv", "new-prices.toml", "bursard.log", "bursar-data"] {
        assert!(work.join(file).exists(), "{file} in the tour's work dir");
        assert!(!dir.path().join(file).exists(), "{file} written outside it");
    }
    let csv = std::fs::read_to_string(work.join("audit.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "header + 6 events:\n{csv}");
    assert!(
        !err.contains("panicked") && !err.contains("no mapping"),
        "{err}"
    );
    // The daemon stopped cleanly when the tour stopped it.
    assert!(daemon_log.contains("stopped"), "{daemon_log}");
    assert!(
        !work.join("bursar.sock").exists() && !run.join("bursar.sock").exists(),
        "the socket is removed on exit"
    );
}
