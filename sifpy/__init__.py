"""sifpy: build and run SIF container images for HPC, unprivileged.

The data flow, and the module for each stage::

    app.def --deffile.parse--> Recipe                      (sifpy.deffile)
    Recipe.header --bootstrap agent--> layers / rootfs     (sifpy.rootfs, sifpy.oci)
    layers --rootfs.unpack--> rootfs dir --%post (runtime)--> finished rootfs
    rootfs --squashfs.pack--> .sqfs --sif.create--> app.sif (sifpy.squashfs, sifpy.sif)
    app.sif --runtime.launch--> the command's exit status   (sifpy.runtime)
    app.sif --squashfs.tree, rootfs.treetar--> OCI image     (sifpy.export: oci:, docker://,
                                                             and OCI-SIF, sifpy.sif.ocisif)
    OCI bundle --runtime.bundle--> the same launch          (sifpy.runtime.oci, `sifpy oci`)

Errors come from one tree (:mod:`sifpy.errors`); only :mod:`sifpy.cli` prints and exits.
The SIF format itself is declared in :mod:`sifpy.sif.format` and used through
:class:`sifpy.sif.SifImage`.
"""

__version__ = "0.1.0"

# `if TYPE_CHECKING:` blocks hold the imports that only type checkers need; sifpy's modules
# import this one flag (mypy and ruff treat any name TYPE_CHECKING as typing's) because
# importing typing costs ~7.6 ms (python -X importtime -I -S -c 'import typing', 2-CPU
# Xeon), paid on every start of `sifpy exec`.
TYPE_CHECKING = False
