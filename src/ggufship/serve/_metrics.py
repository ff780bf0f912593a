"""The server's Prometheus metrics, on a per-app registry, with the names, labels and
buckets of :mod:`ggufship.metrics` (the gate and the chart query exactly these)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ggufship import metrics as m
from ggufship.serve._quality import answer_surprisal, bad_answer_reason


@dataclass(frozen=True)
class MetricLabels:
    model: str
    version: str
    track: str

    def base(self) -> dict[str, str]:
        return {"model": self.model, "version": self.version, "track": self.track}


class ServeMetrics:
    """Every metric of one server; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, labels: MetricLabels, refusal_patterns: Sequence[str] = ()) -> None:
        self.labels = labels
        self.registry = CollectorRegistry(auto_describe=True)
        base = list(m.BASE_LABELS)
        ep = [*base, "endpoint"]
        r = self.registry
        self.request_duration = Histogram(
            m.REQUEST_DURATION,
            "End-to-end request latency (seconds), streams until the last byte",
            ep,
            buckets=m.latency_buckets(),
            registry=r,
        )
        self.ttft = Histogram(
            m.TIME_TO_FIRST_TOKEN,
            "Time from request arrival to the first generated token (seconds)",
            ep,
            buckets=m.latency_buckets(),
            registry=r,
        )
        self.itl = Histogram(
            m.INTER_TOKEN_LATENCY,
            "Gap between consecutive generated tokens (seconds)",
            ep,
            buckets=m.inter_token_buckets(),
            registry=r,
        )
        self.completion_length = Histogram(
            m.COMPLETION_LENGTH,
            "Tokens generated per request",
            ep,
            buckets=m.token_count_buckets(),
            registry=r,
        )
        self.surprisal = Histogram(
            m.ANSWER_SURPRISAL,
            "Mean negative log-likelihood per token of each answer under the serving model (nats); "
            "an uncertainty proxy, not a hallucination detector",
            ep,
            buckets=m.surprisal_buckets(),
            registry=r,
        )
        self.requests = Counter(
            m.REQUESTS.removesuffix("_total"),
            "Requests by endpoint and HTTP status code",
            [*ep, "code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            m.PROMPT_TOKENS.removesuffix("_total"), "Prompt tokens processed", ep, registry=r
        )
        self.completion_tokens = Counter(
            m.COMPLETION_TOKENS.removesuffix("_total"), "Completion tokens generated", ep, registry=r
        )
        self.refusals = Counter(
            m.REFUSALS.removesuffix("_total"), "Answers matching a refusal pattern", ep, registry=r
        )
        self.answers = Counter(
            m.ANSWERS.removesuffix("_total"),
            "Finished answers (not cancelled by the client): the denominator of the answer rates",
            ep,
            registry=r,
        )
        self.bad_answers = Counter(
            m.BAD_ANSWERS.removesuffix("_total"),
            "Bad answers by reason: empty, loop (a repeated n-gram tail), length (cut off); "
            "each answer counts once",
            [*ep, "reason"],
            registry=r,
        )
        self.in_flight = Gauge(m.IN_FLIGHT, "Generations running now", base, registry=r)
        self.queued = Gauge(m.QUEUED, "Requests waiting for a llama instance", base, registry=r)
        self.model_info = Gauge(
            m.MODEL_INFO, "The served model (value 1)", [*base, "digest", "quantization"], registry=r
        )
        self.batch_sequences = Histogram(
            m.BATCH_SEQUENCES,
            "Sequences decoded together in one llama_decode step (batching engine)",
            base,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
            registry=r,
        )
        self.prefill_tokens = Counter(
            m.PREFILL_TOKENS.removesuffix("_total"),
            "Prompt tokens decoded (batching engine)",
            base,
            registry=r,
        )
        self.decode_tokens = Counter(
            m.DECODE_TOKENS.removesuffix("_total"),
            "Generated tokens decoded (batching engine)",
            base,
            registry=r,
        )
        self.reused_prompt_tokens = Counter(
            m.REUSED_PROMPT_TOKENS.removesuffix("_total"),
            "Prompt tokens taken from a cached prefix instead of decoded (batching engine)",
            base,
            registry=r,
        )
        self._refusal = [re.compile(p) for p in refusal_patterns]
        b = labels.base()
        self.in_flight_now = self.in_flight.labels(**b)
        self.queued_now = self.queued.labels(**b)
        self.in_flight_now.set(0)
        self.queued_now.set(0)

    def observe_step(self, sequences: int, prefill_tokens: int, decode_tokens: int) -> None:
        """One decode step of the batching engine."""
        b = self.labels.base()
        self.batch_sequences.labels(**b).observe(sequences)
        if prefill_tokens:
            self.prefill_tokens.labels(**b).inc(prefill_tokens)
        if decode_tokens:
            self.decode_tokens.labels(**b).inc(decode_tokens)

    def observe_reused_prompt(self, tokens: int) -> None:
        if tokens:
            self.reused_prompt_tokens.labels(**self.labels.base()).inc(tokens)

    def set_model_info(self, digest: str, quantization: str | None) -> None:
        self.model_info.labels(**self.labels.base(), digest=digest, quantization=quantization or "").set(1)

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        b = self.labels.base()
        self.requests.labels(**b, endpoint=endpoint, code=str(code)).inc()
        self.request_duration.labels(**b, endpoint=endpoint).observe(seconds)

    def observe_generation(
        self,
        endpoint: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        gaps: Sequence[float],
        text: str,
        finish_reason: str | None = None,
        tokens: Sequence[int] = (),
        nlls: Sequence[float] = (),
    ) -> bool:
        """Record one finished generation; return whether its text counts as a refusal.

        Quality signals (engines pass them; see :mod:`ggufship.serve._quality`):
        ``finish_reason`` (``stop``, ``length``, ``cancelled``), ``tokens`` (the generated
        token ids, for the loop check) and ``nlls`` (one :func:`~ggufship.serve._quality.token_nll`
        per generated token). A ``cancelled`` generation (client gone) is not an answer: no
        refusal, answer, bad-answer or surprisal observation. Without ``finish_reason``
        (an engine that does not report quality) only the refusal counter is kept.
        """
        b = {**self.labels.base(), "endpoint": endpoint}
        self.prompt_tokens.labels(**b).inc(prompt_tokens)
        self.completion_tokens.labels(**b).inc(completion_tokens)
        self.completion_length.labels(**b).observe(completion_tokens)
        if ttft is not None:
            self.ttft.labels(**b).observe(ttft)
        itl = self.itl.labels(**b)
        for gap in gaps:
            itl.observe(gap)
        if finish_reason == "cancelled":
            return False
        refused = any(p.search(text) for p in self._refusal)
        refusals = self.refusals.labels(**b)  # the series exists at 0: a rate of 0, not no data
        if refused:
            refusals.inc()
        if finish_reason is not None:
            self.answers.labels(**b).inc()
            for reason in m.BAD_ANSWER_REASONS:
                self.bad_answers.labels(**b, reason=reason)
            bad = bad_answer_reason(text, tokens, finish_reason)
            if bad is not None:
                self.bad_answers.labels(**b, reason=bad).inc()
            mean_nll = answer_surprisal(nlls)
            if mean_nll is not None:
                self.surprisal.labels(**b).observe(mean_nll)
        return refused
