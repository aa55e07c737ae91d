import asyncio
import json
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from rest_framework.exceptions import NotFound

from accounts.permissions import vm_for
from accounts.rights import websocket_rights_hold
from sandbox_site.errors import ApplicationError
from sandbox_site.validation import int_checked, ws_control_frame
from vms.events import user_group, vm_group
from vms.hostd_address import vm_hostd_address
from vms.rights_watch import CLOSE_RIGHTS_GONE, RightsWatch

logger = logging.getLogger(__name__)


class VmEventsConsumer(AsyncJsonWebsocketConsumer):
    """Live VM state for the dashboard: the user's own VMs, plus any VM they may view that
    they subscribe to with ``{"subscribe": "<vm id>"}``."""

    max_subscriptions = 200

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.groups_joined: set[str] = set()
        self.subscribed: set[str] = set()
        await self._join(user_group(user.pk))
        await self.accept()
        token_id = self.scope.get("token_id")
        self.rights = RightsWatch(
            self,
            user_id=user.pk,
            check=lambda: websocket_rights_hold(user_id=user.pk, token_id=token_id),
            on_lost=lambda: self.close(code=CLOSE_RIGHTS_GONE),
        )
        await self.rights.start()

    async def rights_changed(self, event):
        await self.rights.recheck()
        if self.rights.lost:
            return
        # Subscriptions to VMs the user may no longer view end (the own-VM group stays).
        for vm_id in sorted(self.subscribed):
            if not await database_sync_to_async(websocket_rights_hold)(
                user_id=self.scope["user"].pk, vm_id=vm_id, perm="view"
            ):
                self.subscribed.discard(vm_id)
                self.groups_joined.discard(vm_group(vm_id))
                await self.channel_layer.group_discard(vm_group(vm_id), self.channel_name)
                await self.send_json({"unsubscribed": vm_id, "reason": "permission_denied"})

    async def _join(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.add(group)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # Every frame is checked (ws_control_frame): garbage, binary or deep JSON is answered
        # with an error frame; the socket stays open.
        try:
            content = ws_control_frame(text_data)
        except ApplicationError as exc:
            await self.send_json({"error": "bad request", "message": exc.message})
            return
        await self.receive_json(content)

    async def receive_json(self, content, **kwargs):
        vm_id = content.get("subscribe") if isinstance(content, dict) else None
        if not isinstance(vm_id, str) or len(self.groups_joined) >= self.max_subscriptions:
            await self.send_json({"error": "bad request"})
            return
        try:
            vm = await database_sync_to_async(vm_for)(self.scope["user"], vm_id, "view", action="vm.subscribe")
        except NotFound:
            await self.send_json({"error": "not found", "vm": vm_id[:64]})
            return
        await self._join(vm_group(str(vm.pk)))  # the canonical id: a group name allows no braces
        self.subscribed.add(str(vm.pk))
        await self.send_json({"subscribed": str(vm.pk)})

    async def disconnect(self, code):
        if getattr(self, "rights", None) is not None:
            await self.rights.stop()
        for group in getattr(self, "groups_joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def vm_event(self, event):
        await self.send_json({k: v for k, v in event.items() if k != "type"})


def _console_access_and_address(user, vm):
    """What ``user`` may do on ``vm``'s console, and where its host's hostd is."""
    from vms import consoles

    return consoles.console_access(user, vm), vm_hostd_address(vm)


class VmConsoleConsumer(AsyncWebsocketConsumer):
    """``/ws/vms/<id>/console/[?offset=N][&ticket=T][&view=1]``: serial console of one VM, served from
    the host daemon's console stream (one ``consoles.HostdConsole`` per websocket).

    Server -> client: binary frames = console bytes (in order, from ``offset``); text JSON:
    ``hello`` (start offset, role, window), ``role`` (writer changed), ``ping``/``pong``,
    ``gap`` (bytes from..to no longer exist), ``error`` (``code``, ``message``; ``closing``
    when the socket closes next). Client -> server: binary frames = keystrokes (writer only);
    text JSON: ``ack`` (bytes received so far: flow control), ``takeover``, ``ping``/``pong``,
    ``input`` (text keystrokes), ``resize`` (ignored: a serial line has no size). Without
    ``offset`` the viewer gets the last SANDBOX_CONSOLE_SCROLLBACK_BYTES first, then live
    output; a reconnecting viewer passes the offset it reached and gets exactly what it missed.

    Close codes: 4401/4403/4404 refused (accepted first, then an ``error`` with ``closing``
    and the close, so browsers see the code; no retry); 4409 the VM is not running or stopped,
    4503 hostd unreachable (the page retries with backoff, from its offset).

    The writer role is tied to this connection: refreshed every
    ``consoles.WRITER_REFRESH_SECONDS`` while it lives, released when it ends, also when
    connect or receive raised or the task was cancelled (``_cleanup`` runs from
    ``__call__``, not only from ``disconnect``).
    """

    heartbeat_seconds = 20.0
    CLOSE_VM_NOT_RUNNING = 4409
    CLOSE_UNAVAILABLE = 4503

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Channels calls disconnect() only for a client's close: not when a handler raised
            # or the task was cancelled. Shielded, so a second cancel cannot cut it short.
            await asyncio.shield(self._cleanup())

    async def connect(self):
        from urllib.parse import parse_qs

        from django.conf import settings

        from vms import consoles

        self.opened = self.in_group = self.cleaned_up = False
        self.bytes_in = self.bytes_out = 0  # keystrokes written, console bytes sent: in the close audit row
        self.opened_at = time.monotonic()
        self.vm_id = str(self.scope["url_route"]["kwargs"]["vm_id"])
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        user = self.scope.get("user")
        ticket = (query.get("ticket") or [""])[0]
        if ticket:
            user = await database_sync_to_async(consoles.console_ticket_consume)(ticket, self.vm_id)
        if user is None or not user.is_authenticated:
            await self._refuse(4401, "not_authenticated", "Log in to use the console.")
            return
        self.user = user
        try:  # view rights give a read-only console; the console right allows typing
            vm = await database_sync_to_async(vm_for)(user, self.vm_id, "view", action="console.open")
        except NotFound:
            await self._refuse(4404, "not_found", "This VM does not exist or is not shared with you.")
            return
        self.vm = vm
        # Both read the database (and, for a VM on another host, the TLS credentials): off the loop.
        access, address = await database_sync_to_async(_console_access_and_address)(user, vm)
        # ?view=1: a viewer that never types (the VM page's boot console) leaves the keyboard.
        self.can_write = access.can_write and (query.get("view") or [""])[0] != "1"
        try:
            requested: int | None = int_checked((query.get("offset") or [""])[0], "offset", maximum=1 << 62)
        except ApplicationError:
            requested = None
        if requested is not None and requested < 0:
            requested = None
        self.window = max(1, settings.SANDBOX_CONSOLE_WINDOW_BYTES)
        self.console = consoles.HostdConsole(self.vm_id, socket_path=address)
        self.writer = False
        consoles.console_session_open(self.channel_name)
        await self.accept()
        try:
            start = await self.console.attach(requested, scrollback=settings.SANDBOX_CONSOLE_SCROLLBACK_BYTES)
        except consoles.ConsoleUnavailable as exc:
            await self._end(exc)
            return
        self.offset = self.acked = start.offset  # next byte to send / bytes the viewer confirmed
        self.acked_changed = asyncio.Event()
        await self.channel_layer.group_add(consoles.console_group(self.vm_id), self.channel_name)
        self.in_group = True
        if self.can_write:
            self.writer = await database_sync_to_async(consoles.console_writer_claim)(
                self.vm_id, session=self.channel_name, username=user.username
            )
        holder = await database_sync_to_async(consoles.console_writer)(self.vm_id)
        await self._send_json(
            {
                "type": "hello",
                "offset": self.offset,
                "size": start.end_offset,
                "window": self.window,
                "writer": self.writer,
                "can_write": self.can_write,
                "writer_user": holder and holder["user"],
            }
        )
        if start.restarted_from is not None:  # the console's history was replaced since then
            await self._send_json({"type": "gap", "from": start.restarted_from, "to": self.offset})
        self.opened = True
        await database_sync_to_async(self._audit)("console.open")
        token_id = self.scope.get("token_id") if not ticket else None
        self.rights = RightsWatch(
            self,
            user_id=user.pk,
            check=lambda: websocket_rights_hold(user_id=user.pk, token_id=token_id, vm_id=self.vm_id, perm="view"),
            on_lost=self._rights_lost,
        )
        await self.rights.start()
        self.pump = asyncio.create_task(self._pump())
        self.beat = asyncio.create_task(self._heartbeat())
        self.keeper = asyncio.create_task(self._keep_writer_claim())

    async def dispatch(self, message):
        # Channels runs close_old_connections() on the shared database thread before every
        # message; keystrokes and acks must not queue behind other consumers' queries there.
        # Frames that need the database use database_sync_to_async, which does that itself.
        if message["type"] == "websocket.receive":
            await self.websocket_receive(message)
            return
        await super().dispatch(message)

    async def _refuse(self, code: int, reason: str, message: str) -> None:
        """Accept, say why, and close with the application's code: a refusal at the handshake
        reaches browsers only as 1006, so a page could not tell it from a network failure
        (and would retry forever)."""
        await self.accept()
        await self._send_json({"type": "error", "code": reason, "message": message, "closing": True})
        await self.close(code=code)

    def _audit(self, action: str) -> None:
        from django.db import transaction

        from accounts.audit import audit_record

        after = {"writer": self.writer, "can_write": self.can_write}
        if action == "console.close":
            after.update(
                bytes_in=self.bytes_in, bytes_out=self.bytes_out, seconds=round(time.monotonic() - self.opened_at, 1)
            )
        with transaction.atomic():
            audit_record(actor=self.user, action=action, obj=self.vm, after=after)

    async def _send_json(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def _end(self, exc: ApplicationError) -> None:
        """Tell the viewer why the console stops, and close (the page retries from its offset)."""
        await self._send_json({"type": "error", "code": exc.code, "message": exc.message, "closing": True})
        stopped = exc.code in ("vm_not_running", "vm_stopped")
        await self.close(code=self.CLOSE_VM_NOT_RUNNING if stopped else self.CLOSE_UNAVAILABLE)

    async def _pump(self) -> None:
        """Forward hostd's stream; never more than ``window`` bytes unacknowledged. While the
        window is full this task stops reading the stream, so hostd waits instead of anybody
        buffering: at most one hostd chunk is held here."""
        from vms import consoles

        try:
            async for start, data in self.console.output():
                if start + len(data) <= self.offset:
                    continue
                if start < self.offset:
                    data, start = data[self.offset - start :], self.offset
                elif start > self.offset:  # those bytes no longer exist (log rotated or replaced)
                    await self._send_json({"type": "gap", "from": self.offset, "to": start})
                    self.offset = self.acked = start
                while data:
                    room = self.window - (self.offset - self.acked)
                    if room <= 0:
                        self.acked_changed.clear()
                        await self.acked_changed.wait()
                        continue
                    piece, data = data[:room], data[room:]
                    self.offset += len(piece)
                    self.bytes_out += len(piece)
                    await self.send(bytes_data=piece)
        except consoles.ConsoleUnavailable as exc:
            await self._end(exc)
        except Exception:
            logger.exception("console of VM %s: forwarding failed", self.vm_id)
            await self.close(code=1011)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            await self._send_json({"type": "ping", "offset": self.offset})

    async def _keep_writer_claim(self) -> None:
        """Refresh the writer claim while this connection lives (it lapses soon after)."""
        from vms import consoles

        while True:
            await asyncio.sleep(consoles.WRITER_REFRESH_SECONDS)
            if not self.writer:
                continue
            try:
                held = await database_sync_to_async(consoles.console_writer_refresh)(
                    self.vm_id, session=self.channel_name, username=self.user.username
                )
                holder = None if held else await database_sync_to_async(consoles.console_writer)(self.vm_id)
            except Exception:  # the cache is unreachable: try again next time (the claim may lapse)
                logger.warning("console of VM %s: could not refresh the writer claim", self.vm_id, exc_info=True)
                continue
            if not held and self.writer:
                self.writer = False
                await self._send_json(
                    {"type": "role", "writer": False, "writer_user": holder and holder["user"], "taken_from_you": True}
                )

    async def _input(self, data: bytes) -> None:
        # Awaited on the event loop with a timeout (never in the shared database thread), and
        # one message at a time: keystrokes stay in order and a stuck hostd stops this socket only.
        if not self.writer:
            await self._send_json({"type": "error", "code": "read_only", "message": "read-only: take over to type"})
            return
        try:
            await self.console.write(data)
            self.bytes_in += len(data)
        except ApplicationError as exc:
            await self._send_json({"type": "error", "code": exc.code, "message": exc.message})

    async def receive(self, text_data=None, bytes_data=None):
        from vms import consoles

        if not self.opened:
            return
        if bytes_data is not None:
            await self._input(bytes_data)
            return
        try:
            message = ws_control_frame(text_data)
        except ApplicationError as exc:
            await self._send_json({"type": "error", "code": exc.code, "message": exc.message})
            return
        kind = message.get("type")
        offset = message.get("offset")
        if kind == "ack" and isinstance(offset, int) and not isinstance(offset, bool):
            self.acked = max(self.acked, min(offset, self.offset))  # never beyond what was sent
            self.acked_changed.set()
        elif kind == "ping":
            await self._send_json({"type": "pong", "offset": self.offset})
        elif kind == "takeover":
            try:
                holder = await database_sync_to_async(consoles.console_takeover)(
                    vm=self.vm, actor=self.user, session=self.channel_name
                )
            except ApplicationError as exc:
                await self._send_json({"type": "error", "code": exc.code, "message": exc.message})
                return
            await self.channel_layer.group_send(
                consoles.console_group(self.vm_id),
                {"type": "console.role", "session": holder["session"], "user": holder["user"]},
            )
        elif kind == "input" and isinstance(message.get("data"), str):
            await self._input(message["data"].encode()[: consoles.INPUT_MAX_BYTES])
        elif kind not in ("ack", "resize", "input", "pong"):
            await self._send_json({"type": "error", "code": "bad_request", "message": "Unknown control message type."})

    async def rights_changed(self, event):
        await self.rights.recheck()
        if self.rights.lost or not self.can_write:
            return
        # Still a viewer, but perhaps no longer allowed to type: give the keyboard up.
        user_id = self.user.pk
        if not await database_sync_to_async(websocket_rights_hold)(user_id=user_id, vm_id=self.vm_id, perm="console"):
            self.can_write = False
            if self.writer:
                self.writer = False
                await self._release_writer_quietly()
                await self._send_json({"type": "role", "writer": False, "writer_user": None, "taken_from_you": True})

    async def _release_writer_quietly(self) -> None:
        try:
            await self._release_writer()
        except Exception:
            logger.warning("console of VM %s: releasing the writer role failed", self.vm_id, exc_info=True)

    async def _rights_lost(self) -> None:
        await self._send_json(
            {"type": "error", "code": "permission_denied", "message": "Your access was revoked.", "closing": True}
        )
        await self.close(code=CLOSE_RIGHTS_GONE)

    async def console_role(self, event):
        was_writer = self.writer
        self.writer = event["session"] == self.channel_name
        await self._send_json(
            {
                "type": "role",
                "writer": self.writer,
                "writer_user": event["user"],
                "taken_from_you": was_writer and not self.writer,
            }
        )

    async def disconnect(self, code):
        await self._cleanup()

    async def _cleanup(self) -> None:
        """End this connection's part: stream, writer role, group, audit. Runs once, from
        ``disconnect`` or after a failure; each step runs even when an earlier one failed."""
        from vms import consoles

        if getattr(self, "cleaned_up", True):  # connect never started
            return
        self.cleaned_up = True
        consoles.console_session_close(self.channel_name)  # from now on its claim is free here
        for task in (getattr(self, "pump", None), getattr(self, "beat", None), getattr(self, "keeper", None)):
            if task is not None:
                task.cancel()
        if getattr(self, "rights", None) is not None:
            await self.rights.stop()
        user = getattr(self, "user", None)
        steps = []
        if getattr(self, "console", None) is not None:
            steps.append(("closing the hostd stream", self.console.close))
        if user is not None and getattr(self, "can_write", False):
            steps.append(("releasing the writer role", self._release_writer))
        if getattr(self, "in_group", False):
            steps.append(
                (
                    "leaving the console group",
                    lambda: self.channel_layer.group_discard(consoles.console_group(self.vm_id), self.channel_name),
                )
            )
        if getattr(self, "opened", False):
            steps.append(("auditing the close", lambda: database_sync_to_async(self._audit)("console.close")))
        for what, step in steps:
            try:
                await step()
            except Exception:
                logger.warning("console of VM %s: %s failed", self.vm_id, what, exc_info=True)

    async def _release_writer(self) -> None:
        from vms import consoles

        released = await database_sync_to_async(consoles.console_writer_release)(
            self.vm_id, session=self.channel_name, username=self.user.username
        )
        if released:
            await self.channel_layer.group_send(
                consoles.console_group(self.vm_id), {"type": "console.role", "session": "", "user": None}
            )
