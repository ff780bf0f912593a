"""The local rollout's parts that need no model: plan, settings, status file, control files, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ggufship.cli.main import main
from ggufship.rollout import (
    RolloutError,
    RolloutNotRunningError,
    RolloutRequest,
    RolloutSettings,
    RolloutStatus,
    abort,
    plan_steps,
    promote,
    rollout_status,
    run_rollout,
)
from ggufship.rollout._status import (
    PROMOTE_FILE,
    StepRecord,
    rollout_dir,
    take_control,
    write_status,
)


def test_plan_mirrors_the_chart() -> None:
    assert [s.describe() for s in plan_steps((5, 50, 100))] == [
        "setWeight 5",
        "analysis",
        "pause",
        "setWeight 50",
        "analysis",
        "setWeight 100",
    ]
    assert [s.describe() for s in plan_steps((100,))] == ["setWeight 100"]
    assert [s.describe() for s in plan_steps((10, 100))] == [
        "setWeight 10",
        "analysis",
        "pause",
        "setWeight 100",
    ]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((5, 50), "the last canary weight must be 100"),
        ((50, 5, 100), "weights must rise strictly"),
        ((0, 100), "weights must rise strictly"),
        ((5, 5, 100), "weights must rise strictly"),
    ],
)
def test_bad_steps_name_the_field(steps: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        RolloutSettings(steps=steps)
    assert info.value.errors()[0]["loc"] == ("steps",)


def test_default_plan_is_the_charts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One plan, two executors: without overrides the local rollout runs the chart's values."""
    from ggufship.rollout import find_chart_values, load_plan

    monkeypatch.chdir(tmp_path)  # found through the checkout, not the working directory
    chart = load_plan(find_chart_values())
    plan = RolloutSettings().canary_plan()
    assert plan == chart and plan.source.endswith("charts/ggufship-api/values.yaml")
    overlay = tmp_path / "values.yaml"
    overlay.write_text("rollout: {canary: {steps: [{weight: 20}, {weight: 60, pause: 30s}]}}\n")
    mine = RolloutSettings(plan_files=(find_chart_values(), overlay)).canary_plan()
    assert mine.weights == (20, 60, 100) and mine.analysis == chart.analysis


def test_settings_bounds_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as info:
        RolloutSettings(analysis_count=0)
    assert info.value.errors()[0]["loc"] == ("analysis_count",)
    monkeypatch.setenv("GGUFSHIP_ROLLOUT_STEPS", "[10, 100]")
    monkeypatch.setenv("GGUFSHIP_ROLLOUT_GATE", '{"min_samples": 20}')
    s = RolloutSettings()
    assert s.steps == (10, 100) and s.gate == {"min_samples": 20}
    with pytest.raises(ValidationError, match="extra"):
        RolloutSettings(unknown_option=1)  # type: ignore[call-arg]


def test_bad_models_fail_before_anything_starts(tmp_path: Path, tiny_export_dir: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(RolloutError, match=r"canary .*missing: no such file or directory"):
        run_rollout(RolloutRequest(stable=tiny_export_dir, canary=tmp_path / "missing", state_dir=state))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RolloutError, match=r"stable .*empty: not an export directory \(no manifest.json"):
        run_rollout(RolloutRequest(stable=empty, canary=tiny_export_dir, state_dir=state))
    text = tmp_path / "model.txt"
    text.write_text("x")
    with pytest.raises(RolloutError, match=r"canary .*model.txt: not a .gguf file"):
        run_rollout(RolloutRequest(stable=tiny_export_dir, canary=text, state_dir=state))
    assert not state.exists(), "a refused rollout must not leave a state dir behind"


@pytest.fixture
def tiny_export_dir(tmp_path: Path) -> Path:
    """A directory that looks like an export to the request checks (manifest only; nothing is served)."""
    d = tmp_path / "tiny-1.0.0"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"name": "tiny", "version": "1.0.0"}))
    return d


def test_status_file_round_trip_and_controls(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(RolloutNotRunningError, match=r"status.json: no rollout status"):
        rollout_status(state)
    with pytest.raises(RolloutNotRunningError, match="no rollout status"):
        promote(state)

    status = RolloutStatus(steps=plan_steps((5, 50, 100)), phase="Paused", weight=5, pause_reason="manual")
    write_status(state, status)
    assert rollout_status(state) == status
    # this process runs "the rollout": promote leaves a control file that the loop consumes once
    promote(state)
    assert (rollout_dir(state) / PROMOTE_FILE).exists()
    assert take_control(state, "promote") is True
    assert take_control(state, "promote") is False
    abort(state)
    assert take_control(state, "abort") is True

    # a finished rollout, or one whose process is gone, cannot be controlled
    write_status(state, status.model_copy(update={"finished_at": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RolloutNotRunningError, match=r"no rollout is running .* finished"):
        abort(state)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    write_status(state, status.model_copy(update={"pid": int(gone.stdout)}))
    with pytest.raises(RolloutNotRunningError, match="its process is gone"):
        promote(state)
    assert not (rollout_dir(state) / PROMOTE_FILE).exists()


def test_invalid_status_file_names_the_file(tmp_path: Path) -> None:
    path = rollout_dir(tmp_path) / "status.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"phase": "Exploded"}')
    with pytest.raises(RolloutError, match=r"status.json: invalid rollout status file"):
        rollout_status(tmp_path)


def test_step_record_describe() -> None:
    assert StepRecord(kind="setWeight", weight=5).describe() == "setWeight 5"
    assert StepRecord(kind="pause").describe() == "pause"


# ---------------------------------------------------------------- CLI


def test_cli_status_and_control_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert main(["rollout", "status", "--state-dir", str(state)]) == 64
    assert main(["rollout", "promote", "--state-dir", str(state)]) == 64
    write_status(state, RolloutStatus(steps=plan_steps((5, 50, 100)), phase="Paused", weight=5))
    capsys.readouterr()
    assert main(["rollout", "status", "--state-dir", str(state), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["phase"] == "Paused" and out["weight"] == 5 and out["schema"] == "ggufship.rollout/v1"
    assert main(["rollout", "status", "--state-dir", str(state)]) == 0
    assert "phase Paused" in capsys.readouterr().out
    assert main(["rollout", "abort", "--state-dir", str(state)]) == 0  # this process is "the rollout"
    assert take_control(state, "abort")


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_export_dir: Path) -> None:
    def run(*argv: str) -> tuple[int, str]:
        code = main(["rollout", *argv])
        return code, capsys.readouterr().err

    model = str(tiny_export_dir)
    code, err = run(model)
    assert code == 2 and "rollout needs STABLE and CANARY" in err
    code, err = run(model, model, "--steps", "5,x")
    assert code == 2 and "--steps '5,x'" in err
    code, err = run(model, model, "--steps", "5,50")
    last = "Value error, steps [5, 50]: the last canary weight must be 100"
    assert code == 2 and f"--steps '5,50': {last}" in err
    code, err = run(model, model, "--canary-env", "NOEQUALS")
    assert code == 2 and "--canary-env 'NOEQUALS': expected KEY=VALUE" in err
    code, err = run(model, model, "--analysis-count", "0")
    assert code == 2 and "--analysis-count '0'" in err  # the flag, from RolloutSettings.analysis_count
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    code, err = run(model, model, "--prompts", str(empty))
    assert code == 2 and "prompts.txt: no prompts in it" in err
    code, err = run(model, str(tmp_path / "nope"), "--state-dir", str(tmp_path / "s"))
    assert code == 60 and "nope: no such file or directory" in err


def test_cli_help_lists_the_control_commands() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "ggufship.cli.main", "rollout", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "--auto-promote" in out and "promote | abort | status" in out


def test_live_display_renders_every_phase() -> None:
    import io

    from rich.console import Console

    from ggufship.rollout._status import AnalysisRecord, StatusDisplay, render_text

    status = RolloutStatus(steps=plan_steps((5, 50, 100)), step=1, weight=5)
    record = AnalysisRecord(
        step=1, weight=5, started_at="t0", finished_at="t1", outcome="fail", reason="latency: canary differs"
    )
    for phase in ("Progressing", "Paused", "Healthy", "Degraded"):
        current = status.model_copy(update={"phase": phase, "analyses": [record]})
        console = Console(file=io.StringIO(), width=120)
        console.print(StatusDisplay._renderable(current))
        drawn = console.file.getvalue()  # type: ignore[attr-defined]
        assert phase in drawn and "setWeight 5" in drawn and "latency: canary differs" in drawn
        assert "analysis at 5%: fail - latency: canary differs" in render_text(current)
    with StatusDisplay(enabled=True) as display:  # a rich Live on stderr, closed cleanly
        display.update(status)
        display.update(status.model_copy(update={"phase": "Healthy"}))


def test_one_rollout_per_state_dir(tmp_path: Path, tiny_export_dir: Path) -> None:
    from ggufship.rollout import RolloutBusyError
    from ggufship.rollout._supervisor import exclusive as _exclusive

    state = tmp_path / "state"
    with _exclusive(state), pytest.raises(RolloutBusyError, match=r"state: another rollout is running there"):
        run_rollout(RolloutRequest(stable=tiny_export_dir, canary=tiny_export_dir, state_dir=state))
    assert not (rollout_dir(state) / "status.json").exists(), "the refused rollout wrote no status"


@pytest.mark.parametrize(
    ("env", "environ", "cpus", "expected"),
    [
        ({}, {}, 2, "1"),  # the two tracks share the machine: half the CPUs each
        ({}, {}, 16, "8"),
        ({}, {}, 1, "1"),  # never 0
        ({}, {"GGUFSHIP_SERVE_N_THREADS": "3"}, 16, None),  # the caller's setting is inherited as is
        ({"GGUFSHIP_SERVE_N_THREADS": "5"}, {}, 16, "5"),  # the track's own env wins
    ],
)
def test_track_env_splits_the_cpus_between_the_tracks(
    env: dict[str, str], environ: dict[str, str], cpus: int, expected: str | None
) -> None:
    from ggufship.rollout._tracks import THREADS_ENV, track_env

    extra = track_env({**env, "OTHER": "x"}, environ, cpus)
    assert extra.get(THREADS_ENV) == expected
    assert extra["OTHER"] == "x"


def test_track_threads_env_is_serve_n_threads() -> None:
    """THREADS_ENV is the variable ServeSettings reads for n_threads (one declaration)."""
    from ggufship.rollout._tracks import THREADS_ENV
    from ggufship.serve.settings import ServeSettings

    assert ServeSettings.model_config["env_prefix"] + "N_THREADS" == THREADS_ENV
    assert "n_threads" in ServeSettings.model_fields


def test_served_name_env_is_serve_served_model_name() -> None:
    """SERVED_NAME_ENV, which the local rollout sets so that both tracks answer under one model
    name, is the variable ServeSettings reads for served_model_name (one declaration)."""
    from ggufship.rollout import SERVED_NAME_ENV
    from ggufship.serve.settings import ServeSettings

    assert ServeSettings.model_config["env_prefix"] + "SERVED_MODEL_NAME" == SERVED_NAME_ENV
    assert "served_model_name" in ServeSettings.model_fields
