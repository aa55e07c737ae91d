"""The SDK (``msbx``) and the ``msbx`` CLI against the real stack: one booted VM for the module
(created through the SDK), plus one clone. Exec with streaming and exit codes, a 64 MiB round
trip, snapshot and clone, the console through a pseudo-terminal, port forwards, an error case
per exception class, and the CLI's exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.stack import ROOT

SDK_SRC = ROOT / "sdk" / "src"
try:
    import msbx
except ImportError:  # not installed (make test installs it): use the checkout's
    sys.path.insert(0, str(SDK_SRC))
    import msbx

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def client(stack):
    with msbx.Client(stack.url, stack.tokens["owner"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def progress_seen():
    return []


@pytest.fixture(scope="module")
def sandbox(client, progress_seen):
    sb = msbx.Sandbox.create(template="linux-small", client=client, timeout=400, on_progress=progress_seen.append)
    try:
        yield sb
    finally:
        sb.delete().wait(timeout=300)


def _cli_env(stack, tmp_path: Path, persona: str = "owner") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSBX_")}
    env.update(
        MSBX_URL=stack.url,
        MSBX_TOKEN=stack.tokens[persona],
        MSBX_CONFIG=str(tmp_path / "msbx-config.json"),
        PYTHONPATH=os.pathsep.join(p for p in (str(SDK_SRC), env.get("PYTHONPATH", "")) if p),
        TERM="xterm",
    )
    return env


def msbx_run(stack, tmp_path, *args, persona="owner", timeout=300, input=None):
    return subprocess.run(
        [sys.executable, "-m", "msbx", *args],
        env=_cli_env(stack, tmp_path, persona),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


class PtyProcess:
    """A CLI process on a pseudo-terminal (stdin, stdout and stderr), read with a deadline."""

    def __init__(self, argv: list[str], env: dict) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.output = b""

    def expect(self, needle: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen in {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the process closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited {self.proc.returncode} before {needle!r}: {self.output[-2000:]!r}")
                self.output += chunk
        return self.output

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.proc.wait(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


def test_create_waits_until_running_with_progress(sandbox, progress_seen):
    assert sandbox.state == "running"
    assert progress_seen and progress_seen[-1]["status"] == "succeeded"
    assert sandbox.agent().get("agent_version")


def test_exec_streams_output_and_returns_exit_codes(sandbox):
    out, err = [], []
    result = sandbox.exec(
        "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo problem >&2; exit 7",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert result.exit_code == 7 and not result.ok
    assert "".join(out) == "line1\nline2\nline3\n" == result.stdout and result.stderr == "problem\n"
    assert sandbox.exec(["printenv", "GREETING"], env={"GREETING": "hi"}).stdout == "hi\n"
    assert sandbox.exec("pwd", cwd="/tmp").stdout.strip() == "/tmp"
    assert sandbox.exec("cat", stdin="fed").stdout == "fed"
    timed = sandbox.exec(["sleep", "30"], timeout=1)
    assert timed.timed_out and timed.exit_code is None
    with pytest.raises(msbx.CommandFailed):
        sandbox.exec("exit 2", check=True)


def test_a_background_process_is_followed_resumed_and_killed(sandbox):
    process = sandbox.exec("for i in 1 2 3 4; do echo $i; sleep 0.3; done", background=True)
    first = next(iter(process.output()))
    assert first.data.startswith(b"1\n")
    # A new iterator from the offset reached: nothing repeated, nothing missing.
    rest = b"".join(c.data for c in process.output())
    assert first.data + rest == b"1\n2\n3\n4\n"
    assert process.result is not None and process.result.exit_code == 0
    assert b"".join(sandbox.process(process.exec_id).stdout) == b"1\n2\n3\n4\n"

    sleeper = sandbox.exec(["sleep", "300"], background=True, tag="sdk-test")
    assert sleeper.poll() is None
    assert any(p.get("exec_id") == sleeper.exec_id for p in sandbox.processes(tag="sdk-test"))
    with pytest.raises(msbx.Timeout):
        sleeper.wait(timeout=0.5)
    sleeper.kill()
    assert sleeper.wait(timeout=60).signal in ("SIGKILL", "KILL", 9)


def test_a_64_mib_file_round_trip_is_streamed_and_verified(sandbox, tmp_path):
    source = tmp_path / "big.bin"
    with source.open("wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(1 << 20))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    sandbox.files.mkdir("/root/sdk")
    written = sandbox.files.write("/root/sdk/big.bin", source, mode=0o600)
    assert (written.size, written.sha256) == (64 << 20, expected)
    stat = sandbox.files.stat("/root/sdk/big.bin")
    assert stat["size"] == 64 << 20 and stat["mode"] & 0o777 == 0o600
    assert [e["name"] for e in sandbox.files.list("/root/sdk")] == ["big.bin"]
    target = tmp_path / "back.bin"
    read = sandbox.files.download("/root/sdk/big.bin", target)
    assert read.sha256 == expected and hashlib.sha256(target.read_bytes()).hexdigest() == expected
    sandbox.files.remove("/root/sdk", recursive=True)
    assert not sandbox.files.exists("/root/sdk")


def test_snapshot_and_clone(sandbox, client):
    sandbox.exec("echo from-the-original > /root/marker && sync", check=True)
    snap = sandbox.snapshot("sdk-snap", include_memory=True)
    assert snap.state == "ready" and snap.id in [s.id for s in sandbox.snapshots()]
    clones = snap.clone(1, name_prefix="sdkclone", timeout=400)
    try:
        assert len(clones) == 1 and clones[0].state == "running"
        assert clones[0].exec("cat /root/marker").stdout == "from-the-original\n"
        assert clones[0].exec("hostname").stdout.strip() == clones[0].name
    finally:
        for clone in clones:
            clone.delete().wait(timeout=300)


def test_a_pty_session_reads_output_far_beyond_the_flow_control_window(sandbox):
    # The server sends at most 256 KiB beyond the reader's last ack: 2 MiB through a real
    # pseudo-terminal arrive whole only if the session acknowledges as it reads.
    size = 2 << 20
    with sandbox.pty(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo; echo done"]) as term:
        received = 0
        while (data := term.recv(timeout=60)) is not None:
            received += data.count(b"x")
    assert received == size and term.result.exit_code == 0


def test_port_forwards_are_listed(sandbox, stack, tmp_path):
    assert sandbox.port_forwards.list() == []
    forward = sandbox.port_forwards.create(8080)
    try:
        listed = sandbox.port_forwards.list()
        assert [(f["guest_port"], f["host_port"]) for f in listed] == [(8080, forward["host_port"])]
        done = msbx_run(stack, tmp_path, "port-forward", "ls", sandbox.id, "-o", "json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)[0]["guest_port"] == 8080
        table = msbx_run(stack, tmp_path, "port-forward", "ls", sandbox.name)
        assert "GUEST_PORT" in table.stdout and "8080" in table.stdout
    finally:
        sandbox.port_forwards.delete(forward["id"])
    assert sandbox.port_forwards.list() == []


def test_the_console_attaches_with_a_ticket(sandbox):
    with sandbox.console() as console:
        console.send(b"\recho console-$((40+2))\r")
        seen = b""
        deadline = time.monotonic() + 60
        while b"console-42" not in seen and time.monotonic() < deadline:
            seen += console.recv(timeout=60) or b""
        assert b"console-42" in seen and console.writer


def test_the_cli_console_attaches_through_a_pseudo_terminal_and_detaches(sandbox, stack, tmp_path):
    cli = PtyProcess([sys.executable, "-m", "msbx", "console", sandbox.id], _cli_env(stack, tmp_path))
    try:
        cli.expect(b"escape character is ^]")
        cli.send(b"\recho cli-$((6*7))\r")
        cli.expect(b"cli-42")
        cli.send(b"\x1d")  # ^]
        assert cli.wait() == 0
        assert b"Detached" in cli.output
    finally:
        cli.close()


def test_the_cli_exec_tty_is_interactive(sandbox, stack, tmp_path):
    cli = PtyProcess(
        [sys.executable, "-m", "msbx", "exec", "-t", sandbox.id, "--", "/bin/sh"], _cli_env(stack, tmp_path)
    )
    try:
        cli.expect(b"# ")  # the guest shell's prompt
        cli.send(b"stty size; echo tty-$((5*5))\r")
        cli.expect(b"tty-25")
        cli.send(b"exit 3\r")
        assert cli.wait() == 3
    finally:
        cli.close()


def test_the_cli_runs_commands_lists_and_copies(sandbox, stack, tmp_path):
    done = msbx_run(stack, tmp_path, "exec", sandbox.name, "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (done.returncode, done.stdout, done.stderr) == (4, "out\n", "err\n")
    listed = msbx_run(stack, tmp_path, "vm", "ls", "-o", "json")
    assert sandbox.id in [vm["id"] for vm in json.loads(listed.stdout)]
    table = msbx_run(stack, tmp_path, "vm", "ls")
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"]
    local = tmp_path / "hello.txt"
    local.write_text("hello from the cli\n")
    up = msbx_run(stack, tmp_path, "cp", str(local), f"{sandbox.id}:/tmp/hello.txt")
    assert up.returncode == 0, up.stderr
    down = msbx_run(stack, tmp_path, "cp", f"{sandbox.id}:/tmp/hello.txt", str(tmp_path / "copy.txt"))
    assert down.returncode == 0 and (tmp_path / "copy.txt").read_text() == "hello from the cli\n"
    ops = msbx_run(stack, tmp_path, "ops", "ls", "--vm", sandbox.id, "-o", "json")
    first_op = json.loads(ops.stdout)[-1]["id"]
    watched = msbx_run(stack, tmp_path, "ops", "watch", first_op, "-o", "json")
    assert json.loads(watched.stdout)["status"] == "succeeded"
    assert "complete -o default -F _msbx_complete msbx" in msbx_run(stack, tmp_path, "completion", "bash").stdout


def test_cli_errors_are_one_line_with_documented_exit_codes(sandbox, stack, tmp_path):
    missing = msbx_run(stack, tmp_path, "--debug", "vm", "show", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 5
    errors = [line for line in missing.stderr.splitlines() if line.startswith("msbx: error:")]
    assert len(errors) == 1 and "request-id=" in missing.stderr
    bad_token = subprocess.run(
        [sys.executable, "-m", "msbx", "--token", "msbx_wrong", "vm", "ls"],
        env=_cli_env(stack, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_token.returncode == 3 and bad_token.stderr.count("\n") == 1
    conflict = msbx_run(stack, tmp_path, "vm", "start", sandbox.id)
    assert conflict.returncode == 6, conflict.stderr


def test_login_stores_a_private_profile(stack, tmp_path):
    done = msbx_run(stack, tmp_path, "login", "--profile", "systest")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "msbx-config.json"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert json.loads(config.read_text())["profiles"]["systest"]["url"] == stack.url


_NO_VMS_FOR_STRANGER = """
from accounts.models import UserQuota
from django.contrib.auth import get_user_model
user = get_user_model().objects.get(username="stranger")
UserQuota.objects.update_or_create(user=user, defaults=dict(max_vms=0, max_vcpus=0, max_memory_mib=0, max_disk_gib=0))
"""


def test_each_exception_class_on_a_real_error(sandbox, client, stack):
    with pytest.raises(msbx.NotFound):
        client.sandbox("00000000-0000-0000-0000-000000000000")
    with pytest.raises(msbx.NotFound):
        sandbox.files.stat("/no/such/file")
    with pytest.raises(msbx.Conflict):
        sandbox.start()
    with pytest.raises(msbx.ValidationError):  # refused on the exec websocket's start frame
        sandbox.pty("/bin/sh", rows=0, cols=0)
    with pytest.raises(msbx.ValidationError) as invalid:
        client.create_sandbox(template="no-such-template", wait=False)
    assert "template" in invalid.value.fields
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", _NO_VMS_FOR_STRANGER],
        cwd=ROOT,
        env=stack.env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    with msbx.Client(stack.url, stack.tokens["stranger"]) as stranger, pytest.raises(msbx.QuotaExceeded) as quota:
        stranger.create_sandbox(template="linux-small", wait=False)
    assert "vms" in quota.value.details
    with pytest.raises(msbx.AuthenticationError), msbx.Client(stack.url, "msbx_not-a-token") as bad:
        bad.me()
    with stack.client("owner") as raw:
        granted = raw.post(
            f"/api/v1/vms/{sandbox.id}/permissions/", json={"user": "grantee", "permissions": ["view_vm"]}
        )
        assert granted.status_code == 200, granted.text
    with msbx.Client(stack.url, stack.tokens["grantee"]) as grantee:
        seen = grantee.sandbox(sandbox.id)
        with pytest.raises(msbx.PermissionDenied):
            seen.exec("true")
    with pytest.raises(msbx.OperationFailed):
        client.create_sandbox(template="broken", timeout=120)
    with pytest.raises(msbx.TransportError), msbx.Client("http://127.0.0.1:9", "x", retries=0) as nowhere:
        nowhere.me()


async def test_the_async_client_has_the_same_surface_on_the_real_stack(sandbox, stack):
    from msbx.aio import AsyncClient, AsyncSandbox

    async with AsyncClient(stack.url, stack.tokens["owner"], timeout=60) as aclient:
        sb = await AsyncSandbox.connect(sandbox.id, client=aclient)
        assert sb.state == "running" and sb.id in [s.id async for s in aclient.sandboxes()]
        seen = []

        async def on_stdout(text):
            seen.append(text)

        result = await sb.exec("echo a; sleep 0.2; echo b; exit 5", on_stdout=on_stdout)
        assert (result.exit_code, "".join(seen)) == (5, "a\nb\n")
        written = await sb.files.write("/tmp/async.bin", b"x" * 300_000)
        assert (await sb.files.read("/tmp/async.bin")) == b"x" * 300_000
        assert written.size == 300_000
        async with await sb.pty("/bin/sh") as term:
            await term.send(b"echo pty-$((3*3)); exit 2\r")
            output = b"".join([chunk async for chunk in term])
        assert b"pty-9" in output and term.result.exit_code == 2
        async with await sb.console() as console:
            await console.send(b"\recho async-console-$((1+1))\r")
            got = b""
            while b"async-console-2" not in got:
                got += await console.recv(timeout=60) or b""
