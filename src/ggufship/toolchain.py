"""llama.cpp's converter and gguf-py, as installed from the llama-cpp-python sdist.

``scripts/setup.sh`` extracts ``convert_hf_to_gguf.py``, its ``conversion/``
package, ``gguf-py/`` and the LICENSE from the very sdist that was compiled,
into ``<venv>/share/ggufship/llama.cpp`` (override: ``GGUFSHIP_LLAMA_CPP_DIR``),
so converter, GGUF writer and ``libllama`` come from one llama.cpp commit.
"""

from __future__ import annotations

import ast
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ggufship.errors import ToolchainError

LLAMA_CPP_DIR_ENV = "GGUFSHIP_LLAMA_CPP_DIR"
_REQUIRED = ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py", "LICENSE")


@dataclass(frozen=True)
class LlamaCppToolchain:
    """Paths and versions of the llama.cpp pieces ggufship drives."""

    root: Path
    version: str


def find_toolchain(root: Path | None = None) -> LlamaCppToolchain:
    """Locate the extracted converter; raise :class:`ToolchainError` if incomplete."""
    if root is None:
        env = os.environ.get(LLAMA_CPP_DIR_ENV)
        root = Path(env) if env else Path(sys.prefix) / "share" / "ggufship" / "llama.cpp"
    missing = [rel for rel in _REQUIRED if not (root / rel).exists()]
    if missing:
        raise ToolchainError(
            f"llama.cpp converter not found in {root} (missing: {', '.join(missing)}); "
            f"run `bash scripts/setup.sh` or set {LLAMA_CPP_DIR_ENV}"
        )
    version_file = root / ".version"
    version = version_file.read_text().strip() if version_file.exists() else "unknown"
    return LlamaCppToolchain(root=root, version=version)


@functools.cache
def _text_model_map(conversion_init: Path) -> dict[str, str]:
    tree = ast.parse(conversion_init.read_text(encoding="utf-8"))
    for node in tree.body:
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target == "TEXT_MODEL_MAP" and value is not None:
            mapping = ast.literal_eval(value)
            return {str(k): str(v) for k, v in mapping.items()}
    raise ToolchainError(f"{conversion_init}: TEXT_MODEL_MAP not found; unsupported converter layout")


def supported_architectures(toolchain: LlamaCppToolchain) -> frozenset[str]:
    """HF ``architectures`` names the bundled converter accepts for text models.

    Read from the converter's own registry without importing it (no torch import).
    """
    return frozenset(_text_model_map(toolchain.root / "conversion" / "__init__.py"))


def quantization_types() -> dict[str, int]:
    """Every llama.cpp file type this libllama supports, by name (``Q4_K_M`` → ftype)."""
    import llama_cpp

    types: dict[str, int] = {}
    for attr, value in vars(llama_cpp).items():
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attr.startswith(prefix) and isinstance(value, int):
                types[attr.removeprefix(prefix)] = value
    types.pop("GUESSED", None)
    return types
