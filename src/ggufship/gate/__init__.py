"""The canary gate: one analysis of canary vs stable from Prometheus.

describe → measure → evaluate → report::

    request = GateRequest(prometheus_url="http://127.0.0.1:9090", model="tiny", window_s=300)
    verdict = analyze(request)          # Verdict: outcome pass | fail | inconclusive
    write_report(verdict, "out/")       # verdict.json, report.md, ecdf-<metric>.png

Engines: ``_model`` (values), ``_prometheus`` (PromQL builders, HTTP API, measure),
``_stats`` (the pure core, :func:`evaluate`), ``_report`` (Markdown + PNG),
``_server`` (``ggufship gate serve`` for the Argo Rollouts web provider).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ggufship.gate._model import (
    SCHEMA,
    Check,
    Distribution,
    GateConfigError,
    GateError,
    GatePolicy,
    GateRequest,
    GateServeError,
    PrometheusAnswerError,
    PrometheusUnavailableError,
    QueryRecord,
    Series,
    Verdict,
    parse_duration,
)
from ggufship.gate._prometheus import (
    PrometheusClient,
    bucket_samples_query,
    error_ratio_query,
    measure,
    p99_query,
    quantile_query,
    selector,
)
from ggufship.gate._report import ReportFiles, write_report
from ggufship.gate._server import GateHTTPServer, make_server, request_from_query, serve_in_thread
from ggufship.gate._stats import (
    CounterSeries,
    Histogram,
    Measurement,
    RateCounts,
    evaluate,
    proportion_pvalue,
    rate_check,
)

__all__ = [
    "SCHEMA",
    "Check",
    "CounterSeries",
    "Distribution",
    "GateConfigError",
    "GateError",
    "GateHTTPServer",
    "GatePolicy",
    "GateRequest",
    "GateServeError",
    "Histogram",
    "Measurement",
    "PrometheusAnswerError",
    "PrometheusClient",
    "PrometheusUnavailableError",
    "QueryRecord",
    "RateCounts",
    "ReportFiles",
    "Series",
    "Verdict",
    "analyze",
    "bucket_samples_query",
    "error_ratio_query",
    "evaluate",
    "make_request",
    "make_server",
    "measure",
    "p99_query",
    "parse_duration",
    "proportion_pvalue",
    "quantile_query",
    "rate_check",
    "request_from_query",
    "selector",
    "serve_in_thread",
    "write_report",
]

logger = logging.getLogger(__name__)


def analyze(request: GateRequest) -> Verdict:
    """Measure from Prometheus and evaluate. Never raises for an unreachable Prometheus,
    missing data or an unusable answer (NaN, ±Inf, garbage): those are inconclusive verdicts,
    and so is any unexpected error of the analysis itself (logged with its traceback)."""
    evaluated_at = request.at or datetime.now(UTC)
    if request.at is None:
        request = request.model_copy(update={"at": evaluated_at})
    try:
        measurement = measure(request)
        verdict = evaluate(request, measurement, evaluated_at)
    except Exception as exc:  # the gate's own bug must never read as "fail" (exit 1)
        logger.exception("gate: analysis failed unexpectedly; the verdict is inconclusive")
        detail = f"analysis failed unexpectedly: {type(exc).__name__}: {exc}"
        verdict = evaluate(request, Measurement(errors=(detail,)), evaluated_at)
    logger.info("gate: %s — %s", verdict.outcome, verdict.reason)
    return verdict


def make_request(base: GateRequest | None = None, **overrides: Any) -> GateRequest:
    """A :class:`GateRequest` from ``base`` with fields (and ``policy`` fields) replaced and
    validated; raises :class:`GateConfigError` naming the field."""
    policy_fields = set(GatePolicy.model_fields)
    top = {k: v for k, v in overrides.items() if k not in policy_fields and v is not None}
    pol = {k: v for k, v in overrides.items() if k in policy_fields and v is not None}
    try:
        base_data = base.model_dump() if base is not None else {}
        policy = GatePolicy.model_validate({**base_data.get("policy", {}), **pol})
        data = {**{k: v for k, v in base_data.items() if k != "policy"}, **top, "policy": policy}
        return GateRequest(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        raise GateConfigError(f"invalid gate option: {problems}") from exc
