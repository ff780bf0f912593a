"""The measuring engine: llama.cpp (through llama-cpp-python's public ``Llama`` API) on the GGUF
files themselves. Teacher-forced NLL of reference answers, next-token distributions for the
quantization drift, greedy answers for the checks."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggufship.evaluate._model import EvaluateInputError, GoldenExample
from ggufship.runtime import amx_active, amx_message

logger = logging.getLogger(__name__)

#: Used when the GGUF carries no ``tokenizer.chat_template`` (the same convention as ``serve``).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelIdentity:
    """What must agree between two GGUFs for their NLLs to be comparable."""

    architecture: str
    tokenizer_model: str
    n_vocab: int
    tokenizer_sha256: str


@dataclass(frozen=True)
class Sequence:
    """One example as tokens: the prompt and, when it has a reference, the reference's tokens."""

    id: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class GgufModel:
    """One GGUF loaded with ``logits_all`` (every position's logits are kept)."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None) -> None:
        import llama_cpp
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.path = Path(path)
        threads = threads or default_threads()
        try:
            probe = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
            meta = dict(probe.metadata)
            probe.close()
            arch = meta.get("general.architecture", "")
            n_train = int(meta.get(f"{arch}.context_length", n_ctx))
            self.n_ctx = max(16, min(n_ctx, n_train))
            if amx_active():
                logger.warning(amx_message("evaluate"))
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.n_ctx,
                n_batch=min(512, self.n_ctx),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=True,
                seed=0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EvaluateInputError(f"{path}: llama.cpp cannot load it: {exc}") from exc
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        source = self.metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(source)
        self._bos_text = self._piece(self.llm.token_bos())
        self._eos_text = self._piece(self.llm.token_eos())
        self._add_bos = self.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"

    def close(self) -> None:
        self.llm.close()

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def identity(self) -> ModelIdentity:
        h = hashlib.sha256()
        n_vocab = int(self.llm.n_vocab())
        for i in range(n_vocab):
            piece = self.llm.detokenize([i], special=True)
            h.update(len(piece).to_bytes(4, "little") + piece)
        h.update(f"bos={self.llm.token_bos()};eos={self.llm.token_eos()}".encode())
        return ModelIdentity(
            architecture=self.metadata.get("general.architecture", "?"),
            tokenizer_model=self.metadata.get("tokenizer.ggml.model", "?")
            + "/"
            + self.metadata.get("tokenizer.ggml.pre", "default"),
            n_vocab=n_vocab,
            tokenizer_sha256=h.hexdigest(),
        )

    # --- prompts ------------------------------------------------------------------------------------

    def prompt_text(self, example: GoldenExample) -> tuple[str, bool]:
        """(text, special): a chat example through the model's template (special tokens parsed),
        a raw prompt as is."""
        if example.messages is None:
            return example.prompt or "", False
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in example.messages
        ]
        text = str(
            self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._bos_text,
                eos_token=self._eos_text,
            )
        )
        return text, True

    def _tokenize(self, text: str, special: bool) -> list[int]:
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def sequence(self, example: GoldenExample) -> Sequence:
        """Tokens of the prompt and of the reference answer as they follow the prompt (the full
        text is tokenized once, so the answer's first token is the one the model would see)."""
        text, special = self.prompt_text(example)
        prompt = self._tokenize(text, special)
        if example.reference is None:
            return Sequence(example.id, tuple(prompt), ())
        full = self._tokenize(text + example.reference, special)
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            answer = full[len(prompt) :]
        else:
            answer = list(self.llm.tokenize(example.reference.encode("utf-8"), add_bos=False, special=False))
        return Sequence(example.id, tuple(prompt), tuple(answer))

    # --- measuring ----------------------------------------------------------------------------------

    def logprobs(self, tokens: tuple[int, ...]) -> np.ndarray:
        """Log-probabilities of the next token after each position of ``tokens`` (shape
        ``(len(tokens), n_vocab)``); ``tokens`` must fit ``n_ctx``."""
        self.llm.reset()
        self.llm.eval(list(tokens))
        logits = np.array(self.llm.scores[: len(tokens)], dtype=np.float32)
        return log_softmax(logits)

    def answer_nll(self, seq: Sequence) -> float:
        """Sum of the answer tokens' negative log-likelihoods (nats), teacher forced."""
        tokens = seq.prompt + seq.answer
        lp = self.logprobs(tokens)
        start = len(seq.prompt)
        rows = np.arange(start - 1, len(tokens) - 1)
        return float(-lp[rows, np.asarray(seq.answer)].sum())

    def generate(self, seq: Sequence, example: GoldenExample) -> tuple[str, str]:
        """Greedy answer (temperature 0): (text, finish_reason ``stop`` | ``length``)."""
        max_tokens = min(example.max_tokens, self.n_ctx - len(seq.prompt))
        out: Any = self.llm.create_completion(
            prompt=list(seq.prompt),
            max_tokens=max_tokens,
            temperature=0.0,
            top_k=1,
            stop=list(example.stop) or None,
            seed=0,
        )
        choice = out["choices"][0]
        return str(choice["text"]), str(choice.get("finish_reason") or "stop")


def default_threads() -> int:
    """Half the CPUs, at most 4: llama.cpp's worker threads spin, and on a busy machine more
    threads than free cores make a tiny model many times slower, not faster."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@contextmanager
def opened(path: Path, n_ctx: int, threads: int | None = None) -> Iterator[GgufModel]:
    model = GgufModel(path, n_ctx, threads)
    try:
        yield model
    finally:
        model.close()


def kl_and_top1(ref_lp: np.ndarray, test_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(P_ref ‖ P_test) in nats, and whether both argmaxes agree (the method
    of llama.cpp's ``perplexity --kl-divergence``: full-vocabulary KL, "same top p")."""
    p = np.exp(ref_lp)
    kl = (p * (ref_lp - test_lp)).sum(axis=-1)
    same = ref_lp.argmax(axis=-1) == test_lp.argmax(axis=-1)
    return np.maximum(kl, 0.0), same
