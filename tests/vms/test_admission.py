"""Host admission (vms.admission): a VM that does not fit its host is refused with 409
``host_full`` before anything is recorded or launched; what fits, and what does not grow a VM's
claim, passes. Capacity: (CPUs - reserve) x CPU overcommit, (memory - reserve) x memory
overcommit, each VM counted for its guest RAM + the VMM overhead."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from accounts.models import AuditEvent, UserQuota
from sandbox_site.errors import ConflictError
from snapshots import services as snapshot_services
from tests.factories import PASSWORD, HostFactory, SnapshotFactory, TemplateFactory, VmFactory
from vms import services
from vms.admission import host_room
from vms.models import VM, Operation

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _sizes(settings, owner):
    settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB = 256
    settings.SANDBOX_CPU_OVERCOMMIT = 4.0
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    settings.SANDBOX_HOST_RESERVE_MEMORY_MIB = 1024
    settings.SANDBOX_HOST_RESERVE_CPUS = 0
    settings.SANDBOX_NETWORKING = False
    UserQuota.objects.update_or_create(
        user=owner, defaults={"max_vms": 100, "max_vcpus": 100, "max_memory_mib": 100_000, "max_disk_gib": 1000}
    )


@pytest.fixture
def host(settings):
    # 4096 MiB - 1024 reserve = 3072 MiB admitted: eight VMs of 128 MiB (+256 overhead = 384).
    return HostFactory(name=settings.SANDBOX_HOST_NAME, cpus=4, memory_mib=4096)


def _running(owner, host, n, **fields):
    return [VmFactory(owner=owner, host=host, state="running", **fields) for _ in range(n)]


def _nothing_recorded_for(name: str) -> bool:
    return not VM.objects.filter(name=name).exists() and not AuditEvent.objects.filter(object_repr=name).exists()


def test_it_admits_creates_until_the_host_memory_is_held_then_refuses(owner, host):
    template = TemplateFactory()
    for i in range(8):
        services.vm_create(owner=owner, name=f"fits-{i}", template=template, actor=owner)
    ops_before = Operation.objects.count()
    with pytest.raises(ConflictError) as err:
        services.vm_create(owner=owner, name="one-too-many", template=template, actor=owner)
    assert err.value.status_code == 409 and err.value.code == "host_full"
    assert err.value.details["host"] == host.name
    assert err.value.details["memory_mib"] == "3072 of 3072 MiB held + 384 asked"
    assert "vcpus" not in err.value.details  # 8 of 16 vCPUs: only memory is short
    assert _nothing_recorded_for("one-too-many") and Operation.objects.count() == ops_before


def test_a_create_without_start_needs_no_room(owner, host):
    _running(owner, host, 8)
    vm, _ = services.vm_create(owner=owner, name="parked", template=TemplateFactory(), start=False, actor=owner)
    assert vm.state == "creating"


def test_it_refuses_a_start_that_does_not_fit_and_changes_nothing(owner, host):
    _running(owner, host, 8)
    stopped = VmFactory(owner=owner, host=host, state="stopped")
    with pytest.raises(ConflictError) as err:
        services.vm_action(vm=stopped, action="start", actor=owner)
    assert err.value.code == "host_full"
    stopped.refresh_from_db()
    assert stopped.state == "stopped"
    assert not Operation.objects.filter(vm_ref=stopped.pk).exists()
    assert not AuditEvent.objects.filter(action="vm.start").exists()


def test_stopped_and_failed_vms_hold_nothing(owner, host):
    _running(owner, host, 7)
    VmFactory(owner=owner, host=host, state="stopped")
    VmFactory(owner=owner, host=host, state="error")
    last = VmFactory(owner=owner, host=host, state="stopped")
    op = services.vm_action(vm=last, action="start", actor=owner)
    assert op.action == "start"
    assert host_room(host).memory_free_mib == 0  # 7 running + the starting one


def test_vcpus_are_admitted_by_the_cpu_overcommit(owner, host, settings):
    settings.SANDBOX_CPU_OVERCOMMIT = 1.0
    host.reserve_cpus = 1  # (4 - 1) x 1.0 = 3 vCPUs
    host.save()
    _running(owner, host, 1, vcpus=2)
    stopped = VmFactory(owner=owner, host=host, state="stopped", vcpus=2)
    with pytest.raises(ConflictError) as err:
        services.vm_action(vm=stopped, action="start", actor=owner)
    assert err.value.details["vcpus"] == "2 of 3 vCPUs held + 2 asked"
    small = VmFactory(owner=owner, host=host, state="stopped", vcpus=1)
    services.vm_action(vm=small, action="start", actor=owner)


def test_a_host_override_beats_the_site_setting(owner, host, settings):
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    host.memory_overcommit = 2.0  # (4096 - 1024) x 2 = 6144 MiB: sixteen VMs
    host.save()
    _running(owner, host, 15)
    services.vm_create(owner=owner, name="sixteenth", template=TemplateFactory(), actor=owner)
    with pytest.raises(ConflictError):
        services.vm_create(owner=owner, name="seventeenth", template=TemplateFactory(), actor=owner)


def test_a_host_that_never_reported_admits_nothing_unless_it_is_this_machine(owner, settings):
    remote = HostFactory(name="elsewhere", cpus=0, memory_mib=0)
    stopped = VmFactory(owner=owner, host=remote, state="stopped")
    with pytest.raises(ConflictError):
        services.vm_action(vm=stopped, action="start", actor=owner)
    here = HostFactory(name=settings.SANDBOX_HOST_NAME, cpus=0, memory_mib=0)
    assert host_room(here).memory_allowed_mib > 0  # measured from /proc/meminfo
    services.vm_action(vm=VmFactory(owner=owner, host=here, state="stopped"), action="start", actor=owner)


def test_a_running_resize_that_grows_beyond_the_host_is_refused_but_a_shrink_never_is(
    owner, host, settings, monkeypatch
):
    monkeypatch.setattr("vms.hypervisor.driver_capabilities", lambda driver: SimpleNamespace(live_resize=True))
    vms = _running(owner, host, 8)
    with pytest.raises(ConflictError) as err:
        services.vm_resize(vm=vms[0], actor=owner, memory_mib=256)
    assert err.value.code == "host_full"
    vms[0].refresh_from_db()
    assert vms[0].state == "running" and vms[0].memory_mib == 128
    settings.SANDBOX_MEMORY_OVERCOMMIT = 0.5  # the operator lowers the ratio: the host is now over
    op = services.vm_resize(vm=vms[1], actor=owner, vcpus=2, memory_mib=128)
    assert op.action == "resize"  # more vCPUs fit; its memory does not grow


def test_a_restore_that_starts_a_stopped_vm_needs_room(owner, host):
    _running(owner, host, 8)
    stopped = VmFactory(owner=owner, host=host, state="stopped")
    snapshot = SnapshotFactory(vm=stopped)
    with pytest.raises(ConflictError) as err:
        snapshot_services.snapshot_restore(snapshot=snapshot, actor=owner)
    assert err.value.code == "host_full"
    stopped.refresh_from_db()
    assert stopped.state == "stopped"


def test_a_running_vm_restores_its_own_snapshot_on_a_full_host(owner, host):
    vms = _running(owner, host, 8)
    snapshot = SnapshotFactory(vm=vms[0])
    op = snapshot_services.snapshot_restore(snapshot=snapshot, actor=owner)
    assert op.action == "restore"


def test_clones_are_admitted_all_or_nothing(owner, host):
    _running(owner, host, 6)  # room for two more
    snapshot = SnapshotFactory(vm=VmFactory(owner=owner, host=host, state="stopped"))
    before = VM.objects.count()
    with pytest.raises(ConflictError) as err:
        snapshot_services.snapshot_clone(snapshot=snapshot, actor=owner, count=3)
    assert err.value.code == "host_full" and VM.objects.count() == before
    assert len(snapshot_services.snapshot_clone(snapshot=snapshot, actor=owner, count=2)) == 2


def test_the_api_answers_409_host_full_in_the_error_shape(api, owner, host):
    _running(owner, host, 8)
    TemplateFactory()
    response = api.as_user(owner).post("/api/v1/vms/", {"name": "no-room", "template": "test-template"}, format="json")
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "host_full" and "no room" in error["message"]
    assert error["details"]["memory_mib"] == "3072 of 3072 MiB held + 384 asked"
    assert not VM.objects.filter(name="no-room").exists()


def test_operators_see_what_each_host_admits_and_holds(client, operator, owner, host):
    _running(owner, host, 4)
    client.login(username=operator.username, password=PASSWORD)
    page = client.get("/hosts/").content.decode()
    assert "1536 / 3072 (4096 MiB)" in page  # 4 x (128 + 256) of (4096 - 1024)
    assert 'data-resource="memory" data-percent="50"' in page
    assert "4 / 16 (4 CPUs)" in page
