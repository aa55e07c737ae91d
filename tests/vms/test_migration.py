"""Live migration as an operation (vms/migration.py) on the fake driver: two hosts, each with
its own runtime directory; every task runs as the worker of the queue it was sent to (this
process switches ``SANDBOX_HOST_NAME`` and ``SANDBOX_RUNTIME_DIR`` per task), so the steps
must hand themselves to the right host. The API with its personas, the refusals, and failures
on either side."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import AuditEvent
from sandbox_site.errors import ConflictError, NotPermitted
from tests.factories import HostFactory, UserFactory
from tests.networking.conftest import make_netns  # noqa: F401 - fixture
from tests.vms.conftest import fake_vm_in
from vms import hypervisor
from vms.migration import vm_migrate
from vms.models import VM, Host, Image, Operation, VmState
from vms.operations import operation_execute
from vms.vmm import fake as fake_vmm
from vms.vmm.base import RuntimeState, VmmError

pytestmark = pytest.mark.django_db
S = VmState


class Hosts:
    """Hosts "h1" (this one, where VMs start) and "h2", both up with room and an underlay
    address, each with its own runtime directory (and namespace, when ``netns`` names one);
    ``run()`` executes the queued tasks, each as the worker of its queue's host would."""

    def __init__(self, settings, monkeypatch, capture, roots, tunnels) -> None:
        from vms import tasks

        now = timezone.now()
        self.settings, self.capture, self.roots = settings, capture, roots
        self.hosts = {}
        for name, tunnel in tunnels.items():
            roots[name].mkdir(exist_ok=True)
            self.hosts[name] = HostFactory(
                name=name,
                last_seen_at=now,
                hostd_seen_at=now,
                cpus=8,
                memory_mib=16384,
                disk_free_gib=100,
                tunnel_address=tunnel,
            )
        self.netns: dict[str, str] = {}
        self.hostd_sockets: dict[str, Path] = {}  # a test with a hostd per host names their sockets
        self.sent: list[tuple[str, str]] = []
        monkeypatch.setattr(
            tasks.operation_run_task, "apply_async", lambda args, queue, **kw: self.sent.append((args[0], queue))
        )
        self.as_host("h1")

    def as_host(self, name: str) -> None:
        self.settings.SANDBOX_HOST_NAME = name
        self.settings.SANDBOX_RUNTIME_DIR = self.roots[name]
        if name in self.netns:
            self.settings.SANDBOX_NETNS = self.netns[name]
        if name in self.hostd_sockets:
            self.settings.SANDBOX_HOSTD_SOCKET = self.hostd_sockets[name]

    def run(self, limit: int = 20) -> list[str]:
        """Run the queued tasks in order; returns the queues they ran on."""
        ran = []
        for _ in range(limit):
            if not self.sent:
                break
            op_id, queue = self.sent.pop(0)
            self.as_host(queue.removeprefix("host."))
            with self.capture(execute=True):
                operation_execute(op_id)
            ran.append(queue)
        self.as_host("h1")
        return ran


@pytest.fixture
def two_hosts(fake, settings, tmp_path, monkeypatch, django_capture_on_commit_callbacks):
    roots = {"h1": tmp_path / "h1", "h2": tmp_path / "h2"}
    return Hosts(
        settings, monkeypatch, django_capture_on_commit_callbacks, roots, {"h1": "10.231.121.1", "h2": "10.231.121.2"}
    )


def _running_vm(env, owner):
    return fake_vm_in("running", owner=owner, host=env.hosts["h1"])


def _request(env, vm, actor, host="h2"):
    with env.capture(execute=True):
        return vm_migrate(vm=vm, host=host, actor=actor)


def test_it_moves_a_running_vm_to_the_other_host(two_hosts, owner, operator):
    env = two_hosts
    vm = _running_vm(env, owner)
    spec_h1 = hypervisor.vm_spec(vm)
    op = _request(env, vm, operator)
    vm.refresh_from_db()
    assert vm.state == S.MIGRATING and vm.host.name == "h1"
    assert env.sent == [(str(op.pk), "host.h2")]  # prepare runs on the target first

    ran = env.run()
    assert ran == ["host.h2", "host.h1", "host.h2", "host.h1"]  # prepare, send, finish, cleanup
    op.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED, op.log
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h2"
    moved = fake_vmm.fake_vm(str(vm.pk))
    assert moved is not None and moved.migrated_from and moved.state == RuntimeState.RUNNING
    assert moved.runtime_dir == env.roots["h2"] / str(vm.pk)
    assert not spec_h1.runtime_dir.exists()  # the source's VMM and files are gone
    assert vm.vmm_pid == moved.pid
    # The console's newest output came along, ahead of anything the guest writes there.
    assert (env.roots["h2"] / str(vm.pk) / "serial.log").read_text().startswith("fake VMM: booting")
    calls = fake_vmm.fake_calls(str(vm.pk))
    assert calls.index("migrate_receive_prepare") < calls.index("migrate_send") < calls.index("migrate_receive_finish")
    audit = AuditEvent.objects.get(action="vm.migrate", object_id=str(vm.pk))
    assert audit.before["host"] == "h1" and audit.after["host"] == "h2"


def test_a_step_delivered_to_the_wrong_host_hands_itself_over(two_hosts, owner, operator):
    env = two_hosts
    vm = _running_vm(env, owner)
    op = _request(env, vm, operator)
    env.sent[0] = (str(op.pk), "host.h1")  # e.g. re-enqueued by the source's reconcile
    ran = env.run()
    assert ran[:2] == ["host.h1", "host.h2"]
    op.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED
    assert VM.objects.get(pk=vm.pk).host.name == "h2"


def test_reconcile_removes_what_a_lost_cleanup_left_on_the_source(two_hosts, owner, operator):
    from vms.operations import vms_reconcile

    env = two_hosts
    vm = _running_vm(env, owner)
    left = hypervisor.vm_spec(vm).runtime_dir
    _request(env, vm, operator)
    assert env.run(limit=3) == ["host.h2", "host.h1", "host.h2"]
    env.sent.clear()  # the cleanup task is lost
    assert left.exists() and VM.objects.get(pk=vm.pk).host.name == "h2"
    other = fake_vm_in("running", owner=owner, host=env.hosts["h2"])  # never migrated: not touched
    other_dir = hypervisor.vm_spec(other).runtime_dir
    assert vms_reconcile(env.hosts["h1"])["orphans"] == 1
    assert not left.exists() and other_dir.exists()
    assert fake_vmm.fake_vm(str(vm.pk)).runtime_dir == env.roots["h2"] / str(vm.pk)  # the VM itself runs on


def test_reconcile_removes_a_half_received_vm_whose_migration_was_lost(two_hosts, owner, operator):
    from vms.operations import vms_reconcile

    env = two_hosts
    vm = _running_vm(env, owner)
    _request(env, vm, operator)
    assert env.run(limit=1) == ["host.h2"]  # prepared on the target; then the operation is lost
    env.sent.clear()
    VM.objects.filter(pk=vm.pk).update(state=S.RUNNING)  # as the source's reconcile settles it
    half = env.roots["h2"] / str(vm.pk)
    assert half.exists()
    env.as_host("h2")
    assert vms_reconcile(env.hosts["h2"])["orphans"] == 1
    assert not half.exists()
    assert fake_vmm.fake_vm(str(vm.pk)).state == RuntimeState.RUNNING  # the source VM is untouched


def test_reconcile_leaves_the_files_a_cold_move_back_is_copying_in(two_hosts, owner, operator):
    """A VM migrated h1 -> h2, then cold-moved back: while the move copies its disk into h1's
    runtime directory the VM is recorded on h2 (``moving``); h1's reconcile must not take that
    directory for what the old migration left (it deleted the half-copied disk under the move)."""
    from vms.operations import vms_reconcile

    env = two_hosts
    vm = _running_vm(env, owner)
    _request(env, vm, operator)
    env.run()
    assert VM.objects.get(pk=vm.pk).host.name == "h2"
    VM.objects.filter(pk=vm.pk).update(state=S.MOVING)  # the cold move back to h1 is copying
    arriving = env.roots["h1"] / str(vm.pk)
    arriving.mkdir(exist_ok=True)
    (arriving / ".overlay.qcow2.0123456789abcdef.part").write_bytes(b"half a disk")
    env.as_host("h1")
    assert vms_reconcile(env.hosts["h1"])["orphans"] == 0
    assert (arriving / ".overlay.qcow2.0123456789abcdef.part").exists()
    VM.objects.filter(pk=vm.pk).update(state=S.RUNNING)  # the move failed and settled on h2: now it is left over
    assert vms_reconcile(env.hosts["h1"])["orphans"] == 1
    assert not arriving.exists()


def test_hosts_with_migration_certificates_migrate_over_tls(two_hosts, owner, operator, settings, tmp_path):
    from cryptography import x509

    from vms import pki
    from vms.hosts import host_migration_cert

    env = two_hosts
    settings.SANDBOX_PKI_DIR = tmp_path / "pki"
    for host in env.hosts.values():
        files = host_migration_cert(host=host)
    vm = _running_vm(env, owner)
    op = _request(env, vm, operator)
    env.run()
    op.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert "(TLS)" in op.log and op.params["target_info"]["tls"] is True
    assert VM.objects.get(pk=vm.pk).host.name == "h2"
    # Signed by a CA of its own: no hostd (hosts CA) takes a migration certificate as a client.
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    hosts_ca = x509.load_pem_x509_certificate(pki.ca_ensure().cert.read_bytes())
    assert cert.issuer != hosts_ca.subject
    assert (
        x509.IPAddress(ipaddress.ip_address("10.231.121.2"))
        in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert AuditEvent.objects.filter(action="host.migration_cert").count() == 2


def test_a_source_without_a_migration_certificate_cannot_send_to_a_tls_target(
    two_hosts, owner, operator, settings, tmp_path
):
    from vms.hosts import host_migration_cert

    env = two_hosts
    settings.SANDBOX_PKI_DIR = tmp_path / "pki"
    host_migration_cert(host=env.hosts["h2"])  # only the target has one
    vm = _running_vm(env, owner)
    op = _request(env, vm, operator)
    assert env.run() == ["host.h2", "host.h1", "host.h2"]
    op.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "no migration certificate" in op.error
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h1"
    assert "migrate_send" not in fake_vmm.fake_calls(str(vm.pk))


def test_a_failed_send_leaves_the_vm_running_on_its_source(two_hosts, owner, operator):
    env = two_hosts
    vm = _running_vm(env, owner)
    fake_vmm.fake_fail("migrate_send", VmmError("connection refused"))
    op = _request(env, vm, operator)
    assert env.run() == ["host.h2", "host.h1", "host.h2"]  # prepare, send (fails), abort on the target
    op.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "connection refused" in op.error
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h1"
    assert fake_vmm.fake_vm(str(vm.pk)).state == RuntimeState.RUNNING
    assert not (env.roots["h2"] / str(vm.pk)).exists()  # the target's half is removed
    assert "migrate_receive_abort" in fake_vmm.fake_calls(str(vm.pk))


def test_a_failed_start_on_the_target_switches_back_and_resumes_the_source(two_hosts, owner, operator):
    env = two_hosts
    vm = _running_vm(env, owner)
    fake_vmm.fake_fail("migrate_receive_finish", VmmError("did not resume"))
    op = _request(env, vm, operator)
    assert env.run() == ["host.h2", "host.h1", "host.h2", "host.h1"]  # ..., finish (fails), rollback
    op.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "did not resume" in op.error
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h1"
    source = fake_vmm.fake_vm(str(vm.pk))
    assert source.state == RuntimeState.RUNNING and source.runtime_dir == env.roots["h1"] / str(vm.pk)
    assert fake_vmm.fake_calls(str(vm.pk))[-1] == "migrate_cancel"


def test_a_failed_prepare_changes_nothing(two_hosts, owner, operator):
    env = two_hosts
    vm = _running_vm(env, owner)
    fake_vmm.fake_fail("migrate_receive_prepare", VmmError("no room for the runtime directory"))
    op = _request(env, vm, operator)
    assert env.run() == ["host.h2"]
    op.refresh_from_db()
    assert op.status == Operation.Status.FAILED and "no room" in op.error
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h1"
    assert "migrate_send" not in fake_vmm.fake_calls(str(vm.pk))


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("same_host", "same_host"),
        ("cordoned", "host_unavailable"),
        ("down", "host_down"),
        ("no_tunnel", "no_tunnel_address"),
        ("no_driver_support", "migration_unsupported"),
        ("stopped", "conflict"),
        ("uefi", "migration_unsupported"),
    ],
)
def test_it_refuses_with_409_and_changes_nothing(two_hosts, owner, operator, setup, code):
    env = two_hosts
    target = env.hosts["h2"]
    vm = fake_vm_in("stopped", owner=owner, host=env.hosts["h1"]) if setup == "stopped" else _running_vm(env, owner)
    host = "h1" if setup == "same_host" else "h2"
    if setup == "cordoned":
        target.cordoned = True
    elif setup == "down":
        target.last_seen_at = timezone.now() - timedelta(hours=1)
    elif setup == "no_tunnel":
        target.tunnel_address = None
    elif setup == "no_driver_support":
        fake_vmm.fake_capabilities_set(live_migration=False)
    elif setup == "uefi":
        Image.objects.filter(pk=vm.template.image_id).update(boot_mode="uefi")
        vm.refresh_from_db()
    target.save()
    before = VM.objects.get(pk=vm.pk).state
    with pytest.raises(ConflictError) as err:
        _request(env, vm, operator, host=host)
    assert err.value.code == code
    assert VM.objects.get(pk=vm.pk).state == before
    assert not Operation.objects.filter(vm_ref=vm.pk, action="migrate").exists()
    assert env.sent == []


def test_only_operators_may_migrate(two_hosts, owner):
    env = two_hosts
    vm = _running_vm(env, owner)
    with pytest.raises(NotPermitted):
        _request(env, vm, owner)
    assert VM.objects.get(pk=vm.pk).state == S.RUNNING
    denied = AuditEvent.objects.get(action="vm.migrate", object_id=str(vm.pk))
    assert denied.result == "denied"


def test_the_api_answers_202_to_operators_403_to_owners_404_to_strangers(two_hosts, owner, operator, api):
    env = two_hosts
    vm = _running_vm(env, owner)
    url = f"/api/v1/vms/{vm.pk}/migrate/"
    stranger = UserFactory(username="stranger")
    assert api.post(url, {"host": "h2"}, format="json").status_code in (401, 403)  # anonymous
    assert api.as_user(stranger).post(url, {"host": "h2"}, format="json").status_code == 404
    assert api.as_user(owner).post(url, {"host": "h2"}, format="json").status_code == 403
    assert api.as_user(operator).post(url, {"host": "nowhere"}, format="json").status_code == 400
    assert VM.objects.get(pk=vm.pk).state == S.RUNNING
    with env.capture(execute=True):
        answer = api.as_user(operator).post(url, {"host": "h2"}, format="json")
    assert answer.status_code == 202, answer.content
    assert answer.json()["action"] == "migrate"
    env.run()
    assert VM.objects.get(pk=vm.pk).host.name == "h2"


def _links(netns: str) -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=netns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def test_the_vms_nic_moves_to_the_target_hosts_namespace_with_its_rules(
    two_hosts,
    operator,
    api,
    settings,
    make_netns,  # noqa: F811 - the imported fixture
):
    """With networking: the TAP is made in the target host's namespace before the VM arrives,
    the target's rules name the VM once it is there, and the source loses both."""
    from networking import nft
    from networking.models import Nic
    from networking.services import network_create
    from tests.factories import TemplateFactory

    env = two_hosts
    settings.SANDBOX_NETWORKING = True
    settings.SANDBOX_NETWORK_IP_FORWARD = False
    env.netns.update(h1=make_netns("h1"), h2=make_netns("h2"))
    env.as_host("h1")
    network_create(name="lab", cidr="10.231.62.0/24", actor=operator)
    TemplateFactory(name="mig-template")
    with env.capture(execute=True):
        created = api.as_user(operator).post(
            "/api/v1/vms/",
            {"template": "mig-template", "name": "mover", "host": "h1", "nics": [{"network": "lab"}]},
            format="json",
        )
    assert created.status_code == 202, created.content
    env.run()
    vm = VM.objects.get(pk=created.json()["id"])
    assert vm.state == S.RUNNING and vm.host.name == "h1", vm.last_error
    nic = Nic.objects.get(vm=vm)
    assert nic.tap in _links(env.netns["h1"]) and nic.tap not in _links(env.netns["h2"])
    assert nic.mac in str(nft.list_ours(netns=env.netns["h1"]))

    _request(env, vm, operator)
    env.run()
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h2"
    nic.refresh_from_db()
    assert nic.plumbed
    assert nic.tap in _links(env.netns["h2"]) and nic.tap not in _links(env.netns["h1"])
    assert nic.mac in str(nft.list_ours(netns=env.netns["h2"]))
    assert nic.mac not in str(nft.list_ours(netns=env.netns["h1"]))
    assert fake_vmm.fake_vm(str(vm.pk)).nics == {"net0": nic.tap}


def test_drain_migrates_a_running_vm_live_and_its_room_is_held_on_the_target_meanwhile(two_hosts, owner, operator):
    from vms import hosts
    from vms.selectors import hosts_with_load

    env = two_hosts
    vm = _running_vm(env, owner)
    with env.capture(execute=True):
        result = hosts.host_drain(host=env.hosts["h1"], actor=operator)
    assert [(m["name"], m["target"], m["mover"]) for m in result["moves"]] == [(vm.name, "h2", "migrate")]
    vm.refresh_from_db()
    assert vm.state == S.MIGRATING and vm.move_target.name == "h2"
    load = {h.name: h.memory_used_mib for h in hosts_with_load(Host.objects.filter(name__in=["h1", "h2"]))}
    assert load == {"h1": vm.memory_mib, "h2": vm.memory_mib}  # on both hosts until it switches

    env.run()
    vm.refresh_from_db()
    assert vm.state == S.RUNNING and vm.host.name == "h2" and vm.move_target is None
    load = {h.name: h.memory_used_mib for h in hosts_with_load(Host.objects.filter(name__in=["h1", "h2"]))}
    assert load == {"h1": 0, "h2": vm.memory_mib}


def test_a_vm_with_snapshots_is_cold_moved_by_drain_since_migration_would_leave_them(two_hosts, owner, operator):
    from snapshots.models import Snapshot
    from tests.factories import SnapshotFactory
    from vms import hosts

    env = two_hosts
    vm = _running_vm(env, owner)
    SnapshotFactory(vm=vm, state=Snapshot.State.READY)
    with pytest.raises(ConflictError) as refused:
        _request(env, vm, operator)
    assert refused.value.code == "migration_unsupported" and VM.objects.get(pk=vm.pk).state == S.RUNNING
    with env.capture(execute=True):
        result = hosts.host_drain(host=env.hosts["h1"], actor=operator)
    assert [m["mover"] for m in result["moves"]] == ["move"]
