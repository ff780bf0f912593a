"""The gate against a *broken* Prometheus: garbage answers are inconclusive, never pass, never fail.

The test double is an HTTP server on a free loopback port that speaks the Prometheus
HTTP API (``/api/v1/query``, ``/api/v1/query_range``) and answers each kind of the
gate's queries with crafted JSON — the shapes a real Prometheus never sends (NaN or
+Inf counter samples, ``"abc"``, malformed ``values``, a histogram with only the +Inf
bucket, scalar answers). A real Prometheus cannot be made to send most of these; what
a real one does send is covered by ``tests/test_gate_prometheus.py``.

Every row goes through the library (``analyze``), the CLI (exit 2 and a JSON verdict
with a reason, no traceback) and ``gate serve`` (HTTP 200 with the inconclusive
verdict). One valid row shows the harness can pass, so "inconclusive" is not an
artefact of the double.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from ggufship.cli.main import main
from ggufship.gate import analyze, make_request, make_server, serve_in_thread
from ggufship.metrics import REQUEST_DURATION, latency_buckets

T0 = 1_700_000_000.0
N = 200  # observations per track in the valid histogram (min_samples below is 20)


def _bucket_series(counts_per_le: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
    """Matrix items: one series per ``le`` with two samples (start, end of the window)."""
    return [
        {
            "metric": {"__name__": f"{REQUEST_DURATION}_bucket", "le": le},
            "values": [[T0, first], [T0 + 30, last]],
        }
        for le, (first, last) in counts_per_le.items()
    ]


def valid_buckets() -> list[dict[str, Any]]:
    """A plausible latency histogram: N observations spread over the first buckets."""
    bounds = latency_buckets()
    cum: dict[str, tuple[Any, Any]] = {}
    for i, b in enumerate(bounds):
        cum[repr(b)] = ("0", str(min(N, max(0, (i - 5) * 25))))
    cum["+Inf"] = ("0", str(N))
    return _bucket_series(cum)


def matrix(result: Any) -> dict[str, Any]:
    return {"resultType": "matrix", "result": result}


def vector(value: Any) -> dict[str, Any]:
    return {"resultType": "vector", "result": [{"metric": {}, "value": [T0 + 30, value]}]}


def with_bad_sample(sample: Any) -> list[dict[str, Any]]:
    """The valid histogram with the +Inf series' last sample replaced by ``sample``."""
    items = valid_buckets()
    items[-1]["values"][-1] = sample
    return items


@dataclass(frozen=True)
class Answers:
    """What the double answers for each kind of gate query (``data`` of a success body)."""

    buckets: Any
    p99: Any = None
    ratio: Any = None
    range_: Any = None  # quantile-series


GOOD = Answers(buckets=matrix(valid_buckets()), p99=vector("0.1"), ratio=vector("0"))


def _replace(**kw: Any) -> Answers:
    return Answers(**{**GOOD.__dict__, **kw})


# (id, answers, a piece of the reason the verdict must carry)
GARBAGE: list[tuple[str, Answers, str]] = [
    ("bucket-nan", _replace(buckets=matrix(with_bad_sample([T0 + 30, "NaN"]))), "NaN"),
    ("bucket-inf", _replace(buckets=matrix(with_bad_sample([T0 + 30, "+Inf"]))), "inf"),
    ("bucket-abc", _replace(buckets=matrix(with_bad_sample([T0 + 30, "abc"]))), "abc"),
    ("bucket-negative", _replace(buckets=matrix(with_bad_sample([T0 + 30, "-5"]))), "-5"),
    ("sample-not-a-pair", _replace(buckets=matrix(with_bad_sample([T0 + 30]))), "pair"),
    ("sample-a-scalar", _replace(buckets=matrix(with_bad_sample("7"))), "pair"),
    ("sample-time-abc", _replace(buckets=matrix(with_bad_sample(["abc", "7"]))), "abc"),
    ("sample-value-bool", _replace(buckets=matrix(with_bad_sample([T0 + 30, True]))), "True"),
    ("sample-time-huge-int", _replace(buckets=matrix(with_bad_sample([10**400, "200"]))), "not a number"),
    ("sample-time-backwards", _replace(buckets=matrix(with_bad_sample([T0 - 5, "200"]))), "increasing"),
    (
        "values-not-a-list",
        _replace(buckets=matrix([{"metric": {"le": "+Inf"}, "values": "abc"}])),
        "values",
    ),
    ("values-missing", _replace(buckets=matrix([{"metric": {"le": "+Inf"}}])), "values"),
    ("result-a-string", _replace(buckets=matrix("abc")), "result"),
    ("result-items-not-objects", _replace(buckets=matrix([1, 2, 3])), "result"),
    ("series-without-le", _replace(buckets=matrix([{"metric": {}, "values": [[T0, "1"]]}])), "le"),
    ("le-abc", _replace(buckets=matrix(_bucket_series({"abc": ("0", "9")}))), "abc"),
    ("le-nan", _replace(buckets=matrix(_bucket_series({"NaN": ("0", "9")}))), "NaN"),
    (
        "only-inf-bucket",
        _replace(buckets=matrix(_bucket_series({"+Inf": ("0", str(N))}))),
        "only the +Inf bucket",
    ),
    (
        "scalar-answers",
        Answers(
            buckets={"resultType": "scalar", "result": [T0, "5"]},
            p99={"resultType": "scalar", "result": [T0, "5"]},
            ratio={"resultType": "scalar", "result": [T0, "5"]},
        ),
        "scalar",
    ),
    ("vector-for-buckets", _replace(buckets=vector("200")), "vector"),
    ("p99-abc", _replace(p99=vector("abc")), "abc"),
    ("p99-inf", _replace(p99=vector("+Inf")), "inf"),
    ("p99-negative", _replace(p99=vector("-1")), "-1"),
    ("p99-nan", _replace(p99=vector("NaN")), "p99"),
    ("p99-two-series", _replace(p99={"resultType": "vector", "result": [
        {"metric": {}, "value": [T0, "0.1"]}, {"metric": {}, "value": [T0, "0.2"]}]}), "one series"),
    ("ratio-above-one", _replace(ratio=vector("7")), "outside"),
    ("ratio-inf", _replace(ratio=vector("+Inf")), "inf"),
    ("ratio-value-missing", _replace(ratio={"resultType": "vector", "result": [{"metric": {}}]}), "pair"),
    ("data-not-an-object", _replace(buckets="abc"), "no data"),
]  # fmt: skip


def _query_kind(promql: str) -> str:
    if "histogram_quantile" in promql:
        return "p99"
    if "requests_total" in promql:
        return "ratio"
    return "buckets"


class _FakePrometheus(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        promql = parse_qs(url.query).get("query", [""])[0]
        answers = self.server.answers
        if url.path == "/api/v1/query_range":
            data = answers.range_
        elif url.path == "/api/v1/query":
            data = getattr(answers, _query_kind(promql))
        else:
            self.send_error(404)
            return
        body = json.dumps({"status": "success", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    answers: Answers = GOOD


@pytest.fixture(scope="module")
def prometheus() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def url_of(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


OPTIONS = {"metrics": ("latency",), "rates": (), "min_samples": 20, "window_s": 30.0, "timeout_s": 5.0}
CLI_OPTIONS = [
    "--metrics",
    "latency",
    "--rates",
    "",
    "--min-samples",
    "20",
    "--window",
    "30s",
    "--timeout",
    "5",
]


def run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue()


def test_the_double_can_pass(prometheus: _Server) -> None:
    """Valid answers (identical tracks) pass: the rows below are inconclusive because of the garbage."""
    prometheus.answers = GOOD
    verdict = analyze(make_request(None, prometheus_url=url_of(prometheus), **OPTIONS))
    assert verdict.outcome == "pass", verdict.reason
    rc, out = run_cli(["gate", "--prometheus", url_of(prometheus), *CLI_OPTIONS, "--json"])
    assert rc == 0 and json.loads(out)["outcome"] == "pass"


@pytest.mark.parametrize(
    ("answers", "needle"), [(a, n) for _, a, n in GARBAGE], ids=[i for i, _, _ in GARBAGE]
)
def test_garbage_is_inconclusive_in_library_and_cli(
    prometheus: _Server, answers: Answers, needle: str
) -> None:
    prometheus.answers = answers
    verdict = analyze(make_request(None, prometheus_url=url_of(prometheus), **OPTIONS))
    assert verdict.outcome == "inconclusive", verdict.reason
    explained = " ".join([verdict.reason, *verdict.errors, *(c.reason for c in verdict.checks)])
    assert needle.lower() in explained.lower(), explained

    rc, out = run_cli(["gate", "--prometheus", url_of(prometheus), *CLI_OPTIONS, "--json"])
    assert rc == 2, out
    doc = json.loads(out)
    assert doc["outcome"] == "inconclusive" and doc["reason"]


@pytest.mark.parametrize("row", ["bucket-nan", "only-inf-bucket", "scalar-answers"])
def test_garbage_cli_process_exits_2_without_traceback(prometheus: _Server, row: str) -> None:
    prometheus.answers = next(a for i, a, _ in GARBAGE if i == row)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ggufship.cli.main",
            "gate",
            "--prometheus",
            url_of(prometheus),
            *CLI_OPTIONS,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "inconclusive"


def test_garbage_through_gate_serve(prometheus: _Server) -> None:
    base = make_request(None, prometheus_url=url_of(prometheus), **OPTIONS)
    server = make_server(base, "127.0.0.1", 0)
    thread = serve_in_thread(server)
    try:
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
            for row_id, answers, _needle in GARBAGE:
                prometheus.answers = answers
                resp = http.get("/gate")
                assert resp.status_code == 200, (row_id, resp.text)
                body = resp.json()
                assert body["outcome"] == "inconclusive", (row_id, body["reason"])
                assert body["reason"], row_id
            prometheus.answers = GOOD
            assert http.get("/gate").json()["outcome"] == "pass"  # the server survived every row
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_quantile_series_garbage_is_inconclusive(prometheus: _Server) -> None:
    bad_range: Callable[[Any], dict[str, Any]] = lambda v: matrix(  # noqa: E731
        [{"metric": {}, "values": [[T0 + i, "0.1"] for i in range(9)] + [[T0 + 10, v]]}]
    )
    for value, needle in (("+Inf", "infinite"), ("abc", "abc")):
        prometheus.answers = _replace(range_=bad_range(value))
        verdict = analyze(
            make_request(
                None,
                prometheus_url=url_of(prometheus),
                method="quantile-series",
                series_step_s=1.0,
                **OPTIONS,
            )
        )
        assert verdict.outcome == "inconclusive", verdict.reason
        assert needle in verdict.reason
        assert verdict.queries[-1].kind == "range" and verdict.queries[-1].error


def test_an_unexpected_error_is_inconclusive_not_fail(
    prometheus: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: a bug inside the analysis reads as inconclusive (exit 2), never as fail (exit 1)."""
    from ggufship.gate import _analyze as gate  # where analyze() looks evaluate up

    def broken(*_a: object, **_k: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gate, "evaluate", _first_call_raises(gate.evaluate, broken))
    prometheus.answers = GOOD
    verdict = analyze(make_request(None, prometheus_url=url_of(prometheus), **OPTIONS))
    assert verdict.outcome == "inconclusive"
    assert "ZeroDivisionError: a bug" in verdict.reason


def _first_call_raises(real: Callable[..., Any], fault: Callable[..., Any]) -> Callable[..., Any]:
    calls = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fault(*args, **kwargs) if len(calls) == 1 else real(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- property: any JSON answer


def _json() -> Any:
    from hypothesis import strategies as st

    big = st.integers(min_value=10**308, max_value=10**400)  # beyond any float
    scalars = st.none() | st.booleans() | st.integers() | big | st.floats() | st.text(max_size=8)
    samples = st.lists(scalars, max_size=3) | scalars
    return st.recursive(
        scalars | samples,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )


def _answers() -> Any:
    """Answers shaped roughly like Prometheus' (past the parsers' first checks), with hostile leaves."""
    from hypothesis import strategies as st

    big = st.integers(min_value=10**308, max_value=10**400)
    label_values = st.sampled_from(["+Inf", "0.1", "1", "NaN", "abc", "-1", ""]) | st.text(max_size=6)
    value = st.sampled_from(["1", "0", "NaN", "+Inf", "-Inf", "-3", "abc", "1e400"]) | _json()
    sample = st.lists(st.floats() | st.integers() | big | st.text(max_size=4), min_size=2, max_size=2).map(
        lambda pair: [pair[0], pair[1]]
    ) | st.tuples(st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=2e9), value).map(
        list
    )
    series = st.fixed_dictionaries(
        {
            "metric": st.dictionaries(st.sampled_from(["le", "__name__", "x"]), label_values, max_size=2)
            | _json()
        },
        optional={"values": st.lists(sample, max_size=4) | _json(), "value": sample | _json()},
    )
    result = st.lists(series, max_size=4) | _json()
    kind = st.sampled_from(["matrix", "vector", "scalar", "string"]) | _json()
    return st.fixed_dictionaries({"resultType": kind, "result": result})


def test_parsers_raise_only_answer_errors_on_any_answer() -> None:
    """Whatever Prometheus sends, the parsers return clean values or raise PrometheusAnswerError."""
    from hypothesis import HealthCheck, given, settings

    from ggufship.gate import PrometheusAnswerError
    from ggufship.gate._prometheus import _counter_series, _histogram, _scalar, _series_values

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_answers())
    def check(data: dict[str, Any]) -> None:
        import math

        try:
            raw = _counter_series(data, "q")
            hist = _histogram(raw, "q")
        except PrometheusAnswerError:
            pass
        else:
            assert all(math.isfinite(v) and v >= 0 for s in raw for v in s.values)
            assert hist is None or any(math.isfinite(b) for b in hist.bounds)
        try:
            value = _scalar(data, "q")
        except PrometheusAnswerError:
            pass
        else:
            assert value is None or isinstance(value, float)
        try:
            values = _series_values(data, "q")
        except PrometheusAnswerError:
            pass
        else:
            assert all(math.isfinite(v) for v in values)

    check()
