#!/usr/bin/env bash
# Installs RaftMQ on this host for systemd (README: "Deploy a three-node group").
#
#   deploy/install.sh broker --node-id N [--group broker-a] [--config FILE]
#   deploy/install.sh namesrv [--config FILE]
#   common options: [--bin-dir DIR] [--force-config] [--no-start]
#
# It installs raftmq-broker, raftmq-namesrv and the raftmq CLI into
# /usr/local/bin, creates the system user `raftmq`, /etc/raftmq and
# /var/lib/raftmq, installs the units into /etc/systemd/system and the config
# (the example in deploy/config unless --config; for a broker with node_id
# set to N, and the example's broker_name and data_dir set to the group's,
# /var/lib/raftmq/<group>; a --config file must name the group), checks the
# config with `--check`, then enables and starts the unit. An existing
# config is kept unless --force-config. Needs root. Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

die() { echo "install: $*" >&2; exit 1; }
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

ROLE="${1:-}"; [ -n "$ROLE" ] || usage; shift
NODE_ID="" GROUP="broker-a" CONFIG="" BIN_DIR="" FORCE_CONFIG=0 START=1
while [ $# -gt 0 ]; do
    case "$1" in
        --node-id) NODE_ID="$2"; shift 2 ;;
        --group) GROUP="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --bin-dir) BIN_DIR="$2"; shift 2 ;;
        --force-config) FORCE_CONFIG=1; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) usage ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$ROLE" in
    broker) [[ "$NODE_ID" =~ ^[0-9]+$ ]] || die "broker needs --node-id N" ;;
    namesrv) ;;
    *) die "role must be broker or namesrv, got '$ROLE'" ;;
esac
[[ "$GROUP" =~ ^[A-Za-z0-9_-]+$ ]] || die "bad group name '$GROUP'"
[ "$(id -u)" -eq 0 ] || die "needs root"
command -v systemctl >/dev/null || die "systemctl not found: this script installs systemd units"

# Binaries: --bin-dir, else the release build of this checkout.
if [ -z "$BIN_DIR" ]; then
    BIN_DIR="${CARGO_TARGET_DIR:-$HERE/../target}/release"
fi
for b in raftmq-broker raftmq-namesrv raftmq; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing (cargo build --release, or --bin-dir)"
done
install -d -m 0755 /usr/local/bin
for b in raftmq-broker raftmq-namesrv raftmq; do
    install -m 0755 "$BIN_DIR/$b" "/usr/local/bin/$b.new"
    mv -f "/usr/local/bin/$b.new" "/usr/local/bin/$b"
done

if ! getent group raftmq >/dev/null; then groupadd --system raftmq; fi
if ! getent passwd raftmq >/dev/null; then
    useradd --system --gid raftmq --home-dir /var/lib/raftmq --no-create-home --shell /usr/sbin/nologin raftmq
fi
install -d -m 0755 /etc/raftmq
install -d -m 0750 -o raftmq -g raftmq /var/lib/raftmq
if [ -f "$HERE/../README.md" ]; then
    install -D -m 0644 "$HERE/../README.md" /usr/local/share/doc/raftmq/README.md
fi

if [ "$ROLE" = broker ]; then
    UNIT="raftmq-broker@$GROUP.service"
    DEST="/etc/raftmq/$GROUP.toml"
    SRC="${CONFIG:-$HERE/config/broker.toml}"
else
    UNIT="raftmq-namesrv.service"
    DEST="/etc/raftmq/namesrv.toml"
    SRC="${CONFIG:-$HERE/config/namesrv.toml}"
fi
[ -f "$SRC" ] || die "config $SRC not found"
if [ ! -f "$DEST" ] || [ "$FORCE_CONFIG" = 1 ]; then
    tmp="$(mktemp)"
    if [ "$ROLE" = broker ]; then
        grep -q '^node_id = ' "$SRC" || die "$SRC has no 'node_id = ' line to set"
        if [ -z "$CONFIG" ]; then
            # The example: it becomes this group's (its name, its own data
            # directory, so two groups on one host never share one).
            sed -e "s/^node_id = .*/node_id = $NODE_ID/" \
                -e "s/^broker_name = .*/broker_name = \"$GROUP\"/" \
                -e "s|^data_dir = \"/var/lib/raftmq/broker\"|data_dir = \"/var/lib/raftmq/$GROUP\"|" \
                "$SRC" > "$tmp"
        else
            # An operator's own file names its group; it must be this one
            # (the unit raftmq-broker@$GROUP reads /etc/raftmq/$GROUP.toml).
            grep -q "^broker_name = \"$GROUP\"" "$SRC" \
                || die "$SRC does not say broker_name = \"$GROUP\" (give --group with its group name)"
            sed "s/^node_id = .*/node_id = $NODE_ID/" "$SRC" > "$tmp"
        fi
    else
        cp "$SRC" "$tmp"
    fi
    # Checked before it replaces anything: a bad file never overwrites a good one.
    if [ "$ROLE" = broker ]; then
        /usr/local/bin/raftmq-broker --config "$tmp" --check || { rm -f "$tmp"; die "config refused"; }
    else
        /usr/local/bin/raftmq-namesrv --config "$tmp" --check || { rm -f "$tmp"; die "config refused"; }
    fi
    install -m 0640 -g raftmq "$tmp" "$DEST"
    rm -f "$tmp"
    echo "install: config $DEST"
else
    echo "install: keeping existing $DEST (--force-config replaces it)"
fi
# Refuse a config the service would refuse (unknown keys, bad peers).
if [ "$ROLE" = broker ]; then
    /usr/local/bin/raftmq-broker --config "$DEST" --check
else
    /usr/local/bin/raftmq-namesrv --config "$DEST" --check
fi

install -m 0644 "$HERE/systemd/raftmq-broker@.service" /etc/systemd/system/
install -m 0644 "$HERE/systemd/raftmq-namesrv.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable "$UNIT" >/dev/null
if [ "$START" = 1 ]; then
    # --no-block: a broker reports READY only once a majority of its group
    # is up, so the first node would otherwise wait here for the others.
    systemctl restart --no-block "$UNIT"
    echo "install: started $UNIT (systemctl status $UNIT; READY once the group has a leader)"
else
    echo "install: enabled $UNIT (not started)"
fi
