"""Rules rendered from the database and applied in a test namespace, checked with real
traffic. "Guests" are namespaces attached to our bridge by a veth carrying the NIC's TAP
name (rules match names, so they treat it like a VM's TAP); an "outside" namespace stands
for the uplink. Every packet stays inside namespaces this test created."""

import pytest
from pyroute2 import IPRoute

from networking import netlink, nft, services
from networking.models import Nic
from tests.factories import HostFactory, UserFactory, VmFactory
from tests.networking.netenv import TcpServer, guest_attach, ping, tcp_fetch, veth_link

OUTSIDE_IP = "10.231.250.2"
UPLINK_IP = "10.231.250.1"


@pytest.fixture
def lab(db, make_netns, host_ns, operator, settings):
    """Network "lan" (10.231.60.0/24) with guests a1, a2 (owner A) and b1 (owner B), network
    "other" (10.231.61.0/24) with a3 (owner A), and an outside namespace on the uplink. The
    outside stands for the internet but has a private address: an operator exception opens it
    (default egress never reaches private ranges)."""
    settings.SANDBOX_EGRESS_EXCEPTIONS = ["10.231.250.0/24"]
    host = HostFactory()
    services.network_default_ensure()
    owner_a, owner_b = UserFactory(username="tenant-a"), UserFactory(username="tenant-b")
    lan = services.network_create(name="lan", cidr="10.231.60.0/24", actor=operator)
    other = services.network_create(name="other", cidr="10.231.61.0/24", actor=operator)
    guests, servers = {}, []
    for name, owner, network in (
        ("a1", owner_a, lan),
        ("a2", owner_a, lan),
        ("b1", owner_b, lan),
        ("a3", owner_a, other),
    ):
        vm = VmFactory(owner=owner, name=name, host=host, state="running")
        spec = services.nic_allocate(vm=vm, network=network)
        netlink.bridge_ensure(network.bridge, network.gateway, spec.prefix, netns=host_ns)
        ns = make_netns(name)
        guest_attach(
            host_ns=host_ns,
            guest_ns=ns,
            tap=spec.tap,
            bridge=network.bridge,
            mac=spec.mac,
            ip=spec.ip,
            prefix=spec.prefix,
            gateway=spec.gateway,
        )
        Nic.objects.filter(vm=vm).update(plumbed=True)  # what nic_plumb records before creating the TAP
        servers.append(TcpServer(ns, spec.ip, 8080, f"hello from {name}".encode()))
        guests[name] = {"vm": vm, "ns": ns, "ip": spec.ip, "gw": spec.gateway}
    outside = make_netns("out")
    veth_link(a_ns=host_ns, a_name="uplink0", a_ip=UPLINK_IP, b_ns=outside, b_name="eth0", b_ip=OUTSIDE_IP)
    for port in (8080, 8081):
        servers.append(TcpServer(outside, OUTSIDE_IP, port, f"outside {port}".encode()))
    services.network_rules_apply(host=host)
    yield {
        "host": host,
        "lan": lan,
        "other": other,
        "outside": outside,
        "guests": guests,
        "operator": operator,
        "owners": (owner_a, owner_b),
    }
    for server in servers:
        server.close()


def _reach(lab, src, dst, port=8080):
    g = lab["guests"]
    return tcp_fetch(g[src]["ns"], g[dst]["ip"], port)


def test_it_isolates_tenants_and_networks(lab):
    assert _reach(lab, "a1", "a2") == b"hello from a2"
    assert _reach(lab, "a2", "a1") == b"hello from a1"
    assert _reach(lab, "a1", "b1") is None
    assert _reach(lab, "b1", "a1") is None
    assert _reach(lab, "a1", "a3") is None  # same owner, other network: routed, and refused
    assert _reach(lab, "a3", "a1") is None
    for name, guest in lab["guests"].items():
        assert ping(guest["ns"], guest["gw"]), f"{name} cannot ping its gateway"


def test_an_operator_can_relax_tenant_isolation(lab):
    services.network_update(network=lab["lan"], actor=lab["operator"], tenant_isolation=False)
    services.network_rules_apply(host=lab["host"])
    assert _reach(lab, "b1", "a1") == b"hello from a1"
    assert _reach(lab, "a1", "a3") is None  # still no routing between networks


def test_guests_cannot_reach_host_services(lab, host_ns):
    server = TcpServer(host_ns, "0.0.0.0", 5432, b"host service")
    try:
        assert tcp_fetch(lab["guests"]["a1"]["ns"], lab["guests"]["a1"]["gw"], 5432) is None
        assert tcp_fetch(lab["guests"]["a1"]["ns"], UPLINK_IP, 5432) is None
        assert tcp_fetch(host_ns, "127.0.0.1", 5432) == b"host service"  # the host itself is unaffected
    finally:
        server.close()


def test_egress_allow_deny_and_allowlist(lab):
    g, owner_a, owner_b = lab["guests"], *lab["owners"]
    assert tcp_fetch(g["a1"]["ns"], OUTSIDE_IP, 8080) == b"outside 8080"  # network default: allow + NAT
    services.vm_egress_set(vm=g["a2"]["vm"], actor=owner_a, mode="deny")
    services.vm_egress_set(
        vm=g["b1"]["vm"],
        actor=owner_b,
        mode="allowlist",
        rules=[{"cidr": "10.231.250.0/24", "protocol": "tcp", "ports": "8081"}],
    )
    services.network_rules_apply(host=lab["host"])
    assert tcp_fetch(g["a2"]["ns"], OUTSIDE_IP, 8080) is None
    assert tcp_fetch(g["a2"]["ns"], OUTSIDE_IP, 8081) is None
    assert tcp_fetch(g["b1"]["ns"], OUTSIDE_IP, 8081) == b"outside 8081"
    assert tcp_fetch(g["b1"]["ns"], OUTSIDE_IP, 8080) is None
    assert tcp_fetch(g["a1"]["ns"], OUTSIDE_IP, 8080) == b"outside 8080"
    assert _reach(lab, "a1", "a2") == b"hello from a2"  # egress policy does not cut the VM off its tenant


def test_egress_is_masqueraded_to_the_uplink(lab):
    from tests.networking.netenv import TcpServer as Server

    seen = Server(lab["outside"], OUTSIDE_IP, 9999, b"x")
    try:
        assert tcp_fetch(lab["guests"]["a1"]["ns"], OUTSIDE_IP, 9999) == b"x"
        assert seen.peers == [UPLINK_IP]
    finally:
        seen.close()


def test_a_port_forward_reaches_the_guest_and_nothing_else(lab, host_ns):
    g, owner_a = lab["guests"], lab["owners"][0]
    pf = services.port_forward_create(vm=g["a1"]["vm"], actor=owner_a, guest_port=8080, host_port=20001)
    services.network_rules_apply(host=lab["host"])
    assert tcp_fetch(lab["outside"], UPLINK_IP, 20001) == b"hello from a1"  # from another machine
    assert tcp_fetch(host_ns, UPLINK_IP, 20001) == b"hello from a1"  # from the host itself
    assert tcp_fetch(lab["outside"], g["a2"]["ip"], 8080) is None  # no unsolicited inbound without a forward
    assert tcp_fetch(g["b1"]["ns"], g["b1"]["gw"], 20001) is None  # guests cannot hairpin through the host
    services.port_forward_delete(port_forward=pf, actor=owner_a)
    services.network_rules_apply(host=lab["host"])
    assert tcp_fetch(lab["outside"], UPLINK_IP, 20001) is None


def test_a_guest_cannot_spoof_its_source_address(lab):
    g = lab["guests"]
    with IPRoute(netns=g["b1"]["ns"]) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=g["a2"]["ip"], prefixlen=32)
    # b1 pretending to be a2 (same tenant as a1) gets nowhere.
    assert tcp_fetch(g["b1"]["ns"], g["a1"]["ip"], 8080, source=g["a2"]["ip"]) is None
    assert tcp_fetch(g["b1"]["ns"], OUTSIDE_IP, 8080, source=g["a2"]["ip"]) is None


def test_reconcile_removes_only_our_leftovers_and_keeps_running_guests_connected(lab, host_ns):
    with IPRoute(netns=host_ns) as ipr:
        ipr.link("add", ifname="msbt00000dead0", kind="tuntap", mode="tap")  # a TAP of a NIC long gone
        ipr.link("add", ifname="msbb00000dead0", kind="bridge")  # a bridge of a deleted network
        ipr.link("add", ifname="keepme0", kind="bridge")  # not ours
    nft.apply({"nftables": [{"add": {"table": {"family": "inet", "name": "someone_else"}}}]}, netns=host_ns)
    before = nft.list_ours(netns=host_ns)
    counts = services.network_reconcile(host=lab["host"])
    assert counts["taps_removed"] == 1 and counts["bridges_removed"] == 1
    names = {link.name for link in netlink.links_owned(netns=host_ns)}
    assert "msbt00000dead0" not in names and "msbb00000dead0" not in names
    with IPRoute(netns=host_ns) as ipr:
        assert ipr.link_lookup(ifname="keepme0")
        assert ipr.link_lookup(ifname="uplink0")
    assert ("inet", "someone_else") in nft.list_tables(netns=host_ns)
    assert len(nft.list_ours(netns=host_ns)) == len(before)  # same rules, no duplicates
    assert _reach(lab, "a1", "a2") == b"hello from a2"
    assert _reach(lab, "a1", "b1") is None


def test_counters_follow_traffic(lab):
    vm = lab["guests"]["a1"]["vm"]
    before = services.nic_counters(vm=vm)
    assert _reach(lab, "a1", "a2")
    after = services.nic_counters(vm=vm)
    (key,) = after
    assert after[key]["tx_packets"] > before[key]["tx_packets"]
    assert after[key]["rx_bytes"] > before[key]["rx_bytes"]
