"""``ggufship export`` (``ggufship verify`` lives in :mod:`ggufship.cli.sign`); its arguments are
generated from :class:`ggufship.export._options.ExportOptions`."""

from __future__ import annotations

import argparse
import logging
import sys

from ggufship.cli.settings_flags import add_model_flags
from ggufship.export import ExportRequest, export_checkpoint
from ggufship.export._options import ExportOptions
from ggufship.progress import Reporter

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="HF checkpoint (+ LoRA adapter) → GGUF files, .sha256, manifest.json, model card",
        description="Export a Hugging Face checkpoint to GGUF with llama.cpp's converter and quantizer.",
    )
    add_model_flags(p, ExportOptions, into="options")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ggufship.errors import UsageError

    if args.list_architectures or args.list_quants:
        from ggufship.toolchain import find_toolchain, quantization_types, supported_architectures

        items = supported_architectures(find_toolchain()) if args.list_architectures else quantization_types()
        sys.stdout.write("\n".join(sorted(items)) + "\n")
        return 0
    for flag, value in (
        ("CHECKPOINT", args.checkpoint),
        ("--out", args.out),
        ("--name", args.name),
        ("--version", args.model_version),
    ):
        if value is None:
            raise UsageError(f"export: {flag} is required")
    result = export_checkpoint(
        ExportRequest(
            checkpoint=args.checkpoint,
            out_dir=args.out,
            name=args.name,
            version=args.model_version,
            adapter=args.adapter,
            quants=args.quant,
            release=args.release,
            force=args.force,
            check_tokenizer=not args.no_tokenizer_check,
        ),
        Reporter(enabled=None if not args.quiet else False),
    )
    if args.json_output:
        sys.stdout.write(result.manifest.to_json())
    else:
        for f in result.manifest.files:
            sys.stdout.write(f"{f.sha256}  {result.out_dir / f.path}\n")
    if result.warnings:
        logger.warning("%d warning(s) recorded in manifest.json and the model card", len(result.warnings))
    return 0
