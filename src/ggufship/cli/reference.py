"""``ggufship reference``: regenerate (or check) the generated reference pages in docs/reference and
the generated blocks of the stage pages docs/*.md."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ggufship.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path("docs/reference")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import ReferenceOptions
    from ggufship.cli.settings_flags import add_model_flags

    p = sub.add_parser(
        "reference",
        help="generate the exit-code and environment-variable tables from the code",
        description="Render docs/reference/exit-codes.md (from the exception classes) and "
        "docs/reference/settings.md (from the pydantic-settings models), and fill the generated "
        "blocks (<!-- generated: ... --> ... <!-- end generated -->) of the stage pages docs/*.md "
        "(DIR/../*.md; see docs/development.md, Generated docs). --check exits 2 when any of them "
        "differs from the code; --write rewrites them.",
    )
    add_model_flags(p, ReferenceOptions, into="options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ggufship import reference

    if args.write is not None:
        for path in reference.write(args.write.resolve()):
            logger.info("wrote %s", path)
        return 0
    stale = reference.stale(args.check.resolve())
    if stale:
        raise UsageError(
            f"{args.check}: stale generated page(s) {', '.join(stale)}; "
            f"run: ggufship reference --write {args.check}"
        )
    logger.info("%s: generated pages are current", args.check)
    return 0
