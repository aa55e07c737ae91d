"""Snapshot bookkeeping on the fake driver: take, restore, clone and delete, the VM states
around them (``snapshotting`` blocks state changes, not other writes), failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_site.errors import ConflictError
from snapshots import services
from snapshots.lifecycle import snapshot_files_delete
from snapshots.models import Snapshot
from tests.vms.conftest import fake_vm_in
from vms import services as vm_services
from vms.models import VM, Operation, VmState
from vms.vmm.base import RuntimeState, VmmError

pytestmark = pytest.mark.django_db

S = VmState


def _take(vm, owner, run_ops, *, name="s1", include_memory=True) -> Snapshot:
    snapshot, _ = services.snapshot_create(vm=vm, actor=owner, name=name, include_memory=include_memory)
    run_ops()
    snapshot.refresh_from_db()
    return snapshot


@pytest.mark.parametrize("state", [S.RUNNING, S.PAUSED])
def test_it_takes_a_memory_snapshot_and_puts_the_vm_back(fake, owner, run_ops, state):
    vm = fake_vm_in(state, owner=owner)
    snapshot, op = services.snapshot_create(vm=vm, actor=owner, name="s1")
    vm.refresh_from_db()
    assert vm.state == S.SNAPSHOTTING and op.params["previous_state"] == state
    assert snapshot.state == Snapshot.State.CREATING
    run_ops()
    snapshot.refresh_from_db()
    vm.refresh_from_db()
    assert snapshot.state == Snapshot.State.READY, snapshot.error
    assert vm.state == state
    assert fake.vmm.fake_vm(str(vm.pk)).state.value == state
    directory = Path(snapshot.directory)
    assert {"snapshot.json", "manifest.json", "state.bin", "disk.qcow2"} <= {p.name for p in directory.iterdir()}
    assert snapshot.checksum and snapshot.driver == "fake" and snapshot.verified_at


def test_it_takes_a_disk_only_snapshot_of_a_stopped_vm(fake, owner, run_ops):
    vm = fake_vm_in(S.STOPPED, owner=owner)
    with pytest.raises(ConflictError) as err:
        services.snapshot_create(vm=vm, actor=owner, name="mem")
    assert err.value.code == "vm_stopped"
    snapshot = _take(vm, owner, run_ops, include_memory=False)
    vm.refresh_from_db()
    assert snapshot.state == Snapshot.State.READY and vm.state == S.STOPPED
    assert not (Path(snapshot.directory) / "state.bin").exists()


def test_it_refuses_state_changes_but_not_other_writes_during_a_snapshot(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    seen = {}

    def during(vm_id):
        # The VMM holds the VM paused here; no row lock is held by the worker.
        row = VM.objects.get(pk=vm_id)
        seen["state"] = row.state
        for action in ("stop", "delete", "pause", "reboot"):
            with pytest.raises(ConflictError) as err:
                vm_services.vm_action(vm=row, action=action, actor=owner)
            seen[action] = err.value.status_code
        with pytest.raises(ConflictError) as err:
            services.snapshot_create(vm=row, actor=owner, name="second")
        seen["snapshot"] = err.value.code
        seen["renamed"] = vm_services.vm_update(vm=row, actor=owner, name="renamed-meanwhile").name

    fake.vmm.fake_during("snapshot", during)
    snapshot = _take(vm, owner, run_ops)
    assert seen == {
        "state": S.SNAPSHOTTING,
        "stop": 409,
        "delete": 409,
        "pause": 409,
        "reboot": 409,
        "snapshot": "snapshot_in_progress",
        "renamed": "renamed-meanwhile",
    }
    vm.refresh_from_db()
    assert snapshot.state == Snapshot.State.READY and vm.state == S.RUNNING and vm.name == "renamed-meanwhile"
    vm_services.vm_action(vm=vm, action="stop", actor=owner)  # allowed again afterwards


def test_it_marks_a_failed_snapshot_failed_and_the_vm_as_its_vmm_is(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    fake.vmm.fake_fail("snapshot", VmmError("disk full"))
    snapshot = _take(vm, owner, run_ops)
    vm.refresh_from_db()
    op = Operation.objects.get(action="snapshot")
    assert snapshot.state == Snapshot.State.FAILED and "disk full" in snapshot.error
    assert op.status == Operation.Status.FAILED
    assert vm.state == S.RUNNING  # resumed by the driver
    assert not Path(snapshot.directory).exists()


def test_it_marks_the_vm_error_when_its_vmm_dies_during_a_snapshot(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)

    def die(vm_id):
        fake.vmm.fake_vmm_die(vm_id)
        raise VmmError("QMP connection lost")

    fake.vmm.fake_during("snapshot", die)
    snapshot = _take(vm, owner, run_ops)
    vm.refresh_from_db()
    assert snapshot.state == Snapshot.State.FAILED
    assert vm.state == S.ERROR and "snapshot failed" in vm.last_error


@pytest.mark.parametrize("state", [S.RUNNING, S.PAUSED, S.STOPPED, S.ERROR])
def test_it_restores_a_vm_from_its_snapshot(fake, owner, run_ops, state):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    VM.objects.filter(pk=vm.pk).update(state=state)
    if state in (S.STOPPED, S.ERROR):
        fake.vmm.FakeDriver().shutdown(_spec(vm))
    elif state == S.PAUSED:
        fake.vmm.FakeDriver().pause(_spec(vm))
    op = services.snapshot_restore(snapshot=snapshot, actor=owner)
    vm.refresh_from_db()
    assert vm.state == S.STARTING and op.params["previous_state"] == state
    (done,) = run_ops()
    vm.refresh_from_db()
    assert done.status == Operation.Status.SUCCEEDED, done.log
    assert vm.state == S.RUNNING
    runtime = fake.vmm.fake_vm(str(vm.pk))
    assert runtime.state == RuntimeState.RUNNING and runtime.restored_from == snapshot.directory
    identity = [args for who, op_name, args in fake.agent.calls if op_name == "identity_set"]
    assert identity and {"clock_unix", "entropy"} <= set(identity[-1]) and "hostname" not in identity[-1]


@pytest.mark.parametrize("state", [S.STARTING, S.SNAPSHOTTING, S.DELETING, S.CREATING])
def test_it_refuses_to_restore_a_vm_in_a_transitional_state(fake, owner, run_ops, state):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    VM.objects.filter(pk=vm.pk).update(state=state)
    with pytest.raises(ConflictError):
        services.snapshot_restore(snapshot=snapshot, actor=owner)
    vm.refresh_from_db()
    assert vm.state == state


def test_it_puts_the_vm_back_when_the_snapshot_files_are_corrupted(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    (Path(snapshot.directory) / "state.bin").write_text("tampered")
    services.snapshot_restore(snapshot=snapshot, actor=owner)
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "integrity" in op.error
    assert vm.state == S.RUNNING
    assert fake.vmm.fake_calls(str(vm.pk)).count("restore") == 0


def test_it_marks_the_vm_error_when_a_restore_fails(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    fake.vmm.fake_fail("restore")
    services.snapshot_restore(snapshot=snapshot, actor=owner)
    (op,) = run_ops()
    vm.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert vm.state == S.ERROR and "restore failed" in vm.last_error


def test_it_clones_a_snapshot_into_new_vms_with_their_own_identity(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    created = services.snapshot_clone(snapshot=snapshot, actor=owner, count=2, name_prefix="kid")
    assert [c.state for c, _ in created] == [S.CREATING, S.CREATING]
    ops = run_ops()
    assert [op.status for op in ops] == [Operation.Status.SUCCEEDED] * 2, [op.log for op in ops]
    for clone, _ in created:
        clone.refresh_from_db()
        assert clone.state == S.RUNNING and clone.driver == "fake" and clone.owner == owner
        assert fake.vmm.fake_vm(str(clone.pk)).restored_from == snapshot.directory
        identity = [args for who, name, args in fake.agent.calls if who == str(clone.pk) and name == "identity_set"]
        assert identity[0]["hostname"] == clone.name and identity[0]["machine_id"] == clone.pk.hex
    assert fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.RUNNING  # the original runs on


def test_it_marks_a_clone_error_and_cleans_up_when_it_fails(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    fake.vmm.fake_fail("restore")
    ((clone, _),) = services.snapshot_clone(snapshot=snapshot, actor=owner, count=1, name_prefix="bad")
    (op,) = run_ops()
    clone.refresh_from_db()
    assert op.status == Operation.Status.FAILED
    assert clone.state == S.ERROR and "clone failed" in clone.last_error
    assert not (fake.runtime / str(clone.pk)).exists()


def test_it_deletes_a_snapshot_row_and_its_files(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    directory = Path(snapshot.directory)
    deleting = services.snapshot_delete(snapshot=snapshot, actor=owner)
    assert deleting.state == Snapshot.State.DELETING
    snapshot_files_delete(snapshot.pk)
    assert not Snapshot.objects.filter(pk=snapshot.pk).exists()
    assert not directory.exists()
    vm.refresh_from_db()
    assert vm.state == S.RUNNING


def test_it_deletes_a_vm_with_snapshots_and_keeps_them(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot = _take(vm, owner, run_ops)
    vm_services.vm_action(vm=vm, action="delete", actor=owner)
    run_ops()
    snapshot.refresh_from_db()
    assert not VM.objects.filter(pk=vm.pk).exists()
    assert snapshot.state == Snapshot.State.READY and snapshot.vm_id is None


def _spec(vm):
    from vms import hypervisor

    return hypervisor.vm_spec(vm)


def test_it_finishes_a_redelivered_snapshot_and_resumes_the_vm_left_paused(fake, owner, run_ops):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    snapshot, op = services.snapshot_create(vm=vm, actor=owner, name="s1")
    # The first delivery wrote the files, paused the VM and died before resuming it.
    fake.vmm.FakeDriver().snapshot(_spec(vm), Path(snapshot.directory))
    fake.vmm.FakeDriver().pause(_spec(vm))
    run_ops()
    snapshot.refresh_from_db()
    vm.refresh_from_db()
    assert snapshot.state == Snapshot.State.READY
    assert vm.state == S.RUNNING and fake.vmm.fake_vm(str(vm.pk)).state == RuntimeState.RUNNING
    assert fake.vmm.fake_calls(str(vm.pk)).count("snapshot") == 1  # not taken twice


@pytest.mark.parametrize(("state", "reachable"), [(S.RUNNING, True), (S.PAUSED, False)])
def test_it_keeps_the_guest_of_a_running_vm_reachable_during_a_snapshot(fake, owner, run_ops, state, reachable):
    from vms.transitions import vm_guest_running

    vm = fake_vm_in(state, owner=owner)
    seen = []
    fake.vmm.fake_during("snapshot", lambda vm_id: seen.append(vm_guest_running(VM.objects.get(pk=vm_id))))
    _take(vm, owner, run_ops)
    assert seen == [reachable]
    vm.refresh_from_db()
    assert vm_guest_running(vm) is (state == S.RUNNING)
