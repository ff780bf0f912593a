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
