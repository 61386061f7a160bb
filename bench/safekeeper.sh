#!/usr/bin/env bash
# Safekeeper benchmark, one run (a benchmark, not a test): pgbench TPS (scale
# $BENCH_SCALE, $BENCH_CLIENTS clients, $BENCH_SECONDS s each, the default read-write
# script) with synchronous commit to:
#   - `pg_receivewal --synchronous --slot` (fsyncs each flush to a local directory) as the
#     sync standby of a stock cluster, and of a zenith main pg (safekeeper off), which
#     archives with archive_command as zenith's main always does;
#   - zenith's safekeeper in sync mode on a file:// storage_dest on the same disk as
#     pg_receivewal's directory;
# in $BENCH_ROUNDS interleaved rounds (medians reported, so a slow minute of the machine
# does not fall on one side only); then once each: the safekeeper off, async, and sync on
# a 1-node Garage on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-10}
clients=${BENCH_CLIENTS:-8}
seconds=${BENCH_SECONDS:-20}
rounds=${BENCH_ROUNDS:-3}
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
median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.1f}')" "$@"; }

echo "== zenith safekeeper benchmark: pgbench scale $scale, $clients clients, $seconds s per run, $rounds rounds, $(nproc) cores, $(date -u +%FT%TZ)"

# pgbench's TPS on connection $1.
bench() {
    as_pg "$pgbin/pgbench" -n -c "$clients" -j 2 -T "$seconds" -d "$1" 2> /dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}

# pg_receivewal --synchronous as the sync standby of the server at connection $1 (its
# WAL into directory $2), then pgbench; prints the TPS.
with_receivewal() {
    local conn=$1 dir=$2 tps
    mkdir -p "$dir" && chown postgres "$dir"
    as_pg "$pgbin/psql" -X -q -d "$conn" -c "alter system set synchronous_standby_names = 'pg_receivewal'" -c "select pg_reload_conf()" > /dev/null
    as_pg "$pgbin/pg_receivewal" -d "$conn" --create-slot --slot=bench > /dev/null
    # setpriv directly (not through the as_pg function), so $! is pg_receivewal itself.
    setpriv --reuid=postgres --regid=postgres --init-groups \
        "$pgbin/pg_receivewal" -d "$conn" --slot=bench --synchronous --no-loop -D "$dir" > "$dir.log" 2>&1 &
    receiver=$!
    until [[ "$(as_pg "$pgbin/psql" -X -qAt -d "$conn" -c "select sync_state from pg_stat_replication where application_name = 'pg_receivewal'")" == sync ]]; do sleep 0.2; done
    as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$conn" > /dev/null 2>&1
    tps=$(bench "$conn")
    kill -INT "$receiver"; wait "$receiver" 2> /dev/null || true; receiver=
    echo "$tps"
}

# A stock cluster (initdb's settings, no archiving) with pg_receivewal as its sync standby.
stock_run() {
    local stock="$work/stock" sport sconn tps
    rm -rf "$stock"; mkdir -p "$stock" && chown -R postgres "$stock"
    sport=$(free_port)
    as_pg "$pgbin/initdb" --data-checksums -A trust -U postgres -D "$stock/data" > /dev/null
    cat >> "$stock/data/postgresql.conf" <<CONF
port = $sport
listen_addresses = '127.0.0.1'
unix_socket_directories = '$stock'
max_wal_size = 4GB
CONF
    as_pg "$pgbin/pg_ctl" -D "$stock/data" -l "$stock/log" -w start > /dev/null
    sconn="host=$stock port=$sport user=postgres dbname=postgres"
    tps=$(with_receivewal "$sconn" "$stock/received")
    as_pg "$pgbin/pg_ctl" -D "$stock/data" -m fast -w stop > /dev/null
    echo "$tps"
}

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
    rm -rf "$ZENITH_REPO_DIR"
    [[ $dest == file://* ]] && rm -rf "${dest#file://}"
    ZENITH_PG_PORT=$(free_port)
    export ZENITH_PG_PORT
    conn=$(zenith_repo "$dest" "$mode")
    case $mode in
        sync) until_safekeeper "s.get('commits_wait')" ;;
        async) until_safekeeper "s.get('streaming')" ;;
    esac
    if [[ $name == receivewal ]]; then
        tps=$(with_receivewal "$conn" "$work/z-received")
        rm -rf "$work/z-received"
    else
        as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$conn" > /dev/null 2>&1
        tps=$(bench "$conn")
    fi
    "$zenith" stop --immediate > /dev/null
    rm -rf "$ZENITH_REPO_DIR"
    echo "$tps"
}

stock=(); zrw=(); sync=()
for ((i = 1; i <= rounds; i++)); do
    stock+=("$(stock_run)")
    zrw+=("$(zenith_run receivewal "file://$work/dest-rw" off)")
    sync+=("$(zenith_run sync "file://$work/dest-sync" sync)")
    echo "  round $i: stock + pg_receivewal ${stock[-1]}, zenith main + pg_receivewal ${zrw[-1]}, zenith sync (file://) ${sync[-1]} tps"
done
receivewal_tps=$(median "${stock[@]}")
zenith_receivewal_tps=$(median "${zrw[@]}")
sync_tps=$(median "${sync[@]}")
off_tps=$(zenith_run off "file://$work/dest-off" off)
async_tps=$(zenith_run async "file://$work/dest-async" async)

bash scripts/garage-cluster.sh start "$work/garage" 1 > /dev/null
# shellcheck disable=SC1091
source "$work/garage/env"
export AWS_ENDPOINT_URL="$GARAGE_ENDPOINT" AWS_REGION="$GARAGE_REGION" AWS_S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID="$GARAGE_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$GARAGE_SECRET_KEY"
garage_tps=$(zenith_run garage "s3://$GARAGE_BUCKET/sk" sync)

printf "  %-64s %9s tps\n" "stock pg, sync standby pg_receivewal --synchronous (median)" "$receivewal_tps"
printf "  %-64s %9s tps\n" "zenith main, sync standby pg_receivewal --synchronous (median)" "$zenith_receivewal_tps"
printf "  %-64s %9s tps\n" "zenith main, safekeeper sync (file://, same disk) (median)" "$sync_tps"
printf "  %-64s %9s tps\n" "zenith main, safekeeper off (archive_command only)" "$off_tps"
printf "  %-64s %9s tps\n" "zenith main, safekeeper async (file://)" "$async_tps"
printf "  %-64s %9s tps\n" "zenith main, safekeeper sync (1-node Garage, loopback)" "$garage_tps"
echo "  sync (file://) / pg_receivewal on zenith main: $(ratio "$sync_tps" "$zenith_receivewal_tps")×   / pg_receivewal on stock pg: $(ratio "$sync_tps" "$receivewal_tps")×"
echo "  sync (Garage) / pg_receivewal on zenith main: $(ratio "$garage_tps" "$zenith_receivewal_tps")×"
