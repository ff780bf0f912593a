"""Function calling (``tools`` / ``tool_choice``) against a real server and the tiny exported model:
the official openai client for forced calls (grammar-constrained, greedy), the exact request shapes
Dify's OpenAI-API-compatible provider sends, and the 400s for bad tool inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.serve_fixtures import RunningServer, running_server, sse_events

KEY = "sk-test-tools"
WEATHER = {
    "type": "object",
    "properties": {
        # ASCII only and bounded: the untrained tiny model would otherwise write until max_tokens
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
#: A greedy chat request that must call get_weather (grammar-constrained).
FORCED_WEATHER = {
    "model": "tiny",
    "messages": CHAT,
    "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "temperature": 0,
}


def _settings(model: Path, **kw: object):
    from ggufship.serve import ServeSettings

    base: dict[str, object] = {"model": str(model), "n_threads": 1, "api_keys": (KEY,)}
    base.update(kw)
    return ServeSettings(**base)


@pytest.fixture(scope="module", params=["batch", "instances"])
def server(request: pytest.FixtureRequest, tiny_export: Path) -> Iterator[RunningServer]:
    # the tiny tokenizer spends ~650 tokens on the tool listing: more than its own 512-token window
    settings = _settings(tiny_export, engine=request.param, parallel=2, queue_size=8, n_ctx=2048)
    with running_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _check_call(call, allowed: set[str]) -> None:
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("text", ["What is the weather in Paris?", "Time please", "hello"])
def test_required_tool_choice_gives_a_schema_valid_call(client: openai.OpenAI, text: str) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": text}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0], set(SCHEMAS))


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=200,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_call(choice.message.tool_calls[0], {"get_time"})


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    """The call streams as OpenAI streams it (id, type and name first, then argument pieces); the
    openai client's own accumulation (``chat.completions.stream``) rebuilds the blocking answer."""
    kw = {**FORCED_WEATHER, "max_tokens": 200}
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert len(deltas) > 2, deltas  # incremental, not one chunk at the end
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    _check_call(call, {"get_weather"})
    assert final.choices[0].finish_reason == "tool_calls"
    # the same call as the blocking answer (greedy), to the character
    blocking = client.chat.completions.create(**kw)
    assert blocking.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments


def test_a_call_cut_off_by_max_tokens_is_the_same_call_blocking_and_streamed(client: openai.OpenAI) -> None:
    """``max_tokens`` ends the answer inside the call's arguments: the stream has already sent the call
    (id, name, argument pieces) and finishes with ``length``; the blocking answer is that same call
    with the same partial arguments and ``length`` (it used to come back as content)."""
    kw = FORCED_WEATHER
    whole = client.chat.completions.create(**kw, max_tokens=200)
    assert whole.choices[0].finish_reason == "tool_calls"
    full_args = whole.choices[0].message.tool_calls[0].function.arguments
    cut = whole.usage.completion_tokens - 3  # inside the arguments: they end with the value and "}}"
    chunks = list(client.chat.completions.create(**kw, max_tokens=cut, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert deltas and deltas[0].function.name == "get_weather"
    streamed = "".join(d.function.arguments or "" for d in deltas)
    assert streamed and full_args.startswith(streamed) and streamed != full_args
    blocking = client.chat.completions.create(**kw, max_tokens=cut)
    choice = blocking.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert choice.message.tool_calls[0].function.arguments == streamed


def test_dify_shaped_streaming_tool_call(server: RunningServer) -> None:
    """Dify's provider reads a streamed call delta by delta: ``id`` / ``type`` / ``function.name`` when
    present (never null), ``function.arguments`` appended (OAICompatLargeLanguageModel's stream
    handling, ``increase_tool_call``). The untrained model does not call a tool by itself under Dify's
    ``tool_choice: auto``, so the call is forced here; every other field is Dify's."""
    body = {**DIFY_FIRST_TURN, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json=body,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    events = [json.loads(d) for _, d in sse_events(r.text) if d != "[DONE]"]
    calls: dict[int, dict] = {}
    for e in events:
        for choice in e["choices"]:
            for tc in choice["delta"].get("tool_calls") or []:
                assert None not in (
                    tc.get("id", ""),
                    tc.get("type", ""),
                    tc.get("function", {}).get("name", ""),
                )
                acc = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                acc["id"] = tc.get("id") or acc["id"]
                acc["name"] = tc.get("function", {}).get("name") or acc["name"]
                acc["arguments"] += tc.get("function", {}).get("arguments", "")
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_time"
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME)
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["tool_calls"]


def test_streamed_logprobs_with_tools(client: openai.OpenAI) -> None:
    """``logprobs`` with ``tools`` offered, streamed (issue 17): content chunks carry the logprobs of
    their tokens, the same as the blocking answer's; a streamed call's chunks carry none, as the
    blocking call answer has ``logprobs: null`` (the API's ``logprobs`` holds message content only)."""
    kw = {
        "model": "tiny",
        "messages": CHAT,
        "tools": TOOLS,
        "tool_choice": "auto",
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 2,
    }
    blocking = client.chat.completions.create(**kw).choices[0]
    assert blocking.message.tool_calls is None, blocking  # greedy: the untrained model answers text
    chunks = list(client.chat.completions.create(**kw, stream=True))
    sent = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert sent and all(ch.logprobs is not None and ch.logprobs.content for ch in sent), sent
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in blocking.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx(
        [t.logprob for t in blocking.logprobs.content], abs=1e-4
    )
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    text = "".join(ch.delta.content for ch in sent)
    assert text == blocking.message.content
    assert b"".join(bytes(t.bytes) for t in streamed).decode("utf-8", "replace") == text

    forced = {**kw, "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "max_tokens": 200}
    call = client.chat.completions.create(**forced).choices[0]
    assert call.finish_reason == "tool_calls" and call.logprobs is None
    chunks = list(client.chat.completions.create(**forced, stream=True))
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)


@pytest.mark.parametrize(
    ("pieces", "content"),
    [
        (["Hel", "lo", " there"], "Hello there"),
        (["  ", "\n", "Hi"], "  \nHi"),  # held while it may still open a call
        (['{"name": "nope",', ' "arguments"', ": {}}"], '{"name": "nope", "arguments": {}}'),  # to the end
        (['{"name": "get_time", ', '"arguments": {"zone": "UTC"}}', " trailing"], None),  # a call
    ],
)
def test_chat_stream_logprobs_follow_the_text_they_belong_to(pieces: list[str], content: str | None) -> None:
    """Logprobs of text the call parser holds back go out with that text once it is content; those of
    a call (and of the text after it, which is dropped) are not sent."""
    from ggufship.serve._context import Prompt
    from ggufship.serve._engine import Finished, SamplingParams, TextDelta, TokenLogprob
    from ggufship.serve._inference import Job
    from ggufship.serve._routes_openai import _ChatChoice
    from ggufship.serve._tools import ToolSpec, ToolUse

    offered = tuple(ToolSpec(n, "", s) for n, s in SCHEMAS.items())
    job = Job(Prompt((1,), 8), SamplingParams(max_tokens=8, logprobs=0), ToolUse(offered, None))
    sent: list[dict] = []

    def chunk(index: int, delta, finish=None, lps=None) -> str:
        sent.append({"delta": delta.model_dump(exclude_none=True), "finish": finish, "lps": lps})
        return ""

    choice = _ChatChoice(0, job, chunk)
    for piece in pieces:  # one token per piece
        choice.delta(TextDelta(piece, (TokenLogprob(piece, -0.5, tuple(piece.encode())),)))
    choice.end(Finished("stop", 1, len(pieces), "".join(pieces), None))
    texts = [c for c in sent if c["delta"].get("content")]
    assert all(c["lps"] is None for c in sent if c not in texts)
    if content is None:
        assert not texts and any("tool_calls" in c["delta"] for c in sent)
        return
    assert "".join(c["delta"]["content"] for c in texts) == content
    assert all(c["lps"] for c in texts)
    assert [t.token for c in texts for t in c["lps"]] == pieces


@pytest.mark.parametrize(
    ("text", "call", "arguments"),
    [
        ('{"name": "get_time", "arguments": {"zone": "U}T\\"{C"}}', "get_time", '{"zone": "U}T\\"{C"}'),
        ('<tool_call>\n{"name":"get_time","parameters":{}}\n</tool_call>', "get_time", "{}"),
        ('```json\n{"name": "get_weather", "arguments": {"days": [1, {"a": 2}]}}\n```', "get_weather", None),
        ('  {"arguments": {"zone": "UTC"}, "name": "get_time"}', "get_time", '{"zone": "UTC"}'),
        ('{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}', "get_time", '{"zone": "UTC"}'),
        ("Hello there", None, None),
        ('{"name": "nope", "arguments": {}}', None, None),
        ("``` python\nprint(1)```", None, None),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_call_stream_pieces_add_up_whatever_the_delta_size(
    text: str, call: str | None, arguments: str | None, step: int
) -> None:
    from ggufship.serve._tools import ArgumentsDelta, CallStart, CallStream, ContentDelta, ToolSpec

    offered = tuple(ToolSpec(n, "", s) for n, s in SCHEMAS.items())
    stream = CallStream(offered)
    events = []
    for i in range(0, len(text), step):
        events += stream.feed(text[i : i + step])
    rest, is_call = stream.finish()
    events += rest
    starts = [e for e in events if isinstance(e, CallStart)]
    args = "".join(e.text for e in events if isinstance(e, ArgumentsDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    if call is None:
        assert not is_call and not starts and content == text
    else:
        assert is_call and [s.name for s in starts] == [call] and content == ""
        assert isinstance(json.loads(args), dict)
        if arguments is not None:
            assert args == arguments


def test_tool_choice_none_and_auto_answer_text_or_a_parsed_call(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(
        model="tiny", messages=CHAT, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    auto = client.chat.completions.create(
        model="tiny", messages=CHAT, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=8
    )
    choice = auto.choices[0]
    if choice.message.tool_calls:  # the untrained model hardly ever writes a call unconstrained
        assert choice.finish_reason == "tool_calls"
        _check_call(choice.message.tool_calls[0], set(SCHEMAS))
    else:
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str)


# The request bodies Dify's "OpenAI-API-compatible" model provider sends with function calling on
# (Dify's OAICompatLargeLanguageModel, today the openai_api_compatible model plugin): "tools" with
# type function, tool_choice auto, an assistant message's calls as "tool_calls" with null content,
# a tool result as role "tool" with "tool_call_id" and "name"; streaming is Dify's default. Shapes
# written from that code's behaviour, not captured from a running Dify.
DIFY_FIRST_TURN = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ],
    "max_tokens": 64,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": TOOLS,
    "tool_choice": "auto",
}
DIFY_FOLLOW_UP = {
    **DIFY_FIRST_TURN,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "name": "get_weather", "content": "18 C, sunny"},
    ],
}


@pytest.mark.parametrize("body", [DIFY_FIRST_TURN, DIFY_FOLLOW_UP], ids=["first-turn", "follow-up"])
def test_dify_shaped_tool_requests(server: RunningServer, body: dict) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json=body,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    events = [json.loads(d) for _, d in sse_events(r.text) if d != "[DONE]"]
    assert sse_events(r.text)[-1][1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    finishes = [
        e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]
    ]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length", "tool_calls")
    assert events[-1]["usage"]["prompt_tokens"] > 0
    # the same request, not streamed
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={**body, "stream": False, "stream_options": None},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == finishes[0]


def test_the_tool_result_reaches_the_prompt(server: RunningServer) -> None:
    """The follow-up's prompt holds the call and its result (rendered, so longer than without them)."""
    from ggufship.serve._context import to_messages
    from ggufship.serve._tools import tool_use
    from ggufship.serve.protocol.openai_chat import ChatCompletionRequest

    inference = server.state.require_inference()
    window = inference.context
    follow = ChatCompletionRequest.model_validate(DIFY_FOLLOW_UP)
    first = ChatCompletionRequest.model_validate(DIFY_FIRST_TURN)
    offered = tool_use(follow).offered
    text = window.render(to_messages(follow.messages), offered)
    assert "18 C, sunny" in text and "get_weather" in text and "Paris" in text
    assert len(window.chat_tokens(to_messages(follow.messages), offered)) > len(
        window.chat_tokens(to_messages(first.messages), offered)
    )
    if not window.native_tools:  # the documented fallback instruction
        assert "To call one, answer with exactly one JSON object" in text


BAD_SCHEMA_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": BAD_SCHEMA_TOOL}, "tools[0].function.parameters"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": TOOLS,
                "messages": [
                    *CHAT,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_time", "arguments": "{zone"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                ],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"tools": TOOLS, "messages": [*CHAT, {"role": "tool", "content": "12:00"}]},
            "messages[1].tool_call_id",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_tool_inputs_are_400_naming_the_parameter(server: RunningServer, extra: dict, param: str) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, **extra}
    r = httpx.post(
        f"{server.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, json=body, timeout=60
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split("[")[0] in err["message"]
    assert err["type"] == "invalid_request_error"
