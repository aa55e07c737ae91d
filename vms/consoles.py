"""Serial consoles: tickets, the single-writer role, and reading the console log.

Output comes from ``serial.log`` in the VM's runtime directory, which the VMM (QEMU's chardev
``logfile=``) or the host daemon appends to whether or not anybody watches: nothing the guest
writes is lost, any number of viewers read it independently from byte offsets, and a slow
viewer only lags behind (each viewer has at most ``SANDBOX_CONSOLE_WINDOW_BYTES`` unacknowledged
bytes in flight) without slowing the VM or other viewers. Input goes to the serial socket.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from accounts.audit import audit_record
from accounts.services import user_has_perm
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted
from vms import hypervisor
from vms.models import VM
from vms.transitions import vm_guest_running

WRITER_TTL_SECONDS = 90  # refreshed by the writer's heartbeats (every 20 s)
INPUT_MAX_BYTES = 4096


def console_log_path(vm_id) -> Path:
    return hypervisor.runtime_dir(vm_id) / "serial.log"


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
    if not console_access(actor, vm).can_view:
        raise NotPermitted("You may not open this VM's console.")
    ticket = secrets.token_urlsafe(32)
    cache.set(_ticket_key(ticket), {"user": actor.pk, "vm": str(vm.pk)}, settings.SANDBOX_CONSOLE_TICKET_SECONDS)
    with transaction.atomic():
        audit_record(actor=actor, action="console.ticket", obj=vm)
    return ticket


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


def _writer_key(vm_id) -> str:
    return f"console-writer:{vm_id}"


def console_writer(vm_id) -> dict | None:
    return cache.get(_writer_key(vm_id))


def console_writer_claim(vm_id, *, session: str, username: str) -> bool:
    """Become the writer if nobody is; True when this session holds the role."""
    me = {"session": session, "user": username}
    if cache.add(_writer_key(vm_id), me, WRITER_TTL_SECONDS):
        return True
    return console_writer(vm_id) == me


def console_writer_refresh(vm_id, *, session: str, username: str) -> bool:
    me = {"session": session, "user": username}
    if console_writer(vm_id) == me:
        cache.set(_writer_key(vm_id), me, WRITER_TTL_SECONDS)
        return True
    return False


def console_takeover(*, vm: VM, actor, session: str) -> dict:
    """Take the writer role from whoever holds it (explicit; audited; shown to both)."""
    if not console_access(actor, vm).can_write:
        raise NotPermitted("You have read-only access to this console.")
    previous = console_writer(vm.pk)
    me = {"session": session, "user": actor.username}
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
    if console_writer(vm_id) == {"session": session, "user": username}:
        cache.delete(_writer_key(vm_id))
        return True
    return False


# --- output and input -----------------------------------------------------------------


def console_log_size(vm_id) -> int:
    try:
        return os.stat(console_log_path(vm_id)).st_size
    except OSError:
        return 0


def console_log_read(vm_id, offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of the console log from absolute byte ``offset`` (blocking I/O:
    call it from a thread in async code)."""
    try:
        with open(console_log_path(vm_id), "rb") as fh:
            fh.seek(offset)
            return fh.read(limit)
    except OSError:
        return b""


def console_input(*, vm: VM, data: bytes) -> None:
    """Send keystrokes to the guest's serial port (blocking, bounded by a timeout)."""
    if len(data) > INPUT_MAX_BYTES:
        raise ApplicationError(f"At most {INPUT_MAX_BYTES} bytes of input at once.")
    if not vm_guest_running(vm):
        raise ConflictError(f"The VM is {vm.state}; its console takes no input.")
    # The host daemon holds the serial socket (QEMU serves one client); without it, write directly.
    if settings.SANDBOX_HOSTD_SOCKET.exists():
        from vms.hostd.client import HostdClient, HostdError, HostdUnavailable

        try:
            with HostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=5.0) as client:
                client.call("console_write", {"vm_id": str(vm.pk)}, data, timeout=5.0)
            return
        except HostdUnavailable:
            pass  # daemon not running: fall through to the socket
        except HostdError as exc:
            raise ConflictError(f"The console is not reachable right now: {exc}") from exc
    path = hypervisor.runtime_dir(vm.pk) / "serial.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(3.0)
        try:
            sock.connect(str(path))
            sock.sendall(data)
        except OSError as exc:
            raise ConflictError("The console is not reachable right now.") from exc
