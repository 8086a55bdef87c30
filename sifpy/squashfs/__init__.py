"""Squashfs images: pack a root filesystem (:mod:`.pack`), extract one back."""

from sifpy.squashfs.pack import (
    COMPRESSORS,
    DEFAULT_COMPRESSION,
    compression_args,
    default_compression,
    extract,
    pack,
    parse_compression,
)

__all__ = [
    "COMPRESSORS",
    "DEFAULT_COMPRESSION",
    "compression_args",
    "default_compression",
    "extract",
    "pack",
    "parse_compression",
]
