"""``ggufship rollout``: the local canary rollout, and ``rollout promote|abort|status``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ggufship.errors import UsageError

logger = logging.getLogger(__name__)

CONTROL_COMMANDS = ("promote", "abort", "status")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``rollout`` (run / promote / abort / status)."""
    p = sub.add_parser(
        "rollout",
        help="canary rollout of CANARY against STABLE on this machine (nginx + Prometheus + gate)",
        description="ggufship rollout STABLE CANARY [options]: start both API servers, Prometheus "
        "scraping them and an nginx proxy splitting traffic; send load through it and walk the "
        "canary plan of the chart's values (default setWeight 5 → analysis → pause → 50 → analysis "
        "→ 100). A failed analysis aborts "
        "(traffic back to the stable, exit 61); an inconclusive one pauses (never promotes). "
        "ggufship rollout promote | abort | status [--state-dir DIR] controls a running rollout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ggufship.cli.settings_flags import add_model_flags, deferred

    def flags() -> None:  # on first use (ggufship.rollout imports the gate, httpx, rich)
        from ggufship.rollout import RolloutSettings
        from ggufship.rollout._options import RolloutOptions
        from ggufship.services import StateDirSettings

        add_model_flags(p, StateDirSettings, into="state")
        add_model_flags(p, RolloutOptions, into="options")
        add_model_flags(
            p,
            RolloutSettings,
            groups={"options": "rollout options (environment: GGUFSHIP_ROLLOUT_<FIELD>)"},
            into="settings",
            spread=False,
        )

    deferred(p, flags)
    p.set_defaults(func=run_rollout_cmd)
    # `ggufship await-canary` (the cluster's outcome of a release) and `ggufship rollback` (an
    # abort written back to Git) sit beside the local rollout.
    from ggufship.cli import await_canary as await_cmd
    from ggufship.cli import rollback as rollback_cmd

    await_cmd.register(sub)
    rollback_cmd.register(sub)


def _env_pairs(values: list[str], option: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _settings(args: argparse.Namespace) -> Any:
    """The rollout's settings: the environment, the flags given, then ``--min-samples`` into the
    gate's options."""
    from pydantic import ValidationError

    from ggufship.rollout import RolloutSettings

    settings = args.settings
    if args.min_samples is None:
        return settings
    try:
        return RolloutSettings(
            **{**settings.model_dump(), "gate": {**settings.gate, "min_samples": args.min_samples}}
        )
    except ValidationError as exc:
        raise UsageError(f"--min-samples: {exc.errors()[0]['msg']}") from None


def _prompts(path: Path | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise UsageError(f"--prompts {path}: cannot read: {exc}") from None
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts in it")
    return prompts


def _print(status: Any, as_json: bool) -> None:
    from ggufship.rollout import render_text

    if as_json:
        sys.stdout.write(status.to_json())
    else:
        sys.stdout.write(render_text(status) + "\n")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the rollout like Ctrl-C: the step machine stops everything it started."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_rollout_cmd(args: argparse.Namespace) -> int:
    from ggufship.rollout import (
        RolloutAborted,
        RolloutPaused,
        RolloutRequest,
        abort,
        promote,
        rollout_status,
        run_rollout,
    )

    if args.stable in CONTROL_COMMANDS and args.canary is None:
        action = args.stable
        state = rollout_status(args.state_dir) if action == "status" else None
        if action == "promote":
            state = promote(args.state_dir)
            logger.info("promotion requested (rollout pid %d, step %d)", state.pid, state.step + 1)
        elif action == "abort":
            state = abort(args.state_dir)
            logger.info("abort requested (rollout pid %d)", state.pid)
        if action == "status" or args.json_output:
            _print(rollout_status(args.state_dir), args.json_output)
        return 0
    if args.canary is None:
        raise UsageError("rollout needs STABLE and CANARY (or one of: promote, abort, status)")

    settings = _settings(args)
    fields: dict[str, Any] = {
        "stable": Path(args.stable),
        "canary": Path(args.canary),
        "auto_promote": args.auto_promote,
        "settings": settings,
        "stable_env": _env_pairs(list(args.stable_env), "--stable-env"),
        "canary_env": _env_pairs(list(args.canary_env), "--canary-env"),
        "state_dir": args.state_dir,  # --state-dir, else $GGUFSHIP_STATE_DIR, else .ggufship
    }
    prompts = _prompts(args.prompts)
    if prompts is not None:
        fields["prompts"] = prompts
    request = RolloutRequest(**fields)
    with _terminate_as_interrupt():
        status = run_rollout(request)
    if args.json_output:
        _print(status, True)
    else:
        logger.info("%s", json.dumps({"phase": status.phase, "message": status.message}))
    if status.phase == "Degraded":
        raise RolloutAborted(f"rollout aborted: {status.abort_reason or status.message}")
    if status.phase == "Paused":
        raise RolloutPaused(f"rollout not promoted: {status.pause_reason or status.message}")
    return 0
