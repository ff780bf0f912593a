"""``ggufship await-canary``: wait for a release's Argo Rollout canary to be promoted or aborted."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ggufship.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "await-canary",
        help="wait until the Argo Rollout serving a release is promoted (exit 0) or aborted (71)",
        description="Poll the Rollout (Kubernetes API, in-cluster or kubeconfig) until the revision "
        "whose pod template carries the release's digest is stable and Healthy (exit 0), or it is "
        "Degraded/aborted (71), or the timeout passes (72). Waits while Argo CD has not synced the "
        "GitOps commit, the controller has not observed the new generation, or the canary is "
        "progressing or paused for promotion.",
    )
    p.add_argument("--rollout", required=True, help="the Rollout's name")
    p.add_argument("--namespace", default="default", help="its namespace (default: default)")
    p.add_argument(
        "--sha256", help="digest of the deployed GGUF (the pod template's ggufship.io/model-sha256)"
    )
    p.add_argument(
        "--export", type=Path, metavar="DIR", help="the released export: the digest its GitOps values deploy"
    )
    p.add_argument("--timeout", type=float, default=4 * 3600.0, metavar="S", help="give up after S (14400)")
    p.add_argument("--poll", type=float, default=10.0, metavar="S", help="poll period, seconds (10)")
    p.add_argument("--report", type=Path, metavar="FILE", help="write the Markdown outcome report here")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON on stdout")
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
    if not (0 < args.timeout <= 7 * 86_400) or not (0 < args.poll <= 600):
        raise UsageError("await-canary: --timeout must be in (0, 604800] s and --poll in (0, 600] s")
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
    if args.json:
        sys.stdout.write(json.dumps(verdict, default=str) + "\n")
    else:
        sys.stdout.write(f"{verdict['outcome']}: {verdict.get('message', '')}\n")
    return 0
