//! A cluster node's reserve of written memory (`[cluster] memory_reserve_mib`,
//! `bursard::memory::MemoryReserve`): a thread that grows into it finds its pages already
//! backed, so the page faults are the reserve thread's, not the fold's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bursard::memory::MemoryReserve;
use std::time::{Duration, Instant};

/// The daemon's allocator: where freed memory goes next is the allocator's doing.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

#[test]
fn a_thread_growing_into_the_reserve_takes_almost_none_of_its_page_faults() {
    assert!(
        MemoryReserve::start(0).unwrap().is_none(),
        "0 MiB keeps none"
    );
    // Without a reserve: every page fresh. (Held, so that what follows cannot reuse it.)
    let (_first, without) = grow(16);
    assert!(
        without >= 4,
        "16 MiB of fresh memory took only {without} page faults"
    );
    let reserve = MemoryReserve::start(32).unwrap().unwrap();
    let since = Instant::now();
    while reserve.passes() == 0 {
        assert!(since.elapsed() < Duration::from_secs(30), "no pass");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_second, with) = grow(16);
    assert!(
        with * 4 <= without,
        "growing into a 32 MiB reserve took {with} page faults, without one {without}"
    );
    drop(reserve);
}
