"""An in-process fake of the API for SDK unit tests: routes (method, path) to handlers and
records every request, behind httpx.MockTransport (the SDK's real transport layer runs)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx

URL = "http://sandbox.test"
TOKEN = "msbx_test-token"


def answer(status: int = 200, body: Any = None, headers: dict | None = None) -> httpx.Response:
    headers = {"X-Request-ID": "req123", **(headers or {})}
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


def error(status: int, code: str, message: str = "no", details: Any = None, **headers: str) -> httpx.Response:
    return answer(status, {"error": {"code": code, "message": message, "details": details}}, headers)


class FakeApi:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern, Callable[..., Any]]] = []
        self.requests: list[httpx.Request] = []

    def route(self, method: str, pattern: str, handler: Callable[..., Any] | Any) -> None:
        """``handler(request, **groups)`` returns an httpx.Response or a JSON body; a list of
        them is answered in turn (the last one repeats)."""
        if isinstance(handler, list):
            queue = list(handler)

            def handler(request, **kw):  # noqa: F811
                item = queue.pop(0) if len(queue) > 1 else queue[0]
                return item(request, **kw) if callable(item) else item

        elif not callable(handler):
            body = handler

            def handler(request, **kw):  # noqa: F811
                return body

        self.routes.insert(0, (method, re.compile(f"^{pattern}$"), handler))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        for method, pattern, handler in self.routes:
            match = pattern.match(request.url.path)
            if method == request.method and match:
                result = handler(request, **match.groupdict())
                if isinstance(result, Exception):
                    raise result
                return result if isinstance(result, httpx.Response) else answer(200, result)
        return error(404, "not_found", f"no route {request.method} {request.url.path}")

    def calls(self, method: str, path_part: str = "") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and path_part in r.url.path]

    def sync_transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def body(self, request: httpx.Request) -> dict:
        return json.loads(request.content or b"{}")
