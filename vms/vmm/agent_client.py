"""Direct, blocking client of the guest agent, protocol v2 (see guest_agents/PROTOCOL.md). No Django.

On a host running ``manage.py hostd`` the daemon holds the one connection to each agent
and everything else goes through it (``vms.hostd.client``). This client is for what runs
without it: boot-time waits when hostd is down, driver tests, debugging.

Transports, both reached through ``<runtime_dir>/agent.sock``:

- ``AgentTransport.VIRTIO_SERIAL`` (QEMU): the socket is a plain byte stream to the
  guest's virtio-serial port. QEMU serves one client at a time: a second client waits
  until the first disconnects.
- ``AgentTransport.HYBRID_VSOCK`` (cloud-hypervisor): send ``CONNECT 1024\\n``, read
  ``OK <port>\\n``, then the same byte stream.

Every connection starts with ``hello`` (see ``sync_session``). Every wait is bounded.
"""

from __future__ import annotations

import itertools
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from .agent_protocol import (
    MAX_DATA,
    MAX_FRAME,
    PREFIX,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    check_response,
    encode_frame,
)
from .base import AgentTransport, VmmError, VmmTimeout, VmSpec

__all__ = [
    "AGENT_SOCKET",
    "AGENT_VSOCK_PORT",
    "MAX_DATA",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "AgentConnection",
    "AgentError",
    "AgentProtocolError",
    "AgentRequestError",
    "AgentTimeout",
    "AgentTransport",
    "agent_ping",
    "agent_socket_path",
    "encode_frame",
    "wait_for_agent",
]

AGENT_VSOCK_PORT = 1024
AGENT_SOCKET = "agent.sock"
HELLO_RESEND_SECONDS = 1.0
_MAX_HANDSHAKE_LINE = 128
_MAX_UNEXPECTED_FRAMES = 10000  # events/stale responses skipped while waiting for one answer
ZERO_FLUSH_BYTES = MAX_FRAME + PREFIX.size


class AgentError(VmmError):
    """The guest agent could not be reached or answered with an error."""


class AgentProtocolError(AgentError):
    """The peer broke the framing or sent something that is not a v2 message."""


class AgentTimeout(AgentError, VmmTimeout):
    """The agent did not answer in time."""


class AgentRequestError(AgentError):
    """The agent answered ``ok: false``; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"agent error {code}: {message}", details={"code": code, "message": message})
        self.code = code


def hello_args(nonce: str, client: str) -> dict[str, Any]:
    return {"nonce": nonce, "protocol": PROTOCOL_VERSION, "client": client}


class AgentConnection:
    """One synced session with the agent. Not thread-safe; one per thread or caller."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self._pending: list[Frame] = []
        self.hello: dict[str, Any] = {}

    @classmethod
    def open(
        cls,
        path: Path,
        transport: AgentTransport,
        *,
        timeout: float = 5.0,
        port: int = AGENT_VSOCK_PORT,
        client: str = "agent_client",
    ) -> AgentConnection:
        """Connect to ``path``, do the hybrid-vsock handshake when needed, then ``hello``."""
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
        try:
            if transport == AgentTransport.HYBRID_VSOCK:
                conn._handshake(port, deadline)
            conn.sync_session(deadline, client=client)
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

    def sync_session(self, deadline: float, *, client: str = "agent_client") -> dict[str, Any]:
        """Start a session: send ``hello`` with a fresh nonce (again every second, with the
        same nonce, preceded by zero bytes that complete any frame a dead earlier host left
        half-sent) and skip everything until the answer carrying that nonce."""
        nonce = secrets.token_hex(16)
        hello_id = 0
        frame = encode_frame({"id": hello_id, "op": "hello", "args": hello_args(nonce, client)})
        self._decoder = FrameDecoder(scanning=True)
        zeros_left = ZERO_FLUSH_BYTES
        next_send = 0.0
        sent = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise AgentTimeout("the guest agent did not answer hello in time")
            if now >= next_send:
                if sent and zeros_left:
                    zeros_left -= self._send_nonblocking(bytes(min(zeros_left, 1 << 16)))
                self._send(frame, deadline)
                sent += 1
                next_send = now + HELLO_RESEND_SECONDS
            try:
                chunk = self._recv_some(min(deadline, next_send))
            except AgentTimeout:
                continue
            try:
                frames = self._decoder.feed(chunk)
            except FrameError as exc:
                raise AgentProtocolError(str(exc)) from exc
            for i, got in enumerate(frames):
                h = got.header
                result = h.get("result")
                answered = h.get("id") == hello_id and h.get("ok") is True
                if answered and isinstance(result, dict) and result.get("nonce") == nonce:
                    if result.get("protocol") != PROTOCOL_VERSION:
                        raise AgentProtocolError(f"agent speaks protocol {result.get('protocol')!r}")
                    self._decoder.scanning = False
                    self._decoder.skipped = 0
                    # Frames after the answer belong to this session (e.g. a duplicate hello answer).
                    self._pending = frames[i + 1 :]
                    self.hello = result
                    return result

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_request(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float = 5.0
    ) -> int:
        """Send one request frame and return its id (for use with ``read_response``)."""
        req_id = next(self._ids)
        try:
            frame = encode_frame({"id": req_id, "op": op, "args": args or {}}, data)
        except FrameError as exc:
            raise AgentProtocolError(str(exc)) from exc
        self._send(frame, time.monotonic() + timeout)
        return req_id

    def read_response(self, req_id: int, *, timeout: float = 5.0) -> tuple[dict[str, Any], bytes]:
        """Wait for the response to ``req_id``: ``(result, data)``. Other frames (events,
        late answers) are skipped. Raises ``AgentTimeout``, ``AgentProtocolError`` or
        ``AgentRequestError``."""
        deadline = time.monotonic() + timeout
        for _ in range(_MAX_UNEXPECTED_FRAMES):
            frame = self.read_frame(deadline)
            h = frame.header
            if "ev" in h or h.get("id") != req_id:
                if h.get("id") is None and h.get("ok") is False:
                    err = h["error"]
                    raise AgentRequestError(str(err.get("code")), str(err.get("message", "")))
                continue
            if h["ok"] is True:
                result = h.get("result", {})
                return result, frame.data
            err = h["error"]
            raise AgentRequestError(str(err.get("code")), str(err.get("message", "")))
        raise AgentProtocolError("too many unexpected frames")

    def request(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send ``op`` and return its result (any data in the answer is dropped)."""
        return self.request_data(op, args, data, timeout=timeout)[0]

    def request_data(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float = 5.0
    ) -> tuple[dict[str, Any], bytes]:
        """Send ``op`` and return ``(result, data)``."""
        deadline = time.monotonic() + timeout
        req_id = self.send_request(op, args, data, timeout=timeout)
        return self.read_response(req_id, timeout=max(0.0, deadline - time.monotonic()))

    def ping(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """``ping``: ``{"agent_version", "protocol", "boot_id", "uptime_s", "hostname"}``."""
        return self.request("ping", timeout=timeout)

    def health(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """``health``: status, load, memory, root filesystem, execs."""
        return self.request("health", timeout=timeout)

    def read_frame(self, deadline: float) -> Frame:
        """Read one validated frame (bounded by ``MAX_FRAME`` and ``deadline``)."""
        while not self._pending:
            chunk = self._recv_some(deadline)
            try:
                self._pending = self._decoder.feed(chunk)
            except FrameError as exc:
                raise AgentProtocolError(str(exc)) from exc
        frame = self._pending.pop(0)
        try:
            check_response(frame.header)
        except FrameError as exc:
            raise AgentProtocolError(str(exc)) from exc
        return frame

    def _recv_some(self, deadline: float, max_bytes: int = 262144) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentTimeout("the agent did not answer in time")
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(max_bytes)
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

    def _send_nonblocking(self, data: bytes) -> int:
        self._sock.setblocking(False)
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
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
    """Wait until the agent answers ``ping``; returns the ping result.

    A connection waits (re-sending ``hello``) until the agent answers or ``timeout``;
    it is re-opened when it fails, e.g. while the VMM or the guest's vsock listener is
    not up yet. Raises ``AgentTimeout`` after ``timeout`` seconds (last error in ``details``).
    """
    deadline = time.monotonic() + timeout
    path = agent_socket_path(spec)
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with AgentConnection.open(path, transport, timeout=remaining) as conn:
                return conn.ping(timeout=max(0.1, min(attempt_timeout * 5, deadline - time.monotonic())))
        except AgentRequestError:
            raise
        except AgentError as exc:
            last = exc
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise AgentTimeout(f"guest agent did not answer within {timeout:.0f}s", details={"last_error": repr(last)})
