"""Record a measured evaluation in the candidate export: ``manifest.json`` (field ``evaluation``)
and the model card (``model-index``, a "Measured evaluation" section), with the card's digest
updated in the manifest. Both files are replaced together or not at all."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from importlib import metadata
from pathlib import Path

from ggufship.errors import OutputError
from ggufship.evaluate._model import EvaluateInputError, GoldenSet, Measurement, Verdict
from ggufship.integrity import SIDECAR_SUFFIX, sha256_file
from ggufship.manifest import MANIFEST_NAME, Manifest
from ggufship.measured import ComparedExport, GoldenSetRef, MeasuredEvaluation

logger = logging.getLogger(__name__)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def tool_versions() -> dict[str, str]:
    from ggufship import __version__

    return {
        "ggufship": __version__,
        "llama-cpp-python": _version("llama_cpp_python"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
    }


def build_record(verdict: Verdict, m: Measurement, golden: GoldenSet, stable_dir: Path) -> MeasuredEvaluation:
    metrics: dict[str, float] = {}
    for c in verdict.components:
        for key, value in c.values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"{c.name}.{key}"] = float(value)
    stable_manifest = Path(stable_dir) / MANIFEST_NAME
    skipped = set(m.candidate.skipped) | set(m.stable.skipped)
    return MeasuredEvaluation(
        outcome=verdict.outcome,
        reason=verdict.reason,
        gguf=m.candidate.gguf,
        golden_set=GoldenSetRef(
            name=golden.name,
            fingerprint=golden.fingerprint,
            examples=len(golden.examples),
            scored=len(m.candidate.scores),
            skipped_too_long=len(skipped),
        ),
        stable=ComparedExport(
            name=m.stable.name,
            version=m.stable.version,
            manifest_sha256=hashlib.sha256(stable_manifest.read_bytes()).hexdigest(),
            gguf=m.stable.gguf,
        ),
        metrics=metrics,
        components={c.name: c.outcome for c in verdict.components},
        policy=verdict.policy.model_dump(mode="json"),
        tools=tool_versions(),
    )


def _write_temp(directory: Path, name: str, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    Path(tmp).chmod(0o644)
    return Path(tmp)


def record_evaluation(export_dir: Path, record: MeasuredEvaluation) -> Manifest:
    """Write ``record`` into the export's manifest and model card (before signing)."""
    from ggufship.export._card import add_measured_evaluation

    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir / MANIFEST_NAME)
    card_entry = next((f for f in manifest.files if f.kind == "model-card"), None)
    temps: list[Path] = []
    try:
        files = list(manifest.files)
        card_tmp = None
        if card_entry is not None:
            card_path = export_dir / card_entry.path
            try:
                card = add_measured_evaluation(card_path.read_text(encoding="utf-8"), manifest.name, record)
            except (OSError, ValueError) as exc:
                raise EvaluateInputError(f"{card_path}: cannot update the model card: {exc}") from exc
            card_tmp = _write_temp(export_dir, card_entry.path, card)
            temps.append(card_tmp)
            digest, size = sha256_file(card_tmp)
            files = [
                f.model_copy(update={"sha256": digest, "size": size}) if f is card_entry else f for f in files
            ]
        updated = manifest.model_copy(update={"evaluation": record, "files": tuple(files)})
        updated = Manifest.model_validate(updated.model_dump(by_alias=True))
        manifest_tmp = _write_temp(export_dir, MANIFEST_NAME, updated.to_json())
        temps.append(manifest_tmp)
        if card_tmp is not None and card_entry is not None:
            card_path = export_dir / card_entry.path
            backup = card_path.read_bytes()
            card_tmp.replace(card_path)
            try:
                manifest_tmp.replace(export_dir / MANIFEST_NAME)
            except OSError:
                card_path.write_bytes(backup)
                raise
            if (export_dir / (card_entry.path + SIDECAR_SUFFIX)).exists():
                logger.warning("%s: a sidecar for the model card exists and is now stale", card_entry.path)
        else:
            manifest_tmp.replace(export_dir / MANIFEST_NAME)
    except OSError as exc:
        raise OutputError(f"{export_dir}: cannot record the evaluation: {exc}") from exc
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    logger.info("recorded evaluation (%s) in %s", record.outcome, export_dir / MANIFEST_NAME)
    return updated
