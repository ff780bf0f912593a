"""Verifying a signed export: the signature first, then every digest of ``manifest.json``."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Container, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ggufship.errors import IntegrityError, ManifestError, UnlistedFileError
from ggufship.integrity import (
    FetchedFiles,
    VerifiedExport,
    VerifyReport,
    export_digest_problems,
    frozen_digests,
    hash_export_dir,
    hash_listed_files,
)
from ggufship.manifest import MANIFEST_NAME, Manifest
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


def _tamper_problems(digests: Mapping[str, str], signature: Path) -> list[str]:
    """Each file that differs from the signed statement: changed, added, or missing (from digests
    already computed: nothing is hashed here)."""
    signed = _signed_resources(signature)
    if signed is None:
        return []
    problems = []
    for name in sorted(set(signed) | set(digests)):
        if name not in digests:
            problems.append(f"{name}: missing (it was signed)")
        elif name not in signed:
            problems.append(f"{name}: added after signing")
        elif digests[name] != signed[name]:
            problems.append(
                f"{name}: changed after signing (sha256 {digests[name]} != signed {signed[name]})"
            )
    return problems


def _precomputed_hashing(digests: Mapping[str, str]) -> Any:
    """A model_signing hashing config that answers with ``digests`` instead of reading the files.

    model_signing 1.1.1's only public verification entry point,
    ``verifying.Config.verify(model_path, signature_path)``, checks the signature and then
    calls its hashing config's ``hash(model_path)`` to compare the result with the signed
    statement; ``set_hashing_config`` (public) chooses that config. It has no "verify
    against these digests" option, so this subclass of the public ``hashing.Config``
    overrides ``hash`` to build the manifest from the digests ggufship computed once
    (while the bytes streamed in, or in one local pass). The comparison itself stays
    model_signing's. Building a manifest item needs ``Digest``, which model_signing keeps
    in a private module (``model_signing._hashing.hashing``): the one private name here,
    listed in tests/test_public_apis.py. The digests are per-file SHA256 over the whole
    file, exactly what ggufship's signer asks for (``_signer.hashing_config``).
    """
    from model_signing import hashing, manifest
    from model_signing._hashing.hashing import Digest

    class _Precomputed(hashing.Config):  # type: ignore[misc]
        def hash(self, model_path: Any, *, files_to_hash: Iterable[Any] | None = None) -> Any:
            serialization = manifest.SerializationType.from_args(
                {"method": "files", "hash_type": "sha256", "allow_symlinks": False}
            )
            items = [
                manifest.FileManifestItem(
                    path=PurePosixPath(name), digest=Digest("sha256", bytes.fromhex(hexd))
                )
                for name, hexd in sorted(digests.items())
            ]
            return manifest.Manifest(Path(model_path).name, items, serialization)

    return _Precomputed()


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


def check_signature(
    export_dir: Path, policy: VerificationPolicy, digests: Mapping[str, str] | None = None
) -> SignatureReport:
    """Verify ``export_dir/model.sig`` under ``policy`` and that the files are the signed ones.

    ``digests`` (relative path -> sha256 of every file but ``model.sig``), when given, are
    compared with the signed statement instead of hashing the files again.
    """
    signature = export_dir / SIGNATURE_NAME
    if not signature.is_file():
        raise UnsignedExportError(
            f"{export_dir}: not signed (no {SIGNATURE_NAME}); sign it with `ggufship sign`"
        )
    if digests is None:
        digests = hash_export_dir(export_dir)
    config, signer = _verifying_config(policy)
    config.set_hashing_config(_precomputed_hashing(digests))  # type: ignore[attr-defined]
    try:
        config.verify(export_dir, signature)  # type: ignore[attr-defined]
    except ValueError as exc:
        if not str(exc).startswith(_CONTENT_MISMATCH_PREFIX):
            raise SignatureMismatchError(
                f"{signature}: signature does not verify ({policy.method}): {exc}"
            ) from exc
        problems = _tamper_problems(digests, signature) or [str(exc)]
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


def verify_export_once(
    export_dir: Path,
    policy: VerificationPolicy | None,
    *,
    fetched: FetchedFiles | None = None,
    quant: str | None = None,
    warn_unchecked: bool = True,
) -> VerifiedExport:
    """Check an export directory: every file hashed once, the signature (with ``policy``) checked once.

    ``fetched``: the digests a pull computed while the bytes streamed in (nothing is
    hashed again). Without it every file is hashed in one local pass. ``quant``: a
    partial export of that quantization is accepted — GGUFs of other quantizations may
    be absent; the served one may not. ``warn_unchecked=False``: no warning about a
    ``model.sig`` left unchecked (publish, which does not verify signatures).

    Signature first (so a changed file under a valid signature is :class:`TamperedError`),
    then every digest against ``manifest.json`` (:class:`~ggufship.errors.IntegrityError`).

    Why a partial export verifies exactly: the signature covers a statement S (file ->
    sha256) of the whole export, ``manifest.json`` included. The files present are
    compared with S by their own digests; for an absent GGUF, S's entry is compared with
    ``manifest.json``'s digest of it. ``manifest.json`` is itself in S and its bytes match,
    so its digests are signed content: the comparison passes exactly when the full
    export's would, restricted to the bytes that are here (the absent ones are never read).
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ManifestError(f"{export_dir}: export directory does not exist")
    manifest: Manifest | None = None
    absent: tuple[str, ...] = ()
    if fetched is not None:
        manifest, digests, absent = fetched.manifest, dict(fetched.digests), tuple(fetched.absent)
    elif policy is not None:
        # every file, as model_signing would hash them (a file added after signing is found)
        digests = hash_export_dir(export_dir)
        if quant is not None:  # otherwise the manifest is read after the signature check
            manifest = Manifest.load(export_dir / MANIFEST_NAME)
            absent = _absent_ggufs(export_dir, manifest, digests, quant)
    else:  # no signature to check: what the manifest lists
        manifest = Manifest.load(export_dir / MANIFEST_NAME)
        if quant is not None:
            present = {f.path for f in manifest.files if (export_dir / f.path).is_file()}
            absent = _absent_ggufs(export_dir, manifest, present, quant)
        digests = hash_listed_files(export_dir, manifest, absent)
    statement = dict(digests)
    if manifest is not None:
        for entry in manifest.files:
            if entry.path in absent:
                statement[entry.path] = entry.sha256
    report = None
    if policy is not None:
        report = check_signature(export_dir, policy, statement)
    elif (export_dir / SIGNATURE_NAME).exists() and warn_unchecked:
        logger.warning(
            "%s: has %s but no verification policy was given: signature NOT checked (digests only)",
            export_dir,
            SIGNATURE_NAME,
        )
    else:
        logger.info("%s: no verification policy: signature not checked (digests only)", export_dir)
    if manifest is None:
        manifest = Manifest.load(export_dir / MANIFEST_NAME)
    problems = export_digest_problems(export_dir, manifest, digests, absent)
    if problems:
        raise IntegrityError(
            f"{export_dir}: {len(problems)} file(s) do not match {MANIFEST_NAME}: " + "; ".join(problems),
            problems,
        )
    return VerifiedExport(
        export_dir=export_dir,
        manifest=manifest,
        digests=frozen_digests(digests),
        absent=absent,
        signature=report,
    )


def _absent_ggufs(
    export_dir: Path, manifest: Manifest, present: Container[str], quant: str | None
) -> tuple[str, ...]:
    """Listed GGUFs of other quantizations than ``quant`` that are not on disk (None: none may be absent)."""
    if quant is None:
        return ()
    ggufs = manifest.gguf_files()
    if not any((f.quantization or "").upper() == quant.upper() for f in ggufs):
        available = ", ".join(f.quantization or f.path for f in ggufs) or "none"
        raise ManifestError(
            f"{export_dir}: no quantization {quant!r} in {MANIFEST_NAME} (available: {available})"
        )
    return tuple(
        f.path for f in ggufs if f.path not in present and (f.quantization or "").upper() != quant.upper()
    )


def verify_signed_export(export_dir: Path, policy: VerificationPolicy | None) -> SignedExportReport:
    """Signature first (when ``policy`` is given), then every digest: one hashing pass over the files
    (see :func:`verify_export_once`).

    Raises :class:`UnsignedExportError` (no ``model.sig`` but a policy),
    :class:`SignatureMismatchError` (wrong key/chain/identity, corrupt signature),
    :class:`TamperedError` (valid signature, files changed/added/removed since),
    :class:`~ggufship.errors.IntegrityError` (files do not match ``manifest.json``),
    :class:`SigningKeyError` (a policy file is missing or unusable).
    ``policy=None`` checks digests only and logs that the signature was not checked.
    """
    verified = verify_export_once(Path(export_dir), policy)
    integrity = VerifyReport(
        out_dir=verified.export_dir, checked=tuple(f.path for f in verified.manifest.files)
    )
    return SignedExportReport(
        export_dir=verified.export_dir, integrity=integrity, signature=verified.signature
    )
