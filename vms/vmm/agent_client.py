"""Host-side client of the guest agent, protocol v1 (see guest_agents/PROTOCOL.md). No Django.

Transports, both reached through ``<runtime_dir>/agent.sock``:

- ``AgentTransport.VIRTIO_SERIAL`` (QEMU): the socket is a plain byte stream to the
  guest's virtio-serial port. QEMU serves one client at a time: a second client waits
  until the first disconnects (the host daemon is meant to hold the one connection).
- ``AgentTransport.HYBRID_VSOCK`` (cloud-hypervisor): send ``CONNECT 1024\\n``, read
  ``OK <port>\\n``, then the same byte stream.

Frames: 4-byte big-endian length N (at most ``MAX_FRAME``) + N bytes of UTF-8 JSON object.
Anything else raises ``AgentProtocolError``; every wait is bounded by a timeout.
"""

from __future__ import annotations

import enum
import itertools
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

from .base import VmmError, VmmTimeout, VmSpec

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
AGENT_VSOCK_PORT = 1024
AGENT_SOCKET = "agent.sock"
_MAX_HANDSHAKE_LINE = 128
_MAX_SKIPPED_FRAMES = 64  # stale responses (e.g. to a timed-out earlier request) skipped per call


class AgentTransport(str, enum.Enum):  # noqa: UP042 - same style as base.RuntimeState
    """How ``agent.sock`` reaches the guest agent."""

    VIRTIO_SERIAL = "virtio-serial"  # QEMU virtserialport chardev
    HYBRID_VSOCK = "hybrid-vsock"  # cloud-hypervisor vsock Unix socket


class AgentError(VmmError):
    """The guest agent could not be reached or answered with an error."""


class AgentProtocolError(AgentError):
    """The peer broke the framing or sent something that is not a v1 message."""


class AgentTimeout(AgentError, VmmTimeout):
    """The agent did not answer in time."""


class AgentRequestError(AgentError):
    """The agent answered ``ok: false``; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"agent error {code}: {message}", details={"code": code, "message": message})
        self.code = code


def encode_frame(obj: dict[str, Any]) -> bytes:
    """Serialise ``obj`` into one frame; raises ``AgentProtocolError`` when too large."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_FRAME:
        raise AgentProtocolError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME} byte limit")
    return struct.pack(">I", len(data)) + data


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse one frame payload into a JSON object; raises ``AgentProtocolError``."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AgentProtocolError("agent sent a frame that is not UTF-8 JSON") from exc
    if not isinstance(value, dict):
        raise AgentProtocolError("agent sent a frame that is not a JSON object")
    return value


class AgentConnection:
    """One connection to the agent. Not thread-safe; use one per thread or caller."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._ids = itertools.count(1)

    @classmethod
    def open(
        cls,
        path: Path,
        transport: AgentTransport,
        *,
        timeout: float = 5.0,
        port: int = AGENT_VSOCK_PORT,
    ) -> AgentConnection:
        """Connect to ``path`` (and do the hybrid-vsock handshake when needed)."""
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except TimeoutError as exc:
            sock.close()
            raise AgentTimeout("connecting to the agent socket timed out") from exc
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot connect to agent socket {path}: {exc}") from exc
        conn = cls(sock)
        if transport == AgentTransport.HYBRID_VSOCK:
            try:
                conn._handshake(port, deadline)
            except BaseException:
                conn.close()
                raise
        return conn

    def _handshake(self, port: int, deadline: float) -> None:
        self._send(f"CONNECT {port}\n".encode(), deadline)
        line = bytearray()
        while not line.endswith(b"\n"):
            if len(line) > _MAX_HANDSHAKE_LINE:
                raise AgentProtocolError("hybrid vsock handshake line too long")
            line += self._recv_some(deadline, max_bytes=1)
        if not line.startswith(b"OK "):
            raise AgentProtocolError(f"hybrid vsock handshake refused: {bytes(line[:64])!r}")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_request(self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 5.0) -> int:
        """Send one request frame and return its id (for use with ``read_response``)."""
        req_id = next(self._ids)
        frame = encode_frame({"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": args or {}})
        self._send(frame, time.monotonic() + timeout)
        return req_id

    def read_response(self, req_id: int, *, timeout: float = 5.0) -> dict[str, Any]:
        """Wait for the response to ``req_id`` and return its ``result``.

        Responses to other (earlier, timed-out) ids are skipped. Raises ``AgentTimeout``,
        ``AgentProtocolError`` or ``AgentRequestError``.
        """
        deadline = time.monotonic() + timeout
        for _ in range(_MAX_SKIPPED_FRAMES):
            msg = self.read_frame(deadline)
            if msg.get("v") != PROTOCOL_VERSION:
                raise AgentProtocolError(f"agent speaks protocol version {msg.get('v')!r}, expected {PROTOCOL_VERSION}")
            if msg.get("id") != req_id:
                if msg.get("id") is None and msg.get("ok") is False:
                    raw_err = msg.get("error")
                    err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
                    raise AgentRequestError(str(err.get("code", "bad_request")), str(err.get("message", "")))
                continue
            ok = msg.get("ok")
            if ok is True:
                result = msg.get("result")
                if not isinstance(result, dict):
                    raise AgentProtocolError("response result is not an object")
                return result
            if ok is False:
                err2 = msg.get("error")
                if not isinstance(err2, dict):
                    raise AgentProtocolError("error response without error object")
                raise AgentRequestError(str(err2.get("code", "unknown")), str(err2.get("message", "")))
            raise AgentProtocolError("response has no boolean 'ok'")
        raise AgentProtocolError("too many unexpected responses")

    def request(self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 5.0) -> dict[str, Any]:
        """Send ``op`` and return its result (``send_request`` + ``read_response``)."""
        deadline = time.monotonic() + timeout
        req_id = self.send_request(op, args, timeout=timeout)
        return self.read_response(req_id, timeout=max(0.0, deadline - time.monotonic()))

    def ping(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """``ping``: ``{"agent_version", "boot_id", "uptime_s", "hostname"}``."""
        return self.request("ping", timeout=timeout)

    def health(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """``health``: status, load, memory and root filesystem usage."""
        return self.request("health", timeout=timeout)

    def read_frame(self, deadline: float) -> dict[str, Any]:
        """Read one frame (bounded by ``MAX_FRAME`` and ``deadline``) and decode it."""
        while len(self._buf) < 4:
            self._buf += self._recv_some(deadline)
        (length,) = struct.unpack(">I", bytes(self._buf[:4]))
        if length > MAX_FRAME:
            raise AgentProtocolError(f"agent frame length {length} exceeds the {MAX_FRAME} byte limit")
        while len(self._buf) < 4 + length:
            self._buf += self._recv_some(deadline, max_bytes=4 + length - len(self._buf))
        payload = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        return decode_payload(payload)

    def _recv_some(self, deadline: float, max_bytes: int = 65536) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentTimeout("the agent did not answer in time")
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(min(max_bytes, 65536))
        except TimeoutError as exc:
            raise AgentTimeout("the agent did not answer in time") from exc
        except OSError as exc:
            raise AgentError(f"agent connection lost: {exc}") from exc
        if not chunk:
            raise AgentError("agent connection closed")
        return chunk

    def _send(self, data: bytes, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentTimeout("sending to the agent timed out")
        self._sock.settimeout(remaining)
        try:
            self._sock.sendall(data)
        except TimeoutError as exc:
            raise AgentTimeout("sending to the agent timed out") from exc
        except OSError as exc:
            raise AgentError(f"agent connection lost: {exc}") from exc


def agent_socket_path(spec: VmSpec) -> Path:
    """``<runtime_dir>/agent.sock``."""
    return spec.runtime_dir / AGENT_SOCKET


def agent_ping(spec: VmSpec, transport: AgentTransport, *, timeout: float = 5.0) -> dict[str, Any]:
    """Connect, ping once and disconnect; returns the ping result."""
    deadline = time.monotonic() + timeout
    with AgentConnection.open(agent_socket_path(spec), transport, timeout=timeout) as conn:
        return conn.ping(timeout=max(0.0, deadline - time.monotonic()))


def wait_for_agent(
    spec: VmSpec,
    transport: AgentTransport,
    timeout: float = 60.0,
    *,
    attempt_timeout: float = 2.0,
) -> dict[str, Any]:
    """Poll ``ping`` until the agent answers; returns the ping result.

    Keeps one connection and re-sends ``ping`` every ``attempt_timeout`` seconds
    (late answers to earlier pings are skipped); reconnects when the connection fails,
    e.g. while the VMM or the guest's vsock listener is not up yet. Raises
    ``AgentTimeout`` after ``timeout`` seconds (with the last error in ``details``).
    """
    deadline = time.monotonic() + timeout
    path = agent_socket_path(spec)
    last: Exception | None = None
    conn: AgentConnection | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                if conn is None:
                    conn = AgentConnection.open(path, transport, timeout=min(remaining, attempt_timeout))
                req_id = conn.send_request("ping", timeout=min(remaining, attempt_timeout))
                return conn.read_response(req_id, timeout=min(deadline - time.monotonic(), attempt_timeout))
            except AgentTimeout as exc:
                last = exc
            except AgentRequestError:
                raise
            except AgentError as exc:
                last = exc
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        if conn is not None:
            conn.close()
    raise AgentTimeout(f"guest agent did not answer within {timeout:.0f}s", details={"last_error": repr(last)})
