//! `bursar-core`: every decision bursar makes, as pure functions of (state, command, time).
//!
//! Architecture invariant: no tokio, sled, sockets or clock reads here. Time comes in as a value
//! (`ts`, Unix microseconds), and anything the core needs from outside (an imported price file)
//! is passed in by the caller. That is what makes replay exact and tests deterministic.

pub mod labels;
pub mod ledger;
pub mod money;
pub mod policy;
pub mod pricing;
pub mod quota;
pub mod tiers;
pub mod time;
pub mod toml_text;
pub mod window;
