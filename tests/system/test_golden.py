"""Golden snapshots on real QEMU VMs through the whole stack: ``manage.py golden_build`` boots
a builder once and keeps its memory snapshot; creates through the API restore it with their
own identity and answer exec and the console.

A template of its own (``golden-small``) keeps the other system tests on cold boots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import websocket

from tests.system.stack import ROOT
from tests.system.test_exec_files import _run, _session_cookie
from tests.system.test_snapshots import _agent
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

_TEMPLATE = """
from vms.models import Template
small = Template.objects.get(name="linux-small")
Template.objects.get_or_create(name="golden-small", defaults=dict(
    image=small.image, vcpus=small.vcpus, max_vcpus=small.max_vcpus, memory_mib=small.memory_mib,
    max_memory_mib=small.max_memory_mib, disk_gib=small.disk_gib, max_disk_gib=small.max_disk_gib,
    kernel_cmdline=small.kernel_cmdline))
"""


def _manage(stack, *args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def golden(stack) -> dict:
    _manage(stack, "shell", "-c", _TEMPLATE)
    out = _manage(stack, "golden_build", "golden-small", "--wait")
    row = json.loads(out.strip().splitlines()[-1])
    assert row["status"] == "ready", row
    return row


def _create(stack, name: str) -> dict:
    with stack.client() as client:
        response = client.post("/api/v1/vms/", json={"name": name, "template": "golden-small"})
        assert response.status_code == 202, response.text
        vm = response.json()
        op = stack.wait_operation(vm["operation"], timeout=300)
        assert op["status"] == "succeeded", op
        assert stack.wait_vm(vm["id"], {"running"})["state"] == "running"
        nics = client.get(f"/api/v1/vms/{vm['id']}/nics/").json()
    return {**vm, "op": op, "nics": nics}


def _console_echo(stack, vm_id: str, text: str) -> str:
    url = stack.url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/console/"
    ws = websocket.create_connection(url, timeout=30, cookie=_session_cookie(stack, "owner"), origin=stack.url)
    seen = bytearray()
    try:
        ws.send_binary(f"\necho {text}-$((6*7))\n".encode())

        def echoed() -> bool:
            frame = ws.recv()
            if isinstance(frame, bytes):
                seen.extend(frame)
            return f"{text}-42".encode() in seen

        wait_until(echoed, timeout=60, interval=0, message="console echo")
    finally:
        ws.close()
    return seen.decode("utf-8", "replace")


def test_creates_restore_the_golden_snapshot_with_their_own_identity(stack, golden):
    vms = [_create(stack, "gold-a"), _create(stack, "gold-b")]
    try:
        builder = golden  # the builder VM is gone; its identity lives on in the snapshot's memory
        identities = []
        for vm in vms:
            op = vm["op"]
            assert op["action"] == "clone", op  # restored, not booted
            assert "golden snapshot not used" not in op["log"], op["log"]
            identity, _ = _agent(stack, vm["id"], "identity_get")
            identities.append(identity)
            assert identity["hostname"] == vm["name"]
            assert identity["machine_id"] == vm["id"].replace("-", "")
            out = _run(stack, vm["id"], "hostname; ip -4 -o addr show dev eth0; cat /sys/class/net/eth0/address")
            assert out["exit_code"] == 0, out
            (nic,) = vm["nics"]
            assert vm["name"] in out["stdout"] and f"{nic['ip']}/" in out["stdout"], out
            assert nic["mac"].lower() in out["stdout"].lower(), out
            assert "golden-" not in out["stdout"]  # nothing of the builder's hostname is left
            assert _console_echo(stack, vm["id"], vm["name"])
        assert builder["status"] == "ready"
        assert len({i["hostname"] for i in identities}) == 2
        assert len({i["machine_id"] for i in identities}) == 2
        assert len({tuple(sorted(i["macs"].values())) for i in identities}) == 2
        assert len({vm["nics"][0]["ip"] for vm in vms}) == 2
    finally:
        with stack.client() as client:
            for vm in vms:
                client.delete(f"/api/v1/vms/{vm['id']}/")
        for vm in vms:
            stack.wait_vm(vm["id"], {"gone"})


_POOL = """
from vms.models import Template, VM
Template.objects.filter(name="golden-small").update(pool_size=1)
paused = VM.objects.filter(purpose="pool", state="paused").values_list("pk", flat=True)
print("POOL=" + ",".join(str(pk) for pk in paused))
"""


def test_a_create_takes_the_paused_pool_vm_nobody_saw_before(stack, golden):
    def pooled() -> list[str]:
        out = _manage(stack, "shell", "-c", _POOL)
        return [pk for pk in out.split("POOL=", 1)[1].strip().split(",") if pk]

    (pool_vm,) = wait_until(pooled, timeout=300, interval=2, message="a paused pool VM")
    for persona in ("owner", "stranger", "admin"):
        with stack.client(persona) as client:
            assert client.get(f"/api/v1/vms/{pool_vm}/").status_code == 404
            assert pool_vm not in client.get("/api/v1/vms/").text
    vm = _create(stack, "gold-pooled")
    try:
        assert vm["id"] == pool_vm and vm["op"]["action"] == "pool_take", vm["op"]
        out = _run(stack, vm["id"], "hostname; cat /etc/machine-id")
        assert out["exit_code"] == 0 and out["stdout"].split() == ["gold-pooled", vm["id"].replace("-", "")], out
        with stack.client("stranger") as client:
            assert client.get(f"/api/v1/vms/{vm['id']}/").status_code == 404
    finally:
        _manage(
            stack,
            "shell",
            "-c",
            'from vms.models import Template; Template.objects.filter(name="golden-small").update(pool_size=0)',
        )
        with stack.client() as client:
            client.delete(f"/api/v1/vms/{vm['id']}/")
        stack.wait_vm(vm["id"], {"gone"})
