"""The API server against a real uvicorn on 127.0.0.1 and the tiny exported model:
the official openai client, plain HTTP for Dify + SSE framing, metrics, context policy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_fixtures import RunningServer, running_server, sse_events

KEY = "sk-test-serve"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _settings(model: Path, **kw: object):
    from ggufship.serve import ServeSettings

    base: dict[str, object] = {"model": str(model), "n_threads": 1}
    base.update(kw)
    return ServeSettings(**base)


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[RunningServer]:
    with running_server(_settings(tiny_export, parallel=2, queue_size=8, api_keys=(KEY,))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


# --- OpenAI routes ----------------------------------------------------------------------------------------


def test_probes_and_models(server: RunningServer, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/healthz").text == "ok\n"
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["ready"] is True and ready["model"] == "tiny" and ready["version"] == "1.0.0"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = models.data[0].model_dump()
    assert card["quantization"] == "Q4_K_M" and card["digest"].startswith("sha256:")


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_matches_blocking_and_reports_usage(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "messages": CHAT, "max_completion_tokens": 12, "temperature": 0, "seed": 7}
    blocking = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == blocking.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == blocking.usage.completion_tokens


def test_completions_blocking_and_stream(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens <= 6
    chunks = list(
        client.completions.create(
            model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text


def test_stream_ends_with_done(server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-1]:
        assert json.loads(data)["object"] == "text_completion"


def test_tgi_and_vllm_parameter_names(client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        temperature=0,
        extra_body={
            "max_new_tokens": 3,
            "stop_sequences": ["zzz"],
            "repetition_penalty": 1.1,
            "top_k": 5,
            "min_p": 0.1,
            "some_vendor_field": True,  # unknown: accepted and logged
        },
    )
    assert out.usage.completion_tokens <= 3
    assert "ignoring unknown field(s): 'some_vendor_field'" in caplog.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 3}, "n"),  # more choices than the server's parallel (2)
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"stop_sequences": ["a", "b", "c", "d", "e"]}}, "stop_sequences"),
        ({"stop": ["a", "b"], "extra_body": {"stop_sequences": ["c", "d", "e"]}}, "stop"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(client: openai.OpenAI, extra: dict, param: str) -> None:
    kw = {"model": "tiny", "messages": CHAT, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw)
    body = err.value.body
    assert body["param"] == param, body
    assert param.split("[")[0] in body["message"]
    assert body["type"] == "invalid_request_error"


def test_invalid_json_and_unknown_route_are_openai_shaped(server: RunningServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={**_auth(), "content-type": "application/json"},
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=_auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_auth(server: RunningServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # probes and metrics stay open


def test_context_reject(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 80}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["param"] == "messages"
    assert "maximum context length is 512" in err.value.body["message"]


def test_request_id_echo_and_traceparent(server: RunningServer) -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = httpx.get(
        f"{server.url}/v1/models", headers={**_auth(), "x-request-id": "req-123", "traceparent": trace}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-123"
    r = httpx.get(f"{server.url}/v1/models", headers=_auth())
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


# --- Dify routes --------------------------------------------------------------------------------------------


def test_dify_chat_blocking_and_conversation(server: RunningServer) -> None:
    url = f"{server.url}/v1/chat-messages"
    first = httpx.post(
        url,
        json={"query": "Hello there", "response_mode": "blocking", "user": "u1", "inputs": {}},
        headers=_auth(),
        timeout=60,
    ).json()
    assert first["event"] == "message" and first["mode"] == "chat" and first["conversation_id"]
    usage1 = first["metadata"]["usage"]
    assert usage1["total_tokens"] == usage1["prompt_tokens"] + usage1["completion_tokens"]
    second = httpx.post(
        url,
        json={
            "query": "And again",
            "response_mode": "blocking",
            "user": "u1",
            "conversation_id": first["conversation_id"],
            "inputs": {},
        },
        headers=_auth(),
        timeout=60,
    ).json()
    assert second["conversation_id"] == first["conversation_id"]
    assert second["metadata"]["usage"]["prompt_tokens"] > usage1["prompt_tokens"]  # history was sent
    r = httpx.post(
        url,
        json={
            "query": "x",
            "response_mode": "blocking",
            "user": "u2",
            "conversation_id": first["conversation_id"],
        },
        headers=_auth(),
    )
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "conversation_id" and r.json()["status"] == 404


def test_dify_chat_streaming_framing(server: RunningServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat-messages",
        json={"query": "Hello", "response_mode": "streaming", "user": "u3", "inputs": {}},
        headers=_auth(),
        timeout=60,
    )
    assert r.status_code == 200
    events = [json.loads(d) for ev, d in sse_events(r.text) if ev != "ping"]
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "message_end" and set(kinds[:-1]) <= {"message"}
    assert events[-1]["metadata"]["usage"]["completion_tokens"] >= 1
    assert len({e["message_id"] for e in events}) == 1 and events[0]["conversation_id"]


def test_dify_completion_messages(server: RunningServer) -> None:
    url = f"{server.url}/v1/completion-messages"
    ok = httpx.post(
        url,
        json={"inputs": {"query": "Paris is"}, "response_mode": "blocking", "user": "u"},
        headers=_auth(),
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["mode"] == "completion"
    bad = httpx.post(url, json={"inputs": {}, "response_mode": "blocking", "user": "u"}, headers=_auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "inputs.query"


def test_ping_events() -> None:
    """The keep-alives sse-starlette sends between events: Dify's ``event: ping`` (as Dify's own API
    sends it), an SSE comment on OpenAI streams (skipped by every SSE parser, the openai client's too)."""
    from ggufship.serve._sse import comment_ping, dify_ping

    assert dify_ping().encode() == b"event: ping\ndata: {}\n\n"
    assert comment_ping().encode() == b": ping\n\n"


# --- concurrency, metrics -----------------------------------------------------------------------------------


def test_eight_concurrent_streams(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "messages": CHAT, "max_tokens": 16, "temperature": 0}
    reference = client.chat.completions.create(**kw).choices[0].message.content
    assert reference

    def one(_: int) -> str:
        return "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, stream=True)
            if c.choices
        )

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(one, range(8)))
    assert outputs == [reference] * 8


def test_metrics_names_and_labels(server: RunningServer, client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from ggufship import metrics as m

    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=9)
    text = httpx.get(f"{server.url}/metrics").text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    base = {"model": "tiny", "version": "1.0.0", "track": "stable"}
    ep = {**base, "endpoint": "/v1/chat/completions"}

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in samples if s.name == name and s.labels == labels]
        assert found, (name, labels)
        return found[0]

    for name in (m.REQUEST_DURATION, m.TIME_TO_FIRST_TOKEN, m.INTER_TOKEN_LATENCY, m.COMPLETION_LENGTH):
        assert value(f"{name}_count", **ep) >= 1, name
    assert value(m.PROMPT_TOKENS, **ep) >= 1 and value(m.COMPLETION_TOKENS, **ep) >= 1
    assert value(m.REQUESTS, **ep, code="200") >= 1 and value(m.REQUESTS, **ep, code="400") >= 1
    assert value(m.IN_FLIGHT, **base) == 0 and value(m.QUEUED, **base) == 0
    info = [s for s in samples if s.name == m.MODEL_INFO]
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["quantization"] == "Q4_K_M" and re.fullmatch(
        "[0-9a-f]{64}", info[0].labels["digest"]
    )
    assert f"# TYPE {m.REFUSALS} counter" in text
    buckets = [
        s
        for s in samples
        if s.name == f"{m.REQUEST_DURATION}_bucket" and s.labels.get("endpoint") == ep["endpoint"]
    ]
    assert len(buckets) == len(m.latency_buckets()) + 1  # + Inf
    assert all(s.labels.get("endpoint") not in ("/healthz", "/readyz", "/metrics") for s in samples)


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    cut_at = len(full) // 2
    stop = full[cut_at : cut_at + 3]
    assert len(stop) == 3 and "\ufffd" not in stop, full
    expected = full[: full.index(stop)]
    blocking = client.completions.create(**kw, stop=[stop])
    assert blocking.choices[0].text == expected and blocking.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
