"""``ggufship rollback``: write a rejected canary's revert back to the GitOps repository."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ggufship.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import RollbackOptions
    from ggufship.cli.settings_flags import add_model_flags

    p = sub.add_parser(
        "rollback",
        help="commit the revert of a rejected release in the GitOps repo (values back to the stable)",
        description="After a canary was aborted, set deploy/ENV/NAME.values.yaml's model back to the "
        "last model it named before the rejected one (kept: every other key). The commit names the "
        "rejected digest and the verdict. Nothing happens when the values do not name the rejected "
        "release (already rolled back, or superseded). Exit 0 in both cases; 76 when there is no "
        "earlier model to go back to.",
    )
    add_model_flags(p, RollbackOptions, into="options")
    p.set_defaults(func=run_rollback)


def run_rollback(args: argparse.Namespace) -> int:
    from ggufship.cli.publish import _author
    from ggufship.rollback import RollbackRequest, rollback

    name, version, sha = args.name, args.version, args.sha256
    if args.export is not None:
        from ggufship.manifest import MANIFEST_NAME, Manifest
        from ggufship.publish._gitops import deployed_file

        manifest = Manifest.load(args.export / MANIFEST_NAME)
        name = name or manifest.name
        version = version or manifest.version
        sha = sha or deployed_file(manifest, None).sha256
    if not name:
        raise UsageError("rollback: give --name (or --export)")
    if not (sha or version):
        raise UsageError("rollback: give --sha256 and/or --version of the rejected release (or --export)")
    author_name, author_email = _author(args.gitops_author)
    result = rollback(
        RollbackRequest(
            url=args.gitops,
            name=name,
            environment=args.gitops_env,
            rejected_sha256=sha,
            rejected_version=version,
            verdict=args.verdict,
            branch=args.gitops_branch,
            author_name=author_name,
            author_email=author_email,
            max_attempts=args.gitops_attempts,
        )
    )
    if args.json_output:
        sys.stdout.write(json.dumps(asdict(result), indent=2) + "\n")
    elif result.rolled_back:
        sys.stdout.write(
            f"rolled back {result.values_path}: {result.rejected_version} ({result.rejected_sha256[:12]}) "
            f"→ {result.stable_version} ({result.stable_sha256[:12]}), commit {result.commit}\n"
        )
    else:
        sys.stdout.write(f"{result.reason} (head {result.commit})\n")
    return 0
