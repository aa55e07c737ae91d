"""Clients of the host daemon (no Django): its Unix socket on the same host, or its mutual-TLS
listener on another (``vms.hostd.tls.TlsAddress``): ``HostdClient`` (blocking, for
views, Celery tasks and scripts) and ``AsyncHostdClient`` (for Channels consumers).

Both speak the agent framing (``vms.vmm.agent_protocol``) to hostd; see docs/hostd.md.
Errors (``vms.hostd.errors``, one ``HostdError`` type shared with the daemon):
``HostdUnavailable`` (no daemon), ``HostdRequestError`` (hostd or the agent said no;
``code`` is the error code), ``HostdTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from vms.hostd.errors import HostdError, HostdRequestError, HostdTimeout, HostdUnavailable
from vms.hostd.logcontext import log_ids
from vms.hostd.tls import TlsAddress
from vms.vmm.agent_protocol import MAX_DATA, Frame, FrameDecoder, FrameError, check_response, encode_frame

UPLOAD_CHUNK = 256 << 10
TRANSFER_WINDOW = 8  # chunks in flight during uploads and downloads
STASH_FRAMES = 2 * TRANSFER_WINDOW  # out-of-order answers a blocking client keeps (``wait``)


def _request_header(req_id: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """A request's header, with the id of the web request or task sending it (for hostd's logs)."""
    header: dict[str, Any] = {"id": req_id, "op": op, "args": args}
    request_id = log_ids().get("request_id")
    if request_id:
        header["request"] = request_id
    return header


def _raise_for(frame: Frame) -> tuple[dict[str, Any], bytes]:
    h = frame.header
    if h.get("ok") is True:
        return h.get("result", {}), frame.data
    err = h.get("error") or {}
    raise HostdRequestError(str(err.get("code", "error")), str(err.get("message", "")))


class HostdClient:
    """Blocking client; one request at a time (plus the pipelined file transfers).
    Not thread-safe: use one per thread."""

    def __init__(self, path: Path | str | TlsAddress, *, timeout: float = 10.0) -> None:
        self.address = path
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._frames: list[Frame] = []
        self._stash: dict[int, Frame] = {}  # answers that came before the one waited for
        self._ids = itertools.count(1)
        self._subs = itertools.count(1)

    def __enter__(self) -> HostdClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        address = self.address
        sock: socket.socket
        try:
            if isinstance(address, TlsAddress):
                raw = socket.create_connection((address.host, address.port), timeout=min(self.timeout, 5.0))
                try:
                    sock = address.context.wrap_socket(raw, server_hostname=address.server_hostname)
                except (OSError, ssl.SSLError):
                    raw.close()
                    raise
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(min(self.timeout, 5.0))
                try:
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    raise
        except OSError as exc:  # ssl.SSLError is an OSError: a refused certificate lands here
            raise HostdUnavailable(f"hostd is not reachable at {self.path}: {exc}") from exc
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._frames.clear()
        self._stash.clear()
        self._decoder = FrameDecoder()  # a new connection starts a new stream of frames

    # ----- low level -----------------------------------------------------------------

    def send(self, op: str, args: dict[str, Any], data: bytes = b"", *, timeout: float | None = None) -> int:
        self.connect()
        assert self._sock is not None
        req_id = next(self._ids)
        try:
            frame = encode_frame(_request_header(req_id, op, args), data)
        except FrameError as exc:
            raise HostdRequestError("too_large", str(exc)) from exc
        self._sock.settimeout(timeout or self.timeout)
        try:
            self._sock.sendall(frame)
        except TimeoutError as exc:
            self.close()
            raise HostdTimeout("hostd is not accepting requests") from exc
        except OSError as exc:
            self.close()
            raise HostdUnavailable(f"hostd connection lost: {exc}") from exc
        return req_id

    def next_frame(self, deadline: float) -> Frame:
        while not self._frames:
            assert self._sock is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()  # the late answer would confuse the next request
                raise HostdTimeout("hostd did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(256 << 10)
            except TimeoutError:
                continue
            except OSError as exc:
                self.close()
                raise HostdUnavailable(f"hostd connection lost: {exc}") from exc
            if not chunk:
                self.close()
                raise HostdUnavailable("hostd closed the connection")
            try:
                self._frames = self._decoder.feed(chunk)
                for f in self._frames:
                    check_response(f.header)
            except FrameError as exc:
                self.close()
                raise HostdUnavailable(f"hostd sent a malformed frame: {exc}") from exc
        return self._frames.pop(0)

    def wait(self, req_id: int, timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """The answer to request ``req_id``. hostd answers pipelined requests in any order
        (file reads and writes run on its worker threads): answers to other requests that
        arrive first are kept for their own ``wait`` (at most ``STASH_FRAMES``; beyond that
        the oldest is dropped)."""
        stashed = self._stash.pop(req_id, None)
        if stashed is not None:
            return _raise_for(stashed)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            frame = self.next_frame(deadline)
            frame_id = frame.header.get("id")
            if frame_id == req_id:
                return _raise_for(frame)
            if isinstance(frame_id, int) and "ev" not in frame.header:
                if len(self._stash) >= STASH_FRAMES:
                    del self._stash[min(self._stash)]
                self._stash[frame_id] = frame

    def call(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """One hostd request: ``(result, data)``."""
        timeout = timeout or self.timeout
        return self.wait(self.send(op, args or {}, data, timeout=timeout), timeout)

    # ----- agent ---------------------------------------------------------------------

    def agent(
        self,
        vm_id: str,
        op: str,
        args: dict[str, Any] | None = None,
        data: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Forward one agent request (see guest_agents/PROTOCOL.md) to the VM's agent."""
        timeout = timeout or self.timeout
        return self.wait(self.agent_send(vm_id, op, args, data, timeout=timeout), timeout + 5)

    def agent_send(
        self, vm_id: str, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float
    ) -> int:
        """``agent``'s request, sent: its id for ``wait(id, timeout + 5)`` (other work can be
        done in between)."""
        request = {"vm_id": vm_id, "op": op, "args": args or {}, "timeout": timeout}
        return self.send("agent_call", request, data, timeout=timeout + 5)

    def exec_start(
        self, vm_id: str, args: dict[str, Any], data: bytes = b"", *, max_running: int, timeout: float | None = None
    ) -> dict[str, Any]:
        """The agent's ``exec_start`` unless ``max_running`` execs already run in the VM
        (``HostdRequestError`` ``exec_limit``; nothing started)."""
        timeout = timeout or self.timeout
        request = {"vm_id": vm_id, "args": args, "max_running": max_running, "timeout": timeout}
        return self.call("exec_start", request, data, timeout=timeout + 5)[0]

    def agent_wait(self, vm_id: str, *, timeout: float) -> dict[str, Any]:
        """Until the VM's agent answers ``ping`` (registers the VM with hostd)."""
        return self.call("agent_wait", {"vm_id": vm_id, "timeout": timeout}, timeout=timeout + 5)[0]

    def exec_stream(
        self, vm_id: str, exec_id: str, *, offset: int = 0, timeout: float = 60.0
    ) -> Iterator[dict[str, Any]]:
        """Yield ``{"ev": "out", "stream", "offset", "data"}`` ... then the ``exit`` (or
        ``end`` on error) event. ``timeout`` bounds each wait for the next event."""
        sub = next(self._subs)
        req_id = self.send("exec_attach", {"vm_id": vm_id, "exec_id": exec_id, "offset": offset, "sub": sub})
        attached = False
        try:
            while True:
                frame = self.next_frame(time.monotonic() + timeout)
                h = frame.header
                if h.get("id") == req_id:
                    _raise_for(frame)
                    attached = True
                    continue
                if h.get("sub") != sub:
                    continue
                yield {**h, "data": frame.data}
                if h["ev"] in ("exit", "end"):
                    return
        finally:
            if attached and self._sock is not None:
                with contextlib.suppress(HostdError):
                    self.send("stream_close", {"sub": sub})  # answer skipped by later waits

    # ----- files -----------------------------------------------------------------------

    def upload(
        self,
        vm_id: str,
        path: str,
        chunks: Iterable[bytes],
        *,
        mode: int | None = None,
        owner: str | None = None,
        overwrite: bool = True,
        max_bytes: int | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Stream ``chunks`` into ``path`` in the guest (temporary file, renamed into place
        when complete and the sha256 matches). Raises ``HostdRequestError`` with code
        ``too_large`` when more than ``max_bytes`` arrive; nothing is left in the guest then."""
        args: dict[str, Any] = {"path": path, "overwrite": overwrite}
        if mode is not None:
            args["mode"] = mode
        if owner:
            args["owner"] = owner
        handle = self.agent(vm_id, "file_write_open", args, timeout=timeout)[0]["handle"]
        hasher = hashlib.sha256()
        size = 0
        inflight: list[int] = []
        try:
            for piece in _rechunk(chunks, UPLOAD_CHUNK):
                size += len(piece)
                if max_bytes is not None and size > max_bytes:
                    raise HostdRequestError("too_large", f"upload exceeds the limit of {max_bytes} bytes")
                hasher.update(piece)
                inflight.append(
                    self.send(
                        "agent_call",
                        {"vm_id": vm_id, "op": "file_write", "args": {"handle": handle}, "timeout": timeout},
                        piece,
                    )
                )
                if len(inflight) >= TRANSFER_WINDOW:
                    self.wait(inflight.pop(0), timeout + 5)
            while inflight:
                self.wait(inflight.pop(0), timeout + 5)
            return self.agent(
                vm_id, "file_write_close", {"handle": handle, "sha256": hasher.hexdigest()}, timeout=timeout
            )[0]
        except BaseException:
            with contextlib.suppress(HostdError):
                for req in inflight:
                    self.wait(req, timeout + 5)
            with contextlib.suppress(HostdError):
                self.agent(vm_id, "file_write_abort", {"handle": handle}, timeout=10)
            raise

    def download_open(self, vm_id: str, path: str, *, timeout: float = 300.0) -> dict[str, Any]:
        """Open ``path`` for reading; the result has ``handle``, ``size``, ``mode`` and the
        ``sha256`` the guest computed first."""
        return self.agent(vm_id, "file_read_open", {"path": path, "sha256": True}, timeout=timeout)[0]

    def download_chunks(
        self, vm_id: str, handle: str, *, expected_sha256: str | None = None, timeout: float = 60.0
    ) -> Iterator[bytes]:
        """Yield the file's bytes; raises ``HostdRequestError`` (``checksum_mismatch``)
        at the end when they do not hash to ``expected_sha256``."""
        yield from _download(self, vm_id, handle, expected_sha256, timeout)

    # ----- host files (vms.hostd.blobs) ----------------------------------------------------

    def blob_stat(self, root: str, path: str, *, sha256: bool = True, timeout: float = 600.0) -> dict[str, Any]:
        """``{exists, size, sha256}`` of a file under one of hostd's roots (hashing a large
        file takes a while: ``timeout``)."""
        return self.call("blob_stat", {"root": root, "path": path, "sha256": sha256}, timeout=timeout)[0]

    def blob_chunks(self, root: str, path: str, size: int, *, timeout: float = 60.0) -> Iterator[bytes]:
        """Yield the first ``size`` bytes of a file in order, ``TRANSFER_WINDOW`` reads in
        flight; ``HostdRequestError`` ``size_mismatch`` when the file is shorter."""
        inflight: list[tuple[int, int]] = []
        offset = 0
        try:
            while offset < size or inflight:
                while offset < size and len(inflight) < TRANSFER_WINDOW:
                    length = min(MAX_DATA, size - offset)
                    args = {"root": root, "path": path, "offset": offset, "length": length}
                    inflight.append((self.send("blob_read", args, timeout=timeout), length))
                    offset += length
                req, length = inflight.pop(0)
                data = self.wait(req, timeout)[1]
                if len(data) != length:
                    raise HostdRequestError("size_mismatch", f"{path} ended early (changed while being read?)")
                yield data
        except BaseException:
            with contextlib.suppress(HostdError):
                for req, _ in inflight:
                    self.wait(req, timeout)
            raise

    def blob_put(
        self,
        root: str,
        path: str,
        chunks: Iterable[bytes],
        *,
        size: int,
        sha256: str,
        overwrite: bool = False,
        timeout: float = 60.0,
        commit_timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Write ``chunks`` (``size`` bytes in all) to a temporary file on hostd, then commit
        it under ``path`` when hostd finds the sha256 given (else ``checksum_mismatch``; it
        hashes the whole file: ``commit_timeout``); any failure aborts the transfer: nothing
        is left behind."""
        transfer = os.urandom(16).hex()
        ident = {"root": root, "path": path, "transfer": transfer}
        inflight: list[int] = []
        offset = 0
        try:
            for piece in _rechunk(chunks, MAX_DATA):
                if offset + len(piece) > size:
                    raise HostdRequestError("size_mismatch", f"more than the {size} bytes announced for {path}")
                inflight.append(self.send("blob_write", {**ident, "offset": offset, "size": size}, piece))
                offset += len(piece)
                if len(inflight) >= TRANSFER_WINDOW:
                    self.wait(inflight.pop(0), timeout)
            while inflight:
                self.wait(inflight.pop(0), timeout)
            if offset == 0:  # an empty file: its temporary file is made by one empty write
                self.wait(self.send("blob_write", {**ident, "offset": 0, "size": size}), timeout)
            commit = {**ident, "size": size, "sha256": sha256, "overwrite": overwrite}
            return self.call("blob_commit", commit, timeout=max(timeout, commit_timeout))[0]
        except BaseException:
            with contextlib.suppress(HostdError):
                for req in inflight:
                    self.wait(req, timeout)
            with contextlib.suppress(HostdError):
                self.call("blob_abort", ident, timeout=10)
            raise

    def blob_delete(self, root: str, path: str, *, timeout: float = 30.0) -> bool:
        """Delete a file (and its parent directories left empty); False when there was none."""
        return bool(self.call("blob_delete", {"root": root, "path": path}, timeout=timeout)[0].get("deleted"))


def _download(client: HostdClient, vm_id: str, handle: str, expected: str | None, timeout: float) -> Iterator[bytes]:
    hasher = hashlib.sha256()
    inflight: list[int] = []
    eof = False
    read = {"vm_id": vm_id, "op": "file_read", "args": {"handle": handle, "max": MAX_DATA}, "timeout": timeout}
    try:
        while True:
            while not eof and len(inflight) < TRANSFER_WINDOW:
                inflight.append(client.send("agent_call", read))
            if not inflight:
                break
            result, data = client.wait(inflight.pop(0), timeout + 5)
            if result.get("eof"):
                eof = True
                continue
            hasher.update(data)
            yield data
        final = client.agent(vm_id, "file_read_close", {"handle": handle}, timeout=timeout)[0]
    except BaseException:
        with contextlib.suppress(HostdError):
            for req in inflight:
                client.wait(req, timeout + 5)
            client.agent(vm_id, "file_read_close", {"handle": handle}, timeout=10)
        raise
    digest = hasher.hexdigest()
    if final.get("sha256") != digest or (expected is not None and expected != digest):
        raise HostdRequestError("checksum_mismatch", f"downloaded data has sha256 {digest}, expected {expected}")


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    buf = bytearray()
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


class Subscription:
    """Events of one stream (``exec_attach`` / ``console_attach``); async-iterable."""

    def __init__(self, client: AsyncHostdClient, sub: int, queue_frames: int = 64) -> None:
        self.client = client
        self.sub = sub
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=queue_frames)
        self.result: dict[str, Any] = {}

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self.queue.get()
            if frame is None:
                return
            if frame.header.get("ev") in ("exit", "end"):  # hostd's stream is over: forget it
                self.client._subs.pop(self.sub, None)
                yield frame
                return
            yield frame

    async def close(self) -> None:
        self.client._subs.pop(self.sub, None)
        with contextlib.suppress(HostdError):
            await self.client.call("stream_close", {"sub": self.sub}, timeout=5)


class AsyncHostdClient:
    """asyncio client: one connection, many concurrent requests and streams. A stream
    whose consumer stops reading stops the reader (its queue is bounded), which pushes
    back to hostd instead of buffering: use one client per websocket."""

    def __init__(self, path: Path | str | TlsAddress, *, timeout: float = 10.0) -> None:
        self.address = path
        self.path = str(path)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._sub_ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> AsyncHostdClient:
        try:
            address = self.address
            if isinstance(address, TlsAddress):
                opening = asyncio.open_connection(
                    address.host,
                    address.port,
                    ssl=address.context,
                    server_hostname=address.server_hostname,
                    ssl_handshake_timeout=5.0,
                    limit=1 << 16,
                )
            else:
                opening = asyncio.open_unix_connection(self.path, limit=1 << 16)
            self._reader, self._writer = await asyncio.wait_for(opening, 5.0)
        except (OSError, TimeoutError) as exc:
            raise HostdUnavailable(f"hostd is not reachable at {self.path}: {exc}") from exc
        self._task = asyncio.create_task(self._read_loop())
        return self

    async def __aenter__(self) -> AsyncHostdClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._fail(HostdUnavailable("client closed"))

    def _fail(self, exc: HostdError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for sub in list(self._subs.values()):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        self._subs.clear()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        decoder = FrameDecoder()
        try:
            while True:
                data = await self._reader.read(256 << 10)
                if not data:
                    break
                for frame in decoder.feed(data):
                    check_response(frame.header)
                    h = frame.header
                    if "ev" in h:
                        sub = self._subs.get(h["sub"])
                        if sub is not None:
                            await sub.queue.put(frame)
                        continue
                    fut = self._pending.pop(h.get("id", -1), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
        except (FrameError, OSError):
            pass
        finally:
            self._fail(HostdUnavailable("hostd connection lost"))

    async def call(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float | None = None
    ) -> tuple[dict[str, Any], bytes]:
        if self._writer is None:
            raise HostdUnavailable("not connected")
        timeout = timeout or self.timeout
        req_id = next(self._ids)
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self._writer.write(encode_frame(_request_header(req_id, op, args or {}), data))
            await asyncio.wait_for(self._writer.drain(), timeout)
            frame = await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            raise HostdTimeout(f"hostd did not answer {op} in time") from exc
        except FrameError as exc:
            raise HostdRequestError("too_large", str(exc)) from exc
        finally:
            self._pending.pop(req_id, None)
        return _raise_for(frame)

    async def agent(
        self,
        vm_id: str,
        op: str,
        args: dict[str, Any] | None = None,
        data: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        timeout = timeout or self.timeout
        return await self.call(
            "agent_call", {"vm_id": vm_id, "op": op, "args": args or {}, "timeout": timeout}, data, timeout=timeout + 5
        )

    async def _subscribe(self, op: str, args: dict[str, Any], queue_frames: int = 64) -> Subscription:
        sub = Subscription(self, next(self._sub_ids), queue_frames)
        self._subs[sub.sub] = sub
        try:
            sub.result = (await self.call(op, {**args, "sub": sub.sub}))[0]
        except BaseException:
            self._subs.pop(sub.sub, None)
            raise
        return sub

    async def exec_start(
        self, vm_id: str, args: dict[str, Any], data: bytes = b"", *, max_running: int, timeout: float | None = None
    ) -> dict[str, Any]:
        """``HostdClient.exec_start`` on the event loop."""
        timeout = timeout or self.timeout
        request = {"vm_id": vm_id, "args": args, "max_running": max_running, "timeout": timeout}
        return (await self.call("exec_start", request, data, timeout=timeout + 5))[0]

    async def exec_attach(self, vm_id: str, exec_id: str, *, offset: int = 0) -> Subscription:
        """Events: ``out`` (header ``stream``, ``offset``; data = bytes), then ``exit``
        (``result``, ``end_offset``) or ``end`` (``error``)."""
        return await self._subscribe("exec_attach", {"vm_id": vm_id, "exec_id": exec_id, "offset": offset})

    async def console_attach(self, vm_id: str, *, offset: int | None = None, queue_frames: int = 64) -> Subscription:
        """Events: ``console`` (header ``offset``; data = bytes), ``end`` when the VM stops.
        ``offset`` None = from the live end; negative = that many bytes back. At most
        ``queue_frames`` events wait here (each at most 256 KiB of console); then this
        client stops reading its socket and hostd's stream waits."""
        args: dict[str, Any] = {"vm_id": vm_id}
        if offset is not None:
            args["offset"] = offset
        return await self._subscribe("console_attach", args, queue_frames)

    async def console_write(self, vm_id: str, data: bytes) -> None:
        await self.call("console_write", {"vm_id": vm_id}, data)
