"""``ggufship pipeline compile | run --local | submit``: the KFP pipeline (arguments generated
from :mod:`ggufship.cli.models`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ggufship.errors import UsageError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import PipelineCompileOptions, PipelineRunOptions, PipelineSubmitOptions
    from ggufship.cli.settings_flags import add_model_flags
    from ggufship.services import StateDirSettings

    p = sub.add_parser(
        "pipeline",
        help="the KFP pipeline export-to-canary: compile, run locally, submit",
        description="Compile the KFP v2 pipeline (golden YAML), run it on this machine with "
        "kfp.local.SubprocessRunner against the embedded services, or submit it to a KFP API server.",
    )
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    c = psub.add_parser("compile", help="write pipelines/export_to_canary.yaml (works from a wheel)")
    add_model_flags(c, PipelineCompileOptions, into="options")
    c.set_defaults(func=run_compile)

    r = psub.add_parser(
        "run",
        help="run the pipeline (only --local here; use `submit` for a cluster)",
        description="Run the pipeline with kfp.local.SubprocessRunner. The s3/oci/gitops targets and "
        "credentials no --param gives come from the local services (`ggufship up`) recorded in "
        "--state-dir.",
    )
    add_model_flags(r, PipelineRunOptions, into="options")
    add_model_flags(r, StateDirSettings, into="state")
    r.set_defaults(func=run_local_cmd)

    s = psub.add_parser("submit", help="create a run on a KFP API server (like `kfp run create`)")
    add_model_flags(s, PipelineSubmitOptions, into="options")
    s.set_defaults(func=run_submit)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: expected KEY=VALUE")
        if key in ("force", "create_bucket"):
            params[key] = value.lower() in ("1", "true", "yes")
        elif key == "rollout_timeout_s":
            try:
                params[key] = float(value)
            except ValueError as exc:
                raise UsageError(f"--param rollout_timeout_s={value!r}: not a number") from exc
        else:
            params[key] = value
    return params


def run_compile(args: argparse.Namespace) -> int:
    import tempfile

    from ggufship.pipeline import compile_pipeline, golden_path

    if args.check:
        golden = args.output or golden_path(args.root)
        with tempfile.TemporaryDirectory() as tmp:
            fresh = compile_pipeline(Path(tmp) / "pipeline.yaml", root=args.root)
            if not golden.is_file() or golden.read_text() != fresh.read_text():
                logger.error("%s is not current: run `ggufship pipeline compile`", golden)
                return 1
        logger.info("%s is current", golden)
        return 0
    out = compile_pipeline(args.output, root=args.root)
    sys.stdout.write(f"{out}\n")
    return 0


def run_local_cmd(args: argparse.Namespace) -> int:
    from ggufship.cli.paths import pipeline_params
    from ggufship.pipeline import embedded_targets, run_local

    # The tasks run as subprocesses under the pipeline root: local paths must not stay relative.
    params = pipeline_params(parse_params(args.param))
    missing = [k for k in ("checkpoint", "name", "version") if k not in params]
    if missing:
        raise UsageError(
            f"--param: missing {', '.join(missing)} (e.g. -p checkpoint=DIR -p name=N -p version=V)"
        )
    # args.state_dir: --state-dir, else $GGUFSHIP_STATE_DIR, else .ggufship (StateDirSettings).
    targets, env = embedded_targets(args.state_dir.absolute(), str(params["name"]))
    for key, value in targets.items():
        params.setdefault(key, value)
    result = run_local(params, pipeline_root=args.pipeline_root, root=args.root, env=env)
    sys.stdout.write(
        json.dumps({"pipeline_root": str(result.pipeline_root), "outputs": result.outputs}, default=str)
    )
    sys.stdout.write("\n")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from ggufship.pipeline import submit

    run_id = submit(
        args.host,
        parse_params(args.param),
        package=args.package,
        experiment=args.experiment,
        run_name=args.run_name,
        root=args.root,
    )
    sys.stdout.write(f"{run_id}\n")
    return 0
