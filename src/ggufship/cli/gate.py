"""``ggufship gate``, ``ggufship gate serve`` and ``ggufship gate report``: the canary analysis.

Exit codes of ``ggufship gate``: 0 pass, 1 fail, 2 inconclusive; 10-13 gate errors
that are not verdicts (invalid options: 11). Option errors argparse detects inside
the gate subcommands exit 11 as well; only an option unknown to every parser is
reported by the top-level parser with argparse's usual 2 (then nothing is printed
on stdout, whereas ``--json`` always prints a verdict).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

_CONFIG_EXIT = 11  # GateConfigError.exit_code


def _exit_on_error(parser: argparse.ArgumentParser) -> None:
    """Make argparse errors of this parser exit 11 instead of 2 (2 means inconclusive here)."""

    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        sys.exit(_CONFIG_EXIT)

    parser.error = error  # type: ignore[method-assign]


def _analysis_options(p: argparse.ArgumentParser) -> None:
    """The flags of every :class:`~ggufship.gate.GateRequest` option and ``--state-dir`` (where the
    CLI finds the embedded stack's Prometheus: the services' one declaration,
    :class:`~ggufship.services.StateDirSettings`), generated from the models."""
    from ggufship.cli.settings_flags import add_model_flags
    from ggufship.gate import GateConfigError, GateRequest
    from ggufship.services import StateDirSettings

    state = add_model_flags(p, StateDirSettings, into="state", error=GateConfigError)
    options = add_model_flags(p, GateRequest, groups={"options": "what to analyse", "policy": "policy"})
    p.set_defaults(gate_options=options, state_options=state)


_STATE_DIR_PROMETHEUS = (
    " Without --prometheus and $GGUFSHIP_GATE_PROMETHEUS_URL, the Prometheus of the local services "
    "(`ggufship up`) recorded in --state-dir is queried."
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import GateOutputOptions, GateReportOptions, GateServeOptions
    from ggufship.cli.settings_flags import add_model_flags
    from ggufship.gate import GateConfigError

    gate = sub.add_parser(
        "gate",
        help="one canary-vs-stable analysis from Prometheus: exit 0 pass, 1 fail, 2 inconclusive",
        description="Threshold checks (canary p99 latency, 5xx ratio) and a KS test of each track's "
        "bucket-reconstructed distributions over a window. Exit 0 pass, 1 fail, 2 inconclusive, "
        "11 invalid options." + _STATE_DIR_PROMETHEUS,
    )
    _analysis_options(gate)
    add_model_flags(gate, GateOutputOptions, into="output", error=GateConfigError)
    gate.set_defaults(func=run_gate)
    _exit_on_error(gate)
    gsub = gate.add_subparsers(dest="gate_command", metavar="SUBCOMMAND")

    serve = gsub.add_parser(
        "serve",
        help="serve verdicts over HTTP (GET /gate) for the Argo Rollouts web provider",
        description="GET /gate?window=5m&model=... answers 200 with the verdict JSON (any outcome); "
        "GET /healthz answers ok. Options set the defaults; query parameters override them."
        + _STATE_DIR_PROMETHEUS,
    )
    _analysis_options(serve)
    add_model_flags(serve, GateServeOptions, into="listen", error=GateConfigError)
    serve.set_defaults(func=run_serve)
    _exit_on_error(serve)

    report = gsub.add_parser("report", help="rebuild report.md and the ECDF PNGs from a verdict.json")
    add_model_flags(report, GateReportOptions, into="report", error=GateConfigError)
    report.set_defaults(func=run_report)
    _exit_on_error(report)


def _prometheus_url(args: argparse.Namespace, request: dict[str, Any]) -> str | None:
    """The Prometheus of ``--state-dir`` (``args.state_dir``: the flag, else ``$GGUFSHIP_STATE_DIR``,
    else ``.ggufship``), when neither ``--prometheus`` nor its environment variable is set. A state
    dir given on the command line must record one; the default one need not exist."""
    if request.get("prometheus_url"):
        return None  # the flag's
    if os.environ.get("GGUFSHIP_GATE_PROMETHEUS_URL"):
        return None  # the settings read it
    from ggufship.cli.settings_flags import given
    from ggufship.gate import GateConfigError
    from ggufship.services import ServiceError, load_state

    state_dir: Path = args.state_dir
    try:
        info = load_state(state_dir).services.get("prometheus")
    except ServiceError as exc:
        raise GateConfigError(f"--state-dir {state_dir}: {exc}") from exc
    if info is None and "state_dir" in given(args, args.state_options):
        raise GateConfigError(
            f"--state-dir {state_dir}: no prometheus recorded (run `ggufship up --service prometheus`)"
        )
    return info.endpoint if info is not None else None


def build_request(args: argparse.Namespace) -> Any:
    """The :class:`~ggufship.gate.GateRequest` of the parsed options (validated; the
    environment and the model's defaults fill what was not given)."""
    from ggufship.cli.settings_flags import given, spell
    from ggufship.gate._analyze import build_request as build

    data = given(args, args.gate_options)
    url = _prometheus_url(args, data)
    if url is not None:
        data["prometheus_url"] = url
    return build(None, data, spell=spell)


def run_gate(args: argparse.Namespace) -> int:
    from ggufship.gate import analyze, write_report

    request = build_request(args)
    verdict = analyze(request)
    if args.out is not None:
        files = write_report(verdict, args.out)
        logger.info("report: %s (verdict: %s)", files.markdown, files.verdict)
    if args.json_output:
        sys.stdout.write(verdict.to_json())
    else:
        sys.stdout.write(f"{verdict.outcome.upper()}: {verdict.reason}\n")
        for c in verdict.checks:
            sys.stdout.write(f"  {c.outcome:<12} {c.name:<24} {c.reason}\n")
    return verdict.exit_code


def run_serve(args: argparse.Namespace) -> int:
    from ggufship.gate import make_server

    request = build_request(args)
    server = make_server(request, args.host, args.port)
    logger.info("gate serve: %s/gate (Prometheus %s)", server.url, request.prometheus_url)
    sys.stdout.write(f"{server.url}/gate\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def run_report(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ggufship.gate import GateConfigError, Verdict, write_report

    try:
        verdict = Verdict.model_validate_json(args.verdict.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise GateConfigError(f"{args.verdict}: not a readable verdict: {exc}") from exc
    files = write_report(verdict, args.out or args.verdict.parent)
    sys.stdout.write(f"{files.markdown}\n")
    return 0
