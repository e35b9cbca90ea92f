//! RaftMQ end-to-end tests: the one integration-test binary.
//!
//! Tests that need a child process re-run this binary with `--exact <name>
//! --ignored` and an environment variable naming their role.

mod commitlog_kill;
