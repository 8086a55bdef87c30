"""Random mutations of real SIF files: the loader and renderers raise only sifpy errors.

At least 2,000 mutated images per run (CI included). Each is loaded from a memfd, every
object's descriptor is rendered as ``siftool info`` would and its data streamed; peak
Python allocation stays small, so a lying header can't make us allocate gigabytes.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sifpy.cli.sif import render_header, render_info, render_list
from sifpy.errors import SifpyError
from sifpy.sif import SifImage
from tests.conftest import reference_images
from tests.sif.golden import GOLDEN_DIR

SEEDS = [p.read_bytes() for p in reference_images() + sorted(GOLDEN_DIR.glob("*.sif"))]
# Interesting offsets: header fields, and descriptor fields of the first slots.
HOT = list(range(0, 128, 8)) + [4096 + 585 * s + f for s in range(4) for f in (0, 4, 5, 9, 13, 17, 25, 33, 201)]  # fmt: skip
VALUES = [0, 1, -1, 4096, 32176, 2**31 - 1, 2**31, 2**32 - 1, 2**62, -(2**63), 585, 48]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "int", "truncate", "insert", "splat"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "int" and len(data) >= 136:
            off = draw(st.sampled_from([h for h in HOT if h + 8 <= len(data)] or [0]))
            fmt = draw(st.sampled_from(["<q", "<i", "<I", "<B"]))
            v = draw(st.sampled_from(VALUES))
            with contextlib.suppress(struct.error):
                struct.pack_into(fmt, data, off, v)
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "splat" and data:
            i = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=600))
            data[i : i + len(chunk)] = chunk
    return bytes(data)


def exercise(data: bytes) -> None:
    fd = os.memfd_create("fuzz.sif")
    try:
        os.write(fd, data)
        with SifImage.from_fd(fd, "fuzz.sif") as img:
            render_header(img)
            render_list(img)
            for d in img.descriptors:
                render_info(d)
                for _ in img.iter_data(d, chunk=1 << 16):
                    pass
            with contextlib.suppress(SifpyError):
                img.primary_partition()
    finally:
        os.close(fd)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_mutations_raise_only_sifpy_errors(data: bytes) -> None:
    tracemalloc.start()
    try:
        exercise(data)
    except SifpyError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak allocation {peak} bytes"


def test_seeds_are_real_images() -> None:
    assert len(SEEDS) >= 17 + 4
    for s in SEEDS:
        exercise(s)  # unmutated seeds load without error


def test_seed_paths_exist() -> None:
    assert all(Path(p).exists() for p in reference_images())
