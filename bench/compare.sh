#!/usr/bin/env bash
# RaftMQ, NATS JetStream and RabbitMQ quorum queues on this machine, one after
# the other, each a three-node cluster on loopback, same workloads, same
# client machine. Writes one JSON per run, report.md (the README's tables)
# and an SVG per workload into the results directory.
#
#   bench/compare.sh                 # the full matrix (about 40 minutes)
#   bench/compare.sh --quick         # a short smoke version, equal durability only (CI)
#   options: --out DIR (default bench/results/<date>), --profile debug|release
#            (default release), --systems raftmq,nats,rabbitmq,
#            --only produce|sizes|fixed-rate|e2e|drain|failover (one workload)
#
# Durability: the "equal" class fsyncs every acknowledged message on a
# majority: RaftMQ flush_mode "sync" (its default), JetStream R3 with
# sync_interval "always", quorum queues as they are (they fsync before
# confirming). The "default" class runs each with its out-of-the-box
# settings (only JetStream differs: it fsyncs every 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

QUICK=0
PROFILE=release
SYSTEMS=raftmq,nats,rabbitmq
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --profile) PROFILE=$2; shift ;;
    --systems) SYSTEMS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: $0 [--quick] [--profile debug|release] [--systems LIST] [--only WORKLOAD] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-bench/results/$(date -u +%Y-%m-%dT%H%M)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BIN="$CARGO_TARGET_DIR/$PROFILE"
export RAFTMQ_PROFILE="$PROFILE"

if [ "$PROFILE" = release ]; then
    cargo build --release -p raftmq-broker -p raftmq-namesrv -p raftmq-client -p raftmq-bench
else
    cargo build -p raftmq-broker -p raftmq-namesrv -p raftmq-client -p raftmq-bench
fi
bash bench/peers.sh install

# peers.sh calls the fsync-every-message class "durable".
start() { # system durability
    local mode=$2
    [ "$mode" = equal ] && mode=durable
    if [ "$1" = raftmq ]; then bash bench/raftmq.sh start; else bash bench/peers.sh start "$1" "$mode"; fi
}
stop() {
    if [ "$1" = raftmq ]; then bash bench/raftmq.sh stop; else bash bench/peers.sh stop "$1"; fi
}
pids() {
    if [ "$1" = raftmq ]; then bash bench/raftmq.sh pids; else bash bench/peers.sh pids "$1"; fi | paste -sd, -
}
trap 'bash bench/raftmq.sh stop; bash bench/peers.sh stop all >/dev/null 2>&1 || true' EXIT

SERVERS=127.0.0.1:8191,127.0.0.1:8192,127.0.0.1:8193   # bench/raftmq.sh
bench() { # system durability file-stem args...
    local sys=$1 dur=$2 stem=$3
    shift 3
    "$BIN/raftmq-bench" --system "$sys" --durability "$dur" --servers "$SERVERS" \
        --server-pids "$(pids "$sys")" --out "$OUT/$dur-$stem-$sys.json" "$@"
}

if [ "$QUICK" = 1 ]; then
    # Equal durability only: a smoke run that keeps CI short.
    SECS=3; DRAIN=20000; SIZES_64="1024"; PRODUCERS_1K="16"; ROUNDS=2; CLASSES="equal"
else
    # DRAIN_MESSAGES: the backlog drained (JetStream with an fsync per
    # message builds a million in about 11 minutes here).
    SECS=10; DRAIN=${DRAIN_MESSAGES:-1000000}; SIZES_64="128 16384"; PRODUCERS_1K="1 16 64"; ROUNDS=7
    CLASSES="equal default"
fi
RATE=""
# Whether workload $1 runs (all unless --only names one).
runs() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
case "$ONLY" in ""|produce|sizes|fixed-rate|e2e|drain|failover) ;; *) echo "compare: unknown workload $ONLY" >&2; exit 2 ;; esac
if [ -n "$ONLY" ] && [ "$ONLY" != produce ]; then CLASSES="equal"; fi
IFS=, read -r -a systems <<< "$SYSTEMS"
for dur in $CLASSES; do
    for sys in "${systems[@]}"; do
        echo "== $sys ($dur durability)"
        start "$sys" "$dur"
        if runs produce || runs fixed-rate || runs e2e; then
            for p in $PRODUCERS_1K; do
                bench "$sys" "$dur" "produce-1024-p$p" --size 1024 produce --producers "$p" --seconds "$SECS"
            done
        fi
        if [ "$dur" = equal ]; then
            if [ "$QUICK" = 0 ] && { [ -z "$ONLY" ] || [ "$ONLY" = sizes ]; }; then
                for s in $SIZES_64; do
                    bench "$sys" "$dur" "produce-$s-p64" --size "$s" produce --producers 64 --seconds "$SECS"
                done
            fi
            if [ -z "$RATE" ] && { runs fixed-rate || runs e2e; }; then
                # Half of the first system's (RaftMQ's) 64-producer maximum, the
                # same offered load for every system.
                max=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['msgs_per_s'])" \
                    "$OUT/$dur-produce-1024-p${PRODUCERS_1K##* }-$sys.json")
                RATE=$(python3 -c "print(max(100, int(float('$max') / 2)))")
                echo "fixed rate for every system: $RATE msg/s"
            fi
            if runs fixed-rate; then
                bench "$sys" "$dur" fixed-rate --size 1024 fixed-rate --rate "$RATE" --producers 64 --seconds "$SECS"
            fi
            if runs e2e; then
                bench "$sys" "$dur" e2e --size 1024 e2e --rate "$RATE" --producers 64 --consumers 8 --seconds "$SECS"
            fi
            if runs drain; then
                bench "$sys" "$dur" drain --size 1024 drain --messages "$DRAIN" --producers 64 --consumers 8
            fi
            if [ "$sys" = raftmq ] && runs failover; then
                # kill -9 of the leader to the first acknowledged write.
                "$BIN/raftmq-bench" --servers "$SERVERS" failover --rounds "$ROUNDS" \
                    --kill-cmd 'bash bench/raftmq.sh kill-node {id}' \
                    --restart-cmd 'bash bench/raftmq.sh restart-node {id}' | tee "$OUT/failover.txt"
            fi
        fi
        stop "$sys"
    done
done
"$BIN/raftmq-bench" report --dir "$OUT"
echo "compare: results, report.md and plots in $OUT"
