"""Framing of agent protocol v1: hostile input never crashes either side."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import socket
import struct
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from vms.vmm.agent_client import (
    MAX_FRAME,
    AgentConnection,
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    AgentTimeout,
    encode_frame,
)

ROOT = Path(__file__).resolve().parents[2]


def _load_guest_agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sandbox_agent", ROOT / "guest_agents/linux/sandbox_agent.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = _load_guest_agent()


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


_open_peers: list[socket.socket] = []


def _client_reading(data: bytes, *, close: bool = True) -> AgentConnection:
    """A client whose peer already sent ``data`` (then closed, unless ``close`` is False)."""
    host, guest = socket.socketpair()
    guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    threading.Thread(target=_feed, args=(guest, data, close), daemon=True).start()
    return AgentConnection(host)


def _feed(sock: socket.socket, data: bytes, close: bool) -> None:
    with contextlib.suppress(OSError):  # the client may give up reading hostile input
        sock.sendall(data)
    if close:
        sock.close()
    else:
        _open_peers.append(sock)


def test_it_reads_a_valid_response() -> None:
    conn = _client_reading(_frame(json.dumps({"v": 1, "id": 1, "ok": True, "result": {"x": 1}}).encode()))
    assert conn.read_response(1, timeout=1) == {"x": 1}


def test_it_skips_stale_responses_to_other_ids() -> None:
    data = b"".join(_frame(json.dumps({"v": 1, "id": i, "ok": True, "result": {"i": i}}).encode()) for i in (7, 8, 9))
    assert _client_reading(data).read_response(9, timeout=1) == {"i": 9}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack(">I", MAX_FRAME + 1), AgentProtocolError),
        (struct.pack(">I", 0xFFFFFFFF) + b"x" * 100, AgentProtocolError),
        (_frame(b"\xff\xfe not utf8"), AgentProtocolError),
        (_frame(b"[1, 2, 3]"), AgentProtocolError),
        (_frame(b'{"v": 2, "id": 1, "ok": true, "result": {}}'), AgentProtocolError),
        (_frame(b'{"v": 1, "id": 1, "ok": "yes"}'), AgentProtocolError),
        (_frame(b'{"v": 1, "id": 1, "ok": true, "result": 5}'), AgentProtocolError),
        (_frame(b'{"v": 1, "id": 1, "ok": false, "error": {"code": "unknown_op", "message": "m"}}'), AgentRequestError),
        (_frame(b"[" * 100000 + b"]" * 100000), AgentProtocolError),
        (b"\x00\x00", AgentError),  # truncated length, then EOF
        (struct.pack(">I", 50) + b"{}", AgentError),  # truncated payload, then EOF
    ],
)
def test_it_raises_a_clean_error_on_bad_frames(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        _client_reading(data).read_response(1, timeout=2)


def test_it_times_out_on_a_silent_or_partial_peer() -> None:
    conn = _client_reading(struct.pack(">I", 100) + b"{", close=False)
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        conn.read_response(1, timeout=0.3)
    assert time.monotonic() - started < 2


def test_random_garbage_never_escapes_as_another_exception() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 64))
        elif kind == 1:
            payload = rng.randbytes(rng.randrange(0, 256))
            data = _frame(payload)
        else:
            obj = {
                "v": rng.choice([1, 2, None, "1"]),
                "id": rng.choice([1, 2, None, "1", True]),
                "ok": rng.choice([True, False, None, 1]),
                "result": rng.choice([{}, [], None, "x"]),
                "error": rng.choice([{}, None, {"code": 1}, "boom"]),
            }
            data = _frame(json.dumps(obj).encode())
            data = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data
        with contextlib.suppress(AgentError):
            _client_reading(data).read_response(1, timeout=0.5)


def test_client_refuses_to_send_oversized_frames() -> None:
    with pytest.raises(AgentProtocolError):
        encode_frame({"blob": "x" * MAX_FRAME})


def test_guest_handles_hostile_payloads_without_raising() -> None:
    rng = random.Random(99)
    payloads = [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"v":1}',
        b'{"v":1,"id":"x","op":"ping"}',
        b'{"v":1,"id":true,"op":"ping"}',
        b'{"v":9,"id":1,"op":"ping"}',
        b'{"v":1,"id":1,"op":"rm"}',
        b'{"v":1,"id":1,"op":"ping","args":[]}',
        b"\xff" * 10,
        b"[" * 100000,
    ]
    payloads += [rng.randbytes(rng.randrange(200)) for _ in range(300)]
    for payload in payloads:
        resp = agent.handle_payload(payload)
        assert resp["v"] == 1 and resp["ok"] in (True, False)
        json.dumps(resp)
    ok = agent.handle_payload(b'{"v":1,"id":5,"op":"ping","args":{}}')
    assert ok["ok"] and ok["id"] == 5 and set(ok["result"]) == {"agent_version", "boot_id", "uptime_s", "hostname"}
    bad = agent.handle_payload(b'{"v":1,"id":6,"op":"nope","args":{}}')
    assert bad == {"v": 1, "id": 6, "ok": False, "error": {"code": "unknown_op", "message": "unknown op 'nope'"}}


def test_guest_split_frames_rejects_oversized_length() -> None:
    buf = bytearray(struct.pack(">I", MAX_FRAME + 1) + b"x")
    with pytest.raises(agent.FrameError):
        agent.split_frames(buf)
    buf = bytearray(_frame(b"{}") + _frame(b"[]") + b"\x00\x00")
    assert agent.split_frames(buf) == [b"{}", b"[]"] and buf == bytearray(b"\x00\x00")


def test_guest_stream_server_answers_then_closes_on_oversized_frame() -> None:
    host, guest = socket.socketpair()
    server = threading.Thread(target=agent._serve_stream, args=(guest,), daemon=True)
    server.start()
    conn = AgentConnection(host)
    assert conn.ping(timeout=5)["agent_version"] == agent.AGENT_VERSION
    assert conn.health(timeout=5)["status"] == "ok"
    host.sendall(struct.pack(">I", MAX_FRAME + 1))
    server.join(timeout=5)
    assert not server.is_alive()
    host.settimeout(2)
    assert host.recv(10) == b""
    conn.close()
