#!/usr/bin/env python3
"""microvm-sandbox guest agent (Linux), protocol v2. Python 3 standard library only.

Started by the guest init in a respawn loop. Serves the framed, multiplexed protocol of
guest_agents/PROTOCOL.md on every transport that exists in this VM:

- QEMU: the virtio-serial port ``org.microvm_sandbox.agent.0`` (a character device; the
  host side may connect and disconnect at any time, and a new host session starts with
  a ``hello`` request);
- cloud-hypervisor: AF_VSOCK port 1024 (each connection is its own session).

One thread, one ``selectors`` loop: every fd is non-blocking, so the agent never blocks
on a host that is not reading (outgoing data waits in a bounded per-connection queue,
and exec output waits in the per-exec ring buffer, read through cursors). Processes
belong to the agent, not to a connection: a host that disconnects and reconnects finds
every exec still running and reads its output from the byte offset where it stopped.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import glob
import grp
import hashlib
import heapq
import json
import os
import pwd
import secrets
import select
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
import zlib

AGENT_VERSION = "0.2.0"
PROTOCOL_VERSION = 2
PORT_NAME = "org.microvm_sandbox.agent.0"
VSOCK_PORT = 1024

# ----- framing -------------------------------------------------------------------------
MAGIC = b"SBX2"
PREFIX = struct.Struct(">4sIII")  # magic, header length, data length, crc32
MAX_FRAME = 1 << 20  # header + data bytes of one frame
MAX_DATA = 512 << 10  # data bytes the agent puts in one frame
STREAM_CHUNK = 128 << 10  # exec output per event frame
IDLE_WAIT_SECONDS = 60.0  # longest sleep of the event loop with nothing to do (timers end it sooner)

# ----- bounds (every buffer has one; see PROTOCOL.md "Bounds") --------------------------
OUTQ_SOFT = 2 << 20  # stream events are only queued while a connection's queue is below this
OUTQ_HARD = 16 << 20  # a connection whose queue exceeds this is reset (responses included)
DEFAULT_EXEC_BUFFER = 1 << 20
MAX_EXEC_BUFFER = 16 << 20
MIN_EXEC_BUFFER = 4 << 10
RUNNING_BUFFER_BUDGET = 256 << 20  # sum of buffer sizes of running execs
MAX_RUNNING_EXECS = 128
MAX_RETAINED_FINISHED = 128  # finished execs kept for reading; oldest forgotten first
STDIN_LIMIT = 1 << 20  # buffered stdin per exec before exec_stdin responses are held back
DEFAULT_WINDOW = 256 << 10
MAX_WINDOW = 4 << 20
MAX_SUBS_PER_CONN = 1024
MAX_HANDLES = 64
HANDLE_IDLE_SECONDS = 120.0
EXIT_DRAIN_GRACE = 2.0  # after the main process exits, wait this long for pipes to close
MAX_VSOCK_CONNECTIONS = 16
MAX_LIST_ENTRIES = 10000
HASH_SLICE = 4 << 20  # bytes hashed per loop turn by background checksum tasks
HASH_MAX_SECONDS = 120.0  # a download's checksum at open: given up (timeout) after this long
READ_MAX_BYTES = 64 << 30  # larger files (or ones that keep growing while hashed) are refused

_SETSID = shutil.which("setsid")
_SETPRIV = shutil.which("setpriv")
_CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP_DIR = _CGROUP_ROOT + "/sandbox-exec"


def _pick_sha256():
    """The faster of OpenSSL's and CPython's built-in SHA-256 here: under emulation (QEMU
    TCG) OpenSSL's SIMD paths run at half the speed of the plain C code; with KVM OpenSSL
    wins by far. Measured once at start (~1 MiB each)."""
    candidates = [hashlib.sha256]
    try:
        import _sha256

        candidates.append(_sha256.sha256)
    except ImportError:
        pass
    sample = bytes(1 << 20)
    best, best_time = candidates[0], float("inf")
    for fn in candidates:
        started = time.perf_counter()
        fn(sample).digest()
        elapsed = time.perf_counter() - started
        if elapsed < best_time:
            best, best_time = fn, elapsed
    return best


sha256 = hashlib.sha256  # replaced by _pick_sha256() in main()


def log(msg: str) -> None:
    sys.stderr.write("{} sandbox-agent: {}\n".format(time.strftime("%Y-%m-%dT%H:%M:%S"), msg))
    sys.stderr.flush()


class FrameError(Exception):
    """The peer broke framing."""


def encode_frame(header: dict, data: bytes = b"") -> bytes:
    """One frame: MAGIC, header length, data length, CRC-32, JSON header, data."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(head) + len(data) > MAX_FRAME:
        err = {"id": header.get("id"), "ok": False, "error": {"code": "too_large", "message": "frame too large"}}
        head, data = json.dumps(err).encode(), b""
    lengths = struct.pack(">II", len(head), len(data))
    crc = zlib.crc32(data, zlib.crc32(head, zlib.crc32(lengths)))
    return MAGIC + lengths + struct.pack(">I", crc) + head + data


class FrameReader:
    """Incremental frame decoder that resynchronises: bytes that are not a valid frame
    (no magic, impossible lengths, CRC mismatch) are skipped one at a time until the next
    valid frame. That is what makes a host that died mid-frame harmless on virtio-serial,
    where the next host's bytes follow the dead one's in the same stream."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skipped = 0

    def reset(self) -> None:
        self.buf.clear()

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        buf = self.buf
        while True:
            if len(buf) < PREFIX.size:
                if buf and not MAGIC.startswith(bytes(buf[:4])):
                    self._skip_to_magic()
                    continue
                return out
            if buf[:4] != MAGIC:
                self._skip_to_magic()
                continue
            _, hlen, dlen, crc = PREFIX.unpack_from(buf)
            if hlen < 2 or hlen + dlen > MAX_FRAME:
                del buf[:1]
                self.skipped += 1
                continue
            end = PREFIX.size + hlen + dlen
            if len(buf) < end:
                return out
            with memoryview(buf) as view:
                actual = zlib.crc32(view[PREFIX.size : end], zlib.crc32(view[4:12]))
                if actual == crc:
                    header = bytes(view[PREFIX.size : PREFIX.size + hlen])
                    body = bytes(view[PREFIX.size + hlen : end])
            if actual != crc:
                del buf[:1]
                self.skipped += 1
                continue
            del buf[:end]
            out.append((header, body))

    def _skip_to_magic(self) -> None:
        buf = self.buf
        idx = buf.find(MAGIC, 1)
        if idx < 0:
            keep = 0
            for k in (3, 2, 1):  # a magic may start in the last bytes
                if len(buf) >= k and MAGIC.startswith(bytes(buf[-k:])):
                    keep = k
                    break
            idx = len(buf) - keep
        self.skipped += idx
        del buf[:idx]


# ----- errors ----------------------------------------------------------------------------


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


def _arg(args: dict, name: str, kind, default=None, required: bool = False):
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


def _path_arg(args: dict, name: str = "path") -> str:
    path = _arg(args, name, str, required=True)
    if not path.startswith("/") or "\x00" in path or len(path) > 4096:
        raise OpError("bad_request", f"{name} must be an absolute path")
    return path


# ----- event loop ----------------------------------------------------------------------


class Timer:
    __slots__ = ("when", "cb", "alive")

    def __init__(self, when: float, cb) -> None:
        self.when = when
        self.cb = cb
        self.alive = True

    def cancel(self) -> None:
        self.alive = False

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class Loop:
    """A tiny reactor: fd readiness callbacks, timers and cooperative background tasks."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.cbs: dict = {}  # fd -> [reader, writer]
        self.timers: list = []
        self.tasks: collections.deque = collections.deque()

    def _update(self, fd: int) -> None:
        reader, writer = self.cbs.get(fd, (None, None))
        mask = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        registered = fd in self.sel.get_map()
        if not mask:
            self.cbs.pop(fd, None)
            if registered:
                self.sel.unregister(fd)
        elif registered:
            self.sel.modify(fd, mask)
        else:
            self.sel.register(fd, mask)

    def set_reader(self, fd: int, cb) -> None:
        self.cbs.setdefault(fd, [None, None])[0] = cb
        self._update(fd)

    def set_writer(self, fd: int, cb) -> None:
        self.cbs.setdefault(fd, [None, None])[1] = cb
        self._update(fd)

    def forget(self, fd: int) -> None:
        self.cbs.pop(fd, None)
        if fd in self.sel.get_map():
            self.sel.unregister(fd)

    def call_later(self, delay: float, cb) -> Timer:
        timer = Timer(time.monotonic() + delay, cb)
        heapq.heappush(self.timers, timer)
        return timer

    def add_task(self, gen) -> None:
        """``gen`` is a generator doing a slice of work per ``next``; it ends with StopIteration."""
        self.tasks.append(gen)

    def run_once(self) -> None:
        # Idle, the agent sleeps until an fd is ready or its next timer: every wakeup of an
        # idle guest costs host CPU (under TCG a lot), so nothing here ticks for nothing.
        timeout = IDLE_WAIT_SECONDS
        if self.tasks:
            timeout = 0
        elif self.timers:
            timeout = max(0.0, min(timeout, self.timers[0].when - time.monotonic()))
        for key, mask in self.sel.select(timeout):
            cbs = self.cbs.get(key.fd)
            if cbs is None:
                continue
            if mask & selectors.EVENT_READ and cbs[0]:
                _guard(cbs[0])
            cbs = self.cbs.get(key.fd)
            if cbs is not None and mask & selectors.EVENT_WRITE and cbs[1]:
                _guard(cbs[1])
        now = time.monotonic()
        while self.timers and self.timers[0].when <= now:
            timer = heapq.heappop(self.timers)
            if timer.alive:
                _guard(timer.cb)
        if self.tasks:
            task = self.tasks.popleft()
            try:
                next(task)
            except StopIteration:
                return
            except Exception as exc:  # a task bug must not kill the agent
                log(f"background task failed: {exc!r}")
                return
            self.tasks.append(task)


def _guard(cb) -> None:
    try:
        cb()
    except Exception as exc:  # one misbehaving callback must not kill the agent
        import traceback

        log(f"callback {getattr(cb, '__qualname__', cb)!r} failed: {exc!r}\n{traceback.format_exc()}")


# ----- exec output ring -----------------------------------------------------------------


class OutputBuffer:
    """Bounded output of one exec, addressed by absolute byte offsets (stdout and stderr
    share one offset space, in the order the agent read them).

    Overflow rule: when more than ``limit`` bytes are held, the oldest bytes are dropped
    and ``base`` advances; a reader asking for an offset below ``base`` gets data from
    ``base`` on, so it sees the gap as a jump in offsets."""

    MERGE = 64 << 10

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: collections.deque = collections.deque()  # [offset, stream, bytearray]
        self.base = 0
        self.end = 0
        self.size = 0

    def append(self, stream: str, data: bytes) -> None:
        if not data:
            return
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last[1] == stream and len(last[2]) + len(data) <= self.MERGE:
            last[2] += data
        else:
            self.chunks.append([self.end, stream, bytearray(data)])
        self.end += len(data)
        self.size += len(data)
        while self.size > self.limit:
            first = self.chunks[0]
            excess = self.size - self.limit
            if len(first[2]) <= excess:
                self.chunks.popleft()
                self.size -= len(first[2])
            else:
                del first[2][:excess]
                first[0] += excess
                self.size -= excess
        self.base = self.chunks[0][0] if self.chunks else self.end

    def read(self, offset: int, max_bytes: int) -> list:
        """Up to ``max_bytes`` from ``offset`` (or ``base`` if older): [(offset, stream, bytes)]."""
        out = []
        offset = max(offset, self.base)
        budget = max_bytes
        for start, stream, data in self._chunks_from(offset):
            if budget <= 0:
                break
            skip = max(0, offset - start)
            piece = bytes(data[skip : skip + budget])
            if piece:
                out.append((start + skip, stream, piece))
                budget -= len(piece)
        return out

    def _chunks_from(self, offset: int):
        # Readers are usually near the end: walk backwards to the first chunk needed.
        chunks = self.chunks
        i = len(chunks) - 1
        while i > 0 and chunks[i][0] > offset:
            i -= 1
        for j in range(max(i, 0), len(chunks)):
            chunk = chunks[j]
            if chunk[0] + len(chunk[2]) > offset:
                yield chunk


# ----- execs ------------------------------------------------------------------------------

_SIGNALS = {
    name[3:]: int(getattr(signal, name))
    for name in dir(signal)
    if name.startswith("SIG") and not name.startswith("SIG_")
}


def _signal_number(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 < value < 65:
            return value
    elif isinstance(value, str):
        name = value.upper()
        name = name[3:] if name.startswith("SIG") else name
        if name in _SIGNALS:
            return _SIGNALS[name]
    raise OpError("bad_request", f"unknown signal {value!r}")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"SIG{num}"


class Exec:
    def __init__(self, agent: Agent, exec_id: str, argv: list, tag: str, buffer_bytes: int, pty: bool) -> None:
        self.agent = agent
        self.id = exec_id
        self.argv = argv
        self.tag = tag
        self.pty = pty
        self.buf = OutputBuffer(buffer_bytes)
        self.proc = None
        self.pid = 0
        self.pgid = 0
        self.out_fds: dict = {}  # fd -> stream name
        self.stdin_fd = -1
        self.master_fd = -1
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_waiters: list = []  # (conn, epoch, req_id)
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.exited = False
        self.status = 0
        self.rusage = None
        self.exited_mono = 0.0
        self.finished = False
        self.finished_mono = 0.0
        self.timed_out = False
        self.killed = False
        self.timeout_timer: Timer | None = None
        self.drain_timer: Timer | None = None
        self.waiters: list = []  # (conn, epoch, req_id, timer)
        self.attachments: set = set()
        self.cgroup = ""
        self.memory_peak = -1  # bytes, from the exec's cgroup (memory.peak) when available

    # -- reading output
    def on_output(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: PTY whose slave side is closed
                log(f"exec {self.id}: read error {exc!r}")
            data = b""
        if not data:
            self.close_output(fd)
            return
        self.buf.append(self.out_fds[fd], data)
        for att in list(self.attachments):
            att.pump()

    def close_output(self, fd: int) -> None:
        if fd not in self.out_fds:
            return
        self.agent.loop.forget(fd)
        del self.out_fds[fd]
        if fd == self.master_fd:
            self.master_fd = -1
            self.stdin_fd = -1
            self.stdin_buf.clear()
            self._release_stdin_waiters()
        _close_quietly(fd)
        self.maybe_finish()

    # -- stdin
    def write_stdin(self, data: bytes, eof: bool) -> None:
        if self.stdin_fd < 0:
            if data:
                raise OpError("stdin_closed", "stdin of this exec is closed")
            return
        self.stdin_buf += data
        self.stdin_eof = self.stdin_eof or eof
        self.agent.loop.set_writer(self.stdin_fd, self.on_stdin_writable)

    def on_stdin_writable(self) -> None:
        fd = self.stdin_fd
        if fd < 0:
            return
        if self.stdin_buf:
            try:
                n = os.write(fd, self.stdin_buf[:65536])
            except BlockingIOError:
                return
            except OSError:
                # The process closed its stdin (EPIPE): what it did not read is dropped.
                self.stdin_buf.clear()
                self._close_stdin()
                return
            del self.stdin_buf[:n]
        if len(self.stdin_buf) < STDIN_LIMIT:
            self._release_stdin_waiters()
        if not self.stdin_buf:
            if fd == self.master_fd:
                self.agent.loop.set_writer(fd, None)
                if self.stdin_eof:
                    self.stdin_eof = False
                    self.stdin_buf += b"\x04"  # EOT: end of input for a terminal in canonical mode
                    self.agent.loop.set_writer(fd, self.on_stdin_writable)
            elif self.stdin_eof:
                self._close_stdin()
            else:
                self.agent.loop.set_writer(fd, None)

    def _close_stdin(self) -> None:
        fd = self.stdin_fd
        if fd < 0:
            return
        if fd == self.master_fd:
            self.agent.loop.set_writer(fd, None)
            return
        self.agent.loop.forget(fd)
        _close_quietly(fd)
        self.stdin_fd = -1
        self._release_stdin_waiters()

    def _release_stdin_waiters(self) -> None:
        waiters, self.stdin_waiters = self.stdin_waiters, []
        for conn, epoch, req_id in waiters:
            conn.respond(epoch, req_id, {"buffered": len(self.stdin_buf), "open": self.stdin_fd >= 0})

    # -- lifetime
    def on_exit(self, status: int, rusage) -> None:
        self.exited = True
        self.status = status
        self.rusage = rusage
        self.exited_mono = time.monotonic()
        if self.timeout_timer:
            self.timeout_timer.cancel()
        if self.stdin_fd >= 0 and self.stdin_fd != self.master_fd:
            self.agent.loop.forget(self.stdin_fd)
            _close_quietly(self.stdin_fd)
            self.stdin_fd = -1
        self._release_stdin_waiters()
        if self.out_fds:
            # Background children may hold the pipes open: give them a moment, then stop reading.
            self.drain_timer = self.agent.loop.call_later(EXIT_DRAIN_GRACE, self._drain_expired)
        self.maybe_finish()

    def _drain_expired(self) -> None:
        for fd in list(self.out_fds):
            self.close_output(fd)

    def maybe_finish(self) -> None:
        if self.finished or not self.exited or self.out_fds:
            return
        self.finished = True
        self.finished_mono = time.monotonic()
        if self.drain_timer:
            self.drain_timer.cancel()
        if self.timed_out or self.killed:
            self.kill_tree(signal.SIGKILL)
        if self.cgroup:
            peak = _read_first_line(self.cgroup + "/memory.peak")
            if peak.isdigit():
                self.memory_peak = int(peak)
        self.agent.cgroup_remove(self)
        result = self.summary()
        for conn, epoch, req_id, timer in self.waiters:
            if timer:
                timer.cancel()
            conn.respond(epoch, req_id, result)
        self.waiters = []
        for att in list(self.attachments):
            att.pump()
        self.agent.exec_finished(self)

    def on_timeout(self) -> None:
        if self.exited:
            return
        self.timed_out = True
        self.kill_tree(signal.SIGKILL)

    def kill_tree(self, sig: int) -> None:
        """Signal every process of this exec: its cgroup when there is one (catches
        daemonised children too), else its process group and the descendants of its pid."""
        if self.cgroup and sig == signal.SIGKILL:
            try:
                with open(self.cgroup + "/cgroup.kill", "w") as fh:
                    fh.write("1")
            except OSError:
                pass
        targets = set()
        if self.cgroup:
            try:
                with open(self.cgroup + "/cgroup.procs") as fh:
                    targets.update(int(x) for x in fh.read().split())
            except (OSError, ValueError):
                pass
        targets.update(_descendants(self.pid))
        if self.pgid:
            try:
                os.killpg(self.pgid, sig)
            except OSError:
                pass
        for pid in targets:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def result(self) -> dict | None:
        if not self.exited:
            return None
        code = None
        sig = None
        if os.WIFEXITED(self.status):
            code = os.WEXITSTATUS(self.status)
        elif os.WIFSIGNALED(self.status):
            sig = _signal_name(os.WTERMSIG(self.status))
        ru = self.rusage
        return {
            "exit_code": code,
            "signal": sig,
            "timed_out": self.timed_out,
            "duration_ms": int((self.exited_mono - self.started_mono) * 1000),
            "cpu_ms": int((ru.ru_utime + ru.ru_stime) * 1000) if ru else 0,
            "max_rss_kib": self.memory_peak // 1024 if self.memory_peak >= 0 else int(ru.ru_maxrss) if ru else 0,
            "memory_source": "cgroup" if self.memory_peak >= 0 else "rusage",
        }

    def summary(self) -> dict:
        return {
            "exec_id": self.id,
            "tag": self.tag,
            "pid": self.pid,
            "argv": self.argv[:64],
            "pty": self.pty,
            "running": not self.finished,
            "exited": self.exited,
            "started_at": self.started_at,
            "base_offset": self.buf.base,
            "end_offset": self.buf.end,
            "buffer_bytes": self.buf.limit,
            "stdin_open": self.stdin_fd >= 0,
            "result": self.result(),
        }


def _descendants(root: int) -> set:
    if root <= 0:
        return set()
    children: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                text = fh.read()
            ppid = int(text[text.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Attachment:
    """A connection's subscription to one exec's output: a cursor plus a credit window."""

    def __init__(self, conn: Conn, sub: int, ex: Exec, offset: int, window: int) -> None:
        self.conn = conn
        self.sub = sub
        self.exec = ex
        self.cursor = offset
        self.window = window
        self.done = False

    def pump(self) -> None:
        conn = self.conn
        ex = self.exec
        while not self.done and not conn.closed:
            if conn.out_bytes >= OUTQ_SOFT:
                conn.blocked.add(self)
                return
            if self.cursor < ex.buf.end:
                if self.window <= 0:
                    return
                pieces = ex.buf.read(self.cursor, min(self.window, STREAM_CHUNK))
                if not pieces:
                    return
                offset, stream, data = pieces[0]
                # Merge consecutive pieces of the same stream into one event.
                blob = bytearray(data)
                for off2, stream2, data2 in pieces[1:]:
                    if stream2 != stream or off2 != offset + len(blob):
                        break
                    blob += data2
                conn.send(
                    {"ev": "out", "sub": self.sub, "exec_id": ex.id, "stream": stream, "offset": offset}, bytes(blob)
                )
                self.cursor = offset + len(blob)
                self.window -= len(blob)
                continue
            if ex.finished:
                conn.send(
                    {"ev": "exit", "sub": self.sub, "exec_id": ex.id, "end_offset": ex.buf.end, "result": ex.result()}
                )
                self.close()
            return

    def close(self) -> None:
        self.done = True
        self.exec.attachments.discard(self)
        self.conn.subs.pop(self.sub, None)
        self.conn.blocked.discard(self)


# ----- connections ------------------------------------------------------------------------


class Conn:
    """One host session over a byte stream. ``epoch`` changes when the session is reset,
    so late answers meant for an earlier host are never sent to the next one."""

    kind = "stream"

    def __init__(self, agent: Agent, fd: int) -> None:
        self.agent = agent
        self.fd = fd
        self.reader = FrameReader()
        self.outq: collections.deque = collections.deque()
        self.out_bytes = 0
        self.cur: memoryview | None = None
        self.epoch = 0
        self.nonce = ""
        self.subs: dict = {}
        self.blocked: set = set()
        self.closed = False

    # -- output
    def up(self) -> bool:
        return not self.closed

    def send(self, header: dict, data: bytes = b"") -> None:
        if not self.up():
            return  # nobody to send to: the session (and its subscriptions) is gone
        frame = encode_frame(header, data)
        self.outq.append(frame)
        self.out_bytes += len(frame)
        if self.out_bytes > OUTQ_HARD:
            log(f"{self.kind}: host is not reading ({self.out_bytes} bytes queued); resetting the session")
            self.overflow()
            return
        self.flush()

    def respond(
        self, epoch: int, req_id, result: dict | None = None, data: bytes = b"", error: OpError | None = None
    ) -> None:
        if req_id is None or epoch != self.epoch or self.closed:
            return
        if error is not None:
            self.send({"id": req_id, "ok": False, "error": {"code": error.code, "message": error.message}})
        else:
            self.send({"id": req_id, "ok": True, "result": result or {}}, data)

    def flush(self) -> None:
        while self.outq or self.cur is not None:
            if self.cur is None:
                self.cur = memoryview(self.outq.popleft())
            try:
                n = self.write(self.cur)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.on_write_error(exc)
                return
            if n == 0:
                self.agent.loop.set_writer(self.fd, self.flush)
                return
            self.out_bytes -= n
            self.cur = self.cur[n:] if n < len(self.cur) else None
        self.agent.loop.set_writer(self.fd, None)
        self.unblock()

    def unblock(self) -> None:
        if self.blocked and self.out_bytes < OUTQ_SOFT:
            blocked, self.blocked = self.blocked, set()
            for att in blocked:
                att.pump()

    def write(self, view: memoryview) -> int:
        return os.write(self.fd, view)

    def drop_output(self) -> None:
        self.outq.clear()
        self.cur = None
        self.out_bytes = 0
        if not self.closed:
            self.agent.loop.set_writer(self.fd, None)

    # -- input
    def read(self) -> bytes:
        return os.read(self.fd, 262144)

    def on_readable(self) -> None:
        try:
            data = self.read()
        except BlockingIOError:
            return
        except OSError as exc:
            self.on_read_error(exc)
            return
        if not data:
            self.on_eof()
            return
        for header, body in self.reader.feed(data):
            self.agent.handle_frame(self, header, body)
            if self.closed:
                return

    # -- session
    def reset_session(self) -> None:
        """Forget everything owned by the current host session: queued output (including a
        partly written frame), subscriptions, deferred answers and open upload handles."""
        self.epoch += 1
        self.drop_output()
        for att in list(self.subs.values()):
            att.close()
        self.subs.clear()
        self.blocked.clear()
        self.agent.session_closed(self)

    def overflow(self) -> None:
        self.close()

    def on_eof(self) -> None:
        self.close()

    def on_read_error(self, exc: OSError) -> None:
        self.close()

    def on_write_error(self, exc: OSError) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.reset_session()
        self.closed = True
        self.agent.loop.forget(self.fd)
        _close_quietly(self.fd)
        self.agent.conns.discard(self)


class SocketConn(Conn):
    kind = "vsock"

    def __init__(self, agent: Agent, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        super().__init__(agent, sock.fileno())

    def write(self, view: memoryview) -> int:
        return self.sock.send(view)

    def read(self) -> bytes:
        return self.sock.recv(262144)

    def close(self) -> None:
        if self.closed:
            return
        self.reset_session()
        self.closed = True
        self.agent.loop.forget(self.fd)
        self.sock.close()
        self.agent.conns.discard(self)


class SerialConn(Conn):
    """The virtio-serial port. It cannot be closed from the guest: a host disconnect shows
    as EOF/POLLHUP; the agent then resets the session and polls until a host is back."""

    kind = "virtio-serial"

    def __init__(self, agent: Agent, fd: int, path: str) -> None:
        super().__init__(agent, fd)
        self.path = path
        self.connected = False
        self.poll_timer: Timer | None = None

    def up(self) -> bool:
        return self.connected and not self.closed

    def start(self) -> None:
        self._check_host()

    def _check_host(self) -> None:
        self.poll_timer = None
        if self.closed:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLOUT)
        events = poller.poll(0)
        revents = events[0][1] if events else 0
        if revents & select.POLLNVAL:
            self.close()
            return
        if revents & select.POLLHUP:
            self.poll_timer = self.agent.loop.call_later(0.2, self._check_host)
            return
        self.connected = True
        self.agent.loop.set_reader(self.fd, self.on_readable)

    def _host_gone(self) -> None:
        self.connected = False
        self.reader.reset()
        self.reset_session()
        self.agent.loop.forget(self.fd)
        if self.poll_timer is None and not self.closed:
            self.poll_timer = self.agent.loop.call_later(0.2, self._check_host)

    def on_eof(self) -> None:
        self._host_gone()

    def on_read_error(self, exc: OSError) -> None:
        if exc.errno in (errno.ENODEV, errno.EBADF):
            self.close()
        else:
            self._host_gone()

    def on_write_error(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.EIO, errno.ENOTCONN):
            self._host_gone()
        else:
            self.close()

    def overflow(self) -> None:
        # Dropping a partly written frame corrupts the stream: the host sees a bad frame,
        # drops its connection and starts a new session with hello.
        self.reset_session()

    def close(self) -> None:
        if self.poll_timer:
            self.poll_timer.cancel()
        super().close()
        self.agent.serial_closed(self)


# ----- the agent ---------------------------------------------------------------------------


class FileHandle:
    def __init__(self, kind: str, fd: int, path: str, conn: Conn, epoch: int) -> None:
        self.kind = kind
        self.fd = fd
        self.path = path
        self.tmp = ""
        self.conn = conn
        self.epoch = epoch
        self.hasher = sha256()
        self.size = 0
        self.mode = 0o644
        self.pre_sha256 = ""  # reads: the checksum computed at open, valid while the file is unchanged
        self.identity: tuple = ()
        self.uid = -1
        self.gid = -1
        self.overwrite = True
        self.used = time.monotonic()


class Agent:
    def __init__(self, *, cgroup_root: str | None = _CGROUP_DIR, reap_interval: float = 1.0) -> None:
        _signals_as_default()  # what the commands inherit
        self.loop = Loop()
        self.conns: set = set()
        self.execs: dict = {}
        self.finished_order: collections.deque = collections.deque()
        self.handles: dict = {}
        self.serial: SerialConn | None = None
        self.boot_id = _read_first_line("/proc/sys/kernel/random/boot_id")
        self.cgroup_root = self._cgroup_setup(cgroup_root) if cgroup_root else ""
        self.sigchld_r, self.sigchld_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.started = time.monotonic()
        self.reap_interval = reap_interval
        self.reap_timer: Timer | None = None  # runs only while an exec's process may be alive
        self.ops = {
            "hello": self.op_hello,
            "ping": self.op_ping,
            "health": self.op_health,
            "exec_start": self.op_exec_start,
            "exec_list": self.op_exec_list,
            "exec_get": self.op_exec_get,
            "exec_read": self.op_exec_read,
            "exec_wait": self.op_exec_wait,
            "exec_stdin": self.op_exec_stdin,
            "exec_signal": self.op_exec_signal,
            "exec_resize": self.op_exec_resize,
            "exec_attach": self.op_exec_attach,
            "exec_credit": self.op_exec_credit,
            "exec_detach": self.op_exec_detach,
            "exec_forget": self.op_exec_forget,
            "file_stat": self.op_file_stat,
            "file_list": self.op_file_list,
            "file_mkdir": self.op_file_mkdir,
            "file_remove": self.op_file_remove,
            "file_rename": self.op_file_rename,
            "file_write_open": self.op_file_write_open,
            "file_write": self.op_file_write,
            "file_write_close": self.op_file_write_close,
            "file_write_abort": self.op_file_write_abort,
            "file_read_open": self.op_file_read_open,
            "file_read": self.op_file_read,
            "file_read_close": self.op_file_read_close,
            # snapshots app: identity of a restored/cloned VM (see op_identity_set below)
            "identity_set": lambda conn, req_id, args, data: op_identity_set(args),
            "identity_get": lambda conn, req_id, args, data: identity_report(),
        }

    # -- setup
    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self.sigchld_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.loop.set_reader(self.sigchld_r, self.on_sigchld)
        self.loop.call_later(30.0, self.sweep)

    @staticmethod
    def _cgroup_setup(path: str) -> str:
        """Mount cgroup2 when needed and create the parent cgroup of execs; '' when
        unavailable (then process groups and /proc descendants are used to kill trees)."""
        try:
            if not os.path.exists(_CGROUP_ROOT + "/cgroup.procs"):
                subprocess.run(
                    ["mount", "-t", "cgroup2", "cgroup2", _CGROUP_ROOT],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
            if not os.path.exists(_CGROUP_ROOT + "/cgroup.procs"):
                return ""
            os.makedirs(path, exist_ok=True)
            # The memory controller gives each exec an exact peak (memory.peak); wait4's
            # ru_maxrss cannot: exec records the forking parent's (the agent's) high-water mark.
            for control in (_CGROUP_ROOT + "/cgroup.subtree_control", path + "/cgroup.subtree_control"):
                try:
                    with open(control, "w") as fh:
                        fh.write("+memory")
                except OSError:
                    pass
            return path
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"cgroups unavailable: {exc!r}")
            return ""

    def add_stream(self, sock: socket.socket) -> SocketConn:
        conn = SocketConn(self, sock)
        self.conns.add(conn)
        self.loop.set_reader(conn.fd, conn.on_readable)
        return conn

    def open_serial(self) -> None:
        if self.serial is not None:
            return
        path = find_virtio_port()
        if path is None:
            self.loop.call_later(1.0, self.open_serial)
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log(f"cannot open {path}: {exc!r}")
            self.loop.call_later(1.0, self.open_serial)
            return
        log(f"serving virtio-serial port {path}")
        self.serial = SerialConn(self, fd, path)
        self.conns.add(self.serial)
        self.serial.start()

    def serial_closed(self, conn: SerialConn) -> None:
        if self.serial is conn:
            self.serial = None
            self.loop.call_later(1.0, self.open_serial)

    def listen_vsock(self) -> None:
        if not hasattr(socket, "AF_VSOCK"):
            return
        try:
            srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError:
            return  # no vsock device (QEMU microvm): nothing to serve
        try:
            srv.bind((socket.VMADDR_CID_ANY, VSOCK_PORT))
            srv.listen(8)
        except OSError as exc:
            srv.close()
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EAFNOSUPPORT):
                log(f"vsock listen failed: {exc!r}")
            return
        srv.setblocking(False)
        log(f"listening on vsock port {VSOCK_PORT}")

        def accept() -> None:
            try:
                sock, _ = srv.accept()
            except OSError:
                return
            if sum(1 for c in self.conns if c.kind == "vsock") >= MAX_VSOCK_CONNECTIONS:
                sock.close()
                return
            self.add_stream(sock)

        self.loop.set_reader(srv.fileno(), accept)
        self._vsock_server = srv

    # -- dispatch
    def handle_frame(self, conn: Conn, header_bytes: bytes, data: bytes) -> None:
        try:
            req = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            conn.send(
                {"id": None, "ok": False, "error": {"code": "bad_request", "message": "header is not UTF-8 JSON"}}
            )
            return
        if not isinstance(req, dict):
            conn.send(
                {"id": None, "ok": False, "error": {"code": "bad_request", "message": "header must be an object"}}
            )
            return
        req_id = req.get("id")
        if req_id is not None and (not isinstance(req_id, int) or isinstance(req_id, bool)):
            conn.send({"id": None, "ok": False, "error": {"code": "bad_request", "message": "id must be an integer"}})
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
            import traceback

            log(f"op {op} failed: {exc!r}\n{traceback.format_exc()}")
            conn.respond(conn.epoch, req_id, error=OpError("internal", f"{type(exc).__name__}: {exc}"))
            return
        if out is DEFERRED:
            return
        result, payload = out if isinstance(out, tuple) else (out, b"")
        conn.respond(conn.epoch, req_id, result, payload)

    def session_closed(self, conn: Conn) -> None:
        for handle_id, h in list(self.handles.items()):
            if h.conn is conn:
                self._handle_discard(handle_id)
        for ex in self.execs.values():
            ex.waiters = [w for w in ex.waiters if w[0] is not conn]
            ex.stdin_waiters = [w for w in ex.stdin_waiters if w[0] is not conn]

    # -- basic ops
    def op_hello(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        nonce = _arg(args, "nonce", str, "")[:128]
        if not nonce or nonce != conn.nonce:
            conn.reset_session()  # a new host session: nothing queued for the last one is sent
            conn.nonce = nonce
        return {
            "protocol": PROTOCOL_VERSION,
            "nonce": nonce,
            "agent_version": AGENT_VERSION,
            "boot_id": self.boot_id,
            "max_frame": MAX_FRAME,
            "max_data": MAX_DATA,
            "transport": conn.kind,
        }

    def op_ping(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        return {
            "agent_version": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "boot_id": self.boot_id,
            "uptime_s": round(_uptime_s(), 3),
            "hostname": socket.gethostname(),
        }

    def op_health(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        meminfo = {}
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        meminfo[key] = int(rest.split()[0])
        except (OSError, ValueError):
            pass
        try:
            load = list(os.getloadavg())
        except OSError:
            load = []
        st = os.statvfs("/")
        running = sum(1 for e in self.execs.values() if not e.finished)
        return {
            "status": "ok",
            "agent_version": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": round(_uptime_s(), 3),
            "agent_uptime_s": round(time.monotonic() - self.started, 3),
            "loadavg": load,
            "mem_total_kib": meminfo.get("MemTotal", 0),
            "mem_available_kib": meminfo.get("MemAvailable", 0),
            "root_free_bytes": st.f_bavail * st.f_frsize,
            "root_total_bytes": st.f_blocks * st.f_frsize,
            "execs_running": running,
            "execs_retained": len(self.execs),
            "connections": len(self.conns),
        }

    # -- exec ops
    def _exec(self, args: dict) -> Exec:
        exec_id = _arg(args, "exec_id", str, required=True)
        ex = self.execs.get(exec_id)
        if ex is None:
            raise OpError("not_found", f"no exec {exec_id}")
        return ex

    def op_exec_start(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        argv = args.get("argv")
        shell = args.get("shell")
        if isinstance(argv, list) and argv and all(isinstance(a, str) and "\x00" not in a for a in argv):
            argv = list(argv)
        elif isinstance(shell, str) and shell and "\x00" not in shell:
            argv = ["/bin/sh", "-c", shell]
        else:
            raise OpError("bad_request", "argv (non-empty list of strings) or shell (string) is required")
        env_arg = _arg(args, "env", dict, {})
        if not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\x00" not in k + v
            for k, v in env_arg.items()
        ):
            raise OpError("bad_request", "env must map names to strings")
        timeout = _arg(args, "timeout", float)
        if timeout is not None and not 0 < timeout <= 86400 * 7:
            raise OpError("bad_request", "timeout must be between 0 and 7 days")
        tag = _arg(args, "tag", str, "")[:128]
        buffer_bytes = _arg(args, "buffer_bytes", int, DEFAULT_EXEC_BUFFER)
        buffer_bytes = max(MIN_EXEC_BUFFER, min(MAX_EXEC_BUFFER, buffer_bytes))
        pty_arg = args.get("pty")
        if pty_arg is not None and not isinstance(pty_arg, dict):
            raise OpError("bad_request", "pty must be an object or null")
        stdin_mode = _arg(args, "stdin", str, "pipe" if data else "null")
        if stdin_mode not in ("null", "pipe") or (data and stdin_mode == "null"):
            raise OpError("bad_request", "stdin must be 'null' or 'pipe' ('pipe' when data is sent)")
        running = [e for e in self.execs.values() if not e.finished]
        if len(running) >= MAX_RUNNING_EXECS:
            raise OpError("too_many", f"at most {MAX_RUNNING_EXECS} execs may run at once")
        if sum(e.buf.limit for e in running) + buffer_bytes > RUNNING_BUFFER_BUDGET:
            raise OpError("too_many", "output buffers of running execs exceed the agent's budget")
        user = args.get("user") or "root"
        try:
            pw = pwd.getpwuid(user) if isinstance(user, int) and not isinstance(user, bool) else pwd.getpwnam(str(user))
        except (KeyError, TypeError) as exc:
            raise OpError("not_found", f"no user {user!r}") from exc
        cwd = _arg(args, "cwd", str, "") or (pw.pw_dir if os.path.isdir(pw.pw_dir) else "/")
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": pw.pw_dir,
            "USER": pw.pw_name,
            "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh",
            "LANG": "C.UTF-8",
        }
        if pty_arg is not None:
            env["TERM"] = str(pty_arg.get("term") or "xterm-256color")[:64]
        env.update(env_arg)
        exec_id = secrets.token_hex(8)
        ex = Exec(self, exec_id, argv, tag, buffer_bytes, pty_arg is not None)
        self._spawn(ex, pw, cwd, env, pty_arg, stdin_mode)
        self.execs[exec_id] = ex
        if timeout:
            ex.timeout_timer = self.loop.call_later(timeout, ex.on_timeout)
        if data or args.get("stdin_eof"):
            ex.write_stdin(data, bool(args.get("stdin_eof")))
        attach = args.get("attach")
        if isinstance(attach, dict):
            self._attach(conn, ex, attach)
        # The child may have exited before SIGCHLD was handled: check right away.
        self.loop.call_later(0, self.on_sigchld)
        self._reap_schedule()
        return {"exec_id": exec_id, "pid": ex.pid, "tag": tag, "started_at": ex.started_at}

    def _spawn(self, ex: Exec, pw, cwd: str, env: dict, pty_arg, stdin_mode: str) -> None:
        """Start the process with vfork semantics (no preexec hook), so the agent's own
        memory never shows in the child's peak RSS: the controlling terminal and the user
        switch are done by util-linux ``setsid --ctty`` and ``setpriv`` exec'ing in place
        (same pid); the cgroup is joined from here right after the exec."""
        program = ex.argv[0]
        if "/" in program:
            if not os.path.exists(program):
                raise OpError("not_found", f"command not found: {program}")
        elif shutil.which(program, path=env.get("PATH")) is None:
            raise OpError("not_found", f"command not found: {program}")
        if not os.path.isdir(cwd):
            raise OpError("not_found", f"working directory {cwd} does not exist")
        uid, gid = pw.pw_uid, pw.pw_gid
        switch_user = uid != os.getuid()
        use_pty = pty_arg is not None
        prefix = []
        popen_user = {}
        if use_pty:
            prefix += [_SETSID, "--ctty"] if _SETSID else []
        if switch_user:
            if _SETPRIV:
                prefix += [_SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--init-groups"]
            else:
                groups = [g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem]
                popen_user = {"user": uid, "group": gid, "extra_groups": groups}
        cgroup = ""
        if self.cgroup_root:
            cgroup = f"{self.cgroup_root}/{ex.id}"
            try:
                os.mkdir(cgroup)
            except OSError:
                cgroup = ""
        child_fds = []
        master = stdin_p = stdout_p = stderr_p = -1
        if use_pty:
            master, slave = os.openpty()
            rows = _clamp(pty_arg.get("rows"), 1, 1000, 24)
            cols = _clamp(pty_arg.get("cols"), 1, 1000, 80)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            stdin_c = stdout_c = stderr_c = slave
            child_fds.append(slave)
        else:
            if stdin_mode == "pipe":
                stdin_c, stdin_p = os.pipe2(os.O_CLOEXEC)
            else:
                stdin_c = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stdout_p, stdout_c = os.pipe2(os.O_CLOEXEC)
            stderr_p, stderr_c = os.pipe2(os.O_CLOEXEC)
            child_fds += [stdin_c, stdout_c, stderr_c]
        try:
            proc = subprocess.Popen(  # noqa: S603 - running commands is this agent's job
                prefix + ex.argv,
                stdin=stdin_c,
                stdout=stdout_c,
                stderr=stderr_c,
                cwd=cwd,
                env=env,
                # With a PTY, setsid(1) makes the new session (and takes the terminal).
                start_new_session=not (use_pty and _SETSID),
                close_fds=True,
                **popen_user,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            for fd in child_fds + [master, stdin_p, stdout_p, stderr_p]:
                if fd >= 0:
                    _close_quietly(fd)
            if cgroup:
                try:
                    os.rmdir(cgroup)
                except OSError:
                    pass
            if isinstance(exc, PermissionError):
                raise OpError("permission_denied", f"cannot execute {program}: {exc.strerror}") from exc
            if isinstance(exc, FileNotFoundError):
                raise OpError("not_found", f"command not found: {program}") from exc
            raise OpError("exec_failed", f"cannot start {program}: {exc}") from exc
        for fd in child_fds:
            _close_quietly(fd)
        ex.proc = proc
        ex.pid = proc.pid
        ex.pgid = proc.pid
        if cgroup:
            try:
                with open(cgroup + "/cgroup.procs", "w") as fh:
                    fh.write(str(proc.pid))
                ex.cgroup = cgroup
            except OSError:
                try:
                    os.rmdir(cgroup)
                except OSError:
                    pass
        if use_pty:
            os.set_blocking(master, False)
            ex.master_fd = master
            ex.stdin_fd = master
            ex.out_fds[master] = "pty"
            self.loop.set_reader(master, lambda fd=master: ex.on_output(fd))
        else:
            for fd, name in ((stdout_p, "stdout"), (stderr_p, "stderr")):
                os.set_blocking(fd, False)
                ex.out_fds[fd] = name
                self.loop.set_reader(fd, lambda fd=fd: ex.on_output(fd))
            if stdin_p >= 0:
                os.set_blocking(stdin_p, False)
                ex.stdin_fd = stdin_p

    def on_sigchld(self) -> None:
        try:
            while os.read(self.sigchld_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        for ex in list(self.execs.values()):
            if ex.exited or not ex.pid:
                continue
            try:
                pid, status, rusage = os.wait4(ex.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status, rusage = ex.pid, 0, None
            if pid:
                if ex.proc is not None:
                    ex.proc.returncode = status  # keep Popen from waiting again
                ex.on_exit(status, rusage)

    def _reap_tick(self) -> None:
        # Safety net for a lost SIGCHLD wakeup (and the only reaper when no signal handler
        # can be installed, e.g. an agent run in a thread by tests). It stops once no exec
        # is left to reap, so an idle agent does not wake up every second.
        self.reap_timer = None
        self.on_sigchld()
        self._reap_schedule()

    def _reap_schedule(self) -> None:
        if self.reap_timer is None and any(not ex.exited and ex.pid for ex in self.execs.values()):
            self.reap_timer = self.loop.call_later(self.reap_interval, self._reap_tick)

    def exec_finished(self, ex: Exec) -> None:
        self.finished_order.append(ex.id)
        while len(self.finished_order) > MAX_RETAINED_FINISHED:
            old = self.finished_order.popleft()
            gone = self.execs.pop(old, None)
            if gone is not None:
                for att in list(gone.attachments):
                    att.close()

    def cgroup_remove(self, ex: Exec) -> None:
        if ex.cgroup:
            try:
                os.rmdir(ex.cgroup)
                ex.cgroup = ""
            except OSError:
                pass  # background processes still live in it; the sweep retries

    def op_exec_list(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        tag = _arg(args, "tag", str)
        items = [e.summary() for e in self.execs.values() if tag is None or e.tag == tag]
        items.sort(key=lambda s: s["started_at"])
        return {"execs": items}

    def op_exec_get(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        return self._exec(args).summary()

    def op_exec_read(self, conn: Conn, req_id, args: dict, data: bytes):
        ex = self._exec(args)
        offset = max(0, _arg(args, "offset", int, 0))
        max_bytes = max(1, min(MAX_DATA, _arg(args, "max", int, MAX_DATA)))
        pieces = ex.buf.read(offset, max_bytes)
        start = pieces[0][0] if pieces else max(offset, ex.buf.base) if offset <= ex.buf.end else offset
        chunks = [[stream, len(blob)] for _, stream, blob in pieces]
        payload = b"".join(blob for _, _, blob in pieces)
        summary = ex.summary()
        summary.update({"offset": start, "next_offset": start + len(payload), "chunks": chunks})
        return summary, payload

    def op_exec_wait(self, conn: Conn, req_id, args: dict, data: bytes):
        ex = self._exec(args)
        if ex.finished:
            return ex.summary()
        timeout = _arg(args, "timeout", float, 30.0)
        timeout = max(0.0, min(timeout, 3600.0))
        entry = [conn, conn.epoch, req_id, None]

        def expire() -> None:
            if entry in ex.waiters:
                ex.waiters.remove(entry)
                conn.respond(entry[1], req_id, ex.summary())

        entry[3] = self.loop.call_later(timeout, expire)
        ex.waiters.append(entry)
        return DEFERRED

    def op_exec_stdin(self, conn: Conn, req_id, args: dict, data: bytes):
        ex = self._exec(args)
        eof = bool(args.get("eof"))
        if ex.stdin_fd < 0:
            if data:
                raise OpError("stdin_closed", "stdin of this exec is closed")
            return {"buffered": 0, "open": False}
        ex.write_stdin(data, eof)
        if len(ex.stdin_buf) >= STDIN_LIMIT and req_id is not None:
            # Back-pressure: answer once the process has read enough.
            ex.stdin_waiters.append((conn, conn.epoch, req_id))
            return DEFERRED
        return {"buffered": len(ex.stdin_buf), "open": ex.stdin_fd >= 0}

    def op_exec_signal(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        sig = _signal_number(args.get("signal", "TERM"))
        if ex.exited:
            return {"delivered": False}
        if sig == signal.SIGKILL:
            ex.killed = True
        if args.get("group", True):
            ex.kill_tree(sig) if sig == signal.SIGKILL else _killpg_quietly(ex.pgid, sig)
        else:
            try:
                os.kill(ex.pid, sig)
            except OSError:
                return {"delivered": False}
        return {"delivered": True}

    def op_exec_resize(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        if ex.master_fd < 0:
            raise OpError("bad_request", "this exec has no terminal")
        rows = _clamp(args.get("rows"), 1, 1000, 24)
        cols = _clamp(args.get("cols"), 1, 1000, 80)
        fcntl.ioctl(ex.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return {"rows": rows, "cols": cols}

    def _attach(self, conn: Conn, ex: Exec, args: dict) -> Attachment:
        sub = _arg(args, "sub", int, required=True)
        if sub in conn.subs:
            raise OpError("exists", f"subscription {sub} exists")
        if len(conn.subs) >= MAX_SUBS_PER_CONN:
            raise OpError("too_many", "too many subscriptions on this connection")
        offset = max(0, _arg(args, "offset", int, 0))
        window = max(1, min(MAX_WINDOW, _arg(args, "window", int, DEFAULT_WINDOW)))
        att = Attachment(conn, sub, ex, offset, window)
        conn.subs[sub] = att
        ex.attachments.add(att)
        self.loop.call_later(0, att.pump)  # after the response is queued
        return att

    def op_exec_attach(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        att = self._attach(conn, ex, args)
        summary = ex.summary()
        summary["offset"] = max(att.cursor, ex.buf.base)
        return summary

    def op_exec_credit(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        att = conn.subs.get(_arg(args, "sub", int, required=True))
        if att is None:
            return {"known": False}
        att.window = min(MAX_WINDOW, att.window + max(0, _arg(args, "bytes", int, 0)))
        att.pump()
        return {"known": True}

    def op_exec_detach(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        att = conn.subs.get(_arg(args, "sub", int, required=True))
        if att is not None:
            att.close()
        return {"known": att is not None}

    def op_exec_forget(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        ex = self._exec(args)
        if not ex.finished:
            raise OpError("conflict", "exec is still running")
        self.execs.pop(ex.id, None)
        for att in list(ex.attachments):
            att.close()
        return {}

    # -- file ops
    def op_file_stat(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        path = _path_arg(args)
        return _stat_entry(path, os.lstat(path), with_target=True)

    def op_file_list(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        path = _path_arg(args)
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
                item = _stat_entry(entry.path, st, with_target=False)
                item["name"] = entry.name
                entries.append(item)
        entries.sort(key=lambda e: e["name"])
        return {"path": path, "entries": entries, "truncated": truncated}

    def op_file_mkdir(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        path = _path_arg(args)
        mode = _arg(args, "mode", int, 0o755) & 0o7777
        if args.get("parents", True):
            os.makedirs(path, mode=mode, exist_ok=bool(args.get("exist_ok", True)))
        else:
            os.mkdir(path, mode)
        _chown_arg(path, args)
        return _stat_entry(path, os.lstat(path), with_target=False)

    def op_file_remove(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        path = _path_arg(args)
        if os.path.normpath(path) == "/":
            raise OpError("bad_request", "refusing to remove /")
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if args.get("recursive"):
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        return {"removed": path}

    def op_file_rename(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        src = _path_arg(args, "src")
        dst = _path_arg(args, "dst")
        if not args.get("overwrite", False) and os.path.lexists(dst):
            raise OpError("exists", f"{dst} exists")
        os.rename(src, dst)
        return {"src": src, "dst": dst}

    def _new_handle(self, h: FileHandle) -> str:
        if len(self.handles) >= MAX_HANDLES:
            raise OpError("too_many", "too many open file transfers")
        handle_id = secrets.token_hex(8)
        self.handles[handle_id] = h
        return handle_id

    def _handle(self, args: dict, kind: str) -> tuple:
        handle_id = _arg(args, "handle", str, required=True)
        h = self.handles.get(handle_id)
        if h is None or h.kind != kind:
            raise OpError("not_found", "no such transfer (expired or aborted)")
        h.used = time.monotonic()
        return handle_id, h

    def _handle_discard(self, handle_id: str) -> None:
        h = self.handles.pop(handle_id, None)
        if h is None:
            return
        _close_quietly(h.fd)
        if h.kind == "write" and h.tmp:
            try:
                os.unlink(h.tmp)
            except OSError:
                pass

    def op_file_write_open(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        path = _path_arg(args)
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        h = FileHandle("write", fd, path, conn, conn.epoch)
        h.tmp = tmp
        h.overwrite = overwrite
        mode = _arg(args, "mode", int)
        if mode is None and os.path.exists(path):
            mode = stat.S_IMODE(os.stat(path).st_mode)
        h.mode = (mode if mode is not None else 0o644) & 0o7777
        h.uid, h.gid = _owner_arg(args)
        try:
            handle_id = self._new_handle(h)
        except OpError:
            _close_quietly(fd)
            os.unlink(tmp)
            raise
        return {"handle": handle_id, "max_data": MAX_DATA}

    def op_file_write(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        handle_id, h = self._handle(args, "write")
        view = memoryview(data)
        try:
            while view:
                n = os.write(h.fd, view)
                view = view[n:]
        except OSError:
            self._handle_discard(handle_id)
            raise
        h.hasher.update(data)
        h.size += len(data)
        return {"size": h.size}

    def op_file_write_close(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        handle_id, h = self._handle(args, "write")
        expected = _arg(args, "sha256", str)
        digest = h.hasher.hexdigest()
        try:
            if expected is not None and expected.lower() != digest:
                raise OpError("checksum_mismatch", f"received data has sha256 {digest}, expected {expected}")
            os.fchmod(h.fd, h.mode)
            if h.uid >= 0 or h.gid >= 0:
                os.fchown(h.fd, h.uid, h.gid)
            os.fsync(h.fd)
            if not h.overwrite and os.path.lexists(h.path):
                raise OpError("exists", f"{h.path} exists")
            os.rename(h.tmp, h.path)
            h.tmp = ""
            _fsync_dir(os.path.dirname(h.path))
        finally:
            self._handle_discard(handle_id)
        return {"path": h.path, "size": h.size, "sha256": digest}

    def op_file_write_abort(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        handle_id = _arg(args, "handle", str, required=True)
        self._handle_discard(handle_id)
        return {}

    def op_file_read_open(self, conn: Conn, req_id, args: dict, data: bytes):
        path = _path_arg(args)
        # Only regular files are sent: a device (/dev/zero), FIFO or socket never ends or
        # blocks. Checked before open (opening some devices has effects) and after (O_NONBLOCK:
        # a FIFO swapped in meanwhile must not wait for a writer).
        _regular_file_checked(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            _regular_file_checked(path, st)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            h = FileHandle("read", fd, path, conn, conn.epoch)
            handle_id = self._new_handle(h)
        except BaseException:
            _close_quietly(fd)
            raise
        result = _stat_entry(path, st, with_target=False)
        result["handle"] = handle_id
        if not args.get("sha256"):
            return result
        # The checksum is computed before streaming (so it can lead the transfer), in slices
        # so other sessions keep being served meanwhile.
        epoch = conn.epoch

        h.identity = _identity(st)

        def checksum():
            hasher = sha256()
            pos = 0
            deadline = time.monotonic() + HASH_MAX_SECONDS
            while True:
                if handle_id not in self.handles:
                    return
                failure = None
                try:
                    chunk = os.pread(fd, HASH_SLICE, pos)
                except OSError as exc:  # /proc/self/mem and friends: EIO
                    chunk, failure = b"", os_error(exc)
                if not failure and pos + len(chunk) > READ_MAX_BYTES:
                    failure = OpError("too_large", f"{path} is larger than {READ_MAX_BYTES} bytes")
                if not failure and time.monotonic() > deadline:
                    failure = OpError("timeout", f"{path} could not be read within {HASH_MAX_SECONDS:.0f}s")
                if failure is not None:
                    self._handle_discard(handle_id)
                    conn.respond(epoch, req_id, error=failure)
                    return
                if not chunk:
                    break
                hasher.update(chunk)
                pos += len(chunk)
                yield
            result["sha256"] = h.pre_sha256 = hasher.hexdigest()
            result["size"] = pos
            conn.respond(epoch, req_id, result)

        self.loop.add_task(checksum())
        return DEFERRED

    def op_file_read(self, conn: Conn, req_id, args: dict, data: bytes):
        handle_id, h = self._handle(args, "read")
        max_bytes = max(1, min(MAX_DATA, _arg(args, "max", int, MAX_DATA)))
        try:
            chunk = os.read(h.fd, max_bytes)
        except OSError:
            self._handle_discard(handle_id)
            raise
        if not h.pre_sha256:
            h.hasher.update(chunk)  # with a checksum from open, an unchanged file needs no second hash
        h.size += len(chunk)
        return {"offset": h.size - len(chunk), "eof": not chunk}, chunk

    def op_file_read_close(self, conn: Conn, req_id, args: dict, data: bytes) -> dict:
        handle_id, h = self._handle(args, "read")
        try:
            unchanged = _identity(os.fstat(h.fd)) == h.identity
        except OSError:
            unchanged = False
        self._handle_discard(handle_id)
        if h.pre_sha256:
            # The bytes sent are the bytes hashed at open unless the file changed since.
            return {"size": h.size, "sha256": h.pre_sha256 if unchanged else "", "changed": not unchanged}
        return {"size": h.size, "sha256": h.hasher.hexdigest(), "changed": False}

    # -- housekeeping
    def sweep(self) -> None:
        now = time.monotonic()
        for handle_id, h in list(self.handles.items()):
            if now - h.used > HANDLE_IDLE_SECONDS:
                log(f"closing idle transfer of {h.path}")
                self._handle_discard(handle_id)
        for ex in self.execs.values():
            if ex.finished and ex.cgroup:
                self.cgroup_remove(ex)
        self.loop.call_later(30.0, self.sweep)

    def run(self) -> None:
        while True:
            self.loop.run_once()


DEFERRED = object()


def _clamp(value, low: int, high: int, default: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        return default
    return max(low, min(high, value))


def _killpg_quietly(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _regular_file_checked(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise OpError("is_a_directory", f"{path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise OpError("bad_request", f"{path} is not a regular file (devices, FIFOs and sockets are not sent)")


def _owner_arg(args: dict) -> tuple:
    uid = args.get("uid", -1)
    gid = args.get("gid", -1)
    owner = args.get("owner")
    if isinstance(owner, str) and owner:
        user, _, group = owner.partition(":")
        try:
            if user:
                pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
                uid = pw.pw_uid
                gid = pw.pw_gid if not group else gid
            if group:
                gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError as exc:
            raise OpError("not_found", f"unknown owner {owner!r}") from exc
    if not isinstance(uid, int) or not isinstance(gid, int) or isinstance(uid, bool) or isinstance(gid, bool):
        raise OpError("bad_request", "uid and gid must be integers")
    return uid, gid


def _chown_arg(path: str, args: dict) -> None:
    uid, gid = _owner_arg(args)
    if uid >= 0 or gid >= 0:
        os.chown(path, uid, gid)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or "/", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat_entry(path: str, st: os.stat_result, *, with_target: bool) -> dict:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "directory"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
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
            pass
    return out


def _read_first_line(path: str, default: str = "") -> str:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return default


def _uptime_s() -> float:
    try:
        return float(_read_first_line("/proc/uptime", "0 0").split()[0])
    except (ValueError, IndexError):
        return 0.0


def find_virtio_port(name: str = PORT_NAME):
    """Path of the character device of the named virtio-serial port, or None.

    There is no udev in the guest, so /dev/virtio-ports/<name> may not exist: fall back
    to scanning /sys/class/virtio-ports/*/name.
    """
    link = "/dev/virtio-ports/" + name
    if os.path.exists(link):
        return link
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        if _read_first_line(name_file) == name:
            dev = "/dev/" + os.path.basename(os.path.dirname(name_file))
            if os.path.exists(dev):
                return dev
    return None


# ----- identity after restore/clone (snapshots app) --------------------------------------
# Kept apart from the other ops on purpose: a VM restored or cloned from a memory snapshot
# resumes with the snapshot's hostname, machine-id, MACs, wall clock and RNG state, and the
# host calls this once the agent answers again.

_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def _identity_write(path: str, text: str) -> None:
    tmp = path + ".sandbox-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def op_identity_set(args: dict) -> dict:
    """Apply the identity the host chose; every key is optional.

    ``hostname`` (str), ``machine_id`` (32 hex), ``macs`` ({ifname: "aa:bb:.."}; the key
    ``"*"`` means the first non-loopback interface), ``clock_unix`` (float: step the wall
    clock), ``entropy`` (hex: mixed into the kernel pool and the CRNG reseeded, so clones do
    not share random streams). Returns what was applied and what the guest now reports."""
    import re

    done = []
    if "clock_unix" in args:
        time.clock_settime(time.CLOCK_REALTIME, float(args["clock_unix"]))
        done.append("clock")
    entropy = args.get("entropy")
    if entropy:
        blob = bytes.fromhex(str(entropy))[:512]
        try:
            fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _RNDADDENTROPY, struct.pack("ii", len(blob) * 8, len(blob)) + blob)
                fcntl.ioctl(fd, _RNDRESEEDCRNG)
            finally:
                os.close(fd)
            done.append("entropy")
        except OSError as exc:
            log(f"identity_set: entropy not applied: {exc!r}")
    machine_id = args.get("machine_id")
    if machine_id:
        if not re.fullmatch(r"[0-9a-f]{32}", str(machine_id)):
            raise ValueError("machine_id must be 32 lowercase hex digits")
        _identity_write("/etc/machine-id", f"{machine_id}\n")
        done.append("machine_id")
    hostname = args.get("hostname")
    if hostname:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", str(hostname)):
            raise ValueError("invalid hostname")
        socket.sethostname(hostname)
        _identity_write("/etc/hostname", f"{hostname}\n")
        try:
            with open("/etc/hosts") as fh:
                lines = [ln for ln in fh.read().splitlines() if not ln.startswith("127.0.1.1")]
        except OSError:
            lines = ["127.0.0.1\tlocalhost"]
        lines.insert(1, f"127.0.1.1\t{hostname}")
        _identity_write("/etc/hosts", "\n".join(lines) + "\n")
        done.append("hostname")
    ifaces = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    for ifname, mac in dict(args.get("macs") or {}).items():
        if ifname == "*":
            if not ifaces:
                continue
            ifname = ifaces[0]
        if ifname not in ifaces or not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", str(mac)):
            raise ValueError(f"bad interface or MAC: {ifname} {mac}")
        subprocess.run(
            ["ip", "link", "set", "dev", ifname, "address", mac],
            check=True,
            timeout=10,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        done.append(f"mac:{ifname}")
    ipv4 = args.get("ipv4")
    if ipv4:
        # {"ifname": "eth0", "address": "10.0.0.5/24", "gateway": "10.0.0.1"}: a clone must not
        # keep the address the original configured at boot.
        ifname = str(ipv4.get("ifname") or (ifaces[0] if ifaces else ""))
        if ifname not in ifaces:
            raise ValueError(f"no interface {ifname!r}")

        def run(*cmd: str) -> None:
            subprocess.run(["ip", *cmd], check=True, timeout=10, capture_output=True, stdin=subprocess.DEVNULL)

        run("-4", "addr", "flush", "dev", ifname)
        run("addr", "add", str(ipv4["address"]), "dev", ifname)
        run("link", "set", ifname, "up")
        if ipv4.get("gateway"):
            run("route", "replace", "default", "via", str(ipv4["gateway"]), "dev", ifname)
        done.append(f"ipv4:{ifname}")
    return {"applied": done, "identity": identity_report()}


def identity_report() -> dict:
    """Hostname, machine-id, interface MACs and wall clock as the guest sees them now."""
    macs = {}
    for name in sorted(os.listdir("/sys/class/net")):
        if name != "lo":
            macs[name] = _read_first_line(f"/sys/class/net/{name}/address")
    return {
        "hostname": socket.gethostname(),
        "machine_id": _read_first_line("/etc/machine-id"),
        "macs": macs,
        "clock_unix": time.time(),
    }


def _signals_as_default() -> None:
    """Whatever started the agent may have left signals ignored or blocked (nohup, a service
    manager, a script); both carry over across exec into every command, which would then
    ignore Ctrl-C or a signal frame. Called when the agent is made, before its threads. An agent
    hosted in a thread (a test's stand-in VMM) leaves the host process's signals alone."""
    try:
        for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM",
                     "SIGTSTP", "SIGTTIN", "SIGTTOU"):  # fmt: skip
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread
        return
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_SETMASK, set())


def main() -> int:
    global sha256
    sha256 = _pick_sha256()
    log(f"starting agent {AGENT_VERSION} (protocol v{PROTOCOL_VERSION}, sha256 from {sha256.__module__})")
    agent = Agent()
    agent.install_signal_handlers()
    agent.open_serial()
    agent.listen_vsock()
    agent.run()
    return 1


if __name__ == "__main__":
    sys.exit(main())
