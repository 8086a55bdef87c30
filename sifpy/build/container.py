"""Running ``%post`` and ``%test``: a build step in the container, as ``sifpy exec`` runs
one, under emulated root, its output streamed and kept in a log."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
from typing import Any

from sifpy.errors import BuildError, SifpyError
from sifpy.rootfs import metadata
from sifpy.rootfs.bootstrap import files as F
from sifpy.util import log
from sifpy.util.paths import lstat_at


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


def container_env() -> dict[str, str]:
    env = {}
    for prefix in ("APPTAINER_", "SINGULARITY_", "SIFPY_"):
        env[prefix + "ENVIRONMENT"] = metadata.ENVIRONMENT_91
        env[prefix + "LABELS"] = metadata.BUILD_LABELS
    return env
