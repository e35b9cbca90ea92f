//! Shared helpers for the end-to-end test binary `tests/e2e.rs`.
