"""OCI registry on loopback: Debian's ``docker-registry`` (CNCF distribution 2.8).

A generated ``config.yml`` binds ``127.0.0.1:<port>``, keeps blobs in the state
dir and, with auth on, points at an ``htpasswd`` file (bcrypt, the only hash
distribution accepts). The caller's ``REGISTRY_*`` variables are dropped: they
override the config file (``REGISTRY_HTTP_ADDR`` could re-bind a wildcard).
"""

from __future__ import annotations

import logging
import secrets
import subprocess
from pathlib import Path

import yaml

from ggufship.services._process import (
    LOOPBACK,
    PortAllocator,
    Service,
    ServiceInfo,
    ServiceStartError,
    ServiceToolError,
    clean_env,
    http_status,
    require_tool,
    write_private,
)

logger = logging.getLogger(__name__)

REGISTRY_CANDIDATES = (Path("/usr/bin/docker-registry"), Path("/usr/sbin/docker-registry"))
REALM = "ggufship"


def htpasswd_line(username: str, password: str) -> str:
    """One ``user:bcrypt-hash`` line: with the ``bcrypt`` package if installed, else ``htpasswd -B``."""
    try:
        import bcrypt
    except ImportError:
        bcrypt = None
    if bcrypt is not None:
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
        return f"{username}:{hashed}\n"
    tool = require_tool("htpasswd")
    # -i: the password comes on stdin, never on a command line other users can read.
    result = subprocess.run(
        [str(tool), "-n", "-B", "-C", "10", "-i", username],
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 or ":" not in result.stdout:
        raise ServiceToolError(f"htpasswd failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip() + "\n"


def registry_config(port: int, root: Path, htpasswd: Path | None) -> str:
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {
            "addr": f"{LOOPBACK}:{port}",
            "secret": secrets.token_hex(32),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": REALM, "path": str(htpasswd)}}
    return yaml.safe_dump(config, sort_keys=False)


class DockerRegistry(Service):
    """OCI distribution registry, optionally behind htpasswd basic auth."""

    name = "registry"
    engine = "docker-registry"

    def __init__(
        self, port: int | None = None, username: str | None = None, password: str | None = None
    ) -> None:
        if (username is None) != (password is None):
            raise ServiceStartError("registry auth needs both a username and a password")
        self.fixed_port = port
        self.username = username
        self._password = password

    @property
    def auth(self) -> str:
        return "htpasswd" if self.username else "none"

    def start(self, state_dir: Path, ports: PortAllocator) -> ServiceInfo:
        binary = require_tool("docker-registry", REGISTRY_CANDIDATES)
        home = (state_dir / "registry").resolve()
        data = home / "data"
        data.mkdir(parents=True, exist_ok=True)
        htpasswd: Path | None = None
        if self.username is not None and self._password is not None:
            htpasswd = home / "htpasswd"
            write_private(htpasswd, htpasswd_line(self.username, self._password))
        port = ports.claim(self.fixed_port) if self.fixed_port else ports.pick()
        config = home / "config.yml"
        write_private(config, registry_config(port, data, htpasswd))
        command = [str(binary), "serve", str(config)]
        options = {"auth": self.auth}
        if self.username:
            options["username"] = self.username
        return self.spawn_http(
            command,
            log_name="registry.log",
            state_dir=state_dir,
            cwd=home,
            env=clean_env(("REGISTRY_", "OTEL_")),
            port=port,
            data_dir=data,
            options=options,
        )

    def probe(self, info: ServiceInfo) -> bool:
        """``GET /v2/`` answers 200, or 401 with a Basic challenge when auth is on."""
        answer = http_status(f"{info.endpoint}/v2/", timeout_s=2.0)
        if answer is None:
            return False
        status, headers = answer
        if info.options.get("auth") == "htpasswd":
            challenge = next((v for k, v in headers.items() if k.lower() == "www-authenticate"), "")
            return status == 401 and challenge.lower().startswith("basic")
        return status == 200

    def drift(self, info: ServiceInfo) -> str | None:
        running = info.options.get("auth", "none")
        if running != self.auth:
            return f"it runs with auth={running}, not auth={self.auth}"
        if self.fixed_port and info.port != self.fixed_port:
            return f"it listens on port {info.port}, not {self.fixed_port}"
        return None
