//! End-to-end tests (github_action) through the real `qgjob` binary; filled in by its feature.
