"""The truncate policy on a chat template that requires alternating user/assistant roles: whole
turns are dropped (a lone dropped message would make the template raise). The real engine of a
running server (tokenizer, n_ctx) with such a template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve_fixtures import RunningServer, running_server

# the check Mistral / Llama 2 / Gemma templates make (written here in the same spirit)
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[RunningServer]:
    from ggufship.serve import ServeSettings

    with running_server(ServeSettings(model=str(tiny_export), n_threads=1, parallel=1)) as srv:
        yield srv


@pytest.mark.parametrize("turns", [30, 31, 60])
def test_truncation_drops_whole_turns(server: RunningServer, turns: int) -> None:
    from ggufship.serve._context import ContextWindow, Message
    from ggufship.serve.errors import InvalidRequestError

    engine = server.state.require_inference().engine
    window = ContextWindow(engine, policy="truncate", default_max_tokens=16, chat_template=ALTERNATING)
    assert window.alternating
    messages: list[Message] = []
    for i in range(turns):
        messages += [
            Message("user", f"question {i} " + "words " * (i % 5)),
            Message("assistant", f"answer {i}"),
        ]
    messages.append(Message("user", "The last question?"))
    assert len(window.chat_tokens(messages)) + 16 > window.n_ctx  # it must truncate
    prompt = window.chat_prompt(messages, 16)
    assert prompt.truncated and prompt.messages_dropped % 2 == 0 and prompt.messages_dropped > 0
    assert len(prompt.tokens) + 16 <= window.n_ctx
    kept = messages[prompt.messages_dropped :]
    assert list(prompt.tokens) == window.chat_tokens(kept)
    # the newest turns, as many as fit: one more turn would not
    more = messages[prompt.messages_dropped - 2 :]
    assert len(window.chat_tokens(more)) + 16 > window.n_ctx
    # what dropping one message more would give: the template refuses it (the old behaviour's 400)
    with pytest.raises(InvalidRequestError, match="alternate"):
        window.chat_tokens(messages[prompt.messages_dropped + 1 :])


def test_templates_render_like_transformers(server: RunningServer) -> None:
    """Rendering goes through llama-cpp-python's Jinja2ChatFormatter: the Jinja features Transformers'
    chat templates use (loop controls, {% generation %}, strftime_now, tojson) work."""
    from ggufship.serve._context import ContextWindow, Message

    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] | tojson }}{% endif %}|{% endfor %}{{ strftime_now('%Y') }}"
    )
    engine = server.state.require_inference().engine
    window = ContextWindow(engine, policy="reject", default_max_tokens=16, chat_template=template)
    text = window.render([Message("user", "é"), Message("assistant", "b"), Message("user", "never")])
    assert text.startswith('"é"|b|') and "never" not in text
    assert text[-4:].isdigit()
