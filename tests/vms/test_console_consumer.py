"""Console websocket consumer with Channels' communicator, a real channel layer (Redis) and a
real serial log + serial socket in a runtime directory."""

import asyncio
import json
import os
import socket
import threading

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from sandbox_site.asgi import application
from tests.factories import UserFactory, VmFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def runtime(settings):
    import shutil
    import tempfile
    from pathlib import Path

    short = Path(tempfile.mkdtemp(prefix="con-", dir="/tmp"))  # Unix socket paths are short
    settings.SANDBOX_RUNTIME_DIR = short
    settings.SANDBOX_CONSOLE_SCROLLBACK_BYTES = 1000
    settings.SANDBOX_CONSOLE_WINDOW_BYTES = 4096
    cache.clear()
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def console_vm(runtime):
    owner = UserFactory(username="owner")
    vm = VmFactory(owner=owner, state="running", name="con")
    (runtime / str(vm.pk)).mkdir()
    return vm


def log_path(runtime, vm):
    return runtime / str(vm.pk) / "serial.log"


class SerialSink:
    """A Unix socket standing in for the VMM's serial port; records what is typed."""

    def __init__(self, path):
        self.received = bytearray()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                while chunk := conn.recv(4096):
                    self.received.extend(chunk)


async def connect(vm, user=None, query=""):
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/console/{query}",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    if user is not None:
        comm.scope["user"] = user
    connected, code = await comm.connect(timeout=5)
    return comm, connected, code


async def hello(comm):
    return json.loads(await comm.receive_from(timeout=5))


async def read_bytes(comm, n, timeout=5):
    out = bytearray()
    while len(out) < n:
        frame = await comm.receive_output(timeout=timeout)
        if frame["type"] == "websocket.send" and frame.get("bytes") is not None:
            out.extend(frame["bytes"])
    return bytes(out)


async def test_it_refuses_anonymous_and_strangers(console_vm):
    stranger = await database_sync_to_async(UserFactory)(username="stranger")
    comm, connected, code = await connect(console_vm)
    assert not connected and code == 4401
    comm, connected, code = await connect(console_vm, stranger)
    assert not connected and code == 4404


async def test_it_replays_the_scrollback_then_streams_live(runtime, console_vm):
    path = log_path(runtime, console_vm)
    path.write_bytes(b"x" * 5000 + b"BOOT-DONE\r\n")
    comm, connected, _ = await connect(console_vm, console_vm.owner)
    assert connected
    first = await hello(comm)
    assert first["type"] == "hello" and first["writer"] is True
    assert first["offset"] == 5011 - 1000  # bounded scrollback
    replay = await read_bytes(comm, 1000)
    assert replay.endswith(b"BOOT-DONE\r\n")
    with path.open("ab") as fh:
        fh.write("live ✓ line\r\n".encode())
    live = await read_bytes(comm, len("live ✓ line\r\n".encode()))
    assert live == "live ✓ line\r\n".encode()
    await comm.disconnect()


async def test_a_reconnect_from_an_offset_misses_and_repeats_nothing(runtime, console_vm):
    path = log_path(runtime, console_vm)
    path.write_bytes(b"".join(b"line %04d\n" % n for n in range(100)))
    comm, _, _ = await connect(console_vm, console_vm.owner, "?offset=0")
    await hello(comm)
    got = await read_bytes(comm, 500)
    await comm.disconnect()
    with path.open("ab") as fh:
        fh.write(b"".join(b"line %04d\n" % n for n in range(100, 150)))
    comm, _, _ = await connect(console_vm, console_vm.owner, f"?offset={len(got)}")
    assert (await hello(comm))["offset"] == len(got)
    rest = await read_bytes(comm, 1500 - len(got))
    await comm.disconnect()
    assert got + rest == path.read_bytes()


async def test_many_viewers_one_writer_and_explicit_takeover(runtime, console_vm):
    path = log_path(runtime, console_vm)
    path.write_bytes(b"login: ")
    sink = SerialSink(runtime / str(console_vm.pk) / "serial.sock")
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    await database_sync_to_async(assign_perm)("vms.console_vm", grantee, console_vm)
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, console_vm)
    a, _, _ = await connect(console_vm, console_vm.owner)
    b, _, _ = await connect(console_vm, grantee)
    assert (await hello(a))["writer"] is True
    hb = await hello(b)
    assert hb["writer"] is False and hb["writer_user"] == "owner"
    await read_bytes(a, 7)
    await read_bytes(b, 7)
    await b.send_to(bytes_data=b"ignored\r")
    assert "read-only" in json.loads(await b.receive_from(timeout=5))["message"]
    await a.send_to(bytes_data=b"root\r")
    await asyncio.sleep(0.3)
    assert bytes(sink.received) == b"root\r"
    await b.send_to(text_data=json.dumps({"type": "takeover"}))
    role_b = json.loads(await b.receive_from(timeout=5))
    role_a = json.loads(await a.receive_from(timeout=5))
    assert role_b == {"type": "role", "writer": True, "writer_user": "grantee", "taken_from_you": False}
    assert role_a["writer"] is False and role_a["taken_from_you"] is True
    await b.send_to(bytes_data=b"ls\r")
    await asyncio.sleep(0.3)
    assert bytes(sink.received) == b"root\rls\r"
    for comm in (a, b):
        await comm.disconnect()
    actions = await database_sync_to_async(
        lambda: list(AuditEvent.objects.filter(object_id=str(console_vm.pk)).values_list("action", flat=True))
    )()
    assert actions.count("console.open") == 2 and "console.takeover" in actions and actions.count("console.close") == 2


async def test_view_only_users_are_read_only_and_cannot_take_over(runtime, console_vm):
    log_path(runtime, console_vm).write_bytes(b"hi")
    viewer = await database_sync_to_async(UserFactory)(username="viewer1")
    await database_sync_to_async(assign_perm)("vms.view_vm", viewer, console_vm)
    comm, connected, _ = await connect(console_vm, viewer)
    assert connected
    first = await hello(comm)
    assert first["can_write"] is False and first["writer"] is False
    await read_bytes(comm, 2)
    await comm.send_to(text_data=json.dumps({"type": "takeover"}))
    assert "read-only" in json.loads(await comm.receive_from(timeout=5))["message"]
    await comm.disconnect()


async def test_tickets_work_once_and_only_for_their_vm(runtime, console_vm):
    from vms.consoles import console_ticket_mint

    other = await database_sync_to_async(VmFactory)(owner=console_vm.owner, state="running", name="other")
    log_path(runtime, console_vm).write_bytes(b"ok")
    ticket = await database_sync_to_async(console_ticket_mint)(vm=console_vm, actor=console_vm.owner)
    comm, connected, code = await connect(other, None, f"?ticket={ticket}")
    assert not connected  # wrong VM burns nothing but is refused
    ticket = await database_sync_to_async(console_ticket_mint)(vm=console_vm, actor=console_vm.owner)
    comm, connected, _ = await connect(console_vm, None, f"?ticket={ticket}")
    assert connected
    await hello(comm)
    await comm.disconnect()
    comm, connected, code = await connect(console_vm, None, f"?ticket={ticket}")
    assert not connected and code == 4401


async def test_a_viewer_that_does_not_ack_gets_at_most_one_window(runtime, console_vm):
    log_path(runtime, console_vm).write_bytes(os.urandom(50_000))
    comm, _, _ = await connect(console_vm, console_vm.owner, "?offset=0")
    await hello(comm)
    got = await read_bytes(comm, 4096)
    assert len(got) == 4096
    assert await comm.receive_nothing(timeout=0.5)  # window full until acknowledged
    await comm.send_to(text_data=json.dumps({"type": "ack", "offset": 4096}))
    more = await read_bytes(comm, 4096)
    assert len(more) == 4096
    await comm.disconnect()
