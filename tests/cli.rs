//! End-to-end tests (cli) through the real `qgjob` binary; filled in by its feature.
