"""Layer-tar builders and the victim oracle for the rootfs tests (docs/security.md)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sifpy.errors import RootfsError
from sifpy.rootfs import apply_layer

MTIME = 1_600_000_000
Entry = tuple[tarfile.TarInfo, bytes | None]


def _body(path: Path, st: os.stat_result) -> object:
    """What an entry holds: a file's bytes, a symlink's target, None for the rest."""
    if stat.S_ISREG(st.st_mode):
        return path.read_bytes()
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(path)
    return None


def _info(name: str, kind: bytes, mode: int, **attrs: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644, **attrs: object) -> Entry:
    ti = _info(name, tarfile.REGTYPE, mode, **attrs)
    ti.size = len(data)
    return ti, data


def dir_(name: str, mode: int = 0o755, **attrs: object) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, **attrs), None


def sym(name: str, target: str, **attrs: object) -> Entry:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target, **attrs), None


def hard(name: str, target: str, mode: int = 0o644) -> Entry:
    return _info(name, tarfile.LNKTYPE, mode, linkname=target), None


def node(name: str, kind: bytes, major: int = 0, minor: int = 0) -> Entry:
    return _info(name, kind, 0o666, devmajor=major, devminor=minor), None


def wh(path: str) -> Entry:
    """A whiteout for ``path`` (``dir/name`` -> ``dir/.wh.name``)."""
    head, _, name = path.rpartition("/")
    return reg(f"{head}/.wh.{name}" if head else f".wh.{name}")


def layer(*entries: Entry) -> bytes:
    """An uncompressed PAX tar holding ``entries`` exactly as given, hostile or not."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def snapshot(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``top`` except ``skip``: type, bytes, mode, mtime, nlink, inode."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = _body(path, st)
            out[str(path.relative_to(top))] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_mtime_ns,
                st.st_nlink,
                st.st_ino,
                body,
            )
    return out


def host_file(path: str) -> tuple[object, ...]:
    st = os.lstat(path)
    return (st.st_mode, st.st_nlink, st.st_mtime_ns, st.st_uid, Path(path).read_bytes())


@dataclass
class Box:
    """``tmp/dest`` (the rootfs) beside ``tmp/victim/hello``, the storage-style oracle."""

    top: Path
    dest: Path
    victim: Path

    def apply(self, *layers: bytes) -> None:
        for blob in layers:
            apply_layer(self.dest, io.BytesIO(blob))

    def attack(self, *layers: bytes) -> str:
        """Apply ``layers``; assert nothing outside ``dest`` changed; say what happened."""
        before = snapshot(self.top, self.dest)
        passwd = host_file("/etc/passwd")
        try:
            self.apply(*layers)
            outcome = "neutralised"
        except RootfsError as exc:
            outcome = f"error: {exc}"
        assert snapshot(self.top, self.dest) == before, "HOST PATH WAS CHANGED! PATH ESCAPE!"
        assert host_file("/etc/passwd") == passwd
        return outcome


def describe_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """type, mode, body, hardlink group (the smallest name of the inode) of each path."""
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[int, str] = {}
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            body = _body(path, st)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                groups[st.st_ino] = min(groups.get(st.st_ino, rel), rel)
            rows.append((rel, st, body))
    for rel, st, body in rows:
        group = groups.get(st.st_ino) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else None
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), body, group)
    return out
