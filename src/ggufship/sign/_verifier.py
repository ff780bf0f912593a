"""Verifying a signed export: the signature first, then every digest of ``manifest.json``."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ggufship.errors import ManifestError, UnlistedFileError
from ggufship.integrity import sha256_file, verify_export
from ggufship.manifest import MANIFEST_NAME
from ggufship.sign._errors import SignatureMismatchError, SignError, TamperedError, UnsignedExportError
from ggufship.sign._keys import (
    check_trust_config,
    load_certificates,
    load_public_key,
    public_key_fingerprint,
)
from ggufship.sign._settings import (
    SIGNATURE_NAME,
    SignatureReport,
    SignedExportReport,
    VerificationPolicy,
)

logger = logging.getLogger(__name__)

# model_signing 1.1.1 reports "signature valid, but the files differ" as a ValueError with
# this prefix (verifying.Config.verify); every other failure is about the signature itself.
_CONTENT_MISMATCH_PREFIX = "Signature mismatch:"
_GIT_NAMES = frozenset({".git", ".gitattributes", ".github", ".gitignore"})


def _verifying_config(policy: VerificationPolicy) -> tuple[object, str]:
    """Check the policy's files, build model_signing's verifying config; also return the signer
    description for the report."""
    from model_signing import verifying

    config = verifying.Config()
    if policy.public_key is not None:
        key = load_public_key(policy.public_key)
        return config.use_elliptic_key_verifier(public_key=policy.public_key), public_key_fingerprint(key)
    if policy.certificate_chain:
        certs = load_certificates(list(policy.certificate_chain), "certificate chain")
        subjects = ", ".join(c.subject.rfc4514_string() for c in certs)
        return config.use_certificate_verifier(certificate_chain=list(policy.certificate_chain)), (
            f"certificate chaining to {subjects}"
        )
    if policy.trust_config is not None:
        check_trust_config(policy.trust_config)
    identity, issuer = policy.identity or "", policy.identity_provider or ""
    try:
        built = config.use_sigstore_verifier(
            identity=identity, oidc_issuer=issuer, trust_config=policy.trust_config
        )
    except Exception as exc:  # trusted root download/parse errors
        raise SignError(f"keyless verification: cannot load the Sigstore trust root: {exc}") from exc
    return built, f"{identity} (issuer {issuer})"


def _signed_resources(signature: Path) -> dict[str, str] | None:
    """``name → sha256`` from the (already verified) bundle's in-toto statement; None when the
    statement is not a per-file SH256 serialization."""
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        predicate = payload["predicate"]
        if predicate["serialization"]["method"] != "files":
            return None
        return {r["name"]: r["digest"] for r in predicate["resources"] if r.get("algorithm") == "sha256"}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tamper_problems(export_dir: Path, signature: Path) -> list[str]:
    """Each file that differs from the signed statement: changed, added, or missing."""
    signed = _signed_resources(signature)
    if signed is None:
        return []
    actual: dict[str, Path] = {}
    for path in sorted(export_dir.rglob("*")):
        rel = path.relative_to(export_dir)
        if rel.as_posix() == SIGNATURE_NAME or rel.parts[0] in _GIT_NAMES or path.is_dir():
            continue
        actual[rel.as_posix()] = path
    problems = []
    for name in sorted(set(signed) | set(actual)):
        if name not in actual:
            problems.append(f"{name}: missing (it was signed)")
        elif name not in signed:
            problems.append(f"{name}: added after signing")
        else:
            digest, _ = sha256_file(actual[name])
            if digest != signed[name]:
                problems.append(f"{name}: changed after signing (sha256 {digest} != signed {signed[name]})")
    return problems


def check_signed_files(export_dir: Path, delivered: Iterable[str]) -> None:
    """Refuse an export whose ``model.sig`` signs another file set than the one it delivers.

    ``delivered``: the files publish uploads and pull writes (see
    :func:`ggufship.layout.export_files`). A signed file outside that set would be
    dropped on the way (the published artifact could never verify); a delivered
    file the signature does not cover fails verification as "added after
    signing". Both raise :class:`~ggufship.errors.UnlistedFileError` naming each
    file. Only the statement's file list is read here; the signature itself is
    checked by :func:`verify_signed_export`. No ``model.sig``, or one whose
    statement is not a per-file listing (opaque to this check): nothing to compare.
    """
    signature = Path(export_dir) / SIGNATURE_NAME
    if not signature.is_file():
        return
    signed = _signed_resources(signature)
    if signed is None:
        logger.warning("%s: no per-file statement in it; its file set is not compared", signature)
        return
    names = set(delivered)
    problems = [
        f"{name}: signed but not listed in {MANIFEST_NAME} (would not be published)"
        for name in sorted(set(signed) - names)
    ] + [f"{name}: delivered but not signed" for name in sorted(names - set(signed))]
    if problems:
        raise UnlistedFileError(
            f"{export_dir}: {SIGNATURE_NAME} and {MANIFEST_NAME} disagree on the files of the export: "
            + "; ".join(problems),
            problems,
        )


def check_signature(export_dir: Path, policy: VerificationPolicy) -> SignatureReport:
    """Verify ``export_dir/model.sig`` under ``policy`` and that the files are the signed ones."""
    signature = export_dir / SIGNATURE_NAME
    if not signature.is_file():
        raise UnsignedExportError(
            f"{export_dir}: not signed (no {SIGNATURE_NAME}); sign it with `ggufship sign`"
        )
    config, signer = _verifying_config(policy)
    try:
        config.verify(export_dir, signature)  # type: ignore[attr-defined]
    except ValueError as exc:
        if not str(exc).startswith(_CONTENT_MISMATCH_PREFIX):
            raise SignatureMismatchError(
                f"{signature}: signature does not verify ({policy.method}): {exc}"
            ) from exc
        problems = _tamper_problems(export_dir, signature) or [str(exc)]
        raise TamperedError(
            f"{export_dir}: signature is valid but {len(problems)} file(s) differ from what was signed: "
            + "; ".join(problems),
            problems,
        ) from exc
    except Exception as exc:  # cryptography / pyOpenSSL / sigstore verification errors, bad JSON
        raise SignatureMismatchError(
            f"{signature}: signature does not verify ({policy.method}): {type(exc).__name__}: {exc}"
        ) from exc
    logger.info("%s: signature valid (%s: %s)", export_dir, policy.method, signer)
    return SignatureReport(signature=signature, method=policy.method, signer=signer)


def verify_signed_export(export_dir: Path, policy: VerificationPolicy | None) -> SignedExportReport:
    """Signature first (when ``policy`` is given), then every digest via
    :func:`ggufship.integrity.verify_export`.

    Raises :class:`UnsignedExportError` (no ``model.sig`` but a policy),
    :class:`SignatureMismatchError` (wrong key/chain/identity, corrupt signature),
    :class:`TamperedError` (valid signature, files changed/added/removed since),
    :class:`~ggufship.errors.IntegrityError` (files do not match ``manifest.json``),
    :class:`SigningKeyError` (a policy file is missing or unusable).
    ``policy=None`` checks digests only and logs that the signature was not checked.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ManifestError(f"{export_dir}: export directory does not exist")
    report = None
    if policy is not None:
        report = check_signature(export_dir, policy)
    elif (export_dir / SIGNATURE_NAME).exists():
        logger.warning(
            "%s: has %s but no verification policy was given: signature NOT checked (digests only)",
            export_dir,
            SIGNATURE_NAME,
        )
    else:
        logger.info("%s: no verification policy: signature not checked (digests only)", export_dir)
    integrity = verify_export(export_dir, raise_on_error=True)
    return SignedExportReport(export_dir=export_dir, integrity=integrity, signature=report)
