"""At most SANDBOX_WS_PER_USER open websockets per user and web process
(sandbox_site/websocket_limits.py): one tenant cannot use up the process's and hostd's
connections; others are not affected, and a closed socket frees its place."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from accounts import services
from sandbox_site.asgi import application
from sandbox_site.websocket_limits import websockets_open
from tests.vms.test_console_consumer import connect, console_vm, hostd, make_vm, next_message, root  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

HEADERS = [(b"origin", b"http://localhost"), (b"host", b"localhost")]


async def open_events(user=None, secret=None):
    headers = [*HEADERS, *([(b"authorization", f"Bearer {secret}".encode())] if secret else [])]
    comm = WebsocketCommunicator(application, "/ws/vms/events/", headers=headers)
    if user is not None:
        comm.scope["user"] = user
    connected, code = await comm.connect(timeout=5)
    return comm, connected, code


async def test_a_user_beyond_the_cap_is_refused_and_others_are_not(owner, operator, settings):
    settings.SANDBOX_WS_PER_USER = 2
    first, ok1, _ = await open_events(owner)
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)
    second, ok2, _ = await open_events(secret=secret)  # a token's sockets count for its user too
    assert ok1 and ok2 and websockets_open(owner.pk) == 2
    _, refused, code = await open_events(owner)
    assert (refused, code) == (False, 4429)
    _, refused, code = await open_events(secret=secret)
    assert (refused, code) == (False, 4429)
    assert websockets_open(owner.pk) == 2  # a refusal holds no place
    other, ok, _ = await open_events(operator)  # another user's sockets are theirs
    assert ok
    await first.disconnect()
    assert websockets_open(owner.pk) == 1  # closed: its place is free at once
    again, ok, _ = await open_events(owner)
    assert ok
    for comm in (second, other, again):
        await comm.disconnect()
    assert websockets_open(owner.pk) == 0 and websockets_open(operator.pk) == 0


async def test_ticket_only_console_sockets_count_for_the_tickets_user(console_vm, owner, settings):  # noqa: F811
    # (no session, no token: the socket runs as the ticket's user)
    from vms.consoles import console_ticket_mint

    settings.SANDBOX_WS_PER_USER = 2
    opened = []
    for _ in range(2):
        ticket = await database_sync_to_async(console_ticket_mint)(vm=console_vm, actor=owner)
        comm, connected, _ = await connect(console_vm, None, f"?ticket={ticket}")
        assert connected
        kind, hello = await next_message(comm)
        assert kind == "text" and hello["type"] == "hello"
        opened.append(comm)
    try:
        assert websockets_open(owner.pk) == 2, "ticket consoles are not counted for their user"
        ticket = await database_sync_to_async(console_ticket_mint)(vm=console_vm, actor=owner)
        comm, connected, code = await connect(console_vm, None, f"?ticket={ticket}")
        opened.append(comm)
        assert (connected, code) == (False, 4429)
    finally:
        for comm in opened:
            await comm.disconnect()


async def test_a_bogus_ticket_is_no_way_around_the_cap(owner, settings):
    settings.SANDBOX_WS_PER_USER = 1
    first, ok, _ = await open_events(owner)
    assert ok
    comm = WebsocketCommunicator(application, "/ws/vms/events/?ticket=not-a-ticket", headers=HEADERS)
    comm.scope["user"] = owner
    assert await comm.connect(timeout=5) == (False, 4429)
    await first.disconnect()
