//! Partition leases (cluster mode, SPEC §13; issue 15): who may write a partition's log.
//!
//! A lease is an entry of a JetStream key-value bucket (replicated like the logs) whose
//! `max_age` is the lease's time to live: the key is the partition, the value the holder's node
//! name. A node takes a free lease with `create` (which fails while a live entry exists), and
//! keeps it by renewing it with `update` conditional on the revision it holds, well within the
//! TTL. A holder that stops renewing (dead, partitioned, paused) loses the entry when it ages
//! out, and another node's `create` then succeeds; the old holder's next renewal fails on the
//! revision, so it knows it was deposed.
//!
//! The holder's own view is on the safe side: [`Held::is_valid`] counts the TTL from the moment
//! it *sent* its last successful create or renewal, on the local monotonic clock, less a
//! margin, so it believes it holds the lease no longer than the servers keep the entry (they
//! expire it `max_age` after the time they stamp on it; NATS ≥ 2.11 stamps a cached clock that
//! a starved server updates late, so an entry can age out a few hundred ms early: that is what
//! the margin is for). A writer checks it before each append; the log's conditional append
//! ([`super::jetstream`]) is the fence behind it — for a writer paused between the check and
//! the append, and for a margin that was not enough: two writers that both believe they hold a
//! partition cannot both append after the same sequence.

use super::jetstream::Nats;
use super::LogError;
use async_nats::jetstream::kv;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a take or renewal of a lease may wait for the servers: a node's coordinator renews
/// every lease it holds in turn, and must come back to step down a failed writer at once.
const LEASE_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The part of the TTL a holder does not count on (its view ends this much before the entry's
/// age-out).
const SAFETY_MARGIN_DIVISOR: u32 = 5;

fn shared(op: &'static str) -> impl Fn(String) -> LogError {
    move |reason| LogError::Shared { op, reason }
}

/// The leases of a cluster's partitions.
pub struct Leases {
    nats: Arc<Nats>,
    kv: kv::Store,
    ttl: Duration,
}

/// A lease this node holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// The partition.
    pub partition: String,
    /// This node.
    pub node: String,
    /// The entry's revision: the condition of the next renewal, and the lease's epoch (it only
    /// grows, over every lease of the bucket).
    pub revision: u64,
    /// Until when this node may act as the holder.
    pub valid_until: Instant,
}

impl Held {
    /// Whether this node may still act as the partition's writer at `now`.
    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }
}

impl Leases {
    /// Open (or create: R`replicas`, one revision kept, entries aging out after `ttl`) the
    /// bucket `bucket`.
    pub fn open(
        nats: Arc<Nats>,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Leases, LogError> {
        // The bucket's stream, made here rather than by `create_key_value` so that entries are
        // read from its leader, never a replica (direct gets off): a replica that lags shows a
        // released lease as still held (and `create` then refuses to take it) or a renewed one
        // as gone. A few reads per second; the leader's word is worth the hop.
        let config = async_nats::jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            allow_direct: false,
            ..Default::default()
        };
        let kv = nats.retrying("open the lease bucket", || async {
            let mut stream = nats
                .js
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| e.to_string())?;
            let info = stream.info().await.map_err(|e| e.to_string())?;
            if info.config.allow_direct {
                // Made by an earlier bursard with direct gets on.
                let mut leader_reads = info.config.clone();
                leader_reads.allow_direct = false;
                nats.js
                    .update_stream(leader_reads)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            nats.js
                .get_key_value(bucket)
                .await
                .map_err(|e| e.to_string())
        })?;
        // Ready once its leader answers a read through this connection's server.
        nats.retrying("read the lease bucket", || async {
            kv.entry("ready")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })?;
        Ok(Leases { nats, kv, ttl })
    }

    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.ttl / SAFETY_MARGIN_DIVISOR
    }

    /// Take the partition's lease when nobody holds it; `None` while another node does.
    pub fn try_acquire(&self, partition: &str, node: &str) -> Result<Option<Held>, LogError> {
        let sent = Instant::now();
        let created = self.nats.rt.block_on(async {
            tokio::time::timeout(
                LEASE_REQUEST_TIMEOUT,
                self.kv.create(partition, node.to_string().into()),
            )
            .await
        });
        let Ok(created) = created else {
            return Err(shared("take a lease")(format!(
                "{partition}: no answer within {LEASE_REQUEST_TIMEOUT:?}"
            )));
        };
        match created {
            Ok(revision) => Ok(Some(Held {
                partition: partition.to_string(),
                node: node.to_string(),
                revision,
                valid_until: self.valid_until(sent),
            })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(shared("take a lease")(format!("{partition}: {e}"))),
        }
    }

    /// Renew a held lease. `Ok(false)`: it was lost (aged out and taken, or deleted), and
    /// `held` is no longer valid.
    pub fn renew(&self, held: &mut Held) -> Result<bool, LogError> {
        let sent = Instant::now();
        let updated = self.nats.rt.block_on(async {
            tokio::time::timeout(
                LEASE_REQUEST_TIMEOUT,
                self.kv
                    .update(&held.partition, held.node.clone().into(), held.revision),
            )
            .await
        });
        let Ok(updated) = updated else {
            return Err(shared("renew a lease")(format!(
                "{}: no answer within {LEASE_REQUEST_TIMEOUT:?}",
                held.partition
            )));
        };
        match updated {
            Ok(revision) => {
                held.revision = revision;
                held.valid_until = self.valid_until(sent);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                held.valid_until = sent;
                Ok(false)
            }
            Err(e) => Err(shared("renew a lease")(format!("{}: {e}", held.partition))),
        }
    }

    /// Give a held lease up at once (a node that stops), so another takes over without waiting
    /// for the TTL. A lease already lost is left alone.
    pub fn release(&self, held: Held) -> Result<(), LogError> {
        let deleted = self.nats.rt.block_on(async {
            tokio::time::timeout(
                LEASE_REQUEST_TIMEOUT,
                self.kv
                    .delete_expect_revision(&held.partition, Some(held.revision)),
            )
            .await
        });
        match deleted {
            Ok(r) => r.map_err(|e| shared("release a lease")(format!("{}: {e}", held.partition))),
            Err(_) => Err(shared("release a lease")(format!(
                "{}: no answer within {LEASE_REQUEST_TIMEOUT:?} (it ages out)",
                held.partition
            ))),
        }
    }

    /// The partition's holder and its revision, if anybody holds it.
    pub fn holder(&self, partition: &str) -> Result<Option<(String, u64)>, LogError> {
        let entry = self.nats.retrying("read a lease", || async {
            self.kv.entry(partition).await.map_err(|e| e.to_string())
        })?;
        Ok(entry.and_then(|e| {
            (e.operation == kv::Operation::Put)
                .then(|| (String::from_utf8_lossy(&e.value).into_owned(), e.revision))
        }))
    }

    /// [`holder`](Leases::holder), asked once and given at most 1 s (a node's coordinator asks
    /// while it decides whether to take a free lease; an error means: unknown).
    pub fn holder_now(&self, partition: &str) -> Result<Option<(String, u64)>, LogError> {
        let entry = self.nats.rt.block_on(async {
            tokio::time::timeout(LEASE_REQUEST_TIMEOUT, self.kv.entry(partition)).await
        });
        let entry = match entry {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return Err(shared("read a lease")(format!("{partition}: {e}"))),
            Err(_) => {
                return Err(shared("read a lease")(format!(
                    "{partition}: no answer within {LEASE_REQUEST_TIMEOUT:?}"
                )))
            }
        };
        Ok(entry.and_then(|e| {
            (e.operation == kv::Operation::Put)
                .then(|| (String::from_utf8_lossy(&e.value).into_owned(), e.revision))
        }))
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}
