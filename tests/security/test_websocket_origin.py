"""Cross-site websocket hijacking: a browser page on another origin (another port of the
dashboard's host name, such as a tenant's port forward, another scheme or another host) must
not open a victim's console, exec or events websocket with the victim's session cookie.
Handshakes without an Origin (API clients with a token or a console ticket) keep working."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from sandbox_site.asgi import application
from sandbox_site.websocket_origin import origin_normalise
from tests.factories import VmFactory

pytestmark = pytest.mark.django_db(transaction=True)

HOST = b"localhost:8000"
REFUSED = (False, 1000)  # the handshake is denied before any consumer runs


def _paths(vm):
    return {
        "console": f"/ws/vms/{vm.pk}/console/",
        "exec": f"/ws/vms/{vm.pk}/execs/e1/",
        "events": "/ws/vms/events/",
    }


async def _connect(path, user, origin: bytes | None, host: bytes = HOST):
    headers = [(b"host", host)]
    if origin is not None:
        headers.append((b"origin", origin))
    comm = WebsocketCommunicator(application, path, headers=headers)
    comm.scope["user"] = user
    try:
        return await comm.connect(timeout=10)
    finally:
        await comm.disconnect()


def _accepted(outcome) -> bool:
    """Not refused by the origin check: connected, or closed by the consumer (e.g. 4409 because
    the VM is stopped), never the bare 1000 close of the denier."""
    connected, code = outcome
    return connected or code != 1000


@pytest.mark.parametrize("kind", ["console", "exec", "events"])
@pytest.mark.parametrize(
    "origin",
    [
        b"http://localhost:20001",  # a tenant's port forward on the same host name
        b"http://localhost",  # same host, another port (80)
        b"https://localhost:8000",  # another scheme
        b"http://evil.example:8000",  # another host
        b"http://localhost.evil.example:8000",
        b"null",
        b"http://localhost:8000/path",
        b"http://user@localhost:8000",
    ],
)
async def test_it_refuses_foreign_origins(owner, kind, origin):
    vm = await database_sync_to_async(VmFactory)(owner=owner, state="stopped")
    assert await _connect(_paths(vm)[kind], owner, origin) == REFUSED


@pytest.mark.parametrize("kind", ["console", "exec", "events"])
async def test_it_accepts_the_dashboards_own_origin_and_clients_without_origin(owner, kind):
    vm = await database_sync_to_async(VmFactory)(owner=owner, state="stopped")
    assert _accepted(await _connect(_paths(vm)[kind], owner, b"http://localhost:8000"))
    assert _accepted(await _connect(_paths(vm)[kind], owner, b"HTTP://LOCALHOST:8000"))
    assert _accepted(await _connect(_paths(vm)[kind], owner, None))


async def test_it_accepts_configured_trusted_origins(owner, settings):
    settings.SANDBOX_TRUSTED_ORIGINS = ["https://sandbox.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://other.example.com:8443"]
    assert _accepted(await _connect("/ws/vms/events/", owner, b"https://sandbox.example.com"))
    assert _accepted(await _connect("/ws/vms/events/", owner, b"https://sandbox.example.com:443"))
    assert _accepted(await _connect("/ws/vms/events/", owner, b"https://other.example.com:8443"))
    assert await _connect("/ws/vms/events/", owner, b"https://other.example.com") == REFUSED
    assert await _connect("/ws/vms/events/", owner, b"http://sandbox.example.com") == REFUSED


async def test_a_host_outside_allowed_hosts_is_no_own_origin(owner):
    # DNS rebinding: evil.example resolving to the dashboard sends Host and Origin alike.
    assert await _connect("/ws/vms/events/", owner, b"http://evil.example:8000", host=b"evil.example:8000") == REFUSED


async def test_behind_an_https_proxy_the_forwarded_scheme_counts(owner, settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    comm = WebsocketCommunicator(
        application,
        "/ws/vms/events/",
        headers=[(b"host", b"localhost"), (b"origin", b"https://localhost"), (b"x-forwarded-proto", b"https")],
    )
    comm.scope["user"] = owner
    connected, _ = await comm.connect(timeout=10)
    await comm.disconnect()
    assert connected


def test_origin_normalise():
    assert origin_normalise("http://LocalHost") == "http://localhost:80"
    assert origin_normalise("https://[::1]:8443") == "https://[::1]:8443"
    assert origin_normalise("ftp://x") is None
    assert origin_normalise("http://x:99999") is None
