"""``ggufship demo``: the whole path on the embedded default, from a generated checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ggufship.demo import run_demo
from ggufship.progress import Reporter


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="build a tiny fine-tune and run the pipeline on it, end to end")
    p.add_argument("--workdir", type=Path, default=Path(".ggufship/demo"), help="where demo files go")
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of a generated one")
    p.add_argument("--adapter", type=Path, help="LoRA adapter for --checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = run_demo(args.workdir, checkpoint=args.checkpoint, adapter=args.adapter, reporter=Reporter())
    sys.stdout.write(summary)
    return 0
