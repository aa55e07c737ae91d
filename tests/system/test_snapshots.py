"""Snapshots on real VMs through the whole stack: API -> Celery worker -> QEMU (migrate to a
file + frozen qcow2 layer) -> guest agent (through hostd), and back.

In-guest state is read with the agent's exec ops through the stack's host daemon."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.system.stack import ROOT, vmm_pids
from vms.hostd.client import HostdClient

pytestmark = pytest.mark.vm


def _agent(stack, vm_id: str, op: str, args: dict | None = None, timeout: float = 30.0) -> tuple[dict, bytes]:
    with HostdClient(stack.runtime_dir / "hostd.sock", timeout=timeout + 10) as client:
        return client.agent(vm_id, op, args or {}, timeout=timeout)


def guest_sh(stack, vm_id: str, command: str, timeout: float = 60.0) -> tuple[int | None, str]:
    started, _ = _agent(stack, vm_id, "exec_start", {"shell": command})
    deadline = time.monotonic() + timeout
    summary = started
    while time.monotonic() < deadline:
        summary, _ = _agent(stack, vm_id, "exec_wait", {"exec_id": started["exec_id"], "timeout": 10}, timeout=20)
        if summary.get("result"):
            break
    _, data = _agent(stack, vm_id, "exec_read", {"exec_id": started["exec_id"], "offset": 0})
    return summary["result"]["exit_code"], data.decode("utf-8", "replace")


def _ok(stack, vm_id: str, command: str) -> str:
    code, out = guest_sh(stack, vm_id, command)
    assert code == 0, (command, out)
    return out.strip()


def _post(stack, path, persona="owner", **body):
    with stack.client(persona) as client:
        return client.post(path, json=body)


def _get(stack, path, persona="owner"):
    with stack.client(persona) as client:
        return client.get(path)


def _snapshot(stack, vm_id: str, name: str, *, include_memory: bool = True) -> dict:
    response = _post(stack, f"/api/v1/vms/{vm_id}/snapshots/", name=name, include_memory=include_memory)
    assert response.status_code == 202, response.text
    op = stack.wait_operation(response.json()["operation"])
    assert op["status"] == "succeeded", op
    body = _get(stack, f"/api/v1/snapshots/{response.json()['id']}/").json()
    assert body["state"] == "ready", body
    return body


def _wait_agent(stack, vm_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _get(stack, f"/api/v1/vms/{vm_id}/agent/").status_code == 200:
            return
        time.sleep(1)
    raise AssertionError("agent did not answer")


@pytest.fixture(scope="module")
def source(stack) -> dict:
    response = _post(stack, "/api/v1/vms/", name="snapsrc", template="linux-small")
    assert response.status_code == 202, response.text
    vm = stack.wait_vm(response.json()["id"], {"running"}, timeout=300)
    _wait_agent(stack, vm["id"])
    return vm


@pytest.fixture(scope="module")
def first(stack, source) -> dict:
    """Snapshot 's1' taken with a file written and a process running."""
    vm_id = source["id"]
    _ok(stack, vm_id, "echo before > /root/marker && sync")
    sleeper, _ = _agent(stack, vm_id, "exec_start", {"argv": ["sleep", "100000"], "tag": "snapmark"})
    snap = _snapshot(stack, vm_id, "s1")
    snap["sleeper"] = sleeper
    return snap


def test_a_snapshot_records_pause_time_size_and_checksum(stack, source, first):
    assert first["include_memory"] is True
    assert first["pause_ms"] is not None and first["pause_ms"] < 20000
    assert first["size_bytes"] > 0
    assert len(first["checksum"]) == 64
    assert {"state.bin", "disk.qcow2", "snapshot.json"} <= set(first["files"])
    assert first["parent"] is None and first["children"] == []
    listed = _get(stack, f"/api/v1/snapshots/?vm={source['id']}").json()["results"]
    assert [s["id"] for s in listed] == [first["id"]]
    assert _get(stack, f"/api/v1/vms/{source['id']}/").json()["state"] == "running"


def test_restore_brings_back_the_file_and_the_running_process(stack, source, first):
    vm_id = source["id"]
    pid = first["sleeper"]["pid"]
    _ok(stack, vm_id, "echo after > /root/marker && sync")
    _ok(stack, vm_id, f"kill -9 {pid}")
    assert _ok(stack, vm_id, "cat /root/marker") == "after"
    assert guest_sh(stack, vm_id, f"kill -0 {pid}")[0] != 0

    op = _post(stack, f"/api/v1/snapshots/{first['id']}/restore/")
    assert op.status_code == 202, op.text
    done = stack.wait_operation(op.json()["id"])
    assert done["status"] == "succeeded", (done.get("error"), done.get("log"))
    assert stack.wait_vm(vm_id, {"running"})["state"] == "running"
    assert _ok(stack, vm_id, "cat /root/marker") == "before"
    assert guest_sh(stack, vm_id, f"kill -0 {pid}")[0] == 0
    # The agent's own in-memory table of processes is the snapshot's too.
    exec_state, _ = _agent(stack, vm_id, "exec_get", {"exec_id": first["sleeper"]["exec_id"]})
    assert exec_state["running"] is True


def test_three_clones_run_with_their_own_identity(stack, source, first):
    response = _post(stack, f"/api/v1/snapshots/{first['id']}/clone/", count=3, name_prefix="twin")
    assert response.status_code == 202, response.text
    clones = response.json()["vms"]
    assert [c["name"] for c in clones] == ["twin-1", "twin-2", "twin-3"]
    try:
        identities = []
        for clone in clones:
            op = stack.wait_operation(clone["operation"], timeout=300)
            assert op["status"] == "succeeded", op
            assert stack.wait_vm(clone["id"], {"running"})["state"] == "running"
            identity, _ = _agent(stack, clone["id"], "identity_get")
            identities.append(identity)
            assert identity["hostname"] == clone["name"]
            assert identity["machine_id"] == clone["id"].replace("-", "")
            assert _ok(stack, clone["id"], "cat /root/marker") == "before"
            assert _ok(stack, clone["id"], "hostname") == clone["name"]
        source_identity, _ = _agent(stack, source["id"], "identity_get")
        everyone = [*identities, source_identity]
        assert len({i["hostname"] for i in everyone}) == 4
        assert len({i["machine_id"] for i in everyone}) == 4
        macs = [tuple(sorted(i["macs"].values())) for i in everyone]
        if any(macs):
            assert len(set(macs)) == 4, macs
        snap = _get(stack, f"/api/v1/snapshots/{first['id']}/").json()
        assert snap["state"] == "ready"
    finally:
        with stack.client() as client:
            for clone in clones:
                client.delete(f"/api/v1/vms/{clone['id']}/")
        for clone in clones:
            stack.wait_vm(clone["id"], {"gone"})


def test_a_corrupted_snapshot_file_refuses_the_restore_and_leaves_the_vm_alone(stack, source, first):
    vm_id = source["id"]
    _ok(stack, vm_id, "echo untouched > /root/marker && sync")
    pids = vmm_pids(stack.runtime_dir / vm_id)
    state_file = first["disk_layer"].rsplit("/", 1)[0] + "/state.bin"
    with open(state_file, "r+b") as fh:
        fh.seek(4096)
        original = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([original[0] ^ 0xFF]))
    try:
        op = _post(stack, f"/api/v1/snapshots/{first['id']}/restore/")
        assert op.status_code == 202, op.text
        done = stack.wait_operation(op.json()["id"])
        assert done["status"] == "failed"
        assert "state.bin" in done["error"] and "corrupted" in done["error"], done["error"]
        assert stack.wait_vm(vm_id, {"running"})["state"] == "running"
        assert vmm_pids(stack.runtime_dir / vm_id) == pids
        assert _ok(stack, vm_id, "cat /root/marker") == "untouched"
        verify = subprocess.run(
            [sys.executable, "manage.py", "snapshot_verify"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode != 0 and "state.bin" in verify.stdout + verify.stderr
    finally:
        with open(state_file, "r+b") as fh:
            fh.seek(4096)
            fh.write(original)


def test_permissions_and_audit(stack, source, first):
    vm_id = source["id"]
    assert _get(stack, f"/api/v1/snapshots/{first['id']}/", "stranger").status_code == 404
    assert _post(stack, f"/api/v1/vms/{vm_id}/snapshots/", "stranger", name="x").status_code == 404
    assert _post(stack, f"/api/v1/snapshots/{first['id']}/restore/", "stranger").status_code == 404
    assert _get(stack, "/api/v1/snapshots/", "stranger").json()["results"] == []
    granted = _post(stack, f"/api/v1/vms/{vm_id}/permissions/", user="grantee", permissions=["view_vm"])
    assert granted.status_code == 200, granted.text
    assert _get(stack, f"/api/v1/snapshots/{first['id']}/", "grantee").status_code == 200
    assert _post(stack, f"/api/v1/snapshots/{first['id']}/restore/", "grantee").status_code == 403
    assert _post(stack, f"/api/v1/vms/{vm_id}/snapshots/", "grantee", name="x").status_code == 403
    with stack.client("grantee") as client:
        assert client.delete(f"/api/v1/snapshots/{first['id']}/").status_code == 403
    with stack.client("admin") as client:
        events = client.get("/api/v1/audit-events/", params={"limit": 500}).json()["results"]
    seen = {(e["action"], e["result"]) for e in events}
    for expected in [
        ("snapshot.create", "ok"),
        ("snapshot.created", "ok"),
        ("snapshot.restore", "ok"),
        ("snapshot.restored", "ok"),
        ("snapshot.clone", "ok"),
        ("snapshot.restore", "denied"),
        ("vm.restore", "failed"),
    ]:
        assert expected in seen, (expected, sorted(seen))


def test_retention_keeps_the_newest_and_merges_layers(stack, source, first):
    vm_id = source["id"]
    names = ["r2", "r3", "r4"]
    made = [_snapshot(stack, vm_id, name, include_memory=False) for name in names]
    assert made[0]["parent"] == first["id"] and made[1]["parent"] == made[0]["id"]
    _ok(stack, vm_id, "echo latest > /root/marker && sync")
    with stack.client() as client:
        # A running VM reads every layer of its chain: nothing can be merged yet.
        assert client.delete(f"/api/v1/snapshots/{first['id']}/").status_code == 409
        put = client.put(f"/api/v1/vms/{vm_id}/snapshot-retention/", json={"keep_last": 2})
        assert put.status_code == 200, put.text
        op = client.post(f"/api/v1/vms/{vm_id}/stop/").json()
    stack.wait_operation(op["id"])
    stack.wait_vm(vm_id, {"stopped"})

    def apply() -> None:
        code = "from snapshots.services import retention_apply; print(retention_apply())"
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=ROOT,
            env=stack.env,
            check=True,
            timeout=120,
            capture_output=True,
        )

    deadline = time.monotonic() + 120
    remaining = []
    while time.monotonic() < deadline:
        apply()
        time.sleep(2)
        remaining = [s["name"] for s in _get(stack, f"/api/v1/snapshots/?vm={vm_id}").json()["results"]]
        if sorted(remaining) == ["r3", "r4"]:
            break
    assert sorted(remaining) == ["r3", "r4"]
    r3 = next(s for s in _get(stack, f"/api/v1/snapshots/?vm={vm_id}").json()["results"] if s["name"] == "r3")
    assert r3["parent"] is None
    with stack.client("admin") as client:
        events = client.get("/api/v1/audit-events/", params={"limit": 500}).json()["results"]
    deleted = [e for e in events if e["action"] == "snapshot.delete" and (e.get("after") or {}).get("reason")]
    assert len(deleted) >= 2
    # The merged chain still holds the VM's disk.
    op = _post(stack, f"/api/v1/vms/{vm_id}/start/").json()
    assert stack.wait_operation(op["id"])["status"] == "succeeded"
    _wait_agent(stack, vm_id)
    assert _ok(stack, vm_id, "cat /root/marker") == "latest"
