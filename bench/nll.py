"""Micro-benchmark: the per-token NLL (answer surprisal input) on the batch scheduler thread.

Compares, on random float32 logits of Gemma 3's vocabulary (262,144 entries), the time per
generated token of

* ``per-token``: :func:`ggufship.serve._quality.token_nll` once per sequence (what the batch engine
  did per token before);
* ``batched``: :class:`ggufship.serve._quality.BatchNLL` once per decode step over every sampled
  row of the step (the arithmetic the batch engine does now).

With ``--model FILE.gguf`` it also runs the batch engine (metrics on) on ``--clients`` concurrent
generations and reports the time its *scheduler thread* spends on the NLLs per token: greedy
(``--temperature 0``, the default), the whole log-sum-exp, which the scheduler computes itself
(every row is a plain greedy argmax, nothing to overlap it with); sampled (``--temperature``
above 0), starting the helper, waiting for it after llama.cpp's samplers, one subtraction per token.

Usage: ``.venv/bin/python bench/nll.py [--vocab 262144] [--batch 1,4,16] [--steps 200]
[--model FILE.gguf --clients 16 --max-tokens 32 --temperature 0]``; prints one line per batch
size (median and p90 µs per token over ``--steps`` steps) and one line for the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from ggufship.serve._quality import BatchNLL, token_nll

logger = logging.getLogger("bench.nll")


def _measure(fn: object, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def engine_run(model: Path, clients: int, max_tokens: int, temperature: float) -> None:
    from ggufship.serve._batch import BatchEngine
    from ggufship.serve._engine import SamplingParams
    from ggufship.serve._metrics import MetricLabels, ServeMetrics

    metrics = ServeMetrics(MetricLabels("bench", "0", "stable"))
    eng = BatchEngine(model, parallel=clients, queue_size=clients, n_ctx=256, metrics=metrics)
    eng.load()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1)

    async def one(i: int) -> None:
        slot = await eng.acquire()
        prompt = eng.tokenize(f"Story number {i}: once upon a time", add_bos=eng.add_bos(), special=True)
        stream = eng.stream(slot, prompt, params, endpoint="bench", started=time.perf_counter())
        async with contextlib.aclosing(stream) as items:
            async for _ in items:
                pass

    async def everyone() -> None:
        await asyncio.gather(*(one(i) for i in range(clients)))

    try:
        t0 = time.perf_counter()
        asyncio.run(everyone())
        wall = time.perf_counter() - t0
    finally:
        eng.close()
    if eng.nll_tokens == 0:
        raise SystemExit("the engine recorded no NLL: no data")
    logger.info(
        "engine, %d clients: %d tokens in %d steps, %.2f s; scheduler thread on NLLs %.0f µs/token "
        "(%.1f %% of the wall time)",
        clients,
        eng.nll_tokens,
        eng.steps,
        wall,
        eng.nll_seconds / eng.nll_tokens * 1e6,
        eng.nll_seconds / wall * 100,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model", type=Path, help="a .gguf: also time the batch engine's scheduler thread")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="the engine run's sampling temperature")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)
    for n in (int(x) for x in args.batch.split(",")):
        rows = (rng.standard_normal((n, args.vocab)) * 4).astype(np.float32)
        tokens = rng.integers(0, args.vocab, size=n)
        batched = BatchNLL(args.vocab, n)
        want = [token_nll(rows[i], int(tokens[i])) for i in range(n)]
        got = batched(rows, tokens)
        worst = max(abs(a - b) for a, b in zip(want, got, strict=True))
        per_token = _measure(lambda: [token_nll(rows[i], int(tokens[i])) for i in range(n)], args.steps)  # noqa: B023
        per_step = _measure(lambda: batched(rows, tokens), args.steps)  # noqa: B023
        logger.info(
            "batch %2d: per-token token_nll median %.0f µs/token (p90 %.0f) | BatchNLL median %.0f µs/token "
            "(p90 %.0f) | max |difference| %.2e nats",
            n,
            statistics.median(per_token) / n * 1e6,
            statistics.quantiles(per_token, n=10)[-1] / n * 1e6,
            statistics.median(per_step) / n * 1e6,
            statistics.quantiles(per_step, n=10)[-1] / n * 1e6,
            worst,
        )
    if args.model is not None:
        engine_run(args.model, args.clients, args.max_tokens, args.temperature)


if __name__ == "__main__":
    main()
