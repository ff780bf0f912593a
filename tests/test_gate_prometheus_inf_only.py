"""A real Prometheus scraping a histogram that has only the ``+Inf`` bucket: inconclusive, not pass.

An exporter can be configured (or broken) so that its latency histogram has no finite
bucket: every observation lands in ``le="+Inf"``. Both tracks then have identical,
empty-of-information ECDFs and the KS distance is 0 by construction — the gate used to
*pass* such a canary. Debian's Prometheus 2.42 scrapes a real exporter here (a
prometheus_client collector on a free loopback port); the gate reads the real answers.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ggufship.cli.main import main
from ggufship.gate import PrometheusClient, analyze, make_request
from ggufship.metrics import REQUEST_DURATION, REQUESTS
from ggufship.services import (
    ServicesSettings,
    add_scrape_target,
    down,
    prometheus_url,
    up,
    wait_scrape_target,
)
from tests.gate_fixtures import wait_for_count

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian prometheus not installed"),
]

LABELS = ["model", "version", "track", "endpoint"]
MODEL = "inf-only"


class InfOnlyExporter(Collector):
    """The API's metric names, but the latency histogram has no finite bucket."""

    def __init__(self) -> None:
        self.count = 0

    def collect(self) -> Iterator[HistogramMetricFamily | CounterMetricFamily]:
        hist = HistogramMetricFamily(REQUEST_DURATION, "latency with only +Inf", labels=LABELS)
        reqs = CounterMetricFamily(REQUESTS, "requests", labels=[*LABELS, "code"])
        for track, version in (("stable", "1"), ("canary", "2")):
            labels = [MODEL, version, track, "chat"]
            hist.add_metric(labels, buckets=[("+Inf", float(self.count))], sum_value=0.2 * self.count)
            reqs.add_metric([*labels, "200"], float(self.count))
        yield hist
        yield reqs


def test_inf_only_histogram_is_inconclusive(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    exporter = InfOnlyExporter()
    registry = CollectorRegistry()
    registry.register(exporter)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        up(ServicesSettings(state_dir=state_dir, services=("prometheus",), prometheus_scrape_interval_s=0.5))
        url = prometheus_url(state_dir)
        add_scrape_target(state_dir, "inf-only", [f"127.0.0.1:{server.server_port}"])
        wait_scrape_target(url, "inf-only", timeout_s=60)
        started = time.time()
        sel = f'{{model="{MODEL}"}}'
        with PrometheusClient(url, timeout_s=5) as client:
            # the zero state first (two samples), then 200 observations per track
            wait_for_count(client, f"count(count_over_time({REQUEST_DURATION}_count{sel}[1m]) >= 2)", 2, 20)
            exporter.count = 200
            wait_for_count(client, f"sum({REQUEST_DURATION}_count{sel})", 400, timeout_s=20)
            bucket_les = client.query(f"{REQUEST_DURATION}_bucket{sel}", time.time())["result"]
            assert {s["metric"]["le"] for s in bucket_les} == {"+Inf"}  # what the real answer holds

        window = f"{int(time.time() - started) + 3}s"
        request = make_request(
            None,
            prometheus_url=url,
            model=MODEL,
            window_s=float(window[:-1]),
            metrics=("latency",),
            min_samples=10,
        )
        verdict = analyze(request)
        assert verdict.outcome == "inconclusive", verdict.reason
        assert "only the +Inf bucket" in verdict.reason
        rc = main(["gate", "--prometheus", url, "--model", MODEL, "--window", window, "--metrics", "latency"])
        assert rc == 2
    finally:
        with contextlib.suppress(Exception):
            down(state_dir, stop_timeout_s=10)
        server.shutdown()
        thread.join(timeout=5)
