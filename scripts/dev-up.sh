#!/usr/bin/env bash
# The first command of the README: installs what is needed, builds, and starts
# a local cluster (name server 127.0.0.1:9876 and a three-node broker group on
# 127.0.0.1:8081-8083) with its data under ./local-cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# The same build as the tests (debug, dev-dependencies on): RocksDB is compiled
# once for both. RAFTMQ_PROFILE=release builds optimized binaries instead
# (benchmarks); that compiles RocksDB again.
if [ "${RAFTMQ_PROFILE:-debug}" = release ]; then
    cargo build --release --workspace --bins
else
    cargo build --workspace --bins --tests
fi
exec bash scripts/cluster.sh start
