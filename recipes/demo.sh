#!/usr/bin/env bash
# `make demo`: the main job on an offline example. Until `sifpy build` lands, it assembles
# a SIF from the host's busybox with sifpy's SIF tools and shows what is inside.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/busybox"
ln -s busybox "$work/rootfs/bin/sh"
mksquashfs "$work/rootfs" "$work/rootfs.sqfs" -comp zstd -noappend -quiet -all-root
sifpy sif new "$work/demo.sif"
sifpy sif add --datatype 1 --groupid 1 "$work/demo.sif" "$here/busybox-hello.def"
sifpy sif add --datatype 4 --partfs 1 --parttype 2 --partarch 2 --groupid 1 \
    "$work/demo.sif" "$work/rootfs.sqfs"
sifpy sif header "$work/demo.sif"
sifpy sif list "$work/demo.sif"
echo "--- the definition file stored in the image:"
sifpy sif dump 1 "$work/demo.sif"
