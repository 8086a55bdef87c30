"""``sifpy build``: from a definition file (or an image) to a SIF or a sandbox.

The only package that knows the order of build stages. Per stage, Apptainer's order
(internal/pkg/build/build.go ``Full``):

1. bootstrap agent (:mod:`sifpy.rootfs.bootstrap`), then the base environment and the
   Docker/OCI config as metadata (:mod:`sifpy.rootfs.metadata`);
2. SCIF apps: their tree, and ``%appinstall`` appended to ``%post``;
3. ``%files from <stage>``;  4. ``%setup`` on the host;  5. ``%files`` (and ``%appfiles``);
6. ``%post`` in the container (through :func:`sifpy.runtime.launch`, as ``sifpy exec``);
7. metadata: help, labels, the definition file, environment, runscript, startscript, test;
8. ``%test`` unless ``--notest``.

Only the last stage is assembled: packed into a squashfs and stored in a SIF with the
definition file and ``inspect-metadata.json``, or moved into place as a sandbox.

The modules, one job each:

* :mod:`~sifpy.build.pipeline`: :func:`~sifpy.build.pipeline.build`, the whole build in order;
* :mod:`~sifpy.build.options`: the ``sifpy build`` flags;
* :mod:`~sifpy.build.workspace`: the private work directory, its lock and its clean-up;
* :mod:`~sifpy.build.sections`: one stage: bootstrap, ``%files``, ``%setup``, ``%post``,
  metadata, ``%test``;
* :mod:`~sifpy.build.container`: running ``%post`` and ``%test`` in the container;
* :mod:`~sifpy.build.output`: the finished rootfs as a SIF or a sandbox.
"""
