"""The rules for layer entries, one set for every layer engine.

Three engines apply OCI/Docker layer tars: :mod:`sifpy.rootfs.unpack` (onto a directory),
:mod:`sifpy.rootfs.merge` (an in-memory tree, pass 1 of a streamed pull) and the one-pass
:func:`sifpy.rootfs.stream.single_pass`. What an entry *means* is decided here, once; the
engines keep only what their medium needs (file descriptors, tree nodes, a tar stream).

Semantics follow the OCI image-spec layer changesets
(https://github.com/opencontainers/image-spec/blob/main/layer.md): ``.wh.<name>`` deletes
``<name>`` from lower layers, ``.wh..wh..opq`` empties a directory of lower content, and
whiteouts never touch what the same layer adds, whatever the order of entries
(:class:`Touched`, :func:`hide_lower`). A later entry for a path replaces the earlier one
(a directory over a directory only updates its metadata; anything else over a directory
removes the directory tree). Symlinks are stored as they are and never followed while
writing; a symlink in a parent position is resolved by the engine inside the rootfs with
chroot semantics (:mod:`sifpy.util.paths`); hardlinks name an entry already in the
rootfs (this or an earlier layer).

The rule for hostile or odd entries: what legitimate tools emit in another spelling is
normalised; what only an attacker or a corrupt archive produces fails the whole layer
with :class:`~sifpy.errors.RootfsError`; what is legitimate but can't be made safely is
skipped with a warning.

=====================================================  ==================================
entry                                                  outcome
=====================================================  ==================================
absolute name ``/etc/x``, ``./x``, ``a//b``            normalised to ``etc/x``, ``x``, ``a/b``
``..`` anywhere in a name (``../x``, ``a/../../x``)    RootfsError
NUL in a name or link target; component > 255 bytes;   RootfsError
name > 4096 bytes; empty or > 4095-byte symlink target
mtime not finite or beyond 2**62 s                     RootfsError
non-directory entry for the root (``.``, ``/``, ``""``)  RootfsError (CVE-2021-29136)
parent component is a symlink (any target, any layer)  resolved inside the rootfs
parent component is a file                             RootfsError
symlink chain longer than 40 links                     RootfsError
symlink entry with any target (``/``, ``../../..``)    stored as-is, never followed
hardlink with ``..``; missing or directory target      RootfsError
hardlink to a symlink                                  links the symlink itself
hardlink through a symlinked directory                 resolved inside the rootfs
whiteout ``.wh.``, ``.wh..``, ``.wh...``               RootfsError
whiteout through a symlinked parent                    resolved inside the rootfs
``.wh.`` prefix on a directory component               RootfsError
aufs metadata ``.wh..wh.<other>``                      skipped silently (Docker does too)
character or block device                              skipped with a warning
FIFO                                                   created as a FIFO
unknown entry type                                     skipped with a warning
malformed tar or compressed stream                     RootfsError
more than ``$SIFPY_MAX_UNPACKED``; disk nearly full    RootfsError (:mod:`.limits`)
=====================================================  ==================================

Modes (:func:`mode`): as real root (euid 0 in the initial user namespace) modes are kept
exactly, setuid/setgid included. Unprivileged, setuid/setgid bits are stripped from
non-directories (a setuid-to-the-builder file on a shared filesystem would let other
users act as the builder; the runtime mounts ``nosuid`` anyway), and directories get
owner ``rwx`` added so later entries and layers can be written and removed (what umoci's
rootless mode and Apptainer's ``--fix-perms`` also do).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Protocol, TypeVar

from sifpy.errors import RootfsError
from sifpy.util import log

WHITEOUT = ".wh."
OPAQUE = ".wh..opq"  # what follows WHITEOUT in ".wh..wh..opq"
NAME_MAX = 255
PATH_MAX = 4096
HINT = "the layer is corrupt or malicious; get the image from a trusted source"
# A PAX mtime is any decimal ("-1e400", "nan", "1e300"): utime() would raise OverflowError
# or ValueError, and a squashfs can't hold it. 2**62 s is far inside time_t and far
# beyond any real date.
MAX_MTIME = 2**62

Key = tuple[str, ...]  # a path below the rootfs, as components

# An entry's kind, by its tar type byte, the same for tarfile's members and rawtar's
# (tarfile's REGULAR_TYPES: regular, old regular, contiguous, GNU sparse).
DIR, REG, SYM, FIFO, LINK, DEVICE, UNKNOWN = "d", "f", "l", "p", "h", "c", "?"
_KINDS = {b"0": REG, b"\0": REG, b"7": REG, b"S": REG, b"5": DIR, b"2": SYM, b"1": LINK}
_KINDS.update({b"6": FIFO, b"3": DEVICE, b"4": DEVICE})

# What an entry asks for (Entry.action).
ROOT, NODE, HIDE, SKIP = "root", "node", "hide", "skip"


class BadEntry(Exception):
    """An entry that fails the layer; :func:`layer_error` adds the layer and the name."""


def kind(tar_type: bytes) -> str:
    """The kind (DIR, REG, SYM, FIFO, LINK, DEVICE, UNKNOWN) of a tar type byte."""
    return _KINDS.get(tar_type, UNKNOWN)


def show(name: str, limit: int = 120) -> str:
    """A tar name fit for a message: control characters escaped, long names cut."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def layer_error(label: str, name: str, exc: Exception) -> RootfsError:
    """The error for entry ``name`` of layer ``label`` that failed with ``exc``."""
    return RootfsError(f"can't apply layer: {label}: {show(name)}: {exc}", HINT)


def clean(name: str, what: str = "name") -> Key:
    """Split a tar name into components: drop ``/`` and ``.``, refuse ``..`` and NUL."""
    if "\0" in name:
        raise BadEntry(f"NUL byte in {what}")
    if len(os.fsencode(name)) > PATH_MAX:
        raise BadEntry(f"{what} longer than {PATH_MAX} bytes")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise BadEntry(f"'..' in {what}: {show(name)}")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise BadEntry(f"component of {what} longer than {NAME_MAX} bytes")
    return parts


@functools.cache
def real_root() -> bool:
    """True for euid 0 with the identity uid map, i.e. not root of a user namespace.

    Root of a user namespace can't chown to unmapped ids, so it is treated like any
    unprivileged user.
    """
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def mode(tar_mode: int, *, is_dir: bool, privileged: bool) -> int:
    """The permission bits an entry gets (see the module docstring)."""
    tar_mode &= 0o7777
    if privileged:
        return tar_mode
    if is_dir:
        return tar_mode | 0o700
    return tar_mode & ~0o6000


class Entry:
    """What one tar entry asks for, decided from the entry alone (no tree looked at).

    ``action``: ROOT (attributes of the root directory), NODE (``name`` in the directory
    ``parent``), HIDE (whiteout: hide ``name`` in ``parent`` from lower layers; an opaque
    marker hides all of them: ``name`` is None) or SKIP (logged already). ``link``: a
    hardlink's target, cleaned; a symlink's target is the entry's own, unchanged."""

    __slots__ = ("action", "kind", "link", "name", "parent")

    def __init__(
        self, action: str, kind: str, parent: Key = (), name: str | None = None, link: Key = ()
    ) -> None:
        self.action = action
        self.kind = kind
        self.parent = parent
        self.name = name
        self.link = link

    def __repr__(self) -> str:
        return f"Entry({self.action}, {self.kind}, {self.parent}, {self.name!r}, {self.link})"


def classify(name: str, tar_type: bytes, mtime: float, linkname: str) -> Entry:
    """Decide what an entry (its name, tar type byte, mtime and link target) asks for;
    :class:`BadEntry` if no layer may hold it. Skipped entries are logged here."""
    if not abs(mtime) < MAX_MTIME:
        # float(): the same text whether a reader parsed the PAX record to a float or an int.
        raise BadEntry(f"timestamp out of range: {float(mtime)}")
    k = kind(tar_type)
    parts = clean(name)
    if not parts:
        if k != DIR:
            # CVE-2021-29136: a symlink at '.' would re-point every later entry.
            raise BadEntry("refusing to change the type of the root directory")
        return Entry(ROOT, k)
    *parent_list, base = parts
    parent = tuple(parent_list)
    if any(p.startswith(WHITEOUT) for p in parent):
        raise BadEntry("whiteout prefix on a directory component")
    if base.startswith(WHITEOUT):
        target = base[len(WHITEOUT) :]
        if target == OPAQUE:
            return Entry(HIDE, k, parent)
        if target.startswith(WHITEOUT):
            log.debug(f"skipping aufs metadata entry {WHITEOUT}{target}")
            return Entry(SKIP, k)
        if target in ("", ".", ".."):
            raise BadEntry("invalid whiteout name")
        return Entry(HIDE, k, parent, target)
    if k == DEVICE:
        # Never mknod on the host; the runtime mounts nodev anyway.
        log.tally("device nodes in layers skipped (the runtime provides /dev)", show(name))
        return Entry(SKIP, k)
    if k == UNKNOWN:
        log.warn(f"skipping entry of unknown type {tar_type!r} in layer: {show(name)}")
        return Entry(SKIP, k)
    link: Key = ()
    if k == SYM:
        if not linkname or "\0" in linkname or len(os.fsencode(linkname)) >= PATH_MAX:
            raise BadEntry("symlink target is empty, too long or has a NUL byte")
    elif k == LINK:
        link = clean(linkname, "hardlink target")
        if not link:
            raise BadEntry("hardlink to the root directory")
    return Entry(NODE, k, parent, base, link)


def missing_link(linkname: str) -> BadEntry:
    """The error for a hardlink whose target is not in the rootfs."""
    return BadEntry(f"hardlink target not in the rootfs: {show(linkname)}")


def check_link(target_kind: str | None, linkname: str, target: Key, key: Key) -> bool:
    """May the hardlink entry at real path ``key`` link to ``target`` (its real path),
    found in the rootfs as ``target_kind`` (None: missing)? False: it is that entry
    already, nothing to do; :class:`BadEntry` if no layer may hold it."""
    if target_kind is None:
        raise missing_link(linkname)
    if target_kind == DIR:
        raise BadEntry(f"hardlink target is a directory: {show(linkname)}")
    if target == key:
        return False
    if target[: len(key)] == key:
        # The entry replaces the directory that holds its own target.
        raise missing_link(linkname)
    return True


class Touched:
    """The real paths one layer wrote, with all their ancestors: its whiteouts and
    opaque markers hide only what is not in here (lower layers' content).

    ``everything``: the layer of a one-layer image, whose whiteouts can only hide what the
    same layer wrote (which they never do), so every key counts as written and none is
    stored."""

    __slots__ = ("_everything", "_keys")

    def __init__(self, *, everything: bool = False) -> None:
        self._everything = everything
        self._keys: set[Key] = {()}

    def add(self, key: Key) -> None:
        if not self._everything:
            self._keys.update(key[:i] for i in range(len(key) + 1))

    def __contains__(self, key: Key) -> bool:
        return self._everything or key in self._keys


H = TypeVar("H")


class Tree(Protocol[H]):
    """An engine's medium, as :func:`hide_lower` needs it: directories by handle."""

    def names(self, d: H) -> Iterable[str]:
        """The names in directory ``d``."""
        ...

    def subdir(self, d: H, name: str) -> H | None:
        """A handle on ``name`` in ``d`` if it is a directory (not a symlink), else None."""
        ...

    def release(self, d: H) -> None:
        """Done with a handle :meth:`subdir` returned."""
        ...

    def remove(self, d: H, name: str) -> None:
        """Remove ``name`` from ``d`` whatever it is, with its tree; nothing if missing."""
        ...


def hide_lower(
    tree: Tree[H], d: H, real: Key, names: Iterable[str] | None, touched: Touched
) -> None:
    """Apply a whiteout in directory ``d`` (real path ``real``): remove each of ``names``
    (None: every name, an opaque marker) unless this layer wrote it, and descend where it
    wrote inside, so that only lower layers' content goes."""
    # A name of None is a marker: every name below that directory is done, release it.
    todo: list[tuple[H, str | None, Key]] = [
        (d, n, (*real, n)) for n in reversed(list(tree.names(d) if names is None else names))
    ]
    try:
        while todo:
            parent, item, key = todo.pop()
            if item is None:
                tree.release(parent)
            elif key not in touched:
                tree.remove(parent, item)
            elif (sub := tree.subdir(parent, item)) is not None:
                todo.append((sub, None, key))
                todo.extend((sub, c, (*key, c)) for c in reversed(list(tree.names(sub))))
    finally:
        for parent, item, _ in todo:
            if item is None:
                tree.release(parent)
