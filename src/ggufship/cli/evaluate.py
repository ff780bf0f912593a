"""``ggufship evaluate``: measure a candidate export against the stable one on the golden set.

Exit codes: 0 pass, 1 fail, 2 inconclusive; 90-94 errors that are not verdicts (invalid
options: 93). Option errors argparse detects in this subcommand exit 93 as well, so that 2
always means inconclusive.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn

logger = logging.getLogger(__name__)

_INPUT_EXIT = 93  # EvaluateInputError.exit_code (literal: no heavy imports at parser build time)
VERDICT_EXIT = {"pass": 0, "fail": 1, "inconclusive": 2}


def _exit_on_error(parser: argparse.ArgumentParser) -> None:
    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        sys.exit(_INPUT_EXIT)

    parser.error = error  # type: ignore[method-assign]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "evaluate",
        help="candidate vs stable export on the golden set (Δ-PPL, checks, quantization KL): "
        "exit 0 pass, 1 fail, 2 inconclusive",
        description="Measure the candidate export's GGUFs against the stable (or base) export on the "
        "golden set declared in the release spec: teacher-forced NLL of the reference answers (Δ-PPL, "
        "bootstrap bound, KS), greedy answers against the golden checks, every quantization against the F16 "
        "(mean KL, top-1 agreement). Records the result in the candidate's manifest.json and model card "
        "(before signing). Exit 0 pass, 1 fail, 2 inconclusive, 90-94 errors.",
    )
    from ggufship.cli.settings_flags import add_model_flags, deferred

    def flags() -> None:  # on first use: ggufship.evaluate is a heavy import
        from ggufship.evaluate._options import EvaluateOptions

        add_model_flags(p, EvaluateOptions, groups={"policy": "policy"}, into="options", error=_input_error)

    deferred(p, flags)
    p.set_defaults(func=run_evaluate)
    _exit_on_error(p)


def _input_error(message: str) -> Exception:
    from ggufship.evaluate import EvaluateInputError

    return EvaluateInputError(f"invalid evaluate option: {message}")


def run_evaluate(args: argparse.Namespace) -> int:
    from ggufship.evaluate import EvaluateInputError, EvaluateRequest, evaluate

    if args.golden_fingerprint and args.golden is None:
        raise EvaluateInputError("--golden-fingerprint needs --golden (a release spec declares its own)")
    result = evaluate(
        EvaluateRequest(
            candidate=args.candidate,
            stable=args.stable,
            release=args.release,
            golden=args.golden,
            golden_fingerprint=args.golden_fingerprint,
            policy=args.policy,
            quant=args.quant,
            drift=not args.no_drift,
            record=not args.no_record,
            report_dir=args.out,
        )
    )
    verdict = result.verdict
    if args.json_output:
        data = result.record.model_dump(mode="json", by_alias=True)
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{verdict.outcome.upper()}: {verdict.reason}\n")
        for c in verdict.components:
            sys.stdout.write(f"  {c.outcome:<12} {c.name:<12} {c.reason}\n")
    if result.report is not None:
        logger.info("report: %s", result.report.markdown)
    return VERDICT_EXIT[verdict.outcome]
