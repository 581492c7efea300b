//! `bursar-client`: a small blocking Rust client for `bursard`. It depends on `bursar-schemas`
//! alone (SPEC §1): an agent that links it gets neither sled nor tokio.
//!
//! The client speaks the JSON Lines protocol of SPEC §6 over a Unix stream socket: one request
//! per line, one answer per line, answers in request order. Requests are the typed
//! [`Request`]s of `bursar-schemas`; answers come back typed.
//!
//! ```no_run
//! use bursar_client::{resolve_socket, Client};
//! use bursar_schemas::wire::{RecordRequest, Usage};
//!
//! # fn main() -> Result<(), bursar_client::ClientError> {
//! let mut client = Client::connect(&resolve_socket(None))?;
//! let answer = client.record(RecordRequest {
//!     event_id: bursar_client::new_id("e"),
//!     labels: [("team".to_string(), "search".to_string())].into(),
//!     model: "gpt-4o".into(),
//!     usage: Usage { input_tokens: 1200, output_tokens: 300, ..Usage::default() },
//!     occurred_at: None,
//!     reported_cost_usd: None,
//!     headers: None,
//! })?;
//! println!("cost {} micro-USD, state {:?}", answer.cost_micros, answer.state);
//! # Ok(())
//! # }
//! ```
//!
//! - A denied reservation is an answer ([`DecisionAnswer`] with `decision: deny`), not an error;
//!   an error answer (`{"ok":false,...}`) becomes [`ClientError::Server`].
//! - Pipelining: [`Client::send`] several requests, then [`Client::recv`] their answers in the
//!   same order; [`Client::pipeline`] does it in bounded windows.
//! - Streams (`tail`, `export`): [`Client::stream`] returns an [`EventStream`], an iterator of
//!   events that ends at the daemon's end line.
//! - Offline access to a stopped daemon's data dir is in the `bursar` CLI (`bursar-cli`).

use bursar_schemas::wire::{
    CheckRequest, CommitRequest, DecisionAnswer, ExportedEvent, ExtendAnswer, ExtendRequest,
    HelloAnswer, HelloRequest, RecordRequest, ReleaseAnswer, ReleaseRequest, ReloadAnswer,
    ReplayAnswer, ReplayRequest, Request, ReserveRequest, StatusAnswer, StatusRequest, StreamEnd,
    TailRequest, UsageAnswer, VerifyAnswer, WireError,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Environment variable naming the socket (used when `--socket` is not given).
pub const SOCKET_ENV: &str = "BURSAR_SOCKET";

/// How many requests [`Client::pipeline`] keeps in flight before reading answers. The daemon
/// stops reading a connection with more than 1024 unanswered requests; staying well below keeps
/// both sides from blocking on full socket buffers.
pub const PIPELINE_WINDOW: usize = 256;

/// Longest answer line the client accepts (a `status` of 1000 buckets is far below this).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// The socket to use: `explicit` (`--socket`), else `$BURSAR_SOCKET`, else the daemon's default
/// (`$XDG_RUNTIME_DIR/bursar.sock`, else `./bursar.sock`).
pub fn resolve_socket(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(SOCKET_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => default_socket_path(),
    }
}

pub use bursar_schemas::default_socket_path;

/// A fresh id for `event_id` / `reservation_id`: `PREFIX-<unix µs hex>-<pid hex>-<counter>`,
/// unique per process and, in practice, across processes on one host.
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{micros:x}-{:x}-{n}", std::process::id())
}

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to.
    #[error("cannot connect to bursard at {}: {} ({})", path.display(), os_message(source), connect_hint(source))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("connection to bursard failed: {}", os_message(.0))]
    Io(#[from] std::io::Error),
    /// The daemon closed the connection before answering.
    #[error("bursard closed the connection before answering (did it stop?)")]
    Closed,
    /// An answer line could not be understood.
    #[error("unexpected answer from bursard: {0}")]
    Protocol(String),
    /// The daemon answered with an error.
    #[error("{}", describe_wire_error(.0))]
    Server(WireError),
}

impl ClientError {
    /// The daemon's error, when it answered with one.
    pub fn wire(&self) -> Option<&WireError> {
        match self {
            ClientError::Server(e) => Some(e),
            _ => None,
        }
    }
}

/// `code: message` on one line, naming the field when the message does not already.
pub fn describe_wire_error(e: &WireError) -> String {
    // Lines joined with "; ", or a space after a line that ends in ':' (a heading).
    let mut message = String::new();
    for line in e.message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !message.is_empty() {
            message.push_str(if message.ends_with(':') { " " } else { "; " });
        }
        message.push_str(line);
    }
    match &e.field {
        Some(f) if !message.contains(f.as_str()) => {
            format!("{}: {message} (field {f})", e.code.as_str())
        }
        _ => format!("{}: {message}", e.code.as_str()),
    }
}

/// An OS error's text without the trailing ` (os error N)`.
pub fn os_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

fn connect_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "is the daemon running? start it with `bursard`",
        ErrorKind::ConnectionRefused => {
            "a socket file is there but nobody listens: the daemon stopped; start it with `bursard`"
        }
        ErrorKind::PermissionDenied => {
            "the socket is 0600 by default: run as the daemon's user, or give the daemon \
             socket_mode = \"0660\" and socket_group"
        }
        _ => "is the daemon running? start it with `bursard`; --socket or BURSAR_SOCKET pick the socket",
    }
}

/// A blocking connection to `bursard`.
pub struct Client {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).finish()
    }
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            // Absolute in the message: "./bursar.sock" says little about where it looked.
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            source,
        })?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client {
            path: path.to_path_buf(),
            writer: stream,
            reader,
            line: String::new(),
        })
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send one request without waiting for its answer.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.send_json(&request.to_json())
    }

    /// Send one raw JSON request without waiting for its answer.
    pub fn send_json(&mut self, request: &Value) -> Result<(), ClientError> {
        let mut bytes = serde_json::to_vec(request)
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        Ok(())
    }

    /// Read the next answer line as JSON, whatever it says (`ok` true or false).
    pub fn recv_raw(&mut self) -> Result<Value, ClientError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_ANSWER_BYTES as u64)
            .read_line(&mut self.line)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if !self.line.ends_with('\n') && n >= MAX_ANSWER_BYTES {
            return Err(ClientError::Protocol(format!(
                "answer longer than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        serde_json::from_str(&self.line).map_err(|e| {
            let shown: String = self.line.trim_end().chars().take(200).collect();
            ClientError::Protocol(format!("not JSON ({e}): {shown}"))
        })
    }

    /// Read the next answer: an error answer becomes [`ClientError::Server`], anything else is
    /// decoded into `T`.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        let v = self.recv_raw()?;
        decode_answer(v)
    }

    /// Send a request and read its answer as raw JSON; an error answer is [`ClientError::Server`].
    pub fn call_raw(&mut self, request: &Request) -> Result<Value, ClientError> {
        self.send(request)?;
        let v = self.recv_raw()?;
        check_ok(&v)?;
        Ok(v)
    }

    /// Send a request and read its typed answer.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        self.send(request)?;
        self.recv()
    }

    /// Send every request and collect every raw answer, in order, with at most
    /// [`PIPELINE_WINDOW`] requests in flight. Error answers are returned as they are (each
    /// answer's `ok` tells); only connection problems are `Err`.
    pub fn pipeline(&mut self, requests: &[Request]) -> Result<Vec<Value>, ClientError> {
        let mut answers = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(PIPELINE_WINDOW) {
            let mut batch = Vec::new();
            for r in chunk {
                batch.extend_from_slice(
                    &serde_json::to_vec(&r.to_json())
                        .map_err(|e| ClientError::Protocol(e.to_string()))?,
                );
                batch.push(b'\n');
            }
            self.writer.write_all(&batch)?;
            for _ in chunk {
                answers.push(self.recv_raw()?);
            }
        }
        Ok(answers)
    }

    /// `hello`.
    pub fn hello(&mut self, client: Option<&str>) -> Result<HelloAnswer, ClientError> {
        self.call(&Request::Hello(HelloRequest {
            client: client.map(str::to_string),
        }))
    }

    /// `record`.
    pub fn record(&mut self, r: RecordRequest) -> Result<UsageAnswer, ClientError> {
        self.call(&Request::Record(r))
    }

    /// `reserve` (a deny is an `Ok` answer with `decision: deny`).
    pub fn reserve(&mut self, r: ReserveRequest) -> Result<DecisionAnswer, ClientError> {
        self.call(&Request::Reserve(r))
    }

    /// `check`.
    pub fn check(&mut self, r: CheckRequest) -> Result<DecisionAnswer, ClientError> {
        self.call(&Request::Check(r))
    }

    /// `commit`.
    pub fn commit(&mut self, r: CommitRequest) -> Result<UsageAnswer, ClientError> {
        self.call(&Request::Commit(r))
    }

    /// `release`.
    pub fn release(&mut self, r: ReleaseRequest) -> Result<ReleaseAnswer, ClientError> {
        self.call(&Request::Release(r))
    }

    /// `extend`.
    pub fn extend(&mut self, r: ExtendRequest) -> Result<ExtendAnswer, ClientError> {
        self.call(&Request::Extend(r))
    }

    /// `status`.
    pub fn status(&mut self, r: StatusRequest) -> Result<StatusAnswer, ClientError> {
        self.call(&Request::Status(r))
    }

    /// `verify`.
    pub fn verify(&mut self) -> Result<VerifyAnswer, ClientError> {
        self.call(&Request::Verify)
    }

    /// `reload` (admin only).
    pub fn reload(&mut self) -> Result<ReloadAnswer, ClientError> {
        self.call(&Request::Reload)
    }

    /// `replay` (with `apply`: admin only).
    pub fn replay(&mut self, r: ReplayRequest) -> Result<ReplayAnswer, ClientError> {
        self.call(&Request::Replay(r))
    }

    /// Start a `tail` or `export` stream. Other requests are refused with a protocol error.
    pub fn stream(&mut self, request: &Request) -> Result<EventStream<'_>, ClientError> {
        match request {
            Request::Tail(_) | Request::Export(_) => {}
            other => {
                return Err(ClientError::Protocol(format!(
                    "`{}` is not a streaming op",
                    other.op()
                )))
            }
        }
        self.send(request)?;
        Ok(EventStream {
            client: self,
            end: None,
            done: false,
        })
    }

    /// The last `policy_applied` event of the log, found by reading backwards from the head in
    /// growing steps (one connection per step), so a short search costs a short read.
    pub fn last_policy_event(path: &Path) -> Result<Option<ExportedEvent>, ClientError> {
        let mut client = Client::connect(path)?;
        let mut last = None;
        let mut first_seen = None;
        {
            let mut s = client.stream(&Request::Tail(TailRequest::default()))?;
            for ev in s.by_ref() {
                let ev = ev?;
                // A cluster node sends each partition's last events; every partition's log
                // holds the policies, so the first one's is searched.
                let (_, partition) = *first_seen.get_or_insert((ev.seq, ev.partition));
                if ev.partition != partition {
                    continue;
                }
                if ev.kind == "policy_applied" {
                    last = Some(ev);
                }
            }
        }
        if last.is_some() {
            return Ok(last);
        }
        let Some((mut upper, partition)) = first_seen else {
            return Ok(None);
        };
        let mut span: u64 = 64;
        while upper > 1 {
            let from = upper.saturating_sub(span).max(1);
            let mut c = Client::connect(path)?;
            let mut s = c.stream(&Request::Tail(TailRequest {
                from_seq: Some(from),
                follow: false,
                types: None,
                partition,
            }))?;
            for ev in s.by_ref() {
                let ev = ev?;
                if ev.seq >= upper {
                    // Dropping the connection ends the stream on the daemon's side.
                    break;
                }
                if ev.kind == "policy_applied" {
                    last = Some(ev);
                }
            }
            if last.is_some() {
                return Ok(last);
            }
            upper = from;
            span = span.saturating_mul(4);
        }
        Ok(None)
    }
}

/// Decode an answer: `{"ok":false,...}` becomes [`ClientError::Server`].
pub fn decode_answer<T: DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    check_ok(&v)?;
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
}

fn check_ok(v: &Value) -> Result<(), ClientError> {
    if v.get("ok") == Some(&Value::Bool(false)) {
        let err = v
            .get("error")
            .cloned()
            .and_then(|e| serde_json::from_value::<WireError>(e).ok())
            .ok_or_else(|| ClientError::Protocol(format!("malformed error answer: {v}")))?;
        return Err(ClientError::Server(err));
    }
    Ok(())
}

/// The events of a `tail` or `export` stream, in log order. Ends (`None`) after the daemon's
/// end line, which [`EventStream::end`] then returns.
pub struct EventStream<'a> {
    client: &'a mut Client,
    end: Option<StreamEnd>,
    done: bool,
}

impl EventStream<'_> {
    /// The end line (`count` is set for exports), once the stream is finished.
    pub fn end(&self) -> Option<&StreamEnd> {
        self.end.as_ref()
    }

    fn next_event(&mut self) -> Result<Option<ExportedEvent>, ClientError> {
        let mut v = self.client.recv_raw()?;
        if let Some(ev) = v.get_mut("event") {
            let ev = ev.take();
            return serde_json::from_value(ev)
                .map(Some)
                .map_err(|e| ClientError::Protocol(format!("bad event line: {e}")));
        }
        let end: StreamEnd = decode_answer(v)?;
        self.end = Some(end);
        Ok(None)
    }
}

impl Iterator for EventStream<'_> {
    type Item = Result<ExportedEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_event() {
            Ok(Some(ev)) => Some(Ok(ev)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique() {
        let a = new_id("e");
        let b = new_id("e");
        assert_ne!(a, b);
        assert!(a.starts_with("e-"));
    }

    #[test]
    fn missing_socket_error_says_what_to_do() {
        let err = Client::connect(Path::new("/nonexistent/bursar.sock")).unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "cannot connect to bursard at /nonexistent/bursar.sock: No such file or directory \
             (is the daemon running? start it with `bursard`)"
        );
    }

    #[test]
    fn a_relative_socket_path_is_shown_absolute_when_the_connection_fails() {
        let err = Client::connect(Path::new("no-such-dir/bursar.sock")).unwrap_err();
        let cwd = std::env::current_dir().unwrap();
        let want = format!("at {}: ", cwd.join("no-such-dir/bursar.sock").display());
        assert!(err.to_string().contains(&want), "{err}");
    }

    #[test]
    fn explicit_socket_wins() {
        assert_eq!(
            resolve_socket(Some(Path::new("/x/y.sock"))),
            PathBuf::from("/x/y.sock")
        );
    }
}
