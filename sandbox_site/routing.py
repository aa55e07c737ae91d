from channels.generic.websocket import AsyncWebsocketConsumer
from django.urls import re_path

from vms.routing import websocket_urlpatterns as vm_websockets


class UnknownPathConsumer(AsyncWebsocketConsumer):
    """Any websocket path no route matches (a typo, a console id that is not a UUID): the
    handshake is accepted and closed with 4404, instead of channels' "No route found" (500)."""

    async def connect(self):
        await self.accept()
        await self.close(code=4404)


websocket_urlpatterns = [*vm_websockets, re_path(r"", UnknownPathConsumer.as_asgi())]
