"""The pure statistics core of the gate: a :class:`Measurement` in, a :class:`Verdict` out.

No I/O here; :func:`evaluate` is deterministic given its inputs (table-tested).

Method (``buckets``, the default):

1. **Reconstruct** each track's distribution over the window from the raw samples
   of its cumulative ``_bucket`` counters: per series, the increase over the window
   with counter resets handled as Prometheus' ``increase()`` does, but without its
   extrapolation to the window edges (so the counts are exact integers and stay
   monotone in ``le``); series of one track are summed per ``le``.
2. **Preconditions**: the primary metric (first in ``policy.metrics``) has at
   least ``min_samples`` requests on both tracks; Prometheus answered. Otherwise:
   inconclusive, never pass.
3. **Thresholds**: canary p99 latency ≤ ``max_p99_s``; canary 5xx ratio ≤ ``max_error_ratio``.
4. **KS**: two-sample Kolmogorov–Smirnov per metric with the real counts as sample
   sizes. The reconstructed samples sit at bucket upper bounds (ties); D is
   computed exactly for them (the ECDFs only change at bounds). p-values use the
   continuous-data null distribution (scipy's ``kstwo`` two-sided; Hodges'
   approximation one-sided, as ``scipy.stats.ks_2samp(method="asymp")``): with
   ties the true null distribution of D is stochastically smaller, so these
   p-values are conservative (too large) — fewer false rollbacks, less power.
   One-sided by default (alternative: the canary's CDF lies below the stable's,
   i.e. the canary is slower); ``completion_length`` is always two-sided.
5. **Multiplicity**: Holm's step-down correction across the metrics of one
   analysis, at ``alpha / planned_analyses`` (Bonferroni over the analyses of one
   rollout), so the family-wise false-rollback rate of a rollout is ≤ ``alpha``.
6. **Effect-size floor**: a significant metric fails only if also D ≥ ``min_ks_d``
   and the median moved by ≥ ``min_median_shift`` (relative; in the bad direction
   when one-sided).

7. **Answer rates** (``policy.rates``: refusals, bad answers — empty, looping, cut off — per
   finished answer): one-sided Fisher exact test of "the canary's rate is higher" on the
   2×2 table of counts over the window, in the same Holm family as the KS tests; it fails
   only if also the rate rose by ≥ ``min_rate_increase`` (absolute), or when the canary's
   rate is above an absolute ``max_<rate>_rate``. Fewer than ``min_samples`` answers on a
   track: inconclusive (no data never passes).

Method ``quantile-series`` (weaker, kept for compatibility): KS on the time series of
one quantile per track (``query_range``); the points are autocorrelated
(overlapping rate windows), so its p-values are optimistic and its power low.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ggufship.gate._model import (
    TWO_SIDED_METRICS,
    Check,
    CheckOutcome,
    Distribution,
    GatePolicy,
    GateRequest,
    Outcome,
    QueryRecord,
    Series,
    Verdict,
    finite,
)
from ggufship.metrics import HISTOGRAMS

# ---------------------------------------------------------------- measurement values


@dataclass(frozen=True)
class CounterSeries:
    """The raw samples (time order) of one ``_bucket`` counter series with its ``le``."""

    le: str
    values: tuple[float, ...]


def parse_le(le: str) -> float:
    return math.inf if le in ("+Inf", "Inf", "inf") else float(le)


def format_le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def counter_increase(values: Sequence[float]) -> float:
    """Increase of a counter over its samples; a drop is a reset (the counter restarted at 0)."""
    total = 0.0
    for prev, cur in itertools.pairwise(values):
        total += cur - prev if cur >= prev else cur
    return total


@dataclass(frozen=True)
class Histogram:
    """One track's distribution over the window: cumulative counts per upper bound (last: +Inf)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    repaired: bool = False  # counts had to be made monotone in le

    @property
    def n(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    @classmethod
    def from_series(cls, series: Sequence[CounterSeries]) -> Histogram | None:
        """Sum the per-series increases per ``le``; None without any series or without +Inf."""
        by_le: dict[float, float] = {}
        for s in series:
            if not s.values:
                continue
            bound = parse_le(s.le)
            by_le[bound] = by_le.get(bound, 0.0) + counter_increase(s.values)
        if not by_le or math.inf not in by_le:
            return None
        bounds = tuple(sorted(by_le))
        running, repaired, cumulative = 0, False, []
        for b in bounds:
            count = round(by_le[b])
            if count < running:
                repaired = True
                count = running
            running = count
            cumulative.append(count)
        return cls(bounds, tuple(cumulative), repaired)

    @classmethod
    def from_counts(cls, bounds: Sequence[float], counts: Sequence[int]) -> Histogram:
        """From per-bucket (non-cumulative) counts; ``bounds`` must end with +Inf."""
        cumulative, running = [], 0
        for c in counts:
            running += int(c)
            cumulative.append(running)
        return cls(tuple(bounds), tuple(cumulative))

    def cdf_at(self, bound: float) -> float:
        return self.cumulative[self.bounds.index(bound)] / self.n

    def quantile(self, q: float) -> float | None:
        """Like PromQL ``histogram_quantile``: linear interpolation inside the bucket."""
        n = self.n
        if n == 0:
            return None
        rank = q * n
        lower_bound, lower_count = 0.0, 0
        for bound, count in zip(self.bounds, self.cumulative, strict=True):
            if count >= rank and count > lower_count:
                if math.isinf(bound):
                    finite_bounds = [b for b in self.bounds if not math.isinf(b)]
                    return finite_bounds[-1] if finite_bounds else None
                if lower_bound == 0.0 and bound <= 0:
                    return bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = bound, count
        return None


@dataclass(frozen=True)
class RateCounts:
    """One track's answers in the window and how many of them were events (refusals, bad answers)."""

    events: int
    total: int

    def __post_init__(self) -> None:
        if self.total < 0 or not 0 <= self.events <= self.total:
            raise ValueError(f"rate counts: need 0 <= events <= total, got {self.events}/{self.total}")

    @property
    def rate(self) -> float | None:
        return self.events / self.total if self.total else None


@dataclass(frozen=True)
class Measurement:
    """What ``measure`` got from Prometheus (or a test built by hand): the core's whole input.

    ``histograms[metric][track]`` with track ``stable``/``canary``; None when that
    track has no series. ``series`` is used by the quantile-series method. ``rates[rate][track]``:
    answer counts per :data:`ggufship.metrics.RATES` entry; None when the track has no answers series.
    """

    histograms: Mapping[str, Mapping[str, Histogram | None]] = field(default_factory=dict)
    canary_p99_s: float | None = None
    stable_p99_s: float | None = None
    canary_error_ratio: float | None = None
    stable_error_ratio: float | None = None
    series: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    rates: Mapping[str, Mapping[str, RateCounts | None]] = field(default_factory=dict)
    queries: tuple[QueryRecord, ...] = ()
    errors: tuple[str, ...] = ()


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class KsResult:
    d: float  # the statistic for the chosen alternative
    d_two_sided: float
    d_canary_slower: float  # max(F_stable - F_canary)
    d_canary_faster: float  # max(F_canary - F_stable)
    location: float  # the bound where the statistic is attained
    pvalue: float
    n_stable: int
    n_canary: int
    alternative: str


def ks_pvalue(d: float, n1: int, n2: int, two_sided: bool) -> float:
    """Asymptotic p-value of the two-sample KS statistic, as ``scipy.stats.ks_2samp(method="asymp")``."""
    from scipy.stats import kstwo

    if n1 <= 0 or n2 <= 0:
        return 1.0
    m, n = sorted((float(n1), float(n2)), reverse=True)
    en = m * n / (m + n)
    if two_sided:
        return float(min(1.0, max(0.0, kstwo.sf(d, round(en)))))
    z = math.sqrt(en) * d
    # Hodges' approximation (his eq. 5.3), m the larger sample, as scipy does.
    expt = -2 * z**2 - 2 * z * (m + 2 * n) / math.sqrt(m * n * (m + n)) / 3.0
    return float(min(1.0, max(0.0, math.exp(expt))))


def ks_binned(stable: Histogram, canary: Histogram, two_sided: bool) -> KsResult:
    """KS on bucket-reconstructed samples: the ECDFs compared at the bounds both tracks have."""
    common = sorted(set(stable.bounds) & set(canary.bounds))
    best_slow, loc_slow, best_fast, loc_fast = 0.0, common[-1], 0.0, common[-1]
    for b in common:
        diff = stable.cdf_at(b) - canary.cdf_at(b)
        if diff > best_slow:
            best_slow, loc_slow = diff, b
        if -diff > best_fast:
            best_fast, loc_fast = -diff, b
    two = max(best_slow, best_fast)
    if two_sided:
        d, loc = two, (loc_slow if best_slow >= best_fast else loc_fast)
    else:
        d, loc = best_slow, loc_slow
    return KsResult(
        d=d,
        d_two_sided=two,
        d_canary_slower=best_slow,
        d_canary_faster=best_fast,
        location=loc,
        pvalue=ks_pvalue(d, stable.n, canary.n, two_sided),
        n_stable=stable.n,
        n_canary=canary.n,
        alternative="two-sided" if two_sided else "canary-slower",
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (compare each with the family alpha)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def relative_shift(stable: float | None, canary: float | None) -> float | None:
    if stable is None or canary is None or stable <= 0:
        return None
    return canary / stable - 1.0


# ---------------------------------------------------------------- evaluation


def _combine(outcomes: Sequence[CheckOutcome]) -> Outcome:
    if "fail" in outcomes:
        return "fail"
    if "inconclusive" in outcomes:
        return "inconclusive"
    return "pass"


def _threshold_checks(m: Measurement, policy: GatePolicy) -> list[Check]:
    return [
        _threshold(
            "p99-latency",
            finite(m.canary_p99_s),
            finite(m.stable_p99_s),
            policy.max_p99_s,
            "no canary p99 latency (no latency histogram data in the window)",
            lambda v, op: f"canary p99 {v:.3f}s {op} {policy.max_p99_s}s",
        ),
        _threshold(
            "error-ratio",
            finite(m.canary_error_ratio),
            finite(m.stable_error_ratio),
            policy.max_error_ratio,
            "no canary request counts in the window",
            lambda v, op: f"canary 5xx ratio {v:.4%} {op} {policy.max_error_ratio:.4%}",
        ),
    ]


def _threshold(
    name: str,
    value: float | None,
    stable: float | None,
    limit: float,
    missing: str,
    describe: Callable[[float, str], str],
) -> Check:
    """The canary's ``value`` against ``limit`` (fail above it); no value → inconclusive (``missing``)."""
    details: dict[str, float | int | str | bool | None] = {"stable_value": stable}
    if value is None:
        return Check(
            name=name, kind="threshold", outcome="inconclusive", limit=limit, reason=missing, details=details
        )
    bad = value > limit
    return Check(
        name=name,
        kind="threshold",
        outcome="fail" if bad else "pass",
        value=value,
        limit=limit,
        reason=describe(value, ">" if bad else "≤"),
        details=details,
    )


@dataclass
class _Tested:
    metric: str
    pvalue: float
    d: float
    shift: float | None
    two_sided: bool
    details: dict[str, float | int | str | bool | None]


def _judge(
    tested: list[_Tested], policy: GatePolicy, kind: str, extra: Sequence[float] = ()
) -> tuple[list[Check], list[float]]:
    """Holm across metrics (and the ``extra`` p-values of the rate tests: one family) at
    alpha/planned_analyses, then the effect-size floor. Returns the checks and the extras' adjusted
    p-values."""
    alpha = policy.alpha_per_analysis
    family = holm([t.pvalue for t in tested] + list(extra))
    adjusted, extra_adjusted = family[: len(tested)], family[len(tested) :]
    checks = []
    for t, p_adj in zip(tested, adjusted, strict=True):
        significant = p_adj <= alpha
        shift_ok = t.shift is not None and (
            abs(t.shift) >= policy.min_median_shift if t.two_sided else t.shift >= policy.min_median_shift
        )
        effect = t.d >= policy.min_ks_d and shift_ok
        fail = significant and effect
        shift_text = "n/a" if t.shift is None else f"{t.shift:+.1%}"
        if fail:
            reason = (
                f"{t.metric}: canary differs (D={t.d:.3f}, Holm p={p_adj:.2g} ≤ {alpha:.2g}, "
                f"median {shift_text})"
            )
        elif significant:
            reason = (
                f"{t.metric}: significant (Holm p={p_adj:.2g}) but below the effect floor "
                f"(D={t.d:.3f} vs {policy.min_ks_d}, median {shift_text} vs {policy.min_median_shift:.0%})"
            )
        else:
            reason = f"{t.metric}: no significant difference (D={t.d:.3f}, Holm p={p_adj:.2g} > {alpha:.2g})"
        checks.append(
            Check(
                name=f"{'ks' if kind == 'ks' else 'series'}-{t.metric}",
                kind=kind,  # type: ignore[arg-type]
                metric=t.metric,
                outcome="fail" if fail else "pass",
                value=t.d,
                limit=policy.min_ks_d,
                reason=reason,
                details={
                    **t.details,
                    "pvalue": t.pvalue,
                    "pvalue_holm": p_adj,
                    "alpha_per_analysis": alpha,
                    "significant": significant,
                    "median_shift": t.shift,
                    "min_median_shift": policy.min_median_shift,
                    "effect_floor_met": effect,
                },
            )
        )
    return checks, extra_adjusted


def _ks_bucket_checks(
    m: Measurement, policy: GatePolicy, extra: Sequence[float] = ()
) -> tuple[list[Check], list[Distribution], list[float]]:
    checks: list[Check] = []
    tested: list[_Tested] = []
    distributions: list[Distribution] = []
    for metric in policy.metrics:
        pair = m.histograms.get(metric, {})
        stable, canary = pair.get("stable"), pair.get("canary")
        ks: KsResult | None = None
        ns, nc = (stable.n if stable else 0), (canary.n if canary else 0)
        two_sided = policy.two_sided or metric in TWO_SIDED_METRICS
        comparable = _comparable(stable, canary)
        if comparable and min(ns, nc) >= policy.min_samples:
            ks = ks_binned(stable, canary, two_sided)  # type: ignore[arg-type]
        union = sorted(set(stable.bounds if stable else ()) | set(canary.bounds if canary else ()))
        distributions.append(
            Distribution(
                metric=metric,
                prometheus_name=HISTOGRAMS[metric],
                le=[format_le(b) for b in union],
                stable=_cumulative_on(stable, union),
                canary=_cumulative_on(canary, union),
                ks_location=format_le(ks.location) if ks else None,
            )
        )
        if stable is not None and canary is not None and not comparable:
            # Only +Inf (or no shared finite bound): D would be 0 by construction — no test, not a pass.
            checks.append(
                Check(
                    name=f"ks-{metric}",
                    kind="ks",
                    metric=metric,
                    outcome="inconclusive",
                    reason=f"{metric}: no finite bucket bound shared by both tracks (stable "
                    f"{_finite_count(stable)}, canary {_finite_count(canary)} finite bound(s)): "
                    "no distribution to test",
                    details={"n_stable": ns, "n_canary": nc},
                )
            )
            continue
        if ks is None or stable is None or canary is None:
            checks.append(
                Check(
                    name=f"ks-{metric}",
                    kind="ks",
                    metric=metric,
                    outcome="skipped",
                    reason=f"{metric}: too few observations to test (stable {ns}, canary {nc}, "
                    f"min_samples {policy.min_samples})",
                    details={"n_stable": ns, "n_canary": nc},
                )
            )
            continue
        med_s, med_c = stable.quantile(0.5), canary.quantile(0.5)
        tested.append(
            _Tested(
                metric=metric,
                pvalue=ks.pvalue,
                d=ks.d,
                shift=relative_shift(med_s, med_c),
                two_sided=two_sided,
                details={
                    "alternative": ks.alternative,
                    "n_stable": ks.n_stable,
                    "n_canary": ks.n_canary,
                    "d_two_sided": ks.d_two_sided,
                    "d_canary_slower": ks.d_canary_slower,
                    "d_canary_faster": ks.d_canary_faster,
                    "location_le": format_le(ks.location),
                    "median_stable": med_s,
                    "median_canary": med_c,
                    "p99_stable_from_buckets": stable.quantile(0.99),
                    "p99_canary_from_buckets": canary.quantile(0.99),
                    "counts_repaired": stable.repaired or canary.repaired,
                },
            )
        )
    judged, extra_adjusted = _judge(tested, policy, "ks", extra)
    return _in_order(checks + judged, policy), distributions, extra_adjusted


def _comparable(stable: Histogram | None, canary: Histogram | None) -> bool:
    """Both tracks have a histogram, ending in +Inf, with at least one finite bound in common."""
    if stable is None or canary is None or not stable.bounds or not canary.bounds:
        return False
    if not (math.isinf(stable.bounds[-1]) and math.isinf(canary.bounds[-1])):
        return False
    return any(math.isfinite(b) for b in set(stable.bounds) & set(canary.bounds))


def _finite_count(h: Histogram) -> int:
    return sum(1 for b in h.bounds if math.isfinite(b))


def _in_order(checks: list[Check], policy: GatePolicy) -> list[Check]:
    rank = {m: i for i, m in enumerate(policy.metrics)}
    return sorted(checks, key=lambda c: rank.get(c.metric or "", len(rank)))


def _cumulative_on(h: Histogram | None, bounds: Sequence[float]) -> list[int] | None:
    """``h``'s cumulative counts at ``bounds`` (carried forward where ``h`` lacks a bound)."""
    if h is None:
        return None
    lookup = dict(zip(h.bounds, h.cumulative, strict=True))
    out, last = [], 0
    for b in bounds:
        last = lookup.get(b, last)
        out.append(last)
    return out


def _series_checks(
    m: Measurement, policy: GatePolicy, extra: Sequence[float] = ()
) -> tuple[list[Check], list[Series], list[float]]:
    from scipy.stats import ks_2samp

    checks: list[Check] = []
    tested: list[_Tested] = []
    out: list[Series] = []
    for metric in policy.metrics:
        pair = m.series.get(metric, {})
        stable = [v for v in pair.get("stable", ()) if math.isfinite(v)]
        canary = [v for v in pair.get("canary", ()) if math.isfinite(v)]
        out.append(Series(metric=metric, quantile=policy.series_quantile, stable=stable, canary=canary))
        if min(len(stable), len(canary)) < policy.min_series_points:
            checks.append(
                Check(
                    name=f"series-{metric}",
                    kind="quantile-series",
                    metric=metric,
                    outcome="skipped",
                    reason=f"{metric}: too few points (stable {len(stable)}, canary {len(canary)}, "
                    f"min {policy.min_series_points})",
                    details={"points_stable": len(stable), "points_canary": len(canary)},
                )
            )
            continue
        two_sided = policy.two_sided or metric in TWO_SIDED_METRICS
        # data1 = canary: "less" means the canary's CDF lies below the stable's (canary slower).
        res = ks_2samp(canary, stable, alternative="two-sided" if two_sided else "less")
        med_s = sorted(stable)[len(stable) // 2]
        med_c = sorted(canary)[len(canary) // 2]
        tested.append(
            _Tested(
                metric=metric,
                pvalue=float(res.pvalue),
                d=float(res.statistic),
                shift=relative_shift(med_s, med_c),
                two_sided=two_sided,
                details={
                    "alternative": "two-sided" if two_sided else "canary-slower",
                    "points_stable": len(stable),
                    "points_canary": len(canary),
                    "median_stable": med_s,
                    "median_canary": med_c,
                    "quantile": policy.series_quantile,
                    "step_s": policy.series_step_s,
                },
            )
        )
    judged, extra_adjusted = _judge(tested, policy, "quantile-series", extra)
    return _in_order(checks + judged, policy), out, extra_adjusted


# ---------------------------------------------------------------- answer rates


def proportion_pvalue(canary: RateCounts, stable: RateCounts) -> float:
    """One-sided p-value of "the canary's event rate is higher than the stable's": Fisher's exact
    test on the 2×2 table (events / non-events × canary / stable), ``alternative="greater"``.
    Exact at any count (rates of rare events such as refusals sit far from the normal
    approximation); 1.0 when either track has no answers."""
    from scipy.stats import fisher_exact

    if canary.total == 0 or stable.total == 0:
        return 1.0
    table = [
        [canary.events, canary.total - canary.events],
        [stable.events, stable.total - stable.events],
    ]
    return float(min(1.0, max(0.0, fisher_exact(table, alternative="greater").pvalue)))


@dataclass(frozen=True)
class RateInput:
    """One rate of one analysis before the Holm correction: the counts, and the raw p-value
    (None when a track has fewer than ``min_samples`` answers: not testable)."""

    rate: str
    canary: RateCounts | None
    stable: RateCounts | None
    min_samples: int
    pvalue: float | None


def _rate_input(m: Measurement, policy: GatePolicy, rate: str) -> RateInput:
    pair = m.rates.get(rate, {})
    canary, stable = pair.get("canary"), pair.get("stable")
    enough = (
        canary is not None and stable is not None and min(canary.total, stable.total) >= policy.min_samples
    )
    pvalue = proportion_pvalue(canary, stable) if enough else None  # type: ignore[arg-type]
    return RateInput(rate, canary, stable, policy.min_samples, pvalue)


def _max_rate(policy: GatePolicy, rate: str) -> float | None:
    return {"refusal": policy.max_refusal_rate, "bad_answer": policy.max_bad_answer_rate}.get(rate)


def rate_check(r: RateInput, pvalue_holm: float | None, policy: GatePolicy) -> Check:
    """Judge one answer rate: inconclusive without ``min_samples`` answers on both tracks (no
    data never passes); fail above the absolute ``max_<rate>_rate`` (when set), or when the
    rise is significant (Holm-adjusted ``pvalue_holm`` ≤ alpha per analysis) *and* at least
    ``min_rate_increase``; pass otherwise."""
    name = f"rate-{r.rate}"
    nc = r.canary.total if r.canary else 0
    ns = r.stable.total if r.stable else 0
    limit = _max_rate(policy, r.rate)
    details: dict[str, float | int | str | bool | None] = {
        "canary_events": r.canary.events if r.canary else None,
        "canary_answers": nc,
        "stable_events": r.stable.events if r.stable else None,
        "stable_answers": ns,
        "stable_rate": r.stable.rate if r.stable else None,
        "max_rate": limit,
        "min_rate_increase": policy.min_rate_increase,
    }
    if r.pvalue is None or pvalue_holm is None or r.canary is None or r.stable is None:
        return Check(
            name=name,
            kind="proportion",
            metric=r.rate,
            outcome="inconclusive",
            limit=limit,
            reason=f"{r.rate} rate: too few answers to judge (stable {ns}, canary {nc}, "
            f"min_samples {r.min_samples})",
            details=details,
        )
    rc, rs = r.canary.events / nc, r.stable.events / ns
    increase = rc - rs
    alpha = policy.alpha_per_analysis
    significant = pvalue_holm <= alpha
    effect = increase >= policy.min_rate_increase
    above = limit is not None and rc > limit
    details.update(
        {
            "increase": increase,
            "pvalue": r.pvalue,
            "pvalue_holm": pvalue_holm,
            "alpha_per_analysis": alpha,
            "significant": significant,
            "effect_floor_met": effect,
        }
    )
    text = (
        f"{r.rate} rate canary {rc:.2%} ({r.canary.events}/{nc}) vs stable {rs:.2%} ({r.stable.events}/{ns})"
    )
    if above:
        outcome, reason = "fail", f"{text}: above the limit {limit:.2%}"
    elif significant and effect:
        outcome, reason = "fail", f"{text}: higher (Fisher p={pvalue_holm:.2g} Holm ≤ {alpha:.2g})"
    elif significant:
        outcome = "pass"
        floor = policy.min_rate_increase
        reason = f"{text}: significant but below the effect floor (+{increase:.2%} < {floor:.2%})"
    else:
        outcome, reason = (
            "pass",
            f"{text}: no significant rise (Fisher p={pvalue_holm:.2g} Holm > {alpha:.2g})",
        )
    return Check(
        name=name,
        kind="proportion",
        metric=r.rate,
        outcome=outcome,  # type: ignore[arg-type]
        value=rc,
        limit=limit,
        reason=reason,
        details=details,
    )


def evaluate(request: GateRequest, measurement: Measurement, evaluated_at: datetime) -> Verdict:
    """Judge one measurement: pass, fail or inconclusive, with every number behind it."""
    policy = request.policy
    checks: list[Check] = []
    distributions: list[Distribution] = []
    series: list[Series] = []

    def verdict(outcome: Outcome, reason: str) -> Verdict:
        return Verdict(
            outcome=outcome,
            reason=reason,
            evaluated_at=evaluated_at,
            window_s=request.window_s,
            prometheus_url=request.prometheus_url,
            selector={
                "model": request.model,
                "endpoint": request.endpoint,
                "matchers": ",".join(request.matchers) or None,
                "stable_track": request.stable_track,
                "canary_track": request.canary_track,
            },
            policy=policy,
            alpha_per_analysis=policy.alpha_per_analysis,
            checks=checks,
            queries=list(measurement.queries),
            distributions=distributions,
            series=series,
            errors=list(measurement.errors),
        )

    if measurement.errors:
        checks.append(
            Check(
                name="prometheus",
                kind="precondition",
                outcome="inconclusive",
                reason="; ".join(measurement.errors),
            )
        )
        return verdict("inconclusive", f"no measurement: {measurement.errors[0]}")

    primary = policy.metrics[0]
    pair = measurement.histograms.get(primary, {})
    ns = pair["stable"].n if pair.get("stable") else 0
    nc = pair["canary"].n if pair.get("canary") else 0
    enough = min(ns, nc) >= policy.min_samples
    checks.append(
        Check(
            name="min-samples",
            kind="precondition",
            metric=primary,
            outcome="pass" if enough else "inconclusive",
            value=float(min(ns, nc)),
            limit=float(policy.min_samples),
            reason=f"{primary} observations in the window: stable {ns}, canary {nc} "
            f"({'≥' if enough else '<'} min_samples {policy.min_samples})",
            details={"n_stable": ns, "n_canary": nc},
        )
    )
    if not enough:
        if policy.method == "buckets":
            _, distributions, _ = _ks_bucket_checks(measurement, policy)
        which = " and ".join(t for t, n in (("stable", ns), ("canary", nc)) if n < policy.min_samples)
        return verdict(
            "inconclusive",
            f"too few requests on {which} (stable {ns}, canary {nc}; min_samples {policy.min_samples})",
        )

    checks.extend(_threshold_checks(measurement, policy))
    rate_inputs = [_rate_input(measurement, policy, rate) for rate in policy.rates]
    testable = [r.pvalue for r in rate_inputs if r.pvalue is not None]
    if policy.method == "buckets":
        ks_checks, distributions, rate_adjusted = _ks_bucket_checks(measurement, policy, testable)
    else:
        ks_checks, series, rate_adjusted = _series_checks(measurement, policy, testable)
    checks.extend(ks_checks)
    adjusted = iter(rate_adjusted)
    checks.extend(
        rate_check(r, next(adjusted) if r.pvalue is not None else None, policy) for r in rate_inputs
    )
    if policy.method == "quantile-series" and not any(c.outcome != "skipped" for c in ks_checks):
        checks.append(
            Check(
                name="series-points",
                kind="precondition",
                outcome="inconclusive",
                reason="no metric has enough quantile-series points on both tracks",
            )
        )
    outcome = _combine([c.outcome for c in checks])
    relevant = [c for c in checks if c.outcome == outcome] if outcome != "pass" else []
    if outcome == "pass":
        tested = sum(1 for c in ks_checks if c.outcome == "pass")
        reason = f"thresholds met; no significant regression in {tested} tested metric(s)"
    else:
        reason = "; ".join(c.reason for c in relevant)
    return verdict(outcome, reason)
