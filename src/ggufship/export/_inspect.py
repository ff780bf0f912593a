"""Inspect a checkpoint (and adapter) before any conversion.

Everything here reads headers and configs only; no weights are loaded. Each
problem raises :class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ggufship.errors import CheckpointError
from ggufship.integrity import tree_digest

logger = logging.getLogger(__name__)

WeightsFormat = Literal["safetensors", "safetensors-sharded", "pytorch-bin"]

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PT_BIN = "pytorch_model.bin"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Wrapper prefixes seen in the wild (multimodal "llm.", PEFT "base_model.model.").
_WRAPPER_HINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.$")


@dataclass(frozen=True)
class Remap:
    """Rename tensors starting with ``from_prefix`` to start with ``to_prefix``."""

    from_prefix: str
    to_prefix: str
    count: int

    def apply(self, name: str) -> str:
        if name.startswith(self.from_prefix):
            return self.to_prefix + name[len(self.from_prefix) :]
        return name


@dataclass(frozen=True)
class AdapterCheck:
    path: Path
    config: dict[str, Any]
    weights_file: Path
    sha256: str
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """What inspection learned; consumed by the preparation and conversion steps."""

    path: Path
    config: dict[str, Any]
    architecture: str
    weights_format: WeightsFormat
    weight_files: tuple[Path, ...]
    tensor_shapes: dict[str, tuple[int, ...]]
    tensor_files: dict[str, Path]
    checkpoint_sha256: str
    remap: Remap | None = None
    adapter: AdapterCheck | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def n_tensors(self) -> int:
        return len(self.tensor_shapes)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing ({what})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON in {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Header-only read of a safetensors file, with the data extent checked."""
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: weights file missing") from exc
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from exc
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        missing = 8 + header_len + data_end - size
        raise CheckpointError(f"{path}: truncated safetensors file ({missing} bytes of tensor data missing)")
    try:
        with safe_open(str(path), framework="pt") as st:
            return {name: tuple(st.get_slice(name).get_shape()) for name in st.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from exc


def _torch_bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(f"{path}: unreadable PyTorch weights: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _read_weights(
    ckpt: Path,
) -> tuple[WeightsFormat, list[Path], dict[str, tuple[int, ...]], dict[str, Path]]:
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    index = ckpt / _SAFETENSORS_INDEX
    if index.exists():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted({ckpt / str(f) for f in weight_map.values()})
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{file}: shard listed in {index.name} is missing")
            for name, shape in _safetensors_shapes(file).items():
                shapes[name] = shape
                where[name] = file
        listed = set(weight_map)
        if listed != set(shapes):
            absent = sorted(listed - set(shapes))[:5]
            extra = sorted(set(shapes) - listed)[:5]
            raise CheckpointError(
                f"{index}: weight_map disagrees with the shards (listed but absent: {absent}; "
                f"present but unlisted: {extra})"
            )
        for name, file in where.items():
            if ckpt / weight_map[name] != file:
                raise CheckpointError(
                    f"{index}: {name} is listed in {weight_map[name]} but found in {file.name}"
                )
        return "safetensors-sharded", files, shapes, where
    single = ckpt / _SAFETENSORS
    if single.exists():
        shapes = _safetensors_shapes(single)
        return "safetensors", [single], shapes, dict.fromkeys(shapes, single)
    pt = ckpt / _PT_BIN
    if pt.exists():
        shapes = _torch_bin_shapes(pt)
        return "pytorch-bin", [pt], shapes, dict.fromkeys(shapes, pt)
    others = sorted(p.name for p in ckpt.glob("*.safetensors")) + sorted(p.name for p in ckpt.glob("*.bin"))
    hint = f" (found {', '.join(others)}; sharded checkpoints need {_SAFETENSORS_INDEX})" if others else ""
    raise CheckpointError(
        f"{ckpt}: no weights: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX} or {_PT_BIN}{hint}"
    )


def _expected_shapes(config_path: Path) -> tuple[dict[str, tuple[int, ...]], set[str], bool] | None:
    """Tensor names/shapes the architecture has per config.json (meta device, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_path.parent)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # unknown to this transformers: skip the shape check, say so
        logger.warning("%s: cannot build the architecture to check shapes (%s); skipping", config_path, exc)
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules = {name for name, _ in model.named_modules() if name}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return expected, modules, tied


def _find_remap(names: set[str], expected: set[str]) -> Remap | None:
    """Find one prefix substitution that maps the checkpoint's names onto the expected ones."""
    unmatched = sorted(names - expected)
    if not unmatched:
        return None
    candidates: dict[tuple[str, str], int] = {}
    probe = unmatched[0]
    for exp in expected:
        parts_a, parts_b = probe.split("."), exp.split(".")
        common = 0
        while common < min(len(parts_a), len(parts_b)) and parts_a[-1 - common] == parts_b[-1 - common]:
            common += 1
        if common == 0:
            continue
        from_p = ".".join(parts_a[: len(parts_a) - common])
        to_p = ".".join(parts_b[: len(parts_b) - common])
        from_p = from_p + "." if from_p else ""
        to_p = to_p + "." if to_p else ""
        if from_p and _WRAPPER_HINT.match(from_p):
            candidates[(from_p, to_p)] = common
    for from_p, to_p in sorted(candidates, key=lambda c: (-candidates[c], len(c[0]))):
        mapped = {to_p + n[len(from_p) :] if n.startswith(from_p) else n for n in names}
        if mapped <= expected:
            count = sum(1 for n in names if n.startswith(from_p))
            return Remap(from_prefix=from_p, to_prefix=to_p, count=count)
    return None


def _module_matches(target: str, modules: set[str]) -> bool:
    return any(m == target or m.endswith("." + target) for m in modules)


def _inspect_adapter(
    adapter: Path,
    ckpt: Path,
    config: dict[str, Any],
    expected: dict[str, tuple[int, ...]] | None,
    modules: set[str] | None,
    base_model_hint: str | None,
) -> tuple[AdapterCheck, list[str]]:
    warnings: list[str] = []
    if not adapter.is_dir():
        raise CheckpointError(f"{adapter}: adapter directory does not exist")
    cfg_path = adapter / _ADAPTER_CONFIG
    cfg = _read_json(cfg_path, "PEFT adapter config")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    weights = next((adapter / w for w in _ADAPTER_WEIGHTS if (adapter / w).exists()), None)
    if weights is None:
        raise CheckpointError(f"{adapter}: no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    shapes = _safetensors_shapes(weights) if weights.suffix == ".safetensors" else _torch_bin_shapes(weights)

    # base_model_name_or_path: a local path must be this checkpoint; a hub id must
    # agree with what we know the base to be (release spec, config _name_or_path).
    base_ref = cfg.get("base_model_name_or_path")
    if base_ref:
        base_path = Path(str(base_ref))
        if base_path.is_absolute() or base_path.exists():
            if base_path.exists() and base_path.resolve() != ckpt.resolve():
                other = (
                    _read_json(base_path / "config.json", "config")
                    if (base_path / "config.json").exists()
                    else {}
                )
                if (
                    other
                    and other.get("architectures") == config.get("architectures")
                    and all(
                        other.get(k) == config.get(k)
                        for k in ("hidden_size", "num_hidden_layers", "vocab_size")
                    )
                ):
                    warnings.append(
                        f"{cfg_path}: base_model_name_or_path {base_ref} is another directory with the same "
                        f"architecture as {ckpt}; merging into {ckpt}"
                    )
                else:
                    raise CheckpointError(
                        f"{cfg_path}: adapter was trained on {base_ref}, not on {ckpt} "
                        f"(base_model_name_or_path differs and the configs do not match)"
                    )
        else:
            known = {str(x) for x in (base_model_hint, config.get("_name_or_path")) if x}
            if known and str(base_ref) not in known:
                raise CheckpointError(
                    f"{cfg_path}: base_model_name_or_path {base_ref!r} does not match the base "
                    f"({', '.join(sorted(known))})"
                )
            if not known:
                warnings.append(
                    f"{cfg_path}: base_model_name_or_path {base_ref!r} cannot be checked against {ckpt} "
                    "(set base_model in the release spec); relying on the shape check"
                )

    targets_raw = cfg.get("target_modules") or []
    targets = (targets_raw,) if isinstance(targets_raw, str) else tuple(str(t) for t in targets_raw)
    if modules is not None:
        if isinstance(targets_raw, str):
            if not any(re.fullmatch(targets_raw, m) for m in modules):
                raise CheckpointError(
                    f"{cfg_path}: target_modules regex {targets_raw!r} matches no module of the base"
                )
        else:
            absent = [t for t in targets if not _module_matches(t, modules)]
            if absent:
                raise CheckpointError(f"{cfg_path}: target_modules {absent} do not exist in the base model")
    if expected is not None:
        for name, shape in sorted(shapes.items()):
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
            if not m:
                continue
            base_name = m.group(1) + ".weight"
            if base_name not in expected:
                raise CheckpointError(
                    f"{weights}: {name} adapts {base_name}, which the base model does not have"
                )
            out_f, in_f = expected[base_name][0], expected[base_name][-1]
            got = shape[1] if m.group(2) == "A" else shape[0]
            want = in_f if m.group(2) == "A" else out_f
            if len(shape) != 2 or got != want:
                raise CheckpointError(
                    f"{weights}: {name} has shape {list(shape)}, incompatible with base {base_name} "
                    f"{list(expected[base_name])} (adapter for a different base?)"
                )
    digest = tree_digest(adapter, [p for p in adapter.iterdir() if p.is_file() and p.name != "README.md"])
    return AdapterCheck(adapter, cfg, weights, digest, targets), warnings


def inspect_checkpoint(
    ckpt: Path,
    supported: frozenset[str],
    *,
    adapter: Path | None = None,
    base_model_hint: str | None = None,
) -> CheckpointInfo:
    """Check everything the conversion will rely on; raise before any output exists."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory does not exist")
    config_path = ckpt / "config.json"
    config = _read_json(config_path, "model config")
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise CheckpointError(f"{config_path}: no 'architectures' list; cannot pick a converter")
    arch = str(archs[0])
    if arch not in supported:
        raise CheckpointError(
            f"{config_path}: architecture {arch!r} is not supported by llama.cpp's converter "
            f"({len(supported)} text architectures are; see `ggufship export --list-architectures`)"
        )
    if not any((ckpt / t).exists() for t in _TOKENIZER_FILES):
        raise CheckpointError(f"{ckpt}: no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    for tok_file in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt / tok_file).exists():
            _read_json(ckpt / tok_file, "tokenizer file")

    fmt, files, shapes, where = _read_weights(ckpt)
    warnings: list[str] = []
    remap: Remap | None = None
    meta = _expected_shapes(config_path)
    expected: dict[str, tuple[int, ...]] | None = None
    modules: set[str] | None = None
    if meta is not None:
        expected, modules, tied = meta
        remap = _find_remap(set(shapes), set(expected))
        if remap is not None:
            logger.info("remapping %d tensors: %r -> %r", remap.count, remap.from_prefix, remap.to_prefix)
            shapes = {remap.apply(k): v for k, v in shapes.items()}
            where = {remap.apply(k): v for k, v in where.items()}
        unknown = sorted(set(shapes) - set(expected))
        if unknown:
            raise CheckpointError(
                f"{where[unknown[0]]}: {len(unknown)} tensor(s) not in a {arch} with this config.json "
                f"(first: {unknown[0]})"
            )
        optional = {"lm_head.weight"} if tied else set()
        missing = sorted(set(expected) - set(shapes) - optional)
        if missing:
            raise CheckpointError(
                f"{ckpt}: {len(missing)} tensor(s) that config.json implies are missing (first: {missing[0]})"
            )
        for name, shape in sorted(shapes.items()):
            if shape != expected[name]:
                raise CheckpointError(
                    f"{where[name]}: tensor {name} has shape {list(shape)}, but config.json implies "
                    f"{list(expected[name])}"
                )
    adapter_check = None
    if adapter is not None:
        adapter_check, adapter_warnings = _inspect_adapter(
            Path(adapter), ckpt, config, expected, modules, base_model_hint
        )
        warnings.extend(adapter_warnings)
    digest = tree_digest(ckpt, [p for p in ckpt.iterdir() if p.is_file() and not p.name.startswith(".")])
    return CheckpointInfo(
        path=ckpt,
        config=config,
        architecture=arch,
        weights_format=fmt,
        weight_files=tuple(files),
        tensor_shapes=shapes,
        tensor_files=where,
        checkpoint_sha256=digest,
        remap=remap,
        adapter=adapter_check,
        warnings=tuple(warnings),
    )
