"""The OCI hooks a start runs after the container's command was exec'd (``poststart``) and
after it ended (``poststop``), in the monitor (or, with a PID namespace, through
:mod:`.outside`). Imported only when a start has hooks (:func:`sifpy.runtime.spec.has_hooks`),
before the session covers ``/tmp``.
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING
from sifpy.runtime.spec import BUNDLE, all_hooks

if TYPE_CHECKING:
    from sifpy.runtime.spec import LaunchSpec


def stage_hooks(spec: LaunchSpec, stage: str) -> list[dict[str, object]]:
    """The hooks of ``stage`` this start runs (see :mod:`.hooks`)."""
    return [h for h in all_hooks(spec) if h["stage"] == stage]


def post_start(spec: LaunchSpec, started: list[int], pid: int) -> None:
    """The runtime spec's ``poststart`` hooks, once the command was exec'd (its exec closed
    the pipe's last write end), in this monitor's mount namespace, where the bundle and the
    container's root are (as for ``createContainer``). A container that failed before its
    exec wrote to the pipe (:func:`sifpy.runtime.container.not_started`): it never started,
    nothing runs."""
    failed = False
    for fd in started:
        try:
            while os.read(fd, 64):
                failed = True
        finally:
            os.close(fd)
    if started and not failed:
        _after(spec, "poststart", pid)


def post_stop(spec: LaunchSpec, pid: int) -> None:
    """The runtime spec's ``poststop`` hooks, once the container has ended, before its
    image is unmounted."""
    if stage_hooks(spec, "poststop"):
        _after(spec, "poststop", pid)
    if spec.options.pid_ns and hooks_after(spec):
        from sifpy.runtime import outside

        outside.stop()


def hooks_after(spec: LaunchSpec) -> bool:
    return bool(stage_hooks(spec, "poststart") or stage_hooks(spec, "poststop"))


def _after(spec: LaunchSpec, stage: str, pid: int) -> None:
    """Run ``stage`` (poststart or poststop): through the helper outside the PID namespace
    when there is one (:mod:`.outside`), else here."""
    if spec.options.pid_ns:
        from sifpy.runtime import outside

        if outside.ask(stage, pid):
            return
    run_after(spec, stage, pid)


def run_after(spec: LaunchSpec, stage: str, pid: int) -> None:
    from sifpy.runtime import hooks as hooks_

    state = hooks_.state(
        spec.options.oci_bundle or BUNDLE,
        "running" if stage == "poststart" else "stopped",
        dict(spec.options.annotations),
        pid,
        spec.options.oci_id,
    )
    hooks_.run_logged(stage_hooks(spec, stage), (stage,), state)
