"""``ggufship gate serve``: the verdict over HTTP, for the Argo Rollouts ``web`` metric provider.

``GET /gate`` runs one analysis and answers ``200`` with the verdict JSON whatever
the outcome (Argo treats non-2xx answers as measurement *errors*, not failures);
the AnalysisTemplate maps ``result.outcome`` to pass/fail, and anything else is
inconclusive. Query parameters override the defaults given at start: ``window``
(``5m``, ``300``), ``model``, ``endpoint``, ``matcher`` (repeatable), ``analyses``
(planned analyses), ``alpha``, ``min_samples``, ``metrics`` (comma list), ``rates`` (comma
list, empty for none), ``min_rate_increase``, ``max_refusal_rate``, ``max_bad_answer_rate``,
``method``, ``max_p99``, ``max_error_ratio``, ``min_ks_d``, ``min_median_shift``,
``two_sided``, ``stable_track``, ``canary_track``, ``track_label``, ``namespace`` (in a
cluster the tracks are pod-template hashes under ``rollouts_pod_template_hash``). A bad
parameter → ``400`` with
``{"error": ...}``. ``GET /healthz`` → ``{"status": "ok"}``.

Standard library ``ThreadingHTTPServer``; binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ggufship.gate._model import GateConfigError, GateRequest, GateServeError, parse_duration

logger = logging.getLogger(__name__)

_SINGLE = {
    "model": ("model", str),
    "endpoint": ("endpoint", str),
    "analyses": ("planned_analyses", int),
    "alpha": ("alpha", float),
    "min_samples": ("min_samples", int),
    "method": ("method", str),
    "max_p99": ("max_p99_s", float),
    "max_error_ratio": ("max_error_ratio", float),
    "min_ks_d": ("min_ks_d", float),
    "min_median_shift": ("min_median_shift", float),
    "stable_track": ("stable_track", str),
    "canary_track": ("canary_track", str),
    "track_label": ("track_label", str),
    "namespace": ("namespace", str),
    "min_rate_increase": ("min_rate_increase", float),
    "max_refusal_rate": ("max_refusal_rate", float),
    "max_bad_answer_rate": ("max_bad_answer_rate", float),
}


def request_from_query(base: GateRequest, query: str) -> GateRequest:
    """The base request with the URL's query parameters applied; raises :class:`GateConfigError`."""
    from ggufship.gate import make_request

    params = parse_qs(query, keep_blank_values=True)
    overrides: dict[str, Any] = {}
    for key, values in params.items():
        value = values[-1]
        if key == "window":
            overrides["window_s"] = parse_duration(value)
        elif key == "matcher":
            overrides["matchers"] = tuple(values)
        elif key in ("metrics", "rates"):
            overrides[key] = tuple(m.strip() for m in value.split(",") if m.strip())
        elif key == "two_sided":
            overrides["two_sided"] = value.lower() in ("1", "true", "yes")
        elif key in _SINGLE:
            field, kind = _SINGLE[key]
            try:
                overrides[field] = kind(value)
            except ValueError:
                raise GateConfigError(f"query parameter {key}={value!r}: not a {kind.__name__}") from None
        else:
            raise GateConfigError(f"unknown query parameter {key!r}")
    return make_request(base, **overrides)


class _Handler(BaseHTTPRequestHandler):
    server: GateHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("gate serve: " + format, *args)

    def _send(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        from ggufship.gate import analyze

        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(200, json.dumps({"status": "ok"}) + "\n")
            return
        if url.path != "/gate":
            self._send(404, json.dumps({"error": f"no such path {url.path!r}; use /gate or /healthz"}) + "\n")
            return
        try:
            request = request_from_query(self.server.base_request, url.query)
        except GateConfigError as exc:
            self._send(400, json.dumps({"error": str(exc)}) + "\n")
            return
        verdict = analyze(request)
        logger.info("gate serve: %s → %s", url.query or "(defaults)", verdict.outcome)
        self._send(200, verdict.to_json())


class GateHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], base_request: GateRequest) -> None:
        self.base_request = base_request
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(base: GateRequest, host: str = "127.0.0.1", port: int = 0) -> GateHTTPServer:
    """Bind (port 0: a free one) without serving yet; call ``serve_forever`` or :func:`serve_in_thread`."""
    try:
        return GateHTTPServer((host, port), base)
    except OSError as exc:
        raise GateServeError(f"gate serve: cannot listen on {host}:{port}: {exc}") from exc


def serve_in_thread(server: GateHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests, the local rollout); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="ggufship-gate-serve", daemon=True)
    thread.start()
    return thread
