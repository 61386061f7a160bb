#!/usr/bin/env bash
# Finds or installs the PostgreSQL major version zenith is tested with (vendor/postgres/VERSION)
# and prints its bin directory on stdout. Installs Debian's postgresql-N through apt when it
# is missing, without creating or starting a default cluster: zenith makes its own.
set -euo pipefail

major=$(tr -d '[:space:]' < "$(dirname "$0")/VERSION")
bindir="/usr/lib/postgresql/$major/bin"

have() { [[ -x "$bindir/postgres" && -x "$bindir/initdb" && -x "$bindir/pg_ctl" ]]; }

if ! have; then
    if ! command -v apt-get > /dev/null; then
        echo "PostgreSQL $major not found and apt-get is unavailable: install PostgreSQL $major and set ZENITH_PG_BIN to its bin directory" >&2
        exit 1
    fi
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo > /dev/null || { echo "installing PostgreSQL $major needs root: run this script as root or install sudo" >&2; exit 1; }
        sudo="sudo"
    fi
    echo "installing PostgreSQL $major from the distribution's packages..." >&2
    # Debian's postinst would otherwise create and start a 'main' cluster nobody asked for.
    $sudo mkdir -p /etc/postgresql-common
    if ! grep -qs '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf; then
        echo "create_main_cluster = false" | $sudo tee -a /etc/postgresql-common/createcluster.conf > /dev/null
    fi
    $sudo apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "postgresql-$major" "postgresql-client-$major" >&2
    have || { echo "postgresql-$major was installed but $bindir lacks postgres/initdb/pg_ctl" >&2; exit 1; }
fi
echo "$bindir"
