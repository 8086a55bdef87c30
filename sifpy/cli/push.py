"""``sifpy push [--insecure] [--ca-cert FILE] [--chunk-size N] app.sif oras://host/repo:tag``
or ``docker://host/repo:tag``.

With ``oras://`` the SIF file becomes an OCI artifact with Apptainer's media types
(:mod:`sifpy.oci.oras`); with ``docker://`` the image is exported as an OCI image of one
layer (:mod:`sifpy.export`) that any OCI tool can pull and run.
Progress is a rich bar when stderr is a terminal, plain lines otherwise, nothing with
``-q``.
"""

from __future__ import annotations

from sifpy import TYPE_CHECKING
from sifpy.cli._args import ArgumentParser, add_registry_options
from sifpy.errors import UsageError
from sifpy.oci.progress import transfer_progress
from sifpy.util import log

if TYPE_CHECKING:
    from sifpy.oci.session import ClientOptions


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="Push a SIF file to an OCI registry (oras:// or docker://)."
    )
    add_registry_options(p)
    p.add_argument(
        "--chunk-size",
        metavar="BYTES",
        type=_size_arg,
        default=None,
        help="upload in chunks of this size (e.g. 16M; default 32M); smaller files go in one "
        "request",
    )
    p.add_argument("image", help="the SIF file to push")
    p.add_argument("target", help="oras://host[:port]/name:tag or docker://host[:port]/name:tag")
    return p


def _size_arg(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"invalid size: {text!r}", "a positive number of bytes, e.g. 16M")
    return int(number) * units[unit]


def main(argv: list[str], prog: str = "sifpy push") -> int:
    """Run ``sifpy push``."""
    a = build_parser(prog).parse_args(argv)
    from sifpy.oci.session import ClientOptions

    if a.target.startswith("docker://"):
        return _push_docker(
            a.image, a.target, ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert), a.chunk_size
        )
    if not a.target.startswith("oras://"):
        raise UsageError(
            f"can't push to {a.target}: only oras:// and docker:// are supported",
            "oras://host/name:tag (the SIF file) or docker://host/name:tag (an OCI image)",
        )
    from sifpy.oci import oras

    ref = oras.parse_oras(a.target)
    options = ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert)
    chunk = a.chunk_size or oras.DEFAULT_CHUNK
    log.info(f"pushing {a.image} to oras://{ref}")
    with transfer_progress("uploaded") as bar:
        digest = oras.push(a.image, ref, options=options, chunk_size=chunk, progress=bar)
    log.info(f"pushed oras://{ref} ({digest})")
    return 0


def _push_docker(image: str, target: str, options: ClientOptions, chunk: int | None) -> int:
    """The SIF exported as an OCI image and pushed as ``docker://`` names it."""
    from sifpy.export import push
    from sifpy.oci.reference import parse_reference

    ref = parse_reference(target)
    log.info(f"pushing {image} to docker://{ref}")
    with transfer_progress("uploaded") as bar:
        digest = push(image, ref, options, bar, chunk)
    log.info(f"pushed docker://{ref} ({digest})")
    return 0
