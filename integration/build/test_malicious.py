"""Hostile layers in an oci-archive never change anything outside the image being built.

The build either neutralises the entry or fails with a clear error; a victim directory
beside the build is compared before and after (docs/security.md, the tar rows).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.build.oci_images import oci_layout, tar_dir
from tests.rootfs.tars import dir_, hard, layer, node, reg, snapshot, sym, wh

from .conftest import Builder

ATTACKS: dict[str, Callable[[Path], list[bytes]]] = {
    "traversal": lambda v: [layer(reg("../../victim/hello", b"pwned"))],
    "symlink-then-write": lambda v: [
        layer(sym("v", "../../../victim")),
        layer(reg("v/hello", b"pwned")),
    ],
    "absolute-symlink-then-write": lambda v: [
        layer(sym("v", str(v))),
        layer(reg("v/new", b"pwned"), reg("v/hello", b"pwned")),
    ],
    "hardlink-outside": lambda v: [layer(hard("h", f"../../{v.name}/hello"))],
    "hardlink-absolute": lambda v: [layer(hard("h", str(v / "hello")))],
    "bad-whiteout": lambda v: [layer(dir_("d"), reg("d/x")), layer(wh("d/.."))],
    "device-node": lambda v: [layer(node("dev-null", tarfile.CHRTYPE, 1, 3), reg("ok", b"ok"))],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_malicious_oci_archive(user_builder: Builder, attack: str) -> None:
    work = user_builder.out / f"mal-{attack}"
    work.mkdir(exist_ok=True)
    victim = work / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "hello").write_text("victim\n")
    archive = tar_dir(oci_layout(work / "layout", ATTACKS[attack](victim), {}), work / "bad.tar")
    deffile = work / "bad.def"
    deffile.write_text(f"Bootstrap: oci-archive\nFrom: {archive}\n")
    for p in (work, *work.rglob("*")):
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    before = snapshot(victim, victim / "none")
    dest = work / "out.sif"
    res = user_builder.run(["build", "--force", str(dest), str(deffile)])
    assert snapshot(victim, victim / "none") == before, "the victim directory changed!"
    if res.returncode != 0:
        assert "error: can't" in res.stderr and not dest.exists()
    assert not list(work.glob(".sifpy-build-*"))
