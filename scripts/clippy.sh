#!/usr/bin/env bash
# Lints the workspace with clippy, denying warnings: clippy-driver runs as the
# workspace's rustc wrapper inside `cargo build` (what `cargo clippy` does
# inside `cargo check`). This is the same build, with the same targets and
# profile, as scripts/test.sh: RocksDB's C++ (about 15 minutes) is compiled
# once on a fresh machine and shared. Plain `cargo clippy`, or
# `--all-targets` (benches build with the bench profile), would compile it
# again. The benches are linted apart: raft-log's needs no RocksDB.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DRIVER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export RUSTC_WORKSPACE_WRAPPER="$DRIVER"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
cargo build --workspace --bins --tests "$@"
cargo build -p raft-log --benches "$@"
