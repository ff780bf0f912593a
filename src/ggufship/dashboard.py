"""The Grafana dashboard of a canary, built from code (no hand-edited JSON).

``python -m ggufship.dashboard --write`` regenerates the golden copy
``charts/ggufship-api/dashboards/ggufship-canary.json``, which the chart ships as a ConfigMap
for Grafana's dashboard sidecar (label ``grafana_dashboard: "1"``) and which can be imported
by hand; ``--check`` exits 1 when the copy is stale (tests/test_dashboard.py does the same).

Tracks are told apart as the chart's analyses do: by the ``rollouts_pod_template_hash`` label
(the ServiceMonitor's relabeling; one hash per ReplicaSet: stable and canary during a
rollout) within one ``namespace`` and ``model``. Every panel plots one series per hash;
the "served versions" panel maps each hash to its version and digest. The panels read the
recording rules of the chart's PrometheusRule (group ``ggufship-api.dashboard``, over the
analysis window: the numbers the analyses see), except the raw ``ggufship_model_info`` and
the Argo Rollouts controller's ``analysis_run_metric_phase`` (the verdicts of the
AnalysisRuns; argo-rollouts ``controller/metrics/analysis.go``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UID = "ggufship-canary"
#: The golden copy, relative to a checkout's root.
DASHBOARD_PATH = Path("charts") / "ggufship-api" / "dashboards" / "ggufship-canary.json"
#: A track's series: one namespace and model, the hashes chosen in the ``hash`` variable.
SELECTOR = 'namespace="$namespace",model="$model",rollouts_pod_template_hash=~"$hash"'
HASH_LEGEND = "{{rollouts_pod_template_hash}}"
_DS = {"type": "prometheus", "uid": "${datasource}"}


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": _DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _panel(
    pid: int,
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str,
    grid: tuple[int, int, int, int],
    description: str,
    kind: str = "timeseries",
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": _DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]}},
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }


def _rec(name: str) -> str:
    return f"{name}{{{SELECTOR}}}"


def _variable(name: str, label: str, query: str, *, multi: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": _DS,
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "allValue": ".+" if multi else None,
        "current": {},
    }


def panels() -> list[dict[str, Any]]:
    """Every panel, top to bottom: traffic, latency, throughput, answer quality, verdicts."""
    spec: list[tuple[str, list[tuple[str, str]], str, str]] = [
        (
            "Served versions (per pod-template hash)",
            [
                (
                    "count by (rollouts_pod_template_hash, version, digest) "
                    f"(ggufship_model_info{{{SELECTOR}}})",
                    "{{rollouts_pod_template_hash}} → {{version}} {{digest}}",
                )
            ],
            "short",
            "Which model version and digest each ReplicaSet serves (pods per hash).",
        ),
        (
            "Request rate",
            [(_rec("ggufship:requests:rate"), HASH_LEGEND)],
            "reqps",
            "Requests per second, every endpoint and status.",
        ),
        (
            "5xx ratio",
            [(_rec("ggufship:requests_5xx:ratio"), HASH_LEGEND)],
            "percentunit",
            "Share of requests answered 5xx (0 while there is traffic without errors).",
        ),
        (
            "Time to first token p50 / p99",
            [
                (_rec("ggufship:time_to_first_token_seconds:p50"), "p50 " + HASH_LEGEND),
                (_rec("ggufship:time_to_first_token_seconds:p99"), "p99 " + HASH_LEGEND),
            ],
            "s",
            "From request arrival to the first generated token.",
        ),
        (
            "Inter-token latency p50 / p99",
            [
                (_rec("ggufship:inter_token_latency_seconds:p50"), "p50 " + HASH_LEGEND),
                (_rec("ggufship:inter_token_latency_seconds:p99"), "p99 " + HASH_LEGEND),
            ],
            "s",
            "Gap between consecutive generated tokens.",
        ),
        (
            "End-to-end latency p50 / p99",
            [
                (_rec("ggufship:request_duration_seconds:p50"), "p50 " + HASH_LEGEND),
                (_rec("ggufship:request_duration_seconds:p99"), "p99 " + HASH_LEGEND),
            ],
            "s",
            "Whole request (streams until the last byte); grows with the answer's length.",
        ),
        (
            "Generated tokens / s",
            [(_rec("ggufship:completion_tokens:rate"), HASH_LEGEND)],
            "short",
            "Completion tokens generated per second, all pods of the hash together.",
        ),
        (
            "Refusal rate",
            [(_rec("ggufship:refusals:ratio"), HASH_LEGEND)],
            "percentunit",
            "Answers matching a refusal pattern / finished answers.",
        ),
        (
            "Bad answers by reason",
            [(_rec("ggufship:bad_answers:ratio"), HASH_LEGEND + " {{reason}}")],
            "percentunit",
            "Empty, looping (a repeated n-gram tail) or cut-off answers / finished answers.",
        ),
        (
            "Answer surprisal (nats / token)",
            [
                (_rec("ggufship:answer_surprisal_nats:p50"), "p50 " + HASH_LEGEND),
                (_rec("ggufship:answer_surprisal_nats:p99"), "p99 " + HASH_LEGEND),
                (_rec("ggufship:answer_surprisal_nats:mean"), "mean " + HASH_LEGEND),
            ],
            "short",
            "Mean negative log-likelihood per token of each answer under the serving model: an "
            "uncertainty proxy (a hint of hallucination risk), not a detector. Compare hashes "
            "under the same traffic, not values across models.",
        ),
        (
            "Analysis verdicts (Argo Rollouts)",
            [
                (
                    'max by (name, metric, phase) (analysis_run_metric_phase{namespace="$namespace"} == 1)',
                    "{{name}} {{metric}}: {{phase}}",
                )
            ],
            "short",
            "The phase of each AnalysisRun metric (Successful, Failed, Inconclusive, Error, Running), "
            "from the Argo Rollouts controller's metrics (scrape it for this panel).",
        ),
    ]
    out = []
    for i, (title, targets, unit, description) in enumerate(spec):
        grid = (12 * (i % 2), 8 * (i // 2), 12, 8)
        out.append(_panel(i + 1, title, targets, unit=unit, grid=grid, description=description))
    return out


def build_dashboard() -> dict[str, Any]:
    """The dashboard JSON model (Grafana schema 39)."""
    return {
        "uid": UID,
        "title": "ggufship canary vs stable",
        "description": "Per pod-template hash (stable and canary ReplicaSets) of one model in one "
        "namespace; generated by ggufship.dashboard.",
        "tags": ["ggufship", "canary", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "utc",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                _variable("namespace", "Namespace", "label_values(ggufship_model_info, namespace)"),
                _variable(
                    "model", "Model", 'label_values(ggufship_model_info{namespace="$namespace"}, model)'
                ),
                _variable(
                    "hash",
                    "Pod-template hash",
                    'label_values(ggufship_model_info{namespace="$namespace",model="$model"}, '
                    "rollouts_pod_template_hash)",
                    multi=True,
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ggufship.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write the golden copy ({DASHBOARD_PATH})")
    parser.add_argument("--check", action="store_true", help="exit 1 if the golden copy is stale")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout's root (cwd)")
    args = parser.parse_args(argv)
    path = args.root / DASHBOARD_PATH
    text = render()
    if args.check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            logger.error("%s is stale: run python -m ggufship.dashboard --write", path)
            return 1
        return 0
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        logger.info("wrote %s", path)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
