"""Exceptions of the sign stage (exit codes 30–39, documented in docs/reference/exit-codes.md)."""

from __future__ import annotations

from ggufship.errors import GgufshipError, IntegrityError


class SignError(GgufshipError):
    """Signing or verification failed otherwise (Fulcio or Rekor unreachable, a Sigstore trust root that
    cannot be loaded); the base of this stage's errors."""

    exit_code = 30


class SigningKeyError(SignError):
    """A key, certificate, certificate chain, identity token or trust config is missing or unusable.

    The message names the file (or the option) and the problem.
    """

    exit_code = 31


class UnsignedExportError(SignError):
    """A signature check was asked for, but the export has no ``model.sig``."""

    exit_code = 32


class SignatureMismatchError(SignError):
    """The signature does not verify: wrong public key, untrusted certificate chain,
    wrong keyless identity or issuer, or a corrupt/unreadable ``model.sig``."""

    exit_code = 33


class TamperedError(SignError, IntegrityError):
    """The signature is valid, but files differ from what was signed (changed, added or removed).

    Also an :class:`~ggufship.errors.IntegrityError`, so callers that only care about
    "the bytes are not the released bytes" can catch that; ``problems`` names each file.
    """

    exit_code = 34


__all__ = [
    "SignError",
    "SignatureMismatchError",
    "SigningKeyError",
    "TamperedError",
    "UnsignedExportError",
]
