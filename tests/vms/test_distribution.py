"""Images copied to a host on demand (vms.distribution): a VM placed on a host lacking its image
gets the image's files copied there from a host holding a verified copy before its VMM starts,
sha256-checked, logged on the operation, recorded in the inventory and audited; a source whose
copy does not verify is not used (and is marked corrupt), a corrupt copy on the target is
replaced. Two hostds on this machine: "h1" (the source, over mutual TLS) and "h2" (the VM's
host: this test process is its worker, with its own image directory and hostd socket); the VM
runs on the fake driver."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import AuditEvent
from tests.factories import HostFactory, ImageFactory, TemplateFactory, VmFactory
from tests.hostd.runner import Hostd
from vms import pki
from vms.models import VM, Host, HostImage, Operation, VmState
from vms.operations import operation_execute, operation_new

pytestmark = pytest.mark.django_db

FILES = {
    "rootfs": ("d1/rootfs.ext4", b"R" * 300_000),
    "kernel": ("d1/vmlinuz", b"K" * 5000),
    "initramfs": ("d1/initrd", b"I" * 700),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hosts(fake, settings):
    """h2 (this worker's host, no image yet), h1 and h3 (each holding a verified copy, reached
    over mutual TLS)."""
    base = Path(tempfile.mkdtemp(prefix="dist-", dir="/tmp"))  # Unix socket paths are short
    names = ("h1", "h2", "h3")
    dirs = {name: {sub: base / name / sub for sub in ("run", "images", "store", "snap")} for name in names}
    for host_dirs in dirs.values():
        for directory in host_dirs.values():
            directory.mkdir(parents=True)
    settings.SANDBOX_PKI_DIR = base / "pki"
    settings.SANDBOX_HOST_NAME = "h2"
    settings.SANDBOX_HOSTD_SOCKET = dirs["h2"]["run"] / "hostd.sock"
    settings.SANDBOX_IMAGE_DIR = dirs["h2"]["images"]
    settings.SANDBOX_IMAGE_STORE = dirs["h2"]["store"]
    settings.SANDBOX_SNAPSHOT_DIR = dirs["h2"]["snap"]

    def roots(name):
        return {"images": dirs[name]["images"], "image_store": dirs[name]["store"], "snapshots": dirs[name]["snap"]}

    now = timezone.now()
    daemons = [Hostd(dirs["h2"]["run"], blob_roots=roots("h2")).start()]
    rows = {"h2": HostFactory(name="h2", last_seen_at=now, hostd_seen_at=now)}
    for name in ("h1", "h3"):
        files = pki.host_cert_issue(name, "127.0.0.1")
        remote = Hostd(
            dirs[name]["run"],
            blob_roots=roots(name),
            tls_listen="127.0.0.1:0",
            tls_cert=files.cert,
            tls_key=files.key,
            tls_ca=pki.ca_files().cert,
        ).start()
        daemons.append(remote)
        address = f"127.0.0.1:{remote.daemon.tls_port}"
        rows[name] = HostFactory(name=name, hostd_address=address, last_seen_at=now, hostd_seen_at=now)
        # The image's files there, as that host's worker recorded them (same layout on every host).
        for path, data in FILES.values():
            (dirs[name]["images"] / path).parent.mkdir(parents=True, exist_ok=True)
            (dirs[name]["images"] / path).write_bytes(data)
    image = ImageFactory(
        name="small",
        rootfs_path=str(dirs["h2"]["images"] / FILES["rootfs"][0]),
        kernel_path=str(dirs["h2"]["images"] / FILES["kernel"][0]),
        initramfs_path=str(dirs["h2"]["images"] / FILES["initramfs"][0]),
        file_sha256={role: _sha(data) for role, (_path, data) in FILES.items()},
        sha256=_sha(FILES["rootfs"][1]),
    )
    for name in ("h1", "h3"):
        HostImage.objects.create(host=rows[name], image=image, status=HostImage.Status.PRESENT)
    # h1 was checked last: the first source tried.
    HostImage.objects.filter(host=rows["h3"]).update(verified_at=now - timedelta(minutes=1))
    try:
        yield rows, image, dirs
    finally:
        for daemon in daemons:
            daemon.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def run_as_workers(op: Operation, settings) -> Operation:
    """Run ``op``'s steps, each as the worker that consumes the queue it was sent to: the VM's
    host's ("h2": this machine's hostd socket, image directory) or the control plane's
    (``SANDBOX_TRANSFER_QUEUE``: no host of its own, it relays between hostds)."""
    for _ in range(6):
        op.refresh_from_db()
        if op.status != Operation.Status.PENDING:
            break
        queue = op.params.get("queue") or VM.objects.get(pk=op.vm_id).host.queue
        settings.SANDBOX_HOST_NAME = "control" if queue == settings.SANDBOX_TRANSFER_QUEUE else queue[len("host.") :]
        try:
            operation_execute(op.pk)
        finally:
            settings.SANDBOX_HOST_NAME = "h2"
    op.refresh_from_db()
    return op


def _create_on(host, owner, image, settings):
    vm = VmFactory(owner=owner, host=host, state=VmState.CREATING, template=TemplateFactory(name="small", image=image))
    op = operation_new(vm=vm, action="create", actor=owner, params={"start": True})
    return vm, run_as_workers(op, settings)


def test_a_vm_on_a_host_lacking_its_image_gets_it_copied_and_verified_before_it_boots(hosts, owner, fake, settings):
    rows, image, dirs = hosts
    vm, op = _create_on(rows["h2"], owner, image, settings)
    assert op.status == Operation.Status.SUCCEEDED, op.error
    vm.refresh_from_db()
    assert vm.state == VmState.RUNNING
    for path, data in FILES.values():
        assert (dirs["h2"]["images"] / path).read_bytes() == data
    assert "image small is not on this host: a control-plane worker copies it from another host" in op.log
    assert "image small copied from host h1" in op.log
    assert "image small verified on this host" in op.log
    # copied before the VMM was prepared and launched
    assert op.log.index("verified on this host") < op.log.index("preparing disk overlay")
    row = HostImage.objects.get(host=rows["h2"], image=image)
    assert row.status == HostImage.Status.PRESENT
    event = AuditEvent.objects.get(action="image.copy")
    assert event.after["host"] == "h2" and event.after["source"] == "h1"

    # The next VM finds it there: nothing copied again.
    _vm2, op2 = _create_on(rows["h2"], owner, image, settings)
    assert op2.status == Operation.Status.SUCCEEDED
    assert "copying" not in op2.log
    assert AuditEvent.objects.filter(action="image.copy").count() == 1


def test_a_source_whose_copy_does_not_verify_is_marked_corrupt_and_the_next_one_is_used(hosts, owner, fake, settings):
    rows, image, dirs = hosts
    (dirs["h1"]["images"] / FILES["kernel"][0]).write_bytes(b"X" * 5000)  # rotted since h1 last checked
    vm, op = _create_on(rows["h2"], owner, image, settings)
    assert op.status == Operation.Status.SUCCEEDED, op.error
    assert "copy from host h1 failed" in op.log and "expected" in op.log
    assert "image small copied from host h3" in op.log
    assert (dirs["h2"]["images"] / FILES["kernel"][0]).read_bytes() == FILES["kernel"][1]
    # h1 is no longer a source until its own inventory pass hashes its files again.
    source = HostImage.objects.get(host=rows["h1"], image=image)
    assert source.status == HostImage.Status.CORRUPT and source.files == {}
    assert "a copy to host h2 failed" in source.error


def test_when_no_source_verifies_the_create_fails_clearly_and_leaves_no_bad_file(hosts, owner, fake, settings):
    rows, image, dirs = hosts
    for name in ("h1", "h3"):
        (dirs[name]["images"] / FILES["kernel"][0]).write_bytes(b"X" * 5000)
    vm, op = _create_on(rows["h2"], owner, image, settings)
    assert op.status == Operation.Status.FAILED
    assert "could not be copied to host h2" in op.error
    assert "h1: " in op.error and "h3: " in op.error
    vm.refresh_from_db()
    assert vm.state == VmState.ERROR
    assert not (dirs["h2"]["images"] / FILES["kernel"][0]).exists()
    assert not list(dirs["h2"]["images"].rglob(".*"))  # no temporary file left either
    assert set(HostImage.objects.filter(status=HostImage.Status.CORRUPT).values_list("host__name", flat=True)) == {
        "h1",
        "h3",
    }


def test_a_corrupt_copy_on_the_target_is_replaced_by_a_verified_one(hosts, owner, fake, settings):
    rows, image, dirs = hosts
    bad = dirs["h2"]["images"] / FILES["rootfs"][0]
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"corrupt")
    vm, op = _create_on(rows["h2"], owner, image, settings)
    assert op.status == Operation.Status.SUCCEEDED, op.error
    assert "is corrupt on this host (rootfs has sha256" in op.log
    assert "deleting the corrupt rootfs here" in op.log
    assert bad.read_bytes() == FILES["rootfs"][1]
    assert HostImage.objects.get(host=rows["h2"], image=image).status == HostImage.Status.PRESENT


def test_no_source_up_fails_the_create_clearly(hosts, owner, fake, settings):
    rows, image, _dirs = hosts
    HostImage.objects.filter(host=rows["h1"]).update(status=HostImage.Status.CORRUPT)
    Host.objects.filter(name="h3").update(last_seen_at=timezone.now() - timedelta(hours=1))  # down
    vm, op = _create_on(rows["h2"], owner, image, settings)
    assert op.status == Operation.Status.FAILED
    assert "no other host that is up holds a verified copy" in op.error


def test_the_reconciler_gives_a_boot_whose_image_is_being_copied_a_moves_time(fake, owner, settings, monkeypatch):
    from vms import operations

    monkeypatch.setattr(operations, "host_heartbeat", lambda host, now: True)
    host = HostFactory(name=settings.SANDBOX_HOST_NAME)
    vm = VmFactory(owner=owner, host=host, state=VmState.CREATING)
    op = operation_new(vm=vm, action="create", actor=owner, params={"start": True, "image_copy": {"image": "x"}})
    started = timezone.now() - timedelta(minutes=30)  # far past a boot's limit, well within a copy's
    Operation.objects.filter(pk=op.pk).update(status="running", worker="control:1", started_at=started, attempts=1)
    assert operations.vms_reconcile(host)["stuck"] == 0
    Operation.objects.filter(pk=op.pk).update(params={"start": True})  # an ordinary boot that long: retried
    assert operations.vms_reconcile(host)["stuck"] == 1
    op.refresh_from_db()
    assert op.status == "pending" and "was lost; retrying" in op.log
