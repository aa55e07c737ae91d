"""``/ws/vms/{id}/execs/{exec_id}/?offset=N``: an exec's output live, stdin and resize back.

Server -> client: binary frames are output, first byte the stream (1 stdout, 2 stderr,
3 pty) then the bytes; text frames are JSON control: ``attached``, ``gap`` (bytes in
between were dropped by the bounded buffer), ``exit`` (result), ``error``.
Client -> server: binary frames are stdin; text frames ``{"type": "stdin", "data": ".."}``,
``{"type": "eof"}``, ``{"type": "resize", "rows", "cols"}``, ``{"type": "signal", "signal"}``.
Session authentication; the VM's exec permission is checked on connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from vms.hostd.client import AsyncHostdClient, HostdError

logger = logging.getLogger(__name__)

STREAM_BYTES = {"stdout": b"\x01", "stderr": b"\x02", "pty": b"\x03"}
MAX_CONTROL = 1 << 20


@database_sync_to_async
def _authorise(user, vm_id: str) -> str | None:
    """None when the user may exec in the VM, else the close reason."""
    from accounts.services import user_has_perm
    from vms import selectors
    from vms.models import VM
    from vms.transitions import vm_guest_running

    if not selectors.vm_visible_to(user, vm_id):
        return "not_found"
    vm = VM.objects.get(pk=vm_id)
    if not user_has_perm(user, "vms.exec_vm", vm):
        return "permission_denied"
    if not vm_guest_running(vm):
        return "not_running"
    return None


_CLOSE_CODES = {"not_found": 4404, "permission_denied": 4403, "not_running": 4409, "unauthenticated": 4401}


class VmExecConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.client: AsyncHostdClient | None = None
        self.pump: asyncio.Task | None = None
        user = self.scope.get("user")
        kwargs = self.scope["url_route"]["kwargs"]
        self.vm_id, self.exec_id = kwargs["vm_id"], kwargs["exec_id"]
        if user is None or not user.is_authenticated:
            await self.close(code=_CLOSE_CODES["unauthenticated"])
            return
        reason = await _authorise(user, self.vm_id)
        if reason is not None:
            await self.close(code=_CLOSE_CODES[reason])
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        try:
            self.cursor = max(0, int(query.get("offset", ["0"])[0]))
        except ValueError:
            self.cursor = 0
        await self.accept()
        try:
            self.client = await AsyncHostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=30).connect()
            self.sub = await self.client.exec_attach(self.vm_id, self.exec_id, offset=self.cursor)
        except HostdError as exc:
            await self._control({"type": "error", "code": exc.code, "message": exc.message})
            await self.close(code=4502 if exc.code != "not_found" else 4404)
            return
        await self._control({"type": "attached", "exec_id": self.exec_id, "offset": self.cursor})
        self.pump = asyncio.create_task(self._pump())

    async def _control(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def _pump(self) -> None:
        try:
            async for frame in self.sub:
                h = frame.header
                if h["ev"] == "out":
                    offset = h.get("offset", self.cursor)
                    if offset > self.cursor:
                        await self._control({"type": "gap", "from": self.cursor, "to": offset})
                    await self.send(bytes_data=STREAM_BYTES.get(h.get("stream"), b"\x01") + frame.data)
                    self.cursor = offset + len(frame.data)
                elif h["ev"] == "exit":
                    await self._control({"type": "exit", "end_offset": h.get("end_offset"), "result": h.get("result")})
                    await self.close(code=1000)
                    return
                elif h["ev"] == "end":
                    err = h.get("error") or {}
                    await self._control({"type": "error", "code": err.get("code"), "message": err.get("message")})
                    await self.close(code=4404 if err.get("code") == "not_found" else 4502)
                    return
            await self._control({"type": "error", "code": "hostd_unavailable", "message": "stream ended"})
            await self.close(code=4502)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("exec stream of %s/%s failed", self.vm_id, self.exec_id)
            with contextlib.suppress(Exception):
                await self.close(code=4500)

    async def receive(self, text_data=None, bytes_data=None):
        if self.client is None:
            return
        try:
            if bytes_data is not None:
                await self.client.agent(self.vm_id, "exec_stdin", {"exec_id": self.exec_id}, bytes_data[:MAX_CONTROL])
                return
            message = json.loads(text_data or "{}")
            if not isinstance(message, dict):
                raise ValueError("control messages are JSON objects")
            kind = message.get("type")
            if kind == "stdin":
                data = str(message.get("data", "")).encode()[:MAX_CONTROL]
                await self.client.agent(self.vm_id, "exec_stdin", {"exec_id": self.exec_id}, data)
            elif kind == "eof":
                await self.client.agent(self.vm_id, "exec_stdin", {"exec_id": self.exec_id, "eof": True})
            elif kind == "resize":
                await self.client.agent(
                    self.vm_id,
                    "exec_resize",
                    {"exec_id": self.exec_id, "rows": int(message["rows"]), "cols": int(message["cols"])},
                )
            elif kind == "signal":
                await self.client.agent(
                    self.vm_id, "exec_signal", {"exec_id": self.exec_id, "signal": message.get("signal", "INT")}
                )
            else:
                raise ValueError(f"unknown control message {kind!r}")
        except HostdError as exc:
            await self._control({"type": "error", "code": exc.code, "message": exc.message})
        except (ValueError, KeyError, TypeError) as exc:
            await self._control({"type": "error", "code": "bad_request", "message": str(exc)})

    async def disconnect(self, code):
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.pump
        if self.client is not None:
            await self.client.close()
