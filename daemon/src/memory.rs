//! Giving freed memory back to the OS: after start-up, and when the writer goes idle after
//! work (`Writer::idle`, at most once a second); and, on a cluster node, keeping a reserve of
//! memory already written ready for the fold ([`MemoryReserve`]), and from then on every page
//! freed (so a cluster node gives nothing back when its writers go idle).
//!
//! Recovery reads a snapshot (the file's bytes, tens of MiB at a few hundred thousand buckets)
//! and folds the log on two threads, the log's records decoded a chunk at a time; all of it is
//! freed before the daemon serves, but mimalloc keeps freed pages until a later allocation
//! finds them past its purge delay, which an idle daemon may never make. Measured with
//! `bursar-bench memory` (200,000 scopes, 254,004 buckets): the restarted daemon's RSS per
//! bucket was 1,331–1,339 bytes at its first `hello`, and 635–637 bytes in the runs where
//! something happened to purge within 3 s (benches/README.md, "Memory per bucket").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Return the pages mimalloc holds free to the OS (a forced `mi_collect`: this thread's heap,
/// then every arena's free pages). Costs a few milliseconds; call it once a large transient
/// structure is gone, never on a hot path.
#[allow(unsafe_code)]
pub fn give_back_freed_memory() {
    if FREED_KEPT.load(Ordering::Relaxed) {
        // Nothing would be given back (a cluster node's reserve turned the purge off).
        return;
    }
    // SAFETY: `mi_collect` takes no pointer and has no precondition: it may be called from any
    // thread at any time (mimalloc's API), also when mimalloc is not the global allocator (it
    // then collects its own, unused, heaps).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Set by [`keep_freed_memory`]: [`give_back_freed_memory`] then returns at once (mimalloc
/// purges nothing, forced or not, while its purge delay is negative).
static FREED_KEPT: AtomicBool = AtomicBool::new(false);

/// mimalloc's `mi_option_purge_delay` (v3's `include/mimalloc.h`; `libmimalloc-sys` names no
/// constant for it): milliseconds before freed memory is given back, -1 for never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// From now on, mimalloc keeps the memory this process frees (its purge off; a forced
/// [`give_back_freed_memory`] gives nothing back either). A cluster node's reserve needs it:
/// mimalloc v3 purges whatever is free when the delay set by the first free after the last
/// purge expires, and the reserve is free but for ~1 ms of each pass, so it went back to the
/// OS about once a second (a stranger's review, 2026-12-05) and the next pass waited for the
/// host again.
pub fn keep_freed_memory() {
    FREED_KEPT.store(true, Ordering::Relaxed);
    set_purge_delay(-1);
}

/// How long mimalloc keeps a freed page before giving it back to the OS once the daemon
/// serves (its own default: 1 s). What a burst of writes frees (batches, answers, buffers)
/// was still resident right after the burst: `bursar-bench memory` (254,004 buckets) read the
/// running daemon's RSS at 502–557 bytes a bucket right after its last answer (429–458 three
/// seconds later) in six runs of seven; with 100 ms, 443–473 then and 426–442 later, and
/// `record --no-redis` at 44.5 K events/s against 43.2 K in seven interleaved pairs
/// (benches/README.md, "A running daemon's memory right after a burst").
pub const SERVING_PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Recovery starts: what it frees is given back only by [`recovery_done`]. Its decoded chunks
/// are freed and allocated again all the time; with mimalloc's own purge delay (1 s) the pages
/// of chunks freed a second ago went back to the OS and the next chunks faulted them in (and
/// had the host back them) again. Start-up without a snapshot at 10 M events, six interleaved
/// pairs: 7,071–8,061 minor faults against 10,822–13,359, 12.7–13.2 s of CPU against
/// 12.9–17.4, 6.8–7.3 s to the socket against 6.9–10.1 (benches/README.md, "Start-up:
/// recovery keeps what it frees").
pub fn recovery_starts() {
    set_purge_delay(RECOVERY_PURGE_DELAY_MS);
}

/// mimalloc's purge delay while the daemon recovers. Not "never" (-1): pages freed while the
/// delay is negative are never scheduled, so [`recovery_done`]'s forced collect could not give
/// them back (a restarted daemon's RSS was 935 bytes a bucket at its first `hello`, 321
/// before, `bursar-bench memory`). A minute is longer than a 10 M-event log takes to fold.
const RECOVERY_PURGE_DELAY_MS: std::ffi::c_long = 60_000;

/// Recovery is done and its buffers are freed: from now on what is freed is given back after
/// [`SERVING_PURGE_DELAY_MS`], and what recovery freed is given back now
/// ([`give_back_freed_memory`]; mimalloc purges nothing while the delay is negative, so the
/// delay is set first). Nothing is given back when the memory is kept ([`keep_freed_memory`]).
pub fn recovery_done() {
    if !FREED_KEPT.load(Ordering::Relaxed) {
        set_purge_delay(SERVING_PURGE_DELAY_MS);
    }
    give_back_freed_memory();
    no_huge_pages_from_now_on();
}

/// Transparent huge pages off for the memory this process touches from now on
/// (`prctl(PR_SET_THP_DISABLE)`; what is huge already stays so), once the daemon serves.
///
/// sled fills its log a 512 KiB buffer at a time, and takes a fresh one for each segment: ~25
/// a second under `record`. mimalloc places each in memory of its own, and with huge pages
/// (the kernel's `madvise` mode, which mimalloc asks for) its first write faulted in and
/// cleared a whole 2 MiB page, which the host of these VMs also backs only then (see
/// [`MemoryReserve`]): 6.4 % of the daemon's CPU samples under `record --no-redis` were that
/// clearing, on the writer thread, in the middle of a group commit. With huge pages off for
/// the process (`MIMALLOC_ALLOW_THP=0`, which makes this same call at start), 0.05 %; with
/// this call once serving, 0.07 %, and the write path's max latency ~20 → ~5 ms
/// (benches/README.md, "Huge pages off once serving"). It is made once serving, not at start,
/// only to leave start-up as it was measured: start-up took the same time either way (11.1 /
/// 11.0 s off, 11.2 / 11.6 s on). The
/// setting is the process's (its memory map's), whichever thread makes it; on a cluster node
/// it also holds for the folds of partitions followed or taken over later.
fn no_huge_pages_from_now_on() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!("cannot turn transparent huge pages off: {e}");
    }
}

/// Set mimalloc's purge delay: milliseconds, -1 for never.
#[allow(unsafe_code)]
fn set_purge_delay(ms: std::ffi::c_long) {
    // SAFETY: `mi_option_set` takes no pointer and has no precondition: options may be set from
    // any thread at any time (mimalloc's API; the purge delay is read each time a purge is
    // scheduled or tried).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
}

/// Memory this process has written to, kept ready for its allocations (a cluster node's,
/// `[cluster] memory_reserve_mib`).
///
/// On the VMs this was measured on, the host backs a guest's memory only when it is first
/// written: 8.9 ms for each fresh 2 MiB huge page (0.38 ms when the same process writes it
/// again), and memory the guest frees is soon taken back by the host. A follower that grows as
/// it folds (ids, buckets, report cells; a few MiB a second at 20,000 records/s) stalled ~9 ms
/// at each fresh huge page: that was the tail of the follower lag (benches/README.md, "Follower
/// lag: where the tail comes from" and "a reserve of written memory").
///
/// A thread of its own allocates the reserve in blocks of 1 MiB, writes one byte of each 4 KiB
/// page, and frees them again, every [`RESERVE_EVERY`]; mimalloc keeps what is freed
/// ([`keep_freed_memory`]) and hands it to the next threads that need pages, already backed.
/// When they have used the reserve up, the reserve thread, not the fold, waits for the host at
/// its next pass. The whole reserve is held at once during a pass (~1 ms once backed), so it
/// must fit under the node's memory limit with the rest.
pub struct MemoryReserve {
    stop: Arc<(Mutex<bool>, Condvar)>,
    passes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the reserve is written again: often enough that a follower growing a few MiB a
/// second never uses a reserve of tens of MiB up between two passes. A pass over a reserve
/// already backed costs ~1 ms (64 MiB).
pub const RESERVE_EVERY: Duration = Duration::from_millis(250);

/// Bytes of one block of the reserve.
const RESERVE_BLOCK: usize = 1 << 20;

/// Bytes of a page: one byte written in each backs it.
const PAGE: usize = 4096;

impl MemoryReserve {
    /// Keep `mib` MiB written and ready (nothing, `None`, for 0), written every
    /// [`RESERVE_EVERY`]; from now on mimalloc keeps what this process frees.
    pub fn start(mib: u32) -> std::io::Result<Option<MemoryReserve>> {
        MemoryReserve::start_every(mib, RESERVE_EVERY)
    }

    /// [`MemoryReserve::start`], written every `every` (tests: one pass, then none for long).
    pub fn start_every(mib: u32, every: Duration) -> std::io::Result<Option<MemoryReserve>> {
        if mib == 0 {
            return Ok(None);
        }
        keep_freed_memory();
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let passes = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("bursar-reserve".into())
            .spawn({
                let (stop, passes) = (stop.clone(), passes.clone());
                move || {
                    let mut warned = false;
                    loop {
                        let written = write_reserve(mib as usize);
                        if written < mib as usize && !warned {
                            tracing::warn!(
                                "memory reserve: only {written} of {mib} MiB could be \
                                 allocated; the fold may wait for fresh memory"
                            );
                            warned = true;
                        }
                        passes.fetch_add(1, Ordering::Release);
                        let (lock, cv) = &*stop;
                        let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                        let (stopped, _) = cv
                            .wait_timeout_while(stopped, every, |s| !*s)
                            .unwrap_or_else(|e| e.into_inner());
                        if *stopped {
                            return;
                        }
                    }
                }
            })?;
        Ok(Some(MemoryReserve {
            stop,
            passes,
            thread: Some(thread),
        }))
    }

    /// Passes over the reserve completed so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }
}

impl Drop for MemoryReserve {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("memory reserve: its thread panicked");
            }
        }
    }
}

/// Allocate up to `mib` blocks of 1 MiB, all at once, write a byte of each of their pages,
/// free them. Returns the blocks it could allocate (it stops at the first refused, rather than
/// abort the process as an infallible allocation would).
fn write_reserve(mib: usize) -> usize {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    if blocks.try_reserve_exact(mib).is_err() {
        return 0;
    }
    for _ in 0..mib {
        let mut block: Vec<u8> = Vec::new();
        if block.try_reserve_exact(RESERVE_BLOCK).is_err() {
            break;
        }
        for page in block.spare_capacity_mut().chunks_mut(PAGE) {
            if let Some(b) = page.first_mut() {
                b.write(0);
            }
        }
        // The writes are the point: kept although nothing reads them.
        blocks.push(std::hint::black_box(block));
    }
    let written = blocks.len();
    drop(std::hint::black_box(blocks));
    written
}
