"""``ggufship serve``: the OpenAI- and Dify-compatible API.

Every flag is generated from a :class:`ggufship.serve.ServeSettings` field (name, type, default,
bounds, help, environment variable ``GGUFSHIP_SERVE_<FIELD>``); flags override the environment.
"""

from __future__ import annotations

import argparse


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
    from ggufship.cli.settings_flags import add_model_flags, deferred

    def flags() -> None:  # on first use: ggufship.serve imports FastAPI
        from ggufship.serve.settings import ServeSettings

        add_model_flags(p, ServeSettings, into="settings")

    deferred(p, flags)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ggufship.cli.embedded import embedded_s3_environment
    from ggufship.environment import environment
    from ggufship.serve import run

    settings = args.settings  # ServeSettings: the environment, overridden by the flags given
    # s3:// without GGUFSHIP_S3_*: the embedded default's S3 (`ggufship up`), resolved here, not in serve
    fallback = embedded_s3_environment() if settings.model.startswith("s3://") else {}
    with environment(fallback):
        run(settings)
    return 0
