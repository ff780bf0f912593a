"""The API server: OpenAI- and Dify-compatible inference on llama-cpp-python.

``create_app(settings)`` fetches and verifies the model (refusing a digest or
signature mismatch before anything loads) and returns the FastAPI app; the model
loads in the background and ``/readyz`` turns 200 after. ``run(settings)`` serves it
with uvicorn until interrupted.
"""

from __future__ import annotations

import logging
import socket
import sys

from ggufship.serve._app import create_app
from ggufship.serve._model_source import ModelSource, resolve_model
from ggufship.serve.errors import (
    ModelLoadError,
    ModelSourceError,
    ModelVerificationError,
    ServeConfigError,
    ServeError,
)
from ggufship.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

SWITCH_INTERVAL_SECONDS = 0.001


def run(settings: ServeSettings, *, sock: socket.socket | None = None) -> None:
    """Verify, then serve until SIGINT/SIGTERM. Raises :class:`ServeError` subclasses when the
    model cannot be fetched, verified or loaded (the server then never answers /readyz 200)."""
    import uvicorn

    from ggufship.serve._sse import keep_streams_on_shutdown

    if settings.log_format == "json":
        _json_logs()
    # worker threads parse bodies and render prompts in Python; the event loop's thread, waking for
    # a probe, gets the GIL back after at most this long (CPython's default: 5 ms per handover)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    fatal: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    keep_streams_on_shutdown()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)
    if fatal:
        exc = fatal[0]
        if isinstance(exc, ServeError):
            raise exc
        raise ModelLoadError(f"MODEL {settings.model}: {exc}") from exc


def _json_logs() -> None:
    from ggufship.redaction import JsonLogFormatter

    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonLogFormatter())


__all__ = [
    "ModelLoadError",
    "ModelSource",
    "ModelSourceError",
    "ModelVerificationError",
    "ServeConfigError",
    "ServeError",
    "ServeSettings",
    "create_app",
    "resolve_model",
    "run",
]
