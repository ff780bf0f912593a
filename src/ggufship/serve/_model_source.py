"""MODEL → one verified local ``.gguf``: fetch (s3://, oci://), pick the quantization,
check the SHA256 (and the signature when a policy is configured) before anything loads."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ggufship.errors import GgufshipError, IntegrityError, UnsafePathError
from ggufship.integrity import SIDECAR_SUFFIX, VerifiedExport, parse_sidecar, sha256_file
from ggufship.layout import confined_join
from ggufship.manifest import MANIFEST_NAME, Manifest, ManifestFile
from ggufship.serve.errors import ModelSourceError, ModelVerificationError, ServeConfigError

if TYPE_CHECKING:
    from ggufship.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"
REMOTE_SCHEMES = ("s3://", "oci://")
_QUANT_IN_NAME = re.compile(r"-([A-Za-z0-9_]+)\.gguf$")


@dataclass(frozen=True)
class ModelSource:
    """The verified file to load, and what is known about it before loading."""

    path: Path
    sha256: str
    name: str | None
    version: str | None
    quantization: str | None
    export_dir: Path | None
    checks: tuple[str, ...]  # what was verified, for the log and /v1/models


def resolve_model(settings: ServeSettings) -> ModelSource:
    """Fetch and verify ``settings.model``; raise before anything is loaded on a mismatch.

    A remote model is pulled and verified once (digests while streaming, the signature
    against them): the :class:`~ggufship.integrity.VerifiedExport` the pull returns is
    used as is, nothing is hashed again. A local export directory is verified in one
    pass (``ggufship.sign.verify_export_once``). A partial export (pulled with
    ``--quant``) is accepted for the served quantization only.
    """
    spec = settings.model.strip()
    if not spec:
        raise ModelSourceError("MODEL is required: a .gguf, an export directory, s3://… or oci://…")
    policy = _policy(settings)
    if spec.startswith(REMOTE_SCHEMES):
        verified = _pull(spec, settings, policy)
        checks = ["signature (at pull)"] if policy is not None else []
        entry = _pick(verified.manifest, verified.export_dir, settings.quant, verified)
        return _from_verified(verified, entry, settings, checks, at="at pull")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_export(path, settings, policy=policy)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"MODEL {path}: not a .gguf file or an export directory")
        return _from_file(path, settings, policy=policy, checks=[])
    raise ModelSourceError(f"MODEL {path}: no such file or directory")


def _policy(settings: ServeSettings) -> Any:
    if not settings.signature_policy_configured():
        return None
    try:
        from ggufship.sign import VerificationPolicy
    except ImportError as exc:
        raise ServeConfigError(
            f"a signature policy is configured but ggufship.sign is not available: {exc}"
        ) from exc
    from pydantic import ValidationError

    try:
        return VerificationPolicy(
            public_key=settings.public_key,
            certificate_chain=tuple(settings.certificate_chain),
            identity=settings.identity,
            identity_provider=settings.identity_provider,
            trust_config=settings.trust_config,
        )
    except ValidationError as exc:
        raise ServeConfigError(f"signature verification options: {exc}") from exc


def _is_verification_failure(exc: BaseException) -> bool:
    return isinstance(exc, IntegrityError) or type(exc).__module__.startswith("ggufship.sign")


def _pull(uri: str, settings: ServeSettings, policy: Any) -> VerifiedExport:
    try:
        from ggufship.publish import pull_verified
    except ImportError as exc:
        raise ModelSourceError(f"MODEL {uri}: pulling needs ggufship.publish, not available: {exc}") from exc
    dest = settings.cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    logger.info("pulling %s into %s", uri, dest)
    try:
        return pull_verified(uri, dest, policy=policy, quant=settings.quant)
    except GgufshipError as exc:
        if _is_verification_failure(exc):
            raise ModelVerificationError(f"MODEL {uri}: verification failed at pull: {exc}") from exc
        raise ModelSourceError(f"MODEL {uri}: cannot pull: {exc}") from exc


def _verify_dir(export_dir: Path, policy: Any, quant: str | None) -> VerifiedExport:
    """One hashing pass over the export, the signature (with a policy) checked against it."""
    from ggufship.sign import verify_export_once

    try:
        return verify_export_once(export_dir, policy, quant=quant)
    except UnsafePathError as exc:
        raise ModelVerificationError(f"MODEL {export_dir}: {exc}; refusing to serve it") from exc
    except GgufshipError as exc:
        what = "signature verification" if policy is not None else "verification"
        raise ModelVerificationError(f"MODEL {export_dir}: {what} failed: {exc}") from exc


def _pick(
    manifest: Manifest, export_dir: Path, quant: str | None, verified: VerifiedExport | None = None
) -> ManifestFile:
    """The served GGUF: ``quant``, else Q4_K_M, else the first one the directory holds."""
    ggufs = manifest.gguf_files()
    if not ggufs:
        raise ModelSourceError(f"MODEL {export_dir}: {MANIFEST_NAME} lists no .gguf file")
    available = ", ".join(f.quantization or f.path for f in ggufs)
    wanted = quant or DEFAULT_QUANT
    for entry in ggufs:
        if (entry.quantization or "").upper() == wanted.upper():
            return entry
    if quant is not None:
        raise ModelSourceError(f"MODEL {export_dir}: no quantization {quant!r} (available: {available})")
    if verified is not None:  # a partial export: the GGUF it holds
        return next((f for f in ggufs if verified.serves(f.path)), ggufs[0])
    return next((f for f in ggufs if (export_dir / f.path).is_file()), ggufs[0])


def _from_export(export_dir: Path, settings: ServeSettings, *, policy: Any) -> ModelSource:
    try:
        manifest = Manifest.load(export_dir / MANIFEST_NAME)
    except GgufshipError as exc:
        raise ModelSourceError(f"MODEL {export_dir}: not an export directory: {exc}") from exc
    entry = _pick(manifest, export_dir, settings.quant)
    # only the served quantization's GGUF must be here (a pull with --quant leaves the others out)
    verified = _verify_dir(export_dir, policy, entry.quantization)
    checks = ["signature"] if policy is not None else []
    return _from_verified(verified, entry, settings, checks, at=f"{MANIFEST_NAME} of {export_dir}")


def _from_verified(
    verified: VerifiedExport, entry: ManifestFile, settings: ServeSettings, checks: list[str], *, at: str
) -> ModelSource:
    """The served file of a verified export; its digest is the one computed at verification."""
    export_dir = verified.export_dir
    try:
        path = confined_join(export_dir, entry.path, what=f"MODEL {export_dir}: {MANIFEST_NAME} entry")
    except UnsafePathError as exc:
        raise ModelVerificationError(f"{exc}; refusing to serve it") from exc
    if not verified.serves(entry.path) or not path.is_file():
        raise ModelVerificationError(f"MODEL {path}: listed in {MANIFEST_NAME} but missing")
    digest = verified.sha256_of(entry.path)
    checks.append(f"sha256 ({at})")
    if entry.path + SIDECAR_SUFFIX in verified.digests:
        checks.append(f"sha256 ({Path(entry.path).name}{SIDECAR_SUFFIX})")
    if settings.expect_sha256:
        want = settings.expect_sha256.lower()
        if digest != want:
            raise ModelVerificationError(
                f"MODEL {path}: sha256 {digest} does not match --expect-sha256 ({want}); refusing to serve it"
            )
        checks.append("sha256 (--expect-sha256)")
    return ModelSource(
        path=path,
        sha256=digest,
        name=verified.manifest.name,
        version=verified.manifest.version,
        quantization=entry.quantization,
        export_dir=export_dir,
        checks=tuple(checks),
    )


def _from_file(path: Path, settings: ServeSettings, *, policy: Any, checks: list[str]) -> ModelSource:
    parent = path.parent
    manifest: Manifest | None = None
    if (parent / MANIFEST_NAME).is_file():
        try:
            manifest = Manifest.load(parent / MANIFEST_NAME)
        except GgufshipError:
            manifest = None
    entry = next((f for f in manifest.files if f.path == path.name), None) if manifest else None
    if policy is not None:
        if entry is None:
            raise ModelVerificationError(
                f"MODEL {path}: a signature policy is configured, but the file is not part of a signed "
                f"export (no {MANIFEST_NAME} beside it listing it)"
            )
        verified = _verify_dir(parent, policy, entry.quantization)
        return _from_verified(verified, entry, settings, ["signature"], at=f"{MANIFEST_NAME} of {parent}")
    digest = _check_digest(
        path, entry.sha256 if entry else None, f"{MANIFEST_NAME} of {parent}", settings, checks
    )
    match = _QUANT_IN_NAME.search(path.name)
    return ModelSource(
        path=path,
        sha256=digest,
        name=manifest.name if manifest and entry else None,
        version=manifest.version if manifest and entry else None,
        quantization=(entry.quantization if entry else None) or (match.group(1) if match else None),
        export_dir=parent if entry else None,
        checks=tuple(checks),
    )


def _check_digest(
    path: Path, manifest_digest: str | None, manifest_label: str, settings: ServeSettings, checks: list[str]
) -> str:
    """Hash ``path`` once; compare with every expectation there is. No expectation at all: warn."""
    expected: list[tuple[str, str]] = []
    if settings.expect_sha256:
        expected.append(("--expect-sha256", settings.expect_sha256.lower()))
    if manifest_digest:
        expected.append((manifest_label, manifest_digest))
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if sidecar.is_file():
        try:
            side_digest, side_name = parse_sidecar(sidecar)
        except IntegrityError as exc:
            raise ModelVerificationError(f"MODEL {path}: {exc}") from exc
        if side_name != path.name:
            raise ModelVerificationError(
                f"MODEL {path}: {sidecar.name} names {side_name!r}, not {path.name!r}"
            )
        expected.append((sidecar.name, side_digest))
    logger.info("hashing %s", path)
    digest, _ = sha256_file(path)
    for label, want in expected:
        if digest != want:
            raise ModelVerificationError(
                f"MODEL {path}: sha256 {digest} does not match {label} ({want}); refusing to serve it"
            )
        checks.append(f"sha256 ({label})")
    if not expected:
        logger.warning(
            "MODEL %s: no expected digest (no --expect-sha256, sidecar or manifest); sha256 %s", path, digest
        )
    return digest
