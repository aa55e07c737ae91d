"""``exec`` with output callbacks starts the command on its own exec websocket and streams it
there (no polling): output in order as text, acks beyond the server's window, the result; a
refused start raises the REST call's exception; a socket lost after the start goes on over REST
from the offset it reached; no websocket (or a transport of the caller's) means REST."""

from __future__ import annotations

import asyncio
import json

import msbx
import pytest
from msbx.aio import AsyncClient, AsyncSandbox
from msbx.errors import TransportError

from tests.sdk.fake import TOKEN, URL, FakeApi
from tests.sdk.test_client import VM_ID, _exec_routes, _page

WINDOW = 4096


class FakeSocket:
    """The server's side of ``/ws/vms/{id}/exec/``: answers the start frame with ``frames``
    (output in pieces of at most the window beyond the last ack), records what came back."""

    def __init__(self, output=(), result=None, *, refuse=None, drop_after=None):
        self.output = list(output)  # (stream byte, bytes)
        self.result = result or {"exit_code": 0, "signal": None, "timed_out": False}
        self.refuse, self.drop_after = refuse, drop_after
        self.start: dict | None = None
        self.acks: list[int] = []
        self.sent = 0
        self.closed = False
        self.queue: list = []

    def _fill(self):
        if self.start is None or self.queue:
            return
        if self.refuse is not None:
            self.queue.append(json.dumps({"type": "error", **self.refuse}))
            return
        if self.sent == 0 and not self.acks and not getattr(self, "_opened", False):
            self._opened = True
            self.queue += [json.dumps({"type": "started", "exec_id": "e1"})]
            self.queue += [json.dumps({"type": "attached", "exec_id": "e1", "offset": 0, "window": WINDOW})]
            return
        acked = self.acks[-1] if self.acks else 0
        if self.output and self.sent - acked < WINDOW:
            stream, data = self.output[0]
            piece = data[: WINDOW - (self.sent - acked)]
            rest = data[len(piece) :]
            self.output[0] = (stream, rest)
            if not rest:
                self.output.pop(0)
            self.sent += len(piece)
            self.queue.append(stream + piece)
        elif not self.output:
            self.queue.append(json.dumps({"type": "exit", "end_offset": self.sent, "result": self.result}))

    def take(self, data):
        message = json.loads(data)
        if message["type"] == "start":
            self.start = message
        elif message["type"] == "ack":
            self.acks.append(message["offset"])

    def next(self):
        if self.drop_after is not None and self.sent >= self.drop_after:
            from websockets.exceptions import ConnectionClosedError

            raise ConnectionClosedError(None, None)
        self._fill()
        if not self.queue:
            raise TimeoutError  # stalled: the window is full and nothing acknowledged it
        return self.queue.pop(0)


class SyncWs:
    def __init__(self, server):
        self.server = server

    def send(self, data):
        self.server.take(data)

    def recv(self, timeout=None):
        return self.server.next()

    def close(self):
        self.server.closed = True


class AsyncWs(SyncWs):
    async def send(self, data):
        self.server.take(data)

    async def recv(self):
        return self.server.next()

    async def close(self):
        self.server.closed = True


def sandbox_of(client):
    return msbx.Sandbox(client, {"id": VM_ID, "name": "box"})


def sync_client(server, api=None):
    client = (
        msbx.Client("http://127.0.0.1:9", TOKEN)
        if api is None
        else msbx.Client(URL, TOKEN, transport=api.sync_transport())
    )
    client.http.own_transport = False  # the fake API stands in for the server's HTTP side
    client.http.ws_connect = lambda path, **kw: SyncWs(server)
    return client


EURO = "€".encode()
OUTPUT = [(b"\x01", b"hello " + EURO[:1]), (b"\x01", EURO[1:] + b"\n" + b"x" * 10000), (b"\x02", b"warn\n")]


def test_exec_streams_over_its_own_socket_with_acks_and_text_in_order():
    server = FakeSocket(OUTPUT, {"exit_code": 3, "signal": None, "timed_out": False})
    client = sync_client(server)
    out, err = [], []
    result = sandbox_of(client).exec(["sh", "-c", "x"], env={"A": "1"}, on_stdout=out.append, on_stderr=err.append)
    assert result.exit_code == 3 and result.exec_id == "e1"
    assert "".join(out) == result.stdout == "hello €\n" + "x" * 10000 and result.stderr == "".join(err) == "warn\n"
    assert server.start == {"type": "start", "command": ["sh", "-c", "x"], "env": {"A": "1"}}  # no wait
    assert server.acks and server.closed  # 10 KiB through a 4 KiB window: acknowledged as read
    with pytest.raises(msbx.CommandFailed):
        sandbox_of(sync_client(FakeSocket([], {"exit_code": 1}))).exec("false", on_stdout=out.append, check=True)


def test_a_refused_socket_start_raises_what_the_rest_call_would():
    refusal = {"code": "throttled", "message": "slow down", "status": 429, "details": {"retry_after": 7}}
    client = sync_client(FakeSocket(refuse=refusal))
    with pytest.raises(msbx.RateLimited) as caught:
        sandbox_of(client).exec("true", on_stdout=print)
    assert caught.value.retry_after == 7


def test_a_socket_lost_after_the_start_goes_on_over_rest_from_its_offset():
    api = FakeApi()
    _exec_routes(api, [_page(6, [("stdout", b"world\n")], running=False, result={"exit_code": 0})])
    server = FakeSocket([(b"\x01", b"hello ")], drop_after=6)
    out = []
    result = sandbox_of(sync_client(server, api)).exec("x", on_stdout=out.append)
    assert "".join(out) == "hello world\n" and result.stdout == "hello world\n" and result.exit_code == 0
    assert api.calls("POST", "/exec/") == []  # started once, on the socket
    assert api.calls("GET", "/execs/e1/")[0].url.params["offset"] == "6"


def test_without_a_socket_exec_streams_over_rest():
    api = FakeApi()
    _exec_routes(api, [_page(0, [("stdout", b"hi\n")], running=False, result={"exit_code": 0})])
    client = msbx.Client(URL, TOKEN, transport=api.sync_transport())
    client.http.own_transport = False

    def refused(path, **kw):
        raise TransportError("connection refused")

    client.http.ws_connect = refused
    out = []
    assert sandbox_of(client).exec("x", on_stdout=out.append).stdout == "hi\n" and out == ["hi\n"]
    assert len(api.calls("POST", "/exec/")) == 1


def test_a_client_on_its_own_transport_never_opens_a_socket():
    api = FakeApi()
    _exec_routes(api, [_page(0, [("stdout", b"hi\n")], running=False, result={"exit_code": 0})])
    client = msbx.Client(URL, TOKEN, transport=api.sync_transport())
    client.http.ws_connect = lambda *a, **kw: pytest.fail("a websocket bypasses the caller's transport")
    assert sandbox_of(client).exec("x", on_stdout=lambda _: None).stdout == "hi\n"


def test_the_async_client_streams_over_its_own_socket_with_coroutine_callbacks():
    server = FakeSocket(OUTPUT)

    async def main():
        client = AsyncClient("http://127.0.0.1:9", TOKEN)

        async def connect(path, **kw):
            return AsyncWs(server)

        client.http.ws_connect = connect
        out = []

        async def on_stdout(text):
            out.append(text)

        result = await AsyncSandbox(client, {"id": VM_ID, "name": "box"}).exec("x", on_stdout=on_stdout)
        await client.close()
        return result, out

    result, out = asyncio.run(main())
    assert "".join(out) == result.stdout == "hello €\n" + "x" * 10000 and result.stderr == "warn\n"
    assert server.acks and server.closed
