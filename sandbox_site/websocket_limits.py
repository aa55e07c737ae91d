"""At most ``SANDBOX_WS_PER_USER`` open websockets per user in one web process.

Every console and exec websocket holds a connection to its VM's hostd, and every websocket a
socket of the web process, for as long as the client keeps it open (an idle console, a kept
exec socket, a dashboard tab). Without a cap one tenant opening thousands of them would use up
the web process's and hostd's file descriptors, and every other tenant's consoles, commands and
requests would fail with them. A handshake beyond the cap is refused with 4429 (before it is
accepted: the client sees the refusal of its handshake); closing one frees its place at once.
Counted per process, like ``SANDBOX_EXEC_WAITS_PER_USER``: N web processes allow N times as
many. Inside the authentication middleware (it needs the user); a console opened with a
single-use ticket (``?ticket=``) counts for the ticket's user. Other unauthenticated sockets are
refused by their consumers.
"""

from __future__ import annotations

from django.conf import settings

CLOSE_TOO_MANY = 4429
_open: dict[object, int] = {}  # user id -> websockets open in this process (one event loop)


def websockets_open(user_id) -> int:
    return _open.get(user_id, 0)


class WebsocketsPerUserLimit:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        user = scope.get("user")
        key = user.pk if user is not None and user.is_authenticated else None
        ticket = _ticket(scope)
        if ticket:  # a console by ticket runs as the ticket's user, whatever else authenticated
            from channels.db import database_sync_to_async

            from vms.consoles import console_ticket_user_id

            # (a ticket that is not valid changes nothing: ``?ticket=x`` is no way around the cap)
            key = await database_sync_to_async(console_ticket_user_id)(ticket) or key
        if key is None:
            return await self.app(scope, receive, send)
        if _open.get(key, 0) >= settings.SANDBOX_WS_PER_USER:
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": CLOSE_TOO_MANY})
            return None
        _open[key] = _open.get(key, 0) + 1
        try:
            return await self.app(scope, receive, send)
        finally:
            _open[key] -= 1
            if not _open[key]:
                del _open[key]


def _ticket(scope) -> str:
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
    return (query.get("ticket") or [""])[0]
