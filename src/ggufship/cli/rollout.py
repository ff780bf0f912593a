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
    p.add_argument(
        "stable", metavar="STABLE", help="export dir or .gguf now serving (or: promote/abort/status)"
    )
    p.add_argument("canary", metavar="CANARY", nargs="?", help="export dir or .gguf to roll out")
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="state directory (default: $GGUFSHIP_STATE_DIR or .ggufship)",
    )
    p.add_argument("--json", action="store_true", help="print the (final) status as JSON")
    run = p.add_argument_group("rollout options (environment: GGUFSHIP_ROLLOUT_<FIELD>)")
    run.add_argument("--auto-promote", action="store_true", help="do not wait at the pause for `promote`")
    run.add_argument(
        "--plan",
        type=Path,
        action="append",
        metavar="VALUES",
        help="chart values file(s) with the canary plan, merged like helm -f (default: "
        "charts/ggufship-api/values.yaml); the options below override it",
    )
    run.add_argument("--steps", metavar="W,W,...", help="canary weights in percent, e.g. 5,50,100")
    run.add_argument("--analysis-window", type=float, metavar="S", help="gate window, seconds")
    run.add_argument("--analysis-delay", type=float, metavar="S", help="wait before the first measurement")
    run.add_argument("--analysis-interval", type=float, metavar="S", help="between measurements, seconds")
    run.add_argument("--analysis-count", type=int, metavar="N", help="measurements per analysis")
    run.add_argument("--failure-limit", type=int, metavar="N", help="abort when more measurements fail")
    run.add_argument(
        "--inconclusive-limit", type=int, metavar="N", help="pause when more measurements are inconclusive"
    )
    run.add_argument("--pause-timeout", type=float, metavar="S", help="end Paused if not promoted (3600)")
    run.add_argument("--concurrency", type=int, metavar="N", help="concurrent load requests (4)")
    run.add_argument("--rate", type=float, metavar="RPS", help="pace the load (default: as fast as possible)")
    run.add_argument("--max-tokens", type=int, metavar="N", help="max_tokens per load request (16)")
    run.add_argument("--prompts", type=Path, metavar="FILE", help="prompts to replay, one per line")
    run.add_argument("--min-samples", type=int, metavar="N", help="gate: fewer requests → inconclusive (50)")
    run.add_argument(
        "--canary-env",
        action="append",
        default=[],
        metavar="K=V",
        help="environment of the canary server (repeatable), e.g. GGUFSHIP_SERVE_FAULT_DELAY_SECONDS=0.5",
    )
    run.add_argument("--stable-env", action="append", default=[], metavar="K=V", help="same, stable server")
    run.add_argument("--no-reports", action="store_true", help="do not write gate reports per analysis")
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
    from pydantic import ValidationError

    from ggufship.rollout import RolloutSettings

    overrides: dict[str, Any] = {}
    if args.steps:
        try:
            overrides["steps"] = tuple(int(w) for w in args.steps.split(","))
        except ValueError:
            raise UsageError(f"--steps {args.steps!r}: expected integers like 5,50,100") from None
    for option, field in (
        ("analysis_window", "analysis_window_s"),
        ("analysis_delay", "analysis_delay_s"),
        ("analysis_interval", "analysis_interval_s"),
        ("analysis_count", "analysis_count"),
        ("failure_limit", "failure_limit"),
        ("inconclusive_limit", "inconclusive_limit"),
        ("pause_timeout", "pause_timeout_s"),
        ("concurrency", "load_concurrency"),
        ("rate", "load_rate_per_s"),
        ("max_tokens", "load_max_tokens"),
    ):
        value = getattr(args, option)
        if value is not None:
            overrides[field] = value
    if args.no_reports:
        overrides["analysis_reports"] = False
    if args.plan:
        overrides["plan_files"] = tuple(args.plan)
    try:
        base = RolloutSettings()
        if args.min_samples is not None:
            overrides["gate"] = {**base.gate, "min_samples": args.min_samples}
        return RolloutSettings(**{**base.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise UsageError(f"invalid rollout option: {problems}") from None


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
        if action == "status" or args.json:
            _print(rollout_status(args.state_dir), args.json)
        return 0
    if args.canary is None:
        raise UsageError("rollout needs STABLE and CANARY (or one of: promote, abort, status)")

    settings = _settings(args)
    fields: dict[str, Any] = {
        "stable": Path(args.stable),
        "canary": Path(args.canary),
        "auto_promote": args.auto_promote,
        "settings": settings,
        "stable_env": _env_pairs(args.stable_env, "--stable-env"),
        "canary_env": _env_pairs(args.canary_env, "--canary-env"),
    }
    if args.state_dir is not None:
        fields["state_dir"] = args.state_dir
    prompts = _prompts(args.prompts)
    if prompts is not None:
        fields["prompts"] = prompts
    request = RolloutRequest(**fields)
    with _terminate_as_interrupt():
        status = run_rollout(request)
    if args.json:
        _print(status, True)
    else:
        logger.info("%s", json.dumps({"phase": status.phase, "message": status.message}))
    if status.phase == "Degraded":
        raise RolloutAborted(f"rollout aborted: {status.abort_reason or status.message}")
    if status.phase == "Paused":
        raise RolloutPaused(f"rollout not promoted: {status.pause_reason or status.message}")
    return 0
