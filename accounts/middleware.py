from accounts.context import ActorContext, _current, new_request_id
from accounts.rights import request_perm_cache

CLIENT_REQUEST_ID_MAX = 64


def client_request_id(value: str) -> str:
    """A client's X-Request-ID as it may be stored: printable ASCII, at most 64 characters,
    else nothing (it is the client's label for its own correlation, never our request id)."""
    value = value.strip()
    if not value or len(value) > CLIENT_REQUEST_ID_MAX or not value.isascii() or not value.isprintable():
        return ""
    return value


class RequestContextMiddleware:
    """Gives each request a server-generated correlation id (answered as X-Request-ID) and its
    source IP. A client-supplied X-Request-ID is kept as ``client_request_id`` (audit rows and
    operations show it labelled as the client's), and never replaces ours."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request_id = new_request_id()
        request.request_id = request_id
        request.client_request_id = client_request_id(request.headers.get("X-Request-ID", ""))
        token = _current.set(
            ActorContext(
                request_id=request_id,
                client_request_id=request.client_request_id,
                source_ip=request.META.get("REMOTE_ADDR") or None,
            )
        )
        try:
            with request_perm_cache():  # accounts.services.user_has_perm
                response = self.get_response(request)
        finally:
            _current.reset(token)
        response["X-Request-ID"] = request_id
        if request.client_request_id:
            response["X-Client-Request-ID"] = request.client_request_id
        return response
