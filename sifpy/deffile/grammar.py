"""The vocabulary of Apptainer definition files: header keywords and section names.

Mirrors ``validHeaders``, ``validSections`` and ``appSections`` in
apptainer/apptainer:pkg/build/types/parser/deffile.go. Keywords are matched
case-insensitively there; sifpy keeps one canonical spelling (the userdocs one).
"""

from __future__ import annotations

import re

# lowercased keyword -> canonical spelling, in the order Apptainer lists them.
HEADER_KEYWORDS: dict[str, str] = {
    k.lower(): k
    for k in (
        "Bootstrap",
        "From",
        "IncludeCmd",
        "MirrorURL",
        "UpdateURL",
        "OSVersion",
        "Include",
        "Library",
        "Registry",
        "Namespace",
        "Stage",
        "Product",
        "User",
        "Regcode",
        "ProductPGP",
        "RegisterURL",
        "Modules",
        "Fingerprints",
        "ConfURL",
        "Setopt",
        "Target",
        "Frontend",
        "Filename",
        "BuildArgs",
    )
}

# `otherurl<N>` (zypper): Apptainer rewrites a trailing run of digits to `&n`.
_OTHERURL = re.compile(r"otherurl([0-9]+)")

# Sections that take no app name, in Apptainer's order.
STAGE_SECTIONS: tuple[str, ...] = (
    "help",
    "setup",
    "files",
    "labels",
    "environment",
    "pre",
    "post",
    "runscript",
    "test",
    "startscript",
    "arguments",
)

# SCIF app sections: `%appX <app name>` (internal/pkg/build/apps/apps.go).
APP_SECTIONS: tuple[str, ...] = (
    "appinstall",
    "applabels",
    "appfiles",
    "appenv",
    "apptest",
    "apphelp",
    "apprun",
    "appstart",
)

ALL_SECTIONS: tuple[str, ...] = STAGE_SECTIONS + APP_SECTIONS

# Sections whose body lines starting with `#` are comments (deffile.go, args.go);
# every other body is handed to a shell or written out verbatim.
DATA_SECTIONS = frozenset({"files", "appfiles", "labels", "applabels", "arguments"})


def canonical_keyword(key: str) -> str | None:
    """The canonical spelling of header keyword ``key``, or None if it is not one."""
    if not key.isascii():  # str.lower() would fold e.g. KELVIN SIGN into "k"
        return None
    low = key.lower()
    if low in HEADER_KEYWORDS:
        return HEADER_KEYWORDS[low]
    match = _OTHERURL.fullmatch(low)
    return f"OtherURL{match.group(1)}" if match else None
