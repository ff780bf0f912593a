"""The export stage: HF checkpoint (+ LoRA) → GGUF files, digests, manifest, model card.

Public front: :func:`export_checkpoint` with an :class:`ExportRequest`. The
engines live in the private modules of this package:

* ``_inspect``  — read configs and headers, fail early with file + problem
* ``_prepare``  — remap wrapper prefixes, merge LoRA with PEFT
* ``_convert``  — llama.cpp's ``convert_hf_to_gguf.py`` (subprocess)
* ``_quantize`` — llama.cpp's quantizer via ``llama_model_quantize``
* ``_parity``   — HF vs GGUF tokenization probes
* ``_card``     — Hugging Face model card
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ggufship.atomic import commit_dir, discard_dir, staging_dir
from ggufship.errors import OutputError, ReleaseSpecError, UsageError
from ggufship.export._card import render_card
from ggufship.export._convert import convert_to_f16
from ggufship.export._inspect import CheckpointInfo, inspect_checkpoint
from ggufship.export._parity import check_parity
from ggufship.export._prepare import prepare
from ggufship.export._quantize import kquant_fallback_note, normalize_quant, quantize
from ggufship.integrity import SIDECAR_SUFFIX, sha256_file, sidecar_text
from ggufship.manifest import (
    MANIFEST_NAME,
    AdapterInfo,
    Manifest,
    ManifestFile,
    SourceInfo,
    TensorRemap,
)
from ggufship.progress import Reporter
from ggufship.release import ReleaseSpec, load_release_spec
from ggufship.toolchain import find_toolchain, supported_architectures

logger = logging.getLogger(__name__)

DEFAULT_QUANTS: tuple[str, ...] = ("F16", "Q4_K_M")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ExportRequest:
    """Inputs of one export. ``quants`` are llama.cpp type names (``F16``, ``Q4_K_M``, ...)."""

    checkpoint: Path
    out_dir: Path
    name: str
    version: str
    adapter: Path | None = None
    quants: tuple[str, ...] = DEFAULT_QUANTS
    release: Path | None = None
    force: bool = False
    check_tokenizer: bool = True


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.manifest.warnings


def gguf_filename(name: str, version: str, quant: str) -> str:
    return f"{name}-{version}-{quant}.gguf"


def _validate(req: ExportRequest) -> tuple[str, ...]:
    if not NAME_PATTERN.match(req.name):
        raise UsageError(f"--name {req.name!r}: use lowercase letters, digits, '.', '_' or '-' (max 128)")
    if not VERSION_PATTERN.match(req.version):
        raise UsageError(f"--version {req.version!r}: use letters, digits, '.', '_', '+' or '-' (max 128)")
    if not req.quants:
        raise UsageError("--quant: at least one quantization is required")
    quants: list[str] = []
    for q in req.quants:
        canon = normalize_quant(q)
        if canon not in quants:
            quants.append(canon)
    return tuple(quants)


def _check_output(out_dir: Path, force: bool) -> None:
    parent = out_dir.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output parent directory does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output directory is not writable")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise OutputError(f"{out_dir}: exists and is not empty (use --force to replace it)")
        if not os.access(out_dir, os.W_OK):
            raise OutputError(f"{out_dir}: output directory is not writable")
    # access() says yes to root on most filesystems; a real probe does not lie.
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise OutputError(f"{parent}: output directory is not writable: {exc.strerror or exc}") from exc


def _base_model(spec: ReleaseSpec, info: CheckpointInfo) -> str | None:
    if spec.base_model:
        return spec.base_model
    candidates = []
    if info.adapter is not None:
        candidates.append(info.adapter.config.get("base_model_name_or_path"))
    candidates.append(info.config.get("_name_or_path"))
    for c in candidates:
        if isinstance(c, str) and _HUB_ID.match(c) and not Path(c).exists():
            return c
    return None


def _gguf_metadata(
    req: ExportRequest, spec: ReleaseSpec, info: CheckpointInfo, base_model: str | None
) -> tuple[dict[str, object], dict[str, str]]:
    from ggufship import __version__

    general: dict[str, object] = {"general.version": req.version}
    if spec.description:
        general["general.description"] = spec.description
    if spec.tags:
        general["general.tags"] = list(spec.tags)
    if spec.languages:
        general["general.languages"] = list(spec.languages)
    if base_model:
        general["general.base_models"] = [{"name": base_model}]
    if spec.datasets:
        general["general.datasets"] = [
            {"name": d.name, **({"repo_url": d.uri} if d.uri else {})} for d in spec.datasets
        ]
    extra = {
        "ggufship.version": __version__,
        "ggufship.release.name": req.name,
        "ggufship.release.version": req.version,
        "ggufship.source.checkpoint_sha256": info.checkpoint_sha256,
    }
    if spec.license:  # the converter's --metadata override has no license key
        extra["general.license"] = spec.license
    if info.adapter is not None:
        extra["ggufship.source.adapter_sha256"] = info.adapter.sha256
    if info.remap is not None:
        extra["ggufship.source.tensor_remap"] = json.dumps(
            {"from": info.remap.from_prefix, "to": info.remap.to_prefix}, sort_keys=True
        )
    if spec.hyperparameters:
        extra["ggufship.hyperparameters"] = json.dumps(spec.hyperparameters, sort_keys=True)
    if spec.datasets:
        extra["ggufship.datasets"] = json.dumps(
            [d.model_dump(mode="json", exclude={"path"}, exclude_none=True) for d in spec.datasets],
            sort_keys=True,
        )
    if spec.evaluations:
        extra["ggufship.evaluations"] = json.dumps(
            [e.model_dump(mode="json") for e in spec.evaluations], sort_keys=True
        )
    return general, extra


def _load_spec(req: ExportRequest) -> ReleaseSpec:
    if req.release is None:
        return ReleaseSpec()
    spec = load_release_spec(req.release)
    if spec.name is not None and spec.name != req.name:
        raise ReleaseSpecError(f"{req.release}: name {spec.name!r} disagrees with --name {req.name!r}")
    if spec.version is not None and spec.version != req.version:
        raise ReleaseSpecError(
            f"{req.release}: version {spec.version!r} disagrees with --version {req.version!r}"
        )
    return spec


def export_checkpoint(req: ExportRequest, reporter: Reporter | None = None) -> ExportResult:
    """Export a checkpoint; all-or-nothing (a failure leaves no output behind)."""
    reporter = reporter or Reporter(enabled=False)
    quants = _validate(req)
    out_dir = Path(req.out_dir).absolute()
    _check_output(out_dir, req.force)
    spec = _load_spec(req)
    toolchain = find_toolchain()
    # Absolute: the converter runs in a scratch working directory (a relative path would point there).
    info = inspect_checkpoint(
        Path(req.checkpoint).absolute(),
        supported_architectures(toolchain),
        adapter=Path(req.adapter).absolute() if req.adapter is not None else None,
        base_model_hint=spec.base_model,
    )
    warnings = list(info.warnings)
    base_model = _base_model(spec, info)
    relation = spec.base_model_relation or ("adapter" if info.adapter is not None else "finetune")
    general, extra = _gguf_metadata(req, spec, info, base_model)
    row_sizes = {
        k: int(info.config[k])
        for k in ("hidden_size", "intermediate_size")
        if isinstance(info.config.get(k), int)
    }

    timings: dict[str, float] = {}
    staging = staging_dir(out_dir)
    hashes: dict[str, Future[tuple[str, int]]] = {}
    hash_seconds = 0.0

    def _hash(path: Path) -> tuple[str, int]:
        nonlocal hash_seconds
        t0 = time.perf_counter()
        try:
            return sha256_file(path)
        finally:
            hash_seconds += time.perf_counter() - t0

    try:
        with (
            tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.work-", dir=out_dir.parent) as work_s,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher,
            reporter.session(),
        ):
            work = Path(work_s)
            t0 = time.perf_counter()
            if info.remap is not None or info.adapter is not None:
                with reporter.task("prepare (remap/merge)", total=None):
                    prepared = prepare(info, work)
            else:
                prepared = info.path
            timings["merge"] = time.perf_counter() - t0

            f16_name = gguf_filename(req.name, req.version, "F16")
            f16_path = (staging if "F16" in quants else work) / f16_name
            t0 = time.perf_counter()
            with reporter.task("convert → F16", total=info.n_tensors) as task:
                convert_to_f16(
                    toolchain,
                    prepared,
                    f16_path,
                    model_name=req.name,
                    metadata_override=general,
                    extra_kv=extra,
                    work=work,
                    on_tensor=lambda _name: task.advance(),
                )
            timings["convert"] = time.perf_counter() - t0
            if "F16" in quants:
                hashes[f16_name] = hasher.submit(_hash, f16_path)

            if req.check_tokenizer:
                mismatches = check_parity(prepared, f16_path)
                if mismatches:
                    msg = (
                        f"tokenizer parity: {len(mismatches)} probe string(s) tokenize differently in the "
                        "GGUF than with the HF tokenizer: " + "; ".join(m.describe() for m in mismatches)
                    )
                    logger.warning(msg)
                    warnings.append(msg)

            t0 = time.perf_counter()
            for quant in quants:
                if quant == "F16":
                    continue
                note = kquant_fallback_note(quant, row_sizes)
                if note:
                    logger.warning(note)
                    warnings.append(note)
                name = gguf_filename(req.name, req.version, quant)
                with reporter.task(f"quantize → {quant}", total=info.n_tensors) as task:
                    quantize(f16_path, staging / name, quant, on_tensor=task.advance)
                hashes[name] = hasher.submit(_hash, staging / name)
            timings["quantize"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            with reporter.task("sha256", total=len(hashes)) as task:
                digests: dict[str, tuple[str, int]] = {}
                for name, fut in hashes.items():
                    digests[name] = fut.result()
                    task.advance()
            timings["hash_wait"] = time.perf_counter() - t0
            timings["hash"] = hash_seconds

        files: list[ManifestFile] = []
        card_rows: list[tuple[str, str, int, str]] = []
        for quant in quants:
            name = gguf_filename(req.name, req.version, quant)
            digest, size = digests[name]
            (staging / (name + SIDECAR_SUFFIX)).write_text(sidecar_text(digest, name), encoding="utf-8")
            files.append(ManifestFile(path=name, sha256=digest, size=size, kind="gguf", quantization=quant))
            card_rows.append((name, quant, size, digest))

        provenance = {"source checkpoint sha256": info.checkpoint_sha256, "architecture": info.architecture}
        if info.adapter is not None:
            provenance["LoRA adapter sha256 (merged)"] = info.adapter.sha256
        if info.remap is not None:
            provenance["tensor names remapped"] = f"{info.remap.from_prefix!r} → {info.remap.to_prefix!r}"
        provenance["llama.cpp (llama-cpp-python)"] = toolchain.version
        card = render_card(
            name=req.name,
            version=req.version,
            spec=spec,
            base_model=base_model,
            relation=relation,
            files=card_rows,
            provenance=provenance,
            warnings=warnings,
        )
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        card_digest, card_size = sha256_file(staging / CARD_NAME)
        files.append(ManifestFile(path=CARD_NAME, sha256=card_digest, size=card_size, kind="model-card"))

        from ggufship import __version__

        manifest = Manifest(
            name=req.name,
            version=req.version,
            base_model=base_model,
            files=tuple(files),
            source=SourceInfo(
                checkpoint_sha256=info.checkpoint_sha256,
                architecture=info.architecture,
                weights_format=info.weights_format,
                tensor_remap=(
                    TensorRemap(
                        from_prefix=info.remap.from_prefix,
                        to_prefix=info.remap.to_prefix,
                        tensors=info.remap.count,
                    )
                    if info.remap
                    else None
                ),
                adapter=(
                    AdapterInfo(
                        sha256=info.adapter.sha256,
                        peft_type=str(info.adapter.config.get("peft_type")),
                        base_model_name_or_path=info.adapter.config.get("base_model_name_or_path"),
                        target_modules=info.adapter.target_modules,
                        r=info.adapter.config.get("r"),
                        lora_alpha=info.adapter.config.get("lora_alpha"),
                    )
                    if info.adapter
                    else None
                ),
            ),
            metadata={
                "base_model_relation": relation,
                "license": spec.license,
                "description": spec.description,
                "hyperparameters": dict(sorted(spec.hyperparameters.items())),
                "datasets": [d.model_dump(mode="json", exclude_none=True) for d in spec.datasets],
                "evaluations": [e.model_dump(mode="json") for e in spec.evaluations],
                "tags": list(spec.tags),
            },
            toolchain={"ggufship": __version__, "llama-cpp-python": toolchain.version},
            warnings=tuple(warnings),
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        commit_dir(staging, out_dir)  # fsync, rename into place (replacing a --force'd out_dir)
    except BaseException:
        discard_dir(staging)
        raise
    logger.info("exported %s %s to %s (%s)", req.name, req.version, out_dir, ", ".join(quants))
    return ExportResult(out_dir=out_dir, manifest=manifest, timings=timings)
