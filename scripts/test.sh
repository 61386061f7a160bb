#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing (PostgreSQL 15,
# s3s-fs, garage), then runs every test. Tests start their own servers on 127.0.0.1 with
# free ports and stop them; whatever a killed test leaves behind is stopped here at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zenith/target}"
bash vendor/postgres/install.sh > /dev/null
tools=$(bash scripts/tools.sh)
export ZENITH_TEST_S3S_FS_BIN="$tools/s3s-fs"
export ZENITH_TEST_GARAGE_BIN="$tools/garage"
# The console's test drives a real browser; without one it skips (and fails under CI).
if python=$(bash scripts/browser.sh); then
    export ZENITH_TEST_PYTHON="$python" ZENITH_TEST_CHROMIUM="$(command -v chromium)"
else
    echo "could not install chromium and playwright for the console test" >&2
fi
# Never ask an instance metadata service: tests talk to 127.0.0.1 only.
export AWS_EC2_METADATA_DISABLED=true

# Every temporary directory of this run lives here, so leftovers are easy to find and stop.
run_dir=$(mktemp -d /tmp/zenith-test.XXXXXX)
chmod 755 "$run_dir"
export TMPDIR="$run_dir"
cleanup() {
    pkill -9 -f "$run_dir" 2>/dev/null || true
    if [[ -n ${made_xfs:-} ]]; then
        bash scripts/xfs.sh --unmount "$made_xfs" || true
    fi
    rm -rf "$run_dir"
}
trap cleanup EXIT

# Thin clones are tested on a loop-mounted XFS with reflink=1, which needs root; without
# it those tests skip (and fail under CI).
if [[ $(id -u) -eq 0 && -z ${ZENITH_TEST_XFS_DIR:-} ]]; then
    made_xfs="$run_dir/xfs"
    if bash scripts/xfs.sh "$made_xfs" 8G; then
        export ZENITH_TEST_XFS_DIR="$made_xfs"
    else
        echo "could not mount an XFS image for the thin-clone tests (loop devices unavailable?)" >&2
    fi
fi

if cargo nextest --version > /dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@"
else
    cargo test --no-fail-fast "$@"
fi
