//! RaftMQ end-to-end tests: the one integration-test binary.
//!
//! Tests that need a child process re-run this binary with `--exact <name>
//! --ignored` and an environment variable naming their role. Cluster tests
//! start real `raftmq-namesrv` / `raftmq-broker` processes built by
//! `cargo build --workspace --bins` (scripts/test.sh does that first).

mod cluster;
mod commitlog_kill;
mod compat;
mod console;
mod features;
mod groups;
mod jepsen_cleanup;
mod operations;
mod regressions;
mod snapshot;
