"""Helpers shared by the gate's tests (not library code)."""

from __future__ import annotations

import time

from ggufship.gate import PrometheusClient, PrometheusUnavailableError
from ggufship.gate._prometheus import _scalar


def wait_for_count(client: PrometheusClient, promql: str, expected: float, timeout_s: float = 30.0) -> float:
    """Poll (bounded in time) until the instant ``promql`` returns at least ``expected``; the last value."""
    deadline = time.monotonic() + timeout_s
    value: float | None = None
    while True:
        try:
            value = _scalar(client.query(promql, time.time()))
        except PrometheusUnavailableError:
            value = None
        if value is not None and value >= expected:
            return value
        if time.monotonic() >= deadline:
            raise PrometheusUnavailableError(
                f"{promql} stayed at {value} (expected ≥ {expected}) for {timeout_s:.0f}s"
            )
        time.sleep(0.1)
