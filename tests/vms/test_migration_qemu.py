"""The ``migrate`` operation end to end with a real QEMU guest: two hosts in two network
namespaces this test creates, joined by a veth underlay (the hosts' tunnel addresses), each
with its own runtime directory and its own hostd (tests/hostd/runner.py); every task runs as its
queue's host (tests/vms/test_migration.py's ``Hosts``), and agent calls go to the VM's host's
hostd. One guest is booted; a background exec started before the move is the same process
afterwards, and the target's hostd streams its output from the start. Both hosts hold
migration certificates, so the stream and the disk copy go over TLS."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.factories import ImageFactory, TemplateFactory, VmFactory
from tests.hostd.runner import Hostd
from tests.vms.test_migration import Hosts
from vms import agent_gateway, hypervisor, services
from vms.hostd.client import HostdClient
from vms.hosts import host_migration_cert
from vms.migration import vm_migrate
from vms.models import VM, Operation
from vms.vmm.process import running_vmm_pid

pytestmark = [pytest.mark.django_db, pytest.mark.vm, pytest.mark.timeout(900)]
IMAGE_DIR = Path(os.environ.get("SANDBOX_IMAGE_DIR", "/work/main/var/images"))
UNDERLAY = {"h1": "10.231.123.1", "h2": "10.231.123.2"}
# The file is replaced by a rename: a reader never sees it empty (``>`` truncates, then writes).
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i; echo $i > /root/counter.new; mv /root/counter.new /root/counter; "
    "sleep 0.2; done"
)


@pytest.fixture
def underlay():
    """Namespaces for h1 and h2 joined by a veth pair carrying the hosts' tunnel addresses."""
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs root and qemu")
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns

    tag = uuid.uuid4().hex[:6]
    names = {"h1": f"msbtest-m1-{tag}", "h2": f"msbtest-m2-{tag}"}
    for name in names.values():
        pr_netns.create(name)
    try:
        with IPRoute(netns=names["h1"]) as ipr:
            ipr.link("add", ifname="ul1", kind="veth", peer="ul2")
            ipr.link("set", index=ipr.link_lookup(ifname="ul2")[0], net_ns_fd=names["h2"])
        for host, ifname in (("h1", "ul1"), ("h2", "ul2")):
            with IPRoute(netns=names[host]) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=UNDERLAY[host], prefixlen=24)
                ipr.link("set", index=index, state="up")
        yield names
    finally:
        for name in names.values():
            try:
                pr_netns.remove(name)
            except OSError:
                pass


@pytest.fixture
def real_hosts(settings, monkeypatch, django_capture_on_commit_callbacks, underlay):
    # Short paths (Unix sockets), traversable by the VMM user.
    top = Path(tempfile.mkdtemp(prefix="vmt-mig-", dir="/tmp"))
    top.chmod(0o711)
    roots = {"h1": top / "h1", "h2": top / "h2"}
    settings.SANDBOX_NETWORKING = False
    settings.SANDBOX_VMM_CGROUP = "msbx-test"
    settings.SANDBOX_PKI_DIR = top / "pki"
    hosts = Hosts(settings, monkeypatch, django_capture_on_commit_callbacks, roots, UNDERLAY)
    for host in hosts.hosts.values():  # as manage.py host_join issues them
        host_migration_cert(host=host)
    daemons = {}
    for name in roots:
        roots[name].chmod(0o711)
        daemons[name] = Hostd(roots[name]).start()
        hosts.hostd_sockets[name] = roots[name] / "hostd.sock"
    hosts.netns.update(underlay)
    hosts.daemons = daemons
    hosts.as_host("h1")
    try:
        yield hosts
    finally:
        for name in roots:
            daemons[name].stop()
            hosts.as_host(name)
            for vm in VM.objects.all():
                hypervisor.driver_for("qemu").cleanup(hypervisor.vm_spec(vm))
        shutil.rmtree(top, ignore_errors=True)


def _sh(vm, command: str) -> str:
    started, _ = agent_gateway.agent_call(vm, "exec_start", {"shell": command}, timeout=10)
    summary, _ = agent_gateway.agent_call(vm, "exec_wait", {"exec_id": started["exec_id"], "timeout": 30}, timeout=40)
    assert summary["result"]["exit_code"] == 0, summary
    got, data = agent_gateway.agent_call(vm, "exec_read", {"exec_id": started["exec_id"], "offset": 0}, timeout=10)
    return data.decode().strip()


def _counter(vm) -> int:
    return int(_sh(vm, "cat /root/counter 2>/dev/null || echo 0") or 0)


def _counter_grows(vm) -> bool:
    first = _counter(vm)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _counter(vm) > first:
            return True
        time.sleep(0.5)
    return False


def test_it_moves_a_running_guest_and_its_background_exec_to_the_other_host(real_hosts, operator):
    from vms.vmm.image import build_image

    env = real_hosts
    artifacts = build_image(IMAGE_DIR, progress=lambda msg: None)
    image = ImageFactory(
        name="mig-real",
        kernel_path=str(artifacts.kernel),
        initramfs_path=str(artifacts.initramfs),
        rootfs_path=str(artifacts.rootfs),
    )
    template = TemplateFactory(name="mig-real", image=image, memory_mib=256, disk_gib=2)
    vm = VmFactory(owner=operator, template=template, host=env.hosts["h1"], memory_mib=256, disk_gib=2)
    with env.capture(execute=True):
        services.vm_action(vm=vm, action="start", actor=operator)
    env.run()
    vm.refresh_from_db()
    assert vm.state == "running", vm.last_error
    started, _ = agent_gateway.agent_call(vm, "exec_start", {"shell": COUNTER}, timeout=10)
    _sh(vm, "echo before > /root/marker && sync")
    assert _counter_grows(vm)
    source_dir = hypervisor.vm_spec(vm).runtime_dir

    with env.capture(execute=True):
        op = vm_migrate(vm=vm, host="h2", actor=operator)
    assert env.run() == ["host.h2", "host.h1", "host.h2", "host.h1"]
    op.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert "top)" in op.log  # only the overlay crossed: the base image is on both hosts
    assert "(TLS)" in op.log  # both hosts hold migration certificates: stream and disk encrypted
    vm.refresh_from_db()
    assert vm.state == "running" and vm.host.name == "h2"
    assert not source_dir.exists()

    env.as_host("h2")
    target_dir = hypervisor.vm_spec(vm).runtime_dir
    assert running_vmm_pid(target_dir) == vm.vmm_pid
    assert _sh(vm, "cat /root/marker") == "before"
    info, _ = agent_gateway.agent_call(vm, "exec_get", {"exec_id": started["exec_id"]}, timeout=10)
    assert info["running"] is True and info["pid"] == started["pid"]
    assert _counter_grows(vm)
    # The target's hostd streams the exec's output from its first byte (written on the source)
    # on to what the process printed here.
    now = _counter(vm)
    seen = b""
    with HostdClient(env.hostd_sockets["h2"], timeout=20) as client:
        for event in client.exec_stream(str(vm.pk), started["exec_id"], offset=0, timeout=20):
            assert event["ev"] == "out", event
            seen += event["data"]
            if str(now).encode() in seen.split():
                break
        attached = client.call("vm_list", {})[0]["vms"]
    numbers = [int(n) for n in seen.split()]
    assert numbers[:3] == [1, 2, 3] and numbers == list(range(1, len(numbers) + 1))
    assert [(v["vm_id"], v["pid"]) for v in attached] == [(str(vm.pk), vm.vmm_pid)]
    env.daemons["h1"].scan()  # the source's hostd lets go of the VM whose VMM is gone
    with HostdClient(env.hostd_sockets["h1"], timeout=20) as client:
        assert client.call("vm_list", {})[0]["vms"] == []
