"""Apptainer's in-image metadata: the ``/.singularity.d`` tree, labels, SCIF apps.

Layout and contents follow Apptainer exactly (its
internal/pkg/build/sources/base_environment.go), so images built by
sifpy run under Apptainer and the other way round:

* :func:`base_environment` is what every bootstrap creates
  (internal/pkg/build/sources/base_environment.go): mount points, ``actions/``, ``env/``
  (``01-base.sh``, ``90-environment.sh``, ``95-apps.sh``, ``99-base.sh``,
  ``99-runtimevars.sh``), default ``runscript``/``startscript``, empty ``/etc/hosts`` and
  ``/etc/resolv.conf``, and the root links (``/singularity``, ``/environment``, ``/.run`` ...).
* :func:`oci_config` turns a Docker/OCI image config into ``10-docker2singularity.sh``, an
  ENTRYPOINT/CMD runscript and ``labels.json`` (conveyorPacker_oci.go); the shell text comes
  from :mod:`sifpy.rootfs.imageconfig`, shared with ``sifpy pull``.
* :func:`install_apps` creates the SCIF ``/scif/apps/<app>`` tree (internal/pkg/build/apps).
* :func:`insert` writes the definition file's sections after ``%post``
  (internal/pkg/build/metadata.go and stage.go) and merges the labels.
* :func:`inspect_json` is the ``inspect-metadata.json`` object stored in the SIF.

Every write goes through :mod:`sifpy.rootfs.bootstrap.files`, never through a symlink the
image planted.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sifpy import __version__
from sifpy.deffile import Stage
from sifpy.rootfs.bootstrap import files as F
from sifpy.rootfs.imageconfig import ENV_99 as ENV_99_BASE  # pulled images get the same file
from sifpy.util.paths import PathError, lstat_at, open_dir

SD = "/.singularity.d"
ENV_DIR = f"{SD}/env"
LABELS = f"{SD}/labels.json"
BUILD_LABELS = "/.build.labels"  # $APPTAINER_LABELS during %post
ENVIRONMENT_91 = f"{ENV_DIR}/91-environment.sh"  # $APPTAINER_ENVIRONMENT during %post

_LICENSE = "#!/bin/sh\n# Written by sifpy, following Apptainer's base environment.\n"
_SOURCE_ENV = """\
for script in /.singularity.d/env/*.sh; do
    if [ -f "$script" ]; then
        . "$script"
    fi
done
"""
_ACTIONS = {
    "exec": f'#!/bin/sh\n\n{_SOURCE_ENV}\nexec "$@"\n',
    "shell": f"""#!/bin/sh

{_SOURCE_ENV}
if test -n "${{SINGULARITY_SHELL:-}}" -a -x "${{SINGULARITY_SHELL:-}}"; then
    exec "$SINGULARITY_SHELL" "$@"
elif test -x /bin/bash; then
    export SHELL=/bin/bash
    exec /bin/bash --norc "$@"
elif test -x /bin/sh; then
    export SHELL=/bin/sh
    exec /bin/sh "$@"
fi
echo "ERROR: /bin/sh does not exist in container" 1>&2
exit 1
""",
}
for _name, _script in (("run", "runscript"), ("start", "startscript"), ("test", "test")):
    _ACTIONS[_name] = f"""#!/bin/sh

{_SOURCE_ENV}
if test -n "${{SINGULARITY_APPNAME:-}}"; then
    if test -x "/scif/apps/${{SINGULARITY_APPNAME:-}}/scif/{_script}"; then
        exec "/scif/apps/${{SINGULARITY_APPNAME:-}}/scif/{_script}" "$@"
    fi
    echo "No {_script} for contained app: ${{SINGULARITY_APPNAME:-}}" 1>&2
    exit 1
elif test -x "/.singularity.d/{_script}"; then
    exec "/.singularity.d/{_script}" "$@"
fi
""" + (
        'echo "No runscript found, executing /bin/sh"\nexec /bin/sh "$@"\n'
        if _name == "run"
        else "exit 0\n"
    )

ENV_90_STUB = "#!/bin/sh\n# Custom environment shell code should follow\n\n"
ENV_95_APPS = """\
#!/bin/sh
# Written by sifpy: the active SCIF app (--app) joins PATH and LD_LIBRARY_PATH.
if test -n "${SINGULARITY_APPNAME:-}"; then
    export SINGULARITY_APPNAME
    if test -d "/scif/apps/${SINGULARITY_APPNAME}/"; then
        SCIF_APPS="/scif/apps"
        SCIF_APPROOT="/scif/apps/${SINGULARITY_APPNAME}"
        export SCIF_APPROOT SCIF_APPS
        PATH="/scif/apps/${SINGULARITY_APPNAME}:$PATH"
        if test -d "/scif/apps/${SINGULARITY_APPNAME}/bin"; then
            PATH="/scif/apps/${SINGULARITY_APPNAME}/bin:$PATH"
        fi
        if test -d "/scif/apps/${SINGULARITY_APPNAME}/lib"; then
            LD_LIBRARY_PATH="/scif/apps/${SINGULARITY_APPNAME}/lib:${LD_LIBRARY_PATH:-}"
            export LD_LIBRARY_PATH
        fi
        if test -f "/scif/apps/${SINGULARITY_APPNAME}/scif/env/01-base.sh"; then
            . "/scif/apps/${SINGULARITY_APPNAME}/scif/env/01-base.sh"
        fi
        if test -f "/scif/apps/${SINGULARITY_APPNAME}/scif/env/90-environment.sh"; then
            . "/scif/apps/${SINGULARITY_APPNAME}/scif/env/90-environment.sh"
        fi
        export PATH
    else
        echo "Could not locate the container application: ${SINGULARITY_APPNAME}"
        exit 1
    fi
fi
"""
ENV_99_RUNTIMEVARS = """\
#!/bin/sh
# Written by sifpy: the user's PATH forms (the runtime serves its own copy of this file).
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PREPEND_PATH}:${PATH}"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="${PATH}:${SING_USER_DEFINED_APPEND_PATH}"
fi
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PATH}"
fi
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
export PATH
"""
DEFAULT_RUNSCRIPT = '#!/bin/sh\n\necho "There is no runscript defined for this container\\n"\n'
MOUNT_POINTS = ("/dev", "/proc", "/root", "/var/tmp", "/tmp", "/etc", "/sys", "/home")
ROOT_LINKS = {
    "/singularity": ".singularity.d/runscript",
    "/environment": ".singularity.d/env/90-environment.sh",
    "/.run": ".singularity.d/actions/run",
    "/.exec": ".singularity.d/actions/exec",
    "/.shell": ".singularity.d/actions/shell",
    "/.test": ".singularity.d/actions/test",
}
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_arch() -> str:
    """The host architecture in Go/OCI spelling (``amd64``, ``arm64``, ...)."""
    machine = platform.machine()
    return GO_ARCH.get(machine, machine)


def _write_missing(root_fd: int, path: str, data: str, mode: int) -> None:
    if F.read_file(root_fd, path) is None:
        F.write_file(root_fd, path, data, mode)


def base_environment(root: str | os.PathLike[str]) -> None:
    """Create Apptainer's base tree in ``root``; files the image already has are kept."""
    os.chmod(root, os.stat(root).st_mode | 0o700)  # the rootfs is made owner-writable
    with F.opened_root(root) as rfd:
        for d in (f"{SD}/libs", f"{SD}/actions", ENV_DIR, *MOUNT_POINTS):
            F.make_dirs(rfd, d)
        for name, script in _ACTIONS.items():
            _write_missing(rfd, f"{SD}/actions/{name}", script, 0o755)
        _write_missing(rfd, f"{ENV_DIR}/01-base.sh", _LICENSE, 0o755)
        _write_missing(rfd, f"{ENV_DIR}/90-environment.sh", ENV_90_STUB, 0o755)
        _write_missing(rfd, f"{ENV_DIR}/95-apps.sh", ENV_95_APPS, 0o755)
        _write_missing(rfd, f"{ENV_DIR}/99-base.sh", ENV_99_BASE, 0o755)
        _write_missing(rfd, f"{ENV_DIR}/99-runtimevars.sh", ENV_99_RUNTIMEVARS, 0o755)
        _write_missing(rfd, f"{SD}/runscript", DEFAULT_RUNSCRIPT, 0o755)
        _write_missing(rfd, f"{SD}/startscript", "#!/bin/sh\n", 0o755)
        for path in ("/etc/hosts", "/etc/resolv.conf"):
            with F.parent_of(rfd, path) as (dfd, name):
                if lstat_at(dfd, name) is None:
                    F.write_file(rfd, path, "", 0o644)
        for link, target in ROOT_LINKS.items():
            with F.parent_of(rfd, link) as (dfd, name):
                if lstat_at(dfd, name) is None:
                    os.symlink(target, name, dir_fd=dfd)


def read_labels(root_fd: int, path: str = LABELS) -> dict[str, str]:
    """The string labels of ``labels.json`` (empty when missing or unreadable)."""
    text = F.read_file(root_fd, path)
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def write_labels(root_fd: int, labels: Mapping[str, str], path: str = LABELS) -> None:
    """``labels.json``: tab-indented and key-sorted, like Go's ``json.MarshalIndent`` of a map."""
    F.write_file(root_fd, path, json.dumps(dict(labels), indent="\t", sort_keys=True), 0o644)


def oci_config(root: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """Metadata from a Docker/OCI image config (the whole config JSON, ``config`` inside)."""
    from sifpy.rootfs.imageconfig import env_script, runscript

    section = config.get("config")
    cfg: Mapping[str, Any] = section if isinstance(section, dict) else {}

    def strings(key: str) -> list[str]:
        value = cfg.get(key)
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    with F.opened_root(root) as rfd:
        F.write_file(rfd, f"{ENV_DIR}/10-docker2singularity.sh", env_script(strings("Env")), 0o755)
        if strings("Entrypoint") or strings("Cmd"):
            F.write_file(
                rfd, f"{SD}/runscript", runscript(strings("Entrypoint"), strings("Cmd")), 0o755
            )
        raw = cfg.get("Labels")
        if isinstance(raw, dict):
            labels = read_labels(rfd)
            labels.update({k: v for k, v in raw.items() if isinstance(v, str)})
            write_labels(rfd, labels)


def script_file(body: str, args: str = "") -> str:
    """A ``%runscript``/``%test``/``%startscript`` file: Apptainer's shebang rule.

    The first line is the shebang if it starts with ``#!`` (else ``#!/bin/sh``); the
    section's arguments are appended to it (internal/pkg/build/metadata.go).
    """
    shebang, text = "#!/bin/sh", body
    first, _, rest = body.lstrip("\n").partition("\n")
    if first.strip().startswith("#!"):
        shebang, text = first.strip(), rest
    if args:
        shebang = f"{shebang} {args}"
    return f"{shebang}\n\n{text.rstrip()}\n"


# --- SCIF apps -------------------------------------------------------------------------------


def _app_base_env(app: str) -> str:
    root, data = f"/scif/apps/{app}", f"/scif/data/{app}"
    return (
        "#!/bin/sh\n\n"
        f"SCIF_APPNAME={app}\n"
        f'SCIF_APPROOT="{root}"\n'
        f'SCIF_APPMETA="{root}/scif"\n'
        'SCIF_DATA="/scif/data"\n'
        f'SCIF_APPDATA="{data}"\n'
        f'SCIF_APPINPUT="{data}/input"\n'
        f'SCIF_APPOUTPUT="{data}/output"\n'
        "export SCIF_APPDATA SCIF_APPNAME SCIF_APPROOT SCIF_APPMETA SCIF_APPINPUT "
        "SCIF_APPOUTPUT SCIF_DATA\n"
    )


def install_apps(root: str | os.PathLike[str], stage: Stage) -> str:
    """Create the SCIF tree for every app of ``stage``; return the ``%appinstall`` text.

    Apptainer appends each ``%appinstall`` to ``%post`` as ``cd <approot>; . 01-base.sh;
    <body>``, in app order; the returned text is that suffix (empty without apps).
    """
    apps = stage.apps()
    if not apps:
        return ""
    post = ""
    globals_ = ["#!/bin/sh", ""]
    with F.opened_root(root) as rfd:
        for app in apps:
            a, d = f"/scif/apps/{app.name}", f"/scif/data/{app.name}"
            for sub in (f"{a}/bin", f"{a}/lib", f"{a}/scif/env", f"{d}/input", f"{d}/output"):
                F.make_dirs(rfd, sub)
            F.write_file(rfd, f"{a}/scif/env/01-base.sh", _app_base_env(app.name), 0o755)
            env = app.script("env")
            if env is not None:
                F.write_file(rfd, f"{a}/scif/env/90-environment.sh", f"#!/bin/sh\n\n{env}", 0o755)
            for kind, name in (("run", "runscript"), ("start", "startscript"), ("test", "test")):
                body = app.script(kind)
                if body is not None:
                    F.write_file(rfd, f"{a}/scif/{name}", script_file(body), 0o755)
            help_ = app.script("help")
            if help_ is not None:
                F.write_file(rfd, f"{a}/scif/runscript.help", help_.rstrip() + "\n", 0o644)
            labels = dict(app.labels)
            labels["SCIF_APP_NAME"] = app.name
            write_labels(rfd, labels, f"{a}/scif/labels.json")
            up = app.name.replace("-", "_")
            for key, value in (
                ("APPDATA", d),
                ("APPMETA", f"{a}/scif"),
                ("APPROOT", a),
                ("APPBIN", f"{a}/bin"),
                ("APPLIB", f"{a}/lib"),
                ("APPENV", f"{a}/scif/env/90-environment.sh"),
                ("APPLABELS", f"{a}/scif/labels.json"),
                ("APPRUN", f"{a}/scif/runscript"),
            ):
                globals_.append(f'SCIF_{key}_{up}="{value}"\nexport SCIF_{key}_{up}')
            install = app.script("install")
            if install is not None:
                post += f"\ncd {a}\n. {a}/scif/env/01-base.sh\n{install}"
        F.write_file(rfd, f"{ENV_DIR}/94-appsbase.sh", "\n".join(globals_) + "\n", 0o755)
    return post


# --- after %post ------------------------------------------------------------------------------


@dataclass
class Insert:
    """What :func:`insert` writes (each part can be left out with ``--section``)."""

    deffile: str
    sections: frozenset[str] = frozenset({"all"})
    force: bool = False
    update: bool = False
    extra_labels: dict[str, str] = field(default_factory=dict)  # from the bootstrap agent

    def wants(self, name: str) -> bool:
        return "all" in self.sections or name in self.sections


def build_date(now: float | None = None) -> str:
    """Apptainer's ``org.label-schema.build-date``: ``Tuesday_1_March_2022_16:49:5_PST``."""
    t = time.localtime(now)
    return (
        f"{time.strftime('%A', t)}_{t.tm_mday}_{time.strftime('%B', t)}_{t.tm_year}_"
        f"{t.tm_hour}:{t.tm_min}:{t.tm_sec}_{time.strftime('%Z', t)}"
    )


def build_labels(
    stage: Stage, *, now: float | None = None, with_header: bool = True
) -> dict[str, str]:
    """The labels Apptainer always adds (metadata.go ``addBuildLabels``), minus help."""
    stamp = time.time() if now is None else now
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    created = float(epoch) if epoch and epoch.isdigit() else stamp
    arch = host_arch()
    labels = {
        "org.label-schema.schema-version": "1.0",
        "org.label-schema.build-date": build_date(stamp),
        "org.opencontainers.image.created": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)
        ),
        "org.label-schema.usage.apptainer.version": f"sifpy-{__version__}",
        "org.label-schema.build-arch": arch,
        "org.opencontainers.image.architecture": arch,
    }
    if with_header:
        for entry in stage.header:
            labels[f"org.label-schema.usage.singularity.deffile.{entry.key.lower()}"] = entry.value
    return labels


def merge_labels(
    existing: Mapping[str, str],
    post_labels: str,
    build: Mapping[str, str],
    recipe_labels: Iterable[tuple[str, str]],
    *,
    force: bool,
) -> tuple[dict[str, str], list[str]]:
    """Apptainer's label merge (internal/pkg/build/metadata.go); returns the labels and the names of
    ``%labels`` entries dropped because they already existed (without ``--force``).

    Order: the image's labels, then ``NAME value`` lines written to ``$APPTAINER_LABELS``
    during ``%post``, then the build labels (always overwrite), then ``%labels``, which
    overwrite an existing label only with ``--force``.
    """
    labels = dict(existing)
    for line in post_labels.splitlines():
        name, _, value = line.strip().partition(" ")
        if name and not name.startswith("#"):
            labels[name] = value.strip()
    labels.update(build)
    skipped = []
    for name, value in recipe_labels:
        if name in labels and not force and labels[name] != value:
            skipped.append(name)
            continue
        labels[name] = value
    return labels, skipped


def insert(root: str | os.PathLike[str], stage: Stage, what: Insert) -> list[str]:
    """Write the stage's metadata into ``root`` after ``%post``; returns warnings."""
    warnings: list[str] = []
    with F.opened_root(root) as rfd:
        help_ = stage.script("help")
        if help_ is not None and what.wants("help"):
            F.write_file(rfd, f"{SD}/runscript.help", help_.rstrip() + "\n", 0o644)
        if what.wants("labels"):
            post_labels = F.read_file(rfd, BUILD_LABELS) or ""
            build = build_labels(stage, with_header=not what.update or what.force)
            build.update(what.extra_labels)
            if help_ is not None:
                build["org.label-schema.usage"] = f"{SD}/runscript.help"
                build["org.label-schema.usage.apptainer.runscript.help"] = f"{SD}/runscript.help"
            labels, skipped = merge_labels(
                read_labels(rfd), post_labels, build, stage.labels(), force=what.force
            )
            for name in skipped:
                warnings.append(f"label {name} already exists; use --force to overwrite it")
            write_labels(rfd, labels)
        F.remove(rfd, BUILD_LABELS)
        F.write_file(rfd, f"{SD}/Singularity", what.deffile, 0o644)
        env = stage.script("environment")
        if env is not None and what.wants("environment"):
            path = f"{ENV_DIR}/90-environment.sh"
            if F.read_file(rfd, path) is not None:
                F.append_file(rfd, path, f"\n{env.rstrip()}\n", 0o755)
            else:
                F.write_file(rfd, path, f"#!/bin/sh\n\n{env.rstrip()}\n", 0o755)
        for section, name in (
            ("runscript", "runscript"),
            ("startscript", "startscript"),
            ("test", "test"),
        ):
            body = stage.script(section)
            if body is not None and what.wants(section):
                F.write_file(rfd, f"{SD}/{name}", script_file(body, stage.args(section)), 0o755)
    return warnings


def inspect_json(root: str | os.PathLike[str]) -> bytes:
    """The ``inspect-metadata.json`` object: what ``apptainer inspect --all`` prints, in
    the shape Apptainer's build stores and its inspect decodes (each file's text without
    its trailing newlines; an app's environment a map of files, as the image's)."""
    with F.opened_root(root) as rfd:
        env: dict[str, str] = {}
        for name in ("10-docker2singularity.sh", "90-environment.sh", "91-environment.sh"):
            text = _inspect_text(rfd, f"{ENV_DIR}/{name}")
            if text is not None:
                env[f"{ENV_DIR}/{name}"] = text
        attrs: dict[str, Any] = {
            "apps": _inspect_apps(rfd),
            "environment": env,
            "labels": read_labels(rfd),
        }
        for key, path in (
            ("runscript", f"{SD}/runscript"),
            ("test", f"{SD}/test"),
            ("helpfile", f"{SD}/runscript.help"),
            ("deffile", f"{SD}/Singularity"),
            ("startscript", f"{SD}/startscript"),
        ):
            text = _inspect_text(rfd, path)
            if text is not None:
                attrs[key] = text
    doc = {"data": {"attributes": attrs}, "type": "container"}
    return json.dumps(doc, indent="\t").encode()


def _inspect_text(rfd: int, path: str) -> str | None:
    """A file as Apptainer's inspect keeps it: its trailing newlines dropped."""
    text = F.read_file(rfd, path)
    return None if text is None else text.rstrip("\n")


def _inspect_apps(rfd: int) -> dict[str, Any]:
    try:
        fd, _ = open_dir(rfd, ["scif", "apps"], create=False)
    except (PathError, OSError):
        return {}
    try:
        names = sorted(os.listdir(fd))
    finally:
        os.close(fd)
    apps: dict[str, Any] = {}
    for name in names:
        a = f"/scif/apps/{name}/scif"
        entry: dict[str, Any] = {"labels": read_labels(rfd, f"{a}/labels.json")}
        for key, path in (
            ("runscript", f"{a}/runscript"),
            ("test", f"{a}/test"),
            ("helpfile", f"{a}/runscript.help"),
        ):
            text = _inspect_text(rfd, path)
            if text is not None:
                entry[key] = text
        text = _inspect_text(rfd, f"{a}/env/90-environment.sh")
        if text is not None:
            entry["environment"] = {f"{a}/env/90-environment.sh": text}
        apps[name] = entry
    return apps
