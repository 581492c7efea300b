//! CSV rendering of exported events, written by the `csv` crate (RFC 4180: `,` separated, `"`
//! quoted when needed, `\n` line ends). One header line, then one line per event: the daemon
//! refuses control characters in labels, ids and model names, so no cell holds a line break (one
//! that did would be quoted).
//!
//! **Formula injection** (SPEC §9; OWASP "CSV Injection"): a spreadsheet runs a cell that begins
//! with `=`, `+`, `-`, `@`, a tab or a carriage return as a formula, and agents choose event
//! ids, reservation ids, label values and model names. Every cell of a text column (everything
//! but [`NUMBER_COLUMNS`]) that begins with one of those characters is written with a single
//! quote `'` in front, which makes a spreadsheet show it as text; it is then quoted as CSV
//! requires, like any other cell. The cells of [`NUMBER_COLUMNS`] are numbers the daemon
//! computed (seqs, times, uids, token counts, costs), never text a client chose; they are
//! written as they are, so that a negative number stays a number.
//!
//! **Cluster mode** (SPEC §13): an export of a cluster's partitions has one more column at the
//! end, [`PARTITION_COLUMN`] (a number), since a `seq` counts one partition's events. The
//! header is written with the first line: with that column when the first event names its
//! partition. A single-host export (and an empty one) has the 25 columns of [`COLUMNS`].

use bursar_core::money::format_usd;
use bursar_schemas::event::EventBody;
use bursar_schemas::wire::ExportedEvent;
use std::borrow::Cow;
use std::io::{self, Write};

/// The header line's columns.
pub const COLUMNS: [&str; 25] = [
    "seq",
    "ts",
    "time",
    "type",
    "actor_uid",
    "actor_gid",
    "actor_pid",
    "event_id",
    "reservation_id",
    "model",
    "labels",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "requests",
    "cost_micros",
    "cost_usd",
    "price_version",
    "hold_micros",
    "budget",
    "scope",
    "detail",
    "prev_hash",
    "hash",
];

/// The columns whose cells are numbers the daemon computed: written as they are. Every other
/// column is text and neutralised (see the module docs).
pub const NUMBER_COLUMNS: [&str; 14] = [
    "seq",
    "ts",
    "actor_uid",
    "actor_gid",
    "actor_pid",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "requests",
    "cost_micros",
    "cost_usd",
    "price_version",
    "hold_micros",
];

/// Text that a spreadsheet would run as a formula, with a `'` in front so that it shows as
/// text; any other text as it is.
pub fn neutralise(text: &str) -> Cow<'_, str> {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        Cow::Owned(format!("'{text}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// The column a cluster's export adds after [`COLUMNS`]: the partition whose log holds the
/// event (a number the daemon computed: written as it is).
pub const PARTITION_COLUMN: &str = "partition";

/// Writes an export as CSV: [`Writer::event`] per event (the header comes with the first),
/// then [`Writer::flush`].
pub struct Writer<W: Write> {
    inner: ::csv::Writer<W>,
    /// `None` until the header is written; then whether it has [`PARTITION_COLUMN`].
    partitions: Option<bool>,
}

impl<W: Write> Writer<W> {
    /// A writer into `out` (buffered; [`Writer::flush`] at the end).
    pub fn new(out: W) -> Writer<W> {
        Writer {
            inner: ::csv::WriterBuilder::new()
                .terminator(::csv::Terminator::Any(b'\n'))
                .from_writer(out),
            partitions: None,
        }
    }

    /// The header line, once: with [`PARTITION_COLUMN`] when `partitions`.
    fn header(&mut self, partitions: bool) -> io::Result<bool> {
        if let Some(written) = self.partitions {
            return Ok(written);
        }
        let mut names: Vec<&str> = COLUMNS.to_vec();
        if partitions {
            names.push(PARTITION_COLUMN);
        }
        self.inner.write_record(names).map_err(io_error)?;
        self.partitions = Some(partitions);
        Ok(partitions)
    }

    /// One event's line (after the header, when it is the first). An event that names a
    /// partition in an export whose first did not (or the other way round) is an error: its
    /// line would not fit the header.
    pub fn event(&mut self, e: &ExportedEvent) -> io::Result<()> {
        let mut line = cells(e);
        if self.header(e.partition.is_some())? != e.partition.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                match e.partition {
                    Some(p) => format!(
                        "event {} names partition {p}, but the export's first event named none",
                        e.seq
                    ),
                    None => format!(
                        "event {} names no partition, but the export's first event named one",
                        e.seq
                    ),
                },
            ));
        }
        if let Some(p) = e.partition {
            line.push(p.to_string());
        }
        self.inner.write_record(line).map_err(io_error)
    }

    /// Write out what is buffered (the header alone when no event came).
    pub fn flush(&mut self) -> io::Result<()> {
        self.header(false)?;
        self.inner.flush()
    }
}

/// The I/O error inside a `csv` error (a closed pipe stays a closed pipe).
fn io_error(e: ::csv::Error) -> io::Error {
    match e.into_kind() {
        ::csv::ErrorKind::Io(io) => io,
        other => io::Error::other(format!("{other:?}")),
    }
}

/// The cells of one event's line, text neutralised. `labels` is `k=v,k=v` (client labels plus
/// the derived ones, all of them, sorted by key).
fn cells(e: &ExportedEvent) -> Vec<String> {
    let mut c: Vec<String> = vec![String::new(); COLUMNS.len()];
    let mut set = |name: &str, v: String| {
        if let Some(i) = COLUMNS.iter().position(|n| *n == name) {
            c[i] = v;
        }
    };
    set("seq", e.seq.to_string());
    set("ts", e.ts.to_string());
    set("time", e.time.clone());
    set("type", e.kind.clone());
    set("actor_uid", e.actor.uid.to_string());
    set("actor_gid", e.actor.gid.to_string());
    set("actor_pid", e.actor.pid.to_string());
    if let Some(cost) = e.cost_micros {
        set("cost_micros", cost.to_string());
        set("cost_usd", format_usd(cost));
    }
    if let Some(v) = e.price_version {
        set("price_version", v.to_string());
    }
    set("prev_hash", e.prev_hash.to_hex());
    set("hash", e.hash.to_hex());
    let all_labels = |l: &bursar_schemas::Labels| {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match &e.body {
        EventBody::UsageRecorded(u) => {
            set("event_id", u.event_id.clone());
            set(
                "reservation_id",
                u.reservation_id.clone().unwrap_or_default(),
            );
            set("model", u.model.clone());
            set("labels", all_labels(&u.labels));
            set("input_tokens", u.usage.input_tokens.to_string());
            set("output_tokens", u.usage.output_tokens.to_string());
            set(
                "cached_input_tokens",
                u.usage.cached_input_tokens.to_string(),
            );
            set("cache_write_tokens", u.usage.cache_write_tokens.to_string());
            set("requests", u.usage.requests.to_string());
            let mut detail = Vec::new();
            match u.reservation {
                bursar_schemas::event::ReservationLink::Unknown => {
                    detail.push("reservation=unknown".to_string())
                }
                bursar_schemas::event::ReservationLink::Denied => {
                    detail.push("reservation=denied".to_string())
                }
                bursar_schemas::event::ReservationLink::Known if u.late => {
                    detail.push("late".to_string())
                }
                _ => {}
            }
            if let Some(r) = &u.reported_cost_usd {
                detail.push(format!("reported_cost_usd={r}"));
            }
            if let Some(o) = &u.occurred_at {
                detail.push(format!("occurred_at={o}"));
            }
            set("detail", detail.join(" "));
        }
        EventBody::ReservationCreated(r) => {
            set("reservation_id", r.reservation_id.clone());
            set("model", r.model.clone());
            set("labels", all_labels(&r.labels));
            set("input_tokens", r.input_tokens.to_string());
            set("output_tokens", r.max_output_tokens.to_string());
            set("hold_micros", r.hold_micros.to_string());
            set(
                "detail",
                format!("expires_at={}", bursar_core::time::format_ts(r.expires_at)),
            );
        }
        EventBody::ReservationDenied(r) => {
            set("reservation_id", r.reservation_id.clone());
            set("model", r.model.clone());
            set("labels", all_labels(&r.labels));
            set("hold_micros", r.hold_micros.to_string());
            set("budget", r.budget.clone().unwrap_or_default());
            set("scope", r.key.clone().unwrap_or_default());
            set("detail", format!("reason={}", r.reason));
        }
        EventBody::ReservationReleased(r) => {
            set("reservation_id", r.reservation_id.clone());
            set("detail", format!("reason={}", r.reason));
        }
        EventBody::ReservationExtended(r) => {
            set("reservation_id", r.reservation_id.clone());
            set(
                "detail",
                format!("expires_at={}", bursar_core::time::format_ts(r.expires_at)),
            );
        }
        EventBody::ReservationExpired(r) => {
            set("reservation_id", r.reservation_id.clone());
        }
        EventBody::BudgetWarned(b) | EventBody::BudgetExhausted(b) => {
            set("budget", b.budget.clone());
            set("scope", b.key.clone());
            set(
                "detail",
                format!(
                    "spent_micros={} held_micros={} utilization_ppm={}",
                    b.spent_micros, b.held_micros, b.utilization_ppm
                ),
            );
        }
        EventBody::PolicyApplied(p) => {
            set(
                "detail",
                format!(
                    "policy_version={} source={} source_hash={}",
                    p.policy_version, p.source, p.source_hash
                ),
            );
        }
        EventBody::PricingChanged(p) => {
            set(
                "detail",
                format!(
                    "effective_from={} models={}",
                    bursar_core::time::format_ts(p.effective_from),
                    p.pricing.models.len()
                ),
            );
        }
        EventBody::QuotaObserved(q) => {
            set("budget", format!("quota:{}", q.quota));
            set("labels", all_labels(&q.labels));
            set("event_id", q.event_id.clone().unwrap_or_default());
            set(
                "detail",
                format!(
                    "provider={} {}",
                    q.provider,
                    crate::render::observed_limits(q)
                ),
            );
        }
        EventBody::QuotaExhausted(q) => {
            set("budget", format!("quota:{}", q.quota));
            set(
                "detail",
                format!(
                    "limit={} reset_at={} observed_seq={}",
                    q.limit,
                    bursar_core::time::format_ts(q.reset_at),
                    q.observed_seq
                ),
            );
        }
    }
    for (name, text) in COLUMNS.iter().zip(c.iter_mut()) {
        if !NUMBER_COLUMNS.contains(name) {
            if let Cow::Owned(safe) = neutralise(text) {
                *text = safe;
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(partition: Option<u32>, seq: u64) -> ExportedEvent {
        use bursar_schemas::event::{Actor, Hash32, ReservationExpired};
        ExportedEvent {
            version: 2,
            seq,
            ts: 1,
            time: "1970-01-01T00:00:00.000001Z".into(),
            actor: Actor {
                uid: 0,
                gid: 0,
                pid: 0,
            },
            kind: "reservation_expired".into(),
            body: EventBody::ReservationExpired(ReservationExpired {
                reservation_id: "=r-1".into(),
            }),
            cost_micros: None,
            price_version: None,
            prev_hash: Hash32([0; 32]),
            hash: Hash32([0; 32]),
            partition,
        }
    }

    fn written(events: &[ExportedEvent]) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        for e in events {
            w.event(e).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        let mut r = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(out.as_slice());
        r.records()
            .map(|l| l.unwrap().iter().map(str::to_string).collect())
            .collect()
    }

    #[test]
    fn a_cluster_export_says_which_partition_each_event_is_from() {
        let lines = written(&[event(Some(2), 7), event(Some(0), 7)]);
        assert_eq!(lines[0].len(), COLUMNS.len() + 1);
        assert_eq!(lines[0].last().map(String::as_str), Some(PARTITION_COLUMN));
        // The same seq in two partitions: told apart by the last column.
        assert_eq!(lines[1][0], "7");
        assert_eq!(lines[1].last().map(String::as_str), Some("2"));
        assert_eq!(lines[2].last().map(String::as_str), Some("0"));
        assert_eq!(lines[1][8], "'=r-1", "text cells are still neutralised");
        // A single host's export and an empty one keep the 25 columns.
        let single = written(&[event(None, 1)]);
        assert_eq!(single[0], COLUMNS);
        assert_eq!(single[1].len(), COLUMNS.len());
        assert_eq!(written(&[]), [COLUMNS]);
        // Lines that would not fit the header are refused, not written short.
        for events in [
            [event(None, 1), event(Some(0), 2)],
            [event(Some(0), 1), event(None, 2)],
        ] {
            let mut out = Vec::new();
            let mut w = Writer::new(&mut out);
            w.event(&events[0]).unwrap();
            let e = w.event(&events[1]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
    }

    #[test]
    fn text_that_a_spreadsheet_would_run_gets_a_quote_in_front() {
        for formula in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(neutralise(formula), format!("'{formula}"));
        }
        for text in ["e-1", "a=b", "1-2", "", "'=1", " =1"] {
            assert_eq!(neutralise(text), text);
        }
    }
}
