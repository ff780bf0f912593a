"""Per-request bookkeeping around every route (pure ASGI, so streams are timed to the last byte):
request id, W3C trace context, the request body's limits and checks, the docs' API key, fault
injection, metrics, request log, audit log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ggufship.serve import _body
from ggufship.serve._engine import TokenFault
from ggufship.serve.errors import APIError, AuthenticationError, InjectedFaultError, RequestTooLargeError
from ggufship.serve.protocol.dify import ChatMessagesRequest, CompletionMessagesRequest
from ggufship.serve.protocol.errors import error_json
from ggufship.serve.protocol.openai_chat import ChatCompletionRequest
from ggufship.serve.protocol.openai_completions import CompletionRequest

if TYPE_CHECKING:
    from ggufship.serve._state import ServerState

logger = logging.getLogger("ggufship.serve.access")

#: Endpoints measured (label ``endpoint``) and subject to fault injection; probes and /metrics are not.
INFERENCE_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/chat-messages", "/v1/completion-messages"}
)
#: Routes answering in Dify's error shape too (top-level ``code``, ``message``, ``status``).
DIFY_PATHS = frozenset({"/v1/chat-messages", "/v1/completion-messages"})
MEASURED_ENDPOINTS = INFERENCE_ENDPOINTS | {"/v1/models"}
#: The API's description; behind the API key when keys are configured.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: Where the middleware leaves the checked JSON body for the routes (see ``_routes.CheckedRoute``).
PARSED_BODY = "ggufship_json"
#: Request bodies parsed at once (each in a worker thread); more wait, holding only their bytes.
PARSE_CONCURRENCY = 1
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def _trace_id(headers: dict[str, str]) -> str | None:
    """The trace id of a W3C ``traceparent`` header, through the OpenTelemetry API's propagator."""
    if "traceparent" not in headers:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract(carrier=headers)
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return f"{span_ctx.trace_id:032x}" if span_ctx.is_valid else None


class RequestMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        s = state.settings
        self.limits = _body.BodyLimits(s.max_request_bytes, s.max_json_values, s.max_messages)
        self._parsing = asyncio.Semaphore(PARSE_CONCURRENCY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        trace_id = _trace_id(headers)
        path: str = scope["path"]
        endpoint = path if path in MEASURED_ENDPOINTS else None
        req_state = scope.setdefault("state", {})
        req_state["ggufship_started"] = started
        audit: dict[str, Any] = req_state.setdefault("ggufship_audit", {})
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            inference = path in INFERENCE_ENDPOINTS and scope["method"] == "POST"
            try:
                if path in DOCS_PATHS:
                    self.state.keys.check(headers.get("authorization"))
                _body.check_size(_content_length(headers), self.limits)
                if inference and await self._fault(send_with_id, req_state):
                    return
                if inference:
                    body = await self._read_body(receive)
                    if body is None:  # the client went away while sending it
                        status = 499
                        return
                    if body:
                        async with self._parsing:
                            req_state[PARSED_BODY] = await asyncio.to_thread(
                                _parse_and_validate, body, self.limits, path
                            )
                    receive = _replay(body, receive)
            except APIError as exc:
                await _send_error(send_with_id, path, exc)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            # a stream that failed after its 200 went out counts with the error it carried
            counted = int(req_state.get("ggufship_stream_error_status", status))
            if endpoint is not None:
                self.state.metrics.observe_request(endpoint, counted, seconds)
            logger.info(
                "%s %s %d %.3fs",
                scope["method"],
                path,
                status,
                seconds,
                extra={"request_id": request_id, "trace_id": trace_id, "status": status},
            )
            if self.state.audit is not None and path.startswith("/v1/"):
                event = {
                    "request_id": request_id,
                    "trace_id": trace_id,
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_seconds": round(seconds, 6),
                    "model": self.state.model_id,
                    "version": self.state.version,
                    "track": self.state.settings.track,
                    "digest": self.state.source.sha256,
                    **audit,
                }
                try:
                    await asyncio.to_thread(self.state.audit.append, event)
                except Exception:
                    logger.exception("audit log: cannot append")

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, refused (413) as soon as it grows past the limit; ``None``: disconnected."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_bytes:
                raise _body.too_large(size, self.limits)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _fault(self, send: Send, req_state: dict[str, Any]) -> bool:
        """Istio-style fault injection: delay, then maybe abort. Returns whether it answered.
        Otherwise picks the token-level faults of the generation (``ggufship_token_fault``)."""
        s = self.state.settings
        rnd = self.state.fault_random
        if s.fault_delay_fraction > 0 and rnd.random() < s.fault_delay_fraction:
            await asyncio.sleep(s.fault_delay_seconds)
        if s.fault_abort_fraction > 0 and rnd.random() < s.fault_abort_fraction:
            await _send_error(send, "", InjectedFaultError(s.fault_abort_status))
            return True
        fault = TokenFault(
            delay_seconds=s.fault_token_delay_seconds
            if s.fault_token_delay_fraction > 0 and rnd.random() < s.fault_token_delay_fraction
            else 0.0,
            error_after_tokens=s.fault_stream_error_after_tokens
            if s.fault_stream_error_fraction > 0 and rnd.random() < s.fault_stream_error_fraction
            else 0,
        )
        if fault.active:
            req_state["ggufship_token_fault"] = fault
        return False


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None  # absent or malformed: the server's HTTP parser decides; the body is counted anyway
    return int(value)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then the connection's own messages
    (``http.disconnect``)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, path: str, exc: APIError) -> None:
    body = json.dumps(error_json(exc, dify=path in DIFY_PATHS)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, RequestTooLargeError):  # do not read (and discard) the rest of a huge body
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _parse_and_validate(body: bytes, limits: _body.BodyLimits, path: str) -> Any:
    """The body checked (:func:`_body.parse`) and, when it is valid, already validated into the route's
    request model — all in a worker thread. The route's own validation then takes the model instance as
    it is (pydantic does not revalidate instances), so a body of thousands of messages costs the event
    loop nothing. An invalid document is handed on as it is: the route's validation answers the 400
    naming the parameter."""
    doc = _body.parse(body, limits)
    try:
        return _REQUEST_MODELS[path].model_validate(doc)
    except ValidationError:
        return doc


#: The request model of each inference route (what FastAPI validates the body into).
_REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/chat-messages": ChatMessagesRequest,
    "/v1/completion-messages": CompletionMessagesRequest,
}
