//! End-to-end tests (crash) through the real `qgjob` binary; filled in by its feature.
