"""llama.cpp instances behind a bounded queue.

A llama.cpp context is not thread-safe, so each :class:`llama_cpp.Llama` runs one
generation at a time, in a worker thread (never on the event loop). ``parallel``
instances share the memory-mapped weights; each has its own KV cache. Requests
that find every instance busy wait in a FIFO of at most ``queue_size``; beyond
that they get :class:`QueueFullError` (429 + Retry-After). A running generation is
never interrupted by another request; it stops when it finishes, or within one
token after its consumer goes away (:meth:`Engine.stream` is closed).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ggufship.runtime import amx_active, amx_message, cpu_budget
from ggufship.serve._metrics import ServeMetrics
from ggufship.serve._quality import token_nll
from ggufship.serve.errors import (
    APIError,
    GenerationError,
    InjectedFaultError,
    ModelLoadError,
    QueueFullError,
)

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """What one generation does; validated by the routes before it gets here."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF text (root rule "root"): constrains every sampled token
    logprobs: int | None = None  # None: off; else the logprob of each token and this many alternatives


@dataclass(frozen=True)
class TokenFault:
    """Token-level fault injection for one generation (``fault_token_delay_*`` and
    ``fault_stream_error_*`` settings; chosen per request by the middleware)."""

    delay_seconds: float = 0.0  # before every generated token: a slow model
    error_after_tokens: int = 0  # 0: off; else fail (InjectedFaultError, 500) after this many tokens

    @property
    def active(self) -> bool:
        return self.delay_seconds > 0 or self.error_after_tokens > 0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (nats, under the raw logits of its position: before
    temperature, top-k/p, penalties and grammar) and the ``top`` most likely tokens there."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """Text ready to send (stop sequences already held back and cut), with the logprobs of the tokens
    generated since the previous delta when they were asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str
    ttft: float | None
    refused: bool = False
    logprobs: tuple[TokenLogprob, ...] | None = None  # every generated token's, when asked for


@dataclass(frozen=True)
class _Failed:
    error: BaseException


Item = TextDelta | Finished | _Failed


class Emitter:
    """Hands one generation's items from the thread that generates it to the event loop of the
    request that reads them (``call_soon_threadsafe``: a write to the loop's self-pipe wakes it)."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Item]) -> None:
        self.loop = loop
        self.queue = queue

    def __call__(self, item: Item) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def emit_together(items: Sequence[tuple[Emitter, Item]]) -> None:
    """Hand many generations' items over at once, each queue's in order: one
    ``call_soon_threadsafe`` (one wake-up) per event loop rather than one per item. The batch engine
    sends a decode step's tokens this way, just before the next ``llama_decode``, so that the event
    loop takes the GIL while llama.cpp computes rather than between two decodes."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
    for emitter, item in items:
        by_loop.setdefault(emitter.loop, []).append((emitter.queue, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


@dataclass
class _Run:
    """Book-keeping of one generation on the worker thread."""

    prompt_tokens: int
    started: float
    text: str = ""
    sent: int = 0
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    last: float | None = None
    token_ids: list[int] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)  # per generated token, under the raw logits
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asks for them
    logprobs_sent: int = 0

    def delta(self, text: str) -> TextDelta:
        """``text`` with the logprobs not sent yet."""
        fresh = tuple(self.logprobs[self.logprobs_sent :])
        self.logprobs_sent = len(self.logprobs)
        return TextDelta(text, fresh)

    def finished(self, reason: FinishReason, refused: bool, logprobs: bool) -> Finished:
        return Finished(
            reason,
            self.prompt_tokens,
            self.tokens,
            self.text[: self.sent],
            self.ttft,
            refused,
            tuple(self.logprobs) if logprobs else None,
        )


def token_logprob(row: Any, token: int, k: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The :class:`TokenLogprob` of ``token`` from one position's raw ``row`` of logits (log-softmax in
    float64; ``piece`` gives a token's bytes)."""
    logits = np.asarray(row, dtype=np.float64)
    peak = float(np.max(logits))
    logz = peak + float(np.log(np.sum(np.exp(logits - peak))))
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
    if k > 0:
        k = min(k, logits.shape[0])
        best = np.argpartition(-logits, k - 1)[:k]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple(_entry(int(t), float(logits[t]) - logz, piece) for t in best)
    text, lp, raw = _entry(token, float(logits[token]) - logz, piece)
    return TokenLogprob(text, lp, raw, top)


def _entry(token: int, logprob: float, piece: Callable[[int], bytes]) -> tuple[str, float, tuple[int, ...]]:
    raw = piece(token)
    return raw.decode("utf-8", "replace"), logprob, tuple(raw)


def stop_cut(text: str, sent: int, stops: Sequence[str]) -> tuple[str, bool]:
    """The part of ``text[sent:]`` that can be sent now, and whether a stop sequence ended it.

    A stop sequence is cut off with everything after it; a tail that could be the start
    of a stop sequence is held back until the next token decides.
    """
    if not stops:
        return text[sent:], False
    window_start = max(0, sent - max(len(s) for s in stops) + 1)
    best = -1
    for stop in stops:
        pos = text.find(stop, window_start)
        if pos != -1 and (best == -1 or pos < best):
            best = pos
    if best != -1:
        return text[sent : max(best, sent)], True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - sent), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[sent : len(text) - hold], False


class Slot:
    """One llama instance reserved for one request: released by the generation's worker thread
    when it ends, or by :meth:`release_unused` when the generation never started."""

    def __init__(self, engine: Engine, inst: Any) -> None:
        self._engine = engine
        self.inst = inst
        self.state: Literal["reserved", "running", "released"] = "reserved"

    def release_unused(self) -> None:
        if self.state == "reserved":
            self.state = "released"
            self._engine._release(self.inst)


class Engine:
    """The llama instances of one model; :meth:`load` them, then :meth:`stream` generations."""

    def __init__(
        self,
        model_path: Path,
        *,
        parallel: int = 1,
        queue_size: int = 16,
        n_ctx: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        retry_after: int = 1,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.model_path = model_path
        self.parallel = parallel
        self.queue_size = queue_size
        self.retry_after = retry_after
        self._n_ctx = n_ctx
        # The container's CPU limit (cgroup cpu.max, affinity), not the node's os.cpu_count().
        self._n_threads = n_threads or max(1, cpu_budget() // parallel)
        self._n_batch = n_batch
        self._metrics = metrics
        self._instances: list[Any] = []
        self._free: list[Any] = []
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="llama")
        self.metadata: dict[str, str] = {}
        self.cancelled = 0  # generations stopped because their client went away
        self._running: set[threading.Event] = set()

    # --- loading -----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Create the llama instances (blocking; call off the event loop)."""
        import llama_cpp

        logger.info(
            "loading %s: %d instance(s), %d thread(s) each", self.model_path, self.parallel, self._n_threads
        )
        if amx_active():
            logger.warning("%s; --engine batch avoids them", amx_message("serve --engine instances"))
        try:
            for _ in range(self.parallel):
                self._instances.append(
                    llama_cpp.Llama(
                        model_path=str(self.model_path),
                        n_ctx=self._n_ctx,
                        n_threads=self._n_threads,
                        n_threads_batch=self._n_threads,
                        n_batch=self._n_batch,
                        verbose=False,
                    )
                )
        except (ValueError, RuntimeError, OSError) as exc:
            self.close()
            raise ModelLoadError(f"MODEL {self.model_path}: llama.cpp cannot load it: {exc}") from exc
        self._free = list(self._instances)
        first = self._instances[0]
        self.metadata = dict(first.metadata)
        self._vocab = first._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self._n_vocab = int(first.n_vocab())

    def grammar_compiles(self, gbnf: str) -> bool:
        """Whether llama.cpp's grammar parser accepts ``gbnf`` for this model's vocabulary."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    @property
    def loaded(self) -> bool:
        return bool(self._instances)

    @property
    def n_ctx(self) -> int:
        return int(self._instances[0].n_ctx())

    def close(self) -> None:
        """Stop running generations (within a token), wait for their threads, free the instances."""
        for flag in list(self._running):
            flag.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for inst in self._instances:
            with contextlib.suppress(Exception):
                inst.close()
        self._instances.clear()
        self._free.clear()

    # --- tokenizer (vocabulary only: safe from any thread) -----------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        # (already a new list: no copy — a 4 MB prompt is ~2M tokens, and copying holds the GIL)
        return self._instances[0].tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)  # type: ignore[no-any-return]

    def token_text(self, token: int) -> str:
        return self._instances[0].detokenize([token], special=True).decode("utf-8", "replace")

    def n_vocab(self) -> int:
        return int(self._instances[0].n_vocab())

    def bos_token(self) -> int:
        return int(self._instances[0].token_bos())

    def eos_token(self) -> int:
        return int(self._instances[0].token_eos())

    def add_bos(self) -> bool:
        return bool(self._instances[0]._model.add_bos_token())

    # --- the queue ---------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.queued_now.set(len(self._waiters))
            self._metrics.in_flight_now.set(len(self._instances) - len(self._free))

    async def acquire(self) -> Slot:
        """Reserve an instance: now, after waiting in the queue, or :class:`QueueFullError`."""
        return Slot(self, await self._acquire())

    async def _acquire(self) -> Any:
        if self._free:
            inst = self._free.pop()
            self._gauges()
            return inst
        if len(self._waiters) >= self.queue_size:
            raise QueueFullError(
                f"all {self.parallel} model instance(s) busy and {len(self._waiters)} request(s) queued "
                f"(queue_size {self.queue_size}); retry later",
                retry_after=self.retry_after,
            )
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._gauges()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(fut.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            self._gauges()

    def _release(self, inst: Any) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(inst)
                self._gauges()
                return
        self._free.append(inst)
        self._gauges()

    # --- generation --------------------------------------------------------------------------------------

    async def stream(
        self,
        slot: Slot,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        endpoint: str,
        started: float,
        fault: TokenFault | None = None,
    ) -> AsyncIterator[TextDelta | Finished]:
        """Generate from ``prompt`` on ``slot``: :class:`TextDelta` items, then one :class:`Finished`.

        ``started`` is the request's arrival (``time.perf_counter()``), for the time to
        first token. Closing the iterator early (client gone) stops the generation
        within one token and frees the instance when the worker thread is done.
        ``fault`` injects a per-token delay and/or a failure after some tokens.
        A failed generation raises :class:`APIError` (``GenerationError``, or the
        injected fault's ``InjectedFaultError``). Use with ``contextlib.aclosing``.
        """
        if slot.state != "reserved":
            raise RuntimeError(f"slot is {slot.state}, not reserved")
        slot.state = "running"
        inst = slot.inst
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        cancel = threading.Event()
        emit = Emitter(loop, queue)

        def work() -> None:
            self._running.add(cancel)
            try:
                self._generate(inst, list(prompt), params, cancel, emit, endpoint, started, fault)
            except InjectedFaultError as exc:
                logger.warning("%s", exc.message)
                emit(_Failed(exc))
            except BaseException as exc:
                logger.exception("generation failed")
                emit(_Failed(exc))
            finally:
                self._running.discard(cancel)
                slot.state = "released"
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._release, inst)

        try:
            loop.run_in_executor(self._executor, work)
        except RuntimeError:
            slot.state = "released"
            self._release(inst)
            raise
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Failed):
                    if isinstance(item.error, APIError):
                        raise item.error
                    raise GenerationError(f"generation failed: {item.error}")
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancel.set()

    def _generate(
        self,
        inst: Any,
        prompt: list[int],
        p: SamplingParams,
        cancel: threading.Event,
        emit: Callable[[Item], None],
        endpoint: str,
        started: float,
        fault: TokenFault | None = None,
    ) -> None:
        from llama_cpp.llama_grammar import LlamaGrammar

        inst.set_seed(p.seed if p.seed is not None else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        run = _Run(prompt_tokens=len(prompt), started=started)
        limit = min(p.max_tokens, self.n_ctx - len(prompt))
        reason: FinishReason = "length"
        cut_by_stop = False
        delay = fault.delay_seconds if fault is not None else 0.0
        fail_after = fault.error_after_tokens if fault is not None else 0
        gen = inst.generate(
            prompt,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            temp=p.temperature,
            repeat_penalty=p.repeat_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            reset=True,
            grammar=None if p.grammar is None else LlamaGrammar.from_string(p.grammar, verbose=False),
        )
        try:
            while run.tokens < limit:
                if cancel.is_set():
                    reason = "cancelled"
                    break
                token = next(gen)
                # injected slow model: the token "takes" that much longer, so TTFT, ITL and e2e see it;
                # waiting on the cancel flag keeps a disconnect (or shutdown) effective at once
                if delay > 0 and cancel.wait(delay):
                    reason = "cancelled"
                    break
                now = time.perf_counter()
                if self._is_eog(self._vocab, token):
                    reason = "stop"
                    break
                run.tokens += 1
                run.token_ids.append(token)
                self._record_nll(inst, token, run)
                if p.logprobs is not None:
                    row = np.ctypeslib.as_array(self._logits_ith(inst.ctx, -1), shape=(self._n_vocab,))
                    run.logprobs.append(token_logprob(row, token, p.logprobs, lambda t: inst.detokenize([t])))
                if run.last is None:
                    run.ttft = now - started
                else:
                    run.gaps.append(now - run.last)
                run.last = now
                run.text += decoder.decode(inst.detokenize([token]))
                ready, stopped = stop_cut(run.text, run.sent, p.stop)
                if ready:
                    emit(run.delta(ready))
                    run.sent += len(ready)
                if stopped:
                    run.text = run.text[: run.sent]
                    reason = "stop"
                    cut_by_stop = True
                    break
                if fail_after and run.tokens >= fail_after:
                    # like a real failure of llama.cpp: no Finished, no generation metrics
                    raise InjectedFaultError(
                        500,
                        f"fault injected: generation failed after {run.tokens} token(s) "
                        f"(fault_stream_error_after_tokens={fail_after})",
                    )
        except StopIteration:
            reason = "stop"
        finally:
            gen.close()
        self._finish_run(
            run,
            reason,
            decoder=None if cut_by_stop else decoder,
            emit=emit,
            endpoint=endpoint,
            logprobs=p.logprobs is not None,
        )

    def _finish_run(
        self,
        run: _Run,
        reason: FinishReason,
        *,
        decoder: codecs.IncrementalDecoder | None,
        emit: Callable[[Item], None],
        endpoint: str,
        logprobs: bool,
    ) -> None:
        """The end of one generation, for every engine: flush ``decoder`` (None when a stop sequence cut
        the text), send the text not sent yet (unless cancelled), record the generation's metrics, and
        emit :class:`Finished`."""
        if reason == "cancelled":
            self.cancelled += 1
            logger.info("generation stopped after %d token(s): client gone", run.tokens)
        if decoder is not None:
            run.text += decoder.decode(b"", final=True)
        if reason != "cancelled" and run.sent < len(run.text):
            emit(run.delta(run.text[run.sent :]))
            run.sent = len(run.text)
        refused = False
        if self._metrics is not None:
            refused = self._metrics.observe_generation(
                endpoint,
                prompt_tokens=run.prompt_tokens,
                completion_tokens=run.tokens,
                ttft=run.ttft,
                gaps=run.gaps,
                text=run.text,
                finish_reason=reason,
                tokens=run.token_ids,
                nlls=run.nlls,
            )
        emit(run.finished(reason, refused, logprobs))

    def _record_nll(self, inst: Any, token: int, run: _Run) -> None:
        """The sampled token's NLL from the logits it was sampled from.

        ``Llama.generate`` yields a token right after sampling it from the last position's
        logits (``Llama.sample`` with ``idx`` → ``ridx = -1``) and evaluates it only when asked
        for the next one, so the context's last logits (``llama_get_logits_ith(ctx, -1)``, the
        public C API on the public ``Llama.ctx``) are still those of this token's position.
        """
        if self._metrics is None:
            return
        try:
            row = np.ctypeslib.as_array(self._logits_ith(inst.ctx, -1), shape=(self._n_vocab,))
            run.nlls.append(token_nll(row, token))
        except (ValueError, TypeError) as exc:  # no logits for this position: skip the token
            logger.debug("no logits for token %d: %s", token, exc)
