"""Squashfs images: pack a root filesystem (:mod:`.pack`), extract one back."""

from sifpy.squashfs.pack import COMPRESSORS, extract, pack

__all__ = ["COMPRESSORS", "extract", "pack"]
