"""The measured evaluation of an export, as ``manifest.json`` records it (field ``evaluation``).

Written by ``ggufship evaluate`` before ``sign``, so the signature covers it; the model card's
``model-index`` and the OCI annotations are derived from it. The metrics a release spec
declares stay where they were (``metadata.evaluations``), marked as declared.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EVALUATION_SCHEMA = "ggufship.evaluate/v1"


class GoldenSetRef(BaseModel):
    """Which golden set was measured: its BLAKE3 fingerprint and how many examples counted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    fingerprint: str = Field(pattern=r"^blake3:[0-9a-f]{64}$")
    examples: int = Field(ge=0)
    scored: int = Field(ge=0, description="examples whose reference answer was scored (NLL)")
    skipped_too_long: int = Field(ge=0, description="examples that did not fit the context window")


class ComparedExport(BaseModel):
    """The stable (or base) export the candidate was compared with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    gguf: str


class MeasuredEvaluation(BaseModel):
    """Outcome, metrics and provenance of one ``ggufship evaluate`` run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_: str = Field(default=EVALUATION_SCHEMA, alias="schema")
    outcome: Literal["pass", "fail", "inconclusive"]
    reason: str
    gguf: str = Field(description="the candidate GGUF whose NLL was compared")
    golden_set: GoldenSetRef
    stable: ComparedExport
    metrics: dict[str, float] = Field(description="measured metrics (finite numbers only)")
    components: dict[str, str] = Field(description="component → pass | fail | inconclusive | skipped")
    policy: dict[str, Any]
    tools: dict[str, str] = Field(description="versions of the tools that measured")
