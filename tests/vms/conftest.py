"""Fixtures for VM tests: the fake driver (vms/vmm/fake.py: no VMM, no Celery worker, no guest
agent; operations run synchronously through ``operation_execute``), and a stand-in VMM running
the real guest agent code with or without hostd in front of it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from sandbox_site.errors import ApplicationError
from tests.factories import VmFactory
from tests.hostd.runner import FAKE_VMM, Hostd
from tests.waiting import wait_until
from vms import agent_gateway, hypervisor
from vms.models import VM, Operation
from vms.operations import operation_execute
from vms.vmm import fake as fake_vmm
from vms.vmm.base import RuntimeState


class FakeAgent:
    """Answers like the guest agent of a fake VM: only while its fake VMM runs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.fail_wait: str | None = None
        self.exit_code = 0  # of every exec

    def _alive(self, vm) -> bool:
        state = fake_vmm.fake_vm(str(vm.pk))
        return state is not None and state.state == RuntimeState.RUNNING

    def agent_wait(self, vm, *, timeout: float) -> dict:
        self.calls.append((str(vm.pk), "wait", {}))
        if self.fail_wait or not self._alive(vm):
            raise ApplicationError(
                self.fail_wait or "The guest agent did not answer.", code="agent_unavailable", status_code=503
            )
        return {"agent_version": "fake-agent", "boot_id": "b1"}

    def agent_call(self, vm, op, args=None, data=b"", *, timeout: float = 30.0):
        self.calls.append((str(vm.pk), op, dict(args or {})))
        if not self._alive(vm):
            raise ApplicationError("The guest agent did not answer.", code="agent_unavailable", status_code=503)
        if op == "identity_set":
            return {"applied": sorted((args or {}).keys())}, b""
        if op == "exec_start":
            return {"exec_id": f"x{len(self.calls)}", "pid": 100, "tag": (args or {}).get("tag", "")}, b""
        if op == "exec_wait":
            result = {"exit_code": self.exit_code, "signal": None, "timed_out": False}
            return {"exec_id": (args or {}).get("exec_id"), "running": False, "result": result}, b""
        if op == "exec_read":
            return {"next_offset": 10}, b"stderr out"
        return {}, b""

    def agent_ping(self, vm, *, timeout: float = 5.0) -> dict:
        return self.agent_wait(vm, timeout=timeout)

    def ops(self, vm_id=None) -> list[str]:
        return [op for who, op, _ in self.calls if vm_id is None or who == str(vm_id)]


@pytest.fixture
def fake(settings, tmp_path, monkeypatch):
    """The fake driver for every VM, a fake agent, runtime and snapshot dirs in tmp_path."""
    settings.SANDBOX_RUNTIME_DIR = tmp_path / "run"
    settings.SANDBOX_SNAPSHOT_DIR = tmp_path / "snapshots"
    settings.SANDBOX_NETWORKING = False
    settings.SANDBOX_STOP_TIMEOUT = 0.1
    settings.SANDBOX_RUNTIME_DIR.mkdir()
    fake_vmm.fake_reset()
    monkeypatch.setattr(hypervisor, "driver_name_select", lambda: "fake")
    agent = FakeAgent()
    monkeypatch.setattr(agent_gateway, "agent_wait", agent.agent_wait)
    monkeypatch.setattr(agent_gateway, "agent_call", agent.agent_call)
    monkeypatch.setattr(agent_gateway, "agent_ping", agent.agent_ping)
    yield SimpleNamespace(vmm=fake_vmm, agent=agent, runtime=settings.SANDBOX_RUNTIME_DIR)
    fake_vmm.fake_reset()


def run_operations(limit: int = 20) -> list[Operation]:
    """Run every pending operation, oldest first, as a worker would; returns them."""
    done = []
    for _ in range(limit):
        op = Operation.objects.filter(status=Operation.Status.PENDING).order_by("created_at").first()
        if op is None:
            break
        done.append(operation_execute(op.pk))
    return done


def fake_vm_in(state: str, *, owner=None, **fields):
    """A VM row in ``state`` whose fake VMM matches it (running/paused VMMs run; others none)."""
    vm = VmFactory(state=state, driver="fake", **({"owner": owner} if owner else {}), **fields)
    spec = hypervisor.vm_spec(vm)
    driver = hypervisor.driver_for("fake")
    driver.prepare(spec)
    if state in ("running", "paused", "pausing", "resuming", "rebooting", "resizing", "snapshotting", "stopping"):
        result = driver.launch(spec)
        vm.vmm_pid = result.pid
        vm.save(update_fields=["vmm_pid"])
        if state in ("paused", "resuming"):
            driver.pause(spec)
    return vm


@pytest.fixture
def run_ops():
    return run_operations


@pytest.fixture
def vm_runtime(vm, settings):
    """The owner's VM 'running' on a stand-in VMM (tests/hostd/fake_vmm.py: the real guest
    agent code on this host, one agent client at a time like QEMU); no hostd."""
    root = Path(tempfile.mkdtemp(prefix="api-", dir="/tmp"))  # Unix socket paths are short
    settings.SANDBOX_RUNTIME_DIR = root
    settings.SANDBOX_HOSTD_SOCKET = root / "hostd.sock"
    settings.SANDBOX_FILE_UPLOAD_MAX_BYTES = 1 << 20
    rd = root / str(vm.pk)
    rd.mkdir()
    (rd / "spec.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, str(FAKE_VMM), str(rd)], start_new_session=True)
    VM.objects.filter(pk=vm.pk).update(state="running")
    vm.refresh_from_db()
    try:
        wait_until((rd / "agent.sock").exists)
        yield vm, root
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def live_vm(vm_runtime):
    """``vm_runtime`` with a real hostd in front of the VM."""
    vm, root = vm_runtime
    hostd = Hostd(root)
    hostd.start()
    try:
        yield vm, root
    finally:
        hostd.stop()
