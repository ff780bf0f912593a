"""The chart's PrometheusRule and AnalysisTemplate PromQL on Debian's promtool: `check rules`,
`test rules` (manifests/prometheus/rules.test.yaml), and the analysis queries evaluated on the same
input series — including the 5xx ratio that must be 0, not empty, for a track without 5xx series."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_fixtures import ROOT, load_objects, run_tool, tools_or_skip, which_or_skip

CHART = ROOT / "charts" / "ggufship-api"
RULES_TEST = ROOT / "manifests" / "prometheus" / "rules.test.yaml"
STABLE, CANARY = "5d4f8c7b9", "6c8d9f7a1"  # the pod-template hashes of rules.test.yaml


@pytest.fixture(scope="module")
def promtool() -> str:
    return which_or_skip("promtool")


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    helm = tools_or_skip()["helm"]
    return load_objects(run_tool([helm, "template", "rel", CHART, "--namespace", "ml"]).stdout)


def _rule_groups(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


def _write_rules(tmp_path: Path, groups: list[dict[str, Any]]) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return rules


def test_promtool_check_and_test_rules(promtool: str, rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    rules = _write_rules(tmp_path, _rule_groups(rendered))
    check = run_tool([promtool, "check", "rules", rules])
    assert "SUCCESS: 7 rules found" in check.stdout + check.stderr
    result = run_tool([promtool, "test", "rules", tmp_path / RULES_TEST.name])
    assert "SUCCESS" in result.stdout + result.stderr


def test_rule_test_fails_without_the_zero_fallback(
    promtool: str, rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The promtool test really checks the `or ... * 0`: without it the stable's ratio is missing."""
    groups = _rule_groups(rendered)
    ratio = next(r for r in groups[0]["rules"] if r.get("record") == "ggufship:requests_5xx:ratio")
    window = "5m"
    by = "namespace, model, rollouts_pod_template_hash"
    ratio["expr"] = (
        f'sum by ({by}) (rate(ggufship_requests_total{{code=~"5.."}}[{window}]))'
        f" / sum by ({by}) (rate(ggufship_requests_total[{window}]))"
    )
    _write_rules(tmp_path, groups)
    result = run_tool([promtool, "test", "rules", tmp_path / RULES_TEST.name], check=False)
    assert result.returncode != 0
    assert f'rollouts_pod_template_hash="{STABLE}"' in result.stdout + result.stderr


def _analysis_queries(objs: list[dict[str, Any]], model: str, namespace: str = "ml") -> dict[str, str]:
    (template,) = [
        o
        for o in objs
        if o["kind"] == "AnalysisTemplate" and o["metadata"]["name"] == "rel-ggufship-api-thresholds"
    ]
    return {
        m["name"]: m["provider"]["prometheus"]["query"]
        .replace("{{args.model}}", model)
        .replace("{{args.namespace}}", namespace)
        .replace("{{args.canary-hash}}", CANARY)
        .replace("{{args.stable-hash}}", STABLE)
        for m in template["spec"]["metrics"]
    }


def test_analysis_template_queries(promtool: str, rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """The AnalysisTemplate's PromQL on the rule test's series: canary p95 TTFT 9.525 s, p95
    inter-token latency 0.9525 s, 5xx ratio 1/7; with no canary 5xx series at all the ratio is 0
    (a sample), not empty; another model's or another namespace's series are not this canary's."""
    queries = _analysis_queries(rendered, "support-bot")
    base = yaml.safe_load(RULES_TEST.read_text())["tests"][0]
    no_5xx_series = [s for s in base["input_series"] if 'code="500"' not in s["series"]]
    expected = {"canary-ttft": 9.525, "canary-inter-token-latency": 0.9525, "canary-5xx-ratio": 1 / 7}
    assert set(queries) == set(expected)

    def moved(old: str, new: str) -> list[dict[str, str]]:
        return [{**s, "series": s["series"].replace(old, new)} for s in base["input_series"]]

    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": base["input_series"],
                "promql_expr_test": [
                    {"expr": queries[name], "eval_time": "10m", "exp_samples": [{"value": value}]}
                    for name, value in expected.items()
                ],
            },
            {
                "interval": "1m",
                "input_series": no_5xx_series,
                "promql_expr_test": [
                    {"expr": queries["canary-5xx-ratio"], "eval_time": "10m", "exp_samples": [{"value": 0}]},
                ],
            },
            {
                # Another model's traffic is not this model's; staging's is not production's.
                "interval": "1m",
                "input_series": moved('model="support-bot"', 'model="other"')
                + moved('namespace="ml"', 'namespace="staging"'),
                "promql_expr_test": [
                    {"expr": queries[name], "eval_time": "10m", "exp_samples": []} for name in expected
                ],
            },
        ],
    }
    test_file = tmp_path / "analysis.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_tool([promtool, "test", "rules", test_file])
    assert "SUCCESS" in result.stdout + result.stderr
