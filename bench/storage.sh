#!/usr/bin/env bash
# Storage-layer throughput, measured side by side in one run (a benchmark, not a test).
#
#   bash bench/storage.sh            # 1 GiB (BENCH_SIZE=256MiB for a quick run)
#
# file://  zenith's streamed put / streamed get (every write fsynced and renamed into place,
#          every byte read compared with what was written) beside `cp` of the same amount of
#          data on the same disk.
# s3://    the same through zenith against a 3-node Garage cluster on 127.0.0.1 (replication
#          factor 3), beside a single-stream PUT / GET of the same size with curl.
# zenith's figures come from `zenith storage check --file F --json` (the same file cp and curl
# copy); peak RSS from GNU time. Each figure is the median of BENCH_ROUNDS (3) rounds.
# Goals: file ≥ 90% of cp; S3 ≥ 2× the single-stream put.
set -euo pipefail
cd "$(dirname "$0")/.."

size_h=${BENCH_SIZE:-1GiB}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
tools=$(bash scripts/tools.sh)
export GARAGE_BIN="$tools/garage"
export AWS_EC2_METADATA_DISABLED=true
bytes=$("$zenith" --version > /dev/null; python3 - "$size_h" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)\s*([KMGT]?)i?B?", sys.argv[1].strip(), re.I)
print(int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
PY
)
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

now() { date +%s.%N; }
rate() { python3 -c "import sys; print(f'{int(sys.argv[1])/1048576/float(sys.argv[2]):.1f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
jget() { python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))[sys.argv[2]], 1))" "$1" "$2"; }
peak_mib() { awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$1"; }

rounds=${BENCH_ROUNDS:-3}
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.1f}')" "$@"; }
secs() { echo "$2 - $1" | bc; }

echo "== zenith storage benchmark: $size_h, median of $rounds rounds, $(nproc) cores, $(date -u +%FT%TZ)"
head -c "$bytes" /dev/urandom > "$work/source"

# --- file:// ---------------------------------------------------------------------------
# zenith fsyncs what it writes, so the fair baseline is cp followed by a sync of the copy;
# plain cp (which may leave the data in the page cache) is shown too.
cp_put=(); cp_sync_put=(); z_put=(); z_get=(); cp_get=()
for _ in $(seq "$rounds"); do
    mkdir -p "$work/cp-dest"
    sync; t0=$(now); cp "$work/source" "$work/cp-dest/copy"; t1=$(now); sync "$work/cp-dest/copy"; t2=$(now)
    cp_put+=("$(rate "$bytes" "$(secs "$t0" "$t1")")"); cp_sync_put+=("$(rate "$bytes" "$(secs "$t0" "$t2")")")
    sync; t0=$(now); cp "$work/cp-dest/copy" "$work/cp-dest/back"; sync "$work/cp-dest/back"; t1=$(now)
    cp_get+=("$(rate "$bytes" "$(secs "$t0" "$t1")")")
    rm -rf "$work/cp-dest"
    sync
    /usr/bin/time -v -o "$work/file.time" "$zenith" storage check --json --file "$work/source" "file://$work/file-dest" > "$work/file.json"
    z_put+=("$(jget "$work/file.json" upload_mib_per_sec)"); z_get+=("$(jget "$work/file.json" download_mib_per_sec)")
done
cp_rate=$(median "${cp_put[@]}"); cp_sync_rate=$(median "${cp_sync_put[@]}"); cp_get_rate=$(median "${cp_get[@]}")
z_up=$(median "${z_put[@]}"); z_down=$(median "${z_get[@]}")
echo
echo "file:// (same disk; rounds: cp+sync ${cp_sync_put[*]} | zenith put ${z_put[*]} | zenith get ${z_get[*]})"
printf "  %-48s %8s MiB/s\n" "cp (no fsync)" "$cp_rate" \
    "cp + sync of the copy" "$cp_sync_rate" \
    "zenith put_file (fsync, atomic rename)" "$z_up" \
    "cp back out + sync" "$cp_get_rate" \
    "zenith get_to_file (fsync, atomic rename)" "$z_down"
echo "  put: $(ratio "$z_up" "$cp_sync_rate")× cp+sync, $(ratio "$z_up" "$cp_rate")× plain cp; get: $(ratio "$z_down" "$cp_get_rate")× cp+sync; zenith peak RSS $(peak_mib "$work/file.time") MiB"

# --- s3:// on Garage ---------------------------------------------------------------------
# Garage's data lives in memory (/dev/shm) when it can: three replicas on one disk would
# measure this machine's disk three times over, not the client.
garage_dir="$work/garage"
if [[ -z "${BENCH_GARAGE_DIR:-}" && -d /dev/shm && -w /dev/shm ]]; then
    garage_dir=$(mktemp -d /dev/shm/zenith-bench-garage.XXXXXX)
fi
trap 'bash scripts/garage-cluster.sh stop "$garage_dir" 2>/dev/null || true; rm -rf "$work" "$garage_dir"' EXIT
bash scripts/garage-cluster.sh start "$garage_dir" 3
# shellcheck disable=SC1091
source "$garage_dir/env"
export AWS_ENDPOINT_URL="$GARAGE_ENDPOINT" AWS_REGION="$GARAGE_REGION" \
    AWS_ACCESS_KEY_ID="$GARAGE_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$GARAGE_SECRET_KEY"
curl_s3() {
    curl -sS -f --aws-sigv4 "aws:amz:$GARAGE_REGION:s3" --user "$GARAGE_ACCESS_KEY:$GARAGE_SECRET_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}
c_put=(); c_get=(); s_put=(); s_get=()
for _ in $(seq "$rounds"); do
    t0=$(now); curl_s3 -T "$work/source" "$GARAGE_ENDPOINT/$GARAGE_BUCKET/bench/single" -o /dev/null; t1=$(now)
    c_put+=("$(rate "$bytes" "$(secs "$t0" "$t1")")")
    t0=$(now); curl_s3 -o "$work/single.back" "$GARAGE_ENDPOINT/$GARAGE_BUCKET/bench/single"; t1=$(now)
    c_get+=("$(rate "$bytes" "$(secs "$t0" "$t1")")")
    curl_s3 -X DELETE "$GARAGE_ENDPOINT/$GARAGE_BUCKET/bench/single" -o /dev/null; rm -f "$work/single.back"
    /usr/bin/time -v -o "$work/s3.time" "$zenith" storage check --json --file "$work/source" "s3://$GARAGE_BUCKET/bench" > "$work/s3.json"
    s_put+=("$(jget "$work/s3.json" upload_mib_per_sec)"); s_get+=("$(jget "$work/s3.json" download_mib_per_sec)")
done
single_put=$(median "${c_put[@]}"); single_get=$(median "${c_get[@]}"); s_up=$(median "${s_put[@]}"); s_down=$(median "${s_get[@]}")
part=${ZENITH_S3_PART_SIZE:-16MiB}; up_c=${ZENITH_S3_UPLOAD_CONCURRENCY:-4}; down_c=${ZENITH_S3_DOWNLOAD_CONCURRENCY:-4}
echo
echo "s3:// on a 3-node Garage cluster, replication factor 3, loopback, data in $(dirname "$garage_dir")"
echo "  (rounds: curl put ${c_put[*]} | zenith put ${s_put[*]} | curl get ${c_get[*]} | zenith get ${s_get[*]})"
printf "  %-48s %8s MiB/s\n" "single-stream PUT of the file (curl -T)" "$single_put" \
    "zenith put_file ($up_c × $part parts in flight)" "$s_up" \
    "single-stream GET to a file (curl -o)" "$single_get" \
    "zenith get_to_file ($down_c ranged GETs in flight)" "$s_down"
echo "  put: $(ratio "$s_up" "$single_put")× single stream; get: $(ratio "$s_down" "$single_get")× single stream; zenith peak RSS $(peak_mib "$work/s3.time") MiB"
