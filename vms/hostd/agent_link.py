"""The host daemon's one connection to one VM's guest agent (asyncio, no Django).

``AgentLink`` connects (hybrid-vsock handshake for cloud-hypervisor), starts a session
with ``hello``, and then multiplexes: requests get fresh ids and are matched to
responses; events are routed to subscriptions by ``sub`` id. When the connection drops
or the guest sends anything malformed (a ``FrameError``: logged, never raised further),
pending requests fail, every subscription is told (``on_reset``) so it can re-attach
from its own offset, and the link reconnects with a bounded backoff.

A guest cannot make its link expensive for hostd: decoding costs CPU linear in the bytes
received (see agent_protocol), and each link has a budget (``LinkBudget``) per window of
time: CPU spent decoding and dispatching what it sent, and bytes nobody asked for
(garbage skipped while resynchronising, responses to no pending request, events for no
subscription). A link over budget is disconnected, counted (``abuse_disconnects`` in
``status()``, i.e. hostd's ``vm_status``), logged, and reconnected only after
``LinkBudget.penalty_seconds``: a flooding guest costs hostd a bounded share of a core.

Each connection records the pid of the VMM it reached (``vmm_pid``: the peer of the Unix
socket, i.e. the process listening on it), so a VMM replaced under the same socket path
(a snapshot restore) resets only a connection that still belongs to the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vms.vmm.agent_client import (
    AGENT_VSOCK_PORT,
    HELLO_RESEND_SECONDS,
    ZERO_FLUSH_BYTES,
    AgentError,
    AgentRequestError,
    AgentTimeout,
    AgentTransport,
    hello_args,
)
from vms.vmm.agent_protocol import PROTOCOL_VERSION, Frame, FrameDecoder, FrameError, check_response, encode_frame

logger = logging.getLogger("vms.hostd.agent")

CONNECT_TIMEOUT = 5.0
HELLO_TIMEOUT = 20.0  # a session that is not synced by then is dropped and re-opened
MAX_PENDING = 1024  # requests in flight per VM
WRITE_BUFFER_LIMIT = 4 << 20  # queued bytes towards the guest before writers wait
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0


def peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The pid of the process at the other end of a Unix socket connection (for a client:
    the process that listens, i.e. the VMM), or ``None`` when the platform cannot tell."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


class AgentUnavailable(AgentError):
    """The link to the agent is not up (the VM is booting, paused or gone)."""


class LinkAbuse(AgentError):
    """The guest went over its link's budget (CPU or unsolicited bytes)."""


@dataclass(frozen=True)
class LinkBudget:
    """What one agent link may cost hostd per ``window_seconds``. An honest agent only
    answers requests and sends credit-limited stream events: it never comes near."""

    window_seconds: float = 5.0
    cpu_seconds: float = 2.5  # half a core, averaged over the window
    unsolicited_bytes: int = 8 << 20  # below the 16 MiB a resync may skip: floods meet the penalty
    penalty_seconds: float = 30.0  # before reconnecting a link cut off for abuse


class _BudgetMeter:
    def __init__(self, budget: LinkBudget) -> None:
        self.budget = budget
        self.started = time.monotonic()
        self.cpu = 0.0
        self.junk = 0

    def charge(self, cpu: float, junk: int) -> None:
        now = time.monotonic()
        if now - self.started >= self.budget.window_seconds:
            self.started, self.cpu, self.junk = now, 0.0, 0
        self.cpu += cpu
        self.junk += junk
        window = self.budget.window_seconds
        if self.cpu > self.budget.cpu_seconds:
            raise LinkAbuse(f"the guest cost {self.cpu:.2f}s of CPU within {window:.0f}s")
        if self.junk > self.budget.unsolicited_bytes:
            raise LinkAbuse(f"the guest sent {self.junk} unsolicited bytes within {window:.0f}s")


class Subscriber(Protocol):
    def on_event(self, frame: Frame) -> None: ...

    def on_reset(self) -> None: ...


class AgentLink:
    """One persistent, self-healing session with a guest agent."""

    def __init__(
        self,
        vm_id: str,
        path: Path,
        transport: AgentTransport,
        *,
        name: str = "hostd",
        budget: LinkBudget | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.budget = budget or LinkBudget()
        self.abuse_disconnects = 0
        self.malformed_disconnects = 0
        self.last_abuse = ""
        self.bytes_received = 0
        self.crc_bytes = 0
        self.path = path
        self.transport = transport
        self.name = name
        self.ready = asyncio.Event()
        self.hello: dict[str, Any] = {}
        self.last_error = ""
        self.sessions = 0
        self._ids = itertools.count(1)
        self._subs_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._subs: dict[int, Subscriber] = {}
        self._writer: asyncio.StreamWriter | None = None
        self.vmm_pid: int | None = None  # the VMM the current connection reached
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ----- lifetime ----------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"agent-link-{self.vm_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._teardown(AgentUnavailable("the VM is no longer tracked"))

    def kick(self) -> None:
        """Drop the current connection (e.g. the VMM was restarted); the link reconnects."""
        if self._writer is not None:
            self._writer.close()

    def kick_unless(self, pid: int | None) -> bool:
        """Drop the current connection unless it reached the VMM ``pid`` (a link that
        already reconnected to a new VMM is kept). True when a connection was dropped."""
        if self._writer is None or (pid is not None and self.vmm_pid == pid):
            return False
        self.kick()
        return True

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            before = self.sessions
            synced = False
            penalty = 0.0
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except LinkAbuse as exc:
                self.abuse_disconnects += 1
                self.last_abuse = self.last_error = f"link over budget: {exc}"
                penalty = self.budget.penalty_seconds
                logger.warning(
                    "vm %s: closing agent connection (%s); reconnecting in %.0fs",
                    self.vm_id,
                    self.last_error,
                    penalty,
                )
            except FrameError as exc:
                self.malformed_disconnects += 1
                self.last_error = f"malformed data from the guest: {exc}"
                logger.error("vm %s: closing agent connection: %s", self.vm_id, self.last_error)
            except (OSError, EOFError, TimeoutError, AgentError) as exc:
                synced = self.sessions > before
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.log(logging.INFO if synced else logging.DEBUG, "vm %s: agent link down: %s", self.vm_id, exc)
            except Exception as exc:  # never let one VM's link take hostd down
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("vm %s: agent link failed", self.vm_id)
            finally:
                self._teardown(AgentUnavailable(f"connection to the agent was lost ({self.last_error})"))
            if synced or self.sessions > before:
                backoff = BACKOFF_MIN
            await asyncio.sleep(max(backoff, penalty))
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _teardown(self, error: AgentError) -> None:
        self.ready.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.vmm_pid = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            try:
                sub.on_reset()
            except Exception:
                logger.exception("vm %s: subscriber reset failed", self.vm_id)

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.path), limit=1 << 16), CONNECT_TIMEOUT
        )
        self._writer = writer
        self.vmm_pid = peer_pid(writer)
        if self.transport == AgentTransport.HYBRID_VSOCK:
            writer.write(f"CONNECT {AGENT_VSOCK_PORT}\n".encode())
            line = await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT)
            if not line.startswith(b"OK "):
                raise AgentError(f"hybrid vsock handshake refused: {line[:64]!r}")
        decoder = FrameDecoder(scanning=True)
        meter = _BudgetMeter(self.budget)
        frames = await self._sync(reader, writer, decoder, meter)
        decoder.scanning = False
        decoder.skipped = 0
        self.sessions += 1
        self.last_error = ""
        self.ready.set()
        logger.info("vm %s: agent session %d up (agent %s)", self.vm_id, self.sessions, self.hello.get("agent_version"))
        for frame in frames:
            self._dispatch(frame)
        while True:
            data = await reader.read(256 << 10)
            if not data:
                raise EOFError("agent connection closed")
            started, crc_before = time.thread_time(), decoder.crc_bytes
            junk = 0
            try:
                for frame in decoder.feed(data):
                    if not self._dispatch(frame):
                        junk += frame.size
            finally:
                self.bytes_received += len(data)
                self.crc_bytes += decoder.crc_bytes - crc_before
            meter.charge(time.thread_time() - started, junk)

    async def _sync(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder, meter: _BudgetMeter
    ) -> list[Frame]:
        """Send hello (same nonce, re-sent every second, zero bytes before the re-sends to
        complete a frame an earlier host left half-written) until its answer arrives."""
        nonce = secrets.token_hex(16)
        hello = encode_frame({"id": 0, "op": "hello", "args": hello_args(nonce, self.name)})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HELLO_TIMEOUT
        sent = 0
        while True:
            if loop.time() >= deadline:
                raise TimeoutError("the guest agent did not answer hello")
            if sent == 1:
                writer.write(bytes(ZERO_FLUSH_BYTES))
            writer.write(hello)
            sent += 1
            resend_at = loop.time() + HELLO_RESEND_SECONDS
            while loop.time() < resend_at:
                try:
                    data = await asyncio.wait_for(reader.read(256 << 10), resend_at - loop.time())
                except TimeoutError:
                    break
                if not data:
                    raise EOFError("agent connection closed during hello")
                started, skipped, crc_before = time.thread_time(), decoder.skipped, decoder.crc_bytes
                try:
                    frames = decoder.feed(data)
                finally:
                    self.bytes_received += len(data)
                    self.crc_bytes += decoder.crc_bytes - crc_before
                # Everything before the hello answer is unsolicited (stale frames, garbage).
                meter.charge(time.thread_time() - started, decoder.skipped - skipped + sum(f.size for f in frames))
                for i, frame in enumerate(frames):
                    h = frame.header
                    result = h.get("result")
                    answered = h.get("id") == 0 and h.get("ok") is True
                    if answered and isinstance(result, dict) and result.get("nonce") == nonce:
                        if result.get("protocol") != PROTOCOL_VERSION:
                            raise AgentError(f"agent speaks protocol {result.get('protocol')!r}")
                        self.hello = result
                        return frames[i + 1 :]

    def _dispatch(self, frame: Frame) -> bool:
        """Route one frame; False when nobody asked for it (counted against the budget)."""
        check_response(frame.header)  # FrameError -> the session ends, logged by _run
        h = frame.header
        if "ev" in h:
            sub = self._subs.get(h["sub"])
            if sub is None:
                return False
            try:
                sub.on_event(frame)
            except Exception:
                logger.exception("vm %s: subscriber failed", self.vm_id)
            return True
        req_id = h.get("id")
        if req_id is None:
            logger.debug("vm %s: agent rejected a frame: %s", self.vm_id, h.get("error"))
            return False
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return False
        fut.set_result(frame)
        return True

    # ----- requests ----------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> None:
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError as exc:
            raise AgentUnavailable(f"the guest agent is not connected ({self.last_error or 'connecting'})") from exc

    async def request(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float = 10.0
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request and await ``(result, data)``; raises ``AgentRequestError`` for
        an agent error, ``AgentTimeout``, or ``AgentUnavailable`` when the link is down."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.wait_ready(timeout)
        if len(self._pending) >= MAX_PENDING:
            raise AgentError("too many requests in flight to this agent")
        req_id = next(self._ids)
        fut: asyncio.Future[Frame] = loop.create_future()
        self._pending[req_id] = fut
        try:
            await self._write(encode_frame({"id": req_id, "op": op, "args": args or {}}, data), deadline)
            try:
                frame = await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                raise AgentTimeout(f"the guest agent did not answer {op} in time") from exc
        finally:
            self._pending.pop(req_id, None)
        h = frame.header
        if h["ok"] is True:
            return h.get("result", {}), frame.data
        err = h["error"]
        raise AgentRequestError(str(err.get("code")), str(err.get("message", "")))

    async def notify(self, op: str, args: dict[str, Any], *, timeout: float = 5.0) -> None:
        """Send a request without id (no answer), e.g. ``exec_credit``."""
        if not self.ready.is_set():
            return
        loop = asyncio.get_running_loop()
        await self._write(encode_frame({"op": op, "args": args}), loop.time() + timeout)

    async def _write(self, frame: bytes, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        async with self._write_lock:
            writer = self._writer
            if writer is None or not self.ready.is_set():
                raise AgentUnavailable("the guest agent is not connected")
            if writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                try:
                    await asyncio.wait_for(writer.drain(), max(0.0, deadline - loop.time()))
                except TimeoutError as exc:
                    raise AgentTimeout("the guest agent is not reading") from exc
            writer.write(frame)

    # ----- subscriptions -------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> int:
        sub = next(self._subs_ids)
        self._subs[sub] = subscriber
        return sub

    def unsubscribe(self, sub: int) -> None:
        self._subs.pop(sub, None)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.ready.is_set(),
            "vmm_pid": self.vmm_pid,
            "sessions": self.sessions,
            "agent_version": self.hello.get("agent_version"),
            "boot_id": self.hello.get("boot_id"),
            "last_error": self.last_error,
            "pending": len(self._pending),
            "bytes_received": self.bytes_received,
            "crc_bytes": self.crc_bytes,
            "abuse_disconnects": self.abuse_disconnects,
            "malformed_disconnects": self.malformed_disconnects,
            "last_abuse": self.last_abuse,
        }
