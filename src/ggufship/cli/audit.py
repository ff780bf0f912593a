"""``ggufship audit verify``: check a hash-chained audit log."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import AuditKeygenOptions, AuditVerifyOptions
    from ggufship.cli.settings_flags import add_model_flags

    p = sub.add_parser(
        "audit",
        help="audit log tools (verify the hash chain of an audit log)",
        description="Tools for ggufship's append-only, hash-chained audit log (JSON lines).",
    )
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    v = asub.add_parser(
        "verify",
        help="check every line and chain link; exit 0 if intact, 81 naming each broken line",
        description="Verify an audit log: each line's JSON record, its seq, and that its 'prev' is the "
        "link of the previous line (SHA256, or HMAC-SHA256 with the key of a keyed log). The head file "
        "(FILE.head) is required and catches an edited last line, deleted last lines and lines appended "
        "beyond it. Exit 0: intact; 81: edited, deleted, reordered, truncated or appended lines (each "
        "named by line number), a missing head, a head without its log, lines of another key; "
        "84: a keyed log without its key, or an unusable key; 80: nothing can be read.",
    )
    add_model_flags(v, AuditVerifyOptions, into="options")
    v.set_defaults(func=run_verify)

    k = asub.add_parser(
        "keygen",
        help="write a new random HMAC key for a keyed audit log (mode 0600)",
        description="Write 32 random bytes (64 hex digits) to FILE, which must not exist. Give it to "
        "the writer (GGUFSHIP_AUDIT_KEY_FILE) and to `audit verify --key-file`.",
    )
    add_model_flags(k, AuditKeygenOptions, into="options")
    k.set_defaults(func=run_keygen)


def run_verify(args: argparse.Namespace) -> int:
    from ggufship.audit import AuditTamperedError, load_audit_key, verify_audit

    key = load_audit_key(args.key_file)
    report = verify_audit(args.file, head=args.head, require_head=args.require_head, key=key)
    if args.json_output:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    for note in report.notes:
        logger.warning("%s: %s", args.file, note)
    if report.ok:
        logger.info(
            "%s: %d line(s), chain intact%s; %s",
            args.file,
            report.lines,
            "" if report.head_checked else " (no head file checked)",
            f"keyed ({report.key_id}): written by a holder of the key"
            if report.key_id
            else "unkeyed: consistent, but anyone who can write the files could have rewritten them",
        )
        return 0
    for problem in report.problems:
        logger.error("%s: %s", args.file, problem)
    logger.error("%s: audit chain broken (%d problem(s))", args.file, len(report.problems))
    return AuditTamperedError.exit_code


def run_keygen(args: argparse.Namespace) -> int:
    from ggufship.audit import generate_audit_key, key_id, load_audit_key

    path = generate_audit_key(args.file)
    logger.info("%s: new audit key, %s", path, key_id(load_audit_key(path) or b""))
    sys.stdout.write(f"{path}\n")
    return 0
