"""``ggufship serve`` as a process: JSON logs with PII redacted, hash-chained audit log, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)


def test_serve_process_json_logs_and_audit(tiny_export: Path, tmp_path: Path) -> None:
    from ggufship.audit import verify_audit

    port = _free_port()
    audit = tmp_path / "audit.jsonl"
    cmd = [
        sys.executable, "-m", "ggufship.cli.main", "serve", str(tiny_export),
        "--port", str(port), "--n-threads", "1", "--track", "canary",
        "--log-format", "json", "--audit-log", str(audit),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        r = httpx.post(
            f"{url}/v1/chat-messages",
            json={
                "query": "Mail me at alice@example.com",
                "user": "alice@example.com",
                "response_mode": "blocking",
            },
            headers={"traceparent": trace, "x-request-id": "rid-1"},
            timeout=60,
        )
        assert r.status_code == 200
        assert "ggufship_model_info" in httpx.get(f"{url}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (the conventional exit status)
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines and all(isinstance(x, dict) for x in lines)
    assert "alice@example.com" not in err
    report = verify_audit(audit)
    assert report.ok
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    ev = next(e for e in events if e["path"] == "/v1/chat-messages")
    assert ev["request_id"] == "rid-1" and ev["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ev["status"] == 200 and ev["track"] == "canary" and ev["completion_tokens"] >= 1
    assert "alice@example.com" not in json.dumps(ev)


#: A chat stream whose 16 tokens are each delayed 0.5 s (fault injection, see _slow_server): at least
#: 8 s from its end when the first chunk arrives, a lower bound that no load can shorten.
SLOW_STREAM = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "max_tokens": 16,
    "temperature": 0,
    "stream": True,
}


def _slow_server(tiny_export: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A ``ggufship serve`` process (one thread, ``args`` added) that delays every token by 0.5 s,
    its stderr in ``log``; returns it and its URL once ready."""
    port = _free_port()
    env = {
        **os.environ,
        "GGUFSHIP_SERVE_FAULT_TOKEN_DELAY_SECONDS": "0.5",
        "GGUFSHIP_SERVE_FAULT_TOKEN_DELAY_FRACTION": "1",
    }
    cmd = [
        sys.executable, "-m", "ggufship.cli.main", "serve", str(tiny_export),
        "--port", str(port), "--n-threads", "1", *args,
    ]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def test_sigterm_cuts_a_stream_that_outlasts_the_shutdown_timeout(tiny_export: Path, tmp_path: Path) -> None:
    """``--shutdown-timeout-seconds`` bounds the drain: a stream with >= 8 s of delayed tokens left
    (16 tokens x 0.5 s, a lower bound no load can shorten) is cut when the 1 s drain ends, without its
    finish reason or ``[DONE]``, and the process exits on its own (well before the stream would have
    ended; the chart's terminationGracePeriodSeconds relies on this bound)."""
    log = tmp_path / "serve.log"
    proc, url = _slow_server(tiny_export, log, "--shutdown-timeout-seconds", "1")
    received: list[str] = []
    try:
        with (
            httpx.Client(timeout=120) as http,
            http.stream("POST", f"{url}/v1/chat/completions", json=SLOW_STREAM) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            received.append(next(line for line in lines if line.startswith("data: ")))
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(httpx.RemoteProtocolError):  # closed mid-body: cut, as expected
                for line in lines:
                    if line.startswith("data: "):
                        received.append(line)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "data: [DONE]" not in received, received[-3:]
    chunks = [json.loads(x.removeprefix("data: ")) for x in received]
    assert not any(ch.get("finish_reason") for c in chunks for ch in c.get("choices", [])), chunks
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "timeout graceful shutdown exceeded" in text, text[-2000:]


def test_sigterm_lets_a_running_stream_finish(tiny_export: Path, tmp_path: Path) -> None:
    """SIGTERM while a stream runs (issue 17): the server stops accepting connections at once, the
    running stream goes on to its finish reason and ``[DONE]`` (uvicorn drains it within its
    graceful-shutdown timeout; sse-starlette's own cancellation on exit is turned off), then the
    process exits with the conventional status. Every token is delayed (fault injection) so the
    stream is still running when the new connection is tried: 16 tokens x 0.5 s are left after the
    signal, a lower bound that no load can shorten."""
    from tests.process_fixtures import listening_sockets

    log = tmp_path / "serve.log"
    proc, url = _slow_server(tiny_export, log)
    body = SLOW_STREAM
    try:
        with (
            httpx.Client(timeout=120) as http,
            http.stream("POST", f"{url}/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while listening_sockets(proc.pid):  # uvicorn closes its listener first thing
                assert time.monotonic() < deadline, "still listening after SIGTERM"
                time.sleep(0.05)
            assert proc.poll() is None  # draining: the stream has >= 8 s of delayed tokens left
            try:
                late = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=30)
            except httpx.ConnectError:
                pass  # refused: nothing listens any more
            else:
                assert late.status_code == 503, late.text
            rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rest[-1] == "[DONE]", rest[-3:]
    chunks = [json.loads(x) for x in rest[:-1]]
    assert not any("error" in c for c in chunks), chunks
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes in (["length"], ["stop"]), chunks
    assert sum(bool(ch["delta"].get("content")) for c in chunks for ch in c["choices"]) >= 1
    # uvicorn shuts down gracefully, then re-raises the signal it caught (the conventional exit status)
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
