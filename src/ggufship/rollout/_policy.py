"""The local rollout's step policy: a pure function ``(config, state, event) → (state, actions)``.

No processes, no clocks, no I/O: the supervisor (``_steps.RolloutMachine``) feeds it events
(a tick with the time, a weight applied, a measurement taken, a promote or abort request)
and performs the actions it returns (set a weight, take a measurement, pause, abort,
finish). The shape follows argo-rollouts ``rollout/canary.go`` (``reconcileCanaryPause``,
``completedCurrentCanaryStep``: one step at a time, a pause holds until promoted) and the
analysis bookkeeping ``analysis/analysis.go`` ``assessMetricStatus`` (limits are
"more than"); flagger's ``pkg/controller/scheduler.go`` runs the same kind of loop on a
timer (advance, analyse, halt, promote or roll back).

Steps (from :func:`plan_steps`): ``setWeight`` → ``analysis`` → ``pause`` (manual or
timed) per canary step, then ``setWeight 100``.

* analysis: the first measurement ``initial_delay_s`` after the weight was applied, then
  one every ``interval_s`` until ``count``; more than ``failure_limit`` failed → abort;
  more than ``consecutive_error_limit`` errors in a row → abort (argo: Error aborts);
  more than ``inconclusive_limit`` inconclusive → pause (promotion skips the rest of the
  analysis, as in Argo); else after ``count`` → next step.
* pause: manual (skipped with ``auto_promote``) or inconclusive → wait for a promotion,
  at most ``pause_timeout_s`` (then the rollout ends not promoted); timed → resume after
  its duration (a promotion ends it early). While paused, a background measurement every
  ``interval_s``; more than ``failure_limit`` failed ones → abort.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ggufship.rollout._plan import AnalysisPlan, CanaryPlan
from ggufship.rollout._status import StepRecord

Measurement = Literal["pass", "fail", "inconclusive", "error"]
Phase = Literal["Progressing", "Paused", "Healthy", "Degraded"]


def plan_steps(plan: CanaryPlan) -> list[StepRecord]:
    """The step list of a plan: per canary step setWeight, analysis, pause (if any); then 100."""
    steps: list[StepRecord] = []
    for step in plan.steps:
        steps.append(StepRecord(kind="setWeight", weight=step.weight))
        steps.append(StepRecord(kind="analysis"))
        if step.pause == "manual":
            steps.append(StepRecord(kind="pause"))
        elif step.pause is not None:
            steps.append(StepRecord(kind="pause", duration_s=float(step.pause)))
    steps.append(StepRecord(kind="setWeight", weight=100))
    return steps


@dataclass(frozen=True)
class PolicyConfig:
    steps: tuple[StepRecord, ...]
    analysis: AnalysisPlan
    auto_promote: bool = False
    background: bool = True
    pause_timeout_s: float = 3600.0


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class WeightApplied:
    now: float


@dataclass(frozen=True)
class Measured:
    now: float
    outcome: Measurement
    reason: str = ""
    background: bool = False


@dataclass(frozen=True)
class PromoteRequested:
    now: float


@dataclass(frozen=True)
class AbortRequested:
    now: float
    reason: str


Event = Tick | WeightApplied | Measured | PromoteRequested | AbortRequested


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartStep:
    index: int


@dataclass(frozen=True)
class SetWeight:
    weight: int


@dataclass(frozen=True)
class Measure:
    window_s: float
    index: int
    background: bool = False


@dataclass(frozen=True)
class Pause:
    reason: str


@dataclass(frozen=True)
class Resume:
    reason: str


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Promote:
    pass


@dataclass(frozen=True)
class EndNotPromoted:
    reason: str


Action = StartStep | SetWeight | Measure | Pause | Resume | Abort | Promote | EndNotPromoted


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class PolicyState:
    step: int = 0
    phase: Phase = "Progressing"
    finished: bool = False
    started_step: int = -1
    waiting_for: Literal["", "weight", "measurement"] = ""
    weight: int = 0
    weight_at: float | None = None
    next_measure_at: float | None = None
    taken: int = 0
    failed: int = 0
    inconclusive: int = 0
    consecutive_errors: int = 0
    pause_reason: str = ""
    pause_until: float | None = None
    pause_deadline: float | None = None
    next_background_at: float | None = None
    background_taken: int = 0
    background_failed: int = 0


def _fresh_analysis(state: PolicyState) -> PolicyState:
    return replace(state, next_measure_at=None, taken=0, failed=0, inconclusive=0, consecutive_errors=0)


def _next_step(state: PolicyState) -> PolicyState:
    return _fresh_analysis(
        replace(
            state,
            step=state.step + 1,
            phase="Progressing",
            pause_reason="",
            pause_until=None,
            pause_deadline=None,
            next_background_at=None,
        )
    )


def _enter_pause(
    cfg: PolicyConfig, state: PolicyState, now: float, reason: str, until: float | None
) -> tuple[PolicyState, Action]:
    return (
        replace(
            state,
            phase="Paused",
            pause_reason=reason,
            pause_until=until,
            pause_deadline=None if until is not None else now + cfg.pause_timeout_s,
            next_background_at=now + cfg.analysis.interval_s,
        ),
        Pause(reason),
    )


def _advance(cfg: PolicyConfig, state: PolicyState, now: float) -> tuple[PolicyState, list[Action]]:
    """Walk the steps from ``state`` at time ``now`` until something has to wait."""
    actions: list[Action] = []
    while not state.finished and not state.waiting_for:
        if state.phase == "Paused":
            if state.pause_until is not None and now >= state.pause_until:
                state = _next_step(state)
                actions.append(Resume("timed pause over"))
                continue
            if state.pause_deadline is not None and now >= state.pause_deadline:
                reason = f"{state.pause_reason}; not promoted within {cfg.pause_timeout_s:g}s"
                return replace(state, finished=True), [*actions, EndNotPromoted(reason)]
            if cfg.background and state.next_background_at is not None and now >= state.next_background_at:
                since = state.weight_at if state.weight_at is not None else now
                window = min(cfg.analysis.window_s, max(1.0, now - since))
                actions.append(Measure(window, state.background_taken, background=True))
                return replace(state, waiting_for="measurement"), actions
            return state, actions
        if state.step >= len(cfg.steps):
            return replace(state, phase="Healthy", finished=True), [*actions, Promote()]
        if state.started_step != state.step:
            state = replace(state, started_step=state.step)
            actions.append(StartStep(state.step))
        step = cfg.steps[state.step]
        if step.kind == "setWeight":
            actions.append(SetWeight(step.weight or 0))
            return replace(state, waiting_for="weight"), actions
        if step.kind == "analysis":
            a = cfg.analysis
            since = state.weight_at if state.weight_at is not None else now
            if state.next_measure_at is None:
                state = replace(_fresh_analysis(state), next_measure_at=since + a.initial_delay_s)
            if now < (state.next_measure_at or now):
                return state, actions
            window = min(a.window_s, max(1.0, now - since))
            actions.append(Measure(window, state.taken))
            return replace(state, waiting_for="measurement"), actions
        # pause
        if step.duration_s is not None:
            state, act = _enter_pause(cfg, state, now, f"pause {step.duration_s:g}s", now + step.duration_s)
            actions.append(act)
            continue  # a zero-length pause is over at once
        if cfg.auto_promote:
            state = _next_step(state)
            continue
        state, act = _enter_pause(cfg, state, now, "waiting for `ggufship rollout promote`", None)
        return state, [*actions, act]
    return state, actions


def _over_limit(
    state: PolicyState,
    what: str,
    count: int,
    limit_name: str,
    limit: int,
    ev: Measured,
    *,
    in_a_row: bool = False,
) -> tuple[PolicyState, list[Action]] | None:
    """Abort (Degraded, finished) once ``count`` is more than ``limit`` (argo's limits are
    "more than": ``analysis/analysis.go`` ``assessMetricStatus``); else None."""
    if count <= limit:
        return None
    counted = f"{count} in a row" if in_a_row else str(count)
    reason = f"{what} at {state.weight}% ({counted} > {limit_name} {limit}): {ev.reason}"
    return replace(state, phase="Degraded", finished=True), [Abort(reason)]


def _measured(cfg: PolicyConfig, state: PolicyState, ev: Measured) -> tuple[PolicyState, list[Action]]:
    a = cfg.analysis
    state = replace(state, waiting_for="")
    if ev.background:
        failed = state.background_failed + (ev.outcome == "fail")
        state = replace(
            state,
            background_taken=state.background_taken + 1,
            background_failed=failed,
            next_background_at=ev.now + a.interval_s,
        )
        over = _over_limit(state, "background analysis failed", failed, "failureLimit", a.failure_limit, ev)
        return over or _advance(cfg, state, ev.now)
    state = replace(
        state,
        # An error is no measurement: it does not count towards `count` (analysis/analysis.go
        # runMeasurements increments Count for Successful/Failed/Inconclusive only).
        taken=state.taken + (ev.outcome != "error"),
        failed=state.failed + (ev.outcome == "fail"),
        inconclusive=state.inconclusive + (ev.outcome == "inconclusive"),
        consecutive_errors=state.consecutive_errors + 1 if ev.outcome == "error" else 0,
    )
    over = _over_limit(state, "analysis failed", state.failed, "failureLimit", a.failure_limit, ev) or (
        _over_limit(
            state,
            "analysis errored",
            state.consecutive_errors,
            "consecutiveErrorLimit",
            a.consecutive_error_limit,
            ev,
            in_a_row=True,
        )
    )
    if over:
        return over
    if state.inconclusive > a.inconclusive_limit:
        why = (
            f"inconclusive analysis at {state.weight}% ({state.inconclusive} > inconclusiveLimit "
            f"{a.inconclusive_limit}): {ev.reason}"
        )
        state, act = _enter_pause(cfg, state, ev.now, why, None)
        return state, [act]
    if state.taken >= a.count:
        return _advance(cfg, _next_step(state), ev.now)
    return _advance(cfg, replace(state, next_measure_at=ev.now + a.interval_s), ev.now)


def decide(cfg: PolicyConfig, state: PolicyState, event: Event) -> tuple[PolicyState, list[Action]]:
    """The next state and the actions to perform, for one event."""
    if state.finished:
        return state, []
    if isinstance(event, AbortRequested):
        return replace(state, phase="Degraded", finished=True, waiting_for=""), [Abort(event.reason)]
    if isinstance(event, WeightApplied):
        if state.waiting_for != "weight":
            return state, []
        weight = cfg.steps[state.step].weight or 0
        state = replace(state, waiting_for="", weight=weight, weight_at=event.now)
        return _advance(cfg, _next_step(state), event.now)
    if isinstance(event, Measured):
        if state.waiting_for != "measurement":
            return state, []
        return _measured(cfg, state, event)
    if isinstance(event, PromoteRequested):
        if state.phase != "Paused":
            return state, []
        state = _next_step(state)
        next_state, actions = _advance(cfg, state, event.now)
        return next_state, [Resume("promoted by `ggufship rollout promote`"), *actions]
    return _advance(cfg, state, event.now)
