#!/usr/bin/env bash
# Lifecycle benchmark, one run (a benchmark, not a test): on a zenith repo whose main pg
# holds pgbench scale $BENCH_SCALE (100: ~1.6 GB of relations), times
#   zenith snapshot create (online), zenith pg create --snapshot, zenith pg checkout
# beside cp -a of the same data directory (the floor for materializing a copy).
# pgBackRest's backup and restore of a database this size are in bench/snapshot.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-100}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
pgbin=$(bash vendor/postgres/install.sh)

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench-lifecycle.XXXXXX")
chmod 755 "$work"
export ZENITH_REPO_DIR="$work/repo"
export ZENITH_PG_PORT=$((40000 + RANDOM % 10000))
export ZENITH_API_PORT=$((ZENITH_PG_PORT + 100))
trap '"$zenith" stop --immediate > /dev/null 2>&1 || true; rm -rf "$work"' EXIT

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
peak() { awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$1"; }
row() { printf "  %-44s %8s s %7s MiB peak RSS\n" "$1" "$2" "$3"; }

echo "== zenith lifecycle benchmark: pgbench scale $scale, $(nproc) cores, $(date -u +%FT%TZ)"
connstr=$("$zenith" start | sed -n 's/^pg main: //p')
t0=$(now)
"$pgbin/pgbench" -i -q -s "$scale" "$connstr" > /dev/null 2>&1
"$pgbin/psql" -X -q "$connstr" -c "vacuum (freeze, analyze)" -c checkpoint
echo "  database built in $(secs "$t0" "$(now)") s: $(du -sm "$ZENITH_REPO_DIR/pgs/main/data" | cut -f1) MiB"

sync; t0=$(now)
/usr/bin/time -v -o "$work/t.s" "$zenith" --no-progress snapshot create main@bench > /dev/null
snap=$(secs "$t0" "$(now)"); row "zenith snapshot create main@bench (online)" "$snap" "$(peak "$work/t.s")"

sync; t0=$(now)
/usr/bin/time -v -o "$work/t.c" "$zenith" --no-progress pg create copy --snapshot main@bench --no-start > /dev/null
create=$(secs "$t0" "$(now)"); row "zenith pg create copy --snapshot main@bench" "$create" "$(peak "$work/t.c")"

"$pgbin/pgbench" -n -c 2 -j 2 -t 2000 "$connstr" > /dev/null 2>&1
sync; t0=$(now)
/usr/bin/time -v -o "$work/t.k" "$zenith" --no-progress pg checkout main main@bench > /dev/null
checkout=$(secs "$t0" "$(now)"); row "zenith pg checkout main main@bench" "$checkout" "$(peak "$work/t.k")"

sync; t0=$(now)
cp -a "$ZENITH_REPO_DIR/pgs/main/data" "$work/cp-copy"
cp_time=$(secs "$t0" "$(now)"); row "cp -a of the data directory" "$cp_time" "-"
rm -rf "$work/cp-copy"

echo "  pg create / cp -a: $(ratio "$create" "$cp_time")×; checkout / cp -a: $(ratio "$checkout" "$cp_time")×"
echo "  (a checkout also snapshots the state it leaves, main@HEAD{0}, before restoring)"
