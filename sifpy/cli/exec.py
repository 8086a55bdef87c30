"""``sifpy exec | run | shell | test``: run a command in a container, as Apptainer does.

This is the hot path (once per MPI rank): it parses its options without argparse (built only
for --help and errors) and opens the image once (the partition mounted is the one in that
open file). The compiled starter (cli/starter.c) may have served that image already, before
Python started (:func:`sifpy.runtime.start.adopt`): the rest (environment, the container's
mounts) is then computed while the FUSE server starts; otherwise the container is mounted
in order.
Exit status: the command's own (128+N when killed by signal N); 125 when sifpy fails
before the command starts, 126 not executable, 127 not found.
"""

from __future__ import annotations

import os
import sys

from sifpy import TYPE_CHECKING, config
from sifpy.cli.exec_args import (
    config_binds,
    mpi_host,
    parse_binds,
    parse_mounts,
    parse_overlays,
    runscript_timeout,
)
from sifpy.cli.exec_image import devices, join_env, oci_image_config, open_image
from sifpy.cli.exec_options import HELP, build_parser, fast_parse
from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError, UsageError
from sifpy.runtime import start
from sifpy.runtime.start import Sandbox, SifPartition
from sifpy.util import log

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping
    from types import SimpleNamespace
    from typing import Any

    from sifpy.runtime.gpu import Injection
    from sifpy.runtime.spec import LaunchSpec
    from sifpy.sign.policy import Policy
else:
    SimpleNamespace = type(sys.implementation)  # what types.py does, without importing it


def main(argv: list[str], prog: str = "sifpy exec") -> int:
    try:
        return _main(argv, prog)
    except SifpyError as exc:
        # Docker's convention: any failure of sifpy itself, before or while starting the
        # command, is 125, so that it can't be mistaken for the command's own status.
        exc.exit_status = ExitStatus.LAUNCH_FAILED
        raise


def _std_fds() -> None:
    """Open /dev/null in place of a closed 0, 1 or 2: else the image would be opened as one
    of them, and the command would start without it (it gets 0, 1 and 2, always)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, os.O_RDWR) != fd:  # the lowest free number: this one
                raise RuntimeSetupError(f"can't open /dev/null as fd {fd}") from None
            os.set_inheritable(fd, True)  # os.open's are not (PEP 446)


def _main(argv: list[str], prog: str) -> int:
    action = prog.rsplit(" ", 1)[-1]
    _std_fds()
    # The image the starter (starter.c) served before Python started, if it did.
    served, fd, caller = start.adopt() or (None, -1, None)
    fast_lock = _fast_lock()
    passed = start.passed_fds()  # before sifpy opens anything of its own
    try:
        fast = fast_parse(action, argv)
        a = fast or build_parser(action, prog).parse_args(argv)
        # Before serve(): with --fakeroot, getuid() says 0 once the namespace is entered.
        ident = start.host_identity(*caller) if caller else start.host_identity()
        if a.image.startswith("instance://"):
            return _run_in_instance(action, a, ident, passed, served)
        step = _sharens_step(a, served is not None)
        if served is None and "://" in a.image:  # docker://: from the SIF cache, as Apptainer
            from sifpy.cli.pull import pull_to_cache

            a.image = pull_to_cache(a.image)
        oci_config: dict[str, Any] = {}
        if served is None:
            verify = a.verify or bool(a.verify_key)
            image, fd = open_image(a.image, verify, a.verify_key, -1, oci_config)
        else:  # the file served is the file validated and run
            log.verbose("note: the starter entered the namespaces and served the image")
            # open_image owns the fd from here: it closes it when it fails.
            taken, fd = fd, -1
            image, fd = open_image(a.image, False, None, taken, oci_config)
            if served.offset != getattr(image, "offset", None) or served.fakeroot != a.fakeroot:
                raise RuntimeSetupError("can't start container: the starter served another image")
        overlays = parse_overlays(a.overlay)
        if a.writable_tmpfs and any(w for _, w in overlays):
            raise UsageError(
                "--writable-tmpfs can't be combined with a writable --overlay",
                hint="add :ro to the --overlay, or leave out --writable-tmpfs",
            )
        if a.writable and not isinstance(image, Sandbox):
            raise UsageError("--writable needs a sandbox directory", hint="build with --sandbox")
        if a.writable and (a.writable_tmpfs or a.overlay):
            raise UsageError("--writable can't be combined with --writable-tmpfs or --overlay")
        from sifpy.runtime.action import action_argv

        args = ([a.command] if action == "exec" else []) + a.args
        command = action_argv(action, args)
        if oci_config:
            command = oci_image_config(action, a, args, oci_config) or command
        # The action script's shell, then the command: both start cold on a fresh mount.
        prefetch = (command[0], *args[:1]) if action == "exec" else (command[0],)
        driver = "unsquash" if a.unsquash else a.mount_driver
        # Before serve(): nvidia-container-cli runs on the host, outside the namespaces.
        inject = devices(a) if a.nv or a.nvccli or a.rocm or a.device else None
        if step is not None:
            from sifpy.runtime import sharens

            spec = _spec(action, a, ident, image, command, prefetch, driver, inject, passed)
            identity = os.fstat(fd) if fd >= 0 else os.stat(image.path)
            base = f"{sharens.runtime_dir()}/{sharens.container_key(spec, step, identity)}"
            alias = None
            if fast is not None:  # the starter's name for it: sifpy's argv up to the image
                at = len(sys.argv) - len(argv) + len(argv) - len(a.args)
                head = sys.argv[1:at] if action != "exec" else sys.argv[1 : at - 1]
                key = sharens.fast_key(head, step, os.getcwd(), identity, os.environ)
                alias = f"{key}.sock"
            prepare = _joiner(ident)
            sharens.run_joined(spec, ident, base, prepare=prepare, alias=alias, release=fast_lock)
        _release(fast_lock)
        return _run(action, a, ident, image, served, command, prefetch, driver, inject, passed)
    finally:
        if served is not None:
            served.stop()
        if fd >= 0:
            os.close(fd)


# Options a shared container can't honour: each asks for namespaces or a root of the rank's
# own. With them, a rank of a job gets its own container; --sharens refuses them.
_UNSHARED = ("pid", "ipc", "containall", "writable", "unsquash", "nvccli")
_GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose", "--debug")


def _sharens_step(a: Any, served: bool) -> str | None:
    """The job step whose ranks share this container (``--sharens``, or by default when
    this process is a rank of an MPI or Slurm job: see :func:`sifpy.runtime.sharens.job_step`),
    or None for a container of its own."""
    if a.no_sharens:
        if a.sharens:
            raise UsageError("--sharens and --no-sharens can't be combined")
        return None
    step = None
    rank_vars = ("SLURM_STEP_ID", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if a.sharens or any(os.environ.get(v) for v in rank_vars):
        from sifpy.runtime import sharens

        step = sharens.job_step(os.environ)
        if step is None and a.sharens:
            step = sharens.parent_step()
    if step is None:
        return None
    bad = [f"--{o.replace('_', '-')}" for o in _UNSHARED if getattr(a, o)]
    if a.sharens and bad:
        raise UsageError(f"--sharens can't be combined with {', '.join(bad)}")
    if a.sharens and os.getuid() == 0:
        # Root's container maps every id to itself from outside (process.launch); the
        # holder's namespaces are made for one unprivileged user.
        raise UsageError("--sharens is for unprivileged users", hint="run it as your own user")
    if bad or os.getuid() == 0:
        return None  # by default only; real root keeps its identity-mapped container
    if not a.sharens and sharens.local_ranks(os.environ) == 1:
        # The node's only rank of the step: nobody to share with; a plain start costs
        # less than a holder (the starter serves it: starter.c's sharens_wanted).
        return None
    if served:  # the starter entered namespaces of its own already (it did not see a rank)
        log.verbose("note: the starter served the image: not sharing the container")
        return None
    return step


def _fast_lock() -> tuple[int, str] | None:
    """The lock the starter took for this rank (``SIFPY_FAST_LOCK``: ``FD:PATH``, see
    starter_join.c): the other ranks of the job wait on it until this one has the shared
    container up, or gives up sharing. Never the command's."""
    value = config.take("SIFPY_FAST_LOCK")
    if value is None:
        return None
    fd_s, _, path = value.partition(":")
    try:
        fd = int(fd_s)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        return None
    return fd, path


def _release(lock: tuple[int, str] | None) -> None:
    """Not sharing: let the waiting ranks go (and start Python, as this one did, all at
    once: the file stays, so that they don't take turns creating it)."""
    if lock is not None:
        os.close(lock[0])


def _joiner(ident: start.Identity) -> Any:
    """For the holder: what a rank the starter sent it would run (``prepare`` of
    :func:`sifpy.runtime.sharens.run_joined`): its argv (sifpy's), environment and cwd
    parsed and planned as this module does; anything the starter must not skip (devices,
    env files, another kind of start) raises, and the rank then starts Python.

    The launcher's job directories (``PMIX_SERVER_TMPDIR``, ...) are looked up here, in the
    rank that creates the container: the holder's session covers the host's ``/tmp``, where
    they are, so it would plan every other rank without them, a container of another key
    (and each rank would start Python to find the right one)."""
    known: list[str] | None = None
    if any(name.startswith("PMIX_") for name in os.environ):
        from sifpy.runtime.mpi import PMIX_DIRS

        named = [os.environ.get(name, "") for name in PMIX_DIRS]
        known = [os.path.normpath(d) for d in named if d.startswith("/") and os.path.isdir(d)]

    def prepare(
        args: list[str], environ: dict[str, str], cwd: str, step: str
    ) -> tuple[list[str], list[str], dict[str, str], LaunchSpec]:
        i = 0
        while i < len(args) and args[i] in _GLOBAL_FLAGS:
            i += 1
        action = args[i] if i < len(args) else ""
        a = fast_parse(action, args[i + 1 :]) if action in HELP else None
        if a is None or a.no_sharens or a.image.startswith("instance://"):
            raise UsageError("not a shared start")
        if a.nv or a.rocm or a.device or a.env_file or any(getattr(a, o) for o in _UNSHARED):
            raise UsageError("not a start the starter may do")
        from sifpy.runtime.action import action_argv

        a.image = os.path.join(cwd, a.image)
        command = action_argv(action, ([a.command] if action == "exec" else []) + a.args)
        image = Sandbox(a.image)  # the holder puts its own (checked) image in
        spec = _spec(
            action, a, ident, image, command, (), a.mount_driver, None, (), environ, cwd, known
        )
        home = spec.options.home_dest or spec.options.home or ident.home
        return [spec.cwd, home, "/"], spec.argv, spec.env, spec

    return prepare


def _run_in_instance(
    action: str, a: Any, ident: start.Identity, passed: tuple[int, ...], served: Any
) -> int:
    """``exec|run|shell instance://NAME ...``: join the instance's container."""
    import json

    from sifpy.runtime import instances, sharens
    from sifpy.runtime.action import action_argv

    if served is not None:
        served.stop()
    if a.mpi:  # the binds are made when a container is set up, not when it is joined
        raise UsageError(
            "--mpi can't be used with instance://", hint="start the instance with --mpi"
        )
    name = a.image[len("instance://") :]
    base = instances.instance_base(name)
    try:
        with open(f"{base}.json", encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    if info is None or not sharens.running(base):
        raise UsageError(
            f"can't join instance: {name}: not running", hint="see `sifpy instance list`"
        )
    a.image = info["img"]
    args = ([a.command] if action == "exec" else []) + a.args
    image = Sandbox(info["img"])  # only named: the instance's root is joined
    inject = None
    if info.get("inject"):  # the instance's --nv/--rocm/--device: their variables and PATH
        from sifpy.runtime.gpu import Injection

        inject = Injection()
        inject.env.update(info["inject"]["env"])
        inject.path += info["inject"]["path"]
    spec = _spec(action, a, ident, image, action_argv(action, args), (), "auto", inject, passed)
    sharens.run_joined(spec, ident, base, create=False)


def _run(
    action: str,
    a: Any,  # fast_parse's SimpleNamespace or argparse's Namespace
    ident: start.Identity,
    image: SifPartition | Sandbox,
    served: start.Served | None,
    command: list[str],
    prefetch: tuple[str, ...],
    driver: str,
    inject: Injection | None = None,
    passed: tuple[int, ...] = (),
) -> int:
    """Everything computed while squashfuse starts and reads ahead: the rest of the
    runtime, the environment, the launch."""
    from sifpy.runtime.process import launch

    spec = _spec(action, a, ident, image, command, prefetch, driver, inject, passed)
    return launch(spec, inline=True, served=served)


def _spec(
    action: str,
    a: Any,
    ident: start.Identity,
    image: SifPartition | Sandbox,
    command: list[str],
    prefetch: tuple[str, ...],
    driver: str,
    inject: Injection | None = None,
    passed: tuple[int, ...] = (),
    environ: Mapping[str, str] | None = None,
    workdir: str | None = None,
    known_dirs: Collection[str] | None = None,
) -> LaunchSpec:
    """The container to start: its mounts, environment and command; ``environ`` and
    ``workdir``: the caller's (default: this process's); ``known_dirs``: the launcher's
    directories that exist, when this process can't see them (see :func:`_joiner`)."""
    from sifpy.runtime import env as renv
    from sifpy.runtime.spec import LaunchOptions, LaunchSpec

    if a.containall:
        a.contain = a.cleanenv = a.pid = a.ipc = True
    if a.no_pid:
        a.pid = False
    environ = os.environ if environ is None else environ
    start_timeout = runscript_timeout(a, environ)
    no_mount = tuple(n.strip() for item in a.no_mount for n in item.split(",") if n.strip())
    # Apptainer's order: the site's `bind path` lines, the options' binds, then
    # $APPTAINER_BIND's.
    bind_specs = config.get_all("SIFPY_BIND", environ)
    from sifpy.sign import policy

    rules = policy.load()
    site_binds = parse_binds([] if "bind-paths" in no_mount else config_binds(rules))
    binds = parse_binds(a.bind + bind_specs)
    mount_specs = [
        line
        for value in config.get_all("SIFPY_MOUNT", environ)
        for line in value.split("\n")
        if line.strip()
    ]
    mounts = parse_mounts(a.mount + mount_specs)
    # $APPTAINER_BIND in the container: the destinations, for nested containers to bind
    # again (Apptainer's setBinds), less the --mount ones marked nonested.
    nested = [d for _, d, _ in binds] + [d for _, d, _, no_nest in mounts if not no_nest]
    hooks, annotations = _oci_hooks(action, a, command, rules, bool(binds or mounts))
    binds = site_binds + binds + [(s, d, ro) for s, d, ro, _ in mounts]
    home_src = home_dest = None
    if a.home:
        home_src, _, home_dest = a.home.partition(":")
        home_src = os.path.abspath(home_src)
        home_dest = home_dest or home_src
    elif a.fakeroot:
        # Apptainer's setHome: with --fakeroot the caller's home is root's, at /root.
        home_src, home_dest = ident.home, "/root"
    cwd = workdir or os.getcwd()  # the rank's own (the holder plans for ranks)
    env_opts = renv.parse_env_option(a.env)
    runtime = renv.runtime_vars(os.path.abspath(a.image), action, a.app, ",".join(nested))
    if a.shell:
        runtime["SINGULARITY_SHELL"] = runtime["APPTAINER_SHELL"] = a.shell
    injected = renv.injected_env(environ, env_opts)
    if inject is not None:  # the devices' variables and PATH, under the user's own
        injected = {**inject.env, **injected}
        if inject.path:
            mine = ":".join(inject.path)
            user = injected.get("PREPEND_PATH")
            injected["PREPEND_PATH"] = f"{user}:{mine}" if user else mine
    env = renv.process_env(
        host=renv.host_env(environ, a.cleanenv, renv.parse_no_env(a.no_env, environ)),
        injected=injected,
        env_file=join_env(
            getattr(a, "image_env", None), renv.read_env_files(a.env_file, a.no_eval)
        ),
        late=env_opts,
        no_eval=a.no_eval,
        home=home_dest or ident.home,
        runtime=runtime,
        uid=0 if a.fakeroot else ident.uid,
    )
    launcher: list[tuple[str, str, bool]] = []
    if any(name.startswith("PMIX_") for name in environ):  # the module only where it matters
        from sifpy.runtime.mpi import launcher_binds

        launcher = launcher_binds(environ, known_dirs)
    spec = LaunchSpec(
        image=image,
        argv=command,
        env=env,
        cwd=cwd,
        binds=[*launcher, *binds],  # the user's binds win
        options=LaunchOptions(
            fakeroot=a.fakeroot,
            contain=a.contain,
            pid_ns=a.pid,
            no_init=a.no_init,
            ipc_ns=a.ipc,
            writable=a.writable,
            writable_tmpfs=a.writable_tmpfs,
            overlays=parse_overlays(a.overlay),
            no_mount=no_mount,
            workdir=os.path.abspath(a.workdir) if a.workdir else None,
            mount_driver=driver,
            home=home_src,
            home_dest=home_dest,
            no_home=a.no_home,
            identity=ident,
            prefetch=prefetch,
            inject=inject,
            mpi=mpi_host(rules) if a.mpi else None,
            pass_fds=passed,
            pwd=a.pwd,
            hooks=hooks,
            annotations=annotations,
            start_timeout=start_timeout,
        ),
    )
    return spec


# hooksd.DEFAULT_DIR, named here so that a start without hooks imports nothing for them
# (tests/cli/test_hooks_cli.py checks that they agree).
_HOOKS_DIR = "/etc/sifpy/hooks.d"
# What a hook's `when.commands` sees as the command of each action (the OCI config's
# process.args[0]): exec's COMMAND, else the Apptainer metadata script the action runs.
_ACTION_COMMAND = {
    "run": "/.singularity.d/runscript",
    "test": "/.singularity.d/test",
    "shell": "/.singularity.d/actions/shell",
    "start": "/.singularity.d/startscript",
}


def _oci_hooks(
    action: str, a: Any, command: list[str], rules: Policy, has_binds: bool
) -> tuple[tuple[dict[str, object], ...], tuple[tuple[str, str], ...]]:
    """The OCI hooks (hooks.d: /etc/sifpy/hooks.d, sifpy.conf's ``hooks dir``s, then
    ``--hooks-dir``) that apply to this start, and its ``--annotation``s. Without any hook
    file this costs one failed (or empty) directory read and no import."""
    annotations = []
    for item in a.annotation:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"invalid --annotation: {item!r}", hint="use KEY=VALUE")
        annotations.append((key, value))
    conf = [*rules.system.hooks_dirs, *rules.user.hooks_dirs]
    given = [os.path.abspath(d) for d in a.hooks_dir]
    if not conf and not given:
        try:
            if not any(n.endswith(".json") for n in os.listdir(_HOOKS_DIR)):
                return (), tuple(annotations)
        except OSError:  # no such directory (the usual case): no hooks
            return (), tuple(annotations)
    from sifpy.runtime import hooksd

    argv0 = a.command if action == "exec" else _ACTION_COMMAND.get(action, command[0])
    found = hooksd.matching(
        [_HOOKS_DIR, *conf, *given], [argv0], dict(annotations), has_binds, required=given
    )
    return tuple(found), tuple(annotations)
