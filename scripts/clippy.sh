#!/usr/bin/env bash
# Lints the workspace with clippy, denying warnings: clippy-driver runs as the
# workspace's rustc wrapper inside `cargo build` (what `cargo clippy` does
# inside `cargo check`). Plain `cargo clippy` keys librocksdb-sys's build
# script under another fingerprint here and compiles RocksDB's C++ (about 15
# minutes) once more; this way it is compiled at most twice on a fresh
# machine (once for this lint build, once for the tests) and reused after.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DRIVER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export RUSTC_WORKSPACE_WRAPPER="$DRIVER"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
cargo build --workspace --all-targets "$@"
