#!/usr/bin/env bash
# The README's first command: installs PostgreSQL 15 if it is missing, builds and installs
# the zenith binary (into ~/.cargo/bin), then runs `zenith start`.
set -euo pipefail
cd "$(dirname "$0")/.."

pgbin=$(bash vendor/postgres/install.sh)
echo "PostgreSQL: $pgbin" >&2
cargo install --path . --locked --quiet
zenith=$(command -v zenith || echo "$HOME/.cargo/bin/zenith")
echo "installed $("$zenith" --version) at $zenith" >&2
exec "$zenith" start "$@"
