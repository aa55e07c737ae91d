from django.urls import path

from vms import consumers

websocket_urlpatterns = [
    path("ws/vms/events/", consumers.VmEventsConsumer.as_asgi()),
]
