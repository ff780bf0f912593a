"""The local rollout: a canary of a new export against the stable one, on this machine.

Public front:

* :func:`run_rollout` (:class:`RolloutRequest` → :class:`RolloutStatus`) — start the
  stable and canary API servers (``ggufship serve``), have the local Prometheus
  scrape them, put nginx in front (weights, ``x-canary`` header, trace-id routing),
  drive load through it, and walk the canary plan of the chart's values file
  (``charts/ggufship-api/values.yaml``: ``rollout.canary.steps`` and ``analysis.*``; by
  default setWeight 5 → analysis → pause → 50 → analysis → 100) with the gate taking
  each measurement — the plan the cluster's Rollout runs.
* :func:`promote`, :func:`abort` — control a running rollout (from another process);
  :func:`rollout_status` — read its status file.

The engines are private: ``_plan`` (the plan from the chart's values), ``_policy``
(the step policy, a pure function of state and event), ``_steps`` (the loop driving
the policy), ``_supervisor`` (starting/stopping Prometheus, the API servers, nginx and
the load), ``_proxy`` (nginx), ``_load`` (the load generator), ``_tracks`` (API
processes), ``_status`` (status file, control files, live display), ``_errors`` (exit
codes 60–69).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.options import option
from ggufship.rollout._errors import (
    RolloutAborted,
    RolloutBusyError,
    RolloutError,
    RolloutMetricsError,
    RolloutNotRunningError,
    RolloutPaused,
    RolloutProxyError,
    RolloutServerError,
)
from ggufship.rollout._load import DEFAULT_PROMPTS, LoadSpec, LoadSummary, RequestRecord, read_records
from ggufship.rollout._plan import (
    CanaryPlan,
    RolloutPlanError,
    find_chart_values,
    load_plan,
    override_plan,
)
from ggufship.rollout._proxy import CANARY_HEADER, TRACK_HEADER, trace_id
from ggufship.rollout._status import (
    AnalysisRecord,
    RolloutStatus,
    StepRecord,
    TrackRecord,
    read_status,
    render_text,
    request_control,
)
from ggufship.rollout._steps import (
    AnalysisInput,
    AnalysisResult,
    Analyzer,
    Plan,
    RolloutMachine,
    plan_steps,
)
from ggufship.rollout._tracks import resolve_model
from ggufship.services import resolve_state_dir

__all__ = [
    "CANARY_HEADER",
    "DEFAULT_PROMPTS",
    "TRACK_HEADER",
    "AnalysisInput",
    "AnalysisRecord",
    "AnalysisResult",
    "Analyzer",
    "CanaryPlan",
    "LoadSummary",
    "RequestRecord",
    "RolloutAborted",
    "RolloutBusyError",
    "RolloutError",
    "RolloutMetricsError",
    "RolloutNotRunningError",
    "RolloutPaused",
    "RolloutPlanError",
    "RolloutProxyError",
    "RolloutRequest",
    "RolloutServerError",
    "RolloutSettings",
    "RolloutStatus",
    "StepRecord",
    "TrackRecord",
    "abort",
    "find_chart_values",
    "gate_analyzer",
    "load_plan",
    "load_records",
    "plan_steps",
    "promote",
    "render_text",
    "rollout_status",
    "run_rollout",
    "trace_id",
]

logger = logging.getLogger(__name__)

SERVED_NAME_ENV = "GGUFSHIP_SERVE_SERVED_MODEL_NAME"


class RolloutSettings(BaseSettings):
    """How the local rollout runs (environment: ``GGUFSHIP_ROLLOUT_<FIELD>``; CLI flags override)."""

    model_config = SettingsConfigDict(env_prefix="GGUFSHIP_ROLLOUT_", frozen=True, extra="forbid")

    plan_files: tuple[Path, ...] = Field(
        default=(),
        description="chart values files holding the canary plan (rollout.canary.steps, analysis.*), "
        "merged in order like helm -f (repeatable); empty: the chart's own charts/ggufship-api/values.yaml; "
        "the options below override it",
        json_schema_extra=option("plan", metavar="VALUES", repeat=True),
    )
    steps: tuple[int, ...] | None = Field(
        default=None,
        description="override of the plan's steps: canary weights in percent, the last 100; the first "
        "is followed by analysis + manual pause, the others below 100 by analysis",
        json_schema_extra=option(metavar="W,W,..."),
    )
    analysis_window_s: float | None = Field(
        default=None,
        ge=1,
        le=86_400,
        description="override of analysis.window (capped at the step's age)",
        json_schema_extra=option("analysis_window", metavar="S"),
    )
    analysis_delay_s: float | None = Field(
        default=None,
        ge=0,
        le=86_400,
        description="override of analysis.initialDelay (>= the window)",
        json_schema_extra=option("analysis_delay", metavar="S"),
    )
    analysis_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="override of analysis.interval (also background)",
        json_schema_extra=option("analysis_interval", metavar="S"),
    )
    analysis_count: int | None = Field(
        default=None, ge=1, le=100, description="override of analysis.count (limits capped below it)"
    )
    failure_limit: int | None = Field(default=None, ge=0, le=100, description="override of failureLimit")
    inconclusive_limit: int | None = Field(
        default=None, ge=0, le=100, description="override of inconclusiveLimit"
    )
    background_analysis: bool | None = Field(
        default=None, description="override of analysis.background (measure while paused; failures abort)"
    )
    pause_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86_400,
        description="a pause not promoted within this ends the rollout Paused",
        json_schema_extra=option("pause_timeout", metavar="S"),
    )
    settle_s: float = Field(
        default=5.0, ge=0, le=3600, description="load kept on the stable after an abort or unpromoted end"
    )
    poll_s: float = Field(default=0.25, gt=0, le=10, description="poll period of every wait")
    start_timeout_s: float = Field(
        default=180.0, gt=0, le=3600, description="API servers / proxy start limit"
    )
    stop_timeout_s: float = Field(default=10.0, gt=0, le=600, description="SIGTERM → SIGKILL grace")
    scrape_timeout_s: float = Field(
        default=45.0, gt=0, le=600, description="limit for Prometheus to pick up the two scrape targets"
    )
    prometheus_scrape_interval_s: float = Field(
        default=1.0, ge=0.1, le=300, description="scrape interval when the rollout starts Prometheus itself"
    )
    load_concurrency: int = Field(
        default=4,
        ge=1,
        le=256,
        description="concurrent load requests",
        json_schema_extra=option("concurrency", metavar="N"),
    )
    load_rate_per_s: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="pace of the load (None: as fast as concurrency allows)",
        json_schema_extra=option("rate", metavar="RPS"),
    )
    load_max_tokens: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="max_tokens of each load request",
        json_schema_extra=option("max_tokens", metavar="N"),
    )
    load_max_requests: int = Field(default=1_000_000, ge=1, le=10_000_000, description="load request limit")
    load_max_seconds: float = Field(default=7 * 86_400, gt=0, le=30 * 86_400, description="load time limit")
    load_timeout_s: float = Field(default=120.0, gt=0, le=3600, description="timeout of one load request")
    load_endpoint: str = Field(
        default="/v1/completions",
        pattern=r"^/v1/(chat/)?completions$",
        description="the endpoint the load calls",
    )
    analysis_reports: bool = Field(
        default=True,
        description="write the gate's Markdown + PNG report for every analysis",
        json_schema_extra=option("reports"),
    )
    gate: dict[str, Any] = Field(
        default_factory=dict,
        description="fields of the gate's request/policy (e.g. min_samples, max_p99_s); JSON in the env",
        json_schema_extra=option(flag=False),
    )

    @field_validator("steps")
    @classmethod
    def _steps_valid(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return value
        try:
            plan_steps(value)
        except RolloutError as exc:
            raise ValueError(str(exc)) from None
        return value

    def canary_plan(self) -> CanaryPlan:
        """The plan this rollout runs: the chart values' plan with these settings' overrides."""
        return override_plan(
            load_plan(*self.plan_files),
            weights=self.steps,
            window_s=self.analysis_window_s,
            initial_delay_s=self.analysis_delay_s,
            interval_s=self.analysis_interval_s,
            count=self.analysis_count,
            failure_limit=self.failure_limit,
            inconclusive_limit=self.inconclusive_limit,
            background=self.background_analysis,
        )


class RolloutRequest(BaseModel):
    """One rollout: the stable and canary models (export dir or ``.gguf``), where, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    stable: Path = Field(description="the current model: an export directory or a .gguf")
    canary: Path = Field(description="the new model: an export directory or a .gguf")
    state_dir: Path = Field(
        default_factory=resolve_state_dir, description="state directory (Prometheus, status)"
    )
    auto_promote: bool = Field(default=False, description="skip the manual pause (inconclusive still pauses)")
    settings: RolloutSettings = Field(default_factory=RolloutSettings)
    stable_env: dict[str, str] = Field(
        default_factory=dict, description="extra environment of the stable server"
    )
    canary_env: dict[str, str] = Field(
        default_factory=dict,
        description="extra environment of the canary server, e.g. GGUFSHIP_SERVE_FAULT_DELAY_SECONDS",
    )
    prompts: tuple[str, ...] = Field(
        default=DEFAULT_PROMPTS, min_length=1, description="replayed by the load"
    )
    live: bool | None = Field(default=None, description="rich live display (None: when stderr is a TTY)")


def _served_name(model: Path) -> str:
    """The model id the server answers to: the export's name, else the file's stem."""
    manifest = model / "manifest.json" if model.is_dir() else model.parent / "manifest.json"
    try:
        name = json.loads(manifest.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else model.stem


def gate_analyzer(inp: AnalysisInput) -> AnalysisResult:
    """The default analyzer: one ``ggufship.gate.analyze`` run of canary vs stable.

    ``inp.options`` (``RolloutSettings.gate``) may hold fields of the gate's request
    (``model``, ``endpoint``, ``timeout_s``, ...) and of its policy (``min_samples``,
    ``max_p99_s``, ``max_error_ratio``, ``alpha``, ...). The policy's
    ``planned_analyses`` defaults to the rollout's planned analyses, so the gate's
    alpha is split across them.
    """
    import ggufship.gate as gate

    request_fields = set(gate.GateRequest.model_fields) - {"policy", "prometheus_url", "window_s", "matchers"}
    options = dict(inp.options)
    top = {k: options.pop(k) for k in list(options) if k in request_fields}
    policy_fields: dict[str, Any] = {"planned_analyses": inp.planned}
    policy_fields.update(options.pop("policy", {}) or {})
    policy_fields.update(options)  # the rest belongs to the policy (unknown keys: the policy says so)
    request = gate.GateRequest(
        prometheus_url=inp.prometheus_url,
        window_s=inp.window_s,
        matchers=(*inp.matchers, *top.pop("matchers", ())),
        policy=gate.GatePolicy(**policy_fields),
        **top,
    )
    verdict = gate.analyze(request)
    writer = None
    if inp.report:

        def writer() -> str | None:
            return str(gate.write_report(verdict, inp.report_dir).markdown)

    return AnalysisResult(verdict.outcome, verdict.reason, json.loads(verdict.to_json()), writer)


def run_rollout(request: RolloutRequest, analyzer: Analyzer | None = None) -> RolloutStatus:
    """Run the rollout to its end and return the final status.

    Final phases: ``Healthy`` (promoted to 100%), ``Degraded`` (aborted: failed gate,
    ``abort``, or a crashed canary), ``Paused`` (inconclusive or not promoted within
    ``pause_timeout_s``; not promoted). Everything started is stopped before it
    returns. Raises :class:`RolloutError` (and subclasses) when it cannot run.
    """
    s = request.settings
    stable = resolve_model(request.stable, "stable")
    canary = resolve_model(request.canary, "canary")
    load = LoadSpec(
        url="http://127.0.0.1",  # replaced by the proxy's URL once it runs
        prompts=request.prompts,
        endpoint=s.load_endpoint,
        model=_served_name(stable),
        max_tokens=s.load_max_tokens,
        concurrency=s.load_concurrency,
        max_requests=s.load_max_requests,
        max_seconds=s.load_max_seconds,
        rate_per_s=s.load_rate_per_s,
        timeout_s=s.load_timeout_s,
    )
    state_dir = request.state_dir
    if state_dir.exists() and not state_dir.is_dir():
        raise RolloutError(f"state dir {state_dir}: not a directory")
    state_dir.mkdir(parents=True, exist_ok=True)
    # Both tracks answer to the same model id (the stable's), as behind one production Service.
    served = {SERVED_NAME_ENV: load.model or stable.stem}
    canary_plan = s.canary_plan()
    logger.info(
        "canary plan from %s: weights %s, analysis every %gs after %gs, count %d, limits %d/%d",
        canary_plan.source,
        list(canary_plan.weights),
        canary_plan.analysis.interval_s,
        canary_plan.analysis.initial_delay_s,
        canary_plan.analysis.count,
        canary_plan.analysis.failure_limit,
        canary_plan.analysis.inconclusive_limit,
    )
    # The chart values' analysis.ks (metrics, rates, minRateIncrease), then the explicit settings.
    gate_options = {**dict(canary_plan.gate_options), **s.gate}
    if canary_plan.analysis.min_samples is not None:
        gate_options.setdefault("min_samples", canary_plan.analysis.min_samples)
    plan = Plan(
        state_dir=state_dir.resolve(),
        stable_model=stable,
        canary_model=canary,
        stable_env={**served, **request.stable_env},
        canary_env={**served, **request.canary_env},
        canary_plan=canary_plan,
        auto_promote=request.auto_promote,
        pause_timeout_s=s.pause_timeout_s,
        settle_s=s.settle_s,
        poll_s=s.poll_s,
        start_timeout_s=s.start_timeout_s,
        stop_timeout_s=s.stop_timeout_s,
        scrape_timeout_s=s.scrape_timeout_s,
        prometheus_scrape_interval_s=s.prometheus_scrape_interval_s,
        load=load,
        gate_options=gate_options,
        analysis_reports=s.analysis_reports,
        live=request.live,
    )
    return RolloutMachine(plan, analyzer or gate_analyzer).run()


def promote(state_dir: Path | str | None = None) -> RolloutStatus:
    """Promote the running rollout of ``state_dir`` past its pause (like the Argo dashboard's Promote)."""
    return request_control(resolve_state_dir(state_dir), "promote")


def abort(state_dir: Path | str | None = None) -> RolloutStatus:
    """Abort the running rollout of ``state_dir``: traffic back to the stable, canary stopped."""
    return request_control(resolve_state_dir(state_dir), "abort")


def rollout_status(state_dir: Path | str | None = None) -> RolloutStatus:
    """The last status of the rollout of ``state_dir`` (running or finished)."""
    return read_status(resolve_state_dir(state_dir))


def load_records(status: RolloutStatus) -> list[RequestRecord]:
    """Every request the rollout's load generator sent (from its JSONL file)."""
    if status.load_records is None:
        return []
    return read_records(Path(status.load_records))
