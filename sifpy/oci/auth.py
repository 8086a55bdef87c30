"""Registry credentials: where they come from, where they are stored, and challenges.

Sources, first match wins, always looked up by the registry host the user named (never by
a redirect target or a foreign layer host; CVE-2020-15157):

1. ``SIFPY_DOCKER_USERNAME``/``SIFPY_DOCKER_PASSWORD``, then the ``APPTAINER_DOCKER_*``
   names (Apptainer's), for the registry of the image being pulled;
2. sifpy's own file, ``~/.sifpy/credentials.json`` (``sifpy registry login``), mode 0600
   in a 0700 directory, refused when group/other can read it or another user owns it;
3. docker's ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``) ``auths``
   entries (``auth`` = base64 ``user:password``). Credential helpers are not run.

Secrets are kept in :class:`Credentials`, whose ``repr`` hides the password.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sifpy import config
from sifpy.errors import RegistryError
from sifpy.oci.reference import DOCKER_HUB, DOCKER_HUB_ALIASES

CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token) for one registry."""

    username: str
    password: str = field(repr=False)
    source: str = ""

    def __repr__(self) -> str:  # never the password, even in tracebacks
        return f"Credentials(username={self.username!r}, source={self.source!r})"


def normalize_host(host: str) -> str:
    """The key credentials are stored under: scheme and path dropped, Docker Hub unified."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", host.strip()).split("/", 1)[0].lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def sifpy_dir() -> Path:
    """``~/.sifpy`` (``$HOME`` first, as every tool on a cluster expects)."""
    return Path(os.environ.get("HOME") or Path.home()) / ".sifpy"


def credentials_path() -> Path:
    return sifpy_dir() / CREDENTIALS_FILE


def _load_store(path: Path) -> dict[str, dict[str, str]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RegistryError(f"can't read credentials: {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise RegistryError(
                f"can't use credentials: {path}: readable by others or not owned by you",
                f"run 'chmod 600 {path}', or log in again",
            )
        try:
            data = json.loads(f.read(1 << 20))
        except ValueError as exc:
            raise RegistryError(f"can't read credentials: {path}: invalid JSON") from exc
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return {}
    return {k: v for k, v in auths.items() if isinstance(v, dict)}


def _save_store(path: Path, auths: dict[str, dict[str, str]]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created 0600 from the start: the secret is never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": auths}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store_credentials(host: str, username: str, password: str) -> Path:
    """Save credentials for ``host`` in sifpy's file (0600); return the file's path."""
    path = credentials_path()
    auths = _load_store(path)
    auths[normalize_host(host)] = {"username": username, "password": password}
    _save_store(path, auths)
    return path


def remove_credentials(host: str) -> bool:
    """Forget ``host``'s credentials; False if there were none."""
    path = credentials_path()
    auths = _load_store(path)
    if auths.pop(normalize_host(host), None) is None:
        return False
    _save_store(path, auths)
    return True


def _from_env() -> Credentials | None:
    # Each pair under one name (sifpy's, then Apptainer's): never a user from one and a
    # password from the other.
    users, passwords = config.names("SIFPY_DOCKER_USERNAME"), config.names("SIFPY_DOCKER_PASSWORD")
    pairs = zip(users, passwords, strict=True)
    for user_var, password_var in pairs:
        user, password = config.raw(user_var), config.raw(password_var)
        if user and password is not None:
            return Credentials(user, password, f"${user_var}")
    return None


def _from_docker_config(host: str) -> Credentials | None:
    base = os.environ.get("DOCKER_CONFIG") or str(
        Path(os.environ.get("HOME") or Path.home()) / ".docker"
    )
    path = Path(base) / "config.json"
    try:
        data = json.loads(path.read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(entry, dict) or normalize_host(key) != host:
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            if sep:
                return Credentials(user, password, str(path))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], str(path))
    return None


def lookup_credentials(host: str) -> Credentials | None:
    """Credentials for the registry ``host`` (as the user named it), or None."""
    key = normalize_host(host)
    env = _from_env()
    if env is not None:
        return env
    entry = _load_store(credentials_path()).get(key)
    if entry and isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], str(credentials_path()))
    return _from_docker_config(key)


# --- WWW-Authenticate (RFC 7235; distribution "token authentication specification") ----

_PARAM_RE = re.compile(r'\s*([a-zA-Z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge: its scheme and parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def is_private(path: Path) -> bool:
    """Whether ``path`` is a regular file only its owner can read."""
    st = path.lstat()
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077
