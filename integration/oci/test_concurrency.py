"""Eight ``sifpy pull`` processes of one image into one cache, at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integration.oci.conftest import ROOT, Registry, SifpyEnv
from integration.oci.helpers import sif_rootfs
from sifpy.oci.cache import Cache

N = 8


def test_parallel_pulls_share_one_cache(
    registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    ref = f"docker://{registry.host}/test/multi:1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sifpy", "pull", "--insecure", str(tmp_path / f"{i}.sif"), ref],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sifpy.env(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        for i in range(N)
    ]
    results = [(p.wait(120), p.communicate()) for p in procs]
    for rc, (_, err) in results:
        assert rc == 0, err
    cache = Cache(sifpy.cache)
    assert cache.verify() == []
    blobs = sorted(p.name for p in cache.blobs.iterdir())
    assert not [b for b in blobs if b.startswith(".tmp")]
    assert len(blobs) == 3  # the three layers, each stored once
    assert not [p for p in cache.sifs.iterdir() if p.name.startswith(".tmp")]
    assert len(cache.entries()) == 1
    trees = {
        tuple(sorted(str(p.relative_to(d)) for p in d.rglob("*")))
        for d in (sif_rootfs(tmp_path / f"{i}.sif", tmp_path / f"root{i}") for i in (0, N - 1))
    }
    assert len(trees) == 1
