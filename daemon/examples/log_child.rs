//! A second process for the log tests (`daemon/tests/log.rs`): `log_child open DIR` tries to
//! open a log another process holds; `log_child sync-abort DIR [unsynced]` writes synced
//! sample batches (and optionally one unsynced batch) and aborts without any cleanup;
//! `log_child syncer-abort DIR` appends 300 batches of three events while the store's `syncer`
//! syncs on another thread, round after round, prints `CHILD: durable N` (what the last whole
//! round made durable) and aborts.

use bursard::log::testing::{sample_batch, write_sample_batches};
use bursard::log::{LogError, LogStore, SledLog};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Batches of three events the `syncer-abort` mode appends while its syncer runs.
const SYNCER_BATCHES: usize = 300;

/// Open the log in `dir` for writing; a failure is told on stderr, with exit code 1.
fn open(dir: &str) -> Result<SledLog, ExitCode> {
    SledLog::open(Path::new(dir)).map_err(|e| {
        eprintln!("CHILD: {e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: log_child open|sync-abort|syncer-abort DIR [unsynced]");
        return ExitCode::from(2);
    };
    match mode.as_str() {
        "open" => {
            match SledLog::open(Path::new(dir)) {
                Ok(_) => println!("CHILD: opened"),
                Err(e @ LogError::Locked { .. }) => println!("CHILD: locked: {e}"),
                Err(e) => println!("CHILD: error: {e}"),
            }
            ExitCode::SUCCESS
        }
        "sync-abort" => {
            let mut log = match open(dir) {
                Ok(l) => l,
                Err(code) => return code,
            };
            write_sample_batches(&mut log, &[3, 2, 4]);
            if args.get(3).map(String::as_str) == Some("unsynced") {
                let unsynced = sample_batch(log.head(), 5);
                let sealed = match bursard::log::sealed_of(&unsynced) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("CHILD: {e}");
                        return ExitCode::from(3);
                    }
                };
                if let Err(e) = log.append(&sealed) {
                    eprintln!("CHILD: {e}");
                }
            }
            // No destructor runs: only what `sync` wrote is on disk.
            std::process::abort();
        }
        "syncer-abort" => {
            let mut log = match open(dir) {
                Ok(l) => l,
                Err(code) => return code,
            };
            let Some(mut syncer) = log.syncer() else {
                eprintln!("CHILD: no syncer");
                return ExitCode::from(4);
            };
            // The syncer runs round after round on its own thread while this one appends: each
            // round makes durable at least what was appended before it began.
            let appended = Arc::new(AtomicU64::new(0));
            let done = Arc::new(AtomicBool::new(false));
            let rounds_durable = Arc::new(AtomicU64::new(0));
            let (seen, stop, told) = (appended.clone(), done.clone(), rounds_durable.clone());
            let thread = std::thread::spawn(move || -> Result<(), LogError> {
                while !stop.load(Ordering::SeqCst) {
                    let before = seen.load(Ordering::SeqCst);
                    syncer()?;
                    told.store(before, Ordering::SeqCst);
                }
                Ok(())
            });
            for i in 0..SYNCER_BATCHES {
                if i == 1 {
                    // One whole round after the first batch before the rest are appended: on a
                    // busy machine the syncer's thread may otherwise first run (its first round
                    // begun before any append) while all 300 are appended, and report none.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while rounds_durable.load(Ordering::SeqCst) == 0 && !thread.is_finished() {
                        if std::time::Instant::now() >= deadline {
                            eprintln!("CHILD: no sync round ended within 10 s of an append");
                            return ExitCode::from(6);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                let envs = sample_batch(log.head(), 3);
                let stored = bursard::log::sealed_of(&envs)
                    .map_err(|e| e.to_string())
                    .and_then(|s| log.append(&s).map_err(|e| e.to_string()));
                if let Err(e) = stored {
                    eprintln!("CHILD: {e}");
                    return ExitCode::from(3);
                }
                appended.store(log.head().map_or(0, |h| h.0), Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
            match thread.join() {
                Ok(Ok(())) => println!("CHILD: durable {}", rounds_durable.load(Ordering::SeqCst)),
                other => {
                    eprintln!("CHILD: the syncer failed: {other:?}");
                    return ExitCode::from(5);
                }
            }
            // No destructor of the store runs: only what the syncer wrote is on disk.
            std::process::abort();
        }
        _ => {
            eprintln!("unknown mode {mode}");
            ExitCode::from(2)
        }
    }
}
