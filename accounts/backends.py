from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied

from accounts import services


class LockoutModelBackend(ModelBackend):
    """ModelBackend with lockout after repeated failures. Raising PermissionDenied stops
    Django from trying further backends, so a locked account cannot log in at all."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get("username")
        if not username or password is None:
            return None
        if services.login_is_locked(username):
            services.login_blocked(username=username)
            raise PermissionDenied("Account temporarily locked after repeated failed logins.")
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            services.login_failed(username=username)
            return None
        services.login_succeeded(user=user)
        return user
