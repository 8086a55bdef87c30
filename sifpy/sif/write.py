"""Creating a SIF: a new image holding the given objects, written atomically
(:mod:`sifpy.sif.atomic`) in the layout of :mod:`sifpy.sif.table`. Deterministic mode (nil
UUID, Go's zero time) gives byte-exact golden files. Changing an existing image:
:mod:`sifpy.sif.modify`.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Iterable

from sifpy.errors import UsageError
from sifpy.sif import format as F
from sifpy.sif.atomic import AtomicFile, dest_error
from sifpy.sif.objects import ObjectInput
from sifpy.sif.table import Writer


def now() -> int:
    return int(_time.time())


def times(deterministic: bool, t: int | None) -> int:
    if t is not None:
        return t
    return F.ZERO_TIME if deterministic else now()


def create(
    path: str | os.PathLike[str],
    objects: Iterable[ObjectInput] = (),
    *,
    launch_script: str = "",
    deterministic: bool = False,
    image_id: bytes | None = None,
    t: int | None = None,
    capacity: int = F.DEFAULT_DESCRIPTOR_CAPACITY,
    descriptors_offset: int = F.DEFAULT_DESCRIPTORS_OFFSET,
    mode: int = 0o755,
) -> None:
    """Create a SIF at ``path`` holding ``objects``, atomically (replacing any old file)."""
    script = launch_script.encode("utf-8")
    if len(script) >= F.HDR_LAUNCH_LEN:
        raise UsageError(f"launch script too large (at most {F.HDR_LAUNCH_LEN - 1} bytes)")
    if not 0 <= capacity <= 1 << 16:
        raise UsageError(f"descriptor capacity out of range: {capacity}")
    if image_id is None:
        image_id = bytes(16) if deterministic else _random_uuid()
    if len(image_id) != 16:
        raise UsageError("an image id is 16 bytes")
    when = times(deterministic, t)
    size = capacity * F.RawDescriptor.SIZE
    header = F.Header(
        launch_script=script,
        magic=F.HDR_MAGIC,
        version=F.HDR_VERSION,
        arch=F.ARCH_UNKNOWN,
        id=image_id,
        created_at=when,
        modified_at=when,
        descriptors_free=capacity,
        descriptors_total=capacity,
        descriptors_offset=descriptors_offset,
        descriptors_size=size,
        data_offset=descriptors_offset + size,
        data_size=0,
    )
    with AtomicFile(path, mode) as out:
        try:
            w = Writer(out.fd, header, [F.EMPTY_DESCRIPTOR] * capacity)
            for obj in objects:
                w.add(obj, when)
            w.flush()
            out.commit()
        except OSError as exc:
            raise dest_error(os.fspath(path), exc) from exc


def _random_uuid() -> bytes:
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bytes(b)
