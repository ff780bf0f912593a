"""Bounded polling and retrying, on tenacity.

Every wait in ggufship is bounded in time (polls) or in attempts (retries); these
helpers keep the bounds in one place instead of hand-written ``while True`` loops.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_chain,
    wait_exponential,
    wait_fixed,
)

T = TypeVar("T")


class Rejected(Exception):
    """An attempt the other side refused in a way a later attempt may pass (a push that is not a
    fast-forward): raised inside a tenacity attempt so that it is retried."""


def jittered_backoff(base_s: float, cap_s: float = 5.0) -> Callable[[RetryCallState], float]:
    """A tenacity wait: ``base_s * 2**(n-1)`` after the n-th attempt, at most ``cap_s``, times a
    random factor in [0.5, 1.5) so that writers racing for the same ref do not retry in step."""

    def wait(state: RetryCallState) -> float:
        return min(cap_s, base_s * 2 ** (state.attempt_number - 1)) * random.uniform(0.5, 1.5)

    return wait


def poll_until(
    condition: Callable[[], bool], *, timeout_s: float, interval_s: float, max_interval_s: float | None = None
) -> bool:
    """Call ``condition`` every ``interval_s`` until it returns True; False once ``timeout_s`` passed.

    With ``max_interval_s`` the interval doubles after each call, up to that (for waits that are
    usually over within microseconds, such as another process's file lock).
    ``condition`` runs at least once. An exception it raises ends the wait and propagates.
    """
    retrying = Retrying(
        retry=retry_if_result(lambda done: not done),
        stop=stop_after_delay(max(0.0, timeout_s)),
        wait=wait_fixed(interval_s)
        if max_interval_s is None
        else wait_exponential(multiplier=interval_s, max=max_interval_s),
        retry_error_callback=lambda _state: False,
    )
    return bool(retrying(condition))


def _last_result(state: RetryCallState) -> Any:
    if state.outcome is None:  # tenacity asks for a wait, a stop or a verdict only after an attempt
        raise RuntimeError("no attempt has finished yet")
    return state.outcome.result()


def poll_results(
    attempt: Callable[[], T],
    *,
    done: Callable[[T], bool],
    give_up: Callable[[T], bool],
    wait_s: Callable[[T], float],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``attempt`` until ``done(result)`` or ``give_up(result)``; the last result.

    For polls whose wait and bound depend on what was seen: after a result that is not
    ``done``, the wait ends if ``give_up(result)`` (the bounds: a deadline, a count of tries),
    else ``attempt`` runs again after ``wait_s(result)`` seconds (``sleep`` can be replaced, as
    with a manual clock in tests). ``give_up`` must turn true within a bounded time. An
    exception ``attempt`` raises ends the wait and propagates.
    """
    retrying = Retrying(
        sleep=sleep,
        retry=retry_if_result(lambda result: not done(result)),
        wait=lambda state: wait_s(_last_result(state)),
        stop=lambda state: give_up(_last_result(state)),
        retry_error_callback=_last_result,
    )
    return retrying(attempt)


def call_with_retries(
    fn: Callable[[], T],
    *,
    attempts: int,
    backoff_s: Sequence[float],
    may_pass: Callable[[BaseException], bool],
    logger: logging.Logger,
    what: str,
) -> T:
    """``fn()``, retried while it raises an exception ``may_pass`` accepts, at most ``attempts`` calls.

    The n-th retry waits ``backoff_s[n-1]`` (the last value repeats). Any other
    exception, or the last attempt's, propagates unchanged.
    """

    def log_retry(state: RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        number = state.attempt_number
        logger.warning("%s attempt %d/%d: %s; retrying in %gs", what, number, attempts, exc, delay)

    retrying = Retrying(
        retry=retry_if_exception(may_pass),
        stop=stop_after_attempt(attempts),
        wait=wait_chain(*(wait_fixed(delay) for delay in backoff_s)) if backoff_s else wait_fixed(0),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(fn)


def retry_rejected(attempts: int, backoff_s: float) -> Retrying:
    """Up to ``attempts`` tries, each try a ``with`` block of the returned iterator, the next one
    after a :func:`jittered_backoff` wait when the try raised :class:`Rejected`; the last
    :class:`Rejected` (or any other exception at once) propagates."""
    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=jittered_backoff(backoff_s),
        retry=retry_if_exception_type(Rejected),
        reraise=True,
    )
