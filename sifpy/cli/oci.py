"""``sifpy oci``: sifpy as an OCI runtime, with runc's command line (create, start, state,
kill, delete, run, exec, list), so that Slurm's ``oci.conf`` and other runc drivers can use
it; and ``mount``/``umount``, which turn a SIF into a bundle.

runc's global options that have no meaning here (``--rootless``, ``--log``,
``--log-format``, ``--systemd-cgroup``) are accepted so that a runc command line works
unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys

from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Run OCI bundles (runc's command line).")
    p.add_argument("--root", help="the state directory (default: $XDG_RUNTIME_DIR/sifpy/oci)")
    p.add_argument(
        "--hooks-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also run the OCI hooks of DIR (JSON 1.0.0 hook files; repeatable), after "
        "/etc/sifpy/hooks.d and sifpy.conf's 'hooks dir's",
    )
    for flag in ("--log", "--log-format", "--rootless", "--criu"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--systemd-cgroup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def bundle_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-b", "--bundle", default=".", help="the bundle directory (default: .)")
        sp.add_argument("--pid-file", help="write the container's pid to this file")
        sp.add_argument("--console-socket", help="a unix socket to send the terminal's master to")
        sp.add_argument("--no-pivot", action="store_true", help=argparse.SUPPRESS)
        sp.add_argument("--no-new-keyring", action="store_true", help=argparse.SUPPRESS)
        sp.add_argument("id", help="the container's id")

    bundle_opts(sub.add_parser("create", help="create a container (its process waits for start)"))
    r = sub.add_parser("run", help="create and start a container, wait for its process")
    bundle_opts(r)
    r.add_argument("-d", "--detach", action="store_true", help="return once it started")
    r.add_argument("--keep", action="store_true", help="keep the state after it ends")
    for name, text in (
        ("start", "start a created container's process"),
        ("state", "print a container's state (JSON)"),
    ):
        sub.add_parser(name, help=text).add_argument("id")
    k = sub.add_parser("kill", help="send a signal to a container's process")
    k.add_argument("-a", "--all", action="store_true", help="(the PID namespace's init relays)")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="TERM", help="a name or number (default TERM)")
    d = sub.add_parser("delete", help="delete a stopped (or created) container")
    d.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    d.add_argument("id")
    ls = sub.add_parser("list", help="list the containers")
    ls.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ls.add_argument("-q", "--quiet", action="store_true", help="only the ids")
    e = sub.add_parser("exec", help="run a process in a running container")
    e.add_argument("-e", "--env", action="append", default=[], help="NAME=VALUE (repeatable)")
    e.add_argument("--cwd", help="the working directory in the container")
    e.add_argument("id")
    e.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    m = sub.add_parser("mount", help="make a bundle whose root file system is a SIF image")
    m.add_argument("image", help="a SIF file")
    m.add_argument("bundle", help="the bundle directory (created)")
    u = sub.add_parser("umount", help="undo 'sifpy oci mount'")
    u.add_argument("bundle")
    return p


def main(argv: list[str], prog: str = "sifpy oci") -> int:
    """Run ``sifpy oci``."""
    from sifpy.runtime import oci, ocistate

    a = build_parser(prog).parse_args(argv)
    if a.action == "mount":
        return _mount(a.image, a.bundle)
    if a.action == "umount":
        from sifpy.runtime import ocimount

        ocimount.unmount_image(a.bundle)
        return 0
    making = a.action in ("create", "run")
    root = ocistate.check_root(a.root, making) if a.root else ocistate.default_root()
    hooks = _hooks_dirs(a.hooks_dir) if making else ([], [])
    if a.action == "create":
        oci.create(root, a.id, a.bundle, a.pid_file, a.console_socket, hooks)
    elif a.action == "run":
        if a.detach:
            oci.create(root, a.id, a.bundle, a.pid_file, a.console_socket, hooks)
            oci.start(root, a.id)
            return 0
        return oci.run(root, a.id, a.bundle, a.pid_file, a.console_socket, a.keep, hooks)
    elif a.action == "start":
        oci.start(root, a.id)
    elif a.action == "state":
        print(json.dumps(ocistate.public(ocistate.read(root, a.id)), indent=2))
    elif a.action == "kill":
        oci.kill(root, a.id, _signal(a.signal))
    elif a.action == "delete":
        oci.delete(root, a.id, a.force)
    elif a.action == "list":
        _list(ocistate.listing(root), a.format, a.quiet)
    elif a.action == "exec":
        if not a.command:
            raise UsageError("can't exec: no command given")
        env = None
        if a.env:
            from sifpy.runtime import bundle

            state = ocistate.read(root, a.id)
            env = dict(bundle.load(state["bundle"]).spec.env)
            for item in a.env:
                name, sep, value = item.partition("=")
                if not sep:
                    raise UsageError(f"can't use --env: {item}: not NAME=VALUE")
                env[name] = value
        return oci.exec_in(root, a.id, a.command, env, a.cwd)
    return 0


def _hooks_dirs(given: list[str]) -> tuple[list[str], list[str]]:
    """The hooks.d directories, as ``sifpy exec`` reads them: the site's default, sifpy.conf's
    ``hooks dir`` lines (system, then user), then ``--hooks-dir`` (which must exist)."""
    import os

    from sifpy.runtime.hooksd import DEFAULT_DIR
    from sifpy.sign import policy

    rules = policy.load()
    explicit = [os.path.abspath(d) for d in given]
    dirs = [DEFAULT_DIR, *rules.system.hooks_dirs, *rules.user.hooks_dirs, *explicit]
    return dirs, explicit


def _signal(name: str) -> int:
    import signal

    if name.isdigit():
        return int(name)
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, int):
        raise UsageError(f"can't use signal: {name}: unknown", "give a name (TERM, KILL) or number")
    return int(sig)


def _list(states: list[dict[str, object]], fmt: str, quiet: bool) -> None:
    if quiet:
        for s in states:
            print(s["id"])
    elif fmt == "json":
        print(json.dumps(states))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [
            (
                str(s["id"]),
                str(s["pid"]),
                str(s["status"]),
                str(s["bundle"]),
                str(s["created"]),
                str(s["owner"]),
            )
            for s in states
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def _mount(image: str, bundle: str) -> int:
    import os

    from sifpy.cli.exec_image import open_image
    from sifpy.runtime import ocimount
    from sifpy.runtime.start import SifPartition

    part, fd = open_image(image)
    if fd >= 0:
        os.close(fd)
    if not isinstance(part, SifPartition):
        raise UsageError(f"can't mount: {image}: not a SIF file", "give a SIF image")
    ocimount.mount_image(image, part.offset, bundle)
    return 0
