"""The SIF container format: declarations (:mod:`.format`), reading (:mod:`.image`) and
atomic writing (:mod:`.write`)."""

from sifpy.sif.image import Descriptor, SifImage
from sifpy.sif.write import ObjectInput, add_object, create, delete_object, set_primary

__all__ = [
    "Descriptor",
    "ObjectInput",
    "SifImage",
    "add_object",
    "create",
    "delete_object",
    "set_primary",
]
