//! Offline mode: read a stopped daemon's data dir directly (`bursar --data-dir DIR ...`).
//!
//! The log is opened with the daemon's own [`SledLog`] and folded with the daemon's own
//! [`recover`](bursard::writer::recover), so every figure is exactly what the daemon would
//! report. sled locks the data dir: while a daemon runs on it, opening fails with
//! [`OfflineError::InUse`] and nothing is touched. Offline mode never appends to the log
//! (`replay` is a dry run only).

use bursar_core::ledger::{self, Ledger, Pricer};
use bursar_core::policy::parse_pricing_section;
use bursar_core::time::parse_ts;
use bursar_schemas::event::EventBody;
use bursar_schemas::policy::PricingSection;
use bursar_schemas::wire::{
    ExportRequest, ExportedEvent, ReplayAnswer, StatusAnswer, StatusRequest, VerifyAnswer,
};
use bursar_schemas::TsMicros;
use bursard::log::{verify_chain, LogError, LogStore, SledLog};
use bursard::streams::{exported, Filter};
use std::path::{Path, PathBuf};

/// Why offline access failed.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// No such directory.
    #[error("no data dir at {}: {}", .0.display(), .1)]
    Missing(PathBuf, String),
    /// A directory, but not one a daemon wrote.
    #[error("{} is not a bursar data dir (no sled database in it)", .0.display())]
    NotADataDir(PathBuf),
    /// A running daemon holds the directory.
    #[error("the data dir {} is in use by a running bursard; use the socket instead, or stop the daemon", .0.display())]
    InUse(PathBuf),
    /// The log could not be opened or read.
    #[error("{0}")]
    Log(String),
    /// The hash chain is broken.
    #[error("verify failed at seq {seq}: {message}")]
    Verify {
        /// First bad seq.
        seq: u64,
        /// What is wrong.
        message: String,
    },
    /// A bad argument (time, pricing).
    #[error("{0}")]
    Invalid(String),
}

/// A stopped daemon's data dir, opened read-only in spirit (nothing is appended).
pub struct Offline {
    store: SledLog,
    ledger: Option<Ledger>,
}

impl std::fmt::Debug for Offline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offline")
            .field("dir", &self.store.dir())
            .finish_non_exhaustive()
    }
}

impl Offline {
    /// Open `dir`. Refuses a missing dir, a dir without a sled database, and a dir a running
    /// daemon holds.
    pub fn open(dir: &Path) -> Result<Offline, OfflineError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(OfflineError::Missing(
                    dir.to_path_buf(),
                    "not a directory".into(),
                ))
            }
            Err(e) => {
                return Err(OfflineError::Missing(
                    dir.to_path_buf(),
                    crate::os_message(&e),
                ))
            }
        }
        if !dir.join("db").exists() {
            return Err(OfflineError::NotADataDir(dir.to_path_buf()));
        }
        let store = SledLog::open(dir).map_err(|e| match e {
            LogError::Locked { .. } => OfflineError::InUse(dir.to_path_buf()),
            other => OfflineError::Log(other.to_string()),
        })?;
        Ok(Offline {
            store,
            ledger: None,
        })
    }

    /// The log store.
    pub fn store(&self) -> &SledLog {
        &self.store
    }

    /// Seq of the last event (0 for an empty log).
    pub fn head(&self) -> u64 {
        self.store.head().map(|h| h.0).unwrap_or(0)
    }

    /// The state a daemon would rebuild from this dir (folded once, then kept).
    pub fn ledger(&mut self) -> Result<&Ledger, OfflineError> {
        if self.ledger.is_none() {
            let l = bursard::writer::recover(&self.store)
                .map_err(|e| OfflineError::Log(format!("cannot fold the log: {e}")))?;
            self.ledger = Some(l);
        }
        self.ledger
            .as_ref()
            .ok_or_else(|| OfflineError::Log("no ledger".into()))
    }

    /// `status` as the daemon would answer it at `now`.
    pub fn status(
        &mut self,
        req: &StatusRequest,
        now: TsMicros,
    ) -> Result<StatusAnswer, OfflineError> {
        self.ledger()?
            .status(req, now)
            .map_err(|e| OfflineError::Invalid(crate::describe_wire_error(&e)))
    }

    /// `report`: from the rollups of the fold.
    pub fn report(
        &mut self,
        req: &bursar_schemas::wire::ReportRequest,
        now: TsMicros,
    ) -> Result<bursar_schemas::wire::ReportAnswer, OfflineError> {
        self.ledger()?
            .report(req, now)
            .map_err(|e| OfflineError::Invalid(crate::describe_wire_error(&e)))
    }

    /// `verify`: walk the whole hash chain.
    pub fn verify(&self) -> Result<VerifyAnswer, OfflineError> {
        if let Err(e) = bursard::log::check_durable_mark(&self.store) {
            return Err(OfflineError::Verify {
                seq: match &e {
                    LogError::Corrupt { seq, .. } => *seq,
                    LogError::Chain(b) => b.seq(),
                    _ => 0,
                },
                message: e.to_string(),
            });
        }
        match verify_chain(&self.store) {
            Ok((events, head)) => Ok(VerifyAnswer {
                ok: true,
                events,
                head: head.to_hex(),
                partitions: Vec::new(),
                req: None,
            }),
            Err(e) => Err(OfflineError::Verify {
                seq: e.seq(),
                message: e.to_string(),
            }),
        }
    }

    /// Events from `from_seq` on that pass `filter`, as `export` sends them (cost and price
    /// version of usage events under the prices in force at their time).
    pub fn events<'a>(
        &'a mut self,
        from_seq: u64,
        filter: &ExportRequest,
    ) -> Result<impl Iterator<Item = Result<ExportedEvent, OfflineError>> + 'a, OfflineError> {
        let pricer = self.ledger()?.pricer();
        let f = filter_of(filter)?;
        Ok(self
            .store
            .read_from(from_seq.max(1))
            .filter_map(move |item| match item {
                Ok(env) if f.keeps(&env) => Some(Ok(exported(env, &pricer, None))),
                Ok(_) => None,
                Err(e) => Some(Err(OfflineError::Log(format!("reading the log: {e}")))),
            }))
    }

    /// The last `policy_applied` event.
    pub fn last_policy_event(&mut self) -> Result<Option<ExportedEvent>, OfflineError> {
        let mut last = None;
        for item in self.store.read_from(1) {
            let env = item.map_err(|e| OfflineError::Log(format!("reading the log: {e}")))?;
            if matches!(env.body, EventBody::PolicyApplied(_)) {
                last = Some(env);
            }
        }
        Ok(last.map(|env| exported(env, &Pricer::default(), None)))
    }

    /// A dry-run `replay`: fold the log again with `pricing` (merged over the prices in force
    /// now) from `since` on, and report what would change at `now`.
    pub fn replay(
        &mut self,
        pricing: &PricingSection,
        since: Option<&str>,
        now: TsMicros,
    ) -> Result<ReplayAnswer, OfflineError> {
        let since = match since {
            Some(s) => parse_ts(s).ok_or_else(|| {
                OfflineError::Invalid(format!("--since: {s:?} is not an RFC 3339 time"))
            })?,
            None => i64::MIN,
        };
        let before = self.ledger()?.clone();
        let base = before.current_prices().cloned().unwrap_or_default();
        let table = parse_pricing_section(pricing, &base, "pricing", &|p| {
            std::fs::read_to_string(p).map_err(|e| crate::os_message(&e))
        })
        .map_err(|errs| {
            OfflineError::Invalid(
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let epochs = ledger::collect_epochs(self.store.read_from(1))
            .map_err(|e| OfflineError::Log(e.to_string()))?;
        let outcome = ledger::replay(
            &before,
            &epochs,
            self.store.read_from(1),
            &table,
            since,
            now,
        )
        .map_err(|e| OfflineError::Log(e.to_string()))?;
        Ok(outcome.answer)
    }

    /// A what-if `replay`: the log's requests decided again under `policy` from `since`.
    pub fn what_if(
        &mut self,
        policy: &bursar_schemas::policy::ResolvedPolicy,
        since: Option<&str>,
    ) -> Result<bursar_schemas::wire::WhatIfAnswer, OfflineError> {
        let since = match since {
            Some(s) => parse_ts(s).ok_or_else(|| {
                OfflineError::Invalid(format!("--since: {s:?} is not an RFC 3339 time"))
            })?,
            None => i64::MIN,
        };
        ledger::what_if(|| self.store.read_from(1), policy, since)
            .map_err(|e| OfflineError::Log(e.to_string()))
    }
}

/// The `since` / `until` / `labels` filter of `export`, as the daemon applies it.
fn filter_of(e: &ExportRequest) -> Result<Filter, OfflineError> {
    let parse = |name: &str, v: &Option<String>| -> Result<Option<TsMicros>, OfflineError> {
        match v {
            None => Ok(None),
            Some(t) => parse_ts(t).map(Some).ok_or_else(|| {
                OfflineError::Invalid(format!("--{name}: {t:?} is not an RFC 3339 time"))
            }),
        }
    };
    Ok(Filter {
        since: parse("since", &e.since)?,
        until: parse("until", &e.until)?,
        labels: e.labels.clone(),
        types: None,
    })
}
