"""The Hugging Face model card (``README.md``) of an export."""

from __future__ import annotations

from typing import Any

import yaml

from ggufship.measured import MeasuredEvaluation
from ggufship.release import ReleaseSpec


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


def front_matter(name: str, spec: ReleaseSpec, base_model: str | None, relation: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if spec.license:
        data["license"] = spec.license
    if base_model:
        data["base_model"] = base_model
        data["base_model_relation"] = relation
    data["library_name"] = "gguf"
    data["tags"] = sorted({"gguf", "llama.cpp", "ggufship", *spec.tags})
    if spec.languages:
        data["language"] = list(spec.languages)
    if spec.datasets:
        data["datasets"] = [d.name for d in spec.datasets]
    if spec.hyperparameters:
        data["hyperparameters"] = dict(sorted(spec.hyperparameters.items()))
    if spec.evaluations:
        data["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": ev.task},
                        "dataset": {"name": ev.dataset, "type": ev.dataset},
                        "metrics": [
                            {"type": metric, "value": value, "name": metric}
                            for metric, value in sorted(ev.metrics.items())
                        ],
                    }
                    for ev in spec.evaluations
                ],
            }
        ]
    return data


def render_card(
    *,
    name: str,
    version: str,
    spec: ReleaseSpec,
    base_model: str | None,
    relation: str,
    files: list[tuple[str, str, int, str]],
    provenance: dict[str, str],
    warnings: list[str],
) -> str:
    """Markdown card with YAML front matter; ``files`` are (path, quant, size, sha256)."""
    fm = yaml.safe_dump(front_matter(name, spec, base_model, relation), sort_keys=False, allow_unicode=True)
    lines = ["---", fm.rstrip("\n"), "---", "", f"# {name} {version}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        "GGUF export produced by ggufship with llama.cpp's converter and quantizer.",
        "",
        "## Files",
        "",
        "| file | quantization | size | sha256 |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{p}` | {q} | {_human(s)} | `{d}` |" for p, q, s, d in files]
    first = files[-1][0] if files else f"{name}-{version}.gguf"
    lines += [
        "",
        "## Use",
        "",
        "```sh",
        "sha256sum -c *.sha256",
        f"ggufship serve {first}",
        "```",
        "",
    ]
    if spec.hyperparameters:
        lines += ["## Training hyperparameters", "", "| name | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(spec.hyperparameters.items())]
        lines.append("")
    if spec.datasets:
        lines += ["## Datasets", "", "| name | location | fingerprint |", "|---|---|---|"]
        lines += [f"| {d.name} | {d.uri or ''} | `{d.fingerprint or ''}` |" for d in spec.datasets]
        lines.append("")
    if spec.evaluations:
        lines += ["## Evaluation", "", "| task | dataset | metric | value |", "|---|---|---|---|"]
        for ev in spec.evaluations:
            lines += [f"| {ev.task} | {ev.dataset} | {m} | {v} |" for m, v in sorted(ev.metrics.items())]
        lines.append("")
    lines += ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in provenance.items()]
    lines.append("")
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    return "\n".join(lines)


MEASURED_SOURCE = "ggufship evaluate (measured on the GGUF files)"
DECLARED_SOURCE = "release spec (declared, not measured)"
_SECTION_BEGIN = "<!-- ggufship:evaluation -->"
_SECTION_END = "<!-- /ggufship:evaluation -->"


def add_measured_evaluation(card: str, name: str, evaluation: MeasuredEvaluation) -> str:
    """The card with ``evaluation`` in its ``model-index`` (source: measured) and in a
    "Measured evaluation" section; results from the release spec are kept and marked as
    declared. Idempotent: a second call replaces the measured parts."""
    if not card.startswith("---\n") or "\n---\n" not in card[4:]:
        raise ValueError("model card has no YAML front matter")
    head, body = card[4:].split("\n---\n", 1)
    data = yaml.safe_load(head) or {}
    index = data.setdefault("model-index", [{"name": name, "results": []}])
    entry = next((e for e in index if e.get("name") == name), None)
    if entry is None:
        entry = {"name": name, "results": []}
        index.append(entry)
    results = []
    for result in entry.get("results", []):
        source = (result.get("source") or {}).get("name")
        if source == MEASURED_SOURCE:
            continue
        if source is None:
            result["source"] = {"name": DECLARED_SOURCE}
        results.append(result)
    golden = evaluation.golden_set
    results.append(
        {
            "task": {"type": "text-generation"},
            "dataset": {"name": golden.name, "type": golden.name, "revision": golden.fingerprint},
            "metrics": [
                {"type": metric, "value": round(value, 6), "name": metric, "verified": False}
                for metric, value in sorted(evaluation.metrics.items())
            ],
            "source": {"name": MEASURED_SOURCE},
        }
    )
    entry["results"] = results
    fm = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if _SECTION_BEGIN in body and _SECTION_END in body:
        before, rest = body.split(_SECTION_BEGIN, 1)
        body = before + rest.split(_SECTION_END, 1)[1].lstrip("\n")
    stable = evaluation.stable
    section = [
        _SECTION_BEGIN,
        "## Measured evaluation",
        "",
        f"**{evaluation.outcome}** against {stable.name} {stable.version} (`{stable.gguf}`) "
        "on the golden set "
        f"{golden.name} (`{golden.fingerprint}`, {golden.scored} scored, {golden.skipped_too_long} skipped "
        f"as too long), measured on `{evaluation.gguf}`: {evaluation.reason}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in sorted(evaluation.metrics.items())],
        "",
        _SECTION_END,
        "",
    ]
    marker = "## Provenance"
    text = "\n".join(section)
    body = body.replace(marker, text + marker, 1) if marker in body else body.rstrip("\n") + "\n\n" + text
    return "---\n" + fm.rstrip("\n") + "\n---\n" + body
