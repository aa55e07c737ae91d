from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied

from accounts import services


def client_address(request) -> str:
    """The client's address: REMOTE_ADDR, or behind our reverse proxy (SANDBOX_BEHIND_PROXY)
    the last X-Forwarded-For entry, the one the proxy appended (earlier ones are the client's)."""
    from django.conf import settings

    meta = getattr(request, "META", None) or {}
    forwarded = meta.get("HTTP_X_FORWARDED_FOR", "")
    if settings.SANDBOX_BEHIND_PROXY and forwarded:
        return forwarded.split(",")[-1].strip()[:45]
    return meta.get("REMOTE_ADDR") or ""


class LockoutModelBackend(ModelBackend):
    """ModelBackend with lockout per (account, client address) and a slow-down per account
    (``services.login_attempt_begin``). Raising PermissionDenied stops Django from trying
    further backends, so a refused attempt never reaches a password check."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get("username")
        if not username or password is None:
            return None
        address = client_address(request)
        try:
            services.login_attempt_begin(username=username, address=address)
        except services.LoginRefused as exc:
            raise PermissionDenied(exc.message) from exc
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            services.login_failed(username=username)
            return None
        services.login_succeeded(user=user, address=address)
        return user
