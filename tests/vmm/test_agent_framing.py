"""Framing of agent protocol v2: hostile input never crashes either side; the guest side
resynchronises after garbage, the host side rejects it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from types import ModuleType

import pytest

from vms.vmm.agent_client import AgentConnection, AgentError, AgentProtocolError, AgentRequestError, AgentTimeout
from vms.vmm.agent_protocol import MAGIC, MAX_FRAME, FrameDecoder, FrameError, encode_frame

ROOT = Path(__file__).resolve().parents[2]


def _load_guest_agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sandbox_agent", ROOT / "guest_agents/linux/sandbox_agent.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = _load_guest_agent()


def _raw(head: bytes, data: bytes = b"", *, crc: int | None = None) -> bytes:
    lengths = struct.pack(">II", len(head), len(data))
    value = zlib.crc32(data, zlib.crc32(head, zlib.crc32(lengths))) if crc is None else crc
    return MAGIC + lengths + struct.pack(">I", value) + head + data


def test_host_and_guest_encoders_agree() -> None:
    header = {"id": 3, "ok": True, "result": {"x": [1, "é"]}}
    assert encode_frame(header, b"\x00\xff") == agent.encode_frame(header, b"\x00\xff")
    frames = FrameDecoder().feed(encode_frame(header, b"data"))
    assert frames[0].header == header and frames[0].data == b"data"


def test_the_decoder_handles_any_split() -> None:
    stream = b"".join(encode_frame({"id": i, "ok": True, "result": {}}, bytes([i]) * i) for i in range(1, 40))
    rng = random.Random(7)
    for _ in range(50):
        decoder = FrameDecoder()
        frames = []
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 300)
            frames += decoder.feed(stream[pos : pos + step])
            pos += step
        assert [f.header["id"] for f in frames] == list(range(1, 40))
        assert all(f.data == bytes([f.header["id"]]) * f.header["id"] for f in frames)


@pytest.mark.parametrize(
    "data",
    [
        b"XXXX" + b"\x00" * 20,
        MAGIC + struct.pack(">III", MAX_FRAME, 1, 0),
        MAGIC + struct.pack(">III", 1, 0, 0) + b"{",
        _raw(b'{"id":1}', crc=12345),
        _raw(b"{nope"),
        _raw(b"[1,2]"),
        _raw(b"\xff\xfe"),
    ],
)
def test_a_strict_decoder_raises_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(data)


def test_a_scanning_decoder_skips_garbage_and_torn_frames() -> None:
    good = encode_frame({"id": 0, "ok": True, "result": {"nonce": "n"}})
    torn = encode_frame({"id": 9, "ok": True, "result": {}}, b"x" * 1000)[:500]
    decoder = FrameDecoder(scanning=True)
    assert decoder.feed(b"garbage" + torn + MAGIC[:2] + good) == []  # inside the torn frame's length
    frames = decoder.feed(bytes(1100))  # completes it: CRC fails, the scan finds the good frame
    assert [f.header["id"] for f in frames] == [0]
    with pytest.raises(FrameError):
        FrameDecoder(scanning=True, max_skip=100).feed(b"z" * 1000)


class _CountingZlib:
    """Stands in for the decoder's ``zlib``: counts CRC bytes, fails once over ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def crc32(self, data: bytes | memoryview, value: int = 0) -> int:
        self.count += len(data)
        if self.count > self.limit:
            raise AssertionError(f"{self.count} bytes of CRC: not linear in the input")
        return zlib.crc32(data, value)


def _fake_header(length: int = MAX_FRAME - 2) -> bytes:
    return MAGIC + struct.pack(">II", 2, length) + bytes(4)


@pytest.mark.parametrize("chunk", [16, 4096, 256 << 10])
def test_resynchronising_costs_crc_work_linear_in_the_bytes_received(monkeypatch, chunk: int) -> None:
    # Overlapping fake headers, one every 16 bytes, each claiming a ~1 MiB frame: a decoder
    # that CRCs every complete candidate runs ~1 MiB of CRC per byte skipped (64 GiB here).
    stream = _fake_header() * (2 * MAX_FRAME // 16) + bytes(MAX_FRAME)
    good = encode_frame({"id": 0, "ok": True, "result": {"nonce": "n"}})
    stream += good
    from vms.vmm import agent_protocol

    counter = _CountingZlib(limit=2 * len(stream) + 2 * MAX_FRAME)
    monkeypatch.setattr(agent_protocol, "zlib", counter)
    decoder = FrameDecoder(scanning=True, max_skip=len(stream))
    frames = []
    started = time.thread_time()
    for i in range(0, len(stream), chunk):
        frames += decoder.feed(stream[i : i + chunk])
    assert [f.header["id"] for f in frames] == [0]  # the good frame after the flood is found
    assert decoder.crc_bytes == counter.count <= counter.limit
    assert decoder.received == len(stream)
    assert time.thread_time() - started < 20  # generous: the point is the CRC count above


def test_a_strict_decoder_crcs_each_byte_once(monkeypatch) -> None:
    from vms.vmm import agent_protocol

    frames = b"".join(encode_frame({"id": i, "ok": True, "result": {}}, b"d" * 5000) for i in range(200))
    counter = _CountingZlib(limit=len(frames))
    monkeypatch.setattr(agent_protocol, "zlib", counter)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(frames), 777):
        out += decoder.feed(frames[i : i + 777])
    assert len(out) == 200 and decoder.crc_bytes == counter.count


def test_random_garbage_never_escapes_as_another_exception() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 64))
        elif kind == 1:
            data = _raw(rng.randbytes(rng.randrange(0, 128)), rng.randbytes(rng.randrange(0, 64)))
        elif kind == 2:
            data = bytearray(encode_frame({"id": 1, "ok": True, "result": {}}, b"abc"))
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(data)
        else:
            data = MAGIC + rng.randbytes(rng.randrange(0, 40))
        for scanning in (False, True):
            with contextlib.suppress(FrameError):
                FrameDecoder(scanning=scanning).feed(data)
            reader = agent.FrameReader()
            reader.feed(data)  # the guest never raises


def test_the_guest_reader_resyncs_on_a_new_session_after_a_torn_frame() -> None:
    reader = agent.FrameReader()
    torn = agent.encode_frame({"id": 1, "op": "file_write", "args": {}}, b"y" * 200000)[:100000]
    hello = agent.encode_frame({"id": 0, "op": "hello", "args": {"nonce": "n"}})
    assert reader.feed(torn + hello) == []  # swallowed by the torn frame's declared length
    frames = reader.feed(bytes(200016) + hello)  # the host's zero flush completes it
    # Both hellos come out: the one inside the torn frame's length is found by the rescan.
    assert [json.loads(h)["op"] for h, _ in frames] == ["hello", "hello"]


def _serve(sock: socket.socket) -> ModuleType:
    a = agent.Agent(cgroup_root=None, reap_interval=0.02)
    a.add_stream(sock)
    threading.Thread(target=a.run, daemon=True).start()
    return a


def test_client_and_guest_agent_talk_over_a_socket() -> None:
    host, guest = socket.socketpair()
    _serve(guest)
    conn = AgentConnection(host)
    hello = conn.sync_session(time.monotonic() + 5)
    assert hello["protocol"] == 2 and hello["agent_version"] == agent.AGENT_VERSION
    assert conn.ping()["agent_version"] == agent.AGENT_VERSION
    assert conn.health()["status"] == "ok"
    with pytest.raises(AgentRequestError) as err:
        conn.request("nope")
    assert err.value.code == "unknown_op"
    conn.close()


def test_the_guest_answers_bad_headers_with_errors_and_keeps_serving() -> None:
    host, guest = socket.socketpair()
    _serve(guest)
    host.sendall(_raw(b"{nope") + _raw(b"[1]") + _raw(b'{"id":"x","op":"ping"}') + b"junk junk")
    conn = AgentConnection(host)
    conn.sync_session(time.monotonic() + 5)
    assert conn.ping()["protocol"] == 2


def test_the_client_raises_clean_errors_on_a_hostile_peer() -> None:
    for payload in (
        _raw(b'{"id":1,"ok":"yes"}'),
        _raw(b'{"id":1,"ok":true,"result":5}'),
        _raw(b'{"id":1}', crc=1),
        MAGIC + struct.pack(">III", MAX_FRAME, 10, 0),
    ):
        host, guest = socket.socketpair()
        conn = AgentConnection(host)
        guest.sendall(payload)
        guest.close()
        with pytest.raises(AgentError):
            conn.read_response(1, timeout=2)


def test_the_client_times_out_on_a_silent_peer() -> None:
    host, guest = socket.socketpair()
    conn = AgentConnection(host)
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        conn.sync_session(time.monotonic() + 0.5)
    assert time.monotonic() - started < 3
    guest.close()


def test_client_refuses_to_send_oversized_frames() -> None:
    host, _guest = socket.socketpair()
    with pytest.raises(AgentProtocolError):
        AgentConnection(host).send_request("file_write", {}, b"x" * (MAX_FRAME + 1))
