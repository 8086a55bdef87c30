"""One build stage, section by section: bootstrap, ``%files``, ``%setup`` (on the host),
``%post`` and ``%test`` (in the container), and the metadata written into the rootfs."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from dataclasses import dataclass

from sifpy.build.container import container_env, run_in_container
from sifpy.build.options import BuildOptions
from sifpy.build.workspace import Workspace
from sifpy.deffile import Stage
from sifpy.errors import BuildError
from sifpy.rootfs import metadata
from sifpy.rootfs.bootstrap import bootstrap
from sifpy.rootfs.bootstrap import files as F
from sifpy.util import log
from sifpy.util.proc import run

APT_SANDBOX_CONF = "/etc/apt/apt.conf.d/00sifpy-sandbox"


@dataclass
class StageRun:
    index: int
    stage: Stage
    rootfs: str
    total: int

    def say(self, what: str) -> None:
        name = f" ({self.stage.name})" if self.stage.name else ""
        log.info(f"[{self.index + 1}/{self.total}{name}] {what}")


def _post_script(stage: Stage, app_post: str) -> tuple[str, list[str]] | None:
    body = stage.script("post")
    if body is None and not app_post:
        return None
    script = (body or "") + app_post
    args = stage.args("post").split()
    # Apptainer: /bin/sh -ex /.post.script; with "-c X": /bin/sh -ex -c "X /.post.script".
    if args and args[0] == "-c":
        argv = ["/bin/sh", "-ex", "-c", " ".join([*args[1:], "/.post.script"])]
    else:
        argv = ["/bin/sh", "-ex", "/.post.script"]
    return script, argv


def _run_post(
    st: StageRun, script: str, argv: list[str], opts: BuildOptions, ws: Workspace
) -> None:
    with F.opened_root(st.rootfs) as rfd:
        F.write_file(rfd, "/.post.script", script, 0o755)
        F.write_file(rfd, metadata.BUILD_LABELS, "", 0o644)
        # apt drops privileges to _apt, which a one-id user namespace can't; Charliecloud
        # and enroot set apt's sandbox user to root (APT::Sandbox::User).
        apt_conf = _isdir(rfd, "/etc/apt/apt.conf.d") and F.read_file(rfd, APT_SANDBOX_CONF) is None
        if apt_conf:
            F.write_file(rfd, APT_SANDBOX_CONF, 'APT::Sandbox::User "root";\n', 0o644)
    st.say("running %post")
    build_log = os.path.join(ws.path, f"stage{st.index}-post.log")
    try:
        code = run_in_container(
            st.rootfs,
            argv,
            container_env(),
            writable=True,
            binds=opts.binds,
            log_path=build_log,
            inject=opts.inject,
        )
    finally:
        with F.opened_root(st.rootfs) as rfd:
            F.remove(rfd, "/.post.script")
            if apt_conf:
                F.remove(rfd, APT_SANDBOX_CONF)
    if code != 0:
        # The work directory goes with the failure; its log moves beside it first.
        fd, kept = tempfile.mkstemp(prefix="sifpy-build-", suffix=".log", dir=ws.parent)
        os.close(fd)
        os.replace(build_log, kept)
        raise BuildError(f"%post failed with exit status {code}", hint=f"its output is in {kept}")


def _fix_perms(rootfs: str) -> None:
    """``--fix-perms``: owner rwX on every file and directory the base image brought
    (Apptainer's flag for images whose files their owner can't read or remove)."""
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = stat.S_IRUSR | stat.S_IWUSR
            if stat.S_ISDIR(st.st_mode) or st.st_mode & (stat.S_IXGRP | stat.S_IXOTH):
                want |= stat.S_IXUSR
            if st.st_mode & want != want:
                os.chmod(path, stat.S_IMODE(st.st_mode) | want)
    log.verbose("--fix-perms: the owner can read and write everything")


def _isdir(root_fd: int, path: str) -> bool:
    from sifpy.util.paths import PathError, open_dir

    try:
        fd, _ = open_dir(root_fd, [p for p in path.split("/") if p], create=False)
    except (PathError, OSError):
        return False
    os.close(fd)
    return True


def _run_setup(st: StageRun, script: str, args: str, ws: Workspace) -> None:
    path = os.path.join(ws.scratch, "setup")
    with open(path, "w") as f:
        f.write(script)
    env = dict(os.environ)
    rootfs = os.path.abspath(st.rootfs)
    for prefix in ("APPTAINER_", "SINGULARITY_", "SIFPY_"):
        env[prefix + "ROOTFS"] = rootfs
        env[prefix + "ENVIRONMENT"] = metadata.ENVIRONMENT_91
    st.say("running %setup on the host")
    sys.stdout.flush()
    sys.stderr.flush()
    proc = run(["/bin/sh", "-ex", path, *args.split()], "run %setup", env=env, stderr=None, ok=None)
    if proc.returncode != 0:
        raise BuildError(f"%setup failed with exit status {proc.returncode}")


def _copy_files(st: StageRun, stage_roots: dict[str, str], from_stage: bool) -> None:
    with F.opened_root(st.rootfs) as rfd:
        for copy in st.stage.files():
            if (copy.stage is not None) != from_stage:
                continue
            src_root = None
            if copy.stage is not None:
                src_root = stage_roots.get(copy.stage)
                if src_root is None:
                    raise BuildError(f"can't copy %files from {copy.stage}: stage not found")
            F.copy_in(rfd, copy.src, copy.dst, from_root=src_root, line=f"{copy.src} {copy.dst}")
        if not from_stage:
            for app in st.stage.apps():
                for copy in app.files:
                    F.copy_in(rfd, copy.src, copy.dst, dst_base=f"/scif/apps/{app.name}")


def build_stage(
    st: StageRun, recipe_text: str, opts: BuildOptions, ws: Workspace, roots: dict[str, str]
) -> None:
    stage = st.stage
    final = st.index == st.total - 1
    extra: dict[str, str] = {}
    if not (opts.update and final and os.path.isdir(st.rootfs)):
        os.makedirs(st.rootfs, mode=0o755, exist_ok=True)
        st.say(f"bootstrap: {stage.bootstrap}")
        result = bootstrap(stage, st.rootfs, ws.scratch)
        metadata.base_environment(st.rootfs)
        if result.config is not None:
            metadata.oci_config(st.rootfs, result.config)
        extra = result.labels
        if opts.fix_perms:
            _fix_perms(st.rootfs)
    else:
        st.say(f"updating {st.rootfs}")
        metadata.base_environment(st.rootfs)
    if stage.script("pre") is not None:
        # Apptainer still runs the legacy %pre on the host before bootstrapping; sifpy
        # does not run host code before the rootfs exists (use %setup).
        log.warn("%pre is not supported and was skipped; use %setup")
    app_post = metadata.install_apps(st.rootfs, stage)
    if opts.wants("files"):
        _copy_files(st, roots, from_stage=True)
    setup = stage.script("setup")
    if setup is not None and opts.wants("setup"):
        _run_setup(st, setup, stage.args("setup"), ws)
    if opts.wants("files"):
        _copy_files(st, roots, from_stage=False)
    post = _post_script(stage, app_post)
    if post is not None and opts.wants("post"):
        _run_post(st, *post, opts, ws)
    st.say("writing metadata")
    insert = metadata.Insert(
        recipe_text, opts.sections, opts.force, opts.update, extra_labels=extra
    )
    for warning in metadata.insert(st.rootfs, stage, insert):
        log.warn(warning)
    if stage.script("test") is not None and not opts.notest and opts.wants("test"):
        st.say("running %test")
        code = run_in_container(
            st.rootfs,
            [],
            {},
            writable=False,
            action="test",
            binds=opts.binds,
            inject=opts.inject,
        )
        if code != 0:
            raise BuildError(f"%test failed with exit status {code}", hint="or build with --notest")
