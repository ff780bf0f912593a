"""Issue 14 acceptance: what the rendered chart does on a real Argo Rollouts cluster, for the defaults
and every ``ci/*-values.yaml`` variant, proved over the rendered objects:

* no analysis can succeed with zero canary samples;
* no analysis runs before a full window of post-weight traffic;
* the API Services (and the ServiceMonitor, the PDB, the DestinationRule subsets) do not select
  the gate pods;
* every metric query selects by pod-template hash and namespace.

There is no cluster here. The Argo Rollouts decisions are re-implemented below from the upstream
source (argo-rollouts v1.9.1) — each function names the upstream file and function it follows — and
the PromQL is evaluated for real by promtool on series without canary traffic.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_fixtures import ROOT, load_objects, run_tool, tools_or_skip

CHART = ROOT / "charts" / "ggufship-api"
VARIANTS = ["default", *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]
NAMESPACE = "ml"
HASH_LABEL = "rollouts_pod_template_hash"
STABLE_HASH, CANARY_HASH = "5d4f8c7b9", "6c8d9f7a1"

# ---------------------------------------------------------------- rendering


def _render(variant: str) -> list[dict[str, Any]]:
    helm = tools_or_skip()["helm"]
    args: list[str | Path] = [helm, "template", "rel", CHART, "--namespace", NAMESPACE]
    if variant != "default":
        args += ["-f", CHART / "ci" / variant]
    return load_objects(run_tool(args).stdout)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {variant: _render(variant) for variant in VARIANTS}


def _one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _templates(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "AnalysisTemplate"}


def _analyses(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], bool]]:
    """Every analysis the Rollout starts: (where, RolloutAnalysis, background?)."""
    canary = _one(objs, "Rollout")["spec"]["strategy"]["canary"]
    out = [(f"steps[{i}]", s["analysis"], False) for i, s in enumerate(canary["steps"]) if "analysis" in s]
    if "analysis" in canary:
        out.append(("background", canary["analysis"], True))
    assert out, "the Rollout starts no analysis"
    return out


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, f"duration {duration!r}"
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


# ---------------------------------------------------------------- Argo Rollouts, re-implemented

# utils/analysis/helpers.go analysisStatusOrder (IsWorse): later is worse.
STATUS_ORDER = ["Successful", "Running", "Pending", "Inconclusive", "Error", "Failed"]


def eval_condition(condition: str, result: Any) -> bool:
    """utils/evaluate/evaluate.go EvalCondition for the expr-lang subset the chart uses (``len``,
    indexing, comparisons, ``&&``/``||``/``!``, ``isNaN``, literals). Raises on an evaluation error
    (e.g. ``result[0]`` of an empty vector), as expr does."""
    if not re.fullmatch(r'[\sA-Za-z0-9_.\[\]()<>=!&|"+-]*', condition):
        raise AssertionError(f"condition {condition!r} outside the subset this test understands")
    py = condition.replace("&&", " and ").replace("||", " or ")
    py = re.sub(r"!(?!=)", " not ", py)
    py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", py))
    value = eval(py, {"__builtins__": {}}, {"result": result, "len": len, "isNaN": math.isnan})
    if not isinstance(value, bool):
        raise TypeError(f"expected bool, but got {type(value).__name__}")
    return value


def evaluate_result(metric: dict[str, Any], result: Any) -> str:
    """utils/evaluate/evaluate.go EvaluateResult: a missing condition is the other's negation;
    neither true → Inconclusive; an evaluation error → Error."""
    success_cond, failure_cond = metric.get("successCondition", ""), metric.get("failureCondition", "")
    try:
        success = eval_condition(success_cond, result) if success_cond else False
        failure = eval_condition(failure_cond, result) if failure_cond else False
    except (IndexError, TypeError, KeyError):
        return "Error"
    if not success_cond and not failure_cond:
        return "Successful"
    if success_cond and not failure_cond:
        failure = not success
    elif failure_cond and not success_cond:
        success = not failure
    if failure:
        return "Failed"
    if not success:
        return "Inconclusive"
    return "Successful"


def assess_metric(metric: dict[str, Any], phases: list[str], terminating: bool = False) -> str:
    """analysis/analysis.go: the counters of runMeasurements (Error does not count towards
    ``count``), then assessMetricStatus + assessMetricFailureInconclusiveOrError after every
    measurement; the first completed phase wins (a completed metric takes no more measurements)."""
    failure_limit = int(metric.get("failureLimit", 0))
    inconclusive_limit = int(metric.get("inconclusiveLimit", 0))
    error_limit = int(metric.get("consecutiveErrorLimit", 4))  # defaults.DefaultConsecutiveErrorLimit
    success_limit = int(metric.get("consecutiveSuccessLimit", 0))
    if "count" in metric:
        count: int | None = int(metric["count"])
    else:
        count = None if "interval" in metric else 1  # Metric.EffectiveCount
    c = dict.fromkeys(("count", "failed", "inconclusive", "consecutive_error", "consecutive_success"), 0)
    for phase in phases:
        if phase == "Error":
            c["consecutive_error"] += 1
            c["consecutive_success"] = 0
        else:
            c["count"] += 1
            c["consecutive_error"] = 0
            c["consecutive_success"] = c["consecutive_success"] + 1 if phase == "Successful" else 0
            c["failed"] += phase == "Failed"
            c["inconclusive"] += phase == "Inconclusive"
        verdict = ""
        if failure_limit >= 0 and c["failed"] > failure_limit:
            verdict = "Failed"
        if c["inconclusive"] > inconclusive_limit:
            verdict = "Inconclusive"
        if c["consecutive_error"] > error_limit:
            verdict = "Error"
        if verdict:
            return verdict
        if success_limit > 0 and c["consecutive_success"] >= success_limit:
            return "Successful"
        if count is not None and c["count"] >= count:
            return "Inconclusive" if success_limit > 0 else "Successful"
    return "Successful" if terminating and phases else "Running"


def worst(phases: list[str]) -> str:
    return max(phases, key=STATUS_ORDER.index)


def best(phases: set[str]) -> str:
    return min(phases, key=STATUS_ORDER.index)


def test_reimplementation_matches_upstream_cases() -> None:
    """The cases the issue names, on the re-implementation: `count: 1, inconclusiveLimit: 1` with one
    inconclusive measurement ends Successful (the seed's web gate passed on no data); a missing
    failureCondition turns no data into Failed; limits summing to `count` let a run of failures
    and inconclusives end Successful."""
    seed_web = {"count": 1, "inconclusiveLimit": 1, "successCondition": 'result == "pass"'}
    seed_web["failureCondition"] = 'result == "fail"'
    assert evaluate_result(seed_web, "inconclusive") == "Inconclusive"
    assert assess_metric(seed_web, ["Inconclusive"]) == "Successful"
    assert evaluate_result({"successCondition": "len(result) == 1 && result[0] <= 1"}, []) == "Failed"
    assert evaluate_result(
        {"successCondition": "result[0] <= 1", "failureCondition": "result[0] > 1"}, []
    ) == ("Error")
    loose = {"count": 3, "interval": "1m", "failureLimit": 2, "inconclusiveLimit": 2}
    assert assess_metric(loose, ["Failed", "Inconclusive", "Failed"]) == "Successful"
    assert assess_metric(
        {**loose, "failureLimit": 1, "inconclusiveLimit": 1}, ["Failed", "Inconclusive", "Failed"]
    ) == ("Failed")


# ---------------------------------------------------------------- what "no canary data" measures


def _no_data_phases(objs: list[dict[str, Any]], metric: dict[str, Any]) -> set[str]:
    """The measurement phases a metric can take while the canary has served nothing."""
    provider = metric["provider"]
    if "prometheus" in provider:
        # Without canary samples, the canary's selectors match no series or only flat counters:
        # an empty vector, NaN (histogram_quantile of zero buckets, 0/0 ratios) or, for a count
        # (increase), 0. test_promql_no_canary_samples_never_satisfies_success proves on promtool
        # that no sample of the real query satisfies the success condition.
        results: list[list[float]] = [[], [math.nan], [math.nan, math.nan]]
        if "increase(" in provider["prometheus"]["query"]:
            results.append([0.0])
        return {evaluate_result(metric, r) for r in results}
    if "web" in provider:
        # `ggufship gate serve` answers 200 with outcome "inconclusive" without samples
        # (tests/test_gate_*); a non-JSON 2xx body would be Successful upstream
        # (metricproviders/webmetric/webmetric.go parseResponse) — the gate always answers JSON.
        return {evaluate_result(metric, "inconclusive"), "Error"}
    if "job" in provider:
        # `ggufship gate` exits 2 (inconclusive) → the Job fails → Failed
        # (metricproviders/job/job.go Resume: only JobComplete → Successful).
        return {"Failed", "Error"}
    raise AssertionError(f"unknown provider {sorted(provider)}")


def _max_sequence(metric: dict[str, Any]) -> int:
    count = metric.get("count")
    limits = int(metric.get("failureLimit", 0)) + int(metric.get("inconclusiveLimit", 0))
    return int(count) + int(metric.get("consecutiveErrorLimit", 4)) + 1 if count else limits + 6


def _metric_outcomes(objs: list[dict[str, Any]], metric: dict[str, Any]) -> set[str]:
    """Every phase a metric can end in on no canary data: all measurement sequences drawn from
    its no-data phases (exhaustive up to count + consecutiveErrorLimit + 1, or beyond both limits
    for a metric without a count)."""
    phases = sorted(_no_data_phases(objs, metric))
    outcomes: set[str] = set()
    for length in range(1, _max_sequence(metric) + 1):
        for seq in itertools.product(phases, repeat=length):
            outcomes.add(assess_metric(metric, list(seq)))
    return outcomes


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_analysis_succeeds_with_zero_canary_samples(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """For every analysis the Rollout starts: on no canary data some metric can never end
    Successful (so the AnalysisRun cannot: its phase is the worst of its metrics'), and the first
    analysis after each setWeight ends Inconclusive — the Rollout pauses; it neither passes nor
    aborts (rollout/analysis.go reconcileStepBasedAnalysisRun: Inconclusive → pause,
    Failed/Error → abort)."""
    objs = rendered[variant]
    templates = _templates(objs)
    steps = _one(objs, "Rollout")["spec"]["strategy"]["canary"]["steps"]
    for where, analysis, background in _analyses(objs):
        metrics = [m for t in analysis["templates"] for m in templates[t["templateName"]]["spec"]["metrics"]]
        per_metric = {m["name"]: _metric_outcomes(objs, m) for m in metrics}
        # the most favourable combination: each metric's best outcome; the run is the worst of them
        assert worst([best(o) for o in per_metric.values()]) != "Successful", (variant, where, per_metric)
        if background:
            continue
        index = int(where[6:-1])
        if "setWeight" in steps[index - 1]:  # the first analysis after a weight change
            outcomes = {worst(list(combo)) for combo in itertools.product(*per_metric.values())}
            assert outcomes - {"Running"} == {"Inconclusive"}, (variant, where, outcomes)


# ---------------------------------------------------------------- PromQL on real series (promtool)


def _substitute(text: str, hashes: tuple[str, str] = (STABLE_HASH, CANARY_HASH)) -> str:
    return (
        text.replace("{{args.model}}", "support-bot")
        .replace("{{args.namespace}}", NAMESPACE)
        .replace("{{args.stable-hash}}", hashes[0])
        .replace("{{args.canary-hash}}", hashes[1])
    )


def _series(namespace: str, pod_hash: str, per_minute: int, code: str = "200") -> list[dict[str, str]]:
    labels = (
        f'model="support-bot",namespace="{namespace}",{HASH_LABEL}="{pod_hash}",'
        'endpoint="/v1/chat/completions"'
    )
    values = f"0+{per_minute}x30" if per_minute else "0x30"
    out = [{"series": f'ggufship_requests_total{{{labels},code="{code}"}}', "values": values}]
    out.append({"series": f"ggufship_answers_total{{{labels}}}", "values": values})  # every request answered
    for hist, bound in (
        ("ggufship_request_duration_seconds", "1"),
        ("ggufship_time_to_first_token_seconds", "0.5"),
        ("ggufship_inter_token_latency_seconds", "0.05"),
    ):
        for le in (bound, "+Inf"):
            out.append({"series": f'{hist}_bucket{{{labels},le="{le}"}}', "values": values})
    return out


def _success_filter(metric: dict[str, Any]) -> str:
    match = re.fullmatch(
        r"len\(result\) == 1 && result\[0\] (<=|>=|<|>) ([0-9.eE+-]+)", metric["successCondition"]
    )
    assert match, (
        f"{metric['name']}: successCondition {metric['successCondition']!r} "
        "is not `len(result) == 1 && result[0] OP X`"
    )
    return f"{match.group(1)} {match.group(2)}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_promql_no_canary_samples_never_satisfies_success(
    rendered: dict[str, list[dict[str, Any]]], variant: str, tmp_path: Path
) -> None:
    """promtool evaluates every Prometheus metric's query with the canary pods scraped but idle,
    while the stable and the same model in another namespace (and an older canary hash) serve
    plenty: no sample satisfies the success condition, so the measurement cannot be Successful.
    Also the other way round: with canary traffic, the success condition is reachable."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    objs = rendered[variant]
    idle_canary = [
        *_series(NAMESPACE, STABLE_HASH, 120),
        *_series(NAMESPACE, CANARY_HASH, 0),
        *_series("staging", CANARY_HASH, 120),  # same hash and model, other namespace
        *_series(NAMESPACE, "0123abcd", 120),  # a previous ReplicaSet
    ]
    busy_canary = [*_series(NAMESPACE, STABLE_HASH, 120), *_series(NAMESPACE, CANARY_HASH, 120)]
    idle_tests, busy_tests = [], []
    for template in _templates(objs).values():
        for metric in template["spec"]["metrics"]:
            if "prometheus" not in metric["provider"]:
                continue
            query = _substitute(metric["provider"]["prometheus"]["query"])
            op = _success_filter(metric)
            if metric["name"].startswith("stable-"):
                continue  # the stable has traffic in this scenario; the canary's metric decides
            idle_tests.append({"expr": f"({query}) {op}", "eval_time": "20m", "exp_samples": []})
            busy_tests.append(
                {"expr": f"count(({query}) {op})", "eval_time": "20m", "exp_samples": [{"value": 1}]}
            )
    assert idle_tests
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": idle_canary, "promql_expr_test": idle_tests},
            {"interval": "1m", "input_series": busy_canary, "promql_expr_test": busy_tests},
        ],
    }
    test_file = tmp_path / "no-canary-data.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_tool([promtool, "test", "rules", test_file], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- timing


def _gate_window(objs: list[dict[str, Any]], metric: dict[str, Any]) -> float:
    provider = metric["provider"]
    if "job" in provider:
        args = provider["job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    else:
        gate = _one(objs, "Deployment", "rel-ggufship-api-gate")
        args = gate["spec"]["template"]["spec"]["containers"][0]["args"]
    return _seconds(args[args.index("--window") + 1])


def _query_window(metric: dict[str, Any]) -> float:
    ranges = re.findall(r"\[(\d+(?:ms|s|m|h))\]", metric["provider"]["prometheus"]["query"])
    assert ranges, f"{metric['name']}: no range in its query"
    return max(_seconds(r) for r in ranges)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_analysis_runs_before_a_full_window_after_set_weight(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """Every metric of every analysis waits (initialDelay) at least the window its queries (or the
    KS gate) look back over, so the first measurement sees only traffic after the weight change;
    the background analysis starts after the first setWeight; every analysis takes several
    measurements (count ≥ 2, or no count: measured until the rollout ends)."""
    objs = rendered[variant]
    templates = _templates(objs)
    canary = _one(objs, "Rollout")["spec"]["strategy"]["canary"]
    steps = canary["steps"]
    first_weight = next(i for i, s in enumerate(steps) if "setWeight" in s)
    if "analysis" in canary:
        assert canary["analysis"]["startingStep"] > first_weight
    for where, analysis, _ in _analyses(objs):
        if where.startswith("steps"):
            index = int(where[6:-1])
            assert any("setWeight" in s for s in steps[:index]), f"{where}: analysis before any setWeight"
        for ref in analysis["templates"]:
            for metric in templates[ref["templateName"]]["spec"]["metrics"]:
                provider = metric["provider"]
                window = _query_window(metric) if "prometheus" in provider else _gate_window(objs, metric)
                delay = _seconds(metric.get("initialDelay", "0s"))
                assert delay >= window, (
                    f"{variant} {where} {metric['name']}: initialDelay {delay}s < window {window}s"
                )
                assert "interval" in metric, f"{metric['name']}: one measurement only"
                if "count" in metric:
                    assert int(metric["count"]) >= 2, f"{metric['name']}: count {metric['count']}"


# ---------------------------------------------------------------- selectors


def _pod_labels(objs: list[dict[str, Any]]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(API pod labels, [labels of every gate pod]): the Rollout's template, the gate Deployment's
    and the KS Job's."""
    api = _one(objs, "Rollout")["spec"]["template"]["metadata"]["labels"]
    gates = [d["spec"]["template"]["metadata"]["labels"] for d in objs if d["kind"] == "Deployment"]
    for template in _templates(objs).values():
        for metric in template["spec"]["metrics"]:
            job = metric["provider"].get("job")
            if job:
                gates.append(job["spec"]["template"]["metadata"]["labels"])
    return api, gates


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_selectors_never_select_gate_pods(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objs = rendered[variant]
    api, gates = _pod_labels(objs)
    selectors: dict[str, dict[str, str]] = {}
    for svc in (o for o in objs if o["kind"] == "Service" and not o["metadata"]["name"].endswith("-gate")):
        selectors[f"Service {svc['metadata']['name']}"] = svc["spec"]["selector"]
    for kind in ("PodDisruptionBudget",):
        for obj in (o for o in objs if o["kind"] == kind):
            selectors[kind] = obj["spec"]["selector"]["matchLabels"]
    selectors["Rollout"] = _one(objs, "Rollout")["spec"]["selector"]["matchLabels"]
    for obj in (o for o in objs if o["kind"] == "DestinationRule"):
        for subset in obj["spec"]["subsets"]:
            selectors[f"DestinationRule subset {subset['name']}"] = subset["labels"]
    assert len(selectors) >= 4
    for name, selector in selectors.items():
        assert _selects(selector, api), f"{variant}: {name} does not select the API pods"
        for gate in gates:
            assert not _selects(selector, gate), f"{variant}: {name} selects the gate pods {gate}"
    # The ServiceMonitor scrapes the API Service only (hence only API pods).
    for monitor in (o for o in objs if o["kind"] == "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        scraped = [
            s for s in objs if s["kind"] == "Service" and _selects(wanted, s["metadata"].get("labels", {}))
        ]
        assert [s["metadata"]["name"] for s in scraped] == ["rel-ggufship-api"]
        assert all(not _selects(scraped[0]["spec"]["selector"], gate) for gate in gates)


# ---------------------------------------------------------------- hash + namespace everywhere

_VECTOR_RE = re.compile(r"\b(ggufship_[a-z_]+)\s*(\{[^}]*\})?")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_query_selects_by_pod_template_hash_and_namespace(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """Every vector selector of every Prometheus metric carries the pod-template hash of a track and
    the release namespace; the hash args come from podTemplateHashValue (utils/analysis/factory.go
    BuildArgumentsForRolloutAnalysisRun: Stable → the stable ReplicaSet's rollouts-pod-template-hash,
    Latest → the newest's); the KS gate selects the same way; the ServiceMonitor attaches both labels."""
    objs = rendered[variant]
    templates = _templates(objs)
    for where, analysis, _ in _analyses(objs):
        args = {a["name"]: a for a in analysis["args"]}
        assert args["namespace"] == {"name": "namespace", "value": NAMESPACE}, where
        assert args["stable-hash"]["valueFrom"] == {"podTemplateHashValue": "Stable"}, where
        assert args["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}, where
        for ref in analysis["templates"]:
            for metric in templates[ref["templateName"]]["spec"]["metrics"]:
                provider = metric["provider"]
                if "prometheus" in provider:
                    query = _substitute(provider["prometheus"]["query"])
                    vectors = _VECTOR_RE.findall(query)
                    assert vectors, query
                    for name, matchers in vectors:
                        assert matchers, f"{metric['name']}: {name} without matchers"
                        assert re.search(rf'{HASH_LABEL}="({STABLE_HASH}|{CANARY_HASH})"', matchers), (
                            metric["name"],
                            name,
                        )
                        assert f'namespace="{NAMESPACE}"' in matchers, (metric["name"], name)
                        assert "track=" not in matchers  # the app's label is stale after a promotion
                elif "job" in provider:
                    cargs = provider["job"]["spec"]["template"]["spec"]["containers"][0]["args"]
                    assert cargs[cargs.index("--track-label") + 1] == HASH_LABEL
                    assert cargs[cargs.index("--namespace") + 1] == NAMESPACE
                    assert cargs[cargs.index("--stable-track") + 1] == "{{args.stable-hash}}"
                    assert cargs[cargs.index("--canary-track") + 1] == "{{args.canary-hash}}"
                else:
                    url = provider["web"]["url"]
                    assert (
                        "stable_track={{args.stable-hash}}" in url
                        and "canary_track={{args.canary-hash}}" in url
                    )
                    gate = _one(objs, "Deployment", "rel-ggufship-api-gate")
                    gargs = gate["spec"]["template"]["spec"]["containers"][0]["args"]
                    assert gargs[gargs.index("--track-label") + 1] == HASH_LABEL
                    assert gargs[gargs.index("--namespace") + 1] == NAMESPACE
    for monitor in (o for o in objs if o["kind"] == "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert relabel[HASH_LABEL] == ["__meta_kubernetes_pod_label_rollouts_pod_template_hash"]
        assert relabel["namespace"] == ["__meta_kubernetes_namespace"]
        assert {"action": "labeldrop", "regex": "track"} in endpoint["metricRelabelings"]
    pod = _one(objs, "Rollout")["spec"]["template"]["spec"]
    assert "--track" not in pod["containers"][0]["args"]  # the app no longer decides its track


def test_gate_queries_select_by_hash_and_namespace() -> None:
    """The gate's own PromQL builders, as the chart configures them (--track-label, --namespace)."""
    from ggufship.gate import GateRequest, make_request
    from ggufship.gate._promql import error_ratio_query, p99_query, quantile_query, selector
    from ggufship.metrics import TIME_TO_FIRST_TOKEN

    request: GateRequest = make_request(
        None,
        track_label=HASH_LABEL,
        namespace=NAMESPACE,
        model="support-bot",
        stable_track=STABLE_HASH,
        canary_track=CANARY_HASH,
    )
    sel = selector(
        request.canary_track,
        request.model,
        request.endpoint,
        request.matchers,
        track_label=request.track_label,
        namespace=request.namespace,
    )
    assert sel == f'{HASH_LABEL}="{CANARY_HASH}",model="support-bot",namespace="{NAMESPACE}"'
    for query in (
        p99_query(sel, 300),
        error_ratio_query(sel, 300),
        quantile_query(0.95, TIME_TO_FIRST_TOKEN, sel, 300),
    ):
        for name, matchers in _VECTOR_RE.findall(query):
            assert f'{HASH_LABEL}="{CANARY_HASH}"' in matchers and f'namespace="{NAMESPACE}"' in matchers, (
                name
            )
    # the chart's TTFT query is the builder's, args substituted
    objs = _render("default")
    ttft = next(
        m
        for m in _one(objs, "AnalysisTemplate", "rel-ggufship-api-thresholds")["spec"]["metrics"]
        if m["name"] == "canary-ttft"
    )
    chart_query = _substitute(ttft["provider"]["prometheus"]["query"]).replace("[5m]", "[300s]")
    assert chart_query == quantile_query(0.95, TIME_TO_FIRST_TOKEN, sel, 300)
    # local default unchanged: `track`, no namespace
    assert selector("canary", "m") == 'track="canary",model="m"'
    from ggufship.gate import GateConfigError

    with pytest.raises(GateConfigError, match="label name"):
        selector("x", track_label="bad-label")


def test_gate_cli_and_server_take_track_label_and_namespace() -> None:
    """The options the chart passes: `ggufship gate --track-label --namespace` and the web
    provider's URL parameters; a label that is not a Prometheus label name is refused."""
    import argparse

    from ggufship.cli import gate as gate_cli
    from ggufship.gate import GateConfigError, GateRequest, request_from_query

    parser = argparse.ArgumentParser()
    gate_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["gate", "--track-label", HASH_LABEL, "--namespace", NAMESPACE, "--stable-track", STABLE_HASH,
         "--canary-track", CANARY_HASH, "--prometheus", "http://127.0.0.1:9"]
    )  # fmt: skip
    request = gate_cli.build_request(args)
    assert (request.track_label, request.namespace) == (HASH_LABEL, NAMESPACE)
    assert (request.stable_track, request.canary_track) == (STABLE_HASH, CANARY_HASH)
    served = request_from_query(
        GateRequest(track_label=HASH_LABEL, namespace=NAMESPACE),
        f"stable_track={STABLE_HASH}&canary_track={CANARY_HASH}",
    )
    assert (served.track_label, served.namespace, served.canary_track) == (HASH_LABEL, NAMESPACE, CANARY_HASH)
    with pytest.raises(GateConfigError, match="track_label"):
        request_from_query(GateRequest(), "track_label=bad-label")
