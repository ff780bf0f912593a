"""The continuous-batching engine (serve/_batch.py) on a real llama.cpp context: greedy answers in a
batch equal the same requests served alone, requests join a running batch, a cancelled sequence
leaves the others untouched, cached prompt prefixes are reused, and the queue answers 429."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggufship.serve._batch import BatchEngine, model_params, plain_greedy
from ggufship.serve._engine import Emitter, Engine, Finished, SamplingParams, TextDelta, emit_together
from ggufship.serve.errors import QueueFullError

PROMPTS = (
    "The quick brown fox",
    "Once upon a time",
    "hello world hello",
    "one two three four five six seven",
)
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def gguf(tiny_export: Path) -> Path:
    return sorted(tiny_export.glob("*.gguf"))[0]


@pytest.fixture(scope="module")
def engine(gguf: Path) -> Iterator[BatchEngine]:
    eng = BatchEngine(gguf, parallel=4, queue_size=2, n_ctx=256, n_batch=64)
    eng.load()
    yield eng
    eng.close()


async def _generate(
    eng: Engine, prompt: str, params: SamplingParams = GREEDY, *, stop_after: int = 0
) -> tuple[str, Finished | None]:
    slot = await eng.acquire()
    tokens = eng.tokenize(prompt, add_bos=eng.add_bos(), special=True)
    text, fin, deltas = "", None, 0
    stream = eng.stream(slot, tokens, params, endpoint="test", started=time.perf_counter())
    async with contextlib.aclosing(stream) as items:
        async for item in items:
            if isinstance(item, TextDelta):
                text += item.text
                deltas += 1
                if stop_after and deltas >= stop_after:
                    break  # the client goes away
            else:
                fin = item
    return text, fin


async def _settle(eng: Engine) -> None:
    """Wait (bounded) until every slot is back: a slot is handed back by a callback on this loop
    after the generation's Finished, and each test scenario runs its own loop."""
    for _ in range(1000):
        if eng.waiting == 0 and len(eng._free) == eng.parallel:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("slots not returned")


def _run(eng: Engine, coro: Any) -> Any:
    async def with_settle() -> Any:
        try:
            return await coro
        finally:
            await _settle(eng)

    return asyncio.run(with_settle())


def _solo(eng: Engine, prompts: tuple[str, ...] = PROMPTS) -> list[str]:
    async def run() -> list[str]:
        return [(await _generate(eng, p))[0] for p in prompts]

    return _run(eng, run())


def test_batched_greedy_answers_equal_solo_answers(engine: BatchEngine) -> None:
    solo = _solo(engine)
    assert all(solo), solo

    async def together() -> list[tuple[str, Finished | None]]:
        return await asyncio.gather(*(_generate(engine, p) for p in PROMPTS))

    before = engine.max_batch_sequences
    results = _run(engine, together())
    assert [text for text, _ in results] == solo
    assert all(fin is not None and fin.completion_tokens > 0 for _, fin in results)
    assert engine.max_batch_sequences >= 2 or before >= 2, "the requests never shared a decode step"


def test_solo_answers_equal_the_one_instance_engine(gguf: Path, engine: BatchEngine) -> None:
    classic = Engine(gguf, parallel=1, n_ctx=256, n_batch=64)
    classic.load()
    try:
        assert _solo(classic) == _solo(engine)
    finally:
        classic.close()


@pytest.mark.parametrize(
    ("params", "plain"),
    [
        (GREEDY, True),
        (SamplingParams(max_tokens=4, temperature=0, top_k=1, top_p=0.5, seed=3, logprobs=2), True),
        (SamplingParams(max_tokens=4, temperature=0.7), False),
        (SamplingParams(max_tokens=4, temperature=0, repeat_penalty=1.1), False),
        (SamplingParams(max_tokens=4, temperature=0, frequency_penalty=0.5), False),
        (SamplingParams(max_tokens=4, temperature=0, presence_penalty=-0.5), False),
        (SamplingParams(max_tokens=4, temperature=0, grammar='root ::= "a"'), False),
    ],
)
def test_plain_greedy_is_the_greedy_sampler_alone(params: SamplingParams, plain: bool) -> None:
    assert plain_greedy(params) is plain


@pytest.mark.parametrize(
    "row",
    [
        [0.5, 2.0, -1.0, 2.0],  # a tie: the first of the equal maxima
        [3.0, 3.0, 3.0, 3.0],
        [-np.inf, -5.0, -np.inf, -5.0],
        [1.0, -2.0, 0.0, 7.5],
        [7.5, -2.0, 0.0, 1.0],
    ],
)
def test_the_argmax_is_the_token_llama_cpp_greedy_sampler_picks(row: list[float]) -> None:
    import llama_cpp

    logits = np.array(row, dtype=np.float32)
    data = (llama_cpp.llama_token_data * len(row))(
        *(llama_cpp.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits))
    )
    candidates = llama_cpp.llama_token_data_array(data, len(row), -1, False)
    greedy = llama_cpp.llama_sampler_init_greedy()
    try:
        llama_cpp.llama_sampler_apply(greedy, ctypes.byref(candidates))
    finally:
        llama_cpp.llama_sampler_free(greedy)
    assert data[candidates.selected].id == int(logits.argmax())


def test_greedy_tokens_skip_llama_cpp_sampler_and_sampled_ones_take_it(engine: BatchEngine) -> None:
    before = engine.argmax_tokens
    _, fin = _run(engine, _generate(engine, PROMPTS[0]))
    assert fin is not None and fin.completion_tokens > 0
    assert engine.argmax_tokens - before >= fin.completion_tokens  # (+1 when it ended on EOG)
    before = engine.argmax_tokens
    sampled = SamplingParams(max_tokens=6, temperature=0.8, seed=11)
    _, fin = _run(engine, _generate(engine, PROMPTS[1], sampled))
    assert fin is not None and fin.completion_tokens > 0
    assert engine.argmax_tokens == before


class _CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts its thread-safe wake-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_emit_together_wakes_each_loop_once_and_keeps_each_queue_in_order() -> None:
    loops = [_CountingLoop(), _CountingLoop()]
    try:
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(3)]
        first, second, other = (Emitter(loops[i], q) for i, q in zip((0, 0, 1), queues, strict=True))
        items = [(first, "a1"), (second, "b1"), (other, "c1"), (first, "a2"), (second, "b2"), (first, "a3")]
        sender = threading.Thread(target=emit_together, args=(items,))  # as the scheduler thread does
        sender.start()
        sender.join(timeout=10)

        async def drain(queue: asyncio.Queue[Any], n: int) -> list[Any]:
            return [await asyncio.wait_for(queue.get(), 10) for _ in range(n)]

        assert loops[0].run_until_complete(drain(queues[0], 3)) == ["a1", "a2", "a3"]
        assert loops[0].run_until_complete(drain(queues[1], 2)) == ["b1", "b2"]
        assert loops[1].run_until_complete(drain(queues[2], 1)) == ["c1"]
        assert [loop.wakeups for loop in loops] == [1, 1]
    finally:
        for loop in loops:
            loop.close()
    emit_together([(first, "late")])  # a closed loop (shutdown): nothing raised, nothing delivered


def test_a_request_joins_a_running_batch_and_a_cancelled_one_leaves_the_others_intact(
    engine: BatchEngine,
) -> None:
    solo = _solo(engine)
    long = SamplingParams(max_tokens=40, temperature=0)

    async def scenario() -> tuple[list[tuple[str, Finished | None]], str]:
        first = asyncio.create_task(_generate(engine, PROMPTS[0], long))
        # join while the first is generating
        for _ in range(2000):
            if engine.decode_tokens > 0 and engine.running >= 1:
                break
            await asyncio.sleep(0.005)
        cancelled = asyncio.create_task(_generate(engine, PROMPTS[2], long, stop_after=2))
        others = [asyncio.create_task(_generate(engine, p)) for p in (PROMPTS[1], PROMPTS[3])]
        done = await asyncio.gather(first, *others)
        cut, _ = await cancelled
        return done, cut

    long_solo = _run(engine, _generate(engine, PROMPTS[0], long))[0]
    cancelled_before = engine.cancelled
    (first, second, fourth), cut = _run(engine, scenario())
    assert first[0] == long_solo
    assert second[0] == solo[1] and fourth[0] == solo[3]
    assert engine.cancelled == cancelled_before + 1
    assert solo[2].startswith(cut)


def test_cached_prompt_prefix_is_reused_and_changes_nothing(engine: BatchEngine) -> None:
    system = "You are a helpful assistant. Answer briefly and precisely. " * 3
    prompts = (system + "first question", system + "second question")
    reused = engine.reused_tokens
    answers = _solo(engine, prompts)
    assert engine.reused_tokens - reused >= len(engine.tokenize(system, add_bos=False, special=False)) - 2
    fresh = BatchEngine(engine.model_path, parallel=1, n_ctx=256, n_batch=64)
    fresh.load()
    try:
        assert _solo(fresh, prompts[1:]) == answers[1:]
    finally:
        fresh.close()


def test_full_queue_answers_429_and_the_slot_comes_back(gguf: Path) -> None:
    eng = BatchEngine(gguf, parallel=1, queue_size=1, n_ctx=128, n_batch=32)
    eng.load()
    try:

        async def scenario() -> None:
            held = await eng.acquire()  # the only sequence
            waiter = asyncio.create_task(eng.acquire())  # the only queue place
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError) as info:
                await eng.acquire()
            assert info.value.retry_after == eng.retry_after
            held.release_unused()
            (await waiter).release_unused()
            assert (await _generate(eng, PROMPTS[0]))[0]

        asyncio.run(scenario())
    finally:
        eng.close()


def test_with_amx_kernels_the_weights_stay_out_of_extra_buffers(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where llama.cpp runs AMX kernels (runtime.amx_active), the engine loads the weights without
    llama.cpp's extra buffer types, so the AMX matrix multiply that segfaults on K-quants
    (llama.cpp#20824) is never called, warns, and still answers on a Q4_K_M model."""
    assert model_params(True).use_extra_bufts is False
    assert model_params(False).use_extra_bufts is True  # llama.cpp's default elsewhere
    q4 = next(tiny_export.glob("*Q4_K_M.gguf"))
    monkeypatch.setattr("ggufship.serve._batch.amx_active", lambda: True)
    eng = BatchEngine(q4, parallel=1, queue_size=2, n_ctx=256, n_batch=64)
    eng.load()
    try:
        text, fin = asyncio.run(_generate(eng, PROMPTS[0]))
    finally:
        eng.close()
    assert text and fin is not None and fin.completion_tokens > 0
    assert "AMX_INT8 = 1" in caplog.text and "out of AMX buffers" in caplog.text
