"""Against a running daphne (a subprocess per test module): request bodies are refused as
they arrive, before anything is written, and responses and websockets are paced to a client
that reads 1 KiB/s, so the web process's memory stays bounded whatever is offered."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DAPHNE = Path(sys.executable).with_name("daphne")
LIMIT = 1 << 20  # SANDBOX_FILE_UPLOAD_MAX_BYTES in these daphnes
IMAGE_LIMIT = 2 << 20  # SANDBOX_IMAGE_MAX_UPLOAD_BYTES


class Daphne:
    def __init__(self, app: str, **env: str) -> None:
        self.spool = Path(tempfile.mkdtemp(prefix="daphne-spool-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {
            **os.environ,
            "TMPDIR": str(self.spool),
            "SANDBOX_ENV_FILE": "/nonexistent",
            "SANDBOX_FILE_UPLOAD_MAX_BYTES": str(LIMIT),
            "SANDBOX_IMAGE_MAX_UPLOAD_BYTES": str(IMAGE_LIMIT),
            "SANDBOX_REQUEST_MAX_BYTES": str(256 << 10),
            "SANDBOX_ANONYMOUS_REQUEST_MAX_BYTES": str(16 << 10),
            "SANDBOX_SEND_BUFFER_BYTES": str(256 << 10),
            **env,
        }
        self.proc = subprocess.Popen(
            [str(DAPHNE), "-b", "127.0.0.1", "-p", str(self.port), app],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self._listening, timeout=60)

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "daphne exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def spool_files(self) -> list[str]:
        """Files under the spool directory: listed, or open (unlinked temporary files)."""
        found = [str(p) for p in self.spool.iterdir()]
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(str(self.spool)):
                        found.append(target)
        return found

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        subprocess.run(["rm", "-rf", str(self.spool)], check=False)


@pytest.fixture(scope="module")
def web() -> Iterator[Daphne]:
    daphne = Daphne("sandbox_site.asgi:application")
    yield daphne
    daphne.stop()


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _assert_413(response: bytes, limit: int) -> None:
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "too_large" and body["error"]["details"]["limit"] == limit


def test_an_oversized_content_length_is_refused_before_the_body_is_sent(web: Daphne) -> None:
    with web.connect() as sock:
        sock.sendall(
            b"PUT /api/v1/vms/0d7f1f9e-0000-4000-8000-000000000000/files/?path=/x HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nAuthorization: Bearer whatever\r\n"
            b"Content-Length: %d\r\n\r\n" % (200 << 20)
        )
        sock.sendall(b"y" * (64 << 10))  # of 200 MiB announced
        response = _read_response(sock, 10)
    _assert_413(response, LIMIT)
    assert web.spool_files() == []


def test_a_chunked_body_is_cut_off_as_it_passes_the_limit(web: Daphne) -> None:
    sent = 0
    response = b""
    with web.connect() as sock:
        sock.sendall(
            b"PUT /api/v1/vms/0d7f1f9e-0000-4000-8000-000000000000/files/?path=/x HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nCookie: sessionid=abc\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"z" * (64 << 10)
        sock.settimeout(0.2)
        while sent < 64 * LIMIT:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            sent += len(chunk)
            assert web.spool_files() == []  # nothing is written while the body arrives
            with contextlib.suppress(TimeoutError):
                response = sock.recv(65536)
                if response:
                    break
        response += _read_response(sock, 5)
    _assert_413(response, LIMIT)
    assert LIMIT < sent < 4 * LIMIT  # answered as soon as the body passed the limit
    assert web.spool_files() == []


def test_anonymous_requests_get_a_small_limit(web: Daphne) -> None:
    body = b"x" * (32 << 10)
    with web.connect() as sock:
        sock.sendall(b"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        _assert_413(_read_response(sock, 10), 16 << 10)
    with web.connect() as sock:  # with credentials the same body reaches the application
        sock.sendall(
            b"POST /api/v1/vms/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer nope\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        assert not _read_response(sock, 30).startswith(b"HTTP/1.1 413")


def test_image_uploads_get_the_image_limit_not_the_request_limit(web: Daphne) -> None:
    head = (
        b"POST /api/v1/images/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer nope\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
    )
    body = b"x" * (512 << 10)  # over SANDBOX_REQUEST_MAX_BYTES (256 KiB), under the image limit
    with web.connect() as sock:
        sock.sendall(head % len(body) + body)
        response = _read_response(sock, 30)
        assert response.startswith(b"HTTP/1.1 401"), response[:200]  # reached the application
    with web.connect() as sock:
        sock.sendall(head % (IMAGE_LIMIT + 1))
        _assert_413(_read_response(sock, 10), IMAGE_LIMIT)


# ----- slow clients ---------------------------------------------------------------------------

OFFERED = 200 << 20
RSS_BOUND = 64 << 20


@pytest.fixture(scope="module")
def flood() -> Iterator[Daphne]:
    daphne = Daphne("tests.web.flood_app:application", FLOOD_BYTES=str(OFFERED))
    yield daphne
    daphne.stop()


def _read_slowly(sock: socket.socket, seconds: float) -> int:
    """Read 1 KiB per second (in 256-byte steps)."""
    got = 0
    sock.settimeout(5)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got += len(sock.recv(256))
        time.sleep(0.25)
    return got


def _ws_handshake(sock: socket.socket) -> None:
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head


@pytest.mark.parametrize("kind", ["download", "websocket"])
def test_a_client_reading_1_kib_per_second_keeps_the_web_process_small(flood: Daphne, kind: str) -> None:
    baseline = flood.rss()
    with flood.connect(rcvbuf=4096) as sock:
        if kind == "download":
            sock.sendall(b"GET /download HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        else:
            _ws_handshake(sock)
        got = _read_slowly(sock, 6.0)
        grown = flood.rss() - baseline
    print(json.dumps({"kind": kind, "offered": OFFERED, "client_read": got, "rss_growth": grown}))
    assert 0 < got < 64 << 10
    assert grown < RSS_BOUND, f"daphne grew by {grown >> 20} MiB while {OFFERED >> 20} MiB were offered"
