"""A stand-in VMM for hostd tests: a process whose command line names its runtime
directory (so ``running_vmm_pid`` accepts it), serving

- ``agent.sock``: the real guest agent code (guest_agents/linux/sandbox_agent.py) running
  here on the host, one client at a time like QEMU's chardev; or, with ``--hostile``,
  a peer that answers hello properly and then sends malformed frames; or floods: with
  ``--hostile resync-flood`` it never answers hello and repeats a fake 16-byte header that
  claims a 1 MiB frame (the CRC-per-skipped-byte attack), with ``--hostile event-flood``
  it answers hello then sends valid events for a subscription nobody holds, nonstop;
- ``serial.sock`` + ``serial.log``: a fake serial port that logs (like QEMU's
  ``logfile=``) every line it prints; input is echoed back as ``echo: <line>`` (CR ends a
  line too, as Enter in a terminal sends it). The input
  line ``flood <bytes>`` makes it print that many bytes of 100-byte lines as fast as it can
  (benchmarks/console.py), then write when it started and ended to ``flood.json``.

Usage: ``python fake_vmm.py RUNTIME_DIR [--hostile MODE]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def load_agent():
    spec = importlib.util.spec_from_file_location("sandbox_agent", ROOT / "guest_agents/linux/sandbox_agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOSTILE = {
    "garbage": lambda agent: b"\x00\xffnot a frame at all" * 10,
    "bad-crc": lambda agent: bytearray(agent.encode_frame({"ev": "out", "sub": 1}, b"x" * 10))[:-1] + b"y",
    "huge-length": lambda agent: agent.MAGIC + (2 << 20).to_bytes(4, "big") + (0).to_bytes(8, "big"),
    "not-json": lambda agent: _raw_frame(agent, b"{nope", b""),
    "not-object": lambda agent: _raw_frame(agent, b"[1,2]", b""),
    "bad-fields": lambda agent: agent.encode_frame({"id": 1, "ok": "yes"}),
    "bad-event": lambda agent: agent.encode_frame({"ev": 5, "sub": "x"}),
}


def _raw_frame(agent, head: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    lengths = struct.pack(">II", len(head), len(data))
    crc = zlib.crc32(data, zlib.crc32(head, zlib.crc32(lengths)))
    return agent.MAGIC + lengths + struct.pack(">I", crc) + head + data


def fake_header(agent) -> bytes:
    """16 bytes that look like the start of a frame of about 1 MiB (wrong CRC)."""
    return agent.MAGIC + (2).to_bytes(4, "big") + ((1 << 20) - 2).to_bytes(4, "big") + bytes(4)


def serve_flood(path: Path, agent, mode: str) -> None:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    junk = fake_header(agent) * 4096 if mode == "resync-flood" else b""
    event = agent.encode_frame({"ev": "out", "sub": 999999, "offset": 0}, b"z" * 65536)
    while True:
        conn, _ = srv.accept()
        try:
            if mode == "event-flood":
                reader = agent.FrameReader()
                while not junk:
                    data = conn.recv(65536)
                    if not data:
                        raise OSError("closed")
                    for header, _ in reader.feed(data):
                        req = json.loads(header)
                        if req.get("op") == "hello":
                            result = {"protocol": 2, "nonce": req["args"]["nonce"], "agent_version": "flood"}
                            conn.sendall(agent.encode_frame({"id": req["id"], "ok": True, "result": result}))
                            junk = event * 16
            while True:
                conn.sendall(junk)
        except OSError:
            pass
        conn.close()
        junk = fake_header(agent) * 4096 if mode == "resync-flood" else b""


def serve_hostile(path: Path, agent, mode: str) -> None:
    if mode.endswith("-flood"):
        serve_flood(path, agent, mode)
        return
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    while True:
        conn, _ = srv.accept()
        reader = agent.FrameReader()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                for header, _ in reader.feed(data):
                    req = json.loads(header)
                    if req.get("op") == "hello":
                        result = {"protocol": 2, "nonce": req["args"]["nonce"], "agent_version": "hostile"}
                        conn.sendall(agent.encode_frame({"id": req["id"], "ok": True, "result": result}))
                        time.sleep(0.2)
                        conn.sendall(HOSTILE[mode](agent))
        except OSError:
            pass
        conn.close()


def serve_serial(runtime_dir: Path) -> None:
    log = open(runtime_dir / "serial.log", "ab", buffering=0)  # noqa: SIM115
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(runtime_dir / "serial.sock"))
    srv.listen(1)
    state = {"conn": None}
    lock = threading.Lock()

    def emit(data: bytes) -> None:
        with lock:
            log.write(data)
            conn = state["conn"]
            if conn is not None:
                try:
                    conn.sendall(data)
                except OSError:
                    pass

    def flood(total: int) -> None:
        line = b"%09d " + b"x" * 89 + b"\n"  # 100 bytes
        started = time.time()
        sent = n = 0
        while sent < total:
            block = b"".join(line % (n + i) for i in range(640))[: total - sent]  # 64000 bytes
            n += 640
            emit(block)
            sent += len(block)
        (runtime_dir / "flood.json").write_text(json.dumps({"bytes": sent, "started": started, "ended": time.time()}))

    def ticker() -> None:
        n = 0
        while True:
            n += 1
            emit(f"tick {n}\n".encode())
            time.sleep(0.5)

    threading.Thread(target=ticker, daemon=True).start()
    while True:
        conn, _ = srv.accept()
        state["conn"] = conn
        buf = b""
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                buf += data.replace(b"\r", b"\n")  # Enter in a terminal sends CR (a tty's ICRNL)
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    emit(b"echo: " + line + b"\n")
                    word, _, count = line.strip().partition(b" ")
                    if word == b"flood" and count.isdigit():
                        threading.Thread(target=flood, args=(int(count),), daemon=True).start()
        except OSError:
            pass
        state["conn"] = None
        conn.close()


def main() -> None:
    runtime_dir = Path(sys.argv[1]).resolve()
    hostile = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--hostile" else None
    agent_mod = load_agent()
    (runtime_dir / "vmm.pid").write_text(str(os.getpid()))
    threading.Thread(target=serve_serial, args=(runtime_dir,), daemon=True).start()
    if hostile:
        serve_hostile(runtime_dir / "agent.sock", agent_mod, hostile)
        return
    agent = agent_mod.Agent(cgroup_root=None, reap_interval=0.02)
    # The agent runs in this process's main thread, as in a guest: children are reaped on
    # SIGCHLD (not only by the 20 ms safety-net tick, which made every exec wait for it).
    agent.install_signal_handlers()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(runtime_dir / "agent.sock"))
    srv.listen(8)
    srv.setblocking(False)
    state = {"conn": None}

    def accept() -> None:
        # Like QEMU's chardev: one client at a time; others wait in the backlog.
        if state["conn"] is not None and not state["conn"].closed:
            return
        try:
            sock, _ = srv.accept()
        except OSError:
            return
        state["conn"] = agent.add_stream(sock)

    def poll_accept() -> None:
        accept()
        agent.loop.call_later(0.05, poll_accept)

    agent.loop.call_later(0.05, poll_accept)
    agent.run()


if __name__ == "__main__":
    main()
