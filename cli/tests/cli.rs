//! The `bursar` binary: shell completions, `policy init` and `policy check`, and, against an
//! in-process daemon, the tables of `replay` and `status --watch`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

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
