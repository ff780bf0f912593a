"""OpenAI routes: thin — validate, hand to :class:`Inference`, shape the answer."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from ggufship.serve import _sse
from ggufship.serve._context import to_messages
from ggufship.serve._engine import Finished, Slot, TextDelta, TokenLogprob
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
from ggufship.serve._tools import parse_calls
from ggufship.serve.errors import APIError, GenerationError, ModelNotFoundError
from ggufship.serve.protocol.errors import ERROR_RESPONSES, error_body
from ggufship.serve.protocol.openai_chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    FunctionCall,
    ModelCard,
    ModelList,
    TokenLogprobs,
    ToolCall,
    ToolCallDelta,
    ToolCallsDelta,
    TopLogprob,
    Truncation,
    Usage,
)
from ggufship.serve.protocol.openai_completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)

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


def _tool_calls(job: Job, done: Finished) -> list[ToolCall] | None:
    """The answer as tool calls, when tools were offered and it is one (see serve/_tools.py)."""
    if job.tools is None or done.reason != "stop":
        return None
    parsed = parse_calls(done.text, job.tools.offered)
    if not parsed:
        return None
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed]


def _chat_logprobs(items: Sequence[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobs(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.bytes),
                top_logprobs=[TopLogprob(token=a, logprob=lp, bytes=list(b)) for a, lp, b in t.top],
            )
            for t in items
        ]
    )


def _completion_logprobs(items: Sequence[TokenLogprob] | None, start: int = 0) -> CompletionLogprobs | None:
    """The legacy shape; ``text_offset`` counts characters from ``start`` (earlier chunks' text)."""
    if items is None:
        return None
    offsets = []
    for t in items:
        offsets.append(start)
        start += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        top_logprobs=[{a: lp for a, lp, _ in t.top} for t in items],
        text_offset=offsets,
    )


def _combined(dones: list[Finished]) -> Finished:
    """The n choices of one request as one for usage and the audit log: the prompt once, the
    completion tokens of all choices (as OpenAI counts them)."""
    first = dones[0]
    if len(dones) == 1:
        return first
    return replace(first, completion_tokens=sum(d.completion_tokens for d in dones))


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
    prepared = await inference.prepare_many(
        lambda: inference.chat_job(body, to_messages(body.messages)), body.n or 1
    )
    job, slot = prepared[0]
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
    dones = await inference.complete_many(
        prepared,
        endpoint="/v1/chat/completions",
        started=started,
        disconnected=request.is_disconnected,
        fault=token_fault(request),
    )
    choices = []
    for index, done in enumerate(dones):
        calls = _tool_calls(job, done)
        if calls:
            message = AssistantMessage(content=None, tool_calls=calls)
            choices.append(ChatChoice(index=index, message=message, finish_reason="tool_calls"))
        else:
            choices.append(
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=done.text),
                    finish_reason=_finish(done),
                    logprobs=_chat_logprobs(done.logprobs),
                )
            )
    done = _combined(dones)
    _record(request, job, done)
    answer = ChatCompletion(
        id=rid, created=created, model=state.model_id, choices=choices, usage=_usage(job, done)
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
    def chunk(
        delta: ChoiceDelta,
        finish: Any = None,
        usage: Usage | None = None,
        lps: Sequence[TokenLogprob] | None = None,
    ) -> str:
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=_chat_logprobs(lps))
        choices = [] if usage is not None else [choice]
        return _sse.data(
            ChatCompletionChunk(id=rid, created=created, model=state.model_id, choices=choices, usage=usage)
        )

    def tool_finale(done: Finished) -> tuple[list[str], Any]:
        """With tools offered the answer is held back to the end: one tool_calls chunk, or the text."""
        calls = _tool_calls(job, done)
        if calls:
            deltas = [
                ToolCallDelta(index=i, id=c.id, type="function", function=c.function)
                for i, c in enumerate(calls)
            ]
            return [chunk(ToolCallsDelta(tool_calls=deltas))], "tool_calls"
        return ([chunk(ChoiceDelta(content=done.text))] if done.text else []), _finish(done)

    return _stream(
        request,
        state,
        job,
        slot,
        endpoint="/v1/chat/completions",
        started=started,
        include_usage=include_usage,
        chunk=lambda text, finish, usage, lps=None: chunk(
            ChoiceDelta() if text is None else ChoiceDelta(content=text), finish, usage, lps
        ),
        opening=chunk(ChoiceDelta(role="assistant", content="")),
        finale=None if job.tools is None else tool_finale,
    )


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, state: Authorized) -> Any:
    log_unknown_fields(body, "/v1/completions")
    _check_model(state, body.model)
    inference = state.require_inference()
    inference.check(body)
    prepared = await inference.prepare_many(lambda: inference.completion_job(body), body.n or 1)
    job, slot = prepared[0]
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
    dones = await inference.complete_many(
        prepared,
        endpoint="/v1/completions",
        started=started,
        disconnected=request.is_disconnected,
        fault=token_fault(request),
    )
    done = _combined(dones)
    _record(request, job, done)
    answer = Completion(
        id=rid,
        created=created,
        model=state.model_id,
        choices=[
            CompletionChoice(
                text=d.text, index=i, finish_reason=_finish(d), logprobs=_completion_logprobs(d.logprobs)
            )
            for i, d in enumerate(dones)
        ],
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
    sent = [0]

    def chunk(text: str | None, finish: Any, usage: Usage | None, lps: Any = None) -> str:
        logprobs = _completion_logprobs(lps, sent[0])
        sent[0] += sum(len(t.token) for t in lps or ())
        choice = CompletionChoice(text=text or "", index=0, finish_reason=finish, logprobs=logprobs)
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
    chunk: Callable[..., str],
    opening: str | None = None,
    finale: Callable[[Finished], tuple[list[str], Any]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of an OpenAI stream: ``opening`` (if any), a ``chunk(text, None, None)`` per text
    delta, ``chunk(None, finish_reason, None)`` at the end, then ``chunk(None, None, usage)`` (no
    choices) when asked; an error inside the stream; ``[DONE]``. A disconnect stops the generation.
    With ``finale`` the text deltas are held back: ``finale(finished)`` gives the chunks to send at the
    end and the finish reason (tool calls)."""
    inference = state.require_inference()
    try:
        async with inference.run(
            job, slot, endpoint=endpoint, started=started, fault=token_fault(request)
        ) as events:
            if opening is not None:
                yield opening
            async for item in events:
                if isinstance(item, TextDelta):
                    if finale is None:
                        yield chunk(
                            item.text, None, None, item.logprobs if job.params.logprobs is not None else None
                        )
                elif isinstance(item, Finished):
                    _record(request, job, item)
                    reason = _finish(item)
                    if finale is not None:
                        last, reason = finale(item)
                        for text in last:
                            yield text
                    yield chunk(None, reason, None)
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
