"""``sifpy export IMG.sif oci:DIR[:tag]`` or ``oci-archive:FILE.tar[:tag]``.

The image becomes an OCI image of one layer (its tree as a tar), with its environment,
runscript and labels in the image config: what skopeo, umoci, podman or a registry read.
"""

from __future__ import annotations

from sifpy.cli._args import ArgumentParser
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Export a SIF image as an OCI image (an image layout or its tar).",
    )
    p.add_argument("image", help="the SIF file to export")
    p.add_argument("destination", help="oci:DIR[:tag] or oci-archive:FILE.tar[:tag] (tag: latest)")
    return p


def main(argv: list[str], prog: str = "sifpy export") -> int:
    """Run ``sifpy export``."""
    a = build_parser(prog).parse_args(argv)
    from sifpy.export import export

    log.info(f"exporting {a.image} to {a.destination}")
    digest, tag = export(a.image, a.destination)
    log.info(f"wrote {a.destination} (tag {tag}, {digest})")
    return 0
