"""Console websocket consumer with Channels' communicator, a real channel layer (Redis), a real
host daemon (in-process, on its own event loop thread) and a stand-in VMM (tests/hostd/fake_vmm.py:
a serial socket that logs to ``serial.log`` like QEMU's ``logfile=``, prints ``tick N`` every
0.5 s and echoes input lines as ``echo: <line>``). No VM boots."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from sandbox_site.asgi import application
from tests.factories import UserFactory, VmFactory
from tests.hostd.runner import FAKE_VMM, Hostd
from vms.consoles import ConsoleUnavailable, HostdConsole
from vms.hostd.console import STREAM_CHUNK

pytestmark = pytest.mark.django_db(transaction=True)

WINDOW = 4096
SCROLLBACK = 1000


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def root(settings):
    path = Path(tempfile.mkdtemp(prefix="con-", dir="/tmp"))  # Unix socket paths are short
    settings.SANDBOX_RUNTIME_DIR = path
    settings.SANDBOX_HOSTD_SOCKET = path / "hostd.sock"
    settings.SANDBOX_CONSOLE_SCROLLBACK_BYTES = SCROLLBACK
    settings.SANDBOX_CONSOLE_WINDOW_BYTES = WINDOW
    cache.clear()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hostd(root, request):
    # indirect parametrization passes extra HostdConfig fields
    daemon = Hostd(root, **getattr(request, "param", {}))
    daemon.start()
    yield daemon
    daemon.stop()


class Vmm:
    """The stand-in VMM of one VM's runtime directory."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.runtime_dir / "serial.log"

    def start(self) -> None:
        (self.runtime_dir / "spec.json").write_text("{}")
        self.proc = subprocess.Popen([sys.executable, str(FAKE_VMM), str(self.runtime_dir)], start_new_session=True)
        wait_for(lambda: (self.runtime_dir / "agent.sock").exists(), what="the stand-in VMM")

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def make_vm(root, hostd, owner):
    """A running VM whose stand-in VMM serves its console through hostd (``prefill``: bytes
    already in its serial log, as if printed before)."""
    vmms = []

    def make(prefill: bytes = b"", name: str = "con"):
        vm = VmFactory(owner=owner, state="running", name=name)
        vmm = Vmm(root / str(vm.pk))
        vmm.runtime_dir.mkdir()
        vmm.log.write_bytes(prefill)
        vmm.start()
        vmms.append(vmm)
        wait_for(lambda: hostd.console_info(vm.pk)["connected"], what="hostd's serial connection")
        vm.vmm = vmm
        return vm

    yield make
    for vmm in vmms:
        vmm.kill()


@pytest.fixture
def console_vm(make_vm):
    return make_vm()


async def connect(vm, user=None, query=""):
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/console/{query}",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    if user is not None:
        comm.scope["user"] = user
    connected, code = await comm.connect(timeout=10)
    return comm, connected, code


async def next_message(comm, timeout: float = 10):
    """``("text", dict)``, ``("bytes", data)`` or ``("close", code)``."""
    out = await comm.receive_output(timeout=timeout)
    if out["type"] == "websocket.close":
        return "close", out.get("code")
    if out.get("bytes") is not None:
        return "bytes", out["bytes"]
    return "text", json.loads(out["text"])


async def hello(comm):
    kind, message = await next_message(comm)
    assert kind == "text" and message["type"] == "hello", message
    return message


async def read_bytes(comm, n, *, texts=None):
    """``n`` console bytes (control messages go to ``texts`` when given, else must not come)."""
    out = bytearray()
    while len(out) < n:
        kind, value = await next_message(comm)
        if kind == "bytes":
            out.extend(value)
        elif texts is not None and kind == "text":
            texts.append(value)
        else:
            raise AssertionError(f"unexpected {kind}: {value!r}")
    return bytes(out)


async def read_until(comm, needle: bytes, *, texts=None, start: int | None = None) -> bytes:
    """Console bytes until ``needle`` arrives; with ``start`` (the offset of the first byte),
    acknowledges as it reads, like the page does."""
    out = bytearray()
    while needle not in out:
        kind, value = await next_message(comm)
        if kind == "bytes":
            out.extend(value)
            if start is not None:
                await comm.send_to(text_data=json.dumps({"type": "ack", "offset": start + len(out)}))
        elif texts is not None and kind == "text":
            texts.append(value)
        else:
            raise AssertionError(f"unexpected {kind}: {value!r}")
    return bytes(out)


async def sent_so_far(comm) -> int:
    """The server's count of bytes sent (its ``pong`` comes after every byte sent before it)."""
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    kind, message = await next_message(comm)
    assert kind == "text" and message["type"] == "pong", (kind, message)
    return message["offset"]


async def closed_with(comm) -> tuple[dict, int]:
    kind, error = await next_message(comm, timeout=20)
    assert kind == "text" and error["type"] == "error" and error["closing"] is True, (kind, error)
    kind, code = await next_message(comm)
    assert kind == "close", (kind, code)
    return error, code


async def refused_with(comm, connected) -> int:
    """A refusal is accepted, explained, then closed with its code (a browser sees 1006 for a
    handshake refusal and could not tell it from a network failure)."""
    assert connected
    error, code = await closed_with(comm)
    assert error["message"], error
    return code


async def test_it_refuses_anonymous_and_strangers_with_the_application_codes(root, owner):
    vm = await database_sync_to_async(VmFactory)(owner=owner, state="running", name="con")
    stranger = await database_sync_to_async(UserFactory)(username="stranger")
    comm, connected, _ = await connect(vm)
    assert await refused_with(comm, connected) == 4401
    comm, connected, _ = await connect(vm, stranger)
    assert await refused_with(comm, connected) == 4404


async def test_it_replays_the_scrollback_then_streams_live(make_vm, owner):
    vm = await database_sync_to_async(make_vm)(b"x" * 5000 + b"BOOT-DONE\r\n")
    comm, connected, _ = await connect(vm, owner)
    assert connected
    first = await hello(comm)
    assert first["writer"] is True and first["window"] == WINDOW
    assert first["offset"] == first["size"] - SCROLLBACK  # bounded scrollback, from the console's end
    replay = await read_bytes(comm, SCROLLBACK)
    assert b"BOOT-DONE\r\n" in replay
    live = await read_until(comm, b"tick ")  # printed by the guest after we attached
    got = replay + live
    assert got == vm.vmm.log.read_bytes()[first["offset"] : first["offset"] + len(got)]
    await comm.disconnect()


async def test_a_reconnect_from_an_offset_misses_and_repeats_nothing(make_vm, owner):
    vm = await database_sync_to_async(make_vm)(b"".join(b"line %04d\n" % n for n in range(1000)))
    comm, _, _ = await connect(vm, owner, "?offset=0")
    assert (await hello(comm))["offset"] == 0
    got = await read_bytes(comm, 3000)  # from the log file: older than hostd's 4 KiB ring
    await comm.disconnect()
    comm, _, _ = await connect(vm, owner, f"?offset={len(got)}")
    assert (await hello(comm))["offset"] == len(got)
    rest = await read_until(comm, b"tick ", start=len(got))
    await comm.disconnect()
    whole = got + rest
    assert whole == vm.vmm.log.read_bytes()[: len(whole)]


async def test_a_reconnect_after_hostd_restarts_misses_nothing(make_vm, owner, hostd):
    vm = await database_sync_to_async(make_vm)(b"before\n")
    comm, _, _ = await connect(vm, owner, "?offset=0")
    await hello(comm)
    got = await read_until(comm, b"tick 1\n")
    await asyncio.to_thread(hostd.stop)
    error, code = await closed_with(comm)
    assert error["code"] == "hostd_unavailable" and code == 4503
    await comm.disconnect()
    size = vm.vmm.log.stat().st_size
    await asyncio.to_thread(wait_for, lambda: vm.vmm.log.stat().st_size > size, what="output while hostd is down")
    await asyncio.to_thread(hostd.start)
    printed = vm.vmm.log.read_bytes()
    comm, _, _ = await connect(vm, owner, f"?offset={len(got)}")
    assert (await hello(comm))["offset"] == len(got)
    rest = await read_bytes(comm, len(printed) - len(got))
    await comm.disconnect()
    assert got + rest == printed


async def test_many_viewers_one_writer_and_explicit_takeover(console_vm, owner):
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    await database_sync_to_async(assign_perm)("vms.console_vm", grantee, console_vm)
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, console_vm)
    a, _, _ = await connect(console_vm, owner)
    b, _, _ = await connect(console_vm, grantee)
    ha, hb = await hello(a), await hello(b)
    assert ha["writer"] is True
    assert hb["writer"] is False and hb["writer_user"] == "owner"
    seen_b = bytearray()
    await b.send_to(bytes_data=b"ignored\n")
    assert "read-only" in (await read_until_text(b, "error", seen_b))["message"]
    await a.send_to(bytes_data=b"root\n")
    seen_a = await read_until(a, b"echo: root\n")  # the guest got it and answered
    seen_b += await read_until(b, b"echo: root\n")
    log = console_vm.vmm.log.read_bytes()
    assert seen_a == log[ha["offset"] : ha["offset"] + len(seen_a)]
    assert seen_b == log[hb["offset"] : hb["offset"] + len(seen_b)]  # the same bytes at the same offsets
    await b.send_to(text_data=json.dumps({"type": "takeover"}))
    role_b = await read_until_text(b, "role")
    role_a = await read_until_text(a, "role")
    assert role_b == {"type": "role", "writer": True, "writer_user": "grantee", "taken_from_you": False}
    assert role_a["writer"] is False and role_a["taken_from_you"] is True
    await b.send_to(text_data=json.dumps({"type": "input", "data": "ls\n"}))
    await read_until(a, b"echo: ls\n")
    await a.send_to(bytes_data=b"not me\n")
    assert (await read_until_text(a, "error"))["code"] == "read_only"
    for comm in (a, b):
        await comm.disconnect()
    assert b"echo: not me" not in console_vm.vmm.log.read_bytes()
    actions = await database_sync_to_async(
        lambda: list(AuditEvent.objects.filter(object_id=str(console_vm.pk)).values_list("action", flat=True))
    )()
    assert actions.count("console.open") == 2 and "console.takeover" in actions and actions.count("console.close") == 2


async def read_until_text(comm, kind: str, skipped: bytearray | None = None) -> dict:
    """The next control message of type ``kind`` (console bytes before it go to ``skipped``)."""
    while True:
        what, value = await next_message(comm)
        if what == "text" and value["type"] == kind:
            return value
        assert what != "close", value
        if what == "bytes" and skipped is not None:
            skipped += value


async def test_view_only_users_are_read_only_and_cannot_take_over(console_vm):
    viewer = await database_sync_to_async(UserFactory)(username="viewer1")
    await database_sync_to_async(assign_perm)("vms.view_vm", viewer, console_vm)
    comm, connected, _ = await connect(console_vm, viewer)
    assert connected
    first = await hello(comm)
    assert first["can_write"] is False and first["writer"] is False
    await comm.send_to(text_data=json.dumps({"type": "takeover"}))
    assert "read-only" in (await read_until_text(comm, "error"))["message"]
    await comm.disconnect()


async def test_a_view_only_connection_never_takes_the_keyboard(console_vm, owner):
    """The VM page's boot console (``?view=1``) watches without claiming the writer role, so
    the owner's Console tab still gets the keyboard."""
    watcher, connected, _ = await connect(console_vm, owner, "?view=1")
    assert connected
    first = await hello(watcher)
    assert first["can_write"] is False and first["writer"] is False
    typist, connected, _ = await connect(console_vm, owner)
    assert connected
    assert (await hello(typist))["writer"] is True
    await watcher.disconnect()
    await typist.disconnect()


async def test_tickets_work_once_and_only_for_their_vm(console_vm, owner):
    from vms.consoles import console_ticket_mint

    other = await database_sync_to_async(VmFactory)(owner=owner, state="running", name="other")
    ticket = await database_sync_to_async(console_ticket_mint)(vm=console_vm, actor=owner)
    comm, connected, _ = await connect(other, None, f"?ticket={ticket}")
    assert await refused_with(comm, connected) == 4401  # wrong VM burns nothing but is refused
    ticket = await database_sync_to_async(console_ticket_mint)(vm=console_vm, actor=owner)
    comm, connected, _ = await connect(console_vm, None, f"?ticket={ticket}")
    assert connected
    await hello(comm)
    await comm.disconnect()
    comm, connected, _ = await connect(console_vm, None, f"?ticket={ticket}")
    assert await refused_with(comm, connected) == 4401


async def test_a_viewer_never_has_more_than_a_window_unacknowledged(make_vm, owner):
    vm = await database_sync_to_async(make_vm)(os.urandom(50_000))
    comm, _, _ = await connect(vm, owner, "?offset=0")
    await hello(comm)
    got = await read_bytes(comm, WINDOW)
    assert await comm.receive_nothing(timeout=0.3)  # the window is full until acknowledged
    assert await sent_so_far(comm) == WINDOW
    await comm.send_to(text_data=json.dumps({"type": "ack", "offset": 1000}))  # partial ack: 1000 more
    got += await read_bytes(comm, 1000)
    assert await sent_so_far(comm) == WINDOW + 1000
    await comm.send_to(text_data=json.dumps({"type": "ack", "offset": 10**12}))  # beyond what was sent
    got += await read_bytes(comm, WINDOW)  # counts as everything sent so far: one more window
    assert await sent_so_far(comm) == 2 * WINDOW + 1000
    await comm.send_to(text_data=json.dumps({"type": "ack", "offset": True}))  # not a number: ignored
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()
    assert got == vm.vmm.log.read_bytes()[: len(got)]


async def test_a_viewer_that_does_not_ack_makes_hostd_wait_and_then_catches_up(make_vm, owner, hostd):
    vm = await database_sync_to_async(make_vm)(os.urandom(2 << 20))
    comm, _, _ = await connect(vm, owner, "?offset=0")
    await hello(comm)
    got = await read_bytes(comm, WINDOW)
    # The consumer stops reading its stream: hostd's writes towards it back up (a consumer that
    # buffered instead would have taken the whole 2 MiB at once and left nothing queued).
    await asyncio.to_thread(wait_for, lambda: max(hostd.viewer_write_buffers()) > 0, what="hostd waiting")
    await comm.receive_nothing(timeout=0.5)
    assert max(hostd.viewer_write_buffers()) > 0
    while len(got) < 300_000:  # acknowledging again resumes the stream where it stopped
        await comm.send_to(text_data=json.dumps({"type": "ack", "offset": len(got)}))
        got += await read_bytes(comm, WINDOW)
    await comm.disconnect()
    assert got == vm.vmm.log.read_bytes()[: len(got)]


async def test_output_arrives_in_order_in_large_frames_with_a_large_window(make_vm, owner, settings):
    """hostd batches what is there into chunks of up to 256 KiB and the consumer forwards each
    as one binary frame (as much as the window allows): the bytes and offsets stay exact
    across chunk, batch and window boundaries."""
    settings.SANDBOX_CONSOLE_WINDOW_BYTES = window = 1 << 20
    blob = os.urandom(3 * window + 4321)
    vm = await database_sync_to_async(make_vm)(blob)
    comm, _, _ = await connect(vm, owner, "?offset=0")
    first = await hello(comm)
    assert first["window"] == window and first["offset"] == 0
    got = bytearray()
    sizes = []
    while len(got) < len(blob):
        kind, value = await next_message(comm)
        assert kind == "bytes", (kind, value)
        got += value
        sizes.append(len(value))
        if len(got) % window >= window // 4 or len(value) >= window // 4:
            await comm.send_to(text_data=json.dumps({"type": "ack", "offset": len(got)}))
    await comm.disconnect()
    assert bytes(got[: len(blob)]) == blob
    assert max(sizes) == STREAM_CHUNK  # not the 4 KiB ring's or a socket read's size
    assert got == vm.vmm.log.read_bytes()[: len(got)]


@pytest.mark.parametrize("hostd", [{"console_log_max_bytes": 64 << 10}], indirect=True)
async def test_a_slow_viewer_skips_with_a_gap_and_never_slows_the_guest(make_vm, owner, hostd):
    """A viewer that does not acknowledge holds up nobody: the guest prints 8 MiB meanwhile
    (the log keeps the newest 48 KiB of them). The viewer is told with ``gap`` messages which
    bytes it skipped, the bytes between them are contiguous, and after the last one come the
    log's bytes from its ``to``."""
    vm = await database_sync_to_async(make_vm)()
    comm, _, _ = await connect(vm, owner)
    start = (await hello(comm))["offset"]
    flood = 8 << 20
    await comm.send_to(text_data=json.dumps({"type": "input", "data": f"flood {flood}\n"}))
    flood_json = vm.vmm.runtime_dir / "flood.json"
    await asyncio.to_thread(wait_for, flood_json.exists, 60, "the guest's flood to end")
    assert json.loads(flood_json.read_text())["bytes"] == flood  # all of it, unacknowledged
    gaps: list[dict] = []
    after = bytearray()  # bytes since the last gap (or since the start)
    received = 0

    async def take() -> dict | None:
        nonlocal after, received
        kind, value = await next_message(comm)
        if kind == "bytes":
            after += value
            received += len(value)
            return None
        if value["type"] == "gap":
            assert value["from"] == (gaps[-1]["to"] if gaps else start) + len(after)  # contiguous up to it
            assert value["to"] > value["from"]
            gaps.append(value)
            after = bytearray()
            return None
        return value

    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    while (control := await take()) is None or control["type"] != "pong":
        pass
    # Unacknowledged, the viewer got a window at most (a gap restarts the count: skipped
    # bytes need no ack).
    assert received <= WINDOW * (1 + len(gaps))
    info = await asyncio.to_thread(hostd.console_info, vm.pk)
    assert info["log_dropped"] > 0 and info["log_start"] > start + received
    # Acknowledging again: what the stream still held, a gap (or more) up to the oldest byte
    # the log kept, and those bytes.
    while not gaps or gaps[-1]["to"] < info["log_start"] or len(after) < 4096:
        await comm.send_to(text_data=json.dumps({"type": "ack", "offset": 10**12}))  # = all sent
        await take()
    await comm.disconnect()
    with open(vm.vmm.log, "rb") as fh:  # offsets are file positions: the log's bytes from `to`
        fh.seek(gaps[-1]["to"])
        assert bytes(after) == fh.read(len(after))


async def test_bytes_that_no_longer_exist_are_reported_as_a_gap(make_vm, owner, hostd):
    vm = await database_sync_to_async(make_vm)(b"old " * 5000)
    os.truncate(vm.vmm.log, 0)  # rotated away: hostd's offsets continue after the old end
    info = await asyncio.to_thread(
        wait_for, lambda: (i := hostd.console_info(vm.pk))["log_base"] > 0 and i, what="hostd noticing the truncation"
    )
    comm, _, _ = await connect(vm, owner, "?offset=0")
    assert (await hello(comm))["offset"] == 0
    kind, gap = await next_message(comm)
    assert kind == "text" and gap == {"type": "gap", "from": 0, "to": info["log_base"]}
    after = await read_until(comm, b"tick ")
    assert after == vm.vmm.log.read_bytes()[: len(after)]  # the new log's bytes, from its first
    await comm.disconnect()


async def test_an_offset_beyond_the_end_starts_over_with_a_gap(console_vm, owner):
    comm, _, _ = await connect(console_vm, owner, "?offset=999999999")
    first = await hello(comm)
    assert first["offset"] == max(0, first["size"] - SCROLLBACK)
    kind, gap = await next_message(comm)
    assert kind == "text" and gap == {"type": "gap", "from": 999999999, "to": first["offset"]}
    await read_until(comm, b"tick ")
    await comm.disconnect()


async def test_hostd_down_is_a_clear_error_and_a_retryable_close(root, owner):
    vm = await database_sync_to_async(VmFactory)(owner=owner, state="running", name="con")
    comm, connected, _ = await connect(vm, owner)
    assert connected
    error, code = await closed_with(comm)
    assert error["code"] == "hostd_unavailable" and "hostd" in error["message"] and code == 4503
    await comm.disconnect()
    actions = await database_sync_to_async(
        lambda: list(AuditEvent.objects.filter(object_id=str(vm.pk)).values_list("action", flat=True))
    )()
    assert "console.open" not in actions  # retries while hostd is down leave no trail


async def test_a_vm_that_is_not_running_is_a_clear_error(hostd, owner, root):
    vm = await database_sync_to_async(VmFactory)(owner=owner, state="stopped", name="off")
    comm, connected, _ = await connect(vm, owner)
    assert connected
    error, code = await closed_with(comm)
    assert error["code"] == "vm_not_running" and code == 4409
    await comm.disconnect()


async def test_viewers_are_told_when_the_vm_stops(console_vm, owner):
    comm, _, _ = await connect(console_vm, owner)
    await hello(comm)
    await read_until(comm, b"tick ")
    await database_sync_to_async(console_vm.vmm.kill)()
    texts: list[dict] = []
    while not texts:
        kind, value = await next_message(comm, timeout=20)
        if kind == "text":
            texts.append(value)
    assert texts[0]["type"] == "error" and texts[0]["code"] == "vm_stopped" and texts[0]["closing"]
    assert await next_message(comm) == ("close", 4409)
    await comm.disconnect()


async def test_input_is_bounded(console_vm, owner):
    comm, _, _ = await connect(console_vm, owner)
    await hello(comm)
    await comm.send_to(bytes_data=b"x" * 5000)
    assert "at most" in (await read_until_text(comm, "error"))["message"].lower()
    await comm.send_to(bytes_data=b"still here\n")
    await read_until(comm, b"echo: still here\n")
    await comm.disconnect()


async def test_input_and_output_never_wait_for_the_database_thread(console_vm, owner):
    comm, _, _ = await connect(console_vm, owner)
    await hello(comm)
    release = threading.Event()
    blocked = asyncio.ensure_future(database_sync_to_async(release.wait)(20))  # the shared database thread
    try:
        await comm.send_to(bytes_data=b"while the database thread is busy\n")
        await read_until(comm, b"echo: while the database thread is busy\n")
    finally:
        release.set()
        await blocked
    await comm.disconnect()


async def test_input_errors_say_why(root, hostd):
    console = HostdConsole("no-such-vm")
    with pytest.raises(ConsoleUnavailable) as err:
        await console.write(b"x")
    assert err.value.code == "vm_not_running"
    await console.close()
    console = HostdConsole("no-such-vm", socket_path=root / "absent.sock")
    with pytest.raises(ConsoleUnavailable) as err:
        await console.write(b"x")
    assert err.value.code == "hostd_unavailable" and "hostd" in err.value.message
    await console.close()


# --- the writer role outlives no connection --------------------------------------------


async def _writer_after_connect(vm, user) -> tuple[WebsocketCommunicator, dict]:
    comm, connected, _ = await connect(vm, user)
    assert connected
    return comm, await hello(comm)


async def test_a_console_that_fails_after_claiming_leaves_the_keyboard_to_the_next_viewer(
    console_vm, owner, monkeypatch
):
    from django.db import OperationalError

    from vms.consumers import VmConsoleConsumer

    audit = VmConsoleConsumer._audit

    def locked_on_open(self, action):  # what SQLite's "database is locked" did after the claim
        if action == "console.open":
            raise OperationalError("database is locked")
        audit(self, action)

    monkeypatch.setattr(VmConsoleConsumer, "_audit", locked_on_open)
    first, first_hello = await _writer_after_connect(console_vm, owner)
    assert first_hello["writer"] is True
    with pytest.raises(OperationalError):
        await first.receive_output(timeout=10)  # the consumer died with the error
    monkeypatch.setattr(VmConsoleConsumer, "_audit", audit)

    second, second_hello = await _writer_after_connect(console_vm, owner)
    assert second_hello["writer"] is True  # at once: no lapse to wait for
    await second.send_to(bytes_data=b"after the crash\n")
    await read_until(second, b"echo: after the crash\n")
    await second.disconnect()


async def test_a_cancelled_console_task_leaves_the_keyboard_to_the_next_viewer(console_vm, owner):
    from vms.consoles import console_writer

    first, first_hello = await _writer_after_connect(console_vm, owner)
    assert first_hello["writer"] is True
    first.future.cancel()  # e.g. the server shutting the connection's task down
    with contextlib.suppress(asyncio.CancelledError):
        await first.future
    second, second_hello = await _writer_after_connect(console_vm, owner)
    assert second_hello["writer"] is True
    holder = await database_sync_to_async(console_writer)(console_vm.pk)
    assert holder["user"] == "owner" and holder["session"] != first_hello.get("session")
    await second.disconnect()


async def test_a_claim_whose_connection_ended_unreleased_is_free_at_once(console_vm, owner, monkeypatch):
    """Even when releasing failed (the cache did not answer), a claim whose connection ended
    in this process does not lock the next viewer out."""
    from vms import consoles

    monkeypatch.setattr(consoles, "console_writer_release", lambda *a, **kw: False)
    first, first_hello = await _writer_after_connect(console_vm, owner)
    assert first_hello["writer"] is True
    await first.disconnect()
    assert (await database_sync_to_async(consoles.console_writer)(console_vm.pk))["user"] == "owner"  # left behind
    second, second_hello = await _writer_after_connect(console_vm, owner)
    assert second_hello["writer"] is True
    await second.disconnect()


async def test_a_live_writer_keeps_its_claim_and_a_dead_process_claim_lapses(console_vm, owner, monkeypatch):
    from vms import consoles

    monkeypatch.setattr(consoles, "WRITER_TTL_SECONDS", 1)
    monkeypatch.setattr(consoles, "WRITER_REFRESH_SECONDS", 0.2)
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    for perm in ("vms.view_vm", "vms.console_vm"):
        await database_sync_to_async(assign_perm)(perm, grantee, console_vm)
    writer, writer_hello = await _writer_after_connect(console_vm, owner)
    assert writer_hello["writer"] is True
    await asyncio.sleep(2.5)  # longer than the claim's TTL: only the refreshes keep it
    other, other_hello = await _writer_after_connect(console_vm, grantee)
    assert other_hello["writer"] is False and other_hello["writer_user"] == "owner"
    await other.disconnect()
    await writer.disconnect()

    # A claim made by a process that died (nothing here knows its connection): it lapses.
    crashed = {"session": "specific.gone!1", "user": "owner", "process": "elsewhere:1:dead"}
    await database_sync_to_async(cache.set)(f"console-writer:{console_vm.pk}", crashed, consoles.WRITER_TTL_SECONDS)
    other, other_hello = await _writer_after_connect(console_vm, grantee)
    assert other_hello["writer"] is False
    await other.disconnect()
    await asyncio.to_thread(
        wait_for, lambda: consoles.console_writer(console_vm.pk) is None, timeout=3, what="the claim to lapse"
    )
    other, other_hello = await _writer_after_connect(console_vm, grantee)
    assert other_hello["writer"] is True
    await other.disconnect()


@pytest.fixture
def remote_hostd(root, settings):
    """hostd of another host "h2": the VMs' runtime directory, reached only over mutual TLS
    (this machine's socket path leads nowhere)."""
    from vms import pki

    settings.SANDBOX_PKI_DIR = root / "pki"
    files = pki.host_cert_issue("h2", "127.0.0.1")
    daemon = Hostd(root, tls_listen="127.0.0.1:0", tls_cert=files.cert, tls_key=files.key, tls_ca=pki.ca_files().cert)
    daemon.start()
    settings.SANDBOX_HOSTD_SOCKET = root / "not-this-host.sock"
    yield daemon
    daemon.stop()


async def test_a_console_on_another_host_is_served_through_its_hostd_over_mutual_tls(root, remote_hostd, owner):
    from tests.factories import HostFactory

    def make():
        host = HostFactory(name="h2", hostd_address=f"127.0.0.1:{remote_hostd.daemon.tls_port}")
        vm = VmFactory(owner=owner, state="running", name="far", host=host)
        vmm = Vmm(root / str(vm.pk))
        vmm.runtime_dir.mkdir()
        vmm.start()
        remote_hostd.scan()
        return vm, vmm

    vm, vmm = await database_sync_to_async(make)()
    try:
        comm, connected, _ = await connect(vm, owner)
        assert connected
        first = await hello(comm)
        assert first["writer"] is True
        await comm.send_to(text_data=json.dumps({"type": "input", "data": "over tls\n"}))
        got = await read_until(comm, b"echo: over tls")
        assert got == vmm.log.read_bytes()[first["offset"] : first["offset"] + len(got)]
        await comm.disconnect()
    finally:
        vmm.kill()
