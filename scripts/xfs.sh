#!/usr/bin/env bash
# Makes a loop-mounted XFS filesystem with reflink=1 at DIR (its image is DIR.img, sparse),
# so zenith's thin clones are tested for real: `bash scripts/xfs.sh DIR [SIZE]` mounts,
# `bash scripts/xfs.sh --unmount DIR` unmounts and removes both. Needs root (mount, losetup)
# and xfsprogs, installed from the distribution's packages when missing.
set -euo pipefail

if [[ ${1:-} == --unmount ]]; then
    dir=$2
    if mountpoint -q "$dir"; then
        umount "$dir" || umount -l "$dir"
    fi
    rm -rf "$dir" "$dir.img"
    exit 0
fi

dir=$1
size=${2:-8G}
if [[ $(id -u) -ne 0 ]]; then
    echo "mounting an XFS image for the thin-clone tests needs root" >&2
    exit 1
fi
if ! command -v mkfs.xfs > /dev/null; then
    echo "installing xfsprogs from the distribution's packages..." >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xfsprogs >&2
fi
truncate -s "$size" "$dir.img"
mkfs.xfs -q -m reflink=1 "$dir.img"
mkdir -p "$dir"
mount -o loop "$dir.img" "$dir"
# PostgreSQL runs as its own account: it must be able to enter the repo below.
chmod 755 "$dir"
