"""``ggufship demo``: the whole path on the embedded default, from a generated checkpoint."""

from __future__ import annotations

import argparse
import sys

from ggufship.demo import run_demo
from ggufship.progress import Reporter


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import DemoOptions
    from ggufship.cli.settings_flags import add_model_flags

    p = sub.add_parser(
        "demo",
        help="the whole path on the embedded default: export, sign, publish, canary rollouts",
        description="Build a tiny fine-tune (or take --checkpoint/--adapter), start the local services, run "
        "the KFP pipeline locally for release 1.0.0 (export → sign → publish) and 1.1.0 (… → local canary "
        "rollout that promotes), then a rollout of a regressed canary that the gate rolls back.",
    )
    add_model_flags(p, DemoOptions, into="options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = run_demo(
        args.workdir,
        checkpoint=args.checkpoint,
        adapter=args.adapter,
        reporter=Reporter(),
        keep_services=args.keep_services,
    )
    sys.stdout.write(summary)
    return 0
