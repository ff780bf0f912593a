"""The evaluate stage: measure a candidate export against the stable one on a golden set, on the
GGUF files themselves (llama.cpp through llama-cpp-python), before signing.

describe → measure → decide → record → report::

    request = EvaluateRequest(candidate=Path("out/tiny-1.1.0"), stable=Path("out/tiny-1.0.0"),
                              release=Path("release.yaml"))
    result = evaluate(request)          # result.verdict.outcome: pass | fail | inconclusive
    # manifest.json (field "evaluation") and README.md (model-index) of the candidate now hold it

Engines: ``_model`` (values, errors), ``_golden`` (JSONL golden set), ``_llama`` (llama.cpp:
NLL, logits, greedy answers), ``_checks`` (pure checks of answers), ``_measure`` (both tracks,
quantization drift), ``_stats`` (the pure decision core, :func:`decide`), ``_record``
(manifest + model card), ``_report`` (Markdown + PNG).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ggufship.evaluate._checks import REFUSAL_PATTERNS, is_looping, is_refusal, judge
from ggufship.evaluate._golden import load_golden_set
from ggufship.evaluate._model import (
    CHECK_TYPES,
    SCHEMA,
    Answer,
    ChatMessage,
    Check,
    Component,
    ContextOverflowError,
    EvaluateError,
    EvaluateInputError,
    EvaluatePolicy,
    ExampleScore,
    GoldenExample,
    GoldenSet,
    GoldenSetError,
    IncomparableExportsError,
    Measurement,
    QuantDrift,
    TrackMeasurement,
    Verdict,
)
from ggufship.evaluate._record import build_record, record_evaluation
from ggufship.evaluate._report import ReportFiles, write_report
from ggufship.evaluate._stats import decide
from ggufship.manifest import MANIFEST_NAME, Manifest, ManifestFile
from ggufship.measured import MeasuredEvaluation

logger = logging.getLogger(__name__)

__all__ = [
    "CHECK_TYPES",
    "REFUSAL_PATTERNS",
    "SCHEMA",
    "Answer",
    "ChatMessage",
    "Check",
    "Component",
    "ContextOverflowError",
    "EvaluateError",
    "EvaluateInputError",
    "EvaluatePolicy",
    "EvaluateRequest",
    "EvaluateResult",
    "ExampleScore",
    "GoldenExample",
    "GoldenSet",
    "GoldenSetError",
    "IncomparableExportsError",
    "Measurement",
    "QuantDrift",
    "ReportFiles",
    "TrackMeasurement",
    "Verdict",
    "build_record",
    "decide",
    "evaluate",
    "is_looping",
    "is_refusal",
    "judge",
    "load_golden_set",
    "measure",
    "record_evaluation",
    "write_report",
]

SIGNATURE_NAME = "model.sig"


@dataclass(frozen=True)
class EvaluateRequest:
    """One evaluation. The golden set comes from the release spec's ``golden_set`` (``release``)
    or directly from ``golden`` (then ``golden_fingerprint`` is checked when given).
    ``quant`` picks the GGUF whose NLL is compared (default: F16 when both exports have it,
    else the first quantization they share). ``record`` writes the result into the candidate's
    ``manifest.json`` and model card (refused once the candidate is signed)."""

    candidate: Path
    stable: Path
    release: Path | None = None
    golden: Path | None = None
    golden_name: str | None = None
    golden_fingerprint: str | None = None
    policy: EvaluatePolicy = field(default_factory=EvaluatePolicy)
    quant: str | None = None
    drift: bool = True
    record: bool = True
    report_dir: Path | None = None
    threads: int | None = None


@dataclass(frozen=True)
class EvaluateResult:
    verdict: Verdict
    measurement: Measurement
    record: MeasuredEvaluation
    report: ReportFiles | None = None


def _golden(request: EvaluateRequest) -> GoldenSet:
    if (request.release is None) == (request.golden is None):
        raise EvaluateInputError("give the golden set either through a release spec (--release) or --golden")
    if request.golden is not None:
        return load_golden_set(
            request.golden, name=request.golden_name, fingerprint=request.golden_fingerprint
        )
    from ggufship.release import load_release_spec

    spec = load_release_spec(request.release)  # type: ignore[arg-type]
    if spec.golden_set is None:
        raise GoldenSetError(f"{request.release}: golden_set: not declared (evaluate needs one)")
    return load_golden_set(
        spec.golden_set.path, name=spec.golden_set.name, fingerprint=spec.golden_set.fingerprint
    )


def _manifest(export: Path, role: str) -> Manifest:
    if not export.is_dir():
        raise EvaluateInputError(f"{role} {export}: not an export directory")
    from ggufship.integrity import verify_export

    verify_export(export)  # the bytes measured are the bytes listed (raises IntegrityError)
    return Manifest.load(export / MANIFEST_NAME)


def _pick(cand: Manifest, stable: Manifest, quant: str | None) -> tuple[ManifestFile, ManifestFile]:
    c = {f.quantization: f for f in cand.gguf_files()}
    s = {f.quantization: f for f in stable.gguf_files()}
    if quant is not None:
        q = quant.upper()
        for files, role in ((c, "candidate"), (s, "stable")):
            if q not in files:
                raise EvaluateInputError(
                    f"--quant {quant}: the {role} export has no {q} GGUF ({', '.join(map(str, files))})"
                )
        return c[q], s[q]
    common = [q for q in c if q in s]
    if not common:
        raise EvaluateInputError(
            f"candidate ({', '.join(map(str, c))}) and stable ({', '.join(map(str, s))}) "
            "share no quantization"
        )
    q = "F16" if "F16" in common else common[0]
    return c[q], s[q]


def measure(request: EvaluateRequest, golden: GoldenSet, cand: Manifest, stable: Manifest) -> Measurement:
    from ggufship.evaluate._llama import opened
    from ggufship.evaluate._measure import compare_identity, measure_drift, measure_track

    cand_file, stable_file = _pick(cand, stable, request.quant)
    if cand.source.architecture != stable.source.architecture:
        raise IncomparableExportsError(
            f"candidate {request.candidate} ({cand.source.architecture}) and stable {request.stable} "
            f"({stable.source.architecture}): other architectures, NLLs are not comparable"
        )
    policy = request.policy
    with (
        opened(request.candidate / cand_file.path, policy.n_ctx, request.threads) as cm,
        opened(request.stable / stable_file.path, policy.n_ctx, request.threads) as sm,
    ):
        compare_identity(cm.identity(), sm.identity(), cm.path, sm.path)
        stable_track = measure_track(sm, golden, policy, name=stable.name, version=stable.version)
        cand_track = measure_track(cm, golden, policy, name=cand.name, version=cand.version)
    drift: list[QuantDrift] = []
    note = None
    if request.drift:
        files = {f.quantization: f for f in cand.gguf_files()}
        reference = next((q for q in ("F16", "BF16", "F32") if q in files), None)
        others = [(str(q), request.candidate / f.path) for q, f in files.items() if q != reference]
        if reference is None:
            note = "the export keeps no F16/BF16/F32 GGUF: quantization drift not measured"
        elif others:
            drift = measure_drift(
                request.candidate / files[reference].path, others, golden, policy, threads=request.threads
            )
    else:
        note = "quantization drift not measured (disabled)"
    return Measurement(
        candidate=cand_track,
        stable=stable_track,
        examples=len(golden.examples),
        drift=tuple(drift),
        drift_note=note,
    )


def evaluate(request: EvaluateRequest) -> EvaluateResult:
    """Measure, decide, record into the candidate's manifest and card, write the report.
    A verdict (pass, fail or inconclusive) is a result, not an exception."""
    candidate, stable = Path(request.candidate), Path(request.stable)
    request = EvaluateRequest(**{**request.__dict__, "candidate": candidate, "stable": stable})
    golden = _golden(request)
    if request.record and (candidate / SIGNATURE_NAME).exists():
        raise EvaluateInputError(
            f"{candidate / SIGNATURE_NAME}: the candidate is already signed; evaluate before sign "
            "(recording would invalidate the signature), or pass record=False / --no-record"
        )
    cand_manifest = _manifest(candidate, "candidate")
    stable_manifest = _manifest(stable, "stable")
    measurement = measure(request, golden, cand_manifest, stable_manifest)
    verdict = decide(measurement, request.policy)
    logger.info("evaluate: %s — %s", verdict.outcome, verdict.reason)
    record = build_record(verdict, measurement, golden, stable)
    if request.record:
        record_evaluation(candidate, record)
    report = (
        write_report(verdict, measurement, request.report_dir) if request.report_dir is not None else None
    )
    return EvaluateResult(verdict=verdict, measurement=measurement, record=record, report=report)
