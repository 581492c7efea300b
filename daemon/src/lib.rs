//! `bursard` as a library: the log, the writer and the server, so tests can drive them in-process.

pub mod log;
