"""Operation claiming, redelivery after a dead worker, and the reconciler, on the fake driver."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from tests.vms.conftest import fake_vm_in
from vms import operations, services
from vms.models import Host, Operation, VmState
from vms.operations import (
    MAX_ATTEMPTS,
    operation_claim,
    operation_execute,
    operation_new,
    operation_worker_id,
    vms_reconcile,
)
from vms.vmm.base import RuntimeState

pytestmark = pytest.mark.django_db

S = VmState


def _dead_worker() -> str:
    host = operation_worker_id().rpartition(":")[0]
    return f"{host}:{2**22 + 12345}"  # above pid_max: never a live process


def _running_op(vm, action: str, *, attempts: int, worker: str | None = None, **params) -> Operation:
    op = operation_new(vm=vm, action=action, actor=None, params=params)
    Operation.objects.filter(pk=op.pk).update(
        status=Operation.Status.RUNNING,
        worker=worker or _dead_worker(),
        attempts=attempts,
        started_at=timezone.now(),
    )
    op.refresh_from_db()
    return op


def _host(vm) -> Host:
    return vm.host


# --- claiming ----------------------------------------------------------------------------------


def test_it_claims_a_pending_operation_exactly_once(fake, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    op = operation_new(vm=vm, action="pause", actor=owner)
    stale = Operation.objects.get(pk=op.pk)  # a second worker got the same message
    assert operation_claim(op)
    assert not operation_claim(stale)
    op.refresh_from_db()
    assert op.status == Operation.Status.RUNNING and op.attempts == 1 and op.worker == operation_worker_id()


def test_it_does_not_take_an_operation_from_a_live_worker(fake, owner, monkeypatch):
    vm = fake_vm_in(S.PAUSING, owner=owner)
    op = _running_op(vm, "pause", attempts=1, worker="local-other:1")
    monkeypatch.setattr(operations, "operation_worker_alive", lambda worker: True)
    assert not operation_claim(op)
    assert operation_execute(op.pk).status == Operation.Status.RUNNING  # untouched
    vm.refresh_from_db()
    assert vm.state == S.PAUSING


def test_it_takes_over_an_operation_whose_worker_died(fake, owner):
    vm = fake_vm_in(S.PAUSING, owner=owner)
    op = _running_op(vm, "pause", attempts=1, previous_state=S.RUNNING)
    done = operation_execute(op.pk)
    vm.refresh_from_db()
    assert done.status == Operation.Status.SUCCEEDED and done.attempts == 2
    assert vm.state == S.PAUSED
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.PAUSED


def test_it_does_not_run_a_finished_operation_again(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    op = services.vm_action(vm=vm, action="reboot", actor=owner)
    run_ops()
    assert operation_execute(op.pk).status == Operation.Status.SUCCEEDED
    assert fake.vmm.fake_calls(str(vm.pk)).count("reboot") == 1


# --- redelivery after a dead worker ------------------------------------------------------------


def test_it_requeues_the_operation_of_a_dead_worker(fake, owner, django_capture_on_commit_callbacks, run_ops):
    vm = fake_vm_in(S.STARTING, owner=owner)
    op = _running_op(vm, "start", attempts=1)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        counts = vms_reconcile(_host(vm))
    assert counts["stuck"] == 1
    assert len(callbacks) == 1  # the task is sent again once the reconcile commits
    op.refresh_from_db()
    assert op.status == Operation.Status.PENDING and "was lost; retrying (attempt 2)" in op.log
    (done,) = run_ops()
    vm.refresh_from_db()
    assert done.status == Operation.Status.SUCCEEDED and done.attempts == 2
    assert vm.state == S.RUNNING


def test_it_gives_up_after_max_attempts_and_marks_the_vm_error(fake, owner):
    vm = fake_vm_in(S.STARTING, owner=owner)
    fake.vmm.FakeDriver().launch(fake_spec(vm))
    op = _running_op(vm, "start", attempts=MAX_ATTEMPTS)
    vms_reconcile(_host(vm))
    op.refresh_from_db()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "worker" in op.error
    assert vm.state == S.ERROR and "Operation lost while starting" in vm.last_error
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.GONE  # the VMM was stopped


def test_it_settles_a_lost_in_place_action_to_what_the_vmm_reports(fake, owner):
    vm = fake_vm_in(S.SNAPSHOTTING, owner=owner)
    op = _running_op(vm, "snapshot", attempts=MAX_ATTEMPTS, previous_state=S.RUNNING)
    vms_reconcile(_host(vm))
    op.refresh_from_db()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert vm.state == S.RUNNING  # the VMM still runs: nothing to stop
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.RUNNING


def test_an_operation_failing_outside_its_handler_settles_its_vm_at_once_with_its_error(fake, owner, monkeypatch):
    """A failure before the handler or past its own error handling (an image check, a database
    error) left the VM creating until the reconciler called the operation lost."""

    def boom(op, vm):
        raise RuntimeError("duplicate key value violates unique constraint")

    monkeypatch.setitem(operations._HANDLERS, "create", boom)
    vm = fake_vm_in(S.CREATING, owner=owner)
    op = operation_new(vm=vm, action="create", actor=None, params={})
    done = operation_execute(op.pk)
    vm.refresh_from_db()
    assert done.status == Operation.Status.FAILED and "duplicate key" in done.error
    assert vm.state == S.ERROR
    assert vm.last_error.startswith("Create failed: duplicate key value violates unique constraint")


def test_an_in_place_operation_failing_outside_its_handler_settles_to_what_the_vmm_reports(fake, owner, monkeypatch):
    def boom(op, vm):
        raise RuntimeError("unexpected")

    monkeypatch.setitem(operations._HANDLERS, "snapshot", boom)
    vm = fake_vm_in(S.SNAPSHOTTING, owner=owner)
    op = operation_new(vm=vm, action="snapshot", actor=None, params={"previous_state": S.RUNNING})
    assert operation_execute(op.pk).status == Operation.Status.FAILED
    vm.refresh_from_db()
    assert vm.state == S.RUNNING  # the VMM still runs


def test_a_step_failing_on_another_host_leaves_the_vm_to_its_hosts_reconciler_which_names_it(
    fake, owner, monkeypatch, settings
):
    """Settling asks the local VMM: a step that failed on a migration's target or the control
    plane must not judge the VM by a VMM that is not there."""

    def boom(op, vm):
        raise RuntimeError("copy failed")

    monkeypatch.setitem(operations._HANDLERS, "create", boom)
    vm = fake_vm_in(S.CREATING, owner=owner)
    op = operation_new(vm=vm, action="create", actor=None, params={})
    settings.SANDBOX_HOST_NAME = "control-plane"
    assert operation_execute(op.pk).status == Operation.Status.FAILED
    vm.refresh_from_db()
    assert vm.state == S.CREATING  # not settled here
    settings.SANDBOX_HOST_NAME = vm.host.name
    vms_reconcile(_host(vm))
    vm.refresh_from_db()
    assert vm.state == S.ERROR and vm.last_error.startswith("Create failed: copy failed")


def test_a_failure_while_settling_after_a_failed_operation_is_logged_not_raised(fake, owner, monkeypatch):
    def boom(op, vm):
        raise RuntimeError("first")

    def settle_boom(vm, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setitem(operations._HANDLERS, "create", boom)
    monkeypatch.setattr(operations, "_vm_give_up", settle_boom)
    vm = fake_vm_in(S.CREATING, owner=owner)
    op = operation_new(vm=vm, action="create", actor=None, params={})
    assert operation_execute(op.pk).status == Operation.Status.FAILED  # no exception escapes


def test_it_marks_a_transitional_vm_without_operation_error(fake, owner):
    vm = fake_vm_in(S.STOPPING, owner=owner)
    assert vms_reconcile(_host(vm))["stuck"] == 1
    vm.refresh_from_db()
    assert vm.state == S.ERROR


def test_it_leaves_a_young_pending_operation_and_a_live_worker_alone(fake, owner, monkeypatch):
    queued = fake_vm_in(S.STARTING, owner=owner)
    operation_new(vm=queued, action="start", actor=owner)
    busy = fake_vm_in(S.PAUSING, owner=owner)
    _running_op(busy, "pause", attempts=1, worker="elsewhere:1")  # another host's worker: alive
    assert vms_reconcile(_host(queued))["stuck"] == 0
    queued.refresh_from_db()
    busy.refresh_from_db()
    assert (queued.state, busy.state) == (S.STARTING, S.PAUSING)


def test_it_gives_up_on_a_pending_operation_nobody_ran_for_an_hour(fake, owner):
    vm = fake_vm_in(S.STARTING, owner=owner)
    op = operation_new(vm=vm, action="start", actor=owner)
    Operation.objects.filter(pk=op.pk).update(created_at=timezone.now() - timedelta(hours=2))
    vms_reconcile(_host(vm))
    op.refresh_from_db()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED and vm.state == S.ERROR


# --- reconcile: VMMs that died, guests that powered off, orphans -------------------------------


@pytest.mark.parametrize("state", [S.RUNNING, S.PAUSED])
def test_it_marks_a_vm_whose_vmm_died_error_with_its_last_console(fake, owner, state):
    vm = fake_vm_in(state, owner=owner)
    fake.vmm.fake_console_write(str(vm.pk), "kernel panic - not syncing: fake\n")
    fake.vmm.fake_vmm_die(str(vm.pk), reason="killed by signal 9")
    assert vms_reconcile(_host(vm))["died"] == 1
    vm.refresh_from_db()
    assert vm.state == S.ERROR
    assert "exited unexpectedly" in vm.last_error and "killed by signal 9" in vm.last_error
    assert "kernel panic" in vm.last_console and "Linux version" in vm.last_console


def test_it_records_a_guest_that_powered_off_as_stopped(fake, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    fake.vmm.fake_guest_power_off(str(vm.pk), reason="guest powered off (ACPI)")
    assert vms_reconcile(_host(vm))["powered_off"] == 1
    vm.refresh_from_db()
    assert vm.state == S.STOPPED and vm.vmm_pid is None
    assert vm.last_error == "guest powered off (ACPI)"
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.GONE  # the VMM was shut down
    assert "shutdown" in fake.vmm.fake_calls(str(vm.pk))


def test_it_leaves_healthy_vms_alone(fake, owner):
    running = fake_vm_in(S.RUNNING, owner=owner)
    stopped = fake_vm_in(S.STOPPED, owner=owner)
    assert vms_reconcile(_host(running)) == {"died": 0, "powered_off": 0, "stuck": 0, "orphans": 0}
    running.refresh_from_db()
    stopped.refresh_from_db()
    assert (running.state, stopped.state) == (S.RUNNING, S.STOPPED)


def test_it_removes_runtime_dirs_of_vms_that_no_longer_exist(fake, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    orphan = fake.runtime / str(uuid.uuid4())
    orphan.mkdir()
    (orphan / "serial.log").write_text("old")
    assert vms_reconcile(_host(vm))["orphans"] == 1
    assert not orphan.exists()
    assert (fake.runtime / str(vm.pk)).exists()


def fake_spec(vm):
    from vms import hypervisor

    return hypervisor.vm_spec(vm)
