"""Requests daphne (Twisted) refuses before the application sees them get a real response.

Twisted (twisted/web/http.py, 26.x) answers such requests badly:
- a request line or one header line over ``HTTPChannel.MAX_LENGTH`` (16 KiB; a 60 KB query
  string, a 1 MB header): the connection is dropped without a byte (``lineLengthExceeded``);
- headers over ``totalHeadersSize``/``maxHeaders``: ``HTTP/1.1 400`` with no body, then the
  socket is closed at once, so a client still sending gets a reset instead of the answer;
- a multipart POST it cannot parse (no boundary): the same bare 400, before Django runs.

``install()`` makes the first two a 414 / 431 / 400 with a JSON body in the API's error shape
(``Connection: close``; the socket is half-closed, the rest of the request read and dropped, so
the client reads the answer), and leaves multipart parsing to Django, whose errors are the
API's. Installed from sandbox_site/asgi.py; a no-op when daphne is not the server.
"""

from __future__ import annotations

import json

# How long a refused connection may keep sending (its bytes are dropped) before it is cut.
DRAIN_SECONDS = 5.0


def _response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "details": None}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _refuse(channel, status: int, reason: str, code: str, message: str) -> None:
    transport = channel.transport
    if transport is None or getattr(channel, "_sandbox_refused", False):
        return
    channel._sandbox_refused = True
    # The rest of the request is read and dropped (lines already split from this packet too).
    channel.dataReceived = channel.lineReceived = channel.rawDataReceived = lambda data: None
    transport.write(_response(status, reason, code, message))
    try:
        transport.loseWriteConnection()  # FIN after the answer: the client reads it, then closes
    except AttributeError:
        transport.loseConnection()
        return
    from twisted.internet import reactor

    reactor.callLater(DRAIN_SECONDS, transport.abortConnection)


def install() -> None:
    try:
        from daphne.http_protocol import WebRequest
        from twisted.web.http import HTTPChannel
    except ImportError:
        return
    if getattr(HTTPChannel, "_sandbox_limits", False):
        return

    def line_length_exceeded(self, line):
        if getattr(self, "_HTTPChannel__first_line", 0):
            _refuse(self, 414, "URI Too Long", "too_large", "The request line (URL) is too long.")
        else:
            _refuse(self, 431, "Request Header Fields Too Large", "too_large", "A request header is too large.")

    def bad_request(self):
        _refuse(self, 400, "Bad Request", "bad_request", "The request is malformed or its headers are too large.")

    HTTPChannel.lineLengthExceeded = line_length_exceeded
    HTTPChannel._respondToBadRequestAndDisconnect = bad_request
    HTTPChannel._sandbox_limits = True

    original_init = WebRequest.__init__

    def web_request_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._parsePOSTFormSubmission = False  # Django parses forms (and answers in the API's shape)

    WebRequest.__init__ = web_request_init
