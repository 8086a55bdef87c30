"""OCI hooks (from CDI specs), run at the stage they name.

The OCI runtime spec (https://github.com/opencontainers/runtime-spec/blob/main/config.md,
"POSIX-platform Hooks") gives each hook the container's state as JSON on stdin: ``ociVersion``,
``id``, ``status``, ``pid``, ``bundle`` (a directory whose ``config.json`` has
``root.path``), ``annotations``. Hooks such as ``nvidia-ctk hook update-ldcache`` read the
root from there.

sifpy's stages: ``createRuntime``, ``createContainer`` and ``prestart`` run once the root is
assembled, before ``pivot_root``, in the container's mount namespace (the root at its
session path, the host's paths around it); ``startContainer`` runs inside the container
(after ``pivot_root``), just before the command. A hook that fails (non-zero status, or its
timeout) stops the start, as in runc.
"""

from __future__ import annotations

import json
import os

from sifpy.errors import RuntimeSetupError, ToolError
from sifpy.util.proc import PIPE, TimeoutExpired
from sifpy.util.proc import run as run_program

BEFORE_PIVOT = ("createRuntime", "createContainer", "prestart")
AFTER_START = ("poststart",)
AFTER_STOP = ("poststop",)
OCI_VERSION = "1.0.2"


def write_bundle(bundle: str, root: str, argv: list[str], env: dict[str, str]) -> None:
    """A minimal OCI bundle: ``config.json`` with the root path and the process."""
    os.makedirs(bundle, mode=0o700, exist_ok=True)
    config = {
        "ociVersion": OCI_VERSION,
        "root": {"path": root, "readonly": True},
        "process": {"args": argv, "env": [f"{k}={v}" for k, v in env.items()], "cwd": "/"},
    }
    with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def run_logged(
    hooks: list[dict[str, object]], stages: tuple[str, ...], bundle: str, status: str
) -> None:
    """:func:`run` for ``poststart`` and ``poststop``, whose failures the runtime spec
    makes warnings: the container has started (or ended) whatever they say."""
    from sifpy.util import log

    for hook in hooks:
        if hook["stage"] in stages:
            try:
                run([hook], stages, bundle, status)
            except RuntimeSetupError as exc:
                log.warn(exc.message)


def run(hooks: list[dict[str, object]], stages: tuple[str, ...], bundle: str, status: str) -> None:
    """Run the hooks of ``stages``, in order, each with the state on stdin."""
    state = json.dumps(
        {
            "ociVersion": OCI_VERSION,
            "id": f"sifpy-{os.getpid()}",
            "status": status,
            "pid": os.getpid(),
            "bundle": bundle,
            "annotations": {},
        }
    )
    for hook in hooks:
        if hook["stage"] not in stages:
            continue
        path = str(hook["path"])
        argv = [str(a) for a in hook["args"]]  # type: ignore[attr-defined]
        env = dict(e.partition("=")[::2] for e in hook["env"])  # type: ignore[attr-defined]
        try:
            done = run_program(
                argv,
                f"run {hook['stage']} hook",
                executable=path,
                input=state,
                env=env,
                stdout=PIPE,
                text=True,
                timeout=int(hook["timeout"]),  # type: ignore[call-overload]
                ok=None,
            )
        except TimeoutExpired as exc:
            raise RuntimeSetupError(
                f"can't run {hook['stage']} hook: {path}: timed out after {exc.timeout} s"
            ) from exc
        except ToolError as exc:
            raise RuntimeSetupError(exc.message, exc.hint) from exc
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise RuntimeSetupError(f"can't run {hook['stage']} hook: {path}: {tail[0]}")
