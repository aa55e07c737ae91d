"""A real QEMU VM (TCG) moved between two "hosts" of this machine: each with its own runtime and
snapshot directories and its own hostd (the control plane reaches h2's over mutual TLS), each
step of the move run as that host's worker would run it (``TwoHosts.as_host``). A file written
in the guest before the move is read back after it; the disk overlay's bytes on the target are
the source's (sha256)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.utils import timezone

from tests.factories import HostFactory, ImageFactory, TemplateFactory, VmFactory
from tests.hostd.runner import Hostd
from tests.vms.test_moves import TwoHosts
from vms import hypervisor, pki
from vms.models import VM, Operation
from vms.moves import vm_move
from vms.operations import operation_execute, operation_new

pytestmark = [pytest.mark.django_db, pytest.mark.vm, pytest.mark.timeout(900)]

IMAGE_DIR = Path(os.environ.get("SANDBOX_IMAGE_DIR", "/work/main/var/images"))


@pytest.fixture
def qemu_two(settings, monkeypatch, owner):
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs root and qemu-system-x86_64")
    from vms.vmm.image import build_image

    artifacts = build_image(IMAGE_DIR)  # cached: built by the machine's set-up
    base = Path(tempfile.mkdtemp(prefix="mvq-", dir="/tmp"))
    base.chmod(0o711)  # the VMM user reaches its runtime directory through it
    settings.SANDBOX_PKI_DIR = base / "pki"
    settings.SANDBOX_IMAGE_DIR = IMAGE_DIR
    settings.SANDBOX_IMAGE_STORE = base / "image-store"
    settings.SANDBOX_NETWORKING = False
    settings.SANDBOX_NETNS = ""  # no NIC: the VMM needs no namespace of ours
    settings.SANDBOX_VMM_CGROUP = os.environ.get("SANDBOX_SYSTEST_CGROUP", "msbx-test")
    settings.SANDBOX_STOP_TIMEOUT = 60.0
    settings.SANDBOX_BOOT_TIMEOUT = 240.0
    monkeypatch.setattr(hypervisor, "driver_name_select", lambda: "qemu")
    env = TwoHosts(base, settings)
    now = timezone.now()
    for name in ("h1", "h2"):
        for sub in ("run", "snap"):
            env.root(name, sub).mkdir(parents=True)
        (base / name).chmod(0o711)
        env.root(name, "run").chmod(0o711)
        files = pki.host_cert_issue(name, "127.0.0.1")
        env.hostds[name] = Hostd(
            env.root(name, "run"),
            blob_roots={"snapshots": env.root(name, "snap"), "images": IMAGE_DIR},
            tls_listen="127.0.0.1:0",
            tls_cert=files.cert,
            tls_key=files.key,
            tls_ca=pki.ca_files().cert,
        ).start()
        env.hosts[name] = HostFactory(
            name=name,
            hostd_address=f"127.0.0.1:{env.hostds[name].daemon.tls_port}",
            cpus=4,
            memory_mib=8192,
            last_seen_at=now,
            hostd_seen_at=now,
        )
    image = ImageFactory(
        name="move-linux",
        kernel_path=str(artifacts.kernel),
        initramfs_path=str(artifacts.initramfs),
        rootfs_path=str(artifacts.rootfs),
    )
    template = TemplateFactory(name="move-linux", image=image, memory_mib=256, disk_gib=2)
    vm = VmFactory(owner=owner, host=env.hosts["h1"], template=template, state="creating", driver="", memory_mib=256)
    try:
        with env.as_host("h1"):
            yield env, vm
    finally:
        for name in ("h2", "h1"):
            with env.as_host(name):
                vm.refresh_from_db()
                hypervisor.driver_for("qemu").cleanup(hypervisor.vm_spec(vm))
        for hostd in env.hostds.values():
            hostd.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _exec(api, vm, command: str) -> dict:
    response = api.post(f"/api/v1/vms/{vm.pk}/exec/", {"command": command, "timeout": 60}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def _step(env: TwoHosts, op: Operation, queue: str) -> Operation:
    op.refresh_from_db()
    assert op.status == "pending" and (op.params.get("queue") or "host.h1") == queue, op.log
    with env.as_host("h1" if queue == "shared" else queue.removeprefix("host.")):
        operation_execute(op.pk)
    op.refresh_from_db()
    return op


def test_a_running_qemu_vm_moves_with_its_data(qemu_two, api, owner, operator):
    env, vm = qemu_two
    create = operation_new(vm=vm, action="create", actor=owner, params={"start": True})
    create = _step(env, create, "host.h1")
    assert create.status == "succeeded", create.log
    api.as_user(owner)
    written = _exec(api, vm, "head -c 300000 /dev/urandom > /root/moved.bin && sync && sha256sum /root/moved.bin")
    assert written["exit_code"] == 0, written
    digest = written["stdout"].split()[0]

    op = vm_move(vm=VM.objects.get(pk=vm.pk), host=env.hosts["h2"], actor=operator)
    op = _step(env, op, "host.h1")  # stop: the guest powers off, its files are listed
    op = _step(env, op, "shared")  # copy, from the control plane (h1 here): the files go to h2
    source_overlay = env.root("h1", "run") / str(vm.pk) / "overlay.qcow2"
    target_overlay = env.root("h2", "run") / str(vm.pk) / "overlay.qcow2"
    copied = {f["path"]: f["sha256"] for f in op.params["files"]}
    overlay_sha = hashlib.sha256(source_overlay.read_bytes()).hexdigest()
    assert copied[f"{vm.pk}/overlay.qcow2"] == overlay_sha
    assert hashlib.sha256(target_overlay.read_bytes()).hexdigest() == overlay_sha
    assert VM.objects.get(pk=vm.pk).host.name == "h1"  # not switched before the target lands it

    op = _step(env, op, "host.h2")  # land: recorded on h2, booted there
    vm.refresh_from_db()
    assert (vm.state, vm.host.name) == ("running", "h2"), op.log
    assert source_overlay.exists()  # the source keeps its files until the last step
    op = _step(env, op, "host.h1")  # cleanup on the source
    assert op.status == "succeeded", op.log
    assert not (env.root("h1", "run") / str(vm.pk)).exists()

    # The control plane (still "h1" here) reaches the guest through h2's hostd over TLS.
    read = _exec(api, vm, "sha256sum /root/moved.bin")
    assert read["exit_code"] == 0 and read["stdout"].split()[0] == digest
