"""The process layer of the local services: the record of one started service,
the contract every service implements, and the primitives they share.

* :class:`ServiceInfo` — what ``up`` writes to the state file for one service
* :class:`Service`     — start / probe / stop, implemented once per engine
* free ports on loopback, spawning in a new session with a log file, waiting
  (bounded) until a probe answers, stopping with SIGTERM then SIGKILL

Processes are inspected through psutil. A process is identified by its PID *and* its start time,
so a PID that the kernel handed to another program after ours died is never
taken for ours, and never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import psutil
from pydantic import BaseModel, ConfigDict, Field

from ggufship.errors import GgufshipError
from ggufship.retry import poll_until

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_POLL_S = 0.2
_KILL_WAIT_S = 5.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_SOCKET_MAX = 107


class ServiceError(GgufshipError):
    """A local service could not be started, stopped or reached."""

    exit_code = 20


class ServiceToolError(ServiceError):
    """A program a local service needs (``weed``, ``docker-registry``, ``git``, ...) is missing."""

    exit_code = 21


class ServiceStartError(ServiceError):
    """A service exited during start-up or did not answer in time."""

    exit_code = 22


class ServiceStateError(ServiceError):
    """The state directory or its state file is unusable, or busy with another command."""

    exit_code = 23


class ServicesNotRunningError(ServiceError):
    """``status``: a recorded service is not running (stale PID, not answering) or none is recorded."""

    exit_code = 24


class ServiceInfo(BaseModel):
    """One started service, as recorded in the state file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="service name in the state file: s3, registry, git, ...")
    engine: str = Field(description="what implements it: seaweedfs, docker-registry, git, ...")
    endpoint: str = Field(description="where clients connect: http://127.0.0.1:PORT or a file:// URL")
    pid: int | None = Field(default=None, description="process id; None for services without a process")
    pid_start_ticks: int | None = Field(
        default=None, description="process start time (clock ticks after boot), guards against PID reuse"
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="the port clients use")
    ports: dict[str, int] = Field(default_factory=dict, description="every port the process listens on")
    command: tuple[str, ...] = ()
    log: Path | None = None
    data_dir: Path
    started_at: datetime
    options: dict[str, str] = Field(default_factory=dict, description="start options that matter later")
    runtime_files: tuple[Path, ...] = Field(
        default=(), description="sockets or directories outside the data dir, removed after the process stops"
    )


class PortAllocator:
    """Hands out distinct free TCP ports on loopback for one ``up``."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self._given: set[int] = set()

    def pick(self) -> int:
        for _ in range(50):
            port = free_port(self.host)
            if port not in self._given:
                self._given.add(port)
                return port
        raise ServiceStartError(f"no free TCP port found on {self.host}")

    def claim(self, port: int) -> int:
        """Use a port the caller fixed; fail early, with the port in the message, if it is taken."""
        if port in self._given or not port_is_free(port, self.host):
            raise ServiceStartError(f"port {self.host}:{port} is already in use")
        self._given.add(port)
        return port


class Service(ABC):
    """One local service. Subclasses set ``name`` and ``engine`` and implement start and probe.

    ``start`` spawns (or creates) the service and returns at once; the caller
    waits with :func:`wait_ready` on ``probe``, and calls ``stop`` if that fails.
    ``stop`` must work from the :class:`ServiceInfo` alone: ``down`` may run in
    another process than ``up``.
    """

    name: ClassVar[str]
    engine: ClassVar[str]

    @abstractmethod
    def start(self, state_dir: Path, ports: PortAllocator) -> ServiceInfo:
        """Start the service with its files under ``state_dir``; do not wait for it."""

    @abstractmethod
    def probe(self, info: ServiceInfo) -> bool:
        """One quick readiness check (at most a few seconds); True when it answers."""

    def stop(self, info: ServiceInfo, grace_s: float) -> bool:
        """Stop the process, remove its runtime files; True if a process was running."""
        return stop_service(info, grace_s)

    def drift(self, info: ServiceInfo) -> str | None:
        """Why the running service differs from what this object would start, or None."""
        return None

    def spawn_http(
        self,
        command: list[str],
        *,
        log_name: str,
        state_dir: Path,
        cwd: Path,
        env: Mapping[str, str],
        port: int,
        data_dir: Path,
        options: Mapping[str, str],
        ports: Mapping[str, int] | None = None,
        runtime_files: tuple[Path, ...] = (),
    ) -> ServiceInfo:
        """Spawn ``command`` (its output in ``STATE_DIR/logs/<log_name>``) and describe it: a service
        answering HTTP on loopback ``port`` (``ports``: every port it listens on, default that one)."""
        log = state_dir.resolve() / "logs" / log_name
        pid, ticks = spawn(command, log=log, cwd=cwd, env=dict(env))
        return ServiceInfo(
            name=self.name,
            engine=self.engine,
            endpoint=f"http://{LOOPBACK}:{port}",
            pid=pid,
            pid_start_ticks=ticks,
            port=port,
            ports=dict(ports) if ports is not None else {"http": port},
            command=tuple(command),
            log=log,
            data_dir=data_dir,
            started_at=datetime.now(UTC),
            options=dict(options),
            runtime_files=runtime_files,
        )


# ---------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port the kernel considers free on ``host`` right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- processes

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def require_tool(name: str, candidates: Iterable[Path] = ()) -> Path:
    """The path of an executable: the first existing candidate, else ``name`` on PATH."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise ServiceToolError(f"`{name}` not found (looked in: {', '.join(map(str, candidates)) or 'PATH'})")
    return Path(found)


def clean_env(drop_prefixes: tuple[str, ...] = (), extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without variables that would reconfigure a child behind our back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(extra or {})
    return env


def spawn(
    command: list[str], *, log: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> tuple[int, int | None]:
    """Start ``command`` in a new session, stdout and stderr appended to ``log``.

    Returns the PID and its start time. The child outlives this process: that is
    what ``up`` wants; ``down`` stops it later from the state file.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"--- ggufship {datetime.now().astimezone().isoformat()}: {' '.join(command)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ServiceStartError(f"cannot run {command[0]}: {exc}") from exc
    _CHILDREN[proc.pid] = proc
    ticks = process_start_ticks(proc.pid)
    logger.debug("started pid %d: %s", proc.pid, " ".join(command))
    return proc.pid, ticks


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process(pid: int) -> psutil.Process | None:
    """The running process ``pid`` (zombies reaped and counted as gone), or None."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return None
    except psutil.NoSuchProcess:
        return None
    return proc


def _start_ticks(proc: psutil.Process) -> int:
    """Start time in clock ticks after boot (the unit of ``/proc/PID/stat`` field 22, kept in state files)."""
    return round((proc.create_time() - psutil.boot_time()) * _CLOCK_TICKS)


def process_start_ticks(pid: int) -> int | None:
    proc = _process(pid)
    if proc is None:
        return None
    try:
        return _start_ticks(proc)
    except psutil.Error:
        return None


def is_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if ``pid`` runs and, when ``start_ticks`` is known, is the very process we started."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        proc = _process(pid)
        return proc is not None and (start_ticks is None or _start_ticks(proc) == start_ticks)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return start_ticks is None


def child_pids(pid: int) -> list[int]:
    """PIDs of the running (not zombie) direct children of ``pid``; empty if ``pid`` is gone."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    return [child.pid for child in children if _process(child.pid) is not None]


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal the process group the process leads (its session), else the process alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, start_ticks: int | None, timeout_s: float) -> bool:
    return poll_until(lambda: not is_alive(pid, start_ticks), timeout_s=timeout_s, interval_s=0.05)


def stop_process(pid: int, start_ticks: int | None, grace_s: float, what: str) -> bool:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL. True if the process was running."""
    if not is_alive(pid, start_ticks):
        return False
    logger.debug("stopping %s (pid %d)", what, pid)
    _signal(pid, signal.SIGTERM)
    if not _wait_gone(pid, start_ticks, grace_s):
        logger.warning("%s (pid %d) still running %.0fs after SIGTERM; sending SIGKILL", what, pid, grace_s)
        _signal(pid, signal.SIGKILL)
        if not _wait_gone(pid, start_ticks, _KILL_WAIT_S):
            raise ServiceError(f"{what} (pid {pid}) survived SIGKILL")
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)
    return True


def remove_runtime_files(paths: Iterable[Path]) -> None:
    """Remove sockets (and directories of sockets) a stopped service left behind."""
    for path in paths:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(mode):
            path.unlink(missing_ok=True)
        elif stat.S_ISDIR(mode):
            shutil.rmtree(path, ignore_errors=True)


def stop_service(info: ServiceInfo, grace_s: float) -> bool:
    """Stop the process of ``info`` (if any) and remove its runtime files."""
    was_running = False
    if info.pid is not None:
        was_running = stop_process(info.pid, info.pid_start_ticks, grace_s, info.name)
    remove_runtime_files(info.runtime_files)
    return was_running


def record_alive(info: ServiceInfo) -> bool:
    """True if the process of ``info`` runs (services without a process count as alive)."""
    return info.pid is None or is_alive(info.pid, info.pid_start_ticks)


# ---------------------------------------------------------------- readiness


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(info: ServiceInfo, probe: Callable[[ServiceInfo], bool], timeout_s: float) -> None:
    """Poll ``probe`` until it answers; fail fast if the process exits, fail after ``timeout_s``."""

    def answered() -> bool:
        if not record_alive(info):
            child = _CHILDREN.get(info.pid) if info.pid is not None else None
            code = (
                f" with status {child.returncode}"
                if child is not None and child.returncode is not None
                else ""
            )
            raise ServiceStartError(
                f"{info.name} ({info.engine}) exited during start-up{code}; "
                f"log {info.log}:\n{log_tail(info.log)}"
            )
        return probe(info)

    if not poll_until(answered, timeout_s=timeout_s, interval_s=_POLL_S):
        raise ServiceStartError(
            f"{info.name} ({info.engine}) did not answer at {info.endpoint} within {timeout_s:.0f}s; "
            f"log {info.log}:\n{log_tail(info.log)}"
        )


def http_status(url: str, timeout_s: float = 2.0) -> tuple[int, Mapping[str, str]] | None:
    """(status, headers) of a GET on ``url``; None if nothing answered. Redirects are not followed."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout_s) as resp:
            return int(resp.status), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers or {})
    except (urllib.error.URLError, OSError, ValueError):
        return None


def write_private(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        tmp.chmod(0o600)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def short_socket_path(preferred: Path, name: str, fallback_dirs: list[Path]) -> Path:
    """``preferred`` if it fits in a Unix socket address, else ``name`` in a private temp dir.

    A temp dir made here is appended to ``fallback_dirs`` so the caller records it
    for removal after the service stops.
    """
    if len(os.fsencode(preferred)) <= UNIX_SOCKET_MAX:
        return preferred
    import tempfile

    if not fallback_dirs:
        fallback_dirs.append(Path(tempfile.mkdtemp(prefix="ggufship-")))
    logger.warning("state dir path too long for a Unix socket; using %s", fallback_dirs[0])
    return fallback_dirs[0] / name
