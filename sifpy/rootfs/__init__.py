"""Root filesystems: safe OCI layer application (:mod:`sifpy.rootfs.unpack`).

``apply_layers(rootfs, layers)`` turns a stack of layer tars into a directory tree
without ever writing outside it.
"""

from sifpy.rootfs.unpack import apply_layer, apply_layers

__all__ = ["apply_layer", "apply_layers"]
