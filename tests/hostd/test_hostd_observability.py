"""hostd's log lines carry the request id its clients send (``request`` field) and the VM id;
its metrics listener serves agent links, frames and bytes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import urllib.request

from tests.hostd.test_hostd import Hostd, _vmm, root  # noqa: F401 - the root fixture
from tests.waiting import wait_until
from vms.hostd.client import HostdClient
from vms.hostd.logcontext import JsonFormatter, LogContextFilter, log_context


class _Lines(logging.Handler):
    """Formats each record when it is emitted (in hostd's context, where its ids live)."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(LogContextFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostd_lines_carry_the_clients_request_id_and_metrics_are_served(root):  # noqa: F811
    daemon = Hostd(root, scan_seconds=3600)  # no scan: the VM is attached by the request
    port = _free_port()
    daemon.config = type(daemon.config)(**{**daemon.config.__dict__, "metrics_port": port})
    handler = _Lines()
    logger = logging.getLogger("vms.hostd")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    daemon.start()
    proc = _vmm(root, "vm1")
    try:
        with log_context(request_id="req-from-web"), HostdClient(daemon.config.socket_path, timeout=20) as client:
            client.call("vm_register", {"vm_id": "vm1"})
            client.agent("vm1", "ping", {}, timeout=20)
        attached = [line for line in handler.lines if line["msg"].startswith("vm vm1: attached")]
        assert attached and attached[0]["request_id"] == "req-from-web" and attached[0]["vm_id"] == "vm1"
        # The agent link outlives that request: its lines carry the VM, not the request.
        session = [line for line in handler.lines if "agent session" in line["msg"]]
        assert session and session[0]["vm_id"] == "vm1" and "request_id" not in session[0]

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()

        body = wait_until(lambda: "msbx_hostd_agent_links_up 1.0" in (text := scrape()) and text, timeout=20)
        assert "msbx_hostd_vms_attached 1.0" in body
        assert 'msbx_hostd_agent_frames_total{direction="in"}' in body
        assert 'msbx_hostd_requests_total{op="vm_register",outcome="ok"}' in body
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        daemon.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
