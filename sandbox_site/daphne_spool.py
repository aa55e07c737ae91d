"""Bound daphne's memory for large request bodies.

Daphne (4.x) receives a request body completely (Twisted spools it to a temporary file),
then puts *all* of it into the application's input queue at once, in
``request_buffer_size`` chunks (daphne/http_protocol.py, ``WebRequest.process``): a 200 MiB
upload costs 200 MiB of RAM however the application reads it. ``install()`` swaps the
input queue for ``SpooledInputQueue``, which keeps at most ``MEMORY_LIMIT`` bytes of body
in memory and writes the rest to a temporary file, read back as the application asks.
Installed from sandbox_site/asgi.py; a no-op when daphne is not the server.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from functools import partial

MEMORY_LIMIT = 1 << 20
_SPOOLED = object()


class SpooledInputQueue(asyncio.Queue):
    """An asyncio.Queue whose ``http.request`` bodies beyond MEMORY_LIMIT live on disk.
    Order is kept: a spooled message is a placeholder read back in turn."""

    def __init__(self) -> None:
        super().__init__()
        self._in_memory = 0
        self._spool = None
        self._spans: collections.deque = collections.deque()  # (offset, length, more_body) of spooled bodies
        self._write_at = 0
        self._read_at = 0

    def put_nowait(self, item) -> None:
        body = item.get("body") if isinstance(item, dict) and item.get("type") == "http.request" else None
        if body and (self._spans or self._in_memory + len(body) > MEMORY_LIMIT):
            if self._spool is None:
                self._spool = tempfile.TemporaryFile(prefix="daphne-body-")  # noqa: SIM115 - closed when drained
            self._spool.seek(self._write_at)
            self._spool.write(body)
            self._spans.append((self._write_at, len(body), item.get("more_body", False)))
            self._write_at += len(body)
            super().put_nowait(_SPOOLED)
            return
        if body:
            self._in_memory += len(body)
        super().put_nowait(item)

    async def get(self):
        item = await super().get()
        return self._restore(item)

    def get_nowait(self):
        return self._restore(super().get_nowait())

    def _restore(self, item):
        if item is _SPOOLED:
            offset, length, more = self._spans.popleft()
            self._spool.seek(offset)
            body = self._spool.read(length)
            if not self._spans:
                self._spool.close()
                self._spool = None
                self._write_at = 0
            return {"type": "http.request", "body": body, "more_body": more}
        if isinstance(item, dict) and item.get("type") == "http.request":
            self._in_memory -= len(item.get("body") or b"")
        return item


def install() -> None:
    try:
        from daphne.server import Server
    except ImportError:
        return
    if getattr(Server.create_application, "_spooled", False):
        return

    def create_application(self, protocol, scope):
        # daphne.server.Server.create_application (4.x), with a spooling input queue.
        assert "application_instance" not in self.connections[protocol]
        input_queue = SpooledInputQueue()
        scope.setdefault("asgi", {"version": "3.0"})
        application_instance = self.application(
            scope=scope, receive=input_queue.get, send=partial(self.handle_reply, protocol)
        )
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop()
        )
        return input_queue

    create_application._spooled = True
    Server.create_application = create_application
