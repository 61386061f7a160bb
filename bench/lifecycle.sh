#!/usr/bin/env bash
# Lifecycle benchmark, one run (a benchmark, not a test): on a zenith repo whose main pg
# holds pgbench scale $BENCH_SCALE (100: ~1.6 GB of relations), times
#   zenith snapshot create (online), zenith pg create --snapshot, zenith pg checkout
# beside cp -a of the same data directory (the floor for materializing a copy) and beside
# pgBackRest on the same server: full backup, restore into a new directory, and
# restore --delta over a copy that pgbench changed (its rollback).
# BENCH_CLONES=1: the same commands on a loop-mounted XFS with reflink=1 (needs root), where
# zenith's snapshots, new pgs and checkouts are thin clones, beside cp -a (a full copy and
# cp's own reflink copy), and the disk ten branches of one snapshot add.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-100}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
pgbin=$(bash vendor/postgres/install.sh)
command -v pgbackrest > /dev/null || { apt-get install -y -qq pgbackrest > /dev/null; }

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench-lifecycle.XXXXXX")
chmod 755 "$work"

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.3f}')" "$1" "$2"; }
row() { printf "  %-60s %8s s\n" "$1" "$2"; }

if [[ ${BENCH_CLONES:-} == 1 ]]; then
    # Clone mode: the repo on a loop-mounted XFS with reflink=1 (needs root), zenith's thin
    # clones beside cp -a of the same data directory on the same filesystem, as a full
    # copy (--reflink=never) and as cp's own clone (coreutils 9 reflinks by default).
    xfs="$work/xfs"
    bash scripts/xfs.sh "$xfs" "${BENCH_XFS_SIZE:-48G}"
    export ZENITH_REPO_DIR="$xfs/repo"
    export ZENITH_PG_PORT=$((40000 + RANDOM % 10000))
    export ZENITH_API_PORT=$((ZENITH_PG_PORT + 100))
    trap '"$zenith" stop --immediate > /dev/null 2>&1 || true; bash scripts/xfs.sh --unmount "$xfs"; rm -rf "$work"' EXIT
    used() { df --output=used -B1 "$xfs" | tail -1; }
    mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 2**20:.0f}')" "$1"; }
    echo "== zenith lifecycle benchmark, clone mode: pgbench scale $scale, $(nproc) cores, $(date -u +%FT%TZ)"
    "$zenith" init > /dev/null
    connstr=$("$zenith" start | sed -n 's/^pg main: //p')
    "$zenith" status | grep '^snapshots:' | sed 's/^/  /'
    main="$ZENITH_REPO_DIR/pgs/main"
    t0=$(now)
    "$pgbin/pgbench" -i -q -s "$scale" "$connstr" > /dev/null 2>&1
    "$pgbin/psql" -X -q "$connstr" -c "vacuum (freeze, analyze)" -c checkpoint
    data_bytes=$(du -sb "$main/data" | cut -f1)
    echo "  database built in $(secs "$t0" "$(now)") s: $(mib "$data_bytes") MiB"
    # Some writes since the checkpoint, as in real use: the snapshot's own checkpoint
    # (pg_backup_start) has them to write.
    "$pgbin/pgbench" -n -c 2 -j 2 -t 500 "$connstr" > /dev/null 2>&1

    echo
    sync; t0=$(now)
    "$zenith" --no-progress snapshot create main@bench > /dev/null
    snap=$(secs "$t0" "$(now)"); row "zenith snapshot create main@bench (online)" "$snap"
    sync; t0=$(now)
    "$zenith" --no-progress pg create copy --snapshot main@bench --no-start > /dev/null
    create=$(secs "$t0" "$(now)"); row "zenith pg create copy --snapshot main@bench" "$create"
    "$pgbin/pgbench" -n -c 2 -j 2 -t 2000 "$connstr" > /dev/null 2>&1
    sync; t0=$(now)
    "$zenith" --no-progress pg checkout main main@bench > /dev/null
    checkout=$(secs "$t0" "$(now)"); row "zenith pg checkout main main@bench (after pgbench)" "$checkout"
    sync; t0=$(now)
    "$zenith" --no-progress pg checkout main main@HEAD{0} > /dev/null
    quiet=$(secs "$t0" "$(now)"); row "zenith pg checkout main main@HEAD{0} (back: replays pgbench's WAL)" "$quiet"
    sync; t0=$(now)
    changed=$("$zenith" snapshot diff main@bench main@HEAD{0} --json | python3 -c 'import json, sys; d = json.load(sys.stdin); print(sum(r["pages_changed"] for r in d["relations"]), "pages in", len(d["relations"]), "relations")')
    row "zenith snapshot diff main@bench main@HEAD{0} ($changed)" "$(secs "$t0" "$(now)")"
    sync; t0=$(now)
    "$zenith" snapshot verify main@bench --boot > /dev/null
    row "zenith snapshot verify main@bench --boot (pg_amcheck)" "$(secs "$t0" "$(now)")"

    # Leaving the repo: a clone is packed straight into the destination; a second
    # snapshot's push reuses the block lists of files unchanged since the first.
    sync; t0=$(now)
    "$zenith" --no-progress push main@bench "$work/share" > /dev/null
    push1=$(secs "$t0" "$(now)"); row "zenith push main@bench to file:// (packs the clone)" "$push1"
    "$pgbin/pgbench" -n -c 2 -j 2 -t 500 "$connstr" > /dev/null 2>&1
    "$zenith" --no-progress snapshot create main@later > /dev/null
    sync; t0=$(now)
    sent=$("$zenith" --no-progress push main@later "$work/share" | tail -1)
    push2=$(secs "$t0" "$(now)"); row "zenith push main@later after pgbench -t 500" "$push2"
    echo "    ($sent)"

    # cp -a last: removing its copies leaves the filesystem busy for a while, which
    # would weigh on the zenith commands timed after it.
    sync; t0=$(now)
    cp -a --reflink=never "$main/data" "$xfs/cp-copy"
    sync
    cp_time=$(secs "$t0" "$(now)"); row "cp -a --reflink=never of the data directory (+ sync)" "$cp_time"
    rm -rf "$xfs/cp-copy"
    sync; t0=$(now)
    cp -a --reflink=always "$main/data" "$xfs/cp-clone"
    sync
    cp_clone=$(secs "$t0" "$(now)"); row "cp -a --reflink=always of the data directory (+ sync)" "$cp_clone"
    rm -rf "$xfs/cp-clone"
    echo
    sync; before=$(used)
    t0=$(now)
    for i in $(seq 1 10); do
        "$zenith" --no-progress pg create "b$i" --snapshot main@bench --no-start > /dev/null
    done
    ten=$(secs "$t0" "$(now)"); row "ten zenith pg create bN --snapshot main@bench" "$ten"
    sync; created=$(used)
    for i in $(seq 1 10); do "$zenith" pg start "b$i" > /dev/null; done
    "$zenith" stop > /dev/null
    sync; started=$(used)
    echo "  disk used (df) before the ten branches: $(mib "$before") MiB (the database is $(mib "$data_bytes") MiB)"
    echo "  ten branches created: +$(mib $((created - before))) MiB = $(python3 -c "import sys; print(f'{100 * int(sys.argv[1]) / int(sys.argv[2]):.2f}')" $((created - before)) "$before") % of the disk used"
    echo "  ... and each started once (recovery, a checkpoint), then stopped: +$(mib $((started - before))) MiB = $(python3 -c "import sys; print(f'{100 * int(sys.argv[1]) / int(sys.argv[2]):.2f}')" $((started - before)) "$before") %"
    echo
    echo "  snapshot / cp -a full copy: $(ratio "$snap" "$cp_time")×; pg create: $(ratio "$create" "$cp_time")×; checkout: $(ratio "$checkout" "$cp_time")×"
    echo "  (a checkout also keeps the state it leaves as main@HEAD{0}, a clone too)"
    exit 0
fi
export ZENITH_REPO_DIR="$work/repo"
export ZENITH_PG_PORT=$((40000 + RANDOM % 10000))
export ZENITH_API_PORT=$((ZENITH_PG_PORT + 100))
trap '"$zenith" stop --immediate > /dev/null 2>&1 || true; rm -rf "$work"' EXIT
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }


echo "== zenith lifecycle benchmark: pgbench scale $scale, $(nproc) cores, $(date -u +%FT%TZ)"
"$zenith" init > /dev/null
main="$ZENITH_REPO_DIR/pgs/main"
cat > "$work/pgbackrest.conf" <<CONF
[global]
repo1-path=$work/pgbackrest
compress-type=zst
compress-level=1
process-max=2
start-fast=y
repo1-retention-full=2
log-level-console=warn
log-path=$work

[bench]
pg1-path=$main/data
pg1-socket-path=$main
pg1-user=postgres
CONF
mkdir -p "$work/pgbackrest"; chown postgres "$work/pgbackrest" "$work/pgbackrest.conf" "$work"
cat >> "$main/data/postgresql.conf" <<CONF
archive_mode = on
archive_command = 'pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
connstr=$("$zenith" start | sed -n 's/^pg main: //p')
port=$(python3 -c "import sys, urllib.parse as u; print(u.urlparse(sys.argv[1]).port)" "$connstr")
echo "pg1-port=$port" >> "$work/pgbackrest.conf"
pgbr=(as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench)
t0=$(now)
"$pgbin/pgbench" -i -q -s "$scale" "$connstr" > /dev/null 2>&1
"$pgbin/psql" -X -q "$connstr" -c "vacuum (freeze, analyze)" -c checkpoint
echo "  database built in $(secs "$t0" "$(now)") s: $(du -sm "$main/data" | cut -f1) MiB"
"${pgbr[@]}" stanza-create > /dev/null

echo
sync; t0=$(now)
"$zenith" --no-progress snapshot create main@bench > /dev/null
snap=$(secs "$t0" "$(now)"); row "zenith snapshot create main@bench (online)" "$snap"
sync; t0=$(now)
"${pgbr[@]}" --type=full backup
b_full=$(secs "$t0" "$(now)"); row "pgBackRest full backup" "$b_full"

echo
sync; t0=$(now)
"$zenith" --no-progress pg create copy --snapshot main@bench --no-start > /dev/null
create=$(secs "$t0" "$(now)"); row "zenith pg create copy --snapshot main@bench" "$create"
mkdir -m 700 "$work/restore-pgbr"; chown postgres "$work/restore-pgbr"
sync; t0=$(now)
"${pgbr[@]}" --pg1-path="$work/restore-pgbr" restore
b_rest=$(secs "$t0" "$(now)"); row "pgBackRest restore into a new directory" "$b_rest"
rm -rf "$work/restore-pgbr"
sync; t0=$(now)
cp -a "$main/data" "$work/cp-copy"
cp_time=$(secs "$t0" "$(now)"); row "cp -a of the data directory" "$cp_time"
rm -rf "$work/cp-copy"

echo
"$pgbin/pgbench" -n -c 2 -j 2 -t 2000 "$connstr" > /dev/null 2>&1
sync; t0=$(now)
"$zenith" --no-progress pg checkout main main@bench > /dev/null
checkout=$(secs "$t0" "$(now)"); row "zenith pg checkout main main@bench (after pgbench)" "$checkout"
sync; t0=$(now)
changed=$("$zenith" snapshot diff main@bench main@HEAD{0} --json | python3 -c 'import json, sys; d = json.load(sys.stdin); print(sum(r["pages_changed"] for r in d["relations"]), "pages in", len(d["relations"]), "relations")')
row "zenith snapshot diff main@bench main@HEAD{0} ($changed)" "$(secs "$t0" "$(now)")"
# pgBackRest's rollback: restore --delta over the copy, after the same pgbench ran on it.
"$zenith" pg start copy > /dev/null
copy_connstr=$("$zenith" pg show copy --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["connstr"])')
"$pgbin/pgbench" -n -c 2 -j 2 -t 2000 "$copy_connstr" > /dev/null 2>&1
"$zenith" pg stop copy > /dev/null
sync; t0=$(now)
"${pgbr[@]}" --pg1-path="$ZENITH_REPO_DIR/pgs/copy/data" --delta restore
b_delta=$(secs "$t0" "$(now)"); row "pgBackRest restore --delta (after pgbench)" "$b_delta"

local_pid=$(cat "$ZENITH_REPO_DIR/zenith-local.pid")
echo
echo "  zenith-local peak RSS over the run: $(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$local_pid/status") MiB"
echo "  pg create / cp -a: $(ratio "$create" "$cp_time")×; checkout / cp -a: $(ratio "$checkout" "$cp_time")×"
echo "  snapshot / pgBackRest full: $(ratio "$snap" "$b_full")×; pg create / pgBackRest restore: $(ratio "$create" "$b_rest")×; checkout / pgBackRest delta restore: $(ratio "$checkout" "$b_delta")×"
echo "  (a checkout also snapshots the state it leaves, main@HEAD{0}, before restoring)"
