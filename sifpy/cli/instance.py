"""``sifpy instance start|list|stop``: named containers that stay in the background, as
Apptainer's instances; ``sifpy exec|run|shell instance://NAME`` joins one.

An instance is a shared container (:mod:`sifpy.runtime.sharens`) whose holder stays until
it is stopped; ``start`` runs the image's ``%startscript`` in it, if it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from sifpy.cli import exec as exec_
from sifpy.cli import exec_image, exec_options
from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError
from sifpy.runtime import instances, sharens, start
from sifpy.runtime.action import action_argv
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Manage instances: containers in the background.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = sub.add_parser("start", help="start an instance (runs the image's %%startscript)")
    for flags, kw in exec_options.OPTIONS:
        if flags != ("--sharens",) and flags != ("--no-sharens",):
            st.add_argument(*flags, **kw)
    st.add_argument("image", help="a SIF file or a sandbox directory")
    st.add_argument("name", help="the instance's name")
    st.add_argument("args", nargs=argparse.REMAINDER, help="the start script's arguments")
    ls = sub.add_parser("list", help="list the running instances")
    ls.add_argument("--json", action="store_true", help="print JSON")
    sp = sub.add_parser("stop", help="stop instances (their processes are killed)")
    sp.add_argument("-a", "--all", action="store_true", help="stop every instance")
    sp.add_argument("name", nargs="?", help="the instance's name")
    return p


def main(argv: list[str], prog: str = "sifpy instance") -> int:
    """Run ``sifpy instance``."""
    a = build_parser(prog).parse_args(argv)
    if a.action == "start":
        return _start(a)
    if a.action == "list":
        return _list(a.json)
    return _stop(a)


def _start(a: argparse.Namespace) -> int:
    a.sharens = a.no_sharens = False
    bad = [f"--{o.replace('_', '-')}" for o in exec_._UNSHARED if getattr(a, o)]
    if bad:
        raise UsageError(f"an instance can't use {', '.join(bad)}")
    base = instances.instance_base(a.name)
    ident = start.host_identity()
    image, fd = exec_image.open_image(a.image, a.verify or bool(a.verify_key), a.verify_key)
    try:
        inject = exec_image.devices(a) if a.nv or a.rocm or a.device else None
        command = action_argv("start", a.args)
        spec = exec_._spec("start", a, ident, image, command, (), a.mount_driver, inject)
        info = {"instance": a.name, "img": os.path.abspath(a.image), "ip": "", "time": time.time()}
        if inject is not None:  # what a joining exec needs too: the devices' variables, PATH
            info["inject"] = {"env": inject.env, "path": inject.path}
        pid = instances.start_instance(base, spec, ident, info)
    finally:
        if fd >= 0:
            os.close(fd)
    log.info(f"instance started: {a.name} (pid {pid})")
    return 0


def _list(as_json: bool) -> int:
    found = instances.list_instances()
    if as_json:
        rows = [
            {k: i.get(k) for k in ("instance", "pid", "img", "ip", "logErrPath", "logOutPath")}
            for i in found
        ]
        json.dump({"instances": rows}, sys.stdout, indent=4)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(f"{'INSTANCE NAME':<16} {'PID':<8} {'IP':<16} IMAGE\n")
    for i in found:
        sys.stdout.write(f"{i['instance']!s:<16} {i['pid']!s:<8} {'':<16} {i['img']}\n")
    return 0


def _stop(a: argparse.Namespace) -> int:
    if a.all == bool(a.name):
        raise UsageError("give an instance name or --all")
    names = [str(i["instance"]) for i in instances.list_instances()] if a.all else [a.name]
    for name in names:
        if not sharens.stop(instances.instance_base(name)):
            raise UsageError(
                f"can't stop instance: {name}: not running", hint="see `sifpy instance list`"
            )
        log.info(f"instance stopped: {name}")
    return 0
