from django.urls import path

from vms import consumers

websocket_urlpatterns = [
    path("ws/vms/events/", consumers.VmEventsConsumer.as_asgi()),
    path("ws/vms/<uuid:vm_id>/console/", consumers.VmConsoleConsumer.as_asgi()),
]
