"""The gate's PromQL builders: pure functions from labels and windows to query text.

Queries (``S`` = the track's selector, ``W`` = the window): see :mod:`ggufship.gate._prometheus`,
which runs them. Everything here is pure: no I/O, no imports beyond the metric names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ggufship.gate._errors import GateConfigError
from ggufship.metrics import REQUEST_DURATION, REQUESTS

_MATCHER_RE = re.compile(r'^\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*$')
_LABEL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------- PromQL builders


def check_matcher(matcher: str) -> str:
    """A single PromQL label matcher such as ``job="api"``; raises :class:`GateConfigError`."""
    if not _MATCHER_RE.match(matcher):
        raise GateConfigError(f'label matcher {matcher!r}: expected name="value" (or !=, =~, !~)')
    return matcher.strip()


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def duration(seconds: float) -> str:
    """A PromQL duration: whole seconds when exact, else milliseconds."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def selector(
    track: str,
    model: str | None = None,
    endpoint: str | None = None,
    matchers: Sequence[str] = (),
    *,
    track_label: str = "track",
    namespace: str | None = None,
) -> str:
    """The label matchers of one track, without braces: ``track="canary",model="m"``.

    ``track_label`` names the label that tells the tracks apart: ``track`` locally (the
    server's ``--track``), ``rollouts_pod_template_hash`` in a cluster, where ``track`` is the
    pod-template hash of the stable or the latest ReplicaSet. ``namespace`` adds a
    ``namespace`` matcher (one Prometheus may scrape staging and production of one model).
    Order: track label, model, namespace, endpoint, extra matchers (the chart's queries match).
    """
    if not _LABEL_NAME_RE.match(track_label):
        raise GateConfigError(f"track label {track_label!r}: not a Prometheus label name")
    parts = [f"{track_label}={_quote(track)}"]
    if model is not None:
        parts.append(f"model={_quote(model)}")
    if namespace is not None:
        parts.append(f"namespace={_quote(namespace)}")
    if endpoint is not None:
        parts.append(f"endpoint={_quote(endpoint)}")
    parts.extend(check_matcher(m) for m in matchers)
    return ",".join(parts)


def bucket_samples_query(histogram: str, sel: str, window_s: float) -> str:
    return f"{histogram}_bucket{{{sel}}}[{duration(window_s)}]"


def quantile_query(q: float, histogram: str, sel: str, window_s: float) -> str:
    return f"histogram_quantile({q:g}, sum by (le) (rate({histogram}_bucket{{{sel}}}[{duration(window_s)}])))"


def p99_query(sel: str, window_s: float, histogram: str = REQUEST_DURATION) -> str:
    """The canary p99 latency query of the threshold check (and of the chart's AnalysisTemplate)."""
    return quantile_query(0.99, histogram, sel, window_s)


def error_ratio_query(sel: str, window_s: float, counter: str = REQUESTS) -> str:
    """5xx / all requests; 0 (not empty) when there is traffic but no 5xx series."""
    w = duration(window_s)
    total = f"sum(rate({counter}{{{sel}}}[{w}]))"
    errors = f'sum(rate({counter}{{{sel},code=~"5.."}}[{w}]))'
    return f"({errors} or {total} * 0) / {total}"


def counter_samples_query(counter: str, sel: str, window_s: float) -> str:
    return f"{counter}{{{sel}}}[{duration(window_s)}]"
