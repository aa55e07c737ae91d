"""scripts/web.py: WEB_PROCESSES daphne processes accepting on one socket, stopped together.
Real daphne processes on 127.0.0.1 (the application answers /healthz without the database)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("web_launcher", ROOT / "scripts" / "web.py")
web = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(web)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _start(tmp_path, port: int, processes: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "SECRET_KEY": "test-only",
        "SANDBOX_ENV_FILE": "/nonexistent",
        "SANDBOX_DATA_DIR": str(tmp_path / "data"),
        "SANDBOX_RUNTIME_DIR": str(tmp_path / "run"),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "web.py"), "--bind", "127.0.0.1", "--port", str(port),
         "--processes", processes, "--stop-seconds", "10"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the web launcher ended"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the web server never answered")


def test_it_counts_processes_one_per_cpu_unless_told():
    assert web.processes_wanted(None) == web.processes_wanted("") == web.processes_wanted("0") >= 1
    assert web.processes_wanted("3") == 3
    for bad in ("-1", "two", str(web.MAX_PROCESSES + 1)):
        with pytest.raises(SystemExit, match="WEB_PROCESSES"):
            web.processes_wanted(bad)


def test_it_serves_from_several_daphnes_and_stops_them_all_when_one_ends(tmp_path):
    port = _free_port()
    proc = _start(tmp_path, port, "2")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        daphnes = _children(proc.pid)
        assert len(daphnes) == 2
        # Both accept on the one socket: a fresh connection per request reaches either.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Connection": "close"}) as client:
            assert all(client.get("/healthz").status_code == 200 for _ in range(20))
        os.kill(daphnes[0], signal.SIGKILL)
        assert proc.wait(timeout=30) != 0
        assert not any(_alive(pid) for pid in daphnes)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_sigterm_stops_every_daphne(tmp_path):
    port = _free_port()
    proc = _start(tmp_path, port, "2")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        daphnes = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert daphnes and not any(_alive(pid) for pid in daphnes)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
