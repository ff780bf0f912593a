"""Server-sent events: sse-starlette's :class:`EventSourceResponse` frames the events, pings and
watches for the client going away.

The routes' generators yield each event's data (a JSON text, or ``[DONE]``); the response writes it as
``data: ...`` and a blank line. When the client disconnects, sse-starlette's disconnect listener
cancels the task that iterates the generator (``EventSourceResponse.__call__``: a task group whose
``_listen_for_disconnect`` ends it): the generator is interrupted where it waits for the next token,
its ``finally`` closes the engine stream and the generation stops at the next decode step — even when
no token is on its way (a delayed one).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from ggufship.serve._engine import Slot

DONE = "[DONE]"
SEPARATOR = "\n"  # lines end with LF (sse-starlette's default is CRLF; clients accept both)


def data(payload: Any) -> str:
    """One event's data: a compact JSON text, non-ASCII characters as they are (pydantic models
    serialized by pydantic-core, ``None`` fields kept)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json()
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def dify_ping() -> ServerSentEvent:
    """Dify's keep-alive: ``event: ping`` with ``data: {}`` (what Dify's own API sends)."""
    return ServerSentEvent(data="{}", event="ping", sep=SEPARATOR)


def comment_ping() -> ServerSentEvent:
    """A keep-alive for OpenAI clients: an SSE comment line, which every SSE parser skips."""
    return ServerSentEvent(comment="ping", sep=SEPARATOR)


def keep_streams_on_shutdown() -> None:
    """Let uvicorn drain running streams on SIGTERM (within its graceful-shutdown timeout) instead of
    sse-starlette cancelling them at once: a rollout's old pod finishes the answers it started. New
    connections are refused meanwhile (uvicorn closes its listener first); pinned by
    ``tests/test_serve_cli.py::test_sigterm_lets_a_running_stream_finish``."""
    AppStatus.disable_automatic_graceful_drain()


class SlotStreamingResponse(EventSourceResponse):
    """An SSE response holding reserved llama instances (one per choice): freed even if the body
    never starts (client gone before the first byte)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        *,
        slots: Sequence[Slot],
        headers: dict[str, str],
        ping_seconds: float,
        ping: Literal["dify", "comment"] = "comment",
    ) -> None:
        super().__init__(
            content,
            headers=headers,
            sep=SEPARATOR,
            ping=ping_seconds,
            ping_message_factory=dify_ping if ping == "dify" else comment_ping,
        )
        self._slots = list(slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for slot in self._slots:
                slot.release_unused()
