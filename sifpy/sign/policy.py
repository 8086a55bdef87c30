"""Run policy: which images ``exec``/``run``/``shell`` accept.

An administrator makes verification mandatory in ``/etc/sifpy/sifpy.conf``, one
``key = value`` per line, ``#`` comments::

    verify = required                  # every image must verify ("optional" by default)
    trusted key = /etc/sifpy/site.pem  # a DSSE public key (repeatable)
    trusted keyring = /etc/sifpy/site.gpg  # OpenPGP public keys (repeatable)
    trusted fingerprint = 12045C8C...  # accept only these PGP signers (repeatable)

The same files hold the GPU and device settings (where a user's file wins: they grant
nothing a bind could not)::

    nvliblist = /etc/sifpy/nvliblist.conf    # --nv's list (default: the one shipped)
    rocmliblist = /etc/sifpy/rocmliblist.conf
    cdi spec dirs = /etc/cdi:/var/run/cdi    # where --device looks for CDI specs

and where OCI hooks are defined, besides ``/etc/sifpy/hooks.d`` (repeatable; the system
file's directories come first, a user's after them, and a later directory's file masks a
same-named one of an earlier directory: see :mod:`sifpy.runtime.hooksd`)::

    hooks dir = /opt/site/hooks.d

and the host's MPI for ``--mpi`` (bind mode; a user's lines replace the system's, as a bind
could)::

    mpi library = /usr/lib/x86_64-linux-gnu/libmpich.so.12  # repeatable (default: the
                                                              # host's mpi alternative)
    mpi dependency = /usr/lib/x86_64-linux-gnu/libucp.so.0  # repeatable, files or
                                                              # directories (default: the
                                                              # libraries' closure)
    mpi compatibility = major                # major (default), full or strict

The system file is the floor. A user's file (``$SIFPY_CONFIG``, same syntax) and
``--verify`` may only add requirements: ``verify = required`` in either side requires
verification; a user's ``verify = optional`` lowers nothing; while the system file requires
verification only its keys are trusted (a user's keys would widen what the site accepts);
fingerprints listed on both sides must both be met. A ``$SIFPY_CONFIG`` that can't be read
is an error, not "no policy", so a typo can't silently drop a requirement the user asked for.

Under verification the image must also be one nobody else can change after it was checked
(:func:`check_writers`): the bytes are verified through an open file descriptor and that same
file is mounted, but another user with write access could rewrite them in place afterwards
(``dd conv=notrunc``), and squashfuse would serve the new bytes.
"""

from __future__ import annotations

import os
import stat

from sifpy import config
from sifpy.errors import SignatureError

SYSTEM_CONFIG = config.SYSTEM_CONFIG
DEVICE_SETTINGS = ("nvliblist", "rocmliblist", "cdi spec dirs")


class Rules:
    """What one configuration file asks for (a plain class: this module is on the exec
    start-up path)."""

    def __init__(self) -> None:
        self.verify_required = False
        self.keys: list[str] = []
        self.keyrings: list[str] = []
        self.fingerprints: set[str] = set()
        # Device settings (not policy: a user's file overrides the system's):
        # nvliblist, rocmliblist (paths), cdi spec dirs (colon-separated directories).
        self.devices: dict[str, str] = {}
        # `bind path = SRC[:DEST]`, as in apptainer.conf: binds into every container (not a
        # rule: a user's file may add some too, as -B could).
        self.binds: list[str] = []
        # `hooks dir = DIR`: more directories of OCI hook definitions (runtime.hooksd).
        self.hooks_dirs: list[str] = []
        # --mpi: the host's MPI libraries, their dependencies, the compatibility mode.
        self.mpi_libraries: list[str] = []
        self.mpi_dependencies: list[str] = []
        self.mpi_compatibility = ""


class Policy:
    """The system's rules (the floor) and the user's (which can only tighten them)."""

    def __init__(self) -> None:
        self.system = Rules()
        self.user = Rules()

    def device_setting(self, key: str) -> str | None:
        """A device setting (:data:`DEVICE_SETTINGS`): the user's file wins."""
        return self.user.devices.get(key) or self.system.devices.get(key)

    def mpi(self) -> tuple[list[str], list[str], str]:
        """``--mpi``'s libraries, dependencies and mode: the user's file wins where it
        names any library (its dependencies go with them), else the system's."""
        src = self.user if self.user.mpi_libraries else self.system
        mode = self.user.mpi_compatibility or self.system.mpi_compatibility or "major"
        return src.mpi_libraries, src.mpi_dependencies, mode

    @property
    def verify_required(self) -> bool:
        return self.system.verify_required or self.user.verify_required


def load(system: str = SYSTEM_CONFIG, user: str | None = None) -> Policy:
    """The run policy: ``system`` (no file: nothing required), then the user's file
    (``user``, default ``$SIFPY_CONFIG``; named but unreadable: an error)."""
    policy = Policy()
    _read(system, policy.system, missing_ok=True)
    user = config.user_config() if user is None else user
    if user:
        _read(user, policy.user, missing_ok=False)
    return policy


def _read(path: str, rules: Rules, missing_ok: bool) -> None:
    settings = config.read_conf(path, missing_ok)  # checked there: known keys, valid values
    if settings is None:
        return
    rules.verify_required = settings.get("verify", ["optional"])[-1] == "required"
    rules.keys += settings.get("trusted key", [])
    rules.keyrings += settings.get("trusted keyring", [])
    rules.fingerprints |= {
        v.replace(" ", "").upper() for v in settings.get("trusted fingerprint", [])
    }
    rules.binds += settings.get("bind path", [])
    rules.hooks_dirs += settings.get("hooks dir", [])
    for key in DEVICE_SETTINGS:
        if key in settings:
            rules.devices[key] = settings[key][-1]
    rules.mpi_libraries += settings.get("mpi library", [])
    rules.mpi_dependencies += settings.get("mpi dependency", [])
    if "mpi compatibility" in settings:
        rules.mpi_compatibility = settings["mpi compatibility"][-1]


def _can_change(st: os.stat_result, uid: int) -> str | None:
    """Why someone other than ``uid`` or root can change ``st``'s file, or None.

    The group and other write bits cover POSIX ACLs too: with an ACL the group bits are
    the mask, which must allow writing for any named user or group to write.
    """
    if st.st_uid not in (uid, 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def check_writers(fd: int, path: str) -> None:
    """Refuse the image open on ``fd`` if anyone but the caller or root can write it, or
    can rename another file over its name (its directory writable by others and not
    sticky, or owned by someone else): what was verified must be what runs.

    This is the rule Apptainer applies to the images its ECL and ``limit container owners``
    settings vouch for. It can't see a writer that opened the file while it was still
    writable and keeps it open: make the image read-only before it is verified.
    """
    uid = os.geteuid()
    why = _can_change(os.fstat(fd), uid)
    hint = "only you or root may be able to change a verified image: chmod go-w it"
    if why is None:
        parent = os.path.dirname(os.path.realpath(path)) or "."
        try:
            dst = os.stat(parent)
        except OSError as exc:
            raise SignatureError(f"can't verify {path}: {parent}: {exc.strerror}") from exc
        why = _can_change(dst, uid)
        if why and dst.st_uid in (uid, 0) and dst.st_mode & stat.S_ISVTX:
            why = None  # sticky: others can't rename or remove what they don't own
        if why:
            why = f"its directory {parent} is {why}"
            hint = "move the image to a directory that only you (or root) can change"
    if why:
        raise SignatureError(
            f"refusing to run {path}: {why}, so it may change after it is verified", hint=hint
        )


def enforce(fd: int, path: str, policy: Policy, user_verify: bool, user_keys: list[str]) -> None:
    """Verify the image open on ``fd`` when the policy or the user asks; raise if it fails.

    Verification reads through ``fd``: the same open file is mounted afterwards, so a path
    swapped after this check can't be run instead.
    """
    if not (policy.verify_required or user_verify):
        return
    check_writers(fd, path)
    from sifpy.sign.verify import TrustedKeys, verify_fd

    sys_rules, user_rules = policy.system, policy.user
    if sys_rules.verify_required:
        # Only the administrator's keys count: a user's would widen what the site accepts.
        keys = TrustedKeys.load(
            dsse_keys=sys_rules.keys, keyrings=sys_rules.keyrings, default_pgp=False
        )
    else:
        keys = TrustedKeys.load(
            dsse_keys=sys_rules.keys + user_rules.keys + user_keys,
            keyrings=sys_rules.keyrings + user_rules.keyrings,
        )
    try:
        res = verify_fd(fd, keys, path=path)
    except SignatureError as exc:
        raise SignatureError(
            f"refusing to run {path}: {exc.message}",
            hint="the image must be signed by a trusted key ('sifpy verify' shows why)",
        ) from exc
    signers = {s.upper() for sig in res.signatures for s in sig.signers}
    for rules, whose in ((sys_rules, "the site's configuration"), (user_rules, "$SIFPY_CONFIG")):
        if rules.fingerprints and not signers & rules.fingerprints:
            raise SignatureError(
                f"refusing to run {path}: not signed by a trusted fingerprint",
                hint=f"{whose} lists the accepted signers",
            )
