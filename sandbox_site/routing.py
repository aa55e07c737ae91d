from vms.routing import websocket_urlpatterns as vm_websockets

websocket_urlpatterns = [*vm_websockets]
