"""The options of ``ggufship rollout`` besides :class:`~ggufship.rollout.RolloutSettings` (whose
fields are the rollout's tuning flags): the two models and the load's inputs. Where
(``--state-dir``) is :class:`~ggufship.services.StateDirSettings`'s flag."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ggufship.options import option, switch


class RolloutOptions(BaseModel):
    """``ggufship rollout STABLE CANARY [options]`` or ``ggufship rollout promote|abort|status``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stable: str = Field(
        min_length=1,
        description="export dir or .gguf now serving (or: promote/abort/status)",
        json_schema_extra=option(positional=True, metavar="STABLE"),
    )
    canary: str | None = Field(
        default=None,
        description="export dir or .gguf to roll out",
        json_schema_extra=option(positional=True, metavar="CANARY"),
    )
    json_output: bool = switch("print the (final) status as JSON", "json")
    auto_promote: bool = switch("do not wait at the pause for `promote`")
    prompts: Path | None = Field(
        default=None, description="prompts to replay, one per line", json_schema_extra=option(metavar="FILE")
    )
    min_samples: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="gate: fewer requests → inconclusive (default: the gate's, 50)",
    )
    canary_env: tuple[str, ...] = Field(
        default=(),
        description="environment of the canary server (repeatable), "
        "e.g. GGUFSHIP_SERVE_FAULT_DELAY_SECONDS=0.5",
        json_schema_extra=option(metavar="K=V", repeat=True),
    )
    stable_env: tuple[str, ...] = Field(
        default=(), description="same, stable server", json_schema_extra=option(metavar="K=V", repeat=True)
    )
