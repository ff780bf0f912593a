"""Between the wire and the engine: parameter mapping and validation, prompts, generation."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from ggufship.serve._context import ContextWindow, Message, Prompt
from ggufship.serve._engine import Engine, Finished, SamplingParams, Slot, TextDelta, TokenFault
from ggufship.serve._tools import ToolUse, call_schema, tool_use
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
    tools: ToolUse | None = None  # tools offered (their answers are parsed into tool_calls)


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
    top = getattr(req, "top_logprobs", None)
    if top is not None and req.logprobs is not True:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")


def requested_logprobs(req: Any) -> int | None:
    """How many alternatives per token (None: no logprobs). Chat: ``logprobs: true`` with
    ``top_logprobs: k``; completions: ``logprobs: k``."""
    if isinstance(req.logprobs, bool) or req.logprobs is None:
        return (getattr(req, "top_logprobs", None) or 0) if req.logprobs else None
    return int(req.logprobs)


def check_response_format(req: Any) -> None:
    """The cheap part of ``response_format``: its shape, and a schema that is a JSON schema."""
    fmt = getattr(req, "response_format", None)
    if fmt is None or fmt.type != "json_schema":
        return
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequestError(
            "response_format: type json_schema needs json_schema.schema", param="response_format"
        )
    check_json_schema(fmt.json_schema.schema_, "response_format")


def check_json_schema(schema: Any, param: str) -> None:
    """``schema`` is a valid JSON schema (Draft 2020-12 meta-schema), or a 400 naming ``param``."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise InvalidRequestError(
            f"{param}: not a valid JSON schema at {where}: {exc.message}", param=param
        ) from None


def schema_grammar(schema: Any, param: str) -> str:
    """llama-cpp-python's JSON-schema → GBNF conversion, or a 400 naming ``param``."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions/KeyErrors for what it cannot do
        raise InvalidRequestError(
            f"{param}: llama.cpp cannot turn this JSON schema into a grammar: {exc!r}", param=param
        ) from None


def response_grammar(req: Any) -> str | None:
    """The GBNF grammar for ``response_format`` (None for plain text)."""
    fmt = getattr(req, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF
    check_response_format(req)
    return schema_grammar(fmt.json_schema.schema_, "response_format")


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
        logprobs=requested_logprobs(req),
    )


class Inference:
    """Validated requests in, text out; shared by the OpenAI and Dify routes."""

    def __init__(self, engine: Engine, context: ContextWindow, settings: ServeSettings) -> None:
        self.engine = engine
        self.context = context
        self.settings = settings
        # requests with n > 1 gather their slots one request at a time: two of them each holding
        # part of what they need would wait on each other forever
        self._gathering = asyncio.Lock()

    # --- cheap checks, on the event loop: a bad parameter is a 400 even when every instance is busy ---

    def check(self, req: Any) -> None:
        """Validate what costs nothing to validate (everything but the prompt)."""
        self._params(req)
        tool_use(req)
        n = getattr(req, "n", None) or 1
        if n > self.engine.parallel:
            raise InvalidRequestError(
                f"n: at most {self.engine.parallel} choices per request (the server's parallel "
                f"sequences), got {n}",
                param="n",
            )
        if getattr(req, "echo", None):
            raise InvalidRequestError("echo is not supported by this server", param="echo")

    def _params(self, req: Any) -> tuple[int | None, SamplingParams]:
        reject_unsupported(req)
        check_response_format(req)
        requested = requested_max_tokens(req)
        return requested, sampling(req, self.settings, 1)

    # --- prompt building: rendering and tokenization, in a worker thread under a reserved slot ---------

    def chat_job(self, req: Any, messages: Sequence[Message]) -> Job:
        requested, params = self._params(req)
        tools = tool_use(req)
        if tools is not None and tools.forced:
            if response_grammar(req) is not None:
                raise InvalidRequestError(
                    "tool_choice: a forced tool call and a JSON response_format exclude each other",
                    param="tool_choice",
                )
            grammar = self.grammar(schema_grammar(call_schema(tools.forced), "tools"), "tools")
        else:
            grammar = self.grammar(response_grammar(req), "response_format")
        prompt = self.context.chat_prompt(messages, requested, tools.offered if tools else ())
        return Job(prompt, replace(params, max_tokens=prompt.max_tokens, grammar=grammar), tools)

    def grammar(self, gbnf: str | None, param: str) -> str | None:
        """``gbnf`` if llama.cpp compiles it for this model, else a 400 naming ``param``."""
        if gbnf is not None and not self.engine.grammar_compiles(gbnf):
            raise InvalidRequestError(f"{param}: llama.cpp cannot compile the grammar for it", param=param)
        return gbnf

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

    async def prepare_many(self, build: Callable[[], Job], n: int) -> list[tuple[Job, Slot]]:
        """:meth:`prepare` for ``n`` choices: ``n`` slots (all or none), one prompt, choice ``i`` sampled
        with ``seed + i`` when a seed is given (so the choices differ and each is reproducible)."""
        if n == 1:
            return [await self.prepare(build)]
        slots: list[Slot] = []
        try:
            async with self._gathering:
                for _ in range(n):
                    slots.append(await self.reserve())
            job = await asyncio.to_thread(build)
        except BaseException:
            for slot in slots:
                slot.release_unused()
            raise
        seed = job.params.seed
        return [
            (
                job
                if seed is None
                else replace(job, params=replace(job.params, seed=(seed + i) % (2**32 - 1))),
                slot,
            )
            for i, slot in enumerate(slots)
        ]

    async def complete_many(self, prepared: list[tuple[Job, Slot]], **kw: Any) -> list[Finished]:
        """:meth:`complete` for every choice at once (the batch decodes them together); one failing
        stops the others."""
        if len(prepared) == 1:
            job, slot = prepared[0]
            return [await self.complete(job, slot, **kw)]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.complete(job, slot, **kw)) for job, slot in prepared]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        finally:
            for _, slot in prepared:
                slot.release_unused()
        return [t.result() for t in tasks]

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
