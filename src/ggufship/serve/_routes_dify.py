"""Dify app API routes: ``/v1/chat-messages`` and ``/v1/completion-messages``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request

from ggufship.serve import _sse
from ggufship.serve._context import Message
from ggufship.serve._conversations import Conversation
from ggufship.serve._engine import Finished, Slot, TextDelta
from ggufship.serve._inference import Job, log_unknown_fields
from ggufship.serve._routes_openai import Authorized, CheckedRoute
from ggufship.serve._sse import SlotStreamingResponse
from ggufship.serve._state import ServerState, audit_info, request_started, stream_failed, token_fault
from ggufship.serve.errors import APIError, GenerationError, InvalidRequestError
from ggufship.serve.protocol.dify import (
    ChatMessagesRequest,
    ChatMessagesResponse,
    CompletionMessagesRequest,
    DifyMetadata,
    DifyUsage,
    ErrorEvent,
    MessageEndEvent,
    MessageEvent,
)
from ggufship.serve.protocol.errors import ERROR_RESPONSES

logger = logging.getLogger(__name__)

router = APIRouter(responses=ERROR_RESPONSES, route_class=CheckedRoute)


def _metadata(done: Finished, started: float) -> DifyMetadata:
    return DifyMetadata(
        usage=DifyUsage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
            latency=round(time.perf_counter() - started, 6),
        )
    )


def _system(inputs: dict[str, Any]) -> list[Message]:
    system = inputs.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise InvalidRequestError("inputs.system must be a string", param="inputs.system")
    return [Message("system", system)]


@router.post("/v1/chat-messages", response_model=ChatMessagesResponse)
async def chat_messages(body: ChatMessagesRequest, request: Request, state: Authorized) -> Any:
    log_unknown_fields(body, "/v1/chat-messages")
    inference = state.require_inference()
    store = state.conversations
    conv = store.get(body.conversation_id, body.user) if body.conversation_id else None
    messages = _system(body.inputs)
    for query, answer in conv.turns if conv else ():
        messages += [Message("user", query), Message("assistant", answer)]
    messages.append(Message("user", body.query))
    job, slot = await inference.prepare(lambda: inference.dify_job(messages))
    if conv is None:
        conv = store.create(body.user)
    audit_info(request).update(user=body.user, conversation_id=conv.id)
    return await _answer(request, state, job, slot, "chat", body.response_mode, conv, body.query)


@router.post("/v1/completion-messages", response_model=ChatMessagesResponse)
async def completion_messages(body: CompletionMessagesRequest, request: Request, state: Authorized) -> Any:
    log_unknown_fields(body, "/v1/completion-messages")
    inference = state.require_inference()
    query = body.inputs.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidRequestError("inputs.query: a non-empty string is required", param="inputs.query")
    messages = [*_system(body.inputs), Message("user", query)]
    job, slot = await inference.prepare(lambda: inference.dify_job(messages))
    audit_info(request).update(user=body.user)
    return await _answer(request, state, job, slot, "completion", body.response_mode, None, query)


async def _answer(
    request: Request,
    state: ServerState,
    job: Job,
    slot: Slot,
    mode: Literal["chat", "completion"],
    response_mode: str,
    conv: Conversation | None,
    query: str,
) -> Any:
    inference = state.require_inference()
    endpoint = request.url.path
    started = request_started(request)
    task_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
    if response_mode == "blocking":
        done = await inference.complete(
            job,
            slot,
            endpoint=endpoint,
            started=started,
            disconnected=request.is_disconnected,
            fault=token_fault(request),
        )
        _record(request, done)
        if conv is not None:
            state.conversations.append(conv, query, done.text)
        return ChatMessagesResponse(
            task_id=task_id,
            id=message_id,
            message_id=message_id,
            conversation_id=conv.id if conv else None,
            mode=mode,
            answer=done.text,
            metadata=_metadata(done, started),
            created_at=int(time.time()),
        )
    events = _stream(request, state, job, slot, conv, query, task_id, message_id, started)
    return SlotStreamingResponse(
        events,
        slots=[slot],
        headers={"cache-control": "no-cache"},
        ping_seconds=state.settings.ping_interval_seconds,
        ping="dify",
    )


def _record(request: Request, done: Finished) -> None:
    audit_info(request).update(
        prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, finish_reason=done.reason
    )


async def _stream(
    request: Request,
    state: ServerState,
    job: Job,
    slot: Slot,
    conv: Conversation | None,
    query: str,
    task_id: str,
    message_id: str,
    started: float,
) -> AsyncIterator[str]:
    inference = state.require_inference()
    conv_id = conv.id if conv else None
    created = int(time.time())
    try:
        async with inference.run(
            job, slot, endpoint=request.url.path, started=started, fault=token_fault(request)
        ) as events:
            async for item in events:
                if isinstance(item, TextDelta):
                    yield _sse.data(
                        MessageEvent(
                            task_id=task_id,
                            message_id=message_id,
                            conversation_id=conv_id,
                            answer=item.text,
                            created_at=created,
                        )
                    )
                elif isinstance(item, Finished):
                    _record(request, item)
                    if conv is not None:
                        state.conversations.append(conv, query, item.text)
                    yield _sse.data(
                        MessageEndEvent(
                            task_id=task_id,
                            message_id=message_id,
                            conversation_id=conv_id,
                            metadata=_metadata(item, started),
                        )
                    )
    except APIError as exc:
        yield _sse.data(_error_event(stream_failed(request, exc), task_id, message_id))
    except Exception as exc:
        logger.exception("stream failed")
        failure = stream_failed(request, GenerationError(f"generation failed: {exc}"))
        yield _sse.data(_error_event(failure, task_id, message_id))


def _error_event(exc: APIError, task_id: str, message_id: str) -> ErrorEvent:
    return ErrorEvent(
        task_id=task_id, message_id=message_id, status=exc.status_code, code=exc.code, message=exc.message
    )
