"""OpenAI routes: thin — validate, hand to :class:`Inference`, shape the answer."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from ggufship.serve import _sse
from ggufship.serve._context import to_messages
from ggufship.serve._engine import Finished, Slot, TextDelta
from ggufship.serve._inference import Job, log_unknown_fields
from ggufship.serve._middleware import PARSED_BODY
from ggufship.serve._sse import SlotStreamingResponse
from ggufship.serve._state import (
    ServerState,
    audit_info,
    request_started,
    server_state,
    stream_failed,
    token_fault,
)
from ggufship.serve.errors import APIError, GenerationError, ModelNotFoundError
from ggufship.serve.protocol.errors import ERROR_RESPONSES, error_body
from ggufship.serve.protocol.openai_chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChunkChoice,
    ModelCard,
    ModelList,
    Truncation,
    Usage,
)
from ggufship.serve.protocol.openai_completions import Completion, CompletionChoice, CompletionRequest

logger = logging.getLogger(__name__)

TRUNCATION_HEADER = "x-ggufship-context-truncated"


def authorized(request: Request) -> ServerState:
    """Dependency: the server state, after the API key check."""
    state = server_state(request)
    fingerprint = state.keys.check(request.headers.get("authorization"))
    if fingerprint:
        audit_info(request)["api_key"] = fingerprint
    return state


Authorized = Annotated[ServerState, Depends(authorized)]


class _CheckedRequest(Request):
    async def json(self) -> Any:
        parsed = self.scope.get("state", {}).get(PARSED_BODY, _UNPARSED)
        return await super().json() if parsed is _UNPARSED else parsed


_UNPARSED = object()


class CheckedRoute(APIRoute):
    """A route whose JSON body the middleware already parsed and checked off the event loop
    (``_body.parse``): the route validates that document instead of parsing the bytes again."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(_CheckedRequest(request.scope, request.receive))

        return checked


router = APIRouter(responses=ERROR_RESPONSES, route_class=CheckedRoute)


def _check_model(state: ServerState, model: str) -> None:
    if model not in state.model_aliases():
        raise ModelNotFoundError(
            f"The model '{model}' does not exist; this server serves '{state.model_id}'", param="model"
        )


def _usage(job: Job, done: Finished) -> Usage:
    truncated = (
        Truncation(
            messages_dropped=job.prompt.messages_dropped, prompt_tokens_dropped=job.prompt.tokens_dropped
        )
        if job.prompt.truncated
        else None
    )
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        truncated=truncated,
    )


def _headers(job: Job) -> dict[str, str]:
    if not job.prompt.truncated:
        return {}
    return {TRUNCATION_HEADER: f"messages={job.prompt.messages_dropped}; tokens={job.prompt.tokens_dropped}"}


def _finish(done: Finished) -> Any:
    return "length" if done.reason == "length" else "stop"


def _record(request: Request, job: Job, done: Finished) -> None:
    info = audit_info(request)
    info.update(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        finish_reason=done.reason,
        refusal=done.refused,
    )
    if job.prompt.truncated:
        info["truncated"] = {"messages": job.prompt.messages_dropped, "tokens": job.prompt.tokens_dropped}


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: Authorized) -> ModelList:
    src = state.source
    return ModelList(
        data=[
            ModelCard(
                id=state.model_id,
                created=state.created,
                version=state.version,
                digest=f"sha256:{src.sha256}",
                quantization=src.quantization,
                n_ctx=state.engine.n_ctx if state.engine.loaded else None,
            )
        ]
    )


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: Authorized) -> Any:
    log_unknown_fields(body, "/v1/chat/completions")
    _check_model(state, body.model)
    inference = state.require_inference()
    inference.check(body)
    job, slot = await inference.prepare(lambda: inference.chat_job(body, to_messages(body.messages)))
    started = request_started(request)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SlotStreamingResponse(
            _chat_stream(request, state, job, slot, rid, created, include_usage, started),
            slot=slot,
            headers={**_headers(job), "cache-control": "no-cache"},
        )
    done = await inference.complete(
        job,
        slot,
        endpoint="/v1/chat/completions",
        started=started,
        disconnected=request.is_disconnected,
        fault=token_fault(request),
    )
    _record(request, job, done)
    answer = ChatCompletion(
        id=rid,
        created=created,
        model=state.model_id,
        choices=[
            ChatChoice(index=0, message=AssistantMessage(content=done.text), finish_reason=_finish(done))
        ],
        usage=_usage(job, done),
    )
    return JSONResponse(answer.model_dump(mode="json"), headers=_headers(job))


def _chat_stream(
    request: Request,
    state: ServerState,
    job: Job,
    slot: Slot,
    rid: str,
    created: int,
    include_usage: bool,
    started: float,
) -> AsyncIterator[str]:
    def chunk(delta: ChoiceDelta, finish: Any = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return _sse.data(
            ChatCompletionChunk(id=rid, created=created, model=state.model_id, choices=choices, usage=usage)
        )

    return _stream(
        request,
        state,
        job,
        slot,
        endpoint="/v1/chat/completions",
        started=started,
        include_usage=include_usage,
        chunk=lambda text, finish, usage: chunk(
            ChoiceDelta() if text is None else ChoiceDelta(content=text), finish, usage
        ),
        opening=chunk(ChoiceDelta(role="assistant", content="")),
    )


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, state: Authorized) -> Any:
    log_unknown_fields(body, "/v1/completions")
    _check_model(state, body.model)
    inference = state.require_inference()
    inference.check(body)
    job, slot = await inference.prepare(lambda: inference.completion_job(body))
    started = request_started(request)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SlotStreamingResponse(
            _completion_stream(request, state, job, slot, rid, created, include_usage, started),
            slot=slot,
            headers={**_headers(job), "cache-control": "no-cache"},
        )
    done = await inference.complete(
        job,
        slot,
        endpoint="/v1/completions",
        started=started,
        disconnected=request.is_disconnected,
        fault=token_fault(request),
    )
    _record(request, job, done)
    answer = Completion(
        id=rid,
        created=created,
        model=state.model_id,
        choices=[CompletionChoice(text=done.text, index=0, finish_reason=_finish(done))],
        usage=_usage(job, done),
    )
    return JSONResponse(answer.model_dump(mode="json"), headers=_headers(job))


def _completion_stream(
    request: Request,
    state: ServerState,
    job: Job,
    slot: Slot,
    rid: str,
    created: int,
    include_usage: bool,
    started: float,
) -> AsyncIterator[str]:
    def chunk(text: str | None, finish: Any, usage: Usage | None) -> str:
        choice = CompletionChoice(text=text or "", index=0, finish_reason=finish)
        choices = [] if usage is not None else [choice]
        return _sse.data(
            Completion(id=rid, created=created, model=state.model_id, choices=choices, usage=usage)
        )

    return _stream(
        request,
        state,
        job,
        slot,
        endpoint="/v1/completions",
        started=started,
        include_usage=include_usage,
        chunk=chunk,
    )


async def _stream(
    request: Request,
    state: ServerState,
    job: Job,
    slot: Slot,
    *,
    endpoint: str,
    started: float,
    include_usage: bool,
    chunk: Callable[[str | None, Any, Usage | None], str],
    opening: str | None = None,
) -> AsyncIterator[str]:
    """The SSE body of an OpenAI stream: ``opening`` (if any), a ``chunk(text, None, None)`` per text
    delta, ``chunk(None, finish_reason, None)`` at the end, then ``chunk(None, None, usage)`` (no
    choices) when asked; an error inside the stream; ``[DONE]``. A disconnect stops the generation."""
    inference = state.require_inference()
    try:
        async with inference.run(
            job, slot, endpoint=endpoint, started=started, fault=token_fault(request)
        ) as events:
            if opening is not None:
                yield opening
            async for item in events:
                if isinstance(item, TextDelta):
                    yield chunk(item.text, None, None)
                elif isinstance(item, Finished):
                    _record(request, job, item)
                    yield chunk(None, _finish(item), None)
                    if include_usage:
                        yield chunk(None, None, _usage(job, item))
                if await request.is_disconnected():
                    logger.info("client went away; stopping the generation")
                    return
    except APIError as exc:
        yield _sse.data(error_body(stream_failed(request, exc)))
    except Exception as exc:
        logger.exception("stream failed")
        yield _sse.data(error_body(stream_failed(request, GenerationError(f"generation failed: {exc}"))))
    yield _sse.DONE
