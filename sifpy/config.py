"""Every setting sifpy reads: its environment variables and the lines of ``sifpy.conf``.

One table each (:data:`VARS`, :data:`CONF`), one accessor each (:func:`get`,
:func:`get_all`, :func:`flag`, :func:`raw`; :func:`read_conf`). No other module reads a
``SIFPY_*``, ``APPTAINER_*`` or ``SINGULARITY_*`` variable itself (``tests/test_config.py``
checks it), and the README's settings table is printed from these tables
(:func:`markdown`; the same test checks the README agrees).

A new setting is one line below (``_var(...)`` or ``_conf(...)``), then ``make settings``
rewrites the README table from it.

Variables are read when asked for, not cached at import: the CLI sets a few for the stages
it calls (``build --nohttps``), and a rank that joins a shared container brings its own
environment (the ``environ`` argument). This module is on the start-up path of
``sifpy exec``, so it imports nothing but :mod:`os` and the error tree.
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING
from sifpy.errors import SifpyError

if TYPE_CHECKING:
    from collections.abc import Mapping

# Where the site's settings live; ``$SIFPY_CONFIG`` names a user's file read after it.
SYSTEM_CONFIG = "/etc/sifpy/sifpy.conf"

# Kinds of value, as the README shows them.
TEXT, PATH, PATHS, FLAG, SIZE, LIST = "text", "path", "paths", "flag", "size", "list"


class Var:
    """An environment variable: ``also`` are the Apptainer names read as the same setting;
    ``starter`` says why the C starter reads it too (empty: only Python does); ``start``:
    it may change a container's start (exec, run, test of an image without options), so
    that the starter leaves any start to Python where it is set (sifpy/cli/starter_fast.c)."""

    __slots__ = ("also", "default", "kind", "meaning", "name", "start", "starter")

    def __init__(
        self,
        name: str,
        kind: str,
        default: str,
        meaning: str,
        also: tuple[str, ...],
        starter: str,
        start: bool,
    ) -> None:
        self.name, self.kind, self.default, self.meaning = name, kind, default, meaning
        self.also, self.starter, self.start = also, starter, start


class Conf:
    """A ``key = value`` line of ``sifpy.conf``; ``merge`` says how the user's file
    (``$SIFPY_CONFIG``) combines with the system's."""

    __slots__ = ("absolute", "choices", "default", "key", "meaning", "merge", "repeat")

    def __init__(
        self,
        key: str,
        default: str,
        meaning: str,
        merge: str,
        repeat: bool,
        choices: tuple[str, ...],
        absolute: bool,
    ) -> None:
        self.key, self.default, self.meaning, self.merge = key, default, meaning, merge
        self.repeat, self.choices, self.absolute = repeat, choices, absolute


VARS: dict[str, Var] = {}
CONF: dict[str, Conf] = {}


def _var(
    name: str,
    kind: str,
    default: str,
    meaning: str,
    also: tuple[str, ...] = (),
    starter: str = "",
    start: bool = False,
) -> None:
    VARS[name] = Var(name, kind, default, meaning, also, starter, start)


def _conf(
    key: str,
    default: str,
    meaning: str,
    merge: str,
    repeat: bool = False,
    choices: tuple[str, ...] = (),
    absolute: bool = False,
) -> None:
    CONF[key] = Conf(key, default, meaning, merge, repeat, choices, absolute)


# --- environment variables ----------------------------------------------------------------
# fmt: off
_var("SIFPY_CONFIG", PATH, "", "a user's settings file, read after /etc/sifpy/sifpy.conf; it can only add requirements (missing or unreadable: an error)",
     starter="its fast path reads no settings file: with one to read it leaves the start to Python", start=True)
_var("SIFPY_CACHEDIR", PATH, "$XDG_CACHE_HOME/sifpy", "the blob and SIF cache", also=("APPTAINER_CACHEDIR",))
_var("SIFPY_TMPDIR", PATH, "$TMPDIR", "where `pull`, `build` and `export` work (the squashfs, or the root file system when it can't stream)")
_var("APPTAINER_TMPDIR", PATH, "$TMPDIR", "where `build` works when `$SIFPY_TMPDIR` is not set")
_var("SIFPY_COMPRESSION", TEXT, "zstd:3", "squashfs compression of built and pulled images (`NAME[:LEVEL]`)")
_var("APPTAINER_MKSQUASHFS_ARGS", TEXT, "", "extra mksquashfs arguments for `build` (`--mksquashfs-args`)")
_var("SIFPY_MAX_UNPACKED", SIZE, "64G", "cap on the uncompressed bytes of all of an image's layers (`K`, `M`, `G`, `T`; `0`: no cap), for `pull` and `build`: a small compressed layer can expand to anything (a decompression bomb). Reading stops at the cap, which also bounds the CPU time spent decompressing. Whatever the cap, unpacking stops before the file system written to keeps less than 5% (at least 256 MiB) free. Either stop is one error, and nothing is left (no output, no cached SIF, no work directory).")
_var("SIFPY_PULL_STREAM", TEXT, "auto", "`0`: unpack layers to disk instead of streaming them into tar2sqfs; `1`: require streaming")
_var("SIFPY_PULL_OVERLAP", TEXT, "1", "`0`: download a one-layer image before streaming it, not while")
_var("SIFPY_NOHTTPS", FLAG, "", "`1`, `true` or `yes`: talk to registries over plain http", also=("APPTAINER_NOHTTPS",))
_var("SIFPY_DOCKER_CA_CERT", PATH, "", "a PEM file of CA certificates that registries are checked against")
_var("SIFPY_DOCKER_ARCH", TEXT, "", "the platform `Bootstrap: docker` pulls (default: this machine's)")
_var("SIFPY_DOCKER_USERNAME", TEXT, "", "registry user name (with the password below, before any login)", also=("APPTAINER_DOCKER_USERNAME",))
_var("SIFPY_DOCKER_PASSWORD", TEXT, "", "registry password or token", also=("APPTAINER_DOCKER_PASSWORD",))
_var("SIFPY_KEYSDIR", PATH, "~/.sifpy/keys", "the OpenPGP keyring directory of `sign`, `verify` and `key`")
_var("SIFPY_PASSPHRASE", TEXT, "", "the passphrase of a private key (else asked on the terminal)")
_var("SIFPY_SIGN_KEY", PATH, "", "the PEM private key of `sign` when no `--key` is given")
_var("SIFPY_VERIFY_KEY", PATH, "", "the PEM public key of `verify` when no `--key` is given")
_var("SIFPY_BIND", LIST, "", "binds for every container, as `--bind` (Apptainer's name first, then sifpy's)", also=("APPTAINER_BIND",),
     starter="part of the key that finds a node's shared container for a rank (`--sharens`)", start=True)
_var("SIFPY_MOUNT", LIST, "", "mounts for every container, as `--mount`, one per line", also=("APPTAINER_MOUNT",),
     starter="part of the key that finds a node's shared container for a rank (`--sharens`)", start=True)
_var("SIFPY_NOENV", LIST, "", "host variables not passed to the container, as `--no-env`", also=("APPTAINER_NOENV", "SINGULARITY_NOENV"), start=True)
_var("SIFPY_RUNSCRIPT_TIMEOUT", TEXT, "1m", "how long the action script may take before it execs the command (`--runscript-timeout`, a Go duration such as `30s`)", also=("APPTAINER_RUNSCRIPT_TIMEOUT",), start=True)
_var("SIFPY_CDI_SPEC_DIRS", PATHS, "/etc/cdi:/var/run/cdi", "where `--device` looks for CDI specs (before `cdi spec dirs` in sifpy.conf)")
_var("SIFPY_FUSE_SERVER", TEXT, "", "`sifpy`: every image served by sifpy's own FUSE server (`sifpy/runtime/serve/`, built by `make venv` where libsquashfuse-dev is installed: several threads, the page cache kept across opens); `squashfuse_ll`: every image by squashfuse_ll; unset: the starter's own starts by sifpy's server, linked into the starter (no exec), the others by squashfuse_ll",
     starter="it starts the FUSE server before Python runs")
_var("SIFPY_PYTHON_START", TEXT, "", "set (to anything): every container start goes through Python, none through the starter's own C path (sifpy/cli/starter_fast.c); for comparisons and debugging",
     starter="its fast path leaves the start to Python where it is set", start=True)
_var("SIFPY_SERVED", TEXT, "", "internal: the starter tells Python the image it already serves (removed before the command runs)",
     starter="it sets it, and removes one it did not set")
_var("SIFPY_FAST_LOCK", TEXT, "", "internal: the starter tells Python which lock it holds for a node's shared container (`FD:PATH`)",
     starter="it sets it", start=True)

# --- sifpy.conf -----------------------------------------------------------------------------
_conf("verify", "optional", "`required`: every image must verify before it runs", "either file can require", choices=("required", "optional"))
_conf("trusted key", "", "a DSSE public key (PEM) that verification accepts", "system's only while it requires verification", repeat=True)
_conf("trusted keyring", "", "OpenPGP public keys that verification accepts", "system's only while it requires verification", repeat=True)
_conf("trusted fingerprint", "", "accept only these PGP signers", "both lists must be met", repeat=True)
_conf("bind path", "", "`SRC[:DEST]` bound into every container (a missing source is skipped)", "both add", repeat=True)
_conf("nvliblist", "the one shipped", "`--nv`'s list of libraries and programs", "the user's wins")
_conf("rocmliblist", "the one shipped", "`--rocm`'s list of libraries and programs", "the user's wins")
_conf("hooks dir", "", "a directory of OCI hook definitions (`*.json`), after /etc/sifpy/hooks.d (a missing one is skipped)", "both add: the system's first", repeat=True, absolute=True)
_conf("mpi library", "the library behind the host's MPI alternative", "the host MPI library that `--mpi` binds over the image's (Sarus's rules)", "a user's list replaces the system's", repeat=True, absolute=True)
_conf("mpi dependency", "the library's dependency closure", "a file or directory bound with the MPI library; when given, the whole list", "taken from the file whose `mpi library` is used", repeat=True, absolute=True)
_conf("mpi compatibility", "major", "how close the image's MPI must be to the host's: `major`, `full` or `strict` (Sarus's modes)", "the user's wins", choices=("major", "full", "strict"))
_conf("cdi spec dirs", "/etc/cdi:/var/run/cdi", "where `--device` looks for CDI specs", "the user's wins")
# fmt: on


# --- reading the environment --------------------------------------------------------------


def _declared(name: str) -> Var:
    var = VARS.get(name)
    if var is None:  # a programming error: every variable is declared above
        raise KeyError(f"{name} is not declared in sifpy.config")
    return var


def names(name: str) -> tuple[str, ...]:
    """The names a setting is read under: sifpy's, then Apptainer's."""
    return (name, *_declared(name).also)


def raw(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """One variable exactly as set (``None``: unset), for the callers that tell the names
    apart; ``name`` is a declared variable or one of its Apptainer names."""
    if name not in VARS and not any(name in v.also for v in VARS.values()):
        _declared(name)
    return (os.environ if environ is None else environ).get(name)


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The first non-empty value of the setting's names, else ``None`` (the caller applies
    the documented default: it often depends on other settings, as ``$XDG_CACHE_HOME``)."""
    env = os.environ if environ is None else environ
    for n in names(name):
        value = env.get(n)
        if value:
            return value
    return None


def get_all(name: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every non-empty value of a list setting: Apptainer's names first, sifpy's last (so
    that, where a later entry wins, sifpy's does)."""
    env = os.environ if environ is None else environ
    return [v for n in reversed(names(name)) if (v := env.get(n))]


def flag(name: str) -> bool:
    """A yes/no setting: ``1``, ``true`` or ``yes`` (any case) under any of its names."""
    return any(os.environ.get(n, "").lower() in ("1", "true", "yes") for n in names(name))


def take(name: str) -> str | None:
    """Read and remove an internal variable (one the starter hands to Python, which the
    container must not see)."""
    _declared(name)
    return os.environ.pop(name, None)


def export(name: str, value: str) -> None:
    """Set a variable for the stages this process calls (a CLI flag that means the same)."""
    _declared(name)
    os.environ[name] = value


# --- sifpy.conf -----------------------------------------------------------------------------

CONF_HINT = f"settings: {', '.join(CONF)} (see the README)"


def user_config() -> str | None:
    """``$SIFPY_CONFIG``: the user's settings file, if any."""
    return get("SIFPY_CONFIG")


def read_conf(path: str, missing_ok: bool) -> dict[str, list[str]] | None:
    """The settings of one file, checked against :data:`CONF`: key -> its values in file
    order (one for a setting that does not repeat: the last line wins). ``None``: no file
    and ``missing_ok``; any other unreadable file or unknown line is an error, so a typo
    can't silently drop a requirement."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise SifpyError(
            f"can't read config: {path}: {exc.strerror}",
            hint="$SIFPY_CONFIG names a file of extra requirements; unset it or fix the path",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SifpyError(f"can't read config: {path}: {reason}", hint=CONF_HINT) from exc
    out: dict[str, list[str]] = {}
    for n, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        key = " ".join(key.lower().split())
        if not sep or not value:
            raise SifpyError(
                f"can't read config: {path}:{n}: expected 'key = value'", hint=CONF_HINT
            )
        setting = CONF.get(key)
        if setting is None:
            raise SifpyError(
                f"can't read config: {path}:{n}: unknown setting {key!r}", hint=CONF_HINT
            )
        if setting.choices and value not in setting.choices:
            allowed = " or ".join(f"'{c}'" for c in setting.choices)
            raise SifpyError(
                f"can't read config: {path}:{n}: {key} must be {allowed}", hint=CONF_HINT
            )
        if setting.absolute and not value.startswith("/"):
            raise SifpyError(
                f"can't read config: {path}:{n}: {key} must be an absolute path", hint=CONF_HINT
            )
        if setting.repeat:
            out.setdefault(key, []).append(value)
        else:
            out[key] = [value]
    return out


# --- the README table -----------------------------------------------------------------------

README_BEGIN = "<!-- settings: printed by python -m sifpy.config -->"
README_END = "<!-- end of settings -->"


def markdown() -> str:
    """The README's settings section, between its two markers."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        README_BEGIN,
        "Environment variables (a definition file's own settings are in its header):",
        "",
        "| Variable | Also read | Default | What it does |",
        "|---|---|---|---|",
    ]
    for v in VARS.values():
        also = ", ".join(f"`{a}`" for a in v.also)
        default = f"`{v.default}`" if v.default else ""
        lines.append(f"| `{v.name}` | {also} | {default} | {cell(v.meaning)} |")
    lines += [
        "",
        "The C starter (`sifpy/cli/starter*.c`), which runs before Python, reads only these, "
        "each for one reason; everything else it leaves to Python. Its own start of a "
        "container (`starter_fast.c`) is also left to Python where any of them, or of their "
        "Apptainer names, is set, or a variable that starts with `SIFPYENV_`, "
        "`APPTAINERENV_`, `SINGULARITYENV_` or `PMIX_`:",
        "",
    ]
    fast = "its own start leaves the container to Python where it is set"
    lines += [f"- `{v.name}`: {v.starter or fast}" for v in VARS.values() if v.starter or v.start]
    lines += [
        "",
        f"Settings of `{SYSTEM_CONFIG}` and of `$SIFPY_CONFIG` (`key = value`, `#` comments):",
        "",
        "| Setting | Default | What it does | The user's file |",
        "|---|---|---|---|",
    ]
    for c in CONF.values():
        key = f"`{c.key}`" + (" (repeatable)" if c.repeat else "")
        default = f"`{c.default}`" if c.default else ""
        lines.append(f"| {key} | {default} | {cell(c.meaning)} | {c.merge} |")
    lines.append(README_END)
    return "\n".join(lines) + "\n"


def write_readme(path: str = "README.md") -> None:
    """Rewrite the settings section of the README at ``path`` (``make settings``)."""
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    head, found, rest = readme.partition(README_BEGIN)
    if not found:
        raise SifpyError(f"can't update {path}: no line {README_BEGIN!r} in it")
    _, _, tail = rest.partition(README_END + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + markdown() + tail)
