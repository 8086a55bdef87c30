"""The ``sifpy build`` flags, as the pipeline and its stages read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SECTIONS = frozenset({"all", "none", "setup", "post", "files", "environment", "test", "labels"})


@dataclass
class BuildOptions:
    """The ``sifpy build`` flags (Apptainer's cmd/internal/cli/build.go)."""

    sandbox: bool = False
    force: bool = False
    update: bool = False
    notest: bool = False
    sections: frozenset[str] = frozenset({"all"})
    tmpdir: str | None = None
    fakeroot: bool = False
    compression: str | None = None  # NAME[:LEVEL]; None: $SIFPY_COMPRESSION or zstd:3
    mksquashfs_args: str = ""
    build_args: dict[str, str] = field(default_factory=dict)
    warn_unused_build_args: bool = False
    no_cleanup: bool = False  # keep the work directory of a failed build
    fix_perms: bool = False  # give the owner rwX on everything the base image holds
    binds: tuple[tuple[str, str, bool], ...] = ()  # (src, dest, read-only) for %post, %test
    # --nv, --nvccli, --rocm: the host's GPU driver in %post and %test (a runtime.gpu
    # Injection: bound, never copied into the image)
    inject: Any = None

    def wants(self, section: str) -> bool:
        return "all" in self.sections or section in self.sections
