"""Bounded polling and retrying, on tenacity.

Every wait in ggufship is bounded in time (polls) or in attempts (retries); these
helpers keep the bounds in one place instead of hand-written ``while True`` loops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_chain,
    wait_fixed,
)

T = TypeVar("T")


def poll_until(condition: Callable[[], bool], *, timeout_s: float, interval_s: float) -> bool:
    """Call ``condition`` every ``interval_s`` until it returns True; False once ``timeout_s`` passed.

    ``condition`` runs at least once. An exception it raises ends the wait and propagates.
    """
    retrying = Retrying(
        retry=retry_if_result(lambda done: not done),
        stop=stop_after_delay(max(0.0, timeout_s)),
        wait=wait_fixed(interval_s),
        retry_error_callback=lambda _state: False,
    )
    return bool(retrying(condition))


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
