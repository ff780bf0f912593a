"""The evaluation report: ``verdict.json`` (verdict + measurement), ``report.md`` and PNGs
(NLL ECDFs candidate vs stable, per-example NLL deltas, KL per quantization)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufship.errors import OutputError
from ggufship.evaluate._model import Measurement, Verdict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    verdict_json: Path
    markdown: Path
    images: tuple[Path, ...]


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(values)
    return x, np.arange(1, x.size + 1) / x.size


def _plots(m: Measurement, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: list[Path] = []
    stable = {s.id: s for s in m.stable.scores}
    pairs = [(c, stable[c.id]) for c in m.candidate.scores if c.id in stable]
    if pairs:
        cand = np.array([c.nll_mean for c, _ in pairs])
        stab = np.array([s.nll_mean for _, s in pairs])
        fig, ax = plt.subplots(figsize=(6, 4))
        for values, label in (
            (stab, f"stable {m.stable.version}"),
            (cand, f"candidate {m.candidate.version}"),
        ):
            x, y = _ecdf(values)
            ax.step(x, y, where="post", label=label)
        ax.set_xlabel("per-example NLL of the reference (nats/token)")
        ax.set_ylabel("ECDF")
        ax.legend()
        fig.tight_layout()
        images.append(out / "nll-ecdf.png")
        fig.savefig(images[-1], dpi=100)
        plt.close(fig)

        deltas = cand - stab
        order = np.argsort(deltas)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(
            np.arange(deltas.size),
            deltas[order],
            color=["#c0392b" if d > 0 else "#2e86c1" for d in deltas[order]],
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("example (sorted)")
        ax.set_ylabel("NLL candidate − stable (nats/token)")
        fig.tight_layout()
        images.append(out / "nll-deltas.png")
        fig.savefig(images[-1], dpi=100)
        plt.close(fig)
    if m.drift:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [d.quantization for d in m.drift]
        ax.bar(names, [d.mean_kl for d in m.drift], color="#7d3c98")
        ax.set_yscale("log")
        ax.set_ylabel(f"mean KL vs {m.drift[0].reference} (nats)")
        for i, d in enumerate(m.drift):
            ax.annotate(f"top-1 {d.top1_agreement:.0%}", (i, d.mean_kl), ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        images.append(out / "drift-kl.png")
        fig.savefig(images[-1], dpi=100)
        plt.close(fig)
    return images


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _markdown(verdict: Verdict, m: Measurement, images: list[Path]) -> str:
    lines = [
        f"# Evaluation: {m.candidate.name} {m.candidate.version} vs {m.stable.name} {m.stable.version}",
        "",
        f"**Outcome: {verdict.outcome}** — {verdict.reason}",
        "",
        f"Candidate GGUF `{m.candidate.gguf}`, stable GGUF `{m.stable.gguf}`; "
        f"{m.examples} golden example(s).",
        "",
        "| component | outcome | reason |",
        "|---|---|---|",
        *[f"| {c.name} | {c.outcome} | {c.reason} |" for c in verdict.components],
        "",
    ]
    for c in verdict.components:
        if c.values:
            lines += [f"## {c.name}", "", "| value | |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in c.values.items()]
            lines.append("")
    bad = [a for a in m.candidate.answers if a.degenerate or not all(ok for _, ok in a.checks)]
    if bad:
        lines += [
            "## Candidate answers that failed a check or degenerated",
            "",
            "| id | answer | failed |",
            "|---|---|---|",
        ]
        for a in bad[:50]:
            failed = [lbl for lbl, ok in a.checks if not ok]
            flags = [f for f in ("empty", "truncated", "looping") if getattr(a, f)]
            text = a.text.replace("|", "\\|").replace("\n", " ")[:120]
            lines.append(f"| {a.id} | {text} | {', '.join(failed + flags)} |")
        lines.append("")
    for img in images:
        lines += [f"![{img.stem}]({img.name})", ""]
    return "\n".join(lines)


def write_report(verdict: Verdict, measurement: Measurement, out_dir: Path) -> ReportFiles:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        data = {
            "verdict": verdict.model_dump(mode="json", by_alias=True),
            "measurement": measurement.model_dump(mode="json"),
        }
        verdict_json = out / "verdict.json"
        verdict_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        images = _plots(measurement, out)
        md = out / "report.md"
        md.write_text(_markdown(verdict, measurement, images), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the evaluation report: {exc}") from exc
    logger.info("evaluation report in %s", out)
    return ReportFiles(verdict_json=verdict_json, markdown=md, images=tuple(images))
