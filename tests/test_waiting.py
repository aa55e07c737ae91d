"""tests/waiting.py: the bounded poll the end-to-end tests use instead of fixed sleeps."""

from __future__ import annotations

import time

import pytest

from tests.waiting import WaitTimeout, wait_until


def test_it_returns_the_first_truthy_value():
    values = iter([None, 0, [], {"done": True}])
    assert wait_until(lambda: next(values), timeout=5, interval=0.001) == {"done": True}


def test_it_fails_with_the_message_and_last_value_after_the_timeout():
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"agent answers: not true within 0.05 s \(last value: False\)"):
        wait_until(lambda: False, timeout=0.05, interval=0.01, message="agent answers")
    assert 0.05 <= time.monotonic() - started < 1


def test_it_is_an_assertion_error_and_lets_exceptions_through():
    assert issubclass(WaitTimeout, AssertionError)
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, timeout=1)
