"""An OCI bundle's ``config.json`` as one sifpy launch: what to run, and the fields refused.

The runtime spec (https://github.com/opencontainers/runtime-spec/blob/main/config.md) asks
more of a runtime than an unprivileged one can give. What sifpy honours: ``process`` (args,
env, cwd, terminal, user within the caller's own id mapping, rlimits, capabilities as a
limit, umask), ``root`` (path, readonly), ``mounts`` (binds, tmpfs, and the kernel file
systems it provides itself: proc, sysfs, devpts, the /dev tmpfs), ``hostname``,
``linux.namespaces`` (pid, ipc, uts, network; user and mount always), ``hooks`` and
``annotations``. A field asking for what it can't do (cgroup limits, joining another
namespace, a custom seccomp profile, device nodes, sysctls, ids outside the mapping) is an
error naming the field. Unknown fields are ignored, as the spec requires.

``linux.maskedPaths`` and ``linux.readonlyPaths`` are applied as runc applies them
(:mod:`sifpy.runtime.ocipaths`). Accepted without effect, on purpose:
``process.noNewPrivileges: false`` (sifpy always sets no_new_privs),
``linux.cgroupsPath`` (no cgroup is made), ``/dev/mqueue`` (not mounted).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from sifpy.errors import RuntimeSetupError
from sifpy.runtime.gpu import Injection
from sifpy.runtime.hooks import STAGES as HOOK_STAGES
from sifpy.runtime.spec import LaunchOptions, LaunchSpec
from sifpy.runtime.start import Sandbox

if TYPE_CHECKING:
    from collections.abc import Sequence

# A hook without a timeout must still end: runc waits forever, but a runtime driven by a
# batch system (Slurm's RunTimeRun) should not hang a job step on a stuck hook.
DEFAULT_HOOK_TIMEOUT = 600

# Linux capability numbers (include/uapi/linux/capability.h), for process.capabilities.
CAPS = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]  # fmt: skip

# Mounts the runtime makes itself (sifpy's plan): destination -> the accepted types. The
# rootless spec's /sys/fs/cgroup comes with the host's /sys (read-only for the user).
_PROVIDED = {
    "/proc": ("proc",),
    "/dev": ("tmpfs",),
    "/dev/pts": ("devpts",),
    "/dev/shm": ("tmpfs",),
    "/dev/mqueue": ("mqueue",),
    "/sys": ("sysfs", "bind"),
    "/sys/fs/cgroup": ("cgroup", "cgroup2"),
}
_NS = {"pid": "pid_ns", "ipc": "ipc_ns", "uts": "uts_ns", "network": "net_ns"}


class Bundle:
    """A loaded bundle: the launch it asks for and what the OCI commands need besides."""

    __slots__ = ("annotations", "config", "path", "spec", "terminal", "umask")

    def __init__(self, path: str, config: dict[str, Any], spec: LaunchSpec) -> None:
        self.path = path
        self.config = config
        self.spec = spec
        process = config.get("process") or {}
        self.terminal = bool(process.get("terminal", False))
        umask = (process.get("user") or {}).get("umask")
        self.umask: int | None = umask if isinstance(umask, int) else None
        self.annotations: dict[str, str] = dict(config.get("annotations") or {})


def _bad(config: str, field: str, reason: str, hint: str | None = None) -> RuntimeSetupError:
    return RuntimeSetupError(
        f"can't use bundle: {config}: {field}: {reason}",
        hint or f"change or remove {field} in {config}",
    )


def load(bundle: str, hooks_dirs: Sequence[str] = (), required: Sequence[str] = ()) -> Bundle:
    """Read and check ``bundle/config.json``; raise an error naming the first field that
    sifpy can't honour. ``hooks_dirs``: hooks.d directories (the caller reads sifpy.conf)
    whose hooks matching this config join config.json's; ``required``: those that must
    exist."""
    bundle = os.path.abspath(bundle)
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise RuntimeSetupError(
            f"can't read bundle: {path}: {exc.strerror}",
            "give the bundle directory (--bundle), which holds config.json",
        ) from exc
    except ValueError as exc:
        raise RuntimeSetupError(f"can't read bundle: {path}: not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise _bad(path, "(top level)", "not a JSON object")
    return Bundle(bundle, config, _spec(bundle, path, config, hooks_dirs, required))


def _get(obj: Any, field: str, kind: type | tuple[type, ...], config: str, default: Any) -> Any:
    """``obj[last part of field]`` checked against ``kind``; ``default`` when absent."""
    value = obj.get(field.rsplit(".", 1)[-1], default) if isinstance(obj, dict) else default
    if value is not default and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _bad(config, field, f"must be {names}, not {type(value).__name__}")
    return value


def _spec(
    bundle: str,
    config_path: str,
    c: dict[str, Any],
    hooks_dirs: Sequence[str] = (),
    required: Sequence[str] = (),
) -> LaunchSpec:
    cp = config_path
    version = _get(c, "ociVersion", str, cp, None)
    if version is None or not version.startswith("1."):
        raise _bad(cp, "ociVersion", f"{version!r}: sifpy runs runtime-spec 1.x bundles")
    root = _get(c, "root", dict, cp, None)
    if root is None:
        raise _bad(cp, "root", "missing", "give root.path, the container's root directory")
    root_path = _get(root, "root.path", str, cp, None)
    if not root_path:
        raise _bad(cp, "root.path", "missing")
    root_path = os.path.normpath(os.path.join(bundle, root_path))
    if not os.path.isdir(root_path):
        raise _bad(cp, "root.path", f"{root_path}: not a directory")
    readonly = _get(root, "root.readonly", bool, cp, False)

    proc = _get(c, "process", dict, cp, None)
    if proc is None:
        raise _bad(cp, "process", "missing", "give process.args, the command to run")
    args = _get(proc, "process.args", list, cp, [])
    if not args or not all(isinstance(a, str) for a in args):
        raise _bad(cp, "process.args", "must be a non-empty list of strings")
    env: dict[str, str] = {}
    for i, entry in enumerate(_get(proc, "process.env", list, cp, [])):
        if not isinstance(entry, str) or "=" not in entry:
            raise _bad(cp, f"process.env[{i}]", f"{entry!r}: not NAME=VALUE")
        name, _, value = entry.partition("=")
        env[name] = value
    cwd = _get(proc, "process.cwd", str, cp, "/")
    if not cwd.startswith("/"):
        raise _bad(cp, "process.cwd", f"{cwd}: not an absolute path")
    for field in ("apparmorProfile", "selinuxLabel"):
        if _get(proc, f"process.{field}", str, cp, ""):
            raise _bad(cp, f"process.{field}", "setting a security label needs privilege")
    if _get(proc, "process.oomScoreAdj", int, cp, None) is not None:
        raise _bad(cp, "process.oomScoreAdj", "not supported by sifpy")
    linux = _get(c, "linux", dict, cp, {})
    fakeroot = _identity(cp, proc, linux)
    opts: dict[str, Any] = {
        "fakeroot": fakeroot,
        "contain": True,  # an OCI container sees what config.json mounts, not the host's
        "no_init": True,  # the command is PID 1 of its PID namespace, as in runc
        "no_home": True,
        "passwd": False,  # the image's own /etc/passwd, as runc leaves it
        "writable": not readonly,
        "pwd": cwd,
        "rlimits": _rlimits(cp, proc),
        "caps": _caps(cp, proc),
    }
    for i, ns in enumerate(_get(linux, "linux.namespaces", list, cp, [])):
        kind = ns.get("type") if isinstance(ns, dict) else None
        if not isinstance(ns, dict) or kind not in (*_NS, "mount", "user", "cgroup"):
            raise _bad(cp, f"linux.namespaces[{i}].type", f"{kind!r}: not supported")
        if ns.get("path"):
            raise _bad(
                cp, f"linux.namespaces[{i}].path", "joining an existing namespace is not supported"
            )
        if kind in _NS:
            opts[_NS[kind]] = True
    hostname = _get(c, "hostname", str, cp, "")
    if hostname:
        if not opts.get("uts_ns"):
            raise _bad(
                cp,
                "hostname",
                "needs a uts namespace",
                'add {"type": "uts"} to linux.namespaces, or remove hostname',
            )
        opts["hostname"] = hostname
    _refuse_linux(cp, linux)
    for field, key in (("maskedPaths", "masked_paths"), ("readonlyPaths", "readonly_paths")):
        paths = _get(linux, f"linux.{field}", list, cp, [])
        for i, p in enumerate(paths):
            if not isinstance(p, str) or not p.startswith("/"):
                raise _bad(cp, f"linux.{field}[{i}]", f"{p!r}: not an absolute path")
        opts[key] = tuple(paths)
    inject = Injection()
    binds = _mounts(cp, bundle, c, opts, inject)
    # The one place the hooks are gathered: hooks from elsewhere (hooks.d directories,
    # matched against this config) are appended to config.json's own here, before any runs.
    inject.hooks = hooks(cp, c)
    annotations = _get(c, "annotations", dict, cp, {})
    opts["annotations"] = tuple((str(k), str(v)) for k, v in annotations.items())
    if hooks_dirs:
        from sifpy.runtime import hooksd

        # hasBindMounts: a bind the config asks for beyond the runtime's own mounts (the
        # rootless spec's /sys rbind is one of those, and would make it always true).
        inject.hooks += hooksd.matching(hooks_dirs, args, annotations, bool(binds), required)
    opts["inject"] = inject if inject.hooks or inject.tmpfs else None
    return LaunchSpec(Sandbox(root_path), list(args), env, cwd, binds, LaunchOptions(**opts))


def _identity(cp: str, proc: dict[str, Any], linux: dict[str, Any]) -> bool:
    """Whether the command runs as 0 (fakeroot) or as the caller: an unprivileged user
    namespace maps one id, the caller's own, to either (user_namespaces(7))."""
    user = _get(proc, "process.user", dict, cp, {})
    ids = []
    for kind, own in (("uid", os.getuid()), ("gid", os.getgid())):
        inner = _get(user, f"process.user.{kind}", int, cp, 0)
        mappings = _get(linux, f"linux.{kind}Mappings", list, cp, [])
        for i, m in enumerate(mappings):
            field = f"linux.{kind}Mappings[{i}]"
            if not isinstance(m, dict) or m.get("hostID") != own or m.get("size") != 1:
                raise _bad(
                    cp,
                    field,
                    f"only your own {kind} ({own}) can be mapped, with size 1",
                    f"run 'runc spec --rootless' as yourself, or map containerID 0 to {own}",
                )
            if m.get("containerID") not in (0, own):
                raise _bad(cp, f"{field}.containerID", f"must be 0 or {own}")
        mapped = {m["containerID"] for m in mappings} or {0, own}
        if inner not in mapped or inner not in (0, own):
            raise _bad(
                cp, f"process.user.{kind}", f"{inner} is not mapped to your own {kind} ({own})"
            )
        ids.append(inner == 0)
    if ids[0] != ids[1]:
        raise _bad(cp, "process.user.gid", "must be 0 exactly when process.user.uid is 0")
    extra = _get(user, "process.user.additionalGids", list, cp, [])
    if any(g != (0 if ids[1] else os.getgid()) for g in extra):
        raise _bad(cp, "process.user.additionalGids", "only the mapped gid can be used")
    return bool(ids[0])


def _rlimits(cp: str, proc: dict[str, Any]) -> tuple[tuple[int, int, int], ...]:
    import resource

    out = []
    for i, r in enumerate(_get(proc, "process.rlimits", list, cp, [])):
        field = f"process.rlimits[{i}]"
        kind = r.get("type") if isinstance(r, dict) else None
        number = getattr(resource, str(kind), None) if str(kind).startswith("RLIMIT_") else None
        if not isinstance(number, int):
            raise _bad(cp, f"{field}.type", f"{kind!r}: not a resource limit")
        soft, hard = r.get("soft"), r.get("hard")
        if not isinstance(soft, int) or not isinstance(hard, int) or soft > hard:
            raise _bad(cp, field, "soft and hard must be integers, soft <= hard")
        out.append((number, soft, hard))
    return tuple(out)


def _caps(cp: str, proc: dict[str, Any]) -> int | None:
    """The bounding set as a mask (the command keeps no capability outside it)."""
    caps = _get(proc, "process.capabilities", dict, cp, None)
    if caps is None:
        return None
    mask = 0
    for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"):
        for i, name in enumerate(_get(caps, f"process.capabilities.{kind}", list, cp, [])):
            short = name[4:] if isinstance(name, str) and name.startswith("CAP_") else None
            if short not in CAPS:
                raise _bad(cp, f"process.capabilities.{kind}[{i}]", f"{name!r}: unknown")
            if kind == "bounding":
                mask |= 1 << CAPS.index(short)
    return mask


def _refuse_linux(cp: str, linux: dict[str, Any]) -> None:
    resources = _get(linux, "linux.resources", dict, cp, {})
    for key, value in resources.items():
        if key == "devices" and all(isinstance(d, dict) and not d.get("allow") for d in value):
            continue  # deny rules: nothing is allowed that the user could not reach anyway
        if value:
            raise _bad(
                cp,
                f"linux.resources.{key}",
                "cgroup limits need a delegated cgroup; sifpy runs unprivileged without one",
                f"remove linux.resources.{key}, or ask the batch system for the limit",
            )
    for field in ("devices", "sysctl", "seccomp", "intelRdt", "personality"):
        if linux.get(field):
            raise _bad(cp, f"linux.{field}", "not supported by an unprivileged runtime")


def _mounts(
    cp: str, bundle: str, c: dict[str, Any], opts: dict[str, Any], inject: Injection
) -> list[tuple[str, str, bool]]:
    """config.json's mounts as sifpy's plan wants them: binds, tmpfs, and which of the
    runtime's own mounts to skip (those the config does not ask for)."""
    binds: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    for i, m in enumerate(_get(c, "mounts", list, cp, [])):
        field = f"mounts[{i}]"
        if not isinstance(m, dict):
            raise _bad(cp, field, "must be an object")
        dest = _get(m, f"{field}.destination", str, cp, "")
        if not dest.startswith("/"):
            raise _bad(cp, f"{field}.destination", f"{dest!r}: not an absolute path")
        dest = os.path.normpath(dest)
        kind = _get(m, f"{field}.type", str, cp, "")
        options = _get(m, f"{field}.options", list, cp, [])
        is_bind = kind == "bind" or "bind" in options or "rbind" in options
        if dest in _PROVIDED and (kind in _PROVIDED[dest] or (is_bind and dest == "/sys")):
            seen.add(dest)
        elif is_bind:
            src = _get(m, f"{field}.source", str, cp, "")
            src = os.path.normpath(os.path.join(bundle, src))
            if not os.path.exists(src):
                raise _bad(cp, f"{field}.source", f"{src}: no such file or directory")
            binds.append((src, dest, "ro" in options))
        elif kind == "tmpfs":
            data = ",".join(o for o in options if o.startswith(("size=", "mode=")))
            if dest in ("/tmp", "/var/tmp"):
                seen.add(dest)
            else:
                inject.tmpfs.append((dest, data or "mode=1777"))
        else:
            raise _bad(
                cp,
                f"{field}.type",
                f"{kind!r} on {dest}: only bind, tmpfs and the kernel's "
                "proc, sysfs, devpts, mqueue mounts are supported without privilege",
            )
    skip = {"home", "cwd", "bind-paths", "/etc/resolv.conf", "/etc/hosts", "/etc/localtime"}
    for name, dest in (("proc", "/proc"), ("sys", "/sys"), ("dev", "/dev"), ("tmp", "/tmp")):
        if dest not in seen:
            skip.add(name)
    if "/dev/pts" not in seen:
        skip.add("devpts")
    opts["no_mount"] = tuple(sorted(skip))
    return binds


def hooks(cp: str, c: dict[str, Any]) -> list[dict[str, object]]:
    """config.json's ``hooks`` as :mod:`sifpy.runtime.hooks` runs them, stage by stage in
    the spec's order. Hooks from elsewhere (a hooks.d directory) are appended to this list
    before they run: this is the one place that builds it."""
    section = _get(c, "hooks", dict, cp, {})
    out: list[dict[str, object]] = []
    for stage in HOOK_STAGES:
        for i, h in enumerate(_get(section, f"hooks.{stage}", list, cp, [])):
            field = f"hooks.{stage}[{i}]"
            path = h.get("path") if isinstance(h, dict) else None
            if not isinstance(path, str) or not path.startswith("/"):
                raise _bad(cp, f"{field}.path", f"{path!r}: not an absolute path")
            args = _get(h, f"{field}.args", list, cp, [path])
            env = _get(h, f"{field}.env", list, cp, [])
            timeout = _get(h, f"{field}.timeout", int, cp, DEFAULT_HOOK_TIMEOUT)
            if timeout <= 0:
                raise _bad(cp, f"{field}.timeout", "must be positive")
            out.append(
                {
                    "stage": stage,
                    "path": path,
                    "args": args or [path],
                    "env": env,
                    "timeout": timeout,
                }
            )
    return out
