#!/usr/bin/env bash
# `make demo`: the main job on an offline example: build recipes/busybox-hello.def into a
# SIF (busybox from the host's busybox-static, no network), then run it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${DEMO_OUT:-$(cd "$here/.." && pwd)/demo.sif}
echo "+ sifpy build --force $out recipes/busybox-hello.def"
sifpy build --force "$out" "$here/busybox-hello.def"
echo "+ sifpy sif list $out"
sifpy sif list "$out"
echo "+ sifpy inspect $out"
sifpy inspect "$out"
echo "+ sifpy run $out"
sifpy run "$out"
echo "+ sifpy exec $out id -u   (the same user inside as outside: $(id -u))"
sifpy exec "$out" id -u
if command -v run-singularity >/dev/null; then
    echo "+ $out   (a SIF runs itself through run-singularity, as Apptainer's do)"
    "$out"
fi
