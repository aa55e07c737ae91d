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
