"""Serial consoles: tickets, the single-writer role, and the connection to hostd's console.

The host daemon (docs/hostd.md) holds each VM's serial port and its history (``serial.log`` on
the VM's host, the newest part in a ring): output reaches viewers through its console stream
(absolute byte offsets, replay then live, each viewer an independent cursor), input goes
through its ``console_write``. Web processes never write to the serial socket or follow the
log themselves (the log download, too, asks the VM's host's hostd). Who
may type (one writer at a time) is decided here, not by hostd.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from accounts.audit import audit_record
from accounts.permissions import require_perm
from accounts.services import user_has_perm
from sandbox_site.errors import ApplicationError, ConflictError
from vms import hypervisor
from vms.hostd.client import AsyncHostdClient, HostdClient, HostdError, HostdRequestError, Subscription
from vms.hostd.tls import TlsAddress
from vms.hostd_address import vm_hostd_address
from vms.models import VM

INPUT_MAX_BYTES = 4096


def console_log_path(vm_id) -> Path:
    """The VM's whole console history on disk (on the VM's host; the log download asks that
    host's hostd for it, ``console_log_download``)."""
    return hypervisor.runtime_dir(vm_id) / "serial.log"


LOG_DOWNLOAD_TIMEOUT = 30.0  # per piece read from hostd


def console_log_download(vm: VM) -> tuple[Iterator[bytes], int]:
    """``(pieces, start)``: the VM's console log as its host's hostd reads it from that host's
    disk (this machine's hostd over its socket, another host's over mutual TLS), from the
    oldest byte still kept (hostd caps the log by punching a hole over the oldest bytes) up
    to the size it had when the download began, and that first byte's file position.
    Raises ``FileNotFoundError`` when the VM has no log, ``ApplicationError`` (503
    ``hostd_unavailable``...) when its host's hostd cannot be asked. The first piece is read
    here, so errors come before any byte is sent."""
    from vms.agent_gateway import agent_error

    client = HostdClient(vm_hostd_address(vm), timeout=LOG_DOWNLOAD_TIMEOUT)
    try:
        client.connect()
        head, first = client.call("console_log_read", {"vm_id": str(vm.pk)}, timeout=LOG_DOWNLOAD_TIMEOUT)
    except HostdError as exc:
        client.close()
        if exc.code == "not_found":
            raise FileNotFoundError(exc.message) from None
        raise agent_error(exc.code, exc.message) from exc
    start, end = int(head["offset"]), int(head["size"])

    def pieces() -> Iterator[bytes]:
        try:
            position, data = start, first
            while data:
                data = data[: max(0, end - position)]  # nothing written after the download began
                yield data
                position += len(data)
                if position >= end:
                    return
                head, data = client.call(
                    "console_log_read", {"vm_id": str(vm.pk), "offset": position}, timeout=LOG_DOWNLOAD_TIMEOUT
                )
                # The cap punched the bytes at our position meanwhile: the log skips ahead.
                position = max(position, int(head["offset"]))
        finally:
            client.close()

    return pieces(), start


def console_log_bytes(vm_id) -> int:
    """Disk the VM's console log occupies (holes excluded; capped by hostd)."""
    try:
        return console_log_path(vm_id).stat().st_blocks * 512
    except OSError:
        return 0


def console_group(vm_id) -> str:
    return f"vms.console.{vm_id}"


@dataclass(frozen=True)
class ConsoleAccess:
    can_view: bool
    can_write: bool


def console_access(user, vm: VM) -> ConsoleAccess:
    """View rights give a read-only console; the console right allows typing."""
    can_write = user_has_perm(user, "vms.console_vm", vm)
    return ConsoleAccess(can_view=can_write or user_has_perm(user, "vms.view_vm", vm), can_write=can_write)


# --- tickets (non-browser clients) -----------------------------------------------------


def _ticket_key(ticket: str) -> str:
    return "console-ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


def console_ticket_mint(*, vm: VM, actor) -> str:
    """A single-use ticket, valid SANDBOX_CONSOLE_TICKET_SECONDS, for ``/ws/vms/{id}/console/?ticket=``."""
    require_perm(actor, "vms.view_vm", vm, action="console.ticket", allowed=console_access(actor, vm).can_view)
    ticket = secrets.token_urlsafe(32)
    cache.set(_ticket_key(ticket), {"user": actor.pk, "vm": str(vm.pk)}, settings.SANDBOX_CONSOLE_TICKET_SECONDS)
    with transaction.atomic():
        audit_record(actor=actor, action="console.ticket", obj=vm)
    return ticket


def console_ticket_user_id(ticket: str):
    """The id of the user a still-valid ticket was minted for, or None; the ticket is not used
    up (the websocket cap counts a ticket-only console for its user before the consumer runs)."""
    if not ticket or len(ticket) > 100:
        return None
    data = cache.get(_ticket_key(ticket))
    return data["user"] if data else None


def console_ticket_consume(ticket: str, vm_id: str):
    """The user the ticket was minted for, or None. A ticket works once, for its VM only."""
    if not ticket or len(ticket) > 100:
        return None
    key = _ticket_key(ticket)
    data = cache.get(key)
    if data is None or not cache.delete(key) or data["vm"] != vm_id:
        return None
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(pk=data["user"], is_active=True).first()


# --- the writer role ------------------------------------------------------------------
#
# One writer per VM, recorded in the cache (Redis: shared by every web process) under a short
# TTL that only the writer's live connection refreshes (VmConsoleConsumer, every
# WRITER_REFRESH_SECONDS). A connection releases the role when it ends, also when its consumer
# failed; if even that did not happen (the process died), the claim lapses within
# WRITER_TTL_SECONDS. A claim made by a connection of this process that is no longer open is
# free at once.

WRITER_TTL_SECONDS = 15
WRITER_REFRESH_SECONDS = 5.0

_PROCESS_TAG = secrets.token_hex(4)
_live_sessions: set[str] = set()  # console connections open in this process


def _process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TAG}"


def console_session_open(session: str) -> None:
    """Record that a console connection of this process is open (its channel name)."""
    _live_sessions.add(session)


def console_session_close(session: str) -> None:
    """Record that the connection ended: a claim it still holds is free from now on."""
    _live_sessions.discard(session)


def _writer_key(vm_id) -> str:
    return f"console-writer:{vm_id}"


def _writer_record(session: str, username: str) -> dict:
    return {"session": session, "user": username, "process": _process_id()}


def _held_by(holder: dict | None, session: str, username: str) -> bool:
    return holder is not None and holder.get("session") == session and holder.get("user") == username


def _session_gone(holder: dict) -> bool:
    """True when the holder's connection was opened in this process and has ended (a claim
    from another process is only known to be gone when it lapses)."""
    return holder.get("process") == _process_id() and holder.get("session") not in _live_sessions


def console_writer(vm_id) -> dict | None:
    """The writer's ``{"session", "user", "process"}``, or None."""
    return cache.get(_writer_key(vm_id))


def console_writer_claim(vm_id, *, session: str, username: str) -> bool:
    """Become the writer if nobody is (or the holder's connection is gone); True when this
    session holds the role."""
    key = _writer_key(vm_id)
    me = _writer_record(session, username)
    if cache.add(key, me, WRITER_TTL_SECONDS):
        return True
    holder = console_writer(vm_id)
    if _held_by(holder, session, username):
        return True
    if holder is not None and _session_gone(holder):
        if console_writer(vm_id) == holder:
            cache.delete(key)
        holder = None
    return holder is None and cache.add(key, me, WRITER_TTL_SECONDS)


def console_writer_refresh(vm_id, *, session: str, username: str) -> bool:
    """Keep this session's claim alive (its connection is); claims it again if it lapsed and
    nobody took it. False when somebody else holds the role."""
    holder = console_writer(vm_id)
    if _held_by(holder, session, username):
        cache.touch(_writer_key(vm_id), WRITER_TTL_SECONDS)
        return True
    return holder is None and cache.add(_writer_key(vm_id), _writer_record(session, username), WRITER_TTL_SECONDS)


def console_takeover(*, vm: VM, actor, session: str) -> dict:
    """Take the writer role from whoever holds it (explicit; audited; shown to both)."""
    require_perm(
        actor, "vms.console_vm", vm, action="console.takeover", message="You have read-only access to this console."
    )
    previous = console_writer(vm.pk)
    me = _writer_record(session, actor.username)
    cache.set(_writer_key(vm.pk), me, WRITER_TTL_SECONDS)
    with transaction.atomic():
        audit_record(
            actor=actor,
            action="console.takeover",
            obj=vm,
            before={"writer": previous and previous["user"]},
            after={"writer": actor.username},
        )
    return me


def console_writer_release(vm_id, *, session: str, username: str) -> bool:
    """Give the role up if this session holds it; True when it did."""
    holder = console_writer(vm_id)
    if _held_by(holder, session, username):
        cache.delete(_writer_key(vm_id))
        return True
    return False


# --- through hostd ---------------------------------------------------------------------

INPUT_TIMEOUT_SECONDS = 5.0  # one console_write, on the event loop
ATTACH_TIMEOUT_SECONDS = 10.0
# Console events (hostd sends at most 256 KiB each, vms.hostd.console.STREAM_CHUNK) a viewer's
# stream may hold before hostd waits: 512 KiB, with the client's read buffers about 1 MiB per
# viewer that stops acking.
STREAM_QUEUE_FRAMES = 2

_UNAVAILABLE_MESSAGES = {
    "hostd_unavailable": "The console service (hostd) is not running on the VM's host.",
    "vm_not_running": "The VM is not running.",
    "vm_stopped": "The VM stopped.",
    "console_unavailable": "The VM's serial port is not connected right now.",
    "timeout": "The console service did not answer in time.",
}


class ConsoleUnavailable(ConflictError):
    """The console cannot be served right now; ``code`` says why (``hostd_unavailable``,
    ``vm_not_running``, ``vm_stopped``, ``console_unavailable``, ``timeout``, or another code
    of hostd's). A viewer retries later."""

    code = "console_unavailable"


def _unavailable(exc: Exception) -> ConsoleUnavailable:
    code = getattr(exc, "code", None) if isinstance(exc, HostdError) else "timeout"
    code = code or "console_unavailable"
    message = _UNAVAILABLE_MESSAGES.get(code) or f"The console is not reachable right now: {exc}"
    return ConsoleUnavailable(message, code=code)


@dataclass(frozen=True)
class ConsoleStart:
    offset: int  # absolute offset of the first byte the stream delivers
    end_offset: int  # the console's end when the stream started
    restarted_from: int | None  # the requested offset lay beyond the console's end (log replaced)


class HostdConsole:
    """One viewer's connections to hostd for one VM's console (asyncio; use one per websocket).

    Output is a ``console_attach`` stream on its own connection. Its queue
    (STREAM_QUEUE_FRAMES events) is the only buffer: a viewer that stops taking output stops
    that connection's reads, and hostd's stream for it waits (nobody else is affected).
    Input goes over a second connection, opened on the first keystroke, so that typing
    never waits behind output the viewer has not acknowledged yet."""

    def __init__(self, vm_id, *, socket_path: Path | str | TlsAddress | None = None) -> None:
        self.vm_id = str(vm_id)
        # This machine's hostd, or the VM's host's over mutual TLS (``vms.hostd_address``).
        self.socket_path = socket_path or settings.SANDBOX_HOSTD_SOCKET
        self._output: AsyncHostdClient | None = None
        self._subscription: Subscription | None = None
        self._input: AsyncHostdClient | None = None

    async def attach(self, offset: int | None, *, scrollback: int) -> ConsoleStart:
        """Start the stream at absolute ``offset``, or with the last ``scrollback`` bytes when
        None. An offset beyond the console's end (its log was replaced) starts like a new
        viewer and says so in ``restarted_from``. Raises ``ConsoleUnavailable``."""
        back = -scrollback if scrollback > 0 else None
        restarted_from = None
        try:
            self._output = await AsyncHostdClient(self.socket_path, timeout=ATTACH_TIMEOUT_SECONDS).connect()
            sub = await self._output.console_attach(
                self.vm_id, offset=back if offset is None else offset, queue_frames=STREAM_QUEUE_FRAMES
            )
            if offset is not None and offset > sub.result.get("end_offset", offset):
                await sub.close()
                restarted_from = offset
                sub = await self._output.console_attach(self.vm_id, offset=back, queue_frames=STREAM_QUEUE_FRAMES)
        except HostdError as exc:
            await self.close()
            raise _unavailable(exc) from exc
        self._subscription = sub
        return ConsoleStart(
            offset=int(sub.result["offset"]),
            end_offset=int(sub.result.get("end_offset", sub.result["offset"])),
            restarted_from=restarted_from,
        )

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """``(offset, data)`` in order, replay then live; an offset beyond the previous
        chunk's end means the bytes in between no longer exist. Ends by raising
        ``ConsoleUnavailable``: ``vm_stopped`` (the VM stopped) or ``hostd_unavailable``."""
        assert self._subscription is not None, "attach first"
        async for frame in self._subscription:
            header = frame.header
            if header.get("ev") == "end":
                raise ConsoleUnavailable(_UNAVAILABLE_MESSAGES["vm_stopped"], code="vm_stopped")
            offset = header.get("offset")
            if header.get("ev") == "console" and isinstance(offset, int) and frame.data:
                yield offset, frame.data
        raise ConsoleUnavailable(_UNAVAILABLE_MESSAGES["hostd_unavailable"], code="hostd_unavailable")

    async def write(self, data: bytes) -> None:
        """Send keystrokes to the guest's serial port, waiting at most INPUT_TIMEOUT_SECONDS.
        The caller decides who may type. Raises ``ConsoleUnavailable``."""
        if len(data) > INPUT_MAX_BYTES:
            raise ApplicationError(f"At most {INPUT_MAX_BYTES} bytes of input at once.")
        try:
            if self._input is None:
                self._input = await AsyncHostdClient(self.socket_path, timeout=INPUT_TIMEOUT_SECONDS).connect()
            await asyncio.wait_for(self._input.console_write(self.vm_id, data), INPUT_TIMEOUT_SECONDS)
        except (HostdError, TimeoutError) as exc:
            if not isinstance(exc, HostdRequestError):  # the connection may be unusable: reopen next time
                client, self._input = self._input, None
                if client is not None:
                    await client.close()
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        """Close both connections (hostd ends their streams)."""
        self._subscription = None
        for client in (self._output, self._input):
            if client is not None:
                await client.close()
        self._output = self._input = None
