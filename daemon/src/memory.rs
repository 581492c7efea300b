//! Giving freed memory back to the OS: after start-up, and when the writer goes idle after
//! work (`Writer::idle`, at most once a second).
//!
//! Recovery reads a snapshot (the file's bytes, tens of MiB at a few hundred thousand buckets;
//! a snapshot of format 5 also its decompressed copy) and folds the log on two threads, the
//! log's records decoded a chunk at a time; all of it is freed before the daemon serves, but
//! mimalloc keeps freed pages until a later allocation finds them past its purge delay, which
//! an idle daemon may never make. Measured with `bursar-bench
//! memory` (200,000 scopes, 254,004 buckets): the restarted daemon's RSS per bucket was
//! 1,331–1,339 bytes at its first `hello`, and 635–637 bytes in the runs where something
//! happened to purge within 3 s (benches/README.md, "Memory per bucket").

/// Return the pages mimalloc holds free to the OS (a forced `mi_collect`: this thread's heap,
/// then every arena's free pages). Costs a few milliseconds; call it once a large transient
/// structure is gone, never on a hot path.
#[allow(unsafe_code)]
pub fn give_back_freed_memory() {
    // SAFETY: `mi_collect` takes no pointer and has no precondition: it may be called from any
    // thread at any time (mimalloc's API), also when mimalloc is not the global allocator (it
    // then collects its own, unused, heaps).
    unsafe { libmimalloc_sys::mi_collect(true) };
}
