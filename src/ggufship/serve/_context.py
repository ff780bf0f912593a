"""The context window: render chat prompts with the model's own template, count tokens
with the model's own tokenizer, and apply the policy when prompt + completion > n_ctx.

``reject`` (default): 400 ``context_length_exceeded``. ``truncate``: keep the system
message(s) and the latest user turn (and anything after it), drop the oldest other
messages first, whole messages only (so no message's template markers are ever cut) — whole
turns (a user message with the assistant/tool messages after it) for templates that require
alternating roles (Mistral, Llama 2, Gemma); a raw completion prompt loses its oldest tokens
(the BOS token is kept).
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ggufship.serve._tools import ToolSpec, call_arguments, fallback_instruction
from ggufship.serve.errors import ContextLengthExceededError, InvalidRequestError

if TYPE_CHECKING:
    from ggufship.serve._engine import Engine

logger = logging.getLogger(__name__)

#: Used when the GGUF carries no ``tokenizer.chat_template``.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # assistant: the calls it made ({"id", "type", "function": {"name", "arguments": <object>}})
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None  # role tool: the call this message answers

    def as_template(self, native_tools: bool) -> dict[str, Any]:
        """The dict a chat template sees. Without native tool support a tool result becomes a user
        message and an assistant's calls become JSON text, so any template can render them."""
        if native_tools or (not self.tool_calls and self.role != "tool"):
            out: dict[str, Any] = {"role": self.role, "content": self.content}
            if self.tool_calls:
                out["tool_calls"] = list(self.tool_calls)
            if self.tool_call_id is not None:
                out["tool_call_id"] = self.tool_call_id
            return out
        if self.role == "tool":
            return {"role": "user", "content": f"Result of function call {self.tool_call_id}: {self.content}"}
        calls = "\n".join(
            json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
            for c in self.tool_calls
        )
        return {"role": self.role, "content": f"{self.content}\n{calls}" if self.content else calls}


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the engine, and what the context policy did to it."""

    tokens: tuple[int, ...]
    max_tokens: int
    messages_dropped: int = 0
    tokens_dropped: int = 0

    @property
    def truncated(self) -> bool:
        return bool(self.messages_dropped or self.tokens_dropped)


class ContextWindow:
    """Token counting and the truncate/reject policy for one loaded model."""

    def __init__(
        self, engine: Engine, *, policy: str, default_max_tokens: int, chat_template: str | None = None
    ) -> None:
        """``chat_template`` overrides the GGUF's ``tokenizer.chat_template``."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.engine = engine
        self.policy = policy
        self.default_max_tokens = default_max_tokens
        self.n_ctx = engine.n_ctx
        source = chat_template or engine.metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
        # templates that raise unless roles alternate user/assistant (Mistral, Llama 2, Gemma): the
        # truncate policy drops whole turns there, never a lone message
        self.alternating = "alternate" in source
        # a template that reads a ``tools`` variable renders tools, calls and results itself
        self.native_tools = "tools" in source

        self._bos_text = engine.token_text(engine.bos_token())
        self._eos_text = engine.token_text(engine.eos_token())
        self._add_bos = engine.add_bos()
        # llama-cpp-python's renderer (a sandboxed Jinja2 environment set up like Transformers':
        # trim/lstrip blocks, loop controls, {% generation %}, tojson, strftime_now, raise_exception)
        self._formatter = Jinja2ChatFormatter(
            template=source, eos_token=self._eos_text, bos_token=self._bos_text, add_generation_prompt=True
        )

    # --- counting ----------------------------------------------------------------------------------------

    def render(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> str:
        from jinja2 import TemplateError

        variables: dict[str, Any] = {}
        dicts = [m.as_template(self.native_tools) for m in messages]
        if tools and self.native_tools:
            variables["tools"] = [t.as_openai() for t in tools]
        elif tools:
            dicts = _with_system(dicts, fallback_instruction(tuple(tools)))
        try:
            return str(self._formatter(messages=dicts, **variables).prompt)
        except ValueError as exc:  # the template's raise_exception(...)
            raise InvalidRequestError(f"chat template: {exc}", param="messages") from exc
        except TemplateError as exc:
            raise InvalidRequestError(
                f"messages: the model's chat template failed: {exc}", param="messages"
            ) from exc

    def chat_tokens(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> list[int]:
        # (one argument without tools: the hostile tests count renders through a one-argument wrapper)
        text = self.render(messages, tools) if tools else self.render(messages)
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self.engine.tokenize(text, add_bos=add_bos, special=True)

    def text_tokens(self, prompt: str) -> list[int]:
        return self.engine.tokenize(prompt, add_bos=self._add_bos, special=False)

    # --- policy ------------------------------------------------------------------------------------------

    def _fits(self, n_prompt: int, requested: int | None) -> bool:
        return n_prompt + (requested or 1) <= self.n_ctx

    def _budget(self, n_prompt: int, requested: int | None) -> int:
        return requested if requested is not None else min(self.default_max_tokens, self.n_ctx - n_prompt)

    def _exceeded(self, n_prompt: int, requested: int | None, param: str, extra: str = "") -> Exception:
        need = requested or 1
        return ContextLengthExceededError(
            f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
            f"{n_prompt + need} tokens ({n_prompt} in the {param}, {need} in the completion). "
            f"Please reduce the length of the {param} or the completion{extra}.",
            param=param,
        )

    def chat_prompt(
        self, messages: Sequence[Message], requested: int | None, tools: Sequence[ToolSpec] = ()
    ) -> Prompt:
        tokens = self.chat_tokens(messages, tools) if tools else self.chat_tokens(messages)
        if self._fits(len(tokens), requested):
            return Prompt(tuple(tokens), self._budget(len(tokens), requested))
        if self.policy != "truncate":
            raise self._exceeded(len(tokens), requested, "messages")
        return self._truncated(messages, requested, len(tokens), tools)

    def _truncated(
        self,
        messages: Sequence[Message],
        requested: int | None,
        original: int,
        tools: Sequence[ToolSpec] = (),
    ) -> Prompt:
        """Keep the newest ``k`` droppable messages (turns, for alternating templates) for the largest
        ``k`` that fits.

        Only whole rendered prompts are measured (a template may join messages in any way), but
        never once per dropped message: ``k`` = 0, 1, 2, 4, ... until one does not fit, then a binary
        search between the last two — O(log k) renders of at most the kept messages (which fit in
        n_ctx) plus the always-kept ones, instead of one render of everything per dropped message."""
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages) - 1)
        droppable = [i for i in range(last_user) if messages[i].role not in ("system", "developer")]
        fixed = [i for i in range(last_user) if messages[i].role in ("system", "developer")]
        tail = list(range(last_user, len(messages)))
        # what is dropped together: one message, or (alternating templates) one turn — a user message
        # and the assistant/tool messages after it
        units: list[list[int]] = []
        for i in droppable:
            if not units or not self.alternating or messages[i].role == "user":
                units.append([i])
            else:
                units[-1].append(i)

        def attempt(k: int) -> list[int]:
            newest = [i for unit in units[len(units) - k :] for i in unit] if k else []
            kept = [messages[i] for i in [*heapq.merge(fixed, newest), *tail]]
            return self.chat_tokens(kept, tools) if tools else self.chat_tokens(kept)

        best = attempt(0)
        if not self._fits(len(best), requested):
            raise self._exceeded(
                len(best),
                requested,
                "messages",
                " (even with every message but the system message(s) and the latest user turn dropped)",
            )
        fits, too_many = 0, len(units)  # attempt(len(units)) is the whole prompt: it did not fit
        step = 1
        while step < too_many:
            tokens = attempt(step)
            if not self._fits(len(tokens), requested):
                too_many = step
                break
            fits, best = step, tokens
            step *= 2
        while too_many - fits > 1:
            mid = (fits + too_many) // 2
            tokens = attempt(mid)
            if self._fits(len(tokens), requested):
                fits, best = mid, tokens
            else:
                too_many = mid
        dropped = sum(len(unit) for unit in units[: len(units) - fits])
        logger.info("context: dropped the %d oldest message(s) to fit n_ctx %d", dropped, self.n_ctx)
        return Prompt(
            tuple(best),
            self._budget(len(best), requested),
            messages_dropped=dropped,
            tokens_dropped=original - len(best),
        )

    def text_prompt(self, prompt: str | Sequence[int], requested: int | None) -> Prompt:
        tokens = self.text_tokens(prompt) if isinstance(prompt, str) else list(prompt)
        if self._fits(len(tokens), requested):
            return Prompt(tuple(tokens), self._budget(len(tokens), requested))
        if self.policy != "truncate":
            raise self._exceeded(len(tokens), requested, "prompt")
        need = requested or 1
        keep_head = 1 if tokens and self._add_bos and tokens[0] == self.engine.bos_token() else 0
        room = self.n_ctx - need - keep_head
        if room < 1:
            raise self._exceeded(len(tokens), requested, "prompt")
        kept = tokens[:keep_head] + tokens[len(tokens) - room :]
        return Prompt(tuple(kept), self._budget(len(kept), requested), tokens_dropped=len(tokens) - len(kept))


def to_messages(raw: Sequence[Any]) -> list[Message]:
    """OpenAI messages → template messages (``developer`` is the newer name of ``system``); an
    assistant's ``tool_calls`` carry their arguments as objects (400 when one does not parse)."""
    out = []
    for i, m in enumerate(raw):
        role = "system" if m.role == "developer" else m.role
        calls = tuple(
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": call_arguments(
                        c.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments"
                    ),
                },
            }
            for j, c in enumerate(getattr(m, "tool_calls", None) or ())
        )
        if calls and role != "assistant":
            raise InvalidRequestError(
                f"messages[{i}].tool_calls: only assistant messages carry tool calls",
                param=f"messages[{i}].tool_calls",
            )
        call_id = getattr(m, "tool_call_id", None)
        if role == "tool" and not call_id:
            raise InvalidRequestError(
                f"messages[{i}].tool_call_id: a tool message needs the id of the call it answers",
                param=f"messages[{i}].tool_call_id",
            )
        out.append(Message(role=role, content=m.text(), tool_calls=calls, tool_call_id=call_id))
    return out


def _with_system(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """``instruction`` appended to the first system message, or as a new one in front."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]
