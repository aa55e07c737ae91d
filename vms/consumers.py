from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from vms import selectors
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
        visible = await database_sync_to_async(selectors.vm_visible_to)(self.scope["user"], vm_id)
        if not visible:
            await self.send_json({"error": "not found", "vm": vm_id})
            return
        await self._join(vm_group(vm_id))
        await self.send_json({"subscribed": vm_id})

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def vm_event(self, event):
        await self.send_json({k: v for k, v in event.items() if k != "type"})
