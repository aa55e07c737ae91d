"""Serve the Linux guest agent (guest_agents/linux/sandbox_agent.py) on a Unix socket, one
client at a time like QEMU's chardev: ``python run_linux_agent.py PATH``."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    spec = importlib.util.spec_from_file_location("sandbox_agent", ROOT / "guest_agents/linux/sandbox_agent.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    agent = mod.Agent(cgroup_root=None, reap_interval=0.02)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sys.argv[1])
    srv.listen(8)
    srv.setblocking(False)
    state = {"conn": None}

    def poll_accept() -> None:
        if state["conn"] is None or state["conn"].closed:
            try:
                sock, _ = srv.accept()
                state["conn"] = agent.add_stream(sock)
            except OSError:
                pass
        agent.loop.call_later(0.02, poll_accept)

    agent.loop.call_later(0.02, poll_accept)
    agent.run()


if __name__ == "__main__":
    main()
