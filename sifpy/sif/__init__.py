"""The SIF container format: declarations (:mod:`.format`), reading (:mod:`.image`) and
atomic writing (:mod:`.write` creates, :mod:`.modify` changes; :mod:`.objects`,
:mod:`.table` and :mod:`.atomic` under both).

Names are loaded on first use, so that ``sifpy exec`` (which only reads) never imports
the writer.
"""

from __future__ import annotations

import sys

from sifpy import TYPE_CHECKING

if TYPE_CHECKING:
    from sifpy.sif.image import Descriptor as Descriptor
    from sifpy.sif.image import SifImage as SifImage
    from sifpy.sif.modify import add_object as add_object
    from sifpy.sif.modify import delete_object as delete_object
    from sifpy.sif.modify import set_primary as set_primary
    from sifpy.sif.objects import ObjectInput as ObjectInput
    from sifpy.sif.write import create as create

_WHERE = {
    "Descriptor": "sifpy.sif.image",
    "SifImage": "sifpy.sif.image",
    "ObjectInput": "sifpy.sif.objects",
    "add_object": "sifpy.sif.modify",
    "create": "sifpy.sif.write",
    "delete_object": "sifpy.sif.modify",
    "set_primary": "sifpy.sif.modify",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name in _WHERE:
        __import__(_WHERE[name])
        return getattr(sys.modules[_WHERE[name]], name)
    raise AttributeError(f"module 'sifpy.sif' has no attribute {name!r}")
