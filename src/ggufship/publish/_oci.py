"""OCI registry engine: push an export as a CNCF ModelPack artifact with oras-py, pull it back verified.

Layout (built by :mod:`ggufship.publish._modelpack`): one OCI 1.1 image manifest
per release, every file a raw layer, tagged ``<version>`` and ``<version>-<quant>``
(one tag per GGUF, all pointing at that same manifest, so the signature, which
covers the whole export, verifies whichever tag is pulled). ``model.sig`` goes up
as a second manifest whose ``subject`` is the model manifest, and is also listed
in an image index tagged ``sha256-<hex of the model manifest digest>`` (the OCI
referrers *tag schema*): distribution 2.8 stores ``subject`` but answers 404 on
``/v2/<repo>/referrers/<digest>``. Pull asks the referrers API first and falls
back to that tag.

oras-py (:class:`oras.provider.Registry`) does the blob transfer: chunked uploads
(``do_chunked=True``; a monolithic push reads the whole file into memory), the
``basic`` auth backend (the token backend retries for minutes against an
htpasswd registry), streamed blob downloads. Its ``do_request`` is replaced here
by one with timeouts, pre-emptive basic auth, a short bounded retry for
idempotent requests only, and typed errors; oras-py's own retry sleeps ~2 minutes
on a refused connection. Nothing here reads or writes ``~/.docker/config.json``
(no ``login``, no ``load_configs``) and ``requests`` is kept from ``~/.netrc``
and proxy variables (``trust_env = False``): credentials are only what the
caller passes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.errors import (
    GgufshipError,
    IntegrityError,
    ManifestError,
    OutputError,
    UnlistedFileError,
    UnsafePathError,
)
from ggufship.integrity import SIDECAR_SUFFIX, sha256_file, verify_export
from ggufship.layout import check_relpath, confined_join, export_files
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.publish import _modelpack as mp
from ggufship.sign import check_signed_files

logger = logging.getLogger(__name__)

__all__ = [
    "OciAuthError",
    "OciConflictError",
    "OciError",
    "OciPushResult",
    "OciSettings",
    "OciTarget",
    "OciUnavailableError",
    "parse_oci_uri",
    "pull_export",
    "push_export",
]

# ---------------------------------------------------------------- errors


class OciError(GgufshipError):
    """An OCI registry operation failed, or a reference/repository/tag is invalid."""

    exit_code = 45


class OciAuthError(OciError):
    """The registry refused the credentials (HTTP 401/403), or wants some and none were given."""

    exit_code = 46


class OciUnavailableError(OciError):
    """The registry cannot be reached (connection refused, timeout, TLS failure)."""

    exit_code = 47


class OciConflictError(OciError):
    """A version tag already points at a different manifest; refused unless ``force``."""

    exit_code = 48


# ---------------------------------------------------------------- names

# distribution's reference grammar (github.com/distribution/reference)
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REGISTRY_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::\d{1,5})?$"
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the size OCI distribution says registries should accept
DOWNLOAD_CHUNK = 1024 * 1024
UPLOAD_CHUNK = 16 * 1024 * 1024


def _check_registry(registry: str) -> str:
    if not registry or not _REGISTRY_RE.match(registry):
        raise OciError(f"registry {registry!r}: expected host[:port], e.g. 127.0.0.1:5000")
    return registry


def _check_repository(repository: str) -> str:
    if repository != repository.lower() and _REPOSITORY_RE.match(repository.lower()):
        raise OciError(
            f"repository {repository!r}: OCI repository names must be lowercase; use {repository.lower()!r}"
        )
    if not _REPOSITORY_RE.match(repository):
        raise OciError(
            f"repository {repository!r}: not a valid OCI repository name "
            "(lowercase letters, digits, '.', '_', '-' separators, '/' between components)"
        )
    return repository


def _check_tag(tag: str, what: str = "tag") -> str:
    if not _TAG_RE.match(tag):
        raise OciError(
            f"{what} {tag!r}: not a valid OCI tag (letters, digits, '_', '.', '-'; at most 128 characters)"
        )
    return tag


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    return host in _LOOPBACK_HOSTS


def parse_oci_uri(uri: str) -> tuple[str, str, str]:
    """``oci://host:port/repo:tag`` (or ``…/repo@sha256:…``) → ``(registry, repository, tag-or-digest)``.

    The ``oci://`` prefix is optional. The third element is ``""`` when the URI
    names neither tag nor digest (``publish --oci host/repo``). Raises
    :class:`OciError` naming the part that is wrong (uppercase repository
    names are refused with the lowercase form suggested).
    """
    rest = uri.strip()
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme != "oci":
            raise OciError(f"{uri!r}: not an oci:// URI")
    registry, slash, path = rest.partition("/")
    if not slash or not path:
        raise OciError(f"{uri!r}: expected [oci://]host[:port]/repository[:tag|@sha256:digest]")
    _check_registry(registry)
    reference = ""
    if "@" in path:
        path, _, reference = path.partition("@")
        if not _DIGEST_RE.match(reference):
            raise OciError(f"{uri!r}: digest {reference!r} is not sha256:<64 hex digits>")
    else:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, reference = path.rpartition(":")
            _check_tag(reference)
    _check_repository(path)
    return registry, path, reference


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class OciTarget:
    """Where to push/pull, and how to authenticate. Validated on creation."""

    registry: str  # "127.0.0.1:5000"
    repository: str  # lowercase, validated: "models/tiny"
    insecure: bool = True  # plain HTTP (loopback registry)
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 60.0  # per HTTP request (connect and each read)

    def __post_init__(self) -> None:
        _check_registry(self.registry)
        _check_repository(self.repository)
        if (self.username is None) != (self.password is None):
            raise OciError(f"{self.registry}: registry credentials need both a username and a password")
        if not 0 < self.timeout_s <= 3600:
            raise OciError(f"timeout_s {self.timeout_s}: must be in (0, 3600]")

    def __repr__(self) -> str:  # the dataclass repr would show the SecretStr mask anyway; keep it short
        return f"OciTarget({self.registry}/{self.repository}, insecure={self.insecure}, user={self.username})"


@dataclass(frozen=True)
class OciPushResult:
    """What :func:`push_export` did: ``reference`` is pinned by digest (``host/repo@sha256:…``)."""

    reference: str
    digest: str
    tags: tuple[str, ...]
    signature_digest: str | None
    skipped: bool


class OciSettings(BaseSettings):
    """Registry login and transport (environment ``GGUFSHIP_OCI_<FIELD>``); the CLI reads the same model."""

    model_config = SettingsConfigDict(env_prefix="GGUFSHIP_OCI_", frozen=True, extra="ignore")

    username: str | None = Field(
        default=None, min_length=1, description="registry user (htpasswd basic auth)"
    )
    password: SecretStr | None = Field(default=None, description="registry password")
    insecure: bool | None = Field(
        default=None,
        description="plain HTTP instead of HTTPS; default: plain HTTP only for a loopback registry",
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="seconds per registry request")

    def target(self, registry: str, repository: str) -> OciTarget:
        insecure = self.insecure if self.insecure is not None else _is_loopback(registry)
        return OciTarget(
            registry=registry,
            repository=repository,
            insecure=insecure,
            username=self.username,
            password=self.password,
            timeout_s=self.timeout_s,
        )


# ---------------------------------------------------------------- the client


def _registry_message(response: Any) -> str:
    """The registry's own error text (OCI error body), or the HTTP reason."""
    try:
        errors = response.json().get("errors") or []
        text = "; ".join(
            f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)
        )
    except Exception:  # not JSON: fall back to the status line
        text = ""
    return text or f"HTTP {response.status_code} {response.reason}"


def _make_client(target: OciTarget) -> Any:
    """An :class:`oras.provider.Registry` with the request path replaced (see module docstring)."""
    import oras.container
    import oras.provider
    import requests

    class _Registry(oras.provider.Registry):
        def __init__(self) -> None:
            super().__init__(hostname=target.registry, insecure=target.insecure, auth_backend="basic")
            self.session.trust_env = False  # no ~/.netrc credentials, no proxy variables
            self.auth._basic_auth = None  # BasicAuth picks ORAS_USER/ORAS_PASS from the environment
            self._auth_header: dict[str, str] = {}
            if target.username is not None and target.password is not None:
                self.auth.set_basic_auth(target.username, target.password.get_secret_value())
                self._auth_header = self.auth.get_auth_header()
            self._timeout = (min(10.0, target.timeout_s), target.timeout_s)

        def container(self, reference: str = "latest") -> oras.container.Container:
            container = oras.container.Container("placeholder", registry=target.registry)
            container.registry = target.registry
            namespace, _, name = target.repository.rpartition("/")
            container.namespace = namespace or None
            container.repository = name
            if reference.startswith("sha256:"):
                container.digest, container.tag = reference, None
            else:
                container.digest, container.tag = None, reference
            return container

        def url(self, path: str) -> str:
            return f"{self.prefix}://{target.registry}/v2/{path}"

        def do_request(  # replaces oras-py's (whose retry sleeps minutes on a refused connection)
            self,
            url: str,
            method: str = "GET",
            data: Any = None,
            headers: dict[str, str] | None = None,
            json: Any = None,
            stream: bool = False,
        ) -> requests.Response:
            headers = {**(headers or {}), **self._auth_header}
            attempts = 3 if method in ("GET", "HEAD") else 1
            for attempt in range(1, attempts + 1):
                try:
                    response = self.session.request(
                        method,
                        url,
                        data=data,
                        json=json,
                        headers=headers,
                        stream=stream,
                        verify=self._tls_verify,
                        timeout=self._timeout,
                    )
                    break
                except requests.exceptions.SSLError as exc:
                    raise OciUnavailableError(f"{target.registry}: TLS failure: {exc}") from exc
                except (requests.ConnectionError, requests.Timeout) as exc:
                    if attempt == attempts:
                        raise OciUnavailableError(
                            f"{target.registry}: registry unreachable ({method} {url}): {exc}"
                        ) from exc
                    time.sleep(0.2 * attempt)
            if response.status_code == 401:
                challenge = response.headers.get("WWW-Authenticate", "")
                if challenge.lower().startswith("bearer"):
                    raise OciAuthError(
                        f"{target.registry}: the registry wants Bearer token auth ({challenge[:120]}); "
                        "this engine speaks HTTP basic auth only"
                    )
                if self._auth_header:
                    raise OciAuthError(
                        f"{target.registry}: credentials of user {target.username!r} rejected (HTTP 401)"
                    )
                raise OciAuthError(
                    f"{target.registry}: the registry requires credentials (HTTP 401); "
                    "set GGUFSHIP_OCI_USERNAME and GGUFSHIP_OCI_PASSWORD"
                )
            if response.status_code == 403:
                raise OciAuthError(
                    f"{target.registry}: access denied to {target.repository} (HTTP 403): "
                    + _registry_message(response)
                )
            return response

    return _Registry()


_ACCEPT_MANIFESTS = ", ".join((mp.MANIFEST_MEDIA_TYPE, mp.INDEX_MEDIA_TYPE))


def _ping(client: Any, target: OciTarget) -> None:
    response = client.do_request(client.url(""), "GET")
    if response.status_code != 200:
        raise OciError(f"{target.registry}: /v2/ answered {_registry_message(response)}")


def _head_manifest(client: Any, reference: str) -> str | None:
    """The digest a tag (or digest) resolves to, or None if absent."""
    url = client.url(f"{client.container().api_prefix}/manifests/{reference}")
    response = client.do_request(url, "HEAD", headers={"Accept": _ACCEPT_MANIFESTS})
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise OciError(f"{url}: HEAD answered {_registry_message(response)}")
    digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        raise OciError(f"{url}: no Docker-Content-Digest header in the answer")
    return str(digest)


def _get_manifest(client: Any, reference: str, accept: str = _ACCEPT_MANIFESTS) -> mp.Document | None:
    """Fetch a manifest/index by tag or digest; its digest is checked against the bytes (None if 404)."""
    url = client.url(f"{client.container().api_prefix}/manifests/{reference}")
    response = client.do_request(url, "GET", headers={"Accept": accept})
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise OciError(f"{url}: GET answered {_registry_message(response)}")
    data = response.content
    if len(data) > MAX_MANIFEST_BYTES:
        raise OciError(f"{url}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    doc = mp.Document(media_type, data)
    expected = reference if _DIGEST_RE.match(reference) else response.headers.get("Docker-Content-Digest")
    if expected and expected != doc.digest:
        raise IntegrityError(f"{url}: manifest digest {doc.digest} != expected {expected}")
    return doc


def _put_manifest(client: Any, doc: mp.Document, reference: str) -> None:
    url = client.url(f"{client.container().api_prefix}/manifests/{reference}")
    response = client.do_request(url, "PUT", data=doc.data, headers={"Content-Type": doc.media_type})
    if response.status_code not in (200, 201):
        raise OciError(f"{url}: manifest upload refused: {_registry_message(response)}")
    answered = response.headers.get("Docker-Content-Digest")
    if answered and answered != doc.digest:
        raise OciError(f"{url}: registry stored digest {answered}, pushed {doc.digest}")


def _upload_file(client: Any, path: Path, media_type: str, digest: str, size: int) -> None:
    """One blob, skipped if the registry already has it.

    Above :data:`UPLOAD_CHUNK` bytes: chunked (POST, one PATCH per chunk, PUT), so
    memory stays at one chunk whatever the file size; smaller files go in one
    PUT (one request less per file; each request costs a bcrypt check on an
    htpasswd registry).
    """
    layer = {"mediaType": media_type, "digest": digest, "size": size}
    try:
        response = client.upload_blob(
            str(path), client.container(), layer, do_chunked=size > UPLOAD_CHUNK, chunk_size=UPLOAD_CHUNK
        )
    except ValueError as exc:  # oras-py's way of reporting a refused PATCH / missing Location
        raise OciError(f"{path.name}: blob upload failed: {exc}") from exc
    if response.status_code not in (200, 201, 202):
        raise OciError(f"{path.name}: blob upload refused: {_registry_message(response)}")


def _upload_bytes(client: Any, blob: mp.Blob, scratch: Path) -> None:
    path = scratch / blob.digest.replace(":", "-")
    path.write_bytes(blob.data)
    _upload_file(client, path, blob.media_type, blob.digest, len(blob.data))


# ---------------------------------------------------------------- push


def _layer_files(export_dir: Path, manifest: Manifest) -> list[mp.LayerFile]:
    """Every file of the export as a layer, in a fixed order: GGUFs, sidecars, model card, manifest.json."""
    layers: list[mp.LayerFile] = []
    ggufs = manifest.gguf_files()
    for entry in ggufs:
        layers.append(
            mp.LayerFile(
                path=entry.path,
                media_type=mp.MEDIA_TYPE_WEIGHT_RAW,
                digest=f"sha256:{entry.sha256}",
                size=entry.size,
                quantization=entry.quantization,
                kind="gguf",
            )
        )
    others = [entry for entry in manifest.files if entry.kind != "gguf"]
    for entry in ggufs:
        _add_sidecar(layers, export_dir, entry.path)
    for entry in others:
        layers.append(
            mp.LayerFile(
                entry.path, mp.MEDIA_TYPE_DOC_RAW, f"sha256:{entry.sha256}", entry.size, kind=entry.kind
            )
        )
    for entry in others:  # after the files, so an export without these sidecars keeps its digest
        _add_sidecar(layers, export_dir, entry.path)
    digest, size = sha256_file(export_dir / MANIFEST_NAME)
    layers.append(
        mp.LayerFile(
            MANIFEST_NAME, mp.MEDIA_TYPE_WEIGHT_CONFIG_RAW, f"sha256:{digest}", size, kind="manifest"
        )
    )
    known = {layer.path for layer in layers} | {mp.SIGNATURE_FILE}
    for extra in sorted(p.name for p in export_dir.iterdir() if p.name not in known):
        logger.warning("%s: not part of the export's manifest; not pushed", export_dir / extra)
    return layers


def _add_sidecar(layers: list[mp.LayerFile], export_dir: Path, path: str) -> None:
    """The ``.sha256`` sidecar of one listed file as a layer, if the export has one (the path is the
    listed one plus the suffix, like the sidecar's name in S3 and on pull)."""
    name = path + SIDECAR_SUFFIX
    sidecar = confined_join(export_dir, name, what=f"{export_dir / MANIFEST_NAME}: sidecar of {path}")
    if sidecar.is_file():
        digest, size = sha256_file(sidecar)
        layers.append(mp.LayerFile(name, mp.MEDIA_TYPE_DOC_RAW, f"sha256:{digest}", size, kind="checksum"))


def release_tags(manifest: Manifest) -> tuple[str, ...]:
    """``<version>`` and one ``<version>-<quant>`` per GGUF."""
    version = _check_tag(manifest.version, "version")
    tags = [version]
    for entry in manifest.gguf_files():
        if entry.quantization:
            tags.append(_check_tag(f"{version}-{entry.quantization}", "version-quantization tag"))
    return tuple(dict.fromkeys(tags))


def push_export(
    export_dir: Path, target: OciTarget, *, force: bool = False, apply_tags: bool = True
) -> OciPushResult:
    """Push an export directory as one ModelPack artifact, tag it, attach ``model.sig`` as a referrer.

    The export is verified against ``manifest.json`` first (:class:`IntegrityError`
    otherwise). Idempotent: every tag already on this manifest → ``skipped=True``
    (the signature referrer is still added if it is missing). A tag on another
    digest → :class:`OciConflictError` before anything is uploaded, unless ``force``.
    ``apply_tags=False``: the manifest goes up by digest only, and :func:`tag_release`
    moves the tags later (publish does so once GitOps has chosen the one winner of
    concurrent publishers, when no S3 lease serializes them: tags have no
    compare-and-swap).
    """
    export_dir = Path(export_dir)
    verify_export(export_dir)
    manifest = Manifest.load(export_dir / MANIFEST_NAME)
    check_signed_files(export_dir, export_files(export_dir, manifest))
    tags = release_tags(manifest)
    layers = _layer_files(export_dir, manifest)
    manifest_layer = next(layer for layer in layers if layer.path == MANIFEST_NAME)
    config = mp.model_config(manifest, layers)
    doc = mp.model_manifest(config, layers, mp.model_annotations(manifest, manifest_layer.digest))
    client = _make_client(target)
    _ping(client, target)
    where = f"{target.registry}/{target.repository}"

    current = {tag: _head_manifest(client, tag) for tag in tags}
    conflicts = {tag: d for tag, d in current.items() if d is not None and d != doc.digest}
    if conflicts and not force:
        listed = ", ".join(f"{where}:{tag} is {d}" for tag, d in conflicts.items())
        raise OciConflictError(
            f"{listed}; this export is {doc.digest}. A published version is immutable: "
            "bump the version, or pass force to move the tag(s)"
        )
    skipped = all(d == doc.digest for d in current.values())
    with tempfile.TemporaryDirectory(prefix="ggufship-oci-") as tmp:
        scratch = Path(tmp)
        if skipped:
            logger.info("%s:%s already is %s; nothing to push", where, tags[0], doc.digest)
        else:
            for tag, old in conflicts.items():
                logger.warning("force: moving %s:%s from %s to %s", where, tag, old, doc.digest)
            for layer in layers:
                path = confined_join(export_dir, layer.path, what=f"{export_dir}: layer {layer.path}")
                _upload_file(client, path, layer.media_type, layer.digest, layer.size)
            _upload_bytes(client, config, scratch)
            if apply_tags:
                for tag in tags:
                    _put_manifest(client, doc, tag)
                logger.info("pushed %s@%s as %s", where, doc.digest, ", ".join(tags))
            else:
                _put_manifest(client, doc, doc.digest)
                logger.info("pushed %s@%s (tags %s follow later)", where, doc.digest, ", ".join(tags))
        signature_digest = _push_signature(client, export_dir, manifest, doc, scratch)
    return OciPushResult(
        reference=f"{where}@{doc.digest}",
        digest=doc.digest,
        tags=tags,
        signature_digest=signature_digest,
        skipped=skipped,
    )


def tag_release(target: OciTarget, result: OciPushResult, *, force: bool = False) -> None:
    """Point ``result.tags`` at ``result.digest`` (pushed by ``push_export(..., apply_tags=False)``).

    A tag already there is left alone; one on another digest is
    :class:`OciConflictError` unless ``force``.
    """
    client = _make_client(target)
    where = f"{target.registry}/{target.repository}"
    doc: mp.Document | None = None
    for tag in result.tags:
        current = _head_manifest(client, tag)
        if current == result.digest:
            continue
        if current is not None and not force:
            raise OciConflictError(
                f"{where}:{tag} is {current}; this export is {result.digest}. A published version is "
                "immutable: bump the version, or pass force to move the tag(s)"
            )
        if doc is None:
            doc = _get_manifest(client, result.digest)
            if doc is None:
                raise OciError(f"{where}@{result.digest}: the pushed manifest is gone; publish again")
        _put_manifest(client, doc, tag)
    logger.info("tagged %s@%s as %s", where, result.digest, ", ".join(result.tags))


def _push_signature(
    client: Any, export_dir: Path, manifest: Manifest, subject: mp.Document, scratch: Path
) -> str | None:
    sig_path = export_dir / mp.SIGNATURE_FILE
    if not sig_path.is_file():
        logger.info("%s: no %s; the artifact goes up unsigned", export_dir, mp.SIGNATURE_FILE)
        return None
    digest, size = sha256_file(sig_path)
    layer = mp.LayerFile(
        mp.SIGNATURE_FILE, mp.ARTIFACT_TYPE_SIGNATURE, f"sha256:{digest}", size, kind="signature"
    )
    annotations = {
        f"{mp.NS}.signature.format": "model_signing",
        f"{mp.NS}.name": manifest.name,
        f"{mp.NS}.version": manifest.version,
    }
    sig_doc = mp.signature_manifest(layer, subject, annotations)
    if _head_manifest(client, sig_doc.digest) is None:
        _upload_file(client, sig_path, layer.media_type, layer.digest, layer.size)
        _upload_bytes(client, mp.empty_blob(), scratch)
        _put_manifest(client, sig_doc, sig_doc.digest)
        logger.info("attached %s as referrer %s of %s", mp.SIGNATURE_FILE, sig_doc.digest, subject.digest)
    # the referrers tag schema (registries without the referrers API, e.g. distribution 2.8)
    tag = mp.referrers_tag(subject.digest)
    index = _get_manifest(client, tag, accept=mp.INDEX_MEDIA_TYPE)
    existing = index.json().get("manifests", []) if index is not None else []
    if not any(d.get("digest") == sig_doc.digest for d in existing):
        _put_manifest(client, mp.referrers_index(existing, sig_doc.descriptor(annotations)), tag)
        logger.info("referrers tag %s lists %s", tag, sig_doc.digest)
    return sig_doc.digest


# ---------------------------------------------------------------- pull


def _referrers(client: Any, subject_digest: str, artifact_type: str) -> list[dict[str, Any]]:
    """Referrer descriptors of ``subject_digest``: the referrers API, else the ``sha256-<hex>`` tag."""
    api = client.url(f"{client.container().api_prefix}/referrers/{subject_digest}")
    response = client.do_request(api, "GET", headers={"Accept": mp.INDEX_MEDIA_TYPE})
    found: list[dict[str, Any]] | None = None
    if response.status_code == 200:
        try:
            found = list(response.json().get("manifests") or [])
            logger.debug("referrers API listed %d referrer(s)", len(found))
        except ValueError:
            found = None
    if found is None:
        logger.debug("referrers API answered %s; reading the referrers tag", response.status_code)
        index = _get_manifest(client, mp.referrers_tag(subject_digest), accept=mp.INDEX_MEDIA_TYPE)
        found = list(index.json().get("manifests") or []) if index is not None else []
    return [d for d in found if isinstance(d, dict) and d.get("artifactType") == artifact_type]


@dataclass(frozen=True)
class _Layer:
    """A layer descriptor of a pulled model manifest, checked: its file name is a confined relative path."""

    title: str
    digest: str
    size: int


def _titled_layers(body: Any, where: str) -> list[_Layer]:
    """The layers of a ModelPack manifest, each with a safe, unique file name (``filepath`` or ``title``).

    Everything in ``body`` is untrusted: a malformed descriptor is an :class:`OciError`, a title
    that is not a relative, normalised path an :class:`UnsafePathError`, both naming the layer.
    """
    raw = body.get("layers") if isinstance(body, dict) else None
    if not isinstance(raw, list):
        raise OciError(f"{where}: the OCI manifest has no 'layers' list")
    layers: list[_Layer] = []
    seen: dict[str, str] = {}
    for index, layer in enumerate(raw):
        if not isinstance(layer, dict):
            raise OciError(f"{where}: layers[{index}] is not a descriptor object")
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise OciError(f"{where}: layers[{index}]: digest {digest!r} is not sha256:<64 hex digits>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{where}: layers[{index}] ({digest}): size {size!r} is not a byte count")
        annotations = layer.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise OciError(f"{where}: layers[{index}] ({digest}): annotations are not an object")
        name = annotations.get(mp.ANNOTATION_FILEPATH) or annotations.get(mp.ANNOTATION_TITLE)
        what = f"{where}: layers[{index}] ({digest}) title"
        title = check_relpath(name, what)
        if title in seen:
            raise UnsafePathError(f"{what}: {title!r}: a second layer with this file name")
        seen[title] = digest
        layers.append(_Layer(title, digest, size))
    return layers


def _fetch_listed_layers(client: Any, layers: list[_Layer], staging: Path, where: str) -> None:
    """``manifest.json`` first; then exactly the layers it lists (and their ``.sha256`` sidecars).

    A layer ``manifest.json`` does not list (an executable ``run.sh``, ``sub/dir/evil.gguf``)
    is refused with :class:`UnlistedFileError` before any of them is downloaded.
    """
    by_title = {layer.title: layer for layer in layers}
    head = by_title.get(MANIFEST_NAME)
    if head is None:
        raise ManifestError(f"{where}: no layer titled {MANIFEST_NAME} (not a ggufship export)")
    _download(client, head.digest, head.size, staging / MANIFEST_NAME)
    try:
        manifest = Manifest.load(staging / MANIFEST_NAME)
    except ManifestError as exc:  # name the artifact, not the staging directory
        message = str(exc).replace(
            str(staging / MANIFEST_NAME), f"{where}: layer {head.digest} ({MANIFEST_NAME})"
        )
        raise type(exc)(message) from exc
    listed = {entry.path for entry in manifest.files}
    allowed = listed | {path + SIDECAR_SUFFIX for path in listed}
    unlisted = sorted(title for title in by_title if title != MANIFEST_NAME and title not in allowed)
    if unlisted:
        problems = [
            f"{title}: layer {by_title[title].digest} is not listed in {MANIFEST_NAME}" for title in unlisted
        ]
        raise UnlistedFileError(
            f"{where}: {len(unlisted)} layer(s) not listed in {MANIFEST_NAME}, refused: "
            + "; ".join(problems),
            problems,
        )
    for layer in layers:
        if layer.title != MANIFEST_NAME:
            out = confined_join(staging, layer.title, what=f"{where}: layer {layer.digest} title")
            _download(client, layer.digest, layer.size, out)


def _download(client: Any, digest: str, size: int | None, out: Path) -> None:
    """Stream a blob to ``out``, checking size and SHA256 as it arrives."""
    import requests

    out.parent.mkdir(parents=True, exist_ok=True)
    url = client.url(f"{client.container().api_prefix}/blobs/{digest}")
    hasher = hashlib.sha256()
    written = 0
    response = client.do_request(url, "GET", stream=True)
    with response:
        if response.status_code != 200:
            raise OciError(f"{out.name}: blob {digest}: {_registry_message(response)}")
        try:
            with out.open("wb") as fh:
                for chunk in response.iter_content(chunk_size=DOWNLOAD_CHUNK):
                    hasher.update(chunk)
                    fh.write(chunk)
                    written += len(chunk)
                    if size is not None and written > size:
                        break
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise OciUnavailableError(f"{out.name}: download of {digest} broke off: {exc}") from exc
    actual = "sha256:" + hasher.hexdigest()
    if size is not None and written != size:
        raise IntegrityError(f"{out.name}: blob {digest} has {written}+ bytes, the manifest says {size}")
    if actual != digest:
        raise IntegrityError(f"{out.name}: blob content hashes to {actual}, the OCI manifest says {digest}")


def _credentials_for(reference_registry: str, auth: OciTarget | None) -> OciTarget | None:
    if auth is None or auth.username is None:
        return auth
    if auth.registry != reference_registry:
        logger.warning(
            "credentials are for %s, not %s: pulling without them", auth.registry, reference_registry
        )
        return None
    return auth


def pull_export(reference: str, dest: Path, target_auth: OciTarget | None = None) -> Path:
    """Fetch ``host:port/repo:tag`` (or ``@sha256:…``, ``oci://`` optional) into ``dest``; return ``dest``.

    Checks the manifest digest, every layer's SHA256 and size as it streams, then
    the files against ``manifest.json`` (:func:`ggufship.integrity.verify_export`);
    the signature referrer (if any) lands as ``dest/model.sig`` with its digest
    checked. Verifying the signature itself needs the caller's key or identity:
    the sign stage does that. Everything is written to a temporary directory
    beside ``dest`` and renamed into place, so a failure leaves nothing behind.
    ``dest`` must not exist or be an empty directory (:class:`OutputError`).
    ``target_auth`` gives credentials and transport; its repository is ignored,
    its credentials are only sent if its registry is the reference's.
    """
    registry, repository, ref = parse_oci_uri(reference)
    if not ref:
        raise OciError(f"{reference!r}: name a tag (…:1.0.0) or a digest (…@sha256:…) to pull")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest}: exists and is not an empty directory")
    auth = _credentials_for(registry, target_auth)
    target = OciTarget(
        registry=registry,
        repository=repository,
        insecure=target_auth.insecure if target_auth is not None else _is_loopback(registry),
        username=auth.username if auth else None,
        password=auth.password if auth else None,
        timeout_s=target_auth.timeout_s if target_auth is not None else 60.0,
    )
    client = _make_client(target)
    _ping(client, target)
    doc = _get_manifest(client, ref)
    where = f"{registry}/{repository}"
    if doc is None:
        raise OciError(f"{where}: {ref} not found")
    body = _json_object(doc, f"{where}:{ref}")
    if body.get("mediaType", doc.media_type) != mp.MANIFEST_MEDIA_TYPE:
        raise OciError(f"{where}:{ref}: is a {body.get('mediaType')}, not an OCI image manifest")
    if body.get("artifactType") != mp.ARTIFACT_TYPE_MODEL:
        raise OciError(
            f"{where}:{ref}: artifactType {body.get('artifactType')!r} is not {mp.ARTIFACT_TYPE_MODEL}"
        )
    layers = _titled_layers(body, f"{where}@{doc.digest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        _fetch_listed_layers(client, layers, staging, f"{where}@{doc.digest}")
        verify_export(staging)
        signatures = _referrers(client, doc.digest, mp.ARTIFACT_TYPE_SIGNATURE)
        if signatures:
            if len(signatures) > 1:
                logger.warning(
                    "%d signatures refer to %s; taking the last listed", len(signatures), doc.digest
                )
            _pull_signature(client, str(signatures[-1].get("digest")), doc.digest, staging)
        else:
            logger.warning("%s@%s has no signature referrer", where, doc.digest)
        staging.chmod(0o755)
        if dest.exists():
            dest.rmdir()
        staging.replace(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("pulled %s@%s into %s", where, doc.digest, dest)
    return dest


def _pull_signature(client: Any, sig_digest: str, subject_digest: str, staging: Path) -> None:
    if not _DIGEST_RE.match(sig_digest):
        raise OciError(f"referrer of {subject_digest}: digest {sig_digest!r} is not sha256:<64 hex digits>")
    sig = _get_manifest(client, sig_digest)
    if sig is None:
        raise OciError(f"signature manifest {sig_digest} is listed as a referrer but missing")
    body = _json_object(sig, f"signature manifest {sig_digest}")
    subject = body.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        raise IntegrityError(f"signature manifest {sig_digest}: its subject is not {subject_digest}")
    layers = [
        layer
        for layer in body.get("layers") or []
        if isinstance(layer, dict) and layer.get("mediaType") == mp.ARTIFACT_TYPE_SIGNATURE
    ]
    if len(layers) != 1:
        raise OciError(f"signature manifest {sig_digest}: expected one signature layer, found {len(layers)}")
    digest, size = layers[0].get("digest"), layers[0].get("size")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest) or not isinstance(size, int) or size < 0:
        raise OciError(f"signature manifest {sig_digest}: malformed signature layer descriptor")
    _download(client, digest, size, staging / mp.SIGNATURE_FILE)


def _json_object(doc: mp.Document, where: str) -> dict[str, Any]:
    """The JSON object of a fetched manifest; anything else is an :class:`OciError` (never a traceback)."""
    try:
        body = doc.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise OciError(f"{where}: the manifest is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise OciError(f"{where}: the manifest is a JSON {type(body).__name__}, not an object")
    return body
