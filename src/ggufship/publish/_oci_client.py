"""A small OCI distribution client on httpx: transport, TLS, basic and bearer-token auth.

What the OCI engine (:mod:`ggufship.publish._oci`) needs of the distribution API
(https://github.com/opencontainers/distribution-spec/blob/main/spec.md), nothing
else: ``/v2/`` ping, manifests HEAD/GET/PUT, blobs HEAD/GET, blob uploads
(monolithic POST+PUT, chunked POST+PATCH…+PUT) and the referrers API.

Auth follows the registry's ``WWW-Authenticate`` challenge, learnt from the
``/v2/`` ping: ``Basic`` → the login on every request; ``Bearer realm,service``
(the token flow of distribution's ``docs/spec/auth/token.md``) → a token from the
realm (``GET realm?service=…&scope=repository:<repo>:pull[,push]``, with the
login as basic auth, or anonymously without one), sent as ``Authorization:
Bearer``, reused for requests of the same scope until it expires, fetched again on
a 401 (with the scope that 401 names). The login is the caller's (flags,
``GGUFSHIP_OCI_*``) or else the Docker config's (:mod:`._docker_config`).

Transport: HTTPS for every registry that is not loopback (plain HTTP only for
127.0.0.1/localhost/[::1] or with ``insecure``); the system trust store (honours
``SSL_CERT_FILE``) plus an optional CA bundle. Only GET/HEAD are retried (short
and bounded); a connection lost during an upload is an error, never a retry.
Nothing reads ``~/.netrc`` or proxy variables (``trust_env=False``).
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import httpx
from pydantic import SecretStr

from ggufship.errors import GgufshipError
from ggufship.publish import _docker_config
from ggufship.retry import call_with_retries

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_IDEMPOTENT = ("GET", "HEAD")
# Transport errors a GET/HEAD is retried after (twice, 0.2 s then 0.4 s later); TLS problems are not.
_TRANSIENT = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.TimeoutException)
_TOKEN_MARGIN_S = 10.0  # refresh a token this long before it expires
_DEFAULT_TOKEN_LIFETIME_S = 60.0  # the token spec's default for a missing expires_in


class OciError(GgufshipError):
    """An OCI registry operation failed, or a reference/repository/tag is invalid."""

    exit_code = 45


class OciAuthError(OciError):
    """The registry or its token server refused the login or token, or wants a login and has none."""

    exit_code = 46


class OciUnavailableError(OciError):
    """The registry cannot be reached (connection refused or dropped, timeout, TLS failure)."""

    exit_code = 47


class OciConflictError(OciError):
    """A version tag already points at a different manifest; refused unless ``force``."""

    exit_code = 48


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    return host in _LOOPBACK_HOSTS


def registry_message(response: httpx.Response) -> str:
    """The registry's own error text (OCI error body), or the HTTP status."""
    try:
        errors = response.json().get("errors") or []
        text = "; ".join(
            f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)
        )
    except Exception:  # not JSON (or not read): fall back to the status line
        text = ""
    return text or f"HTTP {response.status_code} {response.reason_phrase}"


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ``("bearer", {...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


@dataclass(frozen=True)
class Transport:
    """How to reach one registry: resolved from an ``OciTarget`` by the engine."""

    registry: str
    repository: str
    insecure: bool
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 60.0
    ca_bundle: Path | None = None
    use_docker_config: bool = True


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class _AuthState:
    scheme: str = ""  # "" (none asked), "basic", "bearer"
    realm: str = ""
    service: str = ""
    tokens: dict[str, _Token] = field(default_factory=dict)


def ssl_context(ca_bundle: Path | None, registry: str) -> ssl.SSLContext:
    """The system trust store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured) plus ``ca_bundle``."""
    context = ssl.create_default_context()
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise OciError(f"{registry}: CA bundle {ca_bundle}: not a readable PEM file ({exc})") from exc
    return context


def _tls_problem(exc: BaseException) -> str | None:
    """The TLS reason inside an httpx connect error, if it is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate not trusted ({seen.verify_message or seen})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen})"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"certificate not trusted ({text})"
    if "SSL" in text or "TLS" in text:
        return f"TLS handshake failed ({text})"
    return None


Body = bytes | Callable[[], Iterator[bytes]] | None
"""A request body: bytes, or a factory of byte iterators (a fresh one for each send, e.g. after a 401)."""


class RegistryClient:
    """One registry and repository; ``request`` handles auth, retries and typed errors."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self.where = f"{transport.registry}/{transport.repository}"
        self.base = f"{'http' if transport.insecure else 'https'}://{transport.registry}"
        self._login = self._resolve_login()
        self._auth = _AuthState()
        verify: ssl.SSLContext | bool = (
            ssl_context(transport.ca_bundle, transport.registry) if not transport.insecure else False
        )
        self.http = httpx.Client(
            verify=verify,
            trust_env=False,
            timeout=httpx.Timeout(transport.timeout_s, connect=min(10.0, transport.timeout_s)),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ credentials

    def _resolve_login(self) -> _docker_config.RegistryLogin | None:
        t = self.t
        if t.username is not None and t.password is not None:
            return _docker_config.RegistryLogin(t.username, t.password, "the given credentials")
        if not t.use_docker_config:
            return None
        try:
            return _docker_config.login_for(t.registry)
        except _docker_config.DockerConfigError as exc:
            raise OciAuthError(f"{t.registry}: {exc}") from exc

    def _who(self) -> str:
        login = self._login
        return f"user {login.username!r} (from {login.source})" if login else "anonymous"

    def _basic_header(self) -> str:
        login = self._login
        assert login is not None
        raw = f"{login.username}:{login.password.get_secret_value()}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    # ------------------------------------------------------------ tokens

    def _scope(self, method: str, path: str) -> str:
        repo = self.t.repository
        if not path.startswith(f"{repo}/") and f"/v2/{repo}/" not in path:
            return ""
        actions = "pull" if method in _IDEMPOTENT else "pull,push"
        return f"repository:{self.t.repository}:{actions}"

    def _token(self, scope: str, *, fresh: bool = False) -> str:
        cached = self._auth.tokens.get(scope)
        if cached is not None and not fresh and time.monotonic() < cached.expires_at:
            return cached.value
        realm, service = self._auth.realm, self._auth.service
        if not realm:
            raise OciAuthError(f"{self.t.registry}: a Bearer challenge without a realm; cannot get a token")
        realm_url = httpx.URL(realm)
        if (
            realm_url.scheme != "https"
            and self._login is not None
            and not (self.t.insecure or is_loopback(realm_url.netloc.decode()))
        ):
            raise OciAuthError(
                f"{self.t.registry}: token realm {realm} is plain HTTP; refusing to send {self._who()}'s "
                "password over it (set insecure to allow)"
            )
        params = {"service": service} if service else {}
        if scope:
            params["scope"] = scope
        headers = {"Authorization": self._basic_header()} if self._login is not None else {}
        try:
            response = self.http.get(realm, params=params, headers=headers, follow_redirects=True)
        except httpx.HTTPError as exc:
            problem = _tls_problem(exc) or str(exc) or type(exc).__name__
            raise OciUnavailableError(
                f"{self.t.registry}: token server {realm} unreachable: {problem}"
            ) from exc
        if response.status_code in (401, 403):
            if self._login is None:
                raise OciAuthError(
                    f"{self.t.registry}: token server {realm} refused an anonymous token for "
                    f"{scope or 'the registry'} (HTTP {response.status_code}); the registry requires "
                    "credentials: set GGUFSHIP_OCI_USERNAME/GGUFSHIP_OCI_PASSWORD or log in (Docker config)"
                )
            raise OciAuthError(
                f"{self.t.registry}: token server {realm} rejected the credentials of {self._who()} "
                f"for {scope or 'the registry'} (HTTP {response.status_code})"
            )
        if response.status_code != 200:
            raise OciAuthError(
                f"{self.t.registry}: token server {realm} answered HTTP {response.status_code} for "
                f"{scope or 'the registry'}"
            )
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME_S)
        except (ValueError, AttributeError, TypeError) as exc:
            raise OciAuthError(f"{self.t.registry}: token server {realm} answered no token JSON") from exc
        if not isinstance(value, str) or not value:
            raise OciAuthError(f"{self.t.registry}: token server {realm} answered without a token")
        expires = time.monotonic() + max(lifetime - _TOKEN_MARGIN_S, lifetime / 2)
        self._auth.tokens[scope] = _Token(value, expires)
        logger.debug("token for %s from %s (expires in %.0f s)", scope or "/v2/", realm, lifetime)
        return value

    def _auth_header(self, method: str, path: str) -> dict[str, str]:
        if self._auth.scheme == "basic" and self._login is not None:
            return {"Authorization": self._basic_header()}
        if self._auth.scheme == "bearer":
            return {"Authorization": "Bearer " + self._token(self._scope(method, path))}
        return {}

    def _learn(self, response: httpx.Response, method: str, path: str, sent: bool) -> dict[str, str]:
        """A 401: learn the challenge, return the header to retry with (or raise)."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(header)
        if scheme == "bearer":
            first = self._auth.scheme != "bearer"
            self._auth.scheme = "bearer"
            self._auth.realm = params.get("realm", "")
            self._auth.service = params.get("service", "")
            scope = params.get("scope", self._scope(method, path))
            if sent and not first:
                # a token was sent and refused: one fresh token for the scope the registry names
                token = self._token(scope, fresh=True)
                self._auth.tokens[self._scope(method, path)] = self._auth.tokens[scope]
                return {"Authorization": "Bearer " + token}
            return {"Authorization": "Bearer " + self._token(scope)}
        if scheme == "basic":
            if self._login is None:
                raise OciAuthError(
                    f"{self.t.registry}: the registry requires credentials (HTTP 401); set "
                    "GGUFSHIP_OCI_USERNAME and GGUFSHIP_OCI_PASSWORD, or log in (Docker config)"
                )
            if sent and self._auth.scheme == "basic":
                raise OciAuthError(f"{self.t.registry}: credentials of {self._who()} rejected (HTTP 401)")
            self._auth.scheme = "basic"
            return {"Authorization": self._basic_header()}
        raise OciAuthError(
            f"{self.t.registry}: HTTP 401 with an unsupported challenge {header[:120]!r} ({method} {path})"
        )

    # ------------------------------------------------------------ requests

    def url(self, path: str) -> str:
        """``<repo>/manifests/x`` → the full URL; an absolute or ``/``-rooted Location is resolved."""
        if path.startswith(("http://", "https://", "/")):
            return urljoin(self.base + "/", path)
        return f"{self.base}/v2/{path}"

    def _send(self, method: str, url: str, headers: dict[str, str], content: bytes | None) -> httpx.Response:
        def attempt() -> httpx.Response:
            try:
                body = content() if callable(content) else content
                request = self.http.build_request(method, url, headers=headers, content=body)
                return self.http.send(request, stream=True, follow_redirects=method in _IDEMPOTENT)
            except httpx.ConnectError as exc:
                tls = _tls_problem(exc) if not self.t.insecure else None
                if tls is None:
                    raise
                hint = (
                    "; give the registry's CA with GGUFSHIP_OCI_CA_BUNDLE / --oci-ca-bundle "
                    "(or SSL_CERT_FILE)"
                    if "not trusted" in tls
                    else "; a plain-HTTP registry needs GGUFSHIP_OCI_INSECURE / --oci-insecure"
                )
                raise OciUnavailableError(f"{self.t.registry}: TLS: {tls}{hint}") from exc

        try:
            return call_with_retries(
                attempt,
                attempts=3 if method in _IDEMPOTENT else 1,
                backoff_s=(0.2, 0.4),
                may_pass=lambda exc: isinstance(exc, _TRANSIENT),
                logger=logger,
                what=f"{self.t.registry}: {method} {url}",
            )
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.ConnectError):
                what = "registry unreachable"
            elif isinstance(exc, httpx.TimeoutException):
                what = f"no answer within {self.t.timeout_s:g} s"
            else:
                what = "connection dropped"
            raise OciUnavailableError(
                f"{self.t.registry}: {what} ({method} {url}): {exc or type(exc).__name__}"
            ) from exc

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: Body = None,
    ) -> Iterator[httpx.Response]:
        """A response whose body is not read yet (close is taken care of); 401 handled, 403 raised."""
        url = self.url(path)
        extra = self._auth_header(method, path)
        response = self._send(method, url, {**(headers or {}), **extra}, content)
        try:
            if response.status_code == 401:
                retry = self._learn(response, method, path, sent=bool(extra))
                response.close()
                response = self._send(method, url, {**(headers or {}), **retry}, content)
                if response.status_code == 401:
                    response.read()
                    self._refused(response, method, path, retry)
            if response.status_code == 403:
                response.read()
                raise OciAuthError(
                    f"{self.t.registry}: access denied to {self.t.repository} for {self._who()} "
                    f"(HTTP 403, {method}): {registry_message(response)}"
                )
            yield response
        finally:
            response.close()

    def _refused(self, response: httpx.Response, method: str, path: str, sent: dict[str, str]) -> None:
        if sent.get("Authorization", "").startswith("Bearer"):
            raise OciAuthError(
                f"{self.t.registry}: the registry refused a fresh token for "
                f"{self._scope(method, path) or '/v2/'} "
                f"of {self._who()} (HTTP 401: {registry_message(response)}); the token is expired, "
                "not yet valid, or not signed by an issuer the registry trusts"
            )
        if self._login is None:
            raise OciAuthError(
                f"{self.t.registry}: the registry requires credentials (HTTP 401); set "
                "GGUFSHIP_OCI_USERNAME and GGUFSHIP_OCI_PASSWORD, or log in (Docker config)"
            )
        raise OciAuthError(f"{self.t.registry}: credentials of {self._who()} rejected (HTTP 401)")

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: Body = None,
    ) -> httpx.Response:
        """Like :meth:`stream`, the body read (manifests, small answers)."""
        with self.stream(method, path, headers=headers, content=content) as response:
            try:
                response.read()
            except httpx.HTTPError as exc:
                raise OciUnavailableError(
                    f"{self.t.registry}: connection dropped reading the answer to {method} {path}: {exc}"
                ) from exc
            return response
