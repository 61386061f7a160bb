#!/usr/bin/env bash
# Snapshot benchmark, one run, side by side (a benchmark, not a test):
#   full:        zenith (zenith format; online, and from the stopped directory)
#                vs pgBackRest full (zst level 1, process-max 2)
#                vs pg_basebackup -Ft -Xs --compress=server-zstd:1 vs tar | zstd -1 -T0
#   incremental: after pgbench -c 2 -j 2 -t 10000: zenith vs pgBackRest incr (time, bytes added)
#   restore:     zenith import vs pgBackRest restore
# Database: pgbench scale $BENCH_SCALE (100: ~1.6 GB of relations) plus $BENCH_RANDOM_MB MB of
# random bytes, on this machine's disk, repositories on file://. Prints time, bytes written,
# peak RSS and ratios; pgBackRest's bytes are its backup/ directory (its WAL archive, which
# it also needs, is printed apart). Installs pgBackRest from the distribution's packages when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-100}
random_mb=${BENCH_RANDOM_MB:-300}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
pgbin=$(bash vendor/postgres/install.sh)
command -v pgbackrest > /dev/null || { apt-get install -y -qq pgbackrest > /dev/null; }

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench-snapshot.XXXXXX")
chmod 755 "$work"
chown postgres "$work"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data="$work/data"
stop_all() { as_pg "$pgbin/pg_ctl" -D "$data" -m immediate stop > /dev/null 2>&1 || true; }
trap 'stop_all; rm -rf "$work"' EXIT

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
size_of() { du -sb "$1" 2>/dev/null | cut -f1; }
mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1048576:.1f}')" "$1"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
peak() { awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$1"; }
row() { printf "  %-44s %8s s %10s MiB written %7s MiB peak RSS\n" "$1" "$2" "$3" "$4"; }
psql_() { as_pg "$pgbin/psql" -X -q -At -h "$work" -p "$port" -U postgres -d postgres -c "$1"; }

echo "== zenith snapshot benchmark: pgbench scale $scale + ${random_mb} MB random, $(nproc) cores, $(date -u +%FT%TZ)"
as_pg "$pgbin/initdb" --data-checksums -A trust -U postgres -D "$data" > /dev/null
cat >> "$data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
archive_mode = on
archive_command = 'pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
cat > "$work/pgbackrest.conf" <<CONF
[global]
repo1-path=$work/pgbackrest
compress-type=zst
compress-level=1
process-max=2
repo1-retention-full=2
start-fast=y
log-level-console=warn
log-path=$work

[bench]
pg1-path=$data
pg1-port=$port
pg1-socket-path=$work
pg1-user=postgres
CONF
chown postgres "$work/pgbackrest.conf"
mkdir -p "$work/pgbackrest"; chown postgres "$work/pgbackrest"
as_pg "$pgbin/pg_ctl" -D "$data" -l "$work/pg.log" -w start > /dev/null
t0=$(now)
as_pg "$pgbin/pgbench" -i -q -s "$scale" -h "$work" -p "$port" -U postgres postgres > /dev/null 2>&1
psql_ "create extension pgcrypto; create table random_bytes (id int primary key, payload bytea);
       insert into random_bytes select i, gen_random_bytes(1024) from generate_series(1, $((random_mb * 1024))) i;"
# Settle the database first (hint bits, visibility map, frozen tuples), as any database that
# has been running for a while is; otherwise the first autovacuum rewrites every new page and
# the "incremental" measures autovacuum, not pgbench.
psql_ "vacuum (freeze, analyze)"
psql_ "checkpoint"
echo "  database built in $(secs "$t0" "$(now)") s: $(mib "$(size_of "$data/base")") MiB in base/"
pgbr=(setpriv --reuid=postgres --regid=postgres --init-groups pgbackrest --config="$work/pgbackrest.conf" --stanza=bench)
"${pgbr[@]}" stanza-create > /dev/null
connstr="postgresql://postgres@127.0.0.1:$port/postgres"
export ZENITH_STAGING_DIR="$work"

echo
echo "full"
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.z" "$zenith" export --snapshot_path "file://$work/zenith" --connstr "$connstr" > /dev/null
z_full=$(secs "$t0" "$(now)"); z_full_bytes=$(size_of "$work/zenith"); row "zenith export --connstr (online)" "$z_full" "$(mib "$z_full_bytes")" "$(peak "$work/t.z")"
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.b" "${pgbr[@]}" --type=full backup
b_full=$(secs "$t0" "$(now)"); b_full_bytes=$(size_of "$work/pgbackrest/backup"); row "pgBackRest full (backup/ only)" "$b_full" "$(mib "$b_full_bytes")" "$(peak "$work/t.b")"
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.p" "$pgbin/pg_basebackup" -d "$connstr" -D "$work/basebackup" -Ft -Xs --compress=server-zstd:1 -c fast --no-sync
p_full=$(secs "$t0" "$(now)"); row "pg_basebackup -Ft -Xs server-zstd:1" "$p_full" "$(mib "$(size_of "$work/basebackup")")" "$(peak "$work/t.p")"
rm -rf "$work/basebackup"
sync; t0=$(now)
# GNU tar exits 1 when a file changed while it read it (the database is live): a warning
# for this comparison, not a failure of the benchmark.
{ tar -C "$data" --warning=no-file-changed --warning=no-file-removed -cf - . || [ $? -eq 1 ]; } | zstd -1 -T0 -q > "$work/tar.zst"
t_full=$(secs "$t0" "$(now)"); row "tar | zstd -1 -T0 (not consistent)" "$t_full" "$(mib "$(size_of "$work/tar.zst")")" "-"
rm -f "$work/tar.zst"
echo "  zenith online / pg_basebackup: $(ratio "$z_full" "$p_full")×; zenith / pgBackRest: $(ratio "$z_full" "$b_full")×"

echo
echo "incremental after pgbench -c 2 -j 2 -t 10000"
as_pg "$pgbin/pgbench" -n -c 2 -j 2 -t 10000 -h "$work" -p "$port" -U postgres postgres > /dev/null 2>&1
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.z2" "$zenith" export --snapshot_path "file://$work/zenith" --connstr "$connstr" > /dev/null
z_incr=$(secs "$t0" "$(now)"); z_incr_bytes=$(( $(size_of "$work/zenith") - z_full_bytes ))
row "zenith export --connstr (online)" "$z_incr" "$(mib "$z_incr_bytes")" "$(peak "$work/t.z2")"
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.b2" "${pgbr[@]}" --type=incr backup
b_incr=$(secs "$t0" "$(now)"); b_incr_bytes=$(( $(size_of "$work/pgbackrest/backup") - b_full_bytes ))
row "pgBackRest incr (backup/ only)" "$b_incr" "$(mib "$b_incr_bytes")" "$(peak "$work/t.b2")"
echo "  (pgBackRest's WAL archive, not counted above: $(mib "$(size_of "$work/pgbackrest/archive")") MiB)"
echo "  zenith / pgBackRest: time $(ratio "$z_incr" "$b_incr")×, bytes $(ratio "$z_incr_bytes" "$b_incr_bytes")×"

echo
echo "full, from the stopped data directory"
as_pg "$pgbin/pg_ctl" -D "$data" -m fast -w stop > /dev/null
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.z3" "$zenith" export --snapshot_path "file://$work/zenith-stopped" --pgdata "$data" > /dev/null
row "zenith export --pgdata" "$(secs "$t0" "$(now)")" "$(mib "$(size_of "$work/zenith-stopped")")" "$(peak "$work/t.z3")"
rm -rf "$work/zenith-stopped"

echo
echo "restore of the incremental"
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.z4" "$zenith" import --snapshot_path "file://$work/zenith" --pgdata "$work/restore-zenith" > /dev/null
z_rest=$(secs "$t0" "$(now)"); row "zenith import" "$z_rest" "$(mib "$(size_of "$work/restore-zenith")")" "$(peak "$work/t.z4")"
rm -rf "$work/restore-zenith"
mkdir -p "$work/restore-pgbr"; chown postgres "$work/restore-pgbr"; chmod 700 "$work/restore-pgbr"
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.b4" "${pgbr[@]}" --pg1-path="$work/restore-pgbr" restore
b_rest=$(secs "$t0" "$(now)"); row "pgBackRest restore" "$b_rest" "$(mib "$(size_of "$work/restore-pgbr")")" "$(peak "$work/t.b4")"
echo "  zenith / pgBackRest: $(ratio "$z_rest" "$b_rest")×"
