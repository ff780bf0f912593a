"""The OCI engine against registries as users have them: the real ``docker-registry`` (2.8) with
a login from a Docker config file, with bearer-token auth (a token issuer of our own on loopback),
and over TLS with a private CA; and the bad inputs (wrong login, refused or expired token,
untrusted certificate, a connection dropped mid-push or mid-pull), each a typed error naming
the registry, with nothing tagged.

Token auth as distribution 2.8 checks it (registry/auth/token/token.go, ``Token.Verify`` and
``VerifySigningKey``): a JWT whose ``x5c`` header chains to a certificate of the configured
``rootcertbundle``, ``iss`` = the configured issuer, ``aud`` = the service, ``exp``/``nbf``
(60 s leeway) and an ``access`` list of ``{type, name, actions}``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from ggufship.cli.main import main
from ggufship.publish import _modelpack as mp
from ggufship.publish._oci import (
    OciAuthError,
    OciTarget,
    OciUnavailableError,
    oci_settings,
    pull_export,
    push_export,
)
from ggufship.publish._oci_client import RegistryClient
from ggufship.services import load_credentials, load_state
from ggufship.services._registry import registry_config

pytest_plugins = ["tests.services_fixtures"]  # the services_factory fixture

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed"),
]

SIGNATURE = b'{"note": "opaque signature bytes"}\n'
USER, PASSWORD = "alice", "correct horse"
SERVICE, ISSUER = "ggufship-test-registry", "ggufship-test-issuer"


# ---------------------------------------------------------------- certificates and JWTs


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _self_signed(key: Any, cn: str, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(key, hashes.SHA256())


@dataclass
class Pki:
    """A private CA, a server certificate for 127.0.0.1/localhost it signed, written as PEM files."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_pki(directory: Path, cn: str = "ggufship test CA") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _self_signed(ca_key, cn, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    pki.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return pki


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class TokenKey:
    """The issuer's RSA key and self-signed certificate (the registry's rootcertbundle)."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls) -> TokenKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key, _self_signed(key, "ggufship token issuer", ca=True))

    def jwt(self, claims: dict[str, Any]) -> str:
        """An RS256 JWS with the certificate in ``x5c`` (how distribution finds the key)."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode("ascii")]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        ).encode()
        signature = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return signing_input.decode() + "." + _b64url(signature)


@dataclass
class Issuer:
    """A token server on loopback (distribution's token auth spec, docs/spec/auth/token.md)."""

    key: TokenKey
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (scope, user)
    expired: bool = False  # issue only tokens that expired an hour ago
    expire_first_push: bool = False  # the first pull,push token is expired, later ones are fine
    expires_in: float = 300  # the lifetime the answer announces (the JWT itself stays valid)
    _push_tokens: int = 0

    def answer(self, query: dict[str, list[str]], authorization: str | None) -> tuple[int, dict[str, Any]]:
        user: str | None = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            name, _, secret = base64.b64decode(value).decode().partition(":")
            if scheme.lower() != "basic" or (name, secret) != (USER, PASSWORD):
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad login"}]}
            user = name
        scope = (query.get("scope") or [""])[0]
        self.requests.append((scope, user))
        if user is None:
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "no anonymous access"}]}
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        expired = self.expired
        if _push_scope(scope) and self.expire_first_push:
            self._push_tokens += 1
            expired = expired or self._push_tokens == 1
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": (query.get("service") or [""])[0],
            "exp": now - 3600 if expired else now + 300,
            "nbf": now - 7200 if expired else now - 10,
            "iat": now - 7200 if expired else now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        token = self.key.jwt(claims)
        return 200, {"token": token, "access_token": token, "expires_in": self.expires_in}


def _actions_sorted(scope: str) -> str:
    """``scope`` with its actions in one order. The client retries a 401 with the scope the challenge
    names, and distribution's challenge joins the actions of a set (registry/auth/token/
    accesscontroller.go, ``accessSet.scopeParam``: the keys of a Go map), so it names ``push,pull``
    in some runs where the client asked for ``pull,push`` (seen in a CI run); the token spec treats
    the actions as a set."""
    head, _, actions = scope.rpartition(":")
    return f"{head}:{','.join(sorted(actions.split(',')))}" if head else scope


def _push_scope(scope: str) -> bool:
    return bool(scope) and "push" in scope.rpartition(":")[2].split(",")


@contextlib.contextmanager
def serve_issuer(issuer: Issuer) -> Iterator[Issuer]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = issuer.answer(
                parse_qs(urlparse(self.path).query), self.headers.get("Authorization")
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    issuer.url = f"http://127.0.0.1:{server.server_address[1]}/token"
    try:
        yield issuer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------- a registry with a config of our own


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    host: str
    http: httpx.Client  # for checks behind the engine's back (same auth as the test needs)

    def tags(self, repository: str) -> list[str]:
        response = self.http.get(f"/v2/{repository}/tags/list")
        if response.status_code == 404:
            return []
        assert response.status_code == 200, response.text
        return list(response.json().get("tags") or [])


@contextlib.contextmanager
def run_registry(root: Path, extra: dict[str, Any], client: httpx.Client) -> Iterator[Registry]:
    """``docker-registry serve`` with the services' config plus ``extra`` (auth, tls); killed at the end."""
    port = _free_port()
    config = yaml.safe_load(registry_config(port, root / "data", None))
    config["http"].update(extra.get("http", {}))
    if "auth" in extra:
        config["auth"] = extra["auth"]
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(config))
    log = (root / "registry.log").open("wb")
    process = subprocess.Popen(
        [shutil.which("docker-registry") or "docker-registry", "serve", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (root / "registry.log").read_text()[-2000:]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "registry did not listen within 30 s"
            time.sleep(0.05)
        host = f"127.0.0.1:{port}"
        client.base_url = httpx.URL(f"{'https' if 'tls' in extra.get('http', {}) else 'http'}://{host}")
        yield Registry(host, client)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        client.close()


@pytest.fixture
def signed_export(tiny_export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "export" / "tiny-1.0.0"
    shutil.copytree(tiny_export, out)
    (out / mp.SIGNATURE_FILE).write_bytes(SIGNATURE)
    return out


@pytest.fixture(autouse=True)
def _no_ambient_logins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No login from the machine's own Docker config or GGUFSHIP_OCI_* variables."""
    empty = tmp_path / "no-docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))
    for name in list(os.environ):
        if name.startswith("GGUFSHIP_OCI_"):
            monkeypatch.delenv(name)


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for src in a.iterdir():
        assert (b / src.name).read_bytes() == src.read_bytes(), src.name


def _docker_config(directory: Path, data: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


# ---------------------------------------------------------------- (a) a login from a Docker config file


@pytest.fixture
def htpasswd_registry(services_factory: Any) -> Iterator[tuple[str, str, SecretStr]]:
    state_dir, _ = services_factory(name="auth", services=("registry",), registry_auth=True)
    creds = load_credentials(state_dir).registry
    yield f"127.0.0.1:{load_state(state_dir).services['registry'].port}", creds.username, creds.password


def test_basic_auth_from_a_docker_config_only(
    htpasswd_registry: tuple[str, str, SecretStr],
    signed_export: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, username, password = htpasswd_registry
    encoded = base64.b64encode(f"{username}:{password.get_secret_value()}".encode()).decode()
    # the shape of a kubernetes.io/dockerconfigjson Secret, mounted as config.json (the chart)
    config_dir = _docker_config(tmp_path / "docker", {"auths": {host: {"auth": encoded}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))

    result = push_export(signed_export, OciTarget(host, "models/tiny"))  # no credentials given
    assert result.signature_digest is not None
    _same_files(signed_export, pull_export(f"oci://{host}/models/tiny:1.0.0", tmp_path / "pulled"))

    # username/password entries, keyed the way `docker login https://host` writes them; through the CLI
    _docker_config(
        config_dir,
        {"auths": {f"https://{host}/v1/": {"username": username, "password": password.get_secret_value()}}},
    )
    assert main(["pull", f"oci://{host}/models/tiny:1.0.0-Q4_K_M", "-o", str(tmp_path / "cli")]) == 0
    _same_files(signed_export, tmp_path / "cli")

    # explicit credentials override the file: wrong ones are refused even though the file's are right
    monkeypatch.setenv("GGUFSHIP_OCI_USERNAME", username)
    monkeypatch.setenv("GGUFSHIP_OCI_PASSWORD", "wrong")
    with pytest.raises(OciAuthError) as info:
        pull_export(
            f"{host}/models/tiny:1.0.0", tmp_path / "refused", oci_settings().target(host, "models/tiny")
        )
    assert host in str(info.value) and "rejected" in str(info.value) and "wrong" not in str(info.value)
    assert info.value.exit_code == 46
    assert not (tmp_path / "refused").exists()


def test_docker_config_credential_helpers(
    htpasswd_registry: tuple[str, str, SecretStr],
    signed_export: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, username, password = htpasswd_registry
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-testhelper"
    calls = tmp_path / "helper-calls"
    answer = {"ServerURL": host, "Username": username, "Secret": password.get_secret_value()}
    # a real executable speaking the credential-helper protocol (docker-credential-helpers' `get`)
    helper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 3\nread server\necho "$server" >> {calls}\n'
        f'[ "$server" = "{host}" ] || {{ echo "credentials not found in native keychain"; exit 1; }}\n'
        f"printf '%s' '{json.dumps(answer)}'\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config_dir = _docker_config(tmp_path / "docker", {"credHelpers": {host: "testhelper"}})
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))

    push_export(signed_export, OciTarget(host, "models/tiny"))
    assert calls.read_text().split() == [host]

    _docker_config(config_dir, {"auths": {host: {}}, "credsStore": "no-such-store"})
    with pytest.raises(OciAuthError) as info:
        pull_export(f"{host}/models/tiny:1.0.0", tmp_path / "pulled")
    assert "docker-credential-no-such-store" in str(info.value) and "not installed" in str(info.value)
    assert str(config_dir / "config.json") in str(info.value)

    _docker_config(config_dir, {"auths": {host: {"auth": "not base64!"}}})
    with pytest.raises(OciAuthError, match=r"auths\[.*\]\.auth: not base64"):
        pull_export(f"{host}/models/tiny:1.0.0", tmp_path / "pulled")
    _docker_config(config_dir, {"auths": {host: {"identitytoken": "opaque-refresh-token"}}})
    with pytest.raises(OciAuthError, match="only an OAuth identitytoken") as info:
        pull_export(f"{host}/models/tiny:1.0.0", tmp_path / "pulled")
    assert "opaque-refresh-token" not in str(info.value)
    assert not (tmp_path / "pulled").exists()


# ---------------------------------------------------------------- (b) bearer tokens


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[Registry, Issuer]]:
    key = TokenKey.new()
    bundle = tmp_path / "token-root.pem"
    bundle.write_bytes(key.cert.public_bytes(serialization.Encoding.PEM))
    with serve_issuer(Issuer(key)) as issuer:
        token_auth = {
            "token": {
                "realm": issuer.url,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(bundle),
            }
        }
        root = tmp_path / "token-registry"
        root.mkdir()
        checker = httpx.Client(trust_env=False, timeout=30)
        with run_registry(root, {"auth": token_auth}, checker) as registry:
            yield registry, issuer


def _admin_tags(registry: Registry, issuer: Issuer, repository: str) -> list[str]:
    """The tags, read with a token of our own (not the engine's)."""
    now = int(time.time())
    token = issuer.key.jwt(
        {
            "iss": ISSUER,
            "sub": "checker",
            "aud": SERVICE,
            "exp": now + 60,
            "nbf": now - 10,
            "iat": now,
            "jti": "check",
            "access": [{"type": "repository", "name": repository, "actions": ["pull"]}],
        }
    )
    response = registry.http.get(f"/v2/{repository}/tags/list", headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return list(response.json().get("tags") or [])


def test_bearer_token_flow_against_the_real_registry(
    token_registry: tuple[Registry, Issuer], signed_export: Path, tmp_path: Path
) -> None:
    registry, issuer = token_registry
    # the registry really wants tokens: a bare request gets the Bearer challenge
    challenge = registry.http.get("/v2/")
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith(f'Bearer realm="{issuer.url}"')

    target = OciTarget(registry.host, "models/tiny", username=USER, password=SecretStr(PASSWORD))
    result = push_export(signed_export, target)
    scopes = [scope for scope, _ in issuer.requests]
    # one token per scope, reused for every request of that scope (dozens of requests)
    assert sorted(map(_actions_sorted, scopes)) == sorted(
        ["", "repository:models/tiny:pull", "repository:models/tiny:pull,push"]
    )
    assert {user for _, user in issuer.requests} == {USER}
    assert set(_admin_tags(registry, issuer, "models/tiny")) >= set(result.tags)

    issuer.requests.clear()
    pulled = pull_export(f"{registry.host}/models/tiny:1.0.0", tmp_path / "pulled", target)
    _same_files(signed_export, pulled)
    assert sorted(scope for scope, _ in issuer.requests) == ["", "repository:models/tiny:pull"]

    # a refused token (expired on arrival) is fetched again once, with the scope the 401 names
    issuer.requests.clear()
    issuer.expire_first_push = True
    again = push_export(
        signed_export, OciTarget(registry.host, "models/other", username=USER, password=SecretStr(PASSWORD))
    )
    push_scopes = [_actions_sorted(s) for s, _ in issuer.requests if _push_scope(s)]
    assert push_scopes == ["repository:models/other:pull,push"] * 2
    assert again.digest == result.digest

    # a token announced to live 1 µs is not reused: each request of that scope fetches a new one
    issuer.requests.clear()
    issuer.expire_first_push = False
    issuer.expires_in = 1e-6
    third = OciTarget(registry.host, "models/third", username=USER, password=SecretStr(PASSWORD))
    push_export(signed_export, third)
    push_scopes = [s for s, _ in issuer.requests if _push_scope(s)]
    assert len(push_scopes) >= 2 * len(list(signed_export.iterdir()))  # >= POST + PUT per blob


def test_bearer_token_bad_inputs(
    token_registry: tuple[Registry, Issuer], signed_export: Path, tmp_path: Path
) -> None:
    registry, issuer = token_registry
    wrong = OciTarget(registry.host, "models/tiny", username=USER, password=SecretStr("wrong"))
    with pytest.raises(OciAuthError) as info:
        push_export(signed_export, wrong)
    message = str(info.value)
    assert registry.host in message and issuer.url in message and "rejected the credentials" in message
    assert "wrong" not in message and info.value.exit_code == 46

    with pytest.raises(OciAuthError, match="refused an anonymous token") as info:
        push_export(signed_export, OciTarget(registry.host, "models/tiny"))
    assert registry.host in str(info.value)

    issuer.expired = True
    good = OciTarget(registry.host, "models/tiny", username=USER, password=SecretStr(PASSWORD))
    with pytest.raises(OciAuthError) as info:
        push_export(signed_export, good)
    assert registry.host in str(info.value) and "expired" in str(info.value)
    dest = tmp_path / "pulled"
    with pytest.raises(OciAuthError):
        pull_export(f"{registry.host}/models/tiny:1.0.0", dest, good)
    assert not dest.exists()
    assert _admin_tags(registry, issuer, "models/tiny") == []  # nothing was pushed


# ---------------------------------------------------------------- (c) TLS with a private CA


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[tuple[Registry, Pki]]:
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "tls-registry"
    root.mkdir()
    checker = httpx.Client(
        trust_env=False, timeout=30, verify=ssl.create_default_context(cafile=str(pki.ca_pem))
    )
    tls = {"tls": {"certificate": str(pki.cert_pem), "key": str(pki.key_pem)}}
    with run_registry(root, {"http": tls}, checker) as registry:
        yield registry, pki


def test_tls_with_a_private_ca(
    tls_registry: tuple[Registry, Pki], signed_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, pki = tls_registry
    target = OciTarget(registry.host, "models/tiny", insecure=False, ca_bundle=pki.ca_pem)
    result = push_export(signed_export, target)
    assert set(registry.tags("models/tiny")) >= set(result.tags)
    _same_files(signed_export, pull_export(f"{registry.host}/models/tiny:1.0.0", tmp_path / "a", target))

    # the CLI: --oci-tls (HTTPS on loopback) with the CA from GGUFSHIP_OCI_CA_BUNDLE
    monkeypatch.setenv("GGUFSHIP_OCI_CA_BUNDLE", str(pki.ca_pem))
    uri = f"oci://{registry.host}/models/tiny:1.0.0"
    assert main(["pull", uri, "-o", str(tmp_path / "cli"), "--oci-tls"]) == 0
    _same_files(signed_export, tmp_path / "cli")
    # a library pull without a target reads the same settings (GGUFSHIP_OCI_INSECURE=0: HTTPS on loopback)
    monkeypatch.setenv("GGUFSHIP_OCI_INSECURE", "0")
    _same_files(signed_export, pull_export(uri, tmp_path / "settings"))
    monkeypatch.delenv("GGUFSHIP_OCI_INSECURE")
    monkeypatch.delenv("GGUFSHIP_OCI_CA_BUNDLE")

    # or the process-wide SSL_CERT_FILE
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
    plain = OciTarget(registry.host, "models/tiny", insecure=False)
    _same_files(signed_export, pull_export(uri, tmp_path / "b", plain))


def test_untrusted_certificate_is_refused_naming_the_registry(
    tls_registry: tuple[Registry, Pki], signed_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, _ = tls_registry
    other = make_pki(tmp_path / "other-pki", cn="someone else's CA")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    for target in (
        OciTarget(registry.host, "models/tiny", insecure=False),  # the system store only
        OciTarget(registry.host, "models/tiny", insecure=False, ca_bundle=other.ca_pem),
    ):
        with pytest.raises(OciUnavailableError) as info:
            push_export(signed_export, target)
        message = str(info.value)
        assert registry.host in message and "certificate not trusted" in message and "CA_BUNDLE" in message
        assert info.value.exit_code == 47
    dest = tmp_path / "pulled"
    with pytest.raises(OciUnavailableError, match="certificate not trusted"):
        pull_export(f"{registry.host}/models/tiny:1.0.0", dest, OciTarget(registry.host, "x", insecure=False))
    assert not dest.exists()
    assert registry.tags("models/tiny") == []


def test_tls_is_the_default_for_registries_that_are_not_loopback() -> None:
    assert OciTarget("registry.example.com", "models/tiny").plain_http is False
    assert OciTarget("registry.example.com:5000", "models/tiny").transport().insecure is False
    assert OciTarget("localhost:5000", "models/tiny").plain_http is True
    assert OciTarget("[::1]:5000", "models/tiny").plain_http is True
    assert OciTarget("registry.example.com", "models/tiny", insecure=True).plain_http is True
    assert OciTarget("127.0.0.1:5000", "models/tiny", insecure=False).plain_http is False


# ---------------------------------------------------------------- a connection dropped mid-transfer


@contextlib.contextmanager
def cutting_proxy(upstream: str, *, up_limit: int, down_limit: int) -> Iterator[str]:
    """A loopback TCP proxy that closes every connection once ``up_limit`` bytes went to the
    registry (or ``down_limit`` came back), counted over all connections; later connections
    are closed at once."""
    target = upstream.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    totals = {"up": 0, "down": 0}
    lock = threading.Lock()
    stop = threading.Event()
    sockets: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket, direction: str, limit: int) -> None:
        try:
            while not stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                with lock:
                    totals[direction] += len(data)
                    over = totals[direction] > limit
                if over:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection((target[0], int(target[1])))
            sockets.extend((client, server))
            threading.Thread(target=pump, args=(client, server, "up", up_limit), daemon=True).start()
            threading.Thread(target=pump, args=(server, client, "down", down_limit), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=10)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_connection_dropped_mid_push_or_mid_pull(
    services_factory: Any, signed_export: Path, tmp_path: Path
) -> None:
    state_dir, _ = services_factory(services=("registry",))
    upstream = f"127.0.0.1:{load_state(state_dir).services['registry'].port}"
    direct = Registry(upstream, httpx.Client(base_url=f"http://{upstream}", trust_env=False, timeout=30))
    gguf = max(signed_export.glob("*.gguf"), key=lambda p: p.stat().st_size)
    assert gguf.stat().st_size > 2_000_000

    with cutting_proxy(upstream, up_limit=1_000_000, down_limit=10**12) as proxy:
        started = time.monotonic()
        with pytest.raises(OciUnavailableError) as info:
            push_export(signed_export, OciTarget(proxy, "models/tiny"))
        assert time.monotonic() - started < 60
    message = str(info.value)
    assert proxy in message and "connection dropped" in message, message
    assert info.value.exit_code == 47
    assert direct.tags("models/tiny") == []  # no tag, no manifest: nothing half-pushed
    assert push_export(signed_export, OciTarget(upstream, "models/tiny")).tags[0] == "1.0.0"  # retry works

    with cutting_proxy(upstream, up_limit=10**12, down_limit=1_500_000) as proxy:
        dest = tmp_path / "pulled"
        with pytest.raises(OciUnavailableError) as info:
            pull_export(f"{proxy}/models/tiny:1.0.0", dest)
    assert proxy in str(info.value)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pulled")) == []
    direct.http.close()


# ---------------------------------------------------------------- blobs redirected to storage on another host


@dataclass
class RedirectLog:
    front: str = ""  # host:port of the redirecting front
    blob_gets: list[str | None] = field(default_factory=list)  # Authorization of each blob GET at the front
    storage_gets: list[str | None] = field(default_factory=list)  # Authorization each storage GET carried


@contextlib.contextmanager
def redirecting_front(upstream: str, login: tuple[str, str]) -> Iterator[RedirectLog]:
    """A registry front on one loopback port, its "storage" on another (another host to an HTTP
    client: the port differs). Manifests, pings and 401s pass through to the real registry;
    a blob GET the registry allows (a HEAD with the caller's Authorization) is answered with a
    307 to the storage, as registries with cloud storage do; the storage serves the blob (read
    from the registry with its own login) and records the Authorization it was sent."""
    log = RedirectLog()
    backend = httpx.Client(base_url=f"http://{upstream}", trust_env=False, timeout=30)
    storage_auth = httpx.BasicAuth(*login)

    def relay(handler: http.server.BaseHTTPRequestHandler, response: httpx.Response, body: bool) -> None:
        handler.send_response(response.status_code)
        for name, value in response.headers.items():
            if name.lower() not in ("connection", "transfer-encoding", "content-length", "content-encoding"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(response.content)))
        handler.end_headers()
        if body:
            handler.wfile.write(response.content)

    class Storage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            log.storage_gets.append(self.headers.get("Authorization"))
            repo, _, digest = urlparse(self.path).path.removeprefix("/blob/").rpartition("/")
            relay(self, backend.get(f"/v2/{repo}/blobs/{digest}", auth=storage_auth), body=True)

        def log_message(self, *args: object) -> None:
            pass

    storage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Storage)

    class Front(http.server.BaseHTTPRequestHandler):
        def _forward(self, method: str) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept")}
            headers["Accept-Encoding"] = "identity"
            path = urlparse(self.path).path
            if method == "GET" and "/blobs/sha256:" in path:
                log.blob_gets.append(self.headers.get("Authorization"))
                allowed = backend.head(self.path, headers=headers)
                if allowed.status_code != 200:
                    relay(self, allowed, body=False)
                    return
                repo, _, digest = path.removeprefix("/v2/").rpartition("/blobs/")
                self.send_response(307)
                self.send_header(
                    "Location", f"http://127.0.0.1:{storage.server_address[1]}/blob/{repo}/{digest}"
                )
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            relay(self, backend.request(method, self.path, headers=headers), body=method == "GET")

        def do_GET(self) -> None:
            self._forward("GET")

        def do_HEAD(self) -> None:
            self._forward("HEAD")

        def log_message(self, *args: object) -> None:
            pass

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (storage, front)]
    for thread in threads:
        thread.start()
    log.front = f"127.0.0.1:{front.server_address[1]}"
    try:
        yield log
    finally:
        for server in (front, storage):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=10)
        backend.close()


def test_pull_follows_a_blob_redirect_to_another_host_without_the_registry_login(
    htpasswd_registry: tuple[str, str, SecretStr], signed_export: Path, tmp_path: Path
) -> None:
    host, username, password = htpasswd_registry
    secret = password.get_secret_value()
    push_export(signed_export, OciTarget(host, "models/tiny", username=username, password=password))

    with redirecting_front(host, (username, secret)) as log:
        target = OciTarget(log.front, "models/tiny", username=username, password=password)
        _same_files(signed_export, pull_export(f"{log.front}/models/tiny:1.0.0", tmp_path / "pulled", target))
        # every blob went through the redirect: the registry got the login, the storage never did
        assert len(log.storage_gets) == len(log.blob_gets) >= len(list(signed_export.iterdir()))
        assert all(auth is not None and auth.startswith("Basic ") for auth in log.blob_gets)
        assert log.storage_gets == [None] * len(log.storage_gets)

        # a client whose first request is the blob GET: the 401 is learnt (basic) and the GET retried once
        gguf = max(signed_export.glob("*.gguf"), key=lambda p: p.stat().st_size)
        digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
        log.blob_gets.clear()
        pieces: list[bytes] = []
        with RegistryClient(target.transport()) as client:
            assert client.download_blob(digest, pieces.append) == gguf.stat().st_size
        assert b"".join(pieces) == gguf.read_bytes()
        first, retried = log.blob_gets  # no header (a fresh client), then the login
        assert first is None and retried is not None and retried.startswith("Basic ")

        wrong = OciTarget(log.front, "models/tiny", username=username, password=SecretStr("wrong"))
        with RegistryClient(wrong.transport()) as client, pytest.raises(OciAuthError) as info:
            client.download_blob(digest, pieces.append)
        assert log.front in str(info.value) and "rejected" in str(info.value)
