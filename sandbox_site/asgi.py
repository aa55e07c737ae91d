import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox_site.settings")
os.environ.setdefault("DB_POOL", "1")  # the web process pools its database connections (settings.py)
django.setup(set_prefix=False)  # what django.core.asgi.get_asgi_application does, with our handler:

from sandbox_site.asgi_handler import PooledThreadASGIHandler  # noqa: E402

django_asgi_app = PooledThreadASGIHandler()  # request threads kept for later requests

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from accounts.audit import audit_seal_by_process_sealer  # noqa: E402
from accounts.authentication import BearerTokenWebsocketMiddleware  # noqa: E402
from sandbox_site import daphne_http_errors, daphne_limits, daphne_spool  # noqa: E402
from sandbox_site.metrics import AsgiMetricsMiddleware  # noqa: E402
from sandbox_site.routing import websocket_urlpatterns  # noqa: E402
from sandbox_site.websocket_limits import WebsocketsPerUserLimit  # noqa: E402
from sandbox_site.websocket_origin import SameOriginWebsocketValidator  # noqa: E402
from vms.upload_limit import UploadLimitMiddleware  # noqa: E402

daphne_spool.install()  # large request bodies: spooled to disk, not held in daphne's memory
daphne_limits.install()  # body limits as bytes arrive; sends paced to the client's reading
daphne_http_errors.install()  # requests Twisted refuses get an answer in the API's error shape
audit_seal_by_process_sealer()  # consumers' audit rows too: sealed by the process's sealer thread

websockets = WebsocketsPerUserLimit(URLRouter(websocket_urlpatterns))  # after authentication: per user
application = AsgiMetricsMiddleware(
    ProtocolTypeRouter(
        {
            "http": UploadLimitMiddleware(django_asgi_app),
            "websocket": SameOriginWebsocketValidator(
                BearerTokenWebsocketMiddleware(websockets, session_stack=AuthMiddlewareStack(websockets))
            ),
        }
    )
)

from django.urls import get_resolver  # noqa: E402

from sandbox_site.gc_freeze import freeze_startup_objects  # noqa: E402

get_resolver().reverse_dict  # noqa: B018 - the URL tables the first request would build
freeze_startup_objects()  # last: everything above stays out of full collections
