"""The host daemon (``manage.py hostd``): one per hypervisor host, asyncio, no Django.

It holds the one connection to each running VM's guest agent and serial console and
multiplexes every local client (web processes, Celery workers, benchmarks) onto them
over a Unix socket, speaking the same framing as the agent (see docs/hostd.md).

VMs are found by scanning the runtime directory (a sub-directory with ``spec.json`` and
a live VMM pid) every ``scan_seconds``, or registered explicitly with ``vm_register``.
A restarted hostd finds and re-attaches to every running VM the same way.

Bounds: requests in flight per client (``MAX_CLIENT_INFLIGHT``), per agent (see
agent_link), one exec stream holds at most its credit window, console streams read
from the ring/log through their own cursor, and a client that does not read for
``CLIENT_STALL_SECONDS`` is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vms.hostd import metrics as hostd_metrics
from vms.hostd import tls
from vms.hostd.agent_link import AgentLink, AgentUnavailable, LinkBudget
from vms.hostd.blobs import BlobStore
from vms.hostd.console import (
    SERIAL_LOG,
    STREAM_CHUNK,
    STREAM_READ,
    ConsoleLink,
    ConsoleUnavailable,
    NotALog,
    log_read,
)
from vms.hostd.errors import HostdError
from vms.hostd.logcontext import log_context, log_context_set
from vms.hostd.running_execs import RunningExecs
from vms.vmm.agent_client import AGENT_SOCKET, AgentError, AgentRequestError, AgentTimeout, AgentTransport
from vms.vmm.agent_protocol import MAX_DATA, Frame, FrameDecoder, FrameError, encode_frame, encode_frame_head
from vms.vmm.process import running_vmm_pid

logger = logging.getLogger("vms.hostd")

HOSTD_VERSION = "1"
MAX_CLIENT_INFLIGHT = 64
MAX_CLIENT_STREAMS = 256
CLIENT_STALL_SECONDS = 60.0
EXEC_WINDOW = 256 << 10  # agent -> hostd credit per exec stream
SPLIT_WRITE_BYTES = 64 << 10  # frames with more data go out as header, then data
DEFAULT_AGENT_TIMEOUT = 30.0
MAX_AGENT_TIMEOUT = 3900.0


@dataclass(frozen=True)
class HostdConfig:
    runtime_dir: Path
    socket_path: Path
    console_ring_bytes: int = 1 << 20
    scan_seconds: float = 2.0
    agent_budget: LinkBudget = LinkBudget()
    console_log_max_bytes: int = 16 << 20
    metrics_port: int = 0  # 0: no metrics listener
    metrics_bind: str = "127.0.0.1"
    socket_group: str = ""  # a group that may use the socket too (0660), e.g. the web's user
    # A TCP listener for other hosts' web and worker processes: mutual TLS only (vms.hostd.tls).
    tls_listen: str = ""  # "host:port"; empty: the Unix socket only
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Directories whose files the blob ops read and write (vms.hostd.blobs), by root name; the
    # runtime directory is always the root "runtime".
    blob_roots: Mapping[str, Path] = field(default_factory=dict)


def _is_cloud_hypervisor(runtime_dir: Path, pid: int | None) -> bool:
    # The VMM's command line says which it is even before its sockets exist (a scan may
    # attach between the spawn and the API socket's creation, e.g. right after a restore).
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
    except OSError:
        cmdline = b""
    if cmdline:
        return b"--api-socket" in cmdline
    return (runtime_dir / "api.sock").exists() and not (runtime_dir / "qmp.sock").exists()


class VmHandle:
    """What hostd holds for one VM: its agent link and console."""

    def __init__(self, vm_id: str, runtime_dir: Path, pid: int | None, config: HostdConfig) -> None:
        self.vm_id = vm_id
        self.runtime_dir = runtime_dir
        self.pid = pid
        cloud_hypervisor = _is_cloud_hypervisor(runtime_dir, pid)
        transport = AgentTransport.HYBRID_VSOCK if cloud_hypervisor else AgentTransport.VIRTIO_SERIAL
        self.agent = AgentLink(vm_id, runtime_dir / AGENT_SOCKET, transport, budget=config.agent_budget)
        self.console = ConsoleLink(
            vm_id,
            runtime_dir,
            ring_bytes=config.console_ring_bytes,
            qemu_log=not cloud_hypervisor,
            log_max_bytes=config.console_log_max_bytes,
        )
        self.execs = RunningExecs()

    async def agent_request(
        self, op: str, args: dict[str, Any], data: bytes = b"", *, timeout: float
    ) -> tuple[dict[str, Any], bytes]:
        """One agent request; what its answer says about execs starting or ending is noted
        (``RunningExecs``)."""
        result, out = await self.agent.request(op, args, data, timeout=timeout)
        session = self.agent.sessions
        if op == "exec_start":
            self.execs.started(session, result.get("exec_id"))
        elif op in ("exec_wait", "exec_get", "exec_read"):
            self.execs.seen(session, result)
        elif op == "exec_list":
            self.execs.listed(session, result)
        return result, out

    async def exec_start_capped(
        self, args: dict[str, Any], data: bytes, *, max_running: int, timeout: float
    ) -> tuple[dict[str, Any], bytes]:
        """``exec_start`` unless ``max_running`` execs already run in this VM (``exec_limit``)."""
        async with self.execs.lock:
            session = self.agent.sessions

            async def exec_list() -> dict[str, Any]:
                return (await self.agent.request("exec_list", {}, timeout=min(timeout, 10.0)))[0]

            running = await self.execs.count(session, max_running, exec_list)
            if running >= max_running:
                raise HostdError(
                    "exec_limit", f"{running} commands run in this VM; at most {max_running} may run at once"
                )
            return await self.agent_request("exec_start", args, data, timeout=timeout)

    def start(self) -> None:
        self.agent.start()
        self.console.start()

    async def stop(self) -> None:
        await self.agent.stop()
        await self.console.stop()

    def status(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "pid": self.pid,
            "transport": self.agent.transport.value,
            "agent": self.agent.status(),
            "console": self.console.status(),
        }


class HostDaemon:
    def __init__(self, config: HostdConfig) -> None:
        self.config = config
        self.vms: dict[str, VmHandle] = {}
        self.sessions: set[ClientSession] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tls_server: asyncio.Server | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.started = time.monotonic()
        self.blobs = BlobStore({"runtime": config.runtime_dir, **config.blob_roots})

    async def start(self) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: only root (our processes) may use it
        try:
            self._server = await asyncio.start_unix_server(self._on_client, path=str(path), limit=1 << 16)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        if self.config.socket_group:
            # The web process runs unprivileged (deploy/systemd): its group may connect.
            group = self.config.socket_group
            shutil.chown(path, group=int(group) if group.isdigit() else group)
            os.chmod(path, 0o660)
        if self.config.tls_listen:
            await self._tls_start()
        await self.scan()
        self._scan_task = asyncio.create_task(self._scan_loop(), name="hostd-scan")
        # After the VMs are attached again (walking the image and snapshot trees takes a while).
        self._sweep_task = asyncio.create_task(self._sweep(), name="hostd-blob-sweep")
        hostd_metrics.metrics_serve(
            self.config.metrics_port, self.config.metrics_bind, lambda: [vm.status() for vm in list(self.vms.values())]
        )
        logger.info("hostd listening on %s; %d running VM(s) attached", path, len(self.vms))

    async def _sweep(self) -> None:
        swept = await asyncio.get_running_loop().run_in_executor(None, self.blobs.sweep)
        if swept:
            logger.info("removed %d unfinished file transfer(s) of a previous run", swept)

    async def _tls_start(self) -> None:
        """Listen for remote clients: TLS 1.3 with a CA-signed client certificate, or nothing
        (a handshake that fails never reaches a session)."""
        config = self.config
        if not (config.tls_cert and config.tls_key and config.tls_ca):
            raise ValueError("a TLS listener needs its certificate, key and the CA (tls_cert, tls_key, tls_ca)")
        host, port = tls.parse_listen(config.tls_listen, any_port=True)
        context = tls.server_context(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
        self._tls_server = await asyncio.start_server(
            self._on_client, host=host, port=port, ssl=context, ssl_handshake_timeout=10.0, limit=1 << 16
        )
        logger.info("hostd listening on %s:%s (mutual TLS)", host, port)

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's port (after ``start``; useful with port 0)."""
        if self._tls_server is None or not self._tls_server.sockets:
            return None
        return int(self._tls_server.sockets[0].getsockname()[1])

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopped.set)
        await self._stopped.wait()
        await self.stop()

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Until ``request_stop`` (or a signal under ``run_forever``)."""
        await self._stopped.wait()

    async def stop(self) -> None:
        for task in (self._scan_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._server is not None:
            self._server.close()
        if self._tls_server is not None:
            self._tls_server.close()
        pending = [task for session in self.sessions for task in (*session.streams.values(), *session.tasks)]
        for session in list(self.sessions):
            session.close()
        if pending:  # let cancelled streams finish (one may be in a worker-thread log read)
            await asyncio.wait(pending, timeout=2.0)
        for vm in list(self.vms.values()):
            await vm.stop()
        self.vms.clear()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
        logger.info("hostd stopped (running VMs keep running)")

    # ----- discovery ------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_seconds)
            try:
                await self.scan()
            except Exception:
                logger.exception("runtime directory scan failed")

    async def scan(self) -> None:
        """Attach to VMs whose VMM runs; detach from those whose VMM is gone."""
        found = await asyncio.get_running_loop().run_in_executor(None, _scan_runtime, self.config.runtime_dir)
        for vm_id, (runtime_dir, pid) in found.items():
            current = self.vms.get(vm_id)
            if current is None:
                self._attach(vm_id, runtime_dir, pid)
            elif current.pid != pid:
                # A restore replaces the VMM under the same sockets; the links notice the old
                # one's exit and may well have reconnected to the new one before this scan:
                # only connections that still belong to another VMM are reset.
                logger.info("vm %s: VMM restarted (pid %s -> %s)", vm_id, current.pid, pid)
                current.pid = pid
                if current.agent.kick_unless(pid):
                    logger.info("vm %s: agent connection belonged to another VMM; reconnecting", vm_id)
                if current.console.kick_unless(pid):
                    logger.info("vm %s: console connection belonged to another VMM; reconnecting", vm_id)
        for vm_id in [v for v in self.vms if v not in found]:
            logger.info("vm %s: VMM gone; detaching", vm_id)
            await self.vms.pop(vm_id).stop()

    def _attach(self, vm_id: str, runtime_dir: Path, pid: int | None) -> VmHandle:
        # Callers look the VM up, await a pid check, then attach: another caller (the scan, a
        # concurrent request) may have attached meanwhile. A second handle would open a second
        # agent connection that QEMU's one-client socket never serves, and orphan the first.
        existing = self.vms.get(vm_id)
        if existing is not None:
            return existing
        handle = VmHandle(vm_id, runtime_dir, pid, self.config)
        self.vms[vm_id] = handle
        # The links outlive the request that attached them: their tasks start in a context of
        # their own, so their log lines carry this VM's id, not that request's.
        contextvars.Context().run(_start_in_own_context, handle)
        logger.info("vm %s: attached (pid %s, %s)", vm_id, pid, handle.agent.transport.value)
        return handle

    async def vm(self, vm_id: str, *, register: bool = True) -> VmHandle:
        handle = self.vms.get(vm_id)
        if handle is not None:
            return handle
        runtime_dir = self.config.runtime_dir / vm_id
        if register and "/" not in vm_id and vm_id not in (".", ".."):
            pid = await asyncio.get_running_loop().run_in_executor(None, running_vmm_pid, runtime_dir)
            if pid is not None:
                return self._attach(vm_id, runtime_dir, pid)
        raise HostdError("vm_not_running", f"no running VMM for VM {vm_id} on this host")

    # ----- clients --------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = ClientSession(self, reader, writer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            session.close()


def _start_in_own_context(handle: VmHandle) -> None:
    log_context_set(vm_id=handle.vm_id)
    handle.start()


def _scan_runtime(root: Path) -> dict[str, tuple[Path, int | None]]:
    found: dict[str, tuple[Path, int | None]] = {}
    try:
        entries = list(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not (entry / "spec.json").is_file():
            continue
        pid = running_vmm_pid(entry)
        if pid is not None:
            found[entry.name] = (entry, pid)
    return found


class ClientSession:
    """One local client connection. Requests run concurrently (bounded); streams push
    events. Every write to the client goes through ``send``; streams wait for ``drain``."""

    def __init__(self, daemon: HostDaemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_CLIENT_INFLIGHT)
        self.closed = False

    async def run(self) -> None:
        decoder = FrameDecoder()
        try:
            while not self.closed:
                data = await self.reader.read(256 << 10)
                if not data:
                    return
                for frame in decoder.feed(data):
                    await self.slots.acquire()  # back-pressure: stop reading while saturated
                    task = asyncio.create_task(self._handle(frame))
                    self.tasks.add(task)
                    task.add_done_callback(self._done)
        except FrameError as exc:
            logger.warning("client sent a malformed frame (%s); closing it", exc)
        except (ConnectionError, OSError):
            pass

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self.streams.values()) + list(self.tasks):
            task.cancel()
        self.writer.close()

    def send(self, header: dict[str, Any], data: bytes | memoryview = b"") -> None:
        if self.closed:
            return
        if len(data) < SPLIT_WRITE_BYTES:
            self.writer.write(encode_frame(header, data))
        else:  # two writes (the socket takes both at once) instead of copying the data once more
            self.writer.write(encode_frame_head(header, data))
            self.writer.write(data)

    async def drain(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), CLIENT_STALL_SECONDS)
        except TimeoutError:
            logger.warning("client stopped reading for %.0fs; disconnecting it", CLIENT_STALL_SECONDS)
            self.close()
            raise
        except (ConnectionError, OSError):
            self.close()
            raise

    async def _handle(self, frame: Frame) -> None:
        h = frame.header
        # The request id of the web request or task that sent this (clients add it), for logs.
        request = h.get("request")
        args = h.get("args", {})
        vm_id = args.get("vm_id") if isinstance(args, dict) else None
        with log_context(
            request_id=request if isinstance(request, str) and len(request) <= 64 else None,
            vm_id=vm_id if isinstance(vm_id, str) and len(vm_id) <= 64 else None,
        ):
            await self._handle_in_context(frame, h, args)

    async def _handle_in_context(self, frame: Frame, h: dict[str, Any], args: Any) -> None:
        req_id = h.get("id")
        op = h.get("op")
        try:
            if not isinstance(op, str) or not isinstance(args, dict):
                raise HostdError("bad_request", "a request needs a string 'op' and an object 'args'")
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise HostdError("unknown_op", f"unknown op {op!r}")
            result, data = await handler(args, frame.data)
            hostd_metrics.CLIENT_REQUESTS.labels(op, "ok").inc()
            if req_id is not None:
                self.send({"id": req_id, "ok": True, "result": result}, data)
        except asyncio.CancelledError:
            raise
        except HostdError as exc:
            if exc.code != "unknown_op":  # not a label per junk op name
                hostd_metrics.CLIENT_REQUESTS.labels(str(op)[:32], exc.code).inc()
            self._error(req_id, exc.code, exc.message)
        except AgentRequestError as exc:
            self._error(
                req_id, exc.code, str(exc.details.get("message", "")) if isinstance(exc.details, dict) else exc.message
            )
        except AgentUnavailable as exc:
            self._error(req_id, "agent_unavailable", exc.message)
        except AgentTimeout as exc:
            self._error(req_id, "agent_timeout", exc.message)
        except AgentError as exc:
            self._error(req_id, "agent_error", exc.message)
        except ConsoleUnavailable as exc:
            self._error(req_id, "console_unavailable", str(exc))
        except FrameError as exc:
            self._error(req_id, "too_large", str(exc))
        except Exception as exc:
            logger.exception("request %s failed", op)
            self._error(req_id, "internal", f"{type(exc).__name__}: {exc}")

    def _error(self, req_id: object, code: str, message: str) -> None:
        if req_id is not None:
            self.send({"id": req_id, "ok": False, "error": {"code": code, "message": message}})

    # ----- ops --------------------------------------------------------------------------

    async def op_hello(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {"hostd_version": HOSTD_VERSION, "pid": os.getpid(), "vms": len(self.daemon.vms)}, b""

    async def op_vm_list(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return {"vms": [vm.status() for vm in self.daemon.vms.values()]}, b""

    async def op_vm_register(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        vm = await self.daemon.vm(_str(args, "vm_id"))
        return vm.status(), b""

    async def op_vm_status(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        vm = await self.daemon.vm(_str(args, "vm_id"))
        return vm.status(), b""

    async def op_agent_call(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """Forward one request to the VM's agent: ``{"vm_id", "op", "args", "timeout"}``."""
        vm = await self.daemon.vm(_str(args, "vm_id"))
        op = _str(args, "op")
        if op in ("hello", "exec_attach", "exec_credit", "exec_detach"):
            raise HostdError("bad_request", f"{op} is managed by hostd (use exec_attach on hostd)")
        timeout = _timeout(args)
        agent_args = args.get("args", {})
        if not isinstance(agent_args, dict):
            raise HostdError("bad_request", "args must be an object")
        return await vm.agent_request(op, agent_args, data, timeout=timeout)

    async def op_exec_start(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """The agent's ``exec_start`` (``args``; data = stdin) unless ``max_running`` execs
        already run in the VM: then ``exec_limit``, and nothing starts. Capped starts of one VM
        are serialised; usually no other guest request is needed (``RunningExecs``)."""
        vm = await self.daemon.vm(_str(args, "vm_id"))
        agent_args = args.get("args", {})
        if not isinstance(agent_args, dict):
            raise HostdError("bad_request", "args must be an object")
        max_running = _int(args, "max_running")
        if max_running < 1:
            raise HostdError("bad_request", "max_running must be at least 1")
        return await vm.exec_start_capped(agent_args, data, max_running=max_running, timeout=_timeout(args))

    async def op_agent_wait(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """Wait until the agent answers ``ping`` (boot), at most ``timeout`` seconds."""
        vm_id = _str(args, "vm_id")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _timeout(args)
        last = ""
        while loop.time() < deadline:
            try:
                vm = await self.daemon.vm(vm_id)
                return await vm.agent.request("ping", {}, timeout=max(0.1, deadline - loop.time()))
            except HostdError as exc:
                last = exc.message
            except (AgentUnavailable, AgentTimeout) as exc:
                last = exc.message
            await asyncio.sleep(0.2)
        raise HostdError("agent_timeout", f"the guest agent did not answer in time ({last})")

    async def op_exec_attach(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """Stream an exec's output from ``offset``: events ``out``/``exit``/``end`` on ``sub``."""
        vm = await self.daemon.vm(_str(args, "vm_id"))
        sub = _int(args, "sub")
        exec_id = _str(args, "exec_id")
        offset = max(0, _int(args, "offset", 0))
        self._new_stream(sub, ExecStream(self, vm, sub, exec_id, offset).run())
        return {"sub": sub}, b""

    async def op_console_attach(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """Stream the console from ``offset`` (default: its end; negative: that many bytes
        before the end): replay, then live; events ``console`` on ``sub``."""
        vm = await self.daemon.vm(_str(args, "vm_id"))
        sub = _int(args, "sub")
        ring = vm.console.ring
        raw = args.get("offset")
        if raw is None:
            offset = ring.end
        elif isinstance(raw, int) and not isinstance(raw, bool):
            offset = raw if raw >= 0 else max(0, ring.end + raw)
        else:
            raise HostdError("bad_request", "offset must be an integer")
        self._new_stream(sub, ConsoleStream(self, vm, sub, offset).run())
        return {"sub": sub, "offset": offset, **vm.console.status()}, b""

    async def op_console_write(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        vm = await self.daemon.vm(_str(args, "vm_id"))
        await vm.console.write(data)
        return {"written": len(data)}, b""

    async def op_console_info(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        vm = await self.daemon.vm(_str(args, "vm_id"))
        return vm.console.status(), b""

    async def op_blob_stat(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """A file's ``size`` and ``sha256`` (``exists`` false when there is none): see vms.hostd.blobs."""
        return await self.daemon.blobs.stat(args), b""

    async def op_blob_read(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return await self.daemon.blobs.read(args, MAX_DATA)

    async def op_blob_write(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return await self.daemon.blobs.write(args, data), b""

    async def op_blob_commit(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return await self.daemon.blobs.commit(args), b""

    async def op_blob_abort(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return await self.daemon.blobs.abort(args), b""

    async def op_blob_delete(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        return await self.daemon.blobs.delete(args), b""

    async def op_console_log_read(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """Up to ``STREAM_CHUNK`` bytes of the VM's ``serial.log`` on this host from file position
        ``offset`` (absent: its oldest byte kept), also of a VM that no longer runs:
        ``{"offset": where the data starts, "size": the file's size}``."""
        vm_id = _str(args, "vm_id")
        if "/" in vm_id or "\x00" in vm_id or vm_id in (".", "..") or len(vm_id) > 64:
            raise HostdError("bad_request", "vm_id must be a VM id")
        raw = args.get("offset")
        if raw is not None and (not isinstance(raw, int) or isinstance(raw, bool) or raw < 0):
            raise HostdError("bad_request", "offset must be a non-negative integer")
        path = self.daemon.config.runtime_dir / vm_id / SERIAL_LOG
        try:
            start, size, chunk = await asyncio.get_running_loop().run_in_executor(
                None, log_read, path, raw, STREAM_CHUNK
            )
        except FileNotFoundError:
            raise HostdError("not_found", "this VM has no console log on this host") from None
        except NotALog as exc:  # its VMM put something else there: never followed, never read
            logger.warning("vm %s: %s", vm_id, exc.strerror)
            raise HostdError("not_found", "this VM has no console log on this host") from None
        return {"offset": start, "size": size}, chunk

    async def op_stream_close(self, args: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        task = self.streams.pop(_int(args, "sub"), None)
        if task is not None:
            task.cancel()
        return {"closed": task is not None}, b""

    def _new_stream(self, sub: int, coro: Any) -> None:
        if sub in self.streams:
            coro.close()
            raise HostdError("exists", f"stream {sub} exists")
        if len(self.streams) >= MAX_CLIENT_STREAMS:
            coro.close()
            raise HostdError("too_many", "too many streams on this connection")
        task = asyncio.create_task(coro)
        self.streams[sub] = task

        def forget(done: asyncio.Task[None]) -> None:
            # Only this stream's own entry: after stream_close the client may reuse the sub id
            # before the cancelled task has finished.
            if self.streams.get(sub) is done:
                del self.streams[sub]

        task.add_done_callback(forget)


class ExecStream:
    """Relays one exec's output from the agent to one client. Credit goes back to the
    agent only once the client took the bytes, so hostd holds at most ``EXEC_WINDOW``
    per stream; after an agent reconnect it re-attaches from its cursor."""

    RESET = object()

    def __init__(self, session: ClientSession, vm: VmHandle, sub: int, exec_id: str, offset: int) -> None:
        self.session = session
        self.vm = vm
        self.sub = sub
        self.exec_id = exec_id
        self.cursor = offset
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    queued = 0

    def on_event(self, frame: Frame) -> None:
        # An honest agent never sends more than the credit window; one that does is cut off.
        self.queued += len(frame.data)
        if self.queued > 2 * EXEC_WINDOW + (1 << 20):
            logger.error("vm %s: agent ignored flow control on exec %s; reconnecting", self.vm.vm_id, self.exec_id)
            hostd_metrics.HOSTILE.labels("flow_control").inc()
            self.vm.agent.kick()
            return
        self.queue.put_nowait(frame)

    def on_reset(self) -> None:
        self.queue.put_nowait(self.RESET)

    async def run(self) -> None:
        link = self.vm.agent
        session = self.session
        try:
            while True:
                try:
                    await link.wait_ready(CLIENT_STALL_SECONDS)
                except AgentUnavailable as exc:
                    session.send(
                        {"ev": "end", "sub": self.sub, "error": {"code": "agent_unavailable", "message": exc.message}}
                    )
                    return
                self.queue = asyncio.Queue()
                self.queued = 0
                agent_sub = link.subscribe(self)
                try:
                    await link.request(
                        "exec_attach",
                        {"exec_id": self.exec_id, "sub": agent_sub, "offset": self.cursor, "window": EXEC_WINDOW},
                        timeout=DEFAULT_AGENT_TIMEOUT,
                    )
                except AgentRequestError as exc:
                    link.unsubscribe(agent_sub)
                    session.send({"ev": "end", "sub": self.sub, "error": {"code": exc.code, "message": exc.message}})
                    return
                except AgentError:
                    link.unsubscribe(agent_sub)
                    await asyncio.sleep(0.2)
                    continue
                try:
                    if await self._relay(agent_sub):
                        return
                finally:
                    link.unsubscribe(agent_sub)
                    with contextlib.suppress(AgentError):
                        await link.notify("exec_detach", {"sub": agent_sub})
        except (asyncio.CancelledError, ConnectionError, OSError, TimeoutError):
            return

    async def _relay(self, agent_sub: int) -> bool:
        """Forward events until the exec ends (True) or the agent link resets (False)."""
        while True:
            item = await self.queue.get()
            if item is self.RESET:
                return False
            h = item.header
            self.queued -= len(item.data)
            if h["ev"] == "out":
                offset = h.get("offset")
                if not isinstance(offset, int):
                    continue
                self.session.send(
                    {"ev": "out", "sub": self.sub, "stream": h.get("stream"), "offset": offset}, item.data
                )
                await self.session.drain()
                self.cursor = offset + len(item.data)
                await self.vm.agent.notify("exec_credit", {"sub": agent_sub, "bytes": len(item.data)})
            elif h["ev"] == "exit":
                self.vm.execs.seen(self.vm.agent.sessions, {"exec_id": self.exec_id, "running": False})
                self.session.send(
                    {"ev": "exit", "sub": self.sub, "end_offset": h.get("end_offset"), "result": h.get("result")}
                )
                return True


class ConsoleStream:
    """One client's console subscription: a cursor over the ring and the log. It takes up to
    ``STREAM_READ`` bytes at once (one hop to a worker thread when they come from the log)
    and sends them as events of at most ``STREAM_CHUNK`` bytes, each after the previous one
    was written to the client (``drain``): at most ``STREAM_READ`` bytes held per stream."""

    def __init__(self, session: ClientSession, vm: VmHandle, sub: int, offset: int) -> None:
        self.session = session
        self.vm = vm
        self.sub = sub
        self.cursor = offset

    async def run(self) -> None:
        hostd_metrics.CONSOLE_VIEWERS.inc()
        try:
            await self._run()
        finally:
            hostd_metrics.CONSOLE_VIEWERS.dec()

    async def _run(self) -> None:
        console = self.vm.console
        try:
            while True:
                start, data = await console.read(self.cursor, STREAM_READ)
                if data:
                    view = memoryview(data)  # pieces without copies
                    for at in range(0, len(data), STREAM_CHUNK):
                        piece = view[at : at + STREAM_CHUNK]
                        hostd_metrics.CONSOLE_BYTES.inc(len(piece))
                        self.session.send({"ev": "console", "sub": self.sub, "offset": start + at}, piece)
                        self.cursor = start + at + len(piece)
                        await self.session.drain()
                    continue
                # Nothing from the cursor on exists yet; a read that skipped a gap (rotated log)
                # moves the cursor, or waiting below would return at once forever.
                self.cursor = max(self.cursor, start)
                if self.vm.vm_id not in self.session.daemon.vms:
                    self.session.send(
                        {"ev": "end", "sub": self.sub, "error": {"code": "vm_gone", "message": "the VM stopped"}}
                    )
                    return
                await console.wait_beyond(self.cursor, 1.0)
        except (asyncio.CancelledError, ConnectionError, OSError, TimeoutError):
            return


def _str(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise HostdError("bad_request", f"{name} must be a non-empty string")
    return value


def _int(args: dict[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HostdError("bad_request", f"{name} must be an integer")
    return value


def _timeout(args: dict[str, Any]) -> float:
    value = args.get("timeout", DEFAULT_AGENT_TIMEOUT)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise HostdError("bad_request", "timeout must be a positive number")
    return min(float(value), MAX_AGENT_TIMEOUT)


def main_run(config: HostdConfig) -> None:
    """Run hostd until SIGTERM/SIGINT."""
    asyncio.run(HostDaemon(config).run_forever())
