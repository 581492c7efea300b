//! Following a shared log (cluster mode, SPEC §13): every node keeps a verified local copy of
//! every partition's log. [`catch_up`] copies what the shared log holds past the copy's head,
//! in batches, through the copy's own [`LogStore::append`], so each batch is checked to
//! continue the copy (dense seq, each `prev_hash` the hash before it): a copy that diverged from
//! the shared log (a different event at a seq it already holds) is refused, never patched.
//! Each copied event is handed to `on_event` after its batch is durable in the copy, so that a
//! follower folds only what it could fold again after a crash.

use super::{sealed_of, LogError, LogStore};
use bursar_schemas::event::Envelope;

/// Events copied per append and sync of the copy.
pub const FOLLOW_BATCH_EVENTS: usize = 4096;

/// Copy into `copy` every event of `shared` past the copy's head, making each batch durable
/// before handing its events to `on_event`. Returns how many events were copied.
///
/// The shared log's reader checks its hash chain as it reads; the copy's append checks that
/// the events continue the copy's own head, so an event at a seq the copy already holds with
/// another hash ends the catch-up with [`LogError::Refused`] (the copy has diverged: it was not
/// written from this shared log).
pub fn catch_up(
    shared: &dyn LogStore,
    copy: &mut dyn LogStore,
    mut on_event: impl FnMut(&Envelope),
) -> Result<u64, LogError> {
    let from = copy.head().map_or(1, |(seq, _, _)| seq + 1);
    if let (Some((copied, hash, _)), Some((shared_head, _, _))) = (copy.head(), shared.head()) {
        if copied > shared_head {
            return Err(LogError::Refused {
                seq: copied,
                reason: format!(
                    "the local copy holds events up to seq {copied}, the shared log only to \
                     {shared_head}: the copy was not written from this shared log"
                ),
            });
        }
        // The copy's last event must be the shared log's event at that seq.
        if let Some(theirs) = shared.read_from(copied).next() {
            let theirs = theirs?;
            if theirs.seq == copied && theirs.hash != hash {
                return Err(LogError::Refused {
                    seq: copied,
                    reason: "the local copy's event at this seq differs from the shared log's: \
                             the copy has diverged (remove it to follow the shared log again)"
                        .to_string(),
                });
            }
        }
    }
    let mut copied = 0u64;
    let mut batch: Vec<Envelope> = Vec::with_capacity(FOLLOW_BATCH_EVENTS);
    let mut flush = |batch: &mut Vec<Envelope>,
                     copy: &mut dyn LogStore,
                     on_event: &mut dyn FnMut(&Envelope)|
     -> Result<(), LogError> {
        if batch.is_empty() {
            return Ok(());
        }
        copy.append(&sealed_of(batch)?)?;
        copy.sync()?;
        for e in batch.iter() {
            on_event(e);
        }
        copied += batch.len() as u64;
        batch.clear();
        Ok(())
    };
    for env in shared.read_from(from) {
        batch.push(env?);
        if batch.len() >= FOLLOW_BATCH_EVENTS {
            flush(&mut batch, copy, &mut on_event)?;
        }
    }
    flush(&mut batch, copy, &mut on_event)?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::testing::{sample_batch, write_sample_batches, MemDisk, MemLog};
    use crate::log::verify_chain;
    use bursar_schemas::event::Hash32;

    #[test]
    fn a_copy_catches_up_in_steps_and_ends_equal_to_the_shared_log() {
        let mut shared = MemLog::open(&MemDisk::new()).unwrap();
        let mut copy = MemLog::open(&MemDisk::new()).unwrap();
        let written = write_sample_batches(&mut shared, &[3, 50, 1]);
        let mut seen = Vec::new();
        assert_eq!(
            catch_up(&shared, &mut copy, |e| seen.push(e.seq)).unwrap(),
            54
        );
        assert_eq!(copy.head(), shared.head());
        write_sample_batches(&mut shared, &[5000, 7]);
        assert_eq!(
            catch_up(&shared, &mut copy, |e| seen.push(e.seq)).unwrap(),
            5007,
            "only what is new is copied"
        );
        assert_eq!(catch_up(&shared, &mut copy, |_| ()).unwrap(), 0);
        assert_eq!(copy.head(), shared.head());
        assert_eq!(
            seen,
            (1..=5061).collect::<Vec<u64>>(),
            "each event once, in order"
        );
        assert_eq!(verify_chain(&copy).unwrap().0, 5061);
        assert_eq!(written.len(), 54);
    }

    #[test]
    fn a_copy_that_diverged_from_the_shared_log_is_refused() {
        let mut shared = MemLog::open(&MemDisk::new()).unwrap();
        write_sample_batches(&mut shared, &[10]);
        // Another log: the same seqs 1..=3, other events (other times), so other hashes.
        let mut other = MemLog::open(&MemDisk::new()).unwrap();
        let envs = sample_batch(Some((0, Hash32::default(), 5_000_000)), 3);
        other.append(&sealed_of(&envs).unwrap()).unwrap();
        other.sync().unwrap();
        let mut calls = 0;
        let result = catch_up(&shared, &mut other, |_| calls += 1);
        assert!(
            matches!(result, Err(LogError::Refused { seq: 3, .. })),
            "{result:?}"
        );
        assert_eq!(calls, 0, "nothing of a diverged copy is folded");
        assert_eq!(
            other.head().map(|h| h.0),
            Some(3),
            "the copy is left as it was"
        );

        // A copy ahead of the shared log is refused too.
        let mut ahead = MemLog::open(&MemDisk::new()).unwrap();
        write_sample_batches(&mut ahead, &[20]);
        assert!(matches!(
            catch_up(&shared, &mut ahead, |_| ()),
            Err(LogError::Refused { .. })
        ));
    }
}
