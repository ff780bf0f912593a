"""The embedded default's S3 (``ggufship up``) as the CLI's last fallback.

Library code takes only explicit settings and the environment (``GGUFSHIP_S3_*``);
reading the state dir of ``ggufship up`` is the CLI's job. What flags and the
environment leave unset is filled from ``STATE_DIR/state.json`` and
``STATE_DIR/credentials.json``; the generated key pair is used only for the
embedded endpoint itself, never sent to an endpoint the user named elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr, ValidationError

from ggufship.publish._errors import PublishSettingsError

if TYPE_CHECKING:
    from ggufship.publish import S3Target

logger = logging.getLogger(__name__)


def _host(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1].rstrip("/")


def with_embedded_s3(target: S3Target, state_dir: Path | None = None) -> S3Target:
    """``target`` with the endpoint and keys that neither its fields nor the environment set
    taken from the embedded default's state dir (``state_dir``, else ``$GGUFSHIP_STATE_DIR``,
    else ``.ggufship``).

    Raises :class:`PublishSettingsError` naming the flag, the variable and the state dir when
    no endpoint is configured anywhere.
    """
    from ggufship.publish._s3 import S3Settings
    from ggufship.services import ServiceError, load_credentials, load_state, resolve_state_dir

    try:
        env = S3Settings()
    except ValidationError as exc:
        raise PublishSettingsError(f"invalid S3 settings in the environment: {exc}") from exc
    endpoint = target.endpoint or env.endpoint
    access_key = target.access_key or env.access_key
    secret_key = target.secret_key or env.secret_key
    if endpoint is not None and access_key is not None and secret_key is not None:
        return target
    try:
        directory = resolve_state_dir(state_dir)
        record = load_state(directory).services.get("s3")
    except ServiceError as exc:
        raise PublishSettingsError(f"no S3 endpoint configured and {exc}") from exc
    if record is None:
        if endpoint is None:
            raise PublishSettingsError(
                "no S3 endpoint: set --s3-endpoint or GGUFSHIP_S3_ENDPOINT, or start the embedded "
                f"default with `ggufship up` (state dir {directory} has no s3 service)"
            )
        return target  # the library names the missing credentials
    updates: dict[str, object] = {}
    if endpoint is None:
        updates["endpoint"] = endpoint = record.endpoint
    if (access_key is None or secret_key is None) and _host(endpoint) == _host(record.endpoint):
        try:
            creds = load_credentials(directory).s3
        except ServiceError as exc:
            raise PublishSettingsError(f"no S3 credentials configured and {exc}") from exc
        updates["access_key"] = access_key or creds.access_key
        updates["secret_key"] = secret_key or creds.secret_key
    logger.debug("S3 %s from the embedded default in %s", ", ".join(updates), directory)
    return replace(target, **updates)  # type: ignore[arg-type]


def embedded_s3_environment(state_dir: Path | None = None) -> dict[str, str]:
    """``GGUFSHIP_S3_*`` variables for what the environment leaves unset, from the embedded default
    (empty when the environment is complete or no S3 is recorded: the library then names what is
    missing). For commands that hand the environment to the library, e.g. ``serve s3://…``."""
    from ggufship.publish import S3Target

    blank = S3Target(bucket="unused")
    try:
        filled = with_embedded_s3(blank, state_dir)
    except PublishSettingsError as exc:
        logger.debug("no embedded S3 fallback: %s", exc)
        return {}
    values: dict[str, str] = {}
    if filled.endpoint is not None:
        values["GGUFSHIP_S3_ENDPOINT"] = filled.endpoint
    if filled.access_key is not None:
        values["GGUFSHIP_S3_ACCESS_KEY"] = filled.access_key
    if isinstance(filled.secret_key, SecretStr):
        values["GGUFSHIP_S3_SECRET_KEY"] = filled.secret_key.get_secret_value()
    return values
