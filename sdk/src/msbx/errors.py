"""Exceptions. Every API error answer is ``{"error": {"code", "message", "details"}}``; it is
mapped to one class here (``error_from_response``), in one place.

``SandboxError``
  ``ApiError`` (the server answered with an error; ``status``, ``code``, ``message``, ``details``,
  ``request_id``)
    ``AuthenticationError`` (401), ``PermissionDenied`` (403), ``QuotaExceeded`` (403
    ``quota_exceeded``), ``NotFound`` (404), ``Conflict`` (409), ``ValidationError`` (400, with
    ``fields``), ``TooLarge`` (413), ``RateLimited`` (429, ``retry_after``), ``ServiceUnavailable``
    (503), ``ServerError`` (other 5xx)
  ``TransportError`` (no answer: connection refused or dropped), ``Timeout`` (also a
  ``TimeoutError``)
  ``OperationFailed`` (an operation ended ``failed``), ``CommandFailed`` (``exec(check=True)``),
  ``IntegrityError`` (a file's sha256 did not match)
"""

from __future__ import annotations

import builtins
from typing import Any


class SandboxError(Exception):
    """Base class of everything the SDK raises on purpose."""

    exit_code = 1  # the CLI's exit status for this error (docs/cli.md)


class ApiError(SandboxError):
    """The API answered with an error."""

    status: int = 0
    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str | None = None,
        details: Any = None,
        request_id: str | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.code = code or self.default_code
        self.details = details
        self.request_id = request_id
        self.method = method
        self.url = url

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})" if self.status else self.message


class AuthenticationError(ApiError):
    status = 401
    default_code = "not_authenticated"
    exit_code = 3


class PermissionDenied(ApiError):
    status = 403
    default_code = "permission_denied"
    exit_code = 4


class QuotaExceeded(PermissionDenied):
    default_code = "quota_exceeded"
    exit_code = 7


class NotFound(ApiError):
    status = 404
    default_code = "not_found"
    exit_code = 5


class Conflict(ApiError):
    """The object's state does not allow the action (409), e.g. ``vm_not_running``."""

    status = 409
    default_code = "conflict"
    exit_code = 6


class ValidationError(ApiError):
    """400: ``fields`` maps each invalid field to its messages (``details`` of the answer)."""

    status = 400
    default_code = "invalid"
    exit_code = 2

    @property
    def fields(self) -> dict[str, list[str]]:
        if isinstance(self.details, dict):
            return {str(k): v if isinstance(v, list) else [str(v)] for k, v in self.details.items()}
        if isinstance(self.details, list):
            return {"non_field_errors": [str(v) for v in self.details]}
        return {}

    def __str__(self) -> str:
        # Field messages the answer's message already says are not repeated.
        parts = [
            f"{name}: {' '.join(str(m) for m in messages)}"
            for name, messages in self.fields.items()
            if not all(str(m) in self.message for m in messages)
        ]
        return f"{self.message} {'; '.join(parts)}".strip() if parts else super().__str__()


class TooLarge(ApiError):
    status = 413
    default_code = "too_large"
    exit_code = 2


class RateLimited(ApiError):
    """429 after the SDK's retries: ``retry_after`` seconds (or None) from the answer."""

    status = 429
    default_code = "throttled"
    exit_code = 8

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailable(ApiError):
    status = 503
    default_code = "unavailable"
    exit_code = 9


class ServerError(ApiError):
    status = 500
    default_code = "server_error"
    exit_code = 9


class TransportError(SandboxError):
    """No answer from the server (connection refused, reset, TLS...)."""

    exit_code = 10


class Timeout(TransportError, builtins.TimeoutError):
    """A request, a wait or a command took longer than its timeout."""

    exit_code = 11


class OperationFailed(SandboxError):
    """A long action (operation) ended ``failed``; ``operation`` is its last state."""

    exit_code = 12

    def __init__(self, message: str, operation: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.operation = operation or {}


class CommandFailed(SandboxError):
    """``exec(..., check=True)`` and the command did not exit 0; ``result`` is its ExecResult."""

    exit_code = 1

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class IntegrityError(SandboxError):
    """A transferred file's sha256 does not match the checksum the other side computed."""

    exit_code = 13


_BY_STATUS = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    429: RateLimited,
    503: ServiceUnavailable,
}
_BY_CODE = {"quota_exceeded": QuotaExceeded, "authentication_failed": AuthenticationError}


def error_from_response(
    status: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
    method: str = "",
    url: str = "",
) -> ApiError:
    """The exception for an error answer (the API's one error shape; tolerant of others)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "") or None
        message = str(error.get("message") or "") or f"HTTP {status}"
        details = error.get("details")
    else:
        code, details = None, None
        message = (str(body.get("detail")) if isinstance(body, dict) and "detail" in body else "") or f"HTTP {status}"
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    kwargs: dict[str, Any] = dict(
        status=status, code=code, details=details, request_id=request_id, method=method, url=url
    )
    if cls is RateLimited:
        return RateLimited(message, retry_after=retry_after, **kwargs)
    return cls(message, **kwargs)
