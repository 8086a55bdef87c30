"""``Bootstrap: oras`` with ``Fingerprints:``: a signed SIF pushed to a real registry is a
build base only if every listed key signed it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integration.oci.conftest import Registry, registry
from integration.sign.conftest import FPR
from sifpy.sign.keyring import Keyring
from sifpy.sign.sign import PgpSigner, sign_image

__all__ = ["registry"]  # the session fixture, for this module too


def sifpy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env_extra = {"SIFPY_NOHTTPS": "1"}
    import os

    return subprocess.run([sys.executable, "-m", "sifpy", *map(str, args)], capture_output=True,
                          text=True, check=False, env={**os.environ, **env_extra})  # fmt: skip


def test_oras_base_with_fingerprints(
    registry: Registry, ref_keyring: Keyring, tmp_path: Path
) -> None:
    base_def = tmp_path / "base.def"
    base_def.write_text(
        "Bootstrap: busybox\nMirrorURL: file:///bin/busybox\n\n%post\n    echo from-oras > /marker\n"
    )
    signed, unsigned = tmp_path / "signed.sif", tmp_path / "unsigned.sif"
    for out in (signed, unsigned):
        assert sifpy("build", out, base_def).returncode == 0
    sign_image(signed, PgpSigner(ref_keyring, ref_keyring.secret_key()))
    for out, tag in ((signed, "signed"), (unsigned, "unsigned")):
        r = sifpy("push", "--insecure", out, f"oras://{registry.host}/test/base:{tag}")
        assert r.returncode == 0, r.stderr

    def derived(tag: str) -> subprocess.CompletedProcess[str]:
        deffile = tmp_path / f"{tag}.def"
        deffile.write_text(f"Bootstrap: oras\nFrom: {registry.host}/test/base:{tag}\nFingerprints: {FPR}\n\n"
                           "%runscript\n    cat /marker\n")  # fmt: skip
        return sifpy("build", "--force", tmp_path / f"{tag}-derived.sif", deffile)

    r = derived("signed")
    assert r.returncode == 0, r.stderr
    assert sifpy("run", tmp_path / "signed-derived.sif").stdout == "from-oras\n"
    r = derived("unsigned")
    assert r.returncode != 0 and "signature verification failed" in r.stderr, r.stderr
    assert not (tmp_path / "unsigned-derived.sif").exists()
