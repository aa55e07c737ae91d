"""Several NICs per VM: chosen at create time, added and removed later (hot-plugged where the
driver can), configured in the guest through its agent. The VMs run on the fake driver
(tests/vms/conftest.py); their TAPs and rules live in the test's own namespace (``host_ns``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guardian.shortcuts import assign_perm
from pyroute2 import IPRoute

from accounts.models import AuditEvent
from networking import services
from networking.models import Nic
from tests.factories import TemplateFactory
from tests.vms.conftest import fake, fake_vm_in, run_operations  # noqa: F401 - fixture
from vms.hypervisor import vm_spec
from vms.models import VM, Operation
from vms.vmm.base import NicDevice, VmSpec
from vms.vmm.cloud_hypervisor import build_vm_config
from vms.vmm.qemu import QemuDriver


@pytest.fixture
def wired(fake, host_ns, settings):  # noqa: F811 - the imported fixture
    """The fake driver with networking on, plumbing inside the test's namespace."""
    settings.SANDBOX_NETWORKING = True
    settings.SANDBOX_NETWORK_IP_FORWARD = False
    return fake


@pytest.fixture
def lab(operator):
    return services.network_create(name="lab", cidr="10.231.60.0/24", actor=operator)


@pytest.fixture
def template():
    return TemplateFactory(name="nic-template")


def _links(netns: str) -> set[str]:
    with IPRoute(netns=netns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _create(api, user, **body):
    return api.as_user(user).post("/api/v1/vms/", {"template": "nic-template", **body}, format="json")


def test_a_vm_created_with_two_nics_on_two_networks_boots_with_both(api, owner, wired, host_ns, lab, template):
    response = _create(api, owner, name="two", nics=[{"network": "default"}, {"network": "lab", "ip": "10.231.60.10"}])
    assert response.status_code == 202, response.content
    run_operations()
    vm = VM.objects.get(pk=response.json()["id"])
    assert vm.state == "running", vm.last_error
    nics = list(Nic.objects.filter(vm=vm).order_by("index").select_related("network"))
    assert [(n.index, n.network.name, n.ip) for n in nics] == [(0, "default", "10.231.0.2"), (1, "lab", "10.231.60.10")]
    # The VMM got both TAPs (net0 from tap/mac, net1 as an extra NIC), which exist on their bridges.
    assert wired.vmm.fake_vm(str(vm.pk)).nics == {"net0": nics[0].tap, "net1": nics[1].tap}
    spec = VmSpec.from_json((Path(wired.runtime) / str(vm.pk) / "spec.json").read_text())
    assert spec.tap == nics[0].tap and spec.extra_nics == (NicDevice(nics[1].tap, nics[1].mac, "net1"),)
    assert {nics[0].tap, nics[1].tap, nics[0].network.bridge, lab.bridge} <= _links(host_ns)
    # The first NIC is configured by the guest's init (kernel command line), the second by the agent.
    assert "sandbox.ip=10.231.0.2/24" in spec.cmdline and "10.231.60.10" not in spec.cmdline
    execs = [args for who, op, args in wired.agent.calls if op == "exec_start" and who == str(vm.pk)]
    assert len(execs) == 1
    assert execs[0]["argv"][4:6] == [nics[1].mac, "10.231.60.10/24"]
    log = Operation.objects.get(pk=response.json()["operation"]).log
    assert "network: guest net1 10.231.60.10/24 configured" in log


def test_a_guest_that_cannot_configure_a_nic_is_logged_not_hidden(api, owner, wired, lab, template):
    wired.agent.exit_code = 3
    response = _create(api, owner, name="half", nics=[{"network": "default"}, {"network": "lab"}])
    run_operations()
    log = Operation.objects.get(pk=response.json()["operation"]).log
    assert "warning: guest NIC net1" in log and "stderr out" in log


def test_bad_nic_requests_are_refused_and_change_nothing(api, owner, grantee, operator, fake, settings, lab, template):  # noqa: F811
    settings.SANDBOX_NETWORKING = True
    private = services.network_create(name="mine", cidr="10.231.61.0/24", owner=owner, actor=operator)
    taken_vm = fake_vm_in("stopped", owner=owner)
    services.nic_allocate(vm=taken_vm, network=lab, ip="10.231.60.20")
    before = (VM.objects.count(), Nic.objects.count(), AuditEvent.objects.filter(action="vm.create").count())
    cases = [
        ([{"network": "lab", "ip": "10.231.99.5"}], 400, "outside"),
        ([{"network": "lab", "ip": "10.231.60.1"}], 400, "gateway"),
        ([{"network": "lab", "ip": "10.231.60.255"}], 400, "outside"),
        ([{"network": "lab", "ip": "10.231.60.20"}], 400, "taken"),
        ([{"network": "lab", "ip": "10.231.60.30"}, {"network": "lab", "ip": "10.231.60.30"}], 400, "twice"),
        ([{"network": "nope"}], 400, "Unknown network"),
        ([], 400, ""),
    ]
    for nics, code, words in cases:
        response = _create(api, owner, name="bad", nics=nics)
        assert response.status_code == code, (nics, response.content)
        assert words in response.content.decode(), (nics, response.content)
    # Someone else's private network: invisible is unknown (400), visible but not usable is 403.
    assert _create(api, grantee, name="bad", nics=[{"network": "mine"}]).status_code == 400
    assign_perm("networking.view_network", grantee, private)
    assert _create(api, grantee, name="bad", nics=[{"network": "mine"}]).status_code == 403
    assert AuditEvent.objects.filter(action="vm.nic_attach", result="denied").exists()
    after = (VM.objects.count(), Nic.objects.count(), AuditEvent.objects.filter(action="vm.create").count())
    assert after == before


def test_nics_are_added_and_removed_on_a_stopped_vm(api, owner, stranger, fake, settings, lab):  # noqa: F811
    settings.SANDBOX_NETWORKING = True
    vm = fake_vm_in("stopped", owner=owner)
    services.nic_allocate(vm=vm)
    url = f"/api/v1/vms/{vm.pk}/nics/"
    assert api.as_user(stranger).post(url, {"network": "lab"}, format="json").status_code == 404
    added = api.as_user(owner).post(url, {"network": "lab", "ip": "10.231.60.7"}, format="json")
    assert added.status_code == 201, added.content
    assert added.json()["ip"] == "10.231.60.7" and added.json()["index"] == 1 and added.json()["operation"] is None
    assert [n.device_id for n in vm_spec(vm).extra_nics] == ["net1"]
    nic_id = added.json()["id"]
    assert api.as_user(owner).delete(f"{url}not-a-uuid/").status_code == 404
    assert api.as_user(owner).delete(f"{url}{nic_id}/").status_code == 204
    assert not Nic.objects.filter(pk=nic_id).exists()
    assert vm_spec(vm).extra_nics == ()
    events = AuditEvent.objects.filter(object_id=str(vm.pk), action__in=["vm.nic_attach", "vm.nic_detach"])
    assert [e.action for e in events.order_by("id")][-2:] == ["vm.nic_attach", "vm.nic_detach"]


def test_a_running_vm_whose_driver_cannot_hotplug_answers_restart_required(api, owner, fake, settings, lab):  # noqa: F811
    settings.SANDBOX_NETWORKING = True
    vm = fake_vm_in("running", owner=owner)
    nic = services.nic_allocate(vm=vm)
    first = Nic.objects.get(tap=nic.tap)
    url = f"/api/v1/vms/{vm.pk}/nics/"
    refused = api.as_user(owner).post(url, {"network": "lab"}, format="json")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "restart_required"
    assert api.as_user(owner).delete(f"{url}{first.pk}/").json()["error"]["code"] == "restart_required"
    assert Nic.objects.filter(vm=vm).count() == 1
    # QEMU's microvm machine cannot either, whatever the VM's state says.
    VM.objects.filter(pk=vm.pk).update(driver="qemu")
    refused = api.as_user(owner).post(url, {"network": "lab"}, format="json")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "restart_required"


def test_nics_are_hot_plugged_and_unplugged_where_the_driver_can(api, owner, wired, host_ns, lab):
    wired.vmm.fake_capabilities_set(nic_hotplug=True)
    vm = fake_vm_in("stopped", owner=owner)
    services.nic_allocate(vm=vm)
    from vms import services as vm_services

    vm_services.vm_action(vm=vm, action="start", actor=owner)
    run_operations()
    vm.refresh_from_db()
    assert vm.state == "running"
    url = f"/api/v1/vms/{vm.pk}/nics/"
    added = api.as_user(owner).post(url, {"network": "lab"}, format="json")
    assert added.status_code == 202, added.content
    vm.refresh_from_db()
    assert vm.state == "resizing"
    run_operations()
    vm.refresh_from_db()
    assert vm.state == "running", vm.last_error
    nic = Nic.objects.get(pk=added.json()["id"])
    assert wired.vmm.fake_vm(str(vm.pk)).nics["net1"] == nic.tap
    assert nic.tap in _links(host_ns) and Nic.objects.get(pk=nic.pk).plumbed
    execs = [args for who, op, args in wired.agent.calls if op == "exec_start" and who == str(vm.pk)]
    assert execs[-1]["argv"][4:6] == [nic.mac, f"{nic.ip}/24"]
    removed = api.as_user(owner).delete(f"{url}{nic.pk}/")
    assert removed.status_code == 202, removed.content
    run_operations()
    vm.refresh_from_db()
    assert vm.state == "running"
    assert "net1" not in wired.vmm.fake_vm(str(vm.pk)).nics
    assert not Nic.objects.filter(pk=nic.pk).exists() and nic.tap not in _links(host_ns)


def test_a_failed_hot_plug_takes_the_new_nic_away(api, owner, wired, host_ns, lab):
    from vms.vmm.base import VmmError

    wired.vmm.fake_capabilities_set(nic_hotplug=True)
    vm = fake_vm_in("running", owner=owner)
    services.nic_allocate(vm=vm)
    wired.vmm.fake_fail("nic_add", VmmError("no free slot"))
    added = api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/nics/", {"network": "lab"}, format="json")
    assert added.status_code == 202
    run_operations()
    vm.refresh_from_db()
    assert vm.state == "running"
    assert not Nic.objects.filter(pk=added.json()["id"]).exists()
    assert Operation.objects.get(pk=added.json()["operation"]).status == "failed"


def test_the_vmms_get_every_nic(tmp_path):
    spec = VmSpec(
        vm_id="v1",
        runtime_dir=tmp_path,
        kernel=tmp_path / "k",
        base_image=tmp_path / "b",
        tap="msbt0",
        mac="02:00:00:00:00:01",
        extra_nics=(NicDevice("msbt1", "02:00:00:00:00:02", "net1"),),
    )
    argv = " ".join(QemuDriver(accel="tcg").build_argv(spec, acceleration="tcg", tap_fd=7, extra_tap_fds=(8,)))
    assert "-netdev tap,id=net0,fd=7" in argv and "-netdev tap,id=net1,fd=8" in argv
    assert "netdev=net1,mac=02:00:00:00:00:02" in argv
    config = build_vm_config(spec, firmware="")
    assert config["net"] == [
        {"id": "net0", "tap": "msbt0", "mac": "02:00:00:00:00:01"},
        {"id": "net1", "tap": "msbt1", "mac": "02:00:00:00:00:02"},
    ]
    assert VmSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["extra_nics"] == [
        {"tap": "msbt1", "mac": "02:00:00:00:00:02", "device_id": "net1"}
    ]


def test_a_dual_stack_nic_takes_a_fixed_ipv6_address_and_gets_it_through_the_agent(
    api, owner, operator, wired, lab, template
):
    services.network_create(name="v6net", cidr="10.231.62.0/24", cidr6="fd00:231:62::/64", actor=operator)
    response = _create(api, owner, name="six", nics=[{"network": "v6net", "ip6": "fd00:231:62::50"}])
    assert response.status_code == 202, response.content
    run_operations()
    vm = VM.objects.get(pk=response.json()["id"])
    assert vm.state == "running", vm.last_error
    nic = Nic.objects.get(vm=vm)
    assert (nic.ip, nic.ip6) == ("10.231.62.2", "fd00:231:62::50")
    # The first NIC's IPv4 comes from the kernel command line; its IPv6 and route from the agent.
    execs = [args for who, op, args in wired.agent.calls if op == "exec_start" and who == str(vm.pk)]
    assert [e["argv"][4:] for e in execs] == [[nic.mac, "10.231.62.2/24", "fd00:231:62::50/64", "fd00:231:62::1"]]
    listed = api.as_user(owner).get(f"/api/v1/vms/{vm.pk}/nics/").json()
    assert listed[0]["ip6"] == "fd00:231:62::50" and listed[0]["gateway6"] == "fd00:231:62::1"
    before = Nic.objects.count()
    for nics, words in (
        ([{"network": "v6net", "ip6": "fd00:231:62::50"}], "taken"),
        ([{"network": "v6net", "ip6": "fd00:231:63::5"}], "prefix"),
        ([{"network": "v6net", "ip6": "fd00:231:62::1"}], "gateway"),
        ([{"network": "lab", "ip6": "fd00:231:62::51"}], "no IPv6 prefix"),
    ):
        refused = _create(api, owner, name="six-b", nics=nics)
        assert refused.status_code == 400 and words in refused.content.decode(), (nics, refused.content)
    assert Nic.objects.count() == before
