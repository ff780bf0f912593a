"""The values of ``evaluate``: the golden set, the policy, what was measured and the verdict.

All frozen pydantic models; the verdict round-trips through JSON (it is what ``manifest.json``
records, so the signature covers it).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ggufship.errors import GgufshipError

SCHEMA = "ggufship.evaluate/v1"
Outcome = Literal["pass", "fail", "inconclusive"]
ComponentOutcome = Literal["pass", "fail", "inconclusive", "skipped"]
CheckType = Literal["exact", "regex", "json_schema", "must_answer", "must_refuse"]
CHECK_TYPES: tuple[str, ...] = ("exact", "regex", "json_schema", "must_answer", "must_refuse")


# --- errors (exit codes 90-99; verdicts use 0 pass / 1 fail / 2 inconclusive) ---------------------------


class EvaluateError(GgufshipError):
    """An evaluation that could not run (not a verdict)."""

    exit_code = 90


class GoldenSetError(EvaluateError):
    """The golden set is missing, empty, not JSONL, has an unknown check type or a bad field,
    or does not match its declared fingerprint. The message names the file, line and field."""

    exit_code = 91


class IncomparableExportsError(EvaluateError):
    """Candidate and stable differ in architecture or tokenizer: their NLLs are not comparable."""

    exit_code = 92


class EvaluateInputError(EvaluateError):
    """An export directory or option is unusable (no manifest, no such quantization, already signed...)."""

    exit_code = 93


class ContextOverflowError(EvaluateError):
    """An example does not fit the context window and the policy is ``refuse``."""

    exit_code = 94


# --- the golden set -----------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Check(BaseModel):
    """One check of a greedy answer. ``exact``: ``value`` equals the stripped answer; ``regex``:
    ``pattern`` is found in it; ``json_schema``: the answer is JSON valid against ``schema``;
    ``must_answer``: a non-empty answer that is not a refusal; ``must_refuse``: a refusal."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type: CheckType
    value: str | None = None
    pattern: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")

    def label(self) -> str:
        return self.type


class GoldenExample(BaseModel):
    """One line of the golden set: ``messages`` (chat, through the model's template) or ``prompt``
    (raw text), an optional ``reference`` answer (teacher-forced for the NLL), optional ``checks``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    line: int = Field(ge=1, description="line number in the JSONL file")
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    reference: str | None = None
    checks: tuple[Check, ...] = ()
    max_tokens: int = Field(default=64, ge=1, le=4096)
    stop: tuple[str, ...] = ()


class GoldenSet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    path: str
    fingerprint: str = Field(pattern=r"^blake3:[0-9a-f]{64}$")
    examples: tuple[GoldenExample, ...]


# --- policy -------------------------------------------------------------------------------------------


class EvaluatePolicy(BaseModel):
    """How the measurement is judged (non-inferiority): fail when the one-sided ``1 - alpha``
    confidence interval of how much worse the candidate is lies wholly beyond an effect floor,
    pass when it lies wholly within it, inconclusive when it straddles the floor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(
        default=0.01, gt=0, lt=0.5, description="one-sided level of each confidence bound and test"
    )
    min_examples: int = Field(
        default=20, ge=2, le=1_000_000, description="fewer scored examples → NLL inconclusive"
    )
    max_ppl_increase: float = Field(
        default=0.10,
        ge=0,
        le=100,
        description="effect floor: relative Δ-PPL (0.10 = +10%; ln(1.1) nats per token)",
    )
    min_ks_d: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="effect floor: KS distance of NLLs (a KS fail also needs a shift beyond the Δ-PPL floor)",
    )
    max_check_drop: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="effect floor: rise of the failed-check (or degenerate-answer) rate (0.1 = 10 points)",
    )
    max_skipped_fraction: float = Field(
        default=0.1, ge=0, le=1, description="more examples skipped (too long) → inconclusive"
    )
    max_mean_kl: float = Field(
        default=0.05, gt=0, le=100, description="a quantization whose mean KL vs F16 exceeds this fails"
    )
    min_top1_agreement: float = Field(
        default=0.9, ge=0, le=1, description="a quantization agreeing less often on the top token fails"
    )
    too_long: Literal["skip", "refuse"] = Field(
        default="skip", description="examples longer than the context: skip and count, or refuse"
    )
    n_ctx: int = Field(default=2048, ge=64, le=1_048_576, description="context window used for scoring")


# --- measurement --------------------------------------------------------------------------------------


class ExampleScore(BaseModel):
    """Teacher-forced NLL of one example's reference answer (nats, summed over its tokens)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tokens: int = Field(ge=1)
    nll_sum: float

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.tokens


class Answer(BaseModel):
    """A greedy answer and what the checks and detectors said about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    text: str
    finish_reason: str
    checks: tuple[tuple[str, bool], ...] = ()
    refused: bool = False
    empty: bool = False
    truncated: bool = False
    looping: bool = False

    @property
    def degenerate(self) -> bool:
        return self.empty or self.truncated or self.looping


class TrackMeasurement(BaseModel):
    """Everything measured on one export (candidate or stable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    gguf: str
    scores: tuple[ExampleScore, ...] = ()
    answers: tuple[Answer, ...] = ()
    skipped: tuple[str, ...] = Field(default=(), description="ids of examples that did not fit n_ctx")


class QuantDrift(BaseModel):
    """One quantized GGUF against the reference (F16) on the golden sequences."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantization: str
    reference: str
    positions: int = Field(ge=0)
    mean_kl: float
    max_kl: float
    top1_agreement: float
    kl_per_example: tuple[float, ...] = ()


class Measurement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: TrackMeasurement
    stable: TrackMeasurement
    examples: int = Field(ge=0)
    drift: tuple[QuantDrift, ...] = ()
    drift_note: str | None = None


# --- verdict ------------------------------------------------------------------------------------------


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    return value if math.isfinite(value) else None


class Component(BaseModel):
    """One part of the verdict: its outcome, the numbers behind it and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    outcome: ComponentOutcome
    reason: str
    values: dict[str, float | int | str | None] = Field(default_factory=dict)

    @field_validator("values")
    @classmethod
    def _json_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {k: (_finite(v) if isinstance(v, float) else v) for k, v in value.items()}


class Verdict(BaseModel):
    """The evaluation's outcome with every component behind it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_: str = Field(default=SCHEMA, alias="schema")
    outcome: Outcome
    reason: str
    components: tuple[Component, ...]
    policy: EvaluatePolicy

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


__all__ = [
    "CHECK_TYPES",
    "SCHEMA",
    "Answer",
    "ChatMessage",
    "Check",
    "Component",
    "ContextOverflowError",
    "EvaluateError",
    "EvaluateInputError",
    "EvaluatePolicy",
    "ExampleScore",
    "GoldenExample",
    "GoldenSet",
    "GoldenSetError",
    "IncomparableExportsError",
    "Measurement",
    "Outcome",
    "QuantDrift",
    "TrackMeasurement",
    "Verdict",
]
