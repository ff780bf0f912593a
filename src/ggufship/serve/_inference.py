"""Between the wire and the engine: parameter mapping and validation, prompts, generation."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ggufship.serve._context import ContextWindow, Message, Prompt
from ggufship.serve._engine import Engine, Finished, SamplingParams, Slot, TextDelta, TokenFault
from ggufship.serve.errors import ClientGoneError, InvalidRequestError
from ggufship.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

#: Defaults of the parameters outside the OpenAI spec (llama-cpp-python's server uses the same).
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
#: How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Job:
    """One validated request: the prompt and how to sample."""

    prompt: Prompt
    params: SamplingParams


def log_unknown_fields(model: BaseModel, where: str) -> None:
    """Unknown fields are accepted (clients send vendor extras) but never silently dropped."""
    names = (model.model_extra or {}).keys()
    if names:
        extra = heapq.nsmallest(10, names)  # linear: a body may carry many thousands of them
        shown = ", ".join(repr(name[:40]) for name in extra)
        more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
        logger.warning("%s: ignoring unknown field(s): %s%s", where, shown, more)


def requested_max_tokens(req: Any) -> int | None:
    """``max_completion_tokens`` / ``max_tokens`` / ``max_new_tokens`` (TGI): one value, or 400."""
    given = {
        name: value
        for name in ("max_completion_tokens", "max_tokens", "max_new_tokens")
        if (value := getattr(req, name, None)) is not None
    }
    if len(set(given.values())) > 1:
        names = " and ".join(given)
        raise InvalidRequestError(f"{names} disagree ({given}); send one of them", param=next(iter(given)))
    return next(iter(given.values()), None)


def stop_sequences(req: Any, settings: ServeSettings) -> tuple[str, ...]:
    stops: list[str] = []
    param = "stop"
    if isinstance(req.stop, str):
        stops.append(req.stop)
    elif req.stop:
        stops.extend(req.stop)
    if getattr(req, "stop_sequences", None):
        param = "stop_sequences" if not stops else "stop"
        stops.extend(req.stop_sequences)
    unique = tuple(dict.fromkeys(stops))
    if len(unique) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"{param}: at most {settings.max_stop_sequences} stop sequences (stop and stop_sequences "
            f"together), got {len(unique)}",
            param=param,
        )
    for s in unique:
        if not s:
            raise InvalidRequestError(f"{param}: empty stop sequence", param=param)
        if len(s) > settings.max_stop_length:
            raise InvalidRequestError(
                f"{param}: stop sequence longer than {settings.max_stop_length} characters", param=param
            )
    return unique


def reject_unsupported(req: Any) -> None:
    if req.logit_bias:
        raise InvalidRequestError("logit_bias is not supported by this server", param="logit_bias")
    if req.logprobs:
        raise InvalidRequestError("logprobs are not supported by this server", param="logprobs")


def sampling(req: Any, settings: ServeSettings, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
        min_p=DEFAULT_MIN_P if req.min_p is None else req.min_p,
        repeat_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        stop=stop_sequences(req, settings),
    )


class Inference:
    """Validated requests in, text out; shared by the OpenAI and Dify routes."""

    def __init__(self, engine: Engine, context: ContextWindow, settings: ServeSettings) -> None:
        self.engine = engine
        self.context = context
        self.settings = settings

    # --- cheap checks, on the event loop: a bad parameter is a 400 even when every instance is busy ---

    def check(self, req: Any) -> None:
        """Validate what costs nothing to validate (everything but the prompt)."""
        self._params(req)
        if getattr(req, "echo", None):
            raise InvalidRequestError("echo is not supported by this server", param="echo")

    def _params(self, req: Any) -> tuple[int | None, SamplingParams]:
        reject_unsupported(req)
        requested = requested_max_tokens(req)
        return requested, sampling(req, self.settings, 1)

    # --- prompt building: rendering and tokenization, in a worker thread under a reserved slot ---------

    def chat_job(self, req: Any, messages: Sequence[Message]) -> Job:
        requested, params = self._params(req)
        prompt = self.context.chat_prompt(messages, requested)
        return Job(prompt, _with_max(params, prompt.max_tokens))

    def completion_job(self, req: Any) -> Job:
        self.check(req)
        requested, params = self._params(req)  # (cheap; the values for the job)
        prompt_in = req.prompt
        if isinstance(prompt_in, list):
            if prompt_in and all(isinstance(x, str) for x in prompt_in):
                if len(prompt_in) != 1:
                    raise InvalidRequestError(
                        "prompt: only one prompt per request is supported", param="prompt"
                    )
                prompt_in = prompt_in[0]
            elif not prompt_in:
                raise InvalidRequestError("prompt: empty", param="prompt")
            else:
                vocab = self.engine.n_vocab()
                bad = [t for t in prompt_in if not isinstance(t, int) or t < 0 or t >= vocab]
                if bad:
                    raise InvalidRequestError(f"prompt: token id(s) out of range: {bad[:5]}", param="prompt")
        prompt = self.context.text_prompt(prompt_in, requested)
        if not prompt.tokens:
            raise InvalidRequestError("prompt: empty", param="prompt")
        return Job(prompt, _with_max(params, prompt.max_tokens))

    def dify_job(self, messages: Sequence[Message]) -> Job:
        params = SamplingParams(max_tokens=1, temperature=0.7, top_k=DEFAULT_TOP_K, min_p=DEFAULT_MIN_P)
        prompt = self.context.chat_prompt(messages, None)
        return Job(prompt, _with_max(params, prompt.max_tokens))

    async def reserve(self) -> Slot:
        """A llama instance for one request (waits in the queue; 429 when it is full)."""
        return await self.engine.acquire()

    async def prepare(self, build: Callable[[], Job]) -> tuple[Job, Slot]:
        """Reserve an instance (the queue's limit and its 429 apply), then ``build`` the job — render and
        tokenize the prompt — in a worker thread, so that neither a huge prompt nor a slow template ever
        blocks the event loop and at most ``parallel`` prompts are built at once. The slot is freed
        again if building fails."""
        slot = await self.reserve()
        try:
            job = await asyncio.to_thread(build)
        except BaseException:
            slot.release_unused()
            raise
        return job, slot

    @contextlib.asynccontextmanager
    async def run(
        self, job: Job, slot: Slot, *, endpoint: str, started: float, fault: TokenFault | None = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """The engine's event stream for ``job``, closed (generation stopped) on exit."""
        try:
            stream = self.engine.stream(
                slot, job.prompt.tokens, job.params, endpoint=endpoint, started=started, fault=fault
            )
            async with contextlib.aclosing(stream) as events:
                yield events
        finally:
            slot.release_unused()

    async def complete(
        self,
        job: Job,
        slot: Slot,
        *,
        endpoint: str,
        started: float,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        fault: TokenFault | None = None,
    ) -> Finished:
        """Run ``job`` to the end (a non-streaming answer). ``disconnected`` is polled every
        :data:`DISCONNECT_POLL_SECONDS` while waiting; when the client is gone the generation
        stops (within one token) and :class:`ClientGoneError` is raised. ``slot`` comes from
        :meth:`prepare` and is freed on return."""
        async with self.run(job, slot, endpoint=endpoint, started=started, fault=fault) as events:
            it = aiter(events)
            check_at = time.monotonic() + DISCONNECT_POLL_SECONDS
            while True:
                step = asyncio.ensure_future(anext(it))
                while True:
                    wait = max(0.0, check_at - time.monotonic())
                    done, _ = await asyncio.wait({step}, timeout=wait)
                    if time.monotonic() >= check_at:
                        check_at = time.monotonic() + DISCONNECT_POLL_SECONDS
                        if disconnected is not None and await disconnected():
                            step.cancel()
                            with contextlib.suppress(BaseException):
                                await step
                            raise ClientGoneError("client closed the connection; generation stopped")
                    if done:
                        break
                try:
                    item = step.result()
                except StopAsyncIteration:
                    break
                if isinstance(item, Finished):
                    return item
        raise RuntimeError("engine stream ended without Finished")  # pragma: no cover


def _with_max(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)


def now() -> float:
    return time.perf_counter()


__all__ = ["Finished", "Inference", "Job", "TextDelta"]
