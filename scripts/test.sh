#!/usr/bin/env bash
# Runs every test of the workspace: unit and property tests beside the code,
# openraft's storage suite, and the end-to-end binary in tests/.
# Tests needing root or network namespaces skip with a printed reason. Then
# the real-systemd deploy test (deploy/test/systemd-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The cluster tests run the real binaries. `--tests` keeps the feature set
# the same as `cargo test` (dev-dependencies on), so RocksDB is built once.
cargo build --workspace --bins --tests
cargo test --workspace "$@"
# The deploy path on real systemd (deploy/test/systemd-test.sh): four hosts
# in namespaces, about 40 s once the Debian rootfs is cached. Skips with the
# reason when not root or without debootstrap. RAFTMQ_SKIP_SYSTEMD_TEST=1
# leaves it out (a quick local run).
if [ "${RAFTMQ_SKIP_SYSTEMD_TEST:-0}" != 1 ] && [ $# -eq 0 ]; then
    bash deploy/test/systemd-test.sh "$CARGO_TARGET_DIR/debug"
fi
