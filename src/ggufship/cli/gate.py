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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

_CONFIG_EXIT = 11  # GateConfigError.exit_code (kept literal: no heavy imports at parser build time)


def _exit_on_error(parser: argparse.ArgumentParser) -> None:
    """Make argparse errors of this parser exit 11 instead of 2 (2 means inconclusive here)."""

    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        sys.exit(_CONFIG_EXIT)

    parser.error = error  # type: ignore[method-assign]


def _analysis_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to analyse")
    g.add_argument(
        "--prometheus",
        metavar="URL",
        help="Prometheus base URL (default: $GGUFSHIP_GATE_PROMETHEUS_URL, else the one of --state-dir, "
        "else http://127.0.0.1:9090)",
    )
    g.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="local services state dir (default: .ggufship)"
    )
    g.add_argument("--window", metavar="DUR", help="analysis window: 300, 90s, 5m, 1h (default 5m)")
    g.add_argument("--model", help="`model` label of both tracks (default: any)")
    g.add_argument("--endpoint", help="`endpoint` label (default: all endpoints)")
    g.add_argument(
        "--matcher", action="append", metavar='NAME="V"', help="extra PromQL label matcher (repeatable)"
    )
    g.add_argument("--stable-track", metavar="V", help="`track` label of the stable (stable)")
    g.add_argument("--canary-track", metavar="V", help="`track` label of the canary (canary)")
    g.add_argument(
        "--track-label",
        metavar="NAME",
        help="label telling the tracks apart (track); in a cluster rollouts_pod_template_hash, with "
        "--stable-track/--canary-track the pod-template hashes",
    )
    g.add_argument("--namespace", help="`namespace` label of both tracks (default: any)")
    g.add_argument("--at", metavar="TIME", help="evaluation time: ISO 8601 or Unix seconds (default: now)")
    g.add_argument("--timeout", type=float, metavar="S", help="timeout per Prometheus query (10)")
    pol = p.add_argument_group("policy")
    pol.add_argument("--max-p99", type=float, metavar="S", help="canary p99 latency limit, seconds (1.2)")
    pol.add_argument("--max-error-ratio", type=float, metavar="R", help="canary 5xx ratio limit (0.005)")
    pol.add_argument("--alpha", type=float, help="false-rollback budget of the whole rollout (0.01)")
    pol.add_argument(
        "--analyses", type=int, metavar="N", help="analyses planned in the rollout; alpha/N each (1)"
    )
    pol.add_argument("--min-samples", type=int, metavar="N", help="min requests per track (50)")
    pol.add_argument("--min-ks-d", type=float, metavar="D", help="effect floor on the KS distance (0.1)")
    pol.add_argument(
        "--min-median-shift", type=float, metavar="R", help="effect floor on the median shift (0.05)"
    )
    pol.add_argument("--two-sided", action="store_true", default=None, help="fail on any difference")
    pol.add_argument(
        "--metrics",
        metavar="LIST",
        help="comma list of latency, ttft, itl, completion_length, surprisal; first is primary (all five)",
    )
    pol.add_argument(
        "--rates",
        metavar="LIST",
        help="comma list of answer rates to test: refusal, bad_answer (both); '' for none",
    )
    pol.add_argument(
        "--min-rate-increase", type=float, metavar="R", help="effect floor of a rate test (0.02 = 2 points)"
    )
    pol.add_argument("--max-refusal-rate", type=float, metavar="R", help="canary refusal rate limit (none)")
    pol.add_argument(
        "--max-bad-answer-rate", type=float, metavar="R", help="canary bad-answer rate limit (none)"
    )
    pol.add_argument(
        "--method",
        choices=("buckets", "quantile-series"),
        help="buckets (default) or quantile-series (the weaker method)",
    )
    pol.add_argument("--quantile", type=float, help="quantile-series: the quantile (0.95)")
    pol.add_argument("--step", metavar="DUR", help="quantile-series: the step (10s)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gate = sub.add_parser(
        "gate",
        help="one canary-vs-stable analysis from Prometheus: exit 0 pass, 1 fail, 2 inconclusive",
        description="Threshold checks (canary p99 latency, 5xx ratio) and a KS test of each track's "
        "bucket-reconstructed distributions over a window. Exit 0 pass, 1 fail, 2 inconclusive, "
        "11 invalid options.",
    )
    _analysis_options(gate)
    gate.add_argument("--json", action="store_true", help="print the verdict JSON on stdout")
    gate.add_argument(
        "--out", type=Path, metavar="DIR", help="write verdict.json, report.md and ECDF PNGs here"
    )
    gate.set_defaults(func=run_gate)
    _exit_on_error(gate)
    gsub = gate.add_subparsers(dest="gate_command", metavar="SUBCOMMAND")

    serve = gsub.add_parser(
        "serve",
        help="serve verdicts over HTTP (GET /gate) for the Argo Rollouts web provider",
        description="GET /gate?window=5m&model=... answers 200 with the verdict JSON (any outcome); "
        "GET /healthz answers ok. Options set the defaults; query parameters override them.",
    )
    _analysis_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8090, help="port (8090; 0: a free one)")
    serve.set_defaults(func=run_serve)
    _exit_on_error(serve)

    report = gsub.add_parser("report", help="rebuild report.md and the ECDF PNGs from a verdict.json")
    report.add_argument("verdict", type=Path, help="a verdict.json written by `ggufship gate --out`")
    report.add_argument("--out", type=Path, metavar="DIR", help="directory (default: the verdict's)")
    report.set_defaults(func=run_report)
    _exit_on_error(report)


def _parse_time(text: str) -> datetime:
    from ggufship.gate import GateConfigError

    try:
        return datetime.fromtimestamp(float(text), tz=UTC)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise GateConfigError(f"--at {text!r}: expected ISO 8601 or Unix seconds") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _prometheus_url(args: argparse.Namespace) -> str | None:
    if args.prometheus:
        return str(args.prometheus)
    if os.environ.get("GGUFSHIP_GATE_PROMETHEUS_URL"):
        return None  # the settings read it
    from ggufship.services import DEFAULT_STATE_DIR, ServiceError, load_state

    state_dir = args.state_dir or Path(os.environ.get("GGUFSHIP_STATE_DIR", DEFAULT_STATE_DIR))
    try:
        info = load_state(state_dir).services.get("prometheus")
    except ServiceError as exc:
        from ggufship.gate import GateConfigError

        raise GateConfigError(f"--state-dir {state_dir}: {exc}") from exc
    if info is None and args.state_dir is not None:
        from ggufship.gate import GateConfigError

        raise GateConfigError(
            f"--state-dir {state_dir}: no prometheus recorded (run `ggufship up --service prometheus`)"
        )
    return info.endpoint if info is not None else None


def build_request(args: argparse.Namespace) -> Any:
    """The :class:`~ggufship.gate.GateRequest` of the parsed options (validated)."""
    from ggufship.gate import make_request, parse_duration

    overrides: dict[str, Any] = {
        "prometheus_url": _prometheus_url(args),
        "window_s": parse_duration(args.window) if args.window else None,
        "model": args.model,
        "endpoint": args.endpoint,
        "matchers": tuple(args.matcher) if args.matcher else None,
        "stable_track": args.stable_track,
        "canary_track": args.canary_track,
        "track_label": args.track_label,
        "namespace": args.namespace,
        "at": _parse_time(args.at) if args.at else None,
        "timeout_s": args.timeout,
        "max_p99_s": args.max_p99,
        "max_error_ratio": args.max_error_ratio,
        "alpha": args.alpha,
        "planned_analyses": args.analyses,
        "min_samples": args.min_samples,
        "min_ks_d": args.min_ks_d,
        "min_median_shift": args.min_median_shift,
        "two_sided": args.two_sided,
        "metrics": tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else None,
        "rates": tuple(r.strip() for r in args.rates.split(",") if r.strip())
        if args.rates is not None
        else None,
        "min_rate_increase": args.min_rate_increase,
        "max_refusal_rate": args.max_refusal_rate,
        "max_bad_answer_rate": args.max_bad_answer_rate,
        "method": args.method,
        "series_quantile": args.quantile,
        "series_step_s": parse_duration(args.step) if args.step else None,
    }
    return make_request(None, **overrides)


def run_gate(args: argparse.Namespace) -> int:
    from ggufship.gate import analyze, write_report

    request = build_request(args)
    verdict = analyze(request)
    if args.out is not None:
        files = write_report(verdict, args.out)
        logger.info("report: %s (verdict: %s)", files.markdown, files.verdict)
    if args.json:
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
