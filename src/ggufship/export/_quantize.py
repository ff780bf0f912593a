"""Quantize a GGUF with llama.cpp's quantizer through llama-cpp-python."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ggufship.errors import ConversionError, UsageError
from ggufship.toolchain import quantization_types

logger = logging.getLogger(__name__)

# llama.cpp's K-quants and i-quants work on super-blocks of 256 values per row.
QK_K = 256
_LOCK = threading.Lock()  # llama_log_set is process-global


def normalize_quant(name: str) -> str:
    """Canonical quant name (``q4_k_m`` → ``Q4_K_M``), or a clear error listing valid ones."""
    types = quantization_types()
    canon = name.strip().upper()
    if canon not in types:
        raise UsageError(f"--quant {name!r}: unknown quantization; valid: {', '.join(sorted(types))}")
    return canon


def needs_superblocks(quant: str) -> bool:
    return "_K" in quant or quant.startswith("IQ") or quant.startswith("TQ")


def kquant_fallback_note(quant: str, row_sizes: dict[str, int]) -> str | None:
    """Explain llama.cpp's per-tensor fallback when rows are not multiples of 256."""
    if not needs_superblocks(quant):
        return None
    bad = {k: v for k, v in row_sizes.items() if v % QK_K}
    if not bad:
        return None
    dims = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    return (
        f"{quant}: tensor rows must be multiples of {QK_K} for K-quants, but {dims}; "
        "llama.cpp falls back to a legacy quant type for those tensors (file still valid)"
    )


def quantize(src: Path, dst: Path, quant: str, *, on_tensor: Callable[[], None] | None = None) -> None:
    """Quantize ``src`` (F16 GGUF) to ``dst`` with type ``quant``."""
    import llama_cpp
    import llama_cpp._logger as llama_cpp_logger

    ftype = quantization_types()[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, os.cpu_count() or 1)
    messages: list[str] = []

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", errors="replace")
        messages.append(msg)
        if on_tensor is not None and msg.lstrip().startswith("[") and "]" in msg and "/" in msg.split("]")[0]:
            on_tensor()

    with _LOCK:
        llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            # Hand logging back to llama-cpp-python's own callback.
            llama_cpp.llama_log_set(llama_cpp_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0 or not dst.exists():
        detail = " ".join(m.strip() for m in messages if "error" in m.lower() or "failed" in m.lower())[-400:]
        raise ConversionError(f"{dst.name}: llama.cpp quantization to {quant} failed (rc={rc}): {detail}")
