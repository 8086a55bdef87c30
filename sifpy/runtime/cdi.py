"""Container Device Interface: ``--device vendor.com/class=name`` from CDI specs.

A CDI spec (https://github.com/cncf-tags/container-device-interface/blob/main/SPEC.md) is a
JSON or YAML file in ``/etc/cdi`` or ``/var/run/cdi`` (the later directory wins for a
device both define) that names a kind of device and, per device and for the whole spec,
``containerEdits``: variables, device nodes, mounts, OCI hooks and additional groups.

sifpy applies them unprivileged: device nodes are bound from the host (an unprivileged user
can't mknod; the node's own permissions decide who may open it), mounts are binds, hooks
run at the OCI stage they name with the OCI state on stdin, additional groups are kept
where the caller is a member (a user namespace can't grant others).

Specs are validated as the reference library does (spec versions 0.3.0 to 1.0.0, unknown
fields refused, a field newer than the spec's version refused); a bad spec is reported with
its file and the field (``devices[0].containerEdits.mounts[1].hostPath``). A bad spec that
no requested device comes from only warns, as in the reference.
"""

from __future__ import annotations

import json
import os
import re

from sifpy.errors import RuntimeSetupError, UsageError
from sifpy.runtime.gpu import Injection
from sifpy.runtime.hooks import STAGES as HOOK_STAGES

SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0")

# SPEC.md, "kind": vendor (a domain-like name) and class; device names.
_VENDOR = re.compile(r"[A-Za-z](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
_CLASS_OLD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?\Z")
_CLASS = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
_NAME_OLD = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?\Z")
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?\Z")


class SpecError(RuntimeSetupError):
    """A CDI spec that can't be used: ``path: field: reason``."""

    def __init__(self, path: str, field: str, reason: str) -> None:
        where = f"{path}: {field}" if field else path
        super().__init__(
            f"can't load CDI spec: {where}: {reason}",
            hint="fix or remove the spec (see `sifpy cdi list`)",
        )


def _vers(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


class _Checker:
    """Walks one spec document, checking types and fields, with the path of each field."""

    def __init__(self, path: str, version: str) -> None:
        self.path, self.version = path, version
        self.needed = "0.3.0"  # the oldest version that has every field used

    def fail(self, field: str, reason: str) -> SpecError:
        return SpecError(self.path, field, reason)

    def need(self, version: str, field: str) -> None:
        if _vers(version) > _vers(self.version):
            raise self.fail(
                field, f"needs cdiVersion {version} or later (the spec says {self.version})"
            )

    def obj(
        self, value: object, field: str, allowed: dict[str, str], required: tuple[str, ...]
    ) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.fail(field, "must be an object")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{field}.{key}" if field else key, "unknown field")
            self.need(allowed[key], f"{field}.{key}" if field else key)
        for key in required:
            if key not in value:
                raise self.fail(f"{field}.{key}" if field else key, "is required")
        return value

    def string(self, value: object, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, "must be a string")
        return value

    def strings(self, value: object, field: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(field, "must be a list of strings")
        return [self.string(v, f"{field}[{i}]") for i, v in enumerate(value)]

    def integer(self, value: object, field: str, lo: int = 0, hi: int = (1 << 32) - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(field, f"must be an integer from {lo} to {hi}")
        return value

    def absolute(self, value: object, field: str) -> str:
        text = self.string(value, field)
        if not text.startswith("/"):
            raise self.fail(field, f"must be an absolute path, not {text!r}")
        return text

    def annotations(self, value: object, field: str) -> None:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.fail(field, "must map strings to strings")

    def edits(self, value: object, field: str) -> dict[str, object]:
        e = self.obj(
            value,
            field,
            {
                "env": "0.3.0",
                "deviceNodes": "0.3.0",
                "hooks": "0.3.0",
                "mounts": "0.3.0",
                "intelRdt": "0.7.0",
                "additionalGids": "0.7.0",
            },
            (),
        )
        for i, item in enumerate(self.strings(e.get("env", []), f"{field}.env")):
            if "=" not in item or item.startswith("="):
                raise self.fail(f"{field}.env[{i}]", f"must be NAME=VALUE, not {item!r}")
        for i, node in enumerate(self._list(e.get("deviceNodes", []), f"{field}.deviceNodes")):
            f = f"{field}.deviceNodes[{i}]"
            n = self.obj(
                node,
                f,
                {
                    "path": "0.3.0",
                    "hostPath": "0.5.0",
                    "type": "0.3.0",
                    "major": "0.3.0",
                    "minor": "0.3.0",
                    "fileMode": "0.3.0",
                    "permissions": "0.3.0",
                    "uid": "0.3.0",
                    "gid": "0.3.0",
                },
                ("path",),
            )
            self.absolute(n["path"], f"{f}.path")
            if "hostPath" in n:
                self.absolute(n["hostPath"], f"{f}.hostPath")
            if n.get("type", "c") not in ("b", "c", "u", "p"):
                raise self.fail(f"{f}.type", "must be one of b, c, u, p")
            for key in ("major", "minor", "fileMode", "uid", "gid"):
                if key in n:
                    self.integer(n[key], f"{f}.{key}")
            perms = self.string(n.get("permissions", "rwm"), f"{f}.permissions")
            if not perms or set(perms) - set("rwm"):
                raise self.fail(f"{f}.permissions", "must be letters of 'rwm'")
        for i, mount in enumerate(self._list(e.get("mounts", []), f"{field}.mounts")):
            f = f"{field}.mounts[{i}]"
            m = self.obj(
                mount,
                f,
                {
                    "hostPath": "0.3.0",
                    "containerPath": "0.3.0",
                    "options": "0.3.0",
                    "type": "0.4.0",
                },
                ("hostPath", "containerPath"),
            )
            self.string(m["hostPath"], f"{f}.hostPath")
            self.absolute(m["containerPath"], f"{f}.containerPath")
            self.strings(m.get("options", []), f"{f}.options")
            if "type" in m:
                self.string(m["type"], f"{f}.type")
        for i, hook in enumerate(self._list(e.get("hooks", []), f"{field}.hooks")):
            f = f"{field}.hooks[{i}]"
            h = self.obj(
                hook,
                f,
                {
                    "hookName": "0.3.0",
                    "path": "0.3.0",
                    "args": "0.3.0",
                    "env": "0.3.0",
                    "timeout": "0.3.0",
                },
                ("hookName", "path"),
            )
            if h["hookName"] not in HOOK_STAGES:
                raise self.fail(f"{f}.hookName", f"must be one of {', '.join(HOOK_STAGES)}")
            self.absolute(h["path"], f"{f}.path")
            self.strings(h.get("args", []), f"{f}.args")
            self.strings(h.get("env", []), f"{f}.env")
            if "timeout" in h:
                self.integer(h["timeout"], f"{f}.timeout", 1, 3600)
        for i, gid in enumerate(self._list(e.get("additionalGids", []), f"{field}.additionalGids")):
            self.integer(gid, f"{field}.additionalGids[{i}]")
        if "intelRdt" in e:
            self.obj(
                e["intelRdt"],
                f"{field}.intelRdt",
                {
                    "closID": "0.7.0",
                    "l3CacheSchema": "0.7.0",
                    "memBwSchema": "0.7.0",
                    "enableCMT": "0.7.0",
                    "enableMBM": "0.7.0",
                },
                (),
            )
        return e

    def _list(self, value: object, field: str) -> list[object]:
        if not isinstance(value, list):
            raise self.fail(field, "must be a list")
        return value


class Spec:
    """One validated spec file."""

    __slots__ = ("devices", "edits", "kind", "path", "version")

    def __init__(self, path: str, doc: object) -> None:
        self.path = path
        if not isinstance(doc, dict):
            raise SpecError(path, "", "must be an object (a mapping)")
        version = doc.get("cdiVersion")
        if not isinstance(version, str) or version not in VERSIONS:
            raise SpecError(
                path,
                "cdiVersion",
                f"unsupported version {version!r} (sifpy reads {VERSIONS[0]} to {VERSIONS[-1]})",
            )
        c = _Checker(path, version)
        c.obj(
            doc,
            "",
            {
                "cdiVersion": "0.3.0",
                "kind": "0.3.0",
                "annotations": "0.6.0",
                "devices": "0.3.0",
                "containerEdits": "0.3.0",
            },
            ("cdiVersion", "kind", "devices"),
        )
        kind = c.string(doc["kind"], "kind")
        vendor, slash, cls = kind.partition("/")
        class_re = _CLASS if _vers(version) >= (0, 6, 0) else _CLASS_OLD
        if not slash or not _VENDOR.match(vendor) or not class_re.match(cls):
            raise c.fail("kind", f"must be VENDOR/CLASS (e.g. vendor.com/gpu), not {kind!r}")
        self.kind, self.version = kind, version
        if "annotations" in doc:
            c.annotations(doc["annotations"], "annotations")
        self.edits = c.edits(doc.get("containerEdits", {}), "containerEdits")
        devices = doc["devices"]
        if not isinstance(devices, list) or not devices:
            raise c.fail("devices", "must be a non-empty list")
        name_re = _NAME if _vers(version) >= (0, 5, 0) else _NAME_OLD
        self.devices: dict[str, dict[str, object]] = {}
        for i, dev in enumerate(devices):
            f = f"devices[{i}]"
            d = c.obj(
                dev,
                f,
                {"name": "0.3.0", "annotations": "0.6.0", "containerEdits": "0.3.0"},
                ("name", "containerEdits"),
            )
            name = c.string(d["name"], f"{f}.name")
            if not name_re.match(name):
                raise c.fail(f"{f}.name", f"invalid device name {name!r}")
            if name in self.devices:
                raise c.fail(f"{f}.name", f"device {name!r} is defined twice")
            if "annotations" in d:
                c.annotations(d["annotations"], f"{f}.annotations")
            self.devices[name] = c.edits(d["containerEdits"], f"{f}.containerEdits")


def load_file(path: str) -> Spec:
    """Read and validate one spec (``.json``, or ``.yaml``/``.yml`` with PyYAML)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SpecError(path, "", str(reason)) from exc
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(path, f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from exc
    else:
        import yaml  # only when a YAML spec exists: it costs ~15 ms to import

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise SpecError(path, where, f"invalid YAML: {problem}") from exc
    return Spec(path, doc)


class Registry:
    """Every spec of the spec directories; a later directory overrides an earlier one."""

    def __init__(self) -> None:
        self.specs: list[Spec] = []
        self.errors: list[SpecError] = []
        self.devices: dict[str, tuple[Spec, str]] = {}  # "vendor/class=name" -> spec, name

    @classmethod
    def load(cls, dirs: list[str] | None = None) -> Registry:
        reg = cls()
        for d in dirs or SPEC_DIRS:
            try:
                names = sorted(os.listdir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                reg.errors.append(SpecError(d, "", exc.strerror or str(exc)))
                continue
            seen: dict[str, str] = {}
            for name in names:
                if not name.endswith((".json", ".yaml", ".yml")):
                    continue
                path = os.path.join(d, name)
                try:
                    spec = load_file(path)
                except SpecError as exc:
                    reg.errors.append(exc)
                    continue
                reg.specs.append(spec)
                for dev in spec.devices:
                    qualified = f"{spec.kind}={dev}"
                    if qualified in seen:
                        reg.errors.append(
                            SpecError(
                                path, "devices", f"{qualified} is also defined in {seen[qualified]}"
                            )
                        )
                        continue
                    seen[qualified] = path
                    reg.devices[qualified] = (spec, dev)
        return reg

    def resolve(self, requests: list[str]) -> list[tuple[Spec, str]]:
        """The (spec, device name) pairs that ``requests`` name (``kind=name`` or
        ``kind=all``), each once, in order."""
        out: list[tuple[Spec, str]] = []
        for item in (r for req in requests for r in req.split(",") if r):
            kind, eq, name = item.partition("=")
            if not eq or "/" not in kind or not name:
                raise UsageError(
                    f"invalid --device: {item!r}",
                    hint="use VENDOR/CLASS=NAME, e.g. nvidia.com/gpu=0",
                )
            if name == "all":
                found = [v for k, v in self.devices.items() if k.startswith(f"{kind}=")]
            else:
                found = [self.devices[item]] if item in self.devices else []
            if not found:
                errs = [e.message for e in self.errors]
                raise RuntimeSetupError(
                    f"can't find CDI device: {item}",
                    hint=(
                        errs[0]
                        if errs
                        else "`sifpy cdi list` shows the devices of the "
                        "specs in " + ", ".join(SPEC_DIRS)
                    ),
                )
            out += [f for f in found if f not in out]
        return out

    def inject(self, requests: list[str]) -> Injection:
        """The edits of the requested devices and of their specs, as an injection."""
        inj = Injection()
        for e in self.errors:
            inj.warnings.append(e.message)
        pairs = self.resolve(requests)
        done: list[Spec] = []
        for spec, _ in pairs:
            if spec not in done:
                done.append(spec)
                apply_edits(inj, spec.edits, spec.path)
        for spec, name in pairs:
            apply_edits(inj, spec.devices[name], spec.path)
        return inj


def apply_edits(inj: Injection, edits: dict[str, object], path: str) -> None:
    """Add one ``containerEdits`` object (validated) to ``inj``."""
    for item in edits.get("env", []):  # type: ignore[attr-defined]
        k, _, v = item.partition("=")
        inj.env[k] = v
    for node in edits.get("deviceNodes", []):  # type: ignore[attr-defined]
        host = node.get("hostPath") or node["path"]
        if not os.path.exists(host):
            raise RuntimeSetupError(
                f"can't add CDI device node: {node['path']}: {host} does not exist on this host",
                hint=f"the spec {path} does not match this host: regenerate it",
            )
        inj.add_device(host, node["path"])
    for m in edits.get("mounts", []):  # type: ignore[attr-defined]
        opts = m.get("options", [])
        kind = m.get("type", "bind")
        if kind == "tmpfs" and "bind" not in opts and "rbind" not in opts:
            keys = ("size", "mode", "nr_inodes", "nr_blocks", "uid", "gid")
            data = ",".join(o for o in opts if o.partition("=")[0] in keys and "=" in o)
            inj.tmpfs.append((m["containerPath"], data))
            continue
        if kind not in ("bind", "none") and "bind" not in opts and "rbind" not in opts:
            raise RuntimeSetupError(
                f"can't add CDI mount: {m['containerPath']}: type {kind!r} needs privileges",
                hint=f"sifpy binds host paths only; change the mount in {path}",
            )
        if not os.path.exists(m["hostPath"]):
            raise RuntimeSetupError(
                f"can't add CDI mount: {m['containerPath']}: {m['hostPath']} does not exist",
                hint=f"the spec {path} does not match this host: regenerate it",
            )
        inj.add_bind(m["hostPath"], m["containerPath"], readonly="ro" in opts)
    for h in edits.get("hooks", []):  # type: ignore[attr-defined]
        # The stage is one of hooks.STAGES, every one of which sifpy runs (checked above).
        inj.hooks.append(
            {
                "stage": h["hookName"],
                "path": h["path"],
                "args": h.get("args") or [h["path"]],
                "env": h.get("env", []),
                "timeout": h.get("timeout", 60),
            }
        )
    mine = set(os.getgroups()) | {os.getgid()}
    for gid in edits.get("additionalGids", []):  # type: ignore[attr-defined]
        if gid in mine:
            if gid not in inj.gids:
                inj.gids.append(gid)
        else:
            inj.warnings.append(
                f"CDI spec {path} adds group {gid}, which you are not a member of: "
                "the container can't have it"
            )
