"""Error pages: JSON in the API's one error shape under /api/, styled pages elsewhere, each
with the request id (also in the X-Request-ID header and the logs); and /favicon.ico."""

import logging

from django.http import HttpResponseServerError, JsonResponse
from django.shortcuts import redirect, render
from django.template import loader
from django.templatetags.static import static
from django.utils.http import url_has_allowed_host_and_scheme

from accounts.context import current_context, new_request_id
from sandbox_site.errors import error_body

logger = logging.getLogger(__name__)


def _request_id(request) -> str:
    return getattr(request, "request_id", "") or current_context().request_id or new_request_id()


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    return render(request, "404.html", {"request_id": _request_id(request)}, status=404)


def permission_denied(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("permission_denied", "You may not do this."), status=403)
    return render(request, "403.html", {"request_id": _request_id(request)}, status=403)


def server_error(request):
    """Touches neither the database nor the session (either may be what failed): the page is
    rendered without a request context."""
    request_id = _request_id(request)
    logger.error("request %s failed: %s %s", request_id, request.method, request.path)
    if request.path.startswith("/api/"):
        body = error_body("server_error", "Internal error; it has been logged.", {"request_id": request_id})
        return JsonResponse(body, status=500)
    path = request.get_full_path()
    if not url_has_allowed_host_and_scheme(path, allowed_hosts=None):
        path = "/"
    html = loader.get_template("500.html").render({"request_id": request_id, "path": path})
    return HttpResponseServerError(html)


def bad_request(request, exception=None):
    """Django's 400 (a malformed request refused before any view: too many fields, a body
    over DATA_UPLOAD_MAX_MEMORY_SIZE, a bad multipart body): the error shape under /api/."""
    if request.path.startswith("/api/"):
        from django.core.exceptions import RequestDataTooBig

        if isinstance(exception, RequestDataTooBig):
            return JsonResponse(error_body("too_large", "The request body is too large."), status=413)
        return JsonResponse(error_body("bad_request", "The request is malformed."), status=400)
    return render(request, "400.html", {"request_id": _request_id(request)}, status=400)


def favicon(request):
    """Pages that name no icon (the admin, the API docs) make browsers ask for /favicon.ico:
    the dashboard's icon, not a 404 (and a logged warning) per browser."""
    return redirect(static("favicon.svg"), permanent=True)
