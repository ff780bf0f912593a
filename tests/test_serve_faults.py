"""Token-level fault injection against a real uvicorn on 127.0.0.1 and the tiny exported model:
a generation failing mid-stream (the error inside the stream: OpenAI ``data: {"error"}`` then
``[DONE]``, Dify ``event: error``), a slow model (per-token delay: ITL/TTFT histograms, Dify
pings end to end, a disconnect still stops the generation at once), and the settings' bounds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_fixtures import RunningServer, running_server, sse_events

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
FAIL_AFTER = 2
DELAY = 0.3  # seconds per token; no ITL bucket bound lies in [0.2868, 0.3)


def _settings(model: Path, **kw: object):
    from ggufship.serve import ServeSettings

    return ServeSettings(**{"model": str(model), "n_threads": 1, "parallel": 1, **kw})


def _samples(url: str, endpoint: str) -> dict[tuple[str, str | None, str | None], float]:
    """``/metrics`` of one endpoint: (name, code, le) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, s.labels.get("code"), s.labels.get("le")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.labels.get("endpoint") == endpoint
    }


# --- a generation failing after N tokens -----------------------------------------------------------------


@pytest.fixture(scope="module")
def failing(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = _settings(
        tiny_export,
        audit_log=tmp_path_factory.mktemp("audit") / "audit.jsonl",
        default_max_tokens=8,
        fault_stream_error_after_tokens=FAIL_AFTER,
        fault_stream_error_fraction=1.0,
    )
    with running_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def failing_client(failing: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{failing.url}/v1", api_key="none", max_retries=0, timeout=60)


def _assert_injected(error: dict) -> None:
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == "fault_injected" and error["type"] == "server_error"
    assert f"after {FAIL_AFTER} token(s)" in error["message"], error["message"]
    assert "fault_stream_error_after_tokens" in error["message"]


def test_openai_client_chat_stream_raises_after_first_chunks(failing_client: openai.OpenAI) -> None:
    stream = failing_client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, temperature=0, stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            chunks.append(chunk)
    assert err.value.code == "fault_injected"
    assert "fault injected: generation failed" in err.value.message
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices[0].delta.content for c in chunks), chunks
    assert all(c.choices[0].finish_reason is None for c in chunks)  # it never finished


def test_openai_client_completion_stream_raises(failing_client: openai.OpenAI) -> None:
    stream = failing_client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            chunks.append(chunk)
    assert err.value.code == "fault_injected" and err.value.type == "server_error"
    assert any(c.choices[0].text for c in chunks), chunks


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "The quick brown fox"}),
    ],
)
def test_raw_stream_error_chunk_then_done(failing: RunningServer, path: str, body: dict) -> None:
    req = {"model": "tiny", "max_tokens": 8, "temperature": 0, "stream": True, **body}
    r = httpx.post(f"{failing.url}{path}", json=req, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    payloads = [json.loads(d) for _, d in events[:-1]]
    assert "error" in payloads[-1] and all("error" not in p for p in payloads[:-1])
    _assert_injected(payloads[-1]["error"])
    content = [
        (c.get("delta", {}).get("content") if "delta" in c else c.get("text"))
        for p in payloads[:-1]
        for c in p["choices"]
    ]
    assert any(content), payloads  # at least one content chunk came before the error


def test_blocking_is_500_with_the_openai_error_body(failing: RunningServer) -> None:
    r = httpx.post(
        f"{failing.url}/v1/chat/completions",
        json={"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 500
    _assert_injected(r.json()["error"])
    client = openai.OpenAI(base_url=f"{failing.url}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8)
    assert err.value.status_code == 500 and err.value.code == "fault_injected"


def test_dify_stream_messages_then_error_event(failing: RunningServer) -> None:
    r = httpx.post(
        f"{failing.url}/v1/chat-messages",
        json={"query": "Hello", "response_mode": "streaming", "user": "u1", "inputs": {}},
        timeout=60,
    )
    assert r.status_code == 200
    events = [json.loads(d) for ev, d in sse_events(r.text) if ev != "ping"]
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "error" and kinds[0] == "message" and set(kinds[:-1]) == {"message"}, kinds
    error = events[-1]
    assert error["status"] == 500 and error["code"] == "fault_injected"
    assert f"after {FAIL_AFTER} token(s)" in error["message"]
    assert error["message_id"] == events[0]["message_id"]
    blocking = httpx.post(
        f"{failing.url}/v1/chat-messages",
        json={"query": "Hello", "response_mode": "blocking", "user": "u1", "inputs": {}},
        timeout=60,
    )
    assert blocking.status_code == 500
    body = blocking.json()
    assert body["code"] == "fault_injected" and body["status"] == 500
    assert body["error"]["code"] == "fault_injected"


def test_mid_stream_failure_counts_as_its_error(failing: RunningServer) -> None:
    """The stream's 200 went out before it failed, yet ``ggufship_requests_total`` counts it with the
    status of the error sent inside it (500), like the blocking request, so the gate's 5xx ratio sees
    failed streams; neither is a finished generation (no token metrics); the audit log names it."""
    from ggufship import metrics as m

    ep = "/v1/completions"
    before = _samples(failing.url, ep)
    req = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    headers = {"x-request-id": "stream-that-fails"}
    streamed = httpx.post(f"{failing.url}{ep}", json={**req, "stream": True}, headers=headers, timeout=60)
    assert streamed.status_code == 200
    assert httpx.post(f"{failing.url}{ep}", json=req, timeout=60).status_code == 500
    after = _samples(failing.url, ep)

    def delta(name: str, code: str | None = None) -> float:
        return after.get((name, code, None), 0.0) - before.get((name, code, None), 0.0)

    assert delta(m.REQUESTS, "200") == 0 and delta(m.REQUESTS, "500") == 2
    assert delta(f"{m.REQUEST_DURATION}_count") == 2
    assert delta(m.COMPLETION_TOKENS) == 0 and delta(f"{m.TIME_TO_FIRST_TOKEN}_count") == 0
    assert failing.state.engine.waiting == 0
    audit_log = failing.state.settings.audit_log
    assert audit_log is not None
    events = [json.loads(line)["event"] for line in audit_log.read_text().splitlines()]
    mine = [e for e in events if e.get("request_id") == "stream-that-fails"]
    assert len(mine) == 1 and mine[0]["status"] == 200, mine
    assert mine[0]["stream_error"] == {"status": 500, "code": "fault_injected"}, mine


# --- a slow model: per-token delay -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tiny_export: Path) -> Iterator[RunningServer]:
    settings = _settings(
        tiny_export,
        track="canary",
        default_max_tokens=6,  # Dify requests cannot set it
        ping_interval_seconds=0.05,
        fault_token_delay_seconds=DELAY,
        fault_token_delay_fraction=1.0,
    )
    with running_server(settings) as srv:
        yield srv


def test_dify_pings_between_messages_of_a_slow_stream(slow: RunningServer) -> None:
    r = httpx.post(
        f"{slow.url}/v1/chat-messages",
        json={"query": "Hello", "response_mode": "streaming", "user": "u1", "inputs": {}},
        timeout=60,
    )
    assert r.status_code == 200
    events = sse_events(r.text)
    kinds = ["ping" if ev == "ping" else json.loads(d)["event"] for ev, d in events]
    assert kinds[-1] == "message_end" and "error" not in kinds, kinds
    assert ("ping", "{}") in events and kinds[0] == "ping"  # the first token is delayed too
    # no data can arrive while a token is delayed, so pings come between the data events: the
    # first `message` is out by the 4th token at the latest (a UTF-8 character held back has at
    # most 4 bytes), and at least one more delayed token (or the delayed end-of-generation
    # token) follows it before `message_end`
    data_at = [i for i, kind in enumerate(kinds) if kind != "ping"]
    assert kinds[data_at[0]] == "message", kinds
    assert any(data_at[0] < i < data_at[-1] for i, kind in enumerate(kinds) if kind == "ping"), kinds
    done = json.loads(events[-1][1])
    assert done["metadata"]["usage"]["completion_tokens"] >= 1, done


def test_openai_stream_pings_are_comments_the_client_skips(slow: RunningServer) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True, "temperature": 0}
    r = httpx.post(f"{slow.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    comments: list[str] = []
    events = sse_events(r.text, comments)
    assert ": ping" in comments and events[-1] == (None, "[DONE]")
    assert all(ev is None for ev, _ in events)  # no `event:` line: only data and comments
    client = openai.OpenAI(base_url=f"{slow.url}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(**body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(
        c["delta"].get("content") or "" for _, d in events[:-1] for c in json.loads(d)["choices"]
    )


def test_token_delay_shows_in_itl_and_ttft(slow: RunningServer) -> None:
    from ggufship import metrics as m

    ep = "/v1/completions"
    r = httpx.post(
        f"{slow.url}{ep}",
        json={"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 3, "stream": True},
        timeout=60,
    )
    assert r.status_code == 200 and sse_events(r.text)[-1] == (None, "[DONE]")
    s = _samples(slow.url, ep)
    itl, ttft = m.INTER_TOKEN_LATENCY, m.TIME_TO_FIRST_TOKEN
    gaps = s[(f"{itl}_count", None, None)]
    assert gaps >= 1  # ≥ 2 tokens generated
    below = [(le, v) for (name, _, le), v in s.items() if name == f"{itl}_bucket" and float(le) < DELAY]
    assert below and all(v == 0 for _, v in below), below
    assert s[(f"{itl}_sum", None, None)] >= DELAY * gaps
    assert all(v == 0 for (name, _, le), v in s.items() if name == f"{ttft}_bucket" and float(le) < DELAY)
    assert s[(f"{ttft}_count", None, None)] == 1
    assert s[(f"{m.REQUEST_DURATION}_sum", None, None)] >= DELAY * (gaps + 1)
    assert s[(m.REQUESTS, "200", None)] == 1


def test_disconnect_stops_a_delayed_generation_at_once(tiny_export: Path) -> None:
    """The worker waits out the injected delay on the cancel flag: a client that goes away ends a
    generation whose every token takes 60 s right away (and shutdown does not wait for it)."""
    settings = _settings(tiny_export, fault_token_delay_seconds=60, fault_token_delay_fraction=1.0)
    with running_server(settings) as srv:
        engine = srv.state.engine
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())  # the role chunk; the first token is 60 s away
            assert first.startswith("data: ")
        deadline = time.monotonic() + 20  # far below the 60 s a blocked worker would take
        while engine.cancelled < 1 or len(engine._free) != engine.parallel:  # stopped, instance back
            assert time.monotonic() < deadline, "the delayed generation did not stop"
            time.sleep(0.02)


def _streamed_text(url: str, body: dict) -> tuple[str, list[str]]:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    chunks = [json.loads(d) for _, d in sse_events(r.text) if d != "[DONE]"]
    text = "".join(c["delta"].get("content") or "" for e in chunks for c in e["choices"])
    return text, [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]


def test_a_disconnect_mid_batch_stops_only_its_own_stream(tiny_export: Path) -> None:
    """Two streams share the batch (slowed down so that they overlap); one client goes away after its
    first chunk: its generation is cancelled, the other stream ends as it does alone (greedy)."""
    settings = _settings(
        tiny_export, parallel=2, fault_token_delay_seconds=0.2, fault_token_delay_fraction=1.0
    )
    with running_server(settings) as srv:
        engine = srv.state.engine
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "stream": True, "temperature": 0}
        alone = _streamed_text(srv.url, body)
        outcome: dict[str, tuple[str, list[str]]] = {}
        other = threading.Thread(target=lambda: outcome.update(other=_streamed_text(srv.url, body)))
        before = engine.cancelled
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**body, "max_tokens": 40}) as r:
            assert r.status_code == 200
            other.start()
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            for line in lines:  # the first token's chunk (0.2 s away), then the client goes away
                if line.startswith("data: "):
                    break
        other.join(timeout=60)
        assert outcome["other"] == alone
        deadline = time.monotonic() + 5  # far below the 8 s the 40 tokens would take
        while engine.cancelled < before + 1:
            assert time.monotonic() < deadline, "the abandoned generation did not stop"
            time.sleep(0.02)


# --- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"fault_token_delay_fraction": 1.5}, "fault_token_delay_fraction"),
        ({"fault_token_delay_seconds": -1}, "fault_token_delay_seconds"),
        ({"fault_token_delay_seconds": 61}, "fault_token_delay_seconds"),
        ({"fault_stream_error_after_tokens": -1}, "fault_stream_error_after_tokens"),
        ({"fault_stream_error_fraction": -0.1}, "fault_stream_error_fraction"),
        ({"fault_stream_error_fraction": 0.5}, "needs fault_stream_error_after_tokens >= 1"),
    ],
)
def test_bad_fault_settings_are_rejected_naming_the_setting(kw: dict, needle: str) -> None:
    from pydantic import ValidationError

    from ggufship.serve import ServeSettings

    with pytest.raises(ValidationError) as err:
        ServeSettings(**kw)
    assert needle in str(err.value)


def test_fault_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from ggufship.serve import ServeSettings

    monkeypatch.setenv("GGUFSHIP_SERVE_FAULT_TOKEN_DELAY_SECONDS", "0.25")
    monkeypatch.setenv("GGUFSHIP_SERVE_FAULT_TOKEN_DELAY_FRACTION", "0.5")
    monkeypatch.setenv("GGUFSHIP_SERVE_FAULT_STREAM_ERROR_AFTER_TOKENS", "3")
    monkeypatch.setenv("GGUFSHIP_SERVE_FAULT_STREAM_ERROR_FRACTION", "0.1")
    s = ServeSettings()
    assert (s.fault_token_delay_seconds, s.fault_token_delay_fraction) == (0.25, 0.5)
    assert (s.fault_stream_error_after_tokens, s.fault_stream_error_fraction) == (3, 0.1)
    monkeypatch.setenv("GGUFSHIP_SERVE_FAULT_STREAM_ERROR_FRACTION", "1.5")
    with pytest.raises(ValidationError, match="fault_stream_error_fraction"):
        ServeSettings()
