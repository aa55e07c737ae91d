import asyncio
import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from rest_framework.exceptions import NotFound

from accounts.permissions import vm_for
from sandbox_site.errors import ApplicationError
from vms.events import user_group, vm_group


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
        await self._join(user_group(user.pk))
        await self.accept()

    async def _join(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.add(group)

    async def receive_json(self, content, **kwargs):
        vm_id = content.get("subscribe") if isinstance(content, dict) else None
        if not isinstance(vm_id, str) or len(self.groups_joined) >= self.max_subscriptions:
            await self.send_json({"error": "bad request"})
            return
        try:
            await database_sync_to_async(vm_for)(self.scope["user"], vm_id, "view", action="vm.subscribe")
        except NotFound:
            await self.send_json({"error": "not found", "vm": vm_id})
            return
        await self._join(vm_group(vm_id))
        await self.send_json({"subscribed": vm_id})

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def vm_event(self, event):
        await self.send_json({k: v for k, v in event.items() if k != "type"})


class VmConsoleConsumer(AsyncWebsocketConsumer):
    """``/ws/vms/<id>/console/[?offset=N][&ticket=T]``: serial console of one VM.

    Server -> client: binary frames = console bytes (in order, from ``offset``); text JSON:
    ``hello`` (start offset, role), ``role`` (writer changed), ``ping``, ``error``.
    Client -> server: binary frames = keystrokes (writer only); text JSON: ``ack`` (bytes
    received so far: flow control), ``takeover``, ``ping``/``pong``, ``resize`` (ignored: a serial
    line has no size). Without ``offset`` the viewer gets the last SANDBOX_CONSOLE_SCROLLBACK_BYTES
    first, then live output; a reconnecting viewer passes the offset it reached and gets exactly
    what it missed (minus anything that no longer exists, reported as a ``gap``).
    """

    poll_interval = 0.05
    heartbeat_seconds = 20.0
    chunk = 32 * 1024

    async def connect(self):
        from urllib.parse import parse_qs

        from vms import consoles

        self.vm_id = str(self.scope["url_route"]["kwargs"]["vm_id"])
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        user = self.scope.get("user")
        ticket = (query.get("ticket") or [""])[0]
        if ticket:
            user = await database_sync_to_async(consoles.console_ticket_consume)(ticket, self.vm_id)
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user = user
        try:  # view rights give a read-only console; the console right allows typing
            vm = await database_sync_to_async(vm_for)(user, self.vm_id, "view", action="console.open")
        except NotFound:
            await self.close(code=4404)
            return
        self.vm = vm
        access = await database_sync_to_async(consoles.console_access)(user, vm)
        self.can_write = access.can_write
        size = await asyncio.to_thread(consoles.console_log_size, self.vm_id)
        try:
            requested = int((query.get("offset") or ["-1"])[0])
        except ValueError:
            requested = -1
        from django.conf import settings

        self.window = settings.SANDBOX_CONSOLE_WINDOW_BYTES
        self.offset = (
            max(0, size - settings.SANDBOX_CONSOLE_SCROLLBACK_BYTES) if requested < 0 else min(requested, size)
        )
        self.acked = self.offset
        self.writer = False
        await self.accept()
        await self.channel_layer.group_add(consoles.console_group(self.vm_id), self.channel_name)
        if self.can_write:
            self.writer = await database_sync_to_async(consoles.console_writer_claim)(
                self.vm_id, session=self.channel_name, username=user.username
            )
        holder = await database_sync_to_async(consoles.console_writer)(self.vm_id)
        await self._send_json(
            {
                "type": "hello",
                "offset": self.offset,
                "size": size,
                "writer": self.writer,
                "can_write": self.can_write,
                "writer_user": holder and holder["user"],
            }
        )
        await database_sync_to_async(self._audit)("console.open")
        self.pump = asyncio.create_task(self._pump())
        self.beat = asyncio.create_task(self._heartbeat())

    def _audit(self, action: str) -> None:
        from django.db import transaction

        from accounts.audit import audit_record

        with transaction.atomic():
            audit_record(actor=self.user, action=action, obj=self.vm, after={"writer": self.writer})

    async def _send_json(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def _pump(self) -> None:
        """Follow the log from self.offset; never more than ``window`` unacknowledged bytes."""
        from vms import consoles

        while True:
            if self.offset - self.acked >= self.window:
                await asyncio.sleep(self.poll_interval)
                continue
            limit = min(self.chunk, self.window - (self.offset - self.acked))
            data = await asyncio.to_thread(consoles.console_log_read, self.vm_id, self.offset, limit)
            if not data:
                size = await asyncio.to_thread(consoles.console_log_size, self.vm_id)
                if size < self.offset:  # the log was replaced (VM re-created): start over
                    await self._send_json({"type": "gap", "from": self.offset, "to": 0})
                    self.offset = self.acked = 0
                await asyncio.sleep(self.poll_interval)
                continue
            self.offset += len(data)
            await self.send(bytes_data=data)

    async def _heartbeat(self) -> None:
        from vms import consoles

        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            await self._send_json({"type": "ping", "offset": self.offset})
            if self.writer:
                self.writer = await database_sync_to_async(consoles.console_writer_refresh)(
                    self.vm_id, session=self.channel_name, username=self.user.username
                )

    async def receive(self, text_data=None, bytes_data=None):
        from vms import consoles

        if bytes_data is not None:
            if not self.writer:
                await self._send_json({"type": "error", "message": "read-only: take over to type"})
                return
            try:
                await database_sync_to_async(consoles.console_input)(vm=self.vm, data=bytes_data)
            except ApplicationError as exc:
                await self._send_json({"type": "error", "message": exc.message})
            return
        try:
            message = json.loads(text_data or "")
            kind = message.get("type")
        except (ValueError, AttributeError):
            await self._send_json({"type": "error", "message": "bad control frame"})
            return
        if kind == "ack" and isinstance(message.get("offset"), int):
            self.acked = max(self.acked, min(message["offset"], self.offset))
        elif kind == "ping":
            await self._send_json({"type": "pong", "offset": self.offset})
        elif kind == "takeover":
            try:
                holder = await database_sync_to_async(consoles.console_takeover)(
                    vm=self.vm, actor=self.user, session=self.channel_name
                )
            except ApplicationError as exc:
                await self._send_json({"type": "error", "message": exc.message})
                return
            await self.channel_layer.group_send(
                consoles.console_group(self.vm_id),
                {"type": "console.role", "session": holder["session"], "user": holder["user"]},
            )
        elif kind == "input" and isinstance(message.get("data"), str):
            await self.receive(bytes_data=message["data"].encode()[: consoles.INPUT_MAX_BYTES])

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
        from vms import consoles

        for task in (getattr(self, "pump", None), getattr(self, "beat", None)):
            if task is not None:
                task.cancel()
        if not hasattr(self, "vm"):
            return
        await self.channel_layer.group_discard(consoles.console_group(self.vm_id), self.channel_name)
        released = await database_sync_to_async(consoles.console_writer_release)(
            self.vm_id, session=self.channel_name, username=self.user.username
        )
        if released:
            await self.channel_layer.group_send(
                consoles.console_group(self.vm_id), {"type": "console.role", "session": "", "user": None}
            )
        await database_sync_to_async(self._audit)("console.close")
