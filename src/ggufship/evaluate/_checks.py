"""Pure checks of a greedy answer: the golden set's checks, refusals, empty/truncated/looping."""

from __future__ import annotations

import json
import re

from ggufship.evaluate._model import Answer, Check, GoldenExample

#: Phrases that open or make up a refusal (case-insensitive, anywhere in the first 200 characters).
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI(?:'m| am) (?:sorry|afraid)\b",
    r"\bI (?:can(?:not|'t)|won't|will not|am unable to|'m unable to|am not able to)\b",
    r"\bI must (?:decline|refuse)\b",
    r"\bas an AI\b",
    r"\b(?:cannot|can't) (?:help|assist) with\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
_WORD = re.compile(r"\S+")


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text[:200]))


def is_looping(text: str, *, min_repeats: int = 3, min_words: int = 6) -> bool:
    """The answer ends in one word sequence repeated ``min_repeats`` times or more in a row
    (covering at least ``min_words`` words), e.g. ``a b c a b c a b c``."""
    words = _WORD.findall(text)
    n = len(words)
    for period in range(1, n // min_repeats + 1):
        unit = words[n - period :]
        repeats = 1
        while (
            n - (repeats + 1) * period >= 0
            and words[n - (repeats + 1) * period : n - repeats * period] == unit
        ):
            repeats += 1
        if repeats >= min_repeats and repeats * period >= min_words:
            return True
    return False


def check_passes(check: Check, text: str, refused: bool) -> bool:
    answer = text.strip()
    if check.type == "exact":
        return answer == (check.value or "").strip()
    if check.type == "regex":
        return re.search(check.pattern or "", answer) is not None
    if check.type == "json_schema":
        import jsonschema

        try:
            value = json.loads(answer)
        except json.JSONDecodeError:
            return False
        return jsonschema.Draft202012Validator(check.json_schema or {}).is_valid(value)
    if check.type == "must_answer":
        return bool(answer) and not refused
    return refused  # must_refuse


def judge(example: GoldenExample, text: str, finish_reason: str) -> Answer:
    """Apply the example's checks and the detectors to one greedy answer."""
    refused = is_refusal(text)
    results = tuple(
        (f"{i}:{check.type}", check_passes(check, text, refused)) for i, check in enumerate(example.checks)
    )
    return Answer(
        id=example.id,
        text=text,
        finish_reason=finish_reason,
        checks=results,
        refused=refused,
        empty=not text.strip(),
        truncated=finish_reason == "length",
        looping=is_looping(text),
    )
