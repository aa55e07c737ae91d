"""The SDK's console clients acknowledge a quarter of the server's window at a time (flow
control, docs/dashboard.md) and follow ``gap`` messages; a fake websocket stands in."""

from __future__ import annotations

import asyncio
import json

from msbx.aio import AsyncConsole
from msbx.client import Console

WINDOW = 4096


def _messages() -> list[str | bytes]:
    return [
        json.dumps({"type": "hello", "offset": 100, "size": 100, "window": WINDOW, "writer": True}),
        *[b"a" * 700] * 6,  # 4200 bytes: acks after 1400 (>= 1024), 2800 and 4200
        json.dumps({"type": "gap", "from": 4300, "to": 9000}),
        b"b" * 1100,  # counted from the gap's end
    ]


def _acks(sent: list[str]) -> list[int]:
    return [json.loads(m)["offset"] for m in sent if json.loads(m)["type"] == "ack"]


class FakeWs:
    def __init__(self) -> None:
        self.incoming = _messages()
        self.sent: list[str] = []

    def recv(self, timeout=None):  # noqa: ANN001 - websockets' signature
        return self.incoming.pop(0)

    def send(self, message) -> None:  # noqa: ANN001
        self.sent.append(message)


class AsyncFakeWs(FakeWs):
    async def recv(self):  # type: ignore[override]
        return self.incoming.pop(0)

    async def send(self, message) -> None:  # type: ignore[override]  # noqa: ANN001
        self.sent.append(message)


def test_the_console_acks_every_quarter_window_and_follows_gaps() -> None:
    ws = FakeWs()
    console = Console(ws)
    got = b"".join(console.recv() for _ in range(7))
    assert got == b"a" * 4200 + b"b" * 1100
    assert console.window == WINDOW and console.offset == 9000 + 1100
    assert _acks(ws.sent) == [1500, 2900, 4300, 10100]
    assert [n["type"] for n in console.notices] == ["gap"]


def test_the_async_console_acks_the_same_way() -> None:
    async def scenario() -> None:
        ws = AsyncFakeWs()
        console = AsyncConsole(ws)
        got = b"".join([await console.recv() for _ in range(7)])
        assert got == b"a" * 4200 + b"b" * 1100
        assert console.offset == 10100
        assert _acks(ws.sent) == [1500, 2900, 4300, 10100]

    asyncio.run(scenario())
