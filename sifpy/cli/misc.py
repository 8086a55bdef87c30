"""``sifpy version``, ``sifpy help COMMAND`` and ``sifpy completion bash``: the small
commands Apptainer users type out of habit."""

from __future__ import annotations

import sys

from sifpy import __version__
from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError

# Completes command names, then the chosen command's options (read from its --help, so it
# never goes stale), then file names. Installed by `make install` for bash-completion.
BASH = r"""# bash completion for sifpy (`sifpy completion bash`)
_sifpy() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in -*) ;; *) cmd=${COMP_WORDS[i]}; break ;; esac
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "@COMMANDS@ --help --version --debug --quiet --verbose" -- "$cur"))
    elif [[ $cmd == help ]]; then
        COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur"))
    elif [[ $cur == -* ]]; then
        local opts re='--?[A-Za-z][A-Za-z0-9-]*'
        opts=$("${COMP_WORDS[0]}" "$cmd" --help 2>/dev/null | grep -oE -- "$re" | sort -u)
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}
complete -o filenames -F _sifpy sifpy
"""


def main(argv: list[str], prog: str) -> int:
    """Run one of the small commands named by ``prog``."""
    from sifpy.cli import COMMANDS
    from sifpy.cli import main as cli_main

    name = prog.rsplit(" ", 1)[-1]
    p = ArgumentParser(prog=prog, description=COMMANDS[name][1])
    if name == "help":
        p.add_argument("command", nargs="?", help="the command to show the help of")
    elif name == "completion":
        p.add_argument("shell", choices=["bash"], help="the shell (bash)")
    a = p.parse_args(argv)
    if name == "version":
        print(__version__)
    elif name == "help":
        if a.command is None:
            return cli_main(["--help"])
        if a.command not in COMMANDS:
            raise UsageError(f"unknown command: {a.command}", hint="run 'sifpy help'")
        return cli_main([a.command, "--help"])
    else:
        sys.stdout.write(BASH.replace("@COMMANDS@", " ".join(COMMANDS)))
    return 0
