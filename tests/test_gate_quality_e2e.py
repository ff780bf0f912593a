"""Answer quality end to end: real API servers of the tiny model (two pairs of stable + canary
tracks), scraped by a real Prometheus (Debian, loopback, ``ggufship up``), judged by the gate.
Pair ``aa``: both tracks alike → the refusal and bad-answer rates and the surprisal KS pass.
Pair ``refuses``: the canary's refusal patterns match every answer (a canary that refuses
everything, at the stable's speed) → the gate fails on the refusal rate alone."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ggufship.gate import PrometheusClient, analyze, make_request
from ggufship.metrics import ANSWERS
from ggufship.services import (
    ServicesSettings,
    add_scrape_target,
    down,
    load_state,
    prometheus_url,
    up,
    wait_scrape_target,
)
from ggufship.services._process import is_alive
from tests.gate_fixtures import wait_for_count
from tests.serve_fixtures import RunningServer, running_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian prometheus not installed"),
]

ANSWERS_PER_TRACK = 40
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(ANSWERS_PER_TRACK)]


@contextlib.contextmanager
def _server(model: Path, track: str, refusal: tuple[str, ...]) -> Iterator[RunningServer]:
    from ggufship.serve import ServeSettings

    settings = ServeSettings(
        model=str(model), n_threads=1, parallel=1, track=track, default_max_tokens=6, refusal_patterns=refusal
    )
    with running_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def started(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    """Prometheus + four servers, each pair fed the same prompts; (Prometheus URL, start time)."""
    state_dir = tmp_path_factory.mktemp("quality") / "state"
    settings = ServicesSettings(
        state_dir=state_dir, services=("prometheus",), prometheus_scrape_interval_s=0.5
    )
    never = (r"\A(?!)",)  # matches nothing
    pid = None
    with contextlib.ExitStack() as stack:
        servers = {
            ("aa", "stable"): stack.enter_context(_server(tiny_export, "stable", never)),
            ("aa", "canary"): stack.enter_context(_server(tiny_export, "canary", never)),
            ("refuses", "stable"): stack.enter_context(_server(tiny_export, "stable", never)),
            ("refuses", "canary"): stack.enter_context(_server(tiny_export, "canary", (r"\A",))),
        }
        try:
            up(settings)
            info = load_state(state_dir).services["prometheus"]
            pid, ticks = info.pid, info.pid_start_ticks
            url = prometheus_url(state_dir)
            for pair in ("aa", "refuses"):
                targets = [servers[(pair, t)].url.removeprefix("http://") for t in ("stable", "canary")]
                add_scrape_target(state_dir, f"quality-{pair}", targets, {"pair": pair})
                wait_scrape_target(url, f"quality-{pair}", timeout_s=60)
            # Warm-up: one answer each, scraped twice, so every counter series exists before the
            # window's traffic (a series first scraped at a value > 0 loses that value: the gate,
            # like increase(), counts increases between samples).
            with httpx.Client(timeout=120) as http, PrometheusClient(url, timeout_s=5) as client:
                for srv in servers.values():
                    warm = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
                    assert http.post(f"{srv.url}/v1/completions", json=warm).status_code == 200
                wait_for_count(client, f"count(count_over_time({ANSWERS}[1m]) >= 2)", 4, timeout_s=30)
            started = time.time()
            with httpx.Client(timeout=120) as http:
                # bounded: 40 requests per server, sampled (temperature 1) with a seed per prompt, so the
                # two tracks of a pair give the same answers (an exact A/A: no false fail by chance)
                for seed, prompt in enumerate(PROMPTS):
                    for srv in servers.values():
                        body = {
                            "model": "tiny",
                            "prompt": prompt,
                            "max_tokens": 6,
                            "temperature": 1.0,
                            "seed": seed,
                        }
                        assert http.post(f"{srv.url}/v1/completions", json=body).status_code == 200
            with PrometheusClient(url, timeout_s=5) as client:
                wait_for_count(client, f"sum({ANSWERS})", 4 * (ANSWERS_PER_TRACK + 1), timeout_s=30)
            yield url, started
        finally:
            with contextlib.suppress(Exception):
                down(state_dir, stop_timeout_s=10)
            if pid is not None and is_alive(pid, ticks):
                os.killpg(pid, signal.SIGKILL)
                pytest.fail(f"prometheus pid {pid} survived down")


def _verdict(url: str, started: float, pair: str):
    window = float(math.ceil(time.time() - started) + 5)
    request = make_request(
        None,
        prometheus_url=url,
        model="tiny",
        window_s=window,
        matchers=(f'pair="{pair}"',),
        min_samples=30,
        metrics=("completion_length", "surprisal"),
        max_p99_s=3600,  # a CPU test box: latency is not what this test judges
    )
    return analyze(request)


def _check(verdict, name: str):
    return next(c for c in verdict.checks if c.name == name)


def test_alike_tracks_pass_every_quality_check(started: tuple[str, float]) -> None:
    verdict = _verdict(*started, "aa")
    refusal, bad = _check(verdict, "rate-refusal"), _check(verdict, "rate-bad_answer")
    assert refusal.outcome == "pass" and bad.outcome == "pass", verdict.reason
    assert refusal.details["canary_answers"] == refusal.details["stable_answers"] == ANSWERS_PER_TRACK, (
        refusal.details,
        [q for q in verdict.queries if "answers" in q.purpose],
    )
    assert refusal.details["canary_events"] == refusal.details["stable_events"] == 0
    surprisal = _check(verdict, "ks-surprisal")
    assert surprisal.outcome == "pass", surprisal.reason
    assert surprisal.details["d_two_sided"] == 0.0  # same seeds, same answers: the same distribution
    # one observation per answer with at least one token (an answer that is only EOG has none)
    for n in (surprisal.details["n_canary"], surprisal.details["n_stable"]):
        assert ANSWERS_PER_TRACK - 5 <= n <= ANSWERS_PER_TRACK  # type: ignore[operator]
    assert verdict.outcome == "pass", verdict.reason


def test_a_refusing_canary_fails_on_the_refusal_rate(started: tuple[str, float]) -> None:
    verdict = _verdict(*started, "refuses")
    refusal = _check(verdict, "rate-refusal")
    assert refusal.outcome == "fail", refusal.reason
    assert refusal.details["canary_events"] == ANSWERS_PER_TRACK and refusal.details["stable_events"] == 0
    assert _check(verdict, "rate-bad_answer").outcome == "pass"
    assert verdict.outcome == "fail" and "refusal rate" in verdict.reason
