"""ASGI guard for file uploads: Django reads a whole request body (spooled to disk) before
any view runs, so the upload size limit is enforced here, while the body arrives.

``PUT /api/v1/vms/<id>/files/`` with a Content-Length over SANDBOX_FILE_UPLOAD_MAX_BYTES
is answered 413 before a byte is read; a chunked body that grows past the limit is cut
off (Django sees a disconnect and runs no view) and answered 413. Nothing reaches the guest.
Image uploads (``POST /api/v1/images/``) get the same guard with SANDBOX_IMAGE_MAX_UPLOAD_BYTES
(the routes and limits: ``sandbox_site.body_limits``, shared with daphne's layer).
"""

from __future__ import annotations

from sandbox_site.body_limits import too_large_body, upload_limit


def _upload_limit(scope) -> int | None:
    """The byte limit of this request's body, or None when it is not an upload."""
    return upload_limit(scope.get("method") or "", scope.get("path") or "")


class UploadLimitMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = _upload_limit(scope) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _respond_413(send, limit)
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if state["over"] and not state["started"]:
            await _respond_413(send, limit)


async def _respond_413(send, limit: int) -> None:
    body = too_large_body(limit)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
