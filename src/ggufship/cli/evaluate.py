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
from pathlib import Path
from typing import Any, NoReturn

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
        "Wilcoxon, KS), greedy answers against the golden checks, every quantization against the F16 "
        "(mean KL, top-1 agreement). Records the result in the candidate's manifest.json and model card "
        "(before signing). Exit 0 pass, 1 fail, 2 inconclusive, 90-94 errors.",
    )
    p.add_argument("candidate", type=Path, help="candidate export directory")
    p.add_argument("--stable", type=Path, required=True, help="stable (or base) export directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--release", type=Path, help="release spec whose golden_set is measured")
    src.add_argument("--golden", type=Path, help="golden set JSONL (instead of the release spec's)")
    p.add_argument("--golden-fingerprint", metavar="blake3:HEX", help="with --golden: expected fingerprint")
    p.add_argument("--quant", metavar="TYPE", help="GGUF compared for NLL (default F16 if both have it)")
    p.add_argument("--no-drift", action="store_true", help="skip the quantization-vs-F16 KL check")
    p.add_argument(
        "--no-record", action="store_true", help="do not write the result into manifest.json / model card"
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="write verdict.json, report.md and PNGs here")
    p.add_argument("--json", action="store_true", help="print the recorded evaluation as JSON on stdout")
    pol = p.add_argument_group("policy")
    pol.add_argument("--alpha", type=float, help="significance level of each test (0.01)")
    pol.add_argument("--min-examples", type=int, metavar="N", help="fewer scored examples: inconclusive (20)")
    pol.add_argument("--max-ppl-increase", type=float, metavar="R", help="Δ-PPL effect floor (0.05 = 5%%)")
    pol.add_argument("--min-ks-d", type=float, metavar="D", help="KS effect floor on the NLLs (0.25)")
    pol.add_argument("--max-check-drop", type=float, metavar="R", help="check pass-rate drop floor (0.1)")
    pol.add_argument("--max-skipped-fraction", type=float, metavar="R", help="too-long examples limit (0.1)")
    pol.add_argument("--max-mean-kl", type=float, metavar="NATS", help="quantization mean KL limit (0.05)")
    pol.add_argument("--min-top1", type=float, metavar="R", help="quantization top-1 agreement limit (0.9)")
    pol.add_argument("--too-long", choices=("skip", "refuse"), help="examples beyond n_ctx (skip)")
    pol.add_argument(
        "--n-ctx", type=int, metavar="N", help="context window for scoring (2048, ≤ the model's)"
    )
    p.set_defaults(func=run_evaluate)
    _exit_on_error(p)


def build_policy(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from ggufship.evaluate import EvaluateInputError, EvaluatePolicy

    overrides = {
        "alpha": args.alpha,
        "min_examples": args.min_examples,
        "max_ppl_increase": args.max_ppl_increase,
        "min_ks_d": args.min_ks_d,
        "max_check_drop": args.max_check_drop,
        "max_skipped_fraction": args.max_skipped_fraction,
        "max_mean_kl": args.max_mean_kl,
        "min_top1_agreement": args.min_top1,
        "too_long": args.too_long,
        "n_ctx": args.n_ctx,
    }
    try:
        return EvaluatePolicy(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise EvaluateInputError(f"invalid evaluate option: {problems}") from exc


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
            policy=build_policy(args),
            quant=args.quant,
            drift=not args.no_drift,
            record=not args.no_record,
            report_dir=args.out,
        )
    )
    verdict = result.verdict
    if args.json:
        data = result.record.model_dump(mode="json", by_alias=True)
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{verdict.outcome.upper()}: {verdict.reason}\n")
        for c in verdict.components:
            sys.stdout.write(f"  {c.outcome:<12} {c.name:<12} {c.reason}\n")
    if result.report is not None:
        logger.info("report: %s", result.report.markdown)
    return VERDICT_EXIT[verdict.outcome]
