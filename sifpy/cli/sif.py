"""``sifpy sif``: inspect and edit SIF files, mirroring the reference ``siftool``.

Text output matches ``siftool`` byte for byte (the tests compare both), so scripts written
for one work with the other; ``list`` and ``header`` also speak ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError
from sifpy.sif import ObjectInput, SifImage, add_object, create, delete_object, set_primary
from sifpy.sif import format as F
from sifpy.sif.image import Descriptor

# siftool's numbering of data types on the command line (1-Deffile ... 9-SBOM), plus the
# two OCI types newer SIF versions define.
CLI_DATA_TYPES = dict(enumerate(F.DATA_TYPE_NAMES, start=1))
SBOM_BY_NAME: dict[str, int] = {name: fmt for fmt, name in F.SBOM_FORMAT_NAMES.items()} | {
    "github": F.SBOMFormat.GITHUB_JSON
}


# --- text rendering, as siftool (internal/app/siftool/info.go) --------------------------


def _go_time(t: int) -> str | None:
    """Go's ``time.Time.UTC().String()`` for a Unix time; None for Go's zero time."""
    if t == F.ZERO_TIME:
        return None
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
    except (OverflowError, ValueError, OSError):
        return f"@{t}"


def readable_size(size: int) -> str:
    """siftool's readableSize: ``123 B``, ``27 KiB`` (rounded half away from zero)."""
    if -1024 < size < 1024:
        return f"{size} B"
    div, exp = 1024, 0
    n = int(size / 1024)
    while n <= -1024 or n >= 1024:
        div *= 1024
        exp += 1
        n = int(n / 1024)
    q = abs(size) / div
    rounded = int(q + 0.5) * (1 if size >= 0 else -1)
    return f"{rounded} {'KMGTPE'[exp]}iB"


def _table(rows: list[tuple[str, str]], padding: int, indent: bool) -> str:
    """Go text/tabwriter with one tab-terminated key column (and an empty one if indent)."""
    width = max((len(k) for k, _ in rows), default=0) + padding
    lead = " " * padding if indent else ""
    return "".join(f"{lead}{k.ljust(width)}{v}\n" for k, v in rows)


def render_header(img: SifImage) -> str:
    h = img.header
    rows: list[tuple[str, str]] = []
    if img.launch_script:
        rows.append(("Launch Script:", img.launch_script.removesuffix("\n")))
    rows.append(("Version:", img.version))
    if img.primary_arch != "unknown":
        rows.append(("Primary Architecture:", img.primary_arch))
    if h.id != bytes(16):
        rows.append(("ID:", img.uuid))
    for label, t in (("Created At:", h.created_at), ("Modified At:", h.modified_at)):
        if (text := _go_time(t)) is not None:
            rows.append((label, text))
    rows += [
        ("Descriptors Free:", str(h.descriptors_free)),
        ("Descriptors Total:", str(h.descriptors_total)),
        ("Descriptors Offset:", str(h.descriptors_offset)),
        ("Descriptors Size:", readable_size(h.descriptors_size)),
        ("Data Offset:", str(h.data_offset)),
        ("Data Size:", readable_size(h.data_size)),
    ]
    return _table(rows, padding=1, indent=False)


def _enum_name(names: Mapping[int, str], value: int, unknown: str = "Unknown") -> str:
    """The reference's String() of an enum value (its names table: int -> name)."""
    return names.get(value, unknown)


def type_label(d: Descriptor) -> str:
    """The TYPE column of ``siftool list``: ``FS (Squashfs/*System/amd64)`` etc."""
    dt = d.type_name
    if d.data_type == F.DataType.PARTITION:
        p = d.partition()
        return (
            f"{dt} ({_enum_name(F.FS_TYPE_NAMES, p.fstype)}/"
            f"{_enum_name(F.PART_TYPE_NAMES, p.parttype)}/{F.ARCH_NAMES.get(p.arch, 'unknown')})"
        )
    if d.data_type == F.DataType.SIGNATURE:
        return f"{dt} ({_enum_name(F.HASH_TYPE_NAMES, d.signature().hashtype)})"
    if d.data_type == F.DataType.CRYPTO_MESSAGE:
        m = d.crypto_message()
        return (
            f"{dt} ({_enum_name(F.FORMAT_TYPE_NAMES, m.formattype)}/"
            f"{_enum_name(F.MESSAGE_TYPE_NAMES, m.messagetype)})"
        )
    if d.data_type == F.DataType.SBOM:
        return f"{dt} ({_enum_name(F.SBOM_FORMAT_NAMES, d.sbom().format, 'unknown')})"
    return dt


_RULE = "-" * 78 + "\n"


def render_list(img: SifImage) -> str:
    out = [_RULE, f"{'ID':<4} {'|GROUP':<8} {'|LINK':<8} {'|SIF POSITION (start-end)':<26} |TYPE\n"]
    out.append(_RULE)
    for d in img.descriptors:
        group = f"|{'NONE':<7} " if d.group_id == 0 else f"|{d.group_id:<7} "
        if d.linked_id == 0:
            link = f"|{'NONE':<7} "
        elif d.links_group:
            link = f"|{d.linked_id:<3} (G) "
        else:
            link = f"|{d.linked_id:<7} "
        pos = f"|{d.offset}-{d.offset + d.size} "
        out.append(f"{d.id:<4} {group}{link}{pos:<26} |{type_label(d)}\n")
    return "".join(out)


def render_info(d: Descriptor) -> str:
    rows = [("Data Type:", d.type_name), ("ID:", str(d.id))]
    rows.append(("Group ID:", "NONE" if d.group_id == 0 else str(d.group_id)))
    if d.linked_id == 0:
        rows.append(("Linked ID:", "NONE"))
    else:
        rows.append(("Linked ID:", f"{d.linked_id} (G)" if d.links_group else str(d.linked_id)))
    rows += [("Offset:", str(d.offset)), ("Size:", str(d.size))]
    for label, t in (("Created At:", d.created_at), ("Modified At:", d.modified_at)):
        if (text := _go_time(t)) is not None:
            rows.append((label, text))
    if d.name:
        rows.append(("Name:", d.name))
    if d.data_type == F.DataType.PARTITION:
        p = d.partition()
        rows += [
            ("Filesystem Type:", _enum_name(F.FS_TYPE_NAMES, p.fstype)),
            ("Partition Type:", _enum_name(F.PART_TYPE_NAMES, p.parttype)),
            ("Architecture:", F.ARCH_NAMES.get(p.arch, "unknown")),
        ]
    elif d.data_type == F.DataType.SIGNATURE:
        s = d.signature()
        rows.append(("Hash Type:", _enum_name(F.HASH_TYPE_NAMES, s.hashtype)))
        if any(s.entity[:20]):
            rows.append(("Entity:", s.entity[:20].hex().upper()))
    elif d.data_type == F.DataType.CRYPTO_MESSAGE:
        m = d.crypto_message()
        rows += [
            ("Format Type:", _enum_name(F.FORMAT_TYPE_NAMES, m.formattype)),
            ("Message Type:", _enum_name(F.MESSAGE_TYPE_NAMES, m.messagetype)),
        ]
    elif d.data_type == F.DataType.SBOM:
        rows.append(("Format:", _enum_name(F.SBOM_FORMAT_NAMES, d.sbom().format, "unknown")))
    elif d.data_type in (F.DataType.OCI_BLOB, F.DataType.OCI_ROOT_INDEX):
        rows.append(("Digest:", d.oci_digest()))
    return _table(rows, padding=2, indent=True)


# --- JSON rendering ------------------------------------------------------------------


def header_json(img: SifImage) -> dict[str, object]:
    h = img.header
    return {
        "launch_script": img.launch_script,
        "version": img.version,
        "primary_arch": img.primary_arch,
        "id": img.uuid,
        "created_at": h.created_at,
        "modified_at": h.modified_at,
        "descriptors_free": h.descriptors_free,
        "descriptors_total": h.descriptors_total,
        "descriptors_offset": h.descriptors_offset,
        "descriptors_size": h.descriptors_size,
        "data_offset": h.data_offset,
        "data_size": h.data_size,
    }


def descriptor_json(d: Descriptor) -> dict[str, object]:
    obj: dict[str, object] = {
        "id": d.id,
        "data_type": d.type_name,
        "group_id": d.group_id,
        "linked_id": d.linked_id,
        "links_group": d.links_group,
        "offset": d.offset,
        "size": d.size,
        "created_at": d.created_at,
        "modified_at": d.modified_at,
        "name": d.name,
        "type": type_label(d),
    }
    if d.data_type == F.DataType.PARTITION:
        p = d.partition()
        obj["partition"] = {
            "fstype": _enum_name(F.FS_TYPE_NAMES, p.fstype),
            "parttype": _enum_name(F.PART_TYPE_NAMES, p.parttype),
            "arch": F.ARCH_NAMES.get(p.arch, "unknown"),
        }
    elif d.data_type == F.DataType.SIGNATURE:
        s = d.signature()
        obj["signature"] = {
            "hashtype": _enum_name(F.HASH_TYPE_NAMES, s.hashtype),
            "entity": s.entity[:20].hex().upper() if any(s.entity[:20]) else "",
        }
    return obj


# --- commands ------------------------------------------------------------------------


def _object_id(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an object id: {text!r}") from None
    if not 1 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"object id out of range: {value}")
    return value


def _uint32(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"out of range: {value}")
    return value


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Inspect and edit SIF files (like siftool).")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    sub.required = True

    s = sub.add_parser("new", help="create an empty SIF image")
    s.add_argument("sif")
    s.add_argument("--deterministic", action="store_true", help="nil UUID and zero times")

    s = sub.add_parser("list", help="list data objects")
    s.add_argument("sif")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("header", help="display the global header")
    s.add_argument("sif")
    s.add_argument("--json", action="store_true", help="print JSON")

    for action, text in (
        ("info", "display one object's descriptor"),
        ("dump", "write an object's data to stdout"),
    ):
        s = sub.add_parser(action, help=text)
        s.add_argument("id", type=_object_id)
        s.add_argument("sif")

    s = sub.add_parser("add", help="add a data object (options as siftool add)")
    s.add_argument("sif")
    s.add_argument("file", help="the object's data ('-' for stdin)")
    s.add_argument(
        "--datatype",
        type=int,
        required=True,
        help="1-Deffile 2-EnvVar 3-Labels 4-Partition 5-Signature 6-GenericJSON "
        "7-Generic 8-CryptoMessage 9-SBOM 10-OCIRootIndex 11-OCIBlob",
    )
    s.add_argument("--parttype", type=int, default=0, help="1-System 2-PrimSys 3-Data 4-Overlay")
    s.add_argument(
        "--partfs",
        type=int,
        default=0,
        help="1-Squash 2-Ext3 3-ImmuObj 4-Raw 5-EncryptedSquashfs 6-GocryptfsSquashfs",
    )
    s.add_argument(
        "--partarch",
        type=int,
        default=0,
        help="1-386 2-amd64 3-arm 4-arm64 5-ppc64 6-ppc64le 7-mips 8-mipsle "
        "9-mips64 10-mips64le 11-s390x 12-riscv64 13-loong64",
    )
    s.add_argument(
        "--signhash",
        type=int,
        default=0,
        help="1-SHA256 2-SHA384 3-SHA512 4-BLAKE2s_256 5-BLAKE2b_256",
    )
    s.add_argument("--signentity", default="", help="signing entity fingerprint (40 hex digits)")
    s.add_argument("--sbomformat", default="", help="SBOM format, e.g. cyclonedx-json")
    s.add_argument("--ocidigest", default="", help="sha256:<hex> for OCI blob/root index")
    s.add_argument("--groupid", type=_uint32, default=0, help="object group (default: none)")
    s.add_argument("--link", type=_uint32, default=None, help="linked object id")
    s.add_argument(
        "--alignment",
        type=int,
        default=None,
        help="alignment (default: 4096 for partitions, 0 otherwise)",
    )
    s.add_argument("--filename", default=None, help="object name")  # fmt: skip

    s = sub.add_parser("del", help="delete a data object")
    s.add_argument("id", type=_object_id)
    s.add_argument("sif")
    s.add_argument("--zero", action="store_true", help="overwrite the object's data with zeros")
    s.add_argument("--compact", action="store_true", help="truncate the file (last object only)")

    s = sub.add_parser("setprim", help="set the primary system partition")
    s.add_argument("id", type=_object_id)
    s.add_argument("sif")
    return p


def _object_input(a: argparse.Namespace) -> ObjectInput:
    if a.datatype not in CLI_DATA_TYPES:
        raise UsageError(
            f"--datatype must be 1..{len(CLI_DATA_TYPES)}, not {a.datatype}",
            hint="run 'sifpy sif add --help' for the list",
        )
    dt = CLI_DATA_TYPES[a.datatype]
    data: object = sys.stdin.buffer if a.file == "-" else a.file
    kw: dict[str, object] = {"group_id": a.groupid}
    if a.link is not None:
        if a.link == 0:
            raise UsageError("--link must name an object id above 0")
        kw["linked_id"] = a.link
    if a.alignment is not None:
        kw["alignment"] = a.alignment
    if a.filename is not None:
        kw["name"] = a.filename
    if dt == F.DataType.PARTITION:
        if not (a.parttype and a.partfs and a.partarch):
            raise UsageError(
                "with partition datatype, --partfs, --parttype and --partarch must be passed"
            )
        arches = list(F.ARCH_CODES)
        if not 1 <= a.partarch <= len(arches):
            raise UsageError(f"unknown architecture code: {a.partarch}")
        return ObjectInput.partition(data, a.partfs, a.parttype, arches[a.partarch - 1], **kw)  # type: ignore[arg-type]
    if dt == F.DataType.SIGNATURE:
        try:
            entity = bytes.fromhex(a.signentity)
        except ValueError:
            raise UsageError(f"can't decode signing entity fingerprint: {a.signentity!r}") from None
        if len(entity) != 20:
            raise UsageError(
                f"invalid signing entity fingerprint length: got {len(entity)}, want 20"
            )
        if a.signhash not in F.HASH_TYPE_NAMES:
            raise UsageError(f"invalid hash type: {a.signhash}")
        return ObjectInput.signature(data, a.signhash, entity, **kw)  # type: ignore[arg-type]
    if dt == F.DataType.SBOM:
        if a.sbomformat not in SBOM_BY_NAME:
            raise UsageError(
                f"invalid SBOM format: {a.sbomformat!r}",
                hint="one of: " + ", ".join(F.SBOM_FORMAT_NAMES.values()),
            )
        return ObjectInput.sbom(data, SBOM_BY_NAME[a.sbomformat], **kw)  # type: ignore[arg-type]
    if dt in (F.DataType.OCI_BLOB, F.DataType.OCI_ROOT_INDEX):
        if not a.ocidigest.startswith("sha256:"):
            raise UsageError("OCI objects need --ocidigest sha256:<hex>")
        root = dt == F.DataType.OCI_ROOT_INDEX
        return ObjectInput.oci(data, a.ocidigest, root_index=root, **kw)  # type: ignore[arg-type]
    if dt == F.DataType.CRYPTO_MESSAGE:
        # siftool passes no metadata for crypto messages; the fields stay zero.
        return ObjectInput(dt, data, **kw)  # type: ignore[arg-type]
    return ObjectInput(dt, data, **kw)  # type: ignore[arg-type]


def main(argv: list[str], prog: str = "sifpy sif") -> int:
    a = build_parser(prog).parse_args(argv)
    out = sys.stdout
    if a.action == "new":
        create(a.sif, deterministic=a.deterministic)
        return 0
    if a.action == "add":
        add_object(a.sif, _object_input(a))
        return 0
    if a.action == "del":
        delete_object(a.sif, a.id, zero=a.zero, compact=a.compact)
        return 0
    if a.action == "setprim":
        set_primary(a.sif, a.id)
        return 0
    with SifImage.open(a.sif) as img:
        if a.action == "list":
            if a.json:
                json.dump([descriptor_json(d) for d in img.descriptors], out, indent=2)
                out.write("\n")
            else:
                out.write(render_list(img))
        elif a.action == "header":
            if a.json:
                json.dump(header_json(img), out, indent=2)
                out.write("\n")
            else:
                out.write(render_header(img))
        elif a.action == "info":
            out.write(render_info(img.get(a.id)))
        elif a.action == "dump":
            img.copy_data(img.get(a.id), out.buffer)
    return 0
