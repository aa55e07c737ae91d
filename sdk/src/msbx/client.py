"""The blocking client: ``Client``, ``Sandbox``, ``Operation``, ``Process``, ``Files``,
``Snapshot``, ``PortForwards``. ``msbx.aio`` has the same surface with coroutines."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

import httpx

from msbx import _flows as flows
from msbx._endpoints import WS_EXEC_START
from msbx._flows import OutputChunk, is_vm_id, vm_named
from msbx._http import RequestLog, RetryPolicy, SyncHttp, ws_error, ws_start_frame, ws_start_reply
from msbx.config import credentials_resolve
from msbx.errors import ApiError, CommandFailed, IntegrityError, SandboxError, Timeout, TransportError
from msbx.models import TRANSFER_CHUNK, ExecResult, TransferResult, create_body, exec_body, new_name

FileSource = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO, Iterator[bytes]]
Progress = Optional[Callable[[int, Optional[int]], Any]]

DEFAULT_BOOT_TIMEOUT = 600.0
EXEC_WAIT_MAX = 300.0  # the server answers a waiting exec after at most this (then polling)


class Client:
    """A connection to one server. ``url``/``token`` default to ``MSBX_URL``/``MSBX_TOKEN``,
    then the CLI's config file (``profile``). Every request has ``timeout`` seconds; 429/503
    answers and failed connections are retried ``retries`` times with backoff."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        profile: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        on_response: Callable[[RequestLog], None] | None = None,
    ) -> None:
        self.credentials = credentials_resolve(url, token, profile)
        self.http = SyncHttp(
            self.credentials,
            timeout=timeout,
            retry=RetryPolicy(retries=retries, backoff=backoff),
            transport=transport,
            on_response=on_response,
        )

    @property
    def url(self) -> str:
        return self.credentials.url

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, flow: flows.Flow) -> Any:
        return flows.run_sync(self.http, flow)

    # ----- sandboxes -----------------------------------------------------------------------
    def sandboxes(self, *, state: str | None = None, name: str | None = None, page_size: int = 50) -> Iterator[Sandbox]:
        """Every VM you can see, page by page (``state``: only that state; ``name``: names
        containing it, case-insensitive), filtered by the server."""
        params = {"state": state or None, "name": name or None}
        for data in self.http.pages("vm_list", page_size=page_size, params=params):
            yield Sandbox(self, data)

    def create_sandbox(
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
    ) -> Sandbox:
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
        data = self.http.json("vm_create", json=body)
        sandbox = Sandbox(self, data)
        sandbox.operation = Operation(self, {"id": data.get("operation"), "action": "create", "status": "queued"})
        if wait:
            sandbox.wait_ready(timeout=timeout, on_progress=on_progress, start=start)
        return sandbox

    def sandbox(self, ref: str) -> Sandbox:
        """A VM by id, or by exact name (looked up with the list's name filter; NotFound when
        no VM you can see has it, SandboxError when several do: use the id)."""
        if is_vm_id(ref):
            return Sandbox(self, self.http.json("vm_get", path={"id": ref}))
        return Sandbox(self, vm_named(ref, self.http.pages("vm_list", params={"name": ref})))

    def operation(self, op_id: str) -> Operation:
        return Operation(self, self.http.json("operation_get", path={"id": op_id}))

    def operations(self, *, vm: str | None = None, page_size: int = 50) -> Iterator[Operation]:
        if vm:
            pages = self.http.pages("vm_operations", path={"id": vm}, page_size=page_size)
        else:
            pages = self.http.pages("operation_list", page_size=page_size)
        for data in pages:
            yield Operation(self, data)

    def templates(self) -> list[dict[str, Any]]:
        return list(self.http.pages("template_list"))

    def me(self) -> dict[str, Any]:
        return self.http.json("user_me")

    def snapshots(self, *, vm: str | None = None) -> Iterator[Snapshot]:
        rows = self.http.json("vm_snapshot_list", path={"vm_id": vm}) if vm else self.http.pages("snapshot_list")
        for data in rows:
            yield Snapshot(self, data)

    def snapshot(self, snapshot_id: str) -> Snapshot:
        return Snapshot(self, self.http.json("snapshot_get", path={"id": snapshot_id}))


class Operation:
    """A long action (create, start, stop, snapshot, ...) run by a worker.
    ``wait(on_progress=)`` polls it until it succeeded (or raises ``OperationFailed``)."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
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
        return f"<Operation {self.action} {self.id} {self.status}>"

    def refresh(self) -> Operation:
        if self.id:
            self.data = self.client.http.json("operation_get", path={"id": self.id})
        return self

    def wait(
        self,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
        *,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
        poll: float = 0.5,
        raise_on_failure: bool = True,
    ) -> Operation:
        if not self.id or (self.done and not raise_on_failure):
            return self
        self.data = self.client._run(
            flows.operation_wait(
                self.id, timeout=timeout, poll=poll, on_progress=on_progress, raise_on_failure=raise_on_failure
            )
        )
        return self


class Sandbox:
    """One VM. ``Sandbox.create(...)`` boots one (and, used as a context manager, deletes it on
    exit); ``Sandbox.connect(id)`` uses an existing one."""

    def __init__(self, client: Client, data: dict[str, Any], *, owns_client: bool = False) -> None:
        self.client = client
        self.data = dict(data)
        self.operation: Operation | None = None
        self._owns_client = owns_client
        self.files = Files(self)
        self.port_forwards = PortForwards(self)

    # ----- construction --------------------------------------------------------------------
    @classmethod
    def create(
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
        client: Client | None = None,
        **client_options: Any,
    ) -> Sandbox:
        owns = client is None
        client = client or Client(**client_options)
        try:
            sandbox = client.create_sandbox(
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
                client.close()
            raise
        sandbox._owns_client = owns
        return sandbox

    @classmethod
    def connect(cls, vm_id: str, *, client: Client | None = None, **client_options: Any) -> Sandbox:
        owns = client is None
        client = client or Client(**client_options)
        try:
            sandbox = client.sandbox(vm_id)
        except BaseException:
            if owns:
                client.close()
            raise
        sandbox._owns_client = owns
        return sandbox

    @classmethod
    def list(
        cls, *, client: Client | None = None, state: str | None = None, **client_options: Any
    ) -> Iterator[Sandbox]:
        owner = client or Client(**client_options)
        try:
            yield from owner.sandboxes(state=state)
        finally:
            if client is None:
                owner.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.delete().wait(timeout=300)
        except SandboxError:
            if exc[0] is None:
                raise
        finally:
            self.close()

    def close(self) -> None:
        """Close the client when this sandbox made it (the VM keeps running)."""
        if self._owns_client:
            self.client.close()

    # ----- state ---------------------------------------------------------------------------
    id = property(lambda self: str(self.data["id"]))
    name = property(lambda self: self.data.get("name"))
    state = property(lambda self: self.data.get("state"))

    def __repr__(self) -> str:
        return f"<Sandbox {self.name} {self.id} {self.state}>"

    def refresh(self) -> Sandbox:
        self.data = self.client.http.json("vm_get", path={"id": self.id})
        return self

    def wait_until(self, *states: str, timeout: float | None = DEFAULT_BOOT_TIMEOUT) -> Sandbox:
        """Wait for one of ``states`` (``error`` raises unless asked for)."""
        self.data = self.client._run(flows.vm_wait_state(self.id, set(states), timeout=timeout))
        return self

    def wait_ready(
        self,
        *,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
        start: bool = True,
    ) -> Sandbox:
        deadline = flows._Deadline(timeout)
        if self.operation is not None and self.operation.id:
            self.operation.wait(timeout=timeout, on_progress=on_progress)
        return self.wait_until("running" if start else "stopped", timeout=deadline.left())

    # ----- lifecycle: each returns the Operation ------------------------------------------
    def _action(self, name: str, force: bool = False) -> Operation:
        op = Operation(
            self.client, self.client.http.json(f"vm_{name}", path={"id": self.id}, json={"force": force or None})
        )
        self.operation = op
        return op

    def start(self) -> Operation:
        return self._action("start")

    def stop(self, *, force: bool = False) -> Operation:
        return self._action("stop", force)

    def reboot(self, *, force: bool = False) -> Operation:
        return self._action("reboot", force)

    def pause(self) -> Operation:
        return self._action("pause")

    def resume(self) -> Operation:
        return self._action("resume")

    def delete(self) -> Operation:
        op = Operation(self.client, self.client.http.json("vm_delete", path={"id": self.id}))
        self.operation = op
        return op

    def move(self, host: str) -> Operation:
        """Operators: move the VM (stopped or running) to the host named ``host``; a running VM
        is stopped, moved with its disk and snapshots, and started there."""
        op = Operation(self.client, self.client.http.json("vm_move", path={"id": self.id}, json={"host": host}))
        self.operation = op
        return op

    def resize(self, *, vcpus: int | None = None, memory_mib: int | None = None) -> Operation:
        """Change vCPUs/memory: stopped VMs at once (a finished Operation), running ones where the
        driver can (else ``Conflict`` with code ``restart_required``)."""
        response = self.client.http.send(
            "vm_update", path={"id": self.id}, json={"vcpus": vcpus, "memory_mib": memory_mib}
        )
        body = response.json()
        if response.status_code == 202:
            op = Operation(self.client, body)
        else:
            self.data = body
            op = Operation(self.client, {"id": None, "action": "resize", "status": "succeeded", "progress": 100})
        self.operation = op
        return op

    def update(self, *, name: str | None = None, metadata: dict[str, Any] | None = None) -> Sandbox:
        self.data = self.client.http.json("vm_update", path={"id": self.id}, json={"name": name, "metadata": metadata})
        return self

    def operations(self) -> Iterator[Operation]:
        return self.client.operations(vm=self.id)

    def agent(self) -> dict[str, Any]:
        """Ping the guest agent (version, boot id, uptime)."""
        return self.client.http.json("vm_agent", path={"id": self.id})

    # ----- exec ----------------------------------------------------------------------------
    def exec(
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
        """Run a command. Without ``background``: wait for it and return an ``ExecResult``
        (``on_stdout``/``on_stderr`` get the output as it comes); ``check`` raises
        ``CommandFailed`` unless it exits 0. ``timeout`` kills the command's process tree in
        the guest (``timed_out``). With ``background``: return a ``Process`` at once."""
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
        streamed = self._exec_streamed(body, on_stdout, on_stderr) if streaming and not background else None
        if streamed is not None:
            result = streamed
        else:
            result = self._exec_rest(body, wait=wait, background=background, on_stdout=on_stdout, on_stderr=on_stderr)
            if background:
                return result
        if check and not result.ok:
            raise CommandFailed(
                f"command exited with {result.exit_code if result.exit_code is not None else result.signal}: "
                f"{result.stderr.strip()[-500:]}",
                result,
            )
        return result

    def _exec_streamed(
        self, body: dict[str, Any], on_stdout: Callable[[str], Any] | None, on_stderr: Callable[[str], Any] | None
    ) -> ExecResult | None:
        """Start the command on its own exec websocket and stream its output there (as it
        comes: no polling). None when no websocket opens (nothing was started: the caller goes
        over REST) or the client routes HTTP through a transport of its own. A socket lost after
        the start goes on over REST from the offset it reached (the guest keeps the output)."""
        from websockets.exceptions import WebSocketException

        if self.client.http.own_transport:
            return None
        path = WS_EXEC_START.format(id=self.id)
        try:
            ws = self.client.http.ws_connect(path)
        except (TransportError, ApiError):  # a refused handshake is a 403 whatever the reason: REST says
            return None
        reader = flows.ExecSocketReader(path, on_stdout, on_stderr)
        try:
            ws.send(ws_start_frame(body))
            while reader.result is None and reader.lost is None:
                try:
                    message = ws.recv(timeout=None if reader.exec_id else self.client.http.timeout)
                except (WebSocketException, OSError, TimeoutError) as exc:
                    if reader.exec_id is None:
                        raise ws_error(exc, path) from exc
                    break
                replies, notify = reader.take(message)
                for frame in replies:
                    with contextlib.suppress(WebSocketException, OSError):
                        ws.send(frame)
                for step in notify:
                    step.callback(*step.args)
        finally:
            ws.close()
        assert reader.exec_id is not None
        if reader.result is None:  # lost after the start: the rest over REST (never a second start)
            return Process(self, reader.exec_id).wait(
                on_stdout=on_stdout, on_stderr=on_stderr, offset=reader.flow.offset, prefix=reader.texts()
            )
        stdout, stderr = reader.texts().values()
        return ExecResult.from_api(reader.exec_id, reader.result, stdout, stderr)

    def _exec_rest(
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
        data = self.client.http.json("exec_create", path={"id": self.id}, json=body, timeout=http_timeout)
        process = Process(self, data["exec_id"])
        if background:
            return process
        if wait and not data.get("running"):
            result = ExecResult.from_api(data["exec_id"], data, data.get("stdout") or "", data.get("stderr") or "")
        elif wait:  # the server's wait limit: go on from where its answer ended
            result = process.wait(
                offset=int(data.get("end_offset") or 0),
                prefix={"stdout": data.get("stdout") or "", "stderr": data.get("stderr") or ""},
            )
        else:
            result = process.wait(on_stdout=on_stdout, on_stderr=on_stderr)
        return result

    def process(self, exec_id: str) -> Process:
        """A handle on an exec started earlier (e.g. by another program)."""
        return Process(self, exec_id)

    def processes(self, *, tag: str | None = None) -> builtins.list[dict[str, Any]]:
        return self.client.http.json("exec_list", path={"id": self.id}, params={"tag": tag})["results"]

    def pty(
        self,
        cmd: str | builtins.list[str] = "/bin/sh",
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> PtySession:
        """An interactive command on a pseudo-terminal, over the exec websocket."""
        merged = {"TERM": "xterm-256color", **(env or {})}
        body = exec_body(
            cmd, env=merged, cwd=cwd, user=user, wait=False, stdin_open=True, pty={"rows": rows, "cols": cols}
        )
        # One websocket that starts the command and carries it (no REST call before it).
        path = WS_EXEC_START.format(id=self.id)
        ws = self.client.http.ws_connect(path)
        try:
            ws.send(ws_start_frame(body))
            exec_id = None
            while exec_id is None:
                exec_id = ws_start_reply(ws.recv(timeout=self.client.http.timeout), path)
        except BaseException as exc:
            ws.close()
            if isinstance(exc, SandboxError) or not isinstance(exc, Exception):
                raise  # the API's error, or a cancellation / Ctrl-C: as it is
            raise ws_error(exc, path) from exc
        return PtySession(self, exec_id, ws)

    # ----- snapshots, console --------------------------------------------------------------
    def snapshot(
        self,
        name: str | None = None,
        *,
        description: str = "",
        include_memory: bool = True,
        wait: bool = True,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
    ) -> Snapshot:
        data = self.client.http.json(
            "vm_snapshot_create",
            path={"vm_id": self.id},
            json={"name": name or new_name("snap"), "description": description, "include_memory": include_memory},
        )
        snap = Snapshot(self.client, data)
        snap.operation = Operation(self.client, {"id": data.get("operation"), "action": "snapshot", "status": "queued"})
        if wait:
            snap.operation.wait(timeout=timeout)
            snap.refresh()
        return snap

    def snapshots(self) -> builtins.list[Snapshot]:
        return list(self.client.snapshots(vm=self.id))

    def console(self, *, offset: int | None = None) -> Console:
        """Attach to the serial console (a single-use ticket, then the console websocket)."""
        ticket = self.client.http.json("vm_console_ticket", path={"id": self.id})
        url = ticket["url"] + (f"&offset={offset}" if offset is not None else "")
        return Console(self.client.http.ws_connect(url))

    def console_log(self) -> bytes:
        return self.client.http.send("vm_console_log", path={"id": self.id}).content


class Process:
    """A command running in the background (``exec(..., background=True)``). Its output stays
    in the guest's bounded buffer and is read by byte offset, so iterators survive dropped
    connections and a handle can be made again later with ``sandbox.process(exec_id)``."""

    def __init__(self, sandbox: Sandbox, exec_id: str) -> None:
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.offset = 0  # where the last iterator stopped
        self.result: ExecResult | None = None

    def __repr__(self) -> str:
        return f"<Process {self.exec_id} on {self.sandbox.id}>"

    def _http(self) -> SyncHttp:
        return self.sandbox.client.http

    def output(
        self, *, offset: int | None = None, follow: bool = True, timeout: float | None = None
    ) -> Iterator[OutputChunk]:
        """``OutputChunk``s (stdout and stderr in the order written) from ``offset`` (default:
        where the previous iterator stopped) until the process ended (or, without ``follow``,
        until what exists now)."""
        flow = flows.exec_follow(
            self.sandbox.id,
            self.exec_id,
            offset=self.offset if offset is None else offset,
            follow=follow,
            timeout=timeout,
        )
        box: list[Any] = [None]
        for chunk in flows.iter_sync(self._http(), flow, result=box):
            self.offset = chunk.offset + len(chunk.data)
            yield chunk
        if box[0] is not None:
            self.offset = box[0][1]
            if box[0][0] is not None:
                self.result = ExecResult.from_api(self.exec_id, box[0][0])

    @property
    def stdout(self) -> Iterator[bytes]:
        """stdout bytes from the start, as they come."""
        return (c.data for c in self.output(offset=0) if c.stream != "stderr")

    @property
    def stderr(self) -> Iterator[bytes]:
        return (c.data for c in self.output(offset=0) if c.stream == "stderr")

    def wait(
        self,
        timeout: float | None = None,
        *,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        offset: int = 0,
        prefix: dict[str, str] | None = None,
    ) -> ExecResult:
        """Wait for the end; the result holds the output from ``offset`` (all that the buffer kept)."""
        result, out, err = self.sandbox.client._run(
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

    def poll(self) -> ExecResult | None:
        """The result if the process has ended, else None (reads no output)."""
        page = self._http().json(
            "exec_output", path={"id": self.sandbox.id, "exec_id": self.exec_id}, params={"offset": 0, "limit": 1}
        )
        if page.get("running") or page.get("result") is None:
            return None
        return ExecResult.from_api(self.exec_id, page["result"])

    def write(self, data: str | bytes, *, eof: bool = False) -> None:
        """Send to stdin (the process was started with stdin open: ``background`` without ``stdin``)."""
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        self._http().json(
            "exec_stdin", path={"id": self.sandbox.id, "exec_id": self.exec_id}, json={"data": text, "eof": eof or None}
        )

    def close_stdin(self) -> None:
        self.write("", eof=True)

    def signal(self, signal: str | int = "TERM") -> None:
        self._http().json(
            "exec_signal", path={"id": self.sandbox.id, "exec_id": self.exec_id}, json={"signal": str(signal)}
        )

    def kill(self) -> None:
        """SIGKILL to the whole process tree."""
        self.signal("KILL")


class PtySession:
    """An interactive command on a pseudo-terminal: ``recv()`` output bytes, ``send()``
    keystrokes, ``resize()``; ``result`` once it exited."""

    def __init__(self, sandbox: Sandbox, exec_id: str, ws: Any) -> None:
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.ws = ws
        self.result: ExecResult | None = None
        self.flow = flows.ExecWindow()
        self._lock = threading.Lock()

    @property
    def offset(self) -> int:
        """Output bytes received so far (the exec's offset)."""
        return self.flow.offset

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next output bytes; None once the command exited (see ``result``). Raises
        ``Timeout`` after ``timeout`` seconds without output. Acknowledges what it received
        (the server's flow control), so output never stops for want of an ack."""
        from websockets.exceptions import ConnectionClosed, WebSocketException

        while True:
            try:
                message = self.ws.recv(timeout=timeout)
            except TimeoutError as exc:
                raise Timeout(f"no output from exec {self.exec_id} for {timeout} s") from exc
            except ConnectionClosed as exc:
                if self.result is not None:
                    return None
                raise ws_error(exc, self.exec_id) from exc
            if isinstance(message, bytes):
                ack = self.flow.received(len(message) - 1)
                if ack is not None:
                    # The server may have closed after the exit (still buffered here): the next
                    # recv returns it, or raises what the socket's end means.
                    with self._lock, contextlib.suppress(WebSocketException, OSError):
                        self.ws.send(ack)
                return message[1:]
            control = self.flow.control(message)
            kind = control.get("type")
            if kind == "exit":
                self.result = ExecResult.from_api(self.exec_id, control.get("result"))
                return None
            elif kind == "error":
                raise SandboxError(f"exec {self.exec_id}: {control.get('code')}: {control.get('message')}")

    def send(self, data: str | bytes) -> None:
        with self._lock:
            self.ws.send(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, rows: int, cols: int) -> None:
        with self._lock:
            self.ws.send(json.dumps({"type": "resize", "rows": int(rows), "cols": int(cols)}))

    def signal(self, signal: str = "INT") -> None:
        with self._lock:
            self.ws.send(json.dumps({"type": "signal", "signal": signal}))

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> PtySession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Console:
    """The VM's serial console: ``recv()`` bytes (scrollback first, then live), ``send()``
    keystrokes (when you hold the writer role; ``takeover()`` claims it). Acknowledges what it
    received, so the server's flow-control window never stalls."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.offset = 0
        self.window = 2 << 20  # the server's, from its hello
        self._acked = 0
        self._lock = threading.Lock()
        self.notices: list[dict[str, Any]] = []  # role changes, gaps and errors the server sent

    @property
    def writer(self) -> bool:
        return bool(self.hello.get("writer"))

    def recv(self, timeout: float | None = None) -> bytes | None:
        """Next console bytes; None when the server closed the console."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = self.ws.recv(timeout=timeout)
            except TimeoutError as exc:
                raise Timeout(f"no console output for {timeout} s") from exc
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code in (1000, 1001):
                    return None
                raise ws_error(exc, "console") from exc
            if isinstance(message, bytes):
                self.offset += len(message)
                if self.offset - self._acked >= flows.console_ack_every(self.window):
                    self._ack()
                return message
            control = json.loads(message)
            kind = control.get("type")
            if kind == "hello":
                self.hello = control
                self.offset = self._acked = int(control.get("offset") or 0)
                self.window = int(control.get("window") or self.window)
            elif kind == "ping":
                self._ack()
            elif kind == "role":
                self.hello["writer"] = control.get("writer")
                self.notices.append(control)
            elif kind in ("gap", "error"):
                self.notices.append(control)
                if kind == "gap":
                    self.offset = int(control.get("to") or self.offset)

    def _ack(self) -> None:
        with self._lock:
            self.ws.send(json.dumps({"type": "ack", "offset": self.offset}))
        self._acked = self.offset

    def send(self, data: str | bytes) -> None:
        with self._lock:
            self.ws.send(data.encode() if isinstance(data, str) else bytes(data))

    def takeover(self) -> None:
        with self._lock:
            self.ws.send(json.dumps({"type": "takeover"}))

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _chunks_of(source: FileSource) -> Any:
    """(factory of a chunk iterator, size or None, replayable) for an upload source. A replayable
    factory can be called again to send the upload again after a retry; a pipe or an iterator
    can be read once."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        blob = bytes(source)
        return (lambda: (blob[i : i + TRANSFER_CHUNK] for i in range(0, len(blob), TRANSFER_CHUNK))), len(blob), True
    if isinstance(source, (str, os.PathLike)):
        local = Path(source)
        size = local.stat().st_size

        def from_file() -> Iterator[bytes]:
            with local.open("rb") as handle:
                while True:
                    piece = handle.read(TRANSFER_CHUNK)
                    if not piece:
                        return
                    yield piece

        return from_file, size, True
    if hasattr(source, "read"):
        handle: Any = source
        size: int | None = None
        start: int | None = None
        try:
            start = handle.tell()
            size = os.fstat(handle.fileno()).st_size - start
        except (OSError, AttributeError, io.UnsupportedOperation):
            pass

        def from_handle() -> Iterator[bytes]:
            if start is not None:
                handle.seek(start)
            while True:
                piece = handle.read(TRANSFER_CHUNK)
                if not piece:
                    return
                yield piece

        return from_handle, (size if start is not None else None), start is not None
    return (lambda: iter(source)), None, False


class _Hashing:
    """Wraps a chunk iterator: sha256 and byte count of what was actually sent."""

    def __init__(self, chunks: Any, size: int | None, on_progress: Progress) -> None:
        self.chunks = chunks
        self.size = size
        self.on_progress = on_progress
        self.digest = hashlib.sha256()
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.chunks:
            piece = bytes(piece)
            self.digest.update(piece)
            self.sent += len(piece)
            if self.on_progress is not None:
                self.on_progress(self.sent, self.size)
            yield piece


class Files:
    """Files in the guest. Transfers are streamed in chunks (nothing holds a whole file) and
    checked end to end with sha256."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def _http(self) -> SyncHttp:
        return self.sandbox.client.http

    def write(
        self,
        path: str,
        data: FileSource,
        *,
        mode: int | None = None,
        owner: str | None = None,
        overwrite: bool = True,
        on_progress: Progress = None,
        timeout: float | None = 3600.0,
    ) -> TransferResult:
        """Write ``data`` (bytes, a local path, a binary file or an iterator of bytes) to ``path``
        atomically; raises ``IntegrityError`` if the guest's sha256 differs from what was sent."""
        factory, size, replayable = _chunks_of(data)
        holder: list[_Hashing] = []

        def body() -> Iterator[bytes]:
            hashing = _Hashing(factory(), size, on_progress)
            holder[:] = [hashing]
            return iter(hashing)

        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        answer = (
            self._http()
            .send(
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
            .json()
        )
        sent = holder[-1]
        local = sent.digest.hexdigest()
        if answer.get("sha256") != local:
            raise IntegrityError(f"upload of {path}: guest has sha256 {answer.get('sha256')}, sent {local}")
        return TransferResult(answer.get("path", path), int(answer.get("size", sent.sent)), local)

    def iter_read(self, path: str, *, on_progress: Progress = None, timeout: float | None = 3600.0) -> Iterator[bytes]:
        """The file's bytes in chunks; raises ``IntegrityError`` at the end if the bytes do not
        match the checksum the guest computed (the file changed while being read)."""
        response = self._http().send(
            "file_download", path={"id": self.sandbox.id}, params={"path": path}, stream=True, timeout=timeout
        )
        try:
            expected = response.headers.get("X-Checksum-Sha256")
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            got = 0
            try:
                for piece in response.iter_bytes(TRANSFER_CHUNK):
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
            response.close()

    def read(self, path: str, **kwargs: Any) -> bytes:
        """The whole file in memory (use ``download`` or ``iter_read`` for big files)."""
        return b"".join(self.iter_read(path, **kwargs))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def download(self, path: str, dest: str | os.PathLike | BinaryIO, **kwargs: Any) -> TransferResult:
        """Stream the file to a local path (written atomically) or a binary file object."""
        digest = hashlib.sha256()
        size = 0
        if hasattr(dest, "write"):
            for piece in self.iter_read(path, **kwargs):
                dest.write(piece)  # type: ignore[union-attr]
                digest.update(piece)
                size += len(piece)
            return TransferResult(str(path), size, digest.hexdigest())
        target = Path(dest)  # type: ignore[arg-type]
        tmp = target.with_name(f".{target.name}.msbx-part")
        try:
            with tmp.open("wb") as handle:
                for piece in self.iter_read(path, **kwargs):
                    handle.write(piece)
                    digest.update(piece)
                    size += len(piece)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return TransferResult(str(target), size, digest.hexdigest())

    def stat(self, path: str) -> dict[str, Any]:
        return self._http().json("file_stat", path={"id": self.sandbox.id}, params={"path": path})

    def exists(self, path: str) -> bool:
        from msbx.errors import NotFound

        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def list(self, path: str, *, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        return self._http().json("file_list", path={"id": self.sandbox.id}, params={"path": path, "limit": limit})[
            "entries"
        ]

    def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = True) -> dict[str, Any]:
        return self._http().json(
            "file_mkdir", path={"id": self.sandbox.id}, json={"path": path, "mode": mode, "parents": parents}
        )

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._http().json(
            "file_remove", path={"id": self.sandbox.id}, params={"path": path, "recursive": recursive or None}
        )


class PortForwards:
    """Host ports forwarded to the guest (``list``, ``create``, ``delete``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def list(self) -> builtins.list[dict[str, Any]]:
        return self.sandbox.client.http.json("port_forward_list", path={"vm_id": self.sandbox.id})

    def create(self, guest_port: int, *, host_port: int | None = None, protocol: str = "tcp") -> dict[str, Any]:
        return self.sandbox.client.http.json(
            "port_forward_create",
            path={"vm_id": self.sandbox.id},
            json={"guest_port": guest_port, "host_port": host_port, "protocol": protocol},
        )

    def delete(self, forward_id: int | str) -> None:
        self.sandbox.client.http.json("port_forward_delete", path={"vm_id": self.sandbox.id, "id": forward_id})


class Snapshot:
    """A saved VM (disk, optionally memory): ``restore()`` puts its VM back, ``clone(n)``
    starts new VMs from it."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client = client
        self.data = dict(data)
        self.operation: Operation | None = None

    id = property(lambda self: str(self.data["id"]))
    name = property(lambda self: self.data.get("name"))
    state = property(lambda self: self.data.get("state"))

    def __repr__(self) -> str:
        return f"<Snapshot {self.name} {self.id} {self.state}>"

    def refresh(self) -> Snapshot:
        self.data = self.client.http.json("snapshot_get", path={"id": self.id})
        return self

    def restore(self) -> Operation:
        return Operation(self.client, self.client.http.json("snapshot_restore", path={"id": self.id}))

    def clone(
        self,
        count: int = 1,
        *,
        name_prefix: str | None = None,
        wait: bool = True,
        timeout: float | None = DEFAULT_BOOT_TIMEOUT,
    ) -> list[Sandbox]:
        """``count`` new VMs from this snapshot (running once ``wait`` returns)."""
        body = self.client.http.json(
            "snapshot_clone", path={"id": self.id}, json={"count": count, "name_prefix": name_prefix}
        )
        clones = []
        for data in body["vms"]:
            sandbox = Sandbox(self.client, data)
            sandbox.operation = Operation(
                self.client, {"id": data.get("operation"), "action": "clone", "status": "queued"}
            )
            clones.append(sandbox)
        if wait:
            for sandbox in clones:
                sandbox.wait_ready(timeout=timeout)
        return clones

    def delete(self) -> None:
        self.data = self.client.http.json("snapshot_delete", path={"id": self.id}) or self.data
