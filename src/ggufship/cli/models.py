"""The options of the commands whose stage is a single module (audit, await-canary, rollback, demo,
reference, pipeline), and the CLI-only options of ``gate`` (where the verdict goes, where
``gate serve`` listens, ``gate report``'s input): one pydantic model per command, one field per
argument. ``ggufship.cli.settings_flags``
generates the arguments (name, metavar, choices, help with default and bounds) from them, and
builds the model from what was given."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.options import option, switch

_CONFIG = ConfigDict(frozen=True, extra="forbid")


class AuditVerifyOptions(BaseModel):
    """``ggufship audit verify FILE``."""

    model_config = _CONFIG

    file: Path = Field(
        description="the audit log (JSON lines)", json_schema_extra=option(positional=True, metavar="FILE")
    )
    head: Path | None = Field(default=None, description="head file (default: FILE.head)")
    require_head: bool = Field(
        default=True,
        description="a missing head file is a problem; --no-require-head for a log copied without it",
    )
    key_file: Path | None = Field(
        default=None,
        description="HMAC key of a keyed log (default: $GGUFSHIP_AUDIT_KEY_FILE, else $GGUFSHIP_AUDIT_KEY)",
    )
    json_output: bool = switch("print the report as JSON on stdout", "json")


class AuditKeygenOptions(BaseModel):
    """``ggufship audit keygen FILE``."""

    model_config = _CONFIG

    file: Path = Field(
        description="the key file to create", json_schema_extra=option(positional=True, metavar="FILE")
    )


class AwaitCanaryOptions(BaseModel):
    """``ggufship await-canary --rollout NAME (--sha256 HEX | --export DIR)``."""

    model_config = _CONFIG

    rollout: str = Field(min_length=1, description="the Rollout's name")
    namespace: str = Field(default="default", min_length=1, description="its namespace")
    sha256: str | None = Field(
        default=None,
        description="digest of the deployed GGUF (the pod template's ggufship.io/model-sha256)",
    )
    export: Path | None = Field(
        default=None,
        description="the released export: the digest its GitOps values deploy",
        json_schema_extra=option(metavar="DIR"),
    )
    timeout: float = Field(
        default=4 * 3600.0,
        gt=0,
        le=7 * 86_400,
        description="give up after this many seconds",
        json_schema_extra=option(metavar="S"),
    )
    poll: float = Field(
        default=10.0, gt=0, le=600, description="poll period, seconds", json_schema_extra=option(metavar="S")
    )
    report: Path | None = Field(
        default=None,
        description="write the Markdown outcome report here",
        json_schema_extra=option(metavar="FILE"),
    )
    json_output: bool = switch("print the verdict as JSON on stdout", "json")


class RollbackOptions(BaseModel):
    """``ggufship rollback --gitops URL (--export DIR | --name N --sha256/--version ...)``."""

    model_config = _CONFIG

    gitops: str = Field(
        min_length=1,
        description="the deploy repository",
        json_schema_extra=option(metavar="GIT_URL", uri=True),
    )
    gitops_branch: str = Field(default="main", min_length=1, description="branch")
    gitops_env: str = Field(
        default="dev",
        min_length=1,
        description="deploy/ENV/<name>.values.yaml",
        json_schema_extra=option(metavar="ENV"),
    )
    gitops_author: str | None = Field(
        default=None,
        description="commit author (default ggufship)",
        json_schema_extra=option(metavar="'NAME <EMAIL>'"),
    )
    gitops_attempts: int = Field(default=5, ge=1, le=100, description="push attempts on rejection")
    name: str | None = Field(default=None, description="model name (or from --export)")
    sha256: str | None = Field(default=None, description="digest of the rejected deployed GGUF")
    version: str | None = Field(default=None, description="version of the rejected release")
    export: Path | None = Field(
        default=None,
        description="the rejected export: name, version and the deployed digest from its manifest.json",
        json_schema_extra=option(metavar="DIR"),
    )
    verdict: str = Field(default="canary aborted", description="why it was rejected (one line)")
    json_output: bool = switch("print the result as JSON on stdout", "json")


class DemoOptions(BaseModel):
    """``ggufship demo``."""

    model_config = _CONFIG

    workdir: Path = Field(default=Path(".ggufship/demo"), description="where demo files go")
    checkpoint: Path | None = Field(
        default=None, description="use this checkpoint instead of a generated one"
    )
    adapter: Path | None = Field(default=None, description="LoRA adapter for --checkpoint")
    keep_services: bool = switch(
        "leave the local services running at the end "
        "(stop them with `ggufship down --state-dir WORKDIR/services`)"
    )


class ReferenceOptions(BaseModel):
    """``ggufship reference (--write DIR | --check DIR)``: the pages in DIR and the generated blocks
    of the stage pages beside it (DIR/../*.md)."""

    model_config = _CONFIG

    write: Path | None = Field(
        default=None,
        description="write the pages into DIR and fill the generated blocks of the stage pages "
        "DIR/../*.md (docs/development.md, Generated docs)",
        json_schema_extra=option(metavar="DIR", exclusive="mode", one_required=True),
    )
    check: Path | None = Field(
        default=None,
        description="exit 2 when the pages in DIR or a generated block of DIR/../*.md are stale",
        json_schema_extra=option(metavar="DIR", exclusive="mode"),
    )


class GateOutputOptions(BaseModel):
    """``ggufship gate [--json] [--out DIR]``: where the verdict goes (what to analyse is
    :class:`~ggufship.gate.GateRequest`'s)."""

    model_config = _CONFIG

    json_output: bool = switch("print the verdict JSON on stdout", "json")
    out: Path | None = Field(
        default=None,
        description="write verdict.json, report.md and ECDF PNGs here",
        json_schema_extra=option(metavar="DIR"),
    )


class GateServeOptions(BaseModel):
    """``ggufship gate serve [--host ADDR] [--port N]``: where the verdict server listens."""

    model_config = _CONFIG

    host: str = Field(default="127.0.0.1", min_length=1, description="address to bind")
    port: int = Field(default=8090, ge=0, le=65535, description="port (0: a free one)")


class GateReportOptions(BaseModel):
    """``ggufship gate report VERDICT [--out DIR]``."""

    model_config = _CONFIG

    verdict: Path = Field(
        description="a verdict.json written by `ggufship gate --out`",
        json_schema_extra=option(positional=True, metavar="VERDICT"),
    )
    out: Path | None = Field(
        default=None,
        description="write report.md and the ECDF PNGs here (unset: the verdict's directory)",
        json_schema_extra=option(metavar="DIR"),
    )


class JsonOutput(BaseModel):
    """``--json`` of a command whose other options are a settings model."""

    model_config = _CONFIG

    json_output: bool = switch("print the result as JSON on stdout", "json")


class DownOptions(BaseModel):
    """``ggufship down --purge``."""

    model_config = _CONFIG

    purge: bool = switch("also delete the services' data, logs and credentials")


_PARAM = Field(
    default=(),
    description="a pipeline parameter (repeatable), "
    "e.g. -p checkpoint=/data/ckpt -p name=tiny -p version=1.0.0",
    json_schema_extra=option("param", short="-p", metavar="KEY=VALUE", repeat=True),
)
_ROOT = Field(default=None, description="not used (the pipeline is in the package)")


class PipelineCompileOptions(BaseModel):
    """``ggufship pipeline compile [-o YAML] [--check]``."""

    model_config = _CONFIG

    output: Path | None = Field(
        default=None,
        description="output YAML (default: the checkout's golden file, else ./)",
        json_schema_extra=option(short="-o", metavar="OUTPUT"),
    )
    root: Path | None = Field(
        default=None, description="repository root holding pipelines/ (default: cwd or the checkout)"
    )
    check: bool = switch("do not write; exit 1 if the golden YAML is not current")


class PipelineRunOptions(BaseModel):
    """``ggufship pipeline run --local -p KEY=VALUE ...`` (``--state-dir``: from
    :class:`~ggufship.services.StateDirSettings`)."""

    model_config = _CONFIG

    local: bool = Field(
        description="kfp.local.SubprocessRunner(use_venv=False)",
        json_schema_extra=option(action="store_true"),
    )
    param: tuple[str, ...] = _PARAM
    pipeline_root: Path = Field(default=Path(".ggufship/kfp"), description="where task outputs go")
    root: Path | None = _ROOT


class PipelineSubmitOptions(BaseModel):
    """``ggufship pipeline submit --host URL -p KEY=VALUE ...``."""

    model_config = _CONFIG

    host: str = Field(min_length=1, description="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    param: tuple[str, ...] = _PARAM
    package: Path | None = Field(
        default=None, description="compiled YAML (default: this version's, compiled now)"
    )
    experiment: str = Field(default="ggufship", min_length=1, description="KFP experiment of the run")
    run_name: str | None = Field(default=None, description="display name of the run (default: KFP's)")
    root: Path | None = _ROOT
