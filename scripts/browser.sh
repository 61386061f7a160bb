#!/usr/bin/env bash
# Installs what the console's browser test drives, when it is missing: Debian's chromium
# package, and Playwright (from PyPI) in a virtual environment under
# ~/.cache/zenith/tools/venv. Playwright drives the system's chromium; it downloads no
# browser of its own. Prints the venv's python. Needs root for apt-get when chromium is
# missing.
set -euo pipefail

venv="$HOME/.cache/zenith/tools/venv"
if ! command -v chromium > /dev/null; then
    echo "installing chromium (once)..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null 2>&1 \
        || { apt-get update -qq > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; }
fi
if ! "$venv/bin/python" -c "import playwright" 2> /dev/null; then
    echo "installing playwright into $venv (once)..." >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q "playwright==1.65.3" >&2
fi
echo "$venv/bin/python"
