"""The command line: the only code that parses argv, prints results, or exits.

The command table maps each command to the module that implements it; a module is imported
only when its command runs, so ``sifpy exec`` pays for nothing but itself. Each command
module provides ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import gc
import sys

from sifpy import TYPE_CHECKING, __version__
from sifpy.errors import ExitStatus, SifpyError

if TYPE_CHECKING:
    from typing import NoReturn

# Commands that end the process as soon as they return: the interpreter's own teardown
# (module and object finalization, ~2 ms) would be paid on every start of a container.
# They leave nothing for atexit handlers or finalizers; the other commands exit normally.
_QUICK_EXIT = frozenset({"exec", "run", "shell", "test"})

# name -> (module, one-line summary). Keep this table cheap: strings only.
COMMANDS: dict[str, tuple[str, str]] = {
    "exec": ("sifpy.cli.exec", "run a command in a container"),
    "run": ("sifpy.cli.exec", "run the container's runscript"),
    "shell": ("sifpy.cli.exec", "start an interactive shell in a container"),
    "test": ("sifpy.cli.exec", "run the container's test script"),
    "instance": ("sifpy.cli.instance", "start, list and stop instances (background containers)"),
    "inspect": ("sifpy.cli.inspect", "show an image's labels, runscript, environment, ..."),
    "sif": ("sifpy.cli.sif", "inspect and edit SIF files (siftool-compatible)"),
    "build": ("sifpy.cli.build", "build a SIF or sandbox from a definition file or image"),
    "sign": ("sifpy.cli.sign", "sign the object groups of a SIF image"),
    "verify": ("sifpy.cli.verify", "verify the signatures of a SIF image"),
    "key": ("sifpy.cli.key", "manage OpenPGP signing keys"),
    "pull": ("sifpy.cli.pull", "pull a docker:// image into a SIF file"),
    "push": ("sifpy.cli.push", "push a SIF file to an OCI registry (oras:// or docker://)"),
    "export": ("sifpy.cli.export", "export a SIF image as an OCI image (oci:, oci-archive:)"),
    "cache": ("sifpy.cli.cache", "list, verify and clean the image cache"),
    "registry": ("sifpy.cli.registry", "log in to and out of OCI registries"),
    "cdi": ("sifpy.cli.cdi", "list the CDI devices that --device can use"),
    "oci": ("sifpy.cli.oci", "run OCI bundles as an OCI runtime (runc's command line)"),
    "overlay": ("sifpy.cli.overlay", "create an ext3 overlay image for --overlay"),
    "version": ("sifpy.cli.misc", "print the version"),
    "help": ("sifpy.cli.misc", "show a command's help: sifpy help COMMAND"),
    "completion": ("sifpy.cli.misc", "print a bash completion script: sifpy completion bash"),
}

_USAGE = """\
usage: sifpy [-h] [--version] [-d] [-q | -s | -v] COMMAND [ARGS...]

sifpy builds and runs SIF container images for HPC, as an unprivileged user.

options:
  -h, --help     show this help and exit
  --version      print the version and exit
  -d, --debug    show debug messages and tracebacks
  -q, --quiet    only print errors (no progress, no warnings)
  -s, --silent   the same as --quiet (Apptainer's spelling)
  -v, --verbose  print more about what is happening

commands:
"""


def _print_usage(stream: object = sys.stdout) -> None:
    lines = [_USAGE]
    lines += [f"  {name:<10} {summary}\n" for name, (_, summary) in COMMANDS.items()]
    lines.append("\nRun 'sifpy COMMAND --help' for a command's options.\n")
    print("".join(lines), end="", file=stream)  # type: ignore[call-overload]


def _usage_error(msg: str, hint: str = "run 'sifpy --help' for the list of commands") -> NoReturn:
    print(f"error: {msg}\nhint: {hint}", file=sys.stderr)
    raise SystemExit(ExitStatus.USAGE)


def _unknown_command(name: str) -> NoReturn:
    import difflib

    close = difflib.get_close_matches(name, COMMANDS, n=3, cutoff=0.6)
    if close:
        _usage_error(
            f"unknown command: {name}", "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
        )
    _usage_error(f"unknown command: {name}")


# Set when a command was interrupted: download threads may still sit in a read that only a
# timeout ends, and the interpreter would join them at exit; nothing of theirs is left to
# keep (final names appear only by rename of complete files), so the process ends at once.
_interrupted = False


def entry() -> NoReturn:
    """The ``sifpy`` program (console script, ``python -m sifpy`` and the fast launcher)."""
    # The cyclic collector waits while a container starts: the imports and the plan make
    # tens of thousands of objects that live until exit, and the collections they trigger
    # cost ~0.8 ms of every start (bench/exec). It comes back for every other command, and
    # where a start turns into a long wait (the monitor, a shared container's holder).
    gc.disable()
    name, status = _dispatch(sys.argv[1:])
    if name in _QUICK_EXIT or _interrupted:
        import os

        for stream in (sys.stdout, sys.stderr):
            try:  # closed or broken: the status stays
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    """Run one sifpy command and return its exit status."""
    return _dispatch(list(sys.argv[1:] if argv is None else argv))[1]


def _check_cwd(name: str) -> None:
    """A deleted current directory (``rm -rf`` of the directory a shell sits in) fails
    every relative path and ``os.getcwd()`` deep inside a command: say so once, first."""
    import os

    try:
        os.getcwd()
    except FileNotFoundError:
        from sifpy.errors import RuntimeSetupError

        cls = RuntimeSetupError if name in _QUICK_EXIT else SifpyError
        raise cls(
            f"can't {name}: the current directory no longer exists",
            hint="cd to an existing directory and run the command again",
        ) from None


def _stop_on_termination() -> None:
    """SIGTERM and SIGHUP stop a command as Ctrl-C does (clean-up runs, "interrupted",
    128+N). exec/run/shell/test keep theirs: the container's monitor relays signals."""
    import signal

    from sifpy.errors import Interrupted

    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def _dispatch(args: list[str]) -> tuple[str | None, int]:
    """Run the command that ``args`` names; return its name (None if none ran) and status."""
    debug = False
    from sifpy.util import log

    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-h", "--help"):
            _print_usage()
            return None, ExitStatus.OK
        if opt == "--version":
            print(f"sifpy version {__version__}")
            return None, ExitStatus.OK
        if opt in ("-d", "--debug"):
            debug = True
            log.set_level(log.DEBUG)
        elif opt in ("-q", "--quiet", "-s", "--silent"):
            log.set_level(log.QUIET)
        elif opt in ("-v", "--verbose"):
            log.set_level(max(log.level, log.VERBOSE))
        else:
            _usage_error(f"unknown option: {opt}")
    if not args:
        _print_usage(sys.stderr)
        return None, ExitStatus.USAGE
    name = args.pop(0)
    if name not in COMMANDS:
        _unknown_command(name)
    if name not in _QUICK_EXIT:
        gc.enable()
        _stop_on_termination()
    try:
        _check_cwd(name)
        __import__(COMMANDS[name][0])
        module = sys.modules[COMMANDS[name][0]]
        status: int = module.main(args, prog=f"sifpy {name}")
        log.summarize()
        return name, status
    except SifpyError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return name, exc.exit_status
    except KeyboardInterrupt as exc:
        global _interrupted
        _interrupted = True
        signum = getattr(exc, "signum", 2)  # Ctrl-C: SIGINT
        if debug:
            import traceback

            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return name, 128 + signum
    except BrokenPipeError:
        # A reader such as `head` went away: not an error of ours. Silence the flush at exit.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return name, ExitStatus.ERROR
