//! The `bursar` binary itself (this test also makes `cargo test --workspace` build it for the
//! integration tests in `tests/`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn bursar(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bursar"))
        .args(args)
        .env_remove("BURSAR_SOCKET")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_verb_and_the_exit_codes() {
    let out = bursar(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for verb in [
        "status", "check", "reserve", "commit", "release", "extend", "record", "tail", "export",
        "verify", "replay", "policy", "reload", "pricing",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(verb)),
            "{verb} missing from --help:\n{text}"
        );
    }
    assert!(text.contains("3 `check`/`reserve` denied"), "{text}");
}

#[test]
fn a_bad_flag_is_a_usage_error_with_exit_2() {
    let out = bursar(&["status", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--no-such-flag"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
