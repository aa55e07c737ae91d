"""Waiting on a condition instead of sleeping a fixed time before an assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold within the time allowed (an AssertionError, so pytest reports a failure)."""


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, *, interval: float = 0.2, message: str = "") -> T:
    """Call ``predicate`` until it returns something truthy and return that; it is called at least once.

    Polls every ``interval`` seconds for at most ``timeout`` seconds, then raises
    :class:`WaitTimeout` with ``message`` (or the predicate's name) and the last value it returned.
    Exceptions from ``predicate`` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise WaitTimeout(f"{what}: not true within {timeout:g} s (last value: {value!r})")
        time.sleep(min(interval, remaining))
