#!/usr/bin/env bash
# The RaftMQ group the benchmark measures: a name server on 127.0.0.1:9896 and
# a three-node group "bench" on 127.0.0.1:8191-8193 (apart from the local
# cluster of scripts/cluster.sh), data under ${RAFTMQ_BENCH_DIR:-/var/tmp/
# raftmq-bench-raftmq}, release build (RAFTMQ_PROFILE=debug for the debug one).
#   bench/raftmq.sh start | stop | pids
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DIR="${RAFTMQ_BENCH_DIR:-/var/tmp/raftmq-bench-raftmq}"
BIN="$CARGO_TARGET_DIR/${RAFTMQ_PROFILE:-release}"
PORTS=(8191 8192 8193)

stop() {
    for f in "$DIR"/n?.pid "$DIR"/namesrv.pid; do
        [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
    done
    rm -rf "$DIR"
}

start() {
    stop
    mkdir -p "$DIR"
    nohup "$BIN/raftmq-namesrv" --listen 127.0.0.1:9896 > "$DIR/namesrv.log" 2>&1 &
    echo $! > "$DIR/namesrv.pid"
    for i in 1 2 3; do
        mkdir -p "$DIR/n$i"
        cat > "$DIR/n$i.toml" <<TOML
broker_name = "bench"
node_id = $i
data_dir = "$DIR/n$i"
namesrv = ["127.0.0.1:9896"]
worker_threads = 1               # three nodes share two cores (peers.sh gives the peers one each too)

[peers]
1 = "127.0.0.1:${PORTS[0]}"
2 = "127.0.0.1:${PORTS[1]}"
3 = "127.0.0.1:${PORTS[2]}"

[log]
flush_mode = "sync"              # the default, spelled out: fsync before an entry counts
segment_bytes = 268435456        # three nodes share one disk here
disk_max_used_ratio = 0.95       # the shared build disk runs near the 0.75 default

[limits]
max_receive_batch = 256          # the drivers fetch 256 per call from every system
TOML
        nohup "$BIN/raftmq-broker" --config "$DIR/n$i.toml" > "$DIR/n$i.log" 2>&1 &
        echo $! > "$DIR/n$i.pid"
    done
    for _ in $(seq 1 120); do
        if "$BIN/raftmq" --server "127.0.0.1:${PORTS[0]}" cluster status --json 2>/dev/null \
            | grep -q '"role":"leader"'; then
            return 0
        fi
        sleep 0.5
    done
    echo "raftmq.sh: no leader after 60 s; see $DIR/n*.log" >&2
    return 1
}

case "${1:-}" in
start) start ;;
stop) stop ;;
pids) cat "$DIR"/n?.pid ;;
kill-node) kill -KILL "$(cat "$DIR/n$2.pid")" ;;
restart-node)
    kill -KILL "$(cat "$DIR/n$2.pid")" 2>/dev/null || true
    nohup "$BIN/raftmq-broker" --config "$DIR/n$2.toml" >> "$DIR/n$2.log" 2>&1 &
    echo $! > "$DIR/n$2.pid"
    ;;
*) echo "usage: $0 start | stop | pids | kill-node N | restart-node N" >&2; exit 2 ;;
esac
