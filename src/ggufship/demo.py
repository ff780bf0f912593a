"""The demo behind ``ggufship demo``: generated fine-tune → export → verify.

Later stages (sign, publish, serve, rollout) extend this same path.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from ggufship.demo_checkpoint import build_checkpoint, build_lora_adapter
from ggufship.export import ExportRequest, export_checkpoint
from ggufship.integrity import verify_export
from ggufship.progress import Reporter

logger = logging.getLogger(__name__)


def _demo_release(workdir: Path) -> Path:
    data_dir = workdir / "dataset"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.jsonl").write_text(
        '{"prompt": "What is GGUF?", "completion": "A file format for llama.cpp."}\n', encoding="utf-8"
    )
    spec = {
        "base_model": "ggufship/tiny-llama-demo",
        "base_model_relation": "adapter",
        "license": "apache-2.0",
        "description": "A tiny Llama-architecture demo model with a LoRA adapter, built on this machine.",
        "tags": ["demo"],
        "hyperparameters": {"learning_rate": 0.01, "lora_r": 4, "lora_alpha": 8, "steps": 4},
        "datasets": [{"name": "ggufship/demo-instructions", "uri": "file://dataset", "path": "dataset"}],
        "evaluations": [
            {"task": "text-generation", "dataset": "ggufship/demo-eval", "metrics": {"loss": 6.2}}
        ],
    }
    path = workdir / "release.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _sample(gguf: Path) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=128, verbose=False, seed=0)
    try:
        return str(llm("The quick brown fox", max_tokens=8, temperature=0.0)["choices"][0]["text"])
    finally:
        llm.close()


def run_demo(
    workdir: Path,
    *,
    checkpoint: Path | None = None,
    adapter: Path | None = None,
    reporter: Reporter | None = None,
) -> str:
    """Run the demo; return a short human summary."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint = workdir / "checkpoints" / "base"
        adapter = workdir / "checkpoints" / "lora"
        if not (checkpoint / "config.json").exists():
            logger.info("building a tiny seeded checkpoint and LoRA adapter in %s", checkpoint.parent)
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
            build_checkpoint(checkpoint)
            build_lora_adapter(checkpoint, adapter)
    release = _demo_release(workdir)
    out = workdir / "export"
    result = export_checkpoint(
        ExportRequest(
            checkpoint=checkpoint,
            out_dir=out,
            name="tiny-llama-demo",
            version="1.0.0",
            adapter=adapter,
            release=release,
            force=True,
        ),
        reporter,
    )
    report = verify_export(out)
    sample = _sample(out / "tiny-llama-demo-1.0.0-Q4_K_M.gguf")
    lines = [f"export: {out}"]
    lines += [f"  {f.path}  {f.size} bytes  sha256 {f.sha256}" for f in result.manifest.files]
    lines.append(f"verify: {len(report.checked)} files match manifest.json")
    lines.append(f"generate (Q4_K_M, random weights, so gibberish): {sample!r}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"
