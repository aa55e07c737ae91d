"""Real VMs under QEMU through the whole stack: API -> PostgreSQL -> Celery worker -> driver ->
guest agent, and back."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import pytest

from tests.system.stack import vmm_pids
from tests.waiting import wait_until

pytestmark = pytest.mark.vm


def _post(stack, path, persona="owner", **body):
    with stack.client(persona) as client:
        return client.post(path, json=body)


def _runtime(stack, vm_id) -> Path:
    return stack.runtime_dir / vm_id


def test_a_created_vm_runs_only_once_its_agent_answers(stack, running_vm):
    assert running_vm["state"] == "running"
    assert running_vm["driver"] == "qemu"
    assert running_vm["acceleration"] in ("tcg", "kvm")
    with stack.client() as client:
        ops = client.get(f"/api/v1/vms/{running_vm['id']}/operations/").json()["results"]
    create = next(op for op in ops if op["action"] == "create")
    assert create["status"] == "succeeded"
    assert "guest agent answered" in create["log"]
    with stack.client() as client:
        health = client.get(f"/api/v1/vms/{running_vm['id']}/agent/")
    assert health.status_code == 200, health.text
    assert health.json()["agent_version"]


def test_stop_start_pause_resume_reboot(stack, running_vm):
    vm_id = running_vm["id"]
    op = _post(stack, f"/api/v1/vms/{vm_id}/stop/").json()
    assert stack.wait_operation(op["id"])["status"] == "succeeded"
    assert stack.wait_vm(vm_id, {"stopped"})["state"] == "stopped"
    assert vmm_pids(_runtime(stack, vm_id)) == []

    op = _post(stack, f"/api/v1/vms/{vm_id}/start/").json()
    assert stack.wait_operation(op["id"])["status"] == "succeeded"
    assert stack.wait_vm(vm_id, {"running"})["state"] == "running"

    op = _post(stack, f"/api/v1/vms/{vm_id}/pause/").json()
    assert stack.wait_operation(op["id"])["status"] == "succeeded"
    assert stack.wait_vm(vm_id, {"paused"})["state"] == "paused"
    conflict = _post(stack, f"/api/v1/vms/{vm_id}/pause/")
    assert conflict.status_code == 409

    op = _post(stack, f"/api/v1/vms/{vm_id}/resume/").json()
    assert stack.wait_operation(op["id"])["status"] == "succeeded"
    assert stack.wait_vm(vm_id, {"running"})["state"] == "running"

    op = _post(stack, f"/api/v1/vms/{vm_id}/reboot/").json()
    assert stack.wait_operation(op["id"])["status"] == "succeeded"
    with stack.client() as client:
        wait_until(
            lambda: client.get(f"/api/v1/vms/{vm_id}/agent/").status_code == 200,
            timeout=120,
            interval=1,
            message="agent did not come back after reboot",
        )


def test_resize_of_a_running_qemu_vm_says_a_restart_is_needed(stack, running_vm):
    with stack.client() as client:
        response = client.patch(f"/api/v1/vms/{running_vm['id']}/", json={"memory_mib": 256})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "restart_required"


def test_concurrent_requests_cannot_both_win(stack, running_vm):
    vm_id = running_vm["id"]
    stack.wait_vm(vm_id, {"running"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: _post(stack, f"/api/v1/vms/{vm_id}/stop/").status_code, range(4)))
    assert codes.count(202) == 1 and codes.count(409) == 3, codes
    stack.wait_vm(vm_id, {"stopped"})
    op = _post(stack, f"/api/v1/vms/{vm_id}/start/").json()
    stack.wait_operation(op["id"])
    stack.wait_vm(vm_id, {"running"})


def test_four_vms_boot_at_once_and_delete_leaves_nothing(stack):
    ids = []
    for n in range(4):
        response = _post(stack, "/api/v1/vms/", name=f"quad-{n}", template="linux-small")
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for vm_id in ids:
        body = stack.wait_vm(vm_id, {"running", "error"}, timeout=300)
        assert body["state"] == "running", body
    for vm_id in ids:
        assert _post(stack, f"/api/v1/vms/{vm_id}/", persona="owner").status_code in (405,)  # POST is not delete
        with stack.client() as client:
            assert client.delete(f"/api/v1/vms/{vm_id}/").status_code == 202
    for vm_id in ids:
        stack.wait_vm(vm_id, {"gone"})
        assert not _runtime(stack, vm_id).exists()
        assert vmm_pids(_runtime(stack, vm_id)) == []


def test_a_vm_whose_vmm_dies_becomes_error_with_its_last_console_lines(stack):
    vm = _post(stack, "/api/v1/vms/", name="doomed", template="linux-small").json()
    stack.wait_vm(vm["id"], {"running"})
    for pid in vmm_pids(_runtime(stack, vm["id"])):
        os.kill(pid, signal.SIGKILL)
    body = stack.wait_vm(vm["id"], {"error"}, timeout=60)
    assert "exited unexpectedly" in body["last_error"]
    assert "Linux" in body["last_console"] or "sandbox" in body["last_console"], body["last_console"][-500:]
    with stack.client() as client:
        client.delete(f"/api/v1/vms/{vm['id']}/")
    stack.wait_vm(vm["id"], {"gone"})


def test_running_vms_survive_a_restart_of_every_process_of_ours(stack, running_vm):
    vm_id = running_vm["id"]
    stack.wait_vm(vm_id, {"running"})
    pids_before = vmm_pids(_runtime(stack, vm_id))
    for name in ("web", "worker", "beat"):
        stack.kill(name)
    assert vmm_pids(_runtime(stack, vm_id)) == pids_before
    worker_log = stack.log_dir / "worker.log"
    restarted_at = worker_log.stat().st_size

    def reconcile_passes() -> int:
        with worker_log.open("rb") as log:
            log.seek(restarted_at)
            lines = log.read().decode(errors="replace").splitlines()
        return sum(1 for line in lines if "vms_reconcile_task[" in line and " succeeded in " in line)

    for name in ("web", "worker", "beat"):
        stack.start(name)
    stack.wait_web()
    # What the VM looks like after the new worker's reconcile has seen it, not before.
    wait_until(lambda: reconcile_passes() >= 2, timeout=90, interval=0.5, message="two reconcile passes after restart")
    body = stack.wait_vm(vm_id, {"running"})
    assert body["state"] == "running"
    with stack.client() as client:
        assert client.get(f"/api/v1/vms/{vm_id}/agent/").status_code == 200


def test_killing_the_worker_mid_boot_ends_in_a_defined_state(stack):
    vm = _post(stack, "/api/v1/vms/", name="interrupted", template="linux-small").json()
    wait_until(lambda: vmm_pids(_runtime(stack, vm["id"])), timeout=120, interval=0.1, message="VMM never started")
    stack.kill("worker", signal.SIGKILL)
    stack.start("worker")
    body = stack.wait_vm(vm["id"], {"running", "error"}, timeout=400)
    if body["state"] == "error":
        assert vmm_pids(_runtime(stack, vm["id"])) == []
    with stack.client() as client:
        assert client.delete(f"/api/v1/vms/{vm['id']}/").status_code == 202
    stack.wait_vm(vm["id"], {"gone"})
    assert not _runtime(stack, vm["id"]).exists()


def test_a_failed_create_leaves_nothing_behind(stack):
    response = _post(stack, "/api/v1/vms/", name="broken", template="broken")
    assert response.status_code == 202, response.text
    vm = response.json()
    assert stack.wait_operation(vm["operation"])["status"] == "failed"
    body = stack.wait_vm(vm["id"], {"error"})
    assert "create failed" in body["last_error"]
    assert not _runtime(stack, vm["id"]).exists()
    assert vmm_pids(_runtime(stack, vm["id"])) == []
    too_big = _post(stack, "/api/v1/vms/", name="toolarge", template="linux-small", memory_mib=100000)
    assert too_big.status_code == 400
    assert too_big.json()["error"]["details"]["memory_mib"]


def test_strangers_cannot_see_or_touch_the_vm(stack, running_vm):
    with stack.client("stranger") as client:
        assert client.get(f"/api/v1/vms/{running_vm['id']}/").status_code == 404
        assert client.post(f"/api/v1/vms/{running_vm['id']}/stop/").status_code == 404
        assert client.get(f"/api/v1/vms/{running_vm['id']}/agent/").status_code == 404
