"""``ggufship publish`` and ``ggufship pull``: S3, OCI registry, GitOps (arguments generated from
:mod:`ggufship.cli.publish_options`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)


_STATE_DIR_S3 = (
    " The S3 endpoint and keys that neither the --s3-* flags nor GGUFSHIP_S3_* set come from the "
    "local services (`ggufship up`) recorded in --state-dir."
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.publish_options import S3_SECTION, PublishOptions, PullOptions
    from ggufship.cli.settings_flags import add_model_flags
    from ggufship.services import StateDirSettings

    p = sub.add_parser(
        "publish",
        help="publish a verified export to S3, an OCI registry and/or a GitOps repository",
        description="Verify OUT against its manifest, then upload it: S3 (checksummed multipart, manifest "
        "last), OCI (ORAS artifact, signature as referrer), GitOps (one commit: models/<name>/<version>.yaml "
        "and deploy/<env>/<name>.values.yaml). Idempotent; a published version with other digests is "
        "refused unless --force." + _STATE_DIR_S3,
    )
    add_model_flags(p, PublishOptions, into="options")
    add_model_flags(p, StateDirSettings, groups={"options": S3_SECTION}, into="state")
    p.set_defaults(func=run_publish)

    q = sub.add_parser(
        "pull",
        help="fetch a published export (s3:// or oci://), verify digests (and signature), print its path",
        description="Fetch into DEST (a staging dir beside it, renamed into place after every check "
        "passed). With --public-key / --certificate-chain / --identity the signature is verified too."
        + _STATE_DIR_S3,
    )
    add_model_flags(q, PullOptions, into="options")
    add_model_flags(q, StateDirSettings, groups={"options": S3_SECTION}, into="state")
    q.set_defaults(func=run_pull)


def _secret_from_env(var: str | None, defaults: tuple[str, ...]) -> Any:
    from pydantic import SecretStr

    from ggufship.errors import UsageError

    if var is not None:
        value = os.environ.get(var)
        if value is None:
            raise UsageError(f"environment variable {var} (named by a --*-env option) is not set")
        return SecretStr(value)
    for name in defaults:
        if os.environ.get(name):
            return SecretStr(os.environ[name])
    return None


def _s3_target(args: argparse.Namespace, uri: str, *, create_bucket: bool = False) -> Any:
    """Flags over ``GGUFSHIP_S3_*`` over the embedded default (``ggufship up``) of ``--state-dir``."""
    from ggufship.cli.embedded import with_embedded_s3
    from ggufship.publish import S3Target

    part_size = getattr(args, "part_size_mib", None)
    target = S3Target.from_uri(
        uri,
        endpoint=args.s3_endpoint,
        access_key=args.s3_access_key,
        secret_key=_secret_from_env(
            args.s3_secret_key_env, ("GGUFSHIP_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
        ),
        secure=args.s3_secure,
        region=args.s3_region,
        create_bucket=create_bucket,
        part_size=part_size * 1024 * 1024 if part_size else None,
    )
    return with_embedded_s3(target, args.state_dir)


def _oci_target(args: argparse.Namespace, uri: str) -> Any:
    """Flags over ``GGUFSHIP_OCI_*`` (:class:`OciSettings`) over the Docker config's login."""
    from ggufship.publish._oci import oci_settings, parse_oci_uri

    registry, repository, _ = parse_oci_uri(uri)
    updates: dict[str, Any] = {}
    if args.oci_username:
        updates["username"] = args.oci_username
    if args.oci_password_env is not None or args.oci_username:
        updates["password"] = _secret_from_env(args.oci_password_env, ("GGUFSHIP_OCI_PASSWORD",))
    if args.oci_tls:
        updates["insecure"] = False
    elif args.oci_insecure:
        updates["insecure"] = True
    if args.oci_ca_bundle is not None:
        updates["ca_bundle"] = args.oci_ca_bundle
    settings = oci_settings().model_copy(update=updates)
    return settings.target(registry, repository)


def _author(value: str | None) -> tuple[str, str]:
    from ggufship.errors import UsageError

    if value is None:
        return "ggufship", "ggufship@localhost"
    name, _, rest = value.partition("<")
    email = rest.rstrip().rstrip(">").strip()
    if not name.strip() or "@" not in email or not rest.rstrip().endswith(">"):
        raise UsageError(f"--gitops-author {value!r}: expected 'Name <email@host>'")
    return name.strip(), email


def run_publish(args: argparse.Namespace) -> int:
    from ggufship.progress import Reporter
    from ggufship.publish import GitOpsTarget, PublishRequest, publish

    if getattr(args, "verbose", 0) < 2:
        # GitPython warns on every rejected push; ggufship logs the retry itself.
        logging.getLogger("git.remote").setLevel(logging.ERROR)

    gitops = None
    if args.gitops:
        name, email = _author(args.gitops_author)
        options: dict[str, Any] = {}
        if args.gitops_message:
            options["message"] = args.gitops_message
        gitops = GitOpsTarget(
            url=args.gitops,
            branch=args.gitops_branch,
            environment=args.gitops_env,
            author_name=name,
            author_email=email,
            quantization=args.gitops_quant,
            max_attempts=args.gitops_attempts,
            **options,
        )
    request = PublishRequest(
        s3=_s3_target(args, args.s3, create_bucket=args.create_bucket) if args.s3 else None,
        oci=_oci_target(args, args.oci) if args.oci else None,
        gitops=gitops,
        force=args.force,
    )
    result = publish(args.out, request, reporter=Reporter(enabled=None if not args.quiet else False))
    if args.json_output:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0
    lines = [f"{result.name} {result.version} (manifest sha256 {result.manifest_sha256})"]
    if result.s3 is not None:
        lines.append(
            f"s3:     {result.s3.uri} ({'already there, skipped' if result.s3.skipped else 'uploaded'})"
        )
    if result.oci is not None:
        skipped = getattr(result.oci, "skipped", False)
        lines.append(f"oci:    {result.oci.reference} ({'already there, skipped' if skipped else 'pushed'})")
    if result.gitops is not None:
        g = result.gitops
        state = "already recorded, skipped" if g.skipped else f"committed, {g.attempts} push attempt(s)"
        lines.append(f"gitops: {g.url} {g.branch} {g.commit[:12]} {g.record_path} ({state})")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _policy(args: argparse.Namespace) -> Any:
    if not (args.public_key or args.certificate_chain or args.identity):
        return None
    from pydantic import ValidationError

    from ggufship.errors import UsageError
    from ggufship.sign import VerificationPolicy

    try:
        return VerificationPolicy(
            public_key=args.public_key,
            certificate_chain=tuple(args.certificate_chain or ()),
            identity=args.identity,
            identity_provider=args.identity_provider,
            trust_config=args.trust_config,
        )
    except ValidationError as exc:
        raise UsageError(f"pull: {exc.errors()[0]['msg']}") from exc


def run_pull(args: argparse.Namespace) -> int:
    from ggufship.publish import pull

    s3 = _s3_target(args, args.uri) if args.uri.startswith("s3://") else None
    oci = _oci_target(args, args.uri) if args.uri.startswith("oci://") else None
    from ggufship.progress import Reporter

    reporter = Reporter(enabled=None if not getattr(args, "quiet", False) else False)
    path = pull(
        args.uri,
        args.out,
        policy=_policy(args),
        s3=s3,
        oci_auth=oci,
        force=args.force,
        reporter=reporter,
        quant=args.quant,
    )
    if args.json_output:
        sys.stdout.write(json.dumps({"uri": args.uri, "path": str(path)}, indent=2) + "\n")
    else:
        sys.stdout.write(f"{path}\n")
    return 0
