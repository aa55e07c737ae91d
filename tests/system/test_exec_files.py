"""Exec and files on a real VM through the whole stack: REST / websocket -> daphne -> hostd
-> guest agent (virtio-serial under QEMU) and back. One booted VM (``running_vm``) shared."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import websocket

from tests.waiting import wait_until

pytestmark = pytest.mark.vm

MIB = 1 << 20


def _exec(stack, vm_id, persona="owner", **body):
    with stack.client(persona) as client:
        client.timeout = 120
        return client.post(f"/api/v1/vms/{vm_id}/exec/", json=body)


def _run(stack, vm_id, command, **body) -> dict:
    response = _exec(stack, vm_id, command=command, **body)
    assert response.status_code == 200, response.text
    return response.json()


def _session_cookie(stack, username: str) -> str:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        page = client.get("/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        client.post(
            "/login/",
            data={"username": username, "password": "system-test-password-1", "csrfmiddlewaretoken": token},
            headers={"Referer": stack.url + "/login/"},
        )
        return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


def _ws(stack, vm_id, exec_id, *, offset=0, persona="owner"):
    url = stack.url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/execs/{exec_id}/?offset={offset}"
    return websocket.create_connection(url, timeout=60, cookie=_session_cookie(stack, persona), origin=stack.url)


def _ws_collect(ws, *, stop_after: int | None = None):
    """(bytes by stream, last control message, bytes received) until exit or ``stop_after`` bytes."""
    out = {1: bytearray(), 2: bytearray(), 3: bytearray()}
    got = 0
    control = None
    offset = acked = window = 0
    while True:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_BINARY:
            out[data[0]] += data[1:]
            got += len(data) - 1
            offset += len(data) - 1
            if window and offset - acked >= window // 2:  # flow control (docs/exec-and-files.md)
                acked = offset
                ws.send(json.dumps({"type": "ack", "offset": offset}))
            if stop_after is not None and got >= stop_after:
                return out, control, got
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            control = json.loads(data)
            assert control["type"] != "gap", control
            if control["type"] == "attached":
                offset = acked = control["offset"]
                window = control["window"]
            if control["type"] in ("exit", "error"):
                return out, control, got
        else:
            return out, control, got


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _child_pid(proc_pid: int, needle: bytes) -> int:
    """The pid of the process named by ``needle`` in the session of ``proc_pid``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes() and os.getsid(int(entry.name)) == os.getsid(proc_pid):
                    return int(entry.name)
            except OSError:
                continue
    return proc_pid


def _finished(client: httpx.Client, vm_id: str, exec_id: str) -> dict | None:
    """The exec's detail once it has ended, else None."""
    detail = client.get(f"/api/v1/vms/{vm_id}/execs/{exec_id}/").json()
    return None if detail["running"] else detail


def _output_end(client: httpx.Client, vm_id: str, exec_id: str) -> int:
    """How many bytes of output (stdout and stderr) the exec has written so far."""
    response = client.get(f"/api/v1/vms/{vm_id}/execs/{exec_id}/", params={"limit": 1})
    assert response.status_code == 200, response.text
    return response.json()["end_offset"]


# ----- exec ---------------------------------------------------------------------------


def test_it_returns_10000_numbered_lines_whole_and_in_order(stack, running_vm):
    body = _run(stack, running_vm["id"], 'i=1; while [ $i -le 10000 ]; do echo "line $i"; i=$((i+1)); done')
    assert body["exit_code"] == 0 and not body["truncated"]
    assert body["stdout"].splitlines() == [f"line {i}" for i in range(1, 10001)]
    assert body["duration_ms"] >= 0 and body["cpu_ms"] >= 0 and body["max_rss_kib"] > 0


def test_it_streams_10000_lines_over_the_websocket_in_order(stack, running_vm):
    vm_id = running_vm["id"]
    started = _exec(stack, vm_id, command="seq 1 10000", wait=False)
    assert started.status_code == 202, started.text
    ws = _ws(stack, vm_id, started.json()["exec_id"])
    try:
        attached = json.loads(ws.recv())
        assert attached["type"] == "attached"
        out, control, _ = _ws_collect(ws)
    finally:
        ws.close()
    assert control["type"] == "exit" and control["result"]["exit_code"] == 0
    assert out[1].decode().splitlines() == [str(i) for i in range(1, 10001)]


def test_stdout_and_stderr_are_kept_apart(stack, running_vm):
    body = _run(stack, running_vm["id"], "echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert body["stdout"] == "out1\nout2\n"
    assert body["stderr"] == "err1\nerr2\n"


def test_exit_codes_and_signals_are_reported(stack, running_vm):
    vm_id = running_vm["id"]
    assert _run(stack, vm_id, ["sh", "-c", "exit 7"])["exit_code"] == 7
    killed = _run(stack, vm_id, "kill -TERM $$")
    assert killed["exit_code"] is None and killed["signal"] == "SIGTERM"
    missing = _exec(stack, vm_id, command=["no-such-command-here"])
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]

    started = _exec(stack, vm_id, command=["sleep", "300"], wait=False).json()
    with stack.client() as client:
        assert (
            client.post(f"/api/v1/vms/{vm_id}/execs/{started['exec_id']}/signal/", json={"signal": "KILL"}).status_code
            == 200
        )
        detail = wait_until(
            lambda: _finished(client, vm_id, started["exec_id"]), timeout=30, message="the killed exec did not end"
        )
    assert detail["result"]["signal"] == "SIGKILL"


def test_a_timeout_kills_the_whole_process_tree(stack, running_vm):
    vm_id = running_vm["id"]
    started = time.monotonic()
    body = _run(stack, vm_id, "sleep 301 & (sleep 302 &) ; setsid sleep 303 & sleep 304", timeout=2)
    assert body["timed_out"] is True and body["signal"] == "SIGKILL"
    assert time.monotonic() - started < 60

    def no_sleep_left() -> bool:
        left = _run(stack, vm_id, "ps -eo args | grep -c '^sleep 30[1-4]' || true")
        return left["stdout"].strip() == "0"

    # The tree is killed at the timeout; give the guest's kernel a moment to take the processes away.
    wait_until(no_sleep_left, timeout=10, interval=0.5, message="processes of the timed-out exec are still running")


def test_twenty_concurrent_execs_all_complete(stack, running_vm):
    vm_id = running_vm["id"]

    def one(n: int) -> dict:
        return _run(stack, vm_id, f"sleep 1; echo exec-{n}; echo e{n} >&2")

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    for n, body in enumerate(results):
        assert body["exit_code"] == 0 and body["stdout"] == f"exec-{n}\n" and body["stderr"] == f"e{n}\n"


def test_stdin_round_trips(stack, running_vm):
    vm_id = running_vm["id"]
    assert _run(stack, vm_id, ["cat"], stdin="hello\nworld\n")["stdout"] == "hello\nworld\n"
    started = _exec(stack, vm_id, command=["sha256sum"], stdin_open=True, wait=False).json()
    chunk = "0123456789abcdef" * 4096
    with stack.client() as client:
        for _ in range(8):
            r = client.post(f"/api/v1/vms/{vm_id}/execs/{started['exec_id']}/stdin/", json={"data": chunk})
            assert r.status_code == 200, r.text
        client.post(f"/api/v1/vms/{vm_id}/execs/{started['exec_id']}/stdin/", json={"eof": True})
        detail = wait_until(
            lambda: _finished(client, vm_id, started["exec_id"]), timeout=30, message="sha256sum did not end after EOF"
        )
    text = "".join(c["data"] for c in detail["chunks"])
    assert text.split()[0] == hashlib.sha256((chunk * 8).encode()).hexdigest()


def test_a_pty_exec_sees_its_window_resized(stack, running_vm):
    vm_id = running_vm["id"]
    started = _exec(
        stack, vm_id, command="stty size; read line; stty size", pty={"rows": 24, "cols": 80}, wait=False
    ).json()
    ws = _ws(stack, vm_id, started["exec_id"])
    try:
        assert json.loads(ws.recv())["type"] == "attached"
        seen = bytearray()
        while b"24 80" not in seen:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_BINARY:
                assert data[0] == 3
                seen += data[1:]
        ws.send(json.dumps({"type": "resize", "rows": 40, "cols": 120}))
        ws.send_binary(b"\n")
        out, control, _ = _ws_collect(ws)
    finally:
        ws.close()
    assert control["type"] == "exit" and control["result"]["exit_code"] == 0
    assert b"40 120" in out[3], bytes(out[3])


def test_a_reader_that_reconnects_resumes_from_its_offset(stack, running_vm):
    vm_id = running_vm["id"]
    script = 'i=1; while [ $i -le 4000 ]; do echo "line $i"; [ $((i % 500)) -eq 0 ] && sleep 0.5; i=$((i+1)); done'
    exec_id = _exec(stack, vm_id, command=script, wait=False).json()["exec_id"]
    received = bytearray()
    ws = _ws(stack, vm_id, exec_id)
    try:
        json.loads(ws.recv())
        out, _, _ = _ws_collect(ws, stop_after=5000)
        received += out[1]
    finally:
        ws.close()
    # Resume only once the exec has written more than this reader got, so the reconnect replays it.
    with stack.client() as client:
        wait_until(
            lambda: _output_end(client, vm_id, exec_id) > len(received),
            timeout=60,
            message="the exec wrote nothing after the reader left",
        )
    ws = _ws(stack, vm_id, exec_id, offset=len(received))
    try:
        assert json.loads(ws.recv())["offset"] == len(received)
        out, control, _ = _ws_collect(ws)
        received += out[1]
    finally:
        ws.close()
    assert control["type"] == "exit"
    assert received.decode().splitlines() == [f"line {i}" for i in range(1, 4001)]


def test_restarting_hostd_loses_no_process_and_no_output(stack, running_vm):
    vm_id = running_vm["id"]
    script = 'i=1; while [ $i -le 30 ]; do echo "tick $i"; sleep 0.2; i=$((i+1)); done'
    exec_id = _exec(stack, vm_id, command=script, wait=False, tag="survivor").json()["exec_id"]
    with stack.client() as client:
        wait_until(lambda: _output_end(client, vm_id, exec_id) > 0, timeout=30, message="the exec printed nothing")
    # kill() returns once hostd has exited; starting it again (Django, attaching) takes longer
    # than the exec's 0.2 s ticks, so the guest writes output while no hostd is there to read it.
    stack.kill("hostd")
    stack.start("hostd")
    stack.wait_hostd()
    with stack.client() as client:

        def survivor_ended():
            response = client.get(f"/api/v1/vms/{vm_id}/execs/", params={"tag": "survivor"})
            return response.status_code == 200 and not response.json()["results"][0]["running"]

        wait_until(survivor_ended, timeout=60, interval=0.5, message="the exec did not end after the hostd restart")
        detail = client.get(f"/api/v1/vms/{vm_id}/execs/{exec_id}/", params={"offset": 0}).json()
    text = "".join(c["data"] for c in detail["chunks"])
    assert text.splitlines() == [f"tick {i}" for i in range(1, 31)]
    assert detail["result"]["exit_code"] == 0


# ----- files ----------------------------------------------------------------------------


def _blocks(total: int, seed: bytes):
    """Deterministic pseudo-random bytes, 1 MiB at a time."""
    block = hashlib.sha256(seed).digest() * (MIB // 32)
    for n in range(total // MIB):
        yield n.to_bytes(8, "big") + block[8:]


def test_a_200_mib_upload_and_download_match_and_host_memory_stays_bounded(stack, running_vm):
    vm_id = running_vm["id"]
    size = 200 * MIB
    expected = hashlib.sha256()
    for piece in _blocks(size, b"big"):
        expected.update(piece)
    hostd_pid = _child_pid(stack.procs["hostd"].pid, b"hostd")
    web_pid = _child_pid(stack.procs["web"].pid, b"daphne")
    before = {"hostd": _vm_hwm_kib(hostd_pid), "web": _vm_hwm_kib(web_pid)}
    headers = {
        "Authorization": f"Bearer {stack.tokens['owner']}",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
    }
    started = time.monotonic()
    with httpx.Client(base_url=stack.url, timeout=600) as client:
        response = client.put(
            f"/api/v1/vms/{vm_id}/files/",
            params={"path": "/root/big.bin", "mode": "0600"},
            content=_blocks(size, b"big"),
            headers=headers,
        )
        upload_s = time.monotonic() - started
        assert response.status_code == 201, response.text
        assert response.json()["sha256"] == expected.hexdigest() and response.json()["size"] == size
        got = hashlib.sha256()
        received = 0
        started = time.monotonic()
        with client.stream(
            "GET",
            f"/api/v1/vms/{vm_id}/files/",
            params={"path": "/root/big.bin"},
            headers={"Authorization": headers["Authorization"]},
        ) as download:
            assert download.status_code == 200
            assert download.headers["X-Checksum-Sha256"] == expected.hexdigest()
            for piece in download.iter_bytes():
                got.update(piece)
                received += len(piece)
        download_s = time.monotonic() - started
    assert received == size and got.hexdigest() == expected.hexdigest()
    after = {"hostd": _vm_hwm_kib(hostd_pid), "web": _vm_hwm_kib(web_pid)}
    print(
        f"\n200 MiB upload {size / MIB / upload_s:.1f} MiB/s, download {size / MIB / download_s:.1f} MiB/s; "
        f"peak RSS KiB before {before} after {after}"
    )
    for name in ("hostd", "web"):
        assert after[name] - before[name] < 64 * 1024, (name, before, after)
    stat = _run(stack, vm_id, "stat -c '%s %a' /root/big.bin && rm /root/big.bin")
    assert stat["stdout"].strip() == f"{size} 600"


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(stack, running_vm):
    vm_id = running_vm["id"]
    limit = int(stack.env["SANDBOX_FILE_UPLOAD_MAX_BYTES"])
    auth = {"Authorization": f"Bearer {stack.tokens['owner']}"}
    # daphne answers 413 as the headers (declared size) or the chunks (streamed size) pass the
    # limit, before anything is written (tests/web/test_daphne_limits.py); none of it
    # reaches Django or the guest.
    with httpx.Client(base_url=stack.url, timeout=300) as client:
        declared = client.put(
            f"/api/v1/vms/{vm_id}/files/",
            params={"path": "/root/too-big.bin"},
            content=_blocks(limit + MIB, b"declared"),
            headers={**auth, "Content-Length": str(limit + MIB)},
        )
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "too_large"
    with httpx.Client(base_url=stack.url, timeout=300) as client:
        chunked = client.put(
            f"/api/v1/vms/{vm_id}/files/",
            params={"path": "/root/too-big.bin"},
            content=_blocks(limit + 2 * MIB, b"over"),
            headers=auth,
        )
        assert chunked.status_code == 413, chunked.text
    listing = _run(stack, vm_id, "ls -a /root")
    assert "too-big" not in listing["stdout"] and "sbx-upload" not in listing["stdout"]


def test_stat_list_mkdir_and_delete(stack, running_vm):
    vm_id = running_vm["id"]
    with stack.client() as client:
        made = client.post(f"/api/v1/vms/{vm_id}/files/mkdir/", json={"path": "/root/d1/d2", "mode": 0o750})
        assert made.status_code == 201, made.text
        put = client.put(
            f"/api/v1/vms/{vm_id}/files/",
            params={"path": "/root/d1/d2/f.txt", "mode": "0640"},
            content=b"payload\n",
            headers={"Content-Type": "application/octet-stream"},
        )
        assert put.status_code == 201, put.text
        stat = client.get(f"/api/v1/vms/{vm_id}/files/stat/", params={"path": "/root/d1/d2/f.txt"}).json()
        assert stat["type"] == "file" and stat["size"] == 8 and stat["mode"] == 0o640
        listing = client.get(f"/api/v1/vms/{vm_id}/files/list/", params={"path": "/root/d1/d2"}).json()
        assert [e["name"] for e in listing["entries"]] == ["f.txt"]
        got = client.get(f"/api/v1/vms/{vm_id}/files/", params={"path": "/root/d1/d2/f.txt"})
        assert got.content == b"payload\n"
        assert got.headers["X-Checksum-Sha256"] == hashlib.sha256(b"payload\n").hexdigest()
        assert client.get(f"/api/v1/vms/{vm_id}/files/stat/", params={"path": "/nope"}).status_code == 404
        assert client.delete(f"/api/v1/vms/{vm_id}/files/", params={"path": "/root/d1"}).status_code == 409
        assert (
            client.delete(f"/api/v1/vms/{vm_id}/files/", params={"path": "/root/d1", "recursive": "1"}).status_code
            == 204
        )
        assert client.get(f"/api/v1/vms/{vm_id}/files/stat/", params={"path": "/root/d1"}).status_code == 404
        assert client.get(f"/api/v1/vms/{vm_id}/files/stat/", params={"path": "relative"}).status_code == 400


# ----- permissions and audit --------------------------------------------------------------


def test_exec_and_files_need_the_exec_permission(stack, running_vm):
    vm_id = running_vm["id"]
    with stack.client("owner") as owner:
        r = owner.post(f"/api/v1/vms/{vm_id}/permissions/", json={"user": "grantee", "permissions": ["view_vm"]})
        assert r.status_code == 200, r.text
    assert _exec(stack, vm_id, "grantee", command="true").status_code == 403
    with stack.client("grantee") as grantee:
        assert grantee.get(f"/api/v1/vms/{vm_id}/files/stat/", params={"path": "/"}).status_code == 403
        assert grantee.get(f"/api/v1/vms/{vm_id}/execs/").status_code == 403
    with stack.client("stranger") as stranger:
        assert stranger.post(f"/api/v1/vms/{vm_id}/exec/", json={"command": "true"}).status_code == 404
        assert stranger.get(f"/api/v1/vms/{vm_id}/files/", params={"path": "/etc/hostname"}).status_code == 404
        assert stranger.put(f"/api/v1/vms/{vm_id}/files/", params={"path": "/root/x"}, content=b"x").status_code == 404
    with pytest.raises(websocket.WebSocketBadStatusException):  # refused at the handshake
        _ws(stack, vm_id, "whatever", persona="grantee")
    with stack.client("owner") as owner:
        r = owner.post(f"/api/v1/vms/{vm_id}/permissions/", json={"user": "grantee", "permissions": ["exec_vm"]})
        assert r.status_code == 200, r.text
    assert _exec(stack, vm_id, "grantee", command="echo granted").json()["stdout"] == "granted\n"


def test_execs_and_file_writes_are_audited_without_output(stack, running_vm):
    vm_id = running_vm["id"]
    _run(stack, vm_id, "echo secret-output-xyz")
    with stack.client() as client:
        client.put(
            f"/api/v1/vms/{vm_id}/files/",
            params={"path": "/root/audited.txt"},
            content=b"hi",
            headers={"Content-Type": "application/octet-stream"},
        )
    with stack.client("admin") as admin:
        events = admin.get("/api/v1/audit-events/", params={"limit": 200}).json()["results"]
    execs = [e for e in events if e["action"] == "vm.exec" and "secret-output-xyz" in json.dumps(e["after"])]
    assert execs and all("stdout" not in json.dumps(e) for e in execs)
    assert any(e["action"] == "vm.file_write" and e["after"]["path"] == "/root/audited.txt" for e in events)
    assert any(e["action"].startswith("vm.exec") and e["result"] == "denied" for e in events)


def test_the_agent_endpoint_answers_through_hostd(stack, running_vm):
    with stack.client() as client:
        ping = client.get(f"/api/v1/vms/{running_vm['id']}/agent/")
    assert ping.status_code == 200 and ping.json()["protocol"] == 2
    assert "agent session" in (stack.log_dir / "hostd.log").read_text()


def test_hostd_survives_a_killed_vmm(stack):
    vm = _post_vm(stack, "exec-doomed")
    stack.wait_vm(vm["id"], {"running"})
    from tests.system.stack import vmm_pids

    for pid in vmm_pids(stack.runtime_dir / vm["id"]):
        os.kill(pid, signal.SIGKILL)
    stack.wait_vm(vm["id"], {"error"}, timeout=60)
    assert stack.procs["hostd"].poll() is None
    with stack.client() as client:
        client.delete(f"/api/v1/vms/{vm['id']}/")
    stack.wait_vm(vm["id"], {"gone"})


def _post_vm(stack, name):
    with stack.client() as client:
        response = client.post("/api/v1/vms/", json={"name": name, "template": "linux-small"})
    assert response.status_code == 202, response.text
    return response.json()
