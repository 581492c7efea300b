//! One budget bucket: what was spent in its current window and what live holds keep back.

use crate::window::{window_bounds, Amounts, RollingCounter};
use bursar_schemas::policy::WindowSpec;
use bursar_schemas::TsMicros;
use serde::{Deserialize, Serialize};

/// Spent and held figures of one `(budget, scope key)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the window `spent` belongs to (fixed/calendar).
    pub window_start: TsMicros,
    /// Spent in that window (fixed/calendar), or ever (cumulative).
    pub spent: Amounts,
    /// Spent per slot (rolling).
    pub rolling: RollingCounter,
    /// Held by live holds.
    pub held: Amounts,
    /// Live holds.
    pub live_holds: u64,
    /// Window in which `budget_warned` was last appended.
    pub warned_window: Option<TsMicros>,
    /// Window in which `budget_exhausted` was last appended.
    pub exhausted_window: Option<TsMicros>,
}

/// What a bucket looks like at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Spent in the current window.
    pub spent: Amounts,
    /// Held by live holds.
    pub held: Amounts,
    /// Live holds.
    pub live_holds: u64,
}

impl Bucket {
    /// Add usage at `ts`, rolling the window over first when `ts` is in a new one.
    pub fn add_spent(&mut self, spec: &WindowSpec, ts: TsMicros, amounts: Amounts) {
        match spec {
            WindowSpec::Rolling {
                seconds,
                resolution_seconds,
            } => self.rolling.add(*seconds, *resolution_seconds, ts, amounts),
            WindowSpec::Cumulative => self.spent += amounts,
            WindowSpec::Fixed { .. } | WindowSpec::Calendar { .. } => {
                let (start, _) = window_bounds(spec, ts);
                if start != self.window_start {
                    self.window_start = start;
                    self.spent = Amounts::default();
                }
                self.spent += amounts;
            }
        }
    }

    /// Count a hold.
    pub fn hold(&mut self, amounts: Amounts, slots: u64) {
        self.held += amounts;
        self.live_holds = self.live_holds.saturating_add(slots);
    }

    /// Stop counting a hold.
    pub fn unhold(&mut self, amounts: Amounts, slots: u64) {
        self.held = self.held - amounts;
        self.live_holds = self.live_holds.saturating_sub(slots);
    }

    /// Spent in the window containing `now`.
    pub fn spent_at(&self, spec: &WindowSpec, now: TsMicros) -> Amounts {
        match spec {
            WindowSpec::Rolling {
                seconds,
                resolution_seconds,
            } => self.rolling.total(*seconds, *resolution_seconds, now),
            WindowSpec::Cumulative => self.spent,
            WindowSpec::Fixed { .. } | WindowSpec::Calendar { .. } => {
                if window_bounds(spec, now).0 == self.window_start {
                    self.spent
                } else {
                    Amounts::default()
                }
            }
        }
    }

    /// Figures at `now`.
    pub fn figures(&self, spec: &WindowSpec, now: TsMicros) -> Figures {
        Figures {
            spent: self.spent_at(spec, now),
            held: self.held,
            live_holds: self.live_holds,
        }
    }
}

/// The identifier of the window a crossing belongs to, for "once per bucket per window".
/// Rolling windows have no edges: a rolling bucket may cross once per `window_seconds` period.
pub fn crossing_window(spec: &WindowSpec, ts: TsMicros) -> TsMicros {
    match spec {
        WindowSpec::Cumulative => 0,
        WindowSpec::Rolling { seconds, .. } => {
            let w = crate::time::seconds(*seconds).max(1);
            ts.div_euclid(w).saturating_mul(w)
        }
        _ => window_bounds(spec, ts).0,
    }
}
