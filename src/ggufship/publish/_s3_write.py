"""S3 writes through boto3's public client: checksummed uploads, conditional creates, the publish lease.

Why boto3 for writes (reads stay on the ``minio`` SDK, see ``_s3``): minio 7.2.20's
public ``put_object``/``fput_object`` cannot send a per-part ``x-amz-checksum-sha256``
nor an ``If-None-Match``/``If-Match`` header (``metadata`` keys that are not
``x-amz-*`` become ``x-amz-meta-*``), and both are needed here. boto3's client
operations take them as parameters (``ChecksumSHA256``, ``ChecksumAlgorithm``,
``IfNoneMatch``, ``IfMatch``).

Integrity on the wire: each request carries ``x-amz-checksum-sha256`` (the whole
object for a single PUT, each part of a multipart upload, repeated per part in
CompleteMultipartUpload); the server recomputes it and refuses a mismatch.

**One winner per version** (see :class:`PublishLease`). Every publish of
``[prefix/]models/<name>/<version>/`` first creates the lease object
``<base>.publish-lease.json`` with ``PutObject`` + ``If-None-Match: *``: an atomic
create, so of two publishers started together exactly one gets it. The holder
keeps it for the whole publish (S3, then OCI, then GitOps), renewing it with
``If-Match: <etag>`` (compare-and-swap), and deletes it at the end, again with
``If-Match``. A publisher that finds a live lease for *other* content fails with
:class:`PublishConflictError` before it writes anything; one that finds a live
lease for the *same* content waits (bounded) for it to finish, then finds
everything published and skips. A lease whose holder is gone — its renewal
older than its TTL by the server's clock (``Date`` − ``Last-Modified``), or its
process dead on this very host — is taken over with ``If-Match`` (only one of
several takers wins that CAS). Consequences:

* only the lease holder starts multipart uploads under the version's prefix, so
  an incomplete upload found by a holder was left by a dead one: aborting it
  never aborts a live upload (a holder that lost its lease — stopped longer than
  the TTL — stops at its next check);
* ``manifest.json`` is written last with ``If-None-Match: *``, and data files too,
  so even a holder that lost its lease cannot overwrite what the winner wrote;
* S3, OCI and GitOps are written by the same holder, so they name one digest.

Tested on SeaweedFS 4.48: concurrent ``PutObject`` with ``If-None-Match``/``If-Match``
has exactly one winner, but concurrent ``CompleteMultipartUpload`` with
``If-None-Match`` can let several through — that is why the linearization point is
the small lease object, never a multipart completion. Publishes without an S3
target take no lease: GitOps alone serializes through its non-force push, and
the publish orchestration then lets only the GitOps winner move the OCI tags (a
registry has no compare-and-swap on tags).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from ggufship.integrity import SIDECAR_SUFFIX, sha256_file
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.progress import Reporter
from ggufship.publish._errors import PublishConflictError, PublishError, PublishSettingsError, S3AccessError
from ggufship.publish._s3 import (
    MAX_PARTS,
    SIGNATURE_NAME,
    S3Connection,
    S3Object,
    S3PublishResult,
    S3Target,
    base_key,
    check_bucket_name,
    resolve_connection,
)
from ggufship.retry import poll_results

logger = logging.getLogger(__name__)

LEASE_NAME = ".publish-lease.json"
LEASE_SCHEMA = "ggufship.publish-lease/v1"
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchObject"})
# 409 ConditionalRequestConflict: AWS's answer when two conditional writes of one key overlap.
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})


# ---------------------------------------------------------------- client and errors


def write_client(conn: S3Connection) -> Any:
    """A boto3 S3 client for ``conn``: path-style, bounded retries and timeouts, explicit credentials."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        # a session of its own, not boto3's module default: publishers run in threads
        session = boto3.session.Session()
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise PublishSettingsError(f"S3 client for {conn.url}: {exc}") from exc
    return session.client(
        "s3",
        endpoint_url=conn.url,
        aws_access_key_id=conn.access_key,
        aws_secret_access_key=conn.secret_key.get_secret_value(),
        region_name=conn.region or "us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=10,
            read_timeout=120,
            retries={"total_max_attempts": 4, "mode": "standard"},
            max_pool_connections=max(10, conn.parallel + 2),
            # checksums are the SHA256 ones computed here; no extra CRC32 on every request
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_precondition(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and _code(exc) in _PRECONDITION_CODES


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and _code(exc) in _MISSING_CODES


@contextlib.contextmanager
def write_errors(conn: S3Connection, bucket: str, key: str | None, action: str) -> Iterator[None]:
    """Turn boto3/botocore errors into ggufship errors naming the URL, bucket and key."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        if code in _ACCESS_CODES:
            raise S3AccessError(
                f"{action} {where}: access denied by {conn.url} ({code}: {message}); "
                "check the access key and secret (GGUFSHIP_S3_ACCESS_KEY / GGUFSHIP_S3_SECRET_KEY) "
                "and the bucket policy"
            ) from exc
        if code == "NoSuchBucket":
            raise S3AccessError(
                f"{action} {where}: bucket {bucket!r} does not exist at {conn.url} "
                "(--create-bucket creates it)"
            ) from exc
        raise PublishError(f"{action} {where} at {conn.url} failed: {code}: {message}") from exc
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
        raise S3AccessError(f"{action} {where}: cannot reach S3 endpoint {conn.url}: {exc}") from exc
    except BotoCoreError as exc:
        raise PublishError(f"{action} {where} at {conn.url} failed: {exc}") from exc


def ensure_bucket(client: Any, conn: S3Connection, bucket: str, *, create: bool) -> None:
    from botocore.exceptions import ClientError

    with write_errors(conn, bucket, None, "check bucket"):
        try:
            client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
    if not create:
        raise S3AccessError(
            f"s3://{bucket}: bucket {bucket!r} does not exist at {conn.url}; "
            "create it, or pass --create-bucket"
        )
    with write_errors(conn, bucket, None, "create bucket"):
        if conn.region and conn.region != "us-east-1":
            client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": conn.region})
        else:
            client.create_bucket(Bucket=bucket)
    logger.info("created bucket s3://%s at %s", bucket, conn.url)


def remote_sha256(client: Any, conn: S3Connection, bucket: str, key: str) -> str | None:
    """The ``sha256`` metadata of an object, ``""`` if it has none, ``None`` if there is no object."""
    from botocore.exceptions import ClientError

    with write_errors(conn, bucket, key, "stat"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
    return {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}.get("sha256", "")


def incomplete_uploads(client: Any, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """``(key, upload id)`` of every unfinished multipart upload under ``prefix``."""
    out: list[tuple[str, str]] = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        out.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", []))
    return out


def abort_orphaned_uploads(client: Any, conn: S3Connection, bucket: str, prefix: str) -> int:
    """Abort every unfinished multipart upload under a version prefix whose lease we hold.

    Only a lease holder starts uploads there, and we are the holder: these were
    left by a holder that died or lost its lease (see the module docstring).
    """
    from botocore.exceptions import ClientError

    aborted = 0
    with write_errors(conn, bucket, prefix, "list incomplete uploads under"):
        for key, upload_id in incomplete_uploads(client, bucket, prefix):
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if _code(exc) != "NoSuchUpload":
                    raise
            aborted += 1
    if aborted:
        logger.info(
            "s3://%s/%s: aborted %d incomplete upload(s) left by an earlier run", bucket, prefix, aborted
        )
    return aborted


# ---------------------------------------------------------------- the lease


@dataclass(frozen=True)
class LeasePolicy:
    """How long a lease lives without renewal, and how long to wait for a same-content holder."""

    ttl_s: float = 120.0
    wait_s: float = 600.0

    def __post_init__(self) -> None:
        if not 2.0 <= self.ttl_s <= 3600.0:
            raise PublishSettingsError(f"lease ttl_s {self.ttl_s}: must be between 2 and 3600 seconds")
        if not 0.0 <= self.wait_s <= 86400.0:
            raise PublishSettingsError(f"lease wait_s {self.wait_s}: must be between 0 and 86400 seconds")


def _host_id() -> str:
    """This host and PID namespace: a lease's PID is only meaningful where this matches."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(Path("/proc/self/ns/pid").stat().st_ino))
    return "/".join(parts)


def _holder_dead(record: dict[str, Any]) -> bool:
    """True only when the holder ran on this host and its process is gone."""
    from ggufship.services._process import is_alive

    if record.get("host_id") != _host_id() or not isinstance(record.get("pid"), int):
        return False
    ticks = record.get("pid_start_ticks")
    return not is_alive(record["pid"], ticks if isinstance(ticks, int) else None)


@dataclass(frozen=True)
class _Round:
    """What one round of :meth:`PublishLease.acquire` found (``holder``: the live one waited for)."""

    kind: Literal["acquired", "vanished", "outraced", "waiting"]
    holder: str = ""


class PublishLease:
    """The exclusive right to publish one ``name``/``version`` under one S3 prefix (see the module doc).

    Use as a context manager; :meth:`check` raises if the lease was lost.
    """

    def __init__(
        self,
        client: Any,
        conn: S3Connection,
        bucket: str,
        base: str,
        manifest: Manifest,
        manifest_sha256: str,
        policy: LeasePolicy,
    ) -> None:
        self.client = client
        self.conn = conn
        self.bucket = bucket
        self.key = base + LEASE_NAME
        self.policy = policy
        self.owner = uuid.uuid4().hex
        self._record: dict[str, Any] = {
            "schema": LEASE_SCHEMA,
            "owner": self.owner,
            "name": manifest.name,
            "version": manifest.version,
            "manifest_sha256": manifest_sha256,
            "host": socket.gethostname(),
            "host_id": _host_id(),
            "pid": os.getpid(),
            "pid_start_ticks": _own_start_ticks(),
            "ttl_s": policy.ttl_s,
            "seq": 0,
        }
        self._etag: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewed = 0.0
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _body(self) -> bytes:
        return json.dumps(self._record, sort_keys=True).encode()

    # -- acquire

    def __enter__(self) -> PublishLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.policy.wait_s
        races = 0  # rounds that lost a race: no lease after a refused create, or a lost take-over
        waits = 0  # rounds that found a live publisher of the same export
        waited_for: str | None = None

        def one_round() -> _Round:
            nonlocal races, waits, waited_for
            if self._try_put(if_match=None):
                self._check_conditional_writes()
                return _Round("acquired")
            current = self._read()
            if current is None:  # released between our attempt and the read: try again soon
                races += 1
                return _Round("vanished")
            record, etag, age_s = current
            holder = f"{record.get('owner', '?')} on {record.get('host', '?')} pid {record.get('pid', '?')}"
            if record.get("manifest_sha256") != self._record["manifest_sha256"] and not self._stale(
                record, age_s
            ):
                raise PublishConflictError(
                    f"{self.where}: {self._record['name']} {self._record['version']} is being published "
                    f"right now with other content (manifest sha256 {record.get('manifest_sha256')}, this "
                    f"export's {self._record['manifest_sha256']}) by {holder}; publish a new version "
                    f"(if that publisher died, its lease expires {record.get('ttl_s', '?')} s after its "
                    "last renewal, then a publish takes it over)"
                )
            if self._stale(record, age_s):
                logger.warning(
                    "%s: taking over the lease of %s (renewed %.0f s ago, ttl %s s, or its process is gone)",
                    self.where,
                    holder,
                    age_s,
                    record.get("ttl_s"),
                )
                if self._try_put(if_match=etag):
                    return _Round("acquired")
                races += 1
                return _Round("outraced")  # another publisher took it over first
            if waited_for != record.get("owner"):
                waited_for = record.get("owner")
                logger.info("%s: %s publishes the same export; waiting for it", self.where, holder)
            waits += 1
            return _Round("waiting", holder)

        def give_up(last: _Round) -> bool:
            if last.kind == "outraced":
                return races > 50
            if last.kind == "vanished":
                return races > 50 or time.monotonic() >= deadline
            return time.monotonic() >= deadline

        def wait_s(last: _Round) -> float:
            if last.kind == "outraced":
                return 0.0
            if last.kind == "vanished":
                return 0.05 * random.uniform(0.5, 1.0)
            delay = min(2.0, 0.1 * 2 ** min(waits - 1, 5))  # 0.1 s, doubling up to 2 s
            return min(delay, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0)

        last = poll_results(one_round, done=lambda r: r.kind == "acquired", give_up=give_up, wait_s=wait_s)
        if last.kind == "vanished":
            raise PublishError(
                f"{self.where}: could not take the publish lease: the store refuses the "
                "conditional create but shows no lease"
            )
        if last.kind == "outraced":
            raise PublishError(f"{self.where}: could not take over the publish lease after 50 tries")
        if last.kind == "waiting":
            raise PublishConflictError(
                f"{self.where}: {self._record['name']} {self._record['version']} is still being "
                f"published (same content) by {last.holder} after {self.policy.wait_s:.0f} s; try again later"
            )
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._keep_alive, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        logger.info("%s: lease acquired (owner %s)", self.where, self.owner)

    def _check_conditional_writes(self) -> None:
        """A second ``If-None-Match: *`` create of the lease we now hold must be refused.

        A store that ignores the header would let every publisher "win": fail loudly
        instead of publishing without protection.
        """
        if self._try_put(if_match=None):
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            raise PublishSettingsError(
                f"{self.where}: the S3 store at {self.conn.url} ignores If-None-Match (conditional "
                "writes); publishing needs them to let exactly one of two concurrent publishers win"
            )

    def _stale(self, record: dict[str, Any], age_s: float) -> bool:
        ttl = record.get("ttl_s")
        ttl_s = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else self.policy.ttl_s
        return age_s > ttl_s or _holder_dead(record)

    def _try_put(self, *, if_match: str | None) -> bool:
        """Create (``If-None-Match: *``) or take over (``If-Match``) the lease; False if someone else won."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        with write_errors(self.conn, self.bucket, self.key, "take the publish lease"):
            try:
                answer = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.key,
                    Body=self._body(),
                    ContentType="application/json",
                    **condition,
                )
            except ClientError as exc:
                if _is_precondition(exc) or (if_match and _is_missing(exc)):
                    return False
                raise
        self._etag = answer["ETag"]
        return True

    def _read(self) -> tuple[dict[str, Any], str, float] | None:
        """The current lease, its ETag and its age by the server's clock; None if there is none."""
        from botocore.exceptions import ClientError

        with write_errors(self.conn, self.bucket, self.key, "read the publish lease"):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
            body = answer["Body"].read()
        try:
            record = json.loads(body)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            record = {}  # unreadable: treated as other content, stale only by age
        server_now = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        modified = answer.get("LastModified")
        age_s = 0.0
        with contextlib.suppress(TypeError, ValueError):
            if server_now and modified is not None:
                age_s = (parsedate_to_datetime(server_now) - modified).total_seconds()
        return record, answer["ETag"], age_s

    # -- hold

    def _keep_alive(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        interval = self.policy.ttl_s / 4
        while not self._stop.wait(interval):
            with self._lock:
                self._record["seq"] += 1
                try:
                    answer = self.client.put_object(
                        Bucket=self.bucket,
                        Key=self.key,
                        Body=self._body(),
                        ContentType="application/json",
                        IfMatch=self._etag,
                    )
                except ClientError as exc:
                    if _is_precondition(exc) or _is_missing(exc):
                        self._lost = "another publisher took it over (it thought this one gone)"
                        logger.error("%s: lease lost: %s", self.where, self._lost)
                        return
                    logger.warning("%s: lease renewal failed (%s); retrying", self.where, _code(exc))
                    continue
                except BotoCoreError as exc:
                    logger.warning("%s: lease renewal failed (%s); retrying", self.where, exc)
                    continue
                self._etag = answer["ETag"]
                self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise if this publisher no longer holds the lease (call before each write)."""
        if self._lost is not None:
            raise PublishConflictError(
                f"{self.where}: publish lease lost: {self._lost}; nothing more written"
            )
        if time.monotonic() - self._renewed > self.policy.ttl_s:
            raise PublishError(
                f"{self.where}: publish lease not renewed for {self.policy.ttl_s:.0f} s "
                f"(S3 at {self.conn.url} unreachable?); stopping before another publisher takes over"
            )

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._etag is None or self._lost is not None:
            return
        with self._lock:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except ClientError as exc:
                if _is_precondition(exc):
                    logger.warning(
                        "%s: lease was taken over before release; left to its new holder", self.where
                    )
                elif not _is_missing(exc):
                    logger.warning("%s: could not release the lease (%s); it expires", self.where, _code(exc))
            except BotoCoreError as exc:
                logger.warning("%s: could not release the lease (%s); it expires", self.where, exc)
            self._etag = None


def _own_start_ticks() -> int | None:
    from ggufship.services._process import process_start_ticks

    return process_start_ticks(os.getpid())


def s3_lease(
    target: S3Target, manifest: Manifest, manifest_sha256: str, policy: LeasePolicy | None = None
) -> PublishLease:
    """The (not yet acquired) lease of ``manifest``'s version at ``target``; the bucket is checked first."""
    conn = resolve_connection(target)
    check_bucket_name(target.bucket, f"s3://{target.bucket}")
    client = write_client(conn)
    ensure_bucket(client, conn, target.bucket, create=target.create_bucket)
    base = base_key(target.prefix, manifest.name, manifest.version)
    return PublishLease(client, conn, target.bucket, base, manifest, manifest_sha256, policy or LeasePolicy())


# ---------------------------------------------------------------- publish


@dataclass(frozen=True)
class _LocalFile:
    name: str
    path: Path
    sha256: str
    size: int


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
            files.append(_LocalFile(entry.path + SIDECAR_SUFFIX, sidecar, digest, size))
    signature = export_dir / SIGNATURE_NAME
    if signature.is_file():
        digest, size = sha256_file(signature)
        files.append(_LocalFile(SIGNATURE_NAME, signature, digest, size))
    digest, size = sha256_file(export_dir / MANIFEST_NAME)
    return files, _LocalFile(MANIFEST_NAME, export_dir / MANIFEST_NAME, digest, size)


def publish_s3(
    export_dir: Path,
    manifest: Manifest,
    target: S3Target,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
    lease: PublishLease | None = None,
) -> S3PublishResult:
    """Upload a verified export; idempotent (same digests: skipped), immutable (other digests: refused).

    ``export_dir`` must already have been verified against ``manifest``. ``lease``:
    the held :class:`PublishLease` of this version (taken here when not given).
    """
    if lease is None:
        manifest_sha256, _ = sha256_file(export_dir / MANIFEST_NAME)
        with s3_lease(target, manifest, manifest_sha256) as held:
            return publish_s3(export_dir, manifest, target, force=force, reporter=reporter, lease=held)
    reporter = reporter or Reporter(enabled=False)
    client, conn, bucket = lease.client, lease.conn, lease.bucket
    base = base_key(target.prefix, manifest.name, manifest.version)
    files, manifest_file = _local_files(export_dir, manifest)

    lease.check()
    remote_manifest = remote_sha256(client, conn, bucket, base + MANIFEST_NAME)
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
        _delete(client, conn, bucket, base + MANIFEST_NAME)
    if remote_manifest != manifest_file.sha256:
        abort_orphaned_uploads(client, conn, bucket, base)

    meta = {"name": manifest.name, "version": manifest.version}
    objects: list[S3Object] = []
    for local in [*files, manifest_file]:
        key = base + local.name
        lease.check()
        remote = remote_sha256(client, conn, bucket, key)
        if remote == local.sha256:
            logger.info("s3://%s/%s: already there with sha256 %s, skipped", bucket, key, local.sha256[:12])
            objects.append(S3Object(key, local.sha256, local.size, skipped=True))
            continue
        if remote is not None:
            logger.info("s3://%s/%s: replacing an object no manifest refers to", bucket, key)
            _delete(client, conn, bucket, key)
        upload_file(client, conn, bucket, key, local.path, local.sha256, local.size, dict(meta), reporter)
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


def _delete(client: Any, conn: S3Connection, bucket: str, key: str) -> None:
    with write_errors(conn, bucket, key, "delete"):
        client.delete_object(Bucket=bucket, Key=key)


def _created_meanwhile(conn: S3Connection, bucket: str, key: str) -> PublishConflictError:
    return PublishConflictError(
        f"s3://{bucket}/{key} at {conn.url}: written by another publisher while this one held the "
        "publish lease (this one was taken for gone?); nothing overwritten"
    )


def upload_file(
    client: Any,
    conn: S3Connection,
    bucket: str,
    key: str,
    path: Path,
    sha256: str,
    size: int,
    metadata: dict[str, str],
    reporter: Reporter,
) -> None:
    """One object, created only if absent: a single checksummed PUT up to the part size, else multipart."""
    from botocore.exceptions import ClientError

    args = {
        "Bucket": bucket,
        "Key": key,
        "Metadata": {**metadata, "sha256": sha256},
        "ContentType": "application/json" if path.suffix == ".json" else "application/octet-stream",
    }
    part_size = max(conn.part_size, -(-size // MAX_PARTS))
    with reporter.task(f"upload s3://{bucket}/{key}", total=size) as task:
        if size <= part_size:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise PublishError(f"{path}: changed while publishing (sha256 {digest} != {sha256})")
            with write_errors(conn, bucket, key, "upload"):
                try:
                    client.put_object(**args, Body=data, ChecksumSHA256=_b64(sha256), IfNoneMatch="*")
                except ClientError as exc:
                    if _is_precondition(exc):
                        raise _created_meanwhile(conn, bucket, key) from exc
                    raise
            task.advance(size)
        else:
            _multipart(client, conn, args, path, sha256, size, part_size, task)


def _multipart(
    client: Any,
    conn: S3Connection,
    args: dict[str, Any],
    path: Path,
    sha256: str,
    size: int,
    part_size: int,
    task: Any,
) -> None:
    from botocore.exceptions import ClientError

    bucket, key = args["Bucket"], args["Key"]
    count = -(-size // part_size)
    with write_errors(conn, bucket, key, "start multipart upload of"):
        upload_id = client.create_multipart_upload(**args, ChecksumAlgorithm="SHA256")["UploadId"]
    logger.debug(
        "s3://%s/%s: multipart upload %s, %d parts of %d bytes", bucket, key, upload_id, count, part_size
    )
    # The parts are read here, in order, so the whole-file SHA256 is computed over exactly the
    # bytes sent (no second pass over the file); workers hash each part for its checksum and
    # send it. At most ``parallel`` parts are in memory at once.
    whole = hashlib.sha256()
    parts: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()

    def send(number: int, data: bytes) -> tuple[int, int]:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        answer = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ChecksumSHA256=checksum
        )
        with lock:
            parts[number] = {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}
        return number, len(data)

    try:
        with (
            path.open("rb") as fh,
            write_errors(conn, bucket, key, "upload part of"),
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
        with write_errors(conn, bucket, key, "complete multipart upload of"):
            try:
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": [parts[n] for n in range(1, count + 1)]},
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                if _is_precondition(exc):
                    raise _created_meanwhile(conn, bucket, key) from exc
                raise
    except BaseException:
        with contextlib.suppress(Exception):  # our own upload: abort it, leave no parts behind
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
