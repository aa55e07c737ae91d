"""microvm-sandbox guest agent for Windows: protocol v2 (guest_agents/PROTOCOL.md) over the
virtio-serial port ``\\\\.\\Global\\org.microvm_sandbox.agent.0``.

    python sandbox_agent.py              serve the port (what the service runs)
    python sandbox_agent.py service ...  install/start/stop/remove the Windows service (pywin32)
    python sandbox_agent.py --posix --listen PATH
                                         development and tests on Linux: serve a Unix socket
                                         with the POSIX platform layer (one client at a time)

The protocol side is ``agent_core``; the Windows-only layer (``platform_windows``, the
service class below) is not run in this project's CI: see docs/images.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_core import AGENT_VERSION, PROTOCOL_VERSION, Agent, Connection, log  # noqa: E402


def serve_port(agent: Agent, stop: object = None) -> None:
    """Serve the virtio-serial port forever; reopen it after the host side went away."""
    from platform_windows import serial_port_streams

    conn = None
    while stop is None or not getattr(stop, "is_set", lambda: False)():
        read, write, close = serial_port_streams()
        if conn is None:
            conn = Connection(agent, read, write)
        else:
            conn._read, conn._write = read, write
            conn.reader.buf.clear()
        conn.serve()  # returns on EOF / read error: the host disconnected
        try:
            close()
        except OSError:
            pass
        time.sleep(0.5)


def serve_unix(agent: Agent, path: str) -> None:
    """Like QEMU's chardev: one client at a time on a Unix socket (the same session rules)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    conn = None
    while True:
        sock, _ = srv.accept()

        def write(data: bytes, sock: socket.socket = sock) -> None:
            sock.sendall(data)

        if conn is None:
            conn = Connection(agent, sock.recv, write)
        else:
            conn._read, conn._write = sock.recv, write
        conn.serve()
        sock.close()


def _service_main(argv: list) -> int:
    """The Windows service (pywin32; see install.ps1 and windows_service.py)."""
    from windows_service import main as service_main

    return service_main(argv)


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "service":
        return _service_main([sys.argv[0], *argv[1:]])
    parser = argparse.ArgumentParser(prog="sandbox_agent.py")
    parser.add_argument("--posix", action="store_true", help="use the POSIX platform layer (development, tests)")
    parser.add_argument("--listen", help="with --posix: serve this Unix socket path")
    args = parser.parse_args(argv)
    log(f"starting agent {AGENT_VERSION} (protocol v{PROTOCOL_VERSION})")
    if args.posix:
        from platform_posix import PosixPlatform

        if not args.listen:
            parser.error("--posix needs --listen PATH")
        serve_unix(Agent(PosixPlatform()), args.listen)
        return 1
    from platform_windows import WindowsPlatform

    serve_port(Agent(WindowsPlatform()))
    return 1


if __name__ == "__main__":
    sys.exit(main())
