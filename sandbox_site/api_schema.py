"""OpenAPI schema post-processing (drf-spectacular ``POSTPROCESSING_HOOKS``): every operation
documents its errors with the one error shape (sandbox_site/errors.py), so a generated client
can rely on it for any status the operation does not document otherwise."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error response: docs/api.md lists the codes.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "description": "machine-readable, e.g. invalid, not_found, conflict"},
                "message": {"type": "string", "description": "for people; never an exception's text"},
                "details": {"description": "field -> problem, or other context; null when there is none"},
            },
        }
    },
}

_EXPLICIT = {
    "400": "Invalid input (validation failed, malformed JSON, bad query parameter).",
    "401": "Not authenticated.",
    "403": "Not allowed (missing permission, read-only token, quota).",
    "404": "No such object, or not visible to you.",
}


def error_responses(result: dict, generator, request, public) -> dict:
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in ("get", "put", "post", "patch", "delete"):
                continue
            responses = operation.setdefault("responses", {})
            for status, description in _EXPLICIT.items():
                responses.setdefault(status, {"description": description, "content": ref})
            responses.setdefault("default", {"description": "Any other error, in the error shape.", "content": ref})
    return result
