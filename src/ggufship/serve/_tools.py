"""Function calling (``tools`` / ``tool_choice``): what the prompt offers, how a forced call is
constrained, and how an answer becomes ``tool_calls``.

The model answers a call as one JSON object ``{"name": ..., "arguments": {...}}`` (bare, or inside the
``<tool_call>...</tool_call>`` tags or a code fence that tool-tuned models use). Tools reach the prompt
through the chat template's ``tools`` variable when the template uses one; otherwise a system
instruction (:func:`fallback_instruction`) describes them and that answer shape. ``tool_choice``
``"required"`` or a named function constrains the answer with a grammar built from the tools'
parameter schemas; ``"auto"`` leaves the model free and parses what it wrote; ``"none"`` offers no
tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ggufship.serve.errors import InvalidRequestError

#: The parameter schema of a function that declares none.
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_WRAPPERS = re.compile(r"^\s*(?:<tool_call>|```(?:json)?)\s*(.*?)\s*(?:</tool_call>|```)?\s*$", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The shape chat templates' ``tools`` variable expects (the OpenAI tool object)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolUse:
    """What a request asks: the tools offered to the model, and those it must call from (or None)."""

    offered: tuple[ToolSpec, ...]
    forced: tuple[ToolSpec, ...] | None


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON object, serialized


def tool_use(req: Any) -> ToolUse | None:
    """Validate ``tools`` / ``tool_choice`` (400 naming the parameter); None when no tool is offered."""
    from ggufship.serve._inference import check_json_schema

    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice: no tools given to choose from", param="tool_choice")
        return None
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.name in seen:
            raise InvalidRequestError(
                f"tools[{i}].function.name: {fn.name!r} is declared twice", param=f"tools[{i}].function.name"
            )
        seen.add(fn.name)
        params = fn.parameters if fn.parameters is not None else EMPTY_PARAMETERS
        where = f"tools[{i}].function.parameters"
        check_json_schema(params, where)
        if params.get("type", "object") != "object":
            raise InvalidRequestError(
                f"{where}: the arguments must be a JSON object (type object)", param=where
            )
        specs.append(ToolSpec(fn.name, fn.description or "", params))
    if choice == "none":
        return None
    if choice in (None, "auto"):
        return ToolUse(tuple(specs), None)
    if choice == "required":
        return ToolUse(tuple(specs), tuple(specs))
    named = [s for s in specs if s.name == choice.function.name]
    if not named:
        raise InvalidRequestError(
            f"tool_choice: function {choice.function.name!r} is not among the tools", param="tool_choice"
        )
    return ToolUse(tuple(specs), tuple(named))


def call_schema(tools: tuple[ToolSpec, ...]) -> dict[str, Any]:
    """The JSON schema of one call of any of ``tools``: ``{"name": <const>, "arguments": <parameters>}``."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def fallback_instruction(tools: tuple[ToolSpec, ...]) -> str:
    """The system instruction that offers ``tools`` when the chat template has no ``tools`` variable."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in tools
    )
    return (
        "You can call these functions (one JSON object per line: name, description, JSON schema of the "
        f"arguments):\n{listing}\n"
        'To call one, answer with exactly one JSON object {"name": <function name>, "arguments": '
        "<arguments object>} and nothing else. Otherwise answer normally."
    )


def parse_calls(text: str, tools: tuple[ToolSpec, ...]) -> list[ParsedCall] | None:
    """The tool call ``text`` makes, or None when it is an ordinary answer. A text that is a JSON
    object naming an offered tool is a call (``arguments`` or ``parameters`` holding its arguments)."""
    match = _WRAPPERS.match(text)
    body = match.group(1) if match else text.strip()
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    names = {t.name for t in tools}
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models serialize the arguments themselves
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return [ParsedCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(args, ensure_ascii=False))]


def call_arguments(raw: str, param: str) -> dict[str, Any]:
    """An assistant message's ``function.arguments`` string as the object templates expect (400 if it
    does not parse)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{param}: not valid JSON: {exc.msg} at {exc.pos}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param}: must be a JSON object", param=param)
    return value


@dataclass(frozen=True)
class CallStart:
    """A streamed answer became a tool call: its id and function name are known."""

    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    """The next piece of the streamed call's ``arguments`` (their JSON text, as the model writes it)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """Answer text that is no tool call."""

    text: str


StreamEvent = CallStart | ArgumentsDelta | ContentDelta
_OPENERS = ("<tool_call>", "```json", "```")
_MORE = "more"


class CallStream:
    """An answer's text deltas turned into tool-call deltas as they arrive (as OpenAI streams them:
    the call's id and name first, then its arguments piece by piece), or into content.

    The answer is a call when, after optional whitespace and an opening ``<tool_call>`` / code fence,
    it starts ``{"name": "<offered tool>", "arguments": `` (or ``"parameters"``); the arguments object
    is then streamed up to its closing brace and what follows it is dropped. An answer that does not
    start with ``{`` (or an opener) is content from its first visible character on. Anything else
    (the keys in another order, the arguments serialized as a string) is held back to the end and
    decided there by :func:`parse_calls`. A blocking answer is read through this class too, so it and
    the same answer streamed agree (the arguments are the model's own text, not re-serialized).
    """

    def __init__(self, tools: tuple[ToolSpec, ...]) -> None:
        self._names = {t.name for t in tools}
        self._tools = tools
        self.text = ""
        self.mode: str = "undecided"  # undecided | content | call | held
        self.call: CallStart | None = None
        self._args_at = -1  # where the arguments value starts in self.text
        self._scan = 0  # how far the arguments have been scanned (absolute index)
        self._depth = 0
        self._in_string = False
        self._escape = False
        self.complete = False  # the arguments' closing brace arrived

    def feed(self, text: str) -> list[StreamEvent]:
        self.text += text
        if self.mode == "content":
            return [ContentDelta(text)] if text else []
        if self.mode == "held":
            return []
        if self.mode == "call":
            return self._arguments()
        return self._decide()

    def finish(self) -> tuple[list[StreamEvent], bool]:
        """What is left to send at the end of the answer, and whether it was a tool call."""
        if self.mode == "content":
            return [], False
        if self.mode == "call":
            return [], True
        parsed = parse_calls(self.text, self._tools)
        if parsed:
            call = parsed[0]
            return [CallStart(call.id, call.name), ArgumentsDelta(call.arguments)], True
        return ([ContentDelta(self.text)] if self.text else []), False

    def _decide(self) -> list[StreamEvent]:
        body = self.text.lstrip()
        if not body:
            return []
        for opener in _OPENERS:
            if body.startswith(opener):
                body = body[len(opener) :].lstrip()
                break
            if opener.startswith(body):
                return []  # maybe an opener: wait
        if not body:
            return []
        if not body.startswith("{"):
            self.mode = "content"
            return [ContentDelta(self.text)]
        header = _call_header(body)
        if header == _MORE:
            return []
        if header is None or header[0] not in self._names:
            self.mode = "held"
            return []
        name, length = header
        rest = body[length:]
        self._args_at = len(self.text) - len(rest)
        self._args_at += len(rest) - len(rest.lstrip())
        if self._args_at < len(self.text) and self.text[self._args_at] != "{":
            self.mode = "held"  # arguments as a string (or not an object): decided at the end
            return []
        if self._args_at >= len(self.text):
            return []  # the arguments' first character is still to come
        self.mode = "call"
        self.call = CallStart(f"call_{uuid.uuid4().hex[:24]}", name)
        self._scan = self._args_at
        return [self.call, *self._arguments()]

    def _arguments(self) -> list[StreamEvent]:
        if self.complete:
            return []
        start = self._scan
        i = start
        text = self.text
        while i < len(text):
            ch = text[i]
            i += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.complete = True
                    break
        self._scan = i
        return [ArgumentsDelta(text[start:i])] if i > start else []


def _call_header(body: str) -> tuple[str, int] | str | None:
    """``{"name": "<name>", "arguments": `` at the start of ``body``: (name, its length), :data:`_MORE`
    when ``body`` may still become one, None when it cannot."""
    i = 0
    n = len(body)

    def skip(i: int) -> int:
        while i < n and body[i].isspace():
            i += 1
        return i

    def literal(i: int, word: str) -> int | str | None:
        part = body[i : i + len(word)]
        if part == word:
            return i + len(word)
        return _MORE if word.startswith(part) else None

    for word in ("{", '"name"', ":"):
        got = literal(skip(i), word)
        if not isinstance(got, int):
            return got
        i = got
    i = skip(i)
    if i >= n:
        return _MORE
    if body[i] != '"':
        return None
    end = i + 1
    while end < n and body[end] != '"':
        end += 2 if body[end] == "\\" else 1
    if end >= n:
        return _MORE
    try:
        name = json.loads(body[i : end + 1])
    except json.JSONDecodeError:
        return None
    i = end + 1
    got = literal(skip(i), ",")
    if not isinstance(got, int):
        return got
    i = skip(got)
    keys = [literal(i, key) for key in ('"arguments"', '"parameters"')]
    found = [k for k in keys if isinstance(k, int)]
    if not found:
        return _MORE if _MORE in keys else None
    got = found[0]
    got2 = literal(skip(got), ":")
    if not isinstance(got2, int):
        return got2
    return name, got2
