"""Sign an export, and verify a signed export (OpenSSF model signing, Sigstore bundles).

Public front; the engines are private modules of this package:

* ``_settings`` — :class:`SigningRequest`, :class:`VerificationPolicy`, :class:`SignSettings`, reports
* ``_keys``     — :func:`generate_keypair`; up-front checks of keys, certificates, trust configs
* ``_signer``   — :func:`sign_export`: ``model_signing`` over the whole export → ``OUT/model.sig``
* ``_verifier`` — :func:`verify_signed_export`: signature first, then every digest
* ``_errors``   — the exceptions (exit codes 30–39)

Three methods, as in ``model_signing``: an EC key pair (``ggufship keygen``), a PKI signing
certificate (+ chain), or keyless Sigstore (Fulcio certificate for an OIDC identity, Rekor log
entry; a private instance through a client trust config).

Example::

    from ggufship.sign import SigningRequest, VerificationPolicy, sign_export, verify_signed_export

    sign_export(out, SigningRequest(private_key=Path("ggufship.key")))
    verify_signed_export(out, VerificationPolicy(public_key=Path("ggufship.pub")))
"""

from __future__ import annotations

from ggufship.sign._errors import (
    SignatureMismatchError,
    SignError,
    SigningKeyError,
    TamperedError,
    UnsignedExportError,
)
from ggufship.sign._keys import generate_keypair
from ggufship.sign._settings import (
    SIGNATURE_NAME,
    SignatureReport,
    SignedExportReport,
    SigningRequest,
    SignSettings,
    VerificationPolicy,
)
from ggufship.sign._signer import sign_export
from ggufship.sign._verifier import check_signed_files, verify_export_once, verify_signed_export

__all__ = [
    "SIGNATURE_NAME",
    "SignError",
    "SignSettings",
    "SignatureMismatchError",
    "SignatureReport",
    "SignedExportReport",
    "SigningKeyError",
    "SigningRequest",
    "TamperedError",
    "UnsignedExportError",
    "VerificationPolicy",
    "check_signed_files",
    "generate_keypair",
    "sign_export",
    "verify_export_once",
    "verify_signed_export",
]
