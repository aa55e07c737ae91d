"""Protocol v2 conformance, run against both guest agents' protocol sides here on Linux:
the Linux agent, and the Windows agent's ``agent_core`` with its POSIX platform layer (its
Windows layer, ``platform_windows``, cannot run here). Same requests, same answers."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vmm.agent_ops import agent_get, agent_put, agent_run
from vms.vmm.agent_client import AgentConnection, AgentRequestError, AgentTransport
from vms.vmm.agent_protocol import encode_frame

ROOT = Path(__file__).resolve().parents[2]
AGENTS = {
    "linux": [sys.executable, str(Path(__file__).with_name("run_linux_agent.py"))],
    "windows-core": [sys.executable, str(ROOT / "guest_agents/windows/sandbox_agent.py"), "--posix", "--listen"],
}


@pytest.fixture(scope="module", params=sorted(AGENTS))
def agent_sock(request: pytest.FixtureRequest) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agt-", dir="/tmp"))
    path = root / "agent.sock"
    proc = subprocess.Popen([*AGENTS[request.param], str(path)], stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 15
    while True:  # listening, not just bound
        assert proc.poll() is None, "agent exited"
        assert time.monotonic() < deadline, "agent did not listen"
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            break
        except OSError:
            time.sleep(0.02)
    yield path
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def conn(agent_sock: Path) -> Iterator[AgentConnection]:
    with AgentConnection.open(agent_sock, AgentTransport.VIRTIO_SERIAL, timeout=10) as c:
        yield c


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agent-files-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def error_code(exc: pytest.ExceptionInfo[AgentRequestError]) -> str:
    return exc.value.code


def test_hello_and_ping(conn: AgentConnection) -> None:
    assert conn.hello["protocol"] == 2 and conn.hello["max_frame"] == 1 << 20 and conn.hello["boot_id"]
    ping = conn.ping()
    assert ping["protocol"] == 2 and ping["agent_version"] and ping["hostname"] == socket.gethostname()
    assert ping["boot_id"] == conn.hello["boot_id"]


def test_health_reports_the_same_fields(conn: AgentConnection) -> None:
    health = conn.health()
    keys = "status agent_version protocol uptime_s agent_uptime_s loadavg mem_total_kib mem_available_kib"
    keys += " root_free_bytes root_total_bytes execs_running execs_retained"
    for key in keys.split():
        assert key in health, key
    assert health["status"] == "ok" and health["mem_total_kib"] > 0 and health["root_total_bytes"] > 0


def test_exec_exit_code_and_both_output_streams(conn: AgentConnection) -> None:
    result, out = agent_run(conn, shell="echo out; echo err >&2; exit 7")
    assert result["exit_code"] == 7 and result["signal"] is None and result["timed_out"] is False
    assert sorted(out.split()) == [b"err", b"out"]
    result, out = agent_run(conn, argv=["printf", "%s-%s", "a b", "c"])
    assert result["exit_code"] == 0 and out == b"a b-c"


def test_exec_stdin_data_and_eof(conn: AgentConnection) -> None:
    result, out = agent_run(conn, argv=["cat"], stdin=b"\x00binary\xff" * 1000)
    assert result["exit_code"] == 0 and out == b"\x00binary\xff" * 1000


def test_exec_stdin_in_pieces(conn: AgentConnection) -> None:
    started = conn.request("exec_start", {"argv": ["cat"], "stdin": "pipe"})
    for piece in (b"one ", b"two "):
        assert conn.request("exec_stdin", {"exec_id": started["exec_id"]}, piece)["open"] is True
    conn.request("exec_stdin", {"exec_id": started["exec_id"], "eof": True})
    summary = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=30)
    assert summary["result"]["exit_code"] == 0
    _, data = conn.request_data("exec_read", {"exec_id": started["exec_id"]})
    assert data == b"one two "


def test_exec_timeout_kills_the_tree(conn: AgentConnection) -> None:
    started = time.monotonic()
    result, _ = agent_run(conn, shell="sleep 30 & sleep 30; echo never", timeout=0.5)
    assert result["timed_out"] is True and result["exit_code"] is None and result["signal"] == "SIGKILL"
    assert time.monotonic() - started < 10


def test_exec_wait_times_out_then_signal_kills(conn: AgentConnection) -> None:
    started = conn.request("exec_start", {"argv": ["sleep", "30"], "tag": "sleeper"})
    waited = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 0.2}, timeout=10)
    assert waited["running"] is True and waited["result"] is None
    listed = conn.request("exec_list", {"tag": "sleeper"})["execs"]
    assert [e["exec_id"] for e in listed] == [started["exec_id"]]
    with pytest.raises(AgentRequestError) as exc:
        conn.request("exec_forget", {"exec_id": started["exec_id"]})
    assert error_code(exc) == "conflict"
    assert conn.request("exec_signal", {"exec_id": started["exec_id"], "signal": "KILL"})["delivered"] is True
    done = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=30)
    assert done["running"] is False and done["result"]["signal"] == "SIGKILL"
    conn.request("exec_forget", {"exec_id": started["exec_id"]})
    with pytest.raises(AgentRequestError) as exc:
        conn.request("exec_get", {"exec_id": started["exec_id"]})
    assert error_code(exc) == "not_found"


def test_exec_output_offsets(conn: AgentConnection) -> None:
    started = conn.request("exec_start", {"shell": "head -c 10000 /dev/zero | tr '\\0' x"})
    conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=30)
    got, data = conn.request_data("exec_read", {"exec_id": started["exec_id"], "offset": 9000, "max": 500})
    assert (got["offset"], got["next_offset"], got["end_offset"]) == (9000, 9500, 10000)
    assert data == b"x" * 500 and got["chunks"] == [["stdout", 500]]


def test_exec_of_a_missing_command_is_not_found(conn: AgentConnection) -> None:
    with pytest.raises(AgentRequestError) as exc:
        conn.request("exec_start", {"argv": ["/nonexistent/tool"]})
    assert error_code(exc) == "not_found"
    with pytest.raises(AgentRequestError) as exc:
        conn.request("exec_start", {})
    assert error_code(exc) == "bad_request"


def test_files_round_trip_with_checksums(conn: AgentConnection, workdir: Path) -> None:
    payload = os.urandom(700_000)  # more than one frame each way
    target = str(workdir / "sub" / "blob.bin")
    written = agent_put(conn, target, payload, mkdirs=True, mode=0o600)
    assert written == {"path": target, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert (workdir / "sub" / "blob.bin").read_bytes() == payload
    back, sha = agent_get(conn, target)
    assert back == payload and sha == written["sha256"]
    entry = conn.request("file_stat", {"path": target})
    assert entry["type"] == "file" and entry["size"] == len(payload) and entry["mode"] == 0o600


def test_a_checksum_mismatch_leaves_nothing(conn: AgentConnection, workdir: Path) -> None:
    handle = conn.request("file_write_open", {"path": str(workdir / "x.bin")})["handle"]
    conn.request("file_write", {"handle": handle}, b"data")
    with pytest.raises(AgentRequestError) as exc:
        conn.request("file_write_close", {"handle": handle, "sha256": "0" * 64})
    assert error_code(exc) == "checksum_mismatch"
    assert list(workdir.iterdir()) == []


def test_directory_operations_and_errors(conn: AgentConnection, workdir: Path) -> None:
    conn.request("file_mkdir", {"path": str(workdir / "a" / "b")})
    agent_put(conn, str(workdir / "a" / "f.txt"), b"hi")
    listing = conn.request("file_list", {"path": str(workdir / "a")})
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [("b", "directory"), ("f.txt", "file")]
    with pytest.raises(AgentRequestError) as exc:
        conn.request("file_rename", {"src": str(workdir / "a" / "f.txt"), "dst": str(workdir / "a" / "f.txt")})
    assert error_code(exc) == "exists"
    conn.request("file_rename", {"src": str(workdir / "a" / "f.txt"), "dst": str(workdir / "g.txt")})
    with pytest.raises(AgentRequestError) as exc:
        conn.request("file_remove", {"path": str(workdir / "a")})
    assert error_code(exc) == "not_empty"
    conn.request("file_remove", {"path": str(workdir / "a"), "recursive": True})
    with pytest.raises(AgentRequestError) as exc:
        conn.request("file_stat", {"path": str(workdir / "a")})
    assert error_code(exc) == "not_found"
    with pytest.raises(AgentRequestError) as exc:
        conn.request("file_stat", {"path": "relative/path"})
    assert error_code(exc) == "bad_request"


def test_unknown_ops_and_garbage(conn: AgentConnection, agent_sock: Path) -> None:
    with pytest.raises(AgentRequestError) as exc:
        conn.request("no_such_op")
    assert error_code(exc) == "unknown_op"
    # Garbage in the stream is skipped; the next valid frame is answered.
    conn._sock.sendall(b"\x00garbage SBX2 \xff" * 10 + encode_frame({"id": 99, "op": "ping", "args": {}}))
    result, _ = conn.read_response(99, timeout=10)
    assert result["protocol"] == 2


def test_a_new_session_forgets_the_old_ones_transfers(agent_sock: Path, workdir: Path) -> None:
    with AgentConnection.open(agent_sock, AgentTransport.VIRTIO_SERIAL, timeout=10) as first:
        handle = first.request("file_write_open", {"path": str(workdir / "half.bin")})["handle"]
        first.request("file_write", {"handle": handle}, b"partial")
    with AgentConnection.open(agent_sock, AgentTransport.VIRTIO_SERIAL, timeout=10) as second:
        with pytest.raises(AgentRequestError) as exc:
            second.request("file_write", {"handle": handle}, b"more")
        assert error_code(exc) == "not_found"
    deadline = time.monotonic() + 5
    while list(workdir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(workdir.iterdir()) == []  # the partial upload's temporary file is gone


# ----- the Windows layer: what can be checked without Windows --------------------------------


def _windows_module(name: str):
    import importlib

    sys.path.insert(0, str(ROOT / "guest_agents/windows"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_the_protocol_core_imports_nothing_os_specific() -> None:
    source = (ROOT / "guest_agents/windows/agent_core.py").read_text()
    for module in ("pwd", "grp", "fcntl", "termios", "msvcrt", "winreg", "ctypes", "win32", "platform_"):
        assert f"import {module}" not in source and f"from {module}" not in source, module


def test_the_windows_layer_follows_the_protocol_conventions() -> None:
    windows = _windows_module("platform_windows").WindowsPlatform()
    assert windows.shell_argv("Get-Date")[0] == "powershell.exe" and windows.shell_argv("Get-Date")[-1] == "Get-Date"
    assert windows.exit_status(3, killed=False) == (3, None)
    assert windows.exit_status(1, killed=True) == (None, "SIGKILL")  # as the Linux agent reports a kill
    assert _windows_module("platform_windows").PORT_PATH == "\\\\.\\Global\\org.microvm_sandbox.agent.0"
