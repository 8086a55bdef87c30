"""``sifpy overlay create [--size MiB] [--sparse] [--create-dir DIR]... IMAGE``: an ext3
overlay image, as ``apptainer overlay create`` writes it (use it with ``--overlay IMAGE``)."""

from __future__ import annotations

from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    from sifpy.rootfs.overlay import SIZE_DEFAULT_MIB

    p = ArgumentParser(prog=prog, description="Create an ext3 overlay image.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("create", help="create an overlay image (ext3, with upper/ and work/)")
    c.add_argument(
        "-s", "--size", type=int, default=SIZE_DEFAULT_MIB, help="size in MiB (default 64)"
    )
    c.add_argument("--sparse", action="store_true", help="a sparse file (blocks on demand)")
    c.add_argument(
        "--create-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory to create in the overlay (repeatable)",
    )
    c.add_argument("image", help="the overlay image file to create")
    return p


def main(argv: list[str], prog: str = "sifpy overlay") -> int:
    """Run ``sifpy overlay``."""
    a = build_parser(prog).parse_args(argv)
    from sifpy.rootfs import overlay
    from sifpy.rootfs.bootstrap.local import is_sif

    if is_sif(a.image):
        raise UsageError(
            f"can't add an overlay to {a.image}: overlays inside a SIF are not supported yet",
            hint="create a separate overlay image file",
        )
    overlay.create(a.image, a.size, a.sparse, tuple(a.create_dir))
    log.info(f"created {a.image} ({a.size} MiB, ext3)")
    return 0
