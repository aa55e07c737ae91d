"""Best-effort small events to Channels groups, the one place every publisher goes through
(vms.events for VM and operation events, accounts.rights for rights changes).

An event is a hint; the database is the truth, and every listener re-reads or re-checks on its
own schedule, so a lost event only delays an update. Publishing therefore never stalls or fails
its caller:

- one call (all its groups) is bounded by ``PUBLISH_TIMEOUT_SECONDS``;
- when the channel layer cannot be reached (connection refused, no socket yet — e.g. a
  ``manage.py`` command run before ``make run`` started its Redis —, a timeout), one log line
  without a traceback says so, and the following calls skip the layer for
  ``UNREACHABLE_SKIP_SECONDS`` instead of each waiting on it again; the first call after that
  tries again;
- any other error is unexpected and logs with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable

import redis.exceptions
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 2.0
UNREACHABLE_SKIP_SECONDS = 10.0

# What "the channel layer cannot be reached" looks like: the OS's refusals (OSError covers
# ConnectionError, FileNotFoundError of a missing Unix socket and TimeoutError, which is also
# asyncio's since Python 3.11) and redis-py's wrappings of them.
_UNREACHABLE = (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

_state_lock = threading.Lock()
_skip_until = 0.0  # time.monotonic() before which publishing skips the layer


def _skipping() -> bool:
    with _state_lock:
        return time.monotonic() < _skip_until


def _mark_unreachable() -> None:
    global _skip_until
    with _state_lock:
        _skip_until = time.monotonic() + UNREACHABLE_SKIP_SECONDS


def publish_reset() -> None:
    """Forget a remembered failure (tests; a process that knows the layer is back)."""
    global _skip_until
    with _state_lock:
        _skip_until = 0.0


async def _send_all(layer, groups: list[str], message: dict) -> None:
    async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
        for group in groups:
            await layer.group_send(group, message)


def group_events_publish(groups: Iterable[str], message: dict, *, what: str) -> bool:
    """Send ``message`` to each of ``groups`` on the channel layer, best effort (see the module
    docstring). ``what`` names the event in log lines. Returns whether it was sent. Call it from
    synchronous code (services, tasks, ``transaction.on_commit`` callbacks)."""
    groups = list(groups)
    layer = get_channel_layer()
    if layer is None or not groups:
        return False
    if _skipping():
        logger.debug("channel layer unreachable a moment ago; %s not sent", what)
        return False
    try:
        async_to_sync(_send_all)(layer, groups, message)
    except _UNREACHABLE as exc:
        _mark_unreachable()
        logger.warning(
            "channel layer unreachable (%s: %s); %s not sent, events skipped for %g s",
            type(exc).__name__,
            str(exc) or "timed out",
            what,
            UNREACHABLE_SKIP_SECONDS,
        )
        return False
    except Exception:
        logger.warning("could not send %s", what, exc_info=True)
        return False
    return True
