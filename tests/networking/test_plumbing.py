"""Bridges, TAPs and nftables inside a namespace the test creates (no Django models)."""

import json

import pytest
from pyroute2 import IPRoute

from networking import netlink, nft

BRIDGE = "msbb00000000a1"
TAP = "msbt00000000a1"


def _rules(**overrides) -> nft.HostRules:
    nics = (
        nft.NicRules(tap="msbt00000000a1", mac="02:00:00:00:00:01", ip="10.231.7.2", tenant="1"),
        nft.NicRules(tap="msbt00000000a2", mac="02:00:00:00:00:02", ip="10.231.7.3", tenant="1"),
        nft.NicRules(
            tap="msbt00000000b1",
            mac="02:00:00:00:00:03",
            ip="10.231.7.4",
            tenant="2",
            egress=nft.EgressPolicy(
                "allowlist",
                (nft.EgressAllow("10.231.250.0/24", "tcp", (8081, (9000, 9010))), nft.EgressAllow("10.9.9.9/32")),
            ),
        ),
        nft.NicRules(
            tap="msbt00000000b2", mac="02:00:00:00:00:04", ip="10.231.7.5", tenant="2", egress=nft.EgressPolicy("deny")
        ),
    )
    network = nft.NetworkRules(
        bridge=BRIDGE,
        cidr="10.231.7.0/24",
        gateway="10.231.7.1",
        nics=nics,
        tenant_isolation=overrides.pop("tenant_isolation", True),
    )
    return nft.HostRules(networks=(network,), port_forwards=(nft.PortForwardRules("tcp", 20001, "10.231.7.2", 8080),))


def _comments(doc) -> list[str]:
    return [i["add"]["rule"].get("comment", "") for i in doc["nftables"] if "rule" in i.get("add", {})]


def test_it_creates_and_removes_bridge_and_tap_in_a_namespace(make_netns):
    ns = make_netns()
    bridge = netlink.bridge_ensure(BRIDGE, "10.231.7.1", 24, netns=ns)
    tap = netlink.tap_ensure(TAP, BRIDGE, netns=ns)
    again = netlink.tap_ensure(TAP, BRIDGE, netns=ns)  # idempotent
    assert bridge.kind == "bridge" and bridge.up
    assert tap.kind == "tun" and tap.master == bridge.index and again.index == tap.index
    with IPRoute(netns=ns) as ipr:
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=bridge.index)]
    assert ("10.231.7.1", 24) in addrs
    assert {link.name for link in netlink.links_owned(netns=ns)} == {BRIDGE, TAP}
    assert netlink.link_remove(TAP, netns=ns) is True
    assert netlink.link_remove(TAP, netns=ns) is False
    assert netlink.link_remove(BRIDGE, netns=ns) is True
    assert netlink.links_owned(netns=ns) == []
    assert not netlink.link_get(BRIDGE)  # nothing of that name ever appeared in our own namespace


def test_it_refuses_interfaces_it_does_not_own(make_netns):
    ns = make_netns()
    with pytest.raises(netlink.PlumbingError):
        netlink.link_remove("lo", netns=ns)
    with pytest.raises(netlink.PlumbingError):
        netlink.bridge_ensure("docker0", "10.231.7.1", 24, netns=ns)


def test_it_refuses_a_namespace_that_does_not_exist():
    with pytest.raises(netlink.PlumbingError):
        netlink.links_owned(netns="msbtest-absent")
    with pytest.raises(netlink.PlumbingError):
        netlink.netns_call("msbtest-absent", print)


def test_it_names_interfaces_from_ids():
    assert netlink.bridge_name("8c4b2a50-1111-2222-3333-444455556666") == "msbb8c4b2a5011"
    assert len(netlink.tap_name("8c4b2a50-1111-2222-3333-444455556666")) <= netlink.IFNAME_MAX


def test_it_renders_isolation_per_tenant():
    doc = nft.render(_rules())
    fwd = [
        i["add"]["rule"]
        for i in doc["nftables"]
        if i.get("add", {}).get("rule", {}).get("chain") == "forward" and i["add"]["rule"]["family"] == "bridge"
    ]
    sets = [r["expr"][0]["match"]["right"]["set"] for r in fwd]
    assert sets == [
        ["msbt00000000a1", "msbt00000000a2"],
        ["msbt00000000b1", "msbt00000000b2"],
        ["msbt00000000a1", "msbt00000000a2", "msbt00000000b1", "msbt00000000b2"],
    ]
    assert fwd[-1]["expr"][-1] == {"drop": None}
    relaxed = nft.render(_rules(tenant_isolation=False))
    assert not [c for c in _comments(relaxed) if c.startswith("tenant")]


def test_it_renders_egress_and_port_forwards():
    comments = _comments(nft.render(_rules()))
    assert "egress allow msbt00000000a1" in comments
    assert comments.count("egress allowlist msbt00000000b1") == 2
    assert "egress deny msbt00000000b1" in comments  # the allow-list ends in a drop
    assert "egress deny msbt00000000b2" in comments and "egress allow msbt00000000b2" not in comments
    assert comments.count("forward tcp/20001 to 10.231.7.2:8080") == 2  # prerouting and output
    text = json.dumps(nft.render(_rules()))
    assert '{"range": [9000, 9010]}' in text
    assert nft.render(_rules()) == nft.render(_rules())  # deterministic


def test_it_applies_atomically_and_only_touches_its_own_tables(make_netns):
    ns = make_netns()
    nft.apply({"nftables": [{"add": {"table": {"family": "inet", "name": "someone_else"}}}]}, netns=ns)
    nft.apply(nft.render(_rules()), netns=ns)
    first = nft.list_ours(netns=ns)
    assert {("inet", nft.TABLE), ("bridge", nft.TABLE), ("inet", "someone_else")} <= set(nft.list_tables(netns=ns))

    broken = nft.render(_rules(tenant_isolation=False))
    broken["nftables"].append(
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": nft.TABLE,
                    "chain": "forward",
                    "expr": [
                        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@no_such_set"}},
                        {"drop": None},
                    ],
                }
            }
        }
    )
    with pytest.raises(nft.NftError) as err:
        nft.apply(broken, netns=ns)
    assert "no_such_set" in str(err.value.details) or err.value.details
    assert _strip(nft.list_ours(netns=ns)) == _strip(first)  # nothing of the failed transaction is left

    nft.apply(nft.render(_rules(tenant_isolation=False)), netns=ns)  # re-apply replaces, never duplicates
    assert len(nft.list_ours(netns=ns)) < len(first)
    nft.remove(netns=ns)
    nft.remove(netns=ns)
    assert nft.list_tables(netns=ns) == [("inet", "someone_else")]


def _strip(items):
    """Rule listings without the counters (they move when packets pass)."""
    out = []
    for item in items:
        text = json.dumps(item, sort_keys=True)
        out.append(text.split('"counter"')[0])
    return out


def test_plumb_and_unplumb_create_and_remove_the_tap_and_its_rules(db, host_ns, owner):
    from networking import services
    from networking.models import Nic
    from tests.factories import VmFactory

    vm = VmFactory(owner=owner)
    spec = services.nic_allocate(vm=vm)
    plumbed = services.nic_plumb(vm=vm)
    assert plumbed == [spec]
    tap = netlink.link_get(spec.tap, netns=host_ns)
    bridge = netlink.link_get(Nic.objects.get(vm=vm).network.bridge, netns=host_ns)
    assert tap is not None and tap.master == bridge.index and tap.up
    assert spec.tap in json.dumps(nft.list_ours(netns=host_ns))
    assert services.nic_plumb(vm=vm) == [spec]  # idempotent (a redelivered boot task)
    services.nic_unplumb(vm=vm)
    assert netlink.link_get(spec.tap, netns=host_ns) is None
    assert spec.tap not in json.dumps(nft.list_ours(netns=host_ns))
    assert not Nic.objects.get(vm=vm).plumbed
    services.nic_unplumb(vm=vm)  # idempotent
    assert services.nic_release(vm=vm) == 1


def test_it_plumbs_without_forking_and_only_inside_the_namespace(make_netns, monkeypatch):
    # pyroute2's IPRoute(netns=...) and its TAP creation fork a helper; a fork of a Celery
    # prefork worker that unwinds instead of exiting SIGTERMs the worker's process group.
    ns = make_netns("nofork")
    with IPRoute() as ipr:
        host_links = {m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}

    def no_fork():
        raise AssertionError("netlink must not fork")

    monkeypatch.setattr("os.fork", no_fork)
    netlink.bridge_ensure(BRIDGE, "10.231.7.1", 24, netns=ns)
    netlink.tap_ensure(TAP, BRIDGE, netns=ns)
    assert {link.name for link in netlink.links_owned(netns=ns)} == {BRIDGE, TAP}
    assert netlink.link_counters(TAP, netns=ns)["tx_packets"] >= 0
    assert netlink.link_remove(TAP, netns=ns)
    monkeypatch.undo()
    with IPRoute() as ipr:
        assert {m.get_attr("IFLA_IFNAME") for m in ipr.get_links()} == host_links


def test_concurrent_plumbing_of_one_network_all_succeed(make_netns):
    # VMs of one network boot at once in different workers: every one must find its bridge.
    import concurrent.futures

    ns = make_netns("race")

    def plumb(i: int) -> str:
        netlink.bridge_ensure(BRIDGE, "10.231.7.1", 24, netns=ns)
        return netlink.tap_ensure(f"msbt00000000c{i}", BRIDGE, netns=ns).name

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        taps = list(pool.map(plumb, range(6)))
    assert sorted(taps) == [f"msbt00000000c{i}" for i in range(6)]
    bridge = netlink.link_get(BRIDGE, netns=ns)
    assert all(link.master == bridge.index for link in netlink.links_owned(netns=ns) if link.name in taps)
