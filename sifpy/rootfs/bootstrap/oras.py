"""``Bootstrap: oras``: a SIF stored in an OCI registry as an ORAS artifact (``From:
host/name:tag``, with or without ``oras://``), then used like ``Bootstrap: localimage``.

The SIF is fetched through the verified blob cache into the stage's private work
directory; ``Fingerprints:`` are checked on it (through the same open file that is
extracted) before anything from it reaches the root file system. Transport settings as
for ``Bootstrap: docker`` (``SIFPY_NOHTTPS``, ``SIFPY_DOCKER_CA_CERT``).
"""

from __future__ import annotations

import os

from sifpy import config
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.rootfs.bootstrap.local import keep_history, parse_fingerprints, unpack_sif
from sifpy.util import log


def bootstrap(ctx: Context) -> Result:
    from sifpy.oci import oras
    from sifpy.oci.session import ClientOptions

    source = ctx.require("From")
    ref = oras.parse_oras(source if source.startswith("oras://") else f"oras://{source}")
    options = ClientOptions(
        insecure=config.flag("SIFPY_NOHTTPS"),
        ca_cert=config.get("SIFPY_DOCKER_CA_CERT"),
    )
    sif = os.path.join(ctx.workdir, "oras-base.sif")
    log.info(f"fetching oras://{ref}")
    digest = oras.pull(ref, sif, options=options, force=True)
    unpack_sif(sif, ctx.rootfs, parse_fingerprints(ctx.stage.get("fingerprints") or ""))
    keep_history(ctx.rootfs)
    return Result(labels={"org.opencontainers.image.base.name": f"oras://{ref}",
                          "org.opencontainers.image.base.digest": digest})  # fmt: skip
