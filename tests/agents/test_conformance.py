"""Protocol v2 conformance, run against both guest agents' protocol sides here on Linux:
the Linux agent, and the Windows agent's ``agent_core`` with its POSIX platform layer (its
Windows layer, ``platform_windows``, cannot run here). Same requests, same answers."""

from __future__ import annotations

import hashlib
import inspect
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
from vms.vmm.agent_client import AgentConnection, AgentRequestError, AgentTimeout, AgentTransport
from vms.vmm.agent_protocol import encode_frame

ROOT = Path(__file__).resolve().parents[2]
AGENTS = {
    "linux": [sys.executable, str(Path(__file__).with_name("run_linux_agent.py"))],
    "windows-core": [sys.executable, str(ROOT / "guest_agents/windows/sandbox_agent.py"), "--posix", "--listen"],
}


def _careless_starter() -> None:
    """Leave SIGINT ignored and blocked, as a starter may (nohup, a service manager, a shell
    script): both carry over into the agent across exec, and from it into every command, which
    then ignored a signal frame (a full test run left the test process that way once)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _serve_agent(argv: list[str], path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*argv, str(path)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_careless_starter,  # noqa: PLW1509 - two signal calls, no locks
    )
    deadline = time.monotonic() + 15
    while True:  # listening, not just bound
        assert proc.poll() is None, "agent exited"
        assert time.monotonic() < deadline, "agent did not listen"
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            return proc
        except OSError:
            time.sleep(0.02)


def _stop_agent(proc: subprocess.Popen[bytes], root: Path) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=sorted(AGENTS))
def agent_sock(request: pytest.FixtureRequest) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agt-", dir="/tmp"))
    path = root / "agent.sock"
    proc = _serve_agent(AGENTS[request.param], path)
    yield path
    _stop_agent(proc, root)


# identity_set changes the hostname and files in /etc: the agent runs in its own UTS, mount
# and network namespaces, with a throwaway overlay on /etc and sysfs of its network namespace
# (only "lo"), so nothing of the machine running the tests changes.
_ISOLATE = (
    'mount -t tmpfs tmpfs "$1" && mkdir "$1/u" "$1/w" && '
    'mount -t overlay overlay -o lowerdir=/etc,upperdir="$1/u",workdir="$1/w" /etc && '
    'mount -t sysfs sysfs /sys && shift && exec "$@"'
)


@pytest.fixture(scope="module", params=sorted(AGENTS))
def isolated_agent_sock(request: pytest.FixtureRequest) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for namespaces")
    root = Path(tempfile.mkdtemp(prefix="agt-", dir="/tmp"))
    (root / "etc").mkdir()
    wrapper = ["unshare", "--uts", "--mount", "--net", "--propagation", "private", "sh", "-c", _ISOLATE, "sh"]
    proc = _serve_agent([*wrapper, str(root / "etc"), *AGENTS[request.param]], root / "agent.sock")
    yield root / "agent.sock"
    _stop_agent(proc, root)


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


# ----- streaming, terminals, identity ------------------------------------------------------


class _Stream:
    """Frames of one connection as they come: answers by id, events by subscription."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        self.frames: list[tuple[dict, bytes]] = []

    def until(self, done, timeout: float = 30.0) -> None:  # noqa: ANN001 - a predicate
        deadline = time.monotonic() + timeout
        while not done():
            frame = self.conn.read_frame(deadline)
            self.frames.append((frame.header, frame.data))

    def answer(self, req_id: int) -> dict:
        self.until(lambda: any(h.get("id") == req_id and "ev" not in h for h, _ in self.frames))
        header = next(h for h, _ in self.frames if h.get("id") == req_id and "ev" not in h)
        assert header["ok"] is True, header
        return header["result"]

    def events(self, sub: int) -> list[tuple[dict, bytes]]:
        return [(h, d) for h, d in self.frames if h.get("ev") and h.get("sub") == sub]

    def output(self, sub: int) -> bytes:
        return b"".join(d for h, d in self.events(sub) if h["ev"] == "out")

    def exited(self, sub: int) -> dict | None:
        return next((h for h, _ in self.events(sub) if h["ev"] == "exit"), None)

    def quiet_for(self, seconds: float) -> bool:
        """True if no frame arrives within ``seconds``."""
        try:
            frame = self.conn.read_frame(time.monotonic() + seconds)
        except AgentTimeout:
            return True
        self.frames.append((frame.header, frame.data))
        return False


def _check_offsets(events: list[tuple[dict, bytes]], start: int) -> None:
    offset = start
    for header, data in events:
        if header["ev"] == "out":
            assert header["offset"] == offset and data
            offset += len(data)


def test_exec_output_streams_while_the_command_runs(conn: AgentConnection) -> None:
    stream = _Stream(conn)
    req = conn.send_request(
        "exec_start",
        {"shell": "echo ready; read line; echo got-$line; echo err >&2; exit 4", "stdin": "pipe", "attach": {"sub": 7}},
    )
    started = stream.answer(req)
    # The first line arrives while the command still waits for its input: streamed, not polled.
    stream.until(lambda: b"ready" in stream.output(7))
    assert stream.frames[0][0].get("id") == req  # the answer came before the first event
    assert stream.exited(7) is None
    stream.answer(conn.send_request("exec_stdin", {"exec_id": started["exec_id"], "eof": True}, b"42\n"))
    stream.until(lambda: stream.exited(7) is not None)
    events = stream.events(7)
    _check_offsets(events, 0)
    assert {h["stream"] for h, _ in events if h["ev"] == "out"} == {"stdout", "stderr"}
    out = stream.output(7)
    assert b"ready\n" in out and b"got-42\n" in out and b"err\n" in out
    exit_event = stream.exited(7)
    assert exit_event["exec_id"] == started["exec_id"] and exit_event["end_offset"] == len(out)
    assert exit_event["result"]["exit_code"] == 4
    assert events[-1][0]["ev"] == "exit"  # and the attachment ends with it
    assert conn.request("exec_credit", {"sub": 7, "bytes": 1000})["known"] is False


def test_attach_replays_from_an_offset_within_the_credit_window(conn: AgentConnection) -> None:
    started = conn.request("exec_start", {"shell": "head -c 10000 /dev/zero | tr '\\0' x"})
    conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=30)
    stream = _Stream(conn)
    attached = stream.answer(
        conn.send_request("exec_attach", {"exec_id": started["exec_id"], "sub": 2, "offset": 1000, "window": 3000})
    )
    assert attached["offset"] == 1000 and attached["end_offset"] == 10000
    stream.until(lambda: len(stream.output(2)) >= 3000)
    assert stream.quiet_for(0.5) and len(stream.output(2)) == 3000  # out of credit: it waits
    with pytest.raises(AgentRequestError) as exc:
        conn.request("exec_attach", {"exec_id": started["exec_id"], "sub": 2})
    assert error_code(exc) == "exists"
    assert stream.answer(conn.send_request("exec_credit", {"sub": 2, "bytes": 1 << 20}))["known"] is True
    stream.until(lambda: stream.exited(2) is not None)
    _check_offsets(stream.events(2), 1000)
    assert stream.output(2) == b"x" * 9000 and stream.exited(2)["end_offset"] == 10000


def test_detach_ends_the_events(conn: AgentConnection) -> None:
    started = conn.request("exec_start", {"argv": ["sleep", "30"]})
    stream = _Stream(conn)
    stream.answer(conn.send_request("exec_attach", {"exec_id": started["exec_id"], "sub": 3}))
    assert stream.answer(conn.send_request("exec_detach", {"sub": 3}))["known"] is True
    assert conn.request("exec_detach", {"sub": 3})["known"] is False
    conn.request("exec_signal", {"exec_id": started["exec_id"], "signal": "KILL"})
    conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=30)
    assert stream.quiet_for(0.5) and stream.events(3) == []


def test_a_pty_exec_has_a_terminal_that_resizes_and_reads_eof(conn: AgentConnection) -> None:
    stream = _Stream(conn)
    script = "stty size; [ -t 0 ] && echo is-a-tty; read a; stty size; read b || echo eof-seen"
    args = {"argv": ["sh", "-c", script], "pty": {"rows": 30, "cols": 100}, "attach": {"sub": 5}}
    req = conn.send_request("exec_start", args)
    exec_id = stream.answer(req)["exec_id"]
    stream.until(lambda: b"is-a-tty" in stream.output(5))
    assert b"30 100" in stream.output(5)
    summary = conn.request("exec_get", {"exec_id": exec_id})
    assert summary["pty"] is True and summary["running"] is True
    assert stream.answer(conn.send_request("exec_resize", {"exec_id": exec_id, "rows": 40, "cols": 120})) == {
        "rows": 40,
        "cols": 120,
    }
    stream.answer(conn.send_request("exec_stdin", {"exec_id": exec_id}, b"x\n"))
    stream.until(lambda: b"40 120" in stream.output(5))
    stream.answer(conn.send_request("exec_stdin", {"exec_id": exec_id, "eof": True}))  # EOT, as typed
    stream.until(lambda: stream.exited(5) is not None)
    assert b"eof-seen" in stream.output(5) and stream.exited(5)["result"]["exit_code"] == 0
    assert {h["stream"] for h, _ in stream.events(5) if h["ev"] == "out"} == {"pty"}
    _check_offsets(stream.events(5), 0)


def test_signals_reach_a_pty_exec_and_resize_needs_one(conn: AgentConnection) -> None:
    started = conn.request("exec_start", {"shell": "echo ready; exec sleep 30", "pty": {}})
    deadline = time.monotonic() + 20
    while b"ready" not in conn.request_data("exec_read", {"exec_id": started["exec_id"]})[1]:
        assert time.monotonic() < deadline, "the PTY exec did not start"
        time.sleep(0.05)  # in its session on the terminal now: the signal reaches it
    assert conn.request("exec_signal", {"exec_id": started["exec_id"], "signal": "INT"})["delivered"] is True
    done = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=30)
    assert done["result"]["signal"] == "SIGINT" and done["result"]["exit_code"] is None
    plain = conn.request("exec_start", {"argv": ["true"]})
    with pytest.raises(AgentRequestError) as exc:
        conn.request("exec_resize", {"exec_id": plain["exec_id"], "rows": 10, "cols": 10})
    assert error_code(exc) == "bad_request"


def test_identity_set_applies_and_reports(isolated_agent_sock: Path) -> None:
    with AgentConnection.open(isolated_agent_sock, AgentTransport.VIRTIO_SERIAL, timeout=10) as conn:
        before = conn.request("identity_get")
        assert set(before) >= {"hostname", "machine_id", "macs", "clock_unix"}
        with pytest.raises(AgentRequestError):
            conn.request("identity_set", {"hostname": "Not_A_Hostname!"})
        assert conn.ping()["hostname"] == before["hostname"]
        machine_id = "0123456789abcdef0123456789abcdef"
        got = conn.request(
            "identity_set", {"hostname": "clone-7", "machine_id": machine_id, "macs": {"*": "52:54:00:12:34:56"}}
        )
        # Only "lo" in the agent's network namespace: the "first interface" MAC is skipped.
        assert got["applied"] == ["machine_id", "hostname"]
        assert got["identity"]["hostname"] == "clone-7" and got["identity"]["machine_id"] == machine_id
        assert got["identity"]["macs"] == {}
        assert conn.ping()["hostname"] == "clone-7"
        assert conn.request("identity_get")["machine_id"] == machine_id
        assert agent_get(conn, "/etc/hostname")[0] == b"clone-7\n"
        assert agent_get(conn, "/etc/machine-id")[0] == machine_id.encode() + b"\n"
        assert b"127.0.1.1\tclone-7" in agent_get(conn, "/etc/hosts")[0]
    assert socket.gethostname() != "clone-7"


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
    assert windows.pty_eof == b"\x1a\r"  # Ctrl-Z, Enter: end of input for console programs
    assert windows.add_entropy(b"\x00" * 32) is False  # reported as not applied, not faked
    core = _windows_module("agent_core")
    abstract = [
        name
        for name, member in vars(core.Platform).items()
        if callable(member) and "NotImplementedError" in inspect.getsource(member)
    ]
    missing = [name for name in abstract if name not in vars(type(windows))]
    assert missing == [], missing  # the Windows layer implements every platform call
