"""The only code that unshares, mounts, pivots or execs.

:mod:`.ns` wraps the kernel calls and probes for them, :mod:`.mount` mounts images and
assembles the container root, :mod:`.start` enters the namespaces and serves the image early,
:mod:`.process` owns the process structure and the exit status (:func:`launch`).
Imports stay few here: this is the hot path of ``sifpy exec``. The names below are loaded
on first use, so that ``sifpy exec`` can serve the image (:mod:`.start`) before it imports
the rest.
"""

from __future__ import annotations

from sifpy import TYPE_CHECKING

if TYPE_CHECKING:
    from sifpy.runtime.process import launch
    from sifpy.runtime.spec import LaunchOptions, LaunchSpec
    from sifpy.runtime.start import Identity, Sandbox, SifPartition, host_identity

__all__ = [
    "Identity",
    "LaunchOptions",
    "LaunchSpec",
    "Sandbox",
    "SifPartition",
    "host_identity",
    "launch",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'sifpy.runtime' has no attribute {name!r}")
    # Each name from the module that owns it (all three are on the exec path anyway).
    from sifpy.runtime import process, spec, start

    owner = process if name == "launch" else spec if name.startswith("Launch") else start
    value = getattr(owner, name)
    globals()[name] = value
    return value
