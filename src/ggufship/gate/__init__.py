"""The canary gate: one analysis of canary vs stable from Prometheus.

describe → measure → evaluate → report::

    request = GateRequest(prometheus_url="http://127.0.0.1:9090", model="tiny", window_s=300)
    verdict = analyze(request)          # Verdict: outcome pass | fail | inconclusive
    write_report(verdict, "out/")       # verdict.json, report.md, ecdf-<metric>.png

Modules, each importing only those before it: ``_errors`` (exceptions), ``_promql`` (query
builders, pure), ``_model`` (values and options), ``_stats`` (the pure core, :func:`evaluate`),
``_prometheus`` (the only I/O: HTTP API, :func:`measure`), ``_report`` (Markdown + PNG),
``_analyze`` (:func:`analyze`, :func:`make_request`), ``_server`` (``ggufship gate serve``
for the Argo Rollouts web provider).
"""

from __future__ import annotations

from ggufship.gate._analyze import analyze, make_request
from ggufship.gate._errors import (
    GateConfigError,
    GateError,
    GateServeError,
    PrometheusAnswerError,
    PrometheusUnavailableError,
)
from ggufship.gate._model import (
    SCHEMA,
    Check,
    Distribution,
    GatePolicy,
    GateRequest,
    QueryRecord,
    Series,
    Verdict,
    parse_duration,
)
from ggufship.gate._prometheus import PrometheusClient, measure
from ggufship.gate._promql import (
    bucket_samples_query,
    error_ratio_query,
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
