#!/usr/bin/env bash
# Installs what building and testing RaftMQ needs on a Debian machine.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt.
set -euo pipefail

# Debian packages: C toolchain and clang/libclang (rocksdb's bindgen),
# protoc and the well-known .proto types (gRPC code generation), python3-venv (official-client tests),
# iproute2 and iptables (network namespaces and link faults for raftmq-jepsen),
# debootstrap (the Debian root file system of the real-systemd deploy test).
PACKAGES=(build-essential pkg-config clang libclang-dev protobuf-compiler libprotobuf-dev python3-venv iproute2 iptables debootstrap)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. RaftMQ needs Rust 1.85 or newer (edition 2024) from rustup." >&2
    exit 1
fi
echo "setup: ok ($(cargo --version))"
