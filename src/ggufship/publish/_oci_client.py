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
Nothing reads ``~/.netrc`` or proxy variables (``trust_env=False``; urllib3 reads
neither).

Blob bodies (:meth:`RegistryClient.download_blob`) are received with urllib3 in
256 KiB reads: httpx hands its body over in 64 KiB pieces through h11, which costs
about twice the CPU per GiB (issue 12 part 1). Everything else — ping, tokens,
manifests, uploads — stays on httpx; both use the same auth state and TLS context.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import httpx
import urllib3
from pydantic import SecretStr

from ggufship.errors import GgufshipError
from ggufship.integrity import WRITE_BYTES
from ggufship.publish import _docker_config
from ggufship.retry import call_with_retries

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_IDEMPOTENT = ("GET", "HEAD")
# A GET/HEAD (httpx or a urllib3 blob GET) is tried this often after a transient transport error,
# waiting these seconds between tries; TLS problems are not retried.
_GET_ATTEMPTS = 3
_RETRY_BACKOFF_S = (0.2, 0.4)
_TRANSIENT = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.TimeoutException)
# Blob GETs on urllib3: urllib3's own retries are off (one try per call, redirects followed); the
# same transient errors (NewConnectionError is a ConnectTimeoutError).
_BLOB_TRANSIENT = (
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.ProtocolError,
)
# One read: one bytes object handed to the sink as is, the size of the sink's writes (WRITE_BYTES
# says why that size; 4 MiB reads measured no different, bench/RESULTS.md).
_BLOB_READ_BYTES = WRITE_BYTES
_MAX_REDIRECTS = 20  # httpx's default
_ERROR_BODY_BYTES = 64 * 1024  # an error answer's body is read up to this much, for its message
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
        body = response.content
    except httpx.ResponseNotRead:
        body = b""
    return error_message(response.status_code, response.reason_phrase, body)


def error_message(status: int, reason: str, body: bytes) -> str:
    """The OCI error body's ``code: message`` pairs, or ``HTTP <status> <reason>``."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(
            f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)
        )
    except Exception:  # not JSON (or not an object): fall back to the status line
        text = ""
    return text or f"HTTP {status} {reason}"


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
    """The TLS reason inside an httpx or urllib3 connect error, if it is one."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate not trusted ({seen.verify_message or seen})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen})"
        wrapped = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = seen.__cause__ or seen.__context__ or wrapped
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
        self._tls = ssl_context(transport.ca_bundle, transport.registry) if not transport.insecure else None
        self._connect_timeout_s = min(10.0, transport.timeout_s)
        self.http = httpx.Client(
            verify=self._tls if self._tls is not None else False,
            trust_env=False,
            timeout=httpx.Timeout(transport.timeout_s, connect=self._connect_timeout_s),
        )
        self._blobs: urllib3.PoolManager | None = None  # made by the first download_blob

    def close(self) -> None:
        self.http.close()
        if self._blobs is not None:
            self._blobs.clear()

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

    def _learn(self, header: str, method: str, path: str, sent: bool) -> dict[str, str]:
        """A 401 with ``WWW-Authenticate: header``: learn the challenge, return the header to retry
        with (or raise)."""
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

    def _tls_error(self, tls: str) -> OciUnavailableError:
        hint = (
            "; give the registry's CA with GGUFSHIP_OCI_CA_BUNDLE / --oci-ca-bundle (or SSL_CERT_FILE)"
            if "not trusted" in tls
            else "; a plain-HTTP registry needs GGUFSHIP_OCI_INSECURE / --oci-insecure"
        )
        return OciUnavailableError(f"{self.t.registry}: TLS: {tls}{hint}")

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
                raise self._tls_error(tls) from exc

        try:
            return call_with_retries(
                attempt,
                attempts=_GET_ATTEMPTS if method in _IDEMPOTENT else 1,
                backoff_s=_RETRY_BACKOFF_S,
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
                retry = self._learn(
                    response.headers.get("WWW-Authenticate", ""), method, path, sent=bool(extra)
                )
                response.close()
                response = self._send(method, url, {**(headers or {}), **retry}, content)
                if response.status_code == 401:
                    response.read()
                    self._refused(registry_message(response), method, path, retry)
            if response.status_code == 403:
                response.read()
                raise self._denied(registry_message(response), method)
            yield response
        finally:
            response.close()

    def _denied(self, message: str, method: str) -> OciAuthError:
        return OciAuthError(
            f"{self.t.registry}: access denied to {self.t.repository} for {self._who()} "
            f"(HTTP 403, {method}): {message}"
        )

    def _refused(self, message: str, method: str, path: str, sent: dict[str, str]) -> None:
        if sent.get("Authorization", "").startswith("Bearer"):
            raise OciAuthError(
                f"{self.t.registry}: the registry refused a fresh token for "
                f"{self._scope(method, path) or '/v2/'} "
                f"of {self._who()} (HTTP 401: {message}); the token is expired, "
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

    # ------------------------------------------------------------ blob bodies (urllib3)

    def download_blob(
        self,
        digest: str,
        write: Callable[[bytes], object],
        *,
        limit: int | None = None,
        label: str = "",
    ) -> int:
        """GET ``<repo>/blobs/<digest>``; hand each piece of its body to ``write``; return the bytes read.

        The body is received with urllib3 in 256 KiB reads (as raw bytes: no
        ``Accept-Encoding`` is sent and none is decoded, so the bytes are the blob's).
        The Authorization header is this client's (the manifest GET before primed the
        token or basic scheme); a 401 is learnt (:meth:`_learn`) and retried once, a 403
        is :class:`OciAuthError`, any other status but 200 :class:`OciError` with the
        registry's message. Connection errors before the answer are retried as for any
        GET (three tries); a connection lost in the body is :class:`OciUnavailableError`
        ("download of … broke off"). ``limit``: stop reading once more than ``limit``
        bytes arrived (the caller's size check then fails). ``label``: names the file in
        messages.
        """
        path = f"{self.t.repository}/blobs/{digest}"
        url = self.url(path)
        prefix = f"{label}: " if label else ""
        sent = self._auth_header("GET", path)
        response = self._open_blob(url, sent)
        complete = False
        try:
            if response.status == 401:
                challenge = response.headers.get("WWW-Authenticate", "")
                self._finish(response, complete=False)
                retry = self._learn(challenge, "GET", path, sent=bool(sent))
                response = self._open_blob(url, retry)
                if response.status == 401:
                    self._refused(self._blob_error(response), "GET", path, retry)
            if response.status == 403:
                raise self._denied(self._blob_error(response), "GET")
            if response.status != 200:
                raise OciError(f"{prefix}blob {digest}: {self._blob_error(response)}")
            received = 0
            try:
                while chunk := response.read(_BLOB_READ_BYTES, decode_content=False):
                    write(chunk)
                    received += len(chunk)
                    if limit is not None and received > limit:
                        return received
            except urllib3.exceptions.HTTPError as exc:
                raise OciUnavailableError(
                    f"{self.t.registry}: {prefix}download of {digest} broke off after {received} bytes: {exc}"
                ) from exc
            complete = True
            return received
        finally:
            self._finish(response, complete)

    def _pool(self) -> urllib3.PoolManager:
        if self._blobs is None:
            # The registry's TLS context. With ``insecure`` the registry is plain HTTP; a redirect
            # to HTTPS storage is still verified (system store plus the CA bundle).
            context = self._tls or ssl_context(self.t.ca_bundle, self.t.registry)
            self._blobs = urllib3.PoolManager(
                num_pools=4,
                ssl_context=context,
                timeout=urllib3.Timeout(connect=self._connect_timeout_s, read=self.t.timeout_s),
            )
        return self._blobs

    def _open_blob(self, url: str, headers: Mapping[str, str]) -> urllib3.BaseHTTPResponse:
        """The answer to a blob GET, its body unread; redirects followed, connection errors retried."""
        # urllib3's retries do one try (every error count 0) and follow redirects: registries send
        # blob GETs on to their storage. On a redirect to another host (scheme, host or port)
        # urllib3 drops the Authorization header (Retry.remove_headers_on_redirect, its default):
        # the registry's token is not sent to the storage, whose URL carries its own signature.
        retries = urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0, redirect=_MAX_REDIRECTS, raise_on_status=False
        )

        def attempt() -> urllib3.BaseHTTPResponse:
            try:
                return self._pool().request(
                    "GET", url, headers=dict(headers), retries=retries, preload_content=False
                )
            except urllib3.exceptions.MaxRetryError as exc:  # one try: the reason is the error
                failure: BaseException = exc.reason if isinstance(exc.reason, Exception) else exc
            raise failure  # outside the except: no cycle between the two exceptions' contexts

        try:
            return call_with_retries(
                attempt,
                attempts=_GET_ATTEMPTS,
                backoff_s=_RETRY_BACKOFF_S,
                may_pass=lambda exc: isinstance(exc, _BLOB_TRANSIENT),
                logger=logger,
                what=f"{self.t.registry}: GET {url}",
            )
        except urllib3.exceptions.HTTPError as exc:
            if isinstance(exc, urllib3.exceptions.SSLError):
                tls = _tls_problem(exc)
                if tls is not None:
                    raise self._tls_error(tls) from exc
            if isinstance(exc, urllib3.exceptions.ResponseError):  # too many redirects
                what = "redirected too often"
            elif isinstance(exc, urllib3.exceptions.NewConnectionError):
                what = "registry unreachable"
            elif isinstance(exc, urllib3.exceptions.TimeoutError):
                what = f"no answer within {self.t.timeout_s:g} s"
            else:
                what = "connection dropped"
            raise OciUnavailableError(f"{self.t.registry}: {what} (GET {url}): {exc}") from exc

    @staticmethod
    def _blob_error(response: urllib3.BaseHTTPResponse) -> str:
        """An error answer's message, from its first 64 KiB (the connection is closed after it)."""
        try:
            body = response.read(_ERROR_BODY_BYTES)
        except urllib3.exceptions.HTTPError:  # the message is the status line then
            body = b""
        return error_message(response.status, response.reason or "", body)

    @staticmethod
    def _finish(response: urllib3.BaseHTTPResponse, complete: bool) -> None:
        """Hand the connection back: reusable after a body read to its end, else closed first."""
        if not complete:
            response.close()
        response.release_conn()
