#!/usr/bin/env bash
# Runs every test of the workspace: unit and property tests beside the code,
# openraft's storage suite, and the end-to-end binary in tests/.
# Tests needing root or network namespaces skip with a printed reason.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The cluster tests run the real binaries. `--tests` keeps the feature set
# the same as `cargo test` (dev-dependencies on), so RocksDB is built once.
cargo build --workspace --bins --tests
cargo test --workspace "$@"
