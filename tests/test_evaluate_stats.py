"""The pure decision core of ``evaluate`` (no llama.cpp): hand-made measurements → verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from ggufship.evaluate import (
    Answer,
    EvaluatePolicy,
    ExampleScore,
    Measurement,
    QuantDrift,
    TrackMeasurement,
    decide,
    is_looping,
    is_refusal,
)

POLICY = EvaluatePolicy()


def _scores(nll_means: list[float], tokens: int = 10) -> tuple[ExampleScore, ...]:
    return tuple(ExampleScore(id=f"e{i}", tokens=tokens, nll_sum=v * tokens) for i, v in enumerate(nll_means))


def _track(nll: list[float] | None = None, answers=(), skipped=()) -> TrackMeasurement:
    return TrackMeasurement(
        name="tiny",
        version="1",
        gguf="tiny-1-F16.gguf",
        scores=_scores(nll or []),
        answers=tuple(answers),
        skipped=tuple(skipped),
    )


def _m(cand: TrackMeasurement, stable: TrackMeasurement, drift=(), note=None) -> Measurement:
    return Measurement(candidate=cand, stable=stable, examples=40, drift=tuple(drift), drift_note=note)


def _base(n: int = 40, seed: int = 0) -> list[float]:
    return list(np.random.default_rng(seed).uniform(0.5, 2.0, n))


def _answer(i: int, ok: bool, degenerate: bool = False) -> Answer:
    return Answer(
        id=f"e{i}",
        text="x",
        finish_reason="length" if degenerate else "stop",
        checks=(("0:exact", ok),),
        truncated=degenerate,
    )


def _drift(q: str, kl: float, top1: float, positions: int = 500) -> QuantDrift:
    return QuantDrift(
        quantization=q, reference="F16", positions=positions, mean_kl=kl, max_kl=kl * 5, top1_agreement=top1
    )


base = _base()
rng = np.random.default_rng(1)
FLOOR = float(np.log1p(POLICY.max_ppl_increase))  # 5% Δ-PPL in nats per token: 0.0488
CASES = [
    # (id, candidate NLLs, stable NLLs, component outcome, verdict)
    ("identical", base, base, "pass", "pass"),
    ("tiny-noise", [v + rng.normal(0, 0.005) for v in base], base, "pass", "pass"),
    # an A/A twin: symmetric per-example noise (sd 0.1 nats); the upper bound stays under the floor
    (
        "aa-noise",
        [v + d for v, d in zip(base, np.random.default_rng(7).normal(0, 0.1, 40), strict=True)],
        base,
        "pass",
        "pass",
    ),
    ("better", [v - 0.3 for v in base], base, "pass", "pass"),
    ("much-worse", [v + 0.5 for v in base], base, "fail", "fail"),
    # +1% everywhere: certainly worse (every example), but the whole interval is under the floor
    ("worse-below-floor", [v + 0.01 for v in base], base, "pass", "pass"),
    # +2x the floor everywhere: the whole interval beyond the floor
    ("worse-beyond-floor", [v + 2 * FLOOR for v in base], base, "fail", "fail"),
    # the estimate at the floor with noise: the interval straddles it
    (
        "straddles-floor",
        [v + FLOOR + d for v, d in zip(base, np.random.default_rng(3).normal(0, 0.3, 40), strict=True)],
        base,
        "inconclusive",
        "inconclusive",
    ),
    ("too-few", base[:5], base[:5], "inconclusive", "inconclusive"),
]


@pytest.mark.parametrize(
    ("case", "cand", "stable", "nll_outcome", "outcome"), CASES, ids=[c[0] for c in CASES]
)
def test_nll_table(case, cand, stable, nll_outcome, outcome):
    verdict = decide(_m(_track(cand), _track(stable)), POLICY)
    c = verdict.component("nll")
    assert c.outcome == nll_outcome, c.reason
    assert verdict.outcome == outcome
    if "delta_nll" in c.values:
        eps = 1e-12
        assert c.values["delta_nll_lower"] - eps <= c.values["delta_nll"] <= c.values["delta_nll_upper"] + eps


def test_worse_but_not_significant_is_inconclusive():
    # 20 examples, half much worse, half much better: large Δ-PPL, an interval that straddles
    stable = [1.0] * 20
    cand = [2.5 if i % 2 else 0.2 for i in range(20)]
    c = decide(_m(_track(cand), _track(stable)), POLICY).component("nll")
    assert c.values["delta_ppl"] > POLICY.max_ppl_increase
    assert c.values["delta_nll_lower"] < FLOOR < c.values["delta_nll_upper"]
    assert c.outcome == "inconclusive", c.reason


def test_distribution_shift_fails_on_ks():
    # most examples much worse, the mean dragged under the floor by a few big improvements
    stable = _base(60, seed=3)
    cand = [v + 0.4 for v in stable[:50]] + [v - 3.0 for v in stable[50:]]
    c = decide(_m(_track(cand), _track(stable)), POLICY).component("nll")
    assert c.values["delta_nll_lower"] < FLOOR  # the mean alone would not fail it
    assert c.outcome == "fail", c.reason
    assert "KS" in c.reason


def test_ks_shift_below_the_floor_does_not_fail():
    # significant KS distance, but the shift (0.03 nats) is under the 5% floor (0.049)
    stable = list(np.linspace(1.0, 1.02, 60))
    cand = [v + 0.03 for v in stable]
    c = decide(_m(_track(cand), _track(stable)), POLICY).component("nll")
    assert c.values["ks_d"] >= POLICY.min_ks_d and c.values["ks_p"] < POLICY.alpha
    assert c.outcome == "pass", c.reason


def test_verdict_is_deterministic():
    cand = [v + d for v, d in zip(base, np.random.default_rng(5).normal(0.04, 0.2, 40), strict=True)]
    one = decide(_m(_track(cand), _track(base)), POLICY)
    assert decide(_m(_track(cand), _track(base)), POLICY) == one


def test_delta_ppl_is_token_weighted_and_exact():
    stable = _track([1.0] * 30)
    cand = _track([1.0 + np.log(1.5)] * 30)
    c = decide(_m(cand, stable), POLICY).component("nll")
    assert c.values["delta_ppl"] == pytest.approx(0.5)
    assert c.values["delta_ppl_lower"] == pytest.approx(0.5)  # constant deltas: a point interval
    assert c.outcome == "fail"


def test_too_many_skipped_is_inconclusive_and_counted():
    skipped = [f"long{i}" for i in range(10)]
    verdict = decide(_m(_track(base, skipped=skipped), _track(base, skipped=skipped)), POLICY)
    c = verdict.component("nll")
    assert c.values["skipped_too_long"] == 10
    assert c.outcome == "inconclusive"
    assert verdict.outcome == "inconclusive"


def test_nothing_measured_never_passes():
    verdict = decide(_m(_track(), _track()), POLICY)
    assert verdict.outcome == "inconclusive"
    assert "nothing measured" in verdict.reason


def test_checks_drop_fails_with_mcnemar():
    stable = [_answer(i, True) for i in range(30)]
    cand = [_answer(i, i % 3 == 0) for i in range(30)]  # 20 of 30 now fail
    verdict = decide(_m(_track(base, cand), _track(base, stable)), POLICY)
    c = verdict.component("checks")
    assert c.outcome == "fail"
    assert c.values["bad_rate_candidate"] == pytest.approx(20 / 30)
    assert verdict.outcome == "fail"


def test_checks_small_sample_drop_is_inconclusive():
    stable = [_answer(i, True) for i in range(4)]
    cand = [_answer(i, i != 0) for i in range(4)]  # one of four: 25 points, a wide interval
    c = decide(_m(_track(base, cand), _track(base, stable)), POLICY).component("checks")
    assert c.outcome == "inconclusive"
    assert c.values["increase_lower"] < POLICY.max_check_drop < c.values["increase_upper"]


CHECK_CASES = [
    # (id, worse, better, items, outcome): discordant pairs of n paired checks, floor 10 points
    ("none-discordant", 0, 0, 44, "pass"),
    ("aa-one-flip-each-way", 1, 1, 44, "pass"),
    # five discordant of 44: the 99% bound reaches past 10 points, so it cannot tell
    ("aa-five-flips", 3, 2, 44, "inconclusive"),
    ("one-worse-of-200", 1, 0, 200, "pass"),
    ("few-worse-small-n", 3, 0, 44, "inconclusive"),
    ("many-worse", 25, 0, 44, "fail"),
    ("many-worse-some-better", 30, 8, 44, "fail"),
    ("better", 0, 10, 44, "pass"),
]


@pytest.mark.parametrize(
    ("case", "worse", "better", "n", "outcome"), CHECK_CASES, ids=[c[0] for c in CHECK_CASES]
)
def test_checks_table(case, worse, better, n, outcome):
    stable, cand = [], []
    for i in range(n):
        s_ok, c_ok = True, True
        if i < worse:
            c_ok = False
        elif i < worse + better:
            s_ok = False
        stable.append(_answer(i, s_ok))
        cand.append(_answer(i, c_ok))
    c = decide(_m(_track(base, cand), _track(base, stable)), POLICY).component("checks")
    assert c.outcome == outcome, c.reason
    assert (c.values["worse"], c.values["better"]) == (worse, better)


def test_checks_equal_pass():
    answers = [_answer(i, i % 2 == 0) for i in range(30)]
    c = decide(_m(_track(base, answers), _track(base, answers)), POLICY).component("checks")
    assert c.outcome == "pass"
    assert c.values["increase"] == 0


def test_degenerate_answers_fail():
    stable = [_answer(i, True) for i in range(30)]
    cand = [_answer(i, True, degenerate=i < 25) for i in range(30)]
    c = decide(_m(_track(base, cand), _track(base, stable)), POLICY).component("degenerate")
    assert c.outcome == "fail"
    assert c.values["truncated_candidate"] == 25


DRIFT_CASES = [
    ("within", [_drift("Q8_0", 0.001, 0.99), _drift("Q4_K_M", 0.02, 0.95)], "pass"),
    ("kl-too-high", [_drift("Q8_0", 0.001, 0.99), _drift("Q2_K", 0.4, 0.95)], "fail"),
    ("top1-too-low", [_drift("Q2_K", 0.01, 0.5)], "fail"),
    ("no-positions", [_drift("Q4_K_M", 0.0, 0.0, positions=0)], "inconclusive"),
    ("none", [], "skipped"),
]


@pytest.mark.parametrize(("case", "drift", "outcome"), DRIFT_CASES, ids=[c[0] for c in DRIFT_CASES])
def test_drift_table(case, drift, outcome):
    verdict = decide(_m(_track(base), _track(base), drift=drift), POLICY)
    assert verdict.component("drift").outcome == outcome
    if outcome == "fail":
        assert verdict.outcome == "fail"
        assert "Q2_K" in verdict.reason


def test_verdict_round_trips_json():
    verdict = decide(_m(_track([v + 0.5 for v in base]), _track(base)), POLICY)
    again = type(verdict).model_validate_json(verdict.model_dump_json(by_alias=True))
    assert again == verdict


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("I cannot help with that.", True),
        ("I'm sorry, but no.", True),
        ("As an AI, I won't.", True),
        ("Paris is the capital of France.", False),
        ("", False),
    ],
)
def test_refusal_detector(text, refusal):
    assert is_refusal(text) is refusal


@pytest.mark.parametrize(
    ("text", "looping"),
    [
        ("the dog the dog the dog the dog", True),
        ("a b c a b c a b c", True),
        ("Paris is the capital of France.", False),
        ("yes yes", False),
        ("one two three four five six seven eight", False),
    ],
)
def test_looping_detector(text, looping):
    assert is_looping(text) is looping
