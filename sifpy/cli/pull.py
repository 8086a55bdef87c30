"""``sifpy pull [--force] [--arch A] [--platform P] out.sif docker://...`` (or ``oras://...``).

Layers download in parallel; progress is a rich bar per layer when stderr is a terminal,
one plain line per layer otherwise, and nothing with ``-q``.
"""

from __future__ import annotations

from argparse import Namespace

from sifpy import config
from sifpy.cli._args import ArgumentParser, add_registry_options
from sifpy.errors import UsageError
from sifpy.oci.progress import layer_progress, transfer_progress
from sifpy.oci.reference import Platform, Reference, parse_platform, parse_reference
from sifpy.oci.session import ClientOptions
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Pull a container image into a SIF file.")
    p.add_argument("-F", "--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--arch", help="architecture to pull (amd64, arm64, arm/v7, ...)")
    p.add_argument("--platform", help="platform to pull: os/arch[/variant]")
    add_registry_options(p)
    p.add_argument("--no-cache", action="store_true", help="don't reuse a cached SIF")
    p.add_argument(
        "--oci",
        action="store_true",
        help="write an OCI-SIF (the image as OCI blobs, its layer a squashfs), as Apptainer's "
        "--oci mode",
    )
    p.add_argument(
        "output",
        nargs="?",
        help="the SIF file to write (default: NAME_TAG.sif in the current directory)",
    )
    p.add_argument("image", help="docker://[registry/]name[:tag][@digest] or oras://host/name:tag")
    return p


def _pull_oras(a: Namespace) -> int:
    """``sifpy pull out.sif oras://host/name:tag``: the SIF artifact, byte for byte."""
    from sifpy.oci import oras

    ref = oras.parse_oras(a.image)
    options = ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert)
    log.info(f"pulling oras://{ref}")
    with transfer_progress("downloaded") as bar:
        digest = oras.pull(ref, a.output, options=options, force=a.force, progress=bar)
    log.info(f"wrote {a.output} ({digest})")
    return 0


def _pull_oci(a: Namespace, ref: Reference, platform: Platform, options: ClientOptions) -> int:
    """``--oci``: the native SIF (pulled, or from the SIF cache) becomes an OCI-SIF whose one
    layer is its squashfs."""
    import tempfile
    from pathlib import Path

    from sifpy.export import write_ocisif
    from sifpy.oci.cache import output_path
    from sifpy.pull import pull

    out = output_path(a.output, a.force)  # refuses an existing file before the download
    with tempfile.TemporaryDirectory(prefix="sifpy-pull-oci-") as tmp:
        with layer_progress() as bar:
            result = pull(ref, Path(tmp) / "native.sif", platform=platform, options=options,
                          progress=bar, use_sif_cache=not a.no_cache)  # fmt: skip
        digest = write_ocisif(result.path, out)
    log.info(f"wrote {out} (OCI-SIF, manifest {digest}, from {result.digest})")
    return 0


def main(argv: list[str], prog: str = "sifpy pull") -> int:
    """Run ``sifpy pull``."""
    a = build_parser(prog).parse_args(argv)
    if a.output is None:  # Apptainer's name: docker://debian:bookworm -> debian_bookworm.sif
        from sifpy.oci.reference import default_sif_name

        a.output = default_sif_name(a.image)
    if a.image.startswith("oras://"):
        if a.oci:
            raise UsageError(
                f"can't pull {a.image} with --oci: an oras:// artifact is a SIF file already",
                "pull it without --oci, or pull a docker:// image with --oci",
            )
        return _pull_oras(a)
    if a.image.startswith("library://"):
        raise UsageError(f"can't pull {a.image}: only docker:// and oras:// are supported")
    ref = parse_reference(a.image)
    platform = parse_platform(a.platform, a.arch)
    options = ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert)
    from sifpy.pull import pull

    log.info(f"pulling {ref} ({platform})")
    if a.oci:
        return _pull_oci(a, ref, platform, options)
    # Plain lines go through log.info, so -q silences them; a bar only on a terminal.
    with layer_progress() as bar:
        result = pull(
            ref,
            a.output,
            platform=platform,
            options=options,
            force=a.force,
            progress=bar,
            use_sif_cache=not a.no_cache,
        )
    suffix = ", from the cache" if result.cached else ""
    log.info(f"wrote {result.path} ({result.digest}{suffix})")
    return 0


def pull_to_cache(image: str) -> str:
    """The cached SIF of ``docker://...`` (pulled into the cache first if needed), for
    ``sifpy exec|run|shell|test docker://...`` as Apptainer does. Plain http only with
    ``$SIFPY_NOHTTPS``/``$APPTAINER_NOHTTPS``, as for ``Bootstrap: docker``."""

    if not image.startswith("docker://"):
        raise UsageError(
            f"can't run {image}: only docker:// images run directly",
            hint=f"pull it into a file first: sifpy pull {image}",
        )
    ref = parse_reference(image)
    platform = parse_platform()
    options = ClientOptions(
        insecure=config.flag("SIFPY_NOHTTPS"), ca_cert=config.get("SIFPY_DOCKER_CA_CERT")
    )
    import signal

    from sifpy.errors import Interrupted
    from sifpy.pull import pull

    # exec/run/shell keep the default SIGTERM (their monitor relays signals to the
    # container); while the image is pulled, it stops the pull as for `sifpy pull`.
    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with layer_progress() as bar:
            result = pull(ref, None, platform=platform, options=options, progress=bar)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not result.cached:
        log.info(f"cached {ref} as {result.path}")
    return str(result.path)
