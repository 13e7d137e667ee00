//! End-to-end tests (real_exec) through the real `qgjob` binary; filled in by its feature.
