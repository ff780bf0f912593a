"""The rollout's state: the status file (JSON), the control files, and the live display.

``STATE_DIR/rollout/status.json`` is rewritten atomically at every change: phase,
current step and weight, every analysis with its verdict JSON, load counts, the
PIDs and ports of what runs. ``ggufship rollout status`` reads it; ``promote`` and
``abort`` leave a control file (``promote`` / ``abort``) next to it that the running
rollout polls. On a terminal the state is also drawn live (rich); otherwise each
change is one log line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ggufship.rollout._errors import RolloutError, RolloutNotRunningError
from ggufship.rollout._load import LoadSummary

logger = logging.getLogger(__name__)

STATUS_SCHEMA = "ggufship.rollout/v1"
ROLLOUT_DIR = "rollout"
STATUS_FILE = "status.json"
PROMOTE_FILE = "promote"
ABORT_FILE = "abort"

Phase = Literal["Progressing", "Paused", "Healthy", "Degraded"]
Outcome = Literal["pass", "fail", "inconclusive"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StepRecord(BaseModel):
    """One step of the plan (mirrors the chart's canary steps)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["setWeight", "analysis", "pause"]
    weight: int | None = None
    duration_s: float | None = Field(default=None, description="a timed pause's length (None: manual)")

    def describe(self) -> str:
        if self.kind == "setWeight":
            return f"setWeight {self.weight}"
        if self.kind == "pause" and self.duration_s is not None:
            return f"pause {self.duration_s:g}s"
        return self.kind


class AnalysisRecord(BaseModel):
    """One gate run: when, at which step and weight, the outcome and the verdict behind it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int
    weight: int
    background: bool = Field(default=False, description="run during a pause (background analysis)")
    started_at: str
    finished_at: str
    outcome: Outcome
    reason: str = ""
    verdict: dict[str, Any] = Field(default_factory=dict, description="the gate's verdict JSON")
    report: str | None = Field(default=None, description="the gate's Markdown report, if written")


class EventRecord(BaseModel):
    """One transition of the rollout (for timings: canary traffic start → abort, ...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: float = Field(description="Unix time")
    event: Literal["started", "weight", "paused", "promoted", "aborted", "healthy", "not-promoted"]
    weight: int
    detail: str = ""


class TrackRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    url: str | None = None
    pid: int | None = None
    running: bool = False
    log: str | None = None


class RolloutStatus(BaseModel):
    """``status.json``: what the rollout is doing, and what it decided and why."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: str = Field(default=STATUS_SCHEMA, alias="schema")
    pid: int = Field(default_factory=os.getpid, description="the process running the rollout")
    rollout_id: str = Field(
        default="", description="label `rollout_id` on the scrape targets of this rollout"
    )
    phase: Phase = "Progressing"
    message: str = ""
    steps: list[StepRecord] = Field(default_factory=list)
    step: int = Field(default=0, description="index into steps of the current step")
    weight: int = Field(default=0, ge=0, le=100, description="canary share of traffic, percent")
    auto_promote: bool = False
    promoted: bool = Field(default=False, description="the canary reached 100%")
    aborted: bool = False
    abort_reason: str | None = None
    pause_reason: str | None = None
    stable: TrackRecord | None = None
    canary: TrackRecord | None = None
    proxy_url: str | None = None
    prometheus_url: str | None = None
    analyses: list[AnalysisRecord] = Field(default_factory=list)
    events: list[EventRecord] = Field(default_factory=list, description="transitions with their times")
    load: LoadSummary = Field(default_factory=LoadSummary)
    load_records: str | None = Field(default=None, description="JSONL file of every load request")
    started_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    aborted_at: float | None = Field(
        default=None, description="Unix time when traffic was back on 100% stable after an abort"
    )
    finished_at: str | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2) + "\n"


def rollout_dir(state_dir: Path) -> Path:
    return Path(state_dir) / ROLLOUT_DIR


def write_status(state_dir: Path, status: RolloutStatus) -> None:
    path = rollout_dir(state_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(status.to_json(), encoding="utf-8")
    tmp.replace(path)


def read_status(state_dir: Path) -> RolloutStatus:
    """The last status written in ``state_dir``."""
    path = rollout_dir(state_dir) / STATUS_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RolloutNotRunningError(f"{path}: no rollout status (no rollout ran in {state_dir})") from exc
    except OSError as exc:
        raise RolloutError(f"{path}: cannot read: {exc}") from exc
    try:
        return RolloutStatus.model_validate_json(raw)
    except ValidationError as exc:
        raise RolloutError(f"{path}: invalid rollout status file: {exc}") from exc


def status_is_live(status: RolloutStatus) -> bool:
    """True if the rollout of this status still runs (not finished, its process alive)."""
    from ggufship.services._process import is_alive

    return not status.finished and is_alive(status.pid)


def request_control(state_dir: Path, action: Literal["promote", "abort"]) -> RolloutStatus:
    """Leave a control file for the running rollout of ``state_dir``; its status when asked."""
    status = read_status(state_dir)
    if not status_is_live(status):
        raise RolloutNotRunningError(
            f"{rollout_dir(state_dir) / STATUS_FILE}: no rollout is running in {state_dir} "
            f"(last phase {status.phase}{', finished' if status.finished else ', its process is gone'})"
        )
    path = rollout_dir(state_dir) / (PROMOTE_FILE if action == "promote" else ABORT_FILE)
    path.write_text(f"{now_iso()} pid {os.getpid()}\n", encoding="utf-8")
    logger.info("%s requested for the rollout (pid %d) in %s", action, status.pid, state_dir)
    return status


def take_control(state_dir: Path, action: Literal["promote", "abort"]) -> bool:
    """True (once) if ``action`` was requested; the control file is consumed."""
    path = rollout_dir(state_dir) / (PROMOTE_FILE if action == "promote" else ABORT_FILE)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def clear_controls(state_dir: Path) -> None:
    for name in (PROMOTE_FILE, ABORT_FILE):
        (rollout_dir(state_dir) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- display


def render_text(status: RolloutStatus) -> str:
    """A few lines for humans (``ggufship rollout status``, logs)."""
    step = status.steps[status.step].describe() if status.steps and status.step < len(status.steps) else "-"
    lines = [
        f"phase {status.phase}  step {status.step + 1}/{len(status.steps)} ({step})  canary weight "
        f"{status.weight}%",
    ]
    if status.message:
        lines.append(f"  {status.message}")
    for a in status.analyses[-5:]:
        kind = "background " if a.background else ""
        lines.append(f"  {kind}analysis at {a.weight}%: {a.outcome}{' - ' + a.reason if a.reason else ''}")
    load = status.load
    lines.append(
        f"  load: {load.requests} requests, {load.ok} ok, {load.transport_errors} transport errors "
        f"{json.dumps(load.by_track_status)}"
    )
    return "\n".join(lines)


class StatusDisplay:
    """Live view of the status: a rich panel on a TTY, otherwise one log line per phase/step change."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.live_enabled = sys.stderr.isatty() if enabled is None else enabled
        self._live: Any = None
        self._last_key: tuple[object, ...] | None = None
        self._last_draw = 0.0

    def __enter__(self) -> StatusDisplay:
        if self.live_enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def update(self, status: RolloutStatus) -> None:
        key = (status.phase, status.step, status.weight, len(status.analyses), status.message)
        if self._live is not None:
            if key != self._last_key or time.monotonic() - self._last_draw > 0.5:
                self._live.update(self._renderable(status))
                self._last_draw = time.monotonic()
        elif key != self._last_key:
            logger.info("rollout: %s", render_text(status).replace("\n", " |"))
        self._last_key = key

    @staticmethod
    def _renderable(status: RolloutStatus) -> Any:
        from rich.panel import Panel
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold")
        table.add_column()
        colour = {"Healthy": "green", "Degraded": "red", "Paused": "yellow"}.get(status.phase, "cyan")
        table.add_row("phase", f"[{colour}]{status.phase}[/]  {status.message}")
        plan = " → ".join(
            f"[bold]{s.describe()}[/]" if i == status.step else s.describe()
            for i, s in enumerate(status.steps)
        )
        table.add_row("steps", plan)
        table.add_row("weight", f"canary {status.weight}%  stable {100 - status.weight}%")
        for a in status.analyses[-4:]:
            mark = {"pass": "[green]pass[/]", "fail": "[red]fail[/]"}.get(
                a.outcome, "[yellow]inconclusive[/]"
            )
            table.add_row("analysis", f"{a.weight}% {mark} {a.reason}")
        load = status.load
        table.add_row(
            "load", f"{load.requests} requests, {load.ok} ok, {load.transport_errors} transport errors"
        )
        return Panel(table, title="ggufship rollout")
