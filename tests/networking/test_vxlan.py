"""A network spanning two hosts over VXLAN. The "hosts" are two network namespaces joined by a
veth underlay (10.231.96.0/24), each with the network's bridge, its VXLAN device and our
nftables rules (``host_rules`` of that host); the "guests" are namespaces on each host's bridge
as in test_traffic. Every address lives in namespaces this test created; nothing leaves them."""

from __future__ import annotations

import socket

import pytest
from django.utils import timezone
from pyroute2 import IPRoute

from networking import netlink, nft, selectors, services
from networking.models import Nic
from tests.factories import HostFactory, UserFactory, VmFactory
from tests.networking.netenv import TcpServer, guest_add_ipv6, guest_attach, ping, tcp_fetch, veth_link

TUNNEL_A, TUNNEL_B = "10.231.96.1", "10.231.96.2"
UNDERLAY_MTU = 1500


def _ruleset(ns: str) -> list[dict]:
    """Our nftables objects without kernel handles and counter values (a re-apply resets them)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: (None if k == "counter" else strip(v)) for k, v in value.items() if k != "handle"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(nft.list_ours(netns=ns))


def _fetch_all(ns: str, ip: str, port: int) -> int:
    """How many bytes the server at ``ip:port`` sends before closing, read from ``ns``."""

    def fetch() -> int:
        with socket.create_connection((ip, port), timeout=5) as sock:
            total = 0
            while chunk := sock.recv(65536):
                total += len(chunk)
            return total

    return netlink.netns_call(ns, fetch)


def _on(settings, ns: str) -> None:
    settings.SANDBOX_NETNS = ns  # the services below act on "this machine", i.e. that namespace


@pytest.fixture
def span(request, db, make_netns, operator, settings):
    ns_a, ns_b = make_netns("ha"), make_netns("hb")
    # With br_netfilter (Docker hosts; loaded here) bridged IPv4 also passes the inet forward
    # chain, whose tenant sets must then name the remote NICs; without it only the bridge
    # table's rules isolate. The sysctl is per namespace.
    variant = getattr(request, "param", "br_netfilter")  # or "bridge-only", "dual-stack"
    calls = "0" if variant == "bridge-only" else "1"
    for ns in (ns_a, ns_b):
        for family in ("iptables", "ip6tables"):
            netlink.sysctl_write(f"net.bridge.bridge-nf-call-{family}", calls, netns=ns)
    veth_link(a_ns=ns_a, a_name="underlay-a", a_ip=TUNNEL_A, b_ns=ns_b, b_name="underlay-b", b_ip=TUNNEL_B)
    host_a = HostFactory(name="ha", tunnel_address=TUNNEL_A)
    host_b = HostFactory(name="hb", tunnel_address=TUNNEL_B)
    hosts = {"ha": (host_a, ns_a), "hb": (host_b, ns_b)}
    services.network_default_ensure()
    cidr6 = "fd00:231:97::/64" if variant == "dual-stack" else ""
    net = services.network_create(name="span", cidr="10.231.97.0/24", cidr6=cidr6, actor=operator)
    tenant_a, stranger = UserFactory(username="tenant-a"), UserFactory(username="stranger")
    guests, servers = {}, []
    for name, owner, host_name in (("a1", tenant_a, "ha"), ("a2", tenant_a, "hb"), ("s2", stranger, "hb")):
        host, host_ns = hosts[host_name]
        vm = VmFactory(owner=owner, name=name, host=host, state="running")
        spec = services.nic_allocate(vm=vm, network=net)
        _on(settings, host_ns)
        services._bridge_ensure(net)
        ns = make_netns(name)
        guest_attach(
            host_ns=host_ns, guest_ns=ns, tap=spec.tap, bridge=net.bridge, mac=spec.mac, ip=spec.ip,
            prefix=spec.prefix, gateway=spec.gateway,
        )  # fmt: skip
        # Guests fit the tunnel: underlay MTU - 50 (docs/networking.md).
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], mtu=UNDERLAY_MTU - netlink.VXLAN_OVERHEAD)
        Nic.objects.filter(vm=vm).update(plumbed=True)
        servers.append(TcpServer(ns, spec.ip, 8080, f"hello from {name}".encode()))
        if spec.ip6:
            guest_add_ipv6(guest_ns=ns, ip6=spec.ip6, prefix6=spec.prefix6, gateway6=spec.gateway6)
            servers.append(TcpServer(ns, spec.ip6, 8080, f"v6 hello from {name}".encode()))
        guests[name] = {"vm": vm, "ns": ns, "ip": spec.ip, "ip6": spec.ip6, "mac": spec.mac}
    for host, host_ns in hosts.values():
        _on(settings, host_ns)
        services.network_reconcile(host=host)
    yield {"net": net, "hosts": hosts, "guests": guests}
    for server in servers:
        server.close()


@pytest.mark.parametrize("span", ["br_netfilter", "bridge-only"], indirect=True)
def test_vms_of_one_project_on_two_hosts_reach_each_other_and_a_stranger_does_not(span):
    g = span["guests"]
    assert ping(g["a1"]["ns"], g["a2"]["ip"], timeout=3)
    assert tcp_fetch(g["a1"]["ns"], g["a2"]["ip"], 8080) == b"hello from a2"
    assert tcp_fetch(g["a2"]["ns"], g["a1"]["ip"], 8080) == b"hello from a1"
    # A bulk transfer (full-size segments at the guests' MTU, underlay - 50) crosses too.
    bulk = TcpServer(g["a2"]["ns"], g["a2"]["ip"], 8081, b"x" * 200_000)
    try:
        assert _fetch_all(g["a1"]["ns"], g["a2"]["ip"], 8081) == 200_000
    finally:
        bulk.close()
    assert tcp_fetch(g["s2"]["ns"], g["a1"]["ip"], 8080) is None  # stranger on host b -> a1 on host a
    assert tcp_fetch(g["a1"]["ns"], g["s2"]["ip"], 8080) is None  # a1 on host a -> stranger on host b
    assert not ping(g["s2"]["ns"], g["a1"]["ip"])
    # On its own host the stranger is still isolated from a2 (local TAPs, as before).
    assert tcp_fetch(g["s2"]["ns"], g["a2"]["ip"], 8080) is None


@pytest.mark.parametrize("span", ["dual-stack"], indirect=True)
def test_ipv6_crosses_hosts_within_a_project_only(span):
    """Neighbour discovery (solicited-node multicast) goes through the tunnel for the project's
    remote addresses; a stranger's IPv6 does not get through in either direction."""
    g = span["guests"]
    assert tcp_fetch(g["a1"]["ns"], g["a2"]["ip6"], 8080, timeout=6) == b"v6 hello from a2"
    assert tcp_fetch(g["a2"]["ns"], g["a1"]["ip6"], 8080) == b"v6 hello from a1"
    assert tcp_fetch(g["s2"]["ns"], g["a1"]["ip6"], 8080) is None
    assert tcp_fetch(g["a1"]["ns"], g["s2"]["ip6"], 8080) is None


def test_each_host_has_one_vxlan_device_with_static_fdb_entries_for_the_peer(span, settings):
    net, g = span["net"], span["guests"]
    device = netlink.vxlan_name(str(net.pk))
    assert len(device) <= netlink.IFNAME_MAX and device.startswith(netlink.IFNAME_PREFIX)
    (host_a, ns_a), (_, ns_b) = span["hosts"]["ha"], span["hosts"]["hb"]
    assert netlink.fdb_entries(device, netns=ns_a) == {
        (netlink.ZERO_MAC, TUNNEL_B),
        (g["a2"]["mac"], TUNNEL_B),
        (g["s2"]["mac"], TUNNEL_B),
    }
    assert netlink.fdb_entries(device, netns=ns_b) == {(netlink.ZERO_MAC, TUNNEL_A), (g["a1"]["mac"], TUNNEL_A)}
    with IPRoute(netns=ns_a) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=device)[0])[0]
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        bridge = ipr.get_links(ipr.link_lookup(ifname=net.bridge)[0])[0]
        assert data.get_attr("IFLA_VXLAN_ID") == net.vni
        assert data.get_attr("IFLA_VXLAN_PORT") == 4789
        assert data.get_attr("IFLA_VXLAN_LEARNING") == 0
        assert link.get_attr("IFLA_MTU") == UNDERLAY_MTU - 50
        assert link.get_attr("IFLA_MASTER") == bridge["index"]
        assert bridge.get_attr("IFLA_MTU") == UNDERLAY_MTU - 50  # follows its smallest port
    # The tenant sets of host a name the remote NICs; its anti-spoofing names only its own TAP.
    rules = selectors.host_rules(host_a)
    span_rules = next(n for n in rules.networks if n.bridge == net.bridge)
    assert [n.tap for n in span_rules.nics] == [Nic.objects.get(vm=g["a1"]["vm"]).tap]
    assert sorted(r.ip for r in span_rules.remote_nics) == sorted([g["a2"]["ip"], g["s2"]["ip"]])
    assert rules.tunnel_peers == (TUNNEL_B,) and rules.tunnel_vnis == (net.vni,)


def test_reconcile_is_idempotent_and_the_tunnel_goes_with_the_last_peer(
    span, settings, django_capture_on_commit_callbacks
):
    net, g = span["net"], span["guests"]
    device = netlink.vxlan_name(str(net.pk))
    (host_a, ns_a), (_, ns_b) = span["hosts"]["ha"], span["hosts"]["hb"]
    _on(settings, ns_a)
    before = _ruleset(ns_a)
    counts = services.network_reconcile(host=host_a)
    assert counts["vxlans_ensured"] == 1
    assert (counts["fdb_added"], counts["fdb_removed"], counts["vxlans_removed"]) == (0, 0, 0)
    assert _ruleset(ns_a) == before
    assert tcp_fetch(g["a1"]["ns"], g["a2"]["ip"], 8080) == b"hello from a2"

    # The stranger's VM stops on host b: its MAC leaves host a's forwarding entries.
    _on(settings, ns_b)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.nic_unplumb(vm=g["s2"]["vm"])
    assert _resyncs(callbacks) == 1  # host a is told to re-sync (on its queue)
    _on(settings, ns_a)
    services.network_peers_sync(host=host_a)
    assert netlink.fdb_entries(device, netns=ns_a) == {(netlink.ZERO_MAC, TUNNEL_B), (g["a2"]["mac"], TUNNEL_B)}

    # The last VM of the network on host b stops: both hosts drop the tunnel and its rules.
    _on(settings, ns_b)
    services.nic_unplumb(vm=g["a2"]["vm"])
    assert netlink.link_get(device, netns=ns_b) is None
    _on(settings, ns_a)
    assert services.network_peers_sync(host=host_a)["vxlans_removed"] == 1
    assert netlink.link_get(device, netns=ns_a) is None
    assert not selectors.host_tunnels(host_a)
    assert "VXLAN" not in str(nft.list_ours(netns=ns_a))
    assert netlink.link_get(net.bridge, netns=ns_a) is not None  # the bridge and a1 stay


def test_a_host_without_a_tunnel_address_takes_no_part(span, settings):
    host_b, ns_b = span["hosts"]["hb"]
    host_b.tunnel_address = None
    host_b.save(update_fields=["tunnel_address"])
    host_a, ns_a = span["hosts"]["ha"]
    _on(settings, ns_a)
    assert services.network_peers_sync(host=host_a)["vxlans_removed"] == 1
    _on(settings, ns_b)
    assert services.network_reconcile(host=host_b)["vxlans_removed"] == 1
    g = span["guests"]
    assert tcp_fetch(g["a1"]["ns"], g["a2"]["ip"], 8080) is None


def test_the_tunnel_rules_render_and_load(make_netns):
    rules = nft.HostRules(
        networks=(
            nft.NetworkRules(
                bridge="msbb0000000001",
                cidr="10.231.97.0/24",
                gateway="10.231.97.1",
                nics=(nft.NicRules(tap="msbt0000000001", mac="02:00:00:00:00:01", ip="10.231.97.2", tenant="a"),),
                vxlan="msbv0000000001",
                remote_nics=(
                    nft.RemoteNicRules(mac="02:00:00:00:00:02", ip="10.231.97.3", tenant="a", ip6="fd00:231:97::3"),
                    nft.RemoteNicRules(mac="02:00:00:00:00:03", ip="10.231.97.4", tenant="b"),
                ),
            ),
        ),
        tunnel_peers=("10.231.96.2",),
        tunnel_vnis=(4242,),
    )
    doc = nft.render(rules)
    comments = [i["add"]["rule"].get("comment", "") for i in doc["nftables"] if "rule" in i.get("add", {})]
    for expected in (
        "VXLAN of our networks from peer hosts only",
        "tunnels do not reach the host",
        "the host sends nothing into tunnels",
        "msbv0000000001 MAC",
        "msbv0000000001 IPv4 source",
        "tenant a on msbb0000000001 to other hosts",
        "tenant a on msbb0000000001 from other hosts",
        "tenant isolation on msbb0000000001 from other hosts",
    ):
        assert expected in comments, expected
    assert "tenant b on msbb0000000001 to other hosts" not in comments  # no local NIC of b here
    assert nft._solicited_node_mac("fd00:231:97::3") == "33:33:ff:00:00:03"
    nft.check(doc, netns=make_netns("chk"))


def _rule_packets(ns: str, comment: str) -> int:
    for item in nft.list_ours(netns=ns):
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule {comment!r}")


def test_vxlan_from_an_address_that_is_not_a_peer_is_dropped(span, make_netns):
    """A rogue tunnel endpoint (behind host b, not a peer) sends host a frames of the network's
    VNI claiming to be a2 (its MAC and address): host a drops them before decapsulation."""
    net, g = span["net"], span["guests"]
    (_, ns_a), (_, ns_b) = span["hosts"]["ha"], span["hosts"]["hb"]
    rogue = make_netns("rogue")
    veth_link(a_ns=ns_b, a_name="rogue-b", a_ip="10.231.98.1", b_ns=rogue, b_name="eth0", b_ip="10.231.98.2")
    with IPRoute(netns=rogue) as ipr:
        ipr.route("add", dst="10.231.96.0/24", gateway="10.231.98.1")
        ipr.link(
            "add", ifname="vxrogue", kind="vxlan", vxlan_id=net.vni, vxlan_local="10.231.98.2", vxlan_port=4789,
            vxlan_learning=0,
        )  # fmt: skip
        index = ipr.link_lookup(ifname="vxrogue")[0]
        ipr.link("set", index=index, address=g["a2"]["mac"], mtu=1400)
        ipr.addr("add", index=index, address=g["a2"]["ip"], prefixlen=24)
        ipr.link("set", index=index, state="up")
        ipr.fdb("append", ifindex=index, lladdr=netlink.ZERO_MAC, dst=TUNNEL_A)
        # a1's replies would go to the real a2: the rogue knows a1's MAC and sends one-way UDP.
        ipr.neigh("add", dst=g["a1"]["ip"], lladdr=g["a1"]["mac"], ifindex=index, state=0x80)

    def receiver() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((g["a1"]["ip"], 9999))
        sock.settimeout(2.0)
        return sock

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(3):
                sock.sendto(b"forged", (g["a1"]["ip"], 9999))

    comment = "VXLAN of our networks from peer hosts only"
    sock = netlink.netns_call(g["a1"]["ns"], receiver)
    try:
        netlink.netns_call(rogue, send)
        with pytest.raises(TimeoutError):
            sock.recv(100)
    finally:
        sock.close()
    assert _rule_packets(ns_a, comment) >= 3
    # The real a2 still gets through.
    assert tcp_fetch(g["a2"]["ns"], g["a1"]["ip"], 8080) == b"hello from a1"


def _resyncs(callbacks) -> int:
    """How many tunnel re-syncs were enqueued (other on-commit work, like the audit seal, aside)."""
    return sum("tunnel" in fn.__qualname__ for fn in callbacks)


def test_host_join_and_the_heartbeat_set_the_tunnel_address_and_resync_the_peers(
    db, settings, tmp_path, django_capture_on_commit_callbacks
):
    from accounts.models import AuditEvent
    from sandbox_site.errors import ApplicationError
    from vms import operations
    from vms.hosts import host_join

    settings.SANDBOX_PKI_DIR = tmp_path / "pki"
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        host, _ = host_join(name="h2", address="127.0.0.1:7443", tunnel_address="10.231.96.2")
    assert host.tunnel_address == "10.231.96.2" and _resyncs(callbacks) == 1  # its own re-sync
    event = AuditEvent.objects.filter(action="host.join").latest("id")
    assert event.after["tunnel_address"] == "10.231.96.2"
    with pytest.raises(ApplicationError), django_capture_on_commit_callbacks(execute=False) as callbacks:
        host_join(name="h2", address="127.0.0.1:7443", tunnel_address="not-an-address")
    host.refresh_from_db()
    assert host.tunnel_address == "10.231.96.2" and not _resyncs(callbacks)  # nothing changed
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        host_join(name="h2", address="127.0.0.1:7443")  # without one: kept, nothing to re-sync
    host.refresh_from_db()
    assert host.tunnel_address == "10.231.96.2" and not _resyncs(callbacks)

    settings.SANDBOX_TUNNEL_ADDRESS = "10.231.96.7"
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        operations.host_heartbeat(host, timezone.now())
    host.refresh_from_db()
    assert host.tunnel_address == "10.231.96.7" and _resyncs(callbacks) == 1
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        operations.host_heartbeat(host, timezone.now())  # unchanged: no re-sync
    assert not _resyncs(callbacks)


def test_vnis_are_distinct_24_bit_numbers(db, operator):
    from networking.models import VNI_MAX, vni_pick

    nets = [services.network_create(name=f"v{i}", cidr=f"10.231.{100 + i}.0/24", actor=operator) for i in range(3)]
    assert len({n.vni for n in nets}) == 3 and all(1 <= n.vni <= VNI_MAX for n in nets)
    taken = {n.vni for n in nets}
    assert vni_pick(nets[0].id, taken=taken) not in taken  # a collision takes the next free one


def test_guests_starting_on_a_tunnel_host_get_the_underlay_mtu_less_the_tunnel_headers(span, settings):
    from vms.hypervisor import vm_spec

    host_a, ns_a = span["hosts"]["ha"]
    a1 = span["guests"]["a1"]["vm"]
    _on(settings, ns_a)
    assert services.host_guest_mtu(host_a) == UNDERLAY_MTU - 50
    spec = vm_spec(a1)
    assert spec.nic_mtu == UNDERLAY_MTU - 50
    assert f"host_mtu={UNDERLAY_MTU - 50}" in " ".join(_qemu_argv(spec))
    services.network_reconcile(host=host_a)  # its TAPs too
    with IPRoute(netns=ns_a) as ipr:
        tap = ipr.get_links(ipr.link_lookup(ifname=spec.tap)[0])[0]
    assert tap.get_attr("IFLA_MTU") == UNDERLAY_MTU - 50
    # A jumbo underlay carries full 1500-byte guest frames; a host without a tunnel address has
    # no tunnels; an address on no interface here takes no part either.
    with IPRoute(netns=ns_a) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="underlay-a")[0], mtu=9000)
    assert services.host_guest_mtu(host_a) == 1500
    with IPRoute(netns=ns_a) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="underlay-a")[0], mtu=1300)
    assert services.host_guest_mtu(host_a) == 1280  # IPv6's minimum, logged as an error
    host_a.tunnel_address = None
    assert services.host_guest_mtu(host_a) == 1500
    host_a.tunnel_address = "10.231.99.99"
    assert services.host_guest_mtu(host_a) == 1500


def _qemu_argv(spec) -> list[str]:
    from vms.vmm.qemu import QemuDriver

    return QemuDriver().build_argv(spec, acceleration="tcg")
