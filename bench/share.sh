#!/usr/bin/env bash
# Sharing benchmark, one run (a benchmark, not a test): a zenith repo whose main pg holds
# pgbench scale $BENCH_SCALE (100: ~1.6 GB of relations), pushed to a 3-node Garage
# cluster on loopback (replication factor 3): full push, incremental push after
# pgbench -t 10000, and pull into an empty repo (then pg create from it), beside
# pgBackRest's full and incremental backup to the same Garage (its S3 repo type) and its
# restore from there.
#
# BENCH_ENCRYPT=1 runs both encrypted: zenith pushes to a storage made with `zenith
# storage encrypt` (XChaCha20-Poly1305), pgBackRest with repo1-cipher-type=aes-256-cbc.
#
# pgBackRest speaks S3 over TLS only, so it reaches Garage through a local TLS proxy
# (socat, self-signed certificate); zenith talks to Garage directly. The proxy costs
# pgBackRest some CPU on this machine: its figures are a little pessimistic.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${BENCH_SCALE:-100}
encrypt=${BENCH_ENCRYPT:-0}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
cargo build --release --quiet
zenith="$CARGO_TARGET_DIR/release/zenith"
pgbin=$(bash vendor/postgres/install.sh)
command -v pgbackrest > /dev/null || apt-get install -y -qq pgbackrest > /dev/null
command -v socat > /dev/null || apt-get install -y -qq socat > /dev/null
tools=$(bash scripts/tools.sh)
export GARAGE_BIN="$tools/garage"

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/zenith-bench-share.XXXXXX")
chmod 755 "$work"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
cleanup() {
    ZENITH_REPO_DIR="$work/a" "$zenith" stop --immediate > /dev/null 2>&1 || true
    ZENITH_REPO_DIR="$work/b" "$zenith" stop --immediate > /dev/null 2>&1 || true
    [[ -n "${proxy:-}" ]] && kill "$proxy" 2> /dev/null || true
    bash scripts/garage-cluster.sh stop "$work/garage" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1048576:.1f}')" "$1"; }
row() { printf "  %-52s %8s s %12s\n" "$1" "$2" "$3"; }

bash scripts/garage-cluster.sh start "$work/garage" 3 > /dev/null
# shellcheck disable=SC1091
source "$work/garage/env"
export AWS_ENDPOINT_URL="$GARAGE_ENDPOINT" AWS_REGION="$GARAGE_REGION" AWS_S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID="$GARAGE_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$GARAGE_SECRET_KEY"
dest="s3://$GARAGE_BUCKET/zenith"
mode="plain"
if [[ $encrypt == 1 ]]; then
    mode="both encrypted"
    ZENITH_PASSPHRASE="bench-$(od -An -tx8 -N16 /dev/urandom | tr -d ' \n')"
    export ZENITH_PASSPHRASE
    "$zenith" storage encrypt "$dest" > /dev/null
fi

# The TLS proxy for pgBackRest.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/cert.pem" \
    -days 1 -subj /CN=127.0.0.1 > /dev/null 2>&1
cat "$work/key.pem" "$work/cert.pem" > "$work/proxy.pem"
tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
socat "OPENSSL-LISTEN:$tls_port,bind=127.0.0.1,reuseaddr,fork,cert=$work/proxy.pem,verify=0" \
    "TCP:127.0.0.1:${GARAGE_ENDPOINT##*:}" &
proxy=$!

export ZENITH_REPO_DIR="$work/a"
export ZENITH_PG_PORT=$((40000 + RANDOM % 10000))
export ZENITH_API_PORT=$((ZENITH_PG_PORT + 100))
"$zenith" init > /dev/null
main="$ZENITH_REPO_DIR/pgs/main"
cat > "$work/pgbackrest.conf" <<CONF
[global]
repo1-type=s3
repo1-path=/pgbackrest
repo1-s3-bucket=$GARAGE_BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$tls_port
repo1-storage-verify-tls=n
repo1-s3-region=$GARAGE_REGION
repo1-s3-key=$GARAGE_ACCESS_KEY
repo1-s3-key-secret=$GARAGE_SECRET_KEY
repo1-s3-uri-style=path
repo1-retention-full=2
compress-type=zst
compress-level=1
process-max=2
start-fast=y
log-level-console=warn
log-level-file=off

$([[ $encrypt == 1 ]] && printf 'repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=%s\n' "$ZENITH_PASSPHRASE")

[bench]
pg1-path=$main/data
pg1-socket-path=$main
pg1-user=postgres
CONF
chown postgres "$work/pgbackrest.conf"
chmod 600 "$work/pgbackrest.conf"
cat >> "$main/data/postgresql.conf" <<CONF
archive_mode = on
archive_command = 'pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
connstr=$("$zenith" start | sed -n 's/^pg main: //p')
port=$(python3 -c "import sys, urllib.parse as u; print(u.urlparse(sys.argv[1]).port)" "$connstr")
echo "pg1-port=$port" >> "$work/pgbackrest.conf"
pgbr=(as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench)
"$zenith" storage attach -n pgbr-backup --path "s3://$GARAGE_BUCKET/pgbackrest/backup" > /dev/null
stored() { "$zenith" storage show -n "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes"])'; }

echo "== zenith sharing benchmark ($mode): pgbench scale $scale, 3-node Garage on loopback, $(nproc) cores, $(date -u +%FT%TZ)"
t0=$(now)
"$pgbin/pgbench" -i -q -s "$scale" "$connstr" > /dev/null 2>&1
"$pgbin/psql" -X -q "$connstr" -c "vacuum (freeze, analyze)" -c checkpoint
echo "  database built in $(secs "$t0" "$(now)") s: $(du -sm "$main/data" | cut -f1) MiB"
"${pgbr[@]}" stanza-create > /dev/null

echo
echo "full"
t0=$(now)
"$zenith" --no-progress snapshot create main@full > /dev/null
z_snap=$(secs "$t0" "$(now)")
t1=$(now)
out=$("$zenith" --no-progress push main@full "$dest")
z_push=$(secs "$t1" "$(now)"); z_full=$(secs "$t0" "$(now)")
row "zenith snapshot create" "$z_snap" ""
row "zenith push (to Garage)" "$z_push" "$(echo "$out" | tail -1 | sed -E 's/.*: (.*) sent.*/\1/')"
row "zenith snapshot + push" "$z_full" ""
t0=$(now)
"${pgbr[@]}" --type=full backup
b_full=$(secs "$t0" "$(now)"); b_full_bytes=$(stored pgbr-backup)
row "pgBackRest full backup (to Garage, backup/ only)" "$b_full" "$(mib "$b_full_bytes") MiB"
echo "  zenith snapshot+push / pgBackRest: $(ratio "$z_full" "$b_full")×"

echo
echo "incremental after pgbench -c 2 -j 2 -t 10000"
"$pgbin/pgbench" -n -c 2 -j 2 -t 10000 "$connstr" > /dev/null 2>&1
t0=$(now)
"$zenith" --no-progress snapshot create main@incr > /dev/null
t1=$(now)
out=$("$zenith" --no-progress push main@incr "$dest")
z_ipush=$(secs "$t1" "$(now)"); z_incr=$(secs "$t0" "$(now)")
z_incr_sent=$(echo "$out" | tail -1 | sed -E 's/.*: (.*) sent.*/\1/')
row "zenith push (to Garage)" "$z_ipush" "$z_incr_sent"
row "zenith snapshot + push" "$z_incr" ""
t0=$(now)
"${pgbr[@]}" --type=incr backup
b_incr=$(secs "$t0" "$(now)"); b_incr_bytes=$(( $(stored pgbr-backup) - b_full_bytes ))
row "pgBackRest incr backup (backup/ only)" "$b_incr" "$(mib "$b_incr_bytes") MiB"
echo "  zenith snapshot+push / pgBackRest: time $(ratio "$z_incr" "$b_incr")×; bytes: zenith $z_incr_sent vs pgBackRest $(mib "$b_incr_bytes") MiB"

echo
echo "pull into an empty repo / restore"
export ZENITH_REPO_DIR="$work/b"
"$zenith" init > /dev/null
t0=$(now)
/usr/bin/time -v -o "$work/t.pull" "$zenith" --no-progress pull "$dest" main@incr > /dev/null
z_pull=$(secs "$t0" "$(now)")
"$zenith" --no-progress pg create copy --snapshot main@incr --no-start > /dev/null
z_pull_create=$(secs "$t0" "$(now)")
row "zenith pull (from Garage)" "$z_pull" ""
row "zenith pull + pg create" "$z_pull_create" ""
mkdir -m 700 "$work/restore-pgbr"; chown postgres "$work/restore-pgbr"
t0=$(now)
"${pgbr[@]}" --pg1-path="$work/restore-pgbr" restore
b_rest=$(secs "$t0" "$(now)")
row "pgBackRest restore (from Garage)" "$b_rest" ""
echo "  zenith pull / pgBackRest restore: $(ratio "$z_pull" "$b_rest")×; pull + pg create / restore: $(ratio "$z_pull_create" "$b_rest")×"
echo "  zenith pull peak RSS: $(awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$work/t.pull") MiB"
