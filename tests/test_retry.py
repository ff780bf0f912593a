"""ggufship.retry: the bounds of polls and retries (count-based, no timing assertions)."""

from __future__ import annotations

import logging

import pytest

from ggufship.retry import call_with_retries, poll_results, poll_until

logger = logging.getLogger(__name__)


def test_poll_until_returns_true_once_the_condition_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) == 3

    assert poll_until(third_time, timeout_s=60.0, interval_s=0.0) is True
    assert len(calls) == 3


def test_poll_until_checks_once_with_no_time_left_and_gives_false() -> None:
    calls: list[int] = []
    assert poll_until(lambda: bool(calls.append(1)), timeout_s=0.0, interval_s=0.0) is False
    assert calls == [1]


def test_poll_until_propagates_the_condition_s_exception() -> None:
    def broken() -> bool:
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        poll_until(broken, timeout_s=60.0, interval_s=0.0)


def test_call_with_retries_stops_after_the_attempts_and_raises_the_last_error() -> None:
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        raise ConnectionError(f"attempt {len(calls)}")

    with pytest.raises(ConnectionError, match="attempt 3"):
        call_with_retries(
            flaky, attempts=3, backoff_s=(0.0,), may_pass=lambda e: True, logger=logger, what="test"
        )
    assert len(calls) == 3


def test_call_with_retries_fails_at_once_on_an_error_that_will_not_pass() -> None:
    calls: list[int] = []

    def conflict() -> int:
        calls.append(1)
        raise ValueError("conflict")

    with pytest.raises(ValueError, match="conflict"):
        call_with_retries(
            conflict,
            attempts=5,
            backoff_s=(0.0,),
            may_pass=lambda e: isinstance(e, ConnectionError),
            logger=logger,
            what="test",
        )
    assert calls == [1]


def test_call_with_retries_returns_the_first_success() -> None:
    results = iter([ConnectionError("down"), 42])

    def second_time() -> int:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return value

    assert (
        call_with_retries(
            second_time, attempts=3, backoff_s=(), may_pass=lambda e: True, logger=logger, what="test"
        )
        == 42
    )


def test_poll_until_with_a_growing_interval_still_returns_on_success() -> None:
    calls = []

    def fifth() -> bool:
        calls.append(1)
        return len(calls) == 5

    assert poll_until(fifth, timeout_s=30, interval_s=0.0001, max_interval_s=0.001)
    assert len(calls) == 5


def test_poll_results_waits_what_each_result_asks_and_returns_the_done_one() -> None:
    results = iter([1, 2, 3, 10])
    slept: list[float] = []
    last = poll_results(
        lambda: next(results),
        done=lambda n: n >= 10,
        give_up=lambda n: False,
        wait_s=lambda n: n / 10,
        sleep=slept.append,
    )
    assert last == 10
    assert slept == [0.1, 0.2, 0.3]


def test_poll_results_gives_up_with_the_last_result_that_is_not_done() -> None:
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return len(calls)

    slept: list[float] = []
    last = poll_results(
        count, done=lambda n: False, give_up=lambda n: n >= 4, wait_s=lambda n: 0.0, sleep=slept.append
    )
    assert last == 4 and len(calls) == 4 and slept == [0.0, 0.0, 0.0]


def test_poll_results_propagates_the_attempt_s_exception() -> None:
    def broken() -> int:
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        poll_results(broken, done=lambda n: True, give_up=lambda n: True, wait_s=lambda n: 0.0)
