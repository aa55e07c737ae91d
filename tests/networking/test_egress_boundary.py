"""Egress as a tenant boundary: a VM's owner can only narrow its network's policy (an operator
widens), and default egress never reaches link-local (cloud metadata), private ranges or the
host's own networks unless an operator opens an exception. The "metadata service", the "LAN"
and the host's "public" network are servers this test places in its own namespace behind the
host namespace: no packet leaves the namespaces the test created."""

from __future__ import annotations

import pytest
from pyroute2 import IPRoute

from accounts.models import AuditEvent
from networking import selectors, services
from networking.models import EgressMode, EgressRule, Nic
from tests.factories import HostFactory, VmFactory
from tests.networking.netenv import TcpServer, tcp_fetch
from tests.networking.test_traffic import lab  # noqa: F401 - fixture

METADATA = "169.254.169.254"
LAN_SERVICE = "192.168.77.10"
HOST_NET_SERVICE = "198.51.100.10"  # not private: blocked because it is one of the host's networks


# --- who may widen -------------------------------------------------------------------------


@pytest.fixture
def vm_on(db, operator):
    def make(owner, *, mode=EgressMode.ALLOW, rules=None):
        network = services.network_create(
            name=f"n{Nic.objects.count()}",
            cidr=f"10.231.{70 + Nic.objects.count()}.0/24",
            actor=operator,
            egress_mode=mode,
            egress_rules=rules,
        )
        vm = VmFactory(owner=owner, host=HostFactory())
        services.nic_allocate(vm=vm, network=network)
        return vm, network

    return make


def _put(api, user, vm, body):
    return api.as_user(user).put(f"/api/v1/vms/{vm.pk}/egress/", body, format="json")


def test_an_owner_cannot_lift_the_operators_deny(api, owner, operator, vm_on):
    vm, _ = vm_on(owner, mode=EgressMode.DENY)
    response = _put(api, owner, vm, {"mode": "allow"})
    assert response.status_code == 403, response.content
    assert Nic.objects.get(vm=vm).egress_mode == ""
    assert AuditEvent.objects.filter(action="vm.egress_update", result="denied").exists()
    assert _put(api, owner, vm, {"mode": "allowlist", "rules": [{"cidr": "8.8.8.8/32"}]}).status_code == 403
    assert _put(api, owner, vm, {"mode": "deny"}).status_code == 200  # narrowing (here: the same) is fine
    assert _put(api, owner, vm, {"mode": ""}).status_code == 200


def test_an_owner_may_narrow_and_an_operator_may_widen(api, owner, operator, vm_on):
    vm, _ = vm_on(
        owner, mode=EgressMode.ALLOWLIST, rules=[{"cidr": "203.0.113.0/24", "protocol": "tcp", "ports": "443"}]
    )
    inside = {"mode": "allowlist", "rules": [{"cidr": "203.0.113.5/32", "protocol": "tcp", "ports": "443"}]}
    assert _put(api, owner, vm, inside).status_code == 200
    for outside in (
        {"cidr": "203.0.0.0/16", "protocol": "tcp", "ports": "443"},  # a wider network
        {"cidr": "203.0.113.5/32", "protocol": "udp", "ports": "443"},  # another protocol
        {"cidr": "203.0.113.5/32", "protocol": "tcp", "ports": "443-444"},  # more ports
        {"cidr": "203.0.113.5/32"},  # any protocol
    ):
        assert _put(api, owner, vm, {"mode": "allowlist", "rules": [outside]}).status_code == 403, outside
    assert _put(api, owner, vm, {"mode": "allow"}).status_code == 403
    assert _put(api, operator, vm, {"mode": "allow"}).status_code == 200
    assert Nic.objects.get(vm=vm).egress_widened is True
    assert AuditEvent.objects.filter(action="vm.egress_update", actor_id=operator.pk, after__widened=True).exists()
    free, _ = vm_on(owner, mode=EgressMode.ALLOW)
    assert _put(api, owner, free, inside).status_code == 200  # an allow-list narrows "allow"


def test_a_network_narrowed_later_wins_over_an_owners_earlier_override(owner, operator, vm_on):
    vm, network = vm_on(owner, mode=EgressMode.ALLOW)
    services.vm_egress_set(vm=vm, actor=owner, mode=EgressMode.ALLOWLIST, rules=[{"cidr": "203.0.113.0/24"}])
    Nic.objects.filter(vm=vm).update(plumbed=True)
    services.network_update(network=network, actor=operator, egress_mode=EgressMode.DENY)
    (nic,) = [n for net in selectors.host_rules(vm.host).networks for n in net.nics]
    assert nic.egress.mode == EgressMode.DENY
    assert EgressRule.objects.filter(vm=vm).exists()  # kept: it applies again if the network opens up


# --- what default egress reaches -----------------------------------------------------------


def _neighbourhood(make_netns, host_ns):
    """A namespace behind the host namespace with a "metadata service", a "LAN" service and a
    service on one of the host's own (public) networks, each answering on port 80."""
    ns = make_netns("hostlan")
    with IPRoute(netns=host_ns) as ipr:
        ipr.link("add", ifname="hostlan0", kind="veth", peer="eth0")
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], net_ns_fd=ns)
        index = ipr.link_lookup(ifname="hostlan0")[0]
        for address, prefix in (("169.254.0.1", 16), ("192.168.77.1", 24), ("198.51.100.1", 24)):
            ipr.addr("add", index=index, address=address, prefixlen=prefix)
        ipr.link("set", index=index, state="up")
    with IPRoute(netns=ns) as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        for address, prefix in ((METADATA, 16), (LAN_SERVICE, 24), (HOST_NET_SERVICE, 24)):
            ipr.addr("add", index=index, address=address, prefixlen=prefix)
        ipr.link("set", index=index, state="up")
    return ns, [TcpServer(ns, ip, 80, f"service {ip}".encode()) for ip in (METADATA, LAN_SERVICE, HOST_NET_SERVICE)]


def test_default_egress_reaches_no_link_local_private_or_host_network(lab, make_netns, host_ns, settings):  # noqa: F811
    ns, servers = _neighbourhood(make_netns, host_ns)
    try:
        guest = lab["guests"]["a1"]["ns"]
        for ip in (METADATA, LAN_SERVICE, HOST_NET_SERVICE):
            assert tcp_fetch(host_ns, ip, 80) == f"service {ip}".encode()  # they run, and the host reaches them
        services.network_rules_apply(host=lab["host"])
        for ip in (METADATA, LAN_SERVICE, HOST_NET_SERVICE):
            assert tcp_fetch(guest, ip, 80) is None, ip  # network policy "allow", and still refused
        assert tcp_fetch(guest, "10.231.250.2", 8080) == b"outside 8080"  # the exception of the lab

        settings.SANDBOX_EGRESS_EXCEPTIONS = ["10.231.250.0/24", f"{METADATA}/32"]
        services.network_rules_apply(host=lab["host"])
        assert tcp_fetch(guest, METADATA, 80) == f"service {METADATA}".encode()  # an operator opened it
        assert tcp_fetch(guest, LAN_SERVICE, 80) is None
        assert tcp_fetch(guest, HOST_NET_SERVICE, 80) is None
        services.vm_egress_set(vm=lab["guests"]["a1"]["vm"], actor=lab["owners"][0], mode="deny")
        services.network_rules_apply(host=lab["host"])
        assert tcp_fetch(guest, METADATA, 80) is None  # an exception does not override the VM's own deny
    finally:
        for server in servers:
            server.close()


def test_the_owner_of_a_private_network_can_only_narrow_its_egress(api, owner, operator):
    network = services.network_create(
        name="private", cidr="10.231.90.0/24", actor=operator, owner=owner, egress_mode=EgressMode.DENY
    )
    url = f"/api/v1/networks/{network.pk}/"
    assert api.as_user(owner).patch(url, {"egress_mode": "allow"}, format="json").status_code == 403
    assert AuditEvent.objects.filter(action="network.update", result="denied").exists()
    assert api.as_user(operator).patch(url, {"egress_mode": "allow"}, format="json").status_code == 200
    assert api.as_user(owner).patch(url, {"egress_mode": "deny"}, format="json").status_code == 200
