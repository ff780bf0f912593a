"""The local rollout's canary plan (from the chart's values) and its step policy, a pure function.

The policy's shape follows argo-rollouts ``rollout/canary.go`` (one step at a time; a pause
holds until promoted) and its analysis limits ``analysis/analysis.go`` ``assessMetricStatus``
(Failed when failed > failureLimit, Inconclusive when inconclusive > inconclusiveLimit,
Error when consecutive errors > consecutiveErrorLimit, Successful after ``count``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ggufship.rollout._plan import (
    AnalysisPlan,
    CanaryPlan,
    CanaryStep,
    RolloutPlanError,
    find_chart_values,
    load_plan,
    override_plan,
    parse_duration,
)
from ggufship.rollout._policy import (
    Abort,
    AbortRequested,
    EndNotPromoted,
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
    plan_steps,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "ggufship-api"

A = AnalysisPlan(
    window_s=10, initial_delay_s=10, interval_s=5, count=3, failure_limit=1, inconclusive_limit=1,
    consecutive_error_limit=2,
)  # fmt: skip
PLAN = CanaryPlan((CanaryStep(5, "manual"), CanaryStep(50)), A, background=True, source="test")


def cfg(plan: CanaryPlan = PLAN, **kw) -> PolicyConfig:
    return PolicyConfig(tuple(plan_steps(plan)), plan.analysis, **{"pause_timeout_s": 100.0, **kw})


def run(config: PolicyConfig, events, state: PolicyState | None = None):
    """Feed events in order; the actions of each (names only, with their key field)."""
    state = state or PolicyState()
    out = []
    for ev in events:
        state, actions = decide(config, state, ev)
        out.append([_name(a) for a in actions if not isinstance(a, StartStep)])
    return state, out


def names(actions) -> list[str]:
    return [_name(a) for a in actions if not isinstance(a, StartStep)]


def _name(a) -> str:
    if isinstance(a, SetWeight):
        return f"weight {a.weight}"
    if isinstance(a, Measure):
        return f"measure{' bg' if a.background else ''} {a.window_s:g}s"
    if isinstance(a, Pause | Resume | Abort | EndNotPromoted):
        return f"{type(a).__name__.lower()}"
    return type(a).__name__.lower()


def to_analysis(config: PolicyConfig, t0: float = 0.0):
    """Events up to the first measurement of the first analysis (5% applied at t0)."""
    return [Tick(t0), WeightApplied(t0), Tick(t0 + 9.9), Tick(t0 + 10)]


# ---------------------------------------------------------------- the plan from the chart


def test_chart_values_give_the_plan_the_cluster_runs() -> None:
    plan = load_plan(find_chart_values(ROOT))
    assert plan.weights[-1] == 100 and list(plan.weights) == sorted(set(plan.weights))
    a = plan.analysis
    assert a.initial_delay_s >= a.window_s  # every measurement sees a full window of traffic
    assert a.failure_limit < a.count and a.inconclusive_limit < a.count  # no data never succeeds
    assert [s.describe() for s in plan_steps(plan)][:3] == [
        f"setWeight {plan.steps[0].weight}",
        "analysis",
        "pause",
    ]


@pytest.mark.parametrize("variant", sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")))
def test_every_ci_variant_gives_a_runnable_plan(variant: str) -> None:
    plan = load_plan(CHART / "values.yaml", CHART / "ci" / variant)
    assert plan.weights[-1] == 100 and variant in plan.source


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), (90, 90)]
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("rollout: {canary: {steps: null}}\n", "rollout.canary.steps is missing"),
        ("rollout: {canary: {steps: [{weight: 50}, {weight: 5}]}}\n", "must rise strictly"),
        ("rollout: {canary: {steps: [{weight: 100}]}}\n", "weight: 100 must be an integer in 1..99"),
        ("rollout: {canary: {steps: [{weight: 5, pasue: manual}]}}\n", "unknown key"),
        (
            "rollout: {canary: {steps: [{weight: 5, pause: soon}]}}\n",
            "steps[0].pause: 'soon' is not a duration",
        ),
        ("analysis: {count: 3, inconclusiveLimit: 3}\n", "inconclusiveLimit 3 must be in 0..count-1"),
        ("analysis: {count: 3, failureLimit: 5}\n", "failureLimit 5 must be in 0..count-1"),
        ("analysis: {window: 5m, initialDelay: 1m}\n", "initialDelay (60s) is shorter than analysis.window"),
        ("analysis: {interval: fast}\n", "analysis.interval: 'fast' is not a duration"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_plans_name_the_file_and_field(tmp_path: Path, values: str, message: str) -> None:
    overlay = tmp_path / "bad-values.yaml"
    overlay.write_text(values)
    with pytest.raises(RolloutPlanError) as err:
        load_plan(CHART / "values.yaml", overlay)
    assert message in str(err.value) and "bad-values.yaml" in str(err.value)


def test_overrides_keep_no_data_from_succeeding() -> None:
    chart = load_plan(CHART / "values.yaml")
    short = override_plan(chart, weights=(50, 100), window_s=8, initial_delay_s=8, interval_s=2, count=1)
    assert short.weights == (50, 100) and short.steps[0].pause == "manual"
    assert short.analysis.failure_limit == 0 and short.analysis.inconclusive_limit == 0  # capped
    assert "overridden" in short.source
    with pytest.raises(RolloutPlanError, match="the last canary weight must be 100"):
        override_plan(chart, weights=(5, 50))
    with pytest.raises(RolloutPlanError, match="inconclusiveLimit 2"):
        override_plan(chart, count=2, inconclusive_limit=2)
    two = override_plan(chart, count=2)  # chart limits 1 + 1 = 2: capped to keep the sum below 2
    assert (two.analysis.failure_limit, two.analysis.inconclusive_limit) == (1, 0)
    # Each limit below count is not enough: 2 failed + 1 inconclusive of 3 would end Successful.
    with pytest.raises(RolloutPlanError, match=r"\(2 \+ 1\) must be below count \(3\)"):
        override_plan(chart, count=3, failure_limit=2, inconclusive_limit=1)


# ---------------------------------------------------------------- the policy, table-tested


def test_a_clean_canary_walks_every_step() -> None:
    c = cfg(auto_promote=True)
    events = [*to_analysis(c), Measured(10, "pass"), Tick(14), Tick(15), Measured(15, "pass"), Tick(20)]
    events += [Measured(20, "pass"), WeightApplied(21), Tick(31)]
    events += [Measured(31, "pass"), Tick(36), Measured(36, "pass"), Tick(41), Measured(41, "pass")]
    events += [WeightApplied(42)]
    state, acts = run(c, events)
    assert acts == [
        ["weight 5"], [], [], ["measure 10s"],  # the first measurement initialDelay after the weight
        [], [], ["measure 10s"], [], ["measure 10s"],  # then one per interval, until count
        ["weight 50"],  # count reached: the manual pause is skipped (auto-promote), next weight
        [], ["measure 10s"], [], ["measure 10s"], [], ["measure 10s"],
        ["weight 100"],
        ["promote"],
    ]  # fmt: skip
    assert acts[-1] == ["promote"] and state.phase == "Healthy" and state.finished


# (id, analysis outcomes at the first step, expected last actions, expected phase)
TABLE = [
    ("all pass → manual pause", ["pass", "pass", "pass"], ["pause"], "Paused"),
    ("one fail is within failureLimit 1", ["fail", "pass", "pass"], ["pause"], "Paused"),
    ("two fails > failureLimit → abort at once", ["fail", "fail"], ["abort"], "Degraded"),
    ("one inconclusive is within the limit", ["inconclusive", "pass", "pass"], ["pause"], "Paused"),
    ("two inconclusive > limit → pause (never pass)", ["inconclusive", "inconclusive"], ["pause"], "Paused"),
    ("three errors in a row > consecutiveErrorLimit 2 → abort", ["error"] * 3, ["abort"], "Degraded"),
    (
        "errors reset by a pass; they do not count",
        ["error", "error", "pass", "pass", "pass"],
        ["pause"],
        "Paused",
    ),
]


@pytest.mark.parametrize(("rid", "outcomes", "last", "phase"), TABLE, ids=[r[0] for r in TABLE])
def test_analysis_limits(rid: str, outcomes: list[str], last: list[str], phase: str) -> None:
    c = cfg()
    state, _ = run(c, to_analysis(c))
    t = 10.0
    acts: list = []
    for outcome in outcomes:
        state, acts = decide(c, state, Measured(t, outcome))  # type: ignore[arg-type]
        t += 5
        if not state.finished and state.phase != "Paused":
            state, more = decide(c, state, Tick(t))
            assert [type(a) for a in more] == [Measure], rid
    assert names(acts) == last and state.phase == phase, (rid, acts, state)


def test_inconclusive_pause_waits_for_promotion_then_skips_the_rest_of_the_analysis() -> None:
    c = cfg()
    state, _ = run(c, [*to_analysis(c), Measured(10, "inconclusive"), Tick(15), Measured(15, "inconclusive")])
    assert state.phase == "Paused" and "inconclusive" in state.pause_reason
    state, acts = decide(c, state, Tick(20))  # background measurement while paused
    assert acts == [Measure(A.window_s, 0, background=True)]
    state, acts = decide(c, state, Measured(20, "inconclusive", background=True))
    assert acts == [] and state.phase == "Paused"
    state, acts = decide(c, state, PromoteRequested(21))
    assert names(acts) == ["resume", "pause"]  # next step is the manual pause


def test_pause_times_out_not_promoted() -> None:
    c = cfg(background=False)
    state, _ = run(c, [*to_analysis(c), Measured(10, "pass"), Tick(15), Measured(15, "pass")])
    state, acts = decide(c, state, Tick(20))
    state, acts = decide(c, state, Measured(20, "pass"))
    assert names(acts) == ["pause"]
    state, acts = decide(c, state, Tick(119))
    assert acts == [] and not state.finished
    state, acts = decide(c, state, Tick(120.1))
    assert names(acts) == ["endnotpromoted"] and state.finished and state.phase == "Paused"


def test_background_failures_abort_a_pause() -> None:
    c = cfg()
    state, _ = run(c, [*to_analysis(c), Measured(10, "pass"), Tick(15), Measured(15, "pass"), Tick(20)])
    state, acts = decide(c, state, Measured(20, "pass"))
    assert state.phase == "Paused"
    for t, expected in ((25.0, []), (30.0, ["abort"])):
        state, acts = decide(c, state, Tick(t))
        assert [type(a) for a in acts] == [Measure] and acts[0].background
        state, acts = decide(c, state, Measured(t, "fail", background=True))
        assert names(acts) == expected
    assert state.phase == "Degraded" and state.finished


def test_abort_request_at_any_time_and_nothing_after_the_end() -> None:
    c = cfg()
    state, _ = run(c, to_analysis(c)[:2])
    state, acts = decide(c, state, AbortRequested(3, "aborted by `ggufship rollout abort`"))
    assert acts == [Abort("aborted by `ggufship rollout abort`")] and state.phase == "Degraded"
    for ev in (Tick(4), PromoteRequested(5), Measured(6, "pass"), WeightApplied(7)):
        assert decide(c, state, ev) == (state, [])


def test_timed_pause_resumes_by_itself_or_on_promote() -> None:
    plan = replace(PLAN, steps=(CanaryStep(5, 30.0), CanaryStep(50)))
    c = cfg(plan, background=False)
    assert [s.describe() for s in c.steps][:3] == ["setWeight 5", "analysis", "pause 30s"]
    state, _ = run(c, [*to_analysis(c), Measured(10, "pass"), Tick(15), Measured(15, "pass"), Tick(20)])
    state, acts = decide(c, state, Measured(20, "pass"))
    assert names(acts) == ["pause"] and state.pause_until == 50
    state, acts = decide(c, state, Tick(49))
    assert acts == []
    state, acts = decide(c, state, Tick(50))
    assert names(acts) == ["resume", "weight 50"]
    early, acts = decide(c, decide(c, state, WeightApplied(51))[0], PromoteRequested(52))
    assert acts == [] and early.phase == "Progressing"  # promote outside a pause: ignored


def test_promote_and_stray_events_outside_their_wait_are_ignored() -> None:
    c = cfg()
    state, _ = run(c, [Tick(0)])
    assert decide(c, state, Measured(1, "fail")) == (state, [])  # no measurement asked for
    assert decide(c, state, PromoteRequested(1)) == (state, [])
    assert isinstance(decide(c, PolicyState(finished=True), Tick(1))[1], list)
    assert Promote() == Promote()


def test_local_window_override_is_capped_at_the_time_since_the_weight_change() -> None:
    """Locally a window longer than the delay is allowed (the executor caps every measurement's
    window at the step's age, so none reaches back before the weight change); a values file
    must keep the chart's rule initialDelay >= window."""
    chart = load_plan(CHART / "values.yaml")
    plan = override_plan(chart, window_s=120, initial_delay_s=10, interval_s=5, count=1)
    c = cfg(plan, pause_timeout_s=1000.0)
    state, acts = run(c, to_analysis(c))
    assert acts[-1] == ["measure 10s"]  # 10 s after the weight: the window is those 10 s
    state, acts = decide(c, state, Measured(10, "inconclusive"))
    assert names(acts) == ["pause"]
    state, acts = decide(c, state, Tick(15))
    assert acts == [Measure(15.0, 0, background=True)]  # grows with the pause
    state, acts = decide(c, state, Measured(15, "pass", background=True))
    state, acts = decide(c, state, Tick(105))
    assert acts == [Measure(105.0, 1, background=True)]
    state, acts = decide(c, state, Measured(105, "pass", background=True))
    state, acts = decide(c, state, Tick(200))
    assert acts == [Measure(120.0, 2, background=True)]  # up to the configured window


# ---------------------------------------------------------------- the gate's settings from the chart


def test_the_local_gate_takes_analysis_ks_from_the_chart_values() -> None:
    """One declaration: the chart passes analysis.ks as `ggufship gate --metrics/--rates/
    --min-rate-increase` (templates/_helpers.tpl gateArgs); the local plan carries the same."""
    import yaml

    ks = yaml.safe_load((CHART / "values.yaml").read_text())["analysis"]["ks"]
    options = dict(load_plan(CHART / "values.yaml").gate_options)
    assert options == {
        "metrics": tuple(ks["metrics"]),
        "rates": tuple(ks["rates"]),
        "min_rate_increase": float(ks["minRateIncrease"]),
    }
    assert "surprisal" in options["metrics"] and "refusal" in options["rates"]


def test_changing_analysis_ks_changes_the_local_plan(tmp_path: Path) -> None:
    from ggufship.rollout import RolloutSettings

    overlay = tmp_path / "quality-values.yaml"
    overlay.write_text(
        "analysis: {ks: {metrics: [surprisal, latency], rates: [bad_answer], minRateIncrease: 0.1}}\n"
    )
    plan = load_plan(CHART / "values.yaml", overlay)
    assert dict(plan.gate_options) == {
        "metrics": ("surprisal", "latency"),
        "rates": ("bad_answer",),
        "min_rate_increase": 0.1,
    }
    assert dict(override_plan(plan, count=1).gate_options) == dict(plan.gate_options)  # overrides keep it
    settings = RolloutSettings(plan_files=(CHART / "values.yaml", overlay))
    assert settings.canary_plan().gate_options == plan.gate_options
    assert dict(load_plan(CHART / "values.yaml").gate_options)["rates"] != ("bad_answer",)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("analysis: {ks: [latency]}\n", "analysis.ks must be a mapping"),
        ("analysis: {ks: {metrics: latency}}\n", "analysis.ks.metrics: 'latency' must be a list of names"),
        ("analysis: {ks: {minRateIncrease: 2}}\n", "analysis.ks.minRateIncrease: 2 must be a number in 0..1"),
    ],
)
def test_bad_analysis_ks_names_the_file_and_field(tmp_path: Path, values: str, message: str) -> None:
    overlay = tmp_path / "bad-values.yaml"
    overlay.write_text(values)
    with pytest.raises(RolloutPlanError) as err:
        load_plan(CHART / "values.yaml", overlay)
    assert message in str(err.value) and "bad-values.yaml" in str(err.value)
