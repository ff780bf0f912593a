"""Start the real API server (uvicorn, 127.0.0.1, a free port) in a thread, and stop it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class RunningServer:
    url: str
    app: Any

    @property
    def state(self) -> Any:
        return self.app.state.ggufship


@contextlib.contextmanager
def running_server(
    settings: Any, *, wait_ready: bool = True, timeout: float = 120.0
) -> Iterator[RunningServer]:
    import uvicorn

    from ggufship.serve import create_app

    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        while wait_ready:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in time")
            time.sleep(0.05)
        yield RunningServer(url=url, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def sse_events(text: str, comments: list[str] | None = None) -> list[tuple[str | None, str]]:
    """(event, data) pairs of an SSE body; asserts the framing (blank line after each event). Comment
    lines (``: ...``, the OpenAI streams' pings) are left out, or collected into ``comments``."""
    assert text.endswith("\n\n"), text[-50:]
    out = []
    for block in text.split("\n\n")[:-1]:
        event = None
        data = []
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if comments is not None:
            comments.extend(line for line in block.split("\n") if line.startswith(":"))
        if not lines:
            continue
        for line in lines:
            field, _, value = line.partition(": ")
            assert field in ("event", "data"), line
            if field == "event":
                event = value
            else:
                data.append(value)
        out.append((event, "\n".join(data)))
    return out
