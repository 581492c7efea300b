//! A cluster node's reserve of written memory (`[cluster] memory_reserve_mib`,
//! `bursard::memory::MemoryReserve`): a thread that grows into it finds its pages already
//! backed, so the page faults are the reserve thread's, not the fold's; and the reserve is not
//! given back once it is freed.
//!
//! Each case runs in a child process of its own, also with mimalloc's transparent huge pages off
//! (`MIMALLOC_ALLOW_THP=0`): with them, mimalloc's own write of a block's header backs the
//! block's whole 2 MiB page, so only without them does a reserve that wrote no page fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursard::memory::MemoryReserve;
use std::time::{Duration, Instant};

/// The daemon's allocator: where freed memory goes next is the allocator's doing.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set in the child process this test runs itself again in.
const CHILD: &str = "BURSAR_RESERVE_TEST_CHILD";

/// What a child says once its case has passed.
const DONE: &str = "reserve case passed:";

/// Page faults this thread has taken (`minflt` in /proc/thread-self/stat).
fn thread_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command's closing parenthesis: state is the 3rd field, minflt the 10th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(7).unwrap().parse().unwrap()
}

/// On a new thread (a fold's growth): `mib` MiB of small allocations, each written. Returns
/// them, still held, and the faults the thread took.
fn grow(mib: usize) -> (Vec<Vec<u64>>, u64) {
    std::thread::spawn(move || {
        let before = thread_faults();
        let blocks: Vec<Vec<u64>> = (0..mib * 2048).map(|i| vec![i as u64; 64]).collect();
        (blocks, thread_faults() - before)
    })
    .join()
    .unwrap()
}

/// What the reserve does, in this process: `"grow"`, a thread growing into it takes almost
/// none of the page faults it takes without one; `"kept"`, the same 2.5 s after the reserve's
/// pass (longer than mimalloc's purge delay of 1 s: a reserve given back meanwhile would be
/// fresh memory again).
fn scenario(which: &str) {
    // Without a reserve: every page fresh. (Held, so that what follows cannot reuse it.)
    let (_first, without) = grow(16);
    assert!(
        without >= 4,
        "16 MiB of fresh memory took only {without} page faults"
    );
    // One pass, then none while the thread grows (it would take the blocks back meanwhile).
    let reserve = MemoryReserve::start_every(32, Duration::from_secs(3600))
        .unwrap()
        .unwrap();
    let since = Instant::now();
    while reserve.passes() == 0 {
        assert!(since.elapsed() < Duration::from_secs(30), "no pass");
        std::thread::sleep(Duration::from_millis(5));
    }
    if which == "kept" {
        std::thread::sleep(Duration::from_millis(2500));
    }
    let (_second, with) = grow(16);
    assert!(
        with * 4 <= without,
        "{which}: growing into a 32 MiB reserve took {with} page faults, without one {without}"
    );
    drop(reserve);
}

/// Each case in a process of its own (the allocator's state is the process's), with mimalloc's
/// transparent huge pages as the machine has them and off.
#[test]
fn a_thread_growing_into_the_reserve_takes_almost_none_of_its_page_faults_even_after_a_while() {
    if let Ok(which) = std::env::var(CHILD) {
        scenario(&which);
        eprintln!("{DONE} {which}");
        return;
    }
    assert!(
        MemoryReserve::start(0).unwrap().is_none(),
        "0 MiB keeps none"
    );
    for which in ["grow", "kept"] {
        for huge_pages in [true, false] {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap());
            child
                .args([
                    "--exact",
                    "a_thread_growing_into_the_reserve_takes_almost_none_of_its_page_faults_even_after_a_while",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD, which);
            if !huge_pages {
                child.env("MIMALLOC_ALLOW_THP", "0");
            }
            let out = child.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            // Also a child that ran no test (a renamed test) exits 0: it must say it ran.
            assert!(
                out.status.success() && err.contains(&format!("{DONE} {which}")),
                "{which}, huge pages {huge_pages}:\n{}\n{err}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}
