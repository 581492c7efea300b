//! Architecture invariants of ARCHITECTURE.md, checked on the source tree so they cannot rot:
//!
//! - `bursar-core` is pure: no tokio, sled, sockets or clock reads (time comes in as a value);
//! - `bursar-client` depends on `bursar-schemas` alone (SPEC §1), so an agent that links it
//!   gets neither sled nor tokio;
//! - every Rust source file starts with a `//!` header saying what it is for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `[dependencies]` table of a crate's manifest (names only).
fn dependencies(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn core_depends_on_no_runtime_store_or_socket_crate() {
    let deps = dependencies("core");
    for banned in [
        "tokio",
        "sled",
        "mio",
        "socket2",
        "nix",
        "libc",
        "crossbeam-channel",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "bursar-core must stay pure, but depends on {banned}"
        );
    }
}

#[test]
fn core_reads_no_clock_and_opens_no_file_or_socket() {
    let mut files = Vec::new();
    rust_files(&root().join("core/src"), &mut files);
    assert!(files.len() > 5);
    let banned = [
        "SystemTime::now",
        "Instant::now",
        "Utc::now",
        "Local::now",
        "std::fs::",
        "File::open",
        "UnixStream",
        "TcpStream",
        "TcpListener",
        "UdpSocket",
        // Resolving names is I/O (DNS).
        "ToSocketAddrs",
        "to_socket_addrs",
        "std::net::",
        "std::env::var",
        "thread::spawn",
    ];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests (a `#[cfg(test)]` module, at the end of a file) may read fixtures.
        for (n, line) in text
            .lines()
            .enumerate()
            .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        {
            // `SocketAddr` is a value (the policy's `metrics_listen`, parsed without I/O);
            // every other `std::net` item opens or resolves something.
            let code = line
                .split("//")
                .next()
                .unwrap_or("")
                .replace("std::net::SocketAddr", "SocketAddr");
            for b in banned {
                assert!(
                    !code.contains(b),
                    "{}:{}: `{b}` in bursar-core (time and I/O come in as values)",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}

#[test]
fn the_rust_client_depends_on_the_schemas_alone() {
    let deps = dependencies("client");
    let allowed = ["bursar-schemas", "serde", "serde_json", "thiserror"];
    for d in &deps {
        assert!(
            allowed.contains(&d.as_str()),
            "bursar-client must not depend on {d} (SPEC §1: an agent linking it gets neither sled nor tokio)"
        );
    }
    assert!(deps.iter().any(|d| d == "bursar-schemas"));
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let mut files = Vec::new();
    for dir in [
        "schemas/src",
        "core/src",
        "daemon/src",
        "client/src",
        "cli/src",
        "testkit/src",
        "benches/src",
    ] {
        rust_files(&root().join(dir), &mut files);
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.trim_start().starts_with("//!"),
            "{} has no `//!` header",
            f.display()
        );
    }
}

/// The workspace forbids `unsafe`; the daemon only denies it, so that `daemon/src/memory.rs`
/// can make its two FFI calls (mimalloc's `mi_collect` and `mi_option_set`) and
/// `daemon/src/conn_socket.rs` its one registration of a socket with tokio's reactor
/// (`AsyncFd::register_with_interest`). No other file of any crate (its sources, tests,
/// examples, benches) may use `unsafe` or name the `unsafe_code` lint, and every other crate
/// keeps the workspace's `forbid`.
#[test]
fn unsafe_code_lives_in_the_daemons_memory_and_socket_modules_alone() {
    let crates = [
        "schemas", "core", "daemon", "client", "cli", "testkit", "benches", "tests",
    ];
    let mut files = Vec::new();
    for krate in crates {
        for dir in ["src", "tests", "examples", "benches"] {
            let dir = root().join(krate).join(dir);
            if dir.is_dir() {
                rust_files(&dir, &mut files);
            }
        }
    }
    // The code of a file without its `//` comments (a rough cut: enough for this tree).
    let code = |text: &str| -> String {
        text.lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // `unsafe` as a word (not `unsafe_code`, not part of a longer name).
    let words = |code: &str, word: &str| -> usize {
        code.match_indices(word)
            .filter(|(i, _)| {
                let before = code[..*i].chars().next_back();
                let after = code[i + word.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
            .count()
    };
    // Each file allowed, with its `unsafe` blocks and the allows of the lint, one each.
    let allowed = [
        (
            root().join("daemon/src/memory.rs"),
            2,
            "mi_collect, mi_option_set",
        ),
        (
            root().join("daemon/src/conn_socket.rs"),
            1,
            "register_with_interest",
        ),
    ];
    let this_file = root().join("tests/tests/tidy.rs");
    assert!(allowed.iter().all(|(f, ..)| files.contains(f)) && files.len() > 50);
    for f in files {
        if f == this_file {
            continue; // names both words to look for them
        }
        let code = code(&std::fs::read_to_string(&f).unwrap());
        let (uses, lints) = (words(&code, "unsafe"), words(&code, "unsafe_code"));
        match allowed.iter().find(|(a, ..)| *a == f) {
            Some((_, n, calls)) => {
                assert_eq!(
                    (uses, lints),
                    (*n, *n),
                    "{}: {n} unsafe call(s) ({calls}), an allow each",
                    f.display()
                );
                // Each `unsafe` block is on the line of one of the calls named.
                for line in code.lines().filter(|l| words(l, "unsafe") > 0) {
                    assert!(
                        calls.split(", ").any(|c| line.contains(&format!("{c}("))),
                        "{}: `unsafe` on a line that calls none of {calls}: {line}",
                        f.display()
                    );
                }
            }
            None => assert_eq!(
                (uses, lints),
                (0, 0),
                "{} uses `unsafe` or names its lint (only daemon/src/memory.rs and \
                 daemon/src/conn_socket.rs may)",
                f.display()
            ),
        }
    }
    for krate in crates.iter().filter(|k| **k != "daemon") {
        let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
        let manifest: toml::Table = toml::from_str(&text).unwrap();
        let workspace_lints = manifest
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(|w| w.as_bool());
        assert_eq!(
            workspace_lints,
            Some(true),
            "{krate} must keep the workspace's lints (unsafe_code = forbid)"
        );
    }
}
