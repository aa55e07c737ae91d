"""SDK exec over websockets at its edges: a refused handshake, a stream error after the start,
an ack that meets the server's close."""

from __future__ import annotations

import asyncio
import json

import msbx
import pytest
from msbx._http import ws_error
from msbx.aio import AsyncClient, AsyncPtySession, AsyncSandbox
from msbx.client import PtySession
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from tests.sdk.fake import TOKEN, URL, FakeApi, error
from tests.sdk.test_client import VM_ID, _exec_routes, _page
from tests.sdk.test_exec_socket import FakeSocket, sandbox_of, sync_client

ATTACHED = json.dumps({"type": "attached", "exec_id": "e1", "offset": 0, "window": 65536})
EXIT = json.dumps({"type": "exit", "end_offset": 70000, "result": {"exit_code": 0}})


def _closed():
    return ConnectionClosedOK(Close(1000, ""), Close(1000, ""), True)


class _ClosedAfterExitWs:
    """The server sent its last output, the exit and closed (1000): websockets still hands out
    the buffered frames, but a send (the reader's ack) raises ConnectionClosedOK."""

    def __init__(self):
        self.frames = [ATTACHED, b"\x03" + b"x" * 70000, EXIT]

    def recv(self, timeout=None):
        if not self.frames:
            raise _closed()
        return self.frames.pop(0)

    def send(self, data):
        raise _closed()

    def close(self):
        pass


class _AsyncClosedAfterExitWs(_ClosedAfterExitWs):
    async def recv(self):
        return super().recv()

    async def send(self, data):
        raise _closed()

    async def close(self):
        pass


def test_a_pty_ack_that_meets_the_servers_close_loses_neither_output_nor_exit():
    session = PtySession(sandbox_of(msbx.Client("http://127.0.0.1:9", TOKEN)), "e1", _ClosedAfterExitWs())
    assert session.recv(timeout=1) == b"x" * 70000  # raised ConnectionClosedOK from the ack
    assert session.recv(timeout=1) is None and session.result.exit_code == 0


def test_an_async_pty_ack_that_meets_the_servers_close_loses_neither_output_nor_exit():
    async def main():
        client = AsyncClient("http://127.0.0.1:9", TOKEN)
        session = AsyncPtySession(AsyncSandbox(client, {"id": VM_ID, "name": "b"}), "e1", _AsyncClosedAfterExitWs())
        try:
            assert await session.recv(timeout=1) == b"x" * 70000
            assert await session.recv(timeout=1) is None and session.result.exit_code == 0
        finally:
            await client.close()

    asyncio.run(main())


class _HostdLostSocket(FakeSocket):
    """Started, some output, then hostd's stream ended: the server sends an ``error`` frame and
    closes 4502 (vms/exec_consumers.py _pump); the command goes on in the guest."""

    def next(self):
        if self.sent >= 6 and not self.queue:
            return json.dumps({"type": "error", "code": "hostd_unavailable", "message": "stream ended"})
        return super().next()


def test_a_hostd_hiccup_after_the_start_goes_on_over_rest_like_a_lost_socket():
    api = FakeApi()
    _exec_routes(api, [_page(6, [("stdout", b"world\n")], running=False, result={"exit_code": 0})])
    server = _HostdLostSocket([(b"\x01", b"hello ")])
    out = []
    result = sandbox_of(sync_client(server, api)).exec("x", on_stdout=out.append)  # raised SandboxError
    assert result.stdout == "hello world\n" and result.exit_code == 0
    assert api.calls("POST", "/exec/") == []  # never started twice


def test_a_refused_exec_handshake_raises_what_rest_says_not_permission_denied():
    # The exec consumer refuses a stopped (4409) or unknown (4404) VM, and the per-user cap
    # refuses (4429), before accepting: daphne answers the handshake 403, which ws_error maps
    # to PermissionDenied. Nothing was started: REST gives the real answer (or runs it).
    api = FakeApi()
    api.route("POST", f"/api/v1/vms/{VM_ID}/exec/", error(409, "not_running", "The VM is not running."))
    client = msbx.Client(URL, TOKEN, transport=api.sync_transport())
    client.http.own_transport = False

    def refused(path, **kw):
        raise ws_error(InvalidStatus(Response(403, "Forbidden", [], b"")), path)

    client.http.ws_connect = refused
    with pytest.raises(msbx.Conflict):  # was PermissionDenied
        sandbox_of(client).exec("x", on_stdout=print)
