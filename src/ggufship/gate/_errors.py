"""The gate's exceptions: failures that are not verdicts (exit codes 10-19; verdicts use 0/1/2)."""

from __future__ import annotations

from ggufship.errors import GgufshipError


class GateError(GgufshipError):
    """A gate failure that is not a verdict (exit codes 10-19; verdicts use 0/1/2)."""

    exit_code = 10


class GateConfigError(GateError):
    """Invalid gate options or policy (a value out of bounds, a bad matcher, an unreadable file)."""

    exit_code = 11


class PrometheusUnavailableError(GateError):
    """Prometheus did not answer or answered with an error. ``analyze`` turns it into an
    inconclusive verdict; only code that queries Prometheus directly sees it."""

    exit_code = 12


class PrometheusAnswerError(PrometheusUnavailableError):
    """Prometheus answered, but with something the gate cannot use: a value that is not a
    finite number (NaN, ±Inf, ``"abc"``) where a count or ratio must be, a malformed
    sample or series, an unexpected result type, a histogram without finite buckets.
    A subclass of :class:`PrometheusUnavailableError` because, for a verdict, an unusable
    answer is no answer: ``analyze`` turns it into an inconclusive verdict naming the query."""

    exit_code = 14


class GateServeError(GateError):
    """``gate serve`` could not bind its address."""

    exit_code = 13
