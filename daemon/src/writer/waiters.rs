//! The waiting line of `reserve`s with `wait_ms` (SPEC §10): requests that only limits freeing
//! up by themselves stand in the way of (concurrency, rolling windows, holds, allowances, a
//! provider's observed limit until its reset). Nothing of a waiting request is appended.
//!
//! The line lives here, on the writer's side, not in core (core only says "this would wait",
//! [`bursar_core::ledger::Reply::Wait`]) and never blocks the writer: a waiter is a parked
//! request that the writer decides again, in arrival order, after anything that may have freed
//! capacity — a job that ends a hold, expiries, a policy change or an observation: before the
//! next `reserve` is decided and before the batch's answers leave — and on a tick for what
//! frees with time (rolling windows slide, observations reset; [`RETRY_EVERY`], longer for a
//! long line). So a request that arrives later cannot take what a commit or release freed for
//! a waiter: first come, first served per bucket. At its deadline a waiter is decided a last
//! time as a plain `reserve` (its deny appended).

use super::{Outcome, WriteCmd, WriteReply};
use bursar_schemas::event::Actor;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often waiters are decided again while nothing else happens (rolling windows slide and
/// observations reset with time).
pub const RETRY_EVERY: Duration = Duration::from_millis(5);

/// A parked `reserve`.
pub(super) struct Waiter {
    /// The request (a `reserve` with `wait_ms`).
    pub(super) cmd: WriteCmd,
    /// Its digest, computed where it was decoded.
    pub(super) digest: [u8; 16],
    /// Peer credentials.
    pub(super) actor: Actor,
    /// Where its answer goes.
    pub(super) reply: WriteReply,
    /// When it arrived.
    pub(super) since: Instant,
    /// When its time is up.
    pub(super) deadline: Instant,
}

impl Waiter {
    /// How long it has waited, in ms.
    pub(super) fn waited_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The line, in arrival order.
#[derive(Default)]
pub(super) struct Waiters {
    line: VecDeque<Waiter>,
    /// Something may have freed capacity since the line was last decided.
    changed: bool,
    /// When the line was last decided.
    last: Option<Instant>,
}

/// Deciding the line again costs one decision per waiter (a few µs): the tick grows with the
/// line so that a long line waiting on slow frees keeps the writer mostly free.
const RETRY_PER_WAITER: Duration = Duration::from_micros(10);

impl Waiters {
    /// Waiters now.
    pub(super) fn len(&self) -> usize {
        self.line.len()
    }

    /// True when nobody waits.
    pub(super) fn is_empty(&self) -> bool {
        self.line.is_empty()
    }

    /// Join the end of the line.
    pub(super) fn push(&mut self, w: Waiter) {
        self.line.push_back(w);
    }

    /// Take the whole line (to be decided again in order; those still waiting are put back
    /// with [`Waiters::push`], in the same order).
    pub(super) fn take(&mut self) -> VecDeque<Waiter> {
        std::mem::take(&mut self.line)
    }

    /// Something may have freed capacity (the line is decided again before the next reserve).
    pub(super) fn changed(&mut self) {
        self.changed = true;
    }

    /// The line was decided at `at`.
    pub(super) fn retried(&mut self, at: Instant) {
        self.changed = false;
        self.last = Some(at);
    }

    /// How often the line is decided again when nothing else happens.
    fn tick(&self) -> Duration {
        RETRY_EVERY.max(
            RETRY_PER_WAITER.saturating_mul(u32::try_from(self.line.len()).unwrap_or(u32::MAX)),
        )
    }

    /// True when the line should be decided again now.
    pub(super) fn due(&self, now: Instant) -> bool {
        if self.line.is_empty() {
            return false;
        }
        self.changed
            || self
                .last
                .is_none_or(|l| now.saturating_duration_since(l) >= self.tick())
            || self.line.iter().any(|w| w.deadline <= now)
    }

    /// How long the writer may sleep before a waiter needs deciding again.
    pub(super) fn sleep_for(&self, now: Instant) -> Option<Duration> {
        let first_deadline = self.line.iter().map(|w| w.deadline).min()?;
        Some(
            first_deadline
                .saturating_duration_since(now)
                .min(self.tick()),
        )
    }
}

/// A waiting request's answer with how long it waited.
pub(super) fn waited(outcome: Outcome, waited_ms: u64) -> Outcome {
    Outcome::Waited(Box::new(outcome), waited_ms)
}

/// The request's `wait_ms`, when it is a `reserve` that may wait.
pub(super) fn wait_of(cmd: &WriteCmd) -> Option<Duration> {
    match cmd {
        WriteCmd::Reserve(r) => r.wait_ms.map(Duration::from_millis),
        _ => None,
    }
}
