"""``sifpy inspect``: show an image's metadata (labels, runscript, env, ...), like Apptainer.

A SIF's ``inspect-metadata.json`` object (written at build time by Apptainer and sifpy) is
the answer when the image has one, as in Apptainer 1.2 and later
(https://github.com/apptainer/apptainer/blob/main/cmd/internal/cli/inspect.go);
otherwise the files are read straight from the squashfs inside the SIF (or from a
sandbox); nothing is mounted. Either way the values and the text output are Apptainer's:
a file's trailing newlines dropped, one newline after each value.
"""

from __future__ import annotations

import json
import os
import sys

from sifpy.cli._args import ArgumentParser
from sifpy.errors import ImageError
from sifpy.squashfs.read import ImageFiles, open_image_files

METADATA = "inspect-metadata.json"

# attribute -> (option, path in /.singularity.d, path in /scif/apps/<app>/scif)
FILES = {
    "runscript": ("--runscript", "/.singularity.d/runscript", "runscript"),
    "startscript": ("--startscript", "/.singularity.d/startscript", "startscript"),
    "test": ("--test", "/.singularity.d/test", "test"),
    "helpfile": ("--helpfile", "/.singularity.d/runscript.help", "runscript.help"),
}
KINDS = ["labels", "deffile", "runscript", "startscript", "environment", "helpfile", "test"]


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Show the metadata of an image.")
    p.add_argument("-l", "--labels", action="store_true", help="labels (the default)")
    p.add_argument("-d", "--deffile", action="store_true", help="the definition file")
    p.add_argument("-r", "--runscript", action="store_true", help="the runscript")
    p.add_argument("-s", "--startscript", action="store_true", help="the startscript")
    p.add_argument("-e", "--environment", action="store_true", help="the environment scripts")
    p.add_argument("-H", "--helpfile", action="store_true", help="the help text")
    p.add_argument("-t", "--test", action="store_true", help="the test script")
    p.add_argument("--all", action="store_true", help="everything")
    p.add_argument("-j", "--json", action="store_true", help="print JSON as Apptainer does")
    p.add_argument("--app", metavar="NAME", help="a SCIF app's metadata")
    p.add_argument("--list-apps", action="store_true", help="list the SCIF apps")
    p.add_argument("image", help="a SIF file or a sandbox directory")
    return p


def _text(data: bytes | None) -> str | None:
    """A file's text as Apptainer's inspect keeps it: its trailing newlines dropped."""
    return None if data is None else data.decode("utf-8", "replace").rstrip("\n")


def _env_file(name: str) -> bool:
    """Apptainer shows the environment files a build writes (env/10-docker*.sh and
    env/9*-environment.sh), not its own 01-base.sh, 95-apps.sh, 99-base.sh..."""
    return name.endswith(".sh") and (
        name.startswith("10-docker") or (name.startswith("9") and name.endswith("-environment.sh"))
    )


def stored_metadata(path: str) -> dict[str, object] | None:
    """The attributes of a SIF's ``inspect-metadata.json`` object, None without one (a
    sandbox, an image from siftool, an OCI-SIF) or when it can't be decoded (Apptainer
    then warns and reads the image; sifpy reads the image)."""
    if os.path.isdir(path):
        return None
    from sifpy.sif import SifImage

    with SifImage.open(path) as img:
        found = [d for d in img.find() if d.name == METADATA]
        data = img.read(found[0]) if found else None
    if data is None:
        return None
    try:
        attrs = json.loads(data)["data"]["attributes"]
    except (ValueError, KeyError, TypeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def from_metadata(meta: dict[str, object], deffile: bytes | None, kinds: list[str],
                  app: str | None) -> dict[str, object]:  # fmt: skip
    """What Apptainer shows from the stored metadata: the image's attributes or one
    app's; the definition file from its own SIF object first."""
    apps = meta.get("apps") or {}
    if app:
        if not isinstance(apps, dict) or app not in apps:
            hint = "see 'sifpy inspect --list-apps'"
            raise ImageError(f"no app named {app} in this image", hint=hint)
        source = apps[app] or {}
    else:
        source = meta
    out: dict[str, object] = {}
    for kind in kinds:
        if kind == "deffile":  # the stored one, as Apptainer shows when there is one
            text = meta.get("deffile") or (_text(deffile) if deffile is not None else None)
            if text:
                out["deffile"] = text
        elif kind in ("labels", "environment"):
            out[kind] = source.get(kind) or {}
        elif source.get(kind):
            out[kind] = source[kind]
    return out


def attributes(files: ImageFiles, deffile: bytes | None, kinds: list[str], app: str | None
               ) -> dict[str, object]:  # fmt: skip
    base = f"/scif/apps/{app}/scif" if app else "/.singularity.d"
    if app and not files.listdir(base):
        hint = "see 'sifpy inspect --list-apps'"
        raise ImageError(f"no app named {app} in this image", hint=hint)
    out: dict[str, object] = {}
    for kind in kinds:
        if kind == "labels":
            raw = files.read(f"{base}/labels.json")
            try:
                out["labels"] = json.loads(raw) if raw else {}
            except ValueError as exc:
                raise ImageError(f"bad labels.json in the image: {exc}") from exc
        elif kind == "deffile":
            text = _text(deffile) or _text(files.read("/.singularity.d/Singularity"))
            if text is not None:
                out["deffile"] = text
        elif kind == "environment":
            env_dir = f"{base}/env"
            envs = {
                f"{env_dir}/{n}": _text(files.read(f"{env_dir}/{n}")) or ""
                for n in files.listdir(env_dir)
                if _env_file(n)
            }
            out["environment"] = envs
        else:
            path = f"{base}/{FILES[kind][2]}" if app else FILES[kind][1]
            text = _text(files.read(path))
            if text is not None:
                out[kind] = text
    return out


def _app(files: ImageFiles, name: str) -> dict[str, object]:
    """One app's entry of ``--all``, its empty values left out as Apptainer's JSON does."""
    attrs = attributes(files, None, [k for k in KINDS if k != "deffile"], name)
    return {k: v for k, v in attrs.items() if v}


# Apptainer prints the sections asked for in this order, one after the other.
TEXT_ORDER = ["deffile", "runscript", "startscript", "test", "helpfile", "environment", "labels"]


def render_text(attrs: dict[str, object]) -> str:
    chunks = []
    for kind in TEXT_ORDER:
        value = attrs.get(kind)
        if not value:
            continue
        if kind == "labels":
            chunks += [f"{k}: {v}\n" for k, v in sorted(value.items())]  # type: ignore[attr-defined]
        elif kind == "environment":
            chunks += [f"=== {f} ===\n{t}\n\n" for f, t in sorted(value.items())]  # type: ignore[attr-defined]
        else:
            chunks.append(f"{value}\n")
    return "".join(chunks)


def main(argv: list[str], prog: str = "sifpy inspect") -> int:
    a = build_parser(prog).parse_args(argv)
    meta = stored_metadata(a.image)
    files, deffile = open_image_files(a.image)
    kinds = KINDS if a.all else [k for k in KINDS if getattr(a, k)] or ["labels"]
    try:
        if a.list_apps:
            apps = meta.get("apps") if meta is not None else files.listdir("/scif/apps")
            sys.stdout.write("".join(f"{n}\n" for n in sorted(apps or ())))  # type: ignore[call-overload]
            return 0
        if meta is not None:
            attrs = from_metadata(meta, deffile, kinds, a.app)
            if a.all and meta.get("apps"):
                attrs["apps"] = meta["apps"]
        else:
            attrs = attributes(files, deffile, kinds, a.app)
            if a.all:
                apps = {n: _app(files, n) for n in files.listdir("/scif/apps")}
                if apps:
                    attrs["apps"] = apps
    finally:
        files.close()
    if a.json or a.all:  # --all is JSON in Apptainer
        if a.app and not a.all:  # one app's attributes, under its name
            attrs = {"apps": {a.app: attrs}}
        doc = {"data": {"attributes": attrs}, "type": "container"}
        json.dump(doc, sys.stdout, indent="\t")
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(attrs))
    return 0
