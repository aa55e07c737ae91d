"""The transport layer: one request per endpoint of the table, retries, errors, websockets.

Retries: 429 and 503 answers are retried (any method: the server refused before doing
anything) after ``Retry-After`` when the answer has one (an hour-long Retry-After beyond
``max_delay`` is not waited for: the error is raised with ``retry_after``), else after an
exponential backoff with jitter. A connection that could not be made is retried for any method;
a request that may have reached the server (read timeout, dropped connection) only for
idempotent methods. A streamed upload body is replayed only when it can be re-created.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from msbx import __version__
from msbx._endpoints import ENDPOINTS, Endpoint
from msbx.config import Credentials
from msbx.errors import ApiError, Timeout, TransportError, error_from_response

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({429, 503})
DEFAULT_TIMEOUT = 30.0

Body = Any  # bytes, None, an iterator, or a callable that re-creates a streamed body per attempt
ResponseHook = Callable[["RequestLog"], None]


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first; delays ``backoff * 2**n`` (jittered), at most
    ``max_delay`` seconds each."""

    retries: int = 4
    backoff: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up."""
        if attempt >= self.retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_delay else None
        return min(self.max_delay, self.backoff * (2**attempt) * (0.5 + random.random() / 2))  # noqa: S311


@dataclass(frozen=True)
class RequestLog:
    """What ``--debug`` prints for each answer."""

    method: str
    url: str
    status: int
    request_id: str | None
    elapsed_ms: float
    attempt: int


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def prepare(
    name: str, path: Mapping[str, Any] | None, params: Mapping[str, Any] | None, body: Mapping[str, Any] | None
) -> tuple[Endpoint, str, dict[str, Any], dict[str, Any] | None]:
    """The endpoint and URL; refuses (a bug in the SDK) a field the endpoint table does not
    declare, so the contract test of the table covers every request."""
    ep = ENDPOINTS[name]
    clean_params = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
    unknown = set(clean_params) - set(ep.query)
    if body is not None:
        body = {k: v for k, v in body.items() if v is not None}
        unknown |= set(body) - set(ep.body)
    if unknown:
        raise ValueError(f"{name}: fields not in the endpoint table: {sorted(unknown)}")
    return ep, ep.url(**(path or {})), clean_params, (dict(body) if body is not None else None)


def _query_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise error_from_response(
        response.status_code,
        body,
        request_id=response.headers.get("X-Request-ID"),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        method=response.request.method,
        url=str(response.request.url),
    )


def _replayable(content: Body) -> bool:
    return content is None or isinstance(content, bytes) or callable(content)


def _retry_after_exception(
    exc: httpx.HTTPError, method: str, content: Body, attempt: int, policy: RetryPolicy
) -> float | None:
    if not _replayable(content):
        return None
    never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
    if not never_sent and method not in IDEMPOTENT:
        return None
    return policy.delay(attempt, None)


def _wrap(exc: httpx.HTTPError, method: str, url: str) -> TransportError:
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"{method} {url}: timed out ({type(exc).__name__})")
    return TransportError(f"{method} {url}: {exc or type(exc).__name__}")


def ws_url(base_url: str, path: str) -> str:
    if base_url.startswith("https://"):
        return "wss://" + base_url[len("https://") :] + path
    if base_url.startswith("http://"):
        return "ws://" + base_url[len("http://") :] + path
    return base_url + path


class _HttpBase:
    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        on_response: ResponseHook | None = None,
    ) -> None:
        self.credentials = credentials
        self.base_url = credentials.url
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_response = on_response
        self.headers = {
            "Authorization": f"Bearer {credentials.token}",
            "User-Agent": f"msbx/{__version__} (python-httpx)",
            "Accept": "application/json",
        }

    def ws_headers(self) -> dict[str, str]:
        # The server checks Origin against its allowed hosts: a same-origin client.
        return {"Authorization": self.headers["Authorization"], "User-Agent": self.headers["User-Agent"]}

    def _log(self, response: httpx.Response, started: float, attempt: int) -> None:
        if self.on_response is not None:
            self.on_response(
                RequestLog(
                    response.request.method,
                    str(response.request.url),
                    response.status_code,
                    response.headers.get("X-Request-ID"),
                    (time.monotonic() - started) * 1000,
                    attempt,
                )
            )

    def _decide(self, response: httpx.Response, attempt: int) -> float | None:
        if response.status_code not in RETRY_STATUSES:
            return None
        return self.retry.delay(attempt, parse_retry_after(response.headers.get("Retry-After")))


class SyncHttp(_HttpBase):
    def __init__(
        self, credentials: Credentials, *, transport: httpx.BaseTransport | None = None, **kwargs: Any
    ) -> None:
        super().__init__(credentials, **kwargs)
        self.client = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        # A transport of the caller's routes HTTP its own way: websockets cannot follow it, so
        # what has an HTTP equivalent (exec output) keeps to HTTP then.
        self.own_transport = transport is not None

    def close(self) -> None:
        self.client.close()

    def send(
        self,
        name: str,
        *,
        path: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        json: Mapping[str, Any] | None = None,
        content: Body = None,
        timeout: float | None = None,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """The answer (< 400) of one endpoint, after retries; an ApiError otherwise. With
        ``stream`` the caller reads and closes the answer."""
        ep, url, query, body = prepare(name, path, params, json)
        attempt = 0
        while True:
            started = time.monotonic()
            data = content() if callable(content) else content
            try:
                request = self.client.build_request(
                    ep.method,
                    url,
                    params=query,
                    json=body,
                    content=data,
                    headers=headers,
                    timeout=timeout if timeout is not None else self.timeout,
                )
                response = self.client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                delay = _retry_after_exception(exc, ep.method, content, attempt, self.retry)
                if delay is None:
                    raise _wrap(exc, ep.method, url) from exc
            else:
                self._log(response, started, attempt)
                delay = self._decide(response, attempt) if _replayable(content) else None
                if delay is None:
                    if response.status_code >= 400:
                        response.read()
                        response.close()
                        raise_for_status(response)
                    return response
                response.close()
            time.sleep(delay)
            attempt += 1

    def json(self, name: str, **kwargs: Any) -> Any:
        response = self.send(name, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def pages(self, name: str, *, page_size: int = 50, **kwargs: Any) -> Iterable[dict[str, Any]]:
        params = dict(kwargs.pop("params", None) or {})
        offset = 0
        while True:
            page = self.json(name, params={**params, "limit": page_size, "offset": offset}, **kwargs)
            results = page.get("results", []) if isinstance(page, dict) else page
            yield from results
            if not isinstance(page, dict) or not page.get("next") or not results:
                return
            offset += len(results)

    def ws_connect(self, path: str, *, open_timeout: float | None = None) -> Any:
        from websockets.sync.client import connect

        try:
            # __enter__: websockets >= 17.1 returns a connector to use as a context manager (and
            # warns about direct use); older versions return the connection, whose __enter__ is
            # itself. The caller closes the connection.
            return connect(
                ws_url(self.base_url, path),
                additional_headers=self.ws_headers(),
                origin=self.base_url,  # type: ignore[arg-type]
                open_timeout=open_timeout or self.timeout,
                close_timeout=5,
                max_size=16 << 20,
            ).__enter__()
        except Exception as exc:
            raise ws_error(exc, path) from exc


class AsyncHttp(_HttpBase):
    def __init__(
        self, credentials: Credentials, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any
    ) -> None:
        super().__init__(credentials, **kwargs)
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        self.own_transport = transport is not None  # see SyncHttp

    async def close(self) -> None:
        await self.client.aclose()

    async def send(
        self,
        name: str,
        *,
        path: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        json: Mapping[str, Any] | None = None,
        content: Body = None,
        timeout: float | None = None,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        ep, url, query, body = prepare(name, path, params, json)
        attempt = 0
        while True:
            started = time.monotonic()
            data = content() if callable(content) else content
            try:
                request = self.client.build_request(
                    ep.method,
                    url,
                    params=query,
                    json=body,
                    content=data,
                    headers=headers,
                    timeout=timeout if timeout is not None else self.timeout,
                )
                response = await self.client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                delay = _retry_after_exception(exc, ep.method, content, attempt, self.retry)
                if delay is None:
                    raise _wrap(exc, ep.method, url) from exc
            else:
                self._log(response, started, attempt)
                delay = self._decide(response, attempt) if _replayable(content) else None
                if delay is None:
                    if response.status_code >= 400:
                        await response.aread()
                        await response.aclose()
                        raise_for_status(response)
                    return response
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def json(self, name: str, **kwargs: Any) -> Any:
        response = await self.send(name, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    async def pages(self, name: str, *, page_size: int = 50, **kwargs: Any) -> Any:
        params = dict(kwargs.pop("params", None) or {})
        offset = 0
        while True:
            page = await self.json(name, params={**params, "limit": page_size, "offset": offset}, **kwargs)
            results = page.get("results", []) if isinstance(page, dict) else page
            for item in results:
                yield item
            if not isinstance(page, dict) or not page.get("next") or not results:
                return
            offset += len(results)

    async def ws_connect(self, path: str, *, open_timeout: float | None = None) -> Any:
        from websockets.asyncio.client import connect

        try:
            return await connect(
                ws_url(self.base_url, path),
                additional_headers=self.ws_headers(),
                origin=self.base_url,  # type: ignore[arg-type]
                open_timeout=open_timeout or self.timeout,
                close_timeout=5,
                max_size=16 << 20,
            )
        except Exception as exc:
            raise ws_error(exc, path) from exc


# Close codes of the exec and console websockets (docs/exec-and-files.md, docs/dashboard.md).
_WS_CLOSE = {
    4400: 400, 4401: 401, 4403: 403, 4404: 404, 4408: 408, 4409: 409, 4413: 413, 4429: 429, 4502: 503, 4503: 503,
}  # fmt: skip


def ws_start_frame(body: dict[str, Any]) -> str:
    """The ``start`` frame for an exec websocket from an exec request body (``models.exec_body``):
    its fields but ``wait``, unset ones left out as the REST call leaves them out."""
    return json.dumps({"type": "start", **{k: v for k, v in body.items() if k != "wait" and v is not None}})


def ws_start_reply(message: str | bytes, path: str) -> str | None:
    """One server frame after an exec websocket's ``start`` frame (``/ws/vms/{id}/exec/``):
    the exec id once ``started``, None for anything else, the API's error for ``error``."""
    if not isinstance(message, str):
        return None
    control = json.loads(message)
    if control.get("type") == "started":
        return str(control["exec_id"])
    if control.get("type") == "error":
        details = control.get("details") or {}
        retry = details.get("retry_after") if isinstance(details, dict) else None
        raise error_from_response(
            int(control.get("status") or 400),
            {"error": {"code": control.get("code"), "message": control.get("message"), "details": details or None}},
            retry_after=float(retry) if retry else None,
            method="GET",
            url=path,
        )
    return None


def ws_error(exc: BaseException, path: str) -> Exception:
    """A websocket that could not be opened, or was closed by the server with a code."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Timeout(f"websocket {path}: timed out")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return error_from_response(status, None, method="GET", url=path)
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        status = _WS_CLOSE.get(code)
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        if status:
            return error_from_response(status, {"detail": reason or f"websocket closed ({code})"}, url=path)
        return TransportError(f"websocket {path} closed ({code} {reason})".strip())
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, OSError):
        return TransportError(f"websocket {path}: {exc}")
    return TransportError(f"websocket {path}: {type(exc).__name__}: {exc}")
