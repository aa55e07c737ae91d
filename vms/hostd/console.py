"""Serial console of one VM in the host daemon (asyncio, no Django).

Offsets are absolute byte positions in the VM's console history. The history lives in
``<runtime_dir>/serial.log``; ``ConsoleRing`` keeps its newest ``ring_bytes`` in memory.

- QEMU writes everything the guest prints to ``serial.log`` itself (``logfile=``), whether
  or not anyone is connected. hostd therefore takes its data from the log (offset = log
  position) and uses the ``serial.sock`` connection for input and as a prompt to read
  the log at once; what arrives on the socket is drained so the guest never stalls.
- cloud-hypervisor has no log file: hostd appends what it reads from the socket to
  ``serial.log`` (output while hostd is down is lost there; documented in docs/hostd.md).

The log is capped (``log_max_bytes``, SANDBOX_CONSOLE_LOG_MAX_BYTES): once the bytes kept
on disk pass the cap, hostd punches a hole over the oldest ones (``fallocate`` with
``FALLOC_FL_PUNCH_HOLE``: the blocks are freed, the file keeps its size), leaving the newest
three quarters of the cap. QEMU keeps appending (``logappend=on``: O_APPEND) and every
offset stays what it was; offsets below ``log_start`` were dropped and a read from there
answers from ``log_start`` on (a gap the viewer is told about). On a filesystem without
hole punching the log is truncated instead (offsets continue after the truncation, see
below). While hostd is down nothing caps the log; it is capped again when hostd starts.

A reader keeps its own cursor: replay comes from the ring, or from the file when older
than the ring; a reader that falls behind never holds anything up (it reads on from its
cursor when it is ready). If the log shrinks (truncated or rotated), offsets keep growing:
the new file's first byte gets the offset following the last byte seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from pathlib import Path

from vms.hostd.agent_link import peer_pid

logger = logging.getLogger("vms.hostd.console")

SERIAL_SOCKET = "serial.sock"
SERIAL_LOG = "serial.log"
LOG_POLL_SECONDS = 0.25
SOCKET_READ = 256 << 10  # bytes taken from the serial socket per read
STREAM_CHUNK = 256 << 10  # console bytes per stream event at most (a stream batches what is there)
STREAM_READ = 1 << 20  # bytes a stream takes from the ring or the log at once (sent as several events)
MAX_CATCHUP = 1 << 20  # bytes of log read per wakeup
WRITE_TIMEOUT = 5.0
# QEMU's UART hands the serial socket one byte per write, so a guest printing nonstop woke hostd
# for every few bytes: a socket read (about 30 us), a log read and a stream event each, three
# quarters of a core for one guest at 0.24 MiB/s under TCG. Under QEMU, after a read of less than
# SMALL_READ the socket is left unread for TRICKLE_PAUSE_SECONDS (the VMM's socket buffer, 212 KiB
# by default, holds 278 one-byte writes; a full buffer makes QEMU wait for the socket to take more
# and the guest wait in its UART driver, not in a loop), and the log is read at most every
# COALESCE_SECONDS. The first byte after a quiet spell still goes out at once (a keystroke's
# echo). Not for cloud-hypervisor: it buffers what a full socket refused until the guest writes
# again, so a paused read could hold back the end of a burst (a prompt) for good.
TRICKLE_PAUSE_SECONDS = 0.001
SMALL_READ = 4096
COALESCE_SECONDS = 0.005
LOG_MAX_BYTES = 16 << 20
PUNCH_ALIGN = 4096
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class ConsoleUnavailable(Exception):
    """The serial socket is not connected (VM booting, gone, or another client holds it)."""


class ConsoleRing:
    """The newest ``limit`` bytes of the console, addressed by absolute offsets.
    Overflow rule: the oldest bytes are dropped and ``base`` advances."""

    def __init__(self, limit: int, base: int = 0) -> None:
        self.limit = limit
        self.base = base
        self._buf = bytearray()

    @property
    def end(self) -> int:
        return self.base + len(self._buf)

    def append(self, data: bytes) -> None:
        self._buf += data
        excess = len(self._buf) - self.limit
        if excess > 0:
            del self._buf[:excess]
            self.base += excess

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Bytes from ``offset`` (which must be >= ``base``), at most ``max_bytes``."""
        start = offset - self.base
        with memoryview(self._buf) as view:  # one copy (a bytearray slice would make two)
            return bytes(view[start : start + max_bytes])


class ConsoleLink:
    def __init__(
        self, vm_id: str, runtime_dir: Path, *, ring_bytes: int, qemu_log: bool, log_max_bytes: int = LOG_MAX_BYTES
    ) -> None:
        self.vm_id = vm_id
        self.log_max_bytes = max(log_max_bytes, 4 * PUNCH_ALIGN)
        self._data_start = 0  # file position of the oldest byte still on disk
        self.log_dropped = 0  # bytes dropped by the cap, ever (this hostd)
        self.runtime_dir = runtime_dir
        self.qemu_log = qemu_log
        self.log_path = runtime_dir / SERIAL_LOG
        self.ring = ConsoleRing(ring_bytes)
        self.log_base = 0  # absolute offset of byte 0 of the current log file
        self._pos = 0  # bytes of the current log file already in the ring
        self._inode = 0
        self._writer: asyncio.StreamWriter | None = None
        self.vmm_pid: int | None = None  # the VMM the serial socket connection reached
        self._poke = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error = ""
        self.socket_reads = 0  # reads of the serial socket (this hostd), for status and tests

    # ----- lifetime ----------------------------------------------------------------

    def start(self) -> None:
        self._prefill()
        self._tasks.append(asyncio.create_task(self._socket_loop(), name=f"console-sock-{self.vm_id}"))
        if self.qemu_log:
            self._tasks.append(asyncio.create_task(self._log_loop(), name=f"console-log-{self.vm_id}"))

    async def stop(self) -> None:
        # Cancelled again while any is left: a cancellation that meets a wait ending at the same
        # moment can be lost (asyncio.wait_for), and the loop would run on; never wait unbounded.
        for _ in range(10):
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.5)
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved (logged nowhere else): the loops end only when cancelled
        self._tasks.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._notify()

    def _prefill(self) -> None:
        """Start with the newest ``ring_bytes`` of the existing log (a restarted hostd
        serves the same offsets as before)."""
        try:
            st = _log_stat(self.log_path)
        except OSError:
            return
        self._inode = st.st_ino
        self._data_start = _first_data(self.log_path, st.st_size)
        start = max(self._data_start, st.st_size - self.ring.limit)
        data = _pread(self.log_path, start, st.st_size - start)
        self.ring = ConsoleRing(self.ring.limit, base=start)
        self.ring.append(data)
        self._pos = start + len(data)
        self._enforce_cap(st.st_size)

    # ----- output --------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_beyond(self, offset: int, timeout: float) -> None:
        """Return when the console's end is beyond ``offset`` (or after ``timeout``)."""
        if self.ring.end > offset:
            return
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    async def read(self, offset: int, max_bytes: int = STREAM_CHUNK) -> tuple[int, bytes]:
        """``(start, data)`` from ``offset``: from the ring, else from the log file; ``start``
        is greater than ``offset`` when the bytes in between are gone (a gap)."""
        ring = self.ring
        offset = max(0, min(offset, ring.end))
        if offset >= ring.base:
            return offset, ring.read(offset, max_bytes)
        floor = self.log_start
        if offset < floor:
            offset = floor
            if offset >= ring.base:
                return offset, ring.read(offset, max_bytes)
        want = min(max_bytes, ring.base - offset)
        data = await asyncio.get_running_loop().run_in_executor(
            None, _pread, self.log_path, offset - self.log_base, want
        )
        if len(data) < want:  # the file no longer holds it (rotated): skip to the ring
            return ring.base, ring.read(ring.base, max_bytes)
        if offset < self.log_start:  # the cap punched these bytes out while they were read
            return await self.read(self.log_start, max_bytes)
        return offset, data

    async def _log_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOG_POLL_SECONDS):  # keeps a cancellation (wait_for may not)
                    await self._poke.wait()
            self._poke.clear()
            read = False
            try:
                while data := await loop.run_in_executor(None, self._read_new):
                    self.ring.append(data)  # only ever mutated on the event loop
                    self._notify()
                    read = True
            except OSError as exc:
                self.last_error = f"reading {self.log_path.name}: {exc}"
            if read:
                await asyncio.sleep(COALESCE_SECONDS)

    def _read_new(self) -> bytes:
        """What the log gained since the last call (runs in a worker thread; the ring is
        appended by the caller, so it is read here but never changed)."""
        try:
            st = _log_stat(self.log_path)
        except FileNotFoundError:
            return b""
        except NotALog as exc:
            self.last_error = str(exc.strerror)
            return b""
        if st.st_ino != self._inode or st.st_size < self._pos:
            if self._inode:
                logger.info("vm %s: serial.log was replaced or truncated; offsets continue", self.vm_id)
            self.log_base = self.ring.end
            self._pos = 0
            self._data_start = 0
            self._inode = st.st_ino
        if st.st_size <= self._pos:
            return b""
        data = _pread(self.log_path, self._pos, min(MAX_CATCHUP, st.st_size - self._pos))
        self._pos += len(data)
        self._enforce_cap(st.st_size)
        return data

    @property
    def log_start(self) -> int:
        """Absolute offset of the oldest console byte still in the log."""
        return self.log_base + self._data_start

    def _enforce_cap(self, size: int | None = None) -> None:
        """Keep at most ``log_max_bytes`` of the log on disk (runs in a worker thread or at
        start; only this method moves ``_data_start`` forward)."""
        if size is None:
            try:
                size = _log_stat(self.log_path).st_size
            except OSError:
                return
        if size - self._data_start <= self.log_max_bytes:
            return
        keep = self.log_max_bytes * 3 // 4
        # Never past what the ring holds or the reader took: those bytes are not elsewhere yet.
        target = min(size - keep, self._pos) // PUNCH_ALIGN * PUNCH_ALIGN
        if target <= self._data_start:
            return
        try:
            _punch(self.log_path, self._data_start, target - self._data_start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.last_error = f"capping {self.log_path.name}: {exc}"
                return
            # No hole punching here: truncate; _read_new sees the file shrink and continues
            # the offsets after the last byte read.
            logger.warning("vm %s: cannot punch holes in serial.log (%s); truncating it", self.vm_id, exc)
            with contextlib.suppress(OSError):
                fd = _log_open(self.log_path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, 0)
                finally:
                    os.close(fd)
            return
        self.log_dropped += target - self._data_start
        self._data_start = target

    # ----- the socket ------------------------------------------------------------------

    async def _socket_loop(self) -> None:
        backoff = 0.2
        path = self.runtime_dir / SERIAL_SOCKET
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=SOCKET_READ), 5.0)
            except (OSError, TimeoutError) as exc:
                self.last_error = f"serial socket: {exc}"
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.2
            self._writer = writer
            self.vmm_pid = peer_pid(writer)
            self.last_error = ""
            try:
                while True:
                    data = await reader.read(SOCKET_READ)
                    if not data:
                        break
                    if self.qemu_log:
                        self._poke.set()  # QEMU logged it too: take it from the log
                    else:
                        await asyncio.get_running_loop().run_in_executor(None, self._append_log, data)
                        self.ring.append(data)
                        self._notify()
                    self.socket_reads += 1
                    if self.qemu_log and len(data) < SMALL_READ:
                        await _unread_for(writer.transport, TRICKLE_PAUSE_SECONDS)
            except OSError as exc:
                self.last_error = f"serial socket: {exc}"
            finally:
                self._writer = None
                self.vmm_pid = None
                writer.close()
            await asyncio.sleep(backoff)

    def _append_log(self, data: bytes) -> None:
        try:
            _append(self.log_path, data)
            size = _log_stat(self.log_path).st_size
        except OSError as exc:
            self.last_error = f"writing {self.log_path.name}: {exc}"
            return
        self._pos = size  # everything in the file came through the ring
        self._enforce_cap(size)

    def kick_unless(self, pid: int | None) -> bool:
        """Drop the serial socket connection unless it reached the VMM ``pid``; the socket
        loop reconnects. True when a connection was dropped."""
        writer = self._writer
        if writer is None or (pid is not None and self.vmm_pid == pid):
            return False
        writer.close()
        return True

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def write(self, data: bytes) -> None:
        """Send input to the guest's serial port; raises ``ConsoleUnavailable``."""
        writer = self._writer
        if writer is None:
            raise ConsoleUnavailable(self.last_error or "the serial console is not connected")
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            raise ConsoleUnavailable(f"the serial console is not accepting input: {exc}") from exc

    def status(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "base_offset": self.ring.base,
            "end_offset": self.ring.end,
            "log_base": self.log_base,
            "log_start": self.log_start,
            "log_bytes": _allocated(self.log_path),
            "log_max_bytes": self.log_max_bytes,
            "log_dropped": self.log_dropped,
            "socket_reads": self.socket_reads,
            "source": "serial.log (QEMU)" if self.qemu_log else "serial socket",
            "last_error": self.last_error,
        }


async def _unread_for(transport: asyncio.BaseTransport, seconds: float) -> None:
    """Leave a socket unread for ``seconds``: what comes meanwhile waits in the kernel."""
    transport.pause_reading()  # type: ignore[attr-defined]
    try:
        await asyncio.sleep(seconds)
    finally:
        if not transport.is_closing():
            transport.resume_reading()  # type: ignore[attr-defined]


# hostd runs as root; the log sits in the VM's runtime directory, where its (unprivileged,
# untrusted) VMM can write: a VMM could replace serial.log by a symlink to a file only root may
# read or write, or by a hard link to another file of its user, or by a FIFO. Every use of the
# log opens it without following a symlink and without blocking, and goes on only with a
# regular file of one link (``_log_open``); what the guest (or VMM) put in it is just bytes.


class NotALog(OSError):
    """serial.log is not a regular file with one link (a symlink, FIFO, device or hard link)."""


def _log_open(path: Path, flags: int, mode: int = 0o644) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO nobody reads
            raise NotALog(errno.EPERM, f"{path.name} is not a regular file of one link; not used") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise NotALog(errno.EPERM, f"{path.name} is not a regular file of one link; not used")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _log_stat(path: Path) -> os.stat_result:
    """The log's status without following a symlink (``NotALog`` for anything but a regular file of one link)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise NotALog(errno.EPERM, f"{path.name} is not a regular file of one link; not used")
    return st


def _pread(path: Path, offset: int, size: int) -> bytes:
    try:
        fd = _log_open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)


def log_read(path: Path, offset: int | None, max_bytes: int) -> tuple[int, int, bytes]:
    """``(start, size, data)``: up to ``max_bytes`` of the console log at ``path`` from file
    position ``offset`` (None: its oldest byte still on disk, after the hole the cap punched;
    an offset inside that hole also moves there), and the file's size. For the log download,
    which may come from a web process on another host (blocking: run it in a thread)."""
    fd = _log_open(path, os.O_RDONLY)  # FileNotFoundError: no log (yet); NotALog: not a log
    try:
        size = os.fstat(fd).st_size
        try:
            first = os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as exc:
            first = size if exc.errno == errno.ENXIO else 0
        start = max(first, min(offset if offset is not None else 0, size))
        return start, size, os.pread(fd, max(0, min(max_bytes, size - start)), start)
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    """Bytes the log occupies on disk (holes excluded)."""
    try:
        return _log_stat(path).st_blocks * 512
    except OSError:
        return 0


def _first_data(path: Path, size: int) -> int:
    """File position of the first byte that is not in a hole (``size`` when all is hole)."""
    try:
        fd = _log_open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return size if exc.errno == errno.ENXIO else 0
    finally:
        os.close(fd)


_libc: ctypes.CDLL | None = None


def _punch(path: Path, offset: int, length: int) -> None:
    """Free ``length`` bytes at ``offset`` of ``path`` (the file keeps its size)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = _log_open(path, os.O_WRONLY)
    try:
        rc = _libc.fallocate(
            fd,
            ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
            ctypes.c_longlong(offset),
            ctypes.c_longlong(length),
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    fd = _log_open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
