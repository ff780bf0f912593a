"""The options of ``ggufship evaluate``: the inputs, and :class:`EvaluatePolicy` (reused, its
fields flattened into the ``policy`` flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.evaluate._model import EvaluatePolicy
from ggufship.options import option, switch


class EvaluateOptions(BaseModel):
    """``ggufship evaluate CANDIDATE --stable DIR (--release YAML | --golden JSONL) [policy]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: Path = Field(
        description="candidate export directory", json_schema_extra=option(positional=True)
    )
    stable: Path = Field(description="stable (or base) export directory")
    release: Path | None = Field(
        default=None,
        description="release spec whose golden_set is measured",
        json_schema_extra=option(exclusive="source", one_required=True),
    )
    golden: Path | None = Field(
        default=None,
        description="golden set JSONL (instead of the release spec's)",
        json_schema_extra=option(exclusive="source"),
    )
    golden_fingerprint: str | None = Field(
        default=None,
        description="with --golden: expected fingerprint",
        json_schema_extra=option(metavar="blake3:HEX"),
    )
    quant: str | None = Field(
        default=None,
        description="GGUF compared for NLL (default F16 if both have it)",
        json_schema_extra=option(metavar="TYPE"),
    )
    no_drift: bool = switch("skip the quantization-vs-F16 KL check")
    no_record: bool = switch("do not write the result into manifest.json / model card")
    out: Path | None = Field(
        default=None,
        description="write verdict.json, report.md and PNGs here",
        json_schema_extra=option(metavar="DIR"),
    )
    json_output: bool = switch("print the recorded evaluation as JSON on stdout", "json")
    policy: EvaluatePolicy = Field(
        default_factory=EvaluatePolicy,
        json_schema_extra=option(
            nested={
                "min_examples": option(metavar="N"),
                "max_ppl_increase": option(metavar="R"),
                "min_ks_d": option(metavar="D"),
                "max_check_drop": option(metavar="R"),
                "max_skipped_fraction": option(metavar="R"),
                "max_mean_kl": option(metavar="NATS"),
                "min_top1_agreement": option("min_top1", metavar="R"),
                "n_ctx": option(metavar="N"),
            }
        ),
    )
