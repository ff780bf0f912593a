"""``ggufship up``, ``ggufship down`` and ``ggufship status``: the local services on loopback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ggufship.errors import UsageError
from ggufship.services import (
    CREDENTIALS_FILE,
    SERVICE_NAMES,
    ServicesNotRunningError,
    ServicesSettings,
    ServiceStatus,
    down,
    status,
    up,
)

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    u = sub.add_parser(
        "up",
        help="start the local services (S3, OCI registry, GitOps remote) on 127.0.0.1",
        description="Start SeaweedFS (S3), docker-registry (OCI) and a bare Git repository on loopback; "
        "already running services are kept. Endpoints go to STATE_DIR/state.json, generated "
        "credentials to STATE_DIR/credentials.json (0600).",
    )
    _state_dir_option(u)
    u.add_argument(
        "--service",
        action="append",
        choices=SERVICE_NAMES,
        metavar="NAME",
        help=f"start only this service (repeatable; {', '.join(SERVICE_NAMES)}); default: all",
    )
    u.add_argument("--s3-port", type=int, metavar="PORT", help="fixed S3 port (default: a free one)")
    u.add_argument(
        "--registry-port", type=int, metavar="PORT", help="fixed registry port (default: a free one)"
    )
    u.add_argument(
        "--registry-auth",
        action="store_true",
        default=None,
        help="require htpasswd basic auth on the registry (login in credentials.json)",
    )
    u.add_argument("--timeout", type=float, metavar="S", help="seconds each service may take to answer (60)")
    u.add_argument("--json", action="store_true", help="print the services as JSON")
    u.set_defaults(func=run_up)

    d = sub.add_parser(
        "down",
        help="stop the local services (SIGTERM, then SIGKILL); data stays unless --purge",
    )
    _state_dir_option(d)
    d.add_argument("--timeout", type=float, metavar="S", help="seconds between SIGTERM and SIGKILL (10)")
    d.add_argument(
        "--purge", action="store_true", help="also delete the services' data, logs and credentials"
    )
    d.set_defaults(func=run_down)

    s = sub.add_parser(
        "status",
        help="show the local services; exit 0 only if every recorded one runs and answers",
    )
    _state_dir_option(s)
    s.add_argument("--json", action="store_true", help="print the services as JSON")
    s.set_defaults(func=run_status)


def _state_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="state directory (default: $GGUFSHIP_STATE_DIR or .ggufship)",
    )


def _settings(**overrides: Any) -> ServicesSettings:
    try:
        return ServicesSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid option: {problems}") from exc


def run_up(args: argparse.Namespace) -> int:
    settings = _settings(
        state_dir=args.state_dir,
        services=tuple(args.service) if args.service else None,
        s3_port=args.s3_port,
        registry_port=args.registry_port,
        registry_auth=args.registry_auth,
        start_timeout_s=args.timeout,
    )
    statuses = up(settings)
    _report(settings.state_dir, statuses, as_json=args.json)
    return 0


def run_down(args: argparse.Namespace) -> int:
    settings = _settings(state_dir=args.state_dir, stop_timeout_s=args.timeout)
    down(settings.state_dir, stop_timeout_s=settings.stop_timeout_s, purge=args.purge)
    return 0


def run_status(args: argparse.Namespace) -> int:
    settings = _settings(state_dir=args.state_dir)
    statuses = status(settings.state_dir)
    _report(settings.state_dir, statuses, as_json=args.json)
    if not statuses:
        logger.warning("no services recorded in %s; run `ggufship up`", settings.state_dir)
        return ServicesNotRunningError.exit_code
    bad = [s for s in statuses if not s.running]
    for s in bad:
        logger.error("%s is %s: %s", s.name, s.state, s.detail)
    return ServicesNotRunningError.exit_code if bad else 0


def _as_dict(s: ServiceStatus) -> dict[str, Any]:
    info = s.info
    return {
        "name": s.name,
        "state": s.state,
        "detail": s.detail,
        "engine": info.engine,
        "endpoint": info.endpoint,
        "pid": info.pid,
        "port": info.port,
        "ports": info.ports,
        "log": str(info.log) if info.log else None,
        "data_dir": str(info.data_dir),
        "started_at": info.started_at.isoformat(),
    }


def _report(state_dir: Path, statuses: list[ServiceStatus], *, as_json: bool) -> None:
    credentials = state_dir.resolve() / CREDENTIALS_FILE
    if as_json:
        doc = {
            "state_dir": str(state_dir.resolve()),
            "credentials": str(credentials) if credentials.exists() else None,
            "services": [_as_dict(s) for s in statuses],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    if not statuses:
        return
    rows = [("SERVICE", "STATE", "ENDPOINT", "PID")]
    rows += [(s.name, s.state, s.info.endpoint, str(s.info.pid) if s.info.pid else "-") for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        sys.stdout.write(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}\n")
    if credentials.exists():
        sys.stdout.write(f"credentials: {credentials}\n")
