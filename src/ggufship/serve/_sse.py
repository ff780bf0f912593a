"""Server-sent events framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from ggufship.serve._engine import Slot

DONE = "data: [DONE]\n\n"
PING = "event: ping\ndata: {}\n\n"


def data(payload: Any) -> str:
    """One ``data:`` event with a JSON payload (pydantic models dumped, ``None`` fields kept)."""
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json")
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def with_pings(events: AsyncIterator[str], interval: float, ping: str = PING) -> AsyncIterator[str]:
    """Pass ``events`` through; whenever none came for ``interval`` seconds, send ``ping``."""
    it = aiter(events)
    pending: asyncio.Task[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ping
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


class SlotStreamingResponse(StreamingResponse):
    """An SSE response holding reserved llama instances (one per choice): freed even if the body
    never starts (client gone before the first byte)."""

    def __init__(
        self, content: AsyncIterator[str], *, slots: Sequence[Slot], headers: dict[str, str]
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._slots = list(slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for slot in self._slots:
                slot.release_unused()
