"""Run llama.cpp's HF→GGUF converter in a subprocess and follow its progress."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ggufship.errors import ConversionError
from ggufship.toolchain import LlamaCppToolchain

logger = logging.getLogger(__name__)


def convert_to_f16(
    toolchain: LlamaCppToolchain,
    checkpoint: Path,
    outfile: Path,
    *,
    model_name: str,
    metadata_override: dict[str, object],
    extra_kv: dict[str, str],
    work: Path,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Convert ``checkpoint`` to an F16 GGUF at ``outfile``.

    ``metadata_override`` goes through the converter's own ``--metadata``
    mechanism (``general.*``); ``extra_kv`` adds ``ggufship.*`` strings.
    """
    # The converter runs with ``work`` as its cwd: every path it gets is absolute.
    checkpoint, outfile, work = checkpoint.absolute(), outfile.absolute(), work.absolute()
    meta_path = work / "metadata-override.json"
    meta_path.write_text(json.dumps(metadata_override, sort_keys=True, indent=2), encoding="utf-8")
    extra_path = work / "extra-kv.json"
    extra_path.write_text(json.dumps(extra_kv, sort_keys=True), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "ggufship.export._convert_runner",
        str(toolchain.root),
        str(extra_path),
        "--",
        str(checkpoint),
        "--outfile",
        str(outfile),
        "--outtype",
        "f16",
        "--model-name",
        model_name,
        "--metadata",
        str(meta_path),
    ]
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env["TQDM_DISABLE"] = "1"
    logger.debug("running %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.debug("converter: %s", line)
            if "-->" in line and on_tensor is not None:
                on_tensor(line.split(":", 2)[-1].split(",", 1)[0].strip())
        rc = proc.wait()
    if rc != 0:
        errors = [ln for ln in tail if "ERROR" in ln or "Error" in ln or "error" in ln] or list(tail)[-8:]
        raise ConversionError(
            f"{checkpoint}: llama.cpp converter failed (exit {rc}): " + " | ".join(errors[-6:])
        )
    if not outfile.exists():
        raise ConversionError(f"{checkpoint}: converter exited 0 but wrote no {outfile.name}")
