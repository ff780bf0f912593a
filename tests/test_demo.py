"""The README's main command path: ``ggufship demo`` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "-q", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verify: 3 files match manifest.json" in proc.stdout
    out = tmp_path / "demo" / "export"
    assert (out / "tiny-llama-demo-1.0.0-Q4_K_M.gguf").exists()
    assert "generate (Q4_K_M" in proc.stdout
