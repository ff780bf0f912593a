"""The README's main command path: ``ggufship demo`` end to end on the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end_twice(tmp_path: Path) -> None:
    """export → sign → publish (KFP pipeline under kfp.local), a canary that promotes, a
    latency-regressed canary that the gate rolls back, and a quality-regressed release (an
    over-refusing fine-tune at normal speed) that `evaluate` stops before sign/publish and whose
    canary, forced through, the online quality signals abort; every service stopped at the end. Twice in the
    same workdir: a re-run starts clean (it used to retry its publish for ~4 minutes, then fail
    with exit 70: the GitOps record of 1.0.0 held the first run's signature)."""
    workdir = tmp_path / "demo"
    for run in (1, 2):
        _check_run(workdir, run)


def _check_run(workdir: Path, run: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "-q", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"run {run}: " + proc.stderr[-4000:]
    out = proc.stdout
    assert "release 1.0.0 (pipeline: export → sign → publish)" in out
    assert "s3_uri: s3://ggufship-models/models/tiny-llama-demo/1.0.0/" in out
    assert "canary: promoted (gate passed)" in out
    assert "rollout: Degraded" in out
    # the quality-regressed release: stopped by evaluate inside the pipeline, before sign/publish
    assert "quality-regressed release 1.2.0" in out
    assert "  evaluate: fail — pipeline stopped before sign and publish (exit code 75" in out
    assert "1.2.0" not in "".join(line for line in out.splitlines() if "s3_uri" in line)  # never published
    # ... and forced through with evaluation off: aborted on its refusal rate, not on latency
    quality = out.split("quality-regressed canary, forced through with evaluation off", 1)[1]
    assert "  rollout: Degraded" in quality
    assert "  gate rate-refusal: fail" in quality, quality
    assert "  gate ks-latency: " in quality and "  gate ks-latency: fail" not in quality, quality
    # kfp.local prints each task's outputs to stdout too ("    report: Markdown(...)"): take the summary's.
    reports = [line[len("  report: ") :] for line in out.splitlines() if line.startswith("  report: /")]
    assert len(reports) >= 2 and all(Path(r).is_file() for r in reports), reports
    status = json.loads((workdir / "services" / "rollout" / "status.json").read_text())
    assert status["phase"] == "Degraded" and status["aborted"]
    assert status["load"]["ok"] == status["load"]["requests"] > 0  # the abort failed no client request
    # every API process of the three rollouts ran with the demo's one llama.cpp thread (two 2-thread
    # processes on a 2-core machine made the quality canary's latency check fail 1 run in 5)
    loads = [
        line
        for log in sorted((workdir / "services" / "rollout" / "logs").glob("*.log"))
        for line in log.read_text(encoding="utf-8").splitlines()
        if "ggufship.serve._batch: loading " in line
    ]
    assert len(loads) >= 6 and all(line.endswith("1 thread(s)") for line in loads), loads
    state_file = workdir / "services" / "state.json"
    if state_file.exists():
        assert json.loads(state_file.read_text())["services"] == {}, "demo stops the services it started"
