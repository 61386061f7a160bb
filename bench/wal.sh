#!/usr/bin/env bash
# WAL archiving benchmark, one run (a benchmark, not a test): the same pgbench load
# (scale $BENCH_SCALE, $BENCH_CLIENTS clients, $BENCH_SECONDS s) on three fresh clusters,
# each archiving its WAL to the same 3-node Garage cluster on loopback:
#   zenith         a zenith repo with storage_dest (zenith wal-push as archive_command,
#                  up to 4 segments in flight), with its defaults: the async safekeeper
#                  streams the same WAL to Garage alongside
#   pgBackRest     archive-push, synchronous
#   pgBackRest     archive-push with archive-async=y (spool queue, process-max 2)
# For each: TPS, WAL written, segments archived per second while pgbench ran, the backlog
# (segments ready but not archived) when it ended and how long it took to drain; then a
# burst of WAL from a bulk insert, and how long archiving takes to catch up with it. Then a
# restore to a point in time in the middle of the load: zenith `pg create --at` beside
# pgBackRest `restore --type=time` (plus the replay, until the server accepts writes).
#
# pgBackRest speaks S3 over TLS only, so it reaches Garage through a local TLS proxy
# (socat, self-signed certificate); zenith talks to Garage directly. The proxy costs
# pgBackRest some CPU on this machine: its figures are a little pessimistic.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-20}
clients=${BENCH_CLIENTS:-4}
seconds=${BENCH_SECONDS:-40}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
pgbin=$(bash vendor/postgres/install.sh)
command -v pgbackrest > /dev/null || apt-get install -y -qq pgbackrest > /dev/null
command -v socat > /dev/null || apt-get install -y -qq socat > /dev/null
tools=$(bash scripts/tools.sh)
export GARAGE_BIN="$tools/garage"

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench-wal.XXXXXX")
chmod 755 "$work"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
cleanup() {
    ZENITH_REPO_DIR="$work/z" "$zenith" stop --immediate > /dev/null 2>&1 || true
    for d in "$work"/pg-*/data "$work"/restore-*; do
        [[ -f "$d/postmaster.pid" ]] && as_pg "$pgbin/pg_ctl" -D "$d" -m immediate stop > /dev/null 2>&1 || true
    done
    [[ -n "${proxy:-}" ]] && kill "$proxy" 2> /dev/null || true
    bash scripts/garage-cluster.sh stop "$work/garage" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bash scripts/garage-cluster.sh start "$work/garage" 3 > /dev/null
# shellcheck disable=SC1091
source "$work/garage/env"
creds="AWS_ENDPOINT_URL=$GARAGE_ENDPOINT AWS_REGION=$GARAGE_REGION AWS_S3_FORCE_PATH_STYLE=true AWS_ACCESS_KEY_ID=$GARAGE_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$GARAGE_SECRET_KEY"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/cert.pem" \
    -days 1 -subj /CN=127.0.0.1 > /dev/null 2>&1
cat "$work/key.pem" "$work/cert.pem" > "$work/proxy.pem"
tls_port=$(free_port)
socat "OPENSSL-LISTEN:$tls_port,bind=127.0.0.1,reuseaddr,fork,cert=$work/proxy.pem,verify=0" \
    "TCP:127.0.0.1:${GARAGE_ENDPOINT##*:}" &
proxy=$!

echo "== zenith WAL benchmark: pgbench scale $scale, $clients clients, $seconds s, 3-node Garage, $(nproc) cores, $(date -u +%FT%TZ)"

# The load, and what archiving made of it. $1: label, $2: psql connection, $3: pg_wal dir.
load() {
    local label=$1 conn=$2 wal=$3
    psql_() { as_pg "$pgbin/psql" -X -qAt -d "$conn" -c "$1"; }
    local lsn0 arch0 t0 tps lsn1 arch1 t1 backlog drain_start
    lsn0=$(psql_ "select pg_current_wal_lsn()")
    arch0=$(psql_ "select archived_count from pg_stat_archiver")
    t0=$(now)
    tps=$(as_pg "$pgbin/pgbench" -n -c "$clients" -j 2 -T "$seconds" -d "$conn" 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    t1=$(now)
    lsn1=$(psql_ "select pg_current_wal_lsn()")
    arch1=$(psql_ "select archived_count from pg_stat_archiver")
    backlog=$(find "$wal/archive_status" -name '*.ready' | wc -l)
    local written
    written=$(psql_ "select round(pg_wal_lsn_diff('$lsn1', '$lsn0') / 1048576)")
    # Drain: everything written so far archived.
    local last
    last=$(psql_ "select pg_walfile_name(pg_switch_wal())")
    drain_start=$(now)
    until [[ "$(psql_ "select coalesce(last_archived_wal, '') >= '$last' from pg_stat_archiver")" == t ]]; do
        sleep 0.1
    done
    local drained failed
    drained=$(secs "$drain_start" "$(now)")
    failed=$(psql_ "select failed_count from pg_stat_archiver")
    local rate
    rate=$(python3 -c "print(f'{($arch1 - $arch0) / ($t1 - $t0):.2f}')")
    printf "  %-34s %8s tps %7s MiB WAL %6s seg/s archived %4s ready at end, drained in %5s s (%s failed attempts)\n" \
        "$label" "$tps" "$written" "$rate" "$backlog" "$drained" "$failed"
}

# A burst of WAL much faster than pgbench's (a bulk insert), and how long archiving takes
# to catch up with it: archive throughput, not the load's pace. $1: label, $2: connection.
burst() {
    local label=$1 conn=$2
    psql_() { as_pg "$pgbin/psql" -X -qAt -d "$conn" -c "$1"; }
    local lsn0 t0 t1 t2 last mib
    psql_ "create table if not exists burst (i int, pad text)" 2> /dev/null
    lsn0=$(psql_ "select pg_current_wal_lsn()")
    t0=$(now)
    psql_ "insert into burst select g, repeat('x', 200) from generate_series(1, 1500000) g"
    t1=$(now)
    last=$(psql_ "select pg_walfile_name(pg_switch_wal())")
    until [[ "$(psql_ "select coalesce(last_archived_wal, '') >= '$last' from pg_stat_archiver")" == t ]]; do
        sleep 0.05
    done
    t2=$(now)
    mib=$(psql_ "select round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0') / 1048576)")
    printf "  %-34s %6s MiB WAL written in %5s s, all archived after %5s s: %6s seg/s, %5s s behind the insert\n" \
        "$label" "$mib" "$(secs "$t0" "$t1")" "$(secs "$t0" "$t2")" \
        "$(python3 -c "print(f'{$mib / 16 / ($t2 - $t0):.1f}')")" "$(secs "$t1" "$t2")"
}

# A stock cluster archiving with pgBackRest; $1: name, $2: async (y/n).
pgbackrest_cluster() {
    local name=$1 async=$2
    local dir="$work/pg-$name" port
    port=$(free_port)
    mkdir -p "$dir" && chown postgres "$dir"
    as_pg "$pgbin/initdb" --data-checksums -A trust -U postgres -D "$dir/data" > /dev/null
    cat > "$dir/pgbackrest.conf" <<CONF
[global]
repo1-type=s3
repo1-path=/pgbackrest-$name
repo1-s3-bucket=$GARAGE_BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$tls_port
repo1-storage-verify-tls=n
repo1-s3-region=$GARAGE_REGION
repo1-s3-key=$GARAGE_ACCESS_KEY
repo1-s3-key-secret=$GARAGE_SECRET_KEY
repo1-s3-uri-style=path
compress-type=zst
compress-level=1
process-max=2
start-fast=y
archive-async=$async
spool-path=$dir/spool
log-level-console=warn
log-level-file=off

[bench]
pg1-path=$dir/data
pg1-socket-path=$dir
pg1-port=$port
pg1-user=postgres
CONF
    chown postgres "$dir/pgbackrest.conf"
    cat >> "$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
archive_mode = on
archive_command = 'pgbackrest --config=$dir/pgbackrest.conf --stanza=bench archive-push %p'
archive_timeout = 60
max_wal_size = 4GB
CONF
    as_pg "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start > /dev/null
    as_pg pgbackrest --config="$dir/pgbackrest.conf" --stanza=bench stanza-create > /dev/null
    echo "host=$dir port=$port user=postgres dbname=postgres"
}

# zenith: a repo archiving to Garage.
export ZENITH_REPO_DIR="$work/z"
export ZENITH_PG_PORT=$((40000 + RANDOM % 10000))
export ZENITH_API_PORT=$((ZENITH_PG_PORT + 100))
export AWS_ENDPOINT_URL="$GARAGE_ENDPOINT" AWS_REGION="$GARAGE_REGION" AWS_S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID="$GARAGE_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$GARAGE_SECRET_KEY"
"$zenith" init --storage_dest "s3://$GARAGE_BUCKET/zenith" > /dev/null
sed -i 's/^interval = .*/interval = "0"/' "$ZENITH_REPO_DIR/config.toml"
"$zenith" start > /dev/null
zmain="$ZENITH_REPO_DIR/pgs/main"
zport=$(python3 -c "import json; print(json.load(open('$zmain/node.json'))['port'])")
zconn="host=$zmain port=$zport user=postgres dbname=postgres"
as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$zconn" > /dev/null 2>&1
"$zenith" snapshot create main@before > /dev/null

sync_conn=$(pgbackrest_cluster sync n)
as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$sync_conn" > /dev/null 2>&1
as_pg pgbackrest --config="$work/pg-sync/pgbackrest.conf" --stanza=bench --type=full backup > /dev/null
async_conn=$(pgbackrest_cluster async y)
as_pg "$pgbin/pgbench" -i -q -s "$scale" -d "$async_conn" > /dev/null 2>&1

echo
echo "archiving under load"
mid_file="$work/mid"
( sleep $((seconds / 2)); date -u +"%Y-%m-%d %H:%M:%S.%N+00" | sed 's/\.\([0-9]\{6\}\)[0-9]*/.\1/' > "$mid_file" ) &
load "zenith wal-push (4 in flight)" "$zconn" "$zmain/data/pg_wal"
z_mid=$(cat "$mid_file")
( sleep $((seconds / 2)); date -u +"%Y-%m-%d %H:%M:%S.%N+00" | sed 's/\.\([0-9]\{6\}\)[0-9]*/.\1/' > "$mid_file" ) &
load "pgBackRest archive-push" "$sync_conn" "$work/pg-sync/data/pg_wal"
b_mid=$(cat "$mid_file")
load "pgBackRest archive-push, async" "$async_conn" "$work/pg-async/data/pg_wal"

echo
echo "archiving a burst of WAL (a bulk insert of 1.5 million 200-byte rows)"
burst "zenith wal-push (4 in flight)" "$zconn"
burst "pgBackRest archive-push" "$sync_conn"
burst "pgBackRest archive-push, async" "$async_conn"
# The same without the safekeeper's streaming beside archive_command.
sed -i 's/^mode = .*/mode = "off"/' "$ZENITH_REPO_DIR/config.toml"
"$zenith" stop > /dev/null && "$zenith" start > /dev/null
zport=$(python3 -c "import json; print(json.load(open('$zmain/node.json'))['port'])")
zconn="host=$zmain port=$zport user=postgres dbname=postgres"
burst "zenith wal-push, safekeeper off" "$zconn"

echo
echo "restore to a point in the middle of the load (restore, then replay until writable)"
t0=$(now)
"$zenith" pg create pitr --at "$z_mid" > /dev/null
z_restore=$(secs "$t0" "$(now)")
printf "  %-52s %8s s\n" "zenith pg create --at" "$z_restore"
as_pg "$pgbin/pg_ctl" -D "$work/pg-sync/data" -m fast -w stop > /dev/null
rdir="$work/restore-pgbr"
mkdir -p "$rdir" && chown postgres "$rdir" && chmod 700 "$rdir"
rport=$(free_port)
t0=$(now)
as_pg pgbackrest --config="$work/pg-sync/pgbackrest.conf" --stanza=bench --pg1-path="$rdir" \
    --type=time "--target=$b_mid" --target-action=promote restore > /dev/null
as_pg "$pgbin/pg_ctl" -D "$rdir" -l "$work/pg-sync/restore.log" -o "-p $rport -k $rdir -c archive_mode=off" -w start > /dev/null
until [[ "$(as_pg "$pgbin/psql" -X -qAt -h "$rdir" -p "$rport" -U postgres -d postgres -c 'select not pg_is_in_recovery()' 2>/dev/null)" == t ]]; do
    sleep 0.1
done
b_restore=$(secs "$t0" "$(now)")
printf "  %-52s %8s s\n" "pgBackRest restore --type=time, then replay" "$b_restore"
echo "  zenith / pgBackRest: $(ratio "$z_restore" "$b_restore")×"
