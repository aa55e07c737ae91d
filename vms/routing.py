from django.urls import path

from vms import consumers
from vms.exec_consumers import VmExecConsumer

websocket_urlpatterns = [
    path("ws/vms/events/", consumers.VmEventsConsumer.as_asgi()),
    path("ws/vms/<str:vm_id>/execs/<str:exec_id>/", VmExecConsumer.as_asgi()),
    path("ws/vms/<str:vm_id>/exec/", VmExecConsumer.as_asgi()),
    path("ws/vms/<uuid:vm_id>/console/", consumers.VmConsoleConsumer.as_asgi()),
]
