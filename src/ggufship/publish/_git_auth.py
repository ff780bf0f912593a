"""HTTP credentials for the GitOps repository: ``GGUFSHIP_GIT_TOKEN`` given to git through its environment.

The token is never written into the remote URL, the clone's ``.git/config`` or any
file: it reaches git as a URL-scoped ``http.<scheme>://<host>/.extraHeader`` entry
passed with ``GIT_CONFIG_COUNT`` / ``GIT_CONFIG_KEY_<n>`` / ``GIT_CONFIG_VALUE_<n>``
(git >= 2.31, see git-config(1) "ENVIRONMENT"), so git sends
``Authorization: Basic base64(<user>:<token>)`` to that host only (GitHub accepts the
user ``x-access-token``, GitLab any user with a token; ``GGUFSHIP_GIT_USERNAME``
overrides it). Only ``https://`` URLs get it, and ``http://`` to a loopback host
(a local test server): a token is never sent in clear over the network.
:func:`redact` removes the token (and its encoded header) from any text that is
logged or raised.
"""

from __future__ import annotations

import base64
import os
from urllib.parse import urlsplit

TOKEN_ENV = "GGUFSHIP_GIT_TOKEN"
USERNAME_ENV = "GGUFSHIP_GIT_USERNAME"
DEFAULT_USERNAME = "x-access-token"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _token() -> str:
    return os.environ.get(TOKEN_ENV, "").strip()


def _encoded(token: str) -> str:
    user = os.environ.get(USERNAME_ENV, "").strip() or DEFAULT_USERNAME
    return base64.b64encode(f"{user}:{token}".encode()).decode("ascii")


def auth_env(url: str) -> dict[str, str]:
    """The environment that makes git authenticate to ``url``'s host with the token (``{}``: none)."""
    token = _token()
    if not token:
        return {}
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not (parts.scheme == "https" or (parts.scheme == "http" and host in _LOOPBACK)):
        return {}
    netloc = parts.netloc.rpartition("@")[2]  # never a user:password from the URL into the key
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"http.{parts.scheme}://{netloc}/.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {_encoded(token)}",
    }


def redact(text: str) -> str:
    """``text`` without the token or its encoded header value."""
    token = _token()
    if not token:
        return text
    return text.replace(_encoded(token), "***").replace(token, "***")
