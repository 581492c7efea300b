//! `bursar salvage`: copy the intact prefix of a damaged log into a new data dir (SPEC §7).
//!
//! The damaged store is opened with sled alone (not [`SledLog::open`], which refuses a log
//! whose last record is damaged) and read record by record from the first. Every record whose
//! events all decode and chain is copied as it is stored (its bytes, so old-format records stay
//! old-format and every hash still recomputes); the record holding the first bad event is
//! copied up to the event before it. Nothing after the first bad seq is copied, even what is
//! still readable: a log with a hole is not a log. Snapshots and the first release's ids tree
//! are not copied: a daemon started on the new dir folds the whole log.

use super::sled_store::{open_db, read_durable_mark};
use super::{
    decode_checked_at, key_seq, pack_raw, sled_text, verify_chain, ChainBreak, Head, LogError,
    LogStore, SledLog,
};
use bursar_schemas::event::encode_record;
use std::path::{Path, PathBuf};

/// What a salvage copied and what it left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Salvaged {
    /// The new data dir.
    pub to: PathBuf,
    /// Events copied: seqs `1..=copied`.
    pub copied: u64,
    /// The first seq not copied and why, when the log was damaged.
    pub left_behind: Option<(u64, String)>,
    /// The last seq the damaged store claims: that of its last record's last event (or the
    /// record's key when it does not decode), or of its durable mark when that is later.
    pub claimed_head: Option<u64>,
}

/// Why a salvage could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    /// The destination exists and is not an empty directory.
    #[error("{} already exists and is not empty: salvage writes only into a new data dir", .0.display())]
    DestinationInUse(PathBuf),
    /// The source has no sled database.
    #[error("{} is not a bursar data dir (no sled database `db` in it)", .0.display())]
    NotADataDir(PathBuf),
    /// sled cannot open the damaged store at all: nothing in it can be read.
    #[error(
        "sled cannot open {} at all ({}): nothing in it can be read; restore the data dir from \
         a backup",
        file.display(),
        super::sled_text(source)
    )]
    Unopenable {
        /// The damaged file.
        file: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The damaged store cannot be opened, or the new one cannot be written.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The copy does not verify (a bug: nothing is reported as salvaged).
    #[error("the copy in {} does not verify: {why}", to.display())]
    CopyBroken {
        /// The new data dir.
        to: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// Copy the intact prefix of the log in `from` into the new data dir `to`.
pub fn salvage(from: &Path, to: &Path) -> Result<Salvaged, SalvageError> {
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SalvageError::DestinationInUse(to.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return Err(SalvageError::DestinationInUse(to.to_path_buf())),
    }
    // sled would create a store at a mistyped path.
    if !from.join("db").is_file() {
        return Err(SalvageError::NotADataDir(from.to_path_buf()));
    }
    let (db, _claim) = open_db(from).map_err(|e| match e {
        LogError::Damaged { file, source } => SalvageError::Unopenable { file, source },
        other => SalvageError::Log(other),
    })?;
    let log = db.open_tree("log").map_err(|source| LogError::Storage {
        op: "open tree log",
        source,
    })?;
    let claimed_head = match log.last() {
        Ok(Some((k, v))) => key_seq(&k).ok().map(|key| {
            decode_checked_at(key, &v)
                .ok()
                .and_then(|c| c.last().map(|c| c.env.seq))
                .unwrap_or(key)
        }),
        _ => None,
    };

    // Events the store once made durable, which it may no longer hold.
    let claimed_head = match (claimed_head, read_durable_mark(from)) {
        (Some(a), Some((b, _))) => Some(a.max(b)),
        (a, b) => a.or(b.map(|m| m.0)),
    };
    let mut out = SledLog::open(to)?;
    let mut prev: Option<Head> = None;
    let mut left_behind = None;
    let mut iter = log.iter();
    loop {
        let next_seq = prev.map_or(1, |h| h.0 + 1);
        let (key, bytes) = match iter.next() {
            None => break,
            Some(Ok((k, v))) => match key_seq(&k) {
                Ok(key) => (key, v),
                Err(e) => {
                    left_behind = Some((next_seq, e.to_string()));
                    break;
                }
            },
            Some(Err(e)) => {
                left_behind = Some((
                    next_seq,
                    format!("the record holding it cannot be read: {}", sled_text(&e)),
                ));
                break;
            }
        };
        let checked = match decode_checked_at(key, &bytes) {
            Ok(c) => c,
            Err(e) => {
                left_behind = Some((next_seq, e.to_string()));
                break;
            }
        };
        let before_record = prev;
        let mut intact = 0;
        for c in &checked {
            if let Err(b) = ChainBreak::check(prev, c) {
                // The seq expected next is the first one not copied (a gap names the seq it
                // found instead).
                left_behind = Some((prev.map_or(1, |h| h.0 + 1), b.to_string()));
                break;
            }
            prev = Some((c.env.seq, c.env.hash, c.env.ts));
            intact += 1;
        }
        if intact == checked.len() && key == checked.first().map_or(key, |c| c.env.seq) {
            out.put_raw_record(key, &bytes)?;
        } else if intact > 0 {
            // The intact events before the break, in a record of their own: encoded again, so
            // kept only when every hash still recomputes from the new bytes (an old event whose
            // JSON encodes differently today would not); else the copy ends before the record.
            let envs: Vec<_> = checked.into_iter().take(intact).map(|c| c.env).collect();
            let raw = encode_record(&envs).map_err(LogError::Encode)?;
            let packed = pack_raw(&raw);
            let same = decode_checked_at(envs[0].seq, &packed).is_ok_and(|again| {
                again.len() == envs.len()
                    && again
                        .iter()
                        .zip(&envs)
                        .all(|(a, e)| a.content_hash == e.hash && a.env.hash == e.hash)
            });
            if same {
                out.put_raw_record(envs[0].seq, &packed)?;
            } else {
                prev = before_record;
                if let Some((_, why)) = left_behind.take() {
                    left_behind = Some((prev.map_or(1, |h| h.0 + 1), why));
                }
            }
        }
        if left_behind.is_some() {
            break;
        }
    }
    out.sync()?;
    drop(out);
    let copied = prev.map_or(0, |h| h.0);
    if left_behind.is_none() {
        if let Some(claimed) = claimed_head.filter(|c| *c > copied) {
            left_behind = Some((
                copied + 1,
                format!(
                    "the store no longer holds it, but events up to seq {claimed} were durable \
                     (its durable mark)"
                ),
            ));
        }
    }
    // Read the copy back as a daemon would.
    let reopened = SledLog::open(to)?;
    match verify_chain(&reopened) {
        Ok((head, _)) if head == copied => {}
        Ok((head, _)) => {
            return Err(SalvageError::CopyBroken {
                to: to.to_path_buf(),
                why: format!("it ends at seq {head}, not {copied}"),
            })
        }
        Err(e) => {
            return Err(SalvageError::CopyBroken {
                to: to.to_path_buf(),
                why: e.to_string(),
            })
        }
    }
    Ok(Salvaged {
        to: to.to_path_buf(),
        copied,
        left_behind,
        claimed_head,
    })
}
