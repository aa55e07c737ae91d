from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from accounts import services
from accounts.context import set_token_id
from accounts.models import ApiToken


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer <token>``. ``request.auth`` is the ApiToken."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Invalid bearer header.")
        try:
            secret = header[1].decode()
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("Invalid bearer header.") from exc
        token = services.token_authenticate(secret)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
        set_token_id(token.pk, token.project_id)
        return token.user, token

    def authenticate_header(self, request):
        return self.keyword


class TokenScopePermission(permissions.BasePermission):
    """Authenticated users only; read-only tokens may only use safe methods."""

    message = "This token is read-only."

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated and request.user.is_active):
            from sandbox_site.throttling import anonymous_throttle_check

            anonymous_throttle_check(request, view)  # a flood of anonymous calls: 429 before the 401
            return False
        if isinstance(request.auth, ApiToken) and request.auth.read_only:
            return request.method in permissions.SAFE_METHODS
        return True


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "API token from POST /api/v1/tokens/"}


class BearerTokenWebsocketMiddleware:
    """Websocket handshakes with ``Authorization: Bearer <token>`` (API clients such as the
    SDK and ``msbx``) authenticate as the token's user and go straight to ``inner``; without
    the header they go through ``session_stack`` (the session's user: channels'
    ``AuthMiddlewareStack`` around the same ``inner``), whose session read a token client
    does not pay for. Read-only tokens are anonymous here (the consumers answer 4401): exec
    and console websockets carry input."""

    def __init__(self, inner, session_stack=None):
        self.inner = inner
        self.session_stack = session_stack or inner

    async def __call__(self, scope, receive, send):
        secret = _bearer_secret(scope.get("headers") or ())
        if secret is None:
            return await self.session_stack(scope, receive, send)
        from channels.db import database_sync_to_async
        from django.contrib.auth.models import AnonymousUser

        token = await database_sync_to_async(services.token_authenticate)(secret)
        user = token.user if token is not None and not token.read_only else AnonymousUser()
        # The token is re-checked while the connection lives (accounts.rights): revoking it closes it.
        if token is None:
            return await self.inner({**scope, "user": user, "token_id": None}, receive, send)
        from accounts.context import actor_context

        # The token in the actor context, as for a REST request: audit rows name it, and a token
        # limited to a project lets the consumers' checks (vm_for) see only that project.
        with actor_context(token_id=token.pk, token_project_id=token.project_id):
            return await self.inner({**scope, "user": user, "token_id": token.pk}, receive, send)


def _bearer_secret(headers) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            parts = value.split()
            if len(parts) == 2 and parts[0].lower() == b"bearer":
                return parts[1].decode("ascii", "replace")
    return None
