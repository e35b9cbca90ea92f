#!/usr/bin/env bash
# The deploy path on real systemd: four hosts (a name server and a three-node
# broker group), each a Debian root file system with systemd as PID 1 in its
# own PID + mount namespace and its own network namespace, joined by veth
# pairs to a bridge. Each host runs deploy/install.sh; then the test
#   1. sends and consumes through the group;
#   2. kills the leader's unit (systemctl kill -s KILL) and checks systemd
#      restarts it and it rejoins;
#   3. restarts the three units one by one while a producer runs, and checks
#      every acknowledged message is still there;
#   4. cuts one host's link, checks the others go on, restores it and checks
#      the host catches up;
#   5. reloads a unit (systemctl reload) and checks the node logged it.
# Everything it made (namespaces, mounts, processes, files) is removed on exit,
# also on failure. Recipe: shared/design.md section 9.
#
#   deploy/test/systemd-test.sh [BIN_DIR]     (default: the debug build)
# Needs root, debootstrap, overlayfs and network namespaces; without them it
# prints why and exits 0 (skipped). The Debian rootfs is cached in
# $RAFTMQ_SYSTEMD_CACHE (default /var/tmp/raftmq-systemd).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${RAFTMQ_SYSTEMD_CACHE:-/var/tmp/raftmq-systemd}"
RUN="$CACHE/run"
mkdir -p "$CACHE"
BASE="$CACHE/rootfs-bookworm"
SUITE=bookworm
MIRROR="${RAFTMQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
NET=10.78.0
SW=rmqsd-sw
HOSTS=(ns b1 b2 b3)
declare -A IP=([ns]=$NET.10 [b1]=$NET.11 [b2]=$NET.12 [b3]=$NET.13)
declare -A SDPID=()
GROUP=broker-a
UNIT="raftmq-broker@$GROUP"

log() { echo "systemd-test: $*"; }
fail() { echo "systemd-test: FAILED: $*" >&2; exit 1; }
skip() { echo "systemd-test: SKIPPED: $*"; exit 0; }

[ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces, mounts, systemd as PID 1)"
for c in debootstrap unshare nsenter ip mount; do
    command -v "$c" >/dev/null || skip "$c not installed (scripts/setup.sh installs debootstrap)"
done
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || skip "no overlayfs"
ip netns add rmqsd-probe 2>/dev/null || skip "cannot create network namespaces"
ip netns del rmqsd-probe

BIN_DIR="${1:-${CARGO_TARGET_DIR:-$REPO/target}/debug}"
for b in raftmq-broker raftmq-namesrv raftmq; do
    [ -x "$BIN_DIR/$b" ] || fail "$BIN_DIR/$b missing (cargo build --bins)"
done
CLI="$BIN_DIR/raftmq"

# ---------------------------------------------------------------- cleanup --
# Every `unshare` started and its systemd are recorded in $PIDS as they start,
# so a later run can still kill them if this one was killed itself.
PIDS="$CACHE/pids"
kill_recorded() {
    [ -f "$PIDS" ] || return 0
    local p
    for p in $(cat "$PIDS"); do
        # Only a PID that is still one of ours (PIDs are reused).
        grep -qa -e systemd -e unshare "/proc/$p/cmdline" 2>/dev/null || continue
        pkill -9 -P "$p" 2>/dev/null || true
        kill -9 "$p" 2>/dev/null || true
    done
    sleep 0.5
    rm -f "$PIDS"
}
cleanup() {
    local rc=$?
    set +e
    for h in "${HOSTS[@]}"; do
        # Killing PID 1 of a PID namespace kills everything in it.
        if [ -n "${SDPID[$h]:-}" ]; then kill -9 "${SDPID[$h]}" 2>/dev/null; fi
    done
    kill_recorded
    for h in "${HOSTS[@]}"; do
        if [ -n "${SDPID[$h]:-}" ]; then
            for _ in $(seq 1 50); do kill -0 "${SDPID[$h]}" 2>/dev/null || break; sleep 0.1; done
        fi
        mountpoint -q "$RUN/$h/root" && umount -l "$RUN/$h/root"
        ip netns del "rmqsd-$h" 2>/dev/null
    done
    ip netns del "$SW" 2>/dev/null
    if [ -n "${producer:-}" ]; then
        touch "$RUN/roll/stop" 2>/dev/null
        kill "$producer" 2>/dev/null
    fi
    rm -rf "$RUN"
    if [ $rc -eq 0 ]; then log "cleaned up"; else log "cleaned up after failure (exit $rc)"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A run interrupted hard (kill -9) may have left processes, namespaces and
# mounts.
kill_recorded
for h in "${HOSTS[@]}"; do
    mountpoint -q "$RUN/$h/root" 2>/dev/null && umount -l "$RUN/$h/root"
    ip netns del "rmqsd-$h" 2>/dev/null || true
done
ip netns del "$SW" 2>/dev/null || true
rm -rf "$RUN"

# ----------------------------------------------------------------- rootfs --
if [ ! -f "$BASE/.raftmq-rootfs-ok" ]; then
    log "building the Debian $SUITE rootfs in $BASE (once; about a minute)"
    rm -rf "$BASE.tmp"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,procps,passwd \
        "$SUITE" "$BASE.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; fail "debootstrap (log: $CACHE/debootstrap.log)"; }
    touch "$BASE.tmp/.raftmq-rootfs-ok"
    rm -rf "$BASE"
    mv "$BASE.tmp" "$BASE"
fi

# No terminals: a getty waits forever for a tty device a namespace has not
# got, and the boot never finishes.
for u in getty.target serial-getty@.service console-getty.service; do
    ln -sfn /dev/null "$BASE/etc/systemd/system/$u"
done

# ------------------------------------------------------------------ hosts --
# The binaries without their debug sections: four copies of the debug build
# would take gigabytes.
mkdir -p "$RUN/dist/bin"
for b in raftmq-broker raftmq-namesrv raftmq; do
    objcopy --strip-debug "$BIN_DIR/$b" "$RUN/dist/bin/$b"
done
cp -r "$REPO/deploy" "$RUN/dist/deploy"
cp "$REPO/README.md" "$RUN/dist/README.md"
# The example configs with this test's addresses: one name server.
sed -e "s/^namesrv = .*/namesrv = [\"${IP[ns]}:9876\"]/" \
    -e "s/10\.0\.0\.11/${IP[b1]}/; s/10\.0\.0\.12/${IP[b2]}/; s/10\.0\.0\.13/${IP[b3]}/" \
    -e "s|^data_dir = .*|data_dir = \"/var/lib/raftmq/$GROUP\"|" \
    -e "s/^# segment_bytes = .*/segment_bytes = 67108864/" \
    "$REPO/deploy/config/broker.toml" > "$RUN/dist/broker.toml"
cp "$REPO/deploy/config/namesrv.toml" "$RUN/dist/namesrv.toml"

ip netns add "$SW"
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
ip -n "$SW" link set lo up
for h in "${HOSTS[@]}"; do
    ns="rmqsd-$h"
    ip netns add "$ns"
    ip link add "sw-$h" netns "$SW" type veth peer name eth0 netns "$ns"
    ip -n "$SW" link set "sw-$h" master br0 up
    ip -n "$ns" addr add "${IP[$h]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up

    mkdir -p "$RUN/$h/upper" "$RUN/$h/work" "$RUN/$h/root"
    mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$RUN/$h/upper,workdir=$RUN/$h/work" "$RUN/$h/root"
    R="$RUN/$h/root"
    echo "$h" > "$R/etc/hostname"
    mkdir -p "$R/opt/raftmq"
    cp -r "$RUN/dist/." "$R/opt/raftmq/"
    # Boot systemd as PID 1 of new PID and mount namespaces, in the host's
    # network namespace.
    ip netns exec "$ns" unshare --pid --fork --mount --uts --ipc --mount-proc="$R/proc" \
        chroot "$R" /lib/systemd/systemd --system > "$RUN/$h/console.log" 2>&1 &
    upid=$!
    echo "$upid" >> "$PIDS"
    for _ in $(seq 1 100); do
        SDPID[$h]="$(ps -o pid= --ppid "$upid" | tr -d ' ' | head -1 || true)"
        [ -n "${SDPID[$h]}" ] && break
        sleep 0.1
    done
    [ -n "${SDPID[$h]}" ] || fail "systemd of $h did not start"
    echo "${SDPID[$h]}" >> "$PIDS"
done

# Runs a command inside a host (its mount, PID and network namespaces).
on() {
    local h=$1; shift
    nsenter -t "${SDPID[$h]}" -m -p -n -- chroot "$RUN/$h/root" "$@"
}
cli() { ip netns exec rmqsd-ns "$CLI" --server "${IP[b1]}:8081,${IP[b2]}:8081,${IP[b3]}:8081" "$@"; }

for h in "${HOSTS[@]}"; do
    state=""
    for _ in $(seq 1 120); do
        state="$(on "$h" systemctl is-system-running 2>/dev/null || true)"
        case "$state" in running|degraded) break ;; esac
        sleep 0.5
    done
    case "$state" in
        running|degraded) ;;
        *) on "$h" systemctl list-jobs --no-pager >&2 || true; fail "systemd on $h: $state (console: $RUN/$h/console.log)" ;;
    esac
done
log "systemd is PID 1 on ${HOSTS[*]} (each in its own PID, mount and network namespace)"

# ---------------------------------------------------------------- install --
on ns bash /opt/raftmq/deploy/install.sh namesrv --bin-dir /opt/raftmq/bin --config /opt/raftmq/namesrv.toml
for i in 1 2 3; do
    on "b$i" bash /opt/raftmq/deploy/install.sh broker --node-id "$i" --group "$GROUP" \
        --bin-dir /opt/raftmq/bin --config /opt/raftmq/broker.toml
done

# Waits until the unit on host $1 is active (READY sent) for the first or
# a newer main PID than $2.
wait_active() {
    local h=$1 old_pid=${2:-0} unit=${3:-$UNIT}
    for _ in $(seq 1 240); do
        local s p
        s="$(on "$h" systemctl is-active "$unit" 2>/dev/null || true)"
        p="$(on "$h" systemctl show -p MainPID --value "$unit" 2>/dev/null || echo 0)"
        if [ "$s" = active ] && [ "$p" != 0 ] && [ "$p" != "$old_pid" ]; then return 0; fi
        sleep 0.25
    done
    on "$h" systemctl status "$unit" --no-pager >&2 || true
    on "$h" journalctl -u "$unit" --no-pager -n 40 >&2 || true
    fail "$unit on $h not active"
}
wait_active ns 0 raftmq-namesrv
for i in 1 2 3; do wait_active "b$i"; done
log "installed: raftmq-namesrv on ns, $UNIT on b1 b2 b3, all READY"
on b1 systemctl show -p Type,User,ProtectSystem,NoNewPrivileges,LimitNOFILE "$UNIT" | tr '\n' ' '; echo

# The host running the group's leader.
leader_host() {
    local id
    id="$(cli cluster status --json 2>/dev/null | python3 -c '
import json, sys
nodes = json.load(sys.stdin)
print(next((n["node_id"] for n in nodes if n["role"] == "leader"), ""))' 2>/dev/null || true)"
    [ -n "$id" ] && echo "b$id"
}
wait_leader() {
    for _ in $(seq 1 120); do
        local l; l="$(leader_host || true)"
        if [ -n "$l" ]; then echo "$l"; return 0; fi
        sleep 0.25
    done
    fail "no leader"
}

# Waits until host $1's node is a follower (or $2: any role but candidate)
# and has applied everything the group committed.
wait_caught_up() {
    local h=$1 roles=${2:-any}
    for _ in $(seq 1 240); do
        if cli cluster status --json 2>/dev/null | python3 -c '
import json, sys
nodes = {n["node_id"]: n for n in json.load(sys.stdin)}
me, commit = nodes['"${h#b}"'], max(n["commit_index"] for n in nodes.values())
ok_role = me["role"] == "follower" if sys.argv[1] == "follower" else me["role"] in ("leader", "follower")
sys.exit(0 if ok_role and me["applied_index"] >= commit else 1)' "$roles"; then
            return 0
        fi
        sleep 0.25
    done
    cli cluster status >&2 || true
    fail "$h did not catch up with the group"
}

# ---------------------------------------------------- 1. send and consume --
cli topic create sd --queues 4 > /dev/null
cli send sd --count 200 --body "through systemd" | tail -1
got="$(cli consume sd -g sd-group --max 200 --wait-ms 5000 | tail -1)"
[ "$got" = "received 200 messages" ] || fail "consume: $got"
log "1. sent and consumed 200 messages through the group"

# ------------------------------------ 2. systemd restarts a killed leader --
L="$(wait_leader)"
before="$(on "$L" systemctl show -p MainPID --value "$UNIT")"
on "$L" systemctl kill --kill-who=main -s KILL "$UNIT"
wait_active "$L" "$before"
restarts="$(on "$L" systemctl show -p NRestarts --value "$UNIT")"
[ "$restarts" -ge 1 ] || fail "NRestarts = $restarts after kill -9"
cli send sd --count 10 --body "after the kill" > /dev/null
# Rejoined: the restarted node follows and applies what the group commits.
wait_caught_up "$L"
log "2. killed the leader's unit on $L (kill -9): systemd restarted it (NRestarts=$restarts) and it rejoined"

# ------------------------------ 3. rolling restart under a running producer --
mkdir -p "$RUN/roll"
(
    r=0
    while [ ! -f "$RUN/roll/stop" ]; do
        r=$((r + 1))
        if ip netns exec rmqsd-ns "$CLI" --server "${IP[b1]}:8081,${IP[b2]}:8081,${IP[b3]}:8081" \
            send roll --count 5 --body "round-$r" > /dev/null 2>&1; then
            echo "round-$r" >> "$RUN/roll/acked"
        else
            echo "round-$r" >> "$RUN/roll/failed"
        fi
    done
) &
producer=$!
cli topic create roll --queues 2 > /dev/null 2>&1 || true
sleep 2
for i in 1 2 3; do
    before="$(on "b$i" systemctl show -p MainPID --value "$UNIT")"
    on "b$i" systemctl restart "$UNIT"
    wait_active "b$i" "$before"
    wait_leader > /dev/null
    sleep 1
done
touch "$RUN/roll/stop"
wait "$producer" || true
acked="$(wc -l < "$RUN/roll/acked")"
[ "$acked" -ge 5 ] || fail "only $acked producer rounds acknowledged during the rolling restart"
cli consume roll -g roll-check --max 1000000 --wait-ms 5000 | sed -n 's/.*: \(round-[0-9]*\)$/\1/p' > "$RUN/roll/received"
missing=0
while read -r round; do
    n="$(grep -cx "$round" "$RUN/roll/received" || true)"
    [ "$n" -ge 5 ] || { echo "lost: $round ($n of 5 received)" >&2; missing=$((missing + 1)); }
done < "$RUN/roll/acked"
[ "$missing" -eq 0 ] || fail "$missing acknowledged rounds lost in the rolling restart"
failed=0; [ -f "$RUN/roll/failed" ] && failed="$(wc -l < "$RUN/roll/failed")"
log "3. rolling restart of b1 b2 b3 under load: $acked rounds of 5 acknowledged, all received; $failed rounds failed (not acknowledged)"

# ---------------------------------------------- 4. cut a host's link -------
L="$(wait_leader)"
ip -n "$SW" link set "sw-$L" down
log "4. cut $L (the leader) off the bridge"
for _ in $(seq 1 120); do
    nl="$(leader_host || true)"
    [ -n "$nl" ] && [ "$nl" != "$L" ] && break
    sleep 0.25
done
[ -n "$nl" ] && [ "$nl" != "$L" ] || fail "no new leader while $L was cut off"
cli send sd --count 20 --body "while cut" > /dev/null || fail "send with $L cut off"
ip -n "$SW" link set "sw-$L" up
wait_caught_up "$L" follower
log "   restored it: $nl took over, sends went on, $L caught up as a follower"

# -------------------------------------------------------------- 5. reload --
on b1 systemctl reload "$UNIT"
for _ in $(seq 1 40); do
    on b1 journalctl -u "$UNIT" --no-pager | grep -q "configuration reloaded" && break
    sleep 0.25
done
on b1 journalctl -u "$UNIT" --no-pager | grep -q "configuration reloaded" || fail "reload not logged"
log "5. systemctl reload: the node re-read its configuration"
log "PASSED"
