"""``ggufship up``, ``ggufship down`` and ``ggufship status``: the local services on loopback.

Their flags are generated from :class:`ggufship.services.ServicesSettings` (``GGUFSHIP_<FIELD>``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ggufship.services import (
    CREDENTIALS_FILE,
    ServicesNotRunningError,
    ServicesSettings,
    ServiceStatus,
    down,
    status,
    up,
)

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ggufship.cli.models import DownOptions, JsonOutput
    from ggufship.cli.settings_flags import add_model_flags

    u = sub.add_parser(
        "up",
        help="start the local services (S3, OCI registry, GitOps remote) on 127.0.0.1",
        description="Start SeaweedFS (S3), docker-registry (OCI) and a bare Git repository on loopback; "
        "already running services are kept. Endpoints go to STATE_DIR/state.json, generated "
        "credentials to STATE_DIR/credentials.json (0600).",
    )
    add_model_flags(u, ServicesSettings, exclude=("stop_timeout_s",), into="settings")
    add_model_flags(u, JsonOutput, into="output")
    u.set_defaults(func=run_up)

    d = sub.add_parser(
        "down",
        help="stop the local services (SIGTERM, then SIGKILL); data stays unless --purge",
    )
    add_model_flags(d, ServicesSettings, only=("state_dir", "stop_timeout_s"), into="settings")
    add_model_flags(d, DownOptions, into="options")
    d.set_defaults(func=run_down)

    s = sub.add_parser(
        "status",
        help="show the local services; exit 0 only if every recorded one runs and answers",
    )
    add_model_flags(s, ServicesSettings, only=("state_dir",), into="settings")
    add_model_flags(s, JsonOutput, into="output")
    s.set_defaults(func=run_status)


def run_up(args: argparse.Namespace) -> int:
    settings: ServicesSettings = args.settings
    statuses = up(settings)
    _report(settings.state_dir, statuses, as_json=args.json_output)
    return 0


def run_down(args: argparse.Namespace) -> int:
    settings: ServicesSettings = args.settings
    down(settings.state_dir, stop_timeout_s=settings.stop_timeout_s, purge=args.purge)
    return 0


def run_status(args: argparse.Namespace) -> int:
    settings: ServicesSettings = args.settings
    statuses = status(settings.state_dir)
    _report(settings.state_dir, statuses, as_json=args.json_output)
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
