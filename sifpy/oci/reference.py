"""Image references (``docker://...``), digests and platforms, parsed as Docker does.

The grammar is the distribution reference grammar (distribution ``reference/regexp.go``)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component ( "/" path-component )*
    domain     := host [ ":" port ]
    tag        := [\\w][\\w.-]{0,127}

Docker's normalisation (``reference/normalize.go`` ``splitDockerDomain``): the first
component is a registry only when it contains ``.`` or ``:``, is ``localhost``, or has an
uppercase letter; otherwise the image is on Docker Hub (``docker.io``) and a single
component gets the ``library/`` namespace. The tag defaults to ``latest`` when there is no
digest. Docker Hub's API lives on ``registry-1.docker.io``.

Digests are validated here, before they are ever put into a URL or a file path
(CVE-2024-3727): only ``sha256:`` followed by exactly 64 lowercase hex digits is accepted.
"""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass, field, replace

from sifpy.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
NAME_TOTAL_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:`` + 64 lowercase hex digits, else raise.

    Called on every digest that comes from a user or a registry document before it is
    used to build a URL or a path (CVE-2024-3727: ``sha256:../x`` must never get that far).
    """
    if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
        shown = repr(digest)[:90]
        raise UsageError(
            f"invalid digest: {shown}",
            "a digest is 'sha256:' followed by 64 lowercase hexadecimal digits",
        )
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a validated sha256 digest (safe to use as a file name)."""
    return validate_digest(digest).partition(":")[2]


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    ``registry`` is the registry as users name it (``docker.io``, ``localhost:5000``);
    ``repository`` the path on it (``library/alpine``); ``tag`` is None only when the
    reference pins a ``digest`` and names no tag.
    """

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the distribution API (Docker Hub's differs)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask ``/v2/<name>/manifests/<reference>`` for: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def _is_domain(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


def parse_reference(
    text: str, *, registry: str | None = None, namespace: str | None = None
) -> Reference:
    """Parse ``[docker://][registry[:port]/][namespace/]name[:tag][@sha256:...]``.

    ``registry`` and ``namespace`` are the definition file's ``Registry:`` and
    ``Namespace:`` keys: they apply only when the reference names no registry, and (for
    the namespace) only to a single-component name, as Apptainer does.
    """
    raw = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    elif "://" in text:
        raise UsageError(f"invalid image reference: {raw!r}: unsupported transport")

    def bad(reason: str) -> UsageError:
        return UsageError(
            f"invalid image reference: {raw!r}: {reason}",
            "expected [registry[:port]/][namespace/]name[:tag][@sha256:<64 hex>]",
        )

    if not text:
        raise bad("empty")
    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if _DIGEST_RE.fullmatch(digest) is None:
            raise bad("invalid digest")
    tag: str | None = None
    # A ':' after the last '/' starts the tag; before it, it is a registry port.
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if _TAG_RE.fullmatch(tag) is None:
            raise bad("invalid tag")
    first, sep, rest = text.partition("/")
    if sep and _is_domain(first):
        domain, path = first, rest
        if _DOMAIN_RE.fullmatch(domain) is None:
            raise bad("invalid registry")
    else:
        domain, path = "", text
    if not path:
        raise bad("empty name")
    for component in path.split("/"):
        if _PATH_COMPONENT_RE.fullmatch(component) is None:
            if component.lower() != component:
                raise bad("repository name must be lowercase")
            raise bad(f"invalid name component {component!r}")
    if not domain:
        if registry:
            domain = registry.removeprefix("https://").removeprefix("http://").rstrip("/")
            if _DOMAIN_RE.fullmatch(domain) is None:
                raise bad(f"invalid registry {registry!r}")
        else:
            domain = DOCKER_HUB
        if "/" not in path and namespace:
            ns = namespace.strip("/")
            if any(_PATH_COMPONENT_RE.fullmatch(c) is None for c in ns.split("/")):
                raise bad(f"invalid namespace {namespace!r}")
            path = f"{ns}/{path}"
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(domain) + 1 + len(path) > NAME_TOTAL_MAX:
        raise bad(f"name longer than {NAME_TOTAL_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=domain, repository=path, tag=tag, digest=digest)


# --- platforms ----------------------------------------------------------------------

# Spellings of architectures users and kernels use, to the OCI (GOARCH) names; image-spec
# image-index.md lists the GOOS/GOARCH values. Variants as containerd normalises them.
_ARCH_ALIASES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "amd64": ("amd64", None),
    "i386": ("386", None),
    "i686": ("386", None),
    "386": ("386", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "arm": ("arm", None),
    "ppc64le": ("ppc64le", None),
    "ppc64": ("ppc64", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "mips64le": ("mips64le", None),
    "loong64": ("loong64", None),
}
_WORD_RE = re.compile(r"[a-z0-9_.-]{1,32}")


@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``os``/``architecture``[/``variant``] (image-spec image-index.md)."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None
    # Asked for by the user (--arch, --platform): an image for another platform is then an
    # error, not a warning. Not part of the platform's identity.
    explicit: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return f"{out}/{self.variant}" if self.variant else out

    def matches(self, os: str, architecture: str, variant: str | None) -> bool:
        """Whether an index entry's platform fits this one.

        A wanted variant must match exactly; with none wanted any variant fits. For arm64
        the variant ``v8`` is the default and equals no variant (containerd's rule).
        """
        if os != self.os or architecture != self.architecture:
            return False
        if self.variant is None:
            return True
        have = variant or ("v8" if architecture == "arm64" else None)
        want = self.variant
        return have == want


def host_platform() -> Platform:
    """The platform of this machine."""
    arch, variant = _ARCH_ALIASES.get(_platform.machine().lower(), (_platform.machine(), None))
    return Platform("linux", arch, variant)


def parse_platform(text: str | None = None, arch: str | None = None) -> Platform:
    """Parse ``--platform os/arch[/variant]`` and/or ``--arch arch[/variant]``.

    Either may be None; what is missing comes from the host. ``--arch`` overrides the
    architecture of ``--platform`` when both are given.
    """
    result = host_platform()
    if text:
        parts = text.lower().split("/")
        if not 1 <= len(parts) <= 3 or not all(_WORD_RE.fullmatch(p) for p in parts):
            raise UsageError(
                f"invalid platform: {text!r}", "expected os/arch[/variant], e.g. linux/arm64"
            )
        if len(parts) == 1:
            # `--platform arm64` is an architecture: accept it, as docker does.
            parts = ["linux", *parts]
        a, v = _ARCH_ALIASES.get(parts[1], (parts[1], None))
        result = Platform(parts[0], a, parts[2] if len(parts) == 3 else v)
    if arch:
        a_text, _, v_text = arch.lower().partition("/")
        if not _WORD_RE.fullmatch(a_text) or (v_text and not _WORD_RE.fullmatch(v_text)):
            raise UsageError(f"invalid architecture: {arch!r}", "e.g. amd64, arm64, arm/v7")
        a, v = _ARCH_ALIASES.get(a_text, (a_text, None))
        result = Platform(result.os, a, v_text or v)
    return replace(result, explicit=True) if text or arch else result


def default_sif_name(image: str) -> str:
    """The file name Apptainer gives a pulled image when none is named: the last path
    component and the tag, ``docker://debian:bookworm`` -> ``debian_bookworm.sif``
    (apptainer ``pkg/util/uri`` ``Filename``); a digest-only reference uses the digest's
    first 12 hex digits in place of the tag."""
    _, sep, rest = image.partition("://")
    rest = rest if sep else image
    rest, _, digest = rest.partition("@")
    last = rest.rsplit("/", 1)[-1]
    name, colon, tag = last.partition(":")
    if not colon:
        tag = digest.partition(":")[2][:12] if digest else DEFAULT_TAG
    if not name or not tag or name in (".", ".."):
        raise UsageError(f"can't name the image {image!r}", hint="give an output file name")
    return f"{name}_{tag}.sif"
