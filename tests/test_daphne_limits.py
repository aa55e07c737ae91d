"""Requests daphne/Twisted refuses before Django runs are answered in the API's error shape,
not dropped (sandbox_site/daphne_http_errors.py): a 60 KB query string (414), a 1 MB header
(431), too many headers (400), a multipart body without a boundary (reaches Django)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def daphne_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DEBUG": "0", "SANDBOX_ENV_FILE": "/nonexistent"}
    daphne = Path(sys.executable).parent / "daphne"
    proc = subprocess.Popen(
        [str(daphne), "-b", "127.0.0.1", "-p", str(port), "sandbox_site.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "daphne did not start"
            time.sleep(0.1)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def _exchange(address, request: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(address, timeout=10) as conn:
        try:
            conn.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and stopped reading: the answer is still there
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _error(headers: dict, body: bytes) -> dict:
    assert headers.get("Content-Type", "").startswith("application/json")
    return json.loads(body)["error"]


def test_a_60_kb_query_string_is_a_414_in_the_error_shape(daphne_url):
    status, headers, body = _exchange(
        daphne_url, b"GET /api/v1/vms/?a=" + b"x" * 60000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 414 and _error(headers, body)["code"] == "too_large"


def test_a_1_mb_header_is_a_431_in_the_error_shape(daphne_url):
    request = b"GET /api/v1/vms/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * (1 << 20) + b"\r\n\r\n"
    status, headers, body = _exchange(daphne_url, request)
    assert status == 431 and _error(headers, body)["code"] == "too_large"


def test_too_many_headers_are_a_400_in_the_error_shape(daphne_url):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
    status, headers, body = _exchange(daphne_url, b"GET /api/v1/vms/ HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status == 400 and _error(headers, body)["code"] == "bad_request"


def test_a_multipart_body_without_a_boundary_reaches_django(daphne_url):
    host, port = daphne_url
    response = httpx.post(
        f"http://{host}:{port}/api/v1/vms/", content=b"abc", headers={"Content-Type": "multipart/form-data"}
    )
    assert response.status_code in (400, 401)
    assert response.json()["error"]["code"] in ("parse_error", "not_authenticated")
