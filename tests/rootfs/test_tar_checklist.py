"""Tar rows of the attack checklist (docs/security.md) not covered elsewhere: a PAX
``path`` that differs from the ustar name, odd but legal names carried into the squashfs
exactly, and malformed archives that must end in a typed error, quickly.

Each layer goes through every code path that reads layers: :func:`apply_layer` (the
rootfs on disk), the two-pass merge and the one-pass stream of :mod:`sifpy.rootfs.stream`."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifpy.errors import RootfsError
from sifpy.rootfs import apply_layer, stream

from ..conftest import need_tool
from .tars import Box, layer, reg, sym


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def names_unpacked(tmp: Path, blob: bytes) -> list[str]:
    root = tmp / "unpacked"
    root.mkdir()
    apply_layer(root, io.BytesIO(blob))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def names_merged(blob: bytes) -> list[str]:
    out = io.BytesIO()
    stream.merged_tar([io.BytesIO(blob)], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        return sorted(m.name for m in tf if m.name != ".")


def names_one_pass(blob: bytes) -> list[str] | None:
    out = io.BytesIO()
    try:
        stream.single_pass(io.BytesIO(blob), out)
    except stream.NeedsMerge:
        return None  # the caller falls back to the merge, checked above
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        return sorted(m.name for m in tf if m.name != "." and not m.name.startswith(".sing"))


def pax_renamed(ustar: str, pax: str, data: bytes = b"x") -> bytes:
    """One regular file whose ustar name field says ``ustar`` and PAX ``path`` ``pax``."""
    ti, _ = reg(ustar, data)
    ti.pax_headers = {"path": pax}
    return layer((ti, data))


# --- PAX path versus the ustar name (parser differential) -----------------------------------


def test_pax_path_wins_in_every_reader(tmp_path: Path) -> None:
    blob = pax_renamed("ustar-name", "pax-name")
    raw = blob[: 4 * 512]
    assert b"ustar-name" in raw and b"path=pax-name" in raw  # really two different names
    assert names_unpacked(tmp_path, blob) == ["pax-name"]
    assert names_merged(blob) == ["pax-name"]
    assert names_one_pass(blob) in (None, ["pax-name"])


def test_pax_linkpath_wins(tmp_path: Path) -> None:
    ti, _ = sym("l", "ustar-target")
    ti.pax_headers = {"linkpath": "pax-target"}
    blob = layer((ti, None))
    assert b"ustar-target" in blob[:2048]
    apply_layer(tmp_path, io.BytesIO(blob))
    assert os.readlink(tmp_path / "l") == "pax-target"
    out = io.BytesIO()
    stream.merged_tar([io.BytesIO(blob)], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        assert tf.getmember("l").linkname == "pax-target"


@pytest.mark.parametrize(
    ("ustar", "pax", "outcome"),
    [("../victim/x", "harmless", "neutralised"), ("harmless", "../victim/x", "error")],
)
def test_pax_path_decides_safety(box: Box, ustar: str, pax: str, outcome: str) -> None:
    # A checker that read the ustar field would let the second through, or refuse the first.
    blob = pax_renamed(ustar, pax, b"pwn")
    assert box.attack(blob).split(":")[0] == outcome
    with pytest.raises(RootfsError):
        stream.merge([io.BytesIO(pax_renamed("harmless", "../victim/x"))])


# --- names that must round-trip exactly ------------------------------------------------------

ODD_NAMES = [
    "new\nline",
    "with space",
    "quote'single",
    'quote"double',
    "back\\slash",
    "-leading-dash",
    "--option=like",
    "tab\there",
    "dollar$(touch pwn)",
    "star*glob?",
    "é-utf8",
    "non-utf8-\udcff\udcfe",  # bytes ff fe, carried as surrogate escapes
]


def _odd_layer() -> bytes:
    return layer(*(reg(f"d/{n}", n.encode("utf-8", "surrogateescape")) for n in ODD_NAMES))


def _listing(root: Path) -> dict[bytes, bytes]:
    d = os.fsencode(root / "d")
    return {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}


WANT = {
    n.encode("utf-8", "surrogateescape"): n.encode("utf-8", "surrogateescape") for n in ODD_NAMES
}


def test_odd_names_unpack_exactly(tmp_path: Path) -> None:
    apply_layer(tmp_path, io.BytesIO(_odd_layer()))
    assert _listing(tmp_path) == WANT


def test_odd_names_reach_the_squashfs_exactly(tmp_path: Path) -> None:
    # Through tar2sqfs (pull) and mksquashfs (build): no name is interpreted by a tool's
    # argument parser or pseudo-file syntax, and nothing else appears (no "pwn").
    need_tool("tar2sqfs")
    unsquashfs = need_tool("unsquashfs")
    blob = tmp_path / "odd.tar"
    blob.write_bytes(_odd_layer())
    for how in ("stream", "mksquashfs"):
        sqfs = tmp_path / f"{how}.sqfs"
        if how == "stream":
            stream.layers_to_squashfs([blob], sqfs)
        else:
            from sifpy.squashfs import pack

            root = tmp_path / "rootfs"
            root.mkdir()
            apply_layer(root, blob)
            pack(root, sqfs)
        out = tmp_path / f"{how}-out"
        subprocess.run([unsquashfs, "-d", str(out), str(sqfs)], check=True, capture_output=True)
        assert _listing(out) == WANT, how
        assert not (out / "pwn").exists() and not Path("pwn").exists()


# --- malformed archives: a typed error within a time budget -----------------------------------


def _pax_record(records: bytes, name: str = "x") -> bytes:
    """A PAX extended header with the raw ``records``, then a one-byte file."""
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = tarfile.XHDTYPE
    ti.size = len(records)
    head = ti.tobuf(tarfile.USTAR_FORMAT)
    body = records + b"\0" * (-len(records) % 512)
    data = reg(name, b"y")[0].tobuf(tarfile.USTAR_FORMAT) + b"y".ljust(512, b"\0")
    return head + body + data + b"\0" * 1024


def _rec(key: str, value: str) -> bytes:
    """A well-formed PAX record (its length counts itself)."""
    body = f" {key}={value}\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return f"{n}{body}".encode()


MALFORMED = {
    "valid-record": _pax_record(_rec("path", "renamed")),  # the control: the builder works
    # cpython gh-83198 / CVE-2025-8194 class: records whose lengths make the parser loop
    # or step backwards.
    "zero-length-record": _pax_record(b"0 path=a\n"),
    "negative-length": _pax_record(b"-20 path=a\n"),
    "length-past-end": _pax_record(b"99999 path=a\n"),
    "no-newline": _pax_record(b"12 path=abc"),
    "non-numeric-length": _pax_record(b"xx path=a\n"),
    "negative-size": _pax_record(_rec("size", "-5")),
    "huge-size": _pax_record(_rec("size", "99999999999999")),
    "negative-mtime": _pax_record(_rec("mtime", "-1e400")),
    "nan-mtime": _pax_record(_rec("mtime", "nan")),
    "huge-mtime": _pax_record(_rec("mtime", "1e300")),
    "truncated-member": layer(reg("big", b"z" * 5000))[:1536],
    "truncated-header": layer(reg("a", b"a"))[:300],
    "bad-checksum": layer(reg("a"))[:148] + b"0000000\0" + layer(reg("a"))[156:],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tar_is_a_typed_error(tmp_path: Path, case: str) -> None:
    data = MALFORMED[case]
    outcomes = []
    with deadline(20):
        for run in (
            lambda: apply_layer(tmp_path / "a", io.BytesIO(data)),
            lambda: stream.merge([io.BytesIO(data)]),
            lambda: stream.single_pass(io.BytesIO(data), io.BytesIO()),
        ):
            (tmp_path / "a").mkdir(exist_ok=True)
            try:
                run()
                outcomes.append("ok")
            except (RootfsError, stream.NeedsMerge) as exc:
                outcomes.append(type(exc).__name__)
    # Either refused with sifpy's error, or read as something harmless; never another
    # exception type, never a hang. Whatever was applied stayed inside the root.
    assert all(o in ("ok", "RootfsError", "NeedsMerge") for o in outcomes), outcomes
    if case == "valid-record":
        assert outcomes[:2] == ["ok", "ok"] and (tmp_path / "a/renamed").exists(), outcomes
    if case.startswith("truncated") or case == "bad-checksum":
        assert outcomes[0] == "RootfsError" and outcomes[1] == "RootfsError", outcomes


# --- privilege carried by a layer ------------------------------------------------------------


def test_capability_xattr_is_not_applied(tmp_path: Path) -> None:
    # A file capability (cap_setuid+ep, v2 layout) in a PAX xattr record: sifpy keeps no
    # xattrs, so no layer can grant a capability; the merged tar carries none either.
    cap = bytes.fromhex("0100000280000000000000000000000000000000")
    ti, data = reg("bin/tool", b"#!/bin/sh\n", 0o755)
    ti.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("latin-1"),
        "SCHILY.xattr.user.note": "x",
    }
    blob = layer((ti, data))
    assert b"security.capability" in blob[:2048]
    apply_layer(tmp_path, io.BytesIO(blob))
    assert os.listxattr(tmp_path / "bin/tool", follow_symlinks=False) == []
    out = io.BytesIO()
    stream.merged_tar([io.BytesIO(blob)], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        assert all(not m.pax_headers for m in tf), [m.pax_headers for m in tf]
