"""Networking business rules: networks, address management, host plumbing, port forwards,
egress policy. Views, tasks and the VM lifecycle call these and nothing else.

Integration with the VM lifecycle: ``NetworkingConfig.ready`` registers the ``vm_hook_*``
functions below with ``vms.hooks`` (vms never imports networking; see docs/networking.md):

- ``nic_allocate(vm=...)`` inside the VM create transaction: MAC + IP from the database;
- ``nic_spec(vm=...)`` when building the ``VmSpec`` (tap, mac, kernel arguments);
- ``nic_plumb(vm=...)`` on the VM's host before the VMM is launched or restored;
- ``nic_unplumb(vm=...)`` on the VM's host after the VMM is gone (stop, delete);
- ``nic_release(vm=...)`` in the transaction that deletes the VM row;
- ``network_reconcile(host=...)`` at worker start on each host;
- ``network_tunnels_sync(host=...)``: the VXLAN devices of networks spanning hosts, after
  every plumb and unplumb here, and on the peer hosts (their queues) when NICs here change.

Host-side work (netlink, nftables) happens in ``settings.SANDBOX_NETNS`` (empty = host
namespace) and only on interfaces and tables we named.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import secrets
import uuid
import zlib
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from guardian.shortcuts import assign_perm

from accounts.audit import audit_record
from accounts.roles import user_is_operator
from accounts.services import owner_quota_lock
from networking import guest, netlink, nft, selectors
from networking.models import EgressMode, EgressRule, Network, Nic, PortForward, Protocol
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted, QuotaExceeded

logger = logging.getLogger(__name__)

_RULES_LOCK_BASE = 727_200_000  # + crc of the host name: serialises render+apply per host
MAX_EGRESS_RULES = 64
OWNER_NETWORK_PERMS = ("view_network", "change_network", "use_network")


@dataclass(frozen=True)
class NicSpec:
    """What the VMM and the guest need to know about one NIC."""

    tap: str
    mac: str
    ip: str
    gateway: str
    prefix: int
    index: int = 0
    ip6: str = ""  # on a dual-stack network, with its gateway and prefix length
    gateway6: str = ""
    prefix6: int = 64
    mtu: int = 1500  # what the guest's NIC gets (``host_guest_mtu``)

    @property
    def device_id(self) -> str:
        """The VMM's device id of this NIC (``net<index>``: what a hot-unplug names)."""
        return f"net{self.index}"

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    @property
    def kernel_args(self) -> str:
        """Kernel command line arguments read by the guest init (the Debian cloud kernel has
        no CONFIG_IP_PNP, so ``ip=`` would be ignored): ``sandbox.ip=<ip>/<prefix>
        sandbox.gw=<gateway>`` configure eth0."""
        return f"sandbox.ip={self.ip}/{self.prefix} sandbox.gw={self.gateway}"


def _netns() -> str | None:
    return settings.SANDBOX_NETNS or None


def _nic_spec(nic: Nic) -> NicSpec:
    return NicSpec(
        tap=nic.tap,
        mac=nic.mac,
        ip=nic.ip,
        gateway=nic.network.gateway,
        prefix=nic.network.ip_network.prefixlen,
        index=nic.index,
        ip6=nic.ip6 or "",
        gateway6=nic.network.gateway6 or "",
        prefix6=nic.network.ip_network6.prefixlen if nic.network.cidr6 else 64,
    )


# --- networks --------------------------------------------------------------------------------


def _egress_rules_validated(rules: list[dict] | None) -> list[EgressRule]:
    if rules is None:
        return []
    if len(rules) > MAX_EGRESS_RULES:
        raise ApplicationError(f"At most {MAX_EGRESS_RULES} egress rules.")
    out = []
    for i, raw in enumerate(rules):
        rule = EgressRule(
            cidr=str(raw.get("cidr", "")), protocol=raw.get("protocol") or "", ports=raw.get("ports") or ""
        )
        try:
            rule.clean()
            if rule.protocol and rule.protocol not in Protocol.values:
                raise ValidationError({"protocol": "tcp, udp or empty"})
        except ValidationError as exc:
            raise ApplicationError("Invalid egress rule.", details={str(i): exc.message_dict}) from exc
        out.append(rule)
    return out


def _egress_snapshot(rules) -> list[dict]:
    return [{"cidr": r.cidr, "protocol": r.protocol, "ports": r.ports} for r in rules]


def _network_snapshot(network: Network) -> dict:
    return {
        "name": network.name,
        "cidr": network.cidr,
        "gateway": network.gateway,
        "cidr6": network.cidr6,
        "owner": network.owner_id,
        "tenant_isolation": network.tenant_isolation,
        "egress_mode": network.egress_mode,
        "egress_rules": _egress_snapshot(network.egress_rules.all()),
    }


def user_network_limit(user) -> int:
    """How many private networks ``user`` may create themselves (``SANDBOX_USER_MAX_NETWORKS``).
    The one place this limit is read: per-user or per-project quota objects replace it here."""
    return settings.SANDBOX_USER_MAX_NETWORKS


def uplink_policy() -> tuple[str, list[EgressRule]]:
    """The operator's uplink policy, which a user-created network can only narrow: the
    default network's egress mode and allow-list."""
    default = network_default_ensure()
    return default.egress_mode, list(default.egress_rules.all())


def _user_subnet_pick(cidr: str | None) -> str:
    """A user network's subnet: ``cidr`` when it lies inside ``SANDBOX_USER_NETWORK_POOL`` (a
    /16-/29), else the first free ``SANDBOX_USER_NETWORK_PREFIX`` of the pool. Call it under
    the network-creation lock."""
    pool = ipaddress.IPv4Network(settings.SANDBOX_USER_NETWORK_POOL)
    if cidr:
        try:
            net = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise ApplicationError("Invalid subnet.", details={"cidr": str(exc)}) from exc
        if not net.subnet_of(pool):
            raise ApplicationError(
                f"A user network's subnet lies inside {pool}.", details={"cidr": f"must be inside {pool}"}
            )
        return str(net)
    taken = [n.ip_network for n in Network.objects.all()]
    for candidate in pool.subnets(new_prefix=max(pool.prefixlen, settings.SANDBOX_USER_NETWORK_PREFIX)):
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise ConflictError(f"No free subnet left in {pool}.", code="network_pool_full")


def network_create(
    *,
    name: str,
    actor,
    cidr: str | None = None,
    gateway: str | None = None,
    cidr6: str = "",
    owner=None,
    tenant_isolation: bool = True,
    egress_mode: str | None = None,
    egress_rules: list[dict] | None = None,
    is_default: bool = False,
) -> Network:
    """Create a network. The gateway defaults to the first host address; a private network
    (``owner``) gives its owner view, change and use rights.

    Operators create any network (egress default: allow). Users whose role may create VMs
    create private networks of their own (``_user_network_checked``): within their limit
    (``user_network_limit``), tenant-isolated, on a subnet of the user pool (picked when
    ``cidr`` is omitted; an IPv6 prefix ``cidr6`` inside ``SANDBOX_USER_NETWORK_POOL6``), with
    egress that only narrows the operator's uplink policy (default: that policy itself); they
    may also delete them."""
    user_made = actor is not None and not (user_is_operator(actor) or actor.has_perm("networking.add_network"))
    if user_made:
        _user_network_checked(actor=actor, owner=owner, tenant_isolation=tenant_isolation, is_default=is_default)
        if cidr6:
            pool6 = ipaddress.IPv6Network(settings.SANDBOX_USER_NETWORK_POOL6)
            try:
                inside = ipaddress.IPv6Network(cidr6, strict=True).subnet_of(pool6)
            except ValueError as exc:
                raise ApplicationError("Invalid IPv6 prefix.", details={"cidr6": str(exc)}) from exc
            if not inside:
                raise ApplicationError(
                    f"A user network's IPv6 prefix lies inside {pool6}.", details={"cidr6": f"must be inside {pool6}"}
                )
        owner = actor
    net6 = None
    if cidr6:
        try:
            net6 = ipaddress.IPv6Network(cidr6, strict=True)
        except ValueError as exc:
            raise ApplicationError("Invalid IPv6 prefix.", details={"cidr6": str(exc)}) from exc
    if egress_mode is not None and egress_mode not in EgressMode.values:
        raise ApplicationError("Unknown egress mode.", details={"egress_mode": EgressMode.values})
    rules = _egress_rules_validated(egress_rules)
    if user_made:
        ceiling_mode, ceiling_rules = uplink_policy()
        if egress_mode is None:
            egress_mode = ceiling_mode
            rules = (
                rules
                if egress_rules is not None
                else [EgressRule(cidr=r.cidr, protocol=r.protocol, ports=r.ports) for r in ceiling_rules]
            )
        if not selectors.egress_within(egress_mode, rules, ceiling_mode, ceiling_rules):
            from accounts.permissions import require_perm

            require_perm(
                actor,
                "networking.change_network",
                None,
                action="network.create",
                message="A network you create can only narrow the operator's uplink policy "
                f"({ceiling_mode}{': ' + ', '.join(str(r) for r in ceiling_rules) if ceiling_rules else ''}).",
            )
    egress_mode = egress_mode or EgressMode.ALLOW
    with transaction.atomic():
        if user_made:
            owner_quota_lock(actor)  # then count: parallel creates cannot pass the limit together
            count = Network.objects.filter(owner=actor, user_created=True).count()
            if count >= user_network_limit(actor):
                raise QuotaExceeded(
                    "You have reached your limit of private networks.",
                    details={"networks": f"{count} of {user_network_limit(actor)} used"},
                )
            # One creation at a time picks a subnet (the default network's row is the lock).
            Network.objects.select_for_update().filter(is_default=True).exists()
            cidr = _user_subnet_pick(cidr)
        try:
            net = ipaddress.IPv4Network(cidr or "", strict=True)
        except ValueError as exc:
            raise ApplicationError("Invalid subnet.", details={"cidr": str(exc)}) from exc
        network = Network(
            name=name,
            cidr=str(net),
            gateway=gateway or str(next(net.hosts())),
            cidr6=str(net6) if net6 else "",
            gateway6=str(net6.network_address + 1) if net6 else None,
            owner=owner,
            tenant_isolation=tenant_isolation,
            egress_mode=egress_mode,
            is_default=is_default,
            user_created=user_made,
        )
        network.full_clean()  # a ValidationError is a 400 (sandbox_site.errors)
        network.save()
        for rule in rules:
            rule.network = network
            rule.save()
        if owner is not None:
            for codename in (*OWNER_NETWORK_PERMS, *(("delete_network",) if user_made else ())):
                assign_perm(f"networking.{codename}", owner, network)
        audit_record(actor=actor, action="network.create", obj=network, after=_network_snapshot(network))
        _rules_apply_everywhere()
    return network


def _user_network_checked(*, actor, owner, tenant_isolation: bool, is_default: bool) -> None:
    from accounts.permissions import require_perm

    require_perm(actor, "vms.add_vm", None, action="network.create", message="Your role may not create networks.")
    if owner is not None and owner != actor:
        raise NotPermitted("You can create networks for yourself only.")
    if not tenant_isolation or is_default:
        raise NotPermitted("Only operators can create shared, default or non-isolated networks.")


def network_default_ensure() -> Network:
    """The default network, created on first use from ``SANDBOX_NETWORK_DEFAULT_CIDR``."""
    existing = selectors.network_default()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return network_create(
                name="default",
                cidr=settings.SANDBOX_NETWORK_DEFAULT_CIDR,
                egress_mode=settings.SANDBOX_NETWORK_DEFAULT_EGRESS,
                is_default=True,
                actor=None,
            )
    except (IntegrityError, ValidationError, ApplicationError):
        # Another process created it first (unique default / name / cidr).
        existing = selectors.network_default()
        if existing is None:
            raise
        return existing


def _require_network_perm(actor, perm: str, network: Network, *, action: str) -> None:
    from accounts.permissions import require_perm

    allowed = selectors.network_user_can(actor, perm, network)
    require_perm(actor, f"networking.{perm}_network", network, action=action, allowed=allowed)


def network_update(
    *,
    network: Network,
    actor,
    name: str | None = None,
    tenant_isolation: bool | None = None,
    egress_mode: str | None = None,
    egress_rules: list[dict] | None = None,
) -> Network:
    """Change a network. Needs change rights on it; relaxing tenant isolation is for operators only."""
    _require_network_perm(actor, "change", network, action="network.update")
    if tenant_isolation is not None and tenant_isolation != network.tenant_isolation and not user_is_operator(actor):
        raise NotPermitted("Only operators can change tenant isolation.")
    if egress_mode is not None and egress_mode not in EgressMode.values:
        raise ApplicationError("Unknown egress mode.", details={"egress_mode": EgressMode.values})
    rules = _egress_rules_validated(egress_rules) if egress_rules is not None else None
    if egress_mode is not None or rules is not None:
        # The owner of a private network may narrow its egress; wider is an operator's call.
        current_rules = list(network.egress_rules.all())
        new_mode = egress_mode if egress_mode is not None else network.egress_mode
        if not selectors.egress_within(
            new_mode, rules if rules is not None else current_rules, network.egress_mode, current_rules
        ):
            from accounts.permissions import require_perm

            require_perm(
                actor,
                "networking.change_network",
                None,
                action="network.update",
                message="Only an operator can widen a network's egress.",
            )
    with transaction.atomic():
        locked = Network.objects.select_for_update().get(pk=network.pk)
        before = _network_snapshot(locked)
        if name is not None:
            locked.name = name
        if tenant_isolation is not None:
            locked.tenant_isolation = tenant_isolation
        if egress_mode is not None:
            locked.egress_mode = egress_mode
        locked.full_clean()
        locked.save()
        if rules is not None:
            EgressRule.objects.filter(network=locked).delete()
            for rule in rules:
                rule.network = locked
                rule.save()
        audit_record(actor=actor, action="network.update", obj=locked, before=before, after=_network_snapshot(locked))
        _rules_apply_everywhere()
    return locked


def network_delete(*, network: Network, actor) -> None:
    """Delete a network that no NIC uses (never the default one)."""
    _require_network_perm(actor, "delete", network, action="network.delete")
    from guardian.models import GroupObjectPermission, UserObjectPermission

    with transaction.atomic():
        locked = Network.objects.select_for_update().get(pk=network.pk)
        if locked.is_default:
            raise ConflictError("The default network cannot be deleted.")
        if locked.nics.exists():
            raise ConflictError("VMs are attached to this network.", details={"nics": locked.nics.count()})
        audit_record(actor=actor, action="network.delete", obj=locked, before=_network_snapshot(locked))
        for model in (UserObjectPermission, GroupObjectPermission):
            model.objects.filter(
                content_type__app_label="networking", content_type__model="network", object_pk=str(locked.pk)
            ).delete()
        locked.delete()
        _rules_apply_everywhere()


# --- address management ----------------------------------------------------------------------


def _random_mac() -> str:
    # 02: locally administered, unicast.
    return "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


MAX_NICS_PER_VM = 8


def nic_requests_resolve(*, actor, nics: list[dict] | None) -> list[tuple[Network, str | None, str | None]]:
    """Check what a request asks for (``[{"network": <name or id>, "ip": <IPv4>?, "ip6": <IPv6>?},
    ...]``): each network must exist and be visible to ``actor`` (else 400, its existence not
    told) and usable by them (else 403, audited); a fixed address must be a host address of the
    network's range (``ip6``: of its IPv6 prefix, on a dual-stack network) other than its gateway.
    Whether it is free is checked at allocation. Returns ``(network, ip, ip6)`` per NIC."""
    if not isinstance(nics, list) or not 1 <= len(nics) <= MAX_NICS_PER_VM:
        raise ApplicationError(f"nics must be a list of 1 to {MAX_NICS_PER_VM} NICs.", details={"nics": "length"})
    network_default_ensure()  # so that "default" names it on a fresh installation too
    resolved: list[tuple[Network, str | None, str | None]] = []
    seen_ips: set[tuple[str, str]] = set()
    for i, raw in enumerate(nics):
        if not isinstance(raw, dict):
            raise ApplicationError("Each NIC is an object {network, ip?}.", details={str(i): "not an object"})
        network = _network_lookup(actor, raw.get("network"))
        if network is None:
            raise ApplicationError(
                f"Unknown network {str(raw.get('network'))[:63]!r}.", details={str(i): {"network": "unknown"}}
            )
        _require_network_perm(actor, "use", network, action="vm.nic_attach")
        ip = raw.get("ip") or None
        if ip is not None:
            ip = _fixed_ip_checked(network, ip, field=str(i))
            if (str(network.pk), ip) in seen_ips:
                raise ApplicationError(f"Address {ip} is asked for twice.", details={str(i): {"ip": "duplicate"}})
            seen_ips.add((str(network.pk), ip))
        ip6 = raw.get("ip6") or None
        if ip6 is not None:
            ip6 = _fixed_ip6_checked(network, ip6, field=str(i))
            if (str(network.pk), ip6) in seen_ips:
                raise ApplicationError(f"Address {ip6} is asked for twice.", details={str(i): {"ip6": "duplicate"}})
            seen_ips.add((str(network.pk), ip6))
        resolved.append((network, ip, ip6))
    return resolved


def _network_lookup(actor, ref) -> Network | None:
    """The network named or identified by ``ref`` if ``actor`` may see it, else None."""
    if not isinstance(ref, str) or not ref or len(ref) > 63:
        return None
    try:
        by_id = {"pk": uuid.UUID(ref)}
    except ValueError:
        by_id = {"name": ref}
    network = Network.objects.filter(**by_id).first()
    if network is None or (actor is not None and not selectors.network_user_can(actor, "view", network)):
        return None
    return network


def _fixed_ip_checked(network: Network, ip, *, field: str = "ip") -> str:
    try:
        address = ipaddress.IPv4Address(str(ip))
    except ValueError as exc:
        raise ApplicationError(f"{str(ip)[:45]!r} is not an IPv4 address.", details={field: {"ip": "invalid"}}) from exc
    net = network.ip_network
    if address not in net or address in (net.network_address, net.broadcast_address):
        raise ApplicationError(
            f"{address} is not a host address of network {network.name} ({network.cidr}).",
            details={field: {"ip": "outside the network's range"}},
        )
    if str(address) == network.gateway:
        raise ApplicationError(
            f"{address} is the gateway of network {network.name}.", details={field: {"ip": "the gateway"}}
        )
    return str(address)


def _fixed_ip6_checked(network: Network, ip6, *, field: str = "ip6") -> str:
    net6 = network.ip_network6
    if net6 is None:
        raise ApplicationError(
            f"Network {network.name} has no IPv6 prefix.", details={field: {"ip6": "IPv4-only network"}}
        )
    try:
        address = ipaddress.IPv6Address(str(ip6))
    except ValueError as exc:
        raise ApplicationError(
            f"{str(ip6)[:45]!r} is not an IPv6 address.", details={field: {"ip6": "invalid"}}
        ) from exc
    if address not in net6 or address == net6.network_address or str(address) == network.gateway6:
        raise ApplicationError(
            f"{address} is not a free host address of {network.name}'s prefix {network.cidr6} (or is its gateway).",
            details={field: {"ip6": "outside the network's range"}},
        )
    return str(address)


def nic_allocate(
    *, vm, network: Network | None = None, actor=None, ip: str | None = None, ip6: str | None = None
) -> NicSpec:
    """Give ``vm`` a NIC on ``network`` (default network when omitted): ``ip`` when given (a
    free host address of the subnet, else 400), otherwise the lowest free one, and a random
    locally administered MAC; its index is the lowest free one (eth<index> at creation).
    Call it inside the VM create transaction: the network row lock serialises concurrent
    allocations, and the unique (network, ip) constraint backs it up."""
    network = network or network_default_ensure()
    if actor is not None and not selectors.network_user_can(actor, "use", network):
        raise NotPermitted("You may not attach VMs to this network.")
    with transaction.atomic():
        locked = Network.objects.select_for_update().get(pk=network.pk)
        taken_indexes = set(Nic.objects.filter(vm=vm).values_list("index", flat=True))
        if len(taken_indexes) >= MAX_NICS_PER_VM:
            raise ConflictError(f"A VM has at most {MAX_NICS_PER_VM} NICs.", code="too_many_nics")
        index = next(i for i in range(MAX_NICS_PER_VM + 1) if i not in taken_indexes)
        used = set(Nic.objects.filter(network=locked).values_list("ip", flat=True))
        used.add(locked.gateway)
        if ip is not None:
            ip = _fixed_ip_checked(locked, ip)
            if ip in used:
                raise ApplicationError(
                    f"Address {ip} of network {locked.name} is taken.", details={"ip": "taken"}, code="ip_taken"
                )
        else:
            ip = next((str(a) for a in locked.ip_network.hosts() if str(a) not in used), None)
        if ip is None:
            raise ConflictError(f"Network {locked.name} has no free address left.", code="network_full")
        if ip6 is not None:
            ip6 = _fixed_ip6_checked(locked, ip6)
            if Nic.objects.filter(network=locked, ip6=ip6).exists():
                raise ApplicationError(
                    f"Address {ip6} of network {locked.name} is taken.", details={"ip6": "taken"}, code="ip_taken"
                )
        else:
            ip6 = _free_ip6(locked)
        for _attempt in range(5):
            try:
                with transaction.atomic():
                    nic = Nic.objects.create(vm=vm, network=locked, index=index, ip=ip, ip6=ip6, mac=_random_mac())
                break
            except IntegrityError:
                if Nic.objects.filter(network=locked, ip=ip).exists():
                    raise
        else:  # five MAC collisions in a row: something is wrong with the random source
            raise ApplicationError("Could not pick a unique MAC address.")
        audit_record(
            actor=actor,
            action="vm.nic_attach",
            obj=vm,
            after={"network": locked.name, "ip": ip, "ip6": ip6, "mac": nic.mac, "index": index},
        )
    return _nic_spec(Nic.objects.select_related("network").get(pk=nic.pk))


def _free_ip6(network: Network) -> str | None:
    """The lowest free IPv6 address of a dual-stack network after its gateway (``::1``), or
    None on an IPv4-only one. Called under the network's row lock (``nic_allocate``)."""
    net6 = network.ip_network6
    if net6 is None:
        return None
    used = {
        ipaddress.IPv6Address(a)
        for a in Nic.objects.filter(network=network).exclude(ip6=None).values_list("ip6", flat=True)
    }
    if network.gateway6:
        used.add(ipaddress.IPv6Address(network.gateway6))
    candidate = net6.network_address + 2
    while candidate in used:
        candidate += 1
    if candidate not in net6 or candidate == net6.broadcast_address:
        raise ConflictError(f"Network {network.name} has no free IPv6 address left.", code="network_full")
    return str(candidate)


def nic_spec(*, vm) -> NicSpec | None:
    """The first NIC of ``vm`` (what ``VmSpec.tap``/``mac`` and the kernel arguments come from)."""
    nics = selectors.nics_of(vm)
    return _nic_spec(nics[0]) if nics else None


def nic_specs(*, vm) -> list[NicSpec]:
    """Every NIC of ``vm`` in index order (the first one is ``nic_spec``'s)."""
    return [_nic_spec(n) for n in selectors.nics_of(vm)]


def nic_release(*, vm, actor=None) -> int:
    """Free the VM's addresses, port forwards and egress rules (call in the transaction that
    deletes the VM row; rows cascade anyway). Returns the number of NICs released."""
    with transaction.atomic():
        nics = list(Nic.objects.filter(vm=vm).select_related("network"))
        forwards = list(PortForward.objects.filter(vm=vm))
        PortForward.objects.filter(vm=vm).delete()
        EgressRule.objects.filter(vm=vm).delete()
        Nic.objects.filter(vm=vm).delete()
        if nics or forwards:
            audit_record(
                actor=actor,
                action="vm.nic_release",
                obj=vm,
                before={
                    "nics": [{"network": n.network.name, "ip": n.ip, "mac": n.mac} for n in nics],
                    "port_forwards": [str(pf) for pf in forwards],
                },
            )
    return len(nics)


# --- NICs of an existing VM ------------------------------------------------------------------


def _nic_snapshot(nic: Nic) -> dict:
    return {"id": str(nic.pk), "network": nic.network.name, "ip": nic.ip, "mac": nic.mac, "index": nic.index}


def _hotplug_or_refuse(vm, verb: str) -> None:
    """A running VM's NICs change by hot-plug when its driver can, else 409 ``restart_required``
    (as a resize); any other state than stopped or running is a 409 too."""
    from vms.hypervisor import driver_capabilities
    from vms.models import VmState

    if vm.state != VmState.RUNNING:
        raise ConflictError(
            f"The VM is {vm.state}: NICs are {verb} on a stopped or running VM.",
            code="invalid_state",
            details={"state": vm.state},
        )
    if not driver_capabilities(vm.driver).nic_hotplug:
        raise ConflictError(
            f"The {vm.driver or 'current'} driver cannot hot-plug NICs: stop the VM, change its NICs, then start it.",
            code="restart_required",
        )


def vm_nic_add(
    *, vm, actor, network: str, ip: str | None = None, ip6: str | None = None
) -> tuple[NicSpec, object | None]:
    """Give an existing VM one more NIC on ``network`` (name or id; as at create: visible,
    usable, optional free fixed ``ip``). A stopped VM gets it at its next start (no
    operation); a running VM gets it hot-plugged by an operation (``nic_hotplug``) when its
    driver can, else 409 ``restart_required``. Returns the NIC and the operation (or None)."""
    from vms.models import VM, VmState
    from vms.operations import operation_enqueue, operation_new
    from vms.transitions import vm_transition_request

    _require_vm_change(actor, vm, "vm.nic_add")
    if not settings.SANDBOX_NETWORKING:
        raise ApplicationError("Networking is turned off here.", details={"nics": "off"})
    [(resolved, fixed, fixed6)] = nic_requests_resolve(actor=actor, nics=[{"network": network, "ip": ip, "ip6": ip6}])
    with transaction.atomic():
        locked = VM.objects.select_for_update().get(pk=vm.pk)  # a start waits for this change
        if locked.state == VmState.STOPPED:
            return nic_allocate(vm=locked, network=resolved, actor=actor, ip=fixed, ip6=fixed6), None
        _hotplug_or_refuse(locked, "added")
        spec = nic_allocate(vm=locked, network=resolved, actor=actor, ip=fixed, ip6=fixed6)
        previous = vm_transition_request(locked, "nic_hotplug")
        op = operation_new(
            vm=locked,
            action="nic_hotplug",
            actor=actor,
            params={"add": spec.tap, "previous_state": previous},
        )
        operation_enqueue(op, locked)
    return spec, op


def vm_nic_remove(*, vm, actor, nic_id) -> object | None:
    """Remove one NIC of a VM: at once from a stopped VM (its last NIC also takes its port
    forwards), by a hot-unplug operation from a running one whose driver can (else 409
    ``restart_required``). Audited as ``vm.nic_detach``. Returns the operation or None."""
    from vms.models import VM, VmState
    from vms.operations import operation_enqueue, operation_new
    from vms.transitions import vm_transition_request

    _require_vm_change(actor, vm, "vm.nic_remove")
    with transaction.atomic():
        locked = VM.objects.select_for_update().get(pk=vm.pk)
        nic = Nic.objects.filter(vm=locked, pk=nic_id).select_related("network").first()
        if nic is None:
            raise ApplicationError("No such NIC on this VM.", code="not_found", status_code=404)
        if locked.state == VmState.STOPPED:
            _nic_row_delete(nic, actor=actor)
            return None
        _hotplug_or_refuse(locked, "removed")
        previous = vm_transition_request(locked, "nic_hotplug")
        op = operation_new(
            vm=locked,
            action="nic_hotplug",
            actor=actor,
            params={"remove": nic.tap, "device_id": f"net{nic.index}", "previous_state": previous},
        )
        audit_record(
            actor=actor, action="vm.nic_detach", obj=locked, before=_nic_snapshot(nic), after={"operation": str(op.pk)}
        )
        operation_enqueue(op, locked)
    return op


def _nic_row_delete(nic: Nic, *, actor, audited: bool = True) -> None:
    """Delete a NIC row (its address is free again); the VM's last NIC takes its port forwards
    along. Host rules follow on the VM's host."""
    vm = nic.vm
    with transaction.atomic():
        Nic.objects.filter(pk=nic.pk).delete()
        forwards = []
        if not Nic.objects.filter(vm_id=nic.vm_id).exists():
            forwards = [str(pf) for pf in PortForward.objects.filter(vm_id=nic.vm_id)]
            PortForward.objects.filter(vm_id=nic.vm_id).delete()
        if audited:
            audit_record(
                actor=actor, action="vm.nic_detach", obj=vm, before={**_nic_snapshot(nic), "port_forwards": forwards}
            )
        if vm.host_id:
            _rules_apply_enqueue(vm.host)


NIC_CONFIGURE_TIMEOUT = 20


def nic_guest_configure(*, vm, nics: list[NicSpec], with_route6: bool = False) -> list[str]:
    """Configure ``nics`` inside the running guest through its agent (an ``exec`` of
    ``guest.NIC_CONFIGURE_SCRIPT``: the interface with the NIC's MAC gets its static address, up
    to 10 s after a hot-plug for it to appear). The first NIC is configured by the guest's
    init from the kernel command line and has the default route; these have none. Returns
    lines for the operation log; a failure is a line too (the VM keeps running). IPv6
    addresses of every NIC come this way (the guest's init knows IPv4 only); with
    ``with_route6`` the first of ``nics`` also gets the IPv6 default route."""
    from vms import agent_gateway

    lines = []
    for nic in nics:
        first = nic is nics[0] and with_route6
        argv = guest.nic_configure_argv(
            nic.mac,
            f"{nic.ip}/{nic.prefix}",
            f"{nic.ip6}/{nic.prefix6}" if nic.ip6 else "",
            nic.gateway6 if nic.ip6 and first else "",
        )
        try:
            started, _ = agent_gateway.agent_call(
                vm, "exec_start", {"argv": argv, "timeout": NIC_CONFIGURE_TIMEOUT, "tag": "sandbox-net"}, timeout=10
            )
            exec_id = started["exec_id"]
            summary, _ = agent_gateway.agent_call(
                vm,
                "exec_wait",
                {"exec_id": exec_id, "timeout": NIC_CONFIGURE_TIMEOUT},
                timeout=NIC_CONFIGURE_TIMEOUT + 10,
            )
            result = summary.get("result") or {}
            if result.get("exit_code") != 0:
                _, data = agent_gateway.agent_call(vm, "exec_read", {"exec_id": exec_id, "max": 1024}, timeout=10)
                why = data.decode(errors="replace").strip()[-300:]
                raise ApplicationError(
                    why or f"exit {result.get('exit_code')}, {'running' if summary.get('running') else 'done'}"
                )
            agent_gateway.agent_call(vm, "exec_forget", {"exec_id": exec_id}, timeout=10)
            six = f" {nic.ip6}/{nic.prefix6}" if nic.ip6 else ""
            lines.append(f"network: guest {nic.device_id} {nic.ip}/{nic.prefix}{six} configured")
        except (ApplicationError, KeyError) as exc:
            lines.append(
                f"warning: guest NIC {nic.device_id} ({nic.mac}) not configured: {getattr(exc, 'message', exc)}"
            )
    return lines


def nic_hotplug_call(driver, spec, op) -> dict:
    """The ``nic_hotplug`` operation on the VM's host (an in-place action, see
    ``vms.lifecycle.in_place_handler``): plumb the new NIC's TAP, ``driver.nic_add``, configure
    it in the guest; or ``driver.nic_remove``, then its TAP and row go. A failed hot-plug takes
    the new NIC's row and TAP away again."""
    from vms.models import VM
    from vms.operations import operation_log
    from vms.vmm.base import NicDevice

    vm = VM.objects.select_related("host").get(pk=op.vm_id)
    params = op.params
    if "add" in params:
        nic = Nic.objects.filter(vm=vm, tap=params["add"]).select_related("network").first()
        if nic is None:
            return {}  # removed meanwhile
        new = _nic_spec(nic)
        try:
            nic_plumb(vm=vm)
            driver.nic_add(spec, NicDevice(tap=new.tap, mac=new.mac, device_id=new.device_id))
        except Exception:
            netlink.link_remove(new.tap, netns=_netns())
            _nic_row_delete(nic, actor=None, audited=False)
            audit_record(
                actor=None, action="vm.nic_detach", obj=vm, before={**_nic_snapshot(nic), "reason": "hot-plug failed"}
            )
            raise
        for line in nic_guest_configure(vm=vm, nics=[new]):
            operation_log(op, line)
        return {}
    nic = Nic.objects.filter(vm=vm, tap=params["remove"]).select_related("network").first()
    driver.nic_remove(spec, params["device_id"])
    netlink.link_remove(params["remove"], netns=_netns())
    if nic is not None:
        _nic_row_delete(nic, actor=None, audited=False)
    network_rules_apply(host=vm.host)
    return {}


# --- host plumbing (runs on the VM's host) ---------------------------------------------------


def nic_plumb(*, vm) -> list[NicSpec]:
    """Before the VMM starts, on the VM's host: bridge and TAP up, rules applied. Idempotent."""
    nics = selectors.nics_of(vm)
    if not nics:
        return []
    Nic.objects.filter(pk__in=[n.pk for n in nics]).update(plumbed=True)  # before the TAP exists: reconcile keeps it
    mtu = host_guest_mtu(vm.host)
    for nic in nics:
        _bridge_ensure(nic.network)
        netlink.tap_ensure(nic.tap, nic.network.bridge, netns=_netns(), mtu=mtu)
    network_tunnels_sync(host=vm.host)
    network_rules_apply(host=vm.host)
    _tunnel_peers_notify(vm.host, {n.network_id for n in nics})
    return [_nic_spec(n) for n in nics]


def _bridge_ensure(net: Network) -> None:
    net6 = net.ip_network6
    netlink.bridge_ensure(
        net.bridge,
        net.gateway,
        net.ip_network.prefixlen,
        netns=_netns(),
        gateway6=net.gateway6 or "",
        prefix6=net6.prefixlen if net6 else 64,
    )


def nic_unplumb(*, vm) -> None:
    """After the VMM is gone, on the VM's host: TAPs removed, rules without them applied. Idempotent."""
    nics = selectors.nics_of(vm)
    for nic in nics:
        netlink.link_remove(nic.tap, netns=_netns())
    if nics:
        Nic.objects.filter(pk__in=[n.pk for n in nics]).update(plumbed=False)
    if vm.host_id:
        network_tunnels_sync(host=vm.host)
        network_rules_apply(host=vm.host)
        _tunnel_peers_notify(vm.host, {n.network_id for n in nics})


def nic_unplumb_here(*, vm, host) -> None:
    """A VM that live-migrated from ``host`` (this machine) to another: its TAPs here go and
    ``host``'s tunnels and rules are made without it (they are plumbed on its new host, so
    ``plumbed`` stays). Idempotent."""
    nics = selectors.nics_of(vm)
    for nic in nics:
        netlink.link_remove(nic.tap, netns=_netns())
    if nics:
        network_tunnels_sync(host=host)
        network_rules_apply(host=host)
        _tunnel_peers_notify(host, {n.network_id for n in nics})


def nic_counters(*, vm) -> dict[str, dict[str, int]]:
    """Per-NIC counters from the guest's point of view (host TX is guest RX), in the shape of
    ``Driver.counters``: ``{"net.<tap>": {rx_bytes, tx_bytes, rx_packets, tx_packets}}``."""
    out = {}
    for nic in selectors.nics_of(vm):
        host = netlink.link_counters(nic.tap, netns=_netns())
        if host:
            out[f"net.{nic.tap}"] = {
                "rx_bytes": host["tx_bytes"],
                "tx_bytes": host["rx_bytes"],
                "rx_packets": host["tx_packets"],
                "tx_packets": host["rx_packets"],
            }
    return out


def _lock_host_rules(host) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s)", [_RULES_LOCK_BASE + zlib.crc32(host.name.encode()) % 99_999]
            )


def network_rules_apply(*, host) -> nft.HostRules:
    """Render the host's rules from the database and load them atomically. Serialised per
    host, and rendered after taking the lock, so the last apply always sees every commit."""
    with transaction.atomic():
        _lock_host_rules(host)
        rules = dataclasses.replace(
            selectors.host_rules(host),
            egress_blocked=(*nft.DEFAULT_EGRESS_BLOCKED, *netlink.host_networks(netns=_netns())),
            egress_exceptions=tuple(settings.SANDBOX_EGRESS_EXCEPTIONS),
        )
        if settings.SANDBOX_NETWORK_IP_FORWARD and any(n.nics for n in rules.networks):
            netlink.sysctl_write("net.ipv4.ip_forward", "1", netns=_netns())
            if any(n.nics and n.cidr6 for n in rules.networks):
                netlink.sysctl_write("net.ipv6.conf.all.forwarding", "1", netns=_netns())
        nft.apply(nft.render(rules), netns=_netns())
    return rules


def _rules_apply_enqueue(host) -> None:
    from networking.tasks import network_rules_apply_task

    transaction.on_commit(lambda: network_rules_apply_task.apply_async(args=[str(host.pk)], queue=host.queue))


def _rules_apply_everywhere() -> None:
    from vms.models import Host

    for host in Host.objects.filter(is_active=True, vms__nics__plumbed=True).distinct():
        _rules_apply_enqueue(host)


def network_tunnels_sync(*, host) -> dict[str, int]:
    """On ``host``: one VXLAN device per network spanning hosts (``selectors.host_tunnels``:
    plumbed NICs here and on another host, both with a tunnel address), a port of the
    network's bridge, MTU = the underlay's − 50, with exactly the forwarding entries the
    database gives; our VXLAN devices of networks no longer spanning hosts (the last peer
    left, or the network is gone) are removed. Idempotent. The rules are not applied here."""
    with transaction.atomic():
        # Serialised with the rules of this host (concurrent plumbs of one network): each sync
        # reads the database after the previous one finished, so the last one is complete.
        _lock_host_rules(host)
        return _tunnels_sync(host)


def _tunnels_sync(host) -> dict[str, int]:
    counts = {"vxlans_ensured": 0, "vxlans_removed": 0, "fdb_added": 0, "fdb_removed": 0}
    tunnels = selectors.host_tunnels(host)
    underlay = netlink.underlay_mtu(host.tunnel_address, netns=_netns()) if tunnels else None
    if tunnels and underlay is None:
        # A tunnel address no interface here holds: taking part would only blackhole frames.
        logger.error("host %s: tunnel address %s is on no interface here; no VXLAN", host.name, host.tunnel_address)
        tunnels = []
    wanted = set()
    for tunnel in tunnels:
        assert underlay is not None
        _bridge_ensure(tunnel.network)
        changed = netlink.vxlan_ensure(
            tunnel.device,
            vni=tunnel.vni,
            local=tunnel.local,
            bridge=tunnel.network.bridge,
            fdb=tunnel.fdb,
            mtu=underlay - netlink.VXLAN_OVERHEAD,
            netns=_netns(),
        )
        wanted.add(tunnel.device)
        counts["vxlans_ensured"] += 1
        counts["fdb_added"] += changed["fdb_added"]
        counts["fdb_removed"] += changed["fdb_removed"]
    for link in netlink.links_owned(netns=_netns()):
        if link.name.startswith(netlink.VXLAN_PREFIX) and link.name not in wanted:
            counts["vxlans_removed"] += int(netlink.link_remove(link.name, netns=_netns()))
    return counts


def network_peers_sync(*, host) -> dict[str, int]:
    """On ``host`` (its queue), after NICs of a network it shares changed on another host:
    tunnels and rules (the other host's NICs are in this host's tenant sets)."""
    counts = network_tunnels_sync(host=host)
    network_rules_apply(host=host)
    return counts


def host_hook_tunnel_changed(*, host) -> None:
    """A host's tunnel address changed: it and every host sharing a network with it re-sync
    their tunnels and rules (after commit, on their own queues)."""
    from networking.tasks import network_peers_sync_task

    network_ids = set(Nic.objects.filter(vm__host=host, plumbed=True).values_list("network_id", flat=True))
    transaction.on_commit(lambda: network_peers_sync_task.apply_async(args=[str(host.pk)], queue=host.queue))
    if network_ids:
        _tunnel_peers_notify(host, network_ids)


def _tunnel_peers_notify(host, network_ids) -> None:
    """The other hosts with plumbed NICs on these networks re-sync (after commit, on their queues)."""
    from networking.tasks import network_peers_sync_task
    from vms.models import Host

    peers = (
        Host.objects.filter(
            is_active=True,
            tunnel_address__isnull=False,
            vms__nics__plumbed=True,
            vms__nics__network_id__in=list(network_ids),
        )
        .exclude(pk=host.pk)
        .distinct()
    )
    for peer in peers:
        transaction.on_commit(
            lambda peer=peer: network_peers_sync_task.apply_async(args=[str(peer.pk)], queue=peer.queue)
        )


def network_reconcile(*, host) -> dict[str, int]:
    """At start-up on ``host``: make sure the default network exists, remove our own leftover
    interfaces (TAPs of NICs that are gone or unplumbed, bridges of deleted networks), bring
    back the bridges and TAPs of plumbed NICs, sync the VXLAN tunnels (``network_tunnels_sync``)
    and re-apply the rules atomically. Touches only interfaces named with our prefix and our
    own nftables tables."""
    network_default_ensure()
    counts = {"taps_removed": 0, "bridges_removed": 0, "taps_ensured": 0}
    plumbed = list(Nic.objects.filter(vm__host=host, plumbed=True).select_related("network"))
    wanted_taps = {n.tap for n in plumbed}
    wanted_bridges = set(Network.objects.values_list("bridge", flat=True))
    for link in netlink.links_owned(netns=_netns()):
        if link.name.startswith(netlink.TAP_PREFIX) and link.name not in wanted_taps:
            counts["taps_removed"] += int(netlink.link_remove(link.name, netns=_netns()))
    for link in netlink.links_owned(netns=_netns()):
        if link.name.startswith(netlink.BRIDGE_PREFIX) and link.name not in wanted_bridges:
            counts["bridges_removed"] += int(netlink.link_remove(link.name, netns=_netns()))
    mtu = host_guest_mtu(host)
    for nic in plumbed:
        _bridge_ensure(nic.network)
        netlink.tap_ensure(nic.tap, nic.network.bridge, netns=_netns(), mtu=mtu)
        counts["taps_ensured"] += 1
    counts.update(network_tunnels_sync(host=host))
    network_rules_apply(host=host)
    return counts


# --- per-VM egress and port forwards ---------------------------------------------------------


def _require_vm_change(actor, vm, action: str) -> None:
    from accounts.permissions import require_perm

    require_perm(actor, "vms.change_vm", vm, action=action)


def _egress_widens(vm, mode: str, rules: list[EgressRule]) -> bool:
    for nic in Nic.objects.filter(vm=vm).select_related("network"):
        network = nic.network
        if not selectors.egress_within(mode, rules, network.egress_mode, network.egress_rules.all()):
            return True
    return False


def vm_egress_set(*, vm, actor, mode: str, rules: list[dict] | None = None) -> dict:
    """Per-VM egress: ``mode`` allow / deny / allowlist (with ``rules``) or "" for the network's.
    The VM's owner may only narrow the network's policy (deny ⊂ allow-list ⊂ allow, allow-list
    entries within the network's); a wider policy needs an operator (the global
    ``networking.change_network`` right), refused and audited otherwise."""
    from accounts.permissions import require_perm

    _require_vm_change(actor, vm, "vm.egress_update")
    if mode not in ("", *EgressMode.values):
        raise ApplicationError("Unknown egress mode.", details={"mode": ["", *EgressMode.values]})
    validated = _egress_rules_validated(rules or [])
    widens = _egress_widens(vm, mode, validated)
    if widens:
        require_perm(
            actor,
            "networking.change_network",
            None,
            action="vm.egress_update",
            message="Only an operator can give a VM wider egress than its network's.",
        )
    with transaction.atomic():
        # All the VM's NIC rows at once, in one order: two updates of one VM queue, never cross.
        locked = list(Nic.objects.select_for_update().filter(vm=vm).order_by("pk"))
        if not locked:
            raise ConflictError("This VM has no network interface.", code="no_nic")
        before = {"mode": locked[0].egress_mode, "rules": _egress_snapshot(EgressRule.objects.filter(vm=vm))}
        Nic.objects.filter(vm=vm).update(egress_mode=mode, egress_widened=widens)
        EgressRule.objects.filter(vm=vm).delete()
        for rule in validated:
            rule.vm = vm
            rule.save()
        after = {"mode": mode, "rules": _egress_snapshot(validated), "widened": widens}
        audit_record(actor=actor, action="vm.egress_update", obj=vm, before=before, after=after)
        if vm.host_id:
            _rules_apply_enqueue(vm.host)
    return after


def port_forward_create(
    *, vm, actor, guest_port: int, protocol: str = Protocol.TCP, host_port: int | None = None
) -> PortForward:
    """Forward ``host_port`` (or the lowest free port of the configured range) on the VM's
    host to ``guest_port`` of its first NIC. A taken host port is a 409."""
    _require_vm_change(actor, vm, "portforward.create")
    low, high = settings.SANDBOX_PORT_FORWARD_RANGE
    errors = {}
    if protocol not in Protocol.values:
        errors["protocol"] = "tcp or udp"
    if not isinstance(guest_port, int) or not 1 <= guest_port <= 65535:
        errors["guest_port"] = "1-65535"
    if host_port is not None and not low <= host_port <= high:
        errors["host_port"] = f"must be within {low}-{high}"
    if errors:
        raise ApplicationError("Invalid port forward.", details=errors)
    if vm.host_id is None:
        raise ConflictError("The VM has no host yet.")
    from vms.models import Host

    with transaction.atomic():
        owner_quota_lock(vm.owner)  # the per-VM count is checked under the owner's quota lock
        Host.objects.select_for_update().get(pk=vm.host_id)  # serialises port choice per host
        if not Nic.objects.filter(vm=vm).exists():
            raise ConflictError("This VM has no network interface.", code="no_nic")
        if PortForward.objects.filter(vm=vm).count() >= settings.SANDBOX_PORT_FORWARDS_PER_VM:
            raise ConflictError(f"At most {settings.SANDBOX_PORT_FORWARDS_PER_VM} port forwards per VM.")
        taken = set(
            PortForward.objects.filter(host_id=vm.host_id, protocol=protocol).values_list("host_port", flat=True)
        )
        if host_port is None:
            host_port = next((p for p in range(low, high + 1) if p not in taken), None)
            if host_port is None:
                raise ConflictError("No free host port left in the forwarding range.", code="port_range_full")
        elif host_port in taken:
            raise ConflictError(
                f"Host port {protocol}/{host_port} is already forwarded.", details={"host_port": "taken"}
            )
        pf = PortForward.objects.create(
            vm=vm,
            host_id=vm.host_id,
            protocol=protocol,
            host_port=host_port,
            guest_port=guest_port,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor,
            action="portforward.create",
            obj=vm,
            after={"id": pf.pk, "protocol": protocol, "host_port": host_port, "guest_port": guest_port},
        )
        _rules_apply_enqueue(vm.host)
    return pf


def port_forward_delete(*, port_forward: PortForward, actor) -> None:
    vm = port_forward.vm
    _require_vm_change(actor, vm, "portforward.delete")
    with transaction.atomic():
        deleted, _ = PortForward.objects.filter(pk=port_forward.pk).delete()
        if deleted:
            audit_record(
                actor=actor,
                action="portforward.delete",
                obj=vm,
                before={
                    "id": port_forward.pk,
                    "protocol": port_forward.protocol,
                    "host_port": port_forward.host_port,
                    "guest_port": port_forward.guest_port,
                },
            )
            _rules_apply_enqueue(vm.host)


# --- VM lifecycle hooks (registered with vms.hooks from NetworkingConfig.ready) ---------------


def vm_hook_created(*, vm, actor, nics: list[dict] | None = None) -> None:
    """A new VM (create or clone) gets its NICs in its create transaction: the ones asked
    for (``nic_requests_resolve``), else one on the default network. Any refusal rolls the
    whole create back."""
    if not settings.SANDBOX_NETWORKING:
        if nics is not None:
            raise ApplicationError("Networking is turned off here: a VM cannot have NICs.", details={"nics": "off"})
        return
    if nics is None:
        nic_allocate(vm=vm, network=None, actor=actor)
        return
    for network, ip, ip6 in nic_requests_resolve(actor=actor, nics=nics):
        nic_allocate(vm=vm, network=network, actor=actor, ip=ip, ip6=ip6)


def vm_hook_before_launch(*, vm) -> list[str]:
    """Plumb the VM's NICs before its VMM opens the TAPs by name; lines for the operation log."""
    return [f"{n.tap} {n.ip}/{n.prefix}" for n in nic_plumb(vm=vm)]


def vm_hook_vmm_gone(*, vm) -> None:
    """Unplumb the NICs of a VM whose VMM stopped (a VM without NICs touches no host rules)."""
    if selectors.nics_of(vm):
        nic_unplumb(vm=vm)


def vm_hook_migrated_away(*, vm, host) -> None:
    """After a live migration, on the host the VM left (``vms.migration``)."""
    if selectors.nics_of(vm):
        nic_unplumb_here(vm=vm, host=host)


def vm_hook_row_deleting(*, vm) -> None:
    nic_release(vm=vm, actor=None)


def vm_hook_owner_changed(*, vm) -> None:
    """A pool VM was taken: its TAP moves to its new owner's tenant before it runs again."""
    nics = selectors.nics_of(vm)
    if any(nic.plumbed for nic in nics):
        network_rules_apply(host=vm.host)
        _tunnel_peers_notify(vm.host, {n.network_id for n in nics})  # their tenant sets name it too


def vm_hook_move_check(*, vm, target) -> None:
    """A VM moving to ``target`` keeps its port forwards there: each host port must be free."""
    taken = [
        f"{pf.protocol}/{pf.host_port}"
        for pf in PortForward.objects.filter(vm=vm)
        if PortForward.objects.filter(host=target, protocol=pf.protocol, host_port=pf.host_port).exists()
    ]
    if taken:
        raise ConflictError(
            f"Host {target.name} forwards {', '.join(taken)} to another VM already; "
            "delete or change this VM's port forwards first.",
            code="port_taken",
            details={"host_ports": taken},
        )


def vm_hook_host_changed(*, vm, source, target) -> None:
    """In the transaction recording a moved VM on ``target``: its port forwards move with it;
    both hosts re-apply their rules (the NICs are plumbed on the target when the VM starts
    there, which also tells the VXLAN peers). 409 ``port_taken`` when a host port was taken
    on ``target`` since the move was accepted (the move then fails back to ``source``)."""
    own = list(PortForward.objects.select_for_update().filter(vm=vm).values_list("protocol", "host_port"))
    wanted = Q()
    for protocol, port in own:
        wanted |= Q(protocol=protocol, host_port=port)
    if own:
        taken = [
            f"{pf.protocol}/{pf.host_port}"
            for pf in PortForward.objects.select_for_update().filter(wanted, host=target).exclude(vm=vm)
        ]
        if taken:
            raise ConflictError(
                f"Host {target.name} forwards {', '.join(taken)} to another VM now.",
                code="port_taken",
                details={"host_ports": taken},
            )
    if PortForward.objects.filter(vm=vm).update(host=target):
        _rules_apply_enqueue(source)
        _rules_apply_enqueue(target)


def vm_hook_nics(*, vm) -> list[NicSpec]:
    """The NICs a VMM starting on this host gives ``vm`` (with this host's guest MTU)."""
    mtu = host_guest_mtu(vm.host)
    return [dataclasses.replace(spec, mtu=mtu) for spec in nic_specs(vm=vm)]


def host_guest_mtu(host) -> int:
    """MTU for the NICs of guests starting on ``host`` (this machine): the underlay's − 50 when
    the host takes part in networks across hosts (a tunnel address) and its underlay is smaller
    than 1550, so that no guest frame is too big for a tunnel; 1500 otherwise. A network may
    span hosts later than its VMs start: the host's MTU applies to all of them."""
    if host is None or not host.tunnel_address:
        return netlink.ETHERNET_MTU
    try:
        underlay = netlink.underlay_mtu(host.tunnel_address, netns=_netns())
    except netlink.PlumbingError as exc:  # no namespace (yet): nothing to tunnel through either
        logger.warning("host %s: underlay MTU unknown (%s); guests get 1500", host.name, exc)
        return netlink.ETHERNET_MTU
    if underlay is None:
        return netlink.ETHERNET_MTU  # no tunnels either (``_tunnels_sync`` logs it)
    mtu = min(netlink.ETHERNET_MTU, underlay - netlink.VXLAN_OVERHEAD)
    if mtu < netlink.MIN_GUEST_MTU:
        logger.error("host %s: underlay MTU %d leaves guests %d (< 1280): guests keep 1280", host.name, underlay, mtu)
        return netlink.MIN_GUEST_MTU
    return mtu


def vm_hook_agent_ready(*, vm) -> list[str]:
    """The guest agent answers (boot, restore): configure the NICs after the first, and the
    first one's IPv6 (with the default route) on a dual-stack network."""
    specs = nic_specs(vm=vm)
    if specs and specs[0].ip6:
        return nic_guest_configure(vm=vm, nics=specs, with_route6=True)
    return nic_guest_configure(vm=vm, nics=specs[1:])


def vm_hook_counters(*, vm) -> dict[str, dict[str, int]]:
    return nic_counters(vm=vm)


def host_hook_worker_ready(*, host) -> None:
    # Our own leftover TAPs/bridges go, plumbed NICs come back, rules re-applied atomically.
    network_reconcile(host=host)
