//! A partition's log as a NATS JetStream stream: the shared log of cluster mode (SPEC §13,
//! issue 15), behind the same [`LogStore`] seam as [`SledLog`](super::SledLog).
//!
//! Each record is one message on the partition's subject: the very bytes [`SledLog`](crate::log::SledLog) stores (a
//! format-2 record of consecutive sealed events, LZ4-compressed behind its tag), with the
//! header [`SEQ_HEADER`] naming the seq of its first event, and a message id
//! (`<stream>:<first seq>`) so that JetStream drops a resend of a record it already stored.
//!
//! - **Fence.** [`append`](LogStore::append) checks the batch against this store's head, as
//!   every store does, and then publishes each record *conditionally on the stream's last
//!   sequence* (`Nats-Expected-Last-Sequence`): the server refuses a record from a writer whose
//!   view of the stream is stale, e.g. a lease holder that was paused past its lease while
//!   another node took over and appended. A refused record fails [`sync`](LogStore::sync) with
//!   [`LogError::Refused`]; the writer then poisons itself (fails closed) and must reopen the
//!   store, i.e. follow the stream again, before it may write.
//! - **Durability.** [`sync`](LogStore::sync) waits for the stream's acknowledgement of every
//!   record published since the last sync. JetStream acknowledges a message once a quorum of
//!   the stream's replicas stored it; each replica syncs it to disk before that only when the
//!   servers run with `jetstream { sync_interval: always }` (NATS ≥ 2.10; the default syncs
//!   every two minutes): cluster mode requires it (docs/cluster.md).
//! - **Reads** ([`read_from`](LogStore::read_from)) find the record holding a seq by binary
//!   search over the stream's sequences (records are in seq order) and then read the stream's
//!   messages in order from its leader, up to its end at the time of the call, checking the
//!   hash chain as [`SledLog`](super::SledLog) does. (One request per record: a first cut; a
//!   follower that folds the stream as it grows will read it through a consumer.)
//! - **Snapshots** are local files in `snapshot_dir` (each node folds the shared log into its
//!   own state and snapshots it itself).
//!
//! The store runs on a [`Nats`] connection (its own small tokio runtime), which a node's
//! [leases](super::lease) share.

use super::{
    check_sealed, check_tail, head_of_sealed, pack_sealed, records_of, write_snapshot_file, Head,
    LogError, LogStore,
};
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};
use bursar_schemas::event::Sealed;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::time::Duration;

/// Header of a record's message: the seq of the record's first event (decimal).
pub const SEQ_HEADER: &str = "Bursar-Seq";

/// The first event's seq a record's message names in its [`SEQ_HEADER`]: corrupt when missing
/// (`sequence`: the message's stream sequence, for the message).
pub(crate) fn seq_header(
    headers: Option<&async_nats::HeaderMap>,
    sequence: u64,
) -> Result<u64, LogError> {
    headers
        .and_then(|h| h.get(SEQ_HEADER))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or_else(|| LogError::Corrupt {
            seq: 0,
            reason: format!("stream sequence {sequence} has no {SEQ_HEADER} header"),
        })
}

/// Where a partition's shared log lives.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// NATS servers to connect to (`nats://127.0.0.1:4222`, ...): any node of the cluster.
    pub servers: Vec<String>,
    /// The stream's name (`BURSAR_P0`); created when missing.
    pub stream: String,
    /// The stream's one subject (`bursar.p0.log`).
    pub subject: String,
    /// Replicas of the stream when this store creates it (3 in a 3-node cluster).
    pub replicas: usize,
    /// The local directory snapshots are kept in.
    pub snapshot_dir: PathBuf,
    /// How long a request to the cluster (connect, publish acknowledgement, read) may take
    /// before it fails.
    pub timeout: Duration,
}

/// A connection to the NATS cluster, with the small tokio runtime (one worker) that drives
/// it: the writer thread that uses the stores is not a runtime thread and blocks on each
/// call. Shared by a node's partition logs and its leases.
pub struct Nats {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) js: jetstream::Context,
    /// How long a request to the cluster may take before it fails.
    pub(crate) timeout: Duration,
}

impl Nats {
    /// Connect to any of `servers` (`nats://127.0.0.1:4222`, ...).
    pub fn connect(
        servers: &[String],
        timeout: Duration,
    ) -> Result<std::sync::Arc<Nats>, LogError> {
        Self::connect_with(servers, timeout, false)
    }

    /// A client that keeps trying `servers` in the background: for a cluster node that starts
    /// while NATS cannot be reached and serves reads from its copies meanwhile. Requests made
    /// before it connects wait or time out.
    pub fn connect_in_background(
        servers: &[String],
        timeout: Duration,
    ) -> Result<std::sync::Arc<Nats>, LogError> {
        Self::connect_with(servers, timeout, true)
    }

    /// Whether the client is connected to a server now.
    pub fn is_connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }

    fn connect_with(
        servers: &[String],
        timeout: Duration,
        background: bool,
    ) -> Result<std::sync::Arc<Nats>, LogError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bursard-nats")
            .enable_all()
            .build()
            .map_err(|e| shared("start the NATS runtime")(e.to_string()))?;
        let js = rt.block_on(async {
            let mut options = async_nats::ConnectOptions::new()
                .connection_timeout(timeout)
                .request_timeout(Some(timeout));
            if background {
                options = options.retry_on_initial_connect();
            }
            let client = tokio::time::timeout(timeout, options.connect(servers))
                .await
                .map_err(|_| shared("connect")(format!("no answer within {timeout:?}")))?
                .map_err(|e| shared("connect")(e.to_string()))?;
            let mut js = jetstream::new(client);
            js.set_timeout(timeout);
            Ok::<_, LogError>(js)
        })?;
        Ok(std::sync::Arc::new(Nats { rt, js, timeout }))
    }

    /// Run `op` until it succeeds or the timeout has passed: a cluster that is electing a
    /// leader answers "no responders" or times out for a few seconds.
    pub(crate) fn retrying<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, LogError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = std::time::Instant::now() + self.timeout;
        // Each attempt gets a part of the time: a request whose answer was lost (a new
        // connection's first request can race the routes learning of its inbox) is asked
        // again rather than waited for until the end.
        let attempt = (self.timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(5));
        loop {
            let answered = self
                .rt
                .block_on(async { tokio::time::timeout(attempt, op()).await })
                .unwrap_or_else(|_| Err(format!("no answer within {attempt:?}")));
            match answered {
                Ok(v) => return Ok(v),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(shared(what)(e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// One partition's log in a JetStream stream (see the module docs).
pub struct JetStreamLog {
    nats: std::sync::Arc<Nats>,
    stream: jetstream::stream::Stream,
    opts: JetStreamOptions,
    /// The last event appended (staged included).
    head: Option<Head>,
    /// The stream's last sequence as this store knows it: the condition of the next publish.
    last_sequence: u64,
    /// Records published since the last sync: (first event seq, the stream sequence it must
    /// get, its acknowledgement).
    pending: Vec<(u64, u64, PublishAckFuture)>,
}

fn shared(op: &'static str) -> impl Fn(String) -> LogError {
    move |reason| LogError::Shared { op, reason }
}

impl JetStreamLog {
    /// Connect, create the stream when it does not exist (file storage, `replicas`, nothing
    /// ever discarded), and read its head (the last record, checked
    /// against the one before it).
    pub fn open(opts: JetStreamOptions) -> Result<JetStreamLog, LogError> {
        let nats = Nats::connect(&opts.servers, opts.timeout)?;
        JetStreamLog::open_on(nats, opts)
    }

    /// [`open`](JetStreamLog::open) on an existing connection (`opts.servers` unused).
    pub fn open_on(
        nats: std::sync::Arc<Nats>,
        opts: JetStreamOptions,
    ) -> Result<JetStreamLog, LogError> {
        std::fs::create_dir_all(&opts.snapshot_dir).map_err(|source| LogError::Io {
            op: "create snapshot dir",
            path: opts.snapshot_dir.clone(),
            source,
        })?;
        let config = jetstream::stream::Config {
            name: opts.stream.clone(),
            subjects: vec![opts.subject.clone()],
            num_replicas: opts.replicas,
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let stream = nats.retrying("open the stream", || async {
            nats.js
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| e.to_string())
        })?;
        // A stream just created answers publishes only once its replicas elected a leader (a
        // publish before that is refused: "no stream found for given subject").
        nats.retrying("wait for the stream's leader", || async {
            match stream.get_info().await {
                Ok(info) if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) => Ok(()),
                Ok(_) => Err("the stream has no leader yet".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })?;
        // ... and once every server knows where the stream's subject goes. A publish that no
        // stream may take (the last sequence can never be u64::MAX) is answered "wrong last
        // sequence" by the stream once it is reachable through this connection's server.
        nats.retrying("wait until the stream takes appends", || async {
            let probe = jetstream::message::PublishMessage::build()
                .payload(Vec::<u8>::new().into())
                .expected_last_sequence(u64::MAX);
            let ack = nats
                .js
                .send_publish(opts.subject.clone(), probe)
                .await
                .map_err(|e| e.to_string())?;
            match ack.await {
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
                Err(e) => Err(e.to_string()),
                Ok(a) => Err(format!(
                    "the stream stored a probe at sequence {} (it must refuse it)",
                    a.sequence
                )),
            }
        })?;
        let mut log = JetStreamLog {
            nats,
            stream,
            opts,
            head: None,
            last_sequence: 0,
            pending: Vec::new(),
        };
        log.reload_head()?;
        Ok(log)
    }

    /// Read the stream's last sequence and the head it holds (after a refused append, the
    /// writer that reopens sees what the other writer appended).
    fn reload_head(&mut self) -> Result<(), LogError> {
        let last = self.stream_end()?;
        self.last_sequence = last;
        self.head = if last == 0 {
            None
        } else {
            let (key, bytes) = self.record_at(last)?;
            let prev = if last > 1 {
                Some(self.record_at(last - 1)?)
            } else {
                None
            };
            Some(check_tail(
                key,
                &bytes,
                prev.as_ref().map(|(k, b)| (*k, b.as_slice())),
            )?)
        };
        Ok(())
    }

    /// The stream's last sequence now (another node's writer may have appended since this
    /// store read it).
    fn stream_end(&self) -> Result<u64, LogError> {
        self.nats.retrying("read the stream's state", || async {
            self.stream
                .get_info()
                .await
                .map(|info| info.state.last_sequence)
                .map_err(|e| e.to_string())
        })
    }

    /// The record stored at stream sequence `sequence`: its first event's seq and its bytes.
    fn record_at(&self, sequence: u64) -> Result<(u64, Vec<u8>), LogError> {
        // From the stream's leader (a direct get may be served by a replica that lags).
        let msg = self.nats.retrying("read a record", || async {
            self.stream
                .get_raw_message(sequence)
                .await
                .map_err(|e| format!("stream sequence {sequence}: {e}"))
        })?;
        let key = seq_header(Some(&msg.headers), sequence)?;
        Ok((key, msg.payload.to_vec()))
    }

    /// The stream sequence of the record holding event `seq`: the last record whose first
    /// event is at or before it (1 when `seq` is before every record).
    fn locate(&self, seq: u64, end: u64) -> Result<u64, LogError> {
        let (mut lo, mut hi) = (1u64, end);
        // Invariant: the answer is in lo..=hi (the record at lo starts at or before `seq`, or
        // lo is 1).
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            let (key, _) = self.record_at(mid)?;
            if key <= seq {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo)
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.opts.stream
    }
}

impl LogStore for JetStreamLog {
    fn append(&mut self, sealed: &[Sealed]) -> Result<(), LogError> {
        if sealed.is_empty() {
            return Ok(());
        }
        check_sealed(self.head, sealed)?;
        let mut published = Vec::new();
        let mut last = self.last_sequence;
        for record in records_of(sealed) {
            let Some(first) = record.first() else {
                continue;
            };
            let payload = pack_sealed(record);
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .header(SEQ_HEADER, first.seq.to_string().as_str())
                .message_id(format!("{}:{}", self.opts.stream, first.seq))
                .expected_last_sequence(last);
            let ack = self
                .nats
                .rt
                .block_on(
                    self.nats
                        .js
                        .send_publish(self.opts.subject.clone(), publish),
                )
                .map_err(|e| shared("publish a record")(e.to_string()))?;
            last += 1;
            published.push((first.seq, last, ack));
        }
        self.pending.extend(published);
        self.last_sequence = last;
        self.head = head_of_sealed(sealed);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let pending = std::mem::take(&mut self.pending);
        let mut first_error = None;
        for (seq, expected, ack) in pending {
            // Every acknowledgement is awaited, also after a failure, so that none is left
            // behind to be taken for a later record's.
            let result = self.nats.rt.block_on(ack.into_future());
            if first_error.is_some() {
                continue;
            }
            first_error = match result {
                Ok(ack) if ack.sequence == expected && !ack.duplicate => None,
                Ok(ack) => Some(LogError::Refused {
                    seq,
                    reason: format!(
                        "the stream stored the record at sequence {} (duplicate: {}), expected \
                         {expected}: another writer appended",
                        ack.sequence, ack.duplicate
                    ),
                }),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    Some(LogError::Refused {
                        seq,
                        reason: format!(
                            "the stream moved on past sequence {}: another writer appended \
                             (this one is no longer the partition's writer)",
                            expected - 1
                        ),
                    })
                }
                Err(e) => Some(shared("store a record on a quorum")(format!(
                    "seq {seq}: {e}"
                ))),
            };
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn head(&self) -> Option<Head> {
        self.head
    }

    fn get_id(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        Ok(None)
    }

    fn has_ids(&self) -> bool {
        false
    }

    fn read_records_from(&self, seq: u64) -> super::StoredRecords<'_> {
        // To the stream's end as it is now: a follower reads what other writers appended.
        let end = match self.stream_end() {
            Ok(0) => return Box::new(std::iter::empty()),
            Ok(end) => end,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let start = match self.locate(seq, end) {
            Ok(s) => s,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let mut next = start;
        let records = std::iter::from_fn(move || {
            if next > end {
                return None;
            }
            let r = self.record_at(next);
            next += 1;
            Some(r.map(|(key, bytes)| (key, sled::IVec::from(bytes))))
        });
        Box::new(records)
    }

    fn put_snapshot(&mut self, seq: u64, bytes: &[u8]) -> Result<(), LogError> {
        write_snapshot_file(&self.opts.snapshot_dir, seq, bytes)
    }

    fn snapshot_dir(&self) -> Option<PathBuf> {
        Some(self.opts.snapshot_dir.clone())
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        super::sled_store::latest_snapshot_file(&self.opts.snapshot_dir)
    }
}
