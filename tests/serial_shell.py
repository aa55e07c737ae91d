"""Run shell commands in a guest through its serial console (root shell on ttyS0).

For tests only, until the exec API exists: the console socket (``<runtime_dir>/serial.sock``)
serves one client at a time, so keep a session short."""

from __future__ import annotations

import re
import secrets
import socket
import time
from pathlib import Path


class SerialShell:
    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout

    def __enter__(self) -> SerialShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def run(self, command: str, *, timeout: float | None = None) -> tuple[int, str]:
        """Run ``command``; return its exit status and output (``\\r`` removed). The markers
        are split with quotes in what is typed, so the echoed input never matches them."""
        tag = secrets.token_hex(4)
        typed = f"echo 'B{tag}''-'; {command}; echo 'E{tag}''-'$?\n"
        self.sock.sendall(typed.encode())
        pattern = re.compile(rf"B{tag}-\r?\n(.*?)E{tag}-(\d+)", re.S)
        out = b""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            match = pattern.search(out.decode("utf-8", "replace"))
            if match:
                return int(match.group(2)), match.group(1).replace("\r", "")
        raise TimeoutError(f"no answer on the serial console to {command!r}: {out[-500:]!r}")


def serial_run(path: Path, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
    """Connect, run one command, disconnect."""
    with SerialShell(path, timeout=timeout) as shell:
        return shell.run(command, timeout=timeout)
