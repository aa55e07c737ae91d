"""Host network plumbing over netlink (pyroute2), no Django and no ``ip`` subprocesses.

Everything here takes an optional ``netns`` (a name under ``/run/netns``; ``None`` or
``""`` = the namespace of the calling process), so tests and ``SANDBOX_NETNS`` deployments
keep bridges and TAPs out of the host namespace.

Names of the interfaces we create are derived from our database ids and start with
``IFNAME_PREFIX``; ``links_owned`` lists only those, so clean-up never touches an
interface someone else made.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vms.vmm.base import VmmError
from vms.vmm.process import call_in_netns

T = TypeVar("T")

IFNAME_PREFIX = "msb"  # every interface we own starts with this
BRIDGE_PREFIX = "msbb"  # msbb + 10 hex digits of the network id = 14 chars (IFNAMSIZ is 16 incl. NUL)
TAP_PREFIX = "msbt"  # msbt + 10 hex digits of the NIC id
VXLAN_PREFIX = "msbv"  # msbv + 10 hex digits of the network id: its tunnel to other hosts
VXLAN_PORT = 4789  # IANA's VXLAN port
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
ETHERNET_MTU = 1500
MIN_GUEST_MTU = 1280  # IPv6's minimum link MTU
ZERO_MAC = "00:00:00:00:00:00"  # FDB entry for broadcast and unknown unicast (head-end replication)
IFNAME_MAX = 15
NETNS_CALL_TIMEOUT = 30.0


class PlumbingError(Exception):
    """A netlink or namespace operation failed. ``message`` is safe to show to operators."""

    def __init__(self, message: str, *, details: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    kind: str  # "bridge", "tun", ... ("" when the kernel reports none)
    master: int | None  # ifindex of the bridge this link is a port of
    up: bool


def bridge_name(network_id: str) -> str:
    """Interface name of a network's bridge, derived from its id."""
    return BRIDGE_PREFIX + network_id.replace("-", "")[:10]


def tap_name(nic_id: str) -> str:
    """Interface name of a NIC's TAP device, derived from its id."""
    return TAP_PREFIX + nic_id.replace("-", "")[:10]


def vxlan_name(network_id: str) -> str:
    """Interface name of a network's VXLAN device (its tunnel to the other hosts)."""
    return VXLAN_PREFIX + network_id.replace("-", "")[:10]


def _netlink(netns: str | None, fn: Callable[[IPRoute], T]) -> T:
    """Run ``fn(ipr)`` with a netlink socket of ``netns``, opened, used and closed in a thread
    that entered the namespace (``netns_call``).

    Not ``IPRoute(netns=...)``: pyroute2 forks a helper process for that (and for every TAP
    it creates), and a fork of a Celery prefork worker that dies the wrong way takes the
    worker's whole process group with it (seen here: every pool worker SIGTERMed). Not an
    ``IPRoute()`` opened in the thread and used outside it either: pyroute2 opens its socket
    lazily, i.e. in whichever namespace the first call runs in.
    """
    # A typo must fail instead of plumbing in the wrong namespace.
    if netns and not netns_exists(netns):
        raise PlumbingError(f"network namespace {netns!r} does not exist")

    def run() -> T:
        if netns and os.stat("/proc/thread-self/ns/net").st_ino != os.stat(f"/run/netns/{netns}").st_ino:
            raise PlumbingError(f"not inside network namespace {netns!r}")  # never fall back to ours
        try:
            with IPRoute() as ipr:
                return fn(ipr)
        except OSError as exc:
            if isinstance(exc, NetlinkError):
                raise
            raise PlumbingError(f"netlink in namespace {netns!r}: {exc}") from exc

    return netns_call(netns, run)


def _check_owned(name: str) -> None:
    if not name.startswith(IFNAME_PREFIX) or len(name) > IFNAME_MAX:
        # A guard, not validation: this module must never touch an interface it did not name.
        raise PlumbingError(f"refusing to manage interface {name!r}: not one of ours")


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _link_info(msg: Any) -> LinkInfo:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else ""
    return LinkInfo(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind or "",
        master=msg.get_attr("IFLA_MASTER"),
        up=bool(msg["flags"] & 1),
    )


IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection (the gateway is ours)


def _add_racing(ipr: IPRoute, **link: Any) -> None:
    # Several VMs of one network boot at once (one worker process each): the loser of the
    # race for the bridge finds it created, which is what it wanted.
    try:
        ipr.link("add", **link)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def bridge_ensure(
    name: str,
    gateway: str,
    prefix: int,
    *,
    netns: str | None = None,
    gateway6: str = "",
    prefix6: int = 64,
) -> LinkInfo:
    """Create bridge ``name`` (if missing) holding ``gateway/prefix`` (and ``gateway6/prefix6``
    on a dual-stack network, without duplicate address detection), and bring it up.
    Idempotent: an existing bridge keeps its ports; a missing address is added."""
    _check_owned(name)
    iface = ipaddress.ip_interface(f"{gateway}/{prefix}")
    iface6 = ipaddress.ip_interface(f"{gateway6}/{prefix6}") if gateway6 else None

    def op(ipr: IPRoute) -> LinkInfo:
        try:
            index = _lookup(ipr, name)
            if index is None:
                _add_racing(ipr, ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
                index = _lookup(ipr, name)
                assert index is not None
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)}
            if (str(iface.ip), prefix) not in have:
                try:
                    ipr.addr("add", index=index, address=str(iface.ip), prefixlen=prefix)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:  # added by a concurrent plumb
                        raise
            if iface6 is not None:
                have6 = {
                    (str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))), a["prefixlen"])
                    for a in ipr.get_addr(index=index, family=10)
                }
                if (str(iface6.ip), prefix6) not in have6:
                    try:
                        ipr.addr(
                            "add",
                            index=index,
                            address=str(iface6.ip),
                            prefixlen=prefix6,
                            family=10,
                            flags=IFA_F_NODAD,
                        )
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise
            ipr.link("set", index=index, state="up")
            return _link_info(ipr.get_links(index)[0])
        except NetlinkError as exc:
            raise PlumbingError(f"bridge {name}: {exc}", details={"code": exc.code}) from exc

    return _netlink(netns, op)


def tap_ensure(name: str, bridge: str, *, netns: str | None = None, mtu: int | None = None) -> LinkInfo:
    """Create persistent TAP ``name`` (no packet info, vnet header, as VMMs expect), make it
    a port of ``bridge`` and bring it up. Idempotent."""
    _check_owned(name)
    _check_owned(bridge)

    def op(ipr: IPRoute) -> LinkInfo:
        try:
            bridge_index = _lookup(ipr, bridge)
            if bridge_index is None:
                raise PlumbingError(f"bridge {bridge} does not exist")
            index = _lookup(ipr, name)
            if index is None:
                _add_racing(ipr, ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": True, "vnet_hdr": True})
                index = _lookup(ipr, name)
                assert index is not None
            if mtu:
                ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, master=bridge_index)
            ipr.link("set", index=index, state="up")
            return _link_info(ipr.get_links(index)[0])
        except NetlinkError as exc:
            raise PlumbingError(f"tap {name}: {exc}", details={"code": exc.code}) from exc

    return _netlink(netns, op)


def _vxlan_matches(msg: Any, *, vni: int, local: str) -> bool:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    data = linkinfo.get_attr("IFLA_INFO_DATA") if linkinfo is not None else None
    if linkinfo is None or linkinfo.get_attr("IFLA_INFO_KIND") != "vxlan" or data is None:
        return False
    return (
        data.get_attr("IFLA_VXLAN_ID") == vni
        and data.get_attr("IFLA_VXLAN_LOCAL") == local
        and data.get_attr("IFLA_VXLAN_PORT") == VXLAN_PORT
        and not data.get_attr("IFLA_VXLAN_LEARNING")
    )


def vxlan_ensure(
    name: str,
    *,
    vni: int,
    local: str,
    bridge: str,
    fdb: set[tuple[str, str]],
    mtu: int,
    netns: str | None = None,
) -> dict[str, int]:
    """Make VXLAN device ``name`` (``vni``, source ``local``, UDP 4789, learning off) a port of
    ``bridge`` with MTU ``mtu``, up, whose forwarding entries are exactly ``fdb``: pairs of
    (MAC, peer tunnel address); ``ZERO_MAC`` entries replicate broadcast and unknown unicast
    to each peer. A device with other parameters is re-created (the kernel cannot change
    them in place). Idempotent; returns how many entries were added and removed."""
    _check_owned(name)
    _check_owned(bridge)

    def op(ipr: IPRoute) -> dict[str, int]:
        try:
            bridge_index = _lookup(ipr, bridge)
            if bridge_index is None:
                raise PlumbingError(f"bridge {bridge} does not exist")
            index = _lookup(ipr, name)
            if index is not None and not _vxlan_matches(ipr.get_links(index)[0], vni=vni, local=local):
                ipr.link("del", index=index)
                index = None
            if index is None:
                _add_racing(
                    ipr,
                    ifname=name,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_local=local,
                    vxlan_port=VXLAN_PORT,
                    vxlan_learning=0,
                )
                index = _lookup(ipr, name)
                assert index is not None
            ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, master=bridge_index)
            ipr.link("set", index=index, state="up")
            have = {
                (str(m.get_attr("NDA_LLADDR")).lower(), m.get_attr("NDA_DST"))
                for m in ipr.fdb("dump", ifindex=index)
                if m["ifindex"] == index and m.get_attr("NDA_DST")  # not the bridge's learnt entries
            }
            counts = {"fdb_added": 0, "fdb_removed": 0}
            for mac, dst in sorted(have - fdb):
                try:
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
                    counts["fdb_removed"] += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # removed meanwhile
                        raise
            for mac, dst in sorted(fdb - have):
                try:
                    ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst)
                    counts["fdb_added"] += 1
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:  # added meanwhile
                        raise
            return counts
        except NetlinkError as exc:
            raise PlumbingError(f"vxlan {name}: {exc}", details={"code": exc.code}) from exc

    return _netlink(netns, op)


def fdb_entries(name: str, *, netns: str | None = None) -> set[tuple[str, str]]:
    """The (MAC, peer address) forwarding entries of VXLAN device ``name`` (empty when it is gone)."""

    def op(ipr: IPRoute) -> set[tuple[str, str]]:
        index = _lookup(ipr, name)
        if index is None:
            return set()
        return {
            (str(m.get_attr("NDA_LLADDR")).lower(), m.get_attr("NDA_DST"))
            for m in ipr.fdb("dump", ifindex=index)
            if m["ifindex"] == index and m.get_attr("NDA_DST")
        }

    return _netlink(netns, op)


def underlay_mtu(address: str, *, netns: str | None = None) -> int | None:
    """MTU of the interface holding ``address`` (the host's tunnel address); None when no
    interface of ``netns`` holds it."""

    def op(ipr: IPRoute) -> int | None:
        for msg in ipr.get_addr(family=2):
            if msg.get_attr("IFA_ADDRESS") == address:
                return int(ipr.get_links(msg["index"])[0].get_attr("IFLA_MTU"))
        return None

    return _netlink(netns, op)


def link_remove(name: str, *, netns: str | None = None) -> bool:
    """Delete one of our links (bridge or TAP); False when it did not exist."""
    _check_owned(name)

    def op(ipr: IPRoute) -> bool:
        index = _lookup(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: removed meanwhile
                return False
            raise PlumbingError(f"remove {name}: {exc}", details={"code": exc.code}) from exc
        return True

    return _netlink(netns, op)


def links_owned(*, netns: str | None = None) -> list[LinkInfo]:
    """Every link whose name starts with our prefix (and nothing else)."""
    links = _netlink(netns, lambda ipr: [_link_info(msg) for msg in ipr.get_links()])
    return [link for link in links if link.name and link.name.startswith(IFNAME_PREFIX)]


def link_get(name: str, *, netns: str | None = None) -> LinkInfo | None:
    def op(ipr: IPRoute) -> LinkInfo | None:
        index = _lookup(ipr, name)
        return _link_info(ipr.get_links(index)[0]) if index is not None else None

    return _netlink(netns, op)


def host_networks(*, netns: str | None = None) -> list[str]:
    """Networks (CIDR) of the addresses on interfaces of ``netns`` that are not ours (the
    host's uplinks and LANs), loopback excluded: guests' default egress may not reach them."""

    def op(ipr: IPRoute) -> list[str]:
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") or "" for msg in ipr.get_links()}
        found = set()
        for msg in ipr.get_addr():
            name = names.get(msg["index"], "")
            if name == "lo" or name.startswith((TAP_PREFIX, BRIDGE_PREFIX, VXLAN_PREFIX)):
                continue
            address = msg.get_attr("IFA_ADDRESS")
            if address:
                found.add(str(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}").network))
        return sorted(found)

    return _netlink(netns, op)


def link_counters(name: str, *, netns: str | None = None) -> dict[str, int]:
    """Host-side counters of a link (``rx_bytes``, ``tx_bytes``, ``rx_packets``, ``tx_packets``);
    empty when the link does not exist."""

    def op(ipr: IPRoute) -> dict[str, int]:
        index = _lookup(ipr, name)
        if index is None:
            return {}
        stats = ipr.get_links(index)[0].get_attr("IFLA_STATS64") or {}
        return {key: int(stats.get(key, 0)) for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}

    return _netlink(netns, op)


# --- running code inside a network namespace ----------------------------------------------


def netns_call(netns: str | None, fn: Callable[..., T], *args: Any, timeout: float = NETNS_CALL_TIMEOUT) -> T:
    """Run ``fn(*args)`` in a short-lived thread switched into ``netns`` and return its result
    (see ``vms.vmm.process.call_in_netns``): the caller and its database connections stay
    where they are; sockets opened and processes forked by ``fn`` belong to ``netns``."""
    try:
        return call_in_netns(netns, fn, *args, timeout=timeout)
    except VmmError as exc:
        raise PlumbingError(exc.message) from exc


def sysctl_write(key: str, value: str, *, netns: str | None = None) -> None:
    """Write ``/proc/sys/<key with dots as slashes>`` in ``netns`` (net.* sysctls are per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as fh:
            fh.write(value)

    netns_call(netns, write)


def netns_exists(name: str) -> bool:
    return bool(name) and os.path.exists(f"/run/netns/{name}")
