"""OCI registry engine: push an export as a CNCF ModelPack artifact, pull it back verified.

Layout (built by :mod:`ggufship.publish._modelpack`): one OCI 1.1 image manifest
per release, every file a raw layer, tagged ``<version>`` and ``<version>-<quant>``
(one tag per GGUF, all pointing at that same manifest, so the signature, which
covers the whole export, verifies whichever tag is pulled). ``model.sig`` goes up
as a second manifest whose ``subject`` is the model manifest, and is also listed
in an image index tagged ``sha256-<hex of the model manifest digest>`` (the OCI
referrers *tag schema*): distribution 2.8 stores ``subject`` but answers 404 on
``/v2/<repo>/referrers/<digest>``. Pull asks the referrers API first and falls
back to that tag.

The HTTP side is :mod:`ggufship.publish._oci_client` (httpx; TLS by default for
every registry that is not loopback, basic and bearer-token auth, logins from the
caller or the Docker config). Blobs go up before the manifest, the manifest
before any tag: a failed push leaves at most unreferenced blobs, never a tag on
something incomplete.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.atomic import atomic_directory
from ggufship.errors import (
    IntegrityError,
    ManifestError,
    OutputError,
    UnlistedFileError,
    UnsafePathError,
)
from ggufship.integrity import (
    SIDECAR_SUFFIX,
    FetchedFiles,
    HashingFileSink,
    VerifiedExport,
    frozen_digests,
    sha256_file,
    verify_export,
)
from ggufship.layout import check_relpath, confined_join, export_files
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.publish import _modelpack as mp
from ggufship.publish._oci_client import (
    OciAuthError,
    OciConflictError,
    OciError,
    OciUnavailableError,
    RegistryClient,
    Transport,
    is_loopback,
    registry_message,
)
from ggufship.publish._s3 import skipped_ggufs
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
    "oci_settings",
    "parse_oci_uri",
    "pull_export",
    "push_export",
]

# ---------------------------------------------------------------- names

# distribution's reference grammar (github.com/distribution/reference)
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REGISTRY_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::\d{1,5})?$"
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the size OCI distribution says registries should accept
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
    """Where to push/pull, and how to authenticate. Validated on creation.

    ``insecure``: ``None`` (default) means plain HTTP for a loopback registry and
    HTTPS for every other one; ``True`` forces plain HTTP, ``False`` HTTPS. Without
    ``username``/``password`` the login comes from the Docker config
    (``DOCKER_CONFIG`` or ``~/.docker/config.json``) unless ``docker_config`` is off.
    """

    registry: str  # "127.0.0.1:5000"
    repository: str  # lowercase, validated: "models/tiny"
    insecure: bool | None = None
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 60.0  # per HTTP request (connect and each read)
    ca_bundle: Path | None = None  # PEM CA certificates trusted besides the system store
    docker_config: bool = True

    def __post_init__(self) -> None:
        _check_registry(self.registry)
        _check_repository(self.repository)
        if (self.username is None) != (self.password is None):
            raise OciError(f"{self.registry}: registry credentials need both a username and a password")
        if not 0 < self.timeout_s <= 3600:
            raise OciError(f"timeout_s {self.timeout_s}: must be in (0, 3600]")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise OciError(f"{self.registry}: CA bundle {self.ca_bundle}: no such file")

    @property
    def plain_http(self) -> bool:
        return self.insecure if self.insecure is not None else is_loopback(self.registry)

    def transport(self) -> Transport:
        return Transport(
            registry=self.registry,
            repository=self.repository,
            insecure=self.plain_http,
            username=self.username,
            password=self.password,
            timeout_s=self.timeout_s,
            ca_bundle=Path(self.ca_bundle) if self.ca_bundle is not None else None,
            use_docker_config=self.docker_config,
        )

    def __repr__(self) -> str:  # the dataclass repr would show the SecretStr mask anyway; keep it short
        where = f"{self.registry}/{self.repository}"
        return f"OciTarget({where}, plain_http={self.plain_http}, user={self.username})"


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
        default=None, min_length=1, description="registry user (else the Docker config's login)"
    )
    password: SecretStr | None = Field(default=None, description="registry password or access token")
    insecure: bool | None = Field(
        default=None,
        description="plain HTTP instead of HTTPS; default: plain HTTP only for a loopback registry",
    )
    ca_bundle: Path | None = Field(
        default=None, description="PEM file of CA certificates trusted for the registry (private CA)"
    )
    docker_config: bool = Field(
        default=True, description="read logins from DOCKER_CONFIG / ~/.docker/config.json"
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="seconds per registry request")

    def target(self, registry: str, repository: str) -> OciTarget:
        return OciTarget(
            registry=registry,
            repository=repository,
            insecure=self.insecure,
            username=self.username,
            password=self.password,
            timeout_s=self.timeout_s,
            ca_bundle=self.ca_bundle,
            docker_config=self.docker_config,
        )


def oci_settings() -> OciSettings:
    """:class:`OciSettings` from the environment; a bad value is an :class:`OciError` naming the variable."""
    try:
        return OciSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"GGUFSHIP_OCI_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise OciError(f"registry settings: {problems}") from exc


# ---------------------------------------------------------------- the client


def _make_client(target: OciTarget) -> RegistryClient:
    return RegistryClient(target.transport())


_ACCEPT_MANIFESTS = ", ".join((mp.MANIFEST_MEDIA_TYPE, mp.INDEX_MEDIA_TYPE))


def _ping(client: RegistryClient, target: OciTarget) -> None:
    response = client.request("GET", "")
    if response.status_code != 200:
        raise OciError(f"{target.registry}: /v2/ answered {registry_message(response)}")


def _head_manifest(client: RegistryClient, reference: str) -> str | None:
    """The digest a tag (or digest) resolves to, or None if absent."""
    path = f"{client.t.repository}/manifests/{reference}"
    response = client.request("HEAD", path, headers={"Accept": _ACCEPT_MANIFESTS})
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise OciError(f"{client.where}:{reference}: HEAD answered {registry_message(response)}")
    digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        raise OciError(f"{client.where}:{reference}: no Docker-Content-Digest header in the answer")
    return str(digest)


def _get_manifest(
    client: RegistryClient, reference: str, accept: str = _ACCEPT_MANIFESTS
) -> mp.Document | None:
    """Fetch a manifest/index by tag or digest; its digest is checked against the bytes (None if 404)."""
    where = f"{client.where}:{reference}"
    with client.stream(
        "GET", f"{client.t.repository}/manifests/{reference}", headers={"Accept": accept}
    ) as response:
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            response.read()
            raise OciError(f"{where}: GET answered {registry_message(response)}")
        data = bytearray()
        try:
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise OciError(f"{where}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise OciUnavailableError(
                f"{client.t.registry}: connection dropped reading {where}: {exc}"
            ) from exc
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    doc = mp.Document(media_type, bytes(data))
    expected = reference if _DIGEST_RE.match(reference) else response.headers.get("Docker-Content-Digest")
    if expected and expected != doc.digest:
        raise IntegrityError(f"{where}: manifest digest {doc.digest} != expected {expected}")
    return doc


def _put_manifest(client: RegistryClient, doc: mp.Document, reference: str) -> None:
    where = f"{client.where}:{reference}"
    response = client.request(
        "PUT",
        f"{client.t.repository}/manifests/{reference}",
        content=doc.data,
        headers={"Content-Type": doc.media_type},
    )
    if response.status_code not in (200, 201):
        raise OciError(f"{where}: manifest upload refused: {registry_message(response)}")
    answered = response.headers.get("Docker-Content-Digest")
    if answered and answered != doc.digest:
        raise OciError(f"{where}: registry stored digest {answered}, pushed {doc.digest}")


def _blob_exists(client: RegistryClient, digest: str, size: int) -> bool:
    response = client.request("HEAD", f"{client.t.repository}/blobs/{digest}")
    if response.status_code == 200:
        length = response.headers.get("Content-Length")
        return length is None or int(length) == size
    return False


def _upload_location(client: RegistryClient, response: httpx.Response, what: str) -> str:
    location = response.headers.get("Location")
    if response.status_code != 202 or not location:
        raise OciError(f"{client.where}: {what}: upload refused: {registry_message(response)}")
    return location


def _with_digest(location: str, digest: str) -> str:
    url = httpx.URL(location)
    return str(url.copy_merge_params({"digest": digest}))


_PIECE = 256 * 1024


def _file_part(path: Path, offset: int, length: int) -> Callable[[], Iterator[bytes]]:
    """A factory of iterators over ``length`` bytes of ``path`` from ``offset``, in small pieces
    (memory stays at one piece; a short file is an :class:`IntegrityError`)."""

    def pieces() -> Iterator[bytes]:
        with path.open("rb") as fh:
            fh.seek(offset)
            left = length
            while left > 0:
                piece = fh.read(min(_PIECE, left))
                if not piece:
                    raise IntegrityError(f"{path}: shorter than the {offset + length} bytes it should have")
                left -= len(piece)
                yield piece

    return pieces


def _upload_file(client: RegistryClient, path: Path, media_type: str, digest: str, size: int) -> None:
    """One blob, skipped if the registry already has it.

    Above :data:`UPLOAD_CHUNK` bytes: chunked (POST, one PATCH per chunk, PUT), so
    memory stays at one chunk whatever the file size; smaller files go in one
    PUT after the POST.
    """
    del media_type  # blobs are untyped in the registry; the manifest carries the media type
    if _blob_exists(client, digest, size):
        logger.debug("%s: blob %s already there", client.where, digest)
        return
    what = f"{path.name} ({digest})"
    start = client.request("POST", f"{client.t.repository}/blobs/uploads/")
    location = _upload_location(client, start, what)
    if size <= UPLOAD_CHUNK:
        final = client.request(
            "PUT",
            _with_digest(location, digest),
            content=_file_part(path, 0, size),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
    else:
        for offset in range(0, size, UPLOAD_CHUNK):
            length = min(UPLOAD_CHUNK, size - offset)
            patch = client.request(
                "PATCH",
                location,
                content=_file_part(path, offset, length),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(length),
                    "Content-Range": f"{offset}-{offset + length - 1}",
                },
            )
            location = _upload_location(client, patch, f"{what} bytes {offset}+")
        final = client.request("PUT", _with_digest(location, digest), headers={"Content-Length": "0"})
    if final.status_code not in (201, 204):
        raise OciError(f"{client.where}: {what}: blob upload refused: {registry_message(final)}")


def _upload_bytes(client: RegistryClient, blob: mp.Blob, scratch: Path) -> None:
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
    export_dir: Path,
    target: OciTarget,
    *,
    force: bool = False,
    apply_tags: bool = True,
    verified: VerifiedExport | None = None,
) -> OciPushResult:
    """Push an export directory as one ModelPack artifact, tag it, attach ``model.sig`` as a referrer.

    The export is verified against ``manifest.json`` first (:class:`IntegrityError`
    otherwise), unless ``verified`` is that export already verified (by ``publish``).
    Idempotent: every tag already on this manifest → ``skipped=True``
    (the signature referrer is still added if it is missing). A tag on another
    digest → :class:`OciConflictError` before anything is uploaded, unless ``force``.
    ``apply_tags=False``: the manifest goes up by digest only, and :func:`tag_release`
    moves the tags later (publish does so once GitOps has chosen the one winner of
    concurrent publishers, when no S3 lease serializes them: tags have no
    compare-and-swap).
    """
    export_dir = Path(export_dir)
    if verified is None or verified.export_dir != export_dir or verified.partial:
        verify_export(export_dir)  # publish passes the export it verified: not hashed twice
    manifest = Manifest.load(export_dir / MANIFEST_NAME)
    check_signed_files(export_dir, export_files(export_dir, manifest))
    tags = release_tags(manifest)
    layers = _layer_files(export_dir, manifest)
    manifest_layer = next(layer for layer in layers if layer.path == MANIFEST_NAME)
    config = mp.model_config(manifest, layers)
    doc = mp.model_manifest(config, layers, mp.model_annotations(manifest, manifest_layer.digest))
    client = _make_client(target)
    try:
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
    finally:
        client.close()


def tag_release(target: OciTarget, result: OciPushResult, *, force: bool = False) -> None:
    """Point ``result.tags`` at ``result.digest`` (pushed by ``push_export(..., apply_tags=False)``).

    A tag already there is left alone; one on another digest is
    :class:`OciConflictError` unless ``force``.
    """
    client = _make_client(target)
    try:
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
    finally:
        client.close()


def _push_signature(
    client: RegistryClient, export_dir: Path, manifest: Manifest, subject: mp.Document, scratch: Path
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


def _referrers(client: RegistryClient, subject_digest: str, artifact_type: str) -> list[dict[str, Any]]:
    """Referrer descriptors of ``subject_digest``: the referrers API, else the ``sha256-<hex>`` tag."""
    response = client.request(
        "GET", f"{client.t.repository}/referrers/{subject_digest}", headers={"Accept": mp.INDEX_MEDIA_TYPE}
    )
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


def _fetch_listed_layers(
    client: RegistryClient, layers: list[_Layer], staging: Path, where: str, quant: str | None = None
) -> FetchedFiles:
    """``manifest.json`` first; then exactly the layers it lists (and their ``.sha256`` sidecars).

    A layer ``manifest.json`` does not list (an executable ``run.sh``, ``sub/dir/evil.gguf``)
    is refused with :class:`UnlistedFileError` before any of them is downloaded. Each
    blob is hashed while it streams (its digest is the file's SHA256): the returned
    digests are the only hashing pass. ``quant``: GGUFs of other quantizations are skipped.
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
    absent = skipped_ggufs(manifest, quant, where)
    digests = {MANIFEST_NAME: head.digest.removeprefix("sha256:")}
    for layer in layers:
        if layer.title != MANIFEST_NAME and layer.title not in absent:
            out = confined_join(staging, layer.title, what=f"{where}: layer {layer.digest} title")
            _download(client, layer.digest, layer.size, out)
            digests[layer.title] = layer.digest.removeprefix("sha256:")  # checked as it streamed
    return FetchedFiles(manifest=manifest, digests=frozen_digests(digests), absent=absent)


def _download(client: RegistryClient, digest: str, size: int | None, out: Path) -> None:
    """Stream a blob to ``out``, checking size and SHA256 as it arrives."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with HashingFileSink(out) as sink:  # hashed and written while the next piece arrives
        # 256 KiB pieces as received (urllib3); stops once more than ``size`` bytes came
        client.download_blob(digest, sink.write, limit=size, label=out.name)
        hexdigest, written = sink.finish()
    actual = "sha256:" + hexdigest
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


def pull_export(
    reference: str, dest: Path, target_auth: OciTarget | None = None, *, quant: str | None = None
) -> Path:
    """Fetch ``host:port/repo:tag`` (or ``@sha256:…``, ``oci://`` optional) into ``dest``; return ``dest``.

    :func:`fetch_export` into a staging directory beside ``dest``, then the files
    against ``manifest.json`` with the digests computed while they streamed
    (``ggufship.sign.verify_export_once``, no second pass); renamed into place only
    then (:mod:`ggufship.atomic`), so a failure leaves nothing behind. Verifying the
    signature itself needs the caller's key or identity: ``ggufship.publish.pull``
    does that. ``dest`` must not exist or be an empty directory (:class:`OutputError`).
    """
    from ggufship.sign import verify_export_once

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest}: exists and is not an empty directory")
    with atomic_directory(dest, "pull") as staging:
        fetched = fetch_export(reference, staging, target_auth, quant=quant)
        verify_export_once(staging, None, fetched=fetched)
    return dest


def fetch_export(
    reference: str, staging: Path, target_auth: OciTarget | None = None, *, quant: str | None = None
) -> FetchedFiles:
    """Fetch ``host:port/repo:tag`` (or ``@sha256:…``) into the existing, empty ``staging`` directory.

    Checks the manifest digest, every layer's SHA256 and size as it streams (the
    returned digests), and fetches exactly the layers ``manifest.json`` lists (``quant``:
    GGUFs of other quantizations are left out); the signature referrer (if any) lands
    as ``model.sig`` with its digest checked. ``target_auth`` gives credentials and
    transport (default: :func:`oci_settings`, the ``GGUFSHIP_OCI_*`` environment); its
    repository is ignored, its credentials are only sent if its registry is the
    reference's; without credentials the Docker config's login for the registry is used.
    The caller verifies the digests against the manifest and stages/renames the directory.
    """
    registry, repository, ref = parse_oci_uri(reference)
    if not ref:
        raise OciError(f"{reference!r}: name a tag (…:1.0.0) or a digest (…@sha256:…) to pull")
    staging = Path(staging)
    auth = _credentials_for(registry, target_auth)
    if target_auth is None:
        target = oci_settings().target(registry, repository)  # GGUFSHIP_OCI_*, else defaults
    else:
        target = replace(
            target_auth,
            registry=registry,
            repository=repository,
            username=auth.username if auth else None,
            password=auth.password if auth else None,
        )
    client = _make_client(target)
    try:
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
        fetched = _fetch_listed_layers(client, layers, staging, f"{where}@{doc.digest}", quant)
        signatures = _referrers(client, doc.digest, mp.ARTIFACT_TYPE_SIGNATURE)
        if signatures:
            if len(signatures) > 1:
                logger.warning(
                    "%d signatures refer to %s; taking the last listed", len(signatures), doc.digest
                )
            _pull_signature(client, str(signatures[-1].get("digest")), doc.digest, staging)
        else:
            logger.warning("%s@%s has no signature referrer", where, doc.digest)
        logger.info("fetched %s@%s into %s", where, doc.digest, staging)
        return fetched
    finally:
        client.close()


def _pull_signature(client: RegistryClient, sig_digest: str, subject_digest: str, staging: Path) -> None:
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
