"""Warm pools on the fake driver: the beat job restores paused VMs from the golden snapshot
while the host keeps its reserve; nobody sees them or pays for them until a create takes
one; a take is a compare-and-set (one pool VM never goes to two creates); the taken VM gets
its owner, name, rights and identity and runs."""

from __future__ import annotations

import threading

import pytest
from django.db import close_old_connections

from accounts.models import AuditEvent
from accounts.services import user_has_perm
from snapshots.golden import golden_build, golden_maintain
from snapshots.pool import pool_refill, pool_vm_take
from tests.factories import TemplateFactory
from vms import selectors
from vms import services as vm_services
from vms.models import VM, Operation, VmPurpose, VmState

S = VmState


@pytest.fixture
def pooled_template(db, fake, run_ops, settings):
    settings.SANDBOX_POOL_HOST_RESERVE_MIB = 512
    host = vm_services.local_host()
    host.memory_mib = 8192
    host.save()
    template = TemplateFactory(name="pooled", pool_size=2)
    golden_build(template=template, actor=None)
    run_ops()
    return template


def _fill(run_ops) -> list[VM]:
    """Beat passes until the pool stops growing (a pass restores POOL_FILLS_AT_ONCE at most)."""
    total: dict[str, int] = {}
    for _ in range(10):
        counts = pool_refill(host=vm_services.local_host())
        run_ops()
        total = {k: total.get(k, 0) + v for k, v in counts.items()}
        if counts["filled"] == 0:
            break
    return list(VM.objects.filter(purpose=VmPurpose.POOL).order_by("created_at")), total


@pytest.mark.django_db
def test_the_beat_job_fills_the_pool_with_paused_restored_vms(fake, pooled_template, run_ops):
    pool, counts = _fill(run_ops)
    assert counts["filled"] == 2 and len(pool) == 2
    for vm in pool:
        assert vm.state == S.PAUSED and vm.owner.username == vm_services.SYSTEM_USERNAME
        assert fake.vmm.fake_vm(str(vm.pk)).state.value == "paused"
        assert fake.vmm.fake_vm(str(vm.pk)).restored_from  # from the golden snapshot, not booted
    assert _fill(run_ops)[1]["filled"] == 0  # full
    # golden_maintain (the beat task) runs the refill too.
    assert golden_maintain(host=vm_services.local_host())["filled"] == 0


@pytest.mark.django_db
def test_pool_vms_are_visible_to_nobody_and_count_against_no_quota(
    fake, pooled_template, run_ops, owner, operator, api
):
    pool, _ = _fill(run_ops)
    for user in (owner, operator):
        client = api.as_user(user)
        assert not selectors.vm_list_visible(user).filter(purpose=VmPurpose.POOL).exists()
        listed = client.get("/api/v1/vms/").content.decode()
        ops = client.get("/api/v1/operations/").content.decode()
        audit = client.get("/api/v1/audit/").content.decode()
        for vm in pool:
            assert not user_has_perm(user, "vms.view_vm", vm)
            assert client.get(f"/api/v1/vms/{vm.pk}/").status_code == 404
            assert client.get(f"/api/v1/vms/{vm.pk}/operations/").status_code == 404
            assert str(vm.pk) not in listed and vm.name not in listed
            if user == owner:
                assert str(vm.pk) not in ops and str(vm.pk) not in audit
    assert selectors.usage_of(owner)["vms"] == 0


@pytest.mark.django_db
def test_a_create_takes_a_pool_vm_and_gives_it_its_owner_name_and_identity(
    fake, pooled_template, run_ops, owner, stranger, api
):
    pool, _ = _fill(run_ops)
    fill_ops = set(Operation.objects.filter(vm__in=pool).values_list("pk", flat=True))
    vm, op = vm_services.vm_create(owner=owner, name="quick", template=pooled_template, actor=owner)
    assert vm.pk == pool[0].pk and op.action == "pool_take"  # the oldest pool VM
    assert vm.state == S.STARTING and vm.purpose == VmPurpose.USER and vm.owner == owner
    run_ops()
    vm.refresh_from_db()
    op.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert vm.state == S.RUNNING and fake.vmm.fake_vm(str(vm.pk)).state.value == "running"
    identity = [args for who, name, args in fake.agent.calls if name == "identity_set" and who == str(vm.pk)][-1]
    assert identity["hostname"] == "quick" and identity["machine_id"] == vm.pk.hex
    assert {"clock_unix", "entropy"} <= set(identity)
    assert user_has_perm(owner, "vms.exec_vm", vm) and user_has_perm(owner, "vms.console_vm", vm)
    assert not user_has_perm(stranger, "vms.view_vm", vm)
    assert api.as_user(stranger).get(f"/api/v1/vms/{vm.pk}/").status_code == 404
    # The owner sees their create, not the VM's life in the pool.
    owner_ops = api.as_user(owner).get(f"/api/v1/vms/{vm.pk}/operations/").json()
    seen = {row["id"] for row in owner_ops["results"]}
    assert str(op.pk) in seen and not seen & {str(pk) for pk in fill_ops}
    assert selectors.usage_of(owner)["vms"] == 1
    created = AuditEvent.objects.filter(action="vm.create", object_id=str(vm.pk)).get()
    assert created.object_owner_id == owner.pk and created.after["from_pool"] is True
    # The pool is refilled to its size.
    assert _fill(run_ops)[1]["filled"] == 1


@pytest.mark.django_db
def test_a_create_that_does_not_fit_the_pool_does_not_take_from_it(fake, pooled_template, run_ops, owner):
    _fill(run_ops)
    _, op = vm_services.vm_create(owner=owner, name="bigger", template=pooled_template, actor=owner, memory_mib=256)
    assert op.action == "create"
    _, op = vm_services.vm_create(owner=owner, name="later", template=pooled_template, actor=owner, start=False)
    assert op.action == "create"
    assert VM.objects.filter(purpose=VmPurpose.POOL).count() == 2


@pytest.mark.django_db
def test_one_pool_vm_goes_to_one_create_only(fake, pooled_template, run_ops, owner, stranger):
    pooled_template.pool_size = 1
    pooled_template.save()
    (only,), _ = _fill(run_ops)
    args = dict(template=pooled_template, image=None, vcpus=1, memory_mib=128, disk_gib=1, metadata=None, start=True)
    mine, theirs = owner.personal_project, stranger.personal_project
    first = pool_vm_take(owner=owner, project=mine, vm_name="first", actor=owner, **args)
    second = pool_vm_take(owner=stranger, project=theirs, vm_name="second", actor=stranger, **args)
    assert first[0].pk == only.pk and second is None
    only.refresh_from_db()
    assert only.owner == owner and only.name == "first" and only.project == mine


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_never_share_a_pool_vm(fake, pooled_template, run_ops, owner, stranger):
    pool, _ = _fill(run_ops)
    barrier = threading.Barrier(3)
    results: dict[str, tuple] = {}

    def create(user, name):
        try:
            barrier.wait(10)
            vm, op = vm_services.vm_create(owner=user, name=name, template=pooled_template, actor=user)
            results[name] = (vm.pk, vm.owner_id, op.action)
        finally:
            close_old_connections()

    threads = [
        threading.Thread(target=create, args=args)
        for args in ((owner, "t1"), (stranger, "t2"), (owner, "t3"))
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3
    taken = [r for r in results.values() if r[2] == "pool_take"]
    assert len(taken) == 2 and {r[0] for r in taken} == {vm.pk for vm in pool}  # two VMs, two creates
    for pk, owner_id, _action in results.values():
        assert VM.objects.get(pk=pk).owner_id == owner_id


@pytest.mark.django_db
def test_the_refill_stops_at_the_host_reserve(fake, pooled_template, run_ops, settings):
    pooled_template.pool_size = 5
    pooled_template.save()
    host = vm_services.local_host()
    # The host admits room for two 128 MiB VMs (+ VMM overhead) above the pool's reserve,
    # whatever else it holds (host admission: memory - host reserve, ratio 1).
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    held = vm_services.host_room(host).memory_used_mib
    host.reserve_memory_mib, host.cpus = 0, 64
    host.memory_mib = held + settings.SANDBOX_POOL_HOST_RESERVE_MIB + 2 * vm_services.vm_claim_mib(128) + 64
    host.save()
    pool, counts = _fill(run_ops)
    assert len(pool) == 2 and counts["filled"] == 2 and counts["no_room"] == 1
    assert _fill(run_ops)[1] == {"filled": 0, "discarded": 0, "no_room": 1}


@pytest.mark.django_db
def test_pool_vms_of_a_replaced_golden_snapshot_are_discarded(fake, pooled_template, run_ops):
    old_pool, _ = _fill(run_ops)
    golden_build(template=pooled_template, actor=None)
    run_ops()
    pool, counts = _fill(run_ops)
    assert counts["discarded"] == 2 and counts["filled"] == 2
    assert not VM.objects.filter(pk__in=[vm.pk for vm in old_pool]).exists()
    assert len(pool) == 2


@pytest.mark.django_db
def test_a_create_never_takes_a_pool_vm_of_a_stale_golden_snapshot(fake, pooled_template, run_ops, owner):
    _fill(run_ops)
    pooled_template.kernel_cmdline = "quiet"  # the golden snapshot (and its pool) is stale now
    pooled_template.save()
    vm, op = vm_services.vm_create(owner=owner, name="fresh", template=pooled_template, actor=owner)
    assert op.action == "create" and vm.purpose == VmPurpose.USER
    assert VM.objects.filter(purpose=VmPurpose.POOL).count() == 2


@pytest.mark.django_db
def test_one_pass_restores_a_bounded_number_of_pool_vms(fake, pooled_template, run_ops):
    from snapshots.pool import POOL_FILLS_AT_ONCE

    pooled_template.pool_size = POOL_FILLS_AT_ONCE + 3
    pooled_template.save()
    assert pool_refill(host=vm_services.local_host())["filled"] == POOL_FILLS_AT_ONCE
    assert pool_refill(host=vm_services.local_host())["filled"] == 0  # still restoring
    run_ops()
    assert pool_refill(host=vm_services.local_host())["filled"] == POOL_FILLS_AT_ONCE
