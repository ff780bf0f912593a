"""The FastAPI application: state, lifespan (load in the background), error mapping, probes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ggufship.serve import _routes_dify, _routes_openai
from ggufship.serve._auth import KeyRing
from ggufship.serve._batch import BatchEngine
from ggufship.serve._conversations import ConversationStore
from ggufship.serve._engine import Engine
from ggufship.serve._metrics import MetricLabels, ServeMetrics
from ggufship.serve._middleware import DIFY_PATHS, RequestMiddleware
from ggufship.serve._model_source import ModelSource, resolve_model
from ggufship.serve._state import ServerState, server_state
from ggufship.serve.errors import (
    APIError,
    AuthenticationError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
)
from ggufship.serve.protocol.errors import error_json
from ggufship.serve.settings import ServeSettings

logger = logging.getLogger("ggufship.serve")


def _gguf_identity(source: ModelSource) -> tuple[str | None, str | None]:
    """``general.name`` / ``general.version`` from the GGUF header (no weights read)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(source.path), "r")
        out: list[str | None] = []
        for key in ("general.name", "general.version"):
            field = reader.get_field(key)
            out.append(field.contents() if field is not None else None)
        return out[0], out[1]
    except Exception:
        logger.debug("cannot read the GGUF header of %s", source.path, exc_info=True)
        return None, None


def _audit_log(settings: ServeSettings) -> Any:
    if settings.audit_log is None:
        return None
    from ggufship.audit import AuditLog

    return AuditLog(settings.audit_log)


def build_state(settings: ServeSettings, source: ModelSource) -> ServerState:
    name, version = source.name, source.version
    if name is None or version is None:
        header_name, header_version = _gguf_identity(source)
        name = name or header_name
        version = version or header_version
    model_id = settings.served_model_name or name or source.path.stem
    version = version or "unknown"
    metrics = ServeMetrics(MetricLabels(model_id, version, settings.track), settings.refusal_patterns)
    metrics.set_model_info(source.sha256, source.quantization)
    engine_class = BatchEngine if settings.engine == "batch" else Engine
    engine = engine_class(
        source.path,
        parallel=settings.parallel,
        queue_size=settings.queue_size,
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
        retry_after=settings.retry_after_seconds,
        metrics=metrics,
    )
    return ServerState(
        settings=settings,
        source=source,
        model_id=model_id,
        version=version,
        metrics=metrics,
        engine=engine,
        keys=KeyRing(settings.accepted_keys()),
        conversations=ConversationStore(settings.max_conversations, settings.max_conversation_turns),
        audit=_audit_log(settings),
    )


#: What pydantic puts in an error's location for a member of a union (``str``, ``list[int]``...).
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\])$")


def _param(loc: tuple[Any, ...], body: Any = None) -> str | None:
    """``messages[0].content`` for the location ``("body", "messages", 0, "content", "str")``: the
    union member tags pydantic adds are left out (a part is a tag when the document has no such key
    there), so ``param`` names the parameter as the client sent it."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc)
    out = ""
    node = body
    for p in parts:
        in_list = isinstance(p, int) and isinstance(node, list) and 0 <= p < len(node)
        if in_list or (isinstance(p, str) and isinstance(node, dict) and p in node):
            node = node[p]  # type: ignore[index]
        elif isinstance(p, str) and _UNION_TAG.match(p) and out:
            continue
        else:
            node = None
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _error_response(request: Request, exc: APIError) -> JSONResponse:
    body = error_json(exc, dify=request.url.path in DIFY_PATHS)  # Dify clients read top-level fields
    headers = {"retry-after": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
    if isinstance(exc, AuthenticationError):
        headers = {"www-authenticate": "Bearer"}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, APIError):  # pragma: no cover
            raise exc
        return _error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        first = errors[0] if errors else {}
        param = _param(
            tuple(first.get("loc", ())), exc.body if isinstance(exc, RequestValidationError) else None
        )
        text = first.get("msg", "invalid request")
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        message = f"{param}: {text}{more}" if param else f"{text}{more}"
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {text}"
        return _error_response(request, InvalidRequestError(message, param=param, code=first.get("type")))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)
        err: APIError = NotFoundError(f"{request.method} {request.url.path}: {detail}")
        if status != 404:
            err = InvalidRequestError(f"{request.method} {request.url.path}: {detail}")
            err.status_code = status
            err.code = "method_not_allowed" if status == 405 else "invalid_request"
        return _error_response(request, err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return _error_response(request, InternalError(f"internal error: {type(exc).__name__}"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def create_app(
    settings: ServeSettings,
    *,
    source: ModelSource | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The API for ``settings.model``: fetched and verified now (raises on a mismatch, before
    anything loads); the llama instances load in the background once the app starts, and
    ``/readyz`` answers 200 only after that. ``on_fatal`` is called if loading fails."""
    source = source or resolve_model(settings)
    logger.info(
        "model %s verified: %s (sha256 %s)", source.path, ", ".join(source.checks) or "-", source.sha256
    )
    state = build_state(settings, source)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, on_fatal))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            state.engine.close()
            if state.audit is not None:
                state.audit.close()

    app = FastAPI(
        title="ggufship API",
        summary="OpenAI- and Dify-compatible inference on llama.cpp",
        version=state.version,
        lifespan=lifespan,
        # the API's description: off with docs=False; behind the API key when keys are configured
        # (RequestMiddleware checks it for these paths)
        openapi_url="/openapi.json" if settings.docs else None,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
    )
    app.state.ggufship = state
    _install_error_handlers(app)
    app.include_router(_routes_openai.router)
    app.include_router(_routes_dify.router)
    app.add_middleware(RequestMiddleware, state=state)

    @app.get("/healthz", response_class=PlainTextResponse, tags=["probes"])
    async def healthz() -> str:
        """The process is up."""
        return "ok\n"

    @app.get("/readyz", tags=["probes"], responses={503: {"description": "not loaded yet"}})
    async def readyz(request: Request) -> JSONResponse:
        """The model is verified and loaded."""
        st = server_state(request)
        body = {"ready": st.ready, "model": st.model_id, "version": st.version, "digest": st.source.sha256}
        if st.load_error is not None:
            body["error"] = str(st.load_error)
        return JSONResponse(body, status_code=200 if st.ready else 503)

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(
            generate_latest(server_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    _fix_openapi(app)
    return app


async def _load(state: ServerState, on_fatal: Callable[[BaseException], None] | None) -> None:
    from ggufship.serve._context import ContextWindow
    from ggufship.serve._inference import Inference

    try:
        await asyncio.to_thread(state.engine.load)
        context = ContextWindow(
            state.engine,
            policy=state.settings.context_policy,
            default_max_tokens=state.settings.default_max_tokens,
        )
    except Exception as exc:
        state.load_error = exc
        logger.error("%s", exc)
        if on_fatal is not None:
            on_fatal(exc)
        return
    state.inference = Inference(state.engine, context, state.settings)
    # everything allocated so far lives as long as the process: keep it out of the collector's full
    # passes, which stop every thread (the event loop too) for as long as they take
    gc.freeze()
    logger.info(
        "ready: %s %s (%s), n_ctx %d, %d instance(s), track %s",
        state.model_id,
        state.version,
        state.source.quantization,
        state.engine.n_ctx,
        state.settings.parallel,
        state.settings.track,
    )


def _fix_openapi(app: FastAPI) -> None:
    """Validation errors are answered 400 in the OpenAI shape, not FastAPI's 422."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
