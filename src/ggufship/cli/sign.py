"""``ggufship keygen``, ``ggufship sign`` and ``ggufship verify`` (arguments generated from
:mod:`ggufship.sign._options`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.settings_flags import add_model_flags, deferred

    def flags(parser: argparse.ArgumentParser, name: str) -> None:
        def add() -> None:  # on first use: ggufship.sign imports the Sigstore libraries
            from ggufship.sign import _options

            add_model_flags(parser, getattr(_options, name), into="options")

        deferred(parser, add)

    k = sub.add_parser(
        "keygen",
        help="generate an EC P-256 signing key pair (NAME.key 0600, NAME.pub)",
        description="Write a new EC P-256 key pair for `ggufship sign --private-key`. Never overwrites.",
    )
    flags(k, "KeygenOptions")
    k.set_defaults(func=run_keygen)

    s = sub.add_parser(
        "sign",
        help="sign an export directory (OpenSSF model signing) → OUT/model.sig",
        description=(
            "Sign every file of an export (GGUFs, .sha256, manifest.json, README.md) into OUT/model.sig, "
            "a Sigstore bundle. One method: --private-key K | --certificate C --private-key K "
            "[--certificate-chain F ...] | --sigstore (keyless, OIDC identity token)."
        ),
    )
    flags(s, "SignOptions")
    s.set_defaults(func=run_sign)

    v = sub.add_parser(
        "verify",
        help="check the signature (with a policy) and every digest of an export",
        description=(
            "Without a policy: re-check every digest and size against manifest.json (the signature is "
            "not checked). With --public-key, --certificate-chain or --identity/--identity-provider: "
            "check OUT/model.sig first, then every digest."
        ),
    )
    flags(v, "VerifyOptions")
    v.set_defaults(func=run_verify)


def run_keygen(args: argparse.Namespace) -> int:
    from ggufship.sign import generate_keypair

    private, public = generate_keypair(args.out, args.name)
    if args.json_output:
        sys.stdout.write(json.dumps({"private_key": str(private), "public_key": str(public)}) + "\n")
    else:
        sys.stdout.write(f"private key: {private}\npublic key:  {public}\n")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    import os

    from pydantic import SecretStr, ValidationError

    from ggufship.errors import UsageError
    from ggufship.sign import SigningKeyError, SigningRequest, SignSettings, sign_export

    settings = SignSettings()
    password = settings.private_key_password
    if args.password_env:
        value = os.environ.get(args.password_env)
        if value is None:
            raise SigningKeyError(f"--password-env: environment variable {args.password_env} is not set")
        password = SecretStr(value)
    methods = [m for m, on in (("--private-key", args.private_key), ("--sigstore", args.sigstore)) if on]
    if len(methods) != 1:
        raise UsageError(
            "sign: pass exactly one of --private-key (with --certificate optionally) or --sigstore"
        )
    try:
        if args.sigstore:
            token = SecretStr(args.identity_token) if args.identity_token else settings.identity_token
            request = SigningRequest(
                sigstore=True,
                identity_token=token,
                use_ambient_credentials=not args.no_ambient_credentials,
                trust_config=args.trust_config or settings.trust_config,
                certificate=args.certificate,
                certificate_chain=tuple(args.certificate_chain),
            )
        else:
            request = SigningRequest(
                private_key=args.private_key,
                password=password,
                certificate=args.certificate,
                certificate_chain=tuple(args.certificate_chain),
                trust_config=args.trust_config,
                identity_token=SecretStr(args.identity_token) if args.identity_token else None,
            )
    except ValidationError as exc:
        raise UsageError(f"sign: {exc.errors()[0]['msg']}") from exc
    signature = sign_export(args.out, request)
    if args.json_output:
        sys.stdout.write(json.dumps({"signature": str(signature), "method": request.method}) + "\n")
    else:
        sys.stdout.write(f"{signature}\n")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ggufship.errors import GgufshipError, UsageError
    from ggufship.sign import SignSettings, VerificationPolicy, verify_signed_export

    wants_policy = bool(args.public_key or args.certificate_chain or args.identity or args.identity_provider)
    if not wants_policy:
        if args.trust_config:
            raise UsageError("verify: --trust-config needs --identity and --identity-provider")
        return _verify_digests(args)
    trust_config = args.trust_config
    if args.identity and trust_config is None:
        trust_config = SignSettings().trust_config
    try:
        policy = VerificationPolicy(
            public_key=args.public_key,
            certificate_chain=tuple(args.certificate_chain),
            identity=args.identity,
            identity_provider=args.identity_provider,
            trust_config=trust_config,
        )
    except ValidationError as exc:
        raise UsageError(f"verify: {exc.errors()[0]['msg']}") from exc
    try:
        report = verify_signed_export(args.out, policy)  # errors: exit codes 8, 9, 30-34 (main maps them)
    except GgufshipError as exc:
        if args.json_output:
            failure = {
                "ok": False,
                "error": type(exc).__name__,
                "exit_code": exc.exit_code,
                "message": str(exc),
                "problems": list(getattr(exc, "problems", [])),
            }
            sys.stdout.write(json.dumps(failure, indent=2) + "\n")
        raise
    if args.json_output:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    signer = report.signature.signer if report.signature else "?"
    logger.info(
        "%s: signature valid (%s); %d file(s) match manifest.json",
        args.out,
        signer,
        len(report.integrity.checked),
    )
    return 0


def _verify_digests(args: argparse.Namespace) -> int:
    """Digests only (no policy): every mismatch is reported, exit 8 on any."""
    from ggufship.errors import IntegrityError
    from ggufship.integrity import verify_export
    from ggufship.sign import SIGNATURE_NAME

    report = verify_export(args.out, raise_on_error=False)
    if args.json_output:
        sys.stdout.write(
            json.dumps(
                {"ok": report.ok, "checked": report.checked, "problems": report.problems, "signature": None},
                indent=2,
            )
            + "\n"
        )
    for problem in report.problems:
        logger.error("%s: %s", args.out, problem)
    if (Path(args.out) / SIGNATURE_NAME).exists():
        logger.warning(
            "%s: %s present but NOT checked (pass --public-key, --certificate-chain or --identity)",
            args.out,
            SIGNATURE_NAME,
        )
    if report.ok:
        logger.info("%s: %d file(s) match manifest.json", args.out, len(report.checked))
        return 0
    return IntegrityError.exit_code
