"""The gate's report: ``verdict.json``, ``report.md`` and one ECDF plot per metric (PNG).

Everything is drawn from the verdict alone, so a report can be rebuilt from a
saved ``verdict.json`` (``ggufship gate report verdict.json``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ggufship.gate._errors import GateError
from ggufship.gate._model import Distribution, Series, Verdict

logger = logging.getLogger(__name__)

VERDICT_FILE = "verdict.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class ReportFiles:
    verdict: Path
    markdown: Path
    plots: tuple[Path, ...]


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` when the block succeeds and is
    removed when it fails, so a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write(path: Path, data: str | bytes) -> None:
    with _replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def _ecdf(counts: list[int]) -> list[float]:
    n = counts[-1] if counts else 0
    return [c / n for c in counts] if n else []


def _plot_distribution(dist: Distribution, path: Path) -> bool:
    """Two step ECDFs (stable, canary) over the finite bounds, KS distance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not dist.stable or not dist.canary or not dist.stable[-1] or not dist.canary[-1]:
        return False
    bounds = [float(le) for le in dist.le if le != "+Inf"]
    fs, fc = _ecdf(dist.stable)[: len(bounds)], _ecdf(dist.canary)[: len(bounds)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    try:
        ax.step(bounds, fs, where="post", label=f"stable (n={dist.stable[-1]})", color="tab:blue")
        ax.step(bounds, fc, where="post", label=f"canary (n={dist.canary[-1]})", color="tab:orange")
        if dist.ks_location is not None and dist.ks_location != "+Inf":
            x = float(dist.ks_location)
            i = bounds.index(x)
            lo, hi = sorted((fs[i], fc[i]))
            ax.vlines(x, lo, hi, colors="red", linewidth=2.5, label=f"KS D = {hi - lo:.3f} at le={x:g}")
        if bounds and bounds[0] > 0:
            ax.set_xscale("log")
        unit = {"completion_length": "tokens", "surprisal": "nats per token"}.get(dist.metric, "seconds")
        ax.set_xlabel(f"{dist.prometheus_name} ({unit}, bucket upper bound)")
        ax.set_ylabel("ECDF")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{dist.metric}: stable vs canary")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        with _replacing(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True


def _plot_series(series: Series, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series.stable or not series.canary:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    try:
        for values, label, color in (
            (series.stable, "stable", "tab:blue"),
            (series.canary, "canary", "tab:orange"),
        ):
            xs = sorted(values)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label, color=color)
        ax.set_xlabel(f"p{series.quantile * 100:g} of {series.metric} per step")
        ax.set_ylabel("ECDF")
        ax.set_title(f"{series.metric}: quantile-series (weaker method)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return True


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def render_markdown(verdict: Verdict, plots: dict[str, str]) -> str:
    """The human-readable report: outcome, checks, statistics, queries, plots."""
    p = verdict.policy
    lines = [
        f"# Canary gate: **{verdict.outcome.upper()}**",
        "",
        verdict.reason,
        "",
        f"- evaluated at: {verdict.evaluated_at.isoformat()}; window: {verdict.window_s:g} s",
        f"- Prometheus: {verdict.prometheus_url}",
        "- selector: " + ", ".join(f"{k}={v}" for k, v in verdict.selector.items() if v is not None),
        f"- method: {p.method}; alpha {p.alpha:g} over {p.planned_analyses} planned analyses "
        f"→ {verdict.alpha_per_analysis:.3g} per analysis (Holm across metrics); "
        f"effect floor D ≥ {p.min_ks_d:g} and median shift ≥ {p.min_median_shift:.0%}; "
        f"min_samples {p.min_samples}; {'two-sided' if p.two_sided else 'one-sided (canary slower)'}",
        "",
        "## Checks",
        "",
        "| check | outcome | value | limit | reason |",
        "|---|---|---|---|---|",
    ]
    for c in verdict.checks:
        lines.append(f"| {c.name} | {c.outcome} | {_fmt(c.value)} | {_fmt(c.limit)} | {c.reason} |")
    ks = [c for c in verdict.checks if c.kind in ("ks", "quantile-series") and c.outcome != "skipped"]
    if ks:
        lines += [
            "",
            "## Statistics",
            "",
            "| metric | n stable | n canary | D | p | p (Holm) | median stable | median canary | shift |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in ks:
            d = c.details
            lines.append(
                f"| {c.metric} | {_fmt(d.get('n_stable', d.get('points_stable')))} "
                f"| {_fmt(d.get('n_canary', d.get('points_canary')))} | {_fmt(c.value)} "
                f"| {_fmt(d.get('pvalue'))} | {_fmt(d.get('pvalue_holm'))} | {_fmt(d.get('median_stable'))} "
                f"| {_fmt(d.get('median_canary'))} | {_fmt(d.get('median_shift'))} |"
            )
    if plots:
        lines += ["", "## ECDFs", ""]
        for metric, name in plots.items():
            lines += [f"![{metric}]({name})", ""]
    lines += ["", "## Queries", ""]
    for q in verdict.queries:
        extra = f" → {_fmt(q.value)}" if q.value is not None else ""
        err = f" — **error**: {q.error}" if q.error else ""
        lines.append(f"- {q.purpose} ({q.kind}, {q.series} series{extra}){err}: `{q.query}`")
    if verdict.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in verdict.errors]
    lines += ["", f"Full numbers: `{VERDICT_FILE}`.", ""]
    return "\n".join(lines)


def write_report(verdict: Verdict, out_dir: Path | str) -> ReportFiles:
    """Write ``verdict.json``, the ECDF PNGs and ``report.md`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GateError(f"{out}: cannot create the report directory: {exc}") from exc
    plots: dict[str, str] = {}
    paths: list[Path] = []
    for dist in verdict.distributions:
        path = out / f"ecdf-{dist.metric}.png"
        if _plot_distribution(dist, path):
            plots[dist.metric] = path.name
            paths.append(path)
    for series in verdict.series:
        path = out / f"ecdf-series-{series.metric}.png"
        if _plot_series(series, path):
            plots[f"{series.metric} (series)"] = path.name
            paths.append(path)
    verdict_path = out / VERDICT_FILE
    _write(verdict_path, verdict.to_json())
    md = out / REPORT_FILE
    _write(md, render_markdown(verdict, plots))
    logger.info("gate report: %s", md)
    return ReportFiles(verdict=verdict_path, markdown=md, plots=tuple(paths))
