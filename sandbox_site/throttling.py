"""Rate limits of the API, counted in Redis (the cache's server: shared by every web process).
Rates are ``"<requests>/<s|m|h|d>"`` from SANDBOX_RATE_* settings (docs/security.md); an empty
rate is no limit.

Budgets of a request (``ApiRateLimit``, the one DRF throttle):

- ``user``: every authenticated request, one budget per user (all of a user's tokens and
  sessions together: minting tokens does not multiply it);
- ``anon``: unauthenticated requests, one budget per client address. Checked by
  ``TokenScopePermission`` (``anonymous_throttle_check``), so a flood of anonymous calls is
  refused with 429 before the 401;
- separate, smaller budgets per user for the actions that cost host capacity: VM create, exec,
  file upload, snapshot, clone (``EXPENSIVE_ACTIONS``).

Each budget is a sliding log (a sorted set of request times per key, as DRF's cache throttles
keep a list). All budgets of one request are checked and, only when every one has room,
charged, in one atomic Redis script: one round trip per request, and parallel requests can
not both take the last slot (DRF's get-then-set could). A refused request is not charged.
A refusal is a 429 in the API's error shape with ``Retry-After`` (and ``details.retry_after``).
"""

from __future__ import annotations

import math
import secrets
import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import BaseThrottle

# (viewset class name, action) -> budget name (a key of SANDBOX_RATE_LIMITS)
EXPENSIVE_ACTIONS: dict[tuple[str, str], str] = {
    ("VmViewSet", "create"): "create",
    ("VmExecViewSet", "exec_create"): "exec",
    ("VmExecViewSet", "exec_stdin"): "exec",
    ("VmExecViewSet", "file_put"): "upload",
    ("VmSnapshotViewSet", "create"): "snapshot",
    ("SnapshotViewSet", "clone"): "clone",
}

# KEYS: one sorted set per budget. ARGV: now, a unique member, then (limit, window) per key.
# Returns 0 when every budget had room (all charged), else the seconds until the fullest
# refusing budget frees a slot (nothing charged).
_SLIDING_LOG = """
local now = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    local freeing = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local left = window - (now - tonumber(freeing[2]))
    if left > wait then wait = left end
  end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 + 2 * i]) * 1000))
end
return '0'
"""
_script = None


_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parsed(rate: str | None) -> tuple[int, int] | None:
    """``"300/min"`` -> (300, 60) (DRF's rate syntax: the period's first letter counts)."""
    if not rate:
        return None
    requests, period = rate.split("/")
    return int(requests), _PERIODS[period[0]]


def _client_address(request) -> str:
    return BaseThrottle().get_ident(request)  # REMOTE_ADDR, or the proxy's entry (NUM_PROXIES)


def _budgets(request, view, *, anonymous_only: bool = False) -> list[tuple[str, int, int]]:
    """``(key, requests, seconds)`` of every budget this request counts against."""
    user = getattr(request, "user", None)
    ident = f"user:{user.pk}" if user is not None and user.is_authenticated else None
    found: list[tuple[str, str]] = []
    if ident is None:
        found.append(("anon", _client_address(request)))
    elif not anonymous_only:
        found.append(("user", ident))
    if not anonymous_only:
        scope = EXPENSIVE_ACTIONS.get((type(view).__name__, getattr(view, "action", None) or ""))
        if scope:
            found.append((scope, ident or f"addr:{_client_address(request)}"))
    return _keyed(found)


def _keyed(found: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    rates = settings.SANDBOX_RATE_LIMITS
    budgets = []
    for scope, who in found:
        parsed = _parsed(rates.get(scope))
        if parsed is not None:
            budgets.append((cache.make_key(f"throttle:{scope}:{who}"), *parsed))
    return budgets


def _charge(budgets: list[tuple[str, int, int]]) -> float:
    """Charge one request to every budget if all have room (0.0), else charge none and
    return the seconds until one slot frees in the fullest."""
    global _script
    if not budgets:
        return 0.0
    client = cache._cache.get_client(write=True)  # Django's Redis cache: the server the budgets live on
    if _script is None:
        _script = client.register_script(_SLIDING_LOG)  # EVALSHA, loaded on first use
    args: list[object] = [repr(time.time()), secrets.token_hex(8)]
    for _, requests, seconds in budgets:
        args += [requests, seconds]
    return float(_script(keys=[key for key, _, _ in budgets], args=args, client=client))


class ApiRateLimit(BaseThrottle):
    """Every budget of the request (module docstring) in one Redis round trip."""

    def allow_request(self, request, view) -> bool:
        self._wait = _charge(_budgets(request, view))
        return self._wait == 0.0

    def wait(self) -> float | None:
        return max(1.0, math.ceil(self._wait)) if self._wait else None


def anonymous_throttle_check(request, view) -> None:
    """Raise ``Throttled`` when an anonymous caller's address is over its budget (called from the
    permission check, which refuses anonymous calls before DRF's own throttle step)."""
    from rest_framework.exceptions import Throttled

    wait = _charge(_budgets(request, view, anonymous_only=True))
    if wait:
        raise Throttled(wait=max(1.0, math.ceil(wait)))


def user_action_charge(user, scope: str) -> float:
    """Charge one request of ``user`` and one of the expensive action ``scope`` (a value of
    ``EXPENSIVE_ACTIONS``) to the same budgets the API's request would count against: 0.0 when
    both had room, else the seconds to wait (nothing charged). For actions requested over a
    websocket (an exec started on its stream: vms.exec_consumers)."""
    ident = f"user:{user.pk}"
    wait = _charge(_keyed([("user", ident), (scope, ident)]))
    return max(1.0, math.ceil(wait)) if wait else 0.0
