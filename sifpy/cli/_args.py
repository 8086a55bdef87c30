"""argparse helpers shared by command modules: usage errors go through sifpy's error tree."""

from __future__ import annotations

import argparse
from typing import NoReturn

from sifpy.errors import UsageError

# Options of Apptainer 1.3's commands that sifpy does not implement (yet): a user who types
# one gets told so, rather than "unrecognized arguments" (https://apptainer.org/docs/user/
# main/cli.html). Options sifpy has are never looked up here.
APPTAINER_ONLY = frozenset(
    [
        "--add-caps",
        "--allow-setuid",
        "--apply-cgroups",
        "--arch",
        "--authfile",
        "--blkio-weight",
        "--boot",
        "--compat",
        "--cpu-shares",
        "--cpus",
        "--cpuset-cpus",
        "--cpuset-mems",
        "--disable-cache",
        "--dns",
        "--docker-host",
        "--docker-login",
        "--drop-caps",
        "--encrypt",
        "-e",
        "--fakeroot-command",
        "--hostname",
        "--ignore-fakeroot-command",
        "--ignore-subuid",
        "--ignore-userns",
        "--json",
        "--keep-privs",
        "--library",
        "--memory",
        "--memory-reservation",
        "--memory-swap",
        "--net",
        "--network",
        "--network-args",
        "--no-privs",
        "--no-setgroups",
        "--nv",
        "--nvccli",
        "--oci",
        "--oom-kill-disable",
        "--passphrase",
        "--pem-path",
        "--pids-limit",
        "--rocm",
        "--scratch",
        "-S",
        "--security",
        "--sparse",
        "--uts",
        "--userns",
        "-u",
        "--vm",
        "--vm-cpu",
        "--vm-err",
        "--vm-ip",
        "--vm-ram",
        "--writable-tmpfs",
        "--nonet",
        "--no-umask",
        "--cwd",
        "--containlibs",
        "--dockerfile",
        "--disable-cache",
        "--add-caps",
        "--no-pid",
        "--no-https",
        "--nohttps",
        "--fix-perms",
        "--bind",
        "--mount",
        "--overlay",
        "--tmpdir",
    ]
)


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (printed by the CLI)."""

    def error(self, message: str) -> NoReturn:
        hint = f"run '{self.prog} --help' for usage"
        if message.startswith("unrecognized arguments: "):
            words = message.removeprefix("unrecognized arguments: ").split()
            opts = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            known = [o for o in opts if o in APPTAINER_ONLY]
            if known:
                raise UsageError(
                    f"{self.prog}: Apptainer's {', '.join(known)} "
                    f"{'is' if len(known) == 1 else 'are'} not supported yet",
                    hint=f"sifpy has part of Apptainer's options; {hint}",
                )
            if opts:
                raise UsageError(f"{self.prog}: unknown option: {', '.join(opts)}", hint=hint)
            message = f"unexpected arguments: {' '.join(words)}"
        raise UsageError(f"{self.prog}: {message}", hint=hint)


def add_registry_options(p: argparse.ArgumentParser) -> None:
    """``--insecure`` (and Apptainer's spellings) and ``--ca-cert``: how to reach a registry."""
    p.add_argument(
        "--insecure",
        "--no-https",
        "--nohttps",
        dest="insecure",
        action="store_true",
        help="use plain http for this registry (only for a registry you trust)",
    )
    p.add_argument("--ca-cert", metavar="FILE", help="trust this CA bundle (PEM) for the registry")
