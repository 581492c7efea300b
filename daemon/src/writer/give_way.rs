//! When the writer gives its CPU to the threads waiting for one.
//!
//! On a machine with few cores the writer deciding a batch holds a CPU for as long as the batch
//! takes (100 µs and more after a slow sync), and a connection thread woken by a `check`, or
//! the client that sent it, may have been queued behind it on that CPU: the scheduler lets a
//! running thread keep its CPU through the slice it protects for it, and does not take it at all
//! inside a system call on a kernel built without preemption. So before each job of a batch,
//! holding no lock, the writer steps aside (`sched_yield`) once [`YIELD_AFTER`] has passed since
//! its wait for a job ended or since its last yield: a thread waiting for its CPU runs first, and
//! when none waits the yield returns at once. It does so only while it keeps up with the writes
//! (it waited for jobs at least [`KEEPING_UP_PERCENT`] of the last completed window, a span of at
//! least [`WINDOW`] closed when a wait for a job ends); while it is behind, every thread waits
//! for a CPU anyway, and a yield would only hand the writer's CPU to a thread that keeps it for
//! a whole slice while the batch's clients wait. (`write_ledger`'s own yield is another matter:
//! it lets reads already waiting for the ledger's lock take it first.)
//!
//! Measured (benches/README.md, "The writer gives way"; 2 vCPUs, `check` under 20,000 writes/s):
//! `check` p99 127–148 µs without, 82–84 µs with; depth-1 `record` and `reserve-commit` within
//! the runs' spread. Yielding whatever the load cost `reserve-commit` ~10 % (a yield that
//! switched kept the writer away 80–90 µs there); pausing the yields after such a long one still
//! cost depth-1 `record` ~4 %.

use std::time::{Duration, Instant};

/// Wall-clock time from the end of the writer's wait for a job (or from its last yield) after
/// which it yields before its next job. Checked only between jobs: one long job runs through.
pub const YIELD_AFTER: Duration = Duration::from_micros(15);
/// The shortest span over which the writer's waiting for jobs is weighed.
pub const WINDOW: Duration = Duration::from_millis(10);
/// The share of a window, in percent, the writer must have waited for jobs to count as keeping
/// up.
pub const KEEPING_UP_PERCENT: u32 = 20;

/// The writer's account of its running and waiting.
#[derive(Debug)]
pub struct GiveWay {
    /// Since when the writer has run without stepping aside (the end of its wait for a job, or
    /// its last yield).
    running_since: Instant,
    /// The window being weighed: its start and the time waited for jobs in it so far.
    window_start: Instant,
    waited: Duration,
    /// Whether the last completed window counts as keeping up.
    keeping_up: bool,
}

impl GiveWay {
    /// A writer that starts at `now`, counted as behind until a window says otherwise.
    pub fn new(now: Instant) -> GiveWay {
        GiveWay {
            running_since: now,
            window_start: now,
            waited: Duration::ZERO,
            keeping_up: false,
        }
    }

    /// The writer waited `waited` for a job, until `now`; it runs from `now` on.
    pub fn waited(&mut self, waited: Duration, now: Instant) {
        self.waited += waited;
        let span = now.saturating_duration_since(self.window_start);
        if span >= WINDOW {
            self.keeping_up =
                self.waited.as_nanos() * 100 >= span.as_nanos() * u128::from(KEEPING_UP_PERCENT);
            self.window_start = now;
            self.waited = Duration::ZERO;
        }
        self.running_since = now;
    }

    /// Before a job at `now`: whether to step aside now.
    pub fn due(&self, now: Instant) -> bool {
        self.keeping_up && now.saturating_duration_since(self.running_since) >= YIELD_AFTER
    }

    /// The writer stepped aside and runs again from `now`.
    pub fn yielded(&mut self, now: Instant) {
        self.running_since = now;
    }

    /// Before a job: step aside when due, the writer's CPU going to a thread waiting for one,
    /// if any. Call it holding no lock.
    pub fn before_job(&mut self) {
        // No clock read while behind.
        if self.keeping_up && self.due(Instant::now()) {
            std::thread::yield_now();
            self.yielded(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// `n` cycles from `t`, each `cycle` long with `wait` of it waiting for jobs: where they end.
    fn cycles(g: &mut GiveWay, mut t: Instant, cycle: Duration, wait: Duration, n: u32) -> Instant {
        for _ in 0..n {
            t += cycle;
            g.waited(wait, t);
        }
        t
    }

    #[test]
    fn a_writer_that_keeps_up_steps_aside_after_running_15_us_and_not_before() {
        let t0 = Instant::now();
        let mut g = GiveWay::new(t0);
        // 300 µs cycles, 150 µs of each waiting for jobs: half the time idle.
        let t = cycles(&mut g, t0, us(300), us(150), 40);
        assert!(!g.due(t), "due at a batch's start");
        assert!(!g.due(t + us(14)));
        assert!(g.due(t + us(15)));
        g.yielded(t + us(20));
        assert!(!g.due(t + us(30)), "due again right after a yield");
        assert!(g.due(t + us(35)));
    }

    #[test]
    fn a_writer_that_falls_behind_stops_stepping_aside() {
        let t0 = Instant::now();
        let mut g = GiveWay::new(t0);
        // A quiet spell first: it keeps up.
        let t = t0 + Duration::from_millis(20);
        g.waited(Duration::from_millis(20), t);
        assert!(g.due(t + us(15)));
        // Then jobs always waiting: 2 µs of every 250 µs spent waiting for them (under 20 %).
        let t = cycles(&mut g, t, us(250), us(2), 80);
        assert!(!g.due(t + us(15)));
        assert!(!g.due(t + Duration::from_millis(5)));
    }

    #[test]
    fn a_fifth_of_the_window_spent_waiting_is_keeping_up_and_less_is_not() {
        for (waited_us, keeping_up) in [(1_999, false), (2_000, true)] {
            let t0 = Instant::now();
            let mut g = GiveWay::new(t0);
            g.waited(us(waited_us), t0 + WINDOW);
            assert_eq!(
                g.due(t0 + WINDOW + YIELD_AFTER),
                keeping_up,
                "{waited_us} µs waited of 10 ms"
            );
        }
    }

    #[test]
    fn the_verdict_follows_the_last_completed_window() {
        let t0 = Instant::now();
        let mut g = GiveWay::new(t0);
        assert!(!g.due(t0 + us(100)), "a new writer counts as behind");
        // A quiet spell: one long wait for a job.
        let t = t0 + Duration::from_millis(50);
        g.waited(Duration::from_millis(50), t);
        assert!(g.due(t + us(15)));
        // Then a window of back-to-back batches: behind from the window's end on.
        let t = cycles(&mut g, t, us(200), us(1), 50);
        assert!(!g.due(t + us(100)));
        // Within a window the last verdict holds: a single long wait does not flip it early.
        g.waited(Duration::from_millis(1), t + Duration::from_millis(1));
        assert!(!g.due(t + Duration::from_millis(1) + us(100)));
        // At the window's end it does: 3 ms waited of the 10 ms is over 20 %.
        g.waited(Duration::from_millis(2), t + WINDOW);
        assert!(g.due(t + WINDOW + us(15)));
    }
}
