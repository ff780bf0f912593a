"""The S3 engine's shared half and its reads: settings, connection, verified downloads (``minio`` SDK).

Layout: every file of an export goes to ``[<prefix>/]models/<name>/<version>/<file>``
with user metadata ``name``, ``version`` and ``sha256``; ``manifest.json`` is
uploaded last, so a reader that finds a manifest finds every file it lists.

Writes (checksummed uploads, conditional creates, the per-version publish lease
that lets exactly one of two concurrent publishers win) are in ``_s3_write``,
through boto3: minio 7.2.20's public API can send neither per-part SHA256
checksums nor ``If-None-Match``/``If-Match``. Reads here use minio's public API only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.integrity import CHUNK_SIZE, SIDECAR_SUFFIX, FetchedFiles, HashingFileSink, frozen_digests
from ggufship.layout import confined_join
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.progress import Reporter
from ggufship.publish._errors import (
    PublishError,
    PublishSettingsError,
    PullError,
    S3AccessError,
)

if TYPE_CHECKING:
    from minio import Minio

logger = logging.getLogger(__name__)

SIGNATURE_NAME = "model.sig"
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
MAX_PARTS = 10_000
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # pull reads these small objects into memory: bounded
MAX_SIDECAR_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 16 * 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_META = ("name", "version", "sha256")


# ---------------------------------------------------------------- settings and target


class S3Settings(BaseSettings):
    """S3 connection settings from the environment; flags override them.

    ``GGUFSHIP_S3_ENDPOINT``, ``GGUFSHIP_S3_ACCESS_KEY`` (or ``AWS_ACCESS_KEY_ID``),
    ``GGUFSHIP_S3_SECRET_KEY`` (or ``AWS_SECRET_ACCESS_KEY``), ``GGUFSHIP_S3_SECURE``,
    ``GGUFSHIP_S3_REGION`` (or ``AWS_REGION``).
    """

    model_config = SettingsConfigDict(
        env_prefix="GGUFSHIP_S3_", frozen=True, extra="ignore", populate_by_name=True
    )

    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint: http://host:port, https://host, or host[:port] (TLS unless insecure); "
        "the CLI's default: the SeaweedFS of `ggufship up`",
    )
    access_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("access_key", "GGUFSHIP_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        description="S3 access key id",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("secret_key", "GGUFSHIP_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        description="S3 secret access key",
    )
    secure: bool | None = Field(
        default=None, description="use TLS; default: from the endpoint's scheme, TLS when it has none"
    )
    region: str | None = Field(
        default=None,
        validation_alias=AliasChoices("region", "GGUFSHIP_S3_REGION", "AWS_REGION"),
        description="bucket region (MinIO/SeaweedFS: any, usually us-east-1)",
    )
    part_size: int = Field(
        default=DEFAULT_PART_SIZE,
        ge=MIN_PART_SIZE,
        le=MAX_PART_SIZE,
        description="multipart part size, bytes",
    )
    parallel: int = Field(default=4, ge=1, le=32, description="parts uploaded at the same time")


@dataclass(frozen=True)
class S3Target:
    """Where and how to publish to (or pull from) S3.

    ``bucket`` and ``prefix`` place the objects (``[prefix/]models/<name>/<version>/``).
    Connection fields left ``None`` come from :class:`S3Settings` (environment).
    """

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secure: bool | None = None
    region: str | None = None
    create_bucket: bool = False
    part_size: int | None = None
    parallel: int | None = None

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> S3Target:
        """``s3://bucket[/prefix]`` plus connection options (see the fields)."""
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket=bucket, prefix=prefix, **options)


@dataclass(frozen=True)
class S3Connection:
    """A resolved endpoint with credentials (what the minio client is built from)."""

    endpoint: str
    secure: bool
    access_key: str
    secret_key: SecretStr = field(repr=False)
    region: str | None
    part_size: int
    parallel: int

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` → ``("bucket", "some/prefix")``; errors name the URI."""
    if not uri.startswith("s3://"):
        raise PublishSettingsError(f"{uri!r}: not an s3:// URI (expected s3://bucket[/prefix])")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    check_bucket_name(bucket, uri)
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise PublishSettingsError(f"{uri!r}: invalid prefix {prefix!r}")
    return bucket, prefix


def check_bucket_name(bucket: str, where: str) -> None:
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise PublishSettingsError(
            f"{where}: invalid bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')"
        )


def resolve_connection(target: S3Target) -> S3Connection:
    """The target's fields over the environment (``GGUFSHIP_S3_*``); no state files are read here:
    the CLI fills the embedded default's endpoint (``ggufship.cli.embedded``)."""
    try:
        env = S3Settings()
    except ValidationError as exc:
        raise PublishSettingsError(f"invalid S3 settings in the environment: {exc}") from exc
    endpoint = target.endpoint or env.endpoint
    access_key = target.access_key or env.access_key
    secret_key = target.secret_key or env.secret_key
    if endpoint is None:
        raise PublishSettingsError(
            "no S3 endpoint: set --s3-endpoint or GGUFSHIP_S3_ENDPOINT (the ggufship CLI also "
            "falls back to the embedded default started by `ggufship up`)"
        )
    if access_key is None or secret_key is None:
        raise PublishSettingsError(
            f"no S3 credentials for {endpoint}: set GGUFSHIP_S3_ACCESS_KEY and GGUFSHIP_S3_SECRET_KEY "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    secure = target.secure if target.secure is not None else env.secure
    host = endpoint
    if endpoint.startswith(("http://", "https://")):
        scheme, _, host = endpoint.partition("://")
        if secure is None:
            secure = scheme == "https"
    host = host.rstrip("/")
    if not host or "/" in host:
        raise PublishSettingsError(f"S3 endpoint {endpoint!r}: expected host[:port] without a path")
    part_size = target.part_size or env.part_size
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise PublishSettingsError(
            f"part size {part_size}: must be between {MIN_PART_SIZE} and {MAX_PART_SIZE}"
        )
    parallel = target.parallel or env.parallel
    return S3Connection(
        endpoint=host,
        secure=True if secure is None else secure,
        access_key=access_key,
        secret_key=secret_key,
        region=target.region or env.region,
        part_size=part_size,
        parallel=max(1, parallel),
    )


def client_for(conn: S3Connection) -> Minio:
    """A minio client with bounded retries and timeouts (fail fast on a dead endpoint)."""
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10.0, read=120.0),
        maxsize=max(10, conn.parallel + 2),
        retries=urllib3.Retry(
            total=3,
            connect=2,
            backoff_factor=0.2,
            status_forcelist=[500, 502, 503, 504],
            allowed_methods=None,
        ),
    )
    return Minio(
        conn.endpoint,
        access_key=conn.access_key,
        secret_key=conn.secret_key.get_secret_value(),
        secure=conn.secure,
        region=conn.region,
        http_client=http,
    )


# ---------------------------------------------------------------- error mapping


@contextlib.contextmanager
def s3_errors(conn: S3Connection, bucket: str, key: str | None, action: str) -> Iterator[None]:
    """Turn SDK and network errors into ggufship errors that name the URL, bucket and key."""
    import urllib3
    from minio.error import MinioException, S3Error

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    try:
        yield
    except S3Error as exc:
        if exc.code in _ACCESS_CODES:
            raise S3AccessError(
                f"{action} {where}: access denied by {conn.url} ({exc.code}: {exc.message}); "
                "check the access key and secret (GGUFSHIP_S3_ACCESS_KEY / GGUFSHIP_S3_SECRET_KEY) "
                "and the bucket policy"
            ) from exc
        if exc.code == "NoSuchBucket":
            raise S3AccessError(
                f"{action} {where}: bucket {bucket!r} does not exist at {conn.url} "
                "(--create-bucket creates it)"
            ) from exc
        raise PublishError(f"{action} {where} at {conn.url} failed: {exc.code}: {exc.message}") from exc
    except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out (after the bounded retries)
        raise S3AccessError(f"{action} {where}: cannot reach S3 endpoint {conn.url}: {exc}") from exc
    except MinioException as exc:
        raise PublishError(f"{action} {where} at {conn.url} failed: {exc}") from exc


def _is_missing(exc: BaseException) -> bool:
    from minio.error import S3Error

    return isinstance(exc, S3Error) and exc.code in (
        "NoSuchKey",
        "NoSuchObject",
        "NotFound",
        "ResourceNotFound",
    )


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class S3Object:
    """One published object."""

    key: str
    sha256: str
    size: int
    skipped: bool

    def uri(self, bucket: str) -> str:
        return f"s3://{bucket}/{self.key}"


@dataclass(frozen=True)
class S3PublishResult:
    """What :func:`publish_s3` did: the export's location and every object (uploaded or skipped)."""

    endpoint: str
    bucket: str
    base_key: str
    objects: tuple[S3Object, ...]
    manifest_sha256: str

    @property
    def uri(self) -> str:
        """``s3://bucket/[prefix/]models/<name>/<version>/``: what ``pull`` and ``serve`` take."""
        return f"s3://{self.bucket}/{self.base_key}"

    @property
    def skipped(self) -> bool:
        """True when everything was already there with the same digests (nothing uploaded)."""
        return all(o.skipped for o in self.objects)

    def uri_of(self, filename: str) -> str:
        return f"s3://{self.bucket}/{self.base_key}{filename}"


def base_key(prefix: str, name: str, version: str) -> str:
    head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return f"{head}models/{name}/{version}/"


def object_metadata(headers: Any) -> dict[str, str]:
    """User metadata of a stat/get response, keys without the ``x-amz-meta-`` prefix, lower case."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        low = str(key).lower()
        if low.startswith("x-amz-meta-"):
            out[low[len("x-amz-meta-") :]] = str(value)
    return out


# ---------------------------------------------------------------- pull


def pull_s3(
    bucket: str,
    prefix: str,
    staging: Path,
    target: S3Target,
    reporter: Reporter | None = None,
    *,
    quant: str | None = None,
) -> FetchedFiles:
    """Download ``s3://bucket/prefix/`` (an export: ``manifest.json`` + files) into ``staging``.

    Every file is hashed while it streams (its only hashing pass) and compared with the
    manifest; a mismatch raises :class:`PullError` naming the key and both digests. The
    digests are returned (:class:`~ggufship.integrity.FetchedFiles`) for the signature
    check, which then reads no file again. The manifest is untrusted: its model refuses
    any entry that is not a relative, normalised path (:class:`PullError` naming the key
    and the field), and every local path is joined with
    :func:`ggufship.layout.confined_join`. Exactly the listed files, their ``.sha256``
    sidecars, ``model.sig`` and ``manifest.json`` are fetched, nothing else under the
    prefix. ``quant``: GGUFs of other quantizations are left out (listed in ``absent``).
    """
    conn = resolve_connection(replace(target, bucket=bucket, prefix=prefix))
    client = client_for(conn)
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    manifest_key = base + MANIFEST_NAME
    with s3_errors(conn, bucket, None, "check bucket"):
        if not client.bucket_exists(bucket):
            raise S3AccessError(f"s3://{bucket}/{base}: bucket {bucket!r} does not exist at {conn.url}")
    data, meta = _get_bytes(client, conn, bucket, manifest_key, MAX_MANIFEST_BYTES)
    if data is None:
        raise PullError(f"s3://{bucket}/{manifest_key}: no manifest there (not a published export)")
    manifest_sha256 = hashlib.sha256(data).hexdigest()
    declared = meta.get("sha256")
    if declared and manifest_sha256 != declared:
        raise PullError(
            f"s3://{bucket}/{manifest_key}: content does not match its sha256 metadata {declared}"
        )
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise PullError(f"s3://{bucket}/{manifest_key}: invalid manifest: {exc}") from exc
    where = f"s3://{bucket}/{manifest_key}"
    absent = skipped_ggufs(manifest, quant, where)
    digests: dict[str, str] = {MANIFEST_NAME: manifest_sha256}
    reporter = reporter or Reporter(enabled=False)
    with reporter.session():
        for index, entry in enumerate(manifest.files):
            if entry.path in absent:
                continue
            local = confined_join(staging, entry.path, what=f"{where}: files[{index}].path")
            with reporter.task(f"download s3://{bucket}/{base}{entry.path}", total=entry.size) as task:
                _download(
                    client,
                    conn,
                    bucket,
                    base + entry.path,
                    local,
                    entry.sha256,
                    entry.size,
                    task.advance,
                )
            digests[entry.path] = entry.sha256  # _download raised unless the streamed bytes hash to it
    extras = [(f.path + SIDECAR_SUFFIX, MAX_SIDECAR_BYTES) for f in manifest.files]
    for name, limit in [*extras, (SIGNATURE_NAME, MAX_SIGNATURE_BYTES)]:
        local = confined_join(staging, name, what=f"{where}: sidecar/signature")
        small, _ = _get_bytes(client, conn, bucket, base + name, limit)
        if small is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(small)
            if name != SIGNATURE_NAME:
                digests[name] = hashlib.sha256(small).hexdigest()
    (staging / MANIFEST_NAME).write_bytes(data)
    return FetchedFiles(manifest=manifest, digests=frozen_digests(digests), absent=absent)


def skipped_ggufs(manifest: Manifest, quant: str | None, where: str) -> tuple[str, ...]:
    """The GGUFs a pull of ``quant`` leaves out (all but that quantization's); ``()`` for ``None``.

    :class:`PullError` naming the available quantizations when the export has no ``quant``.
    """
    if quant is None:
        return ()
    ggufs = manifest.gguf_files()
    wanted = [f for f in ggufs if (f.quantization or "").upper() == quant.upper()]
    if not wanted:
        available = ", ".join(f.quantization or f.path for f in ggufs) or "none"
        raise PullError(f"{where}: no quantization {quant!r} in this export (available: {available})")
    return tuple(f.path for f in ggufs if f not in wanted)


def _get_bytes(
    client: Minio, conn: S3Connection, bucket: str, key: str, limit: int
) -> tuple[bytes | None, dict[str, str]]:
    """A small object (manifest, sidecar, signature) in memory; more than ``limit`` bytes is refused."""
    from minio.error import S3Error

    with s3_errors(conn, bucket, key, "download"):
        try:
            response = client.get_object(bucket, key)
        except S3Error as exc:
            if _is_missing(exc):
                return None, {}
            raise
        try:
            data = response.read(limit + 1)
            if len(data) > limit:
                raise PullError(f"s3://{bucket}/{key}: larger than {limit} bytes (not a file ggufship wrote)")
            return data, object_metadata(response.headers)
        finally:
            response.close()
            response.release_conn()


def _download(
    client: Minio,
    conn: S3Connection,
    bucket: str,
    key: str,
    dest: Path,
    sha256: str,
    size: int,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    from minio.error import S3Error

    where = f"s3://{bucket}/{key}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with s3_errors(conn, bucket, key, "download"):
        try:
            response = client.get_object(bucket, key)
        except S3Error as exc:
            if _is_missing(exc):
                raise PullError(f"{where}: listed in the manifest but missing in the bucket") from exc
            raise
        try:
            with HashingFileSink(dest) as out:  # hashed and written while the next chunk arrives
                for chunk in response.stream(CHUNK_SIZE):
                    out.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    if out.size > size:
                        raise PullError(f"{where}: larger than the {size} bytes the manifest lists")
                digest, got = out.finish()
        finally:
            response.close()
            response.release_conn()
    if got != size:
        raise PullError(f"{where}: {got} bytes, the manifest lists {size} (truncated or tampered)")
    if digest != sha256:
        raise PullError(
            f"{where}: sha256 {digest} does not match the manifest's {sha256} (tampered or corrupted)"
        )
