//! qgjob-cli: the `qgjob` command's implementation (commands, HTTP client, agents).
//!
//! The binary (`main.rs`) only parses arguments and dispatches here, so the pieces (the
//! HTTP client, the bundle packer, the reports) can be tested and reused on their own.
#![warn(missing_docs)]

pub mod agent;
pub mod bundle;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod error;
pub mod link;
pub mod local;
pub mod real;
pub mod report;
pub mod simulate;
pub mod util;
