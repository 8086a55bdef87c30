"""The transport under the registry client: one ``requests.Session`` per client, with
redirects, retries, auth and TLS handled the same way for every request.

* **Bounded reads.** Manifests and configs 4 MiB, tokens and error bodies 1 MiB
  (containers/image ``iolimits``, CVE-2020-1702): reading stops at limit+1 bytes.
* **Retries.** Idempotent GETs are retried on connection errors, 429 (honouring
  ``Retry-After``) and 5xx with exponential backoff and jitter, a bounded number of times.
* **Redirects by hand** (at most 10, never https -> http). ``Authorization`` goes only to
  the registry's own origin (scheme, host and port): redirected blob URLs (S3/CDN) get
  none (CVE-2022-23538, CVE-2018-20060). Only a 401 from the registry's origin is answered
  with its credentials (CVE-2020-15157).
* **Auth** (distribution "token authentication specification"): anonymous or credentialed
  bearer tokens from the ``WWW-Authenticate`` challenge, scope
  ``repository:<name>:pull`` per repository, one retry with a fresh token on 401; or basic
  auth when the registry asks for it. Secrets never go into messages: URLs are logged
  without their query strings, and exceptions never carry headers.
* **TLS.** Each client owns its own ``requests.Session`` and passes ``verify`` on every
  request: system CAs, or the given CA bundle; plain http only when asked for
  (``insecure``), never as a fallback. No state is shared between clients, so an insecure
  client never weakens a later secure one (CVE-2024-35195).
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Self
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

from sifpy.errors import RegistryError
from sifpy.oci import media as M
from sifpy.oci.auth import Credentials, parse_challenge
from sifpy.oci.reference import Reference
from sifpy.util import log

REDIRECTS_MAX = 10
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Errors while reading a body: the connection, never our own disk (ENOSPC must not retry).
READ_ERRORS = (
    urllib3.exceptions.HTTPError,
    requests.RequestException,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class ClientOptions:
    """Per-client transport settings (nothing here is global)."""

    insecure: bool = False  # plain http, for a registry the user named as insecure
    ca_cert: str | None = None  # a PEM bundle to trust instead of the system CAs
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5
    max_retry_after: float = 30.0


def redact(url: str) -> str:
    """A URL safe to show: no userinfo, no query string (signed URLs carry secrets there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return (p.scheme, (p.hostname or "").lower(), p.port or (443 if p.scheme == "https" else 80))


@dataclass
class _Auth:
    """The auth state of one client: tokens per scope, or basic auth."""

    tokens: dict[str, str] = field(default_factory=dict)
    basic: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Session:
    """The transport to one registry: requests with auth, redirects and retries.

    ``registry`` is the registry as the user named it (``docker.io`` is served by
    ``registry-1.docker.io``); ``credentials`` are used only on that registry's origin.
    """

    def __init__(
        self,
        registry: str,
        options: ClientOptions | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.options = options or ClientOptions()
        self.registry = registry
        host = Reference(registry, "x").api_host
        self.base = f"{'http' if self.options.insecure else 'https'}://{host}"
        self._origin = _origin(self.base)
        self._credentials = credentials
        self._auth = _Auth()
        self._session = requests.Session()
        # No netrc, no environment CA overrides: what is trusted is what the options say.
        # Proxies from the environment are still honoured, per URL (see _proxies).
        self._session.trust_env = False
        self._verify: bool | str = self.options.ca_cert or True
        self.action = "pull"  # what messages say the user was doing ("push" for uploads)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------

    def _proxies(self, url: str) -> dict[str, str]:
        return dict(requests.utils.get_environ_proxies(url))

    def _auth_header(self, scope: str) -> dict[str, str]:
        with self._auth.lock:
            token = self._auth.tokens.get(scope)
            basic = self._auth.basic
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if basic and self._credentials is not None:
            raw = f"{self._credentials.username}:{self._credentials.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _send(
        self, url: str, headers: dict[str, str], scope: str
    ) -> tuple[requests.Response, bool]:
        """GET ``url``, following redirects by hand; return the answer and whether it came
        from the registry's own origin."""
        for _ in range(REDIRECTS_MAX + 1):
            own = _origin(url) == self._origin
            hop = dict(headers)
            if own:
                hop.update(self._auth_header(scope))
            resp = self._session.get(
                url,
                headers=hop,
                stream=True,
                allow_redirects=False,
                timeout=self.options.timeout,
                verify=self._verify,
                proxies=self._proxies(url),
            )
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                target = urljoin(url, resp.headers["Location"])
                resp.close()
                if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                    raise RegistryError(
                        f"can't follow redirect: {redact(url)} -> {redact(target)}: "
                        "https to http downgrade refused"
                    )
                if urlsplit(target).scheme not in ("http", "https"):
                    raise RegistryError(f"can't follow redirect: {redact(target)}: bad scheme")
                log.debug(f"redirect {redact(url)} -> {redact(target)}")
                url = target
                continue
            return resp, own
        raise RegistryError(f"can't fetch: {redact(url)}: more than {REDIRECTS_MAX} redirects")

    def _wait(self, attempt: int, resp: requests.Response | None = None) -> None:
        delay = self.options.backoff * (2**attempt) + random.uniform(0, self.options.backoff)
        if resp is not None and (ra := resp.headers.get("Retry-After")):
            try:
                delay = float(ra)
            except ValueError:
                with contextlib.suppress(TypeError, ValueError):
                    delay = parsedate_to_datetime(ra).timestamp() - time.time()
        time.sleep(max(0.0, min(delay, self.options.max_retry_after)))

    def _request(self, url: str, scope: str, headers: dict[str, str]) -> requests.Response:
        """GET with auth, redirects and retries; the caller checks the status."""
        return self._retrying(
            url, scope, lambda: self._send(url, headers, scope), idempotent=True, label=""
        )

    def _retrying(
        self,
        url: str,
        scope: str,
        send: Callable[[], tuple[requests.Response, bool]],
        *,
        idempotent: bool,
        label: str,
    ) -> requests.Response:
        """The loop every request goes through: ``send`` returns the answer and whether it
        came from the registry itself. A 401 challenge from the registry is answered once;
        connection errors, 429 and 5xx are retried (with backoff, Retry-After honoured) only
        when ``idempotent``. ``label`` names the method in messages ("" for a GET)."""
        authenticated = False
        attempt = 0
        what = f"{label} {redact(url)}" if label else redact(url)
        while True:
            try:
                resp, own = send()
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    f"can't connect: {redact(url)}: TLS verification failed",
                    "pass the registry's CA with --ca-cert, or --no-https for a plain-http "
                    "registry you trust (for exec/run/shell of docker://, and in definition "
                    "files: SIFPY_NOHTTPS=1)",
                ) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                if (why := _unreachable(exc)) is not None:
                    # Nothing listens there, or the name does not resolve: retrying with
                    # backoff only makes the user wait (~17 s) for the same answer.
                    raise RegistryError(
                        f"can't connect: {_host_port(url)}: {why}",
                        "check the registry address (and port), and that it is running",
                    ) from None
                if idempotent and attempt < self.options.retries:
                    log.verbose(f"retrying {what}: connection error")
                    self._wait(attempt)
                    attempt += 1
                    continue
                verb = f"{self.action}: " if label else ""
                raise RegistryError(
                    f"can't {verb or 'connect: '}{what}: {type(exc).__name__}",
                    "check the registry address and your network",
                ) from None
            if resp.status_code == 401 and own and not authenticated:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                self._authenticate(challenge, scope)
                authenticated = True
                continue
            if idempotent and resp.status_code in _RETRY_STATUS and attempt < self.options.retries:
                log.verbose(f"retrying {what}: HTTP {resp.status_code}")
                resp.close()
                self._wait(attempt, resp)
                attempt += 1
                continue
            return resp

    def call(
        self,
        method: str,
        url: str,
        scope: str,
        *,
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | None = None,
        idempotent: bool = False,
    ) -> requests.Response:
        """One ``method`` call (no redirects followed) with auth: a 401 challenge from the
        registry is answered once. Connection errors, 429 and 5xx are retried only when
        ``idempotent``. ``body`` makes a fresh request body for each try. The caller
        checks the status and closes the answer."""

        def send() -> tuple[requests.Response, bool]:
            hop = {"Accept-Encoding": "identity", **(headers or {})}
            own = _origin(url) == self._origin
            if own:
                hop.update(self._auth_header(scope))
            resp = self._session.request(
                method,
                url,
                headers=hop,
                data=body() if body is not None else None,
                stream=True,
                allow_redirects=False,
                timeout=self.options.timeout,
                verify=self._verify,
                proxies=self._proxies(url),
            )
            return resp, own

        return self._retrying(url, scope, send, idempotent=idempotent, label=method)

    def _authenticate(self, header: str, scope: str) -> None:
        """Answer a 401 challenge from the registry (token flow or basic)."""
        challenge = parse_challenge(header) if header else None
        if challenge is None:
            raise RegistryError(
                f"can't authenticate: {self.registry}: 401 without a WWW-Authenticate challenge"
            )
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise RegistryError(
                    f"can't {self.action}: {self.registry}: authentication required",
                    f"log in with 'sifpy registry login {self.registry}', or set "
                    "SIFPY_DOCKER_USERNAME and SIFPY_DOCKER_PASSWORD",
                )
            with self._auth.lock:
                self._auth.basic = True
            return
        if challenge.scheme != "bearer":
            raise RegistryError(
                f"can't authenticate: {self.registry}: unsupported scheme {challenge.scheme!r}"
            )
        realm = challenge.params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"can't authenticate: {self.registry}: invalid token realm")
        if urlsplit(realm).scheme == "http" and not self.options.insecure:
            raise RegistryError(
                f"can't authenticate: {self.registry}: token realm {redact(realm)} is plain http",
                "credentials are only sent over https unless --insecure is given",
            )
        params = {"service": challenge.params.get("service", "")}
        if scope:
            params["scope"] = scope
        query = urlencode({k: v for k, v in params.items() if v})
        url = realm + ("&" if "?" in realm else "?") + query if query else realm
        auth = None
        if self._credentials is not None:
            auth = (self._credentials.username, self._credentials.password)
        resp: requests.Response | None = None
        for attempt in range(self.options.retries + 1):
            try:
                resp = self._session.get(
                    url,
                    auth=auth,
                    headers={"Accept-Encoding": "identity"},
                    stream=True,
                    allow_redirects=False,
                    timeout=self.options.timeout,
                    verify=self._verify,
                    proxies=self._proxies(url),
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    f"can't authenticate: {redact(realm)}: TLS verification failed"
                ) from exc
            except (requests.ConnectionError, requests.Timeout):
                if attempt < self.options.retries:
                    self._wait(attempt)
                    continue
                raise RegistryError(
                    f"can't authenticate: {redact(realm)}: token server unreachable"
                ) from None
            if resp.status_code in _RETRY_STATUS and attempt < self.options.retries:
                resp.close()
                self._wait(attempt, resp)
                continue
            break
        assert resp is not None
        if resp.status_code != 200:
            resp.close()
            raise RegistryError(
                f"can't authenticate: {self.registry}: token server answered "
                f"HTTP {resp.status_code}",
                "check your credentials ('sifpy registry login')"
                if auth
                else "the image may be private: log in with 'sifpy registry login'",
            )
        body = read_limited(resp, M.TOKEN_MAX, f"token from {redact(realm)}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0 "):
            raise RegistryError(f"can't authenticate: {redact(realm)}: no valid token in answer")
        with self._auth.lock:
            self._auth.tokens[scope] = token

    def check(
        self,
        resp: requests.Response,
        what: str,
        ok: tuple[int, ...] = (200, 206),
        verb: str = "fetch",
    ) -> None:
        """Raise a clear RegistryError for a non-2xx answer (body read at most 1 MiB)."""
        if resp.status_code in ok:
            return
        detail = ""
        try:
            body = read_limited(resp, M.ERROR_BODY_MAX, "error body", strict=False)
            errors = json.loads(body).get("errors") or []
            detail = "; ".join(
                f"{e.get('code', '')}: {e.get('message', '')}"[:200] for e in errors[:3]
            )
        except (ValueError, AttributeError, TypeError, RegistryError):
            pass
        finally:
            resp.close()
        status = resp.status_code
        reason = detail or f"HTTP {status}"
        hint = None
        if status == 401:
            reason = f"authentication required ({reason})"
            hint = f"log in with 'sifpy registry login {self.registry}' or check your credentials"
        elif status == 403:
            reason = f"access denied ({reason})"
        elif status == 404:
            hint = "check the image name and tag"
        raise RegistryError(f"can't {verb} {what}: {reason}", hint)

    # --- login -------------------------------------------------------------------------

    def check_login(self) -> None:
        """Ping ``/v2/`` with the credentials; raise if they are refused (for ``login``)."""
        resp = self._request(self.base + "/v2/", "", {"Accept-Encoding": "identity"})
        self.check(resp, f"{self.registry}/v2/")
        resp.close()


_REFUSED = "connection refused"


def _unreachable(exc: BaseException) -> str | None:
    """ "connection refused" or "unknown host" when that is the root of ``exc`` (requests
    wraps urllib3's errors, which wrap the socket's), else None."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return _REFUSED
        if isinstance(e, socket.gaierror) and e.errno == socket.EAI_NONAME:
            return "unknown host"  # not EAI_AGAIN: a DNS hiccup is worth a retry
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return None


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def read_limited(resp: requests.Response, limit: int, what: str, *, strict: bool = True) -> bytes:
    """Read at most ``limit`` bytes of raw body; more is an error (or truncated)."""
    buf = bytearray()
    try:
        for chunk in resp.raw.stream(64 << 10, decode_content=False):
            buf += chunk
            if len(buf) > limit:
                if not strict:
                    return bytes(buf[:limit])
                raise RegistryError(
                    f"can't fetch {what}: larger than the {limit}-byte limit",
                    "a registry should never send this much; refusing it",
                )
    finally:
        resp.close()
    return bytes(buf)
