"""An ASGI app for the slow-client tests: offers FLOOD_BYTES as fast as ``send`` returns, as
a streamed HTTP response (``GET /download``) or over a websocket (``/ws``), under daphne
with the project's patches installed (sandbox_site/daphne_limits.py)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox_site.settings")

import django  # noqa: E402

django.setup()

from sandbox_site import daphne_limits  # noqa: E402

if os.environ.get("FLOOD_UNPATCHED") != "1":
    daphne_limits.install()

FLOOD_BYTES = int(os.environ.get("FLOOD_BYTES", str(200 << 20)))
CHUNK = b"x" * (64 << 10)


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(FLOOD_BYTES // len(CHUNK)):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    message = await receive()
    assert message["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    for _ in range(FLOOD_BYTES // len(CHUNK)):
        await send({"type": "websocket.send", "bytes": CHUNK})
    await send({"type": "websocket.close"})
