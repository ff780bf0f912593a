"""Tokenization parity: does the GGUF tokenize like the HF tokenizer it came from?"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROBES: tuple[str, ...] = (
    "def add(a, b):\n    return a + b  # sum",
    "Grüße aus Zürich — 東京, Москва, القاهرة",
    "emoji: 🙂🚀👩‍💻 done",
    "  leading,   inner   spaces\n\n\ttabs and newlines ",
    "<|user|> What is GGUF? <|assistant|> A file format.",
)


@dataclass(frozen=True)
class ParityMismatch:
    text: str
    hf_tokens: int
    gguf_tokens: int

    def describe(self) -> str:
        return f"{self.text!r}: HF {self.hf_tokens} tokens, GGUF {self.gguf_tokens}"


def check_parity(hf_dir: Path, gguf_path: Path, probes: tuple[str, ...] = PROBES) -> list[ParityMismatch]:
    """Tokenize each probe with both tokenizers (no BOS, special tokens parsed)."""
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dir)
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    mismatches = []
    try:
        for text in probes:
            hf_ids = list(hf.encode(text, add_special_tokens=False))
            gg_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            if hf_ids != gg_ids:
                mismatches.append(ParityMismatch(text, len(hf_ids), len(gg_ids)))
    finally:
        llm.close()
    return mismatches
