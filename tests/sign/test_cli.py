"""The sign and verify commands with DSSE keys (no gpg needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ed25519

from sifpy.cli import main
from tests.sign.conftest import make_image, patch


@pytest.fixture
def pem(tmp_path: Path) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(
        key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


def test_sign_verify_cli(
    tmp_path: Path,
    pem: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIFPY_KEYSDIR", str(tmp_path / "keys"))
    img = make_image(tmp_path / "img.sif")
    assert main(["sign", "--key", str(pem[0]), str(img)]) == 0
    capsys.readouterr()
    assert main(["verify", "--key", str(pem[1]), str(img)]) == 0
    out = capsys.readouterr().out
    assert "[OK]     signature 4 (dsse, group 1): SHA256:" in out
    assert "objects: 1 JSON.Generic, 2 FS (Squashfs/*System/amd64)" in out
    assert "Container verified" in out
    assert main(["verify", "--json", "--key", str(pem[1]), str(img)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] and [o["id"] for o in doc["objects"]] == [1, 2, 3]

    patch(img, 0, b"#!/bin/evil\n")
    assert main(["verify", "--key", str(pem[1]), str(img)]) == 1
    cap = capsys.readouterr()
    assert "header integrity compromised" in cap.out
    assert cap.err.startswith("error: can't verify")


def test_verify_unsigned_cli(
    tmp_path: Path, pem: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img = make_image(tmp_path / "img.sif")
    assert main(["verify", "--key", str(pem[1]), str(img)]) == 1
    cap = capsys.readouterr()
    assert "Container is not signed" in cap.out
    assert "hint: the image is not signed" in cap.err
