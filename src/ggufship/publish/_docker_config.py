"""Registry credentials the way ``docker login`` leaves them: ``$DOCKER_CONFIG/config.json``.

Read-only: the directory is ``DOCKER_CONFIG`` if set, else ``~/.docker``. A
``kubernetes.io/dockerconfigjson`` Secret has the same shape (the chart mounts it
as ``config.json`` and points ``DOCKER_CONFIG`` at it). Per registry, in Docker's
order: ``credHelpers[<host>]``, else ``credsStore``, else ``auths[<host>]``
(``auth`` = base64 ``user:password``, or ``username``/``password``). A helper is
run as ``docker-credential-<name> get`` with the server name on stdin and its JSON
answer (``Username``/``Secret``) is used; a missing helper is an error naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

logger = logging.getLogger(__name__)

# the keys `docker login` uses for Docker Hub
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
_HELPER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RegistryLogin:
    """A username/password for one registry, and where it came from (for error messages)."""

    username: str
    password: SecretStr
    source: str

    def __repr__(self) -> str:
        return f"RegistryLogin(user={self.username!r}, source={self.source!r})"


class DockerConfigError(Exception):
    """The Docker config file or a credential helper is unusable (wrapped by the OCI engine)."""


def config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


def _host_of(key: str) -> str:
    """``https://host:port/v1/`` → ``host:port``; Docker Hub's aliases → ``docker.io``."""
    rest = key.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    host = rest.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB else host


def _from_auths(entry: Any, where: str) -> RegistryLogin | None:
    if not isinstance(entry, dict):
        raise DockerConfigError(f"{where}: not an object")
    username, password = entry.get("username"), entry.get("password")
    encoded = entry.get("auth")
    if encoded:
        if not isinstance(encoded, str):
            raise DockerConfigError(f"{where}.auth: not a string")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise DockerConfigError(f"{where}.auth: not base64 of 'user:password' ({exc})") from exc
        username, sep, password = decoded.partition(":")
        if not sep:
            raise DockerConfigError(f"{where}.auth: decodes to no 'user:password' pair")
    if isinstance(username, str) and username and isinstance(password, str):
        return RegistryLogin(username, SecretStr(password), where)
    if entry.get("identitytoken"):
        raise DockerConfigError(
            f"{where}: only an OAuth identitytoken is stored; this engine needs a username and password "
            "(or a credential helper)"
        )
    return None


def _from_helper(helper: str, server: str, where: str) -> RegistryLogin | None:
    program = f"docker-credential-{helper}"
    binary = shutil.which(program)
    if binary is None:
        raise DockerConfigError(f"{where}: credential helper {program!r} is not installed (not on PATH)")
    try:
        result = subprocess.run(  # the helper protocol: server name on stdin
            [binary, "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DockerConfigError(
            f"{where}: {program} get did not answer in {_HELPER_TIMEOUT_S:.0f} s"
        ) from exc
    if result.returncode != 0:
        text = (result.stdout or result.stderr).strip()
        if "credentials not found" in text.lower():
            return None
        raise DockerConfigError(f"{where}: {program} get failed (exit {result.returncode}): {text[:200]}")
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DockerConfigError(f"{where}: {program} get answered no Username/Secret JSON") from exc
    if not isinstance(username, str) or not isinstance(secret, str):
        raise DockerConfigError(f"{where}: {program} get answered no Username/Secret strings")
    if username == "<token>":
        raise DockerConfigError(f"{where}: {program} holds an identity token, not a username and password")
    return RegistryLogin(username, SecretStr(secret), f"{where} ({program})")


def login_for(registry: str) -> RegistryLogin | None:
    """The stored login for ``registry`` (``host[:port]``), or None (no file, no entry).

    Raises :class:`DockerConfigError` for a file that is not JSON, an entry that
    cannot be decoded, or a helper that is missing or fails.
    """
    path = config_path()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DockerConfigError(f"{path}: not a readable JSON Docker config ({exc})") from exc
    if not isinstance(data, dict):
        raise DockerConfigError(f"{path}: not a JSON object")
    host = _host_of(registry)
    helpers = data.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _host_of(str(key)) == host and isinstance(helper, str) and helper:
                return _from_helper(helper, str(key), f"{path}: credHelpers[{key!r}]")
    auths = data.get("auths") or {}
    if not isinstance(auths, dict):
        raise DockerConfigError(f"{path}: 'auths' is not an object")
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        server = next((str(k) for k in auths if _host_of(str(k)) == host), registry)
        login = _from_helper(store, server, f"{path}: credsStore")
        if login is not None:
            return login
    for key, entry in auths.items():
        if _host_of(str(key)) == host:
            login = _from_auths(entry, f"{path}: auths[{key!r}]")
            if login is not None:
                logger.debug("registry login for %s from %s", registry, path)
                return login
    return None
