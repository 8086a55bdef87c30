"""``Fingerprints:`` in definition files: a localimage base must be signed by every key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from integration.sign.conftest import FPR
from sifpy.sign.keyring import Keyring
from sifpy.sign.sign import PgpSigner, sign_image


def build(deffile: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sifpy", "build", "--force", str(out), str(deffile)],
                          capture_output=True, text=True, check=False)  # fmt: skip


@pytest.fixture
def base(tmp_path: Path) -> Path:
    deffile = tmp_path / "base.def"
    deffile.write_text(
        "Bootstrap: busybox\nMirrorURL: file:///bin/busybox\n\n%post\n    echo base > /base-marker\n"
    )
    out = tmp_path / "base.sif"
    r = build(deffile, out)
    assert r.returncode == 0, r.stderr
    return out


def derived(tmp_path: Path, base: Path, fingerprints: str) -> Path:
    deffile = tmp_path / "derived.def"
    deffile.write_text(f"Bootstrap: localimage\nFrom: {base}\nFingerprints: {fingerprints}\n")
    return deffile


def test_signed_base_builds(tmp_path: Path, base: Path, ref_keyring: Keyring) -> None:
    sign_image(base, PgpSigner(ref_keyring, ref_keyring.secret_key()))
    r = build(derived(tmp_path, base, FPR.lower()), tmp_path / "out.sif")
    assert r.returncode == 0, r.stderr
    assert f"signed by {FPR}" in r.stderr


def test_unsigned_base_is_refused(tmp_path: Path, base: Path, ref_keyring: Keyring) -> None:
    r = build(derived(tmp_path, base, FPR), tmp_path / "out.sif")
    assert r.returncode != 0 and "signature verification failed" in r.stderr, r.stderr
    assert not (tmp_path / "out.sif").exists()


def test_other_fingerprint_is_refused(tmp_path: Path, base: Path, ref_keyring: Keyring) -> None:
    sign_image(base, PgpSigner(ref_keyring, ref_keyring.secret_key()))
    other = "0" * 40
    r = build(derived(tmp_path, base, f"{FPR}, {other}"), tmp_path / "out.sif")
    assert r.returncode != 0 and f"not signed by {other}" in r.stderr, r.stderr
    assert not (tmp_path / "out.sif").exists()


def test_build_sign(tmp_path: Path, ref_keyring: Keyring) -> None:
    deffile = tmp_path / "s.def"
    deffile.write_text("Bootstrap: busybox\nMirrorURL: file:///bin/busybox\n")
    out = tmp_path / "s.sif"
    r = subprocess.run([sys.executable, "-m", "sifpy", "build", "--sign", str(out), str(deffile)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "sifpy", "verify", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and FPR in r.stdout + r.stderr, r.stdout + r.stderr
