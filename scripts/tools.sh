#!/usr/bin/env bash
# Installs the servers zenith's tests and benchmarks run against, when they are missing:
#   s3s-fs 0.14.1  a real S3 protocol server that checks SigV4 signatures
#                  (newer versions need a newer rustc than this project's toolchain)
#   garage 2.5.0   a real distributed object store, run as a 3-node cluster
# Binaries go to ~/.cache/zenith/tools/bin and are reused from there. A cold garage build
# takes about 13 minutes on 2 cores.
set -euo pipefail

root="$HOME/.cache/zenith/tools"
mkdir -p "$root/bin"

install_crate() {
    local name=$1 version=$2; shift 2
    local bin="$root/bin/$name"
    if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$version"; then
        return
    fi
    echo "building $name $version (once; reused afterwards)..." >&2
    env -u CARGO_TARGET_DIR cargo install "$name" --version "$version" --locked --root "$root" "$@" >&2
}

install_crate s3s-fs 0.14.1 --features binary
install_crate garage 2.5.0

for tool in python3 setpriv; do
    command -v "$tool" > /dev/null || { echo "$tool is required by the tests" >&2; exit 1; }
done
echo "$root/bin"
