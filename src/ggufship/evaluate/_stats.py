"""The pure decision core: a :class:`Measurement` and a policy in, a :class:`Verdict` out.

No I/O, no llama.cpp: table-tested on hand-made measurements. Every component says pass,
fail, inconclusive or skipped with the numbers behind it; the verdict is fail when any
component fails, else inconclusive when any is inconclusive or nothing was measured, else pass.

Each quality component is a non-inferiority decision: a one-sided ``1 - alpha`` confidence
interval of "how much worse is the candidate" is compared with an effect-size floor.
Fail: the whole interval lies beyond the floor (the evidence says worse by more than the
floor). Pass: the whole interval lies within it (the evidence says not worse by more than the
floor). Inconclusive: the interval straddles the floor (too few examples to tell). Two
fine-tunes that differ by noise therefore pass; a damage beyond the floor fails.

* ``nll`` — paired per-example NLL of the reference answers, candidate vs stable. The effect
  is the token-weighted Δ-NLL (nats per token; ``exp(Δ) - 1`` is the relative Δ-PPL), its
  bounds from a paired bootstrap over the examples (fixed seed: the same inputs give the same
  verdict), the floor ``ln(1 + max_ppl_increase)``. A two-sample KS test of the per-example
  NLLs adds a fail for a change of shape that the mean hides (a few examples much worse):
  significant, D ≥ ``min_ks_d`` and the candidate's median or 90th percentile worse by more
  than the floor. The one-sided Wilcoxon p-value is reported, not decided on.
* ``checks`` — golden-check failures on greedy answers, paired per check: the increase of
  the failure rate with a one-sided paired two-proportion (Wald) bound against
  ``max_check_drop``.
* ``degenerate`` — rate of empty, truncated or looping answers, paired, the same rule.
* ``drift`` — every quantization against the F16 reference: mean KL and top-1 agreement limits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ggufship.evaluate._model import (
    Component,
    EvaluatePolicy,
    Measurement,
    Outcome,
    Verdict,
)


def wilcoxon_greater(deltas: Sequence[float]) -> float:
    """p-value of a one-sided Wilcoxon signed-rank test (H1: deltas > 0); zeros are dropped,
    all-zero deltas give 1.0."""
    from scipy import stats

    d = np.asarray(deltas, dtype=float)
    d = d[np.abs(d) > 1e-9]
    if d.size == 0:
        return 1.0
    return float(stats.wilcoxon(d, alternative="greater").pvalue)


def ks_two_sample(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, p) of a two-sided two-sample KS test."""
    from scipy import stats

    res = stats.ks_2samp(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    return float(res.statistic), float(res.pvalue)


def mcnemar_greater(worse: int, better: int) -> float:
    """Exact one-sided McNemar p-value: of the discordant pairs, ``worse`` went the candidate's
    bad way; H1: more than half do."""
    from scipy import stats

    n = worse + better
    if n == 0:
        return 1.0
    return float(stats.binomtest(worse, n, 0.5, alternative="greater").pvalue)


#: Bootstrap resamples of the paired Δ-NLL bound, and the generator's fixed seed (a verdict is
#: a pure function of the measurement).
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20261206


def bootstrap_bounds(
    nll_candidate: Sequence[float], nll_stable: Sequence[float], tokens: Sequence[int], alpha: float
) -> tuple[float, float]:
    """One-sided ``1 - alpha`` bounds (lower, upper) of the token-weighted paired Δ-NLL
    ``(Σ cand - Σ stable) / Σ tokens`` (sums per example), resampling the examples."""
    c = np.asarray(nll_candidate, dtype=float)
    s = np.asarray(nll_stable, dtype=float)
    t = np.asarray(tokens, dtype=float)
    d = c - s
    if not d.size:
        raise ValueError("no examples to bootstrap")
    if np.all(d == d[0]) and np.all(t == t[0]):
        value = float(d[0] / t[0])
        return value, value
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, d.size, size=(BOOTSTRAP_RESAMPLES, d.size))
    stats = d[idx].sum(axis=1) / t[idx].sum(axis=1)
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def paired_increase_bounds(worse: int, better: int, n: int, alpha: float) -> tuple[float, float, float]:
    """(increase, lower, upper): the paired difference of two proportions (candidate bad rate
    minus stable bad rate) from the discordant counts of ``n`` paired items, with one-sided
    ``1 - alpha`` Wald bounds (variance of the paired difference, as in McNemar's setting).
    No discordant pair: both bounds are the estimate, 0."""
    from scipy import stats

    if n <= 0:
        raise ValueError("no paired items")
    increase = (worse - better) / n
    var = max(0.0, (worse + better) / n**2 - (worse - better) ** 2 / n**3)
    z = float(stats.norm.ppf(1.0 - alpha))
    half = z * math.sqrt(var)
    return increase, increase - half, increase + half


def _nll(m: Measurement, policy: EvaluatePolicy) -> Component:
    stable = {s.id: s for s in m.stable.scores}
    pairs = [(c, stable[c.id]) for c in m.candidate.scores if c.id in stable]
    skipped = sorted(set(m.candidate.skipped) | set(m.stable.skipped))
    with_reference = len(pairs) + len(skipped)
    values: dict[str, float | int | str | None] = {"examples": len(pairs), "skipped_too_long": len(skipped)}
    if with_reference == 0:
        return Component(
            name="nll", outcome="skipped", reason="no example has a reference answer", values=values
        )
    skipped_fraction = len(skipped) / with_reference
    values["skipped_fraction"] = skipped_fraction
    if len(pairs) < policy.min_examples:
        return Component(
            name="nll",
            outcome="inconclusive",
            reason=f"{len(pairs)} scored example(s), fewer than min_examples {policy.min_examples}",
            values=values,
        )
    cand = np.array([c.nll_mean for c, _ in pairs])
    stab = np.array([s.nll_mean for _, s in pairs])
    deltas = cand - stab
    tok_c = sum(c.tokens for c, _ in pairs)
    tok_s = sum(s.tokens for _, s in pairs)
    nll_c = sum(c.nll_sum for c, _ in pairs) / tok_c
    nll_s = sum(s.nll_sum for _, s in pairs) / tok_s
    ppl_c, ppl_s = math.exp(nll_c), math.exp(nll_s)
    delta_ppl = ppl_c / ppl_s - 1.0
    # Identity checks guarantee the same tokenizer; tokens per example are the same on both sides.
    low, high = bootstrap_bounds(
        [c.nll_sum for c, _ in pairs],
        [s.nll_sum * c.tokens / s.tokens for c, s in pairs],
        [c.tokens for c, _ in pairs],
        policy.alpha,
    )
    floor = math.log1p(policy.max_ppl_increase)
    p_w = wilcoxon_greater(deltas)
    ks_d, p_ks = ks_two_sample(cand, stab)
    median_shift = float(np.median(cand) - np.median(stab))
    q90_shift = float(np.quantile(cand, 0.9) - np.quantile(stab, 0.9))
    values.update(
        {
            "nll_candidate": nll_c,
            "nll_stable": nll_s,
            "ppl_candidate": ppl_c,
            "ppl_stable": ppl_s,
            "delta_ppl": delta_ppl,
            "delta_nll": nll_c - nll_s,
            "delta_nll_lower": low,
            "delta_nll_upper": high,
            "delta_ppl_lower": math.expm1(low),
            "delta_ppl_upper": math.expm1(high),
            "floor_nll": floor,
            "median_delta_nll": float(np.median(deltas)),
            "mean_delta_nll": float(np.mean(deltas)),
            "wilcoxon_p": p_w,
            "ks_d": ks_d,
            "ks_p": p_ks,
            "median_shift_nll": median_shift,
            "q90_shift_nll": q90_shift,
        }
    )
    interval = (
        f"Δ-PPL {delta_ppl:+.1%} (one-sided {1 - policy.alpha:.0%} bounds "
        f"{math.expm1(low):+.1%} … {math.expm1(high):+.1%})"
    )
    if low > floor:
        reason = f"{interval}: worse by more than the floor {policy.max_ppl_increase:.1%}"
        return Component(name="nll", outcome="fail", reason=reason, values=values)
    shift = max(median_shift, q90_shift)
    ks_beyond = ks_d >= policy.min_ks_d and shift > floor
    if ks_beyond and p_ks < policy.alpha:
        reason = (
            f"NLL distribution shifted up: KS D {ks_d:.3f} ≥ {policy.min_ks_d} with p {p_ks:.2g}, "
            f"median/p90 worse by {shift:.3f} nats > floor {floor:.3f}"
        )
        return Component(name="nll", outcome="fail", reason=reason, values=values)
    if skipped_fraction > policy.max_skipped_fraction:
        reason = (
            f"{len(skipped)} of {with_reference} examples did not fit n_ctx {policy.n_ctx} "
            f"({skipped_fraction:.0%} > {policy.max_skipped_fraction:.0%})"
        )
        return Component(name="nll", outcome="inconclusive", reason=reason, values=values)
    if high > floor:
        reason = f"{interval}: straddles the floor {policy.max_ppl_increase:.1%} (too few examples to tell)"
        return Component(name="nll", outcome="inconclusive", reason=reason, values=values)
    if ks_beyond:
        reason = (
            f"{interval} within the floor, but KS D {ks_d:.3f} with a shift of {shift:.3f} nats "
            f"is not significant (p {p_ks:.2g}, alpha {policy.alpha})"
        )
        return Component(name="nll", outcome="inconclusive", reason=reason, values=values)
    reason = f"{interval}: within the floor {policy.max_ppl_increase:.1%}, KS D {ks_d:.3f}"
    return Component(name="nll", outcome="pass", reason=reason, values=values)


def _paired_rate(
    name: str,
    what: str,
    pairs: list[tuple[bool, bool]],
    policy: EvaluatePolicy,
    extra: dict[str, float | int | str | None],
) -> Component:
    """``pairs`` are (candidate_bad, stable_bad) per item."""
    values: dict[str, float | int | str | None] = {"items": len(pairs), **extra}
    if not pairs:
        return Component(name=name, outcome="skipped", reason=f"no {what} to compare", values=values)
    bad_c = sum(c for c, _ in pairs) / len(pairs)
    bad_s = sum(s for _, s in pairs) / len(pairs)
    worse = sum(1 for c, s in pairs if c and not s)
    better = sum(1 for c, s in pairs if s and not c)
    increase, low, high = paired_increase_bounds(worse, better, len(pairs), policy.alpha)
    p = mcnemar_greater(worse, better)
    values.update(
        {
            "bad_rate_candidate": bad_c,
            "bad_rate_stable": bad_s,
            "increase": increase,
            "increase_lower": low,
            "increase_upper": high,
            "worse": worse,
            "better": better,
            "mcnemar_p": p,
        }
    )
    floor = policy.max_check_drop
    desc = (
        f"{what}: {bad_c:.0%} bad on the candidate vs {bad_s:.0%} on the stable "
        f"(increase {increase:+.1%}, one-sided {1 - policy.alpha:.0%} bounds {low:+.1%} … {high:+.1%})"
    )
    if low > floor:
        return Component(
            name=name, outcome="fail", reason=f"{desc}: beyond the floor {floor:.0%}", values=values
        )
    if high > floor:
        return Component(
            name=name,
            outcome="inconclusive",
            reason=f"{desc}: straddles the floor {floor:.0%}",
            values=values,
        )
    return Component(name=name, outcome="pass", reason=f"{desc}: within the floor {floor:.0%}", values=values)


def _checks(m: Measurement, policy: EvaluatePolicy) -> Component:
    stable = {a.id: dict(a.checks) for a in m.stable.answers}
    pairs: list[tuple[bool, bool]] = []
    for a in m.candidate.answers:
        if a.id not in stable:
            continue
        for label, ok in a.checks:
            if label in stable[a.id]:
                pairs.append((not ok, not stable[a.id][label]))
    must_answer = {
        a.id for a in m.candidate.answers if any(lbl.endswith(":must_answer") for lbl, _ in a.checks)
    }
    extra: dict[str, float | int | str | None] = {}
    for track, answers in (("candidate", m.candidate.answers), ("stable", m.stable.answers)):
        asked = [a for a in answers if a.id in must_answer]
        extra[f"refusal_rate_must_answer_{track}"] = (
            sum(a.refused for a in asked) / len(asked) if asked else None
        )
        checks = [ok for a in answers for _, ok in a.checks]
        extra[f"pass_rate_{track}"] = sum(checks) / len(checks) if checks else None
    return _paired_rate("checks", "golden checks", pairs, policy, extra)


def _degenerate(m: Measurement, policy: EvaluatePolicy) -> Component:
    stable = {a.id: a for a in m.stable.answers}
    pairs = [(a.degenerate, stable[a.id].degenerate) for a in m.candidate.answers if a.id in stable]
    extra: dict[str, float | int | str | None] = {}
    for track, answers in (("candidate", m.candidate.answers), ("stable", m.stable.answers)):
        for kind in ("empty", "truncated", "looping"):
            extra[f"{kind}_{track}"] = sum(getattr(a, kind) for a in answers)
    return _paired_rate("degenerate", "empty/truncated/looping answers", pairs, policy, extra)


def _drift(m: Measurement, policy: EvaluatePolicy) -> Component:
    if not m.drift:
        reason = m.drift_note or "no quantized GGUF besides the reference"
        return Component(name="drift", outcome="skipped", reason=reason)
    values: dict[str, float | int | str | None] = {}
    bad: list[str] = []
    empty: list[str] = []
    for d in m.drift:
        values[f"{d.quantization}.mean_kl"] = d.mean_kl
        values[f"{d.quantization}.top1_agreement"] = d.top1_agreement
        values[f"{d.quantization}.positions"] = d.positions
        if d.positions == 0:
            empty.append(d.quantization)
        elif d.mean_kl > policy.max_mean_kl or d.top1_agreement < policy.min_top1_agreement:
            bad.append(
                f"{d.quantization} (mean KL {d.mean_kl:.4f}, top-1 agreement {d.top1_agreement:.1%} vs "
                f"{d.reference})"
            )
    if bad:
        reason = (
            f"quantization drift beyond mean KL {policy.max_mean_kl} / top-1 "
            f"{policy.min_top1_agreement:.0%}: " + "; ".join(bad)
        )
        return Component(name="drift", outcome="fail", reason=reason, values=values)
    if empty:
        return Component(
            name="drift",
            outcome="inconclusive",
            reason="no positions measured for " + ", ".join(empty),
            values=values,
        )
    worst = max(m.drift, key=lambda d: d.mean_kl)
    reason = f"every quantization within limits (worst: {worst.quantization}, mean KL {worst.mean_kl:.4f})"
    return Component(name="drift", outcome="pass", reason=reason, values=values)


def decide(measurement: Measurement, policy: EvaluatePolicy) -> Verdict:
    """Judge a measurement. Pure: same inputs, same verdict."""
    components = (
        _nll(measurement, policy),
        _checks(measurement, policy),
        _degenerate(measurement, policy),
        _drift(measurement, policy),
    )
    failed = [c for c in components if c.outcome == "fail"]
    unsure = [c for c in components if c.outcome == "inconclusive"]
    quality = [c for c in components if c.name in ("nll", "checks") and c.outcome != "skipped"]
    outcome: Outcome
    if failed:
        outcome, reason = "fail", "; ".join(f"{c.name}: {c.reason}" for c in failed)
    elif unsure:
        outcome, reason = "inconclusive", "; ".join(f"{c.name}: {c.reason}" for c in unsure)
    elif not quality:
        outcome, reason = "inconclusive", "nothing measured: no reference answers and no checks"
    else:
        outcome, reason = (
            "pass",
            "; ".join(f"{c.name}: {c.reason}" for c in components if c.outcome == "pass"),
        )
    return Verdict(outcome=outcome, reason=reason, components=components, policy=policy)
