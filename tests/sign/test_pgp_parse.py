"""Strict clear-sign parsing (no gpg needed): what the verifier hashes is what it parses."""

from __future__ import annotations

import pytest

from sifpy.errors import SignatureError
from sifpy.sif import SifImage
from sifpy.sign.pgp import dearmor, parse_clearsigned
from tests.conftest import reference_dir

SIG = b"-----BEGIN PGP SIGNATURE-----\n\nwsBzBAEBCAAn\n=3Jq2\n-----END PGP SIGNATURE-----"


def msg(text: bytes, head: bytes = b"Hash: SHA256\n") -> bytes:
    return b"-----BEGIN PGP SIGNED MESSAGE-----\n" + head + b"\n" + text + b"\n" + SIG


def test_reference_signature_parses() -> None:
    images = reference_dir() / "test" / "images"
    with SifImage.open(images / "one-group-signed.sif") as img:
        cs = parse_clearsigned(img.read(img.get(3)))
    assert cs.text.startswith(b'{"version":1,') and cs.text.endswith(b"]}")
    assert cs.signature.startswith(b"-----BEGIN PGP SIGNATURE-----\n")


def test_dash_escape_and_trailing_space() -> None:
    assert parse_clearsigned(msg(b"- -abc  \nxyz\t")).text == b"-abc\nxyz"
    assert parse_clearsigned(msg(b"a\nb").replace(b"\n", b"\r\n")).text == b"a\nb"


@pytest.mark.parametrize(
    "data",
    [
        b"junk\n" + msg(b"{}"),
        msg(b"{}", head=b"Comment: x\n"),
        msg(b"{}", head=b""),
        msg(b"-unescaped"),
        msg(b"{}") + b"\n" + SIG,
        msg(b"{}").replace(b"-----END PGP SIGNATURE-----", b""),
        msg(b"{}").replace(b"=3Jq2", b"=3Jq2 !"),
        b"{}",
    ],
)
def test_malformed_refused(data: bytes) -> None:
    with pytest.raises(SignatureError):
        parse_clearsigned(data)


def test_dearmor() -> None:
    armored = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: c\n\nAAEC\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n"
    assert dearmor(armored) == b"\x00\x01\x02"
    assert dearmor(b"\x99\x01") == b"\x99\x01"
