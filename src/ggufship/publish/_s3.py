"""The S3 engine: checksummed multipart uploads and verified downloads through the ``minio`` SDK.

Layout: every file of an export goes to ``[<prefix>/]models/<name>/<version>/<file>``
with user metadata ``name``, ``version`` and ``sha256``; ``manifest.json`` is
uploaded last, so a reader that finds a manifest finds every file it lists.

Integrity on the wire: each request carries ``x-amz-checksum-sha256`` (the whole
object for a single PUT, each part for a multipart upload, with the
``ChecksumSHA256`` of every part repeated in CompleteMultipartUpload); the server
recomputes it and refuses a mismatch. minio 7.2.20's ``put_object`` sends no
checksums, so the upload is driven here with the SDK's request layer
(``_create_multipart_upload``, ``_upload_part``, ``_execute``: signing, retries,
error parsing stay the SDK's).

Atomic: a multipart upload that was never completed is invisible to readers.
Before uploading a key, incomplete uploads of that key left by an interrupted run
are aborted, so a re-run starts clean and leaves no orphaned parts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.integrity import CHUNK_SIZE, SIDECAR_SUFFIX, sha256_file
from ggufship.layout import confined_join
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.progress import Reporter
from ggufship.publish._errors import (
    PublishConflictError,
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
    """S3 connection settings from the environment; flags override them, the state dir fills gaps.

    ``GGUFSHIP_S3_ENDPOINT``, ``GGUFSHIP_S3_ACCESS_KEY`` (or ``AWS_ACCESS_KEY_ID``),
    ``GGUFSHIP_S3_SECRET_KEY`` (or ``AWS_SECRET_ACCESS_KEY``), ``GGUFSHIP_S3_SECURE``,
    ``GGUFSHIP_S3_REGION`` (or ``AWS_REGION``), ``GGUFSHIP_STATE_DIR``.
    """

    model_config = SettingsConfigDict(
        env_prefix="GGUFSHIP_S3_", frozen=True, extra="ignore", populate_by_name=True
    )

    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint: http://host:port, https://host, or host[:port] (TLS unless insecure); "
        "default: the embedded default's SeaweedFS from the state dir",
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
    state_dir: Path = Field(
        default=Path(".ggufship"),
        validation_alias=AliasChoices("state_dir", "GGUFSHIP_STATE_DIR"),
        description="state dir of `ggufship up`, used when no endpoint is configured",
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
    Connection fields left ``None`` come from :class:`S3Settings` (environment) and
    then from the state dir of ``ggufship up``.
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
    state_dir: Path | None = None

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
    """Flags (the target's fields) over environment over the embedded default's state dir."""
    try:
        env = S3Settings()
    except ValidationError as exc:
        raise PublishSettingsError(f"invalid S3 settings in the environment: {exc}") from exc
    endpoint = target.endpoint or env.endpoint
    access_key = target.access_key or env.access_key
    secret_key = target.secret_key or env.secret_key
    state_dir = target.state_dir or env.state_dir
    if endpoint is None or access_key is None or secret_key is None:
        from ggufship.services import ServiceError, load_credentials, load_state

        try:
            record = load_state(state_dir).services.get("s3")
        except ServiceError as exc:
            raise PublishSettingsError(f"no S3 endpoint configured and {exc}") from exc
        if endpoint is None:
            if record is None:
                raise PublishSettingsError(
                    "no S3 endpoint: set --s3-endpoint or GGUFSHIP_S3_ENDPOINT, or start the embedded "
                    f"default with `ggufship up` (state dir {state_dir} has no s3 service)"
                )
            endpoint = record.endpoint
        if (access_key is None or secret_key is None) and record is not None:
            try:
                creds = load_credentials(state_dir).s3
            except ServiceError as exc:
                raise PublishSettingsError(f"no S3 credentials configured and {exc}") from exc
            access_key = access_key or creds.access_key
            secret_key = secret_key or creds.secret_key
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


@dataclass(frozen=True)
class _LocalFile:
    name: str
    path: Path
    sha256: str
    size: int


def base_key(prefix: str, name: str, version: str) -> str:
    head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return f"{head}models/{name}/{version}/"


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def _local_files(export_dir: Path, manifest: Manifest) -> tuple[list[_LocalFile], _LocalFile]:
    """The files to upload (manifest entries, their sidecars, the signature) and the manifest itself."""
    files: list[_LocalFile] = []
    for entry in manifest.files:
        files.append(_LocalFile(entry.path, export_dir / entry.path, entry.sha256, entry.size))
        sidecar = export_dir / (entry.path + SIDECAR_SUFFIX)
        if sidecar.is_file():
            digest, size = sha256_file(sidecar)
            files.append(_LocalFile(sidecar.name, sidecar, digest, size))
    signature = export_dir / SIGNATURE_NAME
    if signature.is_file():
        digest, size = sha256_file(signature)
        files.append(_LocalFile(SIGNATURE_NAME, signature, digest, size))
    digest, size = sha256_file(export_dir / MANIFEST_NAME)
    return files, _LocalFile(MANIFEST_NAME, export_dir / MANIFEST_NAME, digest, size)


# ---------------------------------------------------------------- publish


def publish_s3(
    export_dir: Path,
    manifest: Manifest,
    target: S3Target,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
) -> S3PublishResult:
    """Upload a verified export; idempotent (same digests: skipped), immutable (other digests: refused).

    ``export_dir`` must already have been verified against ``manifest``.
    """
    reporter = reporter or Reporter(enabled=False)
    conn = resolve_connection(target)
    client = client_for(conn)
    bucket = target.bucket
    check_bucket_name(bucket, f"s3://{bucket}")
    base = base_key(target.prefix, manifest.name, manifest.version)
    files, manifest_file = _local_files(export_dir, manifest)
    ensure_bucket(client, conn, bucket, create=target.create_bucket)

    remote_manifest = _remote_sha256(client, conn, bucket, base + MANIFEST_NAME)
    if remote_manifest is not None and remote_manifest != manifest_file.sha256:
        where = f"s3://{bucket}/{base}{MANIFEST_NAME}"
        if not force:
            raise PublishConflictError(
                f"{where}: {manifest.name} {manifest.version} is already published with other content "
                f"(remote manifest sha256 {remote_manifest}, this export's {manifest_file.sha256}); "
                "publish a new version, or replace it with --force"
            )
        logger.warning("%s: replacing the published %s %s (--force)", where, manifest.name, manifest.version)
        # Readers must not see the old manifest next to new files: take it away first.
        with s3_errors(conn, bucket, base + MANIFEST_NAME, "delete"):
            client.remove_object(bucket, base + MANIFEST_NAME)

    meta = {"name": manifest.name, "version": manifest.version}
    objects: list[S3Object] = []
    for local in [*files, manifest_file]:
        key = base + local.name
        remote = _remote_sha256(client, conn, bucket, key)
        if remote == local.sha256:
            logger.info("s3://%s/%s: already there with sha256 %s, skipped", bucket, key, local.sha256[:12])
            objects.append(S3Object(key, local.sha256, local.size, skipped=True))
            continue
        if remote is not None:
            logger.info(
                "s3://%s/%s: replacing an object with other content (no manifest refers to it)", bucket, key
            )
        abort_incomplete_uploads(client, conn, bucket, key)
        upload_file(client, conn, bucket, key, local.path, local.sha256, local.size, {**meta}, reporter)
        objects.append(S3Object(key, local.sha256, local.size, skipped=False))
    result = S3PublishResult(
        endpoint=conn.url,
        bucket=bucket,
        base_key=base,
        objects=tuple(objects),
        manifest_sha256=manifest_file.sha256,
    )
    if result.skipped:
        logger.info(
            "%s: %s %s already published with the same digests; nothing uploaded",
            result.uri,
            manifest.name,
            manifest.version,
        )
    else:
        logger.info("published %s %s to %s", manifest.name, manifest.version, result.uri)
    return result


def ensure_bucket(client: Minio, conn: S3Connection, bucket: str, *, create: bool) -> None:
    with s3_errors(conn, bucket, None, "check bucket"):
        exists = client.bucket_exists(bucket)
    if exists:
        return
    if not create:
        raise S3AccessError(
            f"s3://{bucket}: bucket {bucket!r} does not exist at {conn.url}; "
            "create it, or pass --create-bucket"
        )
    with s3_errors(conn, bucket, None, "create bucket"):
        client.make_bucket(bucket, location=conn.region) if conn.region else client.make_bucket(bucket)
    logger.info("created bucket s3://%s at %s", bucket, conn.url)


def _remote_sha256(client: Minio, conn: S3Connection, bucket: str, key: str) -> str | None:
    """The ``sha256`` metadata of an object, ``""`` if it has none, ``None`` if there is no object."""
    from minio.error import S3Error

    with s3_errors(conn, bucket, key, "stat"):
        try:
            stat = client.stat_object(bucket, key)
        except S3Error as exc:
            if _is_missing(exc):
                return None
            raise
    return object_metadata(stat.metadata).get("sha256", "")


def object_metadata(headers: Any) -> dict[str, str]:
    """User metadata of a stat/get response, keys without the ``x-amz-meta-`` prefix, lower case."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        low = str(key).lower()
        if low.startswith("x-amz-meta-"):
            out[low[len("x-amz-meta-") :]] = str(value)
    return out


def abort_incomplete_uploads(client: Minio, conn: S3Connection, bucket: str, key: str) -> int:
    """Abort every unfinished multipart upload of exactly ``key`` (left by an interrupted run)."""
    aborted = 0
    with s3_errors(conn, bucket, key, "list incomplete uploads of"):
        uploads = [
            u for u in client._list_multipart_uploads(bucket, prefix=key).uploads if u.object_name == key
        ]
        for upload in uploads:
            client._abort_multipart_upload(bucket, key, str(upload.upload_id))
            aborted += 1
    if aborted:
        logger.info(
            "s3://%s/%s: aborted %d incomplete upload(s) left by an earlier run", bucket, key, aborted
        )
    return aborted


def incomplete_uploads(client: Minio, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """``(key, upload id)`` of every unfinished multipart upload under ``prefix``."""
    result = client._list_multipart_uploads(bucket, prefix=prefix)
    return [(u.object_name, str(u.upload_id)) for u in result.uploads]


def upload_file(
    client: Minio,
    conn: S3Connection,
    bucket: str,
    key: str,
    path: Path,
    sha256: str,
    size: int,
    metadata: dict[str, str],
    reporter: Reporter,
) -> None:
    """One object: a single checksummed PUT up to the part size, else a checksummed multipart upload."""
    headers = {f"x-amz-meta-{k}": v for k, v in {**metadata, "sha256": sha256}.items()}
    headers["Content-Type"] = "application/json" if path.suffix == ".json" else "application/octet-stream"
    part_size = max(conn.part_size, -(-size // MAX_PARTS))
    with reporter.task(f"upload s3://{bucket}/{key}", total=size) as task:
        if size <= part_size:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise PublishError(f"{path}: changed while publishing (sha256 {digest} != {sha256})")
            headers["x-amz-checksum-sha256"] = _b64(sha256)
            with s3_errors(conn, bucket, key, "upload"):
                client._put_object(bucket, key, data, headers)
            task.advance(size)
        else:
            _multipart(client, conn, bucket, key, path, sha256, size, part_size, headers, task)


def _multipart(
    client: Minio,
    conn: S3Connection,
    bucket: str,
    key: str,
    path: Path,
    sha256: str,
    size: int,
    part_size: int,
    headers: dict[str, str],
    task: Any,
) -> None:
    count = -(-size // part_size)
    with s3_errors(conn, bucket, key, "start multipart upload of"):
        upload_id = client._create_multipart_upload(
            bucket, key, {**headers, "x-amz-checksum-algorithm": "SHA256"}
        )
    logger.debug(
        "s3://%s/%s: multipart upload %s, %d parts of %d bytes", bucket, key, upload_id, count, part_size
    )
    # The parts are read here, in order, so the whole-file SHA256 is computed over exactly the
    # bytes sent (no second pass over the file); workers hash each part for its checksum header
    # and send it. At most ``parallel`` parts are in memory at once.
    whole = hashlib.sha256()
    digests: dict[int, tuple[str, str]] = {}
    lock = threading.Lock()

    def send(number: int, data: bytes) -> tuple[int, int]:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        etag = client._upload_part(bucket, key, data, {"x-amz-checksum-sha256": checksum}, upload_id, number)
        with lock:
            digests[number] = (etag, checksum)
        return number, len(data)

    try:
        with (
            path.open("rb") as fh,
            s3_errors(conn, bucket, key, "upload part of"),
            ThreadPoolExecutor(conn.parallel) as pool,
        ):
            pending: set[Future[tuple[int, int]]] = set()
            next_part = 1
            while next_part <= count or pending:
                while next_part <= count and len(pending) < conn.parallel:
                    length = min(part_size, size - (next_part - 1) * part_size)
                    data = fh.read(length)
                    if len(data) != length:
                        raise PublishError(f"{path}: shorter than {size} bytes (changed while publishing)")
                    whole.update(data)
                    pending.add(pool.submit(send, next_part, data))
                    next_part += 1
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    number, length = fut.result()
                    logger.debug("s3://%s/%s: part %d/%d uploaded", bucket, key, number, count)
                    task.advance(length)
            if fh.read(1):
                raise PublishError(f"{path}: longer than {size} bytes (changed while publishing)")
        if whole.hexdigest() != sha256:
            raise PublishError(f"{path}: changed while publishing (sha256 {whole.hexdigest()} != {sha256})")
        _complete(client, conn, bucket, key, upload_id, [(n, *digests[n]) for n in range(1, count + 1)])
    except BaseException:
        with contextlib.suppress(Exception):
            client._abort_multipart_upload(bucket, key, upload_id)
        raise


def _complete(
    client: Minio,
    conn: S3Connection,
    bucket: str,
    key: str,
    upload_id: str,
    parts: list[tuple[int, str, str]],
) -> None:
    from minio.helpers import md5sum_hash
    from minio.xml import Element, SubElement, getbytes

    element = Element("CompleteMultipartUpload")
    for number, etag, checksum in parts:
        tag = SubElement(element, "Part")
        SubElement(tag, "PartNumber", str(number))
        SubElement(tag, "ETag", f'"{etag}"')
        SubElement(tag, "ChecksumSHA256", checksum)
    body = getbytes(element)
    headers = {"Content-Type": "application/xml", "Content-MD5": str(md5sum_hash(body))}
    with s3_errors(conn, bucket, key, "complete multipart upload of"):
        response = client._execute(
            "POST", bucket, key, body=body, headers=headers, query_params={"uploadId": upload_id}
        )
    # S3 may answer 200 with an <Error> body to a CompleteMultipartUpload.
    root = ET.fromstring(response.data.decode() or "<empty/>")
    if root.tag.rsplit("}", 1)[-1] == "Error":
        code = root.findtext("Code") or root.findtext("{*}Code")
        message = root.findtext("Message") or root.findtext("{*}Message")
        raise PublishError(
            f"complete multipart upload of s3://{bucket}/{key} at {conn.url} failed: {code}: {message}"
        )


# ---------------------------------------------------------------- pull


def pull_s3(
    bucket: str, prefix: str, staging: Path, target: S3Target, reporter: Reporter | None = None
) -> Manifest:
    """Download ``s3://bucket/prefix/`` (an export: ``manifest.json`` + files) into ``staging``.

    Every file is hashed while it streams and compared with the manifest; a
    mismatch raises :class:`PullError` naming the key and both digests. The
    manifest is untrusted: its model refuses any entry that is not a relative,
    normalised path (:class:`PullError` naming the key and the field), and every
    local path is joined with :func:`ggufship.layout.confined_join`. Exactly the
    listed files, their ``.sha256`` sidecars, ``model.sig`` and ``manifest.json``
    are fetched, nothing else under the prefix.
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
    declared = meta.get("sha256")
    if declared and hashlib.sha256(data).hexdigest() != declared:
        raise PullError(
            f"s3://{bucket}/{manifest_key}: content does not match its sha256 metadata {declared}"
        )
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise PullError(f"s3://{bucket}/{manifest_key}: invalid manifest: {exc}") from exc
    where = f"s3://{bucket}/{manifest_key}"
    reporter = reporter or Reporter(enabled=False)
    with reporter.session():
        for index, entry in enumerate(manifest.files):
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
    extras = [(f.path + SIDECAR_SUFFIX, MAX_SIDECAR_BYTES) for f in manifest.files]
    for name, limit in [*extras, (SIGNATURE_NAME, MAX_SIGNATURE_BYTES)]:
        local = confined_join(staging, name, what=f"{where}: sidecar/signature")
        small, _ = _get_bytes(client, conn, bucket, base + name, limit)
        if small is not None:
            local.write_bytes(small)
    (staging / MANIFEST_NAME).write_bytes(data)
    return manifest


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
    digest = hashlib.sha256()
    got = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with s3_errors(conn, bucket, key, "download"):
        try:
            response = client.get_object(bucket, key)
        except S3Error as exc:
            if _is_missing(exc):
                raise PullError(f"{where}: listed in the manifest but missing in the bucket") from exc
            raise
        try:
            with dest.open("wb") as out:
                for chunk in response.stream(CHUNK_SIZE):
                    digest.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    if got > size:
                        raise PullError(f"{where}: larger than the {size} bytes the manifest lists")
        finally:
            response.close()
            response.release_conn()
    if got != size:
        raise PullError(f"{where}: {got} bytes, the manifest lists {size} (truncated or tampered)")
    if digest.hexdigest() != sha256:
        raise PullError(
            f"{where}: sha256 {digest.hexdigest()} does not match the manifest's {sha256} "
            "(tampered or corrupted)"
        )
