"""``/ws/vms/{id}/execs/{exec_id}/?offset=N``: an exec's output live, stdin and resize back.
``/ws/vms/{id}/exec/``: the same for a command the socket starts: the client's first frame is
``{"type": "start", ...}`` with the fields of ``POST /vms/{id}/exec/`` (but ``wait``), checked
and rate-limited the same way and started by the same service; the server answers ``started``
(``exec_id``) and then streams it as above (one connection, no REST call before it). With
``"keep_open": true`` in a start frame the socket stays open after that command's ``exit`` and
takes the next start frame (each one authenticated, rate-limited and audited again) within
``SANDBOX_EXEC_SOCKET_IDLE_SECONDS``: a client running many commands keeps one connection.

Server -> client: binary frames are output, first byte the stream (1 stdout, 2 stderr,
3 pty) then the bytes; text frames are JSON control: ``attached`` (``offset``, ``window``),
``gap`` (bytes in between were dropped by the bounded buffer), ``exit`` (result), ``error``.
Client -> server: binary frames are stdin; text frames ``{"type": "stdin", "data": ".."}``,
``{"type": "eof"}``, ``{"type": "resize", "rows", "cols"}``, ``{"type": "signal", "signal"}``,
``{"type": "ack", "offset": N}`` (flow control, like the console's: the server never sends
more than ``window`` output bytes beyond the last acknowledged offset; an ack beyond what
was sent counts as what was sent, so acknowledging unread data gains nothing).
Session authentication; the VM's exec permission is checked on connect, and stdin, signal
and resize go through the exec services like their REST twins (permission re-checked,
signals audited). The output stream and the agent requests use one ``AgentChannel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from accounts.context import actor_context, new_request_id
from accounts.rights import request_perm_cache, websocket_rights_hold
from sandbox_site.errors import ApplicationError
from sandbox_site.validation import int_checked, ws_control_frame
from vms import exec_services
from vms.agent_gateway import AgentChannel
from vms.rights_watch import RightsWatch

logger = logging.getLogger(__name__)

STREAM_BYTES = {"stdout": b"\x01", "stderr": b"\x02", "pty": b"\x03"}


@database_sync_to_async
def _authorise(user, vm_id: str):
    """``(vm, None)`` when the user may exec in the VM, else ``(None, close reason)`` (a refusal is audited)."""
    from rest_framework.exceptions import NotFound

    from accounts.permissions import vm_for
    from sandbox_site.errors import NotPermitted
    from vms.hostd_address import vm_hostd_address
    from vms.transitions import vm_guest_running

    try:
        with request_perm_cache():  # the view and exec rights read in one query, for this check only
            vm = vm_for(user, vm_id, "exec", action="vm.exec_attach", related=())  # the VM's own fields only
    except NotFound:
        return None, "not_found"
    except NotPermitted:
        return None, "permission_denied"
    if not vm_guest_running(vm):
        return None, "not_running"
    vm.hostd_address = vm_hostd_address(vm)  # for the stream's connection, opened on the event loop
    return vm, None


def _start_fields(fields: dict) -> dict:
    """A start frame's fields checked as ``POST /vms/{id}/exec/`` checks its body (``wait`` is
    false: the socket streams the command)."""
    from vms.exec_api import ExecCreateSerializer

    data = ExecCreateSerializer(data={**fields, "wait": False})
    if not data.is_valid():
        raise ApplicationError("Invalid start frame.", code="bad_request", details=dict(data.errors))
    values = dict(data.validated_data)
    values.pop("wait")
    stdin = values.pop("stdin")
    return {**values, "stdin": stdin.encode() if stdin is not None else None}


START_WAIT_SECONDS = 10
# stdin, eof, resize and signal frames act as the user read again at most this long ago (a REST
# request authenticates every time; frames come far more often): a deactivated user, a revoked
# or expired token, a role or right taken away act no more after this, event or not.
FRAME_USER_FRESH_SECONDS = 1.0
# Frames of a kept socket's finished command that may still arrive after its exit.
_LATE_FRAMES = frozenset({"ack", "stdin", "eof", "resize", "signal"})
_CLOSE_CODES = {"not_found": 4404, "permission_denied": 4403, "not_running": 4409, "unauthenticated": 4401}


class VmExecConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.channel: AgentChannel | None = None
        self.pump: asyncio.Task | None = None
        self.rights: RightsWatch | None = None
        self.user = self.scope.get("user")
        self.user_read_at = time.monotonic()  # the handshake read it
        kwargs = self.scope["url_route"]["kwargs"]
        self.vm_id, self.exec_id = kwargs["vm_id"], kwargs.get("exec_id")  # None: the client starts one
        self.start_deadline: asyncio.TimerHandle | None = None
        self.closing = False  # refused or lost its rights: frames still in flight are dropped
        self.keep_open = False  # the last start frame asked for another command after this one
        self.started = 0  # commands this socket started
        self.expiry: asyncio.Task | None = None
        if self.user is None or not self.user.is_authenticated:
            await self.close(code=_CLOSE_CODES["unauthenticated"])
            return
        self.vm, reason = await _authorise(self.user, self.vm_id)
        if reason is not None:
            await self.close(code=_CLOSE_CODES[reason])
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        try:
            self.cursor = int_checked(query.get("offset", ["0"])[0], "offset", minimum=0, maximum=1 << 62)
        except ApplicationError:
            self.cursor = 0
        self.window = max(1, settings.SANDBOX_EXEC_WINDOW_BYTES)
        self.acked = self.cursor  # output offset the client confirmed
        self.acked_changed = asyncio.Event()
        await self.accept()
        user_id, vm_id, token_id = self.user.pk, str(self.vm.pk), self.scope.get("token_id")
        self.rights = RightsWatch(
            self,
            user_id=user_id,
            check=lambda: websocket_rights_hold(user_id=user_id, token_id=token_id, vm_id=vm_id, perm="exec"),
            on_lost=self._rights_lost,
        )
        try:
            self.channel = await AgentChannel.open(timeout=30, address=self.vm.hostd_address)
            # The rights watch joins its group while hostd attaches (two round trips at once);
            # output flows only once both are done. On ``/exec/`` nothing is attached yet.
            attaching = self.channel.exec_attach(self.vm_id, self.exec_id, offset=self.cursor) if self.exec_id else None
            attached, joined = await asyncio.gather(
                attaching or asyncio.sleep(0), self.rights.start(), return_exceptions=True
            )
            for outcome in (joined, attached):
                if isinstance(outcome, BaseException):
                    raise outcome
        except ApplicationError as exc:
            await self._fail(exc)
            return
        if self.exec_id is None:  # the client's start frame comes next, within START_WAIT_SECONDS
            self._await_start(START_WAIT_SECONDS)
            return
        self.sub = attached
        await self._attached()

    async def _fail(self, exc: ApplicationError) -> None:
        await self._close_with(4404 if exc.code == "not_found" else 4502, exc.code, exc.message)

    async def _close_with(self, code: int, error: str, message: str, **extra) -> None:
        """An ``error`` frame, then the close; nothing the client still sends acts."""
        self.closing = True
        await self._control({"type": "error", "code": error, "message": message, **extra})
        await self.close(code=code)

    async def _attached(self) -> None:
        await self._control({"type": "attached", "exec_id": self.exec_id, "offset": self.cursor, "window": self.window})
        self.pump = asyncio.create_task(self._pump())

    def _await_start(self, seconds: float) -> None:
        self.start_deadline = asyncio.get_running_loop().call_later(seconds, self._start_expired)

    def _start_expired(self) -> None:
        if self.exec_id is None and not self.closing:
            self.closing = True  # now: a start frame handled before the close task runs acts no more
            self.expiry = asyncio.ensure_future(
                self._close_with(4408, "timeout", "No start frame came in time.", status=408)
            )

    async def _start(self, text_data: str | None, bytes_data: bytes | None = None) -> None:
        """The client's first frame on ``/exec/`` (or its next, on a kept socket between
        commands): start the command, then stream it."""
        if self.started and bytes_data is not None:
            return  # the finished command's stdin, sent before its exit reached the client
        try:
            message = ws_control_frame(text_data)
        except ApplicationError as exc:
            await self._close_with(4400, exc.code, exc.message, status=400)
            return
        if message.get("type") != "start":
            if self.started and message.get("type") in _LATE_FRAMES:
                # The finished command's, sent before its exit reached the client: acts on
                # nothing, and the idle deadline keeps running (only a start ends it).
                return
            await self._close_with(4400, "bad_request", 'The first frame must be {"type": "start", ...}.', status=400)
            return
        if self.start_deadline is not None:
            self.start_deadline.cancel()
        keep_open = message.get("keep_open", False)
        if not isinstance(keep_open, bool):
            await self._close_with(4400, "bad_request", "keep_open must be true or false.", status=400)
            return
        attach_failed: list[ApplicationError] = []

        async def attach(started: dict) -> None:  # while the service writes the audit row
            self.exec_id = started["exec_id"]
            await self._control({"type": "started", "exec_id": self.exec_id})
            try:
                self.sub = await self.channel.exec_attach(self.vm_id, self.exec_id, offset=self.cursor)
            except ApplicationError as exc:
                attach_failed.append(exc)

        client = self.scope.get("client") or (None,)
        try:
            # One start is one request: its rights are read once (as REST's middleware does),
            # for the fresh user the start acts as.
            with actor_context(request_id=new_request_id(), source_ip=client[0]), request_perm_cache():
                fields = _start_fields({k: v for k, v in message.items() if k not in ("type", "keep_open")})
                await exec_services.vm_exec_start_async(
                    vm=self.vm,
                    actor=self.user,
                    channel=self.channel,
                    before=self._start_allowed,
                    meanwhile=attach,
                    **fields,
                )
        except ApplicationError as exc:
            if self.exec_id is not None:  # started, then something failed: like a failed attach
                await self._fail(exc)
                return
            # Closed with 4000 + the HTTP status the REST call would have answered (4429, 4409...).
            extra = {"details": exc.details} if exc.details else {}
            await self._close_with(4000 + exc.status_code, exc.code, exc.message, status=exc.status_code, **extra)
            return
        if attach_failed:
            await self._fail(attach_failed[0])
            return
        self.keep_open, self.started = keep_open, self.started + 1
        await self._attached()

    def _next_command(self) -> None:
        """A kept socket after its command's ``exit``: ready for the next start frame."""
        self.exec_id, self.sub, self.cursor, self.acked = None, None, 0, 0
        self._await_start(settings.SANDBOX_EXEC_SOCKET_IDLE_SECONDS)

    async def dispatch(self, message):
        # Channels' dispatch first closes stale database connections in a thread hop of its
        # own, for every message; here every database access is a ``database_sync_to_async``
        # call, which does that in its own hop already (a hop less per frame).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def rights_changed(self, event):
        if self.rights is not None:
            await self.rights.recheck()

    async def _rights_lost(self) -> None:
        await self._close_with(_CLOSE_CODES["permission_denied"], "permission_denied", "Your access was revoked.")

    async def _control(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def _pump(self) -> None:
        try:
            async for frame in self.sub:
                h = frame.header
                if h["ev"] == "out":
                    offset = h.get("offset", self.cursor)
                    if offset > self.cursor:
                        await self._control({"type": "gap", "from": self.cursor, "to": offset})
                        self.cursor = offset
                        self.acked = max(self.acked, offset)
                    data = frame.data[max(0, self.cursor - offset) :]  # never send a byte twice
                    await self._send_output(STREAM_BYTES.get(h.get("stream"), b"\x01"), data)
                elif h["ev"] == "exit":
                    # Ready for the next start before the client can see this exit: ``send``
                    # returns only once a slow reader took enough (daphne_limits), and a start
                    # answering the exit must not find the finished command still here.
                    kept = self.keep_open and not self.closing
                    if kept:
                        self._next_command()
                    await self._control({"type": "exit", "end_offset": h.get("end_offset"), "result": h.get("result")})
                    if not kept:
                        await self.close(code=1000)
                    return
                elif h["ev"] == "end":
                    err = h.get("error") or {}
                    await self._control({"type": "error", "code": err.get("code"), "message": err.get("message")})
                    await self.close(code=4404 if err.get("code") == "not_found" else 4502)
                    return
            await self._control({"type": "error", "code": "hostd_unavailable", "message": "stream ended"})
            await self.close(code=4502)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("exec stream of %s/%s failed", self.vm_id, self.exec_id)
            with contextlib.suppress(Exception):
                await self.close(code=4500)

    async def _send_output(self, stream: bytes, data: bytes) -> None:
        """Send ``data`` without ever having more than ``window`` bytes unacknowledged;
        while the window is full this task stops reading hostd's stream (which stops
        crediting the agent), so nothing piles up anywhere."""
        while data:
            room = self.window - (self.cursor - self.acked)
            if room <= 0:
                self.acked_changed.clear()
                await self.acked_changed.wait()
                continue
            piece, data = data[:room], data[room:]
            self.cursor += len(piece)
            await self.send(bytes_data=stream + piece)

    def _ack(self, offset: object) -> None:
        if isinstance(offset, int) and not isinstance(offset, bool):
            self.acked = max(self.acked, min(offset, self.cursor))  # never beyond what was sent
            self.acked_changed.set()

    async def receive(self, text_data=None, bytes_data=None):
        if self.channel is None or self.closing:
            return  # not ready, or on its way out: nothing the client sends acts any more
        if self.exec_id is None:
            await self._start(text_data, bytes_data)
            return
        if text_data and '"ack"' in text_data:  # flow control: no service, no audit
            with contextlib.suppress(ValueError):
                message = json.loads(text_data)
                if isinstance(message, dict) and message.get("type") == "ack":
                    self._ack(message.get("offset"))
                    return
        # Each control message is audited like one REST request (its own request id).
        client = self.scope.get("client") or (None,)
        try:
            with actor_context(request_id=new_request_id(), source_ip=client[0]):
                await self._apply(text_data, bytes_data)
        except ApplicationError as exc:
            # Malformed frames included (validation): answered, and the socket stays open.
            await self._control({"type": "error", "code": exc.code, "message": exc.message})
            if exc.code == "permission_denied":  # the exec right was taken away: stop watching too
                await self.close(code=_CLOSE_CODES["permission_denied"])

    def _user_fresh(self, max_age: float):
        """(In the database thread) The user the socket acts as, read again (the user, the token
        and its project) when the last read is older than ``max_age`` seconds: a handshake's
        user object may be stale (deactivated, token revoked or expired, role changed).
        Refused when its access is gone."""
        from accounts.rights import websocket_user_fresh
        from sandbox_site.errors import NotPermitted

        now = time.monotonic()
        if now - self.user_read_at >= max_age:
            user = websocket_user_fresh(user_id=self.user.pk, token_id=self.scope.get("token_id"), vm_id=self.vm_id)
            if user is None:
                raise NotPermitted("Your access was revoked.")
            self.user, self.user_read_at = user, now
        return self.user

    def _start_allowed(self):
        """(In the database thread) What a REST request does before its handler, for a start
        frame: the user read again, always, then the budgets ``POST /vms/{id}/exec/`` counts
        against (the user's and the exec budget). Returns the fresh user, the start's actor."""
        from sandbox_site.throttling import user_action_charge

        user = self._user_fresh(0)
        wait = user_action_charge(user, "exec")
        if wait:
            message = f"Request was throttled. Expected available in {wait:.0f} seconds."
            raise ApplicationError(message, code="throttled", details={"retry_after": wait}, status_code=429)
        return user

    def _frame_user(self):
        """(In the database thread) The user a stdin, eof, resize or signal frame acts as: read
        at most ``FRAME_USER_FRESH_SECONDS`` before."""
        return self._user_fresh(FRAME_USER_FRESH_SECONDS)

    async def _apply(self, text_data: str | None, bytes_data: bytes | None) -> None:
        """stdin, eof, resize and signal through the exec services (same checks as REST)."""
        target = {
            "vm": self.vm,
            "actor": self.user,
            "channel": self.channel,
            "exec_id": self.exec_id,
            "before": self._frame_user,
        }
        if bytes_data is not None:
            await exec_services.vm_exec_stdin_async(**target, data=bytes_data)
            return
        message = ws_control_frame(text_data)
        kind = message.get("type")
        if kind == "stdin":
            data = message.get("data", "")
            if not isinstance(data, str):
                raise ApplicationError("stdin data must be a string.", code="bad_request")
            await exec_services.vm_exec_stdin_async(**target, data=data.encode())
        elif kind == "eof":
            await exec_services.vm_exec_stdin_async(**target, data=b"", eof=True)
        elif kind == "resize":
            await exec_services.vm_exec_resize_async(**target, rows=message.get("rows"), cols=message.get("cols"))
        elif kind == "signal":
            await exec_services.vm_exec_signal_async(**target, signal=message.get("signal", "INT"))
        elif kind == "start":
            raise ApplicationError(
                "A command is still running on this socket: start the next one after its exit.", code="conflict"
            )
        else:
            raise ApplicationError("Unknown control message type.", code="bad_request")

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Channels calls disconnect() only for a client's close, not when the task is
            # cancelled (e.g. the server's close timeout): the stream must not outlive it.
            await asyncio.shield(self._cleanup())

    async def disconnect(self, code):
        await self._cleanup()

    async def _cleanup(self) -> None:
        deadline, self.start_deadline = getattr(self, "start_deadline", None), None
        if deadline is not None:
            deadline.cancel()
        self.closing = True
        rights, self.rights = getattr(self, "rights", None), None
        if rights is not None:
            await rights.stop()
        pump, channel = getattr(self, "pump", None), getattr(self, "channel", None)
        self.pump = self.channel = None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
