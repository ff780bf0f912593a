"""The options of ``ggufship publish`` and ``ggufship pull``: one declaration each (in the CLI
layer). The S3 and OCI connection options are shared; what a flag leaves unset comes from
``GGUFSHIP_S3_*`` / ``GGUFSHIP_OCI_*`` (:class:`~ggufship.publish.S3Target`,
:class:`~ggufship.publish.OciSettings`) and then from the embedded default (``ggufship up``) in
``--state-dir``, whose flag the commands generate from :class:`~ggufship.services.StateDirSettings`
(the publish library never reads it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.options import option, switch

#: The S3 options' help section (``--state-dir`` joins it: it holds the default endpoint).
S3_SECTION = "S3 (MinIO, SeaweedFS, AWS; via the minio SDK)"
_OCI = "OCI registry"
_GITOPS = "GitOps"


class S3ConnectionOptions(BaseModel):
    """Where the S3 endpoint is and how to log in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    s3_endpoint: str | None = Field(
        default=None,
        description="http(s)://host:port (env GGUFSHIP_S3_ENDPOINT)",
        json_schema_extra=option(metavar="URL", group=S3_SECTION),
    )
    s3_access_key: str | None = Field(
        default=None,
        description="access key id (env GGUFSHIP_S3_ACCESS_KEY / AWS_ACCESS_KEY_ID)",
        json_schema_extra=option(metavar="KEY", group=S3_SECTION),
    )
    s3_secret_key_env: str | None = Field(
        default=None,
        description="read the secret key from this environment variable (default GGUFSHIP_S3_SECRET_KEY, "
        "then AWS_SECRET_ACCESS_KEY)",
        json_schema_extra=option(metavar="VAR", group=S3_SECTION),
    )
    s3_region: str | None = Field(
        default=None,
        description="region (env GGUFSHIP_S3_REGION)",
        json_schema_extra=option(metavar="REGION", group=S3_SECTION),
    )
    s3_secure: bool | None = Field(
        default=None,
        description="TLS (--s3-insecure: plain HTTP; default: the endpoint URL's scheme)",
        json_schema_extra=option(group=S3_SECTION, negative="s3_insecure"),
    )


class OciConnectionOptions(BaseModel):
    """How to log in to the registry and trust it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    oci_username: str | None = Field(
        default=None,
        description="registry user (env GGUFSHIP_OCI_USERNAME; default: the Docker config's login)",
        json_schema_extra=option(metavar="USER", group=_OCI),
    )
    oci_password_env: str | None = Field(
        default=None,
        description="read the registry password from this environment variable "
        "(default GGUFSHIP_OCI_PASSWORD)",
        json_schema_extra=option(metavar="VAR", group=_OCI),
    )
    oci_tls: bool = Field(
        default=False,
        description="HTTPS even for a loopback registry (default: HTTPS unless loopback)",
        json_schema_extra=option(action="store_true", exclusive="oci_mode", group=_OCI),
    )
    oci_insecure: bool = Field(
        default=False,
        description="plain HTTP to a registry that is not loopback (env GGUFSHIP_OCI_INSECURE)",
        json_schema_extra=option(action="store_true", exclusive="oci_mode", group=_OCI),
    )
    oci_ca_bundle: Path | None = Field(
        default=None,
        description="CA certificates trusted for the registry, e.g. a private CA "
        "(env GGUFSHIP_OCI_CA_BUNDLE)",
        json_schema_extra=option(metavar="PEM", group=_OCI),
    )


class PublishOptions(S3ConnectionOptions, OciConnectionOptions):
    """``ggufship publish OUT [--s3 URI] [--oci REF] [--gitops URL] ...``."""

    out: Path = Field(
        description="export directory (manifest.json, GGUF files, optional model.sig)",
        json_schema_extra=option(positional=True),
    )
    s3: str | None = Field(
        default=None,
        description="publish under PREFIX/models/<name>/<version>/",
        json_schema_extra=option(metavar="s3://BUCKET[/PREFIX]", group=S3_SECTION),
    )
    create_bucket: bool = Field(
        default=False,
        description="create the bucket if missing (default: error naming it)",
        json_schema_extra=option(action="store_true", group=S3_SECTION),
    )
    part_size_mib: int | None = Field(
        default=None,
        ge=5,
        le=5120,
        description="multipart part size (default 16)",
        json_schema_extra=option(metavar="MIB", group=S3_SECTION),
    )
    oci: str | None = Field(
        default=None,
        description="push as an OCI artifact (ORAS)",
        json_schema_extra=option(metavar="HOST[:PORT]/REPO", group=_OCI),
    )
    gitops: str | None = Field(
        default=None,
        description="deploy repository to commit the release to",
        json_schema_extra=option(metavar="GIT_URL", uri=True, group=_GITOPS),
    )
    gitops_branch: str = Field(
        default="main", min_length=1, description="branch", json_schema_extra=option(group=_GITOPS)
    )
    gitops_env: str = Field(
        default="dev",
        min_length=1,
        description="deploy/ENV/<name>.values.yaml",
        json_schema_extra=option(metavar="ENV", group=_GITOPS),
    )
    gitops_author: str | None = Field(
        default=None,
        description="commit author and committer (default ggufship)",
        json_schema_extra=option(metavar="'NAME <EMAIL>'", group=_GITOPS),
    )
    gitops_message: str | None = Field(
        default=None,
        description="commit message; fields {name} {version} {environment} {sha256} "
        "(default 'release {name} {version} to {environment}')",
        json_schema_extra=option(metavar="TEMPLATE", group=_GITOPS),
    )
    gitops_quant: str | None = Field(
        default=None,
        description="GGUF the deploy values point at (default Q4_K_M)",
        json_schema_extra=option(metavar="TYPE", group=_GITOPS),
    )
    gitops_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        description="push attempts on rejection",
        json_schema_extra=option(group=_GITOPS),
    )
    force: bool = switch("replace a published version that has other digests")
    json_output: bool = switch("print the result as JSON on stdout", "json")


class PullOptions(S3ConnectionOptions, OciConnectionOptions):
    """``ggufship pull URI -o DEST [signature policy]``."""

    uri: str = Field(
        min_length=1,
        description="s3://BUCKET/[PREFIX/]models/NAME/VERSION/ or oci://HOST[:PORT]/REPO:TAG",
        json_schema_extra=option(positional=True),
    )
    out: Path = Field(
        description="destination directory (new or empty)",
        json_schema_extra=option(short="-o", metavar="OUT"),
    )
    public_key: Path | None = Field(default=None, description="verify model.sig with this public key")
    certificate_chain: tuple[Path, ...] = Field(
        default=(),
        description="verify with this CA chain (repeatable)",
        json_schema_extra=option(repeat=True, metavar="PEM"),
    )
    identity: str | None = Field(default=None, description="verify a Sigstore signature for this identity")
    identity_provider: str | None = Field(default=None, description="OIDC issuer of --identity")
    trust_config: Path | None = Field(
        default=None, description="private Sigstore trust config (with --identity)"
    )
    quant: str | None = Field(
        default=None,
        description="fetch only this quantization's GGUF (plus manifest.json, model.sig and the non-GGUF "
        "files); the signature is still verified exactly; serve accepts the result for this "
        "quantization only",
    )
    force: bool = switch("replace a non-empty destination")
    json_output: bool = switch("print the result as JSON on stdout", "json")
