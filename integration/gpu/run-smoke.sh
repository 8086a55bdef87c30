#!/bin/sh
# The GPU smoke test from a fresh copy of the repository, on a machine with an NVIDIA GPU and
# no network: a venv from the system's Python with the packages already installed
# (--system-site-packages, --no-deps, --no-build-isolation), the starter built, then
# integration/gpu run as the calling user; the output goes to bench/results/gpu-smoke.txt.
# It has not yet run on a real GPU.
set -eu
cd "$(dirname "$0")/../.."
out=bench/results/gpu-smoke.txt
mkdir -p bench/results
python3 -m venv --system-site-packages .venv-gpu
.venv-gpu/bin/pip install -q --no-deps --no-build-isolation --no-index -e . \
    --config-settings editable_mode=compat || true
.venv-gpu/bin/python -m sifpy.cli.launcher .venv-gpu/bin/sifpy
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi -L || true
    SIFPY="$PWD/.venv-gpu/bin/sifpy" PYTHONPATH="$PWD" .venv-gpu/bin/python -m pytest -q -s \
        -p no:cacheprovider integration/gpu 2>&1
} | tee "$out"
