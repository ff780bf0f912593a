"""The two API processes of a rollout: ``ggufship serve MODEL --track stable|canary`` on loopback.

Each runs in its own session with its log under ``STATE_DIR/rollout/logs``; ready
means ``GET /readyz`` answers 200 (model loaded and verified). Fault-injection
settings (``GGUFSHIP_SERVE_FAULT_*``) are never inherited from the caller's
environment: only a track's own ``env`` sets them, so a canary can be given an
injected delay or error rate while the stable stays clean.

Both processes run on this one machine, so unless the caller sets ``GGUFSHIP_SERVE_N_THREADS``
each gets half of the CPUs it may use (:func:`track_env`); with the serve default (all of them)
each, the two tracks' llama.cpp threads preempt one another and their latencies differ by the
scheduler's luck, which is what the gate compares. (On a cluster each pod has its own limit.)
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ggufship.retry import poll_until
from ggufship.rollout._errors import RolloutServerError
from ggufship.runtime import cpu_budget
from ggufship.services._process import (
    LOOPBACK,
    PortAllocator,
    clean_env,
    http_status,
    is_alive,
    log_tail,
    spawn,
    stop_process,
)

logger = logging.getLogger(__name__)

Track = Literal["stable", "canary"]
FAULT_ENV_PREFIX = "GGUFSHIP_SERVE_FAULT_"
#: ``ServeSettings.n_threads`` (``serve --n-threads``) as the environment sets it.
THREADS_ENV = "GGUFSHIP_SERVE_N_THREADS"
_POLL_S = 0.2


@dataclass
class TrackServer:
    """One ``ggufship serve`` process for ``track``."""

    track: Track
    model: Path
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None
    pid: int | None = None
    _ticks: int | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ggufship.cli.main",
            "serve",
            str(self.model.absolute()),  # the process runs with cwd=log.parent
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--track",
            self.track,
        ]

    def spawn(self, ports: PortAllocator) -> None:
        """Start the process on a free port; do not wait."""
        self.port = ports.pick()
        extra = track_env(self.env, os.environ, cpu_budget())
        env = clean_env((FAULT_ENV_PREFIX,), {**extra, "PYTHONUNBUFFERED": "1"})
        self.pid, self._ticks = spawn(self.command(self.port), log=self.log, cwd=self.log.parent, env=env)
        logger.info("%s: ggufship serve %s on %s (pid %d)", self.track, self.model, self.url, self.pid)

    def alive(self) -> bool:
        return self.pid is not None and is_alive(self.pid, self._ticks)

    def ready(self) -> bool:
        answer = http_status(f"{self.url}/readyz", timeout_s=2.0)
        return answer is not None and answer[0] == 200

    def stop(self, grace_s: float) -> bool:
        """SIGTERM (the server drains), SIGKILL after ``grace_s``; True if it was running."""
        if self.pid is None:
            return False
        was = stop_process(self.pid, self._ticks, grace_s, f"{self.track} API server")
        self.pid = None
        if was:
            logger.info("%s API server stopped", self.track)
        return was


def track_env(env: Mapping[str, str], environ: Mapping[str, str], cpus: int) -> dict[str, str]:
    """A track's extra environment: ``env``, plus ``THREADS_ENV`` = half of ``cpus`` (at least 1)
    unless ``env`` or the caller's ``environ`` already sets it (the two tracks share the CPUs)."""
    extra = dict(env)
    if THREADS_ENV not in extra and THREADS_ENV not in environ:
        extra[THREADS_ENV] = str(max(1, cpus // 2))
    return extra


def start_tracks(servers: list[TrackServer], timeout_s: float, grace_s: float, attempts: int = 3) -> None:
    """Start every server, then wait (bounded) until all are ready; a lost port race is retried.

    On failure every server started here is stopped and :class:`RolloutServerError`
    names the track, the model and the end of its log.
    """
    ports = PortAllocator()
    tries = dict.fromkeys((s.track for s in servers), 0)
    pending = list(servers)
    try:
        for server in pending:
            server.spawn(ports)
            tries[server.track] += 1

        def all_ready() -> bool:
            for server in list(pending):
                if server.ready():
                    logger.info("%s API server ready at %s", server.track, server.url)
                    pending.remove(server)
                elif not server.alive():
                    tail = log_tail(server.log, 25)
                    if "address already in use" in tail.lower() and tries[server.track] < attempts:
                        logger.warning("%s API server lost a port race; retrying", server.track)
                        server.pid = None
                        server.spawn(ports)
                        tries[server.track] += 1
                        continue
                    raise RolloutServerError(
                        f"{server.track} API server for {server.model} exited during start-up; "
                        f"log {server.log}:\n{tail}"
                    )
            return not pending

        if not poll_until(all_ready, timeout_s=timeout_s, interval_s=_POLL_S):
            names = ", ".join(f"{s.track} ({s.model})" for s in pending)
            raise RolloutServerError(
                f"API server(s) {names} not ready within {timeout_s:.0f}s; log {pending[0].log}:\n"
                f"{log_tail(pending[0].log, 25)}"
            )
    except BaseException:
        for server in servers:
            server.stop(grace_s)
        raise


def resolve_model(path: Path, what: str) -> Path:
    """``path`` as given to ``ggufship serve``: an export directory (with manifest.json) or a ``.gguf``."""
    from ggufship.rollout._errors import RolloutError

    resolved = path.expanduser().resolve()
    if resolved.is_dir():
        if not (resolved / "manifest.json").is_file():
            raise RolloutError(f"{what} {path}: not an export directory (no manifest.json in it)")
        return resolved
    if resolved.is_file():
        if resolved.suffix != ".gguf":
            raise RolloutError(f"{what} {path}: not a .gguf file nor an export directory")
        return resolved
    raise RolloutError(f"{what} {path}: no such file or directory")


__all__ = [
    "FAULT_ENV_PREFIX",
    "THREADS_ENV",
    "Track",
    "TrackServer",
    "resolve_model",
    "start_tracks",
    "track_env",
]
