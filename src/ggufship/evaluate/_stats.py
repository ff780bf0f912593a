"""The pure decision core: a :class:`Measurement` and a policy in, a :class:`Verdict` out.

No I/O, no llama.cpp: table-tested on hand-made measurements. Every component says pass,
fail, inconclusive or skipped with the numbers behind it; the verdict is fail when any
component fails, else inconclusive when any is inconclusive or nothing was measured, else pass.

* ``nll`` — paired per-example NLL of the reference answers, candidate vs stable: relative
  Δ-PPL (token-weighted), a one-sided Wilcoxon signed-rank test on the per-example deltas and a
  two-sample KS test on the two NLL distributions. Fail: significant and above its effect floor.
  An effect above the floor that is not significant is inconclusive (too few examples to tell).
* ``checks`` — pass rates of the golden checks on greedy answers, paired; exact McNemar test
  (one-sided binomial on the discordant pairs) plus the ``max_check_drop`` floor.
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
    p_w = wilcoxon_greater(deltas)
    ks_d, p_ks = ks_two_sample(cand, stab)
    values.update(
        {
            "nll_candidate": nll_c,
            "nll_stable": nll_s,
            "ppl_candidate": ppl_c,
            "ppl_stable": ppl_s,
            "delta_ppl": delta_ppl,
            "median_delta_nll": float(np.median(deltas)),
            "mean_delta_nll": float(np.mean(deltas)),
            "wilcoxon_p": p_w,
            "ks_d": ks_d,
            "ks_p": p_ks,
        }
    )
    worse_median = float(np.median(cand)) > float(np.median(stab))
    shift = ks_d >= policy.min_ks_d and worse_median
    if delta_ppl >= policy.max_ppl_increase and p_w < policy.alpha:
        reason = (
            f"Δ-PPL {delta_ppl:+.1%} ≥ {policy.max_ppl_increase:.1%} "
            f"with Wilcoxon p {p_w:.2g} < {policy.alpha}"
        )
        return Component(name="nll", outcome="fail", reason=reason, values=values)
    if shift and p_ks < policy.alpha:
        reason = f"NLL distribution shifted up: KS D {ks_d:.3f} ≥ {policy.min_ks_d} with p {p_ks:.2g}"
        return Component(name="nll", outcome="fail", reason=reason, values=values)
    if skipped_fraction > policy.max_skipped_fraction:
        reason = (
            f"{len(skipped)} of {with_reference} examples did not fit n_ctx {policy.n_ctx} "
            f"({skipped_fraction:.0%} > {policy.max_skipped_fraction:.0%})"
        )
        return Component(name="nll", outcome="inconclusive", reason=reason, values=values)
    if delta_ppl >= policy.max_ppl_increase or shift:
        reason = (
            f"Δ-PPL {delta_ppl:+.1%}, KS D {ks_d:.3f}: worse beyond a floor but not significant "
            f"(Wilcoxon p {p_w:.2g}, KS p {p_ks:.2g}, alpha {policy.alpha})"
        )
        return Component(name="nll", outcome="inconclusive", reason=reason, values=values)
    reason = f"Δ-PPL {delta_ppl:+.1%} < {policy.max_ppl_increase:.1%}, KS D {ks_d:.3f}"
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
    p = mcnemar_greater(worse, better)
    increase = bad_c - bad_s
    values.update(
        {"bad_rate_candidate": bad_c, "bad_rate_stable": bad_s, "increase": increase, "mcnemar_p": p}
    )
    desc = f"{what}: {bad_c:.0%} bad on the candidate vs {bad_s:.0%} on the stable"
    if increase >= policy.max_check_drop and p < policy.alpha:
        return Component(name=name, outcome="fail", reason=f"{desc} (McNemar p {p:.2g})", values=values)
    if increase >= policy.max_check_drop:
        return Component(
            name=name, outcome="inconclusive", reason=f"{desc}, not significant (p {p:.2g})", values=values
        )
    return Component(name=name, outcome="pass", reason=desc, values=values)


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
