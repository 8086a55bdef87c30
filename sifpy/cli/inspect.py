"""``sifpy inspect``: show an image's metadata (labels, runscript, env, ...), like Apptainer.

Reads straight from the squashfs inside the SIF (or from a sandbox); nothing is mounted.
"""

from __future__ import annotations

import json
import sys

from sifpy.cli._args import ArgumentParser
from sifpy.errors import ImageError
from sifpy.squashfs.read import ImageFiles, open_image_files

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
    return None if data is None else data.decode("utf-8", "replace")


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
                if n.endswith(".sh")
            }
            out["environment"] = envs
        else:
            path = f"{base}/{FILES[kind][2]}" if app else FILES[kind][1]
            text = _text(files.read(path))
            if text is not None:
                out[kind] = text
    return out


def render_text(attrs: dict[str, object], several: bool) -> str:
    chunks = []
    for kind, value in attrs.items():
        if kind == "labels":
            body = "".join(f"{k}: {v}\n" for k, v in sorted(value.items()))  # type: ignore[attr-defined]
        elif kind == "environment":
            body = "".join(f"=== {f} ===\n{t}\n" for f, t in value.items())  # type: ignore[attr-defined]
        else:
            body = str(value)
        if several:
            chunks.append(f"=== {kind} ===\n")
        chunks.append(body if body.endswith("\n") or not body else body + "\n")
    return "".join(chunks)


def main(argv: list[str], prog: str = "sifpy inspect") -> int:
    a = build_parser(prog).parse_args(argv)
    files, deffile = open_image_files(a.image)
    try:
        if a.list_apps:
            print("\n".join(files.listdir("/scif/apps")))
            return 0
        kinds = KINDS if a.all else [k for k in KINDS if getattr(a, k)] or ["labels"]
        attrs = attributes(files, deffile, kinds, a.app)
    finally:
        files.close()
    if a.json:
        doc = {"data": {"attributes": attrs}, "type": "container"}
        json.dump(doc, sys.stdout, indent=4)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(attrs, several=len(kinds) > 1))
    return 0
