"""The step machine of the local rollout: the policy's driver over the supervised processes.

The plan is the chart's (``_plan``: ``rollout.canary.steps`` and ``analysis.*`` of
``charts/ggufship-api/values.yaml``); what to do next is decided by the pure policy
(``_policy.decide``), which this loop feeds with events — a tick every ``poll_s``, a
weight applied, a measurement (one gate run), a promote or abort request (control files)
— and whose actions it performs on the processes (``_supervisor.RolloutProcesses``):

* ``SetWeight``: the proxy's config is regenerated and nginx reloaded gracefully.
* ``Measure``: one gate run (``Analyzer``) over the window; its outcome goes back to the
  policy (an analyzer that raises is an ``error`` measurement, recorded as inconclusive).
* ``Pause`` / ``Resume``: the status says Paused (waiting for ``ggufship rollout promote``,
  or a timed pause) / Progressing.
* ``Abort`` (failed analysis, ``ggufship rollout abort``, canary crashed): weight → 0, nginx
  reloaded and its old workers drained, canary stopped, status ``Degraded``; the stable
  keeps serving and the load continues for ``settle_s`` so the records show it.
* ``EndNotPromoted``: a pause not promoted within ``pause_timeout_s``: traffic back on the
  stable, canary stopped, status ``Paused``.
* ``Promote``: 100 % on the canary, status ``Healthy``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggufship.rollout._errors import RolloutError
from ggufship.rollout._load import LoadSpec
from ggufship.rollout._plan import AnalysisPlan, CanaryPlan, CanaryStep
from ggufship.rollout._policy import (
    Abort,
    AbortRequested,
    Action,
    EndNotPromoted,
    Event,
    Measure,
    Measured,
    Pause,
    PolicyConfig,
    PolicyState,
    Promote,
    PromoteRequested,
    Resume,
    SetWeight,
    StartStep,
    Tick,
    WeightApplied,
    decide,
)
from ggufship.rollout._policy import plan_steps as policy_steps
from ggufship.rollout._proxy import describe
from ggufship.rollout._status import (
    AnalysisRecord,
    EventRecord,
    Outcome,
    RolloutStatus,
    StatusDisplay,
    StepRecord,
    TrackRecord,
    clear_controls,
    now_iso,
    rollout_dir,
    take_control,
    write_status,
)
from ggufship.rollout._supervisor import ProcessSettings, RolloutProcesses, exclusive
from ggufship.rollout._tracks import TrackServer

logger = logging.getLogger(__name__)

_ANY_ANALYSIS = AnalysisPlan(1, 1, 1, 1, 0, 0, 0)


def plan_steps(weights: tuple[int, ...]) -> list[StepRecord]:
    """The step list for bare canary weights (the last must be 100), a manual pause after the
    first step's analysis, as in the chart's default plan."""
    if not weights or weights[-1] != 100:
        raise RolloutError(f"steps {list(weights)}: the last canary weight must be 100")
    if any(not 0 < w <= 100 for w in weights) or list(weights) != sorted(set(weights)):
        raise RolloutError(f"steps {list(weights)}: weights must rise strictly within 1..100")
    steps = tuple(CanaryStep(w, "manual" if i == 0 else None) for i, w in enumerate(weights[:-1]))
    return policy_steps(CanaryPlan(steps, _ANY_ANALYSIS, background=True, source="weights"))


@dataclass(frozen=True)
class AnalysisInput:
    """What one analysis is asked: which Prometheus, which window, which run of how many."""

    prometheus_url: str
    window_s: float
    weight: int
    index: int
    planned: int
    matchers: tuple[str, ...]
    report_dir: Path
    report: bool
    options: dict[str, Any]


@dataclass(frozen=True)
class AnalysisResult:
    """An analyzer's answer. ``write_report`` (optional) is called after the rollout acted on
    the outcome, so writing a report (plots take seconds) never delays an abort."""

    outcome: Outcome
    reason: str
    verdict: dict[str, Any]
    write_report: Callable[[], str | None] | None = None


Analyzer = Callable[[AnalysisInput], AnalysisResult]


@dataclass(frozen=True)
class Plan:
    """Everything the machine needs, resolved by the public front."""

    state_dir: Path
    stable_model: Path
    canary_model: Path
    stable_env: dict[str, str]
    canary_env: dict[str, str]
    canary_plan: CanaryPlan
    auto_promote: bool
    pause_timeout_s: float
    settle_s: float
    poll_s: float
    start_timeout_s: float
    stop_timeout_s: float
    scrape_timeout_s: float
    prometheus_scrape_interval_s: float
    load: LoadSpec
    gate_options: dict[str, Any]
    analysis_reports: bool
    live: bool | None


class RolloutMachine:
    """Runs one rollout from start to a final phase; always stops what it started."""

    def __init__(self, plan: Plan, analyzer: Analyzer) -> None:
        self.plan = plan
        self.analyzer = analyzer
        self.dir = rollout_dir(plan.state_dir).resolve()
        self.steps = policy_steps(plan.canary_plan)
        self.config = PolicyConfig(
            steps=tuple(self.steps),
            analysis=plan.canary_plan.analysis,
            auto_promote=plan.auto_promote,
            background=plan.canary_plan.background,
            pause_timeout_s=plan.pause_timeout_s,
        )
        self.policy = PolicyState()
        self.rollout_id = secrets.token_hex(6)
        self.status = RolloutStatus(
            steps=self.steps, auto_promote=plan.auto_promote, rollout_id=self.rollout_id
        )
        logs = self.dir / "logs"
        self.procs = RolloutProcesses(
            ProcessSettings(
                state_dir=plan.state_dir,
                start_timeout_s=plan.start_timeout_s,
                stop_timeout_s=plan.stop_timeout_s,
                scrape_timeout_s=plan.scrape_timeout_s,
                prometheus_scrape_interval_s=plan.prometheus_scrape_interval_s,
                poll_s=plan.poll_s,
                settle_s=plan.settle_s,
            ),
            TrackServer("stable", plan.stable_model, logs / "stable.log", plan.stable_env),
            TrackServer("canary", plan.canary_model, logs / "canary.log", plan.canary_env),
            plan.load,
            self.rollout_id,
        )
        self._display = StatusDisplay(plan.live)
        self._last_publish = 0.0
        self._pending_reports: list[tuple[int, Callable[[], str | None]]] = []

    # ---------------------------------------------------------------- status

    def _update(self, **changes: Any) -> None:
        changes["updated_at"] = now_iso()
        if self.procs.load is not None:
            changes.setdefault("load", self.procs.load.summary())
        self.status = self.status.model_copy(update=changes)
        write_status(self.plan.state_dir, self.status)
        self._display.update(self.status)
        self._last_publish = time.monotonic()

    def _event(self, event: str, detail: str = "", weight: int | None = None) -> list[EventRecord]:
        """The status's events plus this one (pass as ``events=`` to :meth:`_update`)."""
        record = EventRecord(
            at=time.time(),
            event=event,  # type: ignore[arg-type]
            weight=self.status.weight if weight is None else weight,
            detail=detail,
        )
        return [*self.status.events, record]

    def _tracks(self) -> dict[str, TrackRecord]:
        def rec(s: TrackServer) -> TrackRecord:
            return TrackRecord(
                model=str(s.model),
                url=s.url if s.port else None,
                pid=s.pid,
                running=s.alive(),
                log=str(s.log),
            )

        return {"stable": rec(self.procs.stable), "canary": rec(self.procs.canary)}

    # ---------------------------------------------------------------- run

    def run(self) -> RolloutStatus:
        with exclusive(self.plan.state_dir), self._display:
            clear_controls(self.plan.state_dir)
            self._update(message="starting")
            try:
                self._setup()
                self._drive()
            except BaseException as exc:
                self._update(message=f"error: {exc}", phase="Degraded")
                raise
            finally:
                self._teardown()
            return self.status

    def _setup(self) -> None:
        self.procs.start_metrics_and_tracks()
        self._update(message="API servers ready", prometheus_url=self.procs.prometheus_url, **self._tracks())
        # Scrape before any traffic and before the first analysis (targets appear ~6 s later).
        self.procs.start_traffic()
        proxy = self.procs.proxy
        self._update(
            message="proxy and load running",
            proxy_url=proxy.url if proxy is not None else None,
            load_records=str(self.procs.records),
            events=self._event("started", "proxy and load running"),
        )

    # ---------------------------------------------------------------- the loop

    def _drive(self) -> None:
        """Feed the policy until it finishes: a tick per ``poll_s``, controls, process checks."""
        events: deque[Event] = deque()
        while not self.policy.finished:
            now = time.monotonic()
            if take_control(self.plan.state_dir, "abort"):
                events.append(AbortRequested(now, "aborted by `ggufship rollout abort`"))
            elif (crashed := self.procs.check()) is not None:
                events.append(AbortRequested(now, crashed))
            elif self.policy.phase == "Paused" and take_control(self.plan.state_dir, "promote"):
                events.append(PromoteRequested(now))
            events.append(Tick(now))
            while events and not self.policy.finished:
                self.policy, actions = decide(self.config, self.policy, events.popleft())
                for action in actions:
                    follow = self._perform(action)
                    if follow is not None:
                        events.append(follow)
            if self.policy.finished:
                break
            if time.monotonic() - self._last_publish >= 1.0:
                self._update()
            # A scheduler's tick, not a poll (retry.py): the policy ends the run (steps, analyses, controls).
            time.sleep(self.plan.poll_s)

    def _perform(self, action: Action) -> Event | None:
        """Do one action; the event it produces (weight applied, measurement), if any."""
        if isinstance(action, StartStep):
            self._update(step=action.index, message=self.steps[action.index].describe())
            return None
        if isinstance(action, SetWeight):
            routes = self.procs.route(action.weight)
            self._update(
                weight=action.weight,
                message=f"weight set: {describe(routes)}",
                events=self._event("weight", describe(routes), action.weight),
            )
            return WeightApplied(time.monotonic())
        if isinstance(action, Measure):
            record, measured = self._analyze(action)
            if not action.background:
                self._flush_reports()
            elif record.outcome != "fail":  # background reports only for decisions
                self._pending_reports = [
                    p for p in self._pending_reports if p[0] != len(self.status.analyses) - 1
                ]
            return Measured(time.monotonic(), measured, record.reason, action.background)
        if isinstance(action, Pause):
            self._update(
                phase="Paused",
                pause_reason=action.reason,
                message=f"paused: {action.reason}",
                events=self._event("paused", action.reason),
            )
            self._flush_reports()
            logger.info(
                "rollout paused: %s (promote: `ggufship rollout promote --state-dir %s`)",
                action.reason,
                self.plan.state_dir,
            )
            return None
        if isinstance(action, Resume):
            self._update(
                phase="Progressing",
                pause_reason=None,
                message=action.reason,
                events=self._event("promoted", action.reason),
            )
            logger.info("rollout resumed: %s", action.reason)
            return None
        if isinstance(action, Abort):
            self._abort(action.reason)
            return None
        if isinstance(action, EndNotPromoted):
            self._end_paused(action.reason)
            return None
        if isinstance(action, Promote):
            self._update(
                phase="Healthy",
                promoted=True,
                pause_reason=None,
                message="canary promoted: 100% of traffic",
                events=self._event("healthy"),
            )
            logger.info("rollout complete: canary %s promoted", self.plan.canary_model)
            return None
        raise RolloutError(f"unknown policy action {action!r}")  # pragma: no cover

    # ---------------------------------------------------------------- analysis

    def _analyze(self, action: Measure) -> tuple[AnalysisRecord, str]:
        plan = self.plan
        started = now_iso()
        request = AnalysisInput(
            prometheus_url=self.procs.prometheus_url,
            window_s=action.window_s,
            weight=self.status.weight,
            index=action.index,
            planned=self._planned_analyses(),
            matchers=(f'rollout_id="{self.rollout_id}"',),
            report_dir=self.dir / "analyses" / f"{len(self.status.analyses) + 1:02d}",
            report=plan.analysis_reports,
            options=dict(plan.gate_options),
        )
        measured: str
        try:
            result = self.analyzer(request)
            measured = result.outcome
        except Exception as exc:  # the gate's own failures are an Error measurement, never pass
            logger.warning("analysis could not run: %s", exc)
            result = AnalysisResult("inconclusive", f"analysis error: {exc}", {"error": str(exc)})
            measured = "error"
        record = AnalysisRecord(
            step=self.status.step,
            weight=self.status.weight,
            background=action.background,
            started_at=started,
            finished_at=now_iso(),
            outcome=result.outcome,
            reason=result.reason,
            verdict=result.verdict,
        )
        if result.write_report is not None:
            self._pending_reports.append((len(self.status.analyses), result.write_report))
        logger.info(
            "%sanalysis at %d%% (window %.0fs): %s %s",
            "background " if action.background else "",
            record.weight,
            action.window_s,
            record.outcome,
            record.reason,
        )
        self._update(analyses=[*self.status.analyses, record])
        return record, measured

    def _flush_reports(self) -> None:
        """Write the reports of the analyses decided on so far (after acting on them)."""
        if not self._pending_reports:
            return
        analyses = list(self.status.analyses)
        for index, writer in self._pending_reports:
            try:
                path = writer()
            except Exception as exc:  # evidence, not a decision: log and go on
                logger.warning("analysis report not written: %s", exc)
                continue
            analyses[index] = analyses[index].model_copy(update={"report": path})
        self._pending_reports = []
        self._update(analyses=analyses)

    def _planned_analyses(self) -> int:
        return sum(s.kind == "analysis" for s in self.steps) * self.plan.canary_plan.analysis.count

    # ---------------------------------------------------------------- abort / end

    def _abort(self, reason: str) -> None:
        logger.warning("aborting the rollout: %s", reason)
        self._update(message=f"aborting: {reason}", abort_reason=reason)
        self.procs.back_to_stable()
        events = self._event("aborted", reason, 0)
        self._update(
            phase="Degraded",
            aborted=True,
            weight=0,
            aborted_at=events[-1].at,
            pause_reason=None,
            events=events,
            message=f"aborted: {reason}; 100% of traffic on the stable",
            **self._tracks(),
        )
        self._flush_reports()
        self.procs.settle()

    def _end_paused(self, reason: str) -> None:
        logger.warning("rollout not promoted: %s", reason)
        self.procs.back_to_stable()
        self._update(
            phase="Paused",
            weight=0,
            pause_reason=reason,
            message=f"not promoted: {reason}; 100% of traffic on the stable",
            events=self._event("not-promoted", reason, 0),
            **self._tracks(),
        )
        self.procs.settle()

    def _teardown(self) -> None:
        """Stop everything this rollout started; record the final state."""
        errors = self.procs.teardown()
        clear_controls(self.plan.state_dir)
        try:
            self._flush_reports()
        except Exception as exc:
            errors.append(f"reports: {exc}")
        message = self.status.message + (f" (teardown: {'; '.join(errors)})" if errors else "")
        self._update(finished_at=now_iso(), message=message, **self._tracks())
        for err in errors:
            logger.error("teardown: %s", err)
