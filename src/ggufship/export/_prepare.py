"""Turn an inspected checkpoint into one the converter reads as-is.

Two optional steps, each into a fresh directory under the work dir: tensor
names are remapped (wrapper prefix stripped) and a LoRA adapter is merged with
PEFT's ``merge_and_unload``. Without either, the source is used in place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ggufship.errors import CheckpointError
from ggufship.export._inspect import CheckpointInfo

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy config and tokenizer files (everything but weights and their index)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.suffix in _WEIGHT_SUFFIXES or path.name in _WEIGHT_INDEXES:
            continue
        if path.name == "README.md":  # the source card is not ours to carry over
            continue
        shutil.copy2(path, dst / path.name)


def remap_tensors(info: CheckpointInfo, dst: Path) -> Path:
    """Write a copy of the checkpoint with remapped tensor names (safetensors)."""
    import torch
    from safetensors.torch import save_file

    if info.remap is None:
        raise CheckpointError("internal: remap_tensors called without a remap")
    _copy_side_files(info.path, dst)
    remap = info.remap
    if info.weights_format == "pytorch-bin":
        state = torch.load(info.weight_files[0], map_location="cpu", weights_only=True)
        save_file(
            {remap.apply(k): v.contiguous() for k, v in state.items()},
            str(dst / "model.safetensors"),
            metadata={"format": "pt"},
        )
        return dst
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    for file in info.weight_files:
        tensors = {}
        with safe_open(str(file), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                tensors[remap.apply(name)] = st.get_tensor(name)
        save_file(tensors, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    if info.weights_format == "safetensors-sharded":
        src_index = json.loads((info.path / "model.safetensors.index.json").read_text())
        src_index["weight_map"] = dict(sorted(weight_map.items()))
        (dst / "model.safetensors.index.json").write_text(json.dumps(src_index, indent=2) + "\n")
    return dst


def merge_adapter(base_dir: Path, info: CheckpointInfo, dst: Path) -> Path:
    """Merge the LoRA adapter into the base with PEFT and save a plain checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if info.adapter is None:
        raise CheckpointError("internal: merge_adapter called without an adapter")
    dtype_name = str(info.config.get("torch_dtype") or info.config.get("dtype") or "float32")
    save_dtype = getattr(torch, dtype_name, torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, info.adapter.path)
        merged = peft_model.merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{info.adapter.path}: PEFT could not merge the adapter: {exc}") from exc
    merged = merged.to(save_dtype)
    merged.save_pretrained(dst, safe_serialization=True)
    _copy_side_files(base_dir, dst)
    # save_pretrained rewrote config.json; keep the dtype the base declared.
    logger.info("merged adapter %s into %s", info.adapter.path, dst)
    return dst


def prepare(info: CheckpointInfo, work: Path) -> Path:
    """Return a directory the converter can read (the source itself when possible)."""
    current = info.path
    if info.remap is not None:
        current = remap_tensors(info, work / "remapped")
    if info.adapter is not None:
        current = merge_adapter(current, info, work / "merged")
    return current
