"""The asyncio client: the same surface as ``msbx.client`` with coroutines and async
iterators (``AsyncClient``, ``AsyncSandbox``, ...). Multi-request logic (waiting for
operations, following exec output) is shared with the blocking client (``msbx._flows``)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO, Callable

import httpx

from msbx import _flows as flows
from msbx._endpoints import WS_EXEC_START
from msbx._flows import OutputChunk, is_vm_id, vm_named
from msbx._http import AsyncHttp, RequestLog, RetryPolicy, ws_error, ws_start_frame, ws_start_reply
from msbx.client import DEFAULT_BOOT_TIMEOUT, EXEC_WAIT_MAX, FileSource, Progress, _chunks_of
from msbx.config import credentials_resolve
from msbx.errors import ApiError, CommandFailed, IntegrityError, NotFound, SandboxError, Timeout, TransportError
from msbx.models import TRANSFER_CHUNK, ExecResult, TransferResult, create_body, exec_body, new_name


class AsyncClient:
    """See ``msbx.Client``; every method is a coroutine (listings are async iterators)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        profile: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: Callable[[RequestLog], None] | None = None,
    ) -> None:
        self.credentials = credentials_resolve(url, token, profile)
        self.http = AsyncHttp(
            self.credentials,
            timeout=timeout,
            retry=RetryPolicy(retries=retries, backoff=backoff),
            transport=transport,
            on_response=on_response,
        )

    @property
    def url(self) -> str:
        return self.credentials.url

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _run(self, flow: flows.Flow) -> Any:
        return await flows.run_async(self.http, flow)

    async def sandboxes(
        self, *, state: str | None = None, name: str | None = None, page_size: int = 50
    ) -> AsyncIterator[AsyncSandbox]:
        """Every VM you can see, page by page (``state``: only that state; ``name``: names
        containing it, case-insensitive), filtered by the server."""
        params = {"state": state or None, "name": name or None}
        async for data in self.http.pages("vm_list", page_size=page_size, params=params):
            yield AsyncSandbox(self, data)

    async def create_sandbox(
        self,
        *,
        template: str,
        name: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        disk_gib: int | None = None,
        metadata: dict[str, Any] | None = None,
        start: bool = True,
        wait: bool = True,
        timeout: float = DEFAULT_BOOT_TIMEOUT,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
        host: str | None = None,
        anti_affinity: bool = False,
        project: str | None = None,
    ) -> AsyncSandbox:
        body = create_body(
            template=template,
            name=name,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
            metadata=metadata,
            start=start,
            host=host,
            anti_affinity=anti_affinity,
            project=project,
        )
        data = await self.http.json("vm_create", json=body)
        sandbox = AsyncSandbox(self, data)
        sandbox.operation = AsyncOperation(self, {"id": data.get("operation"), "action": "create", "status": "queued"})
        if wait:
            await sandbox.wait_ready(timeout=timeout, on_progress=on_progress, start=start)
        return sandbox

    async def sandbox(self, ref: str) -> AsyncSandbox:
        """A VM by id, or by exact name (looked up with the list's name filter; NotFound when
        no VM you can see has it, SandboxError when several do: use the id)."""
        if is_vm_id(ref):
            return AsyncSandbox(self, await self.http.json("vm_get", path={"id": ref}))
        rows = [row async for row in self.http.pages("vm_list", params={"name": ref})]
        return AsyncSandbox(self, vm_named(ref, rows))

    async def operation(self, op_id: str) -> AsyncOperation:
        return AsyncOperation(self, await self.http.json("operation_get", path={"id": op_id}))

    async def operations(self, *, vm: str | None = None, page_size: int = 50) -> AsyncIterator[AsyncOperation]:
        if vm:
            pages = self.http.pages("vm_operations", path={"id": vm}, page_size=page_size)
        else:
            pages = self.http.pages("operation_list", page_size=page_size)
        async for data in pages:
            yield AsyncOperation(self, data)

    async def templates(self) -> list[dict[str, Any]]:
        return [row async for row in self.http.pages("template_list")]

    async def me(self) -> dict[str, Any]:
        return await self.http.json("user_me")

    async def snapshots(self, *, vm: str | None = None) -> AsyncIterator[AsyncSnapshot]:
        if vm:
            for data in await self.http.json("vm_snapshot_list", path={"vm_id": vm}):
                yield AsyncSnapshot(self, data)
            return
        async for data in self.http.pages("snapshot_list"):
            yield AsyncSnapshot(self, data)

    async def snapshot(self, snapshot_id: str) -> AsyncSnapshot:
        return AsyncSnapshot(self, await self.http.json("snapshot_get", path={"id": snapshot_id}))


class AsyncOperation:
    def __init__(self, client: AsyncClient, data: dict[str, Any]) -> None:
        self.client = client
        self.data = dict(data)

    id = property(lambda self: self.data.get("id"))
    action = property(lambda self: self.data.get("action"))
    status = property(lambda self: self.data.get("status"))
    progress = property(lambda self: self.data.get("progress"))
    error = property(lambda self: self.data.get("error"))

    @property
    def done(self) -> bool:
        return self.status in flows.OPERATION_DONE

    def __repr__(self) -> str:
        return f"<AsyncOperation {self.action} {self.id} {self.status}>"

    async def refresh(self) -> AsyncOperation:
        if self.id:
            self.data = await self.client.http.json("operation_get", path={"id": self.id})
        return self

    async def wait(
        self,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
        *,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
        poll: float = 0.5,
        raise_on_failure: bool = True,
    ) -> AsyncOperation:
        if not self.id or (self.done and not raise_on_failure):
            return self
        self.data = await self.client._run(
            flows.operation_wait(
                self.id, timeout=timeout, poll=poll, on_progress=on_progress, raise_on_failure=raise_on_failure
            )
        )
        return self


class AsyncSandbox:
    """See ``msbx.Sandbox``. ``async with await AsyncSandbox.create(...) as sb:`` deletes on exit."""

    def __init__(self, client: AsyncClient, data: dict[str, Any], *, owns_client: bool = False) -> None:
        self.client = client
        self.data = dict(data)
        self.operation: AsyncOperation | None = None
        self._owns_client = owns_client
        self.files = AsyncFiles(self)
        self.port_forwards = AsyncPortForwards(self)

    @classmethod
    async def create(
        cls,
        *,
        template: str = "linux-default",
        name: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        disk_gib: int | None = None,
        metadata: dict[str, Any] | None = None,
        wait: bool = True,
        timeout: float = DEFAULT_BOOT_TIMEOUT,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
        client: AsyncClient | None = None,
        **client_options: Any,
    ) -> AsyncSandbox:
        owns = client is None
        client = client or AsyncClient(**client_options)
        try:
            sandbox = await client.create_sandbox(
                template=template,
                name=name,
                vcpus=vcpus,
                memory_mib=memory_mib,
                disk_gib=disk_gib,
                metadata=metadata,
                wait=wait,
                timeout=timeout,
                on_progress=on_progress,
            )
        except BaseException:
            if owns:
                await client.close()
            raise
        sandbox._owns_client = owns
        return sandbox

    @classmethod
    async def connect(cls, vm_id: str, *, client: AsyncClient | None = None, **client_options: Any) -> AsyncSandbox:
        owns = client is None
        client = client or AsyncClient(**client_options)
        try:
            sandbox = await client.sandbox(vm_id)
        except BaseException:
            if owns:
                await client.close()
            raise
        sandbox._owns_client = owns
        return sandbox

    @classmethod
    async def list(
        cls, *, client: AsyncClient | None = None, state: str | None = None, **client_options: Any
    ) -> AsyncIterator[AsyncSandbox]:
        owner = client or AsyncClient(**client_options)
        try:
            async for sandbox in owner.sandboxes(state=state):
                yield sandbox
        finally:
            if client is None:
                await owner.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await (await self.delete()).wait(timeout=300)
        except SandboxError:
            if exc[0] is None:
                raise
        finally:
            await self.close()

    async def close(self) -> None:
        if self._owns_client:
            await self.client.close()

    id = property(lambda self: str(self.data["id"]))
    name = property(lambda self: self.data.get("name"))
    state = property(lambda self: self.data.get("state"))

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.name} {self.id} {self.state}>"

    async def refresh(self) -> AsyncSandbox:
        self.data = await self.client.http.json("vm_get", path={"id": self.id})
        return self

    async def wait_until(self, *states: str, timeout: float | None = DEFAULT_BOOT_TIMEOUT) -> AsyncSandbox:
        self.data = await self.client._run(flows.vm_wait_state(self.id, set(states), timeout=timeout))
        return self

    async def wait_ready(
        self,
        *,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
        start: bool = True,
    ) -> AsyncSandbox:
        deadline = flows._Deadline(timeout)
        if self.operation is not None and self.operation.id:
            await self.operation.wait(timeout=timeout, on_progress=on_progress)
        return await self.wait_until("running" if start else "stopped", timeout=deadline.left())

    async def _action(self, name: str, force: bool = False) -> AsyncOperation:
        data = await self.client.http.json(f"vm_{name}", path={"id": self.id}, json={"force": force or None})
        self.operation = AsyncOperation(self.client, data)
        return self.operation

    async def start(self) -> AsyncOperation:
        return await self._action("start")

    async def stop(self, *, force: bool = False) -> AsyncOperation:
        return await self._action("stop", force)

    async def reboot(self, *, force: bool = False) -> AsyncOperation:
        return await self._action("reboot", force)

    async def pause(self) -> AsyncOperation:
        return await self._action("pause")

    async def resume(self) -> AsyncOperation:
        return await self._action("resume")

    async def delete(self) -> AsyncOperation:
        self.operation = AsyncOperation(self.client, await self.client.http.json("vm_delete", path={"id": self.id}))
        return self.operation

    async def move(self, host: str) -> AsyncOperation:
        """Operators: move the VM to the host named ``host`` (see ``Sandbox.move``)."""
        data = await self.client.http.json("vm_move", path={"id": self.id}, json={"host": host})
        self.operation = AsyncOperation(self.client, data)
        return self.operation

    async def resize(self, *, vcpus: int | None = None, memory_mib: int | None = None) -> AsyncOperation:
        response = await self.client.http.send(
            "vm_update", path={"id": self.id}, json={"vcpus": vcpus, "memory_mib": memory_mib}
        )
        body = response.json()
        if response.status_code == 202:
            op = AsyncOperation(self.client, body)
        else:
            self.data = body
            op = AsyncOperation(self.client, {"id": None, "action": "resize", "status": "succeeded", "progress": 100})
        self.operation = op
        return op

    async def update(self, *, name: str | None = None, metadata: dict[str, Any] | None = None) -> AsyncSandbox:
        self.data = await self.client.http.json(
            "vm_update", path={"id": self.id}, json={"name": name, "metadata": metadata}
        )
        return self

    def operations(self) -> AsyncIterator[AsyncOperation]:
        return self.client.operations(vm=self.id)

    async def agent(self) -> dict[str, Any]:
        return await self.client.http.json("vm_agent", path={"id": self.id})

    async def exec(
        self,
        cmd: str | builtins.list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        check: bool = False,
        background: bool = False,
        tag: str | None = None,
        buffer_bytes: int | None = None,
    ) -> Any:
        """See ``Sandbox.exec``; callbacks may be coroutine functions."""
        streaming = on_stdout is not None or on_stderr is not None
        wait = not (background or streaming)
        body = exec_body(
            cmd,
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin,
            stdin_open=background and stdin is None,
            wait=wait,
            tag=tag,
            buffer_bytes=buffer_bytes,
        )
        streamed = await self._exec_streamed(body, on_stdout, on_stderr) if streaming and not background else None
        if streamed is not None:
            result = streamed
        else:
            result = await self._exec_rest(
                body, wait=wait, background=background, on_stdout=on_stdout, on_stderr=on_stderr
            )
            if background:
                return result
        if check and not result.ok:
            raise CommandFailed(
                f"command exited with {result.exit_code if result.exit_code is not None else result.signal}: "
                f"{result.stderr.strip()[-500:]}",
                result,
            )
        return result

    async def _exec_streamed(
        self, body: dict[str, Any], on_stdout: Callable[[str], Any] | None, on_stderr: Callable[[str], Any] | None
    ) -> ExecResult | None:
        """See ``Sandbox._exec_streamed``; callbacks may be coroutine functions."""
        from websockets.exceptions import WebSocketException

        if self.client.http.own_transport:
            return None
        path = WS_EXEC_START.format(id=self.id)
        try:
            ws = await self.client.http.ws_connect(path)
        except (TransportError, ApiError):  # a refused handshake is a 403 whatever the reason: REST says
            return None
        reader = flows.ExecSocketReader(path, on_stdout, on_stderr)
        try:
            await ws.send(ws_start_frame(body))
            while reader.result is None and reader.lost is None:
                try:
                    message = await asyncio.wait_for(ws.recv(), None if reader.exec_id else self.client.http.timeout)
                except (WebSocketException, OSError, asyncio.TimeoutError) as exc:
                    if reader.exec_id is None:
                        raise ws_error(exc, path) from exc
                    break
                replies, notify = reader.take(message)
                for frame in replies:
                    with contextlib.suppress(WebSocketException, OSError):
                        await ws.send(frame)
                for step in notify:
                    outcome = step.callback(*step.args)
                    if inspect.isawaitable(outcome):
                        await outcome
        finally:
            await ws.close()
        assert reader.exec_id is not None
        if reader.result is None:  # lost after the start: the rest over REST (never a second start)
            return await AsyncProcess(self, reader.exec_id).wait(
                on_stdout=on_stdout, on_stderr=on_stderr, offset=reader.flow.offset, prefix=reader.texts()
            )
        stdout, stderr = reader.texts().values()
        return ExecResult.from_api(reader.exec_id, reader.result, stdout, stderr)

    async def _exec_rest(
        self,
        body: dict[str, Any],
        *,
        wait: bool,
        background: bool,
        on_stdout: Callable[[str], Any] | None,
        on_stderr: Callable[[str], Any] | None,
    ) -> Any:
        timeout = body.get("timeout")
        http_timeout = (min(timeout, EXEC_WAIT_MAX) if timeout else EXEC_WAIT_MAX) + 30 if wait else None
        data = await self.client.http.json("exec_create", path={"id": self.id}, json=body, timeout=http_timeout)
        process = AsyncProcess(self, data["exec_id"])
        if background:
            return process
        if wait and not data.get("running"):
            result = ExecResult.from_api(data["exec_id"], data, data.get("stdout") or "", data.get("stderr") or "")
        elif wait:
            result = await process.wait(
                offset=int(data.get("end_offset") or 0),
                prefix={"stdout": data.get("stdout") or "", "stderr": data.get("stderr") or ""},
            )
        else:
            result = await process.wait(on_stdout=on_stdout, on_stderr=on_stderr)
        return result

    def process(self, exec_id: str) -> AsyncProcess:
        return AsyncProcess(self, exec_id)

    async def processes(self, *, tag: str | None = None) -> builtins.list[dict[str, Any]]:
        return (await self.client.http.json("exec_list", path={"id": self.id}, params={"tag": tag}))["results"]

    async def pty(
        self,
        cmd: str | builtins.list[str] = "/bin/sh",
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncPtySession:
        merged = {"TERM": "xterm-256color", **(env or {})}
        body = exec_body(
            cmd, env=merged, cwd=cwd, user=user, wait=False, stdin_open=True, pty={"rows": rows, "cols": cols}
        )
        # One websocket that starts the command and carries it (no REST call before it).
        path = WS_EXEC_START.format(id=self.id)
        ws = await self.client.http.ws_connect(path)
        try:
            await ws.send(ws_start_frame(body))
            exec_id = None
            while exec_id is None:
                message = await asyncio.wait_for(ws.recv(), self.client.http.timeout)
                exec_id = ws_start_reply(message, path)
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, SandboxError) or not isinstance(exc, Exception):
                raise  # the API's error, or a cancellation / Ctrl-C: as it is
            raise ws_error(exc, path) from exc
        return AsyncPtySession(self, exec_id, ws)

    async def snapshot(
        self,
        name: str | None = None,
        *,
        description: str = "",
        include_memory: bool = True,
        wait: bool = True,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
    ) -> AsyncSnapshot:
        data = await self.client.http.json(
            "vm_snapshot_create",
            path={"vm_id": self.id},
            json={"name": name or new_name("snap"), "description": description, "include_memory": include_memory},
        )
        snap = AsyncSnapshot(self.client, data)
        snap.operation = AsyncOperation(
            self.client, {"id": data.get("operation"), "action": "snapshot", "status": "queued"}
        )
        if wait:
            await snap.operation.wait(timeout=timeout)
            await snap.refresh()
        return snap

    async def snapshots(self) -> builtins.list[AsyncSnapshot]:
        return [snap async for snap in self.client.snapshots(vm=self.id)]

    async def console(self, *, offset: int | None = None) -> AsyncConsole:
        ticket = await self.client.http.json("vm_console_ticket", path={"id": self.id})
        url = ticket["url"] + (f"&offset={offset}" if offset is not None else "")
        return AsyncConsole(await self.client.http.ws_connect(url))

    async def console_log(self) -> bytes:
        return (await self.client.http.send("vm_console_log", path={"id": self.id})).content


class AsyncProcess:
    """See ``msbx.Process``."""

    def __init__(self, sandbox: AsyncSandbox, exec_id: str) -> None:
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.offset = 0
        self.result: ExecResult | None = None

    def __repr__(self) -> str:
        return f"<AsyncProcess {self.exec_id} on {self.sandbox.id}>"

    def _http(self) -> AsyncHttp:
        return self.sandbox.client.http

    async def output(
        self, *, offset: int | None = None, follow: bool = True, timeout: float | None = None
    ) -> AsyncIterator[OutputChunk]:
        flow = flows.exec_follow(
            self.sandbox.id,
            self.exec_id,
            offset=self.offset if offset is None else offset,
            follow=follow,
            timeout=timeout,
        )
        box: list[Any] = [None]
        async for chunk in flows.iter_async(self._http(), flow, result=box):
            self.offset = chunk.offset + len(chunk.data)
            yield chunk
        if box[0] is not None:
            self.offset = box[0][1]
            if box[0][0] is not None:
                self.result = ExecResult.from_api(self.exec_id, box[0][0])

    @property
    async def stdout(self) -> AsyncIterator[bytes]:  # type: ignore[misc]
        async for chunk in self.output(offset=0):
            if chunk.stream != "stderr":
                yield chunk.data

    @property
    async def stderr(self) -> AsyncIterator[bytes]:  # type: ignore[misc]
        async for chunk in self.output(offset=0):
            if chunk.stream == "stderr":
                yield chunk.data

    async def wait(
        self,
        timeout: float | None = None,
        *,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        offset: int = 0,
        prefix: dict[str, str] | None = None,
    ) -> ExecResult:
        result, out, err = await self.sandbox.client._run(
            flows.exec_collect(
                self.sandbox.id,
                self.exec_id,
                offset=offset,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                prefix=prefix,
            )
        )
        self.result = ExecResult.from_api(self.exec_id, result, out, err)
        return self.result

    async def poll(self) -> ExecResult | None:
        page = await self._http().json(
            "exec_output", path={"id": self.sandbox.id, "exec_id": self.exec_id}, params={"offset": 0, "limit": 1}
        )
        if page.get("running") or page.get("result") is None:
            return None
        return ExecResult.from_api(self.exec_id, page["result"])

    async def write(self, data: str | bytes, *, eof: bool = False) -> None:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        await self._http().json(
            "exec_stdin", path={"id": self.sandbox.id, "exec_id": self.exec_id}, json={"data": text, "eof": eof or None}
        )

    async def close_stdin(self) -> None:
        await self.write("", eof=True)

    async def signal(self, signal: str | int = "TERM") -> None:
        await self._http().json(
            "exec_signal", path={"id": self.sandbox.id, "exec_id": self.exec_id}, json={"signal": str(signal)}
        )

    async def kill(self) -> None:
        await self.signal("KILL")


class AsyncPtySession:
    """See ``msbx.PtySession``."""

    def __init__(self, sandbox: AsyncSandbox, exec_id: str, ws: Any) -> None:
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.ws = ws
        self.result: ExecResult | None = None
        self.flow = flows.ExecWindow()

    @property
    def offset(self) -> int:
        """Output bytes received so far (the exec's offset)."""
        return self.flow.offset

    async def recv(self, timeout: float | None = None) -> bytes | None:
        from websockets.exceptions import ConnectionClosed, WebSocketException

        while True:
            try:
                message = await asyncio.wait_for(self.ws.recv(), timeout)
            except asyncio.TimeoutError as exc:
                raise Timeout(f"no output from exec {self.exec_id} for {timeout} s") from exc
            except ConnectionClosed as exc:
                if self.result is not None:
                    return None
                raise ws_error(exc, self.exec_id) from exc
            if isinstance(message, bytes):
                ack = self.flow.received(len(message) - 1)
                if ack is not None:
                    with contextlib.suppress(WebSocketException, OSError):  # closed after the exit: see PtySession
                        await self.ws.send(ack)
                return message[1:]
            control = self.flow.control(message)
            kind = control.get("type")
            if kind == "exit":
                self.result = ExecResult.from_api(self.exec_id, control.get("result"))
                return None
            elif kind == "error":
                raise SandboxError(f"exec {self.exec_id}: {control.get('code')}: {control.get('message')}")

    def __aiter__(self) -> AsyncPtySession:
        return self

    async def __anext__(self) -> bytes:
        data = await self.recv()
        if data is None:
            raise StopAsyncIteration
        return data

    async def send(self, data: str | bytes) -> None:
        await self.ws.send(data.encode() if isinstance(data, str) else bytes(data))

    async def resize(self, rows: int, cols: int) -> None:
        await self.ws.send(json.dumps({"type": "resize", "rows": int(rows), "cols": int(cols)}))

    async def signal(self, signal: str = "INT") -> None:
        await self.ws.send(json.dumps({"type": "signal", "signal": signal}))

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> AsyncPtySession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncConsole:
    """The serial console as an async byte stream: ``async for data in console``,
    ``await console.send(b"...")``. Acknowledges what it received (flow control)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.offset = 0
        self.window = 2 << 20  # the server's, from its hello
        self._acked = 0
        self.notices: list[dict[str, Any]] = []

    @property
    def writer(self) -> bool:
        return bool(self.hello.get("writer"))

    async def recv(self, timeout: float | None = None) -> bytes | None:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = await asyncio.wait_for(self.ws.recv(), timeout)
            except asyncio.TimeoutError as exc:
                raise Timeout(f"no console output for {timeout} s") from exc
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code in (1000, 1001):
                    return None
                raise ws_error(exc, "console") from exc
            if isinstance(message, bytes):
                self.offset += len(message)
                if self.offset - self._acked >= flows.console_ack_every(self.window):
                    await self._ack()
                return message
            control = json.loads(message)
            kind = control.get("type")
            if kind == "hello":
                self.hello = control
                self.offset = self._acked = int(control.get("offset") or 0)
                self.window = int(control.get("window") or self.window)
            elif kind == "ping":
                await self._ack()
            elif kind == "role":
                self.hello["writer"] = control.get("writer")
                self.notices.append(control)
            elif kind in ("gap", "error"):
                self.notices.append(control)
                if kind == "gap":
                    self.offset = int(control.get("to") or self.offset)

    async def _ack(self) -> None:
        await self.ws.send(json.dumps({"type": "ack", "offset": self.offset}))
        self._acked = self.offset

    def __aiter__(self) -> AsyncConsole:
        return self

    async def __anext__(self) -> bytes:
        data = await self.recv()
        if data is None:
            raise StopAsyncIteration
        return data

    async def send(self, data: str | bytes) -> None:
        await self.ws.send(data.encode() if isinstance(data, str) else bytes(data))

    async def takeover(self) -> None:
        await self.ws.send(json.dumps({"type": "takeover"}))

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> AsyncConsole:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncFiles:
    """See ``msbx.Files``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self.sandbox = sandbox

    def _http(self) -> AsyncHttp:
        return self.sandbox.client.http

    async def write(
        self,
        path: str,
        data: FileSource | AsyncIterator[bytes],
        *,
        mode: int | None = None,
        owner: str | None = None,
        overwrite: bool = True,
        on_progress: Progress = None,
        timeout: float | None = 3600.0,
    ) -> TransferResult:
        if hasattr(data, "__aiter__"):
            factory, size, replayable = (lambda: data), None, False
        else:
            factory, size, replayable = _chunks_of(data)  # type: ignore[arg-type]
        digests = [hashlib.sha256()]
        counted = [0]

        async def body() -> AsyncIterator[bytes]:
            digest = digests[0] = hashlib.sha256()  # a replay after a retry starts over
            counted[0] = 0
            source: Any = factory()
            if hasattr(source, "__aiter__"):
                async for piece in source:
                    yield self._count(piece, digest, counted, size, on_progress)
            else:
                # A file or a pipe: each read runs in a thread, so a slow source (a pipe that
                # waits for its writer, a slow disk) never stalls the event loop.
                chunks = iter(source)
                while (piece := await asyncio.to_thread(next, chunks, None)) is not None:
                    yield self._count(piece, digest, counted, size, on_progress)

        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        response = await self._http().send(
            "file_upload",
            path={"id": self.sandbox.id},
            params={
                "path": path,
                "mode": f"{mode:o}" if mode is not None else None,
                "owner": owner,
                "overwrite": overwrite,
            },
            content=body if replayable else body(),
            headers=headers,
            timeout=timeout,
        )
        answer = response.json()
        local = digests[0].hexdigest()
        if answer.get("sha256") != local:
            raise IntegrityError(f"upload of {path}: guest has sha256 {answer.get('sha256')}, sent {local}")
        return TransferResult(answer.get("path", path), int(answer.get("size", counted[0])), local)

    @staticmethod
    def _count(
        piece: bytes, digest: Any, counted: builtins.list[int], size: int | None, on_progress: Progress
    ) -> bytes:
        piece = bytes(piece)
        digest.update(piece)
        counted[0] += len(piece)
        if on_progress is not None:
            on_progress(counted[0], size)
        return piece

    async def iter_read(
        self, path: str, *, on_progress: Progress = None, timeout: float | None = 3600.0
    ) -> AsyncIterator[bytes]:
        response = await self._http().send(
            "file_download", path={"id": self.sandbox.id}, params={"path": path}, stream=True, timeout=timeout
        )
        try:
            expected = response.headers.get("X-Checksum-Sha256")
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            got = 0
            try:
                async for piece in response.aiter_bytes(TRANSFER_CHUNK):
                    digest.update(piece)
                    got += len(piece)
                    if on_progress is not None:
                        on_progress(got, total)
                    yield piece
            except httpx.HTTPError as exc:
                raise TransportError(f"download of {path} broke off after {got} bytes: {exc}") from exc
            if expected and digest.hexdigest() != expected:
                raise IntegrityError(f"download of {path}: sha256 {digest.hexdigest()} != {expected} ({got} bytes)")
        finally:
            await response.aclose()

    async def read(self, path: str, **kwargs: Any) -> bytes:
        return b"".join([piece async for piece in self.iter_read(path, **kwargs)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def download(self, path: str, dest: str | os.PathLike | BinaryIO, **kwargs: Any) -> TransferResult:
        digest = hashlib.sha256()
        size = 0
        # Writes run in a thread: a slow disk or a full pipe never stalls the event loop.
        if hasattr(dest, "write"):
            async for piece in self.iter_read(path, **kwargs):
                await asyncio.to_thread(dest.write, piece)  # type: ignore[union-attr]
                digest.update(piece)
                size += len(piece)
            return TransferResult(str(path), size, digest.hexdigest())
        target = Path(dest)  # type: ignore[arg-type]
        tmp = target.with_name(f".{target.name}.msbx-part")
        try:
            with tmp.open("wb") as handle:
                async for piece in self.iter_read(path, **kwargs):
                    await asyncio.to_thread(handle.write, piece)
                    digest.update(piece)
                    size += len(piece)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return TransferResult(str(target), size, digest.hexdigest())

    async def stat(self, path: str) -> dict[str, Any]:
        return await self._http().json("file_stat", path={"id": self.sandbox.id}, params={"path": path})

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def list(self, path: str, *, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        answer = await self._http().json(
            "file_list", path={"id": self.sandbox.id}, params={"path": path, "limit": limit}
        )
        return answer["entries"]

    async def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = True) -> dict[str, Any]:
        return await self._http().json(
            "file_mkdir", path={"id": self.sandbox.id}, json={"path": path, "mode": mode, "parents": parents}
        )

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._http().json(
            "file_remove", path={"id": self.sandbox.id}, params={"path": path, "recursive": recursive or None}
        )


class AsyncPortForwards:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self.sandbox = sandbox

    async def list(self) -> builtins.list[dict[str, Any]]:
        return await self.sandbox.client.http.json("port_forward_list", path={"vm_id": self.sandbox.id})

    async def create(self, guest_port: int, *, host_port: int | None = None, protocol: str = "tcp") -> dict[str, Any]:
        return await self.sandbox.client.http.json(
            "port_forward_create",
            path={"vm_id": self.sandbox.id},
            json={"guest_port": guest_port, "host_port": host_port, "protocol": protocol},
        )

    async def delete(self, forward_id: int | str) -> None:
        await self.sandbox.client.http.json("port_forward_delete", path={"vm_id": self.sandbox.id, "id": forward_id})


class AsyncSnapshot:
    def __init__(self, client: AsyncClient, data: dict[str, Any]) -> None:
        self.client = client
        self.data = dict(data)
        self.operation: AsyncOperation | None = None

    id = property(lambda self: str(self.data["id"]))
    name = property(lambda self: self.data.get("name"))
    state = property(lambda self: self.data.get("state"))

    def __repr__(self) -> str:
        return f"<AsyncSnapshot {self.name} {self.id} {self.state}>"

    async def refresh(self) -> AsyncSnapshot:
        self.data = await self.client.http.json("snapshot_get", path={"id": self.id})
        return self

    async def restore(self) -> AsyncOperation:
        return AsyncOperation(self.client, await self.client.http.json("snapshot_restore", path={"id": self.id}))

    async def clone(
        self,
        count: int = 1,
        *,
        name_prefix: str | None = None,
        wait: bool = True,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
    ) -> list[AsyncSandbox]:
        body = await self.client.http.json(
            "snapshot_clone", path={"id": self.id}, json={"count": count, "name_prefix": name_prefix}
        )
        clones = []
        for data in body["vms"]:
            sandbox = AsyncSandbox(self.client, data)
            sandbox.operation = AsyncOperation(
                self.client, {"id": data.get("operation"), "action": "clone", "status": "queued"}
            )
            clones.append(sandbox)
        if wait:
            await asyncio.gather(*(sandbox.wait_ready(timeout=timeout) for sandbox in clones))
        return clones

    async def delete(self) -> None:
        self.data = await self.client.http.json("snapshot_delete", path={"id": self.id}) or self.data
