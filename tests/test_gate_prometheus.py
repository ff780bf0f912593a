"""The gate against a real Prometheus (Debian 2.42 on loopback, started by ``ggufship up``).

A test exporter in this process (a prometheus_client registry served on a free
loopback port) exposes the API's real histogram and counter names for a stable
and a canary track; observations come from seeded distributions, fed in rounds
while Prometheus scrapes, and each round waits (bounded poll) until Prometheus
has the new counts. Every scenario uses its own ``model`` label.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client import Histogram as PromHistogram

from ggufship.cli.main import main
from ggufship.gate import (
    GateRequest,
    PrometheusClient,
    analyze,
    make_request,
    make_server,
    serve_in_thread,
)
from ggufship.metrics import (
    REQUEST_DURATION,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    latency_buckets,
)
from ggufship.services import (
    ServicesSettings,
    add_scrape_target,
    down,
    load_state,
    prometheus_url,
    remove_scrape_target,
    up,
    wait_scrape_target,
)
from ggufship.services._process import free_port, is_alive
from tests.gate_fixtures import wait_for_count

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian prometheus not installed"),
]

LABELS = ("model", "version", "track", "endpoint")
SCRAPE_S = 0.5


@dataclass
class Exporter:
    registry: CollectorRegistry
    latency: PromHistogram
    ttft: PromHistogram
    requests: Counter
    port: int


@dataclass
class Stack:
    url: str
    state_dir: Path
    exporter: Exporter
    client: PrometheusClient


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("gate") / "state"
    settings = ServicesSettings(
        state_dir=state_dir, services=("prometheus",), prometheus_scrape_interval_s=SCRAPE_S
    )
    registry = CollectorRegistry()
    buckets = latency_buckets()
    exporter = Exporter(
        registry=registry,
        latency=PromHistogram(REQUEST_DURATION, "e2e", LABELS, buckets=buckets, registry=registry),
        ttft=PromHistogram(TIME_TO_FIRST_TOKEN, "ttft", LABELS, buckets=buckets, registry=registry),
        requests=Counter(REQUESTS, "requests", (*LABELS, "code"), registry=registry),
        port=0,
    )
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    exporter.port = server.server_port
    pid = None
    try:
        up(settings)
        info = load_state(state_dir).services["prometheus"]
        pid, ticks = info.pid, info.pid_start_ticks
        url = prometheus_url(state_dir)
        add_scrape_target(state_dir, "gate-test", [f"127.0.0.1:{exporter.port}"], {"source": "test"})
        wait_scrape_target(url, "gate-test", timeout_s=60)
        with PrometheusClient(url, timeout_s=5) as client:
            yield Stack(url=url, state_dir=state_dir, exporter=exporter, client=client)
    finally:
        with contextlib.suppress(Exception):
            down(state_dir, stop_timeout_s=10)
        server.shutdown()
        thread.join(timeout=5)
        if pid is not None and is_alive(pid, ticks):
            os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"prometheus pid {pid} survived down")


def feed(
    stack: Stack,
    model: str,
    stable: np.ndarray,
    canary: np.ndarray,
    rounds: int = 4,
    canary_5xx: float = 0.0,
    ttft: bool = True,
) -> float:
    """Observe the values in ``rounds`` increments; return the wall time the scenario started."""
    ex = stack.exporter
    started = time.time()
    children = {}
    for track, version in (("stable", "1"), ("canary", "2")):
        labels = (model, version, track, "chat")
        # Series exist (at 0) before any traffic: Prometheus scrapes the zero state first.
        children[track] = (
            ex.latency.labels(*labels),
            ex.ttft.labels(*labels),
            ex.requests.labels(*labels, "200"),
            ex.requests.labels(*labels, "503"),
        )
    sel = f'{{model="{model}"}}'
    wait_for_count(stack.client, f"count({REQUEST_DURATION}_count{sel})", 2, timeout_s=20)
    wait_for_count(stack.client, f"count(count_over_time({REQUEST_DURATION}_count{sel}[1m]) >= 2)", 2, 20)
    total = 0
    failed = np.zeros(len(canary), dtype=bool)
    failed[: round(len(canary) * canary_5xx)] = True
    chunks = zip(
        np.array_split(stable, rounds),
        np.array_split(canary, rounds),
        np.array_split(failed, rounds),
        strict=True,
    )
    for chunk_s, chunk_c, chunk_f in chunks:
        for track, values, fails in (
            ("stable", chunk_s, np.zeros(len(chunk_s), dtype=bool)),
            ("canary", chunk_c, chunk_f),
        ):
            lat, first, ok, err = children[track]
            for v, f in zip(values, fails, strict=True):
                lat.observe(float(v))
                if ttft:
                    first.observe(float(v) * 0.2)
                (err if f else ok).inc()
        total += len(chunk_s) + len(chunk_c)
        wait_for_count(stack.client, f"sum({REQUEST_DURATION}_count{sel})", total, timeout_s=20)
    return started


def request_for(stack: Stack, model: str, started: float, **policy: object) -> GateRequest:
    window = math.ceil(time.time() - started) + 3
    return make_request(
        None,
        prometheus_url=stack.url,
        model=model,
        window_s=float(window),
        metrics=("latency", "ttft"),
        rates=(),  # the synthetic exporter has no answer counters
        **policy,
    )


def lognormal(rng: np.random.Generator, median: float, n: int) -> np.ndarray:
    return rng.lognormal(math.log(median), 0.35, n)


# ---------------------------------------------------------------- scenarios (one model label each)


@pytest.fixture(scope="module")
def scenarios(stack: Stack) -> dict[str, float]:
    """Feed every scenario once (Prometheus keeps them apart by model label)."""
    rng = np.random.default_rng(20261123)
    started = {}
    started["aa"] = feed(stack, "aa", lognormal(rng, 0.4, 1000), lognormal(rng, 0.4, 150))
    started["slow"] = feed(stack, "slow", lognormal(rng, 0.3, 1000), lognormal(rng, 0.38, 150))
    started["errors"] = feed(
        stack, "errors", lognormal(rng, 0.4, 600), lognormal(rng, 0.4, 150), canary_5xx=0.02
    )
    started["sparse"] = feed(stack, "sparse", lognormal(rng, 0.4, 600), lognormal(rng, 0.4, 20), rounds=2)
    return started


def test_aa_passes(stack: Stack, scenarios: dict[str, float]) -> None:
    verdict = analyze(request_for(stack, "aa", scenarios["aa"]))
    assert verdict.outcome == "pass", verdict.reason
    ks = next(c for c in verdict.checks if c.name == "ks-latency")
    assert ks.details["n_stable"] == 1000 and ks.details["n_canary"] == 150  # exact counts, no extrapolation
    ttft = next(c for c in verdict.checks if c.name == "ks-ttft")
    assert ttft.outcome == "pass"
    err = next(c for c in verdict.checks if c.name == "error-ratio")
    assert err.value == 0.0  # no 5xx series with traffic → 0, not "no data"
    assert all(q.error is None for q in verdict.queries)
    assert any("_bucket{" in q.query for q in verdict.queries)


def test_shifted_canary_fails(stack: Stack, scenarios: dict[str, float]) -> None:
    verdict = analyze(request_for(stack, "slow", scenarios["slow"]))
    assert verdict.outcome == "fail", verdict.reason
    ks = next(c for c in verdict.checks if c.name == "ks-latency")
    assert ks.outcome == "fail"
    assert ks.details["median_shift"] > 0.1
    assert (
        next(c for c in verdict.checks if c.name == "p99-latency").outcome == "pass"
    )  # KS caught it, not p99


def test_error_regression_fails_on_threshold(stack: Stack, scenarios: dict[str, float]) -> None:
    verdict = analyze(request_for(stack, "errors", scenarios["errors"]))
    assert verdict.outcome == "fail"
    err = next(c for c in verdict.checks if c.name == "error-ratio")
    assert err.outcome == "fail"
    assert err.value == pytest.approx(3 / 150, rel=0.05)


def test_sparse_canary_is_inconclusive(stack: Stack, scenarios: dict[str, float]) -> None:
    verdict = analyze(request_for(stack, "sparse", scenarios["sparse"]))
    assert verdict.outcome == "inconclusive"
    assert "canary" in verdict.reason and "min_samples" in verdict.reason


def test_no_data_is_inconclusive(stack: Stack, scenarios: dict[str, float]) -> None:
    verdict = analyze(make_request(None, prometheus_url=stack.url, model="nobody", window_s=30.0))
    assert verdict.outcome == "inconclusive"


def test_prometheus_down_is_inconclusive() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    verdict = analyze(make_request(None, prometheus_url=url, model="aa", window_s=60.0, timeout_s=2.0))
    assert verdict.outcome == "inconclusive"
    assert verdict.errors and "unreachable" in verdict.errors[0]
    assert verdict.queries and verdict.queries[0].error


def test_quantile_series_mode_runs_on_real_prometheus(stack: Stack, scenarios: dict[str, float]) -> None:
    req = request_for(stack, "aa", scenarios["aa"], method="quantile-series", series_step_s=1.0)
    verdict = analyze(req)
    assert not verdict.errors
    assert any(q.kind == "range" for q in verdict.queries)
    assert verdict.outcome in ("pass", "inconclusive")  # never fail on A/A
    assert verdict.series and verdict.series[0].metric == "latency"


# ---------------------------------------------------------------- CLI


def run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue()


@pytest.mark.parametrize(("model", "code"), [("aa", 0), ("slow", 1), ("sparse", 2)])
def test_cli_exit_codes_json_and_report(
    stack: Stack, scenarios: dict[str, float], tmp_path: Path, model: str, code: int
) -> None:
    window = f"{math.ceil(time.time() - scenarios[model]) + 3}s"
    out_dir = tmp_path / "report"
    rc, stdout = run_cli(
        [
            "gate",
            "--prometheus",
            stack.url,
            "--model",
            model,
            "--window",
            window,
            "--metrics",
            "latency,ttft",
            "--rates",
            "",
            "--json",
            "--out",
            str(out_dir),
        ]
    )
    assert rc == code, stdout
    doc = json.loads(stdout)
    assert doc["outcome"] == ("pass", "fail", "inconclusive")[code]
    assert doc["schema"] == "ggufship.gate/v1"
    assert {"checks", "queries", "distributions", "policy", "alpha_per_analysis"} <= doc.keys()
    assert (out_dir / "verdict.json").is_file() and (out_dir / "report.md").is_file()
    if code != 2:
        assert (out_dir / "ecdf-latency.png").read_bytes()[:4] == b"\x89PNG"
    # the report can be rebuilt from the JSON alone
    rc2, _ = run_cli(["gate", "report", str(out_dir / "verdict.json"), "--out", str(tmp_path / "again")])
    assert rc2 == 0 and (tmp_path / "again" / "report.md").is_file()


def test_cli_uses_the_state_dirs_prometheus(stack: Stack, scenarios: dict[str, float]) -> None:
    window = f"{math.ceil(time.time() - scenarios['aa']) + 3}s"
    rc, stdout = run_cli(
        ["gate", "--state-dir", str(stack.state_dir), "--model", "aa", "--window", window, "--rates", ""]
    )
    assert rc == 0, stdout
    assert stdout.startswith("PASS")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--alpha", "2"], "alpha"),
        (["--window", "soon"], "duration"),
        (["--metrics", "latency,p42"], "metrics"),
        (["--matcher", "job=api"], "matcher"),
        (["--min-samples", "many"], "min-samples"),
    ],
)
def test_cli_bad_options_exit_11_naming_the_option(
    stack: Stack, args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, stdout = run_cli(["gate", "--prometheus", stack.url, *args])
    assert rc == 11
    assert stdout == ""  # no verdict printed
    assert needle in capsys.readouterr().err


def test_cli_prometheus_down_exits_2(tmp_path: Path) -> None:
    rc, stdout = run_cli(
        ["gate", "--prometheus", f"http://127.0.0.1:{free_port()}", "--timeout", "2", "--json"]
    )
    assert rc == 2
    assert json.loads(stdout)["outcome"] == "inconclusive"


# ---------------------------------------------------------------- gate serve (Argo web provider)


def argo_measurement(body: dict[str, object]) -> str:
    """The documented AnalysisTemplate metric (web provider, ``jsonPath: "{$.outcome}"``), as Argo
    evaluates it: successCondition ``result == "pass"``, failureCondition ``result == "fail"``,
    neither met → Inconclusive."""
    result = body["outcome"]  # jsonPath {$.outcome}
    if result == "pass":
        return "Successful"
    if result == "fail":
        return "Failed"
    return "Inconclusive"


def test_gate_serve(stack: Stack, scenarios: dict[str, float]) -> None:
    base = make_request(None, prometheus_url=stack.url, metrics=("latency", "ttft"), rates=())
    server = make_server(base, "127.0.0.1", 0)
    thread = serve_in_thread(server)
    try:
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            seen = {}
            for model in ("aa", "slow", "sparse"):
                window = f"{math.ceil(time.time() - scenarios[model]) + 3}s"
                resp = http.get("/gate", params={"model": model, "window": window, "analyses": "1"})
                assert resp.status_code == 200  # every outcome is a 200: non-2xx is an Argo *error*
                body = resp.json()
                assert body["selector"]["model"] == model
                seen[model] = argo_measurement(body)
            assert seen == {"aa": "Successful", "slow": "Failed", "sparse": "Inconclusive"}
            bad = http.get("/gate", params={"alpha": "2"})
            assert bad.status_code == 400 and "alpha" in bad.json()["error"]
            assert http.get("/gate", params={"colour": "red"}).status_code == 400
            assert http.get("/nowhere").status_code == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_scrape_targets_files(stack: Stack) -> None:
    path = add_scrape_target(stack.state_dir, "extra", ["127.0.0.1:1"], {"track": "canary"})
    doc = json.loads(path.read_text())
    assert doc == [{"targets": ["127.0.0.1:1"], "labels": {"job": "extra", "track": "canary"}}]
    assert remove_scrape_target(stack.state_dir, "extra") is True
    assert remove_scrape_target(stack.state_dir, "extra") is False
    assert not path.exists()
    from ggufship.services import ServiceStateError

    for bad in (("../x", ["127.0.0.1:1"]), ("ok", ["no-port"]), ("ok", [])):
        with pytest.raises(ServiceStateError):
            add_scrape_target(stack.state_dir, bad[0], bad[1])
    assert sorted(p.name for p in path.parent.iterdir()) == ["gate-test.json"]  # nothing half-written


def test_prometheus_listens_on_loopback_only(stack: Stack) -> None:
    info = load_state(stack.state_dir).services["prometheus"]
    assert info.endpoint.startswith("http://127.0.0.1:")
    from tests.process_fixtures import listening_sockets

    assert listening_sockets(info.pid) == {("127.0.0.1", info.port)}


def test_cli_state_dir_without_prometheus_exits_11(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, stdout = run_cli(["gate", "--state-dir", str(tmp_path / "empty"), "--json"])
    assert rc == 11 and stdout == ""
    assert "no prometheus recorded" in capsys.readouterr().err
