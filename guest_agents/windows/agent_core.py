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

Implemented: hello, ping, health, exec_start (argv or shell; env, cwd, timeout, tag,
buffer_bytes, stdin pipe + data + stdin_eof), exec_list/get/read/wait/stdin/signal/forget,
file_stat/list/mkdir/remove/rename, file_write_open/write/close/abort,
file_read_open/read/close. Not implemented (answered ``unknown_op``; the host then polls
``exec_read``): exec_attach/exec_credit/exec_detach (streaming), PTYs and exec_resize,
identity_set, ``user`` other than the agent's own account.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
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

    def send_signal(self, proc: Any, name: str, group: bool) -> bool:
        raise NotImplementedError

    def exit_status(self, returncode: int, killed: bool) -> tuple[int | None, str | None]:
        """``(exit_code, signal name)`` as the protocol reports them."""
        raise NotImplementedError

    def is_absolute(self, path: str) -> bool:
        raise NotImplementedError

    def owner_names(self, st: os.stat_result) -> tuple[str, str]:
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
    def __init__(self, agent: Agent, exec_id: str, argv: list[str], tag: str, buffer_bytes: int) -> None:
        self.agent = agent
        self.id = exec_id
        self.argv = argv
        self.tag = tag
        self.buf = OutputBuffer(buffer_bytes)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.proc: Any = None
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

    def start(self, *, env: dict[str, str], cwd: str, stdin_pipe: bool, timeout: float | None) -> None:
        self.proc = self.agent.platform.spawn(self.argv, env=env, cwd=cwd, stdin_pipe=stdin_pipe)
        self.pid = self.proc.pid
        self.stdin_open = stdin_pipe
        for pipe, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            t = threading.Thread(target=self._read, args=(pipe, name), daemon=True)
            t.start()
            self.readers.append(t)
        if stdin_pipe:
            threading.Thread(target=self._write_stdin, daemon=True).start()
        threading.Thread(target=self._wait, args=(timeout,), daemon=True).start()

    def _read(self, pipe: Any, name: str) -> None:
        while True:
            try:
                data = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                return
            with self.lock:
                self.buf.append(name, data)

    def _write_stdin(self) -> None:
        while True:
            with self.lock:
                while not self.stdin_queue:
                    self.stdin_cond.wait()
                item = self.stdin_queue.popleft()
                self.stdin_cond.notify_all()
            try:
                if item is None:
                    self.proc.stdin.close()
                    return
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
            if eof:
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
            self.stdin_queue.clear()
            self.stdin_cond.notify_all()
        # Background children may keep the pipes open: read on for a moment, then stop.
        deadline = time.monotonic() + EXIT_DRAIN_GRACE
        for t in self.readers:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.timed_out or self.killed:
            self.agent.platform.kill_tree(self.proc)
        self.done.set()
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
            return {
                "exec_id": self.id,
                "tag": self.tag,
                "pid": self.pid,
                "argv": self.argv[:64],
                "pty": False,
                "running": not self.done.is_set(),
                "exited": self.exited,
                "started_at": self.started_at,
                "base_offset": self.buf.base,
                "end_offset": self.buf.end,
                "buffer_bytes": self.buf.limit,
                "stdin_open": self.stdin_open,
                "result": self.result(),
            }


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
        if out is DEFERRED:
            return
        result, payload = out if isinstance(out, tuple) else (out, b"")
        conn.respond(conn.epoch, req_id, result, payload)

    def session_closed(self, conn: Connection) -> None:
        with self.lock:
            for handle_id, h in list(self.handles.items()):
                if h.conn is conn:
                    self._discard(handle_id)

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
        if args.get("pty") is not None:
            raise OpError("bad_request", "this agent has no PTY support")
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
        env.update(env_arg)
        cwd = _arg(args, "cwd", str, "") or self.platform.default_cwd()
        program = argv[0]
        if not (
            os.path.exists(program) if os.path.isabs(program) else self.platform.which(program, env.get("PATH", ""))
        ):
            raise OpError("not_found", f"command not found: {program}")
        if not os.path.isdir(cwd):
            raise OpError("not_found", f"working directory {cwd} does not exist")
        ex = Exec(self, secrets.token_hex(8), argv, tag, buffer_bytes)
        try:
            ex.start(env=env, cwd=cwd, stdin_pipe=stdin_mode == "pipe", timeout=timeout)
        except PermissionError as exc:
            raise OpError("permission_denied", f"cannot execute {program}: {exc.strerror}") from exc
        except OSError as exc:
            raise OpError("exec_failed", f"cannot start {program}: {exc}") from exc
        with self.lock:
            self.execs[ex.id] = ex
        if data or args.get("stdin_eof"):
            ex.write_stdin(data, bool(args.get("stdin_eof")))
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
        return {"delivered": self.platform.send_signal(ex.proc, name, bool(args.get("group", True)))}

    def op_exec_forget(self, conn: Connection, req_id: Any, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        if not ex.done.is_set():
            raise OpError("conflict", "exec is still running")
        with self.lock:
            self.execs.pop(ex.id, None)
        return {}

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
