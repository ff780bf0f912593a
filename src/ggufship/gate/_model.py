"""The gate's values: what to analyse (:class:`GateRequest`, :class:`GatePolicy`) and the
result (:class:`Verdict`, with every :class:`Check`, :class:`QueryRecord` and
:class:`Distribution` behind it). All frozen; the verdict round-trips through JSON."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.gate._errors import GateConfigError
from ggufship.gate._promql import check_matcher
from ggufship.options import option

SCHEMA = "ggufship.gate/v1"
Outcome = Literal["pass", "fail", "inconclusive"]
CheckOutcome = Literal["pass", "fail", "inconclusive", "skipped"]
MetricName = Literal["latency", "ttft", "itl", "completion_length", "surprisal"]
RateName = Literal["refusal", "bad_answer"]
Method = Literal["buckets", "quantile-series"]
#: Metrics where "worse" has no direction: always tested two-sided.
TWO_SIDED_METRICS: frozenset[str] = frozenset({"completion_length"})
_LABEL_VALUE_MAX = 200


def _duration_input(value: object) -> object:
    """Text such as ``5m`` → seconds (numbers pass through to the float validation)."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except GateConfigError as exc:
            raise ValueError(str(exc)) from None
    return value


#: Seconds, given as a number or a duration text (``300``, ``90s``, ``5m``, ``1h30m``): a step ≤ 1 h,
#: a window ≤ 7 days.
StepSeconds = Annotated[float, Field(ge=1, le=3600), BeforeValidator(_duration_input)]
WindowSeconds = Annotated[float, Field(ge=1, le=7 * 86400), BeforeValidator(_duration_input)]
#: A share in [0, 1] (0.005 = 0.5 %).
Fraction = Annotated[float, Field(ge=0, le=1)]
#: A share in [0, 1], or None (unset).
OptionalFraction = Annotated[float | None, Field(ge=0, le=1)]


class GatePolicy(BaseModel):
    """How a measurement is judged. Defaults are those of the issue and the chart's AnalysisTemplate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_p99_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=1.2,
        description="canary p99 latency above this fails, seconds",
        json_schema_extra=option("max_p99", metavar="S"),
    )
    max_error_ratio: Fraction = Field(
        default=0.005,
        description="canary 5xx ratio above this fails (0.005 = 0.5%)",
        json_schema_extra=option(metavar="R"),
    )
    alpha: float = Field(
        default=0.01, gt=0, lt=0.5, description="false-rollback budget of a whole rollout (all analyses)"
    )
    planned_analyses: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=1,
        description="analyses planned in the rollout; each gets alpha / this",
        json_schema_extra=option("analyses", metavar="N"),
    )
    min_samples: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=50,
        description="fewer requests than this on a track → inconclusive",
        json_schema_extra=option(metavar="N"),
    )
    min_ks_d: Fraction = Field(default=0.1, description="effect-size floor: KS distance D")
    min_median_shift: float = Field(
        default=0.05, ge=0, le=100, description="effect-size floor: relative shift of the median (0.05 = 5%)"
    )
    two_sided: bool = Field(
        default=False, description="fail on any difference, not only when the canary is slower"
    )
    metrics: tuple[MetricName, ...] = Field(
        default=("latency", "ttft", "itl", "completion_length", "surprisal"),
        description="comma list of the histograms to test (latency, ttft, itl, completion_length, "
        "surprisal); the first is primary (it must have data)",
        json_schema_extra=option(metavar="LIST"),
    )
    rates: tuple[RateName, ...] = Field(
        default=("refusal", "bad_answer"),
        description="comma list of the answer rates to test (refusal, bad_answer; '' for none): events / "
        "answers, canary vs stable, one-sided Fisher exact test in the Holm family; fewer than "
        "min_samples answers on a track → inconclusive",
        json_schema_extra=option(metavar="LIST"),
    )
    min_rate_increase: Fraction = Field(
        default=0.02,
        description="effect-size floor of a rate test: canary rate − stable rate (0.02 = 2 points)",
    )
    max_refusal_rate: OptionalFraction = Field(
        default=None, description="canary refusal rate above this fails (unset: no threshold)"
    )
    max_bad_answer_rate: OptionalFraction = Field(
        default=None, description="canary bad-answer rate above this fails (unset: no threshold)"
    )
    method: Method = Field(
        default="buckets",
        description="buckets: KS on bucket-reconstructed samples; quantile-series: KS on a quantile's "
        "time series (weaker)",
    )
    series_quantile: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.95,
        description="quantile-series: the quantile",
        json_schema_extra=option("quantile"),
    )
    series_step_s: StepSeconds = Field(
        default=10.0,
        description="quantile-series: the step, seconds or a duration (10s, 1m)",
        json_schema_extra=option("step", metavar="DUR"),
    )
    min_series_points: int = Field(default=5, ge=2, le=100_000, description="quantile-series: min points")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one metric")
        if len(set(value)) != len(value):
            raise ValueError("metrics repeat")
        return value

    @field_validator("rates")
    @classmethod
    def _rates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("rates repeat")
        return value

    @property
    def alpha_per_analysis(self) -> float:
        """Bonferroni split of ``alpha`` over the planned analyses of one rollout."""
        return self.alpha / self.planned_analyses


class GateRequest(BaseSettings):
    """One analysis: where Prometheus is, which series, which window, which policy.

    Environment: ``GGUFSHIP_GATE_<FIELD>``, policy fields as ``GGUFSHIP_GATE_POLICY__<FIELD>``.
    """

    model_config = SettingsConfigDict(
        env_prefix="GGUFSHIP_GATE_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    prometheus_url: str = Field(
        default="http://127.0.0.1:9090",
        description="Prometheus base URL",
        json_schema_extra=option("prometheus", metavar="URL", query=False),
    )
    window_s: WindowSeconds = Field(
        default=300.0,
        description="analysis window, seconds or a duration (90s, 5m, 1h30m)",
        json_schema_extra=option("window", metavar="DUR"),
    )
    model: str | None = Field(default=None, description="`model` label of both tracks (unset: any)")
    endpoint: str | None = Field(default=None, description="`endpoint` label (unset: all endpoints)")
    matchers: tuple[str, ...] = Field(
        default=(),
        description='an extra PromQL label matcher for both tracks, e.g. job="api" (repeatable)',
        json_schema_extra=option("matcher", metavar='NAME="V"', repeat=True),
    )
    stable_track: str = Field(default="stable", description="`track` label value of the stable")
    canary_track: str = Field(default="canary", description="`track` label value of the canary")
    track_label: str = Field(
        default="track",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="label telling the tracks apart: `track` locally, `rollouts_pod_template_hash` "
        "in a cluster (stable_track/canary_track are then the pod-template hashes)",
    )
    namespace: str | None = Field(default=None, description="`namespace` label of both tracks (unset: any)")
    at: datetime | None = Field(
        default=None,
        description="evaluation time: ISO 8601 (UTC unless it says) or Unix seconds; none: now",
        json_schema_extra=option(metavar="TIME"),
    )
    timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0,
        description="timeout of each Prometheus query, seconds",
        json_schema_extra=option("timeout", metavar="S"),
    )
    policy: GatePolicy = Field(default_factory=GatePolicy)

    @field_validator("prometheus_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @field_validator("model", "endpoint", "stable_track", "canary_track", "namespace")
    @classmethod
    def _label_value(cls, value: str | None) -> str | None:
        if value is not None and (not value or len(value) > _LABEL_VALUE_MAX or "\n" in value):
            raise ValueError(f"label value {value!r}: 1-{_LABEL_VALUE_MAX} characters, one line")
        return value

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for matcher in value:
            try:
                check_matcher(matcher)
            except GateConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class QueryRecord(BaseModel):
    """One PromQL query the gate ran, and what came back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    purpose: str
    query: str
    kind: Literal["instant", "range"] = "instant"
    time: float | None = Field(default=None, description="evaluation time (Unix s), instant queries")
    start: float | None = None
    end: float | None = None
    step_s: float | None = None
    series: int = Field(default=0, description="series returned")
    value: float | None = Field(default=None, description="the scalar result, where the query has one")
    error: str | None = None


class Check(BaseModel):
    """One criterion of the verdict with the numbers behind it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["precondition", "threshold", "ks", "quantile-series", "proportion"]
    outcome: CheckOutcome
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    reason: str = ""
    details: dict[str, float | int | str | bool | None] = Field(default_factory=dict)


class Distribution(BaseModel):
    """A metric's bucket-reconstructed distribution per track (cumulative counts per ``le``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    prometheus_name: str
    le: list[str] = Field(description="upper bounds as Prometheus writes them (last: +Inf)")
    stable: list[int] | None = None
    canary: list[int] | None = None
    ks_location: str | None = Field(default=None, description="the le where |F_stable - F_canary| peaks")


class Series(BaseModel):
    """quantile-series mode: one metric's quantile over time, per track."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    quantile: float
    stable: list[float] = Field(default_factory=list)
    canary: list[float] = Field(default_factory=list)


class Verdict(BaseModel):
    """The result of one analysis: outcome, why, and every query, count and statistic behind it."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: str = Field(default=SCHEMA, alias="schema")
    outcome: Outcome
    reason: str
    evaluated_at: datetime
    window_s: float
    prometheus_url: str
    selector: dict[str, str | None]
    policy: GatePolicy
    alpha_per_analysis: float
    checks: list[Check]
    queries: list[QueryRecord]
    distributions: list[Distribution] = Field(default_factory=list)
    series: list[Series] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": 1, "inconclusive": 2}[self.outcome]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (Prometheus answers NaN for 0/0)."""
    return value if value is not None and math.isfinite(value) else None


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``300``, ``90s``, ``5m``, ``1h30m``, ``1500ms``; raises :class:`GateConfigError`."""
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(raw):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(raw) or not raw:
        raise GateConfigError(f"duration {text!r}: expected e.g. 300, 90s, 5m, 1h30m")
    return total
