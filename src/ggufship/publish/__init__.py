"""Publish a verified export to S3, an OCI registry and a GitOps repository; pull it back, verified.

Public front::

    from ggufship.publish import publish, PublishRequest, PublishResult, pull, S3Target, GitOpsTarget

    result = publish(export_dir, PublishRequest(s3=S3Target.from_uri("s3://models"),
                                                gitops=GitOpsTarget(url="file:///srv/gitops.git")))
    local = pull(result.s3.uri, Path("cache/tiny-1.0.0"))

Engines (private): ``_s3`` (settings, verified downloads through the minio SDK),
``_s3_write`` (checksummed, conditional uploads through boto3, and the publish
lease), ``_oci`` (ORAS push/pull, another module's work) and ``_gitops`` (one
commit per release, push with fetch/rebase retries). Targets run in the order
S3 → OCI → GitOps, so the GitOps record can name the S3 URIs and the OCI digest.
Every target is idempotent (same digests: skipped, and said so) and immutable
(same version with other digests: :class:`PublishConflictError` unless ``force``).

Concurrent publishes of one name/version: with an S3 target, the whole publish
(S3, OCI, GitOps) runs under that version's S3 lease (``_s3_write.PublishLease``,
an atomic ``If-None-Match: *`` create), so exactly one publisher writes; another
with other content gets :class:`PublishConflictError` before writing anything, and
the three stores name one digest. Without an S3 target there is no lease: GitOps
still has one winner (non-force push, conflict on rebase), so with GitOps the OCI
artifact goes up by digest first and only the GitOps winner moves the tags after
its commit. OCI alone has no linearization point (a registry has no
compare-and-swap on tags): concurrent OCI-only publishes are last-writer-wins.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ggufship.atomic import atomic_directory
from ggufship.errors import IntegrityError
from ggufship.integrity import FetchedFiles, VerifiedExport, sha256_file
from ggufship.layout import export_files
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.progress import Reporter
from ggufship.publish._errors import (
    GitOpsError,
    PublishConflictError,
    PublishError,
    PublishSettingsError,
    PullError,
    S3AccessError,
)
from ggufship.publish._gitops import GitOpsResult, GitOpsTarget, ReleaseLocations, publish_gitops
from ggufship.publish._s3 import (
    SIGNATURE_NAME,
    S3Object,
    S3PublishResult,
    S3Settings,
    S3Target,
    parse_s3_uri,
    pull_s3,
)
from ggufship.publish._s3_write import LeasePolicy, PublishLease, publish_s3, s3_lease
from ggufship.sign import check_signed_files

if TYPE_CHECKING:
    from ggufship.sign import VerificationPolicy

__all__ = [
    "SIGNATURE_NAME",
    "GitOpsError",
    "GitOpsResult",
    "GitOpsTarget",
    "LeasePolicy",
    "PublishConflictError",
    "PublishError",
    "PublishRequest",
    "PublishResult",
    "PublishSettingsError",
    "PullError",
    "S3AccessError",
    "S3Object",
    "S3PublishResult",
    "S3Settings",
    "S3Target",
    "VerifiedExport",
    "publish",
    "pull",
    "pull_verified",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishRequest:
    """Where to publish; each target is optional, at least one is needed.

    ``oci`` is an ``ggufship.publish._oci.OciTarget``. ``force`` replaces a
    published version whose digests differ (otherwise refused). ``lease``: the
    per-version S3 lease's TTL and how long to wait for a concurrent publisher of
    the same content (see :class:`LeasePolicy`).
    """

    s3: S3Target | None = None
    oci: Any | None = None
    gitops: GitOpsTarget | None = None
    force: bool = False
    lease: LeasePolicy = field(default_factory=LeasePolicy)


@dataclass(frozen=True)
class PublishResult:
    """What each target did."""

    name: str
    version: str
    export_dir: Path
    manifest_sha256: str
    s3: S3PublishResult | None = None
    oci: Any | None = None
    gitops: GitOpsResult | None = None

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if is_dataclass(value) and not isinstance(value, type):
                return {k: plain(v) for k, v in asdict(value).items()}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            if isinstance(value, Path):
                return str(value)
            if value is None or isinstance(value, str | int | float | bool):
                return value
            return str(value)

        out = plain(self)
        if self.s3 is not None:
            out["s3"]["uri"] = self.s3.uri
            out["s3"]["skipped"] = self.s3.skipped
        return out


def _signature_ref(export_dir: Path) -> dict[str, Any] | None:
    path = export_dir / SIGNATURE_NAME
    if not path.is_file():
        return None
    digest, size = sha256_file(path)
    return {"file": SIGNATURE_NAME, "sha256": digest, "size": size}


def publish(export_dir: Path, request: PublishRequest, *, reporter: Reporter | None = None) -> PublishResult:
    """Verify ``export_dir`` against its manifest, then publish it: S3, then OCI, then GitOps."""
    export_dir = Path(export_dir)
    if request.s3 is None and request.oci is None and request.gitops is None:
        raise PublishSettingsError("nothing to publish to: give an S3, OCI and/or GitOps target")
    if not export_dir.is_dir():
        raise PublishError(f"{export_dir}: not an export directory")
    from ggufship.sign import verify_export_once

    # one hashing pass; raises IntegrityError naming every mismatch: never publish bad bytes
    verified = verify_export_once(export_dir, None, warn_unchecked=False)
    manifest = verified.manifest
    # a signature over other files than the published ones could never verify: refuse it
    check_signed_files(export_dir, export_files(export_dir, manifest))
    manifest_sha256 = verified.manifest_sha256
    reporter = reporter or Reporter(enabled=False)
    s3_result = oci_result = gitops_result = None
    with _version_lease(request, manifest, manifest_sha256) as lease:
        # No S3 lease: GitOps' non-force push picks the one winner, and only the winner
        # moves the OCI tags (after its commit; the record pins the artifact by digest).
        deferred_tags = lease is None and request.gitops is not None
        with reporter.session():
            if request.s3 is not None and lease is not None:
                s3_result = publish_s3(
                    export_dir, manifest, request.s3, force=request.force, reporter=reporter, lease=lease
                )
            if request.oci is not None:
                from ggufship.publish._oci import push_export

                if lease is not None:
                    lease.check()
                oci_result = push_export(
                    export_dir,
                    request.oci,
                    force=request.force,
                    apply_tags=not deferred_tags,
                    verified=verified,
                )
                logger.info(
                    "oci: %s (%s)",
                    getattr(oci_result, "reference", "?"),
                    "already there, skipped" if getattr(oci_result, "skipped", False) else "pushed",
                )
        if request.gitops is not None:
            if lease is not None:
                lease.check()
            target = replace(request.gitops, force=request.gitops.force or request.force)
            gitops_result = publish_gitops(
                manifest,
                manifest_sha256,
                target,
                ReleaseLocations(s3=s3_result, oci=oci_result),
                _signature_ref(export_dir),
            )
        if deferred_tags and oci_result is not None:
            from ggufship.publish._oci import tag_release

            tag_release(request.oci, oci_result, force=request.force)
    return PublishResult(
        name=manifest.name,
        version=manifest.version,
        export_dir=export_dir,
        manifest_sha256=manifest_sha256,
        s3=s3_result,
        oci=oci_result,
        gitops=gitops_result,
    )


@contextlib.contextmanager
def _version_lease(
    request: PublishRequest, manifest: Manifest, manifest_sha256: str
) -> Iterator[PublishLease | None]:
    """The S3 publish lease of this version, held across all targets; None without an S3 target.

    Why across all targets: S3, OCI and GitOps have no transaction in common. The
    lease (one atomic create in S3) makes this publisher the only writer of the
    version until it is done, so the OCI tags and the GitOps record it writes name
    the digests it wrote to S3, and a concurrent publisher of other content stops
    with :class:`PublishConflictError` before its first write.
    """
    if request.s3 is None:
        yield None
        return
    with s3_lease(request.s3, manifest, manifest_sha256, request.lease) as lease:
        yield lease


# ---------------------------------------------------------------- pull


def pull(uri: str, dest: Path, **options: Any) -> Path:
    """Fetch a published export into ``dest``, verify it, and return ``dest``.

    :func:`pull_verified` (same keyword options: ``policy``, ``s3``, ``oci_auth``,
    ``force``, ``reporter``, ``quant``), returning only the path.
    """
    return pull_verified(uri, dest, **options).export_dir


def pull_verified(
    uri: str,
    dest: Path,
    *,
    policy: VerificationPolicy | None = None,
    s3: S3Target | None = None,
    oci_auth: Any | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    quant: str | None = None,
) -> VerifiedExport:
    """Fetch a published export into ``dest``, verify it, and return the verified export.

    ``uri``: ``s3://bucket/[prefix/]models/<name>/<version>/`` or
    ``oci://host:port/repo:tag`` (or ``@sha256:…``). Every file is hashed once, while it
    streams in, and checked against ``manifest.json`` (SHA256 and size); with a
    ``policy`` the signature is checked once too, against those digests
    (``ggufship.sign.verify_export_once``): no file is read again. The returned
    :class:`~ggufship.integrity.VerifiedExport` carries the digests to ``serve``.
    ``quant``: only that quantization's GGUF is fetched (plus ``manifest.json``,
    ``model.sig`` and every non-GGUF file); the signature is still checked exactly (see
    ``verify_export_once``). Files are fetched into a staging directory beside ``dest``
    and renamed into place only when all checks pass (:mod:`ggufship.atomic`): a failed
    pull leaves nothing behind. A ``dest`` that already holds the same verified export
    (S3: byte-identical manifest) is returned as is (hashed once to verify it); with
    OCI, where a tag can only be compared after fetching it, the same export is fetched
    again, verified and swapped in. Any other non-empty ``dest`` is refused unless ``force``.
    ``s3`` carries the connection (endpoint, credentials); its bucket and prefix
    are taken from ``uri``. ``oci_auth`` is an ``OciTarget`` with the registry login.
    """
    dest = Path(dest)
    if uri.startswith("s3://"):
        kind = "s3"
        bucket, prefix = parse_s3_uri(uri)
    elif uri.startswith("oci://"):
        kind = "oci"
    else:
        raise PublishSettingsError(f"{uri!r}: pull takes s3://bucket/prefix/ or oci://host/repo:tag")
    if dest.exists() and not dest.is_dir():
        raise PullError(f"{dest}: exists and is not a directory")
    occupied = dest.is_dir() and any(dest.iterdir())
    if occupied and kind == "s3" and not force:
        same = _same_export(uri, dest, bucket, prefix, s3, policy, quant)
        if same is not None:
            logger.info("%s: already holds %s, verified; nothing fetched", dest, uri)
            return same
    local_manifest = dest / MANIFEST_NAME
    if occupied and not force and not (kind == "oci" and local_manifest.is_file()):
        raise PullError(f"{dest}: not empty; pull into a new directory, or replace it with --force")
    with atomic_directory(dest, "pull") as staging:
        if kind == "s3":
            target = s3 or S3Target(bucket=bucket)
            fetched = pull_s3(bucket, prefix, staging, target, reporter, quant=quant)
        else:
            from ggufship.publish._oci import fetch_export

            fetched = fetch_export(uri, staging, oci_auth, quant=quant)
        verified = _verify(staging, fetched, uri, policy)
        if occupied and not force and (staging / MANIFEST_NAME).read_bytes() != local_manifest.read_bytes():
            # OCI: a tag can only be compared after fetching it; the same export is refreshed
            # in place (the fresh copy is verified), a different one is refused.
            raise PullError(
                f"{dest}: holds another export than {uri} (manifests differ); "
                "pull into a new directory, or replace it with --force"
            )
    logger.info("pulled %s into %s (verified%s)", uri, dest, f", {quant} only" if quant else "")
    signature = verified.signature
    if signature is not None:
        signature = replace(signature, signature=dest / SIGNATURE_NAME)
    return replace(verified, export_dir=dest, signature=signature)


def _verify(
    export_dir: Path,
    fetched: FetchedFiles | None,
    uri: str,
    policy: VerificationPolicy | None,
    quant: str | None = None,
) -> VerifiedExport:
    from ggufship.sign import verify_export_once

    try:
        return verify_export_once(export_dir, policy, fetched=fetched, quant=quant)
    except IntegrityError as exc:
        raise PullError(f"{uri}: fetched files do not match their manifest: {exc}") from exc


def _same_export(
    uri: str,
    dest: Path,
    bucket: str,
    prefix: str,
    s3: S3Target | None,
    policy: VerificationPolicy | None,
    quant: str | None,
) -> VerifiedExport | None:
    """``dest`` verified, if it holds exactly the export at ``uri`` (same manifest bytes); else None."""
    from ggufship.publish._s3 import client_for, object_metadata, resolve_connection

    local = dest / MANIFEST_NAME
    if not local.is_file():
        return None
    conn = resolve_connection(replace(s3 or S3Target(bucket=bucket), bucket=bucket, prefix=prefix))
    client = client_for(conn)
    key = (f"{prefix}/" if prefix else "") + MANIFEST_NAME
    remote = None
    with contextlib.suppress(Exception):  # unreachable or missing: the real pull reports it
        remote = object_metadata(client.stat_object(bucket, key).metadata).get("sha256")
    if not remote or remote != sha256_file(local)[0]:
        return None
    try:
        return _verify(dest, None, uri, policy, quant)
    except (PullError, IntegrityError) as exc:
        logger.warning("%s: holds %s but does not verify (%s); not reusing it", dest, uri, exc)
        return None
