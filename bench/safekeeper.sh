#!/usr/bin/env bash
# Safekeeper benchmark, one run (a benchmark, not a test): pgbench TPS (scale
# $BENCH_SCALE, $BENCH_CLIENTS clients, $BENCH_SECONDS s each, the default read-write
# script) on the zenith main pg with its safekeeper off, async and sync, and beside it a
# stock cluster whose synchronous standby is `pg_receivewal --synchronous --slot`, which
# fsyncs each flush to a local directory. The zenith runs store on a file:// storage_dest
# on the same disk as pg_receivewal's directory, then (sync only) on a 1-node Garage on
# loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-10}
clients=${BENCH_CLIENTS:-8}
seconds=${BENCH_SECONDS:-20}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
pgbin=$(bash vendor/postgres/install.sh)
tools=$(bash scripts/tools.sh)
export GARAGE_BIN="$tools/garage"

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench-sk.XXXXXX")
chmod 755 "$work"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
cleanup() {
    for r in "$work"/z-*; do ZENITH_REPO_DIR="$r" "$zenith" stop --immediate > /dev/null 2>&1 || true; done
    [[ -n "${receiver:-}" ]] && kill -INT "$receiver" 2> /dev/null || true
    pkill -f "$work" 2> /dev/null || true
    [[ -f "$work/stock/data/postmaster.pid" ]] && as_pg "$pgbin/pg_ctl" -D "$work/stock/data" -m immediate stop > /dev/null 2>&1 || true
    bash scripts/garage-cluster.sh stop "$work/garage" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }

echo "== zenith safekeeper benchmark: pgbench scale $scale, $clients clients, $seconds s per run, $(nproc) cores, $(date -u +%FT%TZ)"

# pgbench's TPS on connection $1.
bench() {
    as_pg "$pgbin/pgbench" -n -c "$clients" -j 2 -T "$seconds" -d "$1" 2> /dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}

# The stock cluster with pg_receivewal as its synchronous standby.
stock="$work/stock"
mkdir -p "$stock/received" && chown -R postgres "$stock"
sport=$(free_port)
as_pg "$pgbin/initdb" --data-checksums -A trust -U postgres -D "$stock/data" > /dev/null
cat >> "$stock/data/postgresql.conf" <<CONF
port = $sport
listen_addresses = '127.0.0.1'
unix_socket_directories = '$stock'
synchronous_standby_names = 'pg_receivewal'
max_wal_size = 4GB
CONF
as_pg "$pgbin/pg_ctl" -D "$stock/data" -l "$stock/log" -w start > /dev/null
sconn="host=$stock port=$sport user=postgres dbname=postgres"
as_pg "$pgbin/pg_receivewal" -d "$sconn" --create-slot --slot=bench > /dev/null
# setpriv directly (not through the as_pg function), so $! is pg_receivewal itself.
setpriv --reuid=postgres --regid=postgres --init-groups \
    "$pgbin/pg_receivewal" -d "$sconn" --slot=bench --synchronous --no-loop -D "$stock/received" > "$stock/receivewal.log" 2>&1 &
receiver=$!
until [[ "$(as_pg "$pgbin/psql" -X -qAt -d "$sconn" -c "select sync_state from pg_stat_replication")" == sync ]]; do sleep 0.2; done
as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$sconn" > /dev/null 2>&1
receivewal_tps=$(bench "$sconn")
kill -INT "$receiver"; wait "$receiver" 2> /dev/null || true; receiver=
as_pg "$pgbin/pg_ctl" -D "$stock/data" -m fast -w stop > /dev/null

# A zenith repo storing to $1, safekeeper mode $2; prints its connection.
export ZENITH_API_PORT=$((40000 + RANDOM % 10000))
# (ZENITH_REPO_DIR and ZENITH_PG_PORT set by the caller.)
zenith_repo() {
    local dest=$1 mode=$2
    "$zenith" init --storage_dest "$dest" > /dev/null
    sed -i 's/^interval = .*/interval = "0"/; s/^mode = .*/mode = "'"$mode"'"/' "$ZENITH_REPO_DIR/config.toml"
    "$zenith" start > /dev/null
    local port
    port=$(python3 -c "import json; print(json.load(open('$ZENITH_REPO_DIR/pgs/main/node.json'))['port'])")
    echo "host=$ZENITH_REPO_DIR/pgs/main port=$port user=postgres dbname=postgres"
}
# Waits until the repo's safekeeper is in the state $1 (a status --json check).
until_safekeeper() {
    until "$zenith" status --json | python3 -c "import json,sys; s=json.load(sys.stdin).get('safekeeper') or {}; sys.exit(0 if $1 else 1)"; do sleep 0.2; done
}
zenith_run() {
    local name=$1 dest=$2 mode=$3 conn tps
    export ZENITH_REPO_DIR="$work/z-$name"
    ZENITH_PG_PORT=$(free_port)
    export ZENITH_PG_PORT
    conn=$(zenith_repo "$dest" "$mode")
    case $mode in
        sync) until_safekeeper "s.get('commits_wait')" ;;
        async) until_safekeeper "s.get('streaming')" ;;
    esac
    as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$conn" > /dev/null 2>&1
    tps=$(bench "$conn")
    "$zenith" stop --immediate > /dev/null
    echo "$tps"
}

off_tps=$(zenith_run off "file://$work/dest-off" off)
async_tps=$(zenith_run async "file://$work/dest-async" async)
sync_tps=$(zenith_run sync "file://$work/dest-sync" sync)

bash scripts/garage-cluster.sh start "$work/garage" 1 > /dev/null
# shellcheck disable=SC1091
source "$work/garage/env"
export AWS_ENDPOINT_URL="$GARAGE_ENDPOINT" AWS_REGION="$GARAGE_REGION" AWS_S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID="$GARAGE_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$GARAGE_SECRET_KEY"
garage_tps=$(zenith_run garage "s3://$GARAGE_BUCKET/sk" sync)

printf "  %-58s %9s tps\n" "stock pg, sync standby pg_receivewal --synchronous" "$receivewal_tps"
printf "  %-58s %9s tps\n" "zenith main, safekeeper off (archive_command only)" "$off_tps"
printf "  %-58s %9s tps\n" "zenith main, safekeeper async (file://)" "$async_tps"
printf "  %-58s %9s tps\n" "zenith main, safekeeper sync (file://, same disk)" "$sync_tps"
printf "  %-58s %9s tps\n" "zenith main, safekeeper sync (1-node Garage, loopback)" "$garage_tps"
echo "  sync (file://) / pg_receivewal: $(ratio "$sync_tps" "$receivewal_tps")×   sync (Garage) / pg_receivewal: $(ratio "$garage_tps" "$receivewal_tps")×"
