"""``sifpy build``: from a definition file (or an image) to a SIF or a sandbox.

The only code that knows the order of build stages. Per stage, Apptainer's order
(internal/pkg/build/build.go ``Full``):

1. bootstrap agent (:mod:`sifpy.rootfs.bootstrap`), then the base environment and the
   Docker/OCI config as metadata (:mod:`sifpy.rootfs.metadata`);
2. SCIF apps: their tree, and ``%appinstall`` appended to ``%post``;
3. ``%files from <stage>``;  4. ``%setup`` on the host;  5. ``%files`` (and ``%appfiles``);
6. ``%post`` in the container (through :func:`sifpy.runtime.launch`, as ``sifpy exec``);
7. metadata: help, labels, the definition file, environment, runscript, startscript, test;
8. ``%test`` unless ``--notest``.

Only the last stage is assembled: packed into a squashfs and stored in a SIF with the
definition file and ``inspect-metadata.json``, or moved into place as a sandbox.

Atomic output and clean-up: all work happens in a private directory
``.sifpy-build-XXXXXXXX`` (mode 0700): for a SIF under ``--tmpdir`` / ``$SIFPY_TMPDIR`` /
``$APPTAINER_TMPDIR`` / ``$TMPDIR`` / /tmp (as Apptainer; the output's directory is often
an NFS home), for a sandbox next to the destination. The SIF is written as an unnamed
``O_TMPFILE`` and linked into place when complete; a sandbox is renamed into place. On
any error or signal the directory is removed (``--no-cleanup`` keeps it as
``sifpy-kept-XXXXXXXX`` after a failure; a failed ``%post`` leaves its output in a
``sifpy-build-*.log`` beside it). After a SIGKILL it stays, but it holds an
``flock`` while the build lives: the next ``sifpy build`` that uses the same directory
removes every such directory whose lock is free. Child processes (mksquashfs, mmdebstrap,
the ``%post`` container) die with the build (``PR_SET_PDEATHSIG`` and a PID namespace).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sifpy import config
from sifpy.deffile import Recipe, Stage, parse, parse_file, write
from sifpy.errors import BuildError, Interrupted, SifpyError, UsageError
from sifpy.rootfs import metadata
from sifpy.rootfs.bootstrap import bootstrap
from sifpy.rootfs.bootstrap import files as F
from sifpy.rootfs.bootstrap.local import is_sif
from sifpy.util import log
from sifpy.util.fs import rmtree
from sifpy.util.paths import lstat_at
from sifpy.util.proc import run

SECTIONS = frozenset({"all", "none", "setup", "post", "files", "environment", "test", "labels"})
WORK_PREFIX = ".sifpy-build-"
APT_SANDBOX_CONF = "/etc/apt/apt.conf.d/00sifpy-sandbox"
_STALE_UNLOCKED_AGE = 3600.0


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


# --- the private work directory ---------------------------------------------------------


def clean_stale(parent: str) -> None:
    """Remove work directories of dead builds in ``parent`` (see the module docstring)."""
    me = os.geteuid()
    for path in glob.glob(os.path.join(glob.escape(parent), WORK_PREFIX + "*")):
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != me:
                continue
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.time() - os.lstat(path).st_mtime > _STALE_UNLOCKED_AGE:
                rmtree(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live build holds it
        finally:
            os.close(fd)
        log.verbose(f"removing the leftovers of a killed build: {path}")
        rmtree(path)


class Workspace:
    """A private directory for one build, locked while the build lives."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        clean_stale(parent)
        try:
            self.path = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
        except OSError as exc:
            raise BuildError(
                f"can't create a work directory in {parent}: {exc.strerror}",
                hint="choose a writable directory with --tmpdir",
            ) from exc
        self.lock = os.open(os.path.join(self.path, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.scratch = os.path.join(self.path, "scratch")
        os.mkdir(self.scratch, 0o700)

    def close(self) -> None:
        rmtree(self.path)
        os.close(self.lock)


KEPT_PREFIX = "sifpy-kept-"


@contextlib.contextmanager
def _workspace(parent: str, keep_on_failure: bool = False) -> Iterator[Workspace]:
    # SIGTERM/SIGHUP become exceptions so that the finally clause cleans up (as Ctrl-C's
    # KeyboardInterrupt does, and not catchable as an error).
    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    ws = Workspace(parent)
    kept = False
    try:
        yield ws
    except BaseException:
        if keep_on_failure:  # --no-cleanup: renamed, so that the next build leaves it alone
            name = KEPT_PREFIX + os.path.basename(ws.path)[len(WORK_PREFIX) :]
            os.rename(ws.path, os.path.join(parent, name))
            ws.path, kept = os.path.join(parent, name), True
            log.info(f"--no-cleanup: the failed build's directory is kept: {ws.path}")
        raise
    finally:
        if kept:
            os.close(ws.lock)
        else:
            ws.close()
        for s, handler in old.items():
            signal.signal(s, handler)


# --- running things in the container -----------------------------------------------------


def run_in_container(
    rootfs: str,
    args: list[str],
    env: dict[str, str],
    *,
    writable: bool,
    action: str = "exec",
    binds: tuple[tuple[str, str, bool], ...] = (),
    log_path: str | None = None,
    inject: Any = None,
) -> int:
    """Run ``args`` in the sandbox ``rootfs`` as root (emulated); return the exit status.

    The same :func:`sifpy.runtime.launch` as ``sifpy exec``, in a child process that
    first installs the root-emulation seccomp filter (:mod:`sifpy.runtime.seccomp`), which
    every process of the container inherits; sifpy itself stays unfiltered. Output goes
    straight to our stdout/stderr (``%post`` is streamed live); with ``log_path``, it is
    also written to that file. The container gets its own PID namespace, so a SIGKILL of
    sifpy kills all of it. ``binds`` are ``--bind`` for the build; ``inject``, the GPU
    driver files and device nodes of ``--nv``/``--rocm`` (as for ``sifpy exec``).
    """
    from sifpy.runtime import (
        LaunchOptions,
        LaunchSpec,
        Sandbox,
        host_identity,
        subid,
    )
    from sifpy.runtime import action as act
    from sifpy.runtime import env as renv

    me = host_identity()
    subids = subid.ranges(me.name, me.uid, me.gid)
    if subids:
        log.verbose(f"using subordinate ids {subids.uid_start}+{subids.uid_count}")
    host = renv.host_env(os.environ, cleanenv=True)
    if inject is not None:  # the driver's variables and programs, under the recipe's own
        env = {**inject.env, **env}
        if inject.path:
            env["PREPEND_PATH"] = ":".join(inject.path)
    penv = renv.process_env(
        host=host,
        injected=env,
        env_file=None,
        no_eval=True,
        home="/root",
        runtime=renv.runtime_vars(rootfs, action, None, ""),
    )
    spec = LaunchSpec(
        image=Sandbox(rootfs),
        argv=act.action_argv(action, args),
        env=penv,
        cwd="/",
        binds=binds,
        options=LaunchOptions(
            fakeroot=True,
            writable=writable,
            contain=True,
            pid_ns=True,
            no_home=True,
            passwd=False,  # %post may add users (useradd, package scripts): the image's own
            subid=True,
            own_root_after=bool(subids) and writable,
            # Real root's %post must not reach the host through what it is shown (Docker's
            # default for a container: its capabilities, copies of /etc/hosts and
            # /etc/resolv.conf, /sys read-only); harmless to what dpkg and apt need.
            confine=True,
            inject=inject,
        ),
    )
    # The GPU binds need mount points; in a writable sandbox they are made in the image
    # itself, and must not stay there (an empty libcuda.so.1 on LD_LIBRARY_PATH breaks
    # every later start without --nv): remember which are new, remove them afterwards.
    dests = _inject_dests(inject) if inject is not None else []
    created = _absent(rootfs, dests + [d for _, d, _ in binds]) if writable else []
    # A writable container gets no mount point made for it (a user's sandbox must not
    # change); the build's own work tree may, for the time of the step: --bind's here.
    _make_mount_points(rootfs, [(s, d) for s, d, _ in binds], created)
    try:
        return _run_forked(spec, subids, log_path)
    finally:
        _remove_mount_points(rootfs, created)


def _inject_dests(inject: Any) -> list[str]:
    """Where ``--nv``/``--rocm`` bind into the image (the build's /dev is a tmpfs)."""
    dests = [d for _, d, _ in inject.binds]
    return dests + [d for _, d in inject.devices if not d.startswith("/dev/")]


def _absent(rootfs: str, paths: list[str]) -> list[str]:
    """``paths`` and their parents that the image does not hold now, deepest first."""
    out: list[str] = []
    with F.opened_root(rootfs) as rfd:
        for path in paths:
            parts = [p for p in path.split("/") if p]
            for i in range(len(parts), 0, -1):
                sub = "/" + "/".join(parts[:i])
                try:
                    with F.parent_of(rfd, sub, create=False) as (dfd, name):
                        if lstat_at(dfd, name) is not None:
                            break
                except BuildError:
                    pass  # a parent is missing too
                if sub not in out:
                    out.append(sub)
    return sorted(out, key=lambda p: -p.count("/"))


def _make_mount_points(rootfs: str, binds: list[tuple[str, str]], absent: list[str]) -> None:
    """Make the missing destinations of ``binds`` in the image (a directory, or an empty
    file for a file source), inside the root, for :func:`_remove_mount_points` to take
    away again."""
    with F.opened_root(rootfs) as rfd:
        for src, dest in binds:
            if dest not in absent:
                continue
            if os.path.isdir(src):
                F.make_dirs(rfd, dest)
            else:
                with F.parent_of(rfd, dest) as (dfd, name):
                    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd))


def _remove_mount_points(rootfs: str, created: list[str]) -> None:
    """Remove what :func:`_absent` listed if it is still an empty file or directory (a
    mount point the runtime made), never anything ``%post`` filled."""
    with F.opened_root(rootfs) as rfd:
        for path in created:
            with (
                contextlib.suppress(BuildError, OSError),
                F.parent_of(rfd, path, create=False) as (dfd, name),
            ):
                st = lstat_at(dfd, name)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=dfd)  # fails (and stays) unless empty
                elif st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(name, dir_fd=dfd)


def _run_forked(spec: Any, subids: Any, log_path: str | None) -> int:
    """Launch ``spec`` in a forked child (see :func:`run_in_container`)."""
    from sifpy.runtime import launch, ns, seccomp

    sys.stdout.flush()
    sys.stderr.flush()
    tee = _Tee(log_path) if log_path else None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit status is what the tests see
        code = 125
        try:
            os.close(read_end)
            if tee is not None:
                tee.child()
            ns.set_parent_death_signal(signal.SIGKILL)
            if not (os.geteuid() == 0 and ns.in_initial_userns()) and not subids:
                # Unprivileged without subordinate ids: emulate root. Real root gets an
                # identity map, a user with /etc/subuid ranges a real range: there chown
                # and friends really work.
                seccomp.install()
            code = launch(spec)
        except SifpyError as exc:
            os.write(write_end, f"{exc.message}\0{exc.hint or ''}".encode()[:4000])
        except BaseException as exc:
            os.write(write_end, f"can't run in the container: {exc!r}\0".encode()[:4000])
        finally:
            os._exit(code)
    os.close(write_end)
    if tee is not None:
        tee.parent()
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        if tee is not None:
            tee.close()
        report = b""
        while chunk := os.read(read_end, 4096):
            report += chunk
        os.close(read_end)
    if report:
        message, _, hint = report.decode(errors="replace").partition("\0")
        raise BuildError(message, hint or None)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class _Tee:
    """The container's stdout and stderr, each still going to ours, and both to a log file
    (a failed ``%post`` says where it is). Two pipes, so that each stream keeps its fd."""

    def __init__(self, path: str) -> None:
        self.log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.pipes = [os.pipe2(os.O_CLOEXEC) for _ in (1, 2)]
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def child(self) -> None:
        for fd, (r, w) in zip((1, 2), self.pipes, strict=True):
            os.dup2(w, fd)  # dup2 clears close-on-exec on the copy
            os.close(r)
            os.close(w)
        os.close(self.log)

    def parent(self) -> None:
        for fd, (r, w) in zip((1, 2), self.pipes, strict=True):
            os.close(w)
            t = threading.Thread(target=self._copy, args=(r, fd), daemon=True)
            t.start()
            self.threads.append(t)

    def _copy(self, r: int, out: int) -> None:
        try:
            while data := os.read(r, 65536):
                with contextlib.suppress(OSError):  # a closed terminal: the log still gets it
                    _write_all(out, data)
                with self.lock:
                    _write_all(self.log, data)
        finally:
            os.close(r)

    def close(self) -> None:
        # The pipes end when the last process of the container (own PID namespace) exits.
        for t in self.threads:
            t.join(timeout=5)
        os.close(self.log)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _container_env() -> dict[str, str]:
    env = {}
    for prefix in ("APPTAINER_", "SINGULARITY_", "SIFPY_"):
        env[prefix + "ENVIRONMENT"] = metadata.ENVIRONMENT_91
        env[prefix + "LABELS"] = metadata.BUILD_LABELS
    return env


# --- the stages --------------------------------------------------------------------------


@dataclass
class _Stage:
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


def _run_post(st: _Stage, script: str, argv: list[str], opts: BuildOptions, ws: Workspace) -> None:
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
            _container_env(),
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


def _run_setup(st: _Stage, script: str, args: str, ws: Workspace) -> None:
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


def _copy_files(st: _Stage, stage_roots: dict[str, str], from_stage: bool) -> None:
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


def _build_stage(
    st: _Stage, recipe_text: str, opts: BuildOptions, ws: Workspace, roots: dict[str, str]
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


# --- the whole build ---------------------------------------------------------------------


def load_recipe(source: str, opts: BuildOptions) -> Recipe:
    """The recipe for ``source``: a definition file, ``localimage`` for an image, or the
    agent of a URI (``docker://debian:12``), as Apptainer builds them."""
    scheme, sep, rest = source.partition("://")
    if sep and scheme in ("docker", "oras"):
        if opts.build_args and not opts.warn_unused_build_args:
            raise UsageError("--build-arg only applies to definition files")
        return parse(f"Bootstrap: {scheme}\nFrom: {rest}\n", source)
    if sep:
        raise UsageError(
            f"can't build from {source}: unsupported URI",
            hint="use docker://, oras://, a definition file, a SIF or a sandbox",
        )
    if os.path.isdir(source) or is_sif(source):
        if opts.build_args and not opts.warn_unused_build_args:
            raise UsageError("--build-arg only applies to definition files")
        # What Apptainer does for an image source: a localimage definition.
        return parse(f"Bootstrap: localimage\nFrom: {os.path.abspath(source)}\n", source)
    if not os.path.exists(source):
        raise UsageError(f"can't build from {source}: no such file or directory")
    return parse_file(source, opts.build_args, opts.warn_unused_build_args)


def _check_dest(dest: str, opts: BuildOptions) -> None:
    if opts.update:
        if not opts.sandbox:
            raise UsageError("--update only works with --sandbox")
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise UsageError(f"can't update {dest}: not a sandbox directory")
        return
    if os.path.lexists(dest) and not opts.force:
        raise BuildError(f"can't build: {dest} already exists", hint="use --force to overwrite it")
    if os.path.isdir(dest) and not opts.sandbox:
        raise BuildError(f"can't write a SIF over the directory {dest}", hint="remove it first")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise BuildError(f"can't build: {parent} is not a directory")


def _work_parent(dest: str, opts: BuildOptions) -> str:
    """Where the work directory goes: for a SIF, ``--tmpdir``, ``$SIFPY_TMPDIR``,
    ``$APPTAINER_TMPDIR``, ``$TMPDIR`` or /tmp (as Apptainer: not beside the output, often
    an NFS home); a sandbox is renamed into place, so it is built beside it."""
    beside = os.path.dirname(os.path.abspath(dest))
    if opts.sandbox:
        return beside
    for name, candidate in (
        ("--tmpdir", opts.tmpdir),
        ("$SIFPY_TMPDIR", config.get("SIFPY_TMPDIR")),
        ("$APPTAINER_TMPDIR", config.get("APPTAINER_TMPDIR")),
    ):
        if candidate:
            if not os.path.isdir(candidate):
                raise UsageError(f"{name} {candidate}: not a directory")
            return os.path.abspath(candidate)
    tmp = tempfile.gettempdir()  # $TMPDIR, else /tmp
    try:
        noexec = bool(os.statvfs(tmp).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = True
    if noexec:  # %post could not run programs from it
        log.verbose(f"{tmp} is noexec (or unusable): building in {beside}")
        return beside
    return tmp


def _assemble_sif(rootfs: str, dest: str, deffile: str, opts: BuildOptions, ws: Workspace) -> None:
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as SF
    from sifpy.squashfs import pack

    inspect = metadata.inspect_json(rootfs)
    sqfs = os.path.join(ws.path, "rootfs.sqfs")
    pack(rootfs, sqfs, compression=opts.compression, extra_args=opts.mksquashfs_args)
    arch = metadata.host_arch()
    if arch not in SF.ARCH_CODES:
        arch = "unknown"
    log.info(f"writing {dest}")
    create(
        dest,
        [
            ObjectInput(SF.DataType.DEFFILE, deffile.encode()),
            ObjectInput(SF.DataType.GENERIC_JSON, inspect, name="inspect-metadata.json"),
            ObjectInput.partition(sqfs, SF.FSType.SQUASH, SF.PartType.PRIMSYS, arch),
        ],
        launch_script=SF.DEFAULT_LAUNCH_SCRIPT,
    )


def _assemble_sandbox(rootfs: str, dest: str, ws: Workspace) -> None:
    old = None
    if os.path.lexists(dest):
        old = os.path.join(ws.path, "old-sandbox")
        os.rename(dest, old)
    try:
        os.rename(rootfs, dest)
    except OSError as exc:
        if old is not None:
            os.rename(old, dest)
        if exc.errno == errno.EXDEV:
            raise BuildError(f"can't move the sandbox to {dest}: another filesystem") from exc
        raise BuildError(f"can't move the sandbox to {dest}: {exc.strerror}") from exc
    os.chmod(dest, 0o755)


def build(dest: str, source: str, opts: BuildOptions) -> None:
    """Build ``source`` (definition file, SIF or sandbox) into ``dest``."""
    if opts.sandbox is False and opts.update:
        raise UsageError("--update only works with --sandbox")
    if not opts.sections or not opts.sections <= SECTIONS:
        bad = ", ".join(sorted(opts.sections - SECTIONS)) or "(empty)"
        raise UsageError(f"unknown --section: {bad}", hint=f"use {', '.join(sorted(SECTIONS))}")
    from sifpy.squashfs.pack import default_compression, parse_compression

    parse_compression(opts.compression or default_compression())  # fail before building
    recipe = load_recipe(source, opts)
    _check_dest(dest, opts)
    if opts.fakeroot:
        log.verbose("--fakeroot: the build always runs as (emulated) root")
    text = write(recipe)
    started = time.monotonic()
    with _workspace(_work_parent(dest, opts), opts.no_cleanup) as ws:
        roots: dict[str, str] = {}
        total = len(recipe.stages)
        for i, stage in enumerate(recipe.stages):
            final = i == total - 1
            rootfs = os.path.join(ws.path, f"stage{i}")
            if final and opts.update and os.path.isdir(dest):
                rootfs = dest
            st = _Stage(i, stage, rootfs, total)
            _build_stage(st, text, opts, ws, roots)
            if stage.name:
                roots[stage.name] = rootfs
        final_root = st.rootfs
        if opts.update and final_root == dest:
            pass
        elif opts.sandbox:
            _assemble_sandbox(final_root, dest, ws)
        else:
            _assemble_sif(final_root, dest, text, opts, ws)
    log.info(f"build complete: {dest} ({time.monotonic() - started:.1f}s)")
