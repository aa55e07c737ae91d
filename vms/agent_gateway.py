"""The one way Django code reaches a VM's guest agent.

Web processes, Celery workers, snapshots and websocket consumers all come through here.

Transport: the host daemon (docs/hostd.md) whenever it runs, because it holds the one agent
connection of each VM (QEMU's virtio-serial socket serves a single client). When hostd is
not reachable, single requests (``agent_call``, ``agent_ping``, ``agent_wait``) open a
direct connection (``vms.vmm.agent_client``) over the agent transport of the VM's driver;
streams (file uploads and downloads, exec output for websockets) need hostd.

Errors: every failure is an ``ApplicationError`` with the API's code and HTTP status
(``agent_error``): the agent's codes (guest_agents/PROTOCOL.md), hostd's, and
``agent_unavailable`` / ``agent_timeout`` for a direct connection that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings

from sandbox_site.errors import ApplicationError
from sandbox_site.validation import text_escape
from vms import hypervisor
from vms.hostd.client import TRANSFER_WINDOW, AsyncHostdClient, HostdClient, Subscription
from vms.hostd.errors import HostdError, HostdUnavailable
from vms.hostd.tls import TlsAddress
from vms.hostd_address import vm_hostd_address
from vms.models import VM
from vms.vmm.agent_client import AGENT_SOCKET, AgentConnection, AgentError, AgentRequestError, AgentTimeout
from vms.vmm.agent_client import wait_for_agent as _wait_direct
from vms.vmm.agent_protocol import MAX_DATA
from vms.vmm.base import AgentTransport

logger = logging.getLogger(__name__)
DIRECT_CONNECT_TIMEOUT = 10.0

# Agent/hostd error code -> HTTP status; anything else is 502 (the guest side failed).
_STATUS = {
    "not_found": 404,
    "exists": 409,
    "conflict": 409,
    "stdin_closed": 409,
    "permission_denied": 403,
    "is_a_directory": 400,
    "not_a_directory": 400,
    "not_empty": 409,
    "bad_request": 400,
    "too_large": 413,
    "too_many": 429,
    "exec_limit": 429,
    "no_space": 507,
    "read_only": 409,
    "vm_not_running": 409,
    "agent_unavailable": 503,
    "agent_timeout": 504,
    "timeout": 504,
    "hostd_unavailable": 503,
    "checksum_mismatch": 502,
    "io_error": 422,  # the guest could not read or write that file (EIO...): not our fault
}
# The guest refusing a path is not our permission system's 403.
_RENAMED = {"permission_denied": "guest_permission_denied"}


def agent_error(code: str, message: str) -> ApplicationError:
    """The API error for an agent or hostd error ``code`` (the one mapping). An ``internal``
    error's text is a guest-side exception: logged, never sent to the client."""
    if code == "internal":
        logger.warning("guest agent internal error: %s", message)
        message = "The guest agent failed on this request."
    return ApplicationError(
        text_escape(message or code), code=_RENAMED.get(code, code), status_code=_STATUS.get(code, 502)
    )


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except HostdError as exc:
        raise agent_error(exc.code, exc.message) from exc
    except AgentRequestError as exc:
        details = exc.details if isinstance(exc.details, dict) else {}
        raise agent_error(exc.code, str(details.get("message", ""))) from exc
    except AgentTimeout as exc:
        raise agent_error("agent_timeout", exc.message) from exc
    except AgentError as exc:
        raise agent_error("agent_unavailable", exc.message) from exc


def agent_transport(vm: VM) -> AgentTransport:
    """How the host reaches this VM's agent, from its driver's capabilities."""
    return hypervisor.driver_capabilities(vm.driver).agent_transport


def _hostd(timeout: float, vm: VM) -> HostdClient:
    """A connected client of ``vm``'s host's hostd (this machine's: its Unix socket; another
    host's over mutual TLS, ``vms.hostd_address``); ``HostdUnavailable`` when it does not answer."""
    client = HostdClient(vm_hostd_address(vm), timeout=timeout + 5)
    client.connect()
    return client


def _hostd_or_none(timeout: float, vm: VM) -> HostdClient | None:
    # Only a failed connect falls back to a direct connection: a request that was sent and
    # then lost its answer is never sent again (exec_start twice would run twice). A VM on
    # another host has no agent socket here: its hostd is the only way.
    try:
        return _hostd(timeout, vm)
    except HostdUnavailable:
        if isinstance(vm_hostd_address(vm), TlsAddress):
            raise
        return None


# ----- single requests ------------------------------------------------------------------


class AgentSession(Protocol):
    def __call__(
        self,
        op: str,
        args: dict | None = None,
        data: bytes = b"",
        *,
        timeout: float = 30.0,
        meanwhile: Callable[[], object] | None = None,
    ) -> tuple[dict, bytes]: ...


@contextlib.contextmanager
def agent_session(vm: VM, *, timeout: float = 30.0) -> Iterator[AgentSession]:
    """One connection (to hostd, else directly to the agent) for several agent requests in a
    row, e.g. an exec's start, wait and read: each request on it is ``agent_call``'s, without
    a connection (and hostd's handshake) per request. ``timeout`` bounds the connect.
    ``meanwhile`` (optional) runs once the request is sent and before its answer is awaited,
    so that its own round trips (a database write) overlap the guest's work."""
    with _mapped_errors():
        client = _hostd_or_none(timeout, vm)
        if client is not None:
            with client:

                def via_hostd(
                    op: str,
                    args: dict | None = None,
                    data: bytes = b"",
                    *,
                    timeout: float = 30.0,
                    meanwhile: Callable[[], object] | None = None,
                ) -> tuple[dict, bytes]:
                    with _mapped_errors():
                        req_id = client.agent_send(str(vm.pk), op, args, data, timeout=timeout)
                    if meanwhile is not None:
                        meanwhile()
                    with _mapped_errors():
                        return client.wait(req_id, timeout + 5)

                yield via_hostd
            return
        with AgentConnection.open(
            hypervisor.runtime_dir(vm.pk) / AGENT_SOCKET,
            agent_transport(vm),
            timeout=min(timeout, DIRECT_CONNECT_TIMEOUT),
            client="web-direct",
        ) as conn:

            def direct(
                op: str,
                args: dict | None = None,
                data: bytes = b"",
                *,
                timeout: float = 30.0,
                meanwhile: Callable[[], object] | None = None,
            ) -> tuple[dict, bytes]:
                with _mapped_errors():
                    req_id = conn.send_request(op, args, data, timeout=timeout)
                if meanwhile is not None:
                    meanwhile()
                with _mapped_errors():
                    return conn.read_response(req_id, timeout=timeout)

            yield direct


def agent_call(
    vm: VM, op: str, args: dict | None = None, data: bytes = b"", *, timeout: float = 30.0
) -> tuple[dict, bytes]:
    """One agent request (guest_agents/PROTOCOL.md); returns ``(result, data)``.
    Raises ``ApplicationError`` (``agent_error``)."""
    with agent_session(vm, timeout=timeout) as call:
        return call(op, args, data, timeout=timeout)


def exec_start_capped(vm: VM, args: dict, stdin: bytes = b"", *, max_running: int, timeout: float = 30.0) -> dict:
    """Start an exec (the agent's ``exec_start``) unless ``max_running`` already run in the VM:
    ``exec_limit`` (429) then. hostd counts and starts under one lock per VM, usually without
    asking the guest first (docs/hostd.md); needs hostd (``hostd_unavailable`` without it)."""
    with _mapped_errors(), _hostd(timeout, vm) as client:
        return client.exec_start(str(vm.pk), args, stdin, max_running=max_running, timeout=timeout)


def agent_ping(vm: VM, *, timeout: float = 5.0) -> dict:
    """``ping``: ``{"agent_version", "protocol", "boot_id", "uptime_s", "hostname"}``."""
    return agent_call(vm, "ping", timeout=timeout)[0]


def agent_wait(vm: VM, *, timeout: float) -> dict:
    """Block until the guest agent answers a ping (a VM is ``running`` only then); returns
    the ping result. Through hostd this also registers the VM with it. Raises
    ``ApplicationError`` ``agent_timeout`` after ``timeout`` seconds."""
    with _mapped_errors():
        client = _hostd_or_none(timeout, vm)
        if client is None:
            return _wait_direct(hypervisor.vm_spec(vm), agent_transport(vm), timeout)
        with client:
            try:
                return client.agent_wait(str(vm.pk), timeout=timeout)
            except HostdError as exc:
                raise agent_error(
                    "agent_timeout", f"guest agent did not answer within {timeout:.0f}s ({exc.message})"
                ) from exc


# ----- streamed file transfers (through hostd) ------------------------------------------


def file_upload(
    vm: VM,
    path: str,
    chunks: Iterable[bytes],
    *,
    mode: int | None = None,
    owner: str | None = None,
    overwrite: bool = True,
    max_bytes: int | None = None,
    timeout: float = 120.0,
) -> dict:
    """Stream ``chunks`` into ``path`` in the guest (atomic; sha256 checked), at most
    ``max_bytes`` (else ``too_large``, nothing left in the guest). ``{"path", "size", "sha256"}``."""
    with _mapped_errors(), _hostd(timeout, vm) as client:
        return client.upload(
            str(vm.pk), path, chunks, mode=mode, owner=owner, overwrite=overwrite, max_bytes=max_bytes, timeout=timeout
        )


def file_download_open(vm: VM, path: str, *, timeout: float = 600.0) -> dict:
    """Open ``path`` for reading: ``{"handle", "size", "mode", "sha256", ...}`` (the guest
    hashes the file first, hence the long timeout); read it with ``file_download_chunks``."""
    with _mapped_errors(), _hostd(timeout, vm) as client:
        return client.download_open(str(vm.pk), path, timeout=timeout)


async def file_download_chunks(
    vm_id: str, info: dict, *, address: Path | TlsAddress | None = None, timeout: float = 120.0
) -> AsyncIterator[bytes]:
    """The bytes of a file opened with ``file_download_open`` (``TRANSFER_WINDOW`` reads in
    flight). When they do not hash to what the guest announced (the file changed while it
    was read), raises ``checksum_mismatch`` after the last chunk, so a streamed response is
    cut short and the client notices."""
    channel = await AgentChannel.open(timeout=timeout, address=address)
    handle = info["handle"]
    hasher = hashlib.sha256()
    sent = 0
    pending: list[asyncio.Task[tuple[dict, bytes]]] = []
    eof = False
    try:
        while True:
            while not eof and len(pending) < TRANSFER_WINDOW:
                read = channel.call(vm_id, "file_read", {"handle": handle, "max": MAX_DATA}, timeout=timeout)
                pending.append(asyncio.create_task(read))
            if not pending:
                break
            result, data = await pending.pop(0)
            if result.get("eof"):
                eof = True
                continue
            hasher.update(data)
            sent += len(data)
            if sent > info.get("size", 0):  # more than was hashed at open: it grows, never ends
                raise agent_error("checksum_mismatch", "file changed during download")
            yield data
        final, _ = await channel.call(vm_id, "file_read_close", {"handle": handle}, timeout=timeout)
        digest = hasher.hexdigest()
        if final.get("sha256") != digest or digest != info.get("sha256"):
            raise agent_error("checksum_mismatch", "file changed during download")
    finally:
        for task in pending:
            task.cancel()
        if not eof:
            with contextlib.suppress(ApplicationError):
                await channel.call(vm_id, "file_read_close", {"handle": handle}, timeout=10)
        await channel.close()


# ----- asyncio (websockets, streamed responses) -------------------------------------------


class AgentChannel:
    """One asyncio connection to hostd, for a websocket or a streamed response: agent
    requests and exec output streams, errors mapped as ``agent_call``'s. Needs hostd.
    Use one per websocket (a stream nobody reads stops the connection's reads)."""

    def __init__(self, client: AsyncHostdClient) -> None:
        self._client = client

    @classmethod
    async def open(cls, *, timeout: float = 30.0, address: Path | TlsAddress | None = None) -> AgentChannel:
        """``address``: the VM's host's hostd (``vms.hostd_address.vm_hostd_address``, read
        in a sync part of the caller); default this machine's."""
        client = AsyncHostdClient(address or settings.SANDBOX_HOSTD_SOCKET, timeout=timeout)
        with _mapped_errors():
            await client.connect()
        return cls(client)

    async def call(
        self, vm_id: str, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float = 30.0
    ) -> tuple[dict, bytes]:
        with _mapped_errors():
            return await self._client.agent(vm_id, op, args, data, timeout=timeout)

    async def exec_start(
        self, vm_id: str, args: dict[str, Any], data: bytes = b"", *, max_running: int, timeout: float = 30.0
    ) -> dict:
        """``exec_start_capped`` on this connection."""
        with _mapped_errors():
            return await self._client.exec_start(vm_id, args, data, max_running=max_running, timeout=timeout)

    async def exec_attach(self, vm_id: str, exec_id: str, *, offset: int = 0) -> Subscription:
        """An exec's output from ``offset``: events ``out`` (``stream``, ``offset``; data),
        then ``exit`` (``result``, ``end_offset``) or ``end`` (``error``)."""
        with _mapped_errors():
            return await self._client.exec_attach(vm_id, exec_id, offset=offset)

    async def close(self) -> None:
        await self._client.close()
