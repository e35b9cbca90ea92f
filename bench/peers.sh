#!/usr/bin/env bash
# The benchmark's peers, each a three-node cluster on 127.0.0.1 with its data,
# logs and pid files under $PEERS_DIR (default /var/tmp/raftmq-bench-peers):
#   NATS JetStream  nats://127.0.0.1:4222,4223,4224 (routes :6222-6224, HTTP :8222-8224)
#   RabbitMQ        amqp://bench:bench@127.0.0.1:5672 (5673, 5674; r1..r3@localhost)
set -euo pipefail
DIR="${PEERS_DIR:-/var/tmp/raftmq-bench-peers}"
# Scheduler threads per server (GOMAXPROCS for NATS, Erlang +S for RabbitMQ):
# three servers share the machine's cores, as bench/raftmq.sh gives each RaftMQ
# node one worker thread, can be capped the same way (PEERS_SCHEDULERS=1). The
# default, 0, keeps each runtime's own (one per core): both peers measured
# faster so (RabbitMQ 7557 vs 5861 msg/s, NATS 1510 vs 1233, 64 producers).
SCHEDULERS="${PEERS_SCHEDULERS:-0}"
if [ "$SCHEDULERS" = 0 ]; then GOMAX=(); ERL_S=""; else GOMAX=("GOMAXPROCS=$SCHEDULERS"); ERL_S="+S $SCHEDULERS:$SCHEDULERS"; fi
MIRROR=http://deb.debian.org/debian
RABBIT_BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)
START_TIMEOUT=${PEERS_START_TIMEOUT:-60}
STOP_TIMEOUT=30
SPAWNED=()

usage() {
    cat >&2 <<'EOF'
usage: bench/peers.sh install
       bench/peers.sh start nats|rabbitmq durable|default
       bench/peers.sh pids nats|rabbitmq
       bench/peers.sh stop nats|rabbitmq|all
EOF
    exit 2
}

die() { echo "peers.sh: $*" >&2; exit 1; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2> /dev/null)" = "install ok installed" ]; }

# Bookworm's nats-server (2.9) lacks JetStream's sync_interval, so take
# trixie's .deb, found through trixie's signed index (checked against Debian's
# archive keys, as apt would) so that a version bump there does not break us.
install_nats() {
    local have tmp=$1 file sum
    have=$(dpkg-query -W -f='${Version}' nats-server 2> /dev/null || true)
    if [ -n "$have" ] && dpkg --compare-versions "$have" ge 2.10; then
        echo "nats-server $have already installed"
        return
    fi
    curl -fsS -o "$tmp/InRelease" "$MIRROR/dists/trixie/InRelease"
    gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg \
        --output "$tmp/Release" "$tmp/InRelease" 2> /dev/null ||
        die "bad signature on trixie's InRelease"
    curl -fsS -o "$tmp/Packages.xz" "$MIRROR/dists/trixie/main/binary-amd64/Packages.xz"
    sum=$(awk '/^SHA256:/ { s = 1 } s && $3 == "main/binary-amd64/Packages.xz" { print $1 }' \
        "$tmp/Release")
    echo "$sum  $tmp/Packages.xz" | sha256sum -c --quiet - || die "trixie Packages.xz checksum"
    read -r file sum < <(xz -dc "$tmp/Packages.xz" | awk '
        /^Package: / { p = ($2 == "nats-server") }
        p && /^Filename: / { f = $2 }
        p && /^SHA256: / { print f, $2; exit }') || die "no nats-server in trixie's index"
    curl -fsS -o "$tmp/nats-server.deb" "$MIRROR/$file"
    echo "$sum  $tmp/nats-server.deb" | sha256sum -c --quiet - || die "$file checksum"
    dpkg -i "$tmp/nats-server.deb"
}

cmd_install() {
    local tmp policy=/usr/sbin/policy-rc.d cleanup p need=()
    tmp=$(mktemp -d)
    cleanup="rm -rf '$tmp'"
    # No init system here: postinst scripts must not try to start services.
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        cleanup="$cleanup '$policy'"
    fi
    # shellcheck disable=SC2064 # expanded now, on purpose
    trap "$cleanup" EXIT
    for p in rabbitmq-server curl jq xz-utils gpgv; do installed "$p" || need+=("$p"); done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
    fi
    install_nats "$tmp"
    # Our nodes run as root from $DIR: whatever runs as a service user is a
    # system service a postinst started, and would hold our ports.
    for p in rabbitmq epmd nats; do pkill -9 -u "$p" 2> /dev/null || true; done
}

# Runs "$@" until it succeeds; fails after START_TIMEOUT seconds, showing the
# last try's output, or at once if a server this script spawned has exited.
wait_for() {
    local what=$1 deadline=$((SECONDS + START_TIMEOUT)) p out=$DIR/wait.out && shift
    until "$@" > "$out" 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "no $what after ${START_TIMEOUT}s: $(tail -3 "$out")"
        for p in "${SPAWNED[@]}"; do
            kill -0 "$p" 2> /dev/null || die "a server exited (pid $p); see its log"
        done
        sleep 0.5
    done
}

# setsid: the servers outlive this script and a Ctrl-C or job kill of its caller
# (-w: should setsid have to fork, $! still lives as long as the server).
spawn() {
    local log=$1 && shift
    setsid -w "$@" >> "$log" 2>&1 < /dev/null &
    SPAWNED+=($!)
}

# The servers write n1..n3.pid or r1..r3.pid themselves (RabbitMQ: beam.smp's).
live_pids() {
    local f pid
    for f in "$DIR/$1"/[nr][123].pid; do
        pid=$(cat "$f" 2> /dev/null) && kill -0 "$pid" 2> /dev/null && echo "$pid"
    done
    return 0
}

nats_conf() {
    local i=$1 sync=""
    # durable: fsync every write before the PubAck, as RaftMQ and RabbitMQ do;
    # default: NATS fsyncs every 2 minutes and relies on replication.
    [ "$2" = durable ] && sync="sync_interval: always"
    cat <<CONF
server_name: n$i
listen: 127.0.0.1:$((4221 + i))
http: 127.0.0.1:$((8221 + i))
pid_file: "$DIR/nats/n$i.pid"
jetstream {
    store_dir: "$DIR/nats/n$i"
    $sync
}
cluster {
    name: bench
    listen: 127.0.0.1:$((6221 + i))
    routes: [nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223,
             nats-route://127.0.0.1:6224]
}
CONF
}

# Plain /healthz answers 503 until the node is in touch with a JetStream meta
# leader (?js-enabled-only=true would pass at once).
nats_ready() {
    local i url health meta
    for i in "${NODES[@]}"; do
        url=http://127.0.0.1:$((8221 + i))
        health=$(curl -sS -m 2 "$url/healthz") && meta=$(curl -fsS -m 2 "$url/jsz") || return 1
        meta=$(jq -c .meta_cluster <<< "$meta")
        echo "n$i: $health $meta"
        [[ $health == *'"ok"'* ]] || return 1
        jq -e '.leader and .cluster_size == 3' <<< "$meta" > /dev/null || return 1
    done
}

start_nats() {
    local i
    for i in "${NODES[@]}"; do
        nats_conf "$i" "$1" > "$DIR/nats/n$i.conf"
        spawn "$DIR/nats/n$i.log" env "${GOMAX[@]}" nats-server -c "$DIR/nats/n$i.conf"
    done
    wait_for "JetStream meta leader" nats_ready
}

# The environment of node r$1, for the server and for rabbitmqctl talking to
# it: nothing from /etc/rabbitmq or /var/lib/rabbitmq, and the cookie in
# $HOME. Only ever called in a subshell; the cd keeps crash dumps in $DIR.
rabbit_env() {
    local i=$1 d=$DIR/rabbitmq
    cd "$d"
    export HOME=$d RABBITMQ_CONF_ENV_FILE=/dev/null
    export RABBITMQ_NODENAME=r$i@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$((5671 + i)) RABBITMQ_DIST_PORT=$((25671 + i))
    export RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log
    export RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_PID_FILE=$d/r$i.pid
    export RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config
    export RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} $ERL_S"
}

# Not /usr/sbin/rabbitmqctl: as root, that wrapper switches to the rabbitmq
# user, whose HOME (and so cookie) is /var/lib/rabbitmq.
rabbitmqctl() {
    local i=$1 && shift
    (rabbit_env "$i" && "$RABBIT_BIN/rabbitmqctl" -q -n "r$i@localhost" "$@")
}

rabbit_ready() {
    rabbitmqctl 1 cluster_status --formatter json | jq -e '.running_nodes | length == 3'
}

# Quorum queues fsync their Raft log before confirming a publish out of the
# box, so durable and default are the same configuration: the defaults.
start_rabbitmq() {
    local d=$DIR/rabbitmq i
    echo "# The defaults; per-node settings are in the environment." > "$d/rabbitmq.conf"
    echo "[]." > "$d/enabled_plugins"
    head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9 > "$d/.erlang.cookie"
    chmod 400 "$d/.erlang.cookie"
    # An epmd of our own on loopback, unless one runs already (not ours then).
    if ! epmd -names > /dev/null 2>&1; then
        spawn "$d/epmd.log" epmd -address 127.0.0.1
        echo $! > "$d/epmd.pid"
        wait_for epmd epmd -names
    fi
    # In the foreground under setsid (-detached is deprecated), as root like
    # this script; each node writes beam.smp's pid to its RABBITMQ_PID_FILE.
    for i in "${NODES[@]}"; do
        (rabbit_env "$i" && spawn "$d/r$i.out" "$RABBIT_BIN/rabbitmq-server")
    done
    for i in "${NODES[@]}"; do
        rabbitmqctl "$i" wait --timeout "$START_TIMEOUT" "$d/r$i.pid" > /dev/null
    done
    for i in 2 3; do
        rabbitmqctl "$i" stop_app
        rabbitmqctl "$i" join_cluster r1@localhost
        rabbitmqctl "$i" start_app
    done
    # guest works too, but only over loopback.
    rabbitmqctl 1 add_user bench bench
    rabbitmqctl 1 set_permissions -p / bench '.*' '.*' '.*'
    wait_for "3 running RabbitMQ nodes" rabbit_ready
}

cmd_start() {
    [[ $# -eq 2 && $1 =~ ^(nats|rabbitmq)$ && $2 =~ ^(durable|default)$ ]] || usage
    [ -z "$(live_pids "$1")" ] || die "$1 is running already: bench/peers.sh stop $1"
    # Every start begins empty: the benchmark measures a fresh cluster.
    rm -rf "${DIR:?}/$1"
    mkdir -p "$DIR/$1"
    # A half-started cluster is of no use: take it down along with the error.
    # shellcheck disable=SC2064 # expanded now, on purpose
    trap "echo 'peers.sh: start $1 failed; see $DIR/$1' >&2; stop_system $1" EXIT
    "start_$1" "$2"
    trap - EXIT
    echo "$1 ($2) is up: pids $(live_pids "$1" | tr '\n' ' ')"
}

epmd_names() { epmd -names 2> /dev/null | grep '^name ' > /dev/null; }

# SIGTERM is a clean shutdown for both nats-server and the Erlang VM.
stop_system() {
    local pids deadline=$((SECONDS + STOP_TIMEOUT)) d=$DIR/$1 epmd
    mapfile -t pids < <(live_pids "$1")
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2> /dev/null || true
        while [ -n "$(live_pids "$1")" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        kill -9 "${pids[@]}" 2> /dev/null || true
    fi
    # Our epmd goes, unless an Erlang node (not ours) still uses it; ours take
    # a moment after they exit to drop off its list.
    epmd=$(cat "$d/epmd.pid" 2> /dev/null || true)
    if [ -n "$epmd" ] && kill -0 "$epmd" 2> /dev/null; then
        deadline=$((SECONDS + 5))
        while epmd_names && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        epmd_names || kill "$epmd"
    fi
    rm -f "$d"/*.pid
    # The data goes; configs and logs stay until the next start.
    rm -rf "$d"/n[123] "$d/mnesia"
}

case "$*" in
    install) cmd_install ;;
    "start "*) cmd_start "${@:2}" ;;
    "pids nats" | "pids rabbitmq") live_pids "$2" ;;
    "stop nats" | "stop rabbitmq") stop_system "$2" ;;
    "stop all") stop_system nats && stop_system rabbitmq ;;
    *) usage ;;
esac
