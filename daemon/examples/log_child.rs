//! A second process for the log tests (`daemon/tests/log.rs`): `log_child open DIR` tries to
//! open a log another process holds; `log_child sync-abort DIR [unsynced]` writes synced
//! sample batches (and optionally one unsynced batch) and aborts without any cleanup;
//! `log_child syncer-abort DIR` the same, each batch synced by the store's `syncer` on another
//! thread instead of `sync`.

use bursard::log::testing::{sample_batch, write_sample_batches};
use bursard::log::{LogError, LogStore, SledLog};
use std::path::Path;
use std::process::ExitCode;

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
            let mut log = match SledLog::open(Path::new(dir)) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("CHILD: {e}");
                    return ExitCode::from(1);
                }
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
            let mut log = match SledLog::open(Path::new(dir)) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("CHILD: {e}");
                    return ExitCode::from(1);
                }
            };
            let Some(mut syncer) = log.syncer() else {
                eprintln!("CHILD: no syncer");
                return ExitCode::from(4);
            };
            let (ask, asked) = std::sync::mpsc::channel::<()>();
            let (done, synced) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                for () in asked {
                    if done.send(syncer()).is_err() {
                        return;
                    }
                }
            });
            for n in [3, 2, 4] {
                let envs = sample_batch(log.head(), n);
                let appended = bursard::log::sealed_of(&envs)
                    .map_err(|e| e.to_string())
                    .and_then(|s| log.append(&s).map_err(|e| e.to_string()));
                if let Err(e) = appended {
                    eprintln!("CHILD: {e}");
                    return ExitCode::from(3);
                }
                let result = ask.send(()).ok().and_then(|()| synced.recv().ok());
                if !matches!(result, Some(Ok(()))) {
                    eprintln!("CHILD: the syncer failed: {result:?}");
                    return ExitCode::from(5);
                }
            }
            drop(ask);
            let _ = thread.join();
            // No destructor of the store runs: only what the syncer wrote is on disk.
            std::process::abort();
        }
        _ => {
            eprintln!("unknown mode {mode}");
            ExitCode::from(2)
        }
    }
}
