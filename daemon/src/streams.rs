//! `tail` and `export` (SPEC §6, §9): the log's events as lines, read from the durable part of
//! a log, and in cluster mode (SPEC §13) from every partition's copy or one of them.
//!
//! Each log read is one *producer* task: it reads chunks of events on a blocking thread,
//! filters and renders them, and sends the lines down a bounded channel; the connection's
//! writer task writes them out in order. A follow (`tail -f`) over several partitions runs one
//! producer per partition, so an event of any partition shows as soon as its copy holds it; a
//! stream that does not follow reads the partitions one after the other.

use crate::server::{STREAM_CHUNK_EVENTS, TAIL_DEFAULT_EVENTS};
use crate::writer::{lock_store, read_ledger, Shared};
use bursar_schemas::event::{Envelope, EventBody};
use bursar_schemas::wire::{EventLine, ExportRequest, ExportedEvent, TailRequest, WireError};
use bursar_schemas::{Labels, TsMicros};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Lines buffered between the producers and the connection.
const LINES_IN_FLIGHT: usize = 256;

/// One log a stream reads: a partition's shared state and, in cluster mode, its number (put on
/// every line).
#[derive(Clone)]
pub(crate) struct Source {
    pub shared: Arc<Shared>,
    pub partition: Option<u32>,
}

/// What a stream asks for.
pub(crate) enum Kind {
    Tail(TailRequest),
    Export(ExportRequest),
}

impl Kind {
    fn partition(&self) -> Option<u32> {
        match self {
            Kind::Tail(t) => t.partition,
            Kind::Export(e) => e.partition,
        }
    }

    /// Whether the end line carries the count of events sent.
    pub fn counts(&self) -> bool {
        matches!(self, Kind::Export(_))
    }

    /// The request's fields checked before it is queued: `types`, `since`, `until`, and
    /// `partition` against the daemon's partitions (`None`: single-host).
    pub fn check(&self, partitions: Option<usize>) -> Result<(), WireError> {
        match self {
            Kind::Tail(t) => {
                if t.types.as_ref().is_some_and(Vec::is_empty) {
                    return Err(WireError::bad_field(
                        "types",
                        "types must name at least one event type (leave it out for all)",
                    ));
                }
                let unknown = t
                    .types
                    .iter()
                    .flatten()
                    .find(|k| !bursar_schemas::event::EVENT_KINDS.contains(&k.as_str()));
                if let Some(k) = unknown {
                    return Err(WireError::bad_field(
                        "types",
                        format!(
                            "{k:?} is not an event type; the types are {}",
                            bursar_schemas::event::EVENT_KINDS.join(", ")
                        ),
                    ));
                }
                if t.from_seq.is_some() && t.partition.is_none() && partitions.unwrap_or(1) > 1 {
                    return Err(WireError::bad_field(
                        "partition",
                        "from_seq counts one partition's events: name the partition (cluster \
                         mode keeps one log per partition)",
                    ));
                }
            }
            Kind::Export(e) => {
                for (field, v) in [("since", &e.since), ("until", &e.until)] {
                    if let Some(t) = v {
                        if bursar_core::time::parse_ts(t).is_none() {
                            return Err(WireError::bad_field(
                                field,
                                format!("{field} must be an RFC 3339 time"),
                            ));
                        }
                    }
                }
            }
        }
        match (self.partition(), partitions) {
            (Some(_), None) => Err(WireError::bad_field(
                "partition",
                "this bursard runs single-host: its log has no partitions (partition is for \
                 cluster mode, SPEC §13)",
            )),
            (Some(p), Some(n)) if p as usize >= n => Err(WireError::bad_field(
                "partition",
                format!(
                    "partition {p} does not exist: this cluster has {n} (0 to {})",
                    n - 1
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The sources the stream reads, of `all` (each partition's, or the one log).
    pub fn sources(&self, all: Vec<Source>) -> Vec<Source> {
        match self.partition() {
            Some(p) => all.into_iter().filter(|s| s.partition == Some(p)).collect(),
            None => all,
        }
    }
}

/// What `tail` and `export` keep and leave out (the CLI's offline export applies the same).
pub struct Filter {
    /// Events at or after this time.
    pub since: Option<TsMicros>,
    /// Events before this time.
    pub until: Option<TsMicros>,
    /// Events carrying all these labels (derived ones included).
    pub labels: Option<Labels>,
    /// Events of these types.
    pub types: Option<Vec<String>>,
}

impl Filter {
    fn of(kind: &Kind) -> Filter {
        match kind {
            Kind::Tail(t) => Filter {
                since: None,
                until: None,
                labels: None,
                types: t.types.clone(),
            },
            Kind::Export(e) => Filter {
                since: e.since.as_deref().and_then(bursar_core::time::parse_ts),
                until: e.until.as_deref().and_then(bursar_core::time::parse_ts),
                labels: e.labels.clone(),
                types: None,
            },
        }
    }

    /// Whether `env` passes.
    pub fn keeps(&self, env: &Envelope) -> bool {
        if self.since.is_some_and(|s| env.ts < s) || self.until.is_some_and(|u| env.ts >= u) {
            return false;
        }
        if self
            .types
            .as_ref()
            .is_some_and(|t| !t.iter().any(|k| k == env.body.kind()))
        {
            return false;
        }
        match &self.labels {
            Some(want) => env
                .body
                .labels()
                .is_some_and(|l| want.iter().all(|(k, v)| l.get(k) == Some(v))),
            None => true,
        }
    }
}

/// What a producer sends: a line, or why it stopped short.
pub(crate) enum Item {
    Line(String),
    Failed(String),
}

/// One log's read: from `from`, up to `head` (a stream that does not follow shows the log as
/// it was when its turn came) or on and on (`head` `None`: follow, until shutdown or the
/// connection is gone).
struct Read {
    source: Source,
    from: u64,
    head: Option<u64>,
}

/// An envelope as `tail` and `export` show it: with the cost and price version of a usage
/// event under the prices in force at its time, and (cluster mode) its partition.
pub fn exported(
    env: Envelope,
    pricer: &bursar_core::ledger::Pricer,
    partition: Option<u32>,
) -> ExportedEvent {
    let (cost, version) = match &env.body {
        EventBody::UsageRecorded(u) => {
            let (c, _, v) = pricer.event_cost(u, env.ts);
            (Some(c), Some(v))
        }
        _ => (None, None),
    };
    ExportedEvent {
        version: env.version,
        seq: env.seq,
        ts: env.ts,
        time: bursar_core::time::format_ts(env.ts),
        actor: env.actor,
        kind: env.body.kind().to_string(),
        cost_micros: cost,
        price_version: version,
        prev_hash: env.prev_hash,
        hash: env.hash,
        body: env.body,
        partition,
    }
}

/// Start the producers of a stream; the lines arrive on the returned channel, which closes
/// when every producer is done. The start and end of each read are fixed here, when the
/// stream's turn comes.
pub(crate) fn start(
    kind: &Kind,
    sources: Vec<Source>,
    shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(LINES_IN_FLIGHT);
    let follow = matches!(kind, Kind::Tail(t) if t.follow);
    let reads: Vec<Read> = sources
        .into_iter()
        .map(|source| {
            let head = *source.shared.durable.borrow();
            let from = match kind {
                Kind::Tail(t) => t.from_seq.unwrap_or(if t.follow {
                    head + 1
                } else {
                    head.saturating_sub(TAIL_DEFAULT_EVENTS - 1).max(1)
                }),
                Kind::Export(_) => 1,
            };
            Read {
                source,
                from: from.max(1),
                head: (!follow).then_some(head),
            }
        })
        .collect();
    let filter = Arc::new(Filter::of(kind));
    if follow {
        for read in reads {
            tokio::spawn(produce(read, filter.clone(), tx.clone(), shutdown.clone()));
        }
    } else {
        tokio::spawn(async move {
            for read in reads {
                if !produce(read, filter.clone(), tx.clone(), shutdown.clone()).await {
                    break;
                }
            }
        });
    }
    rx
}

/// A chunk of a log's lines from `from`, on a blocking thread: up to [`STREAM_CHUNK_EVENTS`]
/// events read, those up to `limit` (the durable ones) filtered and rendered (priced, JSON) —
/// off the connection's thread, which serves other connections meanwhile. Returns the lines
/// and the seq after the last event taken (`None` when none was).
async fn render_chunk(
    source: &Source,
    from: u64,
    limit: u64,
    filter: &Arc<Filter>,
    pricer: &Arc<bursar_core::ledger::Pricer>,
) -> Result<(Vec<String>, Option<u64>), String> {
    let (shared, partition) = (source.shared.clone(), source.partition);
    let (filter, pricer) = (filter.clone(), pricer.clone());
    tokio::task::spawn_blocking(move || {
        let chunk = {
            let store = lock_store(&shared);
            store
                .read_from(from)
                .take(STREAM_CHUNK_EVENTS)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?
        };
        let mut lines = Vec::new();
        let mut next = None;
        for env in chunk {
            // Only durable events are shown.
            if env.seq > limit {
                break;
            }
            next = Some(env.seq + 1);
            if !filter.keeps(&env) {
                continue;
            }
            let line = EventLine {
                event: exported(env, &pricer, partition),
            };
            lines.push(serde_json::to_string(&line).unwrap_or_default());
        }
        Ok((lines, next))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Send one log's lines; false when the stream must stop (the connection is gone, or the
/// log could not be read and the error was sent).
async fn produce(
    read: Read,
    filter: Arc<Filter>,
    tx: mpsc::Sender<Item>,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let Read {
        source,
        mut from,
        head,
    } = read;
    let pricer = Arc::new(read_ledger(&source.shared).pricer());
    let mut durable = source.shared.durable.subscribe();
    loop {
        if tx.is_closed() {
            return false; // nobody to render a chunk for
        }
        let limit = head.unwrap_or_else(|| *durable.borrow_and_update());
        let (lines, next) = match render_chunk(&source, from, limit, &filter, &pricer).await {
            Ok(c) => c,
            Err(e) => {
                let at = source
                    .partition
                    .map_or(String::new(), |p| format!(" of partition {p}"));
                let _ = tx
                    .send(Item::Failed(format!("reading the log{at}: {e}")))
                    .await;
                return false;
            }
        };
        for text in lines {
            if tx.send(Item::Line(text)).await.is_err() {
                return false;
            }
        }
        if let Some(n) = next {
            from = n;
            continue;
        }
        if head.is_some() {
            return true;
        }
        tokio::select! {
            changed = durable.changed() => if changed.is_err() { return true },
            _ = shutdown.changed() => return true,
            () = tx.closed() => return false,
        }
    }
}
