#!/usr/bin/env bash
# Local cluster on loopback: name server 127.0.0.1:9876 and a three-node broker
# group (broker-a) on 127.0.0.1:8081-8083; Prometheus metrics at
# http://127.0.0.1:9877/metrics (name server) and :9181-9183 (brokers). Data and
# logs under ./local-cluster
# (override with RAFTMQ_CLUSTER_DIR). Uses the debug build, or the release
# build with RAFTMQ_PROFILE=release.
#   scripts/cluster.sh start | stop | status | restart-node N | kill-node N
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DIR="${RAFTMQ_CLUSTER_DIR:-$PWD/local-cluster}"
BIN="$CARGO_TARGET_DIR/${RAFTMQ_PROFILE:-debug}"
PORTS=(8081 8082 8083)

write_config() {
    local i=$1
    mkdir -p "$DIR/n$i"
    cat > "$DIR/n$i.toml" <<TOML
# Node $i of the local group (see BrokerConfig for every key and its default).
broker_name = "broker-a"
node_id = $i
data_dir = "$DIR/n$i"
namesrv = ["127.0.0.1:9876"]
metrics_listen = "127.0.0.1:918$i"

[peers]
1 = "127.0.0.1:8081"
2 = "127.0.0.1:8082"
3 = "127.0.0.1:8083"

[log]
# Smaller segments than the 1 GiB default: three nodes share one disk here.
segment_bytes = 268435456
TOML
}

start_node() {
    local i=$1
    nohup "$BIN/raftmq-broker" --config "$DIR/n$i.toml" >> "$DIR/n$i.log" 2>&1 &
    echo $! > "$DIR/n$i.pid"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

case "${1:-}" in
start)
    for b in raftmq-broker raftmq-namesrv raftmq; do
        [ -x "$BIN/$b" ] || { echo "cluster: $BIN/$b missing; run scripts/dev-up.sh" >&2; exit 1; }
    done
    mkdir -p "$DIR"
    if alive "$DIR/namesrv.pid"; then
        echo "cluster: already running (scripts/cluster.sh stop first)"; exit 0
    fi
    cat > "$DIR/namesrv.toml" <<TOML
# The local name server (see NamesrvConfig for every key and its default).
listen = "127.0.0.1:9876"
metrics_listen = "127.0.0.1:9877"
TOML
    nohup "$BIN/raftmq-namesrv" --config "$DIR/namesrv.toml" >> "$DIR/namesrv.log" 2>&1 &
    echo $! > "$DIR/namesrv.pid"
    for i in 1 2 3; do write_config "$i"; start_node "$i"; done
    for _ in $(seq 1 60); do
        if "$BIN/raftmq" cluster status --json 2>/dev/null | grep -q '"role":"leader"'; then
            "$BIN/raftmq" cluster status
            echo "cluster: up. Data and logs in $DIR. Stop with scripts/cluster.sh stop"
            exit 0
        fi
        sleep 0.5
    done
    echo "cluster: no leader after 30 s; see $DIR/n*.log" >&2; exit 1
    ;;
stop)
    for f in "$DIR"/n*.pid "$DIR"/namesrv.pid; do
        [ -f "$f" ] || continue
        if alive "$f"; then kill -TERM "$(cat "$f")"; fi
    done
    for f in "$DIR"/n*.pid "$DIR"/namesrv.pid; do
        [ -f "$f" ] || continue
        for _ in $(seq 1 50); do alive "$f" || break; sleep 0.1; done
        if alive "$f"; then kill -KILL "$(cat "$f")"; fi
        rm -f "$f"
    done
    echo "cluster: stopped (data kept in $DIR)"
    ;;
status)
    "$BIN/raftmq" cluster status
    ;;
kill-node)
    alive "$DIR/n$2.pid" && kill -KILL "$(cat "$DIR/n$2.pid")" && echo "killed node $2"
    ;;
restart-node)
    alive "$DIR/n$2.pid" && kill -KILL "$(cat "$DIR/n$2.pid")" || true
    sleep 0.2; start_node "$2"; echo "restarted node $2"
    ;;
*)
    echo "usage: $0 start | stop | status | kill-node N | restart-node N" >&2; exit 2
    ;;
esac
