"""The library call behind the pipeline's ``evaluate`` step (between export and sign).

Copies the export (KFP input artifacts are read-only), runs :func:`ggufship.evaluate.evaluate`
on the copy against the stable export with the release spec's golden set (recording the result
in the copy's manifest and card, so ``sign`` covers it), and writes the report. A failed
evaluation stops the run before sign and publish; an inconclusive one too unless
``on_inconclusive`` is ``continue``. Without a stable export the step is skipped explicitly
(first release): the copy carries no evaluation and the step's metadata says ``skipped``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ggufship.errors import UsageError
from ggufship.pipeline.steps import PipelineStepError, model_metadata

logger = logging.getLogger(__name__)

ON_INCONCLUSIVE = ("stop", "continue")


class EvaluationFailedError(PipelineStepError):
    """The candidate failed ``evaluate``: the release stops before sign and publish."""

    exit_code = 75


class EvaluationInconclusiveError(PipelineStepError):
    """``evaluate`` was inconclusive and the pipeline's ``on_inconclusive`` is ``stop``."""

    exit_code = 76


def evaluate_step(
    *,
    export_dir: str,
    out_dir: str,
    report_dir: str,
    stable_export: str = "",
    release: str = "",
    release_repo: str = "",
    release_revision: str = "",
    on_inconclusive: str = "stop",
) -> dict[str, Any]:
    if on_inconclusive not in ON_INCONCLUSIVE:
        raise UsageError(f"on_inconclusive {on_inconclusive!r}: use one of {', '.join(ON_INCONCLUSIVE)}")
    src, dst, report = Path(export_dir), Path(out_dir), Path(report_dir)
    if dst.exists() and any(dst.iterdir()):
        raise PipelineStepError(f"evaluate: output {dst} is not empty")
    report.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    outcome, reason, metrics = "skipped", "no stable export given (evaluate_against is empty)", {}
    try:
        if stable_export:
            if not release:
                raise UsageError("evaluate: a release spec with a golden_set is required (release is empty)")
            import tempfile

            from ggufship.evaluate import EvaluateRequest, evaluate
            from ggufship.pipeline.inputs import resolve_release_input

            with tempfile.TemporaryDirectory(prefix="ggufship-inputs-") as inputs:
                result = evaluate(
                    EvaluateRequest(
                        candidate=tmp,
                        stable=Path(stable_export),
                        release=resolve_release_input(
                            release, Path(inputs), repo=release_repo, revision=release_revision
                        ),
                        report_dir=report,
                    )
                )
            outcome, reason, metrics = result.verdict.outcome, result.verdict.reason, result.record.metrics
        else:
            logger.warning("evaluate: %s — skipped", reason)
            (report / "report.md").write_text(f"# Evaluation\n\n**skipped**: {reason}\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if outcome == "fail":
        raise EvaluationFailedError(f"evaluate: the candidate failed: {reason} (report: {report})")
    if outcome == "inconclusive" and on_inconclusive == "stop":
        raise EvaluationInconclusiveError(
            f"evaluate: inconclusive ({reason}); set on_inconclusive=continue to go on (report: {report})"
        )
    meta = model_metadata(dst)
    meta["evaluation"] = outcome
    meta.update({f"evaluation.{k}": v for k, v in metrics.items()})
    return meta
