"""The SIF container format: declarations (:mod:`.format`), reading (:mod:`.image`) and
atomic writing (:mod:`.write`).

Names are loaded on first use, so that ``sifpy exec`` (which only reads) never imports
the writer.
"""

from __future__ import annotations

import sys

from sifpy import TYPE_CHECKING

if TYPE_CHECKING:
    from sifpy.sif.image import Descriptor as Descriptor
    from sifpy.sif.image import SifImage as SifImage
    from sifpy.sif.write import ObjectInput as ObjectInput
    from sifpy.sif.write import add_object as add_object
    from sifpy.sif.write import create as create
    from sifpy.sif.write import delete_object as delete_object
    from sifpy.sif.write import set_primary as set_primary

_WHERE = {
    "Descriptor": "sifpy.sif.image",
    "SifImage": "sifpy.sif.image",
    "ObjectInput": "sifpy.sif.write",
    "add_object": "sifpy.sif.write",
    "create": "sifpy.sif.write",
    "delete_object": "sifpy.sif.write",
    "set_primary": "sifpy.sif.write",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name in _WHERE:
        __import__(_WHERE[name])
        return getattr(sys.modules[_WHERE[name]], name)
    raise AttributeError(f"module 'sifpy.sif' has no attribute {name!r}")
