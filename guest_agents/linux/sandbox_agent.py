#!/usr/bin/env python3
"""microvm-sandbox guest agent (Linux), protocol v1. Python 3 standard library only.

Started by the guest init in a respawn loop. Serves the framed JSON protocol described
in guest_agents/PROTOCOL.md on every transport that exists in this VM:

- QEMU: the virtio-serial port ``org.microvm_sandbox.agent.0`` (a character device; the
  host side may connect and disconnect at any time);
- cloud-hypervisor: AF_VSOCK, port 1024 (one thread per connection, bounded).

This file is deliberately minimal (ping/health); a later version adds exec and files.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import select
import socket
import struct
import sys
import threading
import time

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1
PORT_NAME = "org.microvm_sandbox.agent.0"
VSOCK_PORT = 1024
MAX_FRAME = 1 << 20  # bytes of JSON per frame; larger -> the connection is dropped
MAX_VSOCK_CONNECTIONS = 16
WRITE_TIMEOUT = 10.0  # seconds a response may wait for the host to read it
IDLE_POLL = 0.2


class FrameError(Exception):
    """The peer broke framing (oversized or undecodable frame): drop the connection."""


def log(msg: str) -> None:
    sys.stderr.write("{} sandbox-agent: {}\n".format(time.strftime("%Y-%m-%dT%H:%M:%S"), msg))
    sys.stderr.flush()


# ----- operations ---------------------------------------------------------------------


def _read_first_line(path: str, default: str = "") -> str:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return default


def _uptime_s() -> float:
    text = _read_first_line("/proc/uptime", "0 0")
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return 0.0


def op_ping(args: dict) -> dict:
    return {
        "agent_version": AGENT_VERSION,
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "uptime_s": round(_uptime_s(), 3),
        "hostname": socket.gethostname(),
    }


def op_health(args: dict) -> dict:
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
    return {
        "status": "ok",
        "agent_version": AGENT_VERSION,
        "uptime_s": round(_uptime_s(), 3),
        "loadavg": load,
        "mem_total_kib": meminfo.get("MemTotal", 0),
        "mem_available_kib": meminfo.get("MemAvailable", 0),
        "root_free_bytes": st.f_bavail * st.f_frsize,
        "root_total_bytes": st.f_blocks * st.f_frsize,
    }


OPS = {"ping": op_ping, "health": op_health}


def _error(req_id, code: str, message: str) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}


def handle_payload(payload: bytes) -> dict:
    """Decode one request frame payload and return the response object (never raises)."""
    try:
        req = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _error(None, "bad_request", "frame is not UTF-8 JSON")
    if not isinstance(req, dict):
        return _error(None, "bad_request", "request must be a JSON object")
    req_id = req.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        return _error(None, "bad_request", "id must be an integer")
    if req.get("v") != PROTOCOL_VERSION:
        return _error(req_id, "unsupported_version", f"this agent speaks protocol v{PROTOCOL_VERSION}")
    op = req.get("op")
    fn = OPS.get(op) if isinstance(op, str) else None
    if fn is None:
        return _error(req_id, "unknown_op", f"unknown op {op!r}")
    args = req.get("args", {})
    if not isinstance(args, dict):
        return _error(req_id, "bad_request", "args must be an object")
    try:
        result = fn(args)
    except Exception as exc:  # an op bug must not kill the agent
        log(f"op {op} failed: {exc!r}")
        return _error(req_id, "internal", f"{type(exc).__name__}: {exc}")
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result}


def encode_frame(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_FRAME:
        data = json.dumps(_error(obj.get("id"), "too_large", "response exceeds frame limit")).encode()
    return struct.pack(">I", len(data)) + data


def split_frames(buf: bytearray) -> list:
    """Remove and return complete frame payloads from ``buf``; raise FrameError on a bad length."""
    out = []
    while len(buf) >= 4:
        (n,) = struct.unpack(">I", bytes(buf[:4]))
        if n > MAX_FRAME:
            raise FrameError(f"frame length {n} exceeds limit")
        if len(buf) < 4 + n:
            break
        out.append(bytes(buf[4 : 4 + n]))
        del buf[: 4 + n]
    return out


# ----- virtio-serial transport ----------------------------------------------------------


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


def _write_all_nonblocking(fd: int, data: bytes, timeout: float) -> bool:
    """Write ``data`` to a non-blocking fd within ``timeout``; False when the host went
    away or stopped reading (the response is then dropped, never blocking forever)."""
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        events = poller.poll(int(min(remaining, 1.0) * 1000))
        if not events:
            continue
        if events[0][1] & (select.POLLHUP | select.POLLERR) and not events[0][1] & select.POLLOUT:
            return False
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ENODEV, errno.EIO):
                return False
            raise
        view = view[n:]
    return True


def serve_virtio_serial(path: str) -> None:
    """Serve requests on a virtio-serial char device until it disappears.

    While the host is disconnected, poll() reports POLLHUP and read() returns EOF; both
    mean "drop any partial frame and wait". After a framing error the input stream is
    ignored until the host disconnects, since frame boundaries are lost.
    """
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    log(f"serving virtio-serial port {path}")
    buf = bytearray()
    desynced = False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            events = poller.poll(1000)
            if not events:
                continue
            revents = events[0][1]
            if revents & select.POLLIN:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    if desynced:
                        continue
                    buf += chunk
                    try:
                        frames = split_frames(buf)
                    except FrameError as exc:
                        log(f"framing error, ignoring input until host reconnects: {exc}")
                        buf.clear()
                        desynced = True
                        continue
                    for payload in frames:
                        resp = encode_frame(handle_payload(payload))
                        if not _write_all_nonblocking(fd, resp, WRITE_TIMEOUT):
                            buf.clear()
                            break
                    continue
            if revents & (select.POLLHUP | select.POLLERR) or revents & select.POLLIN:
                # Host side not connected (or EOF): forget partial input and wait.
                buf.clear()
                desynced = False
                time.sleep(IDLE_POLL)
            elif revents & select.POLLNVAL:
                raise OSError(errno.EBADF, "port fd invalid")
    finally:
        os.close(fd)


def virtio_serial_loop(stop: threading.Event) -> None:
    """Find, open and serve the virtio-serial port forever, reopening after errors."""
    announced = False
    while not stop.is_set():
        path = find_virtio_port()
        if path is None:
            if not announced:
                log(f"virtio-serial port {PORT_NAME} not present (yet)")
                announced = True
            time.sleep(1.0)
            continue
        try:
            serve_virtio_serial(path)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                log(f"port {path} busy (another agent?)")
            else:
                log(f"virtio-serial error: {exc!r}")
            time.sleep(1.0)


# ----- vsock transport ----------------------------------------------------------------


def _serve_stream(conn: socket.socket) -> None:
    conn.settimeout(WRITE_TIMEOUT)
    buf = bytearray()
    try:
        while True:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            buf += chunk
            for payload in split_frames(buf):
                conn.sendall(encode_frame(handle_payload(payload)))
    except FrameError as exc:
        log(f"vsock framing error, closing: {exc}")
    except OSError:
        pass
    finally:
        conn.close()


def vsock_loop(stop: threading.Event) -> None:
    """Listen on AF_VSOCK port 1024 when the kernel has vsock; one thread per connection."""
    if not hasattr(socket, "AF_VSOCK"):
        return
    slots = threading.BoundedSemaphore(MAX_VSOCK_CONNECTIONS)
    while not stop.is_set():
        try:
            srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError:
            # No vsock device (e.g. QEMU microvm without vhost-vsock): nothing to serve.
            return
        try:
            srv.bind((socket.VMADDR_CID_ANY, VSOCK_PORT))
            srv.listen(8)
            log(f"listening on vsock port {VSOCK_PORT}")
            while not stop.is_set():
                conn, _ = srv.accept()
                if not slots.acquire(blocking=False):
                    conn.close()
                    continue

                def run(c: socket.socket = conn) -> None:
                    try:
                        _serve_stream(c)
                    finally:
                        slots.release()

                threading.Thread(target=run, daemon=True).start()
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EAFNOSUPPORT):
                return
            log(f"vsock error: {exc!r}")
            time.sleep(1.0)
        finally:
            srv.close()


def main() -> int:
    log(f"starting agent {AGENT_VERSION} (protocol v{PROTOCOL_VERSION})")
    stop = threading.Event()
    threads = [
        threading.Thread(target=virtio_serial_loop, args=(stop,), name="virtio-serial", daemon=True),
        threading.Thread(target=vsock_loop, args=(stop,), name="vsock", daemon=True),
    ]
    for t in threads:
        t.start()
    # The virtio-serial loop never returns; if it dies, exit so init restarts us.
    threads[0].join()
    return 1


if __name__ == "__main__":
    sys.exit(main())
