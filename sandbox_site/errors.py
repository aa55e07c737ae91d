"""One application error type and one JSON error shape for the whole API.

Every error response is ``{"error": {"code": ..., "message": ..., "details": ...}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    """A business rule said no. Services raise it; the API renders it."""

    code = "invalid"
    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, code: str | None = None, details: Any = None, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status_code:
            self.status_code = status_code
        self.details = details


class ConflictError(ApplicationError):
    """The object is in a state that does not allow the action (409)."""

    code = "conflict"
    status_code = status.HTTP_409_CONFLICT


class QuotaExceeded(ApplicationError):
    code = "quota_exceeded"
    status_code = status.HTTP_403_FORBIDDEN


class NotPermitted(ApplicationError):
    code = "permission_denied"
    status_code = status.HTTP_403_FORBIDDEN


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


_DRF_CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.ParseError: "parse_error",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "throttled",
    exceptions.ValidationError: "invalid",
    exceptions.NotAcceptable: "not_acceptable",
}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """The one place an exception becomes the error shape. Client errors carry our own
    messages (never an exception's text); anything unexpected returns None, so Django logs it
    and answers 500 through ``sandbox_site.views.server_error`` (same shape, a request id)."""
    # Imported here: rest_framework.views imports the API settings, which import our
    # authentication classes, which import services that raise these errors.
    from rest_framework.views import exception_handler

    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code)
    if isinstance(exc, RequestDataTooBig):
        return Response(error_body("too_large", "The request body is too large."), status=413)
    if isinstance(exc, SuspiciousOperation):  # too many fields, a malformed multipart body...
        return Response(error_body("bad_request", "The request is malformed."), status=400)
    if isinstance(exc, DjangoValidationError):
        details = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        return Response(error_body("invalid", "Invalid input.", details), status=400)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), "error")
    if isinstance(exc, exceptions.ValidationError):
        response.data = error_body(code, "Invalid input.", response.data)
    elif isinstance(exc, exceptions.Throttled):
        wait = int(exc.wait) + 1 if exc.wait is not None else None
        if wait is not None:
            response["Retry-After"] = str(wait)
        response.data = error_body(code, "Too many requests: slow down.", {"retry_after": wait})
    else:
        detail = response.data.get("detail") if isinstance(response.data, dict) else response.data
        response.data = error_body(code, str(detail), None)
    return response
