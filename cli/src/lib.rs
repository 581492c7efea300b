//! `bursar-cli`: the pieces of the `bursar` CLI (rendering, CSV, policy TOML, offline mode).
//! The Rust client it talks to the daemon with is `bursar-client`, re-exported here.

pub mod chart;
pub mod csv;
pub mod offline;
pub mod policy_toml;
pub mod render;
pub mod report;

pub use bursar_client::*;
