"""The canary plan, read from the chart's values file: one plan, two executors.

The chart's Rollout (``charts/ggufship-api``) and the local rollout (``ggufship rollout``)
run the same plan, taken from the same keys of ``values.yaml``::

    rollout.canary.steps: [{weight: 5, pause: manual}, {weight: 50}]   # then 100
    analysis: {window: 5m, initialDelay: 5m, interval: 1m, count: 3,
               failureLimit: 1, inconclusiveLimit: 1, consecutiveErrorLimit: 4, minSamples: 50,
               background: true,
               ks: {metrics: [latency, ..., surprisal], rates: [refusal, bad_answer],
                    minRateIncrease: 0.02}}

``analysis.ks`` is what the KS gate compares (the chart passes it as ``ggufship gate
--metrics/--rates/--min-rate-increase``); the local rollout hands the same values to its gate
(:attr:`CanaryPlan.gate_options`), so a quality metric switched on or off in the values file
changes both executors.

Each step is setWeight → analysis → pause (``manual``: wait for promotion; a duration
such as ``10m``: wait that long; ``none``/absent: go on); after the last step the canary
gets 100 %. The analysis limits mean what they mean in argo-rollouts (``analysis/analysis.go``,
``assessMetricStatus``): Failed once failed measurements > ``failureLimit``, Inconclusive
once inconclusive ones > ``inconclusiveLimit``, Error once consecutive errors >
``consecutiveErrorLimit``, Successful after ``count`` measurements otherwise. Both limits
must stay below ``count`` so an analysis that saw no data can never succeed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ggufship.rollout._errors import RolloutError

#: The chart values file, relative to a checkout's root.
CHART_VALUES = Path("charts") / "ggufship-api" / "values.yaml"

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h))+$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class RolloutPlanError(RolloutError):
    """The canary plan (the chart's values file, or an override) is missing or invalid."""

    exit_code = 68


@dataclass(frozen=True)
class CanaryStep:
    """One step: the canary's weight, then (after its analysis) a pause.

    ``pause``: ``None`` (no pause), ``"manual"`` (wait for promotion) or seconds.
    """

    weight: int
    pause: float | str | None = None


@dataclass(frozen=True)
class AnalysisPlan:
    """Timing and limits of every step analysis (argo-rollouts Metric fields)."""

    window_s: float
    initial_delay_s: float
    interval_s: float
    count: int
    failure_limit: int
    inconclusive_limit: int
    consecutive_error_limit: int
    min_samples: int | None = None


@dataclass(frozen=True)
class CanaryPlan:
    """The whole plan and where it came from."""

    steps: tuple[CanaryStep, ...]
    analysis: AnalysisPlan
    background: bool
    source: str
    #: The KS gate's settings from ``analysis.ks`` as ``GatePolicy`` fields (``metrics``,
    #: ``rates``, ``min_rate_increase``); keys the values file leaves out are absent.
    gate_options: tuple[tuple[str, Any], ...] = ()

    @property
    def weights(self) -> tuple[int, ...]:
        """Every weight set, the final 100 included."""
        return (*(s.weight for s in self.steps), 100)


def parse_duration(value: Any, where: str) -> float:
    """Seconds of an Argo duration (``30s``, ``5m``, ``1h30m``, ``250ms``) or a number of seconds."""
    if isinstance(value, bool):
        raise RolloutPlanError(f"{where}: {value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value.strip()):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _PART_RE.findall(value.strip()))
    else:
        raise RolloutPlanError(f"{where}: {value!r} is not a duration (e.g. 30s, 5m, 1h)")
    if not 0 <= seconds <= 7 * 86_400:
        raise RolloutPlanError(f"{where}: {value!r} must be between 0 and 7 days")
    return seconds


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RolloutPlanError(f"{where}: {value!r} must be an integer in {low}..{high}")
    return value


def find_chart_values(root: Path | None = None) -> Path:
    """``charts/ggufship-api/values.yaml`` under ``root``, the current directory or the checkout."""
    candidates = [root] if root else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for base in candidates:
        path = Path(base) / CHART_VALUES
        if path.is_file():
            return path
    looked = ", ".join(str(Path(b) / CHART_VALUES) for b in candidates)
    raise RolloutPlanError(f"chart values not found (looked at {looked}); give the plan file explicitly")


def check_plan(plan: CanaryPlan, *, delay_covers_window: bool = True) -> CanaryPlan:
    """Raise :class:`RolloutPlanError` (naming the source and field) unless the plan is runnable.

    ``delay_covers_window``: the chart's rule ``initialDelay >= window`` (a measurement never
    reaches back before its weight change). Local overrides may relax it: the local executor
    caps every measurement's window at the time since the weight change, which keeps the
    same guarantee while a pause lets the window grow."""
    src = plan.source
    weights = [s.weight for s in plan.steps]
    if not weights:
        raise RolloutPlanError(f"{src}: rollout.canary.steps is empty (give at least one weight below 100)")
    if any(not 0 < w < 100 for w in weights) or weights != sorted(set(weights)):
        raise RolloutPlanError(
            f"{src}: rollout.canary.steps weights {weights} must rise strictly within 1..99 "
            "(the canary goes to 100 after the last step)"
        )
    a = plan.analysis
    if a.count < 1:
        raise RolloutPlanError(f"{src}: analysis.count {a.count} must be at least 1")
    for name, limit in (("failureLimit", a.failure_limit), ("inconclusiveLimit", a.inconclusive_limit)):
        if not 0 <= limit < a.count:
            raise RolloutPlanError(
                f"{src}: analysis.{name} {limit} must be in 0..count-1 ({a.count - 1}); with a limit "
                f">= count an analysis whose every measurement is {name[:-5].lower()} would succeed"
            )
    if a.failure_limit + a.inconclusive_limit >= a.count:
        raise RolloutPlanError(
            f"{src}: analysis.failureLimit + analysis.inconclusiveLimit ({a.failure_limit} + "
            f"{a.inconclusive_limit}) must be below count ({a.count}): else `count` measurements "
            "without one success (no data) could end Successful"
        )
    if delay_covers_window and a.initial_delay_s < a.window_s:
        raise RolloutPlanError(
            f"{src}: analysis.initialDelay ({a.initial_delay_s:g}s) is shorter than analysis.window "
            f"({a.window_s:g}s): the first measurement would see less than a window of traffic"
        )
    if a.window_s < 1 or a.interval_s <= 0:
        raise RolloutPlanError(f"{src}: analysis.window must be >= 1s and analysis.interval > 0")
    return plan


def _pause(value: Any, where: str) -> float | str | None:
    if value is None or value in ("none", False):
        return None
    if value in ("manual", {}):
        return "manual"
    if isinstance(value, dict) and set(value) == {"duration"}:
        value = value["duration"]
    return parse_duration(value, where)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's way with several ``-f`` files: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RolloutPlanError(f"plan {path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RolloutPlanError(f"plan {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RolloutPlanError(f"plan {path}: expected a mapping at the top level")
    return data


def load_plan(*paths: Path) -> CanaryPlan:
    """Read the canary plan from chart values files, merged in order as ``helm -f a -f b`` does
    (default: the chart's own ``values.yaml``). A file without ``rollout.canary`` or ``analysis``
    keys is an overlay: give the chart's values first."""
    files = list(paths) or [find_chart_values()]
    data: dict[str, Any] = {}
    for path in files:
        data = _merge(data, _read(path))
    src = " + ".join(str(p) for p in files)
    canary = (
        ((data.get("rollout") or {}).get("canary") or {}) if isinstance(data.get("rollout"), dict) else {}
    )
    raw_steps = canary.get("steps") if isinstance(canary, dict) else None
    if not isinstance(raw_steps, list):
        raise RolloutPlanError(f"{src}: rollout.canary.steps is missing or not a list")
    steps = []
    for i, raw in enumerate(raw_steps):
        where = f"{src}: rollout.canary.steps[{i}]"
        if not isinstance(raw, dict) or "weight" not in raw:
            raise RolloutPlanError(f"{where}: expected a mapping with `weight` (and optional `pause`)")
        unknown = set(raw) - {"weight", "pause"}
        if unknown:
            raise RolloutPlanError(f"{where}: unknown key(s) {sorted(unknown)}")
        steps.append(
            CanaryStep(
                weight=_int(raw["weight"], f"{where}.weight", 1, 99),
                pause=_pause(raw.get("pause"), f"{where}.pause"),
            )
        )
    analysis = data.get("analysis")
    if not isinstance(analysis, dict):
        raise RolloutPlanError(f"{src}: analysis is missing or not a mapping")

    def field(key: str) -> Any:
        if key not in analysis:
            raise RolloutPlanError(f"{src}: analysis.{key} is missing")
        return analysis[key]

    min_samples = analysis.get("minSamples")
    plan = CanaryPlan(
        steps=tuple(steps),
        analysis=AnalysisPlan(
            window_s=parse_duration(field("window"), f"{src}: analysis.window"),
            initial_delay_s=parse_duration(field("initialDelay"), f"{src}: analysis.initialDelay"),
            interval_s=parse_duration(field("interval"), f"{src}: analysis.interval"),
            count=_int(field("count"), f"{src}: analysis.count", 1, 1000),
            failure_limit=_int(field("failureLimit"), f"{src}: analysis.failureLimit", 0, 1000),
            inconclusive_limit=_int(
                field("inconclusiveLimit"), f"{src}: analysis.inconclusiveLimit", 0, 1000
            ),
            consecutive_error_limit=_int(
                analysis.get("consecutiveErrorLimit", 4), f"{src}: analysis.consecutiveErrorLimit", 0, 1000
            ),
            min_samples=None
            if min_samples is None
            else _int(min_samples, f"{src}: analysis.minSamples", 1, 10_000_000),
        ),
        background=bool(analysis.get("background", True)),
        source=src,
        gate_options=_ks_options(analysis.get("ks"), src),
    )
    return check_plan(plan)


#: ``analysis.ks`` keys the local gate takes, and the ``GatePolicy`` field each one sets.
_KS_KEYS = {"metrics": "metrics", "rates": "rates", "minRateIncrease": "min_rate_increase"}


def _ks_options(ks: Any, src: str) -> tuple[tuple[str, Any], ...]:
    """The gate settings of ``analysis.ks`` (shape-checked here; the gate checks the names)."""
    if ks is None:
        return ()
    if not isinstance(ks, dict):
        raise RolloutPlanError(f"{src}: analysis.ks must be a mapping")
    out: list[tuple[str, Any]] = []
    for key, field_name in _KS_KEYS.items():
        if key not in ks:
            continue
        value = ks[key]
        where = f"{src}: analysis.ks.{key}"
        if key == "minRateIncrease":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise RolloutPlanError(f"{where}: {value!r} must be a number in 0..1")
            out.append((field_name, float(value)))
        else:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RolloutPlanError(f"{where}: {value!r} must be a list of names")
            out.append((field_name, tuple(value)))
    return tuple(out)


def override_plan(
    plan: CanaryPlan,
    *,
    weights: tuple[int, ...] | None = None,
    window_s: float | None = None,
    initial_delay_s: float | None = None,
    interval_s: float | None = None,
    count: int | None = None,
    failure_limit: int | None = None,
    inconclusive_limit: int | None = None,
    background: bool | None = None,
) -> CanaryPlan:
    """The plan with explicit settings (CLI flags, ``GGUFSHIP_ROLLOUT_*``) in place of the file's.

    ``weights`` (the last must be 100) gives a manual pause after the first step's analysis,
    as the chart's default does. A ``count`` too small for the file's limits caps them
    (failureLimit at ``count - 1``, then inconclusiveLimit so that their sum stays below
    ``count``: no data never succeeds), unless the limits are given too.
    """
    steps = plan.steps
    source = plan.source
    if weights is not None:
        if not weights or weights[-1] != 100:
            raise RolloutPlanError(f"steps {list(weights)}: the last canary weight must be 100")
        steps = tuple(CanaryStep(w, "manual" if i == 0 else None) for i, w in enumerate(weights[:-1]))
        source += " (steps overridden)"
    a = plan.analysis
    new_count = a.count if count is None else count
    a = replace(
        a,
        window_s=a.window_s if window_s is None else window_s,
        initial_delay_s=a.initial_delay_s if initial_delay_s is None else initial_delay_s,
        interval_s=a.interval_s if interval_s is None else interval_s,
        count=new_count,
        failure_limit=min(a.failure_limit, new_count - 1) if failure_limit is None else failure_limit,
    )
    a = replace(
        a,
        inconclusive_limit=min(a.inconclusive_limit, max(0, new_count - 1 - a.failure_limit))
        if inconclusive_limit is None
        else inconclusive_limit,
    )
    if (window_s, initial_delay_s, interval_s, count, failure_limit, inconclusive_limit) != (None,) * 6:
        source += " (analysis overridden)"
    return check_plan(
        CanaryPlan(
            steps=steps,
            analysis=a,
            background=plan.background if background is None else background,
            source=source,
            gate_options=plan.gate_options,
        ),
        delay_covers_window=window_s is None,
    )
