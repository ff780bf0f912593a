"""The Grafana dashboard (issue 16 part 3): generated from code with a current golden copy,
shipped by the chart as a sidecar ConfigMap; every PromQL expression in it parses (promtool) and
references only metrics the server exports — directly or through the chart's recording rules —
selecting tracks by pod-template hash and namespace like the chart's analyses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ggufship.dashboard import DASHBOARD_PATH, build_dashboard, main, render
from tests.k8s_fixtures import ROOT, load_objects, run_tool, tools_or_skip, which_or_skip

CHART = ROOT / "charts" / "ggufship-api"
#: Metrics of other exporters that panels may use, with where they come from.
FOREIGN = {
    # Argo Rollouts controller, controller/metrics/analysis.go (gauge, labels name, namespace,
    # metric, type, phase; 1 for the metric's current phase).
    "analysis_run_metric_phase",
}
_VARIABLES = {"$namespace": "ml", "$model": "support-bot", "$hash": ".+"}
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}


def exported_names() -> set[str]:
    """Every series name a server exposes, from its real registry (histogram/counter suffixes)."""
    from ggufship.serve._metrics import MetricLabels, ServeMetrics

    metrics = ServeMetrics(MetricLabels("m", "1", "stable"))
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside braces or grouping clauses), durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if word in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def substituted(expr: str) -> str:
    for var, value in _VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' series)."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)", var["definition"])
            assert match, var["definition"]
            out.append((f"variable {var['name']}", match.group(1)))
    return out


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    helm = tools_or_skip()["helm"]
    return load_objects(run_tool([helm, "template", "rel", CHART, "--namespace", "ml"]).stdout)


@pytest.fixture(scope="module")
def recorded(rendered: list[dict[str, Any]]) -> dict[str, str]:
    (rule,) = [o for o in rendered if o["kind"] == "PrometheusRule"]
    return {r["record"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r}


def test_golden_copy_is_current() -> None:
    assert (ROOT / DASHBOARD_PATH).read_text(encoding="utf-8") == render(), (
        "stale: run python -m ggufship.dashboard --write"
    )
    assert main(["--check", "--root", str(ROOT)]) == 0


def test_check_fails_on_a_stale_copy(tmp_path: Path) -> None:
    stale = tmp_path / DASHBOARD_PATH
    stale.parent.mkdir(parents=True)
    stale.write_text(render().replace("Request rate", "Requests"), encoding="utf-8")
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert main(["--write", "--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0


def test_chart_ships_it_for_the_sidecar(rendered: list[dict[str, Any]]) -> None:
    (cm,) = [o for o in rendered if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["ggufship-canary.json"]) == build_dashboard()


def test_chart_can_leave_it_out() -> None:
    helm = tools_or_skip()["helm"]
    out = run_tool(
        [
            helm,
            "template",
            "rel",
            CHART,
            "--namespace",
            "ml",
            "--set",
            "monitoring.grafanaDashboard.enabled=false",
        ]
    ).stdout
    assert not [
        o for o in load_objects(out) if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]
    ]


def test_panels_cover_the_issue() -> None:
    titles = " | ".join(p["title"] for p in build_dashboard()["panels"]).lower()
    for needle in (
        "request rate",
        "5xx",
        "time to first token p50 / p99",
        "inter-token latency p50 / p99",
        "end-to-end latency p50 / p99",
        "tokens / s",
        "refusal rate",
        "surprisal",
        "verdicts",
    ):
        assert needle in titles, needle


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    promtool = which_or_skip("promtool")
    exprs = expressions(build_dashboard())
    rules = [
        {"record": f"dashboard:expr_{i}:check", "expr": substituted(e)} for i, (_, e) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    check = run_tool([promtool, "check", "rules", path])
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout + check.stderr
    # promtool does reject what is not PromQL (so the check above means something)
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "a:b", "expr": "sum(("}]}]})
    )
    bad = run_tool([promtool, "check", "rules", path], check=False)
    assert bad.returncode != 0


def test_every_metric_is_exported_by_the_server(recorded: dict[str, str]) -> None:
    exported = exported_names()
    assert {
        "ggufship_answer_surprisal_nats_bucket",
        "ggufship_answers_total",
        "ggufship_bad_answers_total",
    } <= exported
    unknown: list[str] = []
    for where, expr in expressions(build_dashboard()):
        for name in metric_names(expr):
            if name in recorded:  # a recording rule of the chart: check what it reads
                bases = metric_names(recorded[name])
                assert bases, name
                unknown += [f"{where}: {name} → {b}" for b in bases if b not in exported]
            elif ":" in name:
                unknown.append(f"{where}: recording rule {name} is not in the chart's PrometheusRule")
            elif name not in exported and name not in FOREIGN:
                unknown.append(f"{where}: {name}")
    assert not unknown, unknown


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.5, sum by (namespace, le) (rate(ggufship_x_bucket{a="b",c=~"d"}[5m]))) '
        "/ on (namespace) group_left sum without (reason) (ggufship:y:ratio) and on() vector(1) > bool 2"
    )
    assert metric_names(expr) == {"ggufship_x_bucket", "ggufship:y:ratio"}


def test_tracks_are_selected_by_hash_and_namespace() -> None:
    for where, expr in expressions(build_dashboard()):
        if where.startswith("variable"):
            continue
        selectors = re.findall(r"\{([^}]*)\}", expr)
        assert selectors, where
        for sel in selectors:
            assert 'namespace="$namespace"' in sel, where
            if "analysis_run_metric_phase" not in expr:
                assert 'rollouts_pod_template_hash=~"$hash"' in sel and 'model="$model"' in sel, where
