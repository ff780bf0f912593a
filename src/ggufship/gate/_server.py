"""``ggufship gate serve``: the verdict over HTTP, for the Argo Rollouts ``web`` metric provider.

``GET /gate`` runs one analysis and answers ``200`` with the verdict JSON whatever
the outcome (Argo treats non-2xx answers as measurement *errors*, not failures);
the AnalysisTemplate maps ``result.outcome`` to pass/fail, and anything else is
inconclusive. Query parameters override the defaults given at start; they are the
options of :class:`~ggufship.gate.GateRequest` under their option names (those of the
CLI flags with ``_`` for ``-``: ``window``, ``model``, ``matcher`` (repeatable),
``analyses``, ``metrics`` and ``rates`` (comma lists, empty for none), ``stable_track``,
``canary_track``, ``track_label``, ``namespace``, …), all but ``prometheus`` (where the
server connects is fixed at start). A bad or unknown parameter → ``400`` with
``{"error": ...}``; any other path → ``404``. ``GET /healthz`` → ``{"status": "ok"}``.

FastAPI on uvicorn, like the API; binds 127.0.0.1 unless told otherwise.
"""

# no `from __future__ import annotations`: FastAPI reads the route functions' annotations,
# which name classes imported inside create_app
import logging
import socket
import threading
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from ggufship.gate._analyze import analyze, build_request, request_options
from ggufship.gate._errors import GateConfigError, GateServeError
from ggufship.gate._model import GateRequest
from ggufship.options import model_input

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


def request_from_query(base: GateRequest, query: str) -> GateRequest:
    """The base request with the URL's query parameters applied; raises :class:`GateConfigError`."""
    options = {o.name: o for o in request_options() if o.query}
    values: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise GateConfigError(f"unknown query parameter {key!r}; known: {', '.join(sorted(options))}")
        values.setdefault(key, []).append(value)
    data = model_input(tuple(options.values()), values)
    return build_request(base, data, spell=lambda o: f"query parameter {o.name}")


def create_app(base: GateRequest) -> "FastAPI":
    """The gate's ASGI app: ``/gate`` and ``/healthz`` over ``base``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="ggufship gate", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    def _not_found(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            detail = f"no such path {request.url.path!r}; use /gate or /healthz"
        else:
            detail = str(exc.detail)
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/gate")
    def gate(request: Request) -> Response:  # sync: FastAPI runs it in its thread pool
        query = request.url.query
        try:
            gate_request = request_from_query(base, query)
        except GateConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        verdict = analyze(gate_request)
        logger.info("gate serve: %s → %s", query or "(defaults)", verdict.outcome)
        return Response(verdict.to_json(), media_type="application/json")

    return app


class GateHTTPServer:
    """The gate server bound to its socket; :meth:`serve_forever` until :meth:`shutdown`."""

    def __init__(self, sock: socket.socket, base_request: GateRequest) -> None:
        import uvicorn

        self.base_request = base_request
        self._sock = sock
        config = uvicorn.Config(create_app(base_request), log_config=None, access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._stopped.set()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop serving; returns once the server loop has ended (or after ``timeout_s``)."""
        self._server.should_exit = True
        self._stopped.wait(timeout_s)

    def server_close(self) -> None:
        self._sock.close()


def make_server(base: GateRequest, host: str = "127.0.0.1", port: int = 0) -> GateHTTPServer:
    """Bind (port 0: a free one) without serving yet; call ``serve_forever`` or :func:`serve_in_thread`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise GateServeError(f"gate serve: cannot listen on {host}:{port}: {exc}") from exc
    return GateHTTPServer(sock, base)


def serve_in_thread(server: GateHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests, the local rollout); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="ggufship-gate-serve", daemon=True)
    thread.start()
    return thread


__all__ = ["GateHTTPServer", "create_app", "make_server", "request_from_query", "serve_in_thread"]
