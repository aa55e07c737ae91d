"""The API's edges, configured once in settings.REST_FRAMEWORK / MIDDLEWARE (docs/api.md):

- ``CheckedJSONParser``: request bodies through ``validation.json_loads_checked`` (depth,
  NaN/Infinity, UTF-8, NUL): a malformed body is a 400 in the error shape, never a 500.
- ``SafeJSONRenderer``: renders any stored text, even text that is not UTF-8 (a lone surrogate
  written before validation existed): it goes out as a JSON ``\\uXXXX`` escape.
- ``ApiPagination``: the one pagination class; ``limit`` and ``offset`` are bounded here.
- ``ApiInputMiddleware``: query strings and paths under /api/ without NUL characters.
"""

from __future__ import annotations

import codecs
import json

from django.http import JsonResponse
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer

from sandbox_site.errors import ApplicationError, error_body
from sandbox_site.validation import MAX_JSON_DEPTH, json_loads_checked, text_problem


class CheckedJSONParser(JSONParser):
    """DRF's JSON parser with this project's checks (``validation.json_loads_checked``)."""

    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read() if stream is not None else b""
        if not raw:
            raise ParseError("The body is empty; send a JSON object.")
        try:
            return json_loads_checked(raw, max_depth=MAX_JSON_DEPTH)
        except ApplicationError as exc:
            raise ParseError(exc.message) from exc


class SafeJSONRenderer(JSONRenderer):
    def render(self, data, accepted_media_type=None, renderer_context=None):
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except UnicodeEncodeError:
            # Lone surrogates (stored before input validation, or from a guest): ASCII JSON
            # escapes them as \udXXX, which every JSON parser reads.
            return json.dumps(data, cls=self.encoder_class, ensure_ascii=True, allow_nan=not self.strict).encode()


def _has_nul_escape(raw: str) -> bool:
    return "%00" in raw or "\x00" in raw


class ApiInputMiddleware:
    """Under /api/: a path or query string with NUL (``%00``) or that is not UTF-8 is a 400 in
    the error shape before any view (or the database) sees it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info.startswith("/api/"):
            problem = self._problem(request)
            if problem:
                return JsonResponse(error_body("invalid", problem), status=400)
        return self.get_response(request)

    @staticmethod
    def _problem(request) -> str | None:
        if text_problem(request.path_info):
            return "The path contains a NUL character or is not UTF-8."
        raw_query = request.META.get("QUERY_STRING", "")
        if _has_nul_escape(raw_query):
            return "The query string contains a NUL character."
        try:
            codecs.decode(_unquoted(raw_query), "utf-8")
        except UnicodeDecodeError:
            return "The query string is not UTF-8."
        return None


def _unquoted(query: str) -> bytes:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(query.replace("+", " "))
