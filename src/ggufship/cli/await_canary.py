"""``ggufship await-canary``: wait for a release's Argo Rollout canary to be promoted or aborted."""

from __future__ import annotations

import argparse
import json
import sys

from ggufship.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import AwaitCanaryOptions
    from ggufship.cli.settings_flags import add_model_flags

    p = sub.add_parser(
        "await-canary",
        help="wait until the Argo Rollout serving a release is promoted (exit 0) or aborted (71)",
        description="Poll the Rollout (Kubernetes API, in-cluster or kubeconfig) until the revision "
        "whose pod template carries the release's digest is stable and Healthy (exit 0), or it is "
        "Degraded/aborted (71), or the timeout passes (72). Waits while Argo CD has not synced the "
        "GitOps commit, the controller has not observed the new generation, or the canary is "
        "progressing or paused for promotion.",
    )
    add_model_flags(p, AwaitCanaryOptions, into="options")
    p.set_defaults(func=run_await)


def run_await(args: argparse.Namespace) -> int:
    from ggufship.pipeline.steps import deploy_and_await

    sha = args.sha256
    if args.export is not None:
        from ggufship.manifest import MANIFEST_NAME, Manifest
        from ggufship.publish._gitops import deployed_file

        sha = sha or deployed_file(Manifest.load(args.export / MANIFEST_NAME), None).sha256
    if not sha:
        raise UsageError("await-canary: give --sha256 or --export")
    verdict = deploy_and_await(
        mode="gitops",
        model_uri="",
        model_sha256=sha,
        rollout_name=args.rollout,
        namespace=args.namespace,
        timeout_s=args.timeout,
        poll_s=args.poll,
        report_path=str(args.report) if args.report else "",
    )
    if args.json_output:
        sys.stdout.write(json.dumps(verdict, default=str) + "\n")
    else:
        sys.stdout.write(f"{verdict['outcome']}: {verdict.get('message', '')}\n")
    return 0
