from accounts.context import ActorContext, _current, new_request_id


class RequestContextMiddleware:
    """Gives each request a correlation id (honouring a sane incoming X-Request-ID) and its source IP."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if incoming.isalnum() and len(incoming) <= 64 else new_request_id()
        request.request_id = request_id
        token = _current.set(ActorContext(request_id=request_id, source_ip=request.META.get("REMOTE_ADDR") or None))
        try:
            response = self.get_response(request)
        finally:
            _current.reset(token)
        response["X-Request-ID"] = request_id
        return response
