"""Rate limits of the API (DRF throttles, counted in the cache: Redis, shared by every web
process). Rates are ``"<requests>/<s|m|h|d>"`` from SANDBOX_RATE_* settings (docs/security.md);
an empty rate is no limit.

- ``UserRateLimit``: every authenticated request, one budget per user (all of a user's tokens
  and sessions together: minting tokens does not multiply it).
- ``AnonRateLimit``: unauthenticated requests, one budget per client address. Checked by
  ``TokenScopePermission`` too, so a flood of anonymous calls is refused with 429 before the 401.
- ``ExpensiveActionRateLimit``: separate, smaller budgets per user for the actions that cost
  host capacity: VM create, exec, file upload, snapshot, clone (``EXPENSIVE_ACTIONS``).

A refusal is a 429 in the API's error shape with ``Retry-After`` (and ``details.retry_after``).
"""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

# (viewset class name, action) -> budget name (a key of SANDBOX_RATE_LIMITS)
EXPENSIVE_ACTIONS: dict[tuple[str, str], str] = {
    ("VmViewSet", "create"): "create",
    ("VmExecViewSet", "exec_create"): "exec",
    ("VmExecViewSet", "exec_stdin"): "exec",
    ("VmExecViewSet", "file_put"): "upload",
    ("VmSnapshotViewSet", "create"): "snapshot",
    ("SnapshotViewSet", "clone"): "clone",
}


class _SettingsRate(SimpleRateThrottle):
    def get_rate(self):
        return (settings.SANDBOX_RATE_LIMITS.get(self.scope) or None) if self.scope else None

    def allow_request(self, request, view):
        # The rate is read per request (settings may change in tests and between deploys).
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)


def _identity(request) -> str | None:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return None


class UserRateLimit(_SettingsRate):
    scope = "user"

    def get_cache_key(self, request, view):
        ident = _identity(request)
        return None if ident is None else self.cache_format % {"scope": self.scope, "ident": ident}


class AnonRateLimit(_SettingsRate):
    scope = "anon"

    def get_cache_key(self, request, view):
        if _identity(request) is not None:
            return None
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class ExpensiveActionRateLimit(_SettingsRate):
    scope = ""

    def allow_request(self, request, view):
        self.scope = EXPENSIVE_ACTIONS.get((type(view).__name__, getattr(view, "action", None) or ""), "")
        if not self.scope:
            return True
        return super().allow_request(request, view)

    def get_cache_key(self, request, view):
        ident = _identity(request) or f"addr:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


def anonymous_throttle_check(request, view) -> None:
    """Raise ``Throttled`` when an anonymous caller's address is over its budget (called from the
    permission check, which refuses anonymous calls before DRF's own throttle step)."""
    from rest_framework.exceptions import Throttled

    throttle = AnonRateLimit()
    if not throttle.allow_request(request, view):
        raise Throttled(wait=throttle.wait())
