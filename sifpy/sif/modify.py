"""Changing a SIF: add an object, delete an object, set the primary partition. Each
change is made to a clone of the image and swapped in atomically (:mod:`sifpy.sif.atomic`);
the original is untouched when nothing changes or anything fails."""

from __future__ import annotations

import os
from collections.abc import Callable

from sifpy.sif.atomic import AtomicFile, clone, dest_error
from sifpy.sif.image import SifImage
from sifpy.sif.objects import ObjectInput
from sifpy.sif.table import Writer
from sifpy.sif.write import times


def modify(path: str | os.PathLike[str], change: Callable[[Writer], bool]) -> None:
    """Apply ``change`` to a clone of the image and swap it in atomically.

    ``change`` returns False when nothing changed (then the original stays untouched).
    """
    p = os.fspath(path)
    with SifImage.open(p) as img:
        st = os.fstat(img.fd)
        with AtomicFile(p, st.st_mode & 0o7777) as out:
            try:
                clone(img.fd, out.fd)
                w = Writer.load(out.fd, p)
                if not change(w):
                    return
                w.flush()
                out.commit(like=st)
            except OSError as exc:
                raise dest_error(p, exc) from exc


def add_object(
    path: str | os.PathLike[str],
    obj: ObjectInput,
    *,
    deterministic: bool = False,
    t: int | None = None,
) -> int:
    """Add ``obj`` to the image at ``path``; returns the new object's id."""
    when = times(deterministic, t)
    new_id = 0

    def change(w: Writer) -> bool:
        nonlocal new_id
        new_id = w.add(obj, when)
        w.h = w.h.replace(modified_at=when)
        return True

    modify(path, change)
    return new_id


def delete_object(
    path: str | os.PathLike[str],
    object_id: int,
    *,
    zero: bool = False,
    compact: bool = False,
    deterministic: bool = False,
    t: int | None = None,
) -> None:
    """Delete an object: clear its descriptor; ``zero`` its data; ``compact`` if last."""
    when = times(deterministic, t)

    def change(w: Writer) -> bool:
        w.delete(object_id, zero, compact)
        w.h = w.h.replace(modified_at=when)
        return True

    modify(path, change)


def set_primary(
    path: str | os.PathLike[str],
    object_id: int,
    *,
    deterministic: bool = False,
    t: int | None = None,
) -> None:
    """Make the System partition ``object_id`` the primary one (the old one becomes System)."""
    when = times(deterministic, t)

    def change(w: Writer) -> bool:
        if not w.set_primary(object_id):
            return False
        w.h = w.h.replace(modified_at=when)
        return True

    modify(path, change)
