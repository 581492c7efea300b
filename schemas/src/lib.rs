//! `bursar-schemas`: every type that crosses a boundary of bursar.
//!
//! - [`wire`]: JSON Lines requests and answers of the socket protocol (SPEC §6).
//! - [`event`]: the log envelope and every event body (SPEC §7), encoded with bincode 2.
//! - [`policy`]: the raw `bursar.toml` structs (SPEC §4) and the resolved policy that is logged.
//! - [`pricing`]: price tables in integer micro-USD per million tokens (SPEC §2).
//!
//! Architecture invariant: this crate holds data and (de)serialisation only. Every decision
//! lives in `bursar-core`.

pub mod answer;
mod decode;
pub mod event;
pub mod jsonschema;
pub mod policy;
pub mod pricing;
pub mod wire;

/// An amount of money in micro-USD (1 USD = 1 000 000). Never a float.
pub type Micros = i64;
/// A point in time: Unix microseconds, UTC.
pub type TsMicros = i64;
/// Labels of an event: key to value, ordered so that encodings are canonical.
pub type Labels = std::collections::BTreeMap<String, String>;

/// File name of the daemon's default socket.
pub const SOCKET_NAME: &str = "bursar.sock";

/// The daemon's default socket (SPEC §4), where `bursard` listens and clients look without
/// `--socket`: `$XDG_RUNTIME_DIR/bursar.sock`, else `./bursar.sock`.
pub fn default_socket_path() -> std::path::PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir).join(SOCKET_NAME),
        _ => std::path::PathBuf::from(SOCKET_NAME),
    }
}

/// Protocol version spoken on the socket.
pub const PROTOCOL_VERSION: u32 = 1;
