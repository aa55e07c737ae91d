"""Golden snapshots on the fake driver: building one (the builder VM is nobody's and goes
away), creates that restore it with their own identity, cold boot when the template opts out,
the size differs or the snapshot is bad (with the reason in the create's log), and the beat
job that builds missing and stale ones and deletes replaced ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import AuditEvent
from accounts.services import user_has_perm
from sandbox_site.errors import NotPermitted
from snapshots.golden import golden_build, golden_maintain
from snapshots.lifecycle import snapshot_files_delete
from snapshots.models import GoldenSnapshot, Snapshot, VmLineage
from tests.factories import HostFactory, TemplateFactory
from vms import selectors
from vms import services as vm_services
from vms.models import VM, Host, Operation, Template, VmPurpose, VmState
from vms.vmm.base import VmmError

pytestmark = pytest.mark.django_db

S = VmState


@pytest.fixture
def template(db):
    return TemplateFactory(name="golden-tpl")


def _build(template, run_ops) -> GoldenSnapshot:
    golden = golden_build(template=template, actor=None)
    run_ops()
    golden.refresh_from_db()
    return golden


def _create(owner, template, run_ops, name="sandbox", **sizes):
    vm, op = vm_services.vm_create(owner=owner, name=name, template=template, actor=owner, **sizes)
    run_ops()
    vm.refresh_from_db()
    op.refresh_from_db()
    return vm, op


def test_it_builds_a_golden_snapshot_and_removes_the_builder_vm(fake, template, run_ops):
    golden = _build(template, run_ops)
    assert golden.status == GoldenSnapshot.Status.READY, golden.error
    snapshot = golden.snapshot
    assert snapshot.state == Snapshot.State.READY and snapshot.include_memory
    assert snapshot.checksum and (Path(snapshot.directory) / "state.bin").exists()
    assert golden.image_version.startswith("test-image@") and golden.inputs and golden.built_at
    assert not VM.objects.filter(purpose=VmPurpose.GOLDEN).exists()  # the builder is gone
    assert snapshot.owner.username == vm_services.SYSTEM_USERNAME and not snapshot.owner.is_active
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"golden.build", "golden.built"} <= actions


def test_it_never_shows_the_builder_vm_to_anyone(fake, template, owner, operator, api):
    golden_build(template=template, actor=None)  # not run: the builder waits in "creating"
    builder = VM.objects.get(purpose=VmPurpose.GOLDEN)
    for user in (owner, operator):
        assert not selectors.vm_list_visible(user).filter(pk=builder.pk).exists()
        assert not user_has_perm(user, "vms.view_vm", builder)
        client = api.as_user(user)
        assert client.get(f"/api/v1/vms/{builder.pk}/").status_code == 404
        assert str(builder.pk) not in client.get("/api/v1/vms/").content.decode()


def test_only_operators_may_ask_for_a_build(fake, template, owner, operator, run_ops):
    with pytest.raises(NotPermitted):
        golden_build(template=template, actor=owner)
    golden = golden_build(template=template, actor=operator)
    assert golden.status == GoldenSnapshot.Status.BUILDING
    assert golden_build(template=template, actor=operator).operation == golden.operation  # one build at a time


def test_a_create_restores_the_golden_snapshot_with_its_own_identity(fake, template, owner, run_ops):
    golden = _build(template, run_ops)
    builder_build = Operation.objects.get(action="golden_build")
    vm, op = _create(owner, template, run_ops)
    assert op.action == "clone" and op.params["golden"] == str(golden.pk)
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert vm.state == S.RUNNING and vm.driver == "fake"
    runtime = fake.vmm.fake_vm(str(vm.pk))
    assert runtime.restored_from == golden.snapshot.directory  # restored, not booted
    assert "launch" not in fake.vmm.fake_calls(str(vm.pk))
    (identity,) = [args for who, name, args in fake.agent.calls if name == "identity_set" and who == str(vm.pk)]
    assert identity["hostname"] == "sandbox" and identity["machine_id"] == vm.pk.hex
    assert identity["machine_id"] != builder_build.vm_ref.hex  # not the golden source's
    assert {"clock_unix", "entropy"} <= set(identity)
    # Exec and console reach it like any VM: its agent answers (fake) and its row is the owner's.
    assert vm_services.vm_agent_ping(vm=vm)["agent_version"] == "fake-agent"
    assert user_has_perm(owner, "vms.console_vm", vm) and user_has_perm(owner, "vms.exec_vm", vm)


def test_placement_prefers_the_host_holding_the_golden_snapshot_among_equally_roomy_ones(
    fake, template, owner, run_ops, settings
):
    golden = _build(template, run_ops)
    now = timezone.now()
    room = {"cpus": 4, "memory_mib": 8192, "last_seen_at": now, "hostd_seen_at": now}
    Host.objects.filter(pk=golden.host_id).update(**room)
    HostFactory(name="a-other", **room)  # as roomy, sorts first by name, has no golden snapshot
    vm, op = _create(owner, template, run_ops)
    assert vm.host_id == golden.host_id and op.action == "clone"
    VM.objects.filter(pk=vm.pk).update(state=S.STOPPED)  # holds no room: equally roomy again
    # A stale golden snapshot (the template changed since) does not count.
    Template.objects.filter(pk=template.pk).update(kernel_cmdline="quiet")
    template.refresh_from_db()
    assert vm_services.vm_create(owner=owner, name="second", template=template, actor=owner)[0].host.name == "a-other"


@pytest.mark.parametrize("change", ["opt_out", "other_size", "stopped"])
def test_it_cold_boots_when_the_golden_snapshot_does_not_fit(fake, template, owner, run_ops, change):
    _build(template, run_ops)
    sizes = {}
    if change == "opt_out":
        template.golden_snapshot = False
        template.save()
    elif change == "other_size":
        sizes = {"memory_mib": 256}
    if change == "stopped":
        vm, op = vm_services.vm_create(owner=owner, name="cold", template=template, actor=owner, start=False)
        run_ops()
        op.refresh_from_db()
    else:
        vm, op = _create(owner, template, run_ops, name="cold", **sizes)
        assert "launch" in fake.vmm.fake_calls(str(vm.pk))
    assert op.action == "create" and op.status == Operation.Status.SUCCEEDED, op.log


def _corrupt(golden):
    (Path(golden.snapshot.directory) / "state.bin").write_text("tampered")


def _missing(golden):
    import shutil

    shutil.rmtree(golden.snapshot.directory)


def _unrestorable(golden):
    from vms.vmm import fake as fake_vmm

    fake_vmm.fake_fail("restore", VmmError("incompatible VMM version"))


@pytest.mark.parametrize(
    "damage, why",
    [
        (_corrupt, "it failed verification (snapshot file has"),
        (_missing, "it failed verification"),
        (_unrestorable, "it could not be restored (incompatible VMM version)"),
    ],
)
def test_a_bad_golden_snapshot_falls_back_to_a_cold_boot(fake, template, owner, run_ops, damage, why):
    golden = _build(template, run_ops)
    damage(golden)
    vm, op = _create(owner, template, run_ops)
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert vm.state == S.RUNNING
    assert f"golden snapshot not used: {why}" in op.log and "cold boot instead" in op.log
    assert "launch" in fake.vmm.fake_calls(str(vm.pk))
    golden.refresh_from_db()
    assert golden.status == GoldenSnapshot.Status.FAILED and why.split(" (")[0] in golden.error
    assert AuditEvent.objects.filter(action="golden.failed").exists()
    # The next create does not try it again.
    _, second = _create(owner, template, run_ops, name="second")
    assert second.action == "create" and second.status == Operation.Status.SUCCEEDED


def test_a_failed_build_marks_the_golden_snapshot_failed(fake, template, run_ops):
    fake.vmm.fake_fail("snapshot", VmmError("disk full"))
    golden = _build(template, run_ops)
    assert golden.status == GoldenSnapshot.Status.FAILED and "disk full" in golden.error
    assert not VM.objects.filter(purpose=VmPurpose.GOLDEN).exists()


def test_the_beat_job_builds_missing_and_stale_golden_snapshots(fake, template, owner, run_ops):
    fake.vmm.fake_capabilities_set(shared_disk_layers=True)  # VMs' disks sit on the layer (QEMU)
    host = vm_services.local_host()
    assert golden_maintain(host=host)["requested"] == 1
    run_ops()
    assert golden_maintain(host=host)["requested"] == 0  # current: nothing to do
    first = GoldenSnapshot.objects.get(template=template).snapshot
    vm, _ = _create(owner, template, run_ops)
    assert VmLineage.objects.get(vm=vm).snapshot == first  # its disk sits on the first golden layer

    template.kernel_cmdline = "quiet"  # a change a restore must not ignore
    template.save()
    _, op = _create(owner, template, run_ops, name="while-stale")
    assert op.action == "create"  # a stale golden snapshot is not used
    assert golden_maintain(host=host)["requested"] == 1
    run_ops()
    golden = GoldenSnapshot.objects.get(template=template)
    assert golden.status == GoldenSnapshot.Status.READY and golden.snapshot != first
    assert Snapshot.objects.filter(pk=first.pk).exists()  # still under the first VM's disk
    vm_services.vm_action(vm=vm, action="delete", actor=owner)
    run_ops()
    assert golden_maintain(host=host)["retired"] == 1
    assert Snapshot.objects.get(pk=first.pk).state == Snapshot.State.DELETING
    snapshot_files_delete(first.pk)  # the host's delete task
    assert not Snapshot.objects.filter(pk=first.pk).exists()


def test_the_beat_job_builds_nothing_for_a_template_this_hosts_driver_cannot_boot(fake, template):
    host = vm_services.local_host()
    Host.objects.filter(pk=host.pk).update(driver="cloud-hypervisor", boot_modes=["kernel"])
    host.refresh_from_db()
    template.image.boot_mode = "uefi"
    template.image.save()
    assert golden_maintain(host=host)["requested"] == 0
    assert not GoldenSnapshot.objects.exists()


def test_the_beat_job_builds_nothing_when_automatic_builds_are_off(fake, template, settings):
    settings.SANDBOX_GOLDEN_AUTO_BUILD = False
    assert golden_maintain(host=vm_services.local_host())["requested"] == 0
    assert not GoldenSnapshot.objects.exists()


def test_an_agent_that_does_not_answer_after_the_restore_does_not_condemn_the_golden_snapshot(
    fake, template, owner, run_ops, monkeypatch
):
    golden = _build(template, run_ops)
    real_call = fake.agent.agent_call

    def identity_times_out(vm, op, args=None, data=b"", *, timeout=30.0):
        if op == "identity_set" and vm.name == "slow":
            from sandbox_site.errors import ApplicationError

            raise ApplicationError("the guest agent did not answer identity_set in time")
        return real_call(vm, op, args, data, timeout=timeout)

    from vms import agent_gateway

    monkeypatch.setattr(agent_gateway, "agent_call", identity_times_out)
    vm, op = _create(owner, template, run_ops, name="slow")
    assert op.status == Operation.Status.SUCCEEDED and vm.state == S.RUNNING, op.log
    assert "it could not be restored" in op.log and "cold boot instead" in op.log
    golden.refresh_from_db()
    assert golden.status == GoldenSnapshot.Status.READY  # the next create still restores it
