"""The measuring edge of the gate (its only I/O): the Prometheus HTTP API (httpx), the parsers of
its answers, and :func:`measure`. The query texts come from :mod:`ggufship.gate._promql`.

Queries (``S`` = the track's selector, ``W`` = the window):

* bucket samples — ``<hist>_bucket{S}[W]``: the raw samples of every bucket series,
  from which the core computes reset-aware increases (exact integer counts; the
  ``increase()`` function would extrapolate to the window edges and give
  fractional, non-monotone counts per ``le``).
* p99 — ``histogram_quantile(0.99, sum by (le) (rate(<latency>_bucket{S}[W])))``,
  the same expression as the chart's AnalysisTemplate.
* 5xx ratio — ``(sum(rate(<requests>{S,code=~"5.."}[W])) or sum(rate(<requests>{S}[W])) * 0)
  / sum(rate(<requests>{S}[W]))``: without any 5xx series the numerator would be
  empty (and so the ratio); the ``or … * 0`` makes it 0 while there is traffic,
  and keeps it empty (→ inconclusive) when there is none. Tested with ``promtool test rules``.
* quantile series — ``histogram_quantile(q, sum by (le) (rate(<hist>_bucket{S}[STEP])))``
  over ``query_range`` with that step.
* answer rates — ``<counter>{S}[W]`` for ``ggufship_answers_total`` and each rate's event
  counter (refusals, bad answers): raw samples, reset-aware increases summed over the
  track's series (exact counts, like the buckets). No answers series → no data.

``rate()`` needs two samples in its window, and Prometheus discovers a new target
about 5-6 s after it appears: start scraping before traffic and before the first analysis.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ggufship.gate._errors import PrometheusAnswerError, PrometheusUnavailableError
from ggufship.gate._model import GateRequest, QueryRecord
from ggufship.gate._promql import (
    bucket_samples_query,
    counter_samples_query,
    error_ratio_query,
    p99_query,
    quantile_query,
    selector,
)
from ggufship.gate._stats import (
    CounterSeries,
    Histogram,
    Measurement,
    RateCounts,
    counter_increase,
    parse_le,
)
from ggufship.metrics import ANSWERS, HISTOGRAMS, RATES

logger = logging.getLogger(__name__)

_TRACKS = ("stable", "canary")


# ---------------------------------------------------------------- HTTP API


class PrometheusClient:
    """The two endpoints the gate needs: ``/api/v1/query`` and ``/api/v1/query_range``."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        import httpx

        try:
            resp = self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise PrometheusUnavailableError(
                f"prometheus {self.base_url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error") if isinstance(body, dict) else resp.text[:200]
            raise PrometheusUnavailableError(
                f"prometheus {self.base_url}{path}: HTTP {resp.status_code}: {detail}"
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusUnavailableError(f"prometheus {self.base_url}{path}: no data in the answer")
        return data

    def query(self, promql: str, at: float) -> dict[str, Any]:
        return self._get("/api/v1/query", {"query": promql, "time": f"{at:.3f}"})

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> dict[str, Any]:
        return self._get(
            "/api/v1/query_range",
            {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"},
        )


# ---------------------------------------------------------------- parsing answers
#
# Every answer is untrusted: the parsers below accept exactly the shapes of the
# Prometheus HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/,
# "Expression query result formats") and raise PrometheusAnswerError, naming what is
# wrong, for anything else. measure() turns that into an inconclusive verdict.


def _number(raw: object, what: str) -> float:
    """A sample value: Prometheus writes it as a JSON string (``"1.5"``, ``"NaN"``, ``"+Inf"``)."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise PrometheusAnswerError(f"{what}: value {raw!r} is not a number")
    try:
        return float(raw)
    except (ValueError, OverflowError):  # "abc"; an integer beyond any float
        raise PrometheusAnswerError(f"{what}: value {str(raw)[:40]!r} is not a number") from None


def _sample(raw: object, what: str) -> tuple[float, float]:
    """One ``[unix_time, "value"]`` pair."""
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise PrometheusAnswerError(f"{what}: sample {str(raw)[:80]!r} is not a [time, value] pair")
    ts = _number(raw[0], what)
    if not math.isfinite(ts):
        raise PrometheusAnswerError(f"{what}: sample time {raw[0]!r} is not a finite number")
    return ts, _number(raw[1], what)


def _result(data: dict[str, Any], types: tuple[str, ...], what: str) -> Any:
    kind = data.get("resultType")
    if kind not in types:
        raise PrometheusAnswerError(f"{what}: expected a {' or '.join(types)} result, got {str(kind)[:40]!r}")
    result = data.get("result")
    if kind == "scalar":
        return result
    if not isinstance(result, list) or not all(
        isinstance(item, dict) and isinstance(item.get("metric", {}), dict) for item in result
    ):
        raise PrometheusAnswerError(f"{what}: 'result' is not a list of series objects")
    return result


def _scalar(data: dict[str, Any], what: str = "instant query") -> float | None:
    """The single value of an instant vector (or scalar) answer; None if empty. May be NaN/±Inf."""
    result = _result(data, ("vector", "scalar"), what)
    if data.get("resultType") == "scalar":
        return _sample(result, what)[1]
    if not result:
        return None
    if len(result) > 1:
        raise PrometheusAnswerError(f"{what}: expected one series, got {len(result)}")
    return _sample(result[0].get("value"), what)[1]


def _counter_series(data: dict[str, Any], what: str = "bucket samples") -> list[CounterSeries]:
    """The raw samples of ``_bucket`` counters: finite, non-negative, in time order, each with an ``le``."""
    out = []
    for item in _result(data, ("matrix",), what):
        le = item.get("metric", {}).get("le")
        if not isinstance(le, str):
            raise PrometheusAnswerError(f"{what}: a series without an 'le' label: {item.get('metric')}")
        try:
            bound = parse_le(le)
        except ValueError:
            bound = math.nan
        if math.isnan(bound):
            raise PrometheusAnswerError(f"{what}: le={le!r} is not a bucket bound")
        out.append(CounterSeries(le=le, values=_counter_values(item, f"{what} (le={le})")))
    return out


def _counter_values(item: dict[str, Any], what: str) -> tuple[float, ...]:
    """The raw samples of one counter series: finite counts ≥ 0 in time order."""
    raw_values = item.get("values")
    if not isinstance(raw_values, list):
        raise PrometheusAnswerError(f"{what}: 'values' is not a list of samples")
    values: list[float] = []
    last_ts = -math.inf
    for raw in raw_values:
        ts, value = _sample(raw, what)
        if not math.isfinite(value) or value < 0:
            raise PrometheusAnswerError(f"{what}: counter value {raw[1]!r} is not a finite count ≥ 0")
        if ts <= last_ts:
            raise PrometheusAnswerError(f"{what}: sample times are not increasing")
        last_ts = ts
        values.append(value)
    return tuple(values)


def _counter_total(data: dict[str, Any], what: str) -> tuple[int, float | None]:
    """(series, summed increase over the window) of a plain counter's raw samples; the sum is
    None without any series. Values must be finite counts ≥ 0 in time order."""
    total: float | None = None
    result = _result(data, ("matrix",), what)
    for item in result:
        total = (total or 0.0) + counter_increase(_counter_values(item, what))
    return len(result), total


def _histogram(raw: list[CounterSeries], what: str) -> Histogram | None:
    """The window's histogram; one without any finite bucket bound has no distribution to test."""
    hist = Histogram.from_series(raw)
    if hist is not None and not any(math.isfinite(b) for b in hist.bounds):
        raise PrometheusAnswerError(
            f"{what}: only the +Inf bucket ({hist.n} observations): no distribution to test"
        )
    return hist


def _series_values(data: dict[str, Any], what: str) -> tuple[float, ...]:
    """quantile-series: the finite values of the first series of a range answer (NaN: no data)."""
    result = _result(data, ("matrix",), what)
    if not result:
        return ()
    raw_values = result[0].get("values")
    if not isinstance(raw_values, list):
        raise PrometheusAnswerError(f"{what}: 'values' is not a list of samples")
    values = [_sample(raw, what)[1] for raw in raw_values]
    if any(math.isinf(v) for v in values):
        raise PrometheusAnswerError(f"{what}: a value is infinite")
    return tuple(v for v in values if math.isfinite(v))


@contextlib.contextmanager
def _recorded(queries: list[QueryRecord], **query: Any) -> Iterator[dict[str, Any]]:
    """Record one query in ``queries``: with what the block puts into the yielded dict (``series``,
    ``value``) when it succeeds, with the error when Prometheus failed it (which then propagates)."""
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except PrometheusUnavailableError as exc:
        queries.append(QueryRecord(**query, error=str(exc)))
        raise
    queries.append(QueryRecord(**query, **outcome))


def measure(request: GateRequest, client: PrometheusClient | None = None) -> Measurement:
    """Run every query of one analysis; a Prometheus failure becomes ``Measurement.errors``."""
    at = (request.at or datetime.now(UTC)).timestamp()
    own = client is None
    client = client or PrometheusClient(request.prometheus_url, request.timeout_s)
    queries: list[QueryRecord] = []
    try:
        return _measure(request, client, at, queries)
    except PrometheusUnavailableError as exc:
        logger.warning("%s", exc)
        return Measurement(queries=tuple(queries), errors=(str(exc),))
    finally:
        if own:
            client.close()


def _measure(
    request: GateRequest, client: PrometheusClient, at: float, queries: list[QueryRecord]
) -> Measurement:
    policy = request.policy
    track_label = {"stable": request.stable_track, "canary": request.canary_track}
    sels = {
        t: selector(
            track_label[t],
            request.model,
            request.endpoint,
            request.matchers,
            track_label=request.track_label,
            namespace=request.namespace,
        )
        for t in _TRACKS
    }

    def instant(purpose: str, promql: str, upper: float) -> float | None:
        """The query's value: None for no data (empty, NaN: Prometheus' 0/0); outside [0, upper]
        (±Inf, negative, a ratio above 1) the answer is unusable."""
        with _recorded(queries, purpose=purpose, query=promql, time=at) as record:
            data = client.query(promql, at)
            value = _scalar(data, purpose)
            if value is not None and math.isnan(value):
                value = None
            if value is not None and not 0 <= value <= upper:
                raise PrometheusAnswerError(f"{purpose}: value {value!r} is outside [0, {upper:g}]")
            record.update(
                series=1 if data.get("resultType") == "scalar" else len(data.get("result") or []), value=value
            )
        return value

    histograms: dict[str, dict[str, Histogram | None]] = {}
    series: dict[str, dict[str, tuple[float, ...]]] = {}
    for metric in policy.metrics:
        name = HISTOGRAMS[metric]
        histograms[metric] = {}
        for track in _TRACKS:
            promql = bucket_samples_query(name, sels[track], request.window_s)
            purpose = f"{metric} buckets ({track})"
            with _recorded(queries, purpose=purpose, query=promql, time=at) as record:
                raw = _counter_series(client.query(promql, at), purpose)
                hist = _histogram(raw, purpose)
                record.update(series=len(raw), value=float(hist.n) if hist else None)
            histograms[metric][track] = hist
        if policy.method == "quantile-series":
            series[metric] = {}
            step = policy.series_step_s
            start = at - request.window_s
            for track in _TRACKS:
                promql = quantile_query(policy.series_quantile, name, sels[track], step)
                purpose = f"{metric} p{policy.series_quantile * 100:g} series ({track})"
                range_query = {"kind": "range", "start": start, "end": at, "step_s": step}
                with _recorded(queries, purpose=purpose, query=promql, **range_query) as record:
                    data = client.query_range(promql, start, at, step)
                    values = _series_values(data, purpose)
                    record.update(series=len(data.get("result") or []))
                series[metric][track] = values

    def counted(purpose: str, counter: str, track: str) -> float | None:
        promql = counter_samples_query(counter, sels[track], request.window_s)
        with _recorded(queries, purpose=purpose, query=promql, time=at) as record:
            n_series, total = _counter_total(client.query(promql, at), purpose)
            record.update(series=n_series, value=total)
        return total

    rates: dict[str, dict[str, RateCounts | None]] = {rate: {} for rate in policy.rates}
    if policy.rates:
        for track in _TRACKS:
            answers = counted(f"answers ({track})", ANSWERS, track)
            for rate in policy.rates:
                events = counted(f"{rate} events ({track})", RATES[rate], track)
                if answers is None:
                    rates[rate][track] = None
                    continue
                total, hits = round(answers), round(events or 0.0)
                if hits > total:  # scraped between the two counters' increments: cap, never invent
                    hits = total
                rates[rate][track] = RateCounts(events=hits, total=total)

    day = 86400.0  # a p99 latency beyond a day is not a measurement
    canary_p99 = instant("p99 latency (canary)", p99_query(sels["canary"], request.window_s), day)
    stable_p99 = instant("p99 latency (stable)", p99_query(sels["stable"], request.window_s), day)
    canary_err = instant("5xx ratio (canary)", error_ratio_query(sels["canary"], request.window_s), 1.0)
    stable_err = instant("5xx ratio (stable)", error_ratio_query(sels["stable"], request.window_s), 1.0)
    return Measurement(
        histograms=histograms,
        canary_p99_s=canary_p99,
        stable_p99_s=stable_p99,
        canary_error_ratio=canary_err,
        stable_error_ratio=stable_err,
        series=series,
        rates=rates,
        queries=tuple(queries),
    )
