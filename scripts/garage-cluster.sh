#!/usr/bin/env bash
# Starts or stops a Garage cluster on 127.0.0.1 for zenith's tests and benchmarks.
#
#   scripts/garage-cluster.sh start DIR [NODES]   # default 3 nodes, replication factor = NODES
#   scripts/garage-cluster.sh stop DIR
#   scripts/garage-cluster.sh restart DIR N       # start node N again after a kill
#
# `start` writes DIR/env (shell assignments: GARAGE_ENDPOINT, GARAGE_REGION, GARAGE_BUCKET,
# GARAGE_ACCESS_KEY, GARAGE_SECRET_KEY, GARAGE_NODES) and DIR/nodeN/{garage.toml,pid,s3_port}.
# Every node serves S3; ports are picked free. The garage binary is $GARAGE_BIN, else
# `garage` from ~/.cache/zenith/tools/bin or PATH (scripts/tools.sh installs it).
set -euo pipefail

cmd=${1:?usage: garage-cluster.sh start|stop DIR [NODES]}
dir=${2:?usage: garage-cluster.sh start|stop DIR [NODES]}
nodes=${3:-3}

garage_bin() {
    if [[ -n "${GARAGE_BIN:-}" ]]; then echo "$GARAGE_BIN"; return; fi
    if [[ -x "$HOME/.cache/zenith/tools/bin/garage" ]]; then echo "$HOME/.cache/zenith/tools/bin/garage"; return; fi
    command -v garage || { echo "garage not found: run scripts/tools.sh" >&2; exit 1; }
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

stop() {
    for pidfile in "$dir"/node*/pid; do
        [[ -f "$pidfile" ]] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

start() {
    local bin; bin=$(garage_bin)
    mkdir -p "$dir"
    # Nodes run detached (setsid): stop them if any later step fails.
    trap 'stop' ERR
    local secret; secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
    local i
    for i in $(seq 1 "$nodes"); do
        local n="$dir/node$i"
        mkdir -p "$n/meta" "$n/data"
        local rpc s3 admin
        rpc=$(free_port); s3=$(free_port); admin=$(free_port)
        cat > "$n/garage.toml" <<TOML
metadata_dir = "$n/meta"
data_dir = "$n/data"
db_engine = "sqlite"
replication_factor = $nodes
consistency_mode = "consistent"
metadata_fsync = false
data_fsync = false
rpc_secret = "$secret"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
        echo "$s3" > "$n/s3_port"
        setsid "$bin" -c "$n/garage.toml" server > "$n/log" 2>&1 < /dev/null &
        echo $! > "$n/pid"
    done
    local g="$bin -c $dir/node1/garage.toml"
    # Wait until every node answers, then introduce them to node 1.
    for i in $(seq 1 "$nodes"); do
        local tries=0
        until "$bin" -c "$dir/node$i/garage.toml" node id -q > "$dir/node$i/id" 2>/dev/null; do
            tries=$((tries + 1))
            if (( tries > 100 )); then echo "garage node $i did not start; see $dir/node$i/log" >&2; stop; exit 1; fi
            sleep 0.1
        done
    done
    for i in $(seq 2 "$nodes"); do
        $g node connect "$(cat "$dir/node$i/id")" > /dev/null
    done
    for i in $(seq 1 "$nodes"); do
        local id; id=$(cut -d@ -f1 "$dir/node$i/id")
        $g layout assign -z "dc$i" -c 1G "${id:0:16}" > /dev/null
    done
    $g layout apply --version 1 > /dev/null
    local key_id="GK$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
    local key_secret; key_secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
    $g key import --yes -n zenith-test "$key_id" "$key_secret" > /dev/null
    $g bucket create zenith-test > /dev/null
    $g bucket allow --read --write --owner zenith-test --key zenith-test > /dev/null
    cat > "$dir/env" <<ENV
GARAGE_ENDPOINT=http://127.0.0.1:$(cat "$dir/node1/s3_port")
GARAGE_REGION=garage
GARAGE_BUCKET=zenith-test
GARAGE_ACCESS_KEY=$key_id
GARAGE_SECRET_KEY=$key_secret
GARAGE_NODES=$nodes
ENV
}

restart() {
    local n="$dir/node${1:?node number}"
    local bin; bin=$(garage_bin)
    setsid "$bin" -c "$n/garage.toml" server >> "$n/log" 2>&1 < /dev/null &
    echo $! > "$n/pid"
    local tries=0
    until "$bin" -c "$n/garage.toml" node id -q > /dev/null 2>&1; do
        tries=$((tries + 1))
        if (( tries > 100 )); then echo "garage node $1 did not restart; see $n/log" >&2; exit 1; fi
        sleep 0.1
    done
}

case "$cmd" in
    start) start ;;
    restart) restart "${3:?usage: garage-cluster.sh restart DIR N}" ;;
    stop) stop ;;
    *) echo "usage: garage-cluster.sh start|stop DIR [NODES]" >&2; exit 2 ;;
esac
