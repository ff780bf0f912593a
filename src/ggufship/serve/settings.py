"""Settings of the API server: one pydantic-settings model, read by ``ggufship serve`` too.

Every field can be set from the environment with the ``GGUFSHIP_SERVE_`` prefix
(``GGUFSHIP_SERVE_PORT=8080``, ``GGUFSHIP_SERVE_API_KEYS='["k1","k2"]'``); CLI flags
override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.options import option

Track = Literal["stable", "canary"]
ContextPolicy = Literal["reject", "truncate"]
LogFormat = Literal["text", "json"]
EngineKind = Literal["batch", "instances"]


class ServeSettings(BaseSettings):
    """What ``ggufship serve`` serves, how, and with which guards."""

    model_config = SettingsConfigDict(env_prefix="GGUFSHIP_SERVE_", extra="forbid", frozen=True)

    # --- model source and verification ---
    model: str = Field(
        default="",
        description="a local .gguf, an export directory, s3://bucket/prefix/ or oci://host/repo:tag",
        json_schema_extra=option(positional=True, uri=True),
    )
    quant: str | None = Field(
        default=None, description="quantization to serve from an export (default Q4_K_M when present)"
    )
    expect_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="the served .gguf must have this SHA256, else the server refuses to start",
        json_schema_extra=option(metavar="HEX"),
    )
    public_key: Path | None = Field(default=None, description="verify the export's model.sig with this key")
    certificate_chain: tuple[Path, ...] = Field(
        default=(),
        description="verify model.sig against this certificate chain (PEM files; repeatable)",
        json_schema_extra=option(metavar="PEM", repeat=True),
    )
    identity: str | None = Field(default=None, description="keyless: the signer identity (e-mail/URI)")
    identity_provider: str | None = Field(default=None, description="keyless: the OIDC issuer of identity")
    trust_config: Path | None = Field(default=None, description="keyless: private Sigstore trust config")
    cache_dir: Path = Field(
        default=Path(".ggufship/models"), description="where s3:// and oci:// models are pulled to"
    )
    served_model_name: str | None = Field(
        default=None, description="model id in /v1/models and responses (default: the export's name)"
    )

    # --- network ---
    host: str = Field(default="127.0.0.1", description="listen address")
    port: int = Field(default=8000, ge=0, le=65535, description="listen port (0: any free port)")
    track: Track = Field(default="stable", description="the metrics label `track`: stable or canary")
    shutdown_timeout_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="on SIGTERM, running requests and streams may finish for this long; then they are cut "
        "(keep preStop + this below the pod's terminationGracePeriodSeconds)",
    )

    # --- llama.cpp ---
    engine: EngineKind = Field(
        default="batch",
        description="batch: one llama.cpp context decodes up to `parallel` sequences together "
        "(continuous batching); instances: `parallel` llama instances, one generation each",
    )
    parallel: int = Field(
        default=4,
        ge=1,
        le=64,
        description="sequences decoded together (batch) or llama instances",
        json_schema_extra=option(metavar="N"),
    )
    n_ctx: int = Field(default=0, ge=0, le=1_048_576, description="context window; 0: the model's own")
    n_threads: int | None = Field(default=None, ge=1, le=512, description="threads per instance")
    n_batch: int = Field(default=512, ge=1, le=65536, description="prompt batch size")
    queue_size: int = Field(
        default=16, ge=0, le=10_000, description="requests waiting for an instance; beyond: 429"
    )
    retry_after_seconds: int = Field(default=1, ge=1, le=3600, description="Retry-After on a 429")

    # --- request policy ---
    context_policy: ContextPolicy = Field(
        default="reject", description="prompt + completion > n_ctx: reject (400) or truncate old turns"
    )
    default_max_tokens: int = Field(
        default=256, ge=1, le=1_048_576, description="completion limit when the request sets none"
    )
    max_stop_sequences: int = Field(default=4, ge=0, le=64, description="most stop sequences per request")
    max_stop_length: int = Field(default=128, ge=1, le=4096, description="longest stop sequence (chars)")
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="largest request body (bytes, counted while reading, chunked too); beyond: 413",
    )
    max_json_values: int = Field(
        default=65_536,
        ge=64,
        le=16_777_216,
        description="most JSON values (strings, numbers, items, objects...) in one request body; beyond: 400",
    )
    max_messages: int = Field(
        default=2048, ge=1, le=1_000_000, description="most chat messages per request; beyond: 400"
    )
    refusal_patterns: tuple[str, ...] = Field(
        default=(
            r"(?i)\bI(?:'m| am) sorry\b",
            r"(?i)\bI can(?:'|no)t (?:help|assist)\b",
            r"(?i)\bas an AI\b",
        ),
        description="regular expressions; a response matching any counts in ggufship_refusals_total "
        "(repeatable)",
        json_schema_extra=option("refusal_pattern", metavar="REGEX", repeat=True),
    )

    # --- auth ---
    api_keys: tuple[SecretStr, ...] = Field(
        default=(),
        description="accepted Bearer keys (none: no auth); environment only: a command line is visible "
        "to other users (use --api-keys-file)",
        json_schema_extra=option(flag=False),
    )
    api_keys_file: Path | None = Field(default=None, description="file with one accepted key per line")
    docs: bool = Field(
        default=True,
        description="serve /docs, /redoc, /openapi.json (behind the API key when keys are configured)",
    )

    # --- Dify conversations, SSE ---
    max_conversations: int = Field(default=1000, ge=1, le=1_000_000, description="kept (LRU)")
    max_conversation_turns: int = Field(default=50, ge=1, le=10_000, description="turns kept each")
    ping_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="SSE streams: a ping every this many seconds (`event: ping` on Dify streams, a "
        "`: ping` comment on OpenAI streams)",
    )

    # --- logs and audit ---
    log_format: LogFormat = Field(default="text", description="text, or json lines (PII redacted)")
    audit_log: Path | None = Field(default=None, description="hash-chained audit log")

    # --- fault injection (canary tests; like Istio's fault delay/abort); default off ---
    fault_delay_seconds: float = Field(default=0.0, ge=0, le=600, description="injected delay")
    fault_delay_fraction: float = Field(default=0.0, ge=0, le=1, description="share of requests delayed")
    fault_abort_status: int = Field(default=503, ge=400, le=599, description="status of aborted requests")
    fault_abort_fraction: float = Field(default=0.0, ge=0, le=1, description="share of requests aborted")
    # token level (a slow model; a generation failing mid-stream), decided per request like the above
    fault_token_delay_seconds: float = Field(
        default=0.0, ge=0, le=60, description="injected delay before every generated token (a slow model)"
    )
    fault_token_delay_fraction: float = Field(
        default=0.0, ge=0, le=1, description="share of requests whose tokens are delayed"
    )
    fault_stream_error_after_tokens: int = Field(
        default=0,
        ge=0,
        le=1_048_576,
        description="0: off; else the generation fails (500, code fault_injected) after this many tokens",
    )
    fault_stream_error_fraction: float = Field(
        default=0.0, ge=0, le=1, description="share of requests failed after fault_stream_error_after_tokens"
    )

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"refusal_patterns: {pattern!r} is not a regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _keys_not_empty(self) -> ServeSettings:
        for key in self.api_keys:
            if not key.get_secret_value().strip():
                raise ValueError("api_keys: empty key")
        return self

    @model_validator(mode="after")
    def _stream_error_has_a_token_count(self) -> ServeSettings:
        if self.fault_stream_error_fraction > 0 and self.fault_stream_error_after_tokens == 0:
            raise ValueError(
                "fault_stream_error_fraction > 0 needs fault_stream_error_after_tokens >= 1 "
                "(0 turns that fault off)"
            )
        return self

    def accepted_keys(self) -> tuple[SecretStr, ...]:
        """The keys of ``api_keys`` and ``api_keys_file`` (read now; skips blanks and ``#`` lines)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            from ggufship.serve.errors import ServeConfigError

            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ServeConfigError(f"api_keys_file {self.api_keys_file}: cannot read: {exc}") from exc
            keys.extend(SecretStr(s) for line in lines if (s := line.strip()) and not s.startswith("#"))
            if not keys:
                raise ServeConfigError(f"api_keys_file {self.api_keys_file}: no keys in it")
        return tuple(keys)

    def signature_policy_configured(self) -> bool:
        return bool(self.public_key or self.certificate_chain or self.identity or self.trust_config)
