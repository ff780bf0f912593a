"""The chart's PrometheusRule and AnalysisTemplate PromQL on Debian's promtool: `check rules`,
`test rules` (manifests/prometheus/rules.test.yaml), and the analysis queries evaluated on the same
input series — including the 5xx ratio that must be 0, not empty, for a track without 5xx series."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    assert "SUCCESS: 19 rules found" in check.stdout + check.stderr
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


# ---------------------------------------------------------------- the ServiceMonitor on a real Prometheus


def _monitor_scrape_config(monitor: dict[str, Any], targets_file: Path) -> dict[str, Any]:
    """The scrape config the Prometheus Operator generates from a ServiceMonitor endpoint, for the
    parts this chart uses (honorLabels, relabelings, metricRelabelings: camelCase → snake_case),
    with file_sd standing in for Kubernetes service discovery (the same __meta_kubernetes_* labels)."""
    (endpoint,) = monitor["spec"]["endpoints"]

    def relabel(rule: dict[str, Any]) -> dict[str, Any]:
        keys = {
            "sourceLabels": "source_labels",
            "targetLabel": "target_label",
            "action": "action",
            "regex": "regex",
        }
        return {keys[k]: v for k, v in rule.items()}

    return {
        "job_name": "servicemonitor",
        "scrape_interval": "1s",
        "metrics_path": endpoint["path"],
        "honor_labels": endpoint["honorLabels"],
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        "relabel_configs": [relabel(r) for r in endpoint["relabelings"]],
        "metric_relabel_configs": [relabel(r) for r in endpoint["metricRelabelings"]],
    }


class _Exposition(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _pod_server(track: str, requests: int) -> ThreadingHTTPServer:
    """A stand-in for one API pod's /metrics: it reports the `track` it was started with."""
    body = (
        f'ggufship_requests_total{{model="support-bot",version="1.5.0",track="{track}",'
        f'endpoint="/v1/chat/completions",code="200"}} {requests}\n'
    ).encode()
    handler = type("Pod", (_Exposition,), {"body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_servicemonitor_relabeling_on_a_real_prometheus(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Issue 14 item 2 on Debian's Prometheus: after a promotion Argo relabels a running pod without
    restarting it (argo-rollouts rollout/ephemeralmetadata.go), so a pod started as the canary keeps
    reporting track="canary" while it is the stable. With the ServiceMonitor's relabelings, the series
    carry the pod-template hash and namespace from the pod's labels and no `track`; the chart's query
    for the canary hash counts the canary pod only, and another namespace's pod of the same hash not."""
    prometheus = which_or_skip("prometheus")
    monitor = next(o for o in rendered if o["kind"] == "ServiceMonitor")
    pods = {
        # (namespace, hash): (what the app says, requests)
        ("ml", STABLE): _pod_server("canary", 1000),  # promoted canary: still says "canary"
        ("ml", CANARY): _pod_server("canary", 70),
        ("staging", CANARY): _pod_server("canary", 5000),
    }
    try:
        targets = tmp_path / "targets.json"
        targets.write_text(
            json.dumps(
                [
                    {
                        "targets": [f"127.0.0.1:{server.server_address[1]}"],
                        "labels": {
                            "__meta_kubernetes_namespace": namespace,
                            "__meta_kubernetes_pod_label_rollouts_pod_template_hash": pod_hash,
                            "__meta_kubernetes_pod_name": f"api-{pod_hash}-{namespace}",
                        },
                    }
                    for (namespace, pod_hash), server in pods.items()
                ]
            )
        )
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({"scrape_configs": [_monitor_scrape_config(monitor, targets)]}))
        port = _free_port()
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            from ggufship.gate import PrometheusClient

            with PrometheusClient(f"http://127.0.0.1:{port}", timeout_s=5) as client:
                deadline = time.monotonic() + 60
                series: list[dict[str, Any]] = []
                while time.monotonic() < deadline:
                    try:
                        series = client.query("ggufship_requests_total", time.time()).get("result", [])
                    except Exception:  # not up yet
                        series = []
                    if len(series) == len(pods):
                        break
                    time.sleep(0.2)
                assert len(series) == len(pods), series
                labels = {
                    (s["metric"]["namespace"], s["metric"]["rollouts_pod_template_hash"]) for s in series
                }
                assert labels == set(pods)
                assert all("track" not in s["metric"] for s in series)
                assert all(s["metric"]["endpoint"] == "/v1/chat/completions" for s in series)  # honorLabels
                (traffic,) = [
                    o
                    for o in rendered
                    if o["kind"] == "AnalysisTemplate" and o["metadata"]["name"].endswith("-traffic")
                ]
                canary_metric = next(m for m in traffic["spec"]["metrics"] if m["name"] == "canary-samples")
                query = (
                    canary_metric["provider"]["prometheus"]["query"]
                    .replace("{{args.model}}", "support-bot")
                    .replace("{{args.namespace}}", "ml")
                    .replace("{{args.canary-hash}}", CANARY)
                )
                selector_only = query.split("increase(", 1)[1].rsplit("[", 1)[0]  # the raw counter
                (answer,) = client.query(selector_only, time.time())["result"]
                assert float(answer["value"][1]) == 70
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        for server in pods.values():
            server.shutdown()
