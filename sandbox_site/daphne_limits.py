"""Daphne (4.x) patches that bound what one HTTP connection can make the web process hold.

Request bodies (``WebRequest.gotLength``/``handleContentChunk``): Twisted receives a whole
body into a temporary file before daphne runs the application, so a size check in the
application comes after the bytes were written. Here the limit is checked in the protocol,
as the headers arrive (Content-Length) and as the body streams in (chunked): over it, the
connection is answered ``413`` with the API's JSON error shape at once, the rest of the
body is read and discarded for at most ``LINGER_SECONDS`` (so the client sees the answer
instead of a reset), and nothing is written anywhere. Limits per request (``body_limit``):

- the upload routes of ``sandbox_site.body_limits`` (file and image uploads) with credentials:
  their own limit (SANDBOX_FILE_UPLOAD_MAX_BYTES, SANDBOX_IMAGE_MAX_UPLOAD_BYTES);
- any other request with credentials (a session cookie or an Authorization header):
  SANDBOX_REQUEST_MAX_BYTES;
- without credentials: SANDBOX_ANONYMOUS_REQUEST_MAX_BYTES.

Credentials are only looked at, not verified (that needs the database, after the body):
someone presenting a made-up token gets the larger limit and then a 401. Bodies up to
``MEMORY_BODY_BYTES`` stay in memory; larger allowed ones are spooled to a temporary file
bounded by their limit.

Responses (``Server.handle_reply``): daphne writes whatever the application sends into
Twisted's transport buffer at once, and ``send()`` returns at once, so a client that reads
slowly (or not at all) makes the process buffer everything a streaming response or a
websocket offers. The patched ``send`` waits while the connection's transport holds more
than SANDBOX_SEND_BUFFER_BYTES not yet taken by the kernel, i.e. the application is paced
to the client's real reading speed: file downloads, the console log download and both
websockets. A client that takes nothing for SANDBOX_SEND_STALL_SECONDS is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from io import BytesIO

from sandbox_site.body_limits import too_large_body, upload_limit

logger = logging.getLogger(__name__)

MEMORY_BODY_BYTES = 1 << 20
LINGER_SECONDS = 2.0
FAST_DRAIN_BYTES = 64 << 10  # taken between two looks: the client reads fast, look again at once


def body_limit(method: bytes, path: bytes, headers) -> int:
    """The largest request body accepted for this request (see the module docstring)."""
    from django.conf import settings

    cookies = b";".join(headers.getRawHeaders(b"cookie") or [])
    session = settings.SESSION_COOKIE_NAME.encode() + b"="
    credentials = headers.hasHeader(b"authorization") or session in cookies
    if not credentials:
        return settings.SANDBOX_ANONYMOUS_REQUEST_MAX_BYTES
    route = path.split(b"?", 1)[0].decode("latin-1")
    upload = upload_limit(method.decode("latin-1"), route)
    if upload is not None:
        return max(upload, settings.SANDBOX_REQUEST_MAX_BYTES)
    return settings.SANDBOX_REQUEST_MAX_BYTES


class _Discard:
    """Where a refused body goes: nowhere."""

    closed = False

    def write(self, data: bytes) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        return b""

    def seek(self, *args) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def _got_length(self, length) -> None:
    channel = self.channel
    self._body_limit = body_limit(
        getattr(channel, "_command", b""), getattr(channel, "_path", b""), self.requestHeaders
    )
    self._body_seen = 0
    self._body_refused = False
    if length is not None and length > self._body_limit:
        _refuse(self)
        return
    if length is not None and length <= MEMORY_BODY_BYTES:
        self.content = BytesIO()
    else:
        self.content = tempfile.SpooledTemporaryFile(max_size=MEMORY_BODY_BYTES, prefix="daphne-body-")  # noqa: SIM115


def _handle_content_chunk(self, data: bytes) -> None:
    if getattr(self, "_body_refused", False):
        return
    self._body_seen = getattr(self, "_body_seen", 0) + len(data)
    if self._body_seen > getattr(self, "_body_limit", MEMORY_BODY_BYTES):
        _refuse(self)
        return
    self.content.write(data)


def _refuse(request) -> None:
    from twisted.internet import reactor

    request._body_refused = True
    old = getattr(request, "content", None)
    if old is not None and not isinstance(old, _Discard):
        old.close()
    request.content = _Discard()
    channel = request.channel
    transport = channel.transport if channel is not None else None
    if transport is None:
        return
    channel.persistent = False
    body = too_large_body(request._body_limit)
    transport.write(
        b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
        + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body
    )
    logger.info("refused a request body over %d bytes", request._body_limit)
    # Half-close: the client gets the answer and an end of stream; what it still sends is
    # read and dropped for a moment (closing with unread data would reset the connection
    # and could destroy the answer in flight), then the connection is cut.
    try:
        transport.loseWriteConnection()
    except (AttributeError, NotImplementedError):
        transport.loseConnection()
    reactor.callLater(LINGER_SECONDS, transport.abortConnection)


def _request_received(original):
    def request_received(self, command, path, version):
        if getattr(self, "_body_refused", False):
            return  # answered already; the connection is going away
        return original(self, command, path, version)

    return request_received


# ----- responses ---------------------------------------------------------------------------


def transport_buffered(transport) -> int:
    """Bytes a Twisted transport holds that the kernel has not taken yet (0 if unknown)."""
    total = 0
    for _ in range(4):  # a TLS or policy wrapper around the TCP transport
        if transport is None:
            break
        if hasattr(transport, "dataBuffer") and hasattr(transport, "_tempDataLen"):
            return total + len(transport.dataBuffer) - getattr(transport, "offset", 0) + transport._tempDataLen
        total += sum(len(b) for b in getattr(transport, "_appSendBuffer", None) or ())
        transport = getattr(transport, "transport", None)
    return total


def _protocol_transport(protocol):
    channel = getattr(protocol, "channel", None)
    if channel is not None:
        return getattr(channel, "transport", None)
    if hasattr(protocol, "handshake_deferred") or hasattr(protocol, "sendMessage"):
        return getattr(protocol, "transport", None)  # a websocket
    return None


async def wait_for_room(server, protocol, limit: int, stall_seconds: float) -> None:
    """Return once the connection's transport holds at most ``limit`` unsent bytes (or the
    connection is gone); abort a connection that takes nothing for ``stall_seconds``.

    Twisted sends at most 128 KiB per writable event, so a fast client drains the buffer in
    a loop iteration or two: while each look finds at least ``FAST_DRAIN_BYTES`` gone, the
    next look comes after one loop iteration (no sleep); otherwise the pause doubles, from
    1 ms up to 100 ms, and shrinks back to 1 ms whenever the client took something."""
    transport = _protocol_transport(protocol)
    buffered = transport_buffered(transport)
    if buffered <= limit:
        return
    loop = asyncio.get_running_loop()
    progress_at = loop.time()
    delay = 0.0  # first let the reactor write what the socket takes
    while buffered > limit:
        state = server.connections.get(protocol)
        if state is None or state.get("disconnected") or getattr(transport, "disconnected", False):
            return
        await asyncio.sleep(delay)
        now = transport_buffered(transport)
        if buffered - now >= FAST_DRAIN_BYTES:
            delay = 0.0
        elif now < buffered:
            delay = 0.001
        else:
            delay = min(0.1, max(0.001, delay * 2))
        if now < buffered:
            progress_at = loop.time()
        elif loop.time() - progress_at > stall_seconds:
            logger.warning("client took nothing for %.0fs with %d bytes waiting; disconnecting it", stall_seconds, now)
            transport.abortConnection()
            return
        buffered = now


def install() -> None:
    """Patch daphne (idempotent; a no-op when daphne is not installed)."""
    try:
        from daphne.http_protocol import WebRequest
        from daphne.server import Server
    except ImportError:
        return
    if getattr(Server.handle_reply, "_paced", False):
        return
    from django.conf import settings

    limit = settings.SANDBOX_SEND_BUFFER_BYTES
    stall = settings.SANDBOX_SEND_STALL_SECONDS

    WebRequest.gotLength = _got_length
    WebRequest.handleContentChunk = _handle_content_chunk
    WebRequest.requestReceived = _request_received(WebRequest.requestReceived)

    original = Server.handle_reply

    async def handle_reply(self, protocol, message):
        await original(self, protocol, message)
        if message.get("type") in ("http.response.body", "websocket.send"):
            await wait_for_room(self, protocol, limit, stall)

    handle_reply._paced = True
    Server.handle_reply = handle_reply
