"""The only code that unshares, mounts, pivots or execs.

:mod:`.ns` wraps the kernel calls and probes for them, :mod:`.mount` mounts images and
assembles the container root, :mod:`.launch` owns the process structure and the exit status.
Imports stay lean here: this is the hot path of ``sifpy exec``.
"""

from sifpy.runtime.launch import (
    Identity,
    LaunchOptions,
    LaunchSpec,
    Sandbox,
    SifPartition,
    host_identity,
    launch,
)

__all__ = [
    "Identity",
    "LaunchOptions",
    "LaunchSpec",
    "Sandbox",
    "SifPartition",
    "host_identity",
    "launch",
]
