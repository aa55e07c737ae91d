"""Two hypervisor hosts and two web instances behind HAProxy on one machine (tests/system/
multihost.py), real VMs under QEMU: placement, consoles, exec and files, networks across hosts,
cordon and a host whose hostd dies. Three VMs are booted for the whole module: the owner's
``a1`` (on h1) and ``a2`` (on h2), the stranger's ``s1``; every request goes through the
balancer unless a test names a web instance."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.system.multihost import MultiHostStack, multihost_start, multihost_stop
from tests.system.stack import ROOT, vmm_pids

pytestmark = pytest.mark.vm

MIB = 1 << 20


@pytest.fixture(scope="module")
def mh():
    if shutil.which("qemu-system-x86_64") is None or shutil.which("haproxy") is None:
        pytest.skip("qemu-system-x86_64 and haproxy are needed (make test installs them)")
    import os

    log_dir = Path(os.environ.get("SANDBOX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "system-multihost"
    work_dir = Path(tempfile.mkdtemp(prefix="msbx-mh-", dir="/tmp"))
    work_dir.chmod(0o711)  # the VMM user reaches the hosts' runtime directories
    started = None
    try:
        started = multihost_start(work_dir, log_dir)
        yield started
    finally:
        if started is not None:
            multihost_stop(started)
        shutil.rmtree(work_dir, ignore_errors=True)


def _create(mh: MultiHostStack, persona: str, name: str, **extra) -> dict:
    with mh.client(persona) as client:
        response = client.post("/api/v1/vms/", json={"name": name, "template": "linux-small", **extra})
    assert response.status_code == 202, response.text
    return response.json()


def _host_of(mh: MultiHostStack, vm_id: str) -> str:
    with mh.client("admin") as client:
        body = client.get(f"/api/v1/vms/{vm_id}/").json()
    return body["host"]


@pytest.fixture(scope="module")
def vms(mh):
    """a1, a2 of the owner and s1 of the stranger, created one after the other (placement sees
    each) and booted together."""
    made: dict[str, dict] = {}
    try:
        for name, persona in (("a1", "owner"), ("a2", "owner"), ("s1", "stranger")):
            made[name] = {**_create(mh, persona, f"mh-{name}"), "persona": persona}
        for name, vm in made.items():
            body = mh.wait_vm(vm["id"], {"running", "error"}, timeout=400, persona=vm["persona"])
            assert body["state"] == "running", body
            vm["host"] = _host_of(mh, vm["id"])
            with mh.client(vm["persona"]) as client:
                (nic,) = client.get(f"/api/v1/vms/{vm['id']}/nics/").json()
            vm["ip"] = nic["ip"]
        yield made
    finally:
        for vm in made.values():
            with mh.client(vm["persona"]) as client:
                client.delete(f"/api/v1/vms/{vm['id']}/")
        for vm in made.values():
            mh.wait_vm(vm["id"], {"gone"}, persona=vm["persona"], timeout=120)


def _exec(mh, vm: dict, command: str, timeout: float = 20.0, via: str | None = None) -> tuple[int, str]:
    with mh.client(vm["persona"], via=via, timeout=timeout + 30) as client:
        response = client.post(f"/api/v1/vms/{vm['id']}/exec/", json={"command": command, "timeout": timeout})
    assert response.status_code == 200, response.text
    body = response.json()
    return (body["exit_code"] if body["exit_code"] is not None else -1), body["stdout"].strip()


def test_placement_spreads_the_vms_over_both_hosts_by_capacity(mh, vms):
    # a1 went to one host, a2 to the one with more room left then: the other one.
    assert {vms["a1"]["host"], vms["a2"]["host"]} == {"h1", "h2"}
    # Each VM's VMM runs in its host's runtime directory and nowhere else.
    for vm in vms.values():
        node = mh.hosts[vm["host"]]
        assert (node.runtime_dir / vm["id"]).is_dir()
        other = mh.hosts["h2" if vm["host"] == "h1" else "h1"]
        assert not (other.runtime_dir / vm["id"]).exists()
    rows = mh.host_rows()
    assert rows["h1"]["vms"] + rows["h2"]["vms"] == 3
    # The owner has VMs on both hosts now: anti-affinity finds no host.
    with mh.client("owner") as client:
        response = client.post(
            "/api/v1/vms/", json={"name": "mh-anti", "template": "linux-small", "anti_affinity": True, "start": False}
        )
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_host", response.text


def test_an_operator_pins_a_host_and_a_user_may_not(mh, vms):
    with mh.client("admin") as client:
        for host in ("h1", "h2"):
            response = client.post(
                "/api/v1/vms/", json={"name": f"mh-pin-{host}", "template": "linux-small", "host": host, "start": False}
            )
            assert response.status_code == 202, response.text
            vm_id = response.json()["id"]
            assert _host_of(mh, vm_id) == host
            assert client.delete(f"/api/v1/vms/{vm_id}/").status_code in (202, 204)
    with mh.client("owner") as client:
        response = client.post(
            "/api/v1/vms/", json={"name": "mh-pin-user", "template": "linux-small", "host": "h1", "start": False}
        )
    assert response.status_code == 403, response.text


# ----- consoles ----------------------------------------------------------------------------


async def _keyboard(ws, hello: dict, got: bytearray) -> None:
    """Be the console's writer: a previous connection of ours on another web instance may still
    hold the role for a moment after it closed, so take it over explicitly (console bytes that
    arrive meanwhile go to ``got``)."""
    if hello.get("writer"):
        return
    await ws.send(json.dumps({"type": "takeover"}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, bytes):
            got.extend(message)
        elif (event := json.loads(message)).get("type") == "role" and event.get("writer"):
            return
    raise AssertionError("the console's writer role was not ours")


async def _console(mh, vm: dict, via: str | None, *, offset: int | None, typed: str, marker: bytes):
    """Open the console (through ``via`` or the balancer) from ``offset``, type ``typed``, read
    until ``marker``; returns (hello, the bytes received, offset reached)."""
    from websockets.asyncio.client import connect

    query = f"?offset={offset}" if offset is not None else ""
    headers = {"Authorization": f"Bearer {mh.tokens[vm['persona']]}"}
    async with connect(
        mh.ws_url(f"/ws/vms/{vm['id']}/console/{query}", via), additional_headers=headers, open_timeout=30
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert hello["type"] == "hello", hello
        got = bytearray()
        if typed:
            await _keyboard(ws, hello, got)
            await ws.send(json.dumps({"type": "input", "data": typed}))
        deadline = time.monotonic() + 90
        while marker not in got:
            assert time.monotonic() < deadline, bytes(got[-500:])
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                got.extend(message)
                await ws.send(json.dumps({"type": "ack", "offset": hello["offset"] + len(got)}))
        return hello, bytes(got), hello["offset"] + len(got)


@pytest.mark.parametrize("via", ["web1", "web2"])
def test_a_console_through_either_web_instance_shows_vms_on_both_hosts(mh, vms, via):
    for name in ("a1", "a2"):
        vm = vms[name]
        token = f"{via}-{name}-{vm['host']}"
        # Typing: the shell echoes a computed value (not just the typed characters back).
        hello, got, reached = asyncio.run(
            _console(mh, vm, via, offset=None, typed=f"\necho {token}-$((6*7))\n", marker=f"{token}-42".encode())
        )
        # Replay from an offset: the same bytes again, from the start of what we saw.
        hello2, again, _ = asyncio.run(
            _console(mh, vm, via, offset=hello["offset"], typed="", marker=f"{token}-42".encode())
        )
        assert hello2["offset"] == hello["offset"]
        assert again[: len(got)] == got[: len(again)]
        # Boot output from the very start is there too (offset 0, from the host's log).
        _, start, _ = asyncio.run(_console(mh, vm, via, offset=0, typed="", marker=b"sandbox: init done"))
        assert start.startswith(b"sandbox: ")


def test_the_console_log_download_comes_from_the_vms_host(mh, vms):
    for name in ("a1", "a2"):
        vm = vms[name]
        with mh.client(vm["persona"]) as client:
            response = client.get(f"/api/v1/vms/{vm['id']}/console/log/")
        assert response.status_code == 200, response.text[:300]
        log = (mh.hosts[vm["host"]].runtime_dir / vm["id"] / "serial.log").read_bytes()
        start = int(response.headers["X-Console-Log-Offset"])
        assert b"sandbox: init done" in response.content
        assert response.content == log[start : start + len(response.content)]


# ----- exec and files ------------------------------------------------------------------------


def _blocks(total: int, seed: bytes):
    block = hashlib.sha256(seed).digest() * (MIB // 32)
    for n in range(total // MIB):
        yield n.to_bytes(8, "big") + block[8:]


def test_exec_and_a_64_mib_file_round_trip_to_a_vm_on_each_host(mh, vms):
    for name in ("a1", "a2"):
        vm = vms[name]
        rc, out = _exec(mh, vm, "hostname; cat /proc/sys/kernel/random/boot_id >/dev/null && echo ok")
        assert rc == 0 and out.splitlines()[-1] == "ok", out
        size = 64 * MIB
        expected = hashlib.sha256()
        for piece in _blocks(size, name.encode()):
            expected.update(piece)
        headers = {"Authorization": f"Bearer {mh.tokens['owner']}"}
        with httpx.Client(base_url=mh.url, timeout=600, headers=headers) as client:
            response = client.put(
                f"/api/v1/vms/{vm['id']}/files/",
                params={"path": "/root/big.bin", "mode": "0600"},
                content=_blocks(size, name.encode()),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
            assert response.status_code == 201, response.text
            assert response.json()["sha256"] == expected.hexdigest()
            got, received = hashlib.sha256(), 0
            with client.stream("GET", f"/api/v1/vms/{vm['id']}/files/", params={"path": "/root/big.bin"}) as download:
                assert download.status_code == 200
                for piece in download.iter_bytes():
                    got.update(piece)
                    received += len(piece)
        assert received == size and got.hexdigest() == expected.hexdigest()
        rc, out = _exec(mh, vm, "sha256sum /root/big.bin; rm /root/big.bin", timeout=60)
        assert rc == 0 and out.split()[0] == expected.hexdigest(), out


# ----- networks across hosts -------------------------------------------------------------------


def _ping(mh, vm: dict, ip: str, tries: int = 3) -> bool:
    for _ in range(tries):
        rc, _ = _exec(mh, vm, f"busybox ping -c 1 -W 2 {ip} >/dev/null 2>&1")
        if rc == 0:
            return True
    return False


def test_the_owners_vms_on_two_hosts_reach_each_other_and_the_strangers_does_not(mh, vms):
    a1, a2, s1 = vms["a1"], vms["a2"], vms["s1"]
    assert a1["host"] != a2["host"]
    assert _ping(mh, a1, a2["ip"])
    assert _ping(mh, a2, a1["ip"])
    # 1500-byte packets too: the guests' MTU is the tunnel's (1450), so they fragment them; a
    # guest left at 1500 would send frames the VXLAN port drops.
    rc, out = _exec(mh, a1, f"busybox ping -c 2 -W 3 -s 1472 {a2['ip']}")
    assert rc == 0, out
    # TCP across the tunnel, full-size segments: a2 serves 300 kB over HTTP, a1 fetches it.
    with mh.client("owner") as client:
        response = client.post(
            f"/api/v1/vms/{a2['id']}/exec/",
            json={
                "command": "mkdir -p /tmp/www && head -c 300000 /dev/urandom > /tmp/www/blob"
                " && exec busybox httpd -f -p 8080 -h /tmp/www",
                "wait": False,
            },
        )
    assert response.status_code == 202, response.text
    _, served = _exec(mh, a2, "busybox sleep 1; sha256sum /tmp/www/blob")
    rc, fetched = _exec(mh, a1, f"busybox timeout 15 busybox wget -q -O - http://{a2['ip']}:8080/blob | sha256sum")
    assert fetched.split()[0] == served.split()[0], (fetched, served)
    # The stranger's VM (s1) reaches neither by ping nor by TCP.
    rc, out = _exec(mh, s1, f"busybox timeout 5 busybox wget -q -O - http://{a2['ip']}:8080/blob | wc -c")
    assert out == "0", out
    for vm in (a1, a2):
        assert not _ping(mh, s1, vm["ip"], tries=1)
        assert not _ping(mh, vm, s1["ip"], tries=1)


# ----- cordon ---------------------------------------------------------------------------------


def test_a_cordoned_host_gets_no_new_vm(mh, vms):
    rows = mh.host_rows()
    with mh.client("admin") as admin:
        assert admin.post(f"/api/v1/hosts/{rows['h1']['id']}/cordon/").status_code == 200
        try:
            made = []
            for n in range(2):
                response = admin.post(
                    "/api/v1/vms/", json={"name": f"mh-cordon-{n}", "template": "linux-small", "start": False}
                )
                assert response.status_code == 202, response.text
                made.append(response.json()["id"])
            assert {_host_of(mh, vm_id) for vm_id in made} == {"h2"}
            response = admin.post(
                "/api/v1/vms/", json={"name": "mh-cordon-pin", "template": "linux-small", "host": "h1", "start": False}
            )
            assert response.status_code == 409 and response.json()["error"]["code"] == "no_host", response.text
            for vm_id in made:
                admin.delete(f"/api/v1/vms/{vm_id}/")
        finally:
            assert admin.post(f"/api/v1/hosts/{rows['h1']['id']}/uncordon/").status_code == 200
    assert vms["a1"]["host"] in ("h1", "h2")  # the running VMs stayed where they were
    for vm in vms.values():
        assert mh.wait_vm(vm["id"], {"running"}, timeout=5, persona=vm["persona"])


# ----- a web instance dies mid-console --------------------------------------------------------


def _ws_connects(mh: MultiHostStack, instance: str, vm_id: str) -> int:
    log = mh.log_dir / f"{instance}.log"
    return log.read_text(errors="replace").count(f'"WSCONNECT /ws/vms/{vm_id}/console/') if log.exists() else 0


def test_a_console_whose_web_instance_dies_resumes_through_the_other_without_a_gap(mh, vms):
    """The client reconnects through HAProxy from the offset it reached: the bytes of both
    connections are exactly the serial log's on the VM's host (nothing lost or repeated)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    vm = vms["a2"]
    url = mh.ws_url(f"/ws/vms/{vm['id']}/console/")
    headers = {"Authorization": f"Bearer {mh.tokens['owner']}"}
    marker = b"flood-42-done"
    chunks: list[bytes] = []
    before = {name: _ws_connects(mh, name, vm["id"]) for name in ("web1", "web2")}
    killed: list[str] = []

    async def read(ws, offset: int, until) -> int:
        acked = offset
        deadline = time.monotonic() + 120
        while not until(offset) and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(ws.recv(), 10)
            except (TimeoutError, ConnectionClosed):
                break
            if isinstance(message, bytes):
                chunks.append(message)
                offset += len(message)
                if offset - acked >= 16 << 10:
                    acked = offset
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(json.dumps({"type": "ack", "offset": acked}))
            else:
                assert json.loads(message).get("type") != "gap", message
        return offset

    async def scenario() -> tuple[int, int]:
        ws = await connect(url, additional_headers=headers, open_timeout=30)
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        start = hello["offset"]
        early = bytearray()
        await _keyboard(ws, hello, early)
        chunks.append(bytes(early))
        await ws.send(json.dumps({"type": "input", "data": "\nseq 1 40000; echo flood-$((6*7))-done\n"}))
        reached = await read(ws, start + len(early), lambda o: o >= start + 40_000)
        holder = next(n for n in ("web1", "web2") if _ws_connects(mh, n, vm["id"]) > before[n])
        killed.append(holder)
        mh.kill(holder, sig=signal.SIGKILL)  # its connections die with it
        reached = await read(ws, reached, lambda o: False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 5)
        deadline = time.monotonic() + 30
        while True:  # reconnect through the balancer (to the other instance) from the offset reached
            try:
                async with connect(f"{url}?offset={reached}", additional_headers=headers, open_timeout=10) as ws2:
                    hello = json.loads(await asyncio.wait_for(ws2.recv(), 30))
                    assert hello["type"] == "hello" and hello["offset"] == reached, hello
                    reached = await read(ws2, reached, lambda o: marker in b"".join(chunks[-8:]))
                    return start, reached
            except (OSError, TimeoutError, ConnectionClosed):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

    try:
        start, reached = asyncio.run(scenario())
    finally:
        for name in killed:
            mh.restart(name)
    received = b"".join(chunks)
    assert marker in received and b"\n40000\r\n" in received
    assert reached - start == len(received)
    log = (mh.hosts[vm["host"]].runtime_dir / vm["id"] / "serial.log").read_bytes()
    assert received == log[start : start + len(received)]  # in order, nothing lost or repeated


# ----- a host's hostd dies -----------------------------------------------------------------------


def test_a_host_whose_hostd_dies_shows_its_vms_unknown_until_it_returns(mh, vms):
    down = vms["a2"]["host"]
    on_it = [vm for vm in vms.values() if vm["host"] == down]
    others = [vm for vm in vms.values() if vm["host"] != down]
    pids = vmm_pids(mh.hosts[down].runtime_dir)
    mh.kill("hostd", down, signal.SIGKILL)
    try:
        mh.wait_hosts_up([down], up=False, timeout=60)
        for vm in on_it:
            assert mh.wait_vm(vm["id"], {"unknown"}, timeout=60, persona=vm["persona"])["state"] == "unknown"
        for vm in others:  # the other host's VMs are not touched
            assert mh.wait_vm(vm["id"], {"running"}, timeout=5, persona=vm["persona"])["state"] == "running"
        assert vmm_pids(mh.hosts[down].runtime_dir) == pids  # the VMs themselves keep running
    finally:
        mh.start("hostd", down)
        mh.wait_hostd(down)
    mh.wait_hosts_up([down], timeout=60)
    for vm in on_it:
        assert mh.wait_vm(vm["id"], {"running"}, timeout=90, persona=vm["persona"])["state"] == "running"
    vm = vms["a2"]
    token = f"back-{vm['host']}"
    _, got, _ = asyncio.run(
        _console(mh, vm, None, offset=None, typed=f"\necho {token}-$((6*7))\n", marker=f"{token}-42".encode())
    )
    assert f"{token}-42".encode() in got
    deadline = time.monotonic() + 60
    while True:  # the agent link comes back when hostd re-attaches
        with mh.client("owner") as client:
            response = client.post(f"/api/v1/vms/{vm['id']}/exec/", json={"command": "echo again", "timeout": 10})
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert response.status_code == 200 and response.json()["stdout"].strip() == "again", response.text


# ----- a further host ---------------------------------------------------------------------------


def test_a_host_added_to_the_running_stack_comes_up_and_takes_pinned_vms(mh, vms):
    node = mh.add_host("h3")  # namespace on the underlay, host_join, hostd and worker
    rows = mh.host_rows()
    assert rows["h3"]["up"] is True and rows["h3"]["tunnel_address"] == node.tunnel_address
    with mh.client("admin") as admin:
        response = admin.post(
            "/api/v1/vms/", json={"name": "mh-h3", "template": "linux-small", "host": "h3", "start": False}
        )
        assert response.status_code == 202, response.text
        assert _host_of(mh, response.json()["id"]) == "h3"
        assert admin.delete(f"/api/v1/vms/{response.json()['id']}/").status_code in (202, 204)


# ----- moving running VMs between hosts ---------------------------------------------------------


def _operation_done(mh: MultiHostStack, op_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    with mh.client("admin") as admin:
        while time.monotonic() < deadline:
            body = admin.get(f"/api/v1/operations/{op_id}/").json()
            if body.get("status") in ("succeeded", "failed"):
                return body
            time.sleep(1)
    raise AssertionError(f"operation {op_id} did not finish: {body}")


def _exec_output(mh: MultiHostStack, vm: dict, exec_id: str) -> tuple[bool, str]:
    with mh.client(vm["persona"]) as client:
        response = client.get(f"/api/v1/vms/{vm['id']}/execs/{exec_id}/")
    assert response.status_code == 200, response.text
    body = response.json()
    return bool(body.get("running")), "".join(chunk["data"] for chunk in body["chunks"])


def test_a_running_vm_migrates_live_keeping_its_exec_session_and_drain_moves_the_running_vms(mh, vms):
    vm = vms["a1"]
    source = vm["host"]
    target = "h2" if source == "h1" else "h1"
    with mh.client("owner") as client:
        started = client.post(
            f"/api/v1/vms/{vm['id']}/exec/",
            json={"command": "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.5; done", "wait": False},
        )
    assert started.status_code == 202, started.text
    exec_id = started.json()["exec_id"]
    time.sleep(2)
    _, before = _exec_output(mh, vm, exec_id)
    assert "tick-0" in before

    with mh.client("admin") as admin:
        response = admin.post(f"/api/v1/vms/{vm['id']}/migrate/", json={"host": target})
    assert response.status_code == 202, response.text
    done = _operation_done(mh, response.json()["id"])
    assert done["status"] == "succeeded", (done.get("error"), done.get("log"))
    assert _host_of(mh, vm["id"]) == target
    vm["host"] = target
    assert mh.wait_vm(vm["id"], {"running"}, timeout=30)["state"] == "running"
    # The same exec session, through the new host's hostd: still running, its earlier output
    # kept and new ticks after it (the guest never rebooted).
    deadline = time.monotonic() + 30
    while True:
        running, after = _exec_output(mh, vm, exec_id)
        if running and after.count("tick-") > before.count("tick-") + 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert running and after.startswith(before.strip().splitlines()[0]) and after.count("tick-") > before.count("tick-")
    assert _exec(mh, vm, "cat /proc/uptime")[0] == 0

    # Drain the host a1 is on now: its running VMs migrate live to the other host.
    on_target = [v for v in vms.values() if v["host"] == target]
    hosts = mh.host_rows()
    with mh.client("admin") as admin:
        drained = admin.post(f"/api/v1/hosts/{hosts[target]['id']}/drain/")
    assert drained.status_code == 202, drained.text
    result = drained.json()
    assert sorted(m["name"] for m in result["moves"]) == sorted(v["name"] for v in on_target), result
    assert all(m["mover"] == "migrate" and m["target"] != target for m in result["moves"]), result
    for move in result["moves"]:
        assert _operation_done(mh, move["operation"])["status"] == "succeeded"
    for v in on_target:
        v["host"] = _host_of(mh, v["id"])
        assert v["host"] != target
        assert mh.wait_vm(v["id"], {"running"}, timeout=30, persona=v["persona"])["state"] == "running"
        assert _exec(mh, v, "echo drained")[1] == "drained"
    with mh.client("admin") as admin:
        assert admin.post(f"/api/v1/hosts/{hosts[target]['id']}/uncordon/").status_code == 200
        with mh.client("owner") as client:
            client.post(f"/api/v1/vms/{vm['id']}/execs/{exec_id}/signal/", json={"signal": "KILL"})


def test_a_cold_move_takes_a_vm_and_its_disk_to_the_other_host(mh, vms):
    vm = vms["a2"]
    source = vm["host"]
    target = "h2" if source == "h1" else "h1"
    assert _exec(mh, vm, "echo before-the-move > /root/moved.txt && sync")[0] == 0
    with mh.client("admin") as admin:
        response = admin.post(f"/api/v1/vms/{vm['id']}/move/", json={"host": target})
    assert response.status_code == 202, response.text
    done = _operation_done(mh, response.json()["id"], timeout=600)
    assert done["status"] == "succeeded", (done.get("error"), done.get("log"))
    assert _host_of(mh, vm["id"]) == target
    vm["host"] = target
    assert mh.wait_vm(vm["id"], {"running"}, timeout=240)["state"] == "running"
    deadline = time.monotonic() + 120
    while True:  # the guest boots again there (a cold move restarts it)
        with mh.client("owner") as client:
            response = client.post(
                f"/api/v1/vms/{vm['id']}/exec/", json={"command": "cat /root/moved.txt", "timeout": 10}
            )
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert response.status_code == 200 and response.json()["stdout"].strip() == "before-the-move", response.text
    deadline = time.monotonic() + 60
    while (mh.hosts[source].runtime_dir / vm["id"]).exists() and time.monotonic() < deadline:
        time.sleep(1)  # the move's last step, on the source's worker
    assert not (mh.hosts[source].runtime_dir / vm["id"]).exists()  # the source's files are gone
