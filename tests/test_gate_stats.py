"""The gate's pure core: table tests of ``evaluate`` and its statistics (no Prometheus)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from ggufship.gate import (
    CounterSeries,
    GateConfigError,
    GateError,
    GateRequest,
    Histogram,
    Measurement,
    Verdict,
    evaluate,
    make_request,
    parse_duration,
    write_report,
)
from ggufship.gate._stats import counter_increase, holm, ks_binned
from ggufship.metrics import inter_token_buckets, latency_buckets, token_count_buckets

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LAT = (*latency_buckets(), math.inf)
ITL = (*inter_token_buckets(), math.inf)
TOK = (*token_count_buckets(), math.inf)


def bucketize(values: np.ndarray, bounds: tuple[float, ...] = LAT) -> Histogram:
    """Observations → the histogram a prometheus_client Histogram would export (le inclusive)."""
    idx = np.searchsorted(np.asarray(bounds), values, side="left")
    return Histogram.from_counts(bounds, np.bincount(idx, minlength=len(bounds)).tolist())


def lognormal(rng: np.random.Generator, median: float, n: int, sigma: float = 0.5) -> np.ndarray:
    return rng.lognormal(math.log(median), sigma, n)


def request(**policy: object) -> GateRequest:
    # The histogram tables measure no answer rates: rates off unless a test asks (tests/test_gate_rates.py).
    policy.setdefault("rates", ())
    return make_request(None, model="m", prometheus_url="http://127.0.0.1:9", **policy)


def measurement(stable: Histogram | None, canary: Histogram | None, **kw: object) -> Measurement:
    defaults: dict[str, object] = {"canary_p99_s": 0.9, "canary_error_ratio": 0.0}
    defaults.update(kw)
    return Measurement(histograms={"latency": {"stable": stable, "canary": canary}}, **defaults)  # type: ignore[arg-type]


def check(verdict: Verdict, name: str):
    return next(c for c in verdict.checks if c.name == name)


# ---------------------------------------------------------------- the table


RNG_SEED = 20261123


def _case(name: str) -> tuple[Histogram | None, Histogram | None]:
    rng = np.random.default_rng(RNG_SEED)
    base = lognormal(rng, 0.5, 2000)
    if name == "identical":
        h = bucketize(base)
        return h, h
    if name == "same-distribution":
        return bucketize(base), bucketize(lognormal(rng, 0.5, 400))
    if name == "shifted":
        return bucketize(base), bucketize(lognormal(rng, 0.65, 400))
    if name == "faster":
        return bucketize(base), bucketize(lognormal(rng, 0.35, 400))
    if name == "heavier-tail":
        canary = lognormal(rng, 0.5, 400)
        canary[:100] *= 4.0  # a quarter of the canary's requests are 4x slower
        return bucketize(base), bucketize(canary)
    if name == "empty":
        return None, None
    if name == "canary-empty":
        return bucketize(base), None
    if name == "canary-zero-counts":
        return bucketize(base), Histogram.from_counts(LAT, [0] * len(LAT))
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("case", "outcome", "ks_outcome"),
    [
        ("identical", "pass", "pass"),
        ("same-distribution", "pass", "pass"),
        ("shifted", "fail", "fail"),
        ("faster", "pass", "pass"),  # one-sided: a faster canary is not a regression
        ("heavier-tail", "fail", "fail"),
        ("empty", "inconclusive", None),
        ("canary-empty", "inconclusive", None),
        ("canary-zero-counts", "inconclusive", None),
    ],
)
def test_table(case: str, outcome: str, ks_outcome: str | None) -> None:
    stable, canary = _case(case)
    verdict = evaluate(request(metrics=("latency",)), measurement(stable, canary), NOW)
    assert verdict.outcome == outcome, verdict.reason
    if ks_outcome is None:
        assert check(verdict, "min-samples").outcome == "inconclusive"
        assert "too few requests" in verdict.reason
        assert not any(c.name == "ks-latency" for c in verdict.checks)
    else:
        ks = check(verdict, "ks-latency")
        assert ks.outcome == ks_outcome
        for key in ("pvalue", "pvalue_holm", "n_stable", "n_canary", "median_shift", "alpha_per_analysis"):
            assert key in ks.details
        assert ks.details["n_canary"] == (canary.n if canary else 0)
    # every verdict survives JSON and carries the numbers
    again = Verdict.model_validate_json(verdict.to_json())
    assert again == verdict


def test_counter_resets() -> None:
    # 0 → 5 → 9 (restart) → 2 → 6: increases 5 + 4 + 2 + 4 = 15
    assert counter_increase([0, 5, 9, 2, 6]) == 15
    assert counter_increase([3]) == 0
    assert counter_increase([]) == 0
    rng = np.random.default_rng(7)
    counts = np.bincount(
        np.searchsorted(np.asarray(LAT), lognormal(rng, 0.5, 600), side="left"), minlength=len(LAT)
    )
    cumulative = np.cumsum(counts)
    # the same 600 observations, seen through a series that restarted after 250 of them
    reset_series = []
    for i, le in enumerate(LAT):
        part = round(cumulative[i] * 250 / 600)
        reset_series.append(
            CounterSeries(
                le="+Inf" if math.isinf(le) else repr(le),
                values=(0.0, float(part), 0.0, float(cumulative[i] - part)),
            )
        )
    from_reset = Histogram.from_series(reset_series)
    direct = Histogram.from_counts(LAT, counts.tolist())
    assert from_reset is not None
    assert from_reset.cumulative == direct.cumulative
    assert not from_reset.repaired
    # and the verdict is the same as without the reset
    stable = bucketize(lognormal(np.random.default_rng(8), 0.5, 1500))
    a = evaluate(request(metrics=("latency",)), measurement(stable, from_reset), NOW)
    b = evaluate(request(metrics=("latency",)), measurement(stable, direct), NOW)
    assert a.outcome == b.outcome
    assert check(a, "ks-latency").details == check(b, "ks-latency").details


def test_series_without_inf_or_samples() -> None:
    assert Histogram.from_series([]) is None
    assert Histogram.from_series([CounterSeries(le="0.5", values=(0.0, 3.0))]) is None
    h = Histogram.from_series(
        [CounterSeries(le="0.5", values=(0.0, 5.0)), CounterSeries(le="+Inf", values=(0.0, 4.0))]
    )
    assert h is not None and h.repaired and h.cumulative == (5, 5)  # made monotone, and says so


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("shift", [1.0, 1.1, 1.3])
def test_binned_ks_equals_scipy_on_the_tied_samples(two_sided: bool, shift: float) -> None:
    rng = np.random.default_rng(11)
    xs, xc = lognormal(rng, 0.5, 700), lognormal(rng, 0.5 * shift, 150)
    bounds = np.asarray((*latency_buckets(), 1e9))  # +Inf replaced by a finite stand-in for scipy
    ts = bounds[np.searchsorted(bounds, xs, side="left")]
    tc = bounds[np.searchsorted(bounds, xc, side="left")]
    ours = ks_binned(bucketize(xs), bucketize(xc), two_sided)
    ref = ks_2samp(tc, ts, alternative="two-sided" if two_sided else "less", method="asymp")
    assert ours.d == pytest.approx(ref.statistic, abs=1e-12)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=1e-9)


def test_holm() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 × 0.8 capped at 1; monotone
    assert holm([0.2, 0.4]) == pytest.approx([0.4, 0.4])


def test_effect_floor_keeps_a_trivial_but_significant_shift() -> None:
    rng = np.random.default_rng(3)
    stable = bucketize(lognormal(rng, 0.5, 200_000))
    canary = bucketize(lognormal(rng, 0.51, 200_000))  # +2 %: significant at this n, not material
    verdict = evaluate(request(metrics=("latency",)), measurement(stable, canary), NOW)
    ks = check(verdict, "ks-latency")
    assert ks.details["significant"] is True
    assert ks.details["effect_floor_met"] is False
    assert verdict.outcome == "pass"
    strict = evaluate(
        request(metrics=("latency",), min_ks_d=0.0, min_median_shift=0.0), measurement(stable, canary), NOW
    )
    assert strict.outcome == "fail"


def test_two_sided_and_completion_length() -> None:
    stable, canary = _case("faster")
    assert evaluate(
        request(metrics=("latency",), two_sided=True), measurement(stable, canary), NOW
    ).outcome == ("fail")
    rng = np.random.default_rng(5)
    toks_s = bucketize(rng.integers(50, 400, 2000).astype(float), TOK)
    toks_c = bucketize(rng.integers(5, 60, 400).astype(float), TOK)  # much shorter answers
    m = Measurement(
        histograms={
            "latency": {"stable": stable, "canary": stable},
            "completion_length": {"stable": toks_s, "canary": toks_c},
        },
        canary_p99_s=0.9,
        canary_error_ratio=0.0,
    )
    verdict = evaluate(request(metrics=("latency", "completion_length")), m, NOW)
    cl = check(verdict, "ks-completion_length")
    assert cl.details["alternative"] == "two-sided"
    assert cl.outcome == "fail" and verdict.outcome == "fail"


def test_secondary_metric_without_data_is_skipped_not_passed() -> None:
    stable, canary = _case("same-distribution")
    verdict = evaluate(request(), measurement(stable, canary), NOW)  # all four metrics, only latency has data
    assert verdict.outcome == "pass"
    for name in ("ks-ttft", "ks-itl", "ks-completion_length"):
        assert check(verdict, name).outcome == "skipped"
    assert (
        check(verdict, "ks-latency").details["pvalue_holm"] == check(verdict, "ks-latency").details["pvalue"]
    )


def test_holm_across_metrics_and_alpha_split() -> None:
    rng = np.random.default_rng(9)
    lat_s, lat_c = bucketize(lognormal(rng, 0.5, 3000)), bucketize(lognormal(rng, 0.5, 500))
    itl_s, itl_c = bucketize(lognormal(rng, 0.02, 30000), ITL), bucketize(lognormal(rng, 0.02, 5000), ITL)
    m = Measurement(
        histograms={"latency": {"stable": lat_s, "canary": lat_c}, "itl": {"stable": itl_s, "canary": itl_c}},
        canary_p99_s=0.9,
        canary_error_ratio=0.0,
    )
    verdict = evaluate(request(metrics=("latency", "itl"), planned_analyses=4), m, NOW)
    assert verdict.alpha_per_analysis == pytest.approx(0.0025)
    tested = [c for c in verdict.checks if c.kind == "ks" and c.outcome != "skipped"]
    assert len(tested) == 2
    raw = sorted(c.details["pvalue"] for c in tested)
    adj = sorted(c.details["pvalue_holm"] for c in tested)
    assert adj[0] == pytest.approx(min(1.0, 2 * raw[0]))


@pytest.mark.parametrize(
    ("p99", "ratio", "outcome", "name"),
    [
        (1.5, 0.0, "fail", "p99-latency"),
        (0.9, 0.02, "fail", "error-ratio"),
        (0.9, 0.005, "pass", "error-ratio"),  # the limit itself passes
        (None, 0.0, "inconclusive", "p99-latency"),
        (float("nan"), 0.0, "inconclusive", "p99-latency"),
        (0.9, None, "inconclusive", "error-ratio"),
    ],
)
def test_thresholds(p99: float | None, ratio: float | None, outcome: str, name: str) -> None:
    stable, canary = _case("same-distribution")
    m = measurement(stable, canary, canary_p99_s=p99, canary_error_ratio=ratio)
    verdict = evaluate(request(metrics=("latency",)), m, NOW)
    assert verdict.outcome == outcome
    assert check(verdict, name).outcome == outcome


def test_prometheus_errors_are_inconclusive_never_pass() -> None:
    m = Measurement(errors=("prometheus http://127.0.0.1:9 unreachable: ConnectError",))
    verdict = evaluate(request(), m, NOW)
    assert verdict.outcome == "inconclusive"
    assert verdict.exit_code == 2
    assert "unreachable" in verdict.reason


def test_quantile_series_method() -> None:
    rng = np.random.default_rng(2)
    same = {"stable": tuple(rng.normal(1.0, 0.05, 30)), "canary": tuple(rng.normal(1.0, 0.05, 30))}
    slow = {"stable": same["stable"], "canary": tuple(rng.normal(1.3, 0.05, 30))}
    stable, canary = _case("same-distribution")
    req = request(metrics=("latency",), method="quantile-series")
    ok = evaluate(req, measurement(stable, canary, series={"latency": same}), NOW)
    bad = evaluate(req, measurement(stable, canary, series={"latency": slow}), NOW)
    few = evaluate(
        req, measurement(stable, canary, series={"latency": {"stable": (1.0,), "canary": (1.0,)}}), NOW
    )
    assert ok.outcome == "pass"
    assert bad.outcome == "fail" and check(bad, "series-latency").kind == "quantile-series"
    assert few.outcome == "inconclusive"


def test_histogram_quantile_like_promql() -> None:
    h = Histogram.from_counts((0.5, 1.0, math.inf), [90, 10, 0])
    assert h.quantile(0.99) == pytest.approx(0.95)
    assert h.quantile(0.5) == pytest.approx(0.5 * 50 / 90)
    assert (
        Histogram.from_counts((0.5, math.inf), [0, 10]).quantile(0.5) == 0.5
    )  # +Inf bucket: last finite bound


def test_aa_false_rollback_rate_over_20_rollouts() -> None:
    """20 simulated A/A rollouts (3 analyses each, all on the same distributions) through the core."""
    rng = np.random.default_rng(42)
    planned = 3
    req = request(metrics=("latency", "ttft"), planned_analyses=planned)
    rollbacks = 0
    for _ in range(20):
        stable_lat, canary_lat = np.empty(0), np.empty(0)
        stable_ttft, canary_ttft = np.empty(0), np.empty(0)
        for _ in range(planned):  # cumulative windows, like analyses at each step of one rollout
            stable_lat = np.concatenate([stable_lat, lognormal(rng, 0.6, 1900)])
            canary_lat = np.concatenate([canary_lat, lognormal(rng, 0.6, 100)])
            stable_ttft = np.concatenate([stable_ttft, lognormal(rng, 0.08, 1900, 0.3)])
            canary_ttft = np.concatenate([canary_ttft, lognormal(rng, 0.08, 100, 0.3)])
            m = Measurement(
                histograms={
                    "latency": {"stable": bucketize(stable_lat), "canary": bucketize(canary_lat)},
                    "ttft": {"stable": bucketize(stable_ttft), "canary": bucketize(canary_ttft)},
                },
                canary_p99_s=0.9,
                canary_error_ratio=0.0,
            )
            if evaluate(req, m, NOW).outcome == "fail":
                rollbacks += 1
                break
    # family-wise budget alpha = 0.01 per rollout: expect 0 of 20 (P(≥ 2) < 0.02 even at the budget)
    assert rollbacks <= 1, f"A/A false rollbacks: {rollbacks}/20"


# ---------------------------------------------------------------- request validation, report


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 0.9}, "alpha"),
        ({"min_samples": 0}, "min_samples"),
        ({"metrics": ("latency", "p42")}, "metrics"),
        ({"metrics": ()}, "metrics"),
        ({"window_s": 0.5}, "window_s"),
        ({"prometheus_url": "ftp://x"}, "prometheus_url"),
        ({"matchers": ("job=api",)}, "matchers"),
        ({"planned_analyses": 0}, "planned_analyses"),
    ],
)
def test_bad_options_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(GateConfigError) as err:
        make_request(None, **overrides)
    assert field in str(err.value)
    assert err.value.exit_code == 11


def test_parse_duration() -> None:
    assert parse_duration("300") == 300
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1500ms") == 1.5
    for bad in ("", "5 minutes", "m5", "5x"):
        with pytest.raises(GateConfigError, match="duration"):
            parse_duration(bad)


def test_report_files(tmp_path: Path) -> None:
    stable, canary = _case("shifted")
    verdict = evaluate(request(metrics=("latency",)), measurement(stable, canary), NOW)
    files = write_report(verdict, tmp_path / "rep")
    assert json.loads(files.verdict.read_text())["outcome"] == "fail"
    md = files.markdown.read_text()
    assert ("FAIL" in md and "ecdf-latency.png" in md and "KS" in md) or "D" in md
    png = tmp_path / "rep" / "ecdf-latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "ecdf-latency.png",
        "report.md",
        "verdict.json",
    ]


def test_report_into_a_file_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    stable, canary = _case("identical")
    verdict = evaluate(request(metrics=("latency",)), measurement(stable, canary), NOW)
    with pytest.raises(GateError, match="file"):
        write_report(verdict, blocker / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    ("stable_bounds", "canary_bounds"),
    [
        ((math.inf,), (math.inf,)),  # only the +Inf bucket: D = 0 by construction
        ((0.1, math.inf), (0.2, math.inf)),  # no finite bound in common
    ],
)
def test_no_shared_finite_bucket_is_inconclusive_not_pass(
    stable_bounds: tuple[float, ...], canary_bounds: tuple[float, ...]
) -> None:
    """A measurement built by hand (the pure core defends itself, whatever measure() checked)."""
    stable = Histogram.from_counts(stable_bounds, [0] * (len(stable_bounds) - 1) + [500])
    canary = Histogram.from_counts(canary_bounds, [0] * (len(canary_bounds) - 1) + [500])
    verdict = evaluate(request(metrics=("latency",)), measurement(stable, canary), NOW)
    assert verdict.outcome == "inconclusive", verdict.reason
    ks = check(verdict, "ks-latency")
    assert ks.outcome == "inconclusive" and "no distribution to test" in ks.reason
