"""Private networks users create themselves: within their limit, isolated, on a subnet of the
user pool, and with egress that can only narrow the operator's uplink policy (the default
network's), also after the operator narrows that policy later."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from accounts.models import AuditEvent
from networking import selectors, services
from networking.models import EgressMode, Network
from tests.factories import HostFactory, VmFactory

URL = "/api/v1/networks/"


@pytest.fixture
def uplink(operator):
    """The operator's uplink policy: an allow-list of HTTPS to 203.0.113.0/24 and DNS anywhere."""
    default = services.network_default_ensure()
    return services.network_update(
        network=default,
        actor=operator,
        egress_mode=EgressMode.ALLOWLIST,
        egress_rules=[
            {"cidr": "203.0.113.0/24", "protocol": "tcp", "ports": "443"},
            {"cidr": "0.0.0.0/0", "protocol": "udp", "ports": "53"},
        ],
    )


def test_a_user_creates_private_networks_up_to_their_limit(api, owner, stranger, settings, uplink):
    settings.SANDBOX_USER_MAX_NETWORKS = 2
    client = api.as_user(owner)
    first = client.post(URL, {"name": "mine-a"}, format="json")
    assert first.status_code == 201, first.content
    body = first.json()
    assert body["owner"] == "owner" and body["user_created"] is True and body["tenant_isolation"] is True
    assert body["cidr"] == "10.232.0.0/24" and body["gateway"] == "10.232.0.1"
    # Without a policy of its own it gets the uplink's.
    assert body["egress_mode"] == "allowlist" and len(body["egress_rules"]) == 2
    second = client.post(URL, {"name": "mine-b", "cidr": "10.232.7.0/28"}, format="json")
    assert second.status_code == 201, second.content
    over = client.post(URL, {"name": "mine-c"}, format="json")
    assert over.status_code == 403 and over.json()["error"]["code"] == "quota_exceeded"
    # Visible to its owner only, usable for VMs, deletable by the owner.
    assert "mine-a" not in [n["name"] for n in api.as_user(stranger).get(URL).json()["results"]]
    network = Network.objects.get(name="mine-a")
    assert selectors.network_user_can(owner, "use", network)
    client = api.as_user(owner)
    assert client.delete(f"{URL}{network.pk}/").status_code == 204
    assert client.post(URL, {"name": "mine-c"}, format="json").status_code == 201


def test_a_user_network_stays_inside_the_pool_and_isolated(api, owner, viewer, uplink):
    client = api.as_user(owner)
    outside = client.post(URL, {"name": "lan", "cidr": "192.168.1.0/24"}, format="json")
    assert outside.status_code == 400 and "10.232.0.0/16" in outside.content.decode()
    outside6 = client.post(URL, {"name": "six", "cidr6": "fd00:231:1::/64"}, format="json")
    assert outside6.status_code == 400 and "fd00:232::/48" in outside6.content.decode()
    dual = client.post(URL, {"name": "six", "cidr6": "fd00:232:0:7::/64"}, format="json")
    assert dual.status_code == 201 and dual.json()["gateway6"] == "fd00:232:0:7::1", dual.content
    Network.objects.filter(name="six").delete()
    open_net = client.post(URL, {"name": "open", "tenant_isolation": False}, format="json")
    assert open_net.status_code == 403
    assert client.post(URL, {"name": "x", "owner": "stranger"}, format="json").status_code in (400, 403)
    assert api.as_user(viewer).post(URL, {"name": "v"}, format="json").status_code == 403
    assert not Network.objects.filter(user_created=True).exists()


def test_a_user_network_cannot_widen_the_uplink_egress(api, owner, operator, uplink):
    client = api.as_user(owner)
    for body in (
        {"name": "wide", "egress_mode": "allow"},
        {
            "name": "wide",
            "egress_mode": "allowlist",
            "egress_rules": [{"cidr": "203.0.113.0/24", "protocol": "tcp", "ports": "443,8443"}],
        },
        {"name": "wide", "egress_mode": "allowlist", "egress_rules": [{"cidr": "198.51.100.0/24"}]},
    ):
        refused = client.post(URL, body, format="json")
        assert refused.status_code == 403, (body, refused.content)
        assert "narrow" in refused.content.decode()
    assert AuditEvent.objects.filter(action="network.create", result="denied").count() == 3
    assert not Network.objects.filter(name="wide").exists()
    narrow = client.post(
        URL,
        {
            "name": "narrow",
            "egress_mode": "allowlist",
            "egress_rules": [{"cidr": "203.0.113.8/29", "protocol": "tcp", "ports": "443"}],
        },
        format="json",
    )
    assert narrow.status_code == 201, narrow.content
    # Nor later by an update (only an operator widens a network).
    network = Network.objects.get(name="narrow")
    assert client.patch(f"{URL}{network.pk}/", {"egress_mode": "allow"}, format="json").status_code == 403
    # An operator may create a wider network: the ceiling is for users.
    assert services.network_create(name="ops", cidr="10.231.90.0/24", actor=operator, egress_mode="allow")


def test_when_the_operator_narrows_the_uplink_user_networks_follow(owner, operator, uplink):
    network = services.network_create(name="mine", actor=owner)
    host = HostFactory()
    vm = VmFactory(owner=owner, host=host)
    services.nic_allocate(vm=vm, network=network)
    vm.nics.update(plumbed=True)

    def policy():
        rules = selectors.host_rules(host)
        [nic] = [n for net in rules.networks if net.bridge == network.bridge for n in net.nics]
        return nic.egress

    assert policy().mode == "allowlist" and {a.cidr for a in policy().allow} == {"203.0.113.0/24", "0.0.0.0/0"}
    services.network_update(network=uplink, actor=operator, egress_mode=EgressMode.DENY, egress_rules=[])
    assert policy().mode == "deny" and policy().allow == ()
    # An operator's own private network is not bound by the uplink policy.
    ops = services.network_create(name="ops", cidr="10.231.91.0/24", owner=owner, actor=operator, egress_mode="allow")
    services.nic_allocate(vm=vm, network=ops)
    vm.nics.update(plumbed=True)
    rules = selectors.host_rules(host)
    assert [n.egress.mode for net in rules.networks if net.bridge == ops.bridge for n in net.nics] == ["allow"]


@pytest.mark.django_db(transaction=True)
def test_parallel_creates_cannot_pass_the_limit(owner, settings):
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL")
    settings.SANDBOX_USER_MAX_NETWORKS = 3
    services.network_default_ensure()
    results: list[str] = []

    def create(i: int) -> None:
        try:
            services.network_create(name=f"par-{i}", actor=owner)
            results.append("ok")
        except Exception as exc:  # noqa: BLE001 - counted below
            results.append(type(exc).__name__)
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results.count("ok") == 3, results
    assert set(results) == {"ok", "QuotaExceeded"}
    cidrs = list(Network.objects.filter(user_created=True).values_list("cidr", flat=True))
    assert len(cidrs) == len(set(cidrs)) == 3
