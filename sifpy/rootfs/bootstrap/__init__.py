"""Bootstrap agents: the first step of every build stage, ``Bootstrap: <agent>``.

Each agent fills an empty root directory from its source and may return the Docker/OCI
image config (which becomes the image's environment, runscript and labels) and extra
build labels. The agent is picked from the stage header as Apptainer does
(internal/pkg/build/conveyorPacker.go):

============== ====================================================== =====================
agent          source (header keys)                                   module
============== ====================================================== =====================
scratch        nothing: an empty root                                 here
busybox        a static busybox (``MirrorURL:``, ``file://`` too)     :mod:`.busybox`
localimage     a SIF or a sandbox directory (``From:``)               :mod:`.local`
oci            an OCI image layout directory (``From: dir[:tag]``)    :mod:`.oci`
oci-archive    a tar of an OCI layout (``From:``)                     :mod:`.oci`
docker-archive a ``docker save`` tar (``From:``)                      :mod:`.oci`
debootstrap    Debian via mmdebstrap (``OSVersion:``, ``MirrorURL:``,  :mod:`.debootstrap`
               ``Include:``)
docker         an OCI registry (``From:``, ``Registry:``,              :mod:`.docker`
               ``Namespace:``), via :mod:`sifpy.oci`
oras           a SIF stored as an ORAS artifact (``From:``,            :mod:`.oras`
               ``Fingerprints:``)
============== ====================================================== =====================

``library`` (the Sylabs cloud library) is not supported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sifpy.deffile import Stage
from sifpy.errors import BuildError


@dataclass
class Result:
    """What an agent learned about its source."""

    config: dict[str, Any] | None = None  # a Docker/OCI image config, if any
    labels: dict[str, str] = field(default_factory=dict)  # e.g. the OCI base name/digest


@dataclass
class Context:
    """What an agent gets: the stage, the empty root, and a private scratch directory."""

    stage: Stage
    rootfs: str
    workdir: str

    def require(self, key: str) -> str:
        """The value of header ``key``; a clear error when it is missing."""
        value = self.stage.get(key)
        if not value:
            agent = self.stage.bootstrap
            raise BuildError(
                f"can't bootstrap: 'Bootstrap: {agent}' needs a '{key}:' header",
                hint=f"add '{key}: ...' below 'Bootstrap: {agent}'",
            )
        return value


Agent = Callable[[Context], Result]


def _scratch(ctx: Context) -> Result:
    return Result()


def _busybox(ctx: Context) -> Result:
    from sifpy.rootfs.bootstrap import busybox

    return busybox.bootstrap(ctx)


def _localimage(ctx: Context) -> Result:
    from sifpy.rootfs.bootstrap import local

    return local.bootstrap(ctx)


def _oci(ctx: Context) -> Result:
    from sifpy.rootfs.bootstrap import oci

    return oci.bootstrap(ctx)


def _docker(ctx: Context) -> Result:
    from sifpy.rootfs.bootstrap import docker

    return docker.bootstrap(ctx)


def _oras(ctx: Context) -> Result:
    from sifpy.rootfs.bootstrap import oras

    return oras.bootstrap(ctx)


def _debootstrap(ctx: Context) -> Result:
    from sifpy.rootfs.bootstrap import debootstrap

    return debootstrap.bootstrap(ctx)


AGENTS: dict[str, Agent] = {
    "scratch": _scratch,
    "busybox": _busybox,
    "localimage": _localimage,
    "oci": _oci,
    "oci-archive": _oci,
    "docker-archive": _oci,
    "debootstrap": _debootstrap,
    "docker": _docker,
    "oras": _oras,
}


def bootstrap(stage: Stage, rootfs: str | os.PathLike[str], workdir: str) -> Result:
    """Run the stage's agent into the empty directory ``rootfs``."""
    name = (stage.bootstrap or "").strip().lower()
    agent = AGENTS.get(name)
    if stage.bootstrap is None:  # sections only: legal for --update, not for a new image
        raise BuildError(
            "can't build: the definition file has no 'Bootstrap:' header",
            hint="start it with the base image, e.g. 'Bootstrap: docker' and 'From: debian:12'",
        )
    if agent is None:
        known = ", ".join(sorted(AGENTS))
        raise BuildError(
            f"can't bootstrap: unsupported agent 'Bootstrap: {stage.bootstrap}'",
            hint=f"sifpy supports: {known}",
        )
    return agent(Context(stage, os.fspath(rootfs), workdir))
