"""Quota races: 20 requests in parallel (threads, each with its own PostgreSQL connection), each
of which fits alone, must together stay within the limit: every quota check runs under the
owner's quota lock and counts again inside the transaction."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
from django.db import connection

from accounts import services as account_services
from accounts.models import ApiToken, UserQuota
from networking import services as net_services
from networking.models import PortForward
from sandbox_site.errors import ApplicationError
from snapshots import services as snapshot_services
from snapshots.models import Snapshot
from tests.factories import HostFactory, SnapshotFactory, TemplateFactory, VmFactory
from vms import exec_services
from vms import services as vm_services
from vms.models import VM

pytestmark = pytest.mark.django_db(transaction=True)
N = 20


@pytest.fixture(autouse=True)
def _postgresql_and_quiet(settings):
    if connection.vendor != "postgresql":
        pytest.skip("parallel requests need PostgreSQL (SQLite serialises every write transaction)")
    settings.SANDBOX_NETWORKING = False
    settings.CELERY_TASK_ALWAYS_EAGER = False


def parallel(fn: Callable[[int], object]) -> tuple[int, list[Exception]]:
    """Run ``fn(0..N-1)`` at once in N threads; (successes, refusals)."""
    barrier = threading.Barrier(N)
    ok, refused, crashed = [], [], []

    def run(i):
        try:
            barrier.wait(10)
            fn(i)
            ok.append(i)
        except ApplicationError as exc:
            refused.append(exc)
        except Exception as exc:  # a deadlock or a 500 would show here
            crashed.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not crashed, crashed
    return len(ok), refused


def _quota(user, **limits):
    values = {"max_vms": 100, "max_vcpus": 100, "max_memory_mib": 100_000, "max_disk_gib": 1000, **limits}
    UserQuota.objects.update_or_create(user=user, defaults=values)


def test_parallel_creates_stay_within_the_vm_count(owner):
    _quota(owner, max_vms=3)
    template = TemplateFactory()
    ok, refused = parallel(lambda i: vm_services.vm_create(owner=owner, name=f"c{i}", template=template, actor=owner))
    assert VM.objects.filter(owner=owner).count() == 3 == ok
    assert all(exc.code == "quota_exceeded" for exc in refused)


def test_parallel_resizes_stay_within_the_memory_quota(owner):
    vms = [VmFactory(owner=owner, state="stopped", memory_mib=128) for _ in range(N)]
    _quota(owner, max_memory_mib=N * 128 + 3 * 128)  # room for exactly three +128 MiB resizes
    ok, refused = parallel(lambda i: vm_services.vm_resize(vm=vms[i], actor=owner, memory_mib=256))
    assert ok == 3 and len(refused) == N - 3
    assert sum(VM.objects.filter(owner=owner).values_list("memory_mib", flat=True)) == N * 128 + 3 * 128


def test_parallel_clones_stay_within_the_vm_count(owner):
    snapshot = SnapshotFactory(vm=VmFactory(owner=owner))
    _quota(owner, max_vms=4)  # the original + 3 clones
    ok, refused = parallel(
        lambda i: snapshot_services.snapshot_clone(snapshot=snapshot, actor=owner, name_prefix=f"k{i}")
    )
    assert ok == 3 and VM.objects.filter(owner=owner).count() == 4


def test_parallel_snapshots_stay_within_the_storage_quota(owner):
    vms = [VmFactory(owner=owner, state="running", memory_mib=1024, disk_gib=1) for _ in range(N)]
    _quota(owner, max_disk_gib=N + 1 + 3)  # VM disks, their console logs (20 x 16 MiB), three 1 GiB memory images
    ok, refused = parallel(lambda i: snapshot_services.snapshot_create(vm=vms[i], actor=owner, name=f"s{i}"))
    assert ok == 3 and Snapshot.objects.filter(owner=owner).count() == 3


def test_parallel_port_forwards_stay_within_the_limit(owner, settings):
    settings.SANDBOX_PORT_FORWARDS_PER_VM = 3
    net_services.network_default_ensure()
    vm = VmFactory(owner=owner)
    net_services.nic_allocate(vm=vm)
    ok, refused = parallel(lambda i: net_services.port_forward_create(vm=vm, actor=owner, guest_port=8000 + i))
    assert ok == 3 and PortForward.objects.filter(vm=vm).count() == 3


def test_parallel_background_execs_stay_within_the_limit(owner, settings, monkeypatch):
    settings.SANDBOX_EXEC_BACKGROUND_PER_VM = 3
    vm = VmFactory(owner=owner, state="running")
    running: list[str] = []
    lock = threading.Lock()

    def agent_call(vm, op, args=None, data=b"", *, timeout=30.0):
        if op == "exec_list":
            with lock:
                return {"execs": [{"exec_id": e, "running": True} for e in running]}, b""
        if op == "exec_start":
            threading.Event().wait(0.05)  # the agent takes a moment: the window the race needs
            with lock:
                running.append(f"e{len(running)}")
                return {"exec_id": running[-1], "pid": 1, "tag": ""}, b""
        raise AssertionError(op)

    @contextlib.contextmanager
    def agent_session(vm, *, timeout=30.0):  # an exec's requests share one connection
        yield lambda op, args=None, data=b"", *, timeout=30.0: agent_call(vm, op, args, data, timeout=timeout)

    monkeypatch.setattr(exec_services, "agent_call", agent_call)
    monkeypatch.setattr(exec_services, "agent_session", agent_session)
    monkeypatch.setattr(exec_services, "_require_running", lambda vm: None)
    ok, refused = parallel(lambda i: exec_services.vm_exec_start(vm=vm, actor=owner, command="sleep 60", wait=False))
    assert ok == 3 == len(running)
    assert all(exc.code == "quota_exceeded" for exc in refused)


def test_parallel_token_creates_stay_within_the_limit(owner, settings):
    settings.SANDBOX_TOKEN_MAX_PER_USER = 3
    ok, refused = parallel(lambda i: account_services.token_create(user=owner, name=f"t{i}", actor=owner))
    assert ok == 3 and ApiToken.objects.filter(user=owner).count() == 3


def test_parallel_starts_stay_within_the_host_capacity(owner, settings):
    # (4096 - 1024) = 3072 MiB admitted, 5 x 384 held by running VMs: room for three more.
    settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB = 256
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    settings.SANDBOX_HOST_RESERVE_MEMORY_MIB = 1024
    host = HostFactory(name=settings.SANDBOX_HOST_NAME, cpus=64, memory_mib=4096)
    for _ in range(5):
        VmFactory(owner=owner, host=host, state="running", memory_mib=128)
    stopped = [VmFactory(owner=owner, host=host, state="stopped", memory_mib=128) for _ in range(N)]
    ok, refused = parallel(lambda i: vm_services.vm_action(vm=stopped[i], action="start", actor=owner))
    assert ok == 3 and VM.objects.filter(owner=owner, state="starting").count() == 3
    assert all(exc.code == "host_full" for exc in refused)


def test_parallel_creates_of_two_members_stay_within_the_project_quota(owner, grantee):
    from accounts.models import ProjectQuota

    project = account_services.project_create(name="Team", slug="team", actor=owner)
    account_services.project_member_set(project=project, user=grantee, role="member", actor=owner)
    _quota(owner)
    _quota(grantee)  # each member alone has room for far more than the project
    ProjectQuota.objects.create(project=project, max_vms=3, max_vcpus=100, max_memory_mib=100_000, max_disk_gib=1000)
    template = TemplateFactory()
    members = (owner, grantee)

    def create(i):
        member = members[i % 2]
        vm_services.vm_create(owner=member, name=f"p{i}", template=template, project=project, actor=member)

    ok, refused = parallel(create)
    assert VM.objects.filter(project=project).count() == 3 == ok
    assert all(exc.code == "quota_exceeded" for exc in refused)
    assert {vm.owner for vm in VM.objects.filter(project=project)} <= set(members)
