"""``Bootstrap: docker``: an image from an OCI registry (``From:``, ``Registry:``,
``Namespace:``), through sifpy's registry client and its shared blob cache.

The layers are fetched (in parallel, digests verified, cached), then applied to the
stage's root with the same safe layer code as every other OCI source; the image config
becomes the metadata (environment, runscript, labels) in the build. Transport settings
come from the environment, as Apptainer's: ``SIFPY_NOHTTPS`` / ``APPTAINER_NOHTTPS``
(plain http), ``SIFPY_DOCKER_CA_CERT`` (a private CA), ``SIFPY_DOCKER_ARCH``.
"""

from __future__ import annotations

from sifpy import config
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.rootfs.limits import Budget
from sifpy.rootfs.unpack import apply_layer
from sifpy.util import log, progress


def bootstrap(ctx: Context) -> Result:
    from sifpy.oci.auth import lookup_credentials
    from sifpy.oci.cache import Cache
    from sifpy.oci.download import download
    from sifpy.oci.progress import layer_progress
    from sifpy.oci.reference import parse_platform, parse_reference
    from sifpy.oci.registry import RegistryClient
    from sifpy.oci.session import ClientOptions

    ref = parse_reference(
        ctx.require("From"),
        registry=ctx.stage.get("Registry") or None,
        namespace=ctx.stage.get("Namespace") or None,
    )
    platform = parse_platform(None, config.get("SIFPY_DOCKER_ARCH"))
    options = ClientOptions(
        insecure=config.flag("SIFPY_NOHTTPS"),
        ca_cert=config.get("SIFPY_DOCKER_CA_CERT"),
    )
    cache = Cache()
    log.info(f"fetching {ref} ({platform})")
    with RegistryClient(ref.registry, options, lookup_credentials(ref.registry)) as client:
        image = client.resolve(ref, platform)
        with layer_progress() as bar:
            layers = download(client, image, cache, bar)
    budget = Budget(ctx.rootfs)  # all layers together
    with progress.step(f"applying {len(layers)} layers of {image.digest[:19]}") as bar:
        for i, layer in enumerate(layers, 1):
            apply_layer(ctx.rootfs, layer, budget=budget)
            bar.update(i, len(layers))
    labels = {
        "org.opencontainers.image.base.name": str(ref),
        "org.opencontainers.image.base.digest": image.digest,
    }
    return Result(config=image.config_json, labels=labels)
