"""Exec and files in a VM: the business rules (exec permission, VM state, audit, limits).

Every agent request goes through ``vms.agent_gateway`` (hostd, or a direct agent connection
for single requests when hostd does not run; errors already in the API's shape). Views and
websocket consumers call only these; the consumers use the ``*_async`` variants, whose
checks and audit rows are the same as the REST ones.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection

from accounts.audit import audit_record
from accounts.models import AuditResult
from accounts.permissions import require_perm
from sandbox_site.errors import ApplicationError, ConflictError, QuotaExceeded
from sandbox_site.validation import int_checked, invalid, text_problem
from vms import agent_gateway
from vms.agent_gateway import AgentChannel, AgentSession, agent_call, agent_session
from vms.host_disk import require_disk_space
from vms.hostd_address import vm_hostd_address
from vms.models import VM
from vms.transitions import vm_guest_running

EXEC_PERM = "vms.exec_vm"
MAX_COMMAND_AUDIT = 4000
# The guest hashes a file before it is sent; it gives up after 120 s (guest agent's
# HASH_MAX_SECONDS), and so does the host a little later.
FILE_OPEN_TIMEOUT = 150.0
MAX_STDIN_BYTES = 1 << 20  # stdin given inline with POST .../exec/, .../stdin/ or a websocket frame
COLLECT_PAGE_BYTES = 512 << 10  # what one exec_read may return (guest_agents/PROTOCOL.md)
COLLECT_SECONDS = 60.0  # reading a finished exec's output back, at most
OUTPUT_STREAMS = ("stdout", "stderr", "pty")
ROW_FRESH_SECONDS = 1.0  # a VM row read this recently is not read again to check its state


def _require_exec(actor, vm: VM, action: str) -> None:
    require_perm(actor, EXEC_PERM, vm, action=f"vm.{action}")


def _require_running(vm: VM) -> None:
    # A row read in the last moment (``vm_for`` of this request) is as fresh as a re-read
    # would be; a VM object kept longer (a websocket's) is read again.
    if time.monotonic() - getattr(vm, "read_at", float("-inf")) > ROW_FRESH_SECONDS:
        try:
            vm.refresh_from_db(fields=["state", "driver"])
        except VM.DoesNotExist:  # deleted since (a kept websocket's next command)
            raise ApplicationError("The VM no longer exists.", code="not_found", status_code=404) from None
    if not vm_guest_running(vm):
        raise ConflictError(f"The VM is {vm.state}; commands and files need it running.", details={"state": vm.state})


def _audit(actor, action: str, vm: VM, after: dict, *, result: str = AuditResult.OK, message: str = "") -> None:
    audit_record(
        actor=actor, action=action, obj=vm, after=after, result=result, message=message[:2000]
    )  # own transaction


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
    args, audit_after = _exec_start_checked(
        vm, actor, command, env, cwd, user, timeout, stdin, stdin_open, wait, tag, pty, buffer_bytes
    )
    buffer_limit = args["buffer_bytes"]
    if not wait:
        return _exec_start_background(vm, actor, args, stdin or b"", audit_after)
    # One connection to hostd (or the agent) for the start, the wait and the output.
    with _wait_slot(actor), agent_session(vm) as call:
        try:
            started, _ = call("exec_start", args, stdin or b"")
        except ApplicationError as exc:
            _audit(actor, "vm.exec", vm, audit_after, result=AuditResult.FAILED, message=exc.message)
            raise
        limit = settings.SANDBOX_EXEC_WAIT_MAX_SECONDS
        wait_for = min(limit, timeout + 5) if timeout else limit

        def audited() -> None:
            _audit(actor, "vm.exec", vm, {**audit_after, "exec_id": started["exec_id"]})
            _release_database_connection()  # nothing below needs it; a wait must not hold one

        # The audit row is written while the guest runs the command (after the wait was sent,
        # before its answer is read): its database round trip costs the request no time.
        summary, _ = call(
            "exec_wait", {"exec_id": started["exec_id"], "timeout": wait_for}, timeout=wait_for + 10, meanwhile=audited
        )
        return _collect(call, summary, max_bytes=buffer_limit)


def _exec_start_checked(vm, actor, command, env, cwd, user, timeout, stdin, stdin_open, wait, tag, pty, buffer_bytes):
    """The rights, the VM's state and the request checked: the agent's ``exec_start`` arguments
    and the audit row's ``after``."""
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
        args["pty"] = _pty_checked(pty)
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
    return args, audit_after


def _exec_start_background(vm: VM, actor, args: dict, stdin: bytes, audit_after: dict) -> dict:
    """A ``wait: false`` start: at most SANDBOX_EXEC_BACKGROUND_PER_VM commands may run in
    the VM. hostd counts and starts under one lock per VM (``agent_gateway.exec_start_capped``),
    so parallel requests cannot all take the last slot, and no database lock is held meanwhile."""
    limit = settings.SANDBOX_EXEC_BACKGROUND_PER_VM
    try:
        started = agent_gateway.exec_start_capped(vm, args, stdin, max_running=limit)
    except ApplicationError as exc:
        raise _background_refused(vm, actor, audit_after, exc) from exc
    return _background_started(vm, actor, audit_after, started)


def _background_refused(vm: VM, actor, audit_after: dict, exc: ApplicationError) -> ApplicationError:
    """Audit a background start hostd refused; the error to raise (``exec_limit``: 429)."""
    error = exc
    if exc.code == "exec_limit":
        limit = settings.SANDBOX_EXEC_BACKGROUND_PER_VM
        error = QuotaExceeded(
            f"At most {limit} background commands may run in a VM; wait for some to end.", details={"limit": limit}
        )
    _audit(actor, "vm.exec", vm, audit_after, result=AuditResult.FAILED, message=error.message)
    return error


def _background_started(vm: VM, actor, audit_after: dict, started: dict) -> dict:
    _audit(actor, "vm.exec", vm, {**audit_after, "exec_id": started["exec_id"]})
    return {"exec_id": started["exec_id"], "pid": started["pid"], "tag": started["tag"], "running": True}


async def vm_exec_start_async(
    *,
    vm: VM,
    actor,
    channel: AgentChannel,
    stdin: bytes | None = None,
    before: Callable[[], Any] | None = None,
    meanwhile: Callable[[dict], Awaitable[Any]] | None = None,
    **fields,
) -> dict:
    """``vm_exec_start`` with ``wait: false`` for websocket consumers, over their hostd
    ``channel``: the same checks, cap and audit row; the checks and the audit in the database
    thread, the start on the event loop (no new hostd connection). ``before`` runs first in the
    checks' thread (the caller's authentication and rate limit) and may return the actor to
    act as (a fresh user object). ``meanwhile(started)`` runs while the audit row is written
    (the caller attaches the stream); its exception is raised once the row is in. Once hostd
    was asked, the start and its audit row (started or refused) finish even if the caller is
    cancelled (its client gone)."""
    f = {"env": None, "cwd": "", "user": "", "timeout": None, "stdin_open": False, "tag": "", "pty": None,
         "buffer_bytes": None, **fields}  # fmt: skip

    def checked():
        acting = (before() if before is not None else None) or actor
        return acting, *_exec_start_checked(
            vm, acting, f["command"], f["env"], f["cwd"], f["user"], f["timeout"], stdin, f["stdin_open"], False,
            f["tag"], f["pty"], f["buffer_bytes"],
        )  # fmt: skip

    acting, args, audit_after = await database_sync_to_async(checked)()

    async def start_audited() -> dict:
        try:
            started = await channel.exec_start(
                str(vm.pk), args, stdin or b"", max_running=settings.SANDBOX_EXEC_BACKGROUND_PER_VM
            )
        except ApplicationError as exc:
            raise await database_sync_to_async(_background_refused)(vm, acting, audit_after, exc) from exc
        audited = database_sync_to_async(_background_started)(vm, acting, audit_after, started)
        if meanwhile is None:
            return await audited
        result, side = await asyncio.gather(audited, meanwhile(started), return_exceptions=True)
        for outcome in (result, side):
            if isinstance(outcome, BaseException):
                raise outcome
        return result

    return await asyncio.shield(asyncio.ensure_future(start_audited()))


# Concurrent ``wait: true`` execs per user in this web process: each holds a server thread.
_waits: dict[object, int] = {}
_waits_lock = threading.Lock()


@contextlib.contextmanager
def _wait_slot(actor) -> Iterator[None]:
    """One of the actor's SANDBOX_EXEC_WAITS_PER_USER slots for a waiting exec, or 429."""
    key = getattr(actor, "pk", None)
    limit = settings.SANDBOX_EXEC_WAITS_PER_USER
    with _waits_lock:
        if _waits.get(key, 0) >= limit:
            raise ApplicationError(
                f"At most {limit} commands with wait=true may run at once per user; "
                "start more with wait=false and read their output.",
                code="too_many",
                status_code=429,
                details={"limit": limit},
            )
        _waits[key] = _waits.get(key, 0) + 1
    try:
        yield
    finally:
        with _waits_lock:
            _waits[key] -= 1
            if not _waits[key]:
                del _waits[key]


def _release_database_connection() -> None:
    # Django opens one connection per thread and keeps it until the request ends; a
    # command waited on for minutes would hold it all that time. Reopened on demand.
    if not connection.in_atomic_block:
        connection.close()


PTY_MAX_SIDE = 1000
_TERM = re.compile(r"^[A-Za-z0-9._+-]{0,64}$", re.ASCII)
# A signal by number (1-64) or by name, with or without SIG (the agent knows the names).
_SIGNAL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9+]{0,15}$", re.ASCII)


def _pty_checked(pty: Any) -> dict:
    if not isinstance(pty, dict):
        raise invalid("pty", "pty must be an object {rows, cols, term}.")
    term = pty.get("term", "")
    if not isinstance(term, str) or not _TERM.match(term):
        raise invalid("pty.term", "pty.term must be a terminal name like xterm-256color.")
    return {
        "rows": int_checked(pty.get("rows", 24), "pty.rows", minimum=1, maximum=PTY_MAX_SIDE),
        "cols": int_checked(pty.get("cols", 80), "pty.cols", minimum=1, maximum=PTY_MAX_SIDE),
        "term": term,
    }


def signal_checked(value: Any) -> str | int:
    """A signal as the agent takes it: a number 1-64 or a name (``TERM``, ``SIGKILL``)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int_checked(value, "signal", minimum=1, maximum=64)
    if isinstance(value, str) and _SIGNAL_NAME.match(value):
        return value.upper()
    raise invalid("signal", "signal must be a number (1-64) or a name like TERM.")


def _collect(call: AgentSession, summary: dict, *, max_bytes: int) -> dict:
    """Output of a finished (or still running) exec, split into stdout and stderr.

    Nothing the guest answers is trusted: at most ``max_bytes`` (the buffer the host asked
    the agent to keep) are collected, in at most as many pages as that takes, within
    COLLECT_SECONDS; offsets must advance and chunk lengths must fit the data. Hitting a
    limit stops the loop with ``truncated`` and ``collect_limit`` saying which. A finished
    exec that wrote nothing (``end_offset`` 0) needs no read at all."""
    out = {name: bytearray() for name in OUTPUT_STREAMS}
    exec_id = summary["exec_id"]
    offset = 0
    base = summary.get("base_offset", 0)
    total = 0
    limit_hit = None
    max_pages = max_bytes // COLLECT_PAGE_BYTES + 8
    deadline = time.monotonic() + COLLECT_SECONDS
    nothing_written = summary.get("end_offset") == 0 and not summary.get("running")
    for _ in range(0 if nothing_written else max_pages):
        want = min(COLLECT_PAGE_BYTES, max_bytes - total)
        page, data = call("exec_read", {"exec_id": exec_id, "offset": offset, "max": want})
        next_offset, end_offset = page.get("next_offset"), page.get("end_offset")
        chunks = page.get("chunks")
        if not (_is_int(next_offset) and _is_int(end_offset) and isinstance(chunks, list)):
            raise _bad_agent_answer("exec_read without integer offsets and a chunk list")
        pos = 0
        for chunk in chunks:
            if not (isinstance(chunk, list) and len(chunk) == 2 and chunk[0] in out and _is_int(chunk[1])):
                raise _bad_agent_answer("exec_read chunk is not [stream, length]")
            length = min(chunk[1], len(data) - pos, max_bytes - total)
            if length < 0:
                raise _bad_agent_answer("exec_read chunk lengths exceed its data")
            out[chunk[0]].extend(data[pos : pos + length])
            pos += length
            total += length
        summary = page
        if next_offset <= offset or next_offset >= end_offset:
            break
        if total >= max_bytes:
            limit_hit = "bytes"
            break
        if time.monotonic() > deadline:
            limit_hit = "time"
            break
        offset = next_offset
    else:
        if not nothing_written:
            limit_hit = "iterations"
    result = summary.get("result") or {}
    if not isinstance(result, dict):
        result = {}
    return {
        "exec_id": exec_id,
        "running": bool(summary.get("running")),
        "exit_code": result.get("exit_code"),
        "signal": result.get("signal"),
        "timed_out": result.get("timed_out", False),
        "stdout": (out["stdout"] or out["pty"]).decode("utf-8", "replace"),
        "stderr": out["stderr"].decode("utf-8", "replace"),
        "duration_ms": result.get("duration_ms"),
        "cpu_ms": result.get("cpu_ms"),
        "max_rss_kib": result.get("max_rss_kib"),
        "truncated": base > 0 or summary.get("base_offset", 0) > 0 or limit_hit is not None,
        "collect_limit": limit_hit,
        "end_offset": summary.get("end_offset"),
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_agent_answer(why: str) -> ApplicationError:
    return ApplicationError(f"The guest agent answered nonsense: {why}.", code="agent_error", status_code=502)


def vm_exec_list(*, vm: VM, actor, tag: str | None = None) -> list[dict]:
    _require_exec(actor, vm, "exec_list")
    _require_running(vm)
    result, _ = agent_call(vm, "exec_list", {"tag": tag} if tag else {})
    return result["execs"]


def vm_exec_output(
    *, vm: VM, actor, exec_id: str, offset: int = 0, limit: int = 512 << 10, encoding: str = "text"
) -> dict:
    """Output from byte ``offset`` (stdout and stderr share one offset space). If the
    bytes at ``offset`` were dropped (ring overflow), ``offset`` in the answer is larger
    than asked: that is the gap."""
    _require_exec(actor, vm, "exec_output")
    _require_running(vm)
    page, data = agent_call(vm, "exec_read", {"exec_id": exec_id, "offset": max(0, offset), "max": max(1, limit)})
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


@dataclass(frozen=True)
class _ExecControl:
    """Input to a running exec (stdin, signal, resize), the same over REST and websockets."""

    action: str  # the permission check's and audit row's action: vm.<action>
    args: dict
    data: bytes = b""
    timeout: float = 30.0
    audited: bool = False  # written to the audit log (after = args + audit_extra)
    audit_extra: dict | None = None

    @property
    def op(self) -> str:
        return self.action  # the agent's op has the same name


def _stdin_control(exec_id: str, data: bytes, eof: bool) -> _ExecControl:
    if len(data) > MAX_STDIN_BYTES:
        raise ApplicationError(f"at most {MAX_STDIN_BYTES} bytes per request", code="too_large", status_code=413)
    # The agent answers once the process has less than 1 MiB unread: bounded by this timeout.
    # Audited on every transport (REST and websocket) with its size, never its content.
    return _ExecControl(
        "exec_stdin", {"exec_id": exec_id, "eof": eof}, data, timeout=60, audited=True, audit_extra={"bytes": len(data)}
    )


def _signal_control(exec_id: str, signal: Any) -> _ExecControl:
    return _ExecControl("exec_signal", {"exec_id": exec_id, "signal": signal_checked(signal)}, audited=True)


def _resize_control(exec_id: str, rows: Any, cols: Any) -> _ExecControl:
    rows = int_checked(rows, "rows", minimum=1, maximum=PTY_MAX_SIDE)
    cols = int_checked(cols, "cols", minimum=1, maximum=PTY_MAX_SIDE)
    return _ExecControl("exec_resize", {"exec_id": exec_id, "rows": rows, "cols": cols})


def _control_allowed(vm: VM, actor, control: _ExecControl) -> None:
    _require_exec(actor, vm, control.action)
    _require_running(vm)


def _control_done(vm: VM, actor, control: _ExecControl) -> None:
    if control.audited:
        _audit(actor, f"vm.{control.action}", vm, {**control.args, **(control.audit_extra or {})})


def _control_run(vm: VM, actor, control: _ExecControl) -> dict:
    _control_allowed(vm, actor, control)
    result = agent_call(vm, control.op, control.args, control.data, timeout=control.timeout)[0]
    _control_done(vm, actor, control)
    return result


async def _control_run_async(
    vm: VM, actor, control: _ExecControl, channel: AgentChannel, before: Callable[[], Any] | None = None
) -> dict:
    # Checks and audit in the database thread (short); the agent request on the event loop,
    # so a guest slow to take stdin never holds the thread every consumer shares. ``before``
    # (the caller's authentication) runs first in the checks' thread and may return the actor.
    def allowed():
        acting = (before() if before is not None else None) or actor
        _control_allowed(vm, acting, control)
        return acting

    acting = await database_sync_to_async(allowed)()
    result = (await channel.call(str(vm.pk), control.op, control.args, control.data, timeout=control.timeout))[0]
    await database_sync_to_async(_control_done)(vm, acting, control)
    return result


def vm_exec_stdin(*, vm: VM, actor, exec_id: str, data: bytes, eof: bool = False) -> dict:
    """Write to the exec's stdin (``eof`` closes it after ``data``)."""
    return _control_run(vm, actor, _stdin_control(exec_id, data, eof))


def vm_exec_signal(*, vm: VM, actor, exec_id: str, signal: str | int = "TERM") -> dict:
    """Send a signal (name or number; ``KILL`` kills the whole tree). Audited."""
    return _control_run(vm, actor, _signal_control(exec_id, signal))


async def vm_exec_stdin_async(
    *, vm: VM, actor, channel: AgentChannel, exec_id: str, data: bytes, eof: bool = False, before=None
) -> dict:
    """``vm_exec_stdin`` for websocket consumers, over their hostd ``channel`` (``before``: see
    ``_control_run_async``)."""
    return await _control_run_async(vm, actor, _stdin_control(exec_id, data, eof), channel, before)


async def vm_exec_signal_async(
    *, vm: VM, actor, channel: AgentChannel, exec_id: str, signal: str | int = "TERM", before=None
) -> dict:
    """``vm_exec_signal`` for websocket consumers (same checks, same audit row)."""
    return await _control_run_async(vm, actor, _signal_control(exec_id, signal), channel, before)


async def vm_exec_resize_async(
    *, vm: VM, actor, channel: AgentChannel, exec_id: str, rows: int, cols: int, before=None
) -> dict:
    """Resize the exec's pty (websocket only: REST has no resize)."""
    return await _control_run_async(vm, actor, _resize_control(exec_id, rows, cols), channel, before)


# ----- files -----------------------------------------------------------------------------


def _path(path: str | None) -> str:
    if not path or not path.startswith("/") or text_problem(path) or len(path) > 4096:
        raise ApplicationError("path must be an absolute path in the guest.", details={"path": "invalid"})
    return path


# user[:group], names or numeric ids (useradd's rules, ASCII).
_OWNER = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$", re.ASCII)


def owner_checked(owner: str | None) -> str | None:
    if owner is None or owner == "":
        return None
    if not _OWNER.match(owner):
        raise invalid("owner", "owner must be user, user:group or :group (names or numeric ids).")
    return owner


def mode_checked(mode: str | None) -> int | None:
    """A file mode from a query string: octal digits, 0-7777."""
    if mode is None or mode == "":
        return None
    if not re.fullmatch(r"[0-7]{1,4}", mode.removeprefix("0o"), re.ASCII):
        raise invalid("mode", "mode must be octal between 0 and 7777, e.g. 0644.")
    return int(mode.removeprefix("0o"), 8)


def vm_file_stat(*, vm: VM, actor, path: str) -> dict:
    _require_exec(actor, vm, "file_stat")
    _require_running(vm)
    return agent_call(vm, "file_stat", {"path": _path(path)})[0]


def vm_file_list(*, vm: VM, actor, path: str, limit: int = 10000) -> dict:
    _require_exec(actor, vm, "file_list")
    _require_running(vm)
    return agent_call(vm, "file_list", {"path": _path(path), "limit": limit}, timeout=60)[0]


def vm_file_mkdir(*, vm: VM, actor, path: str, mode: int = 0o755, parents: bool = True) -> dict:
    _require_exec(actor, vm, "file_mkdir")
    _require_running(vm)
    result = agent_call(vm, "file_mkdir", {"path": _path(path), "mode": mode, "parents": parents})[0]
    _audit(actor, "vm.file_mkdir", vm, {"path": path, "mode": oct(mode)})
    return result


def vm_file_remove(*, vm: VM, actor, path: str, recursive: bool = False) -> dict:
    _require_exec(actor, vm, "file_remove")
    _require_running(vm)
    result = agent_call(vm, "file_remove", {"path": _path(path), "recursive": recursive}, timeout=120)[0]
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
    require_disk_space(action="upload a file")
    path = _path(path)
    owner = owner_checked(owner)
    if mode is not None and not 0 <= mode <= 0o7777:
        raise invalid("mode", "mode must be octal between 0 and 7777, e.g. 0644.")
    limit = settings.SANDBOX_FILE_UPLOAD_MAX_BYTES
    too_large = ApplicationError(
        f"Uploads are limited to {limit} bytes.", code="too_large", status_code=413, details={"limit": limit}
    )
    if size is not None and size > limit:
        raise too_large
    after = {"path": path, "mode": oct(mode) if mode is not None else None, "owner": owner}
    try:
        result = agent_gateway.file_upload(
            vm, path, chunks, mode=mode, owner=owner, overwrite=overwrite, max_bytes=limit, timeout=120
        )
    except ApplicationError as exc:
        error = too_large if exc.code == "too_large" else exc
        _audit(actor, "vm.file_write", vm, after, result=AuditResult.FAILED, message=error.message)
        if error is too_large:
            raise too_large from exc
        raise
    _audit(actor, "vm.file_write", vm, {**after, "size": result["size"], "sha256": result["sha256"]})
    return result


def vm_file_download_open(*, vm: VM, actor, path: str) -> dict:
    """Open ``path`` for a download: ``{"handle", "size", "mode", "sha256", ...}``; stream
    it with ``file_download_chunks_async``."""
    _require_exec(actor, vm, "file_read")
    _require_running(vm)
    path = _path(path)
    try:
        info = agent_gateway.file_download_open(vm, path, timeout=FILE_OPEN_TIMEOUT)
    except ApplicationError as exc:
        _audit(actor, "vm.file_read", vm, {"path": path}, result=AuditResult.FAILED, message=exc.message)
        raise
    _audit(actor, "vm.file_read", vm, {"path": path, "size": info.get("size"), "sha256": info.get("sha256")})
    return info


def file_download_chunks_async(vm: VM, info: dict) -> AsyncIterator[bytes]:
    """Async iterator of the bytes of a file opened with ``vm_file_download_open`` (for
    streaming responses under ASGI); cut short when the file changed while it was read.
    Called from sync code: the VM's hostd address is resolved here, not on the event loop."""
    return agent_gateway.file_download_chunks(str(vm.pk), info, address=vm_hostd_address(vm))
