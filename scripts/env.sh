# Sourced by the scripts: one fixed target directory outside the clone, so CI
# and later sessions on the same machine reuse the build (rocksdb is slow).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}"
