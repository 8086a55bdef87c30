"""Turn an OCI image config into Apptainer's in-image metadata (Apptainer's
internal/pkg/build/sources/conveyorPacker_oci.go).

Written into the rootfs: ``/.singularity.d/env/10-docker2singularity.sh`` (the image ENV),
``/.singularity.d/runscript`` (ENTRYPOINT/CMD, with Apptainer's eval and no-eval
templates), ``/.singularity.d/labels.json`` (tab-indented, as Go's ``MarshalIndent``), the
base env scripts, and the usual mount points. The config is untrusted data: values are
escaped for the shell, never evaluated here, and every file is written through
descriptors that never follow a symlink the image planted (the rootfs's own symlinks are
resolved inside the rootfs, as :mod:`sifpy.util.paths` does for layers).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from sifpy.errors import RootfsError
from sifpy.util import log
from sifpy.util.paths import PathError, lstat_at, open_dir

_ENV_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
VALUE_MAX = 1 << 20  # bound on what one env value or argv item may add to a script
MOUNT_POINTS = ("dev", "proc", "sys", "tmp", "var/tmp", "home", "root", "etc")

BASE_ENV = "#!/bin/sh\n# Written by sifpy.\n"
ENV_99 = """\
#!/bin/sh
# Written by sifpy: the runtime's library directory, and a prompt.
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    LD_LIBRARY_PATH="/.singularity.d/libs"
else
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"
fi
PS1="sifpy> "  # as Apptainer's 99-base.sh, unconditionally (sh sets its own default)
export LD_LIBRARY_PATH PS1
"""


def dq_escape(value: str) -> str:
    """Escape for the inside of a double-quoted shell string: ``\\ " ` $``."""
    return re.sub(r'([\\"`$])', r"\\\1", value)


def sq_quote(value: str) -> str:
    """A single-quoted shell word."""
    return "'" + value.replace("'", "'\\''") + "'"


def env_script(env: list[str]) -> str:
    """``10-docker2singularity.sh``: one export per valid ``Env`` entry (conveyorPacker_oci.go).

    ``K=V`` becomes ``export K="${K:-"V"}"`` (the host's value wins, as in Apptainer),
    ``PATH`` is set outright, and ``K`` alone becomes ``export K="${K:-}"``.
    """
    lines = ["#!/bin/sh"]
    for item in env:
        if not isinstance(item, str):
            continue
        name, sep, value = item.partition("=")
        if _ENV_NAME_RE.fullmatch(name) is None:
            log.warn(f"image ENV entry skipped (invalid name): {name[:60]!r}")
            continue
        if len(value) > VALUE_MAX:
            log.warn(f"image ENV entry skipped (value over {VALUE_MAX} bytes): {name}")
            continue
        if not sep:
            lines.append(f'export {name}="${{{name}:-}}"')
        elif name == "PATH":
            lines.append(f'export PATH="{dq_escape(value)}"')
        else:
            lines.append(f'export {name}="${{{name}:-"{dq_escape(value)}"}}"')
    return "\n".join(lines) + "\n"


def _args_quoted(args: list[str]) -> str:
    """The argv items as ``"a" "b"`` for ``eval "set ..."`` (Apptainer's ArgsQuoted).

    Only ``"`` and ``\\`` are escaped: ``$VAR`` and backquotes are expanded by the eval,
    which is Apptainer's documented default (``--no-eval`` keeps items literal).
    """
    return " ".join('"' + re.sub(r'(["\\])', r"\\\1", a) + '"' for a in args)


def runscript(entrypoint: list[str], cmd: list[str]) -> str:
    """The OCI runscript (conveyorPacker_oci.go): ENTRYPOINT and CMD, eval or no-eval.

    Without arguments: ENTRYPOINT + CMD; with arguments: ENTRYPOINT + arguments (CMD is
    replaced). ``SINGULARITY_NO_EVAL``/``APPTAINER_NO_EVAL`` use the literal items;
    otherwise the items are re-evaluated by the shell, as Apptainer does by default.
    """
    lit_cmd = " ".join(sq_quote(a) for a in cmd)
    lit_ep = " ".join(sq_quote(a) for a in entrypoint)
    no_eval = ["    if [ $# -eq 0 ]; then"]
    no_eval.append(f"        set -- {lit_cmd}" if cmd else "        :")
    no_eval.append("    fi")
    if entrypoint:
        no_eval.append(f'    set -- {lit_ep} "$@"')
    return f"""#!/bin/sh
# Written by sifpy from the image's ENTRYPOINT and CMD.
OCI_ENTRYPOINT={sq_quote(_args_quoted(entrypoint))}
OCI_CMD={sq_quote(_args_quoted(cmd))}

if [ -n "${{APPTAINER_NO_EVAL:-}}${{SINGULARITY_NO_EVAL:-}}" ]; then
{chr(10).join(no_eval)}
    exec "$@"
fi

CMDLINE_ARGS=""
for arg in "$@"; do
    CMDLINE_ARGS="${{CMDLINE_ARGS}} \\"$arg\\""
done

if [ -n "$OCI_ENTRYPOINT" ]; then
    if [ $# -gt 0 ]; then
        SINGULARITY_OCI_RUN="${{OCI_ENTRYPOINT}} ${{CMDLINE_ARGS}}"
    else
        SINGULARITY_OCI_RUN="${{OCI_ENTRYPOINT}} ${{OCI_CMD}}"
    fi
elif [ $# -gt 0 ]; then
    SINGULARITY_OCI_RUN="${{CMDLINE_ARGS}}"
else
    SINGULARITY_OCI_RUN="${{OCI_CMD}}"
fi

eval "set ${{SINGULARITY_OCI_RUN}}"
exec "$@"
"""


def labels_json(labels: dict[str, Any]) -> str:
    """``labels.json``: string labels, tab-indented like Go's json.MarshalIndent."""
    clean = {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
    return json.dumps(clean, indent="\t", sort_keys=True)


def _str_list(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    items = [v for v in value if isinstance(v, str)]
    return items if sum(len(v) for v in items) <= VALUE_MAX else []


def _write(dir_fd: int, name: str, data: str, mode: int) -> None:
    """Create ``name`` afresh in ``dir_fd``: an existing non-directory is replaced, the
    new file is created with O_EXCL|O_NOFOLLOW so no planted link is ever written through."""
    st = lstat_at(dir_fd, name)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise RootfsError(f"can't write /.singularity.d/{name}: a directory is in the way")
        os.unlink(name, dir_fd=dir_fd)
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    with os.fdopen(fd, "w") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)


META_DIRS = ("env", "actions", "libs")  # below /.singularity.d


def metadata_files(config: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """The metadata files for the image ``config`` (the full image config JSON, with its
    ``config`` section): ``(subdirectory of /.singularity.d or "", name, text, mode)``."""
    section = config.get("config")
    cfg: dict[str, Any] = section if isinstance(section, dict) else {}
    env = _str_list(cfg.get("Env"))
    entrypoint = _str_list(cfg.get("Entrypoint"))
    cmd = _str_list(cfg.get("Cmd"))
    labels = cfg.get("Labels") if isinstance(cfg.get("Labels"), dict) else {}
    return [
        ("env", "01-base.sh", BASE_ENV, 0o755),
        ("env", "10-docker2singularity.sh", env_script(env), 0o755),
        ("env", "90-environment.sh", BASE_ENV + "# Custom environment shell code.\n", 0o755),
        ("env", "99-base.sh", ENV_99, 0o755),
        ("", "runscript", runscript(entrypoint, cmd), 0o755),
        ("", "startscript", "#!/bin/sh\n", 0o755),
        ("", "labels.json", labels_json(labels or {}), 0o644),
    ]


def config_to_metadata(rootfs: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """Write Apptainer's metadata for the image ``config`` (the full image config JSON,
    with its ``config`` section) into ``rootfs``."""
    files = metadata_files(config)
    root_fd = os.open(Path(rootfs), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fds: list[int] = []
    try:
        for mp in MOUNT_POINTS:
            # Bind targets for the runtime; an image that has a file there keeps it.
            try:
                fds.append(open_dir(root_fd, mp.split("/"), create=True)[0])
            except (PathError, OSError) as exc:
                log.warn(f"can't create mount point /{mp} in the image: {exc}")
        meta = open_dir(root_fd, [".singularity.d"], create=True)[0]
        fds.append(meta)
        subs = {"": meta}
        for sub in META_DIRS:
            subs[sub] = open_dir(meta, [sub], create=True)[0]
            fds.append(subs[sub])
        for sub, name, text, mode in files:
            _write(subs[sub], name, text, mode)
        os.fchmod(meta, 0o755)
    except (PathError, OSError) as exc:
        raise RootfsError(f"can't write image metadata: {exc}") from exc
    finally:
        for fd in fds:
            os.close(fd)
        os.close(root_fd)
