from accounts.audit import audit_seal_after_response, audit_seal_soon
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
            with request_perm_cache(), audit_seal_after_response() as seal:  # accounts.services, accounts.audit
                response = self.get_response(request)
        finally:
            _current.reset(token)
        if seal.pending:
            # Audit rows of this request are committed; linking them into the chain waits until
            # the response has been sent (Django closes a response after its last byte went
            # out), and then a moment more, to seal them with other requests' rows.
            response._resource_closers.append(audit_seal_soon)
        response["X-Request-ID"] = request_id
        if request.client_request_id:
            response["X-Client-Request-ID"] = request.client_request_id
        return response
