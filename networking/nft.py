"""nftables rules of microvm-sandbox, no Django.

The whole policy of a host is rendered from plain dataclasses into one libnftables JSON
document and applied with ``nft -j -f -`` as a single transaction: the kernel either
swaps in the complete new ruleset or keeps the old one, so there is never a moment with
half the rules.

We own exactly two tables and touch nothing else:

- ``inet microvm_sandbox``: routed traffic. No routing between our networks (or back
  into the same bridge), no unsolicited inbound to VMs except port forwards, egress
  policy per NIC (allow / deny / allow-list), masquerade to the uplink, and guests may not
  open connections to the host itself except ping to their gateway.
- ``bridge microvm_sandbox``: layer 2 inside a bridge, which the inet hooks never see.
  Anti-spoofing per TAP (source MAC, IPv4 source, ARP sender; IPv4 and ARP only) and
  tenant isolation: frames between TAPs of different projects (tenants) on the same bridge are dropped.

Both tables are replaced in the same transaction (``add``, ``delete``, ``add`` again: the
first ``add`` makes the ``delete`` valid when the table does not exist yet).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from networking.netlink import netns_call

TABLE = "microvm_sandbox"
VXLAN_PORT = 4789
NFT_BINARY = "nft"
NFT_TIMEOUT = 15.0
FAMILIES = ("inet", "bridge")

# Destinations the default egress never reaches: "this" network, private ranges (RFC 1918,
# shared address space, unique local IPv6), loopback, link-local (cloud metadata services at
# 169.254.169.254 live here), multicast and reserved. The host's own networks are added by
# the caller; operators open exceptions with SANDBOX_EGRESS_EXCEPTIONS.
DEFAULT_EGRESS_BLOCKED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)

ND_TYPES = ("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")

EGRESS_ALLOW = "allow"
EGRESS_DENY = "deny"
EGRESS_ALLOWLIST = "allowlist"
PROTOCOLS = ("tcp", "udp")


class NftError(Exception):
    """``nft`` refused the ruleset or could not run. ``message`` is safe to show to operators."""

    def __init__(self, message: str, *, details: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True)
class EgressAllow:
    """One allow-list entry: destination CIDR, optional protocol and ports (ints or (lo, hi))."""

    cidr: str
    protocol: str = ""  # "" = any protocol (ports must then be empty)
    ports: tuple[int | tuple[int, int], ...] = ()


@dataclass(frozen=True)
class EgressPolicy:
    mode: str = EGRESS_ALLOW
    allow: tuple[EgressAllow, ...] = ()


@dataclass(frozen=True)
class NicRules:
    tap: str
    mac: str
    ip: str
    tenant: str  # NICs with the same tenant may talk to each other on an isolated network
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    ip6: str = ""  # on a dual-stack network


@dataclass(frozen=True)
class RemoteNicRules:
    """A NIC of the same network on another host, reached through the network's VXLAN device."""

    mac: str
    ip: str
    tenant: str
    ip6: str = ""


@dataclass(frozen=True)
class NetworkRules:
    bridge: str
    cidr: str
    gateway: str
    tenant_isolation: bool = True
    nics: tuple[NicRules, ...] = ()
    cidr6: str = ""  # dual-stack: the IPv6 prefix, its gateway on the bridge
    gateway6: str = ""
    vxlan: str = ""  # the network's VXLAN port on the bridge when it spans hosts
    remote_nics: tuple[RemoteNicRules, ...] = ()  # NICs behind ``vxlan`` (on the other hosts)


@dataclass(frozen=True)
class PortForwardRules:
    protocol: str  # "tcp" | "udp"
    host_port: int
    ip: str
    port: int
    ip6: str = ""  # the guest's IPv6 address: the forward works on the host's IPv6 addresses too


@dataclass(frozen=True)
class HostRules:
    """Everything one host enforces."""

    networks: tuple[NetworkRules, ...] = ()
    port_forwards: tuple[PortForwardRules, ...] = ()
    # Guests' traffic to these is dropped whatever their egress policy says, except to
    # ``egress_exceptions`` (operator-set). Traffic inside a VM's own network is not affected.
    egress_blocked: tuple[str, ...] = DEFAULT_EGRESS_BLOCKED
    egress_exceptions: tuple[str, ...] = ()
    # VXLAN: only these underlay addresses may send us packets of these VNIs.
    tunnel_peers: tuple[str, ...] = ()
    tunnel_vnis: tuple[int, ...] = ()


# --- expression builders (libnftables JSON) ------------------------------------------------


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": name}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _raw_th(offset: int, length: int) -> dict[str, Any]:
    """``@th,<offset>,<length>``: bits of the transport header."""
    return {"payload": {"base": "th", "offset": offset, "len": length}}


def _set(values: Iterable[Any]) -> dict[str, Any]:
    return {"set": list(values)}


def _addr(cidr: str) -> Any:
    net = ipaddress.ip_network(cidr, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _ports(ports: Iterable[int | tuple[int, int]]) -> Any:
    items: list[Any] = [p if isinstance(p, int) else {"range": [p[0], p[1]]} for p in ports]
    return items[0] if len(items) == 1 and isinstance(items[0], int) else _set(items)


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}
COUNTER: dict[str, Any] = {"counter": None}
BRIDGES_SET = "@bridges"


class _Doc:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, kind: str, body: dict[str, Any]) -> None:
        self.items.append({"add": {kind: body}})

    def table(self, family: str) -> None:
        ref = {"family": family, "name": TABLE}
        self.items += [{"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}}]

    def chain(self, family: str, name: str, *, kind: str, hook: str, prio: int) -> Callable[..., None]:
        self.add(
            "chain",
            {
                "family": family,
                "table": TABLE,
                "name": name,
                "type": kind,
                "hook": hook,
                "prio": prio,
                "policy": "accept",
            },
        )

        def rule(*expr: dict[str, Any], comment: str | None = None) -> None:
            body: dict[str, Any] = {"family": family, "table": TABLE, "chain": name, "expr": list(expr)}
            if comment:
                body["comment"] = comment[:120]
            self.add("rule", body)

        return rule


# --- rendering -----------------------------------------------------------------------------


def _egress_rules(rule: Callable[..., None], bridge: str, nic: NicRules) -> None:
    """Per family the NIC has an address in: allow, the allow-list entries of that family, deny."""
    for version, family, source in ((4, "ip", nic.ip), (6, "ip6", nic.ip6)):
        if not source:
            continue
        suffix = "" if version == 4 else " (ip6)"
        src = [_match(_meta("iifname"), bridge), _match(_payload(family, "saddr"), source)]
        policy = nic.egress
        if policy.mode == EGRESS_ALLOW:
            rule(*src, ACCEPT, comment=f"egress allow {nic.tap}{suffix}")
            continue
        if policy.mode == EGRESS_ALLOWLIST:
            for entry in policy.allow:
                if ipaddress.ip_network(entry.cidr, strict=False).version != version:
                    continue
                expr = [*src, _match(_payload(family, "daddr"), _addr(entry.cidr))]
                if entry.protocol:
                    expr.append(_match(_meta("l4proto"), entry.protocol))
                    if entry.ports:
                        expr.append(_match(_payload(entry.protocol, "dport"), _ports(entry.ports)))
                rule(*expr, ACCEPT, comment=f"egress allowlist {nic.tap}{suffix}")
        rule(*src, COUNTER, DROP, comment=f"egress deny {nic.tap}{suffix}")


def _collapsed(cidrs: Iterable[str], version: int) -> list[Any]:
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    # An anonymous interval set refuses overlapping elements: merge them first.
    return [_addr(str(n)) for n in ipaddress.collapse_addresses(n for n in nets if n.version == version)]


def _blocked_rules(rule: Callable[..., None], rules: HostRules) -> None:
    for version, family in ((4, "ip"), (6, "ip6")):
        blocked = _collapsed(rules.egress_blocked, version)
        if not blocked:
            continue
        expr = [_match(_meta("iifname"), BRIDGES_SET), _match(_payload(family, "daddr"), _set(blocked))]
        exceptions = _collapsed(rules.egress_exceptions, version)
        if exceptions:
            expr.append(_match(_payload(family, "daddr"), _set(exceptions), op="!="))
        rule(*expr, COUNTER, DROP, comment=f"no egress to link-local, private or host networks ({family})")


def _tenant_ips(network: NetworkRules, version: int = 4) -> dict[str, list[str]]:
    tenants: dict[str, list[str]] = defaultdict(list)
    for nic in (*network.nics, *network.remote_nics):
        address = nic.ip if version == 4 else nic.ip6
        if address:
            tenants[nic.tenant].append(address)
    return {tenant: sorted(ips, key=ipaddress.ip_address) for tenant, ips in tenants.items()}


def _solicited_node_mac(ip6: str) -> str:
    """The Ethernet multicast address of ``ip6``'s solicited-node group (33:33:ff + its last 24 bits)."""
    low = ipaddress.IPv6Address(ip6).packed[-3:]
    return "33:33:ff:" + ":".join(f"{b:02x}" for b in low)


def _tunnel_rules(l2_in: Callable[..., None], l2_fwd: Callable[..., None], network: NetworkRules) -> None:
    """Layer-2 rules for a network's VXLAN port. Frames from the tunnel are treated as coming
    from the remote NICs the database knows (their MAC and addresses), never as a local TAP's;
    tenant isolation holds between local TAPs and remote NICs as between local TAPs."""
    port = _match(_meta("iifname"), network.vxlan)
    remote = network.remote_nics
    macs = sorted({r.mac.lower() for r in remote})
    ips = sorted({r.ip for r in remote}, key=ipaddress.ip_address)
    ip6s = sorted({r.ip6 for r in remote if r.ip6}, key=ipaddress.ip_address)
    if not macs:
        l2_in(port, COUNTER, DROP, comment=f"{network.vxlan} no remote NICs")
        return
    l2_in(port, _match(_payload("ether", "saddr"), _set(macs), op="!="), COUNTER, DROP, comment=f"{network.vxlan} MAC")
    types = ["ip", "arp", *(["ip6"] if ip6s else [])]
    l2_in(
        port, _match(_payload("ether", "type"), _set(types), op="!="), COUNTER, DROP, comment=f"{network.vxlan} types"
    )
    l2_in(
        port,
        _match(_payload("ether", "type"), "ip"),
        _match(_payload("ip", "saddr"), _set(ips), op="!="),
        COUNTER,
        DROP,
        comment=f"{network.vxlan} IPv4 source",
    )
    l2_in(
        port,
        _match(_payload("ether", "type"), "arp"),
        _match(_payload("arp", "saddr ip"), _set(ips), op="!="),
        COUNTER,
        DROP,
        comment=f"{network.vxlan} ARP sender",
    )
    if ip6s:
        l2_in(
            port,
            _match(_payload("ether", "type"), "ip6"),
            _match(_payload("ip6", "saddr"), _set([*ip6s, _addr("fe80::/10"), "::"]), op="!="),
            COUNTER,
            DROP,
            comment=f"{network.vxlan} IPv6 source",
        )
    taps = sorted(nic.tap for nic in network.nics)
    if not network.tenant_isolation or not taps:
        return
    local: dict[str, list[str]] = defaultdict(list)
    for nic in network.nics:
        local[nic.tenant].append(nic.tap)
    for tenant in sorted(local):
        theirs = [r for r in remote if r.tenant == tenant]
        if not theirs:
            continue
        tenant_macs = sorted({r.mac.lower() for r in theirs})
        same = _set(sorted(local[tenant]))
        to = ["ff:ff:ff:ff:ff:ff", *tenant_macs, *sorted({_solicited_node_mac(r.ip6) for r in theirs if r.ip6})]
        l2_fwd(
            _match(_meta("iifname"), same),
            _match(_meta("oifname"), network.vxlan),
            _match(_payload("ether", "daddr"), _set(sorted(set(to)))),
            ACCEPT,
            comment=f"tenant {tenant} on {network.bridge} to other hosts",
        )
        l2_fwd(
            port,
            _match(_meta("oifname"), same),
            _match(_payload("ether", "saddr"), _set(tenant_macs)),
            ACCEPT,
            comment=f"tenant {tenant} on {network.bridge} from other hosts",
        )
    l2_fwd(
        _match(_meta("iifname"), _set(taps)),
        _match(_meta("oifname"), network.vxlan),
        COUNTER,
        DROP,
        comment=f"tenant isolation on {network.bridge} to other hosts",
    )
    l2_fwd(port, COUNTER, DROP, comment=f"tenant isolation on {network.bridge} from other hosts")


def render(rules: HostRules) -> dict[str, Any]:
    """The complete libnftables JSON document for ``rules`` (deterministic: same input, same output)."""
    doc = _Doc()
    bridges = sorted({n.bridge for n in rules.networks})
    taps_by_bridge = {n.bridge: sorted(nic.tap for nic in n.nics) for n in rules.networks}

    # ---- inet: routed traffic ----
    doc.table("inet")
    set_body: dict[str, Any] = {"family": "inet", "table": TABLE, "name": "bridges", "type": "ifname"}
    if bridges:
        set_body["elem"] = bridges
    doc.add("set", set_body)

    fwd = doc.chain("inet", "forward", kind="filter", hook="forward", prio=0)
    fwd(_match({"ct": {"key": "state"}}, ["established", "related"], op="in"), ACCEPT)
    # Traffic within one bridge shows up here when it is routed back into the bridge via the
    # gateway, and also for plain bridged frames when br_netfilter is loaded (Docker hosts).
    # Either way the tenant check is on (anti-spoofed) IPv4 addresses, so it holds for both.
    for network in sorted(rules.networks, key=lambda n: n.bridge):
        same = [_match(_meta("iifname"), network.bridge), _match(_meta("oifname"), network.bridge)]
        if not network.tenant_isolation:
            fwd(*same, ACCEPT, comment=f"open network {network.bridge}")
            continue
        for version, family in ((4, "ip"), (6, "ip6")):
            for tenant, ips in sorted(_tenant_ips(network, version).items()):
                fwd(
                    *same,
                    _match(_payload(family, "saddr"), _set(ips)),
                    _match(_payload(family, "daddr"), _set(ips)),
                    ACCEPT,
                    comment=f"tenant {tenant} on {network.bridge}" + ("" if version == 4 else " (ip6)"),
                )
        if network.gateway6:
            # With br_netfilter, bridged IPv6 shows up here too: neighbour discovery goes to
            # multicast addresses, not to a tenant's; the bridge table keeps it within tenants.
            fwd(
                *same,
                _match(_payload("icmpv6", "type"), _set(ND_TYPES)),
                _match(_payload("ip6", "hoplimit"), 255),
                ACCEPT,
                comment=f"neighbour discovery on {network.bridge}",
            )
        fwd(*same, COUNTER, DROP, comment=f"tenant isolation on {network.bridge}")
    fwd(
        _match(_meta("iifname"), BRIDGES_SET),
        _match(_meta("oifname"), BRIDGES_SET),
        COUNTER,
        DROP,
        comment="no routing between networks",
    )
    fwd(
        _match(_meta("oifname"), BRIDGES_SET),
        _match({"ct": {"key": "status"}}, "dnat", op="in"),
        ACCEPT,
        comment="port forwards",
    )
    fwd(_match(_meta("oifname"), BRIDGES_SET), COUNTER, DROP, comment="no unsolicited inbound")
    _blocked_rules(fwd, rules)
    for network in sorted(rules.networks, key=lambda n: n.bridge):
        for nic in sorted(network.nics, key=lambda n: n.tap):
            _egress_rules(fwd, network.bridge, nic)
    fwd(_match(_meta("iifname"), BRIDGES_SET), COUNTER, DROP, comment="unknown source")

    inp = doc.chain("inet", "input", kind="filter", hook="input", prio=0)
    if rules.tunnel_vnis:
        # Anyone on the underlay could send VXLAN packets with forged inner frames: our VNIs are
        # accepted from the peer hosts' tunnel addresses only (VNI: bits 32-55 of the VXLAN
        # header, which follows the 8-byte UDP header).
        inp(
            _match(_meta("l4proto"), "udp"),
            _match(_payload("udp", "dport"), VXLAN_PORT),
            _match(_raw_th(96, 24), _set(rules.tunnel_vnis)),
            _match(_payload("ip", "saddr"), _set(rules.tunnel_peers), op="!="),
            COUNTER,
            DROP,
            comment="VXLAN of our networks from peer hosts only",
        )
    inp(
        _match(_meta("iifname"), BRIDGES_SET),
        _match({"ct": {"key": "state"}}, ["established", "related"], op="in"),
        ACCEPT,
    )
    for network in sorted(rules.networks, key=lambda n: n.bridge):
        inp(
            _match(_meta("iifname"), network.bridge),
            _match(_payload("ip", "daddr"), network.gateway),
            _match(_payload("icmp", "type"), "echo-request"),
            ACCEPT,
            comment="ping the gateway",
        )
        if network.gateway6:
            inp(
                _match(_meta("iifname"), network.bridge),
                _match(_payload("ip6", "daddr"), network.gateway6),
                _match(_payload("icmpv6", "type"), "echo-request"),
                ACCEPT,
                comment="ping the gateway (ip6)",
            )
    # IPv6 neighbour discovery with the host (the gateway), which ARP does for IPv4.
    inp(
        _match(_meta("iifname"), BRIDGES_SET),
        _match(_payload("icmpv6", "type"), _set(ND_TYPES)),
        _match(_payload("ip6", "hoplimit"), 255),
        ACCEPT,
        comment="neighbour discovery",
    )
    inp(_match(_meta("iifname"), BRIDGES_SET), COUNTER, DROP, comment="guests may not reach host services")

    pre = doc.chain("inet", "prerouting", kind="nat", hook="prerouting", prio=-100)
    out = doc.chain("inet", "output", kind="nat", hook="output", prio=-100)
    for pf in sorted(rules.port_forwards, key=lambda p: (p.protocol, p.host_port)):
        target = {"dnat": {"family": "ip", "addr": pf.ip, "port": pf.port}}
        local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        proto = _match(_meta("l4proto"), pf.protocol)
        dport = _match(_payload(pf.protocol, "dport"), pf.host_port)
        note = f"forward {pf.protocol}/{pf.host_port} to {pf.ip}:{pf.port}"
        # Guests cannot use port forwards (of anyone) through the host: isolation holds.
        pre(_match(_meta("iifname"), BRIDGES_SET, op="!="), local, proto, dport, target, comment=note)
        out(local, _match(_payload("ip", "daddr"), _addr("127.0.0.0/8"), op="!="), proto, dport, target, comment=note)
        if pf.ip6:
            target6 = {"dnat": {"family": "ip6", "addr": pf.ip6, "port": pf.port}}
            v6 = _match(_meta("nfproto"), "ipv6")
            note6 = f"forward {pf.protocol}/{pf.host_port} to [{pf.ip6}]:{pf.port}"
            pre(_match(_meta("iifname"), BRIDGES_SET, op="!="), v6, local, proto, dport, target6, comment=note6)
            out(local, _match(_payload("ip6", "daddr"), "::1", op="!="), proto, dport, target6, comment=note6)

    post = doc.chain("inet", "postrouting", kind="nat", hook="postrouting", prio=100)
    for network in sorted(rules.networks, key=lambda n: n.bridge):
        if any(nic.egress.mode != EGRESS_DENY for nic in network.nics):
            post(
                _match(_payload("ip", "saddr"), _addr(network.cidr)),
                _match(_meta("oifname"), BRIDGES_SET, op="!="),
                {"masquerade": None},
                comment=f"NAT {network.bridge} to the uplink",
            )
            if network.cidr6:
                post(
                    _match(_payload("ip6", "saddr"), _addr(network.cidr6)),
                    _match(_meta("oifname"), BRIDGES_SET, op="!="),
                    {"masquerade": None},
                    comment=f"NAT {network.bridge} to the uplink (ip6)",
                )

    # ---- bridge: layer 2 inside each bridge ----
    doc.table("bridge")
    l2_in = doc.chain("bridge", "prerouting", kind="filter", hook="prerouting", prio=-200)
    l2_fwd = doc.chain("bridge", "forward", kind="filter", hook="forward", prio=0)
    vxlans = sorted(n.vxlan for n in rules.networks if n.vxlan)
    if vxlans:
        # Each host is the gateway of its own guests only (every host's bridge holds the same
        # gateway address): nothing from a tunnel reaches this host's stack, and nothing the
        # host itself sends (ARP replies for the gateway, ...) leaves through one.
        l2_local_in = doc.chain("bridge", "input", kind="filter", hook="input", prio=0)
        l2_local_in(_match(_meta("iifname"), _set(vxlans)), COUNTER, DROP, comment="tunnels do not reach the host")
        l2_local_out = doc.chain("bridge", "output", kind="filter", hook="output", prio=0)
        l2_local_out(
            _match(_meta("oifname"), _set(vxlans)), COUNTER, DROP, comment="the host sends nothing into tunnels"
        )
    for network in sorted(rules.networks, key=lambda n: n.bridge):
        if network.vxlan:
            _tunnel_rules(l2_in, l2_fwd, network)
        for nic in sorted(network.nics, key=lambda n: n.tap):
            port = _match(_meta("iifname"), nic.tap)
            l2_in(
                port,
                _match(_payload("ether", "saddr"), nic.mac.lower(), op="!="),
                COUNTER,
                DROP,
                comment=f"{nic.tap} MAC",
            )
            l2_in(
                port,
                _match(_payload("ether", "type"), _set(["ip", "arp", *(["ip6"] if nic.ip6 else [])]), op="!="),
                COUNTER,
                DROP,
                comment=f"{nic.tap} IPv4/ARP{'/IPv6' if nic.ip6 else ''} only",
            )
            if nic.ip6:
                # Its own address, link-local (neighbour discovery) and :: (duplicate address detection).
                l2_in(
                    port,
                    _match(_payload("ether", "type"), "ip6"),
                    _match(_payload("ip6", "saddr"), _set([nic.ip6, _addr("fe80::/10"), "::"]), op="!="),
                    COUNTER,
                    DROP,
                    comment=f"{nic.tap} IPv6 source",
                )
                # Neighbour advertisements only for its own address or a link-local one (no
                # poisoning of the host's entry for another guest). nftables 1.0.6 has no
                # ``icmpv6 taddr``: the target is matched raw (bytes 8-23 of ICMPv6), 32 bits
                # at a time (JSON integers are 64-bit signed).
                advert = [port, _match(_payload("icmpv6", "type"), "nd-neighbor-advert")]
                target = int(ipaddress.IPv6Address(nic.ip6))
                words = [(target >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
                own = [_match(_raw_th(64 + 32 * i, 32), word) for i, word in enumerate(words)]
                l2_in(*advert, *own, ACCEPT, comment=f"{nic.tap} ND target own")
                l2_in(*advert, _match(_raw_th(64, 10), 0x3FA), ACCEPT, comment=f"{nic.tap} ND target link-local")
                l2_in(*advert, COUNTER, DROP, comment=f"{nic.tap} ND target")
            l2_in(
                port,
                _match(_payload("ether", "type"), "ip"),
                _match(_payload("ip", "saddr"), nic.ip, op="!="),
                COUNTER,
                DROP,
                comment=f"{nic.tap} IPv4 source",
            )
            l2_in(
                port,
                _match(_payload("ether", "type"), "arp"),
                _match(_payload("arp", "saddr ip"), nic.ip, op="!="),
                COUNTER,
                DROP,
                comment=f"{nic.tap} ARP sender",
            )
        taps = taps_by_bridge[network.bridge]
        if network.tenant_isolation and taps:
            tenants: dict[str, list[str]] = defaultdict(list)
            for nic in network.nics:
                tenants[nic.tenant].append(nic.tap)
            for tenant in sorted(tenants):
                same = _set(sorted(tenants[tenant]))
                l2_fwd(
                    _match(_meta("iifname"), same),
                    _match(_meta("oifname"), same),
                    ACCEPT,
                    comment=f"tenant {tenant} on {network.bridge}",
                )
            l2_fwd(
                _match(_meta("iifname"), _set(taps)),
                _match(_meta("oifname"), _set(taps)),
                COUNTER,
                DROP,
                comment=f"tenant isolation on {network.bridge}",
            )
    return {"nftables": doc.items}


def remove_document() -> dict[str, Any]:
    """A document that removes both of our tables (and nothing else), whether they exist or not."""
    items: list[dict[str, Any]] = []
    for family in FAMILIES:
        ref = {"family": family, "name": TABLE}
        items += [{"add": {"table": ref}}, {"delete": {"table": ref}}]
    return {"nftables": items}


# --- running nft ---------------------------------------------------------------------------


def _run(args: list[str], stdin: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed argv, document on stdin
        [NFT_BINARY, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def _nft(args: list[str], stdin: str | None = None, *, netns: str | None, timeout: float) -> str:
    try:
        proc = netns_call(netns, _run, args, stdin, timeout, timeout=timeout + 5)
    except FileNotFoundError as exc:
        raise NftError("the nft binary is not installed (apt-get install nftables)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NftError(f"nft did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise NftError("nft refused the ruleset", details={"stderr": proc.stderr[-4000:], "args": args})
    return proc.stdout


def apply(document: dict[str, Any], *, netns: str | None = None, timeout: float = NFT_TIMEOUT) -> None:
    """Load ``document`` as one atomic transaction (``nft -j -f -``)."""
    _nft(["-j", "-f", "-"], json.dumps(document), netns=netns, timeout=timeout)


def check(document: dict[str, Any], *, netns: str | None = None, timeout: float = NFT_TIMEOUT) -> None:
    """Validate ``document`` without applying it (``nft -c``)."""
    _nft(["-c", "-j", "-f", "-"], json.dumps(document), netns=netns, timeout=timeout)


def remove(*, netns: str | None = None, timeout: float = NFT_TIMEOUT) -> None:
    """Remove our tables; idempotent."""
    apply(remove_document(), netns=netns, timeout=timeout)


def list_tables(*, netns: str | None = None, timeout: float = NFT_TIMEOUT) -> list[tuple[str, str]]:
    """(family, name) of every table in the namespace (ours and others, read-only)."""
    out = json.loads(_nft(["-j", "list", "tables"], netns=netns, timeout=timeout) or '{"nftables": []}')
    return [(i["table"]["family"], i["table"]["name"]) for i in out.get("nftables", []) if "table" in i]


def list_ours(*, netns: str | None = None, timeout: float = NFT_TIMEOUT) -> list[dict[str, Any]]:
    """The objects (tables, chains, sets, rules) of our tables as ``nft -j`` lists them."""
    items: list[dict[str, Any]] = []
    for family in FAMILIES:
        if (family, TABLE) not in list_tables(netns=netns, timeout=timeout):
            continue
        out = json.loads(_nft(["-j", "list", "table", family, TABLE], netns=netns, timeout=timeout))
        items += [i for i in out.get("nftables", []) if "metainfo" not in i]
    return items
