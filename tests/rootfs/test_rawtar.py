"""sifpy.rootfs.rawtar reads what tarfile reads, or says it can't (NotPlain): never something
else. Each case is a tar made by tarfile (GNU, PAX, ustar) or by hand; the one-pass
stream's output is the same whether file data is spliced between pipes or copied."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from sifpy.rootfs import merge, stream
from sifpy.rootfs.rawtar import NotPlain, RawTar

MEMBERS: list[tuple[str, bytes, dict[str, object]]] = [
    ("etc", tarfile.DIRTYPE, {"mode": 0o755}),
    ("etc/passwd", tarfile.REGTYPE, {"data": b"root:x:0:0::/root:/bin/sh\n"}),
    ("etc/empty", tarfile.REGTYPE, {"data": b""}),
    ("etc/block", tarfile.REGTYPE, {"data": b"x" * 512}),
    ("etc/more", tarfile.REGTYPE, {"data": b"y" * 100_001, "mode": 0o4755}),
    ("d" * 60 + "/" + "e" * 80, tarfile.DIRTYPE, {}),  # > 100 bytes: prefix / long name
    ("d" * 60 + "/" + "e" * 80 + "/" + "f" * 120, tarfile.REGTYPE, {"data": b"long\n"}),
    ("üñí/çødé", tarfile.REGTYPE, {"data": b"utf-8\n"}),
    ("link", tarfile.SYMTYPE, {"linkname": "t" * 150}),
    ("hard", tarfile.LNKTYPE, {"linkname": "etc/passwd"}),
    ("fifo", tarfile.FIFOTYPE, {}),
    ("dev/null", tarfile.CHRTYPE, {}),
]


def make_tar(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for name, kind, attrs in MEMBERS:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mode = int(attrs.get("mode", 0o644))  # type: ignore[call-overload]
            ti.mtime = int(attrs.get("mtime", 1_700_000_000))  # type: ignore[call-overload]
            ti.linkname = str(attrs.get("linkname", ""))
            data = attrs.get("data")
            ti.size = len(data) if isinstance(data, bytes) else 0
            try:
                ti.tobuf(fmt, "utf-8", "surrogateescape")
            except ValueError:  # ustar can't hold it (long link, big number): leave it out
                continue
            tf.addfile(ti, io.BytesIO(data) if isinstance(data, bytes) else None)
    return out.getvalue()


def by_tarfile(data: bytes) -> list[tuple[object, ...]]:
    rows = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            body = f.read() if f is not None else None
            rows.append((m.name, m.type, m.mode, int(m.mtime), m.linkname, m.size, body))
    return rows


def by_rawtar(data: bytes) -> list[tuple[object, ...]]:
    raw = RawTar(io.BytesIO(data))
    rows = []
    while (m := raw.next()) is not None:
        body = None
        if m.isreg():
            out = io.BytesIO()
            raw.copy_data(m.size, out, -1)
            body = out.getvalue()
        rows.append((m.name, m.type, m.mode, m.mtime, m.linkname, m.size, body))
    return rows


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT], ids=str
)
def test_same_members_as_tarfile(fmt: int) -> None:
    data = make_tar(fmt)
    assert len(by_tarfile(data)) >= 8
    assert by_rawtar(data) == by_tarfile(data)


def test_base_256_numbers_need_tarfile() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("future")
        ti.mtime = 2**33 + 5  # GNU writes it in base 256
        tf.addfile(ti)
    with pytest.raises(NotPlain, match="base-256"):
        by_rawtar(out.getvalue())


def header(name: bytes, kind: bytes = b"0", size: int = 0, prefix: bytes = b"") -> bytes:
    ti = tarfile.TarInfo("x")
    ti.size = size
    block = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    block[0:100] = name.ljust(100, b"\0")
    block[156:157] = kind
    block[345:500] = prefix.ljust(155, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


HAND = {
    "v7 directory": header(b"olddir/", b"\0") + bytes(1024),
    "prefix": header(b"name", prefix=b"some/prefix") + bytes(1024),
    "no end blocks": header(b"a", size=3) + b"abc".ljust(512, b"\0"),
    "empty archive": bytes(1024),
}


@pytest.mark.parametrize("case", sorted(HAND))
def test_hand_made_like_tarfile(case: str) -> None:
    assert by_rawtar(HAND[case]) == by_tarfile(HAND[case])


def test_pax_fields_like_tarfile() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("p")
        ti.pax_headers = {"mtime": "1700000000.75", "path": "renamed/", "uname": "x"}
        tf.addfile(ti)
        ti = tarfile.TarInfo("q")
        ti.pax_headers = {"mtime": "not a number"}
        tf.addfile(ti)
    data = out.getvalue()
    assert by_rawtar(data) == by_tarfile(data)


NOT_PLAIN = {
    "bad checksum": header(b"a")[:148] + b"0000000\0" + header(b"a")[156:] + bytes(1024),
    "global pax": header(b"g", b"g", 12) + b"12 path=zz\n".ljust(512, b"\0") + bytes(1024),
    "sparse": header(b"s", b"S") + bytes(1024),
    "truncated data": header(b"a", size=1000) + b"x" * 600,
    "truncated header": header(b"a")[:300],
    "empty stream": b"",
    "dir with data": header(b"d", b"5", 5) + b"hello".ljust(512, b"\0") + bytes(1024),
    "odd pax key": header(b"x", b"x", 22) + b"22 GNU.sparse.size=1\n".ljust(512, b"\0"),
}


@pytest.mark.parametrize("case", sorted(NOT_PLAIN))
def test_what_needs_tarfile(case: str) -> None:
    with pytest.raises(NotPlain):
        by_rawtar(NOT_PLAIN[case])


def test_spliced_output_is_the_copied_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipe in, pipe out (splice) and file in, file out (copies) write the same tar."""
    # The metadata files are stamped with the time of the merge: one clock for both runs.
    monkeypatch.setattr(merge.time, "time", lambda: 1_700_000_000.0)
    blob = tmp_path / "layer.tar"
    blob.write_bytes(make_tar(tarfile.PAX_FORMAT))
    copied = io.BytesIO()
    stream.single_pass(blob, copied, {"config": {"Env": ["A=1"]}})

    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    chunks: list[bytes] = []

    def feed() -> None:
        with os.fdopen(w_in, "wb") as f:
            f.write(blob.read_bytes())

    def drain() -> None:
        with os.fdopen(r_out, "rb") as f:
            chunks.append(f.read())

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    with os.fdopen(r_in, "rb") as src, os.fdopen(w_out, "wb") as dst:
        stream.single_pass(merge.TarStream(src, "pipe"), dst, {"config": {"Env": ["A=1"]}})
    for t in threads:
        t.join()
    assert b"".join(chunks) == copied.getvalue()
