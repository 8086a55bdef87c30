"""OpenPGP sign/verify round trips, key management, and PGP-specific attacks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sifpy.cli import main
from sifpy.sif import ObjectInput, SifImage, add_object
from sifpy.sif import format as F
from sifpy.sign import digest as D
from sifpy.sign.keyring import Keyring
from sifpy.sign.pgp import run_gpg
from sifpy.sign.sign import PgpSigner, sign_image
from sifpy.sign.verify import TrustedKeys, verify_image
from tests.sign.conftest import make_image, rewrite_descriptor

from .conftest import FPR


def test_key_cli_and_round_trip(
    tmp_path: Path, keysdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["key", "newpair", "--name", "Tester", "--email", "t@example.org",
                 "--comment", "ci", "--algorithm", "ed25519"]) == 0  # fmt: skip
    assert (keysdir.stat().st_mode & 0o777) == 0o700
    fpr = Keyring().keys(secret=True)[0].fingerprint
    assert main(["key", "list", "--secret"]) == 0
    out = capsys.readouterr().out
    assert "0) U: Tester (ci) <t@example.org>" in out and fpr in out

    img = make_image(tmp_path / "img.sif")
    assert main(["sign", str(img)]) == 0
    assert main(["verify", str(img)]) == 0
    out = capsys.readouterr().out
    assert f"[OK]     signature 4 (pgp, group 1): Tester (ci) <t@example.org> ({fpr})" in out
    with SifImage.open(img) as i:
        sig = i.get(4).signature()
        assert sig.hashtype == 1 and sig.entity[:20] == bytes.fromhex(fpr)

    pub = tmp_path / "pub.asc"
    assert main(["key", "export", fpr, str(pub)]) == 0
    assert pub.read_bytes().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert main(["key", "remove", fpr]) == 0
    assert Keyring().keys() == []
    assert main(["verify", str(img)]) == 1
    assert "no trusted OpenPGP public keys" in capsys.readouterr().err
    assert main(["verify", "--keyring", str(pub), str(img)]) == 0
    assert main(["key", "import", str(pub)]) == 0
    assert main(["verify", str(img)]) == 0


def test_protected_key(tmp_path: Path, keysdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Keyring()
    key = ring.generate("Locked", passphrase="s3cret", algorithm="ed25519")
    img = make_image(tmp_path / "img.sif")
    before = img.read_bytes()
    with pytest.raises(Exception, match=r"(?i)passphrase"):
        sign_image(img, PgpSigner(ring, key, "wrong"))
    assert img.read_bytes() == before  # a failed signing leaves the image untouched
    sign_image(img, PgpSigner(ring, key, "s3cret"))
    with SifImage.open(img) as i:
        assert verify_image(i, TrustedKeys.load()).ok


def test_keyidx(tmp_path: Path, ref_keyring: Keyring) -> None:
    ref_keyring.generate("Second", algorithm="ed25519")
    img = make_image(tmp_path / "img.sif")
    with pytest.raises(Exception, match="which one"):
        PgpSigner(ref_keyring, ref_keyring.secret_key())
    assert main(["sign", "--keyidx", "0", "-g", "2", str(img)]) == 0
    with SifImage.open(img) as i:
        res = verify_image(i, TrustedKeys.load(), group_ids=[2])
    assert res.ok and res.signatures[0].signers == (ref_keyring.secret_key(0).fingerprint,)


def test_fingerprint_in_descriptor_spoofed(tmp_path: Path, ref_keyring: Keyring) -> None:
    """Descriptor names the trusted key, the signature is by another key → refused."""
    other = ref_keyring.generate("Mallory", algorithm="ed25519")
    img = make_image(tmp_path / "img.sif")
    sign_image(img, PgpSigner(ref_keyring, other), group_ids=[1])
    extra = F.SignatureExtra(1, bytes.fromhex(FPR)).pack()
    rewrite_descriptor(img, 4, extra=extra)
    with SifImage.open(img) as i:
        res = verify_image(i, TrustedKeys.load(), group_ids=[1])
    assert not res.ok
    assert f"does not match the signing key ({other.fingerprint})" in res.failures()[0]


def test_unknown_signer(tmp_path: Path, ref_keyring: Keyring, keysdir: Path) -> None:
    img = make_image(tmp_path / "img.sif")
    sign_image(img, PgpSigner(ref_keyring, ref_keyring.secret_key()))
    ring_file = tmp_path / "other.gpg"
    other = Keyring(tmp_path / "other")
    other.generate("Someone", algorithm="ed25519")
    ring_file.write_bytes(other.public_keys_bytes())
    with SifImage.open(img) as i:
        res = verify_image(i, TrustedKeys.load(keyrings=[ring_file], default_pgp=False))
    assert "signed by an unknown key" in res.failures()[0]
    subprocess.run(
        ["gpgconf", "--homedir", str(tmp_path / "other"), "--kill", "gpg-agent"], check=False
    )


def test_sha1_pgp_signature_refused(tmp_path: Path, ref_keyring: Keyring) -> None:
    """CVE-2022-39237: a clear-signature made with SHA-1 is refused."""
    img = make_image(tmp_path / "img.sif")
    with SifImage.open(img) as i:
        md = D.image_metadata(i, 2, [i.get(3)]).to_json()
    proc = run_gpg(str(ref_keyring.path), ["--digest-algo", "SHA1", "--local-user", FPR,
                                           "--clearsign"], stdin=md, passphrase="")  # fmt: skip
    if proc.returncode != 0:
        pytest.skip("this gpg refuses to make SHA-1 signatures")
    add_object(img, ObjectInput.signature(proc.stdout, 1, bytes.fromhex(FPR), group_id=0,
                                          linked_id=2, link_to_group=True))  # fmt: skip
    with SifImage.open(img) as i:
        res = verify_image(i, TrustedKeys.load(), group_ids=[2])
    assert "weak hash SHA1" in res.failures()[0]


def test_tampered_pgp_image(tmp_path: Path, ref_keyring: Keyring, images: Path) -> None:
    p = tmp_path / "x.sif"
    shutil.copyfile(images / "one-group-signed.sif", p)
    rewrite_descriptor(p, 2, name=b"evil")
    assert main(["verify", str(p)]) == 1
