"""Starting a pseudo-terminal over the exec websocket: cancellations stay cancellations."""

import asyncio

import pytest
from msbx.aio import AsyncClient, AsyncSandbox


class _HangingWs:
    def __init__(self):
        self.closed = False

    async def send(self, data):
        pass

    async def recv(self):
        await asyncio.Event().wait()  # the server has not answered yet

    async def close(self):
        self.closed = True


def test_cancelling_an_async_pty_start_stays_a_cancellation():
    async def main():
        client = AsyncClient("http://127.0.0.1:9", "msb_x")
        ws = _HangingWs()

        async def connect(path, **kw):
            return ws

        client.http.ws_connect = connect
        sb = AsyncSandbox(client, {"id": "11111111-2222-3333-4444-555555555555", "name": "x"})
        task = asyncio.create_task(sb.pty())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ws.closed

    asyncio.run(main())


def test_asyncio_timeout_around_pty_raises_timeout_error():
    async def main():
        client = AsyncClient("http://127.0.0.1:9", "msb_x")

        async def connect(path, **kw):
            return _HangingWs()

        client.http.ws_connect = connect
        sb = AsyncSandbox(client, {"id": "11111111-2222-3333-4444-555555555555", "name": "x"})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await sb.pty()

    asyncio.run(main())


# ----- flow control: a pseudo-terminal's reader acknowledges what it read -------------------

ATTACHED = '{"type": "attached", "exec_id": "e1", "offset": 0, "window": 65536}'


class _WindowedServer:
    """The exec websocket's sending side: at most ``window`` output bytes beyond the last
    ``ack``; once the window is full nothing more comes (``recv`` times out)."""

    def __init__(self, total: int, window: int = 65536) -> None:
        self.total, self.window = total, window
        self.sent = self.acked = 0
        self.opened = False
        self.acks: list[int] = []

    def next_frame(self):
        if not self.opened:
            self.opened = True
            return ATTACHED
        room = self.window - (self.sent - self.acked)
        if self.sent < self.total and room > 0:
            size = min(16384, self.total - self.sent, room)
            self.sent += size
            return b"\x03" + b"x" * size
        if self.sent >= self.total:
            return '{"type": "exit", "result": {"exit_code": 0}}'
        return None  # stalled: waiting for an ack

    def take(self, data):
        import json

        message = json.loads(data)
        if message.get("type") == "ack":
            self.acked = min(int(message["offset"]), self.sent)
            self.acks.append(self.acked)


class _SyncWs:
    def __init__(self, server):
        self.server = server

    def recv(self, timeout=None):
        frame = self.server.next_frame()
        if frame is None:
            raise TimeoutError
        return frame

    def send(self, data):
        self.server.take(data)


class _AsyncWs(_SyncWs):
    async def recv(self):
        frame = self.server.next_frame()
        if frame is None:
            await asyncio.sleep(3600)
        return frame

    async def send(self, data):
        self.server.take(data)


def test_a_pty_reader_acknowledges_so_output_beyond_the_window_keeps_coming():
    from msbx.client import Client, PtySession, Sandbox

    server = _WindowedServer(total=1 << 20)  # 16 windows
    sandbox = Sandbox(Client("http://127.0.0.1:9", "msb_x"), {"id": "11111111-2222-3333-4444-555555555555"})
    session = PtySession(sandbox, "e1", _SyncWs(server))
    received = 0
    while (data := session.recv(timeout=1)) is not None:
        received += len(data)
    assert received == 1 << 20 and session.offset == 1 << 20 and session.result.exit_code == 0
    assert server.acks and all(b > a for a, b in zip(server.acks, server.acks[1:]))


def test_an_async_pty_reader_acknowledges_so_output_beyond_the_window_keeps_coming():
    from msbx.aio import AsyncPtySession

    async def main():
        server = _WindowedServer(total=1 << 20)
        sandbox = AsyncSandbox(
            AsyncClient("http://127.0.0.1:9", "msb_x"), {"id": "11111111-2222-3333-4444-555555555555"}
        )
        session = AsyncPtySession(sandbox, "e1", _AsyncWs(server))
        received = 0
        while (data := await session.recv(timeout=1)) is not None:
            received += len(data)
        return received, session

    received, session = asyncio.run(main())
    assert received == 1 << 20 and session.offset == 1 << 20 and session.result.exit_code == 0
