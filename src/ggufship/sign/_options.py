"""The options of ``ggufship keygen``, ``sign`` and ``verify``: one declaration each."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.options import option, switch

_CONFIG = ConfigDict(frozen=True, extra="forbid")


class KeygenOptions(BaseModel):
    """``ggufship keygen [-o DIR] [--name STEM]``."""

    model_config = _CONFIG

    out: Path = Field(
        default=Path(), description="directory for the key pair", json_schema_extra=option(short="-o")
    )
    name: str = Field(default="ggufship", min_length=1, description="file name stem")
    json_output: bool = switch("print the paths as JSON", "json")


class SignOptions(BaseModel):
    """``ggufship sign OUT (--private-key K [--certificate C ...] | --sigstore)``; the environment
    (:class:`~ggufship.sign.SignSettings`) fills the password, token and trust config not given."""

    model_config = _CONFIG

    out: Path = Field(description="export directory", json_schema_extra=option(positional=True))
    private_key: Path | None = Field(default=None, description="PEM EC private key (ggufship keygen)")
    password_env: str | None = Field(
        default=None,
        description="env variable with the private key's password (default: GGUFSHIP_PRIVATE_KEY_PASSWORD)",
        json_schema_extra=option(metavar="VAR"),
    )
    certificate: Path | None = Field(default=None, description="PEM signing certificate of --private-key")
    certificate_chain: tuple[Path, ...] = Field(
        default=(),
        description="PEM intermediate/root certificate(s) to include (repeatable)",
        json_schema_extra=option(metavar="FILE", repeat=True),
    )
    sigstore: bool = switch("keyless signing with Sigstore (Fulcio + Rekor)")
    identity_token: str | None = Field(
        default=None,
        description="OIDC identity token for --sigstore (prefer the env var GGUFSHIP_IDENTITY_TOKEN: "
        "command lines are visible to other users)",
    )
    no_ambient_credentials: bool = switch("--sigstore: do not detect a CI workload identity token")
    trust_config: Path | None = Field(
        default=None,
        description="--sigstore: client trust config of a private Sigstore instance "
        "(env GGUFSHIP_TRUST_CONFIG)",
    )
    json_output: bool = switch("print the result as JSON", "json")


class VerifyOptions(BaseModel):
    """``ggufship verify OUT [policy]``: digests only, or the signature first with a policy."""

    model_config = _CONFIG

    out: Path = Field(description="export directory", json_schema_extra=option(positional=True))
    public_key: Path | None = Field(default=None, description="PEM public key of the signing key pair")
    certificate_chain: tuple[Path, ...] = Field(
        default=(),
        description="trusted PEM certificate(s) the signing certificate must chain to (repeatable)",
        json_schema_extra=option(metavar="FILE", repeat=True),
    )
    identity: str | None = Field(
        default=None, description="keyless: expected signer identity (e-mail or URI in the certificate)"
    )
    identity_provider: str | None = Field(default=None, description="keyless: expected OIDC issuer URL")
    trust_config: Path | None = Field(
        default=None,
        description="keyless: client trust config of a private Sigstore instance (env GGUFSHIP_TRUST_CONFIG)",
    )
    json_output: bool = switch("print the report as JSON", "json")
