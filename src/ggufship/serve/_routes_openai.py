"""OpenAI routes: thin — validate, hand to :class:`Inference`, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Annotated, Any, Protocol

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
from ggufship.serve._tools import ArgumentsDelta, CallStart, CallStream, ContentDelta, StreamEvent
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
    FunctionCallDelta,
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


def _finish(done: Finished, *, call: bool = False) -> Any:
    """The OpenAI ``finish_reason``: ``length`` when cut off (a call too: it is sent as far as it
    got), ``tool_calls`` for an answer that is a tool call and ended by itself, else ``stop``."""
    if done.reason == "length":
        return "length"
    return "tool_calls" if call and done.reason == "stop" else "stop"


def _tool_calls(job: Job, done: Finished) -> list[ToolCall] | None:
    """The answer as tool calls, when tools were offered and it is one: read as a stream reads it
    (:class:`CallStream`), so a blocking answer and the same answer streamed agree. A finished call's
    arguments must be a JSON object; a call cut off by ``max_tokens`` or the context window
    (``length``) comes back as the call with its arguments as far as the model wrote them — what the
    stream sent before its ``length`` finish (OpenAI documents that ``arguments`` may not be valid
    JSON)."""
    if job.tools is None or done.reason not in ("stop", "length"):
        return None
    calls = CallStream(job.tools.offered)
    events = calls.feed(done.text)
    rest, is_call = calls.finish()
    events += rest
    start = next((e for e in events if isinstance(e, CallStart)), None)
    if not is_call or start is None:
        return None
    arguments = "".join(e.text for e in events if isinstance(e, ArgumentsDelta))
    if done.reason == "length":
        return [ToolCall(id=start.id, function=FunctionCall(name=start.name, arguments=arguments))]
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    return [ToolCall(id=start.id, function=FunctionCall(name=start.name, arguments=arguments))]


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
    job = prepared[0][0]
    started = request_started(request)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SlotStreamingResponse(
            _chat_stream(request, state, prepared, rid, created, include_usage, started),
            slots=[slot for _, slot in prepared],
            headers={**_headers(job), "cache-control": "no-cache"},
            ping_seconds=state.settings.ping_interval_seconds,
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
            choices.append(ChatChoice(index=index, message=message, finish_reason=_finish(done, call=True)))
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


class _ChatChoice:
    """The chunks of one choice of a chat stream; with tools offered the text goes through a
    :class:`CallStream` (a tool call streams as OpenAI's ``tool_calls`` deltas).

    With ``logprobs`` asked, a content chunk carries the logprobs of the tokens whose text it sends.
    Tokens whose text the :class:`CallStream` holds back keep their logprobs here until that text goes
    out as content; tokens that become a tool call have none sent (``logprobs`` holds message content
    only, as in a blocking answer that is a call)."""

    def __init__(self, index: int, job: Job, chunk: Callable[..., str]) -> None:
        self.index = index
        self.job = job
        self.chunk = chunk
        self.calls = None if job.tools is None else CallStream(job.tools.offered)
        self.wants_logprobs = job.params.logprobs is not None
        self.held: list[TokenLogprob] = []  # logprobs of text the CallStream has not sent yet

    def opening(self) -> list[str]:
        return [self.chunk(self.index, ChoiceDelta(role="assistant", content=""))]

    def delta(self, item: TextDelta) -> list[str]:
        if self.calls is None:
            lps = item.logprobs if self.wants_logprobs else None
            return [self.chunk(self.index, ChoiceDelta(content=item.text), lps=lps)]
        self.held.extend(item.logprobs)
        return [self._event(e) for e in self.calls.feed(item.text)]

    def end(self, done: Finished) -> list[str]:
        out = []
        is_call = False
        if self.calls is not None:
            rest, is_call = self.calls.finish()
            out = [self._event(e) for e in rest]
        out.append(self.chunk(self.index, ChoiceDelta(), finish=_finish(done, call=is_call)))
        return out

    def _event(self, event: StreamEvent) -> str:
        taken, self.held = self.held, []
        if isinstance(event, ContentDelta):
            lps = taken if self.wants_logprobs else None
            return self.chunk(self.index, ChoiceDelta(content=event.text), lps=lps)
        if isinstance(event, CallStart):
            call = ToolCallDelta(
                index=0,
                id=event.id,
                type="function",
                function=FunctionCallDelta(name=event.name, arguments=""),
            )
        else:
            call = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=event.text))
        return self.chunk(self.index, ToolCallsDelta(tool_calls=[call]))


def _chat_stream(
    request: Request,
    state: ServerState,
    prepared: list[tuple[Job, Slot]],
    rid: str,
    created: int,
    include_usage: bool,
    started: float,
) -> AsyncIterator[str]:
    def chunk(
        index: int, delta: ChoiceDelta, finish: Any = None, lps: Sequence[TokenLogprob] | None = None
    ) -> str:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=_chat_logprobs(lps))
        return _sse.data(ChatCompletionChunk(id=rid, created=created, model=state.model_id, choices=[choice]))

    def usage_chunk(usage: Usage) -> str:
        return _sse.data(
            ChatCompletionChunk(id=rid, created=created, model=state.model_id, choices=[], usage=usage)
        )

    return _stream(
        request,
        state,
        prepared,
        [_ChatChoice(i, job, chunk) for i, (job, _) in enumerate(prepared)],
        endpoint="/v1/chat/completions",
        started=started,
        usage_chunk=usage_chunk if include_usage else None,
    )


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, state: Authorized) -> Any:
    log_unknown_fields(body, "/v1/completions")
    _check_model(state, body.model)
    inference = state.require_inference()
    inference.check(body)
    prepared = await inference.prepare_many(lambda: inference.completion_job(body), body.n or 1)
    job = prepared[0][0]
    started = request_started(request)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SlotStreamingResponse(
            _completion_stream(request, state, prepared, rid, created, include_usage, started),
            slots=[slot for _, slot in prepared],
            headers={**_headers(job), "cache-control": "no-cache"},
            ping_seconds=state.settings.ping_interval_seconds,
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


class _CompletionChoice:
    """The chunks of one choice of a legacy completions stream (``text_offset`` counted per choice)."""

    def __init__(self, index: int, job: Job, chunk: Callable[..., str]) -> None:
        self.index = index
        self.job = job
        self.chunk = chunk
        self.sent = 0

    def opening(self) -> list[str]:
        return []

    def delta(self, item: TextDelta) -> list[str]:
        lps = item.logprobs if self.job.params.logprobs is not None else None
        logprobs = _completion_logprobs(lps, self.sent)
        self.sent += sum(len(t.token) for t in lps or ())
        return [self.chunk(self.index, item.text, None, logprobs)]

    def end(self, done: Finished) -> list[str]:
        return [self.chunk(self.index, "", _finish(done), None)]


def _completion_stream(
    request: Request,
    state: ServerState,
    prepared: list[tuple[Job, Slot]],
    rid: str,
    created: int,
    include_usage: bool,
    started: float,
) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish: Any, logprobs: CompletionLogprobs | None) -> str:
        choice = CompletionChoice(text=text, index=index, finish_reason=finish, logprobs=logprobs)
        return _sse.data(Completion(id=rid, created=created, model=state.model_id, choices=[choice]))

    def usage_chunk(usage: Usage) -> str:
        return _sse.data(Completion(id=rid, created=created, model=state.model_id, choices=[], usage=usage))

    return _stream(
        request,
        state,
        prepared,
        [_CompletionChoice(i, job, chunk) for i, (job, _) in enumerate(prepared)],
        endpoint="/v1/completions",
        started=started,
        usage_chunk=usage_chunk if include_usage else None,
    )


async def _events(
    request: Request, state: ServerState, prepared: list[tuple[Job, Slot]], endpoint: str, started: float
) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
    """The engine items of every choice as they come, as ``(choice index, item)``; a failed choice
    raises. One choice is read directly from its engine stream; several are pumped into one queue by
    a task each. Closing this iterator closes the engine streams (the generations stop)."""
    inference = state.require_inference()
    fault = token_fault(request)
    if len(prepared) == 1:
        job, slot = prepared[0]
        async with inference.run(job, slot, endpoint=endpoint, started=started, fault=fault) as items:
            async for item in items:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, TextDelta | Finished | Exception]] = asyncio.Queue()

    async def pump(index: int, job: Job, slot: Slot) -> None:
        try:
            async with inference.run(job, slot, endpoint=endpoint, started=started, fault=fault) as items:
                async for item in items:
                    queue.put_nowait((index, item))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, job, slot)) for i, (job, slot) in enumerate(prepared)]
    try:
        while True:
            index, got = await queue.get()
            if isinstance(got, Exception):
                raise got
            yield index, got
    finally:
        for task in tasks:  # (their engine streams close at once: the generations stop)
            task.cancel()


class _Choice(Protocol):
    def opening(self) -> list[str]: ...
    def delta(self, item: TextDelta) -> list[str]: ...
    def end(self, done: Finished) -> list[str]: ...


async def _stream(
    request: Request,
    state: ServerState,
    prepared: list[tuple[Job, Slot]],
    choices: list[_Choice],
    *,
    endpoint: str,
    started: float,
    usage_chunk: Callable[[Usage], str] | None,
) -> AsyncIterator[str]:
    """The SSE body of an OpenAI stream of ``len(prepared)`` choices, generated together (one sequence
    each): every choice's opening chunks, its chunks per text delta as they come (interleaved, each
    naming its choice's index), its closing chunks with the finish reason; then the usage chunk (no
    choices) when asked; an error inside the stream; ``[DONE]``. A failed choice stops every
    generation; so does a disconnect: sse-starlette's listener cancels this generator where it waits
    for the next item (see :mod:`ggufship.serve._sse`), and closing the engine streams stops them."""
    try:
        async with contextlib.aclosing(_events(request, state, prepared, endpoint, started)) as events:
            for choice in choices:
                for text in choice.opening():
                    yield text
            dones: dict[int, Finished] = {}
            async for index, item in events:
                if isinstance(item, TextDelta):
                    for text in choices[index].delta(item):
                        yield text
                else:
                    dones[index] = item
                    for text in choices[index].end(item):
                        yield text
                    if len(dones) == len(prepared):
                        break
        job = prepared[0][0]
        done = _combined([dones[i] for i in range(len(prepared))])
        _record(request, job, done)
        if usage_chunk is not None:
            yield usage_chunk(_usage(job, done))
    except APIError as exc:
        yield _sse.data(error_body(stream_failed(request, exc)))
    except Exception as exc:
        logger.exception("stream failed")
        yield _sse.data(error_body(stream_failed(request, GenerationError(f"generation failed: {exc}"))))
    yield _sse.DONE
