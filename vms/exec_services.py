"""Exec and files in a VM: the business rules (exec permission, VM state, audit, limits).

The transport is the host daemon (``manage.py hostd``), which holds the one connection to
each guest agent; simple requests fall back to a direct agent connection when hostd is
not running, streamed transfers need hostd. Views and consumers call only these.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.db import transaction

from accounts.audit import audit_record
from accounts.models import AuditResult
from accounts.services import user_has_perm
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted
from vms.hostd.client import HostdClient, HostdError, HostdRequestError, HostdTimeout, HostdUnavailable
from vms.models import VM
from vms.transitions import vm_guest_running

logger = logging.getLogger(__name__)

EXEC_PERM = "vms.exec_vm"
MAX_COMMAND_AUDIT = 4000
MAX_STDIN_BYTES = 1 << 20  # stdin given inline with POST .../exec/ or .../stdin/

# Agent/hostd error codes -> (HTTP status, public code).
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
    "no_space": 507,
    "read_only": 409,
    "vm_not_running": 409,
    "agent_unavailable": 503,
    "agent_timeout": 504,
    "timeout": 504,
    "hostd_unavailable": 503,
    "checksum_mismatch": 502,
}
_RENAMED = {"permission_denied": "guest_permission_denied"}  # not our permission system's 403


def agent_error(exc: HostdError) -> ApplicationError:
    """One place mapping transport/agent errors to the API's error shape."""
    code = exc.code
    status = _STATUS.get(code, 502)
    return ApplicationError(exc.message or code, code=_RENAMED.get(code, code), status_code=status)


def hostd_client(*, timeout: float = 30.0) -> HostdClient:
    return HostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=timeout)


def agent_request(
    vm_id: str, op: str, args: dict | None = None, data: bytes = b"", *, timeout: float = 30.0, driver: str = "qemu"
) -> tuple[dict, bytes]:
    """One agent request through hostd, or over a direct connection when hostd is down.
    Raises ``HostdError`` subclasses (codes as in PROTOCOL.md / docs/hostd.md)."""
    try:
        with hostd_client(timeout=timeout) as client:
            return client.agent(vm_id, op, args, data, timeout=timeout)
    except HostdUnavailable:
        pass
    from vms.hypervisor import agent_transport, runtime_dir
    from vms.vmm.agent_client import AgentConnection, AgentError, AgentRequestError, AgentTimeout

    try:
        with AgentConnection.open(
            runtime_dir(vm_id) / "agent.sock", agent_transport(driver), timeout=min(timeout, 10), client="web-direct"
        ) as conn:
            return conn.request_data(op, args, data, timeout=timeout)
    except AgentRequestError as exc:
        raise HostdRequestError(str(exc.details.get("message", "")), exc.code) from exc  # type: ignore[union-attr]
    except AgentTimeout as exc:
        raise HostdTimeout(exc.message) from exc
    except AgentError as exc:
        raise HostdRequestError(exc.message, "agent_unavailable") from exc


def _require_exec(actor, vm: VM, action: str) -> None:
    if not user_has_perm(actor, EXEC_PERM, vm):
        with transaction.atomic():
            audit_record(
                actor=actor, action=f"vm.{action}", obj=vm, result=AuditResult.DENIED, message=f"missing {EXEC_PERM}"
            )
        raise NotPermitted("You do not have the 'exec' permission on this VM.")


def _require_running(vm: VM) -> None:
    vm.refresh_from_db(fields=["state", "driver"])
    if not vm_guest_running(vm):
        raise ConflictError(f"The VM is {vm.state}; commands and files need it running.", details={"state": vm.state})


def _call(vm: VM, op: str, args: dict | None = None, data: bytes = b"", *, timeout: float = 30.0) -> tuple[dict, bytes]:
    try:
        return agent_request(str(vm.pk), op, args, data, timeout=timeout, driver=vm.driver or "qemu")
    except HostdError as exc:
        raise agent_error(exc) from exc


def _audit(actor, action: str, vm: VM, after: dict, *, result: str = AuditResult.OK, message: str = "") -> None:
    with transaction.atomic():
        audit_record(actor=actor, action=action, obj=vm, after=after, result=result, message=message[:2000])


# ----- exec ----------------------------------------------------------------------------


def _command_args(command: Any) -> tuple[dict, str]:
    if isinstance(command, str) and command.strip():
        return {"shell": command}, command
    if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        import shlex

        return {"argv": command}, shlex.join(command)
    raise ApplicationError(
        "command must be a non-empty string (run by /bin/sh -c) or a list of strings.", details={"command": "invalid"}
    )


def vm_exec_start(
    *,
    vm: VM,
    actor,
    command: Any,
    env: dict | None = None,
    cwd: str = "",
    user: str = "",
    timeout: float | None = None,
    stdin: bytes | None = None,
    stdin_open: bool = False,
    wait: bool = True,
    tag: str = "",
    pty: dict | None = None,
    buffer_bytes: int | None = None,
) -> dict:
    """Start a command in the VM. With ``wait`` block until it ends (at most
    SANDBOX_EXEC_WAIT_MAX_SECONDS) and return its output and result; without, return the
    exec id at once. Audited with the command line (never the output)."""
    _require_exec(actor, vm, "exec")
    _require_running(vm)
    args, command_line = _command_args(command)
    if stdin is not None and len(stdin) > MAX_STDIN_BYTES:
        raise ApplicationError(
            f"stdin is limited to {MAX_STDIN_BYTES} bytes here; stream more with .../stdin/.",
            code="too_large",
            status_code=413,
        )
    args.update(
        {
            "env": env or {},
            "cwd": cwd or "",
            "user": user or "root",
            "timeout": timeout,
            "tag": tag or "",
            "buffer_bytes": buffer_bytes or settings.SANDBOX_EXEC_BUFFER_BYTES,
            "stdin": "pipe" if (stdin or stdin_open) else "null",
            "stdin_eof": bool(stdin) and not stdin_open,
        }
    )
    if pty:
        args["pty"] = {
            "rows": int(pty.get("rows", 24)),
            "cols": int(pty.get("cols", 80)),
            "term": str(pty.get("term", "")),
        }
    audit_after = {
        "command": command_line[:MAX_COMMAND_AUDIT],
        "cwd": cwd,
        "user": user or "root",
        "timeout": timeout,
        "tag": tag,
        "wait": wait,
        "pty": bool(pty),
        "stdin_bytes": len(stdin or b""),
    }
    try:
        started, _ = _call(vm, "exec_start", args, stdin or b"")
    except ApplicationError as exc:
        _audit(actor, "vm.exec", vm, audit_after, result=AuditResult.FAILED, message=exc.message)
        raise
    _audit(actor, "vm.exec", vm, {**audit_after, "exec_id": started["exec_id"]})
    if not wait:
        return {"exec_id": started["exec_id"], "pid": started["pid"], "tag": started["tag"], "running": True}
    limit = settings.SANDBOX_EXEC_WAIT_MAX_SECONDS
    wait_for = min(limit, timeout + 5) if timeout else limit
    summary, _ = _call(vm, "exec_wait", {"exec_id": started["exec_id"], "timeout": wait_for}, timeout=wait_for + 10)
    return _collect(vm, summary)


def _collect(vm: VM, summary: dict) -> dict:
    """Whole output of a finished (or still running) exec, split into stdout and stderr."""
    out = {"stdout": bytearray(), "stderr": bytearray(), "pty": bytearray()}
    offset = 0
    base = summary.get("base_offset", 0)
    while True:
        page, data = _call(vm, "exec_read", {"exec_id": summary["exec_id"], "offset": offset})
        pos = 0
        for stream, length in page["chunks"]:
            out.setdefault(stream, bytearray()).extend(data[pos : pos + length])
            pos += length
        if page["next_offset"] <= offset or page["next_offset"] >= page["end_offset"]:
            summary = page
            break
        offset = page["next_offset"]
    result = summary.get("result") or {}
    return {
        "exec_id": summary["exec_id"],
        "running": summary["running"],
        "exit_code": result.get("exit_code"),
        "signal": result.get("signal"),
        "timed_out": result.get("timed_out", False),
        "stdout": (out["stdout"] or out["pty"]).decode("utf-8", "replace"),
        "stderr": out["stderr"].decode("utf-8", "replace"),
        "duration_ms": result.get("duration_ms"),
        "cpu_ms": result.get("cpu_ms"),
        "max_rss_kib": result.get("max_rss_kib"),
        "truncated": base > 0 or summary.get("base_offset", 0) > 0,
        "end_offset": summary.get("end_offset"),
    }


def vm_exec_list(*, vm: VM, actor, tag: str | None = None) -> list[dict]:
    _require_exec(actor, vm, "exec_list")
    _require_running(vm)
    result, _ = _call(vm, "exec_list", {"tag": tag} if tag else {})
    return result["execs"]


def vm_exec_output(
    *, vm: VM, actor, exec_id: str, offset: int = 0, limit: int = 512 << 10, encoding: str = "text"
) -> dict:
    """Output from byte ``offset`` (stdout and stderr share one offset space). If the
    bytes at ``offset`` were dropped (ring overflow), ``offset`` in the answer is larger
    than asked: that is the gap."""
    _require_exec(actor, vm, "exec_output")
    _require_running(vm)
    page, data = _call(vm, "exec_read", {"exec_id": exec_id, "offset": max(0, offset), "max": max(1, limit)})
    chunks = []
    pos = 0
    at = page["offset"]
    for stream, length in page["chunks"]:
        blob = data[pos : pos + length]
        text = base64.b64encode(blob).decode() if encoding == "base64" else blob.decode("utf-8", "replace")
        chunks.append({"stream": stream, "offset": at, "length": length, "data": text})
        pos += length
        at += length
    page.pop("chunks", None)
    return {**page, "requested_offset": offset, "gap": page["offset"] > offset, "encoding": encoding, "chunks": chunks}


def vm_exec_stdin(*, vm: VM, actor, exec_id: str, data: bytes, eof: bool = False) -> dict:
    _require_exec(actor, vm, "exec_stdin")
    _require_running(vm)
    if len(data) > MAX_STDIN_BYTES:
        raise ApplicationError(f"at most {MAX_STDIN_BYTES} bytes per request", code="too_large", status_code=413)
    return _call(vm, "exec_stdin", {"exec_id": exec_id, "eof": eof}, data, timeout=60)[0]


def vm_exec_signal(*, vm: VM, actor, exec_id: str, signal: str | int = "TERM") -> dict:
    _require_exec(actor, vm, "exec_signal")
    _require_running(vm)
    result, _ = _call(vm, "exec_signal", {"exec_id": exec_id, "signal": signal})
    _audit(actor, "vm.exec_signal", vm, {"exec_id": exec_id, "signal": signal})
    return result


def vm_exec_resize(*, vm: VM, actor, exec_id: str, rows: int, cols: int) -> dict:
    _require_exec(actor, vm, "exec_resize")
    return _call(vm, "exec_resize", {"exec_id": exec_id, "rows": rows, "cols": cols})[0]


# ----- files -----------------------------------------------------------------------------


def _path(path: str | None) -> str:
    if not path or not path.startswith("/") or "\x00" in path or len(path) > 4096:
        raise ApplicationError("path must be an absolute path in the guest.", details={"path": "invalid"})
    return path


def vm_file_stat(*, vm: VM, actor, path: str) -> dict:
    _require_exec(actor, vm, "file_stat")
    _require_running(vm)
    return _call(vm, "file_stat", {"path": _path(path)})[0]


def vm_file_list(*, vm: VM, actor, path: str, limit: int = 10000) -> dict:
    _require_exec(actor, vm, "file_list")
    _require_running(vm)
    return _call(vm, "file_list", {"path": _path(path), "limit": limit}, timeout=60)[0]


def vm_file_mkdir(*, vm: VM, actor, path: str, mode: int = 0o755, parents: bool = True) -> dict:
    _require_exec(actor, vm, "file_mkdir")
    _require_running(vm)
    result = _call(vm, "file_mkdir", {"path": _path(path), "mode": mode, "parents": parents})[0]
    _audit(actor, "vm.file_mkdir", vm, {"path": path, "mode": oct(mode)})
    return result


def vm_file_remove(*, vm: VM, actor, path: str, recursive: bool = False) -> dict:
    _require_exec(actor, vm, "file_remove")
    _require_running(vm)
    result = _call(vm, "file_remove", {"path": _path(path), "recursive": recursive}, timeout=120)[0]
    _audit(actor, "vm.file_remove", vm, {"path": path, "recursive": recursive})
    return result


def vm_file_upload(
    *,
    vm: VM,
    actor,
    path: str,
    chunks: Iterable[bytes],
    size: int | None = None,
    mode: int | None = None,
    owner: str | None = None,
    overwrite: bool = True,
) -> dict:
    """Stream ``chunks`` into ``path`` (atomic: a temporary file renamed into place once
    complete and its sha256 verified). Over SANDBOX_FILE_UPLOAD_MAX_BYTES: 413, and
    nothing is left in the guest."""
    _require_exec(actor, vm, "file_write")
    _require_running(vm)
    path = _path(path)
    limit = settings.SANDBOX_FILE_UPLOAD_MAX_BYTES
    if size is not None and size > limit:
        raise ApplicationError(
            f"Uploads are limited to {limit} bytes.", code="too_large", status_code=413, details={"limit": limit}
        )
    after = {"path": path, "mode": oct(mode) if mode is not None else None, "owner": owner}
    try:
        with hostd_client(timeout=120) as client:
            result = client.upload(
                str(vm.pk), path, chunks, mode=mode, owner=owner, overwrite=overwrite, max_bytes=limit, timeout=120
            )
    except HostdError as exc:
        error = agent_error(exc)
        if exc.code == "too_large":
            error = ApplicationError(
                f"Uploads are limited to {limit} bytes.", code="too_large", status_code=413, details={"limit": limit}
            )
        _audit(actor, "vm.file_write", vm, after, result=AuditResult.FAILED, message=error.message)
        raise error from exc
    _audit(actor, "vm.file_write", vm, {**after, "size": result["size"], "sha256": result["sha256"]})
    return result


def vm_file_download_open(*, vm: VM, actor, path: str) -> dict:
    """Open ``path`` for a download: ``{"handle", "size", "mode", "sha256", ...}``; stream
    it with ``file_download_chunks`` (sync) or the async client in the view."""
    _require_exec(actor, vm, "file_read")
    _require_running(vm)
    try:
        with hostd_client(timeout=600) as client:
            return client.download_open(str(vm.pk), _path(path), timeout=600)
    except HostdError as exc:
        raise agent_error(exc) from exc


def file_download_chunks(vm_id: str, info: dict) -> Iterator[bytes]:
    with hostd_client(timeout=120) as client:
        yield from client.download_chunks(vm_id, info["handle"], expected_sha256=info.get("sha256"))


async def file_download_chunks_async(vm_id: str, info: dict):
    """Async generator of the file's bytes (for streaming responses under ASGI)."""
    import hashlib

    from vms.hostd.client import TRANSFER_WINDOW, AsyncHostdClient
    from vms.vmm.agent_protocol import MAX_DATA

    client = AsyncHostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=120)
    await client.connect()
    hasher = hashlib.sha256()
    import asyncio

    pending: list = []
    eof = False
    try:
        while True:
            while not eof and len(pending) < TRANSFER_WINDOW:
                pending.append(
                    asyncio.ensure_future(
                        client.agent(vm_id, "file_read", {"handle": info["handle"], "max": MAX_DATA}, timeout=120)
                    )
                )
                await asyncio.sleep(0)
            if not pending:
                break
            result, data = await pending.pop(0)
            if result.get("eof"):
                eof = True
                continue
            hasher.update(data)
            yield data
        final, _ = await client.agent(vm_id, "file_read_close", {"handle": info["handle"]})
        if final.get("sha256") != hasher.hexdigest() or hasher.hexdigest() != info.get("sha256"):
            # The file changed while it was read: cut the response short so the client notices.
            raise HostdRequestError("file changed during download", "checksum_mismatch")
    finally:
        for fut in pending:
            fut.cancel()
        with contextlib.suppress(Exception):
            if not eof:
                await client.agent(vm_id, "file_read_close", {"handle": info["handle"]}, timeout=10)
        await client.close()


def vm_agent_status_via_hostd(vm_id: str) -> dict | None:
    try:
        with hostd_client(timeout=5) as client:
            return client.call("vm_status", {"vm_id": vm_id})[0]
    except HostdError:
        return None
