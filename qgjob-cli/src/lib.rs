//! qgjob-cli: the `qgjob` command's implementation (commands, HTTP client, agents).

pub mod real;
