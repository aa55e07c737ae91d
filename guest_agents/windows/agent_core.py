"""Protocol side of the Windows guest agent (guest_agents/PROTOCOL.md, version 2).

Platform-free: everything Windows-specific (the virtio-serial port, the service, process
creation and killing, health from WMI/CIM, file ownership) sits behind ``Platform``
(``platform_windows.py``). ``platform_posix.py`` implements the same interface on Linux, so
this module runs here against the same conformance tests as the Linux agent
(tests/agents/test_conformance.py). Python 3.8+ standard library only.

Model: one reader thread per connection decodes frames (resynchronising after garbage,
like the Linux agent) and answers each request in order; a request that waits
(``exec_wait``) is answered later from its own thread. Every process has a thread per
output pipe filling its ring buffer, and a thread waiting for its exit. All writes to the
port go through one lock, a frame at a time.

Implemented: every op of the Linux agent: hello, ping, health, exec_start (argv or shell;
env, cwd, timeout, tag, buffer_bytes, stdin pipe + data + stdin_eof, ``pty``, ``attach``),
exec_list/get/read/wait/stdin/signal/resize/forget, exec_attach/credit/detach (streamed
output events with credit windows), file_*, identity_set/identity_get. Not implemented:
``user`` other than the agent's own account; ``cpu_ms``/``max_rss_kib`` are 0
(``memory_source: "none"``).

Streaming: each attachment has a thread that sends ``out`` events from its cursor while it
has credit, then the ``exit`` event, exactly as the Linux agent's attachments do; the thread
starts only after the attach answer went out. PTYs: the platform makes the terminal
(``openpty`` here, ConPTY on Windows) and the core treats it as one stream ``"pty"``:
stdin is written to it, ``eof`` sends the platform's end-of-input character, ``exec_resize``
resizes it. identity_set: the core validates and orders the changes, the platform applies
each one (hostname, machine id, clock, entropy, MAC, IPv4).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

AGENT_VERSION = "0.2.0-win"
PROTOCOL_VERSION = 2
PORT_NAME = "org.microvm_sandbox.agent.0"

MAGIC = b"SBX2"
PREFIX = struct.Struct(">4sIII")
MAX_FRAME = 1 << 20
MAX_DATA = 512 << 10
DEFAULT_EXEC_BUFFER = 1 << 20
MIN_EXEC_BUFFER = 4 << 10
MAX_EXEC_BUFFER = 16 << 20
MAX_RUNNING_EXECS = 128
MAX_RETAINED_FINISHED = 128
MAX_HANDLES = 64
MAX_LIST_ENTRIES = 10000
EXIT_DRAIN_GRACE = 2.0
STDIN_LIMIT = 1 << 20
STREAM_CHUNK = 128 << 10  # exec output per event frame
DEFAULT_WINDOW = 256 << 10
MAX_WINDOW = 4 << 20
MAX_SUBS_PER_CONN = 1024
ATTACH_POLL = 0.5  # an attachment thread re-checks its session at least this often
HOSTNAME_RE = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
MACHINE_ID_RE = r"[0-9a-f]{32}"
MAC_RE = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"


def log(msg: str) -> None:
    sys.stderr.write("{} sandbox-agent: {}\n".format(time.strftime("%Y-%m-%dT%H:%M:%S"), msg))
    sys.stderr.flush()


# ----- framing (identical bytes to the Linux agent's) ----------------------------------------


def encode_frame(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(head) + len(data) > MAX_FRAME:
        err = {"id": header.get("id"), "ok": False, "error": {"code": "too_large", "message": "frame too large"}}
        head, data = json.dumps(err).encode(), b""
    lengths = struct.pack(">II", len(head), len(data))
    crc = zlib.crc32(data, zlib.crc32(head, zlib.crc32(lengths)))
    return MAGIC + lengths + struct.pack(">I", crc) + head + data


class FrameReader:
    """Resynchronising decoder: bytes that do not start a valid frame are skipped one at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buf += data
        out: list[tuple[bytes, bytes]] = []
        buf = self.buf
        while True:
            if len(buf) < PREFIX.size:
                if buf and not MAGIC.startswith(bytes(buf[:4])):
                    self._skip()
                    continue
                return out
            if buf[:4] != MAGIC:
                self._skip()
                continue
            _, hlen, dlen, crc = PREFIX.unpack_from(buf)
            if hlen < 2 or hlen + dlen > MAX_FRAME:
                del buf[:1]
                continue
            end = PREFIX.size + hlen + dlen
            if len(buf) < end:
                return out
            if zlib.crc32(bytes(buf[PREFIX.size : end]), zlib.crc32(bytes(buf[4:12]))) != crc:
                del buf[:1]
                continue
            out.append((bytes(buf[PREFIX.size : PREFIX.size + hlen]), bytes(buf[PREFIX.size + hlen : end])))
            del buf[:end]

    def _skip(self) -> None:
        idx = self.buf.find(MAGIC, 1)
        if idx < 0:
            keep = next((k for k in (3, 2, 1) if len(self.buf) >= k and MAGIC.startswith(bytes(self.buf[-k:]))), 0)
            idx = len(self.buf) - keep
        del self.buf[:idx]


# ----- errors ------------------------------------------------------------------------------


class OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EISDIR: "is_a_directory",
    errno.ENOTDIR: "not_a_directory",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOSPC: "no_space",
    errno.EROFS: "read_only",
    errno.ENAMETOOLONG: "bad_request",
    errno.EINVAL: "bad_request",
    errno.EXDEV: "cross_device",
}


def os_error(exc: OSError) -> OpError:
    return OpError(_ERRNO_CODES.get(exc.errno or 0, "io_error"), f"{exc.strerror or exc}: {exc.filename or ''}".strip())


def _arg(args: dict, name: str, kind: Any, default: Any = None, required: bool = False) -> Any:
    value = args.get(name, default)
    if value is None:
        if required:
            raise OpError("bad_request", f"{name} is required")
        return None
    if kind is int and isinstance(value, bool):
        raise OpError("bad_request", f"{name} must be an integer")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise OpError("bad_request", f"{name} has the wrong type")
    return value


def _clamp(value: Any, low: int, high: int, default: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        return default
    return max(low, min(high, value))


# ----- the platform interface ---------------------------------------------------------------


class Platform:
    """What differs between Windows and the POSIX development platform. Subclasses implement
    every method; the protocol side never imports an OS-specific module."""

    name = "abstract"
    transport = "virtio-serial"

    def boot_id(self) -> str:
        raise NotImplementedError

    def uptime_s(self) -> float:
        raise NotImplementedError

    def hostname(self) -> str:
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        """``mem_total_kib``, ``mem_available_kib``, ``root_free_bytes``, ``root_total_bytes``, ``loadavg``."""
        raise NotImplementedError

    def shell_argv(self, command: str) -> list[str]:
        """argv running ``command`` through the platform's shell (PowerShell on Windows)."""
        raise NotImplementedError

    def default_env(self) -> dict[str, str]:
        raise NotImplementedError

    def default_cwd(self) -> str:
        raise NotImplementedError

    def which(self, program: str, path: str) -> str | None:
        return shutil.which(program, path=path)

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str, stdin_pipe: bool) -> Any:
        """A started ``subprocess.Popen`` with stdout/stderr pipes (stdin pipe or devnull),
        in its own process group / job so ``kill_tree`` reaches its children."""
        raise NotImplementedError

    def kill_tree(self, proc: Any) -> None:
        raise NotImplementedError

    def send_signal(self, proc: Any, name: str, group: bool, term: Any = None) -> bool:
        """Deliver the signal ``name`` (``"INT"``, ``"TERM"``, ...) to the process (its group
        with ``group``); ``term`` is its terminal for a PTY exec, else None."""
        raise NotImplementedError

    def exit_status(self, returncode: int, killed: bool) -> tuple[int | None, str | None]:
        """``(exit_code, signal name)`` as the protocol reports them."""
        raise NotImplementedError

    def is_absolute(self, path: str) -> bool:
        raise NotImplementedError

    def owner_names(self, st: os.stat_result) -> tuple[str, str]:
        raise NotImplementedError

    # -- terminals
    pty_eof = b"\x04"
    """What stdin ``eof`` writes to a terminal: Ctrl-D here (Windows: Ctrl-Z, Enter)."""

    def spawn_pty(self, argv: list[str], *, env: dict[str, str], cwd: str, rows: int, cols: int) -> tuple[Any, Any]:
        """Start ``argv`` on a new pseudo-terminal of ``rows`` x ``cols``, leading its own
        session/job: ``(process, terminal)``. ``process`` is Popen-like (``pid``,
        ``wait(timeout)`` raising ``subprocess.TimeoutExpired``, for ``kill_tree`` and
        ``send_signal``); ``terminal`` has ``read(n)`` (``b""`` once nothing can write to it
        any more or it was closed), ``write(data)``, ``resize(rows, cols)`` and ``close()``."""
        raise NotImplementedError

    # -- identity (identity_set); the core has validated every value
    def machine_id(self) -> str:
        """The machine id as 32 lowercase hex digits ("" when unknown)."""
        raise NotImplementedError

    def set_machine_id(self, value: str) -> None:
        raise NotImplementedError

    def set_hostname(self, name: str) -> None:
        raise NotImplementedError

    def set_clock(self, unix: float) -> None:
        raise NotImplementedError

    def add_entropy(self, blob: bytes) -> bool:
        """Mix ``blob`` into the OS random pool and reseed; False where the OS offers no way."""
        raise NotImplementedError

    def interfaces(self) -> dict[str, str]:
        """Network interfaces except loopback: name -> MAC (``aa:bb:cc:dd:ee:ff``)."""
        raise NotImplementedError

    def set_mac(self, ifname: str, mac: str) -> None:
        raise NotImplementedError

    def set_ipv4(self, ifname: str, address: str, gateway: str) -> None:
        """Replace the IPv4 addresses of ``ifname`` by ``address`` (CIDR); default route via
        ``gateway`` unless empty."""
        raise NotImplementedError


# ----- exec --------------------------------------------------------------------------------


class OutputBuffer:
    """The newest ``limit`` bytes of a process's output in one offset space; overflow drops
    the oldest bytes (``base`` advances, a reader below it sees a jump)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pieces: collections.deque = collections.deque()  # (offset, stream, bytes)
        self.base = 0
        self.end = 0
        self.size = 0

    def append(self, stream: str, data: bytes) -> None:
        self.pieces.append((self.end, stream, data))
        self.end += len(data)
        self.size += len(data)
        while self.size > self.limit:
            off, name, blob = self.pieces.popleft()
            drop = min(len(blob), self.size - self.limit)
            self.size -= drop
            self.base = off + drop
            if drop < len(blob):
                self.pieces.appendleft((off + drop, name, blob[drop:]))

    def read(self, offset: int, max_bytes: int) -> list[tuple[int, str, bytes]]:
        out: list[tuple[int, str, bytes]] = []
        total = 0
        for off, name, blob in self.pieces:
            if off + len(blob) <= offset:
                continue
            start = max(0, offset - off)
            piece = blob[start : start + (max_bytes - total)]
            if not piece:
                break
            out.append((off + start, name, piece))
            total += len(piece)
            if total >= max_bytes:
                break
        return out


class Exec:
    def __init__(
        self, agent: Agent, exec_id: str, argv: list[str], tag: str, buffer_bytes: int, pty: bool = False
    ) -> None:
        self.agent = agent
        self.id = exec_id
        self.argv = argv
        self.tag = tag
        self.pty = pty
        self.buf = OutputBuffer(buffer_bytes)
        self.lock = threading.Lock()
        # Notified (under ``lock``) on new output, the end of the exec, credit and detach.
        self.changed = threading.Condition(self.lock)
        self.done = threading.Event()
        self.proc: Any = None
        self.term: Any = None  # the platform's terminal of a PTY exec
        self.pid = 0
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.exited_mono = 0.0
        self.exited = False
        self.timed_out = False
        self.killed = False
        self.returncode = 0
        self.stdin_open = False
        self.stdin_queue: collections.deque = collections.deque()
        self.stdin_cond = threading.Condition(self.lock)
        self.readers: list[threading.Thread] = []
        self.attachments: set[Attachment] = set()

    def start(
        self,
        *,
        env: dict[str, str],
        cwd: str,
        stdin_pipe: bool,
        timeout: float | None,
        pty_size: tuple[int, int] | None = None,
    ) -> None:
        platform = self.agent.platform
        if pty_size is not None:
            self.proc, self.term = platform.spawn_pty(self.argv, env=env, cwd=cwd, rows=pty_size[0], cols=pty_size[1])
            streams = [(self.term.read, "pty")]
            self.stdin_open = True  # the terminal takes input as long as the exec runs
        else:
            self.proc = platform.spawn(self.argv, env=env, cwd=cwd, stdin_pipe=stdin_pipe)
            streams = [
                (getattr(pipe, "read1", pipe.read), name)
                for pipe, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))
            ]
            self.stdin_open = stdin_pipe
        self.pid = self.proc.pid
        for read, name in streams:
            t = threading.Thread(target=self._read, args=(read, name), daemon=True)
            t.start()
            self.readers.append(t)
        if self.stdin_open:
            threading.Thread(target=self._write_stdin, daemon=True).start()
        threading.Thread(target=self._wait, args=(timeout,), daemon=True).start()

    def _read(self, read: Callable[[int], bytes], name: str) -> None:
        while True:
            try:
                data = read(65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                return
            with self.lock:
                self.buf.append(name, data)
                self.changed.notify_all()

    def _write_stdin(self) -> None:
        while True:
            with self.lock:
                while not self.stdin_queue:
                    self.stdin_cond.wait()
                item = self.stdin_queue.popleft()
                self.stdin_cond.notify_all()
            try:
                if item is None:
                    if self.term is None:
                        self.proc.stdin.close()
                    return
                if self.term is not None:
                    self.term.write(item)
                else:
                    self.proc.stdin.write(item)
                    self.proc.stdin.flush()
            except (OSError, ValueError):
                # The process closed its stdin: what it did not read is dropped.
                with self.lock:
                    self.stdin_queue.clear()
                    self.stdin_open = False
                    self.stdin_cond.notify_all()
                return

    def write_stdin(self, data: bytes, eof: bool) -> int:
        with self.lock:
            if not self.stdin_open:
                if data:
                    raise OpError("stdin_closed", "stdin of this exec is closed")
                return 0
            if data:
                self.stdin_queue.append(data)
            if eof and self.term is not None:
                # A terminal stays open: end of input is a character, as typed.
                self.stdin_queue.append(self.agent.platform.pty_eof)
            elif eof:
                self.stdin_queue.append(None)
                self.stdin_open = False
            self.stdin_cond.notify_all()
            # Back-pressure like the Linux agent: answer once less than STDIN_LIMIT is queued.
            while sum(len(x) for x in self.stdin_queue if x) >= STDIN_LIMIT:
                self.stdin_cond.wait(1.0)
            return sum(len(x) for x in self.stdin_queue if x)

    def _wait(self, timeout: float | None) -> None:
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except Exception:  # subprocess.TimeoutExpired: kill the whole tree
            with self.lock:
                self.timed_out = True
            self.agent.platform.kill_tree(self.proc)
            self.returncode = self.proc.wait()
        self.exited_mono = time.monotonic()
        with self.lock:
            self.exited = True
            self.stdin_open = False
            self.stdin_queue.append(None)  # ends the stdin writer thread
            self.stdin_cond.notify_all()
        # Background children may keep the pipes open: read on for a moment, then stop.
        deadline = time.monotonic() + EXIT_DRAIN_GRACE
        for t in self.readers:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.timed_out or self.killed:
            self.agent.platform.kill_tree(self.proc)
        if self.term is not None:
            self.term.close()
        with self.lock:
            self.done.set()
            self.changed.notify_all()
        self.agent.exec_finished(self)

    def kill(self) -> None:
        with self.lock:
            self.killed = True
        self.agent.platform.kill_tree(self.proc)

    def result(self) -> dict[str, Any] | None:
        if not self.exited:
            return None
        code, sig = self.agent.platform.exit_status(self.returncode, self.killed or self.timed_out)
        return {
            "exit_code": code,
            "signal": sig,
            "timed_out": self.timed_out,
            "duration_ms": int((self.exited_mono - self.started_mono) * 1000),
            "cpu_ms": 0,
            "max_rss_kib": 0,
            "memory_source": "none",
        }

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return self._summary_locked()

    def _summary_locked(self) -> dict[str, Any]:
        return {
            "exec_id": self.id,
            "tag": self.tag,
            "pid": self.pid,
            "argv": self.argv[:64],
            "pty": self.pty,
            "running": not self.done.is_set(),
            "exited": self.exited,
            "started_at": self.started_at,
            "base_offset": self.buf.base,
            "end_offset": self.buf.end,
            "buffer_bytes": self.buf.limit,
            "stdin_open": self.stdin_open,
            "result": self.result(),
        }


class Attachment:
    """A session's subscription to one exec's output: a cursor plus a credit window, served
    by its own thread. Sends ``out`` events while it has credit, then the ``exit`` event once
    the exec ended and everything was sent; ends with its session, a detach or forget."""

    def __init__(self, conn: Connection, sub: int, ex: Exec, offset: int, window: int) -> None:
        self.conn = conn
        self.epoch = conn.epoch
        self.sub = sub
        self.exec = ex
        self.cursor = offset
        self.window = window
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def credit(self, nbytes: int) -> None:
        with self.exec.lock:
            self.window = min(MAX_WINDOW, self.window + max(0, nbytes))
            self.exec.changed.notify_all()

    def close(self) -> None:
        ex = self.exec
        with ex.lock:
            self.closed = True
            ex.attachments.discard(self)
            ex.changed.notify_all()
        self.conn.drop_sub(self)

    def _next(self) -> tuple[dict[str, Any], bytes] | None:
        """Under the exec's lock: the next event to send, waiting for output, credit or the
        end; None once this attachment is over."""
        ex = self.exec
        while True:
            if self.closed or self.conn.epoch != self.epoch:
                return None
            if self.cursor < ex.buf.end and self.window > 0:
                pieces = ex.buf.read(self.cursor, min(self.window, STREAM_CHUNK))
                if pieces:
                    offset, stream, data = pieces[0]
                    # Consecutive pieces of the same stream go in one event.
                    blob = bytearray(data)
                    for off2, stream2, data2 in pieces[1:]:
                        if stream2 != stream or off2 != offset + len(blob):
                            break
                        blob += data2
                    self.cursor = offset + len(blob)
                    self.window -= len(blob)
                    header = {"ev": "out", "sub": self.sub, "exec_id": ex.id, "stream": stream, "offset": offset}
                    return header, bytes(blob)
            if ex.done.is_set() and self.cursor >= ex.buf.end:
                self.closed = True
                ex.attachments.discard(self)
                header = {
                    "ev": "exit",
                    "sub": self.sub,
                    "exec_id": ex.id,
                    "end_offset": ex.buf.end,
                    "result": ex.result(),
                }
                return header, b""
            ex.changed.wait(ATTACH_POLL)

    def _run(self) -> None:
        while True:
            with self.exec.lock:
                event = self._next()
            if event is None:
                return
            if event[0]["ev"] == "exit":
                # Gone before the host can see the exit: a credit or detach that answers it
                # finds no attachment (``known: false``), as on the Linux agent.
                self.conn.drop_sub(self)
                self.conn.send_event(self.epoch, *event)
                return
            self.conn.send_event(self.epoch, *event)


# ----- connections and the agent --------------------------------------------------------------


class Connection:
    """One host stream (the virtio-serial port, or a socket here). ``epoch`` changes with
    every new session (hello with a new nonce): answers of an older session are dropped."""

    def __init__(self, agent: Agent, read: Callable[[int], bytes], write: Callable[[bytes], Any]) -> None:
        self.agent = agent
        self._read = read
        self._write = write
        self.write_lock = threading.Lock()
        self.nonce = ""
        self.epoch = 0
        self.reader = FrameReader()
        self.subs: dict[int, Attachment] = {}
        self.subs_lock = threading.Lock()
        # Work an op leaves for after its answer is sent (an attachment's first event must
        # follow the answer that names it); run by ``Agent.handle``.
        self.after_response: list[Callable[[], None]] = []

    def respond(
        self, epoch: int, req_id: Any, result: Any = None, data: bytes = b"", error: OpError | None = None
    ) -> None:
        if req_id is None and error is None:
            return  # a notification gets no answer
        if epoch != self.epoch:
            return  # the session this answer belongs to is gone
        if error is not None:
            header: dict[str, Any] = {
                "id": req_id,
                "ok": False,
                "error": {"code": error.code, "message": error.message},
            }
            data = b""
        else:
            header = {"id": req_id, "ok": True, "result": result if result is not None else {}}
        self.send(encode_frame(header, data))

    def send_event(self, epoch: int, header: dict[str, Any], data: bytes = b"") -> None:
        """An event of the session ``epoch``; dropped if that session is gone."""
        with self.write_lock:
            if epoch != self.epoch:
                return
            try:
                self._write(encode_frame(header, data))
            except OSError as exc:
                log(f"write failed: {exc!r}")

    def drop_sub(self, att: Attachment) -> None:
        with self.subs_lock:
            if self.subs.get(att.sub) is att:
                del self.subs[att.sub]

    def close_subs(self) -> None:
        with self.subs_lock:
            subs = list(self.subs.values())
            self.subs.clear()
        for att in subs:
            att.close()

    def send(self, frame: bytes) -> None:
        with self.write_lock:
            try:
                self._write(frame)
            except OSError as exc:
                log(f"write failed: {exc!r}")

    def serve(self) -> None:
        """Read and answer frames until the stream ends."""
        while True:
            try:
                chunk = self._read(262144)
            except OSError:
                chunk = b""
            if not chunk:
                self.agent.session_closed(self)
                return
            for header, data in self.reader.feed(chunk):
                self.agent.handle(self, header, data)


class FileHandle:
    def __init__(self, kind: str, fh: Any, path: str, conn: Connection) -> None:
        self.kind = kind
        self.fh = fh
        self.path = path
        self.conn = conn
        self.epoch = conn.epoch
        self.tmp = ""
        self.mode: int | None = None
        self.overwrite = True
        self.hasher = hashlib.sha256()
        self.pre_sha256 = ""
        self.identity: tuple[int, ...] = ()
        self.size = 0


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


DEFERRED = object()


class Agent:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.lock = threading.Lock()
        self.execs: dict[str, Exec] = {}
        self.finished_order: collections.deque = collections.deque()
        self.handles: dict[str, FileHandle] = {}
        self.started = time.monotonic()
        self.boot_id = platform.boot_id()
        self.ops: dict[str, Callable[..., Any]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }

    # -- dispatch
    def handle(self, conn: Connection, header_bytes: bytes, data: bytes) -> None:
        try:
            req = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            conn.send(
                encode_frame(
                    {"id": None, "ok": False, "error": {"code": "bad_request", "message": "header is not UTF-8 JSON"}}
                )
            )  # noqa: E501
            return
        if not isinstance(req, dict):
            conn.send(
                encode_frame(
                    {"id": None, "ok": False, "error": {"code": "bad_request", "message": "header must be an object"}}
                )
            )  # noqa: E501
            return
        req_id = req.get("id")
        if req_id is not None and (not isinstance(req_id, int) or isinstance(req_id, bool)):
            conn.send(
                encode_frame(
                    {"id": None, "ok": False, "error": {"code": "bad_request", "message": "id must be an integer"}}
                )
            )  # noqa: E501
            return
        op = req.get("op")
        fn = self.ops.get(op) if isinstance(op, str) else None
        epoch = conn.epoch
        if fn is None:
            conn.respond(epoch, req_id, error=OpError("unknown_op", f"unknown op {op!r}"))
            return
        args = req.get("args", {})
        if not isinstance(args, dict):
            conn.respond(epoch, req_id, error=OpError("bad_request", "args must be an object"))
            return
        conn.after_response = []
        try:
            out = fn(conn, req_id, args, data)
        except OpError as exc:
            conn.respond(epoch, req_id, error=exc)
            return
        except OSError as exc:
            conn.respond(epoch, req_id, error=os_error(exc))
            return
        except Exception as exc:  # an op bug must not kill the agent
            log(f"op {op} failed: {exc!r}")
            conn.respond(conn.epoch, req_id, error=OpError("internal", f"{type(exc).__name__}: {exc}"))
            return
        if out is not DEFERRED:
            result, payload = out if isinstance(out, tuple) else (out, b"")
            conn.respond(conn.epoch, req_id, result, payload)
        for after in conn.after_response:
            after()
        conn.after_response = []

    def session_closed(self, conn: Connection) -> None:
        with self.lock:
            for handle_id, h in list(self.handles.items()):
                if h.conn is conn:
                    self._discard(handle_id)
        conn.close_subs()

    # -- basics
    def op_hello(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        nonce = _arg(args, "nonce", str, "")[:128]
        if not nonce or nonce != conn.nonce:
            # A new host session: drop its predecessor's transfers and pending answers.
            conn.epoch += 1
            conn.nonce = nonce
            self.session_closed(conn)
        return {
            "protocol": PROTOCOL_VERSION,
            "nonce": nonce,
            "agent_version": AGENT_VERSION,
            "boot_id": self.boot_id,
            "max_frame": MAX_FRAME,
            "max_data": MAX_DATA,
            "transport": self.platform.transport,
        }

    def op_ping(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        return {
            "agent_version": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "boot_id": self.boot_id,
            "uptime_s": round(self.platform.uptime_s(), 3),
            "hostname": self.platform.hostname(),
        }

    def op_health(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        with self.lock:
            running = sum(1 for e in self.execs.values() if not e.done.is_set())
            retained = len(self.execs)
        out = {
            "status": "ok",
            "agent_version": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": round(self.platform.uptime_s(), 3),
            "agent_uptime_s": round(time.monotonic() - self.started, 3),
            "loadavg": [],
            "mem_total_kib": 0,
            "mem_available_kib": 0,
            "root_free_bytes": 0,
            "root_total_bytes": 0,
            "execs_running": running,
            "execs_retained": retained,
            "connections": 1,
        }
        out.update(self.platform.health())
        return out

    # -- exec
    def _exec(self, args: dict) -> Exec:
        exec_id = _arg(args, "exec_id", str, required=True)
        with self.lock:
            ex = self.execs.get(exec_id)
        if ex is None:
            raise OpError("not_found", f"no exec {exec_id}")
        return ex

    def op_exec_start(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        argv = args.get("argv")
        shell = args.get("shell")
        if isinstance(argv, list) and argv and all(isinstance(a, str) and "\x00" not in a for a in argv):
            argv = list(argv)
        elif isinstance(shell, str) and shell and "\x00" not in shell:
            argv = self.platform.shell_argv(shell)
        else:
            raise OpError("bad_request", "argv (non-empty list of strings) or shell (string) is required")
        env_arg = _arg(args, "env", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in env_arg.items()):
            raise OpError("bad_request", "env must map names to strings")
        timeout = _arg(args, "timeout", float)
        if timeout is not None and not 0 < timeout <= 86400 * 7:
            raise OpError("bad_request", "timeout must be between 0 and 7 days")
        pty_arg = args.get("pty")
        if pty_arg is not None and not isinstance(pty_arg, dict):
            raise OpError("bad_request", "pty must be an object or null")
        user = args.get("user")
        if user not in (None, "", "root", 0):
            raise OpError("bad_request", "this agent runs commands as its own account only")
        tag = _arg(args, "tag", str, "")[:128]
        buffer_bytes = max(MIN_EXEC_BUFFER, min(MAX_EXEC_BUFFER, _arg(args, "buffer_bytes", int, DEFAULT_EXEC_BUFFER)))
        stdin_mode = _arg(args, "stdin", str, "pipe" if data else "null")
        if stdin_mode not in ("null", "pipe") or (data and stdin_mode == "null"):
            raise OpError("bad_request", "stdin must be 'null' or 'pipe' ('pipe' when data is sent)")
        if args.get("stdin_eof") and stdin_mode == "null":
            stdin_mode = "pipe"
        with self.lock:
            if sum(1 for e in self.execs.values() if not e.done.is_set()) >= MAX_RUNNING_EXECS:
                raise OpError("too_many", f"at most {MAX_RUNNING_EXECS} execs may run at once")
        env = self.platform.default_env()
        if pty_arg is not None:
            env["TERM"] = str(pty_arg.get("term") or "xterm-256color")[:64]
        env.update(env_arg)
        cwd = _arg(args, "cwd", str, "") or self.platform.default_cwd()
        program = argv[0]
        if not (
            os.path.exists(program) if os.path.isabs(program) else self.platform.which(program, env.get("PATH", ""))
        ):
            raise OpError("not_found", f"command not found: {program}")
        if not os.path.isdir(cwd):
            raise OpError("not_found", f"working directory {cwd} does not exist")
        ex = Exec(self, secrets.token_hex(8), argv, tag, buffer_bytes, pty=pty_arg is not None)
        pty_size = None
        if pty_arg is not None:
            pty_size = (_clamp(pty_arg.get("rows"), 1, 1000, 24), _clamp(pty_arg.get("cols"), 1, 1000, 80))
        try:
            ex.start(env=env, cwd=cwd, stdin_pipe=stdin_mode == "pipe", timeout=timeout, pty_size=pty_size)
        except PermissionError as exc:
            raise OpError("permission_denied", f"cannot execute {program}: {exc.strerror}") from exc
        except OSError as exc:
            raise OpError("exec_failed", f"cannot start {program}: {exc}") from exc
        with self.lock:
            self.execs[ex.id] = ex
        if data or args.get("stdin_eof"):
            ex.write_stdin(data, bool(args.get("stdin_eof")))
        attach = args.get("attach")
        if isinstance(attach, dict):
            self._attach(conn, ex, attach)
        return {"exec_id": ex.id, "pid": ex.pid, "tag": tag, "started_at": ex.started_at}

    def exec_finished(self, ex: Exec) -> None:
        with self.lock:
            self.finished_order.append(ex.id)
            while len(self.finished_order) > MAX_RETAINED_FINISHED:
                self.execs.pop(self.finished_order.popleft(), None)

    def op_exec_list(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        tag = _arg(args, "tag", str)
        with self.lock:
            execs = list(self.execs.values())
        items = [e.summary() for e in execs if tag is None or e.tag == tag]
        items.sort(key=lambda s: s["started_at"])
        return {"execs": items}

    def op_exec_get(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        return self._exec(args).summary()

    def op_exec_read(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> tuple[dict, bytes]:
        ex = self._exec(args)
        offset = max(0, _arg(args, "offset", int, 0))
        max_bytes = max(1, min(MAX_DATA, _arg(args, "max", int, MAX_DATA)))
        summary = ex.summary()
        with ex.lock:
            pieces = ex.buf.read(offset, max_bytes)
            start = pieces[0][0] if pieces else max(offset, ex.buf.base) if offset <= ex.buf.end else offset
        payload = b"".join(blob for _, _, blob in pieces)
        summary.update(
            {"offset": start, "next_offset": start + len(payload), "chunks": [[s, len(b)] for _, s, b in pieces]}
        )
        return summary, payload

    def op_exec_wait(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> Any:
        ex = self._exec(args)
        if ex.done.is_set():
            return ex.summary()
        timeout = max(0.0, min(_arg(args, "timeout", float, 30.0), 3600.0))
        epoch = conn.epoch

        def wait() -> None:
            ex.done.wait(timeout)
            conn.respond(epoch, req_id, ex.summary())

        threading.Thread(target=wait, daemon=True).start()
        return DEFERRED

    def op_exec_stdin(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        buffered = ex.write_stdin(data, bool(args.get("eof")))
        return {"buffered": buffered, "open": ex.stdin_open}

    def op_exec_signal(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        name = str(args.get("signal", "TERM")).upper()
        name = name[3:] if name.startswith("SIG") else name
        if ex.exited:
            return {"delivered": False}
        if name in ("KILL", "9"):
            ex.kill()
            return {"delivered": True}
        return {"delivered": self.platform.send_signal(ex.proc, name, bool(args.get("group", True)), ex.term)}

    def op_exec_resize(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        if ex.term is None:
            raise OpError("bad_request", "this exec has no terminal")
        rows = _clamp(args.get("rows"), 1, 1000, 24)
        cols = _clamp(args.get("cols"), 1, 1000, 80)
        ex.term.resize(rows, cols)
        return {"rows": rows, "cols": cols}

    def _attach(self, conn: Connection, ex: Exec, args: dict) -> Attachment:
        sub = _arg(args, "sub", int, required=True)
        offset = max(0, _arg(args, "offset", int, 0))
        window = max(1, min(MAX_WINDOW, _arg(args, "window", int, DEFAULT_WINDOW)))
        att = Attachment(conn, sub, ex, offset, window)
        with conn.subs_lock:
            if sub in conn.subs:
                raise OpError("exists", f"subscription {sub} exists")
            if len(conn.subs) >= MAX_SUBS_PER_CONN:
                raise OpError("too_many", "too many subscriptions on this connection")
            conn.subs[sub] = att
        with ex.lock:
            ex.attachments.add(att)
        conn.after_response.append(att.start)
        return att

    def op_exec_attach(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        att = self._attach(conn, ex, args)
        with ex.lock:
            summary = ex._summary_locked()
            summary["offset"] = max(att.cursor, ex.buf.base)
        return summary

    def op_exec_credit(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        with conn.subs_lock:
            att = conn.subs.get(_arg(args, "sub", int, required=True))
        if att is None:
            return {"known": False}
        att.credit(_arg(args, "bytes", int, 0))
        return {"known": True}

    def op_exec_detach(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        with conn.subs_lock:
            att = conn.subs.get(_arg(args, "sub", int, required=True))
        if att is not None:
            att.close()
        return {"known": att is not None}

    def op_exec_forget(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        if not ex.done.is_set():
            raise OpError("conflict", "exec is still running")
        with self.lock:
            self.execs.pop(ex.id, None)
        with ex.lock:
            attachments = list(ex.attachments)
        for att in attachments:
            att.close()
        return {}

    # -- identity after restore/clone (the snapshots app; PROTOCOL.md)
    def op_identity_set(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        """Apply the identity the host chose; every key optional: ``hostname``, ``machine_id``
        (32 hex), ``macs`` ({ifname: mac}, ``"*"`` = the first interface), ``clock_unix``,
        ``entropy`` (hex), ``ipv4`` ({ifname, address, gateway}). Everything is checked
        before anything is changed; returns what was applied and the identity now."""
        p = self.platform
        clock = _arg(args, "clock_unix", float)
        entropy = b""
        if args.get("entropy"):
            try:
                entropy = bytes.fromhex(str(args["entropy"]))[:512]
            except ValueError as exc:
                raise OpError("bad_request", "entropy must be hex") from exc
        machine_id = args.get("machine_id") or ""
        if machine_id and not re.fullmatch(MACHINE_ID_RE, str(machine_id)):
            raise OpError("bad_request", "machine_id must be 32 lowercase hex digits")
        hostname = args.get("hostname") or ""
        if hostname and not re.fullmatch(HOSTNAME_RE, str(hostname)):
            raise OpError("bad_request", "invalid hostname")
        ifaces = sorted(p.interfaces()) if args.get("macs") or args.get("ipv4") else []
        macs: list[tuple[str, str]] = []
        for ifname, mac in dict(args.get("macs") or {}).items():
            if ifname == "*":
                if not ifaces:
                    continue
                ifname = ifaces[0]
            if ifname not in ifaces or not re.fullmatch(MAC_RE, str(mac)):
                raise OpError("bad_request", f"bad interface or MAC: {ifname} {mac}")
            macs.append((ifname, str(mac)))
        ipv4 = args.get("ipv4")
        if ipv4:
            if not isinstance(ipv4, dict):
                raise OpError("bad_request", "ipv4 must be an object")
            ip_ifname = str(ipv4.get("ifname") or (ifaces[0] if ifaces else ""))
            if ip_ifname not in ifaces:
                raise OpError("bad_request", f"no interface {ip_ifname!r}")
            try:
                address = str(ipaddress.IPv4Interface(str(ipv4.get("address"))))
                gateway = str(ipaddress.IPv4Address(str(ipv4["gateway"]))) if ipv4.get("gateway") else ""
            except (ValueError, KeyError) as exc:
                raise OpError("bad_request", f"bad ipv4 settings: {exc}") from exc
        done = []
        if clock is not None:
            p.set_clock(clock)
            done.append("clock")
        if entropy and p.add_entropy(entropy):
            done.append("entropy")
        if machine_id:
            p.set_machine_id(str(machine_id))
            done.append("machine_id")
        if hostname:
            p.set_hostname(str(hostname))
            done.append("hostname")
        for ifname, mac in macs:
            p.set_mac(ifname, mac)
            done.append(f"mac:{ifname}")
        if ipv4:
            p.set_ipv4(ip_ifname, address, gateway)
            done.append(f"ipv4:{ip_ifname}")
        return {"applied": done, "identity": self.identity_report()}

    def op_identity_get(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        return self.identity_report()

    def identity_report(self) -> dict[str, Any]:
        """Hostname, machine id, interface MACs and wall clock as the guest sees them now."""
        p = self.platform
        return {
            "hostname": p.hostname(),
            "machine_id": p.machine_id(),
            "macs": dict(sorted(p.interfaces().items())),
            "clock_unix": time.time(),
        }

    # -- files
    def _path(self, args: dict, name: str = "path") -> str:
        path = _arg(args, name, str, required=True)
        if not self.platform.is_absolute(path) or "\x00" in path or len(path) > 4096:
            raise OpError("bad_request", f"{name} must be an absolute path")
        return path

    def _entry(self, path: str, st: os.stat_result, *, with_target: bool) -> dict:
        mode = st.st_mode
        kind = (
            "file" if stat.S_ISREG(mode) else
            "directory" if stat.S_ISDIR(mode) else
            "symlink" if stat.S_ISLNK(mode) else "other"
        )  # fmt: skip
        user, group = self.platform.owner_names(st)
        out = {
            "path": path,
            "type": kind,
            "size": st.st_size,
            "mode": stat.S_IMODE(mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "user": user,
            "group": group,
            "mtime": st.st_mtime,
        }
        if with_target and kind == "symlink":
            try:
                out["target"] = os.readlink(path)
            except OSError:
                out["target"] = ""
        return out

    def op_file_stat(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        path = self._path(args)
        return self._entry(path, os.lstat(path), with_target=True)

    def op_file_list(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        path = self._path(args)
        limit = max(1, min(MAX_LIST_ENTRIES, _arg(args, "limit", int, MAX_LIST_ENTRIES)))
        entries = []
        truncated = False
        with os.scandir(path) as it:
            for entry in it:
                if len(entries) >= limit:
                    truncated = True
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                item = self._entry(entry.path, st, with_target=False)
                item["name"] = entry.name
                entries.append(item)
        entries.sort(key=lambda e: e["name"])
        return {"path": path, "entries": entries, "truncated": truncated}

    def op_file_mkdir(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        path = self._path(args)
        mode = _arg(args, "mode", int, 0o755) & 0o7777
        if args.get("parents", True):
            os.makedirs(path, mode=mode, exist_ok=bool(args.get("exist_ok", True)))
        else:
            os.mkdir(path, mode)
        return self._entry(path, os.lstat(path), with_target=False)

    def op_file_remove(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        path = self._path(args)
        if os.path.dirname(os.path.normpath(path)) == os.path.normpath(path):
            raise OpError("bad_request", "refusing to remove a filesystem root")
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path) if args.get("recursive") else os.rmdir(path)
        else:
            os.unlink(path)
        return {"removed": path}

    def op_file_rename(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        src = self._path(args, "src")
        dst = self._path(args, "dst")
        if not args.get("overwrite", False) and os.path.lexists(dst):
            raise OpError("exists", f"{dst} exists")
        os.replace(src, dst)
        return {"src": src, "dst": dst}

    def _new_handle(self, h: FileHandle) -> str:
        with self.lock:
            if len(self.handles) >= MAX_HANDLES:
                raise OpError("too_many", "too many open file transfers")
            handle_id = secrets.token_hex(8)
            self.handles[handle_id] = h
        return handle_id

    def _handle(self, args: dict, kind: str) -> tuple[str, FileHandle]:
        handle_id = _arg(args, "handle", str, required=True)
        with self.lock:
            h = self.handles.get(handle_id)
        if h is None or h.kind != kind:
            raise OpError("not_found", "no such transfer (expired or aborted)")
        return handle_id, h

    def _discard(self, handle_id: str) -> None:
        h = self.handles.pop(handle_id, None)
        if h is None:
            return
        try:
            h.fh.close()
        except OSError:
            pass
        if h.kind == "write" and h.tmp:
            try:
                os.unlink(h.tmp)
            except OSError:
                pass

    def op_file_write_open(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        path = self._path(args)
        parent, name = os.path.split(path)
        if not name:
            raise OpError("bad_request", "path names a directory")
        overwrite = bool(args.get("overwrite", True))
        if os.path.isdir(path):
            raise OpError("is_a_directory", f"{path} is a directory")
        if not overwrite and os.path.lexists(path):
            raise OpError("exists", f"{path} exists")
        if args.get("mkdirs"):
            os.makedirs(parent, exist_ok=True)
        # Written under a temporary name and renamed into place: readers never see a part.
        tmp = os.path.join(parent, f".{name[:200]}.sbx-upload-{secrets.token_hex(4)}")
        fh = open(tmp, "xb")  # noqa: SIM115 - closed by _discard
        h = FileHandle("write", fh, path, conn)
        h.tmp = tmp
        h.overwrite = overwrite
        mode = _arg(args, "mode", int)
        if mode is None and os.path.exists(path):
            mode = stat.S_IMODE(os.stat(path).st_mode)
        h.mode = (mode if mode is not None else 0o644) & 0o7777
        try:
            handle_id = self._new_handle(h)
        except OpError:
            fh.close()
            os.unlink(tmp)
            raise
        return {"handle": handle_id, "max_data": MAX_DATA}

    def op_file_write(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        handle_id, h = self._handle(args, "write")
        try:
            h.fh.write(data)
        except OSError:
            with self.lock:
                self._discard(handle_id)
            raise
        h.hasher.update(data)
        h.size += len(data)
        return {"size": h.size}

    def op_file_write_close(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        handle_id, h = self._handle(args, "write")
        expected = _arg(args, "sha256", str)
        digest = h.hasher.hexdigest()
        try:
            if expected is not None and expected.lower() != digest:
                raise OpError("checksum_mismatch", f"received data has sha256 {digest}, expected {expected}")
            h.fh.flush()
            os.fsync(h.fh.fileno())
            h.fh.close()
            if h.mode is not None:
                os.chmod(h.tmp, h.mode)
            if not h.overwrite and os.path.lexists(h.path):
                raise OpError("exists", f"{h.path} exists")
            os.replace(h.tmp, h.path)
            h.tmp = ""
        finally:
            with self.lock:
                self._discard(handle_id)
        return {"path": h.path, "size": h.size, "sha256": digest}

    def op_file_write_abort(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        handle_id = _arg(args, "handle", str, required=True)
        with self.lock:
            self._discard(handle_id)
        return {}

    def op_file_read_open(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        path = self._path(args)
        if os.path.isdir(path):
            raise OpError("is_a_directory", f"{path} is a directory")
        fh = open(path, "rb")  # noqa: SIM115 - closed by _discard
        try:
            st = os.fstat(fh.fileno())
            h = FileHandle("read", fh, path, conn)
            handle_id = self._new_handle(h)
        except BaseException:
            fh.close()
            raise
        result = self._entry(path, st, with_target=False)
        result["handle"] = handle_id
        if args.get("sha256"):
            hasher = hashlib.sha256()
            size = 0
            with open(path, "rb") as again:
                for block in iter(lambda: again.read(1 << 20), b""):
                    hasher.update(block)
                    size += len(block)
            h.identity = _identity(st)
            result["sha256"] = h.pre_sha256 = hasher.hexdigest()
            result["size"] = size
        return result

    def op_file_read(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> tuple[dict, bytes]:
        handle_id, h = self._handle(args, "read")
        max_bytes = max(1, min(MAX_DATA, _arg(args, "max", int, MAX_DATA)))
        try:
            chunk = h.fh.read(max_bytes)
        except OSError:
            with self.lock:
                self._discard(handle_id)
            raise
        if not h.pre_sha256:
            h.hasher.update(chunk)
        h.size += len(chunk)
        return {"offset": h.size - len(chunk), "eof": not chunk}, chunk

    def op_file_read_close(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        handle_id, h = self._handle(args, "read")
        try:
            unchanged = _identity(os.fstat(h.fh.fileno())) == h.identity
        except OSError:
            unchanged = False
        with self.lock:
            self._discard(handle_id)
        if h.pre_sha256:
            return {"size": h.size, "sha256": h.pre_sha256 if unchanged else "", "changed": not unchanged}
        return {"size": h.size, "sha256": h.hasher.hexdigest(), "changed": False}
