//! The `bursar` binary: shell completions, `policy init` and `policy check`, and, against an
//! in-process daemon, the tables of `replay` and `status --watch`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bursar_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bursar"));
    cmd.args(args)
        .env_remove("BURSAR_SOCKET")
        .stdin(Stdio::null());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output().unwrap()
}

fn bursar(args: &[&str]) -> Output {
    bursar_in(None, args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// completions

const VERBS: [&str; 6] = [
    "status",
    "replay",
    "export",
    "policy",
    "completions",
    "salvage",
];

#[test]
fn completions_print_a_script_for_each_shell_that_names_the_verbs() {
    for shell in ["bash", "zsh", "fish"] {
        let out = bursar(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.len() > 500, "{shell}: a short script:\n{script}");
        for verb in VERBS {
            assert!(script.contains(verb), "{shell}: {verb} missing:\n{script}");
        }
    }
}

/// `bursar completions fish | head -2`: a reader that went away ends the command quietly, as it
/// does every other command's output, not with a panic and its backtrace.
#[test]
fn completions_into_a_closed_pipe_end_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_bursar"))
        .args(["completions", "fish"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn the_bash_completion_script_is_valid_bash() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bursar.bash");
    std::fs::write(&file, bursar(&["completions", "bash"]).stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", text(&check.stderr));
    // Sourced, it registers a completion for `bursar`.
    let source = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p bursar", file.display()))
        .output()
        .unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    assert!(text(&source.stdout).contains("bursar"));
}

#[test]
fn completions_for_an_unknown_shell_is_a_usage_error() {
    let out = bursar(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("tcsh"), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------------
// policy init

#[test]
fn policy_init_prints_a_commented_policy_that_policy_check_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = bursar(&["policy", "init"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let policy = text(&out.stdout);
    assert!(
        policy
            .lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count()
            >= 5
    );
    assert!(policy.contains("[[budget]]"), "{policy}");
    let file = dir.path().join("starter.toml");
    std::fs::write(&file, &policy).unwrap();
    let check = bursar(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    let said = text(&check.stdout);
    assert!(
        said.contains("ok") && said.contains("model-daily"),
        "{said}"
    );
}

#[test]
fn policy_init_writes_a_file_and_never_over_an_existing_one_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = bursar_in(Some(dir.path()), &["policy", "init", "bursar.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let file = dir.path().join("bursar.toml");
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, text(&bursar(&["policy", "init"]).stdout));
    let check = bursar_in(Some(dir.path()), &["policy", "check", "bursar.toml"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));

    // An existing file is kept, with one clear line and exit 1.
    std::fs::write(&file, "# mine\n").unwrap();
    let again = bursar_in(Some(dir.path()), &["policy", "init", "bursar.toml"]);
    assert_eq!(again.status.code(), Some(1));
    let err = text(&again.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("bursar: ")
            && err.contains("bursar.toml already exists")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# mine\n");

    let forced = bursar_in(
        Some(dir.path()),
        &["policy", "init", "bursar.toml", "--force"],
    );
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced.stderr));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
}

// ---------------------------------------------------------------------------------------------
// An in-process daemon

/// `bursard` on a thread of this test, on a policy file, in a temp dir (kept while it runs);
/// stopped on drop.
struct Daemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(policy: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bursar.toml"), policy).unwrap();
        let socket = dir.path().join("bursar.sock");
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut d = Daemon {
            dir,
            socket,
            stop,
            thread: None,
        };
        d.spawn();
        d
    }

    /// Start (again) on the temp dir's policy, data and socket; wait until it accepts.
    fn spawn(&mut self) {
        let config = bursard::config::Config::resolve(
            Some(self.dir.path().join("bursar.toml")),
            Some(self.socket.clone()),
            Some(self.dir.path().join("data")),
        )
        .unwrap();
        let (stop, _) = tokio::sync::watch::channel(false);
        self.stop = stop.clone();
        self.thread = Some(std::thread::spawn(move || {
            bursard::run_with(config, bursard::writer::system_clock(), false, None, stop).unwrap();
        }));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--socket", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        all
    }

    /// Run `bursar --socket SOCKET ARGS`, assert exit 0, return stdout.
    fn cli(&self, args: &[&str]) -> String {
        let out = bursar(&self.args(args));
        assert_eq!(
            out.status.code(),
            Some(0),
            "bursar {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn record(&self, event_id: &str, team: &str, input: u64, output: u64) {
        let label = format!("team={team}");
        let (input, output) = (input.to_string(), output.to_string());
        self.cli(&[
            "record",
            "--model",
            "gpt-4o",
            "--label",
            &label,
            "--input-tokens",
            &input,
            "--output-tokens",
            &output,
            "--event-id",
            event_id,
        ]);
    }
}

impl Daemon {
    /// Stop the daemon (its data stays), e.g. for offline mode.
    fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// status --watch

const TEAM_POLICY: &str = r#"
[[budget]]
id = "team-daily"
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 1
"#;

/// Says, from what was written so far, when to interrupt.
type When<'a> = &'a dyn Fn(&[u8]) -> bool;

/// Run `bursar ARGS` with its stdout on a pseudo-terminal; `interrupt_when` sees what it wrote so far and
/// says when to send SIGINT (None: wait for it to exit). Returns the exit code and every byte.
fn on_a_terminal(args: &[&str], interrupt_when: Option<When>) -> (Option<i32>, Vec<u8>) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::io::Read;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bursar"))
        .args(args)
        .env_remove("BURSAR_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once the child (the last holder of the slave side) has exited.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut bytes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut interrupted = interrupt_when.is_none();
    loop {
        while let Ok(chunk) = rx.try_recv() {
            bytes.extend_from_slice(&chunk);
        }
        if !interrupted && interrupt_when.is_some_and(|f| f(&bytes)) {
            let pid = rustix::process::Pid::from_child(&child);
            rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
            interrupted = true;
        }
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(50));
            while let Ok(chunk) = rx.try_recv() {
                bytes.extend_from_slice(&chunk);
            }
            return (status.code(), bytes);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bursar did not exit: {}", String::from_utf8_lossy(&bytes));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

const ENTER: &str = "\x1b[?1049h";
const LEAVE: &str = "\x1b[?1049l";

#[test]
fn watch_on_a_terminal_redraws_in_place_on_the_alternate_screen() {
    let d = Daemon::start(TEAM_POLICY);
    d.record("e-1", "a", 1000, 100);
    let args = d.args(&["status", "--watch", "--interval", "0.05", "--count", "3"]);
    let (code, bytes) = on_a_terminal(&args, None);
    assert_eq!(code, Some(0), "{}", text(&bytes));
    let shown = text(&bytes);
    assert!(shown.starts_with(ENTER), "{shown:?}");
    assert!(shown.trim_end().ends_with(LEAVE), "{shown:?}");
    assert_eq!(count(&bytes, ENTER), 1, "{shown:?}");
    assert_eq!(count(&bytes, "bursar status at"), 3, "{shown:?}");
    // Three frames, each from the top, none blanking the whole screen first (no flicker).
    assert_eq!(count(&bytes, "\x1b[H"), 3, "{shown:?}");
    assert_eq!(count(&bytes, "\x1b[2J"), 0, "{shown:?}");
    // Each line is cleared after its text, and what is below the last line.
    assert!(shown.contains("team=a"), "{shown:?}");
    assert_eq!(count(&bytes, "\x1b[J"), 3, "{shown:?}");
    assert!(count(&bytes, "\x1b[K") >= 3 * 3, "{shown:?}");
}

#[test]
fn ctrl_c_leaves_the_alternate_screen() {
    let d = Daemon::start(TEAM_POLICY);
    d.record("e-1", "a", 1000, 100);
    let args = d.args(&["status", "--watch", "--interval", "0.05"]);
    let two_frames = |b: &[u8]| count(b, "bursar status at") >= 2;
    let (code, bytes) = on_a_terminal(&args, Some(&two_frames));
    let shown = text(&bytes);
    assert_eq!(code, Some(0), "{shown:?}");
    assert!(shown.starts_with(ENTER), "{shown:?}");
    assert!(shown.trim_end().ends_with(LEAVE), "{shown:?}");
}

#[test]
fn watch_into_a_pipe_writes_plain_tables_one_after_another() {
    let d = Daemon::start(TEAM_POLICY);
    d.record("e-1", "a", 1000, 100);
    let out = d.cli(&["status", "--watch", "--interval", "0.05", "--count", "2"]);
    assert_eq!(out.matches("bursar status at").count(), 2, "{out}");
    assert!(
        !out.contains('\x1b'),
        "no escape codes into a pipe: {out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// replay

/// A dollar budget, a budget of tokens only and one of requests only, per team.
const UNITS_POLICY: &str = r#"
[[budget]]
id = "team-usd"
group_by = ["team"]
max_usd = 1

[[budget]]
id = "team-tokens"
group_by = ["team"]
max_tokens = 100000

[[budget]]
id = "team-requests"
group_by = ["team"]
max_requests = 50
"#;

fn row<'a>(table: &'a str, budget: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("{budget} ")))
        .unwrap_or_else(|| panic!("no row for {budget}:\n{table}"))
}

#[test]
fn replay_shows_a_budget_without_a_dollar_limit_in_its_own_units() {
    let mut d = Daemon::start(UNITS_POLICY);
    d.record("e-1", "a", 1000, 100);
    d.record("e-2", "a", 1000, 100);
    let prices = d.dir.path().join("doubled.toml");
    std::fs::write(
        &prices,
        "[pricing.models.\"gpt-4o\"]\ninput_per_mtok = 5.00\noutput_per_mtok = 20.00\n",
    )
    .unwrap();
    let table = d.cli(&["replay", "--pricing", prices.to_str().unwrap()]);
    // Dollars where the budget limits dollars: 2 × $0.0035 before, doubled after.
    let usd = row(&table, "team-usd");
    assert!(
        usd.contains("$0.007") && usd.contains("$0.014") && usd.contains("+$0.007"),
        "{table}"
    );
    // Tokens and requests where the budget limits those: unchanged by new prices.
    let tokens = row(&table, "team-tokens");
    assert!(!tokens.contains('$'), "{table}");
    assert_eq!(tokens.matches("2200 tok").count(), 2, "{table}");
    assert!(tokens.contains("0 tok"), "{table}");
    let requests = row(&table, "team-requests");
    assert!(!requests.contains('$'), "{table}");
    assert!(
        requests.contains("2 req") && requests.contains("0 req"),
        "{table}"
    );
    assert!(
        table.contains("total delta over the whole log: +$0.007"),
        "{table}"
    );
    // --json keeps the daemon's answer as it is (micro-USD).
    let json = d.cli(&["--json", "replay", "--pricing", prices.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["total_delta_micros"], 7000);

    // Offline, on the stopped daemon's data dir: the same figures.
    d.stop();
    let data = d.dir.path().join("data");
    let out = bursar(&[
        "--data-dir",
        data.to_str().unwrap(),
        "replay",
        "--pricing",
        prices.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let offline = text(&out.stdout);
    assert_eq!(row(&offline, "team-tokens"), tokens, "{offline}");
    assert_eq!(row(&offline, "team-usd"), usd, "{offline}");
}

// ---------------------------------------------------------------------------------------------
// policy check

#[test]
fn policy_check_reports_every_mistake_of_a_file_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bursar.toml");
    std::fs::write(
        &file,
        r#"[daemon]
reservaton_ttl_seconds = 60

[[budget]]
id = "team"
max_usdd = 5
window = "fixed"
window_seconds = "a day"

[[budget]]
id = "org"
max_usd = 10
warn_at = 1.5
"#,
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = bursar(&["policy", "check", path]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        lines[0].starts_with(&format!("bursar: {path}:2: daemon.reservaton_ttl_seconds: unknown key; did you mean `reservation_ttl_seconds`?")),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "bursar: {path}:6: budget[0].max_usdd: unknown key; did you mean `max_usd`?"
        )),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("bursar: {path}:8: budget[0].window_seconds: ")),
        "{err}"
    );
    assert!(
        lines[3].starts_with(&format!("bursar: {path}:13: budget[1].warn_at: must be")),
        "{err}"
    );

    let json = bursar(&["--json", "policy", "check", path]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let keys: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "daemon.reservaton_ttl_seconds",
            "budget[0].max_usdd",
            "budget[0].window_seconds",
            "budget[1].warn_at"
        ]
    );
}

#[test]
fn a_key_dropped_for_its_type_is_not_reported_missing_too() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bursar.toml");
    std::fs::write(
        &file,
        "[[budget]]\nid = 7\n\n[[budget]]\nmax_usd = 1\n\n[tiers]\npatterns = [{ match = \"*\", tierr = \"x\" }]\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = bursar(&["policy", "check", path]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with(&format!("bursar: {path}:2: budget[0].id: ")),
        "{err}"
    );
    assert!(!lines[0].contains("required"), "{err}");
    assert!(
        lines[1].starts_with(&format!("bursar: {path}:4: budget[1].id: is required")),
        "{err}"
    );
    assert!(
        lines[2].contains(":8: tiers.patterns[0].tierr: unknown key; did you mean `tier`?"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// TOML written by bursar

#[test]
fn pricing_import_writes_model_names_as_toml_strings_that_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("prices.json");
    std::fs::write(
        &json,
        r#"{"we\"ird\\model x": {"litellm_provider": "open\"ai", "mode": "chat",
             "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}}"#,
    )
    .unwrap();
    let out = bursar(&["pricing", "import", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let toml = text(&out.stdout);
    assert!(
        toml.contains("[pricing.models.\"we\\\"ird\\\\model x\"]\nprovider = \"open\\\"ai\"\n"),
        "{toml}"
    );
    let file = dir.path().join("bursar.toml");
    std::fs::write(&file, &toml).unwrap();
    let check = bursar(&["--json", "policy", "check", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
}

#[test]
fn watch_waits_for_a_restarted_daemon_and_goes_on() {
    let mut d = Daemon::start(TEAM_POLICY);
    d.record("e-1", "a", 1000, 100);
    let mut f = Following::start(&d.args(&["status", "--watch", "--interval", "0.05"]));
    let first = f.wait_for("team=a", 0);
    d.stop();
    let waiting = f.wait_for("is not answering", first);
    assert!(
        f.child.try_wait().unwrap().is_none(),
        "the watch stopped with the daemon"
    );
    d.spawn();
    f.wait_for("team=a", waiting);
}

/// Run `bursar ARGS` with stdout collected as it comes; `wait_for(what, after)` waits until
/// `what` appears in the output at or after byte `after` and returns where.
struct Following {
    child: std::process::Child,
    shown: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Following {
    fn start(args: &[&str]) -> Following {
        use std::io::Read;
        let mut child = Command::new(env!("CARGO_BIN_EXE_bursar"))
            .args(args)
            .env_remove("BURSAR_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let shown = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = std::sync::Arc::clone(&shown);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Following { child, shown }
    }

    fn wait_for(&self, what: &str, after: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.shown.lock().unwrap().clone();
            if let Some(at) = now.get(after..).and_then(|rest| rest.find(what)) {
                return after + at;
            }
            assert!(Instant::now() < deadline, "no {what:?} in:\n{now}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tail_f_waits_for_a_restarted_daemon_and_goes_on() {
    let mut d = Daemon::start(TEAM_POLICY);
    d.record("e-before", "a", 1000, 100);
    let mut f = Following::start(&d.args(&["tail", "-f", "-n", "1"]));
    let first = f.wait_for("e-before", 0);
    d.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        f.child.try_wait().unwrap().is_none(),
        "tail -f stopped with the daemon"
    );
    d.spawn();
    d.record("e-after", "a", 1000, 100);
    f.wait_for("e-after", first);
    // Nothing shown twice.
    assert_eq!(f.shown.lock().unwrap().matches("e-before").count(), 1);
}
