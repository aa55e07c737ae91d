"""Reads about networks, NICs, port forwards, and the rules a host must enforce."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Q
from guardian.shortcuts import get_objects_for_user

from accounts.permissions import token_scope_filter
from accounts.roles import user_is_operator
from accounts.selectors import project_ids_with
from accounts.services import object_in_token_scope, user_has_perm
from networking import netlink, nft
from networking.models import EgressMode, EgressRule, Network, Nic, PortForward, parse_ports

NETWORK_PERMS = ("view", "change", "delete", "use")


def network_list_visible(user):
    """Operators see every network; others the shared ones and those they hold view rights on."""
    qs = Network.objects.select_related("owner").prefetch_related("egress_rules")
    if not getattr(user, "is_authenticated", False):
        return qs.none()
    qs = token_scope_filter(qs)
    if user_is_operator(user):
        return qs
    granted = get_objects_for_user(user, "networking.view_network", klass=Network, accept_global_perms=True)
    in_projects = Q(project_id__in=project_ids_with(user, "networking.view_network"))
    return qs.filter(Q(owner__isnull=True) | Q(pk__in=granted.values("pk")) | in_projects)


def network_user_can(user, perm: str, network: Network) -> bool:
    """``perm`` is view / change / delete / use. Operators may do everything; on a shared
    network everyone signed in may view and use; otherwise the object permission decides."""
    if perm not in NETWORK_PERMS:
        raise ValueError(perm)
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if not object_in_token_scope(network):
        return False
    if user_is_operator(user):
        return True
    if network.owner_id is None and perm in ("view", "use"):
        return True
    return user_has_perm(user, f"networking.{perm}_network", network)


def network_default() -> Network | None:
    return Network.objects.filter(is_default=True).first()


def nics_of(vm) -> list[Nic]:
    return list(Nic.objects.filter(vm=vm).select_related("network").order_by("index"))


def addresses_of(vm_ids) -> dict[str, list[str]]:
    """The addresses of these VMs (one query), by VM id, in NIC order (IPv4, then IPv6 on a
    dual-stack network): the first is the primary address."""
    found: dict[str, list[str]] = {}
    rows = Nic.objects.filter(vm_id__in=list(vm_ids)).order_by("vm_id", "index").values_list("vm_id", "ip", "ip6")
    for vm_id, ip, ip6 in rows:
        found.setdefault(str(vm_id), []).extend([ip, *([ip6] if ip6 else [])])
    return found


def port_forwards_of(vm):
    return PortForward.objects.filter(vm=vm).select_related("host").order_by("protocol", "host_port")


def port_forward_address(pf: PortForward) -> str:
    """What a user connects to (shown with a copy button in the dashboard)."""
    host = settings.SANDBOX_PORT_FORWARD_ADDRESS or pf.host.name
    return f"{host}:{pf.host_port}"


EGRESS_ORDER = {EgressMode.DENY: 0, EgressMode.ALLOWLIST: 1, EgressMode.ALLOW: 2}


def _ports_within(inner: str, outer: str) -> bool:
    if not outer:
        return True
    if not inner:
        return False
    ranges = [p if isinstance(p, tuple) else (p, p) for p in parse_ports(outer)]
    for port in parse_ports(inner):
        low, high = port if isinstance(port, tuple) else (port, port)
        if not any(a <= low and high <= b for a, b in ranges):
            return False
    return True


def egress_rule_within(rule, allowed) -> bool:
    """Whether allow-list entry ``rule`` permits nothing that ``allowed`` does not."""
    inner, outer = ipaddress.ip_network(rule.cidr, strict=False), ipaddress.ip_network(allowed.cidr, strict=False)
    if inner.version != outer.version or not inner.subnet_of(outer):
        return False
    if allowed.protocol and rule.protocol != allowed.protocol:
        return False
    return _ports_within(rule.ports, allowed.ports)


def egress_within(mode: str, rules, network_mode: str, network_rules) -> bool:
    """Whether a VM policy (``mode``, ``rules``) only narrows its network's:
    deny ⊂ allow-list ⊂ allow, and an allow-list within an allow-list names only parts of
    the network's entries. "" (the network's own policy) is always within."""
    if not mode:
        return True
    if EGRESS_ORDER[mode] != EGRESS_ORDER[network_mode]:
        return EGRESS_ORDER[mode] < EGRESS_ORDER[network_mode]
    if mode != EgressMode.ALLOWLIST:
        return True
    network_rules = list(network_rules)
    return all(any(egress_rule_within(r, n) for n in network_rules) for r in rules)


def _egress_allow(rules) -> tuple[nft.EgressAllow, ...]:
    return tuple(nft.EgressAllow(cidr=r.cidr, protocol=r.protocol, ports=parse_ports(r.ports)) for r in rules)


def network_policies(networks, rules_by_id) -> dict:
    """Each network's effective egress ``(mode, rules)``: its own, except that a user-created
    network never exceeds the operator's uplink policy (the default network's) — when it
    would (the operator narrowed the uplink later), the uplink policy applies instead."""
    default = next((n for n in networks if n.is_default), None)
    out = {}
    for network in networks:
        mode, rules = network.egress_mode, rules_by_id[network.pk]
        if network.user_created and default is not None:
            ceiling = (default.egress_mode, rules_by_id[default.pk])
            if not egress_within(mode, rules, *ceiling):
                mode, rules = ceiling
        out[network.pk] = (mode, rules)
    return out


@dataclass
class NetworkTunnel:
    """A network's VXLAN tunnel on one host: to the other hosts with plumbed NICs on it."""

    network: Network
    device: str
    vni: int
    local: str  # this host's tunnel address
    peers: dict[str, str] = field(default_factory=dict)  # host name -> tunnel address
    remote_nics: list[Nic] = field(default_factory=list)  # plumbed NICs of this network on the peers

    @property
    def fdb(self) -> set[tuple[str, str]]:
        """Forwarding entries: broadcast and unknown unicast to every peer, each remote NIC's
        MAC to its host (learning is off: the database, not received frames, says where a MAC is)."""
        entries = {(netlink.ZERO_MAC, address) for address in self.peers.values()}
        return entries | {(nic.mac.lower(), nic.vm.host.tunnel_address) for nic in self.remote_nics}


def host_tunnels(host) -> list[NetworkTunnel]:
    """The VXLAN tunnels ``host`` must have: one per network with plumbed NICs both here and on
    another active host, when both hosts have a tunnel address (a host without one takes no
    part). A network whose last peer left has none."""
    if not host.tunnel_address:
        return []
    local_networks = set(Nic.objects.filter(vm__host=host, plumbed=True).values_list("network_id", flat=True))
    if not local_networks:
        return []
    remote = (
        Nic.objects.filter(
            network_id__in=local_networks,
            plumbed=True,
            vm__host__is_active=True,
            vm__host__tunnel_address__isnull=False,
        )
        .exclude(vm__host=host)
        .exclude(vm__host__tunnel_address=host.tunnel_address)  # not a tunnel to ourselves
        .select_related("vm__host", "network")
        .order_by("tap")
    )
    tunnels: dict = {}
    for nic in remote:
        network = nic.network
        tunnel = tunnels.get(network.pk)
        if tunnel is None:
            tunnel = tunnels[network.pk] = NetworkTunnel(
                network=network, device=netlink.vxlan_name(str(network.pk)), vni=network.vni, local=host.tunnel_address
            )
        tunnel.peers[nic.vm.host.name] = nic.vm.host.tunnel_address
        tunnel.remote_nics.append(nic)
    return [tunnels[k] for k in sorted(tunnels, key=lambda k: tunnels[k].device)]


def host_rules(host) -> nft.HostRules:
    """Everything ``host`` must enforce, from the database: every network (so the drop rules
    cover each of our bridges), the plumbed NICs of its VMs, and their port forwards."""
    networks = list(Network.objects.order_by("name"))
    network_rules_by_id = {n.pk: list(EgressRule.objects.filter(network=n)) for n in networks}
    policy_by_id = network_policies(networks, network_rules_by_id)
    nics = list(Nic.objects.filter(vm__host=host, plumbed=True).select_related("vm", "network").order_by("tap"))
    vm_rules: dict = {}
    for rule in EgressRule.objects.filter(vm_id__in={n.vm_id for n in nics}):
        vm_rules.setdefault(rule.vm_id, []).append(rule)
    by_network: dict = {n.pk: [] for n in networks}
    first_ip: dict = {}
    for nic in nics:
        mode, allow = policy_by_id[nic.network_id]
        own = vm_rules.get(nic.vm_id, [])
        # A VM's own policy applies when it narrows the network's (also after an operator
        # narrowed the network later), or when an operator widened it on purpose.
        if nic.egress_mode and (nic.egress_widened or egress_within(nic.egress_mode, own, mode, allow)):
            mode, allow = nic.egress_mode, own
        policy = nft.EgressPolicy(mode=mode, allow=_egress_allow(allow) if mode == EgressMode.ALLOWLIST else ())
        by_network[nic.network_id].append(
            nft.NicRules(
                tap=nic.tap, mac=nic.mac, ip=nic.ip, ip6=nic.ip6 or "", tenant=str(nic.vm.project_id), egress=policy
            )
        )
        if nic.index == 0 or nic.vm_id not in first_ip:
            first_ip[nic.vm_id] = (nic.ip, nic.ip6 or "")
    tunnels = {t.network.pk: t for t in host_tunnels(host)}
    forwards = [
        nft.PortForwardRules(
            protocol=pf.protocol,
            host_port=pf.host_port,
            ip=first_ip[pf.vm_id][0],
            ip6=first_ip[pf.vm_id][1],
            port=pf.guest_port,
        )
        for pf in PortForward.objects.filter(host=host, vm_id__in=first_ip.keys())
    ]
    return nft.HostRules(
        networks=tuple(
            nft.NetworkRules(
                bridge=n.bridge,
                cidr=n.cidr,
                gateway=n.gateway,
                cidr6=n.cidr6,
                gateway6=n.gateway6 or "",
                tenant_isolation=n.tenant_isolation,
                nics=tuple(by_network[n.pk]),
                vxlan=tunnels[n.pk].device if n.pk in tunnels else "",
                remote_nics=tuple(
                    nft.RemoteNicRules(mac=r.mac, ip=r.ip, ip6=r.ip6 or "", tenant=str(r.vm.project_id))
                    for r in tunnels[n.pk].remote_nics
                )
                if n.pk in tunnels
                else (),
            )
            for n in networks
        ),
        port_forwards=tuple(forwards),
        tunnel_peers=tuple(sorted({a for t in tunnels.values() for a in t.peers.values()})),
        tunnel_vnis=tuple(sorted(t.vni for t in tunnels.values())),
    )
