"""Metrics on loopback: Debian's ``prometheus`` (2.42), scraping targets listed in JSON files.

A generated ``prometheus.yml`` sets a short scrape interval (1 s by default, so a
local rollout sees data within seconds) and one scrape job whose targets come
from ``file_sd_configs`` on ``STATE_DIR/prometheus/targets/*.json``. Callers add
and remove scrape targets by writing those files (:func:`add_scrape_target`,
:func:`remove_scrape_target`); Prometheus notices the change itself (file watch,
then its discovery manager's ~5 s update throttle), no reload needed.

The web server (API, UI, ``/-/ready``) listens on ``127.0.0.1:<port>`` only;
the TSDB lives in ``STATE_DIR/prometheus/data``. ``--web.enable-lifecycle`` is
off unless asked for (it lets anyone on loopback stop the server).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from ggufship.retry import poll_until
from ggufship.services._process import (
    LOOPBACK,
    PortAllocator,
    Service,
    ServiceInfo,
    ServiceStartError,
    ServiceStateError,
    clean_env,
    http_status,
    require_tool,
    write_private,
)

logger = logging.getLogger(__name__)

PROMETHEUS_CANDIDATES = (Path("/usr/bin/prometheus"), Path("/usr/sbin/prometheus"))
HOME = "prometheus"
TARGETS_DIR = "targets"
DEFAULT_JOB = "ggufship"
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")


def _duration(seconds: float) -> str:
    """A Prometheus duration string: whole milliseconds (``1500ms``), or seconds when exact."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def prometheus_config(targets_dir: Path, scrape_interval_s: float) -> str:
    """``prometheus.yml``: one job fed by ``file_sd_configs`` on ``targets_dir/*.json``."""
    interval = _duration(scrape_interval_s)
    timeout = _duration(min(scrape_interval_s, 10.0))
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": timeout,
            "evaluation_interval": interval,
        },
        "scrape_configs": [
            {
                "job_name": DEFAULT_JOB,
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": "5s"}],
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


class PrometheusServer(Service):
    """Debian ``prometheus`` on 127.0.0.1 with file-based scrape targets."""

    name = "prometheus"
    engine = "prometheus"

    def __init__(
        self,
        port: int | None = None,
        scrape_interval_s: float = 1.0,
        retention: str = "2d",
        lifecycle: bool = False,
    ) -> None:
        self.fixed_port = port
        self.scrape_interval_s = scrape_interval_s
        self.retention = retention
        self.lifecycle = lifecycle

    def start(self, state_dir: Path, ports: PortAllocator) -> ServiceInfo:
        binary = require_tool("prometheus", PROMETHEUS_CANDIDATES)
        home = (state_dir / HOME).resolve()
        data = home / "data"
        targets = home / TARGETS_DIR
        for d in (data, targets):
            d.mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        write_private(config, prometheus_config(targets, self.scrape_interval_s))
        port = ports.claim(self.fixed_port) if self.fixed_port else ports.pick()
        command = [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={LOOPBACK}:{port}",
            f"--web.external-url=http://{LOOPBACK}:{port}/",
            "--log.level=info",
        ]
        if self.lifecycle:
            command.append("--web.enable-lifecycle")
        return self.spawn_http(
            command,
            log_name="prometheus.log",
            state_dir=state_dir,
            cwd=home,
            env=clean_env(("PROMETHEUS_",)),
            port=port,
            data_dir=data,
            options={
                "scrape_interval": _duration(self.scrape_interval_s),
                "targets_dir": str(targets),
                "lifecycle": str(self.lifecycle).lower(),
            },
        )

    def probe(self, info: ServiceInfo) -> bool:
        """``GET /-/ready`` answers 200 (the TSDB is open and the web API serves)."""
        answer = http_status(f"{info.endpoint}/-/ready", timeout_s=2.0)
        return answer is not None and answer[0] == 200

    def drift(self, info: ServiceInfo) -> str | None:
        running = info.options.get("scrape_interval")
        if running is not None and running != _duration(self.scrape_interval_s):
            return f"it scrapes every {running}, not {_duration(self.scrape_interval_s)}"
        if self.fixed_port and info.port != self.fixed_port:
            return f"it listens on port {info.port}, not {self.fixed_port}"
        return None


# ---------------------------------------------------------------- scrape targets


def targets_dir(state_dir: Path | str) -> Path:
    """Where the scrape target files of a state dir live (``STATE_DIR/prometheus/targets``)."""
    return Path(state_dir) / HOME / TARGETS_DIR


def add_scrape_target(
    state_dir: Path | str,
    job: str,
    targets: Sequence[str],
    labels: Mapping[str, str] | None = None,
    metrics_path: str = "/metrics",
) -> Path:
    """Let the local Prometheus scrape ``targets`` (``host:port``) as ``job`` with extra ``labels``.

    Writes ``targets/<job>.json`` atomically (replacing an earlier file of that job)
    and returns its path. Prometheus picks the change up by itself, typically within
    ~5-6 s; use :func:`wait_scrape_target` before sending traffic that must be seen.
    """
    if not _JOB_RE.match(job):
        raise ServiceStateError(f"scrape job name {job!r}: use letters, digits, '_', '-', '.' (max 64)")
    if not targets:
        raise ServiceStateError(f"scrape job {job!r}: no targets given")
    for target in targets:
        if not _TARGET_RE.match(target):
            raise ServiceStateError(f"scrape job {job!r}: target {target!r} is not host:port")
    all_labels = {"job": job, **dict(labels or {})}
    for key in all_labels:
        if not _LABEL_RE.match(key) or key.startswith("__"):
            raise ServiceStateError(f"scrape job {job!r}: invalid label name {key!r}")
    if metrics_path != "/metrics":
        if not metrics_path.startswith("/"):
            raise ServiceStateError(f"scrape job {job!r}: metrics_path {metrics_path!r} must start with /")
        all_labels["__metrics_path__"] = metrics_path
    directory = targets_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{job}.json"
    # The temporary name does not match *.json, so Prometheus never reads half a file.
    tmp = directory / f".{job}.json.{os.getpid()}.tmp"
    doc = [{"targets": list(targets), "labels": all_labels}]
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("prometheus: scraping %s as job %s", ", ".join(targets), job)
    return path


def remove_scrape_target(state_dir: Path | str, job: str) -> bool:
    """Stop scraping ``job``; True if it had a target file."""
    if not _JOB_RE.match(job):
        raise ServiceStateError(f"scrape job name {job!r}: use letters, digits, '_', '-', '.' (max 64)")
    path = targets_dir(state_dir) / f"{job}.json"
    existed = path.exists()
    path.unlink(missing_ok=True)
    if existed:
        logger.info("prometheus: no longer scraping job %s", job)
    return existed


def wait_scrape_target(prometheus_url: str, job: str, count: int = 1, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until Prometheus reports ``count`` targets of ``job`` with health ``up``.

    New targets take ~5-6 s to appear (file watch + discovery throttle), and a
    target is ``up`` only after its first successful scrape.
    """
    import httpx

    last = "no answer"

    def enough_up() -> bool:
        nonlocal last
        try:
            resp = httpx.get(
                f"{prometheus_url}/api/v1/targets", params={"state": "active"}, timeout=2.0, trust_env=False
            )
            resp.raise_for_status()
            active = resp.json()["data"]["activeTargets"]
            mine = [t for t in active if t.get("labels", {}).get("job") == job]
            up = [t for t in mine if t.get("health") == "up"]
            if len(up) >= count:
                return True
            last = f"{len(up)}/{len(mine)} targets up" + (
                f" ({mine[0].get('lastError')})" if mine and mine[0].get("lastError") else ""
            )
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = str(exc)
        return False

    if not poll_until(enough_up, timeout_s=timeout_s, interval_s=0.25):
        raise ServiceStartError(
            f"prometheus at {prometheus_url}: job {job!r} not scraped within {timeout_s:.0f}s: {last}"
        )
