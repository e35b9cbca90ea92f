#!/usr/bin/env bash
# The first command of the README: installs what is needed, builds, and starts
# a local cluster (name server 127.0.0.1:9876 and a three-node broker group on
# 127.0.0.1:8081-8083) with its data under ./local-cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release --workspace --bins
exec bash scripts/cluster.sh start
