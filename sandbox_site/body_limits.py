"""The routes that take large request bodies, and their limits: one table for both layers
that enforce body limits, daphne's protocol patch (``sandbox_site.daphne_limits``, as the bytes
arrive) and the ASGI guard (``vms.upload_limit``, for any ASGI server). Every other request is
limited to ``SANDBOX_REQUEST_MAX_BYTES`` (or the anonymous limit) by the daphne layer."""

from __future__ import annotations

import json
import re

from django.conf import settings

# (method, path pattern, setting holding the byte limit)
UPLOAD_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("PUT", re.compile(r"^/api/v1/vms/[^/]+/files/$"), "SANDBOX_FILE_UPLOAD_MAX_BYTES"),
    ("POST", re.compile(r"^/api/v1/images/$"), "SANDBOX_IMAGE_MAX_UPLOAD_BYTES"),
)


def upload_limit(method: str, path: str) -> int | None:
    """The body limit of an upload route (``path`` without its query string), or None when
    ``method path`` is not one."""
    for route_method, pattern, setting in UPLOAD_ROUTES:
        if method == route_method and pattern.match(path):
            return int(getattr(settings, setting))
    return None


def too_large_body(limit: int) -> bytes:
    """The 413 answer of both layers, in the API's error shape."""
    return json.dumps(
        {
            "error": {
                "code": "too_large",
                "message": f"Request bodies here are limited to {limit} bytes.",
                "details": {"limit": limit},
            }
        }
    ).encode()
