"""Exceptions of the local rollout (exit codes 60–69, documented in docs/reference/exit-codes.md)."""

from __future__ import annotations

from ggufship.errors import GgufshipError


class RolloutError(GgufshipError):
    """The rollout could not run: bad request, missing tool, a part that did not start."""

    exit_code = 60


class RolloutAborted(RolloutError):
    """The rollout ended ``Degraded``: a failed analysis (gate), ``ggufship rollout abort``, or the
    canary's API server died."""

    exit_code = 61


class RolloutPaused(RolloutError):
    """The rollout ended paused (inconclusive analysis or no promotion in time); not promoted."""

    exit_code = 62


class RolloutBusyError(RolloutError):
    """Another rollout runs in this state directory."""

    exit_code = 63


class RolloutNotRunningError(RolloutError):
    """``promote``/``abort``/``status``: no rollout runs (or ever ran) in this state directory."""

    exit_code = 64


class RolloutProxyError(RolloutError):
    """nginx is missing, rejected its generated config, or did not start/reload."""

    exit_code = 65


class RolloutServerError(RolloutError):
    """A track's API server (``ggufship serve``) exited or did not become ready."""

    exit_code = 66


class RolloutMetricsError(RolloutError):
    """Prometheus could not be started, or the tracks could not be registered as scrape targets."""

    exit_code = 67
