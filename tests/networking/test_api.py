"""Networks and a VM's port forwards, NICs and egress through the API. Their permission
matrix is declared with every other endpoint's in tests/accounts/test_permission_matrix.py."""

import pytest
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from networking import services
from networking.models import Nic, PortForward


@pytest.fixture
def private_network(owner, grantee, operator):
    network = services.network_create(name="private", cidr="10.231.30.0/24", owner=owner, actor=operator)
    assign_perm("networking.view_network", grantee, network)
    return network


@pytest.fixture
def wired_vm(vm, grantee):
    for perm in ("view", "power"):
        assign_perm(f"vms.{perm}_vm", grantee, vm)
    services.nic_allocate(vm=vm)
    return vm


def test_it_lists_shared_networks_to_all_and_private_ones_to_their_holders(
    api, owner, grantee, stranger, private_network
):
    services.network_default_ensure()
    names = lambda user: sorted(n["name"] for n in api.as_user(user).get("/api/v1/networks/").json()["results"])  # noqa: E731
    assert names(owner) == ["default", "private"]
    assert names(grantee) == ["default", "private"]
    assert names(stranger) == ["default"]


def test_it_lets_only_operators_create_networks_anywhere_and_relax_isolation(
    api, owner, viewer, operator, private_network
):
    body = {
        "name": "lab",
        "cidr": "10.231.40.0/24",
        "egress_mode": "allowlist",
        "egress_rules": [{"cidr": "10.231.250.0/24", "protocol": "tcp", "ports": "80,443"}],
    }
    assert api.as_user(viewer).post("/api/v1/networks/", body, format="json").status_code == 403
    # Users create networks of their own inside the user pool only (tests/networking/test_user_networks.py).
    outside = api.as_user(owner).post("/api/v1/networks/", body, format="json")
    assert outside.status_code == 400 and "10.232.0.0/16" in outside.content.decode()
    created = api.as_user(operator).post("/api/v1/networks/", body, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["gateway"] == "10.231.40.1"
    assert created.json()["bridge"].startswith("msbb")
    assert created.json()["egress_rules"] == [{"cidr": "10.231.250.0/24", "protocol": "tcp", "ports": "80,443"}]
    relax = {"tenant_isolation": False}
    assert api.as_user(owner).patch(f"/api/v1/networks/{private_network.pk}/", relax, format="json").status_code == 403
    ok = api.as_user(operator).patch(f"/api/v1/networks/{private_network.pk}/", relax, format="json")
    assert ok.status_code == 200 and ok.json()["tenant_isolation"] is False
    event = AuditEvent.objects.get(action="network.update", object_id=str(private_network.pk))
    assert event.before["tenant_isolation"] is True and event.after["tenant_isolation"] is False


def test_it_validates_networks(api, operator):
    bad = api.as_user(operator).post("/api/v1/networks/", {"name": "x", "cidr": "10.231.1.5/24"}, format="json")
    assert bad.status_code == 400
    rule = {"name": "y", "cidr": "10.231.2.0/24", "egress_rules": [{"cidr": "nope"}]}
    assert api.as_user(operator).post("/api/v1/networks/", rule, format="json").status_code == 400


def test_it_refuses_to_delete_a_network_in_use_or_the_default(api, operator, owner, vm):
    default = services.network_default_ensure()
    net = services.network_create(name="busy", cidr="10.231.50.0/24", actor=operator)
    services.nic_allocate(vm=vm, network=net)
    assert api.as_user(operator).delete(f"/api/v1/networks/{net.pk}/").status_code == 409
    assert api.as_user(operator).delete(f"/api/v1/networks/{default.pk}/").status_code == 409


def test_it_allocates_forwards_from_the_range_and_refuses_conflicts(api, owner, wired_vm, settings):
    settings.SANDBOX_PORT_FORWARD_RANGE = (20000, 20001)
    settings.SANDBOX_PORT_FORWARD_ADDRESS = "sandbox.example"
    client = api.as_user(owner)
    url = f"/api/v1/vms/{wired_vm.pk}/port-forwards/"
    first = client.post(url, {"guest_port": 80}, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["host_port"] == 20000 and first.json()["address"] == "sandbox.example:20000"
    assert client.post(url, {"guest_port": 81, "host_port": 20000}, format="json").status_code == 409
    assert client.post(url, {"guest_port": 81, "host_port": 20000, "protocol": "udp"}, format="json").status_code == 201
    assert client.post(url, {"guest_port": 81, "host_port": 30000}, format="json").status_code == 400
    assert client.post(url, {"guest_port": 82}, format="json").json()["host_port"] == 20001
    full = client.post(url, {"guest_port": 83}, format="json")
    assert full.status_code == 409 and full.json()["error"]["code"] == "port_range_full"
    listed = client.get(url).json()
    assert [(p["protocol"], p["host_port"]) for p in listed] == [("tcp", 20000), ("tcp", 20001), ("udp", 20000)]


def test_it_refuses_a_forward_for_a_vm_without_nic(api, owner, vm):
    response = api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/port-forwards/", {"guest_port": 80}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_nic"


def test_it_removes_forwards_with_the_vm(owner, wired_vm):
    services.port_forward_create(vm=wired_vm, actor=owner, guest_port=80)
    wired_vm.delete()
    assert not PortForward.objects.exists() and not Nic.objects.exists()


def test_it_sets_and_shows_per_vm_egress(api, owner, wired_vm):
    client = api.as_user(owner)
    body = {"mode": "allowlist", "rules": [{"cidr": "10.231.250.0/24", "protocol": "tcp", "ports": "443"}]}
    assert client.put(f"/api/v1/vms/{wired_vm.pk}/egress/", body, format="json").status_code == 200
    nics = client.get(f"/api/v1/vms/{wired_vm.pk}/nics/").json()
    assert nics[0]["egress_mode"] == "allowlist"
    assert nics[0]["egress_rules"] == [{"cidr": "10.231.250.0/24", "protocol": "tcp", "ports": "443"}]
    assert nics[0]["ip"] == "10.231.0.2" and nics[0]["prefix"] == 24
    bad = client.put(
        f"/api/v1/vms/{wired_vm.pk}/egress/",
        {"mode": "allowlist", "rules": [{"cidr": "1.2.3.0/24", "ports": "80"}]},
        format="json",
    )
    assert bad.status_code == 400  # ports without a protocol
