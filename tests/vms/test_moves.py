"""Cold move (vms.moves) and drain (vms.hosts.host_drain) on the fake driver, between two
"hosts" of this machine: each with its own runtime and snapshot directories and its own real
hostd (Unix socket for its own worker, mutual TLS for the other's), the files copied through
them. Each step of the move runs as the worker of the host it belongs to would run it: the
settings switched to that host's (``as_host``)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import AuditEvent, UserQuota
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted
from tests.factories import HostFactory, SnapshotFactory, VmFactory
from tests.hostd.runner import Hostd
from tests.vms.conftest import fake_vm_in
from vms import hosts, pki
from vms.models import VM, Host, Operation
from vms.moves import vm_move
from vms.operations import operation_execute

pytestmark = pytest.mark.django_db


class TwoHosts:
    def __init__(self, base: Path, settings) -> None:
        self.base = base
        self.settings = settings
        self.hostds: dict[str, Hostd] = {}
        self.hosts: dict[str, Host] = {}

    def root(self, name: str, sub: str) -> Path:
        return self.base / name / sub

    @contextlib.contextmanager
    def as_host(self, name: str):
        s = self.settings
        saved = (s.SANDBOX_HOST_NAME, s.SANDBOX_RUNTIME_DIR, s.SANDBOX_SNAPSHOT_DIR, s.SANDBOX_HOSTD_SOCKET)
        s.SANDBOX_HOST_NAME = name
        s.SANDBOX_RUNTIME_DIR = self.root(name, "run")
        s.SANDBOX_SNAPSHOT_DIR = self.root(name, "snap")
        s.SANDBOX_HOSTD_SOCKET = self.root(name, "run") / "hostd.sock"
        try:
            yield
        finally:
            s.SANDBOX_HOST_NAME, s.SANDBOX_RUNTIME_DIR, s.SANDBOX_SNAPSHOT_DIR, s.SANDBOX_HOSTD_SOCKET = saved

    def run(self, op: Operation) -> Operation:
        """Run ``op``'s steps, each as the worker of the host whose queue it was sent to."""
        for _ in range(5):
            op.refresh_from_db()
            if op.status != Operation.Status.PENDING:
                break
            queue = op.params.get("queue") or VM.objects.get(pk=op.vm_id).host.queue
            # The transfer queue's worker is the control plane's: on h1 here.
            with self.as_host("h1" if queue == "shared" else queue.removeprefix("host.")):
                operation_execute(op.pk)
        op.refresh_from_db()
        return op


@pytest.fixture
def two(fake, settings, owner):
    base = Path(tempfile.mkdtemp(prefix="mv-", dir="/tmp"))
    settings.SANDBOX_PKI_DIR = base / "pki"
    settings.SANDBOX_IMAGE_DIR = base / "images"
    settings.SANDBOX_IMAGE_STORE = base / "image-store"
    settings.SANDBOX_STOP_TIMEOUT = 0.1
    settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB = 64
    settings.SANDBOX_HOST_RESERVE_MEMORY_MIB = 0
    settings.SANDBOX_HOST_RESERVE_CPUS = 0
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    UserQuota.objects.update_or_create(
        user=owner, defaults={"max_vms": 100, "max_vcpus": 100, "max_memory_mib": 100_000, "max_disk_gib": 1000}
    )
    env = TwoHosts(base, settings)
    now = timezone.now()
    for name in ("h1", "h2"):
        for sub in ("run", "snap"):
            env.root(name, sub).mkdir(parents=True)
        files = pki.host_cert_issue(name, "127.0.0.1")
        hostd = Hostd(
            env.root(name, "run"),
            blob_roots={"snapshots": env.root(name, "snap")},
            tls_listen="127.0.0.1:0",
            tls_cert=files.cert,
            tls_key=files.key,
            tls_ca=pki.ca_files().cert,
        ).start()
        env.hostds[name] = hostd
        env.hosts[name] = HostFactory(
            name=name,
            hostd_address=f"127.0.0.1:{hostd.daemon.tls_port}",
            cpus=4,
            memory_mib=4096,
            last_seen_at=now,
            hostd_seen_at=now,
        )
    try:
        with env.as_host("h1"):  # the control plane's requests run "on" h1
            yield env
    finally:
        for hostd in env.hostds.values():
            hostd.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _vm_on_h1(two, state: str, owner, disk: bytes = b"disk contents " * 1000) -> VM:
    vm = fake_vm_in(state, owner=owner, host=two.hosts["h1"])
    (two.root("h1", "run") / str(vm.pk) / "overlay.qcow2").write_bytes(disk)
    (two.root("h1", "run") / str(vm.pk) / "serial.log").write_bytes(b"console before the move\n")
    return vm


def test_a_stopped_vm_moves_with_its_disk_and_snapshots(two, owner, operator, fake):
    disk = b"written before the move " * 5000
    vm = _vm_on_h1(two, "stopped", owner, disk)
    snap_dir = two.root("h1", "snap") / "s1"
    snap_dir.mkdir()
    (snap_dir / "disk.qcow2").write_bytes(b"snapshot layer")
    (snap_dir / "snapshot.json").write_text("{}")
    snapshot = SnapshotFactory(vm=vm, directory=str(snap_dir), disk_layer=str(snap_dir / "disk.qcow2"))

    op = vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    vm.refresh_from_db()
    assert (vm.state, vm.host.name, op.action) == ("moving", "h1", "move")
    op = two.run(op)

    assert op.status == "succeeded", op.log
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("stopped", "h2")
    moved = two.root("h2", "run") / str(vm.pk)
    assert hashlib.sha256((moved / "overlay.qcow2").read_bytes()).digest() == hashlib.sha256(disk).digest()
    assert (moved / "serial.log").read_bytes() == b"console before the move\n"
    assert (two.root("h2", "snap") / "s1" / "disk.qcow2").read_bytes() == b"snapshot layer"
    snapshot.refresh_from_db()
    assert snapshot.host.name == "h2"
    # nothing left on the source, nothing temporary on the target
    assert not (two.root("h1", "run") / str(vm.pk)).exists() and not snap_dir.exists()
    assert not list(two.base.rglob(".*.part"))
    assert "copying 4 file(s) from host h1 to h2" in op.log and "removed 2 director(ies)" in op.log
    assert "the copy runs from queue shared" in op.log and "4 file(s) verified on h2; landing there" in op.log
    audit = AuditEvent.objects.get(action="vm.move", object_id=str(vm.pk))
    assert (audit.before["host"], audit.after["host"], audit.actor_id) == ("h1", "h2", operator.pk)


def test_a_running_vm_is_stopped_moved_and_started_on_the_target(two, owner, operator, fake):
    vm = _vm_on_h1(two, "running", owner)
    op = two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator))
    assert op.status == "succeeded", op.log
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("running", "h2")
    calls = fake.vmm.fake_calls(str(vm.pk))
    assert calls.index("shutdown") < calls.index("launch", calls.index("shutdown"))
    assert (two.root("h2", "run") / str(vm.pk) / "spec.json").exists()  # prepared on the target
    assert not (two.root("h1", "run") / str(vm.pk)).exists()


def test_a_failed_copy_leaves_the_vm_running_on_its_source(two, owner, operator, fake, monkeypatch):
    vm = _vm_on_h1(two, "running", owner)
    from vms import moves

    real = moves.host_file_copy_report
    calls = []

    def failing(**kwargs):
        calls.append(kwargs["path"])
        if kwargs["path"].endswith("serial.log"):  # after the overlay was copied
            raise moves.TransferError("the network broke", code="transfer_failed")
        return real(**kwargs)

    monkeypatch.setattr(moves, "host_file_copy_report", failing)
    op = two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator))
    assert op.status == "failed"
    assert "the VM stays on host h1" in op.error
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("running", "h1")
    assert (two.root("h1", "run") / str(vm.pk) / "overlay.qcow2").exists()
    assert not (two.root("h2", "run") / str(vm.pk)).exists()  # the copied overlay was removed


def test_a_failed_landing_leaves_the_vm_stopped_on_its_source(two, owner, operator, fake, monkeypatch):
    vm = _vm_on_h1(two, "stopped", owner)
    from vms import moves

    # The target's worker finds its directories are not the ones its hostd wrote to.
    real_roots = moves._roots

    def roots():
        found = real_roots()
        if found["runtime"] == two.root("h2", "run"):
            found["runtime"] = two.base / "elsewhere"
        return found

    monkeypatch.setattr(moves, "_roots", roots)
    op = two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator))
    assert op.status == "failed" and "not in this host's directories" in op.error
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("stopped", "h1")
    assert (two.root("h1", "run") / str(vm.pk) / "overlay.qcow2").exists()
    assert not (two.root("h2", "run") / str(vm.pk)).exists()


def test_moves_are_refused_clearly(two, owner, operator, fake):
    vm = _vm_on_h1(two, "stopped", owner)
    with pytest.raises(NotPermitted):
        vm_move(vm=vm, host=two.hosts["h2"], actor=owner)
    assert AuditEvent.objects.filter(action="vm.move", result="denied", object_id=str(vm.pk)).exists()
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=vm, host=two.hosts["h1"], actor=operator)
    assert exc.value.code == "same_host"
    Host.objects.filter(name="h2").update(cordoned=True)
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=vm, host=Host.objects.get(name="h2"), actor=operator)
    assert exc.value.code == "no_host"
    Host.objects.filter(name="h2").update(cordoned=False, last_seen_at=None)
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=vm, host=Host.objects.get(name="h2"), actor=operator)
    assert exc.value.code == "host_down"
    Host.objects.filter(name="h2").update(last_seen_at=timezone.now(), memory_mib=100)
    VM.objects.filter(pk=vm.pk).update(state="paused")
    with pytest.raises(ConflictError):
        vm_move(vm=vm, host=Host.objects.get(name="h2"), actor=operator)
    VM.objects.filter(pk=vm.pk).update(state="running")
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=vm, host=Host.objects.get(name="h2"), actor=operator)
    assert exc.value.code == "host_full"
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("running", "h1")
    assert not Operation.objects.filter(action="move").exists()


def test_a_vm_others_build_on_does_not_move(two, owner, operator, fake):
    from snapshots.models import VmLineage

    vm = _vm_on_h1(two, "stopped", owner)
    snapshot = SnapshotFactory(vm=vm)
    clone = VmFactory(owner=owner, host=two.hosts["h1"], template=vm.template)
    VmLineage.objects.create(vm=clone, snapshot=snapshot)
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    assert exc.value.code == "snapshot_in_use" and exc.value.details["vms"] == [clone.name]


def test_drain_moves_what_fits_and_reports_what_stays(two, owner, operator, fake):
    stopped = _vm_on_h1(two, "stopped", owner)
    running = _vm_on_h1(two, "running", owner)
    Host.objects.filter(name="h2").update(memory_mib=128 + 64)  # room for one running VM (128 + 64)
    big = _vm_on_h1(two, "running", owner)
    VM.objects.filter(pk=big.pk).update(memory_mib=1024)
    paused = _vm_on_h1(two, "paused", owner)

    result = hosts.host_drain(host=two.hosts["h1"], actor=operator)

    assert Host.objects.get(name="h1").cordoned
    assert {m["name"] for m in result["moves"]} == {stopped.name, running.name}
    assert all(m["target"] == "h2" and m["mover"] == "move" for m in result["moves"])
    stays = {s["name"]: s["code"] for s in result["stays"]}
    assert stays == {big.name: "host_full", paused.name: "state"}
    for move in result["moves"]:
        assert two.run(Operation.objects.get(pk=move["operation"])).status == "succeeded"
    assert set(VM.objects.filter(host__name="h2").values_list("name", flat=True)) == {stopped.name, running.name}
    assert VM.objects.get(pk=running.pk).state == "running"
    audit = AuditEvent.objects.get(action="host.drain")
    assert len(audit.after["stays"]) == 2


def test_drain_is_for_operators(two, owner):
    with pytest.raises(NotPermitted):
        hosts.host_drain(host=two.hosts["h1"], actor=owner)
    assert not Host.objects.get(name="h1").cordoned


def test_the_api_moves_and_drains(two, api, owner, operator, fake):
    vm = _vm_on_h1(two, "stopped", owner)
    api.as_user(owner)
    assert api.post(f"/api/v1/vms/{vm.pk}/move/", {"host": "h2"}, format="json").status_code == 403
    api.as_user(operator)
    assert api.post(f"/api/v1/vms/{vm.pk}/move/", {"host": "nope"}, format="json").status_code == 400
    response = api.post(f"/api/v1/vms/{vm.pk}/move/", {"host": "h2"}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["action"] == "move"
    assert two.run(Operation.objects.get(pk=response.json()["id"])).status == "succeeded"
    response = api.post(f"/api/v1/hosts/{two.hosts['h2'].pk}/drain/", {}, format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert [m["name"] for m in body["moves"]] == [vm.name] and body["moves"][0]["target"] == "h1"
    with pytest.raises(ApplicationError):  # h1 was cordoned by nothing; h2 is now: no way back
        vm_move(vm=VM.objects.get(pk=vm.pk), host=Host.objects.get(name="h2"), actor=operator)


def test_port_forwards_move_with_the_vm_unless_their_port_is_taken_there(two, owner, operator, fake):
    from networking.models import PortForward

    vm = _vm_on_h1(two, "stopped", owner)
    forward = PortForward.objects.create(vm=vm, host=two.hosts["h1"], protocol="tcp", host_port=20022, guest_port=22)
    other = VmFactory(owner=owner, host=two.hosts["h2"], template=vm.template)
    taken = PortForward.objects.create(vm=other, host=two.hosts["h2"], protocol="tcp", host_port=20022, guest_port=80)
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    assert exc.value.code == "port_taken" and exc.value.details == {"host_ports": ["tcp/20022"]}
    taken.delete()
    assert two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator)).status == "succeeded"
    forward.refresh_from_db()
    assert forward.host.name == "h2"


def test_a_moving_vm_refuses_other_actions_and_the_reconciler_waits_for_its_next_step(two, owner, operator, fake):
    from vms import services
    from vms.operations import vms_reconcile
    from vms.transitions import vm_actions_allowed

    vm = _vm_on_h1(two, "stopped", owner)
    assert "move" not in vm_actions_allowed("stopped")  # an operator's action, not a VM button
    op = vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    for action in ("start", "stop", "delete"):
        with pytest.raises(ConflictError):
            services.vm_action(vm=VM.objects.get(pk=vm.pk), action=action, actor=owner)
    with two.as_host("h1"):
        operation_execute(op.pk)  # stop step: handed to the transfer queue, pending again
    op.refresh_from_db()
    assert (op.status, op.params["step"], op.params["queue"]) == ("pending", "copy", "shared")
    with two.as_host("h1"):
        vms_reconcile(two.hosts["h1"])
    vm.refresh_from_db()
    assert vm.state == "moving"  # not taken for a lost operation
    assert two.run(op).status == "succeeded"


def test_operators_drain_in_the_admin(two, owner, operator, fake):
    from django.test import Client

    from tests.factories import PASSWORD

    vm = _vm_on_h1(two, "stopped", owner)
    client = Client()
    client.login(username=operator.username, password=PASSWORD)
    response = client.post(
        "/admin/vms/host/", {"action": "drain_selected", "_selected_action": [str(two.hosts["h1"].pk)]}, follow=True
    )
    assert response.status_code == 200, response.content[:500]
    shown = [str(m) for m in response.context["messages"]]
    assert "h1: 1 VM(s) moving away" in shown, shown
    assert Host.objects.get(name="h1").cordoned
    op = Operation.objects.get(vm=vm, action="move")
    assert two.run(op).status == "succeeded"
    assert VM.objects.get(pk=vm.pk).host.name == "h2"


def test_a_landing_redelivered_after_the_switch_goes_on_from_there(two, owner, operator, fake):
    vm = _vm_on_h1(two, "running", owner)
    op = vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    for host in ("h1", "h1"):  # stop, copy
        with two.as_host(host):
            operation_execute(op.pk)
    op.refresh_from_db()
    assert op.params["step"] == "land"
    # The target's worker switched the host, then was lost before it booted the VM.
    VM.objects.filter(pk=vm.pk).update(host=two.hosts["h2"])
    op = two.run(op)
    assert op.status == "succeeded", op.log
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("running", "h2")
    assert not (two.root("h1", "run") / str(vm.pk)).exists()


def _steps(two, op: Operation, hosts: tuple[str, ...]) -> Operation:
    for host in hosts:
        with two.as_host(host):
            operation_execute(op.pk)
    op.refresh_from_db()
    return op


def test_a_running_vm_holds_its_size_on_its_target_while_it_moves(two, owner, operator, fake):
    Host.objects.filter(name="h2").update(memory_mib=128 + 64)  # room for one running VM
    first, second = _vm_on_h1(two, "running", owner), _vm_on_h1(two, "running", owner)
    op = vm_move(vm=first, host=two.hosts["h2"], actor=operator)
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=second, host=Host.objects.get(name="h2"), actor=operator)
    assert exc.value.code == "host_full"
    assert two.run(op).status == "succeeded"
    assert VM.objects.get(pk=first.pk).move_target is None
    # A drain sees what its earlier moves hold on the target.
    Host.objects.filter(name="h2").update(memory_mib=2 * (128 + 64))
    third = _vm_on_h1(two, "running", owner)
    result = hosts.host_drain(host=two.hosts["h1"], actor=operator)
    assert len(result["moves"]) == 1 and [s["code"] for s in result["stays"]] == ["host_full"]
    assert {m["name"] for m in result["moves"]} | {s["name"] for s in result["stays"]} == {second.name, third.name}


def test_a_landing_that_no_longer_fits_goes_back_to_the_source(two, owner, operator, fake):
    vm = _vm_on_h1(two, "running", owner)
    op = _steps(two, vm_move(vm=vm, host=two.hosts["h2"], actor=operator), ("h1", "h1"))  # stop, copy
    assert op.params["step"] == "land"
    Host.objects.filter(name="h2").update(memory_mib=100)  # the target shrank meanwhile
    op = two.run(op)
    assert op.status == "failed" and "no room" in op.error, op.log
    vm.refresh_from_db()
    assert (vm.state, vm.host.name, vm.move_target_id) == ("running", "h1", None)
    assert not (two.root("h2", "run") / str(vm.pk)).exists()


def test_a_port_taken_on_the_target_before_the_switch_sends_the_vm_back(two, owner, operator, fake):
    from networking.models import PortForward

    vm = _vm_on_h1(two, "stopped", owner)
    forward = PortForward.objects.create(vm=vm, host=two.hosts["h1"], protocol="tcp", host_port=20022, guest_port=22)
    op = _steps(two, vm_move(vm=vm, host=two.hosts["h2"], actor=operator), ("h1", "h1"))
    other = VmFactory(owner=owner, host=two.hosts["h2"], template=vm.template)
    PortForward.objects.create(vm=other, host=two.hosts["h2"], protocol="tcp", host_port=20022, guest_port=80)
    op = two.run(op)
    assert op.status == "failed" and "tcp/20022" in op.error, op.log
    vm.refresh_from_db()
    forward.refresh_from_db()
    assert (vm.state, vm.host.name, forward.host.name) == ("stopped", "h1", "h1")
    assert not (two.root("h2", "run") / str(vm.pk)).exists()


def test_no_second_move_while_the_first_one_cleans_up(two, owner, operator, fake):
    vm = _vm_on_h1(two, "stopped", owner)
    op = _steps(two, vm_move(vm=vm, host=two.hosts["h2"], actor=operator), ("h1", "h1", "h2"))  # stop, copy, land
    assert (op.status, op.params["step"]) == ("pending", "cleanup")
    with pytest.raises(ConflictError) as exc:
        vm_move(vm=VM.objects.get(pk=vm.pk), host=two.hosts["h1"], actor=operator)
    assert exc.value.code == "move_in_progress"
    assert two.run(op).status == "succeeded"
    assert two.run(vm_move(vm=VM.objects.get(pk=vm.pk), host=two.hosts["h1"], actor=operator)).status == "succeeded"


def test_a_moving_vms_snapshots_are_neither_cloned_nor_deleted(two, owner, operator, fake):
    from snapshots.services import snapshot_clone, snapshot_delete

    vm = _vm_on_h1(two, "stopped", owner)
    snapshot = SnapshotFactory(vm=vm)
    vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    with pytest.raises(ConflictError) as exc:
        snapshot_delete(snapshot=snapshot, actor=None, reason="retention")
    assert exc.value.code == "vm_moving"
    with pytest.raises(ConflictError) as exc:
        snapshot_clone(snapshot=snapshot, actor=owner)
    assert exc.value.code == "vm_moving"
    snapshot.refresh_from_db()
    assert snapshot.state == "ready" and VM.objects.filter(metadata__cloned_from=str(snapshot.pk)).count() == 0


def test_a_stale_copy_of_an_earlier_attempt_is_replaced(two, owner, operator, fake):
    vm = _vm_on_h1(two, "stopped", owner)
    stale = two.root("h2", "run") / str(vm.pk)
    stale.mkdir()
    (stale / "overlay.qcow2").write_bytes(b"half of an earlier, killed attempt")
    op = two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator))
    assert op.status == "succeeded", op.log
    assert (stale / "overlay.qcow2").read_bytes() == b"disk contents " * 1000


def test_a_failed_move_removes_only_the_vms_own_files(two, owner, operator, fake, monkeypatch):
    from vms import moves

    vm = _vm_on_h1(two, "stopped", owner)
    stale = two.root("h2", "run") / str(vm.pk)
    stale.mkdir()
    (stale / "serial.log").write_bytes(b"console before the move\n")  # an earlier attempt's: "already there"
    real = moves.host_file_copy_report

    def failing(**kwargs):
        if kwargs["path"].endswith("serial.log"):
            raise moves.TransferError("the network broke", code="transfer_failed")
        return real(**kwargs)

    monkeypatch.setattr(moves, "host_file_copy_report", failing)
    assert two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator)).status == "failed"
    assert not stale.exists()
    removed = []
    monkeypatch.setattr(moves, "host_file_delete", lambda **kw: removed.append((kw["root"], kw["path"])))
    moves._copies_remove(
        two.hosts["h2"],
        vm,
        {
            "entries": [["images", "base.img"], ["snapshots", "golden/disk.qcow2"], ["runtime", f"{vm.pk}/a"]],
            "snapshot_dirs": [],
        },
    )
    assert removed == [("runtime", f"{vm.pk}/a")]  # the shared image and golden layer stay


def test_a_backing_chain_naming_another_vms_files_is_refused(two, owner, operator, fake, monkeypatch):
    from vms import moves

    vm = _vm_on_h1(two, "stopped", owner)
    victim = _vm_on_h1(two, "stopped", owner, b"another tenant's disk")
    victim_disk = two.root("h1", "run") / str(victim.pk) / "overlay.qcow2"
    monkeypatch.setattr(moves, "backing_chain", lambda layer: [str(victim_disk)])
    op = two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator))
    assert op.status == "failed" and "neither an image" in op.error, op.log
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("stopped", "h1")
    assert not (two.root("h2", "run") / str(victim.pk)).exists() and not (two.root("h2", "run") / str(vm.pk)).exists()


def test_pool_and_golden_builder_vms_do_not_move(two, owner, operator, fake):
    for purpose in ("pool", "golden"):
        vm = _vm_on_h1(two, "stopped", owner)
        VM.objects.filter(pk=vm.pk).update(purpose=purpose)
        with pytest.raises(ConflictError) as exc:
            vm_move(vm=VM.objects.get(pk=vm.pk), host=two.hosts["h2"], actor=operator)
        assert exc.value.code == "not_movable"
    assert not Operation.objects.filter(action="move").exists()


def test_a_backing_chain_on_the_vms_own_snapshot_layer_moves(two, owner, operator, fake, monkeypatch):
    from vms import moves

    vm = _vm_on_h1(two, "stopped", owner)
    snap_dir = two.root("h1", "snap") / "own"
    snap_dir.mkdir()
    (snap_dir / "disk.qcow2").write_bytes(b"own snapshot layer")
    SnapshotFactory(vm=vm, directory=str(snap_dir), disk_layer=str(snap_dir / "disk.qcow2"))
    overlay = two.root("h1", "run") / str(vm.pk) / "overlay.qcow2"
    monkeypatch.setattr(
        moves, "backing_chain", lambda layer: [str(snap_dir / "disk.qcow2")] if layer == overlay else []
    )
    op = two.run(vm_move(vm=vm, host=two.hosts["h2"], actor=operator))
    assert op.status == "succeeded", op.log
    assert (two.root("h2", "snap") / "own" / "disk.qcow2").read_bytes() == b"own snapshot layer"


def test_a_hand_off_of_an_operation_no_longer_running_here_is_not_enqueued(two, owner, operator, fake, monkeypatch):
    from vms import operations

    vm = _vm_on_h1(two, "stopped", owner)
    op = vm_move(vm=vm, host=two.hosts["h2"], actor=operator)
    Operation.objects.filter(pk=op.pk).update(status=Operation.Status.FAILED)  # e.g. the reconciler gave up
    sent = []
    monkeypatch.setattr(operations, "operation_enqueue", lambda op, vm: sent.append(op.pk))
    operations._operation_hand_off(op, operations.OperationHandoff("host.h2", {"step": "land"}, "landing there"))
    op.refresh_from_db()
    assert sent == [] and op.status == "failed" and op.params["step"] == "stop"
