"""Hostile clients against a real uvicorn on 127.0.0.1 and the tiny exported model (issue 13, items 3–5).

* Malformed text (lone surrogates, NUL, invalid / overlong UTF-8 in the raw body, invalid JSON escapes,
  huge numbers, wrong types) on every text-taking route, streaming and blocking: always a 4xx in the
  OpenAI error shape, and ``ggufship_requests_total`` never gains a 5xx (the canary gate's signal).
* Hypothesis-generated hostile bodies: never a 5xx, every error OpenAI-shaped.
* Limits: the body size (413, Content-Length or chunked), messages per request, JSON values.
* Prompt building under the queue (429 before any rendering; off the event loop) and a truncation
  that renders O(log n) times, with the same result as the one-message-at-a-time policy.
* /docs, /redoc, /openapi.json behind the API key, or off.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve_fixtures import RunningServer, running_server

KEY = "sk-test-hostile"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
MAX_BYTES = 64 * 1024
MAX_MESSAGES = 64
MAX_VALUES = 4096

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DIFY_CHAT = "/v1/chat-messages"
DIFY_COMPLETION = "/v1/completion-messages"


def _settings(model: Path, **kw: object):
    from ggufship.serve import ServeSettings

    base: dict[str, object] = {"model": str(model), "n_threads": 1}
    base.update(kw)
    return ServeSettings(**base)


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[RunningServer]:
    settings_ = _settings(
        tiny_export,
        parallel=2,
        queue_size=64,
        api_keys=(KEY,),
        context_policy="truncate",
        default_max_tokens=2,
        max_request_bytes=MAX_BYTES,
        max_messages=MAX_MESSAGES,
        max_json_values=MAX_VALUES,
    )
    with running_server(settings_) as srv:
        yield srv


def _body(path: str, text: bytes, stream: bool) -> bytes:
    """A request body of ``path`` whose text parameter is the raw JSON ``text`` (any bytes)."""
    s = b"true" if stream else b"false"
    mode = b'"streaming"' if stream else b'"blocking"'
    if path == CHAT:
        return b'{"model":"tiny","max_tokens":2,"stream":%s,"messages":[{"role":"user","content":%s}]}' % (
            s,
            text,
        )
    if path == COMPLETIONS:
        return b'{"model":"tiny","max_tokens":2,"stream":%s,"prompt":%s}' % (s, text)
    if path == DIFY_CHAT:
        return b'{"user":"u","inputs":{},"response_mode":%s,"query":%s}' % (mode, text)
    return b'{"user":"u","response_mode":%s,"inputs":{"query":%s}}' % (mode, text)


#: Where each route's text parameter is, as the error's ``param`` names it.
TEXT_PARAM = {
    CHAT: "messages[0].content",
    COMPLETIONS: "prompt",
    DIFY_CHAT: "query",
    DIFY_COMPLETION: "inputs.query",
}
ROUTES = (CHAT, COMPLETIONS, DIFY_CHAT, DIFY_COMPLETION)

#: (name, raw JSON put where the text goes, whether the error names that parameter)
CORPUS: list[tuple[str, bytes, bool]] = [
    ("lone high surrogate", rb'"abc \ud800 def"', True),
    ("lone low surrogate", rb'"\udc00"', True),
    ("reversed surrogate pair", rb'"\udc00\ud800"', True),
    ("high surrogate at the end", rb'"smile \ud83d"', True),
    ("escaped NUL", rb'"a\u0000b"', True),
    ("raw NUL byte in a string", b'"a\x00b"', False),
    ("raw control character", b'"a\x01b"', False),
    ("invalid UTF-8 byte", b'"a\xffb"', False),
    ("overlong slash", b'"\xc0\xaf"', False),
    ("overlong NUL (modified UTF-8)", b'"a\xc0\x80b"', False),
    ("UTF-8-encoded surrogate (CESU-8)", b'"\xed\xa0\x80"', False),
    ("truncated sequence", b'"\xe2\x82"', False),
    ("5-byte sequence", b'"\xf8\x88\x80\x80\x80"', False),
    ("invalid escape \\x", rb'"\x41"', False),
    ("short unicode escape", rb'"\u12"', False),
    ("non-hex unicode escape", rb'"\uZZZZ"', False),
    ("unterminated string", b'"abc', False),
    ("huge float", b"1e999", True),
    ("NaN", b"NaN", True),
    ("huge integer", b"9" * 40, True),
    ("integer with 5000 digits", b"9" * 5000, False),
    ("number", b"123", True),
    ("object", b'{"text":"x"}', True),
    ("list of objects", b'[{"a":1}]', True),
    ("boolean", b"true", True),
    ("nested too deeply", b"[" * 200 + b"]" * 200, False),
]


def _metric_total(srv: RunningServer, first_digit: str) -> float:
    """Sum of ``ggufship_requests_total`` over every endpoint with a ``code`` starting with the digit."""
    from prometheus_client.parser import text_string_to_metric_families

    from ggufship import metrics as m

    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == m.REQUESTS and s.labels.get("code", "").startswith(first_digit)
    )


def _assert_openai_error(r: httpx.Response, path: str) -> dict:
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:300])
    body = r.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if path in (DIFY_CHAT, DIFY_COMPLETION):
        assert body["status"] == r.status_code and body["code"] == error["code"], body
    return error


# --- item 3: a lone surrogate is the client's fault -------------------------------------------------------


def test_lone_surrogate_is_400_not_500(server: RunningServer) -> None:
    """The issue's reproduction: ``"\\ud800"`` in a prompt was a 500 ``generation_failed``, counted as 5xx."""
    before = _metric_total(server, "5")
    r = httpx.post(
        f"{server.url}{CHAT}",
        content=rb'{"model":"tiny","messages":[{"role":"user","content":"\ud800"}],"max_tokens":2}',
        headers=JSON,
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = _assert_openai_error(r, CHAT)
    assert error["param"] == "messages[0].content" and error["type"] == "invalid_request_error"
    assert "U+D800" in error["message"] and "surrogate" in error["message"]
    assert _metric_total(server, "5") == before


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
@pytest.mark.parametrize("path", ROUTES)
def test_malformed_text_corpus_is_4xx_and_never_counted_as_5xx(
    server: RunningServer, path: str, stream: bool
) -> None:
    five_before, four_before = _metric_total(server, "5"), _metric_total(server, "4")
    with httpx.Client(timeout=60) as c:
        ok = c.post(f"{server.url}{path}", content=_body(path, b'"Hello there"', stream), headers=JSON)
        assert ok.status_code == 200, ok.text  # the same body with good text works: the corpus is the cause
        for name, text, names_param in CORPUS:
            r = c.post(f"{server.url}{path}", content=_body(path, text, stream), headers=JSON)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
            error = _assert_openai_error(r, path)
            if names_param:
                assert error["param"] == TEXT_PARAM[path], (name, error)
                assert error["message"].startswith(TEXT_PARAM[path]), (name, error)
    assert _metric_total(server, "5") == five_before
    assert _metric_total(server, "4") == four_before + len(CORPUS)


@pytest.mark.parametrize(
    ("fragment", "param"),
    [
        (b'"max_tokens":1e999', "max_tokens"),
        (b'"max_tokens":99999999999999999999999', "max_tokens"),
        (b'"max_tokens":99999999', "messages"),  # fits no context: context_length_exceeded
        (b'"temperature":NaN', "temperature"),
        (b'"temperature":-Infinity', "temperature"),
        (b'"seed":-1', "seed"),
        (b'"top_k":"many"', "top_k"),
        (b'"stop":[1,2]', "stop"),
        (b'"stop":["\\ud800"]', "stop[0]"),
        (b'"stream":"maybe"', "stream"),
        (b'"n":1.5', "n"),
        (b'"user":{"id":1}', "user"),
        (b'"bad\\u0000key":1', "bad\\x00key"),
    ],
)
def test_hostile_parameters_are_400_naming_them(server: RunningServer, fragment: bytes, param: str) -> None:
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],%s}' % fragment
    before = _metric_total(server, "5")
    r = httpx.post(f"{server.url}{CHAT}", content=body, headers=JSON, timeout=60)
    assert r.status_code == 400, r.text
    assert _assert_openai_error(r, CHAT)["param"] == param
    assert _metric_total(server, "5") == before


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'"text"', b"null", b"\xef\xbb\xbf{}", b"{}" * 3, b'{"model":"tiny"}'],
    ids=["empty", "array", "string", "null", "bom", "two-docs", "no-messages"],
)
def test_bodies_that_are_no_request_are_400(server: RunningServer, body: bytes) -> None:
    for path in ROUTES:
        r = httpx.post(f"{server.url}{path}", content=body, headers=JSON, timeout=60)
        assert r.status_code == 400, (path, r.text)
        _assert_openai_error(r, path)


# --- hypothesis: hostile bodies ---------------------------------------------------------------------------

HOSTILE_CHARS = st.one_of(
    st.characters(codec=None, exclude_categories=()),  # every code point, surrogates included
    st.sampled_from(["\x00", "\ud800", "\udfff", "\ud83d", "\ufeff", "\u202e", "\\", '"']),
)
HOSTILE_TEXT = st.one_of(
    st.text(HOSTILE_CHARS, max_size=40),
    st.sampled_from(["{% raw %}", "{{ 7*7 }}", "<s>", "</s>", "<|im_start|>", "\ud83d\ude00"]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    HOSTILE_TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(HOSTILE_TEXT, inner, max_size=4)),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), JSONISH)},
    optional={"content": st.one_of(HOSTILE_TEXT, JSONISH), "name": JSONISH},
)
CHAT_BODY = st.fixed_dictionaries(
    {
        "model": st.one_of(st.just("tiny"), JSONISH),
        "messages": st.one_of(st.lists(MESSAGE, max_size=4), JSONISH),
    },
    optional={
        "max_tokens": st.one_of(st.integers(-2, 3), JSONISH),
        "temperature": st.one_of(st.just(0), JSONISH),
        "stream": st.one_of(st.booleans(), JSONISH),
        "stop": st.one_of(st.lists(HOSTILE_TEXT, max_size=3), JSONISH),
        "seed": JSONISH,
    },
)
COMPLETION_BODY = st.fixed_dictionaries(
    {"model": st.one_of(st.just("tiny"), JSONISH), "prompt": st.one_of(HOSTILE_TEXT, JSONISH)},
    optional={
        "max_tokens": st.one_of(st.integers(-2, 3), JSONISH),
        "stream": st.one_of(st.booleans(), JSONISH),
        "stop": JSONISH,
    },
)
DIFY_BODY = st.fixed_dictionaries(
    {
        "query": st.one_of(HOSTILE_TEXT, JSONISH),
        "inputs": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"query": HOSTILE_TEXT, "system": st.one_of(HOSTILE_TEXT, JSONISH)}
            ),
            JSONISH,
        ),
    },
    optional={
        "response_mode": st.one_of(st.sampled_from(["blocking", "streaming"]), JSONISH),
        "user": JSONISH,
        "conversation_id": JSONISH,
    },
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(ROUTES))
    doc = draw({CHAT: CHAT_BODY, COMPLETIONS: COMPLETION_BODY}.get(path, DIFY_BODY))
    doc = {**draw(st.dictionaries(HOSTILE_TEXT, JSONISH, max_size=2)), **doc}  # unknown fields
    if path in (CHAT, COMPLETIONS) and draw(st.booleans()):
        doc["max_tokens"] = 1  # reach generation now and then
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
    mutation = draw(st.sampled_from(["none", "none", "insert", "truncate", "replace"]))
    if mutation != "none" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        junk = draw(st.binary(min_size=1, max_size=4))
        if mutation == "insert":
            raw = raw[:at] + junk + raw[at:]
        elif mutation == "truncate":
            raw = raw[:at]
        else:
            raw = raw[:at] + junk + raw[at + len(junk) :]
    return path, raw


def test_hypothesis_hostile_bodies_never_5xx(server: RunningServer) -> None:
    seen: dict[int, int] = {}
    before = _metric_total(server, "5")
    client = httpx.Client(timeout=60)

    @given(request=hostile_requests())
    @settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(request: tuple[str, bytes]) -> None:
        path, raw = request
        r = client.post(f"{server.url}{path}", content=raw, headers=JSON)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, raw[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            _assert_openai_error(r, path)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert '"status":5' not in r.text and '"type":"server_error"' not in r.text, r.text[:300]

    try:
        check()
    finally:
        client.close()
    assert _metric_total(server, "5") == before
    assert seen.get(400, 0) > 0 and any(code == 200 for code in seen), seen


# --- item 4: limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
def test_body_over_the_limit_is_413_by_content_length_and_chunked(server: RunningServer, path: str) -> None:
    big = _body(path, b'"' + b"a" * (MAX_BYTES + 10) + b'"', False)
    r = httpx.post(f"{server.url}{path}", content=big, headers=JSON, timeout=60)
    assert r.status_code == 413, r.text
    error = _assert_openai_error(r, path)
    assert error["code"] == "request_too_large" and f"{MAX_BYTES} bytes" in error["message"]
    assert "max_request_bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = httpx.post(f"{server.url}{path}", content=chunks(), headers=JSON, timeout=60)
    assert r.status_code == 413, r.text
    assert _assert_openai_error(r, path)["code"] == "request_too_large"
    # just under the limit is read and answered
    ok = _body(path, b'"' + b"a " * ((MAX_BYTES - 200) // 2) + b'"', False)
    assert len(ok) <= MAX_BYTES
    r = httpx.post(f"{server.url}{path}", content=ok, headers=JSON, timeout=60)
    assert r.status_code in (200, 400), r.text  # 400: too long for the tiny model's context, not 413
    if r.status_code == 400:
        assert _assert_openai_error(r, path)["code"] == "context_length_exceeded"


def test_too_many_messages_and_values_are_400(server: RunningServer) -> None:
    messages = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    r = httpx.post(
        f"{server.url}{CHAT}", json={"model": "tiny", "messages": messages}, headers=AUTH, timeout=60
    )
    assert r.status_code == 400
    error = _assert_openai_error(r, CHAT)
    assert error["param"] == "messages" and f"at most {MAX_MESSAGES} messages" in error["message"]
    r = httpx.post(
        f"{server.url}{COMPLETIONS}",
        json={"model": "tiny", "prompt": [1] * MAX_VALUES},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400
    error = _assert_openai_error(r, COMPLETIONS)
    assert error["code"] == "too_many_values" and "max_json_values" in error["message"]
    # a body with many structural bytes goes to the (counting, interruptible) pure-Python decoder
    r = httpx.post(
        f"{server.url}{COMPLETIONS}",
        json={"model": "tiny", "prompt": [1] * 25_000},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400 and _assert_openai_error(r, COMPLETIONS)["code"] == "too_many_values"
    # ... and parses what is fine: 25,000 commas inside one string are one value
    r = httpx.post(
        f"{server.url}{COMPLETIONS}",
        json={"model": "tiny", "prompt": "a," * 25_000, "max_tokens": 1},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["truncated"]["prompt_tokens_dropped"] > 0


def test_body_parser_paths_agree() -> None:
    """The C and the pure-Python decoder accept and refuse the same documents."""
    from ggufship.serve import _body
    from ggufship.serve.errors import InvalidRequestError

    limits = _body.BodyLimits(1 << 20, 1000, 10)
    docs = [
        b'{"a": [1, 2.5, -3e2, true, false, null, "x\\u00e9\\ud83d\\ude00", {"b": {}}], "c": ""}',
        b'{"messages": [{"role": "user", "content": "hi"}]}',
    ]
    for raw in docs:
        fast = _body.parse(raw, limits)
        slow = _body._python_decoder(limits.max_values).decode(raw.decode())
        assert fast == slow
    with pytest.raises(InvalidRequestError, match="max_json_values"):
        _body.parse(b"[" + b"1," * 30_000 + b"1]", limits)  # > FAST_PARSE_STRUCTURE: counted while parsed
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        _body.parse(b'{"a": "' + b"x," * 30_000 + b'"', limits)  # unterminated, on the Python path


def test_error_messages_echoing_bad_text_stay_encodable(server: RunningServer) -> None:
    """A model name is echoed in its 404; one that is valid JSON but odd Unicode still encodes."""
    r = httpx.post(
        f"{server.url}{CHAT}",
        json={"model": "gpt\u202e-9 \U0001f600", "messages": [{"role": "user", "content": "x"}]},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 404 and "\U0001f600" in _assert_openai_error(r, CHAT)["message"]


# --- item 4: prompt building under the queue and off the event loop; linear truncation -------------------


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_prompt_is_built_off_the_event_loop(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    context = server.state.inference.context
    real = context.chat_tokens
    calls: list[tuple[bool, str]] = []

    def recording(messages):
        calls.append((_on_event_loop(), threading.current_thread().name))
        return real(messages)

    monkeypatch.setattr(context, "chat_tokens", recording)
    for path, body in ((CHAT, _body(CHAT, b'"hi"', False)), (DIFY_CHAT, _body(DIFY_CHAT, b'"hi"', False))):
        r = httpx.post(f"{server.url}{path}", content=body, headers=JSON, timeout=60)
        assert r.status_code == 200, r.text
    assert len(calls) >= 2 and not any(on_loop for on_loop, _ in calls), calls


def test_queue_limit_applies_before_the_prompt_is_built(tiny_export: Path) -> None:
    """One instance, no queue, busy: a request with a huge conversation is refused with 429 at once,
    without its prompt ever being rendered (before, it was rendered and tokenized on the event loop)."""
    # every token (EOS too) takes 5 s: after the first one arrives, the instance stays busy for 5 s more
    slow = {"fault_token_delay_seconds": 5.0, "fault_token_delay_fraction": 1.0}
    with running_server(_settings(tiny_export, parallel=1, queue_size=0, **slow)) as srv:
        context = srv.state.inference.context
        rendered: list[int] = []
        real = context.render

        def counting(messages):
            rendered.append(len(messages))
            return real(messages)

        context.render = counting  # this server only; it is stopped below
        long_body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
        huge = [{"role": "user", "content": "word " * 20}] * 2000
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{srv.url}{COMPLETIONS}", json=long_body) as s:
            assert s.status_code == 200
            lines = s.iter_lines()  # (kept referenced: a collected iterator closes the stream)
            assert next(line for line in lines if line.startswith("data: "))
            busy = c.post(f"{srv.url}{CHAT}", json={"model": "tiny", "messages": huge, "max_tokens": 2})
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["code"] == "queue_full"
            assert rendered == []  # never rendered


def _reference_truncation(context, messages, requested):
    """The policy as first written: drop the oldest droppable message one at a time, re-render each time."""
    kept = list(messages)
    last_user = max((i for i, m in enumerate(kept) if m.role == "user"), default=len(kept) - 1)
    droppable = [i for i, m in enumerate(kept[:last_user]) if m.role not in ("system", "developer")]
    for dropped in range(1, len(droppable) + 1):
        gone = set(droppable[:dropped])
        tokens = context.chat_tokens([m for i, m in enumerate(kept) if i not in gone])
        if len(tokens) + (requested or 1) <= context.n_ctx:
            return dropped, tokens
    return None


@pytest.mark.parametrize("n", [3, 9, 40, 75])
def test_truncation_matches_the_one_by_one_policy(server: RunningServer, n: int) -> None:
    from ggufship.serve._context import Message

    context = server.state.inference.context
    messages = [Message("system", "Be brief.")]
    for i in range(n):
        messages += [
            Message("user", f"question {i} " + "lorem ipsum " * (i % 7)),
            Message("assistant", "answer " * (1 + i % 5)),
        ]
        if i % 11 == 5:
            messages.append(Message("developer", f"note {i}"))
    messages.append(Message("user", "The last question?"))
    requested = 24
    prompt = context.chat_prompt(messages, requested)
    if len(context.chat_tokens(messages)) + requested <= context.n_ctx:  # fits: nothing to truncate
        assert n < 40 and not prompt.truncated
        return
    expected = _reference_truncation(context, messages, requested)
    assert expected is not None
    assert prompt.messages_dropped == expected[0]
    assert list(prompt.tokens) == expected[1]
    assert len(prompt.tokens) + requested <= context.n_ctx


def test_truncation_renders_logarithmically_often(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ggufship.serve._context import Message

    context = server.state.inference.context
    rendered: list[int] = []
    real = context.chat_tokens

    def counting(messages):
        rendered.append(len(messages))
        return real(messages)

    monkeypatch.setattr(context, "chat_tokens", counting)
    messages = [Message("system", "Be brief.")]
    for i in range(3000):
        messages.append(Message("user" if i % 2 == 0 else "assistant", f"turn {i} some words here"))
    messages.append(Message("user", "Last?"))
    prompt = context.chat_prompt(messages, 8)
    assert 2900 < prompt.messages_dropped < 3000 and len(prompt.tokens) + 8 <= context.n_ctx
    # 1 full render + 1 with nothing droppable + doubling + binary search: ~2·log2(kept) + 2, not 3000
    assert len(rendered) <= 2 + 2 * 12, len(rendered)
    assert sum(rendered[1:]) < 3 * 3001, rendered  # apart from the first, only about the kept ones


# --- item 5: the API's description ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_docs_need_the_api_key_when_keys_are_configured(server: RunningServer, path: str) -> None:
    r = httpx.get(f"{server.url}{path}", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}{path}", headers={"authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(f"{server.url}{path}", headers=AUTH, timeout=30)
    assert ok.status_code == 200
    if path == "/openapi.json":
        assert "/v1/chat/completions" in ok.json()["paths"]
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{server.url}{open_path}", timeout=30).status_code == 200


def test_docs_off(tiny_export: Path) -> None:
    with running_server(_settings(tiny_export, docs=False)) as srv:
        for path in ("/openapi.json", "/docs", "/redoc"):
            r = httpx.get(f"{srv.url}{path}", timeout=30)
            assert r.status_code == 404, path
        assert httpx.get(f"{srv.url}/healthz").text == "ok\n"


def test_docs_open_without_keys(tiny_export: Path) -> None:
    with running_server(_settings(tiny_export)) as srv:
        assert httpx.get(f"{srv.url}/openapi.json", timeout=30).status_code == 200


def test_valid_bodies_are_validated_in_the_worker_thread() -> None:
    """The middleware's worker thread hands the route a validated model (which FastAPI takes as it is);
    an invalid document goes on as it is, for the route's 400 naming the parameter."""
    from ggufship.serve import _body, _middleware
    from ggufship.serve.protocol.dify import ChatMessagesRequest
    from ggufship.serve.protocol.openai_chat import ChatCompletionRequest

    limits = _body.BodyLimits(1 << 20, 1000, 10)
    ok = _middleware._parse_and_validate(
        b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"vendor":1}', limits, CHAT
    )
    assert isinstance(ok, ChatCompletionRequest) and ok.model_extra == {"vendor": 1}
    dify = _middleware._parse_and_validate(b'{"query":"hi","inputs":{}}', limits, DIFY_CHAT)
    assert isinstance(dify, ChatMessagesRequest)
    assert _middleware._parse_and_validate(b'{"model":"tiny"}', limits, CHAT) == {"model": "tiny"}
