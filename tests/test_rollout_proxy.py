"""The rollout's proxy (real nginx on loopback) and load generator, against two small real HTTP
backends standing in for the stable and canary API servers (no model needed)."""

from __future__ import annotations

import http.server
import itertools
import json
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufship.retry import poll_until
from ggufship.rollout import CANARY_HEADER, TRACK_HEADER, RolloutError, RolloutProxyError, trace_id
from ggufship.rollout._load import LoadGenerator, LoadSpec, new_traceparent, read_records
from ggufship.rollout._proxy import NginxProxy, ProxyRoutes, render_config
from ggufship.services._process import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="nginx not installed"
)


class Backend(http.server.ThreadingHTTPServer):
    """A tiny OpenAI-shaped backend: answers 200 with its name; ``hold`` blocks POSTs on an event."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.hold = False
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Backend

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms each
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append(self.headers.get("traceparent") or "")
        # only POSTs are held: a GET that an old (draining) nginx worker still accepted answers at once
        if self.server.hold and self.command == "POST":
            self.server.arrived.set()
            self.server.release.wait(30)
        body = json.dumps({"backend": self.server.name}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    stable, canary = Backend("stable"), Backend("canary")
    yield stable, canary
    for b in (stable, canary):
        b.release.set()
        b.shutdown()
        b.server_close()


@pytest.fixture
def proxy(tmp_path: Path, backends: tuple[Backend, Backend]) -> Iterator[NginxProxy]:
    stable, canary = backends
    p = NginxProxy(tmp_path / "nginx", ProxyRoutes(free_port(), stable.port, canary.port, 20))
    p.start()
    yield p
    p.stop()
    assert not p.alive()


def _get(client: object, url: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
    import httpx

    assert isinstance(client, httpx.Client)
    resp = client.get(url + "/v1/models", headers=headers or {})
    assert resp.status_code == 200, resp.text
    return resp.headers[TRACK_HEADER], resp.json()["backend"]


def test_weights_header_and_trace_routing(proxy: NginxProxy) -> None:
    import httpx

    with httpx.Client(trust_env=False, timeout=10) as client:
        # weight 20%: the split is per request (random request id) without a traceparent
        tracks = Counter(_get(client, proxy.url)[0] for _ in range(400))
        # binomial(400, 0.2): mean 80, sd 8; 6 sd either side
        assert 32 <= tracks["canary"] <= 128, tracks
        # the header names the backend that answered
        for _ in range(20):
            track, backend = _get(client, proxy.url)
            assert track == backend
        # x-canary: always pins to the canary, never to the stable
        assert {_get(client, proxy.url, {CANARY_HEADER: "always"})[1] for _ in range(20)} == {"canary"}
        assert {_get(client, proxy.url, {CANARY_HEADER: "never"})[1] for _ in range(20)} == {"stable"}
        # one trace stays on one track: same trace id (new span ids) → same backend every time
        per_trace: dict[str, set[str]] = {}
        for _ in range(40):
            tp, tid = new_traceparent()
            for _ in range(3):
                span = tp.split("-")
                span[2] = new_traceparent()[0].split("-")[2]
                per_trace.setdefault(tid, set()).add(
                    _get(client, proxy.url, {"traceparent": "-".join(span)})[1]
                )
        assert all(len(v) == 1 for v in per_trace.values()), per_trace
        assert trace_id(tp) == tid

        # weight 100: everything on the canary; no canary: everything on the stable, even pinned
        proxy.route(
            ProxyRoutes(proxy.routes.listen_port, proxy.routes.stable_port, proxy.routes.canary_port, 100)
        )
        assert {_get(client, proxy.url)[1] for _ in range(20)} == {"canary"}
        proxy.route(ProxyRoutes(proxy.routes.listen_port, proxy.routes.stable_port, None, 0))
        assert {_get(client, proxy.url, {CANARY_HEADER: "always"})[1] for _ in range(20)} == {"stable"}

    access = (proxy.prefix / "logs" / "access.log").read_text()
    assert "track=canary" in access and "track=stable" in access


def test_reload_drains_in_flight_requests(proxy: NginxProxy, backends: tuple[Backend, Backend]) -> None:
    """A request on the canary when the route switches away still completes; route() returns after it."""
    import httpx

    _, canary = backends
    canary.hold = True
    result: dict[str, object] = {}

    def slow_request() -> None:
        with httpx.Client(trust_env=False, timeout=30) as client:
            result["resp"] = client.post(proxy.url + "/v1/completions", headers={CANARY_HEADER: "always"})

    requester = threading.Thread(target=slow_request)
    requester.start()
    assert canary.arrived.wait(15), "the pinned request never reached the canary"

    old_workers = set(proxy.workers())
    switched = threading.Event()

    def switch() -> None:
        proxy.route(
            ProxyRoutes(proxy.routes.listen_port, proxy.routes.stable_port, None, 0), drain_timeout_s=30
        )
        switched.set()

    switcher = threading.Thread(target=switch)
    switcher.start()
    for _ in range(600):  # bounded: until the reloaded master runs a new worker
        if set(proxy.workers()) - old_workers:
            break
        switcher.join(0.05)
    else:
        pytest.fail("nginx started no new worker after the reload")
    # While the old worker holds the canary request, new requests already follow the new routes.
    # Each probe opens a new connection: a kept-alive one may stay on the old worker (which serves
    # the old config until it exits), and the old worker may still accept for a moment after the
    # reload signal, however long a loaded machine takes to deliver it. Bounded by a deadline.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(trust_env=False, timeout=10, limits=no_keepalive) as client:
        deadline = time.monotonic() + 30
        while _get(client, proxy.url, {CANARY_HEADER: "always"})[1] != "stable":
            if time.monotonic() > deadline:
                pytest.fail("new config not active while the old worker drains")
            switcher.join(0.05)
    assert not switched.is_set(), "route() returned while a request was still in flight on the old worker"
    canary.release.set()
    requester.join(30)
    switcher.join(30)
    assert switched.is_set()
    resp = result["resp"]
    assert isinstance(resp, httpx.Response) and resp.status_code == 200
    assert resp.json()["backend"] == "canary"


def _wait_for_records(gen: LoadGenerator, count: int, timeout_s: float) -> bool:
    """Wait (bounded) until ``count`` requests completed; False on timeout or when the load ended short."""
    return (
        poll_until(lambda: len(gen.records()) >= count or gen.done(), timeout_s=timeout_s, interval_s=0.05)
        and len(gen.records()) >= count
    )


def test_load_generator_records_every_request(proxy: NginxProxy, tmp_path: Path) -> None:
    records_file = tmp_path / "load.jsonl"
    gen = LoadGenerator(
        LoadSpec(url=proxy.url, concurrency=3, max_requests=60, max_seconds=60, model="tiny"), records_file
    )
    gen.start()
    assert _wait_for_records(gen, 60, timeout_s=60)
    records = gen.stop()
    assert len(records) == 60
    assert sorted(r.index for r in records) == list(range(60))
    assert all(r.ok and r.track in ("stable", "canary") for r in records)
    assert len({r.trace_id for r in records}) == 60
    assert {r.index for r in read_records(records_file)} == set(range(60))


def test_load_generator_is_bounded_in_time(proxy: NginxProxy, backends: tuple[Backend, Backend]) -> None:
    _stable, _canary = backends
    gen = LoadGenerator(LoadSpec(url=proxy.url, concurrency=2, max_requests=10_000_000, max_seconds=1.0))
    gen.start()
    gen._thread.join(30)  # type: ignore[union-attr]
    assert gen.done()
    assert 0 < len(gen.stop()) < 10_000_000


def test_load_generator_paced(proxy: NginxProxy) -> None:
    # 10 requests at 1000/s: index i is not sent before i ms; all done and all recorded
    gen = LoadGenerator(LoadSpec(url=proxy.url, concurrency=2, max_requests=10, rate_per_s=1000))
    gen.start()
    assert _wait_for_records(gen, 10, timeout_s=30)
    records = sorted(gen.stop(), key=lambda r: r.index)
    assert all(b.started_at >= a.started_at - 0.05 for a, b in itertools.pairwise(records))


def test_transport_errors_are_recorded(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    gen = LoadGenerator(LoadSpec(url=f"http://127.0.0.1:{port}", concurrency=1, max_requests=3, timeout_s=5))
    gen.start()
    assert _wait_for_records(gen, 3, timeout_s=30)
    records = gen.stop()
    assert len(records) == 3 and all(r.status is None and r.error for r in records)


def test_bad_routes_and_config(tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match=r"canary weight must be within 0\.\.100, got 101"):
        ProxyRoutes(free_port(), 1234, 1235, 101)
    with pytest.raises(RolloutError, match="canary weight 5% without a canary upstream"):
        ProxyRoutes(free_port(), 1234, None, 5)
    with pytest.raises(RolloutError, match="stable_port 0 is not a TCP port"):
        ProxyRoutes(free_port(), 0, None, 0)
    text = render_config(ProxyRoutes(8080, 1234, 1235, 5), tmp_path)
    assert "5% canary;" in text and "listen 127.0.0.1:8080;" in text and "always canary;" in text


def test_port_in_use_fails_with_log(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    stable, _canary = backends
    p = NginxProxy(tmp_path / "nginx", ProxyRoutes(stable.port, stable.port, None, 0), start_timeout_s=10)
    with pytest.raises(RolloutProxyError, match=r"nginx exited during start-up; log .*error\.log"):
        p.start()
    assert not p.alive()
