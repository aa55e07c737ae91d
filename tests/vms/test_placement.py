"""Placement (vms.placement): a new VM goes to the up, uncordoned host with the most room; an
operator may pin a host; anti-affinity keeps an owner's VMs apart; a create that fits nowhere is
a 409 that records nothing; operators list and cordon hosts through the API, audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import AuditEvent, UserQuota
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted
from tests.factories import HostFactory, TemplateFactory, UserFactory, VmFactory
from tests.security.test_quota_races import N, parallel
from vms import services
from vms.models import VM, Host

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


def _up(name: str, memory_mib: int = 4096, cpus: int = 4, **fields) -> Host:
    now = timezone.now()
    return HostFactory(name=name, cpus=cpus, memory_mib=memory_mib, last_seen_at=now, hostd_seen_at=now, **fields)


def _create(owner, name, **kwargs):
    vm, _ = services.vm_create(
        owner=owner, name=name, template=TemplateFactory(), actor=kwargs.pop("actor", owner), **kwargs
    )
    return vm


def test_creates_spread_over_the_hosts_by_free_memory(owner, settings):
    # 3072 and 2048 MiB admitted; each VM (128 MiB guest + 256 overhead) claims 384.
    big, small = _up("big", memory_mib=4096), _up("small", memory_mib=3072)
    placed = [_create(owner, f"vm{i}").host.name for i in range(4)]
    # free: big 3072, 2688, 2304 (> small's 2048), then 1920 < 2048: small.
    assert placed == ["big", "big", "big", "small"]
    counts = {h.name: VM.objects.filter(host=h).count() for h in (big, small)}
    assert counts == {"big": 3, "small": 1}
    audit = AuditEvent.objects.filter(action="vm.create", object_repr="vm3").get()
    assert audit.after["host"] == "small"


def test_a_full_host_is_passed_over_and_all_full_is_409_with_nothing_recorded(owner):
    _up("a", memory_mib=1024 + 384)  # room for one VM
    _up("b", memory_mib=1024 + 384)
    assert {_create(owner, "one").host.name, _create(owner, "two").host.name} == {"a", "b"}
    with pytest.raises(ConflictError) as err:
        _create(owner, "three")
    assert err.value.code == "host_full"
    assert set(err.value.details["hosts"]) == {"a", "b"}
    assert not VM.objects.filter(name="three").exists()
    assert not AuditEvent.objects.filter(object_repr="three").exists()


def test_cordoned_and_down_hosts_take_no_new_vms(owner):
    _up("roomy", memory_mib=16384, cordoned=True)
    stale = timezone.now() - timedelta(hours=1)
    HostFactory(name="gone", cpus=8, memory_mib=16384, last_seen_at=stale, hostd_seen_at=stale)
    _up("modest", memory_mib=2048)
    assert _create(owner, "x").host.name == "modest"
    Host.objects.filter(name="modest").update(cordoned=True)
    with pytest.raises(ConflictError) as err:
        _create(owner, "y")
    assert err.value.code == "no_host"
    assert not VM.objects.filter(name="y").exists()


def test_this_machines_host_takes_vms_before_any_heartbeat_only_while_no_host_is_up(owner, settings):
    local = HostFactory(name=settings.SANDBOX_HOST_NAME, cpus=4, memory_mib=8192)  # never reported
    assert _create(owner, "first").host == local
    _up("worker-2", memory_mib=2048)
    assert _create(owner, "second").host.name == "worker-2"  # the silent local host is not a candidate now


def test_a_host_whose_disk_is_at_its_reserve_is_skipped(owner):
    _up("full-disk", memory_mib=16384, disk_free_gib=-0.5)
    _up("disk-ok", memory_mib=2048, disk_free_gib=40.0)
    assert _create(owner, "d").host.name == "disk-ok"


def test_anti_affinity_keeps_an_owners_vms_on_different_hosts(owner):
    _up("h1", memory_mib=16384)
    _up("h2", memory_mib=4096)
    assert _create(owner, "a1", anti_affinity=True).host.name == "h1"
    assert _create(owner, "a2", anti_affinity=True).host.name == "h2"  # h1 has more room but holds a1
    with pytest.raises(ConflictError) as err:
        _create(owner, "a3", anti_affinity=True)
    assert err.value.code == "no_host" and "anti_affinity" in err.value.message
    assert _create(owner, "a3").host.name == "h1"  # without it, room decides


def test_operators_pin_a_host_and_users_may_not(owner, operator):
    _up("h1", memory_mib=16384)
    _up("h2", memory_mib=4096)
    assert _create(owner, "p1", host="h2", actor=operator).host.name == "h2"
    with pytest.raises(NotPermitted):
        _create(owner, "p2", host="h2")
    assert not VM.objects.filter(name="p2").exists()
    assert AuditEvent.objects.filter(action="vm.create", result="denied", actor=owner).exists()
    with pytest.raises(ApplicationError) as err:
        _create(owner, "p3", host="nowhere", actor=operator)
    assert err.value.details == {"host": "unknown"}
    Host.objects.filter(name="h2").update(cordoned=True)
    with pytest.raises(ConflictError) as err:
        _create(owner, "p4", host="h2", actor=operator)
    assert err.value.code == "no_host"


def test_a_pinned_host_still_needs_room(owner, operator):
    _up("tiny", memory_mib=1024 + 384)
    _create(owner, "t1", host="tiny", actor=operator)
    with pytest.raises(ConflictError) as err:
        _create(owner, "t2", host="tiny", actor=operator)
    assert err.value.code == "host_full"


def test_operators_list_and_cordon_hosts_through_the_api_and_users_cannot(api, owner, operator):
    h1 = _up("h1", memory_mib=4096)
    VmFactory(owner=owner, host=h1, state="running", memory_mib=512, vcpus=2)
    assert api.as_user(owner).get("/api/v1/hosts/").json() == []
    assert api.as_user(owner).post(f"/api/v1/hosts/{h1.pk}/cordon/").status_code == 404
    assert not Host.objects.get(name="h1").cordoned

    rows = {row["name"]: row for row in api.as_user(operator).get("/api/v1/hosts/").json()}
    assert rows["h1"]["up"] is True and rows["h1"]["cordoned"] is False
    assert rows["h1"]["vcpus_used"] == 2 and rows["h1"]["memory_used_mib"] == 512 + 256
    assert rows["h1"]["memory_allowed_mib"] == 3072

    response = api.as_user(operator).post(f"/api/v1/hosts/{h1.pk}/cordon/")
    assert response.status_code == 200 and response.json()["cordoned"] is True
    event = AuditEvent.objects.get(action="host.cordon")
    assert event.actor == operator and event.after == {"cordoned": True}
    with pytest.raises(ConflictError):
        _create(owner, "nowhere-to-go")
    response = api.as_user(operator).post(f"/api/v1/hosts/{h1.pk}/uncordon/")
    assert response.json()["cordoned"] is False
    assert AuditEvent.objects.filter(action="host.uncordon").count() == 1
    assert _create(owner, "back").host.name == "h1"


def test_the_create_api_takes_host_and_anti_affinity(api, owner, operator):
    _up("h1", memory_mib=16384)
    _up("h2", memory_mib=4096)
    template = TemplateFactory()
    body = {"name": "pinned", "template": template.name, "host": "h2", "start": False}
    response = api.as_user(owner).post("/api/v1/vms/", body, format="json")
    assert response.status_code == 403
    response = api.as_user(operator).post("/api/v1/vms/", body, format="json")
    assert response.status_code == 202 and response.json()["host"] == "h2"


@pytest.mark.django_db(transaction=True)
def test_parallel_creates_of_many_owners_never_overfill_any_host(settings):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("parallel requests need PostgreSQL")
    settings.CELERY_TASK_ALWAYS_EAGER = False
    _up("p1", memory_mib=1024 + 3 * 384)  # three VMs each
    _up("p2", memory_mib=1024 + 3 * 384)
    template = TemplateFactory()
    owners = [UserFactory(username=f"racer{i}") for i in range(N)]
    ok, refused = parallel(lambda i: services.vm_create(owner=owners[i], name="r", template=template, actor=owners[i]))
    assert ok == 6 and len(refused) == N - 6
    assert all(exc.code == "host_full" for exc in refused)
    assert sorted(VM.objects.values_list("host__name", flat=True)) == ["p1"] * 3 + ["p2"] * 3


def test_an_empty_host_can_be_removed_and_a_busy_one_cannot(api, owner, operator):
    busy, empty = _up("busy", memory_mib=8192), _up("empty", memory_mib=8192)
    vm = VmFactory(owner=owner, host=busy, state="stopped")
    response = api.as_user(operator).delete(f"/api/v1/hosts/{busy.pk}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "host_busy"
    busy.refresh_from_db()
    assert busy.is_active and not AuditEvent.objects.filter(action="host.remove").exists()
    assert api.as_user(operator).delete(f"/api/v1/hosts/{empty.pk}/").status_code == 204
    empty.refresh_from_db()
    assert not empty.is_active and empty.cordoned
    assert AuditEvent.objects.get(action="host.remove").object_repr == "empty"
    after = _create(owner, "after")
    assert after.host == busy  # the removed host takes nothing
    VM.objects.filter(pk__in=[vm.pk, after.pk]).delete()
    assert api.as_user(operator).delete(f"/api/v1/hosts/{busy.pk}/").status_code == 204
