"""``ggufship serve``: the OpenAI- and Dify-compatible API.

Flags override the ``GGUFSHIP_SERVE_*`` environment; both feed one
:class:`ggufship.serve.ServeSettings` model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: flag dest → settings field, for every flag that maps 1:1.
_FLAGS: dict[str, str] = {
    "quant": "quant",
    "expect_sha256": "expect_sha256",
    "public_key": "public_key",
    "identity": "identity",
    "identity_provider": "identity_provider",
    "trust_config": "trust_config",
    "cache_dir": "cache_dir",
    "served_model_name": "served_model_name",
    "host": "host",
    "port": "port",
    "track": "track",
    "engine": "engine",
    "parallel": "parallel",
    "n_ctx": "n_ctx",
    "n_threads": "n_threads",
    "queue_size": "queue_size",
    "context_policy": "context_policy",
    "api_keys_file": "api_keys_file",
    "log_format": "log_format",
    "audit_log": "audit_log",
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve a model with an OpenAI/Dify-compatible API (verified before it loads)",
        description=(
            "Fetch MODEL (a .gguf, an export directory, s3://… or oci://…), verify its SHA256 (and "
            "signature when a key/identity is given), refuse to start on a mismatch, then serve "
            "/v1/chat/completions, /v1/completions, /v1/models, /v1/chat-messages, "
            "/v1/completion-messages, /healthz, /readyz, /metrics. Every option can also be set "
            "as GGUFSHIP_SERVE_<OPTION> in the environment."
        ),
    )
    p.add_argument("model", nargs="?", help="a .gguf, an export directory, s3://bucket/prefix/ or oci://…")
    p.add_argument("--quant", help="quantization to serve from an export (default Q4_K_M when present)")
    p.add_argument("--expect-sha256", metavar="HEX", help="refuse to start unless the .gguf has this SHA256")
    p.add_argument("--public-key", type=Path, help="verify the export's model.sig with this public key")
    p.add_argument(
        "--certificate-chain", type=Path, action="append", metavar="PEM", help="verify against a chain"
    )
    p.add_argument("--identity", help="keyless: signer identity")
    p.add_argument("--identity-provider", help="keyless: OIDC issuer")
    p.add_argument("--trust-config", type=Path, help="keyless: private Sigstore trust config")
    p.add_argument("--cache-dir", type=Path, help="where s3:// and oci:// models are pulled to")
    p.add_argument("--served-model-name", help="model id clients send (default: the export's name)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument("--track", choices=("stable", "canary"), help="metrics label track (default stable)")
    p.add_argument(
        "--engine",
        choices=("batch", "instances"),
        help="batch (default): one context, `--parallel` sequences decoded together; "
        "instances: `--parallel` llama instances, one generation each",
    )
    p.add_argument(
        "--parallel", type=int, metavar="N", help="sequences in the batch, or llama instances (default 4)"
    )
    p.add_argument("--n-ctx", type=int, help="context window (default: the model's)")
    p.add_argument("--n-threads", type=int, help="threads per instance (default: cores / parallel)")
    p.add_argument("--queue-size", type=int, help="requests that may wait for an instance (beyond: 429)")
    p.add_argument(
        "--context-policy", choices=("reject", "truncate"), help="prompt too long: reject or truncate"
    )
    p.add_argument("--api-keys-file", type=Path, help="file of accepted Bearer keys, one per line")
    p.add_argument("--log-format", choices=("text", "json"), help="json: one object a line, PII redacted")
    p.add_argument("--audit-log", type=Path, help="append-only, hash-chained audit log file")
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServeSettings from the environment, overridden by the flags that were given."""
    from pydantic import ValidationError

    from ggufship.errors import UsageError
    from ggufship.serve import ServeSettings

    overrides: dict[str, Any] = {
        field: getattr(args, dest) for dest, field in _FLAGS.items() if getattr(args, dest, None) is not None
    }
    if args.model is not None:
        overrides["model"] = args.model
    if args.certificate_chain:
        overrides["certificate_chain"] = tuple(args.certificate_chain)
    try:
        return ServeSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UsageError(f"serve: invalid option(s): {problems}") from exc


def run_serve(args: argparse.Namespace) -> int:
    from ggufship.cli.embedded import embedded_s3_environment
    from ggufship.environment import environment
    from ggufship.serve import run

    settings = settings_from_args(args)
    # s3:// without GGUFSHIP_S3_*: the embedded default's S3 (`ggufship up`), resolved here, not in serve
    fallback = embedded_s3_environment() if settings.model.startswith("s3://") else {}
    with environment(fallback):
        run(settings)
    return 0
