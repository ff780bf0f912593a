"""The API's Prometheus metrics contract, shared by the server (which exports them)
and the gate, chart and local rollout (which query them).

Names use the ``ggufship_`` prefix and base units. Every series carries the labels
in :data:`BASE_LABELS`; ``track`` is ``stable`` or ``canary``. Histogram buckets are
log-spaced and dense (:func:`latency_buckets`) so that the gate can reconstruct
each track's distribution from bucket increases and run a two-sample test on it.
"""

from __future__ import annotations

import math
from typing import Final

PREFIX: Final = "ggufship_"
TRACKS: Final = ("stable", "canary")
BASE_LABELS: Final = ("model", "version", "track")

# Histograms (seconds unless the name says otherwise); labels BASE_LABELS + ("endpoint",).
REQUEST_DURATION: Final = "ggufship_request_duration_seconds"  # end-to-end, per request
TIME_TO_FIRST_TOKEN: Final = "ggufship_time_to_first_token_seconds"
INTER_TOKEN_LATENCY: Final = "ggufship_inter_token_latency_seconds"  # one observation per token gap
COMPLETION_LENGTH: Final = "ggufship_completion_length_tokens"  # tokens generated per request
#: Mean negative log-likelihood (nats per token) of each answer under the serving model's own
#: next-token distribution (raw logits, before sampling): an uncertainty proxy, not a detector.
ANSWER_SURPRISAL: Final = "ggufship_answer_surprisal_nats"

# Counters; labels BASE_LABELS + ("endpoint",) (+ "code" for REQUESTS).
REQUESTS: Final = "ggufship_requests_total"  # labels + endpoint, code (HTTP status as a string)
PROMPT_TOKENS: Final = "ggufship_prompt_tokens_total"
COMPLETION_TOKENS: Final = "ggufship_completion_tokens_total"
REFUSALS: Final = "ggufship_refusals_total"  # answers matching the refusal pattern list
ANSWERS: Final = "ggufship_answers_total"  # finished answers (not cancelled): the rates' denominator
BAD_ANSWERS: Final = "ggufship_bad_answers_total"  # + label reason: empty | loop | length
#: ``reason`` values of BAD_ANSWERS; an answer counts once, under the first that applies.
BAD_ANSWER_REASONS: Final = ("empty", "loop", "length")

# Gauges; labels BASE_LABELS.
IN_FLIGHT: Final = "ggufship_requests_in_flight"
QUEUED: Final = "ggufship_requests_queued"
MODEL_INFO: Final = "ggufship_model_info"  # value 1; extra labels: digest, quantization

# The batching engine (serve --engine batch); labels BASE_LABELS.
BATCH_SEQUENCES: Final = "ggufship_batch_sequences"  # histogram: sequences in one decode step
PREFILL_TOKENS: Final = "ggufship_prefill_tokens_total"  # prompt tokens decoded (after prefix reuse)
DECODE_TOKENS: Final = "ggufship_decode_tokens_total"  # generated tokens decoded
REUSED_PROMPT_TOKENS: Final = "ggufship_prompt_tokens_reused_total"  # prompt tokens taken from the cache

#: The histograms the gate can test, by short name.
HISTOGRAMS: Final = {
    "latency": REQUEST_DURATION,
    "ttft": TIME_TO_FIRST_TOKEN,
    "itl": INTER_TOKEN_LATENCY,
    "completion_length": COMPLETION_LENGTH,
    "surprisal": ANSWER_SURPRISAL,
}

#: The answer rates the gate can test (events / ANSWERS), by short name.
RATES: Final = {
    "refusal": REFUSALS,
    "bad_answer": BAD_ANSWERS,
}


def log_buckets(low: float, high: float, count: int) -> tuple[float, ...]:
    """``count`` upper bounds spaced evenly in log scale from ``low`` to ``high`` (inclusive),
    rounded to 4 significant digits so the ``le`` labels stay readable."""
    if not (0 < low < high) or count < 2:
        raise ValueError(f"log_buckets needs 0 < low < high and count >= 2, got {low}, {high}, {count}")
    ratio = (high / low) ** (1 / (count - 1))
    return tuple(float(f"{low * ratio**i:.4g}") for i in range(count))


def latency_buckets() -> tuple[float, ...]:
    """30 log-spaced bounds from 5 ms to 120 s (ratio ≈ 1.416 between neighbours)."""
    return log_buckets(0.005, 120.0, 30)


def inter_token_buckets() -> tuple[float, ...]:
    """30 log-spaced bounds from 0.5 ms to 5 s (token gaps are much shorter than requests)."""
    return log_buckets(0.0005, 5.0, 30)


def token_count_buckets() -> tuple[float, ...]:
    """Completion lengths: 24 log-spaced bounds from 1 to 8192 tokens."""
    return tuple(sorted({float(math.ceil(b)) for b in log_buckets(1.0, 8192.0, 24)}))


def surprisal_buckets() -> tuple[float, ...]:
    """30 log-spaced bounds from 0.01 to 20 nats per token (ln of a 32k vocabulary is 10.4;
    a fluent answer of a small model sits around 0.3-3)."""
    return log_buckets(0.01, 20.0, 30)
