"""Cross-site websocket hijacking protection: a websocket handshake that carries an ``Origin``
header (every browser sends one) is accepted only when that origin is exactly the
dashboard's own ``scheme://host:port`` (the handshake's Host, which must be in
ALLOWED_HOSTS) or one listed in SANDBOX_TRUSTED_ORIGINS / CSRF_TRUSTED_ORIGINS.

Host names alone are not enough: a tenant's port forward serves pages on another port of the
same host name, and a page from there must not open a victim's console with the victim's
session cookie. Handshakes without ``Origin`` come from API clients (the SDK, ``msbx``), which
authenticate with a bearer token or a console ticket, never with an ambient cookie, so they
pass.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_normalise(origin: str) -> str | None:
    """``scheme://host:port`` with the default port spelled out, lower case; None when it is
    not an http(s) origin (``null``, garbage, paths or credentials)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def trusted_origins() -> set[str]:
    configured = [*settings.SANDBOX_TRUSTED_ORIGINS, *settings.CSRF_TRUSTED_ORIGINS]
    return {o for o in (origin_normalise(v) for v in configured) if o}


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin1")
    return None


def own_origin(scope) -> str | None:
    """The origin of the dashboard as this handshake reached it, or None when the Host is not
    one of ALLOWED_HOSTS (or missing)."""
    host = _header(scope, b"host")
    if not host:
        server = scope.get("server")
        if not server or server[0] is None:
            return None
        host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    domain, _ = split_domain_port(host.lower())
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return None
    secure = scope.get("scheme") in ("wss", "https")
    proxy = settings.SECURE_PROXY_SSL_HEADER
    if proxy:  # ("HTTP_X_FORWARDED_PROTO", "https"): trust the proxy's header only when configured
        name = proxy[0].removeprefix("HTTP_").replace("_", "-").lower().encode()
        forwarded = _header(scope, name)
        if forwarded is not None:
            secure = forwarded.split(",")[0].strip().lower() == proxy[1]
    return origin_normalise(("https://" if secure else "http://") + host)


def origin_allowed(scope) -> bool:
    origin = _header(scope, b"origin")
    if origin is None:
        return True  # not a browser: bearer token or console ticket, no ambient credentials
    normalised = origin_normalise(origin)
    if normalised is None:
        return False
    return normalised == own_origin(scope) or normalised in trusted_origins()


class SameOriginWebsocketValidator:
    """ASGI middleware: refuse (HTTP 403 on the handshake) a websocket whose Origin is foreign."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
