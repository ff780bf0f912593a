"""Process supervision of the local rollout: Prometheus, the two API servers, nginx and the load.

Everything here starts, checks, reroutes or stops a process; nothing decides anything
(that is the policy, ``_policy``). :class:`RolloutProcesses` is used by the step
machine (``_steps``): ``start()`` brings the parts up in order (Prometheus if none runs,
both tracks, their scrape targets, nginx at weight 0, the load), ``route()`` changes the
split (graceful nginx reload, old workers drained), ``back_to_stable()`` takes the canary
out of the rotation and stops it, ``teardown()`` stops whatever was started, in reverse.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ggufship.retry import poll_until
from ggufship.rollout._errors import (
    RolloutBusyError,
    RolloutError,
    RolloutMetricsError,
    RolloutProxyError,
    RolloutServerError,
)
from ggufship.rollout._load import LoadGenerator, LoadSpec
from ggufship.rollout._proxy import NginxProxy, ProxyRoutes
from ggufship.rollout._status import rollout_dir
from ggufship.rollout._tracks import TrackServer, start_tracks

logger = logging.getLogger(__name__)

_SETTLE_REQUESTS = 3


@contextlib.contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """One rollout per state directory (an advisory lock held for the whole run)."""
    directory = rollout_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / ".lock", blocking=False, mode=0o600, preserve_lock_file=True)
    try:
        lock.acquire()
    except Timeout:
        raise RolloutBusyError(f"{state_dir}: another rollout is running there") from None
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class ProcessSettings:
    """How the processes are started and stopped."""

    state_dir: Path
    start_timeout_s: float
    stop_timeout_s: float
    scrape_timeout_s: float
    prometheus_scrape_interval_s: float
    poll_s: float
    settle_s: float


def _answers(url: str) -> bool:
    from ggufship.services._process import http_status

    answer = http_status(f"{url}/-/ready", timeout_s=2.0)
    return answer is not None and answer[0] == 200


class RolloutProcesses:
    """The processes of one rollout: the two tracks, Prometheus (if started here), nginx, the load."""

    def __init__(
        self,
        settings: ProcessSettings,
        stable: TrackServer,
        canary: TrackServer,
        load: LoadSpec,
        rollout_id: str,
    ) -> None:
        self.settings = settings
        self.dir = rollout_dir(settings.state_dir).resolve()
        self.stable = stable
        self.canary = canary
        self.load_spec = load
        self.rollout_id = rollout_id
        self.jobs = {track: f"rollout-{rollout_id}-{track}" for track in ("stable", "canary")}
        self.proxy: NginxProxy | None = None
        self.load: LoadGenerator | None = None
        self.records = self.dir / "load.jsonl"
        self.prometheus_url = ""
        self._started_prometheus = False

    # ---------------------------------------------------------------- start

    def start_metrics_and_tracks(self) -> None:
        """Prometheus (unless one answers in the state dir), then both API servers."""
        from ggufship.services import ServicesSettings, load_state, prometheus_url, up

        s = self.settings
        state = load_state(s.state_dir)
        if "prometheus" not in state.services or not _answers(state.services["prometheus"].endpoint):
            # Stopped at the end only if nothing else of the user's stack is recorded there.
            self._started_prometheus = set(state.services) <= {"prometheus"}
            logger.info("starting Prometheus in %s", s.state_dir)
            try:
                up(
                    ServicesSettings(
                        state_dir=s.state_dir,
                        services=("prometheus",),
                        prometheus_scrape_interval_s=s.prometheus_scrape_interval_s,
                        start_timeout_s=s.start_timeout_s,
                        stop_timeout_s=s.stop_timeout_s,
                    )
                )
            except RolloutError:
                raise
            except Exception as exc:
                raise RolloutMetricsError(f"cannot start Prometheus in {s.state_dir}: {exc}") from exc
        self.prometheus_url = prometheus_url(s.state_dir)
        start_tracks([self.stable, self.canary], s.start_timeout_s, s.stop_timeout_s)

    def start_traffic(self) -> None:
        """Scrape targets (before any traffic), nginx at weight 0, then the load through it."""
        self._register_targets()
        self.proxy = NginxProxy(
            self.dir / "nginx", self._routes(0), start_timeout_s=self.settings.start_timeout_s
        )
        self.proxy.start()
        self.load = LoadGenerator(self.load_spec.model_copy(update={"url": self.proxy.url}), self.records)
        self.load.start()

    def _register_targets(self) -> None:
        from ggufship.services import add_scrape_target, wait_scrape_target

        try:
            for server in (self.stable, self.canary):
                add_scrape_target(
                    self.settings.state_dir,
                    self.jobs[server.track],
                    [server.target],
                    {"rollout_id": self.rollout_id, "rollout_track": server.track},
                )
            for job in self.jobs.values():
                wait_scrape_target(self.prometheus_url, job, 1, self.settings.scrape_timeout_s)
        except RolloutError:
            raise
        except Exception as exc:
            raise RolloutMetricsError(f"cannot register the API servers with Prometheus: {exc}") from exc

    # ---------------------------------------------------------------- traffic

    def _routes(self, weight: int, canary: bool = True) -> ProxyRoutes:
        if self.proxy is not None:
            listen = self.proxy.routes.listen_port
        else:
            from ggufship.services._process import free_port

            listen = free_port()
        return ProxyRoutes(
            listen_port=listen,
            stable_port=self.stable.port or 0,
            canary_port=self.canary.port if canary else None,
            canary_weight=weight if canary else 0,
        )

    def route(self, weight: int) -> ProxyRoutes:
        """Send ``weight`` % to the canary (nginx reloaded gracefully, old workers drained)."""
        if self.proxy is None:
            raise RolloutError("proxy not started")
        self.proxy.route(self._routes(weight), drain_timeout_s=max(30.0, self.settings.stop_timeout_s * 3))
        return self.proxy.routes

    def back_to_stable(self) -> None:
        """Weight → 0: nginx without the canary, no request left on it, then the canary stopped."""
        if self.proxy is not None and self.proxy.alive():
            self.proxy.route(
                self._routes(0, canary=False), drain_timeout_s=max(30.0, self.settings.stop_timeout_s * 3)
            )
        self.canary.stop(self.settings.stop_timeout_s)

    # ---------------------------------------------------------------- health

    def check(self) -> str | None:
        """Raise when the stable or nginx died; the reason when the canary died (an abort), else None."""
        if not self.stable.alive():
            raise RolloutServerError(f"the stable API server exited; log {self.stable.log}")
        if self.proxy is not None and not self.proxy.alive():
            raise RolloutProxyError(f"nginx exited; log {self.proxy.error_log}")
        if not self.canary.alive():
            return f"the canary API server exited; log {self.canary.log}"
        return None

    def settle(self) -> None:
        """Keep the load on the stable a little longer: ``settle_s``, and until a few requests
        sent after the switch completed (bounded: ``settle_s`` + 30 s), so the records show it."""
        start = time.monotonic()
        switched = time.time()

        def settled() -> bool:
            if self.load is None or self.load.done():
                return True
            if not self.stable.alive():
                raise RolloutServerError(f"the stable API server exited; log {self.stable.log}")
            after = sum(r.started_at >= switched for r in self.load.records())
            return time.monotonic() - start >= self.settings.settle_s and after >= _SETTLE_REQUESTS

        poll_until(settled, timeout_s=self.settings.settle_s + 30.0, interval_s=self.settings.poll_s)

    # ---------------------------------------------------------------- stop

    def teardown(self) -> list[str]:
        """Stop everything started here, in reverse order; the problems met (never raises)."""
        from ggufship.services import down, remove_scrape_target

        s = self.settings
        errors: list[str] = []
        if self.load is not None:
            try:
                self.load.stop(timeout_s=max(10.0, self.load_spec.timeout_s))
            except RolloutError as exc:
                errors.append(str(exc))
        if self.proxy is not None:
            self.proxy.stop(s.stop_timeout_s)
        for server in (self.canary, self.stable):
            try:
                server.stop(s.stop_timeout_s)
            except Exception as exc:
                errors.append(f"{server.track}: {exc}")
        for job in self.jobs.values():
            with contextlib.suppress(Exception):
                remove_scrape_target(s.state_dir, job)
        if self._started_prometheus:
            try:
                down(s.state_dir, stop_timeout_s=s.stop_timeout_s)
            except Exception as exc:
                errors.append(f"prometheus: {exc}")
        return errors
