"""The gate's answer-rate tests (issue 16 part 2): refusal and bad-answer rates, canary vs stable,
one-sided Fisher exact test in the Holm family, effect floor, absolute limits; no data is
inconclusive. Pure functions on tables, plus the parser of the counters' raw samples and the
surprisal KS metric."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from scipy.stats import fisher_exact

from ggufship.gate import GateConfigError, Histogram, Measurement, evaluate, make_request
from ggufship.gate._errors import PrometheusAnswerError
from ggufship.gate._prometheus import _counter_total
from ggufship.gate._promql import counter_samples_query, selector
from ggufship.gate._stats import RateCounts, holm, proportion_pvalue

NOW = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)
INF = math.inf
SAME = Histogram.from_counts((0.1, 0.2, 0.4, INF), (80, 80, 40, 0))  # 200 requests


def request(**policy: object):
    policy.setdefault("metrics", ("latency",))
    return make_request(None, model="m", prometheus_url="http://127.0.0.1:9", **policy)


def measured(rates: dict[str, dict[str, RateCounts | None]], **hists: dict[str, Histogram]) -> Measurement:
    histograms = {"latency": {"stable": SAME, "canary": SAME}, **hists}
    return Measurement(histograms=histograms, canary_p99_s=0.3, canary_error_ratio=0.0, rates=rates)


def rc(events: int, total: int) -> RateCounts:
    return RateCounts(events=events, total=total)


def both(canary: RateCounts | None, stable: RateCounts | None) -> dict[str, dict[str, RateCounts | None]]:
    ok = {"canary": rc(0, 1000), "stable": rc(0, 1000)}
    return {"refusal": {"canary": canary, "stable": stable}, "bad_answer": ok}


# name, refusal (canary, stable), policy overrides, expected verdict, expected refusal check outcome
TABLE = [
    ("no refusals anywhere", rc(0, 200), rc(0, 1000), {}, "pass", "pass"),
    ("same rate", rc(10, 200), rc(50, 1000), {}, "pass", "pass"),
    ("canary refuses far more", rc(30, 200), rc(10, 1000), {}, "fail", "fail"),
    ("canary refuses less (one-sided)", rc(0, 200), rc(100, 1000), {}, "pass", "pass"),
    ("slightly more, not significant", rc(3, 200), rc(10, 1000), {}, "pass", "pass"),
    (
        "significant but below the 2-point floor",
        rc(2000, 100_000),
        rc(1000, 100_000),
        {},
        "pass",
        "pass",
    ),
    (
        "the same rise with a 0.5-point floor fails",
        rc(2000, 100_000),
        rc(1000, 100_000),
        {"min_rate_increase": 0.005},
        "fail",
        "fail",
    ),
    ("above the absolute limit", rc(12, 200), rc(60, 1000), {"max_refusal_rate": 0.05}, "fail", "fail"),
    ("at the absolute limit", rc(10, 200), rc(50, 1000), {"max_refusal_rate": 0.05}, "pass", "pass"),
    ("no canary answers series: no data", None, rc(0, 1000), {}, "inconclusive", "inconclusive"),
    ("no stable answers series: no data", rc(0, 200), None, {}, "inconclusive", "inconclusive"),
    ("zero answers: no data", rc(0, 0), rc(0, 0), {}, "inconclusive", "inconclusive"),
    ("too few canary answers", rc(10, 49), rc(0, 1000), {}, "inconclusive", "inconclusive"),
    (
        "too few, even above the limit",
        rc(40, 40),
        rc(0, 1000),
        {"max_refusal_rate": 0.05},
        "inconclusive",
        "inconclusive",
    ),
]


@pytest.mark.parametrize(
    ("name", "canary", "stable", "policy", "outcome", "check_outcome"), TABLE, ids=[r[0] for r in TABLE]
)
def test_refusal_rate_table(
    name: str,
    canary: RateCounts | None,
    stable: RateCounts | None,
    policy: dict[str, object],
    outcome: str,
    check_outcome: str,
) -> None:
    verdict = evaluate(request(**policy), measured(both(canary, stable)), NOW)
    check = next(c for c in verdict.checks if c.name == "rate-refusal")
    assert check.kind == "proportion"
    assert check.outcome == check_outcome, check.reason
    assert verdict.outcome == outcome, verdict.reason
    if check_outcome == "fail":
        assert "refusal rate" in verdict.reason
    if check_outcome == "inconclusive":
        assert "too few answers" in check.reason


def test_rates_missing_from_the_measurement_are_inconclusive() -> None:
    verdict = evaluate(request(), measured({}), NOW)
    assert verdict.outcome == "inconclusive"
    assert {c.name: c.outcome for c in verdict.checks if c.kind == "proportion"} == {
        "rate-refusal": "inconclusive",
        "rate-bad_answer": "inconclusive",
    }


def test_rates_off() -> None:
    verdict = evaluate(request(rates=()), measured({}), NOW)
    assert verdict.outcome == "pass"
    assert not [c for c in verdict.checks if c.kind == "proportion"]


def test_bad_answer_rate_fails_alone() -> None:
    rates = {
        "refusal": {"canary": rc(0, 300), "stable": rc(0, 900)},
        "bad_answer": {"canary": rc(60, 300), "stable": rc(45, 900)},  # 20 % vs 5 %
    }
    verdict = evaluate(request(), measured(rates), NOW)
    assert verdict.outcome == "fail"
    outcomes = {c.name: c.outcome for c in verdict.checks if c.kind == "proportion"}
    assert outcomes == {"rate-refusal": "pass", "rate-bad_answer": "fail"}


def test_rate_pvalues_join_the_holm_family() -> None:
    rates = {
        "refusal": {"canary": rc(8, 200), "stable": rc(20, 1000)},
        "bad_answer": {"canary": rc(30, 200), "stable": rc(100, 1000)},
    }
    verdict = evaluate(request(planned_analyses=2), measured(rates), NOW)
    ks = next(c for c in verdict.checks if c.name == "ks-latency")
    ref = next(c for c in verdict.checks if c.name == "rate-refusal")
    bad = next(c for c in verdict.checks if c.name == "rate-bad_answer")
    raw = [ks.details["pvalue"], ref.details["pvalue"], bad.details["pvalue"]]
    expected = holm(raw)  # type: ignore[arg-type]
    got = [ks.details["pvalue_holm"], ref.details["pvalue_holm"], bad.details["pvalue_holm"]]
    assert got == pytest.approx(expected)
    assert ref.details["alpha_per_analysis"] == pytest.approx(0.005)


@pytest.mark.parametrize(
    ("canary", "stable"),
    [
        ((0, 100), (0, 100)),
        ((5, 100), (1, 100)),
        ((1, 100), (5, 100)),
        ((30, 200), (10, 1000)),
        ((7, 7), (0, 9)),
    ],
)
def test_proportion_pvalue_is_fishers_one_sided(canary: tuple[int, int], stable: tuple[int, int]) -> None:
    table = [[canary[0], canary[1] - canary[0]], [stable[0], stable[1] - stable[0]]]
    expected = fisher_exact(table, alternative="greater").pvalue
    assert proportion_pvalue(rc(*canary), rc(*stable)) == pytest.approx(expected)


def test_proportion_pvalue_without_answers_is_one() -> None:
    assert proportion_pvalue(rc(0, 0), rc(3, 10)) == 1.0


@pytest.mark.parametrize(("events", "total"), [(-1, 10), (11, 10), (0, -1)])
def test_rate_counts_are_validated(events: int, total: int) -> None:
    with pytest.raises(ValueError, match="events <= total"):
        RateCounts(events=events, total=total)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rates": ("refusal", "nonsense")}, "rates"),
        ({"rates": ("refusal", "refusal")}, "rates"),
        ({"min_rate_increase": 1.5}, "min_rate_increase"),
        ({"max_refusal_rate": -0.1}, "max_refusal_rate"),
        ({"metrics": ("latency", "perplexity")}, "metrics"),
    ],
)
def test_bad_rate_options_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(GateConfigError, match=field):
        make_request(None, **overrides)


# ---------------------------------------------------------------- surprisal: a KS metric like the others


def test_surprisal_is_tested_one_sided_higher_is_worse() -> None:
    stable = Histogram.from_counts((0.5, 1.0, 2.0, 4.0, INF), (300, 500, 150, 50, 0))
    worse = Histogram.from_counts((0.5, 1.0, 2.0, 4.0, INF), (50, 100, 300, 550, 0))
    better = Histogram.from_counts((0.5, 1.0, 2.0, 4.0, INF), (900, 90, 10, 0, 0))
    rates = {"refusal": {"canary": rc(0, 1000), "stable": rc(0, 1000)}}
    for canary, outcome in ((worse, "fail"), (better, "pass"), (stable, "pass")):
        m = measured(rates, surprisal={"stable": stable, "canary": canary})
        verdict = evaluate(request(metrics=("latency", "surprisal"), rates=("refusal",)), m, NOW)
        check = next(c for c in verdict.checks if c.name == "ks-surprisal")
        assert check.outcome == outcome, check.reason
        assert check.details["alternative"] == "canary-slower"  # i.e. the canary's values are larger


def test_default_policy_gates_surprisal_and_both_rates() -> None:
    policy = make_request(None).policy
    assert "surprisal" in policy.metrics
    assert policy.rates == ("refusal", "bad_answer")


# ---------------------------------------------------------------- the counters' raw samples


def matrix(*series: list[tuple[float, str]]) -> dict[str, object]:
    return {
        "resultType": "matrix",
        "result": [
            {"metric": {"endpoint": f"/e{i}"}, "values": [[t, v] for t, v in s]} for i, s in enumerate(series)
        ],
    }


def test_counter_total_sums_reset_aware_increases() -> None:
    data = matrix([(1.0, "5"), (2.0, "9"), (3.0, "2"), (4.0, "4")], [(1.0, "0"), (2.0, "3")])
    # series 1: +4, reset to 2 (+2), +2 = 8; series 2: +3
    assert _counter_total(data, "answers (canary)") == (2, 11.0)
    assert _counter_total(matrix(), "answers (canary)") == (0, None)


@pytest.mark.parametrize(
    ("series", "match"),
    [
        ([(1.0, "NaN")], "not a finite count"),
        ([(1.0, "-3")], "not a finite count"),
        ([(2.0, "1"), (1.0, "2")], "not increasing"),
        ([(1.0, "abc")], "not a number"),
    ],
)
def test_counter_total_rejects_garbage(series: list[tuple[float, str]], match: str) -> None:
    with pytest.raises(PrometheusAnswerError, match=match):
        _counter_total(matrix(series), "refusal events (canary)")


def test_counter_query_selects_the_track() -> None:
    sel = selector("abc123", "m", track_label="rollouts_pod_template_hash", namespace="ml")
    q = counter_samples_query("ggufship_answers_total", sel, 300)
    assert q == 'ggufship_answers_total{rollouts_pod_template_hash="abc123",model="m",namespace="ml"}[300s]'


def test_gate_serve_query_parameters_for_rates() -> None:
    from ggufship.gate import request_from_query

    base = make_request(None)
    assert request_from_query(base, "rates=").policy.rates == ()
    assert request_from_query(base, "rates=refusal").policy.rates == ("refusal",)
    got = request_from_query(base, "max_refusal_rate=0.1&min_rate_increase=0.05&metrics=ttft,surprisal")
    assert got.policy.max_refusal_rate == 0.1 and got.policy.min_rate_increase == 0.05
    assert got.policy.metrics == ("ttft", "surprisal")
    with pytest.raises(GateConfigError, match="max_bad_answer_rate"):
        request_from_query(base, "max_bad_answer_rate=lots")


def test_chart_values_default_to_the_gates_policy() -> None:
    """The cluster's KS gate (args from the chart's values) and the local rollout (the gate's
    defaults) judge the same metrics and rates unless someone overrides one of them."""
    from pathlib import Path

    import yaml

    from ggufship.gate import GatePolicy

    values = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "charts" / "ggufship-api" / "values.yaml").read_text()
    )
    ks = values["analysis"]["ks"]
    policy = GatePolicy()
    assert tuple(ks["metrics"]) == policy.metrics
    assert tuple(ks["rates"]) == policy.rates
    assert ks["minRateIncrease"] == policy.min_rate_increase
