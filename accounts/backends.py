from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.db.models import Q

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

    def get_all_permissions(self, user_obj, obj=None):
        """The user's global permissions (its own and its groups', i.e. its role's) in one
        query instead of ModelBackend's two (within an HTTP request, the same query reads the
        user's groups and project roles: ``accounts.rights.request_user_standing``); kept on
        the user object like ModelBackend's (one request's user; websockets re-check rights
        with a fresh user row)."""
        if not user_obj.is_active or user_obj.is_anonymous or obj is not None:
            return set()
        if not hasattr(user_obj, "_perm_cache"):
            from accounts.rights import request_user_standing

            if (standing := request_user_standing(user_obj)) is not None:  # with its role, in one query
                user_obj._perm_cache = set(standing.global_perms)
                return user_obj._perm_cache
            if user_obj.is_superuser:
                perms = Permission.objects.all()
            else:
                perms = Permission.objects.filter(Q(user=user_obj) | Q(group__user=user_obj))
            rows = perms.values_list("content_type__app_label", "codename").distinct()
            user_obj._perm_cache = {f"{app_label}.{codename}" for app_label, codename in rows}
        return user_obj._perm_cache
