"""VXLAN benchmark: TCP throughput between two guests on one host's bridge and between guests on
two hosts through the network's VXLAN tunnel, with our nftables rules loaded on both hosts.

"Hosts" and "guests" are network namespaces this script creates (removed at the end), joined by
veth links: an underlay 10.231.96.0/24 (MTU 1500) between the hosts, the network 10.231.97.0/24
(guests at MTU 1450, the tunnel's). Devices and rules come from ``networking.netlink`` and
``networking.nft`` (no Django, no database). Local and remote runs alternate, so the ratio is
taken under the same load. Needs root. Prints JSON. Not a test.

    .venv/bin/python benchmarks/vxlan.py --runs 3 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyroute2 import IPRoute  # noqa: E402
from pyroute2 import netns as pr_netns  # noqa: E402

from networking import netlink, nft  # noqa: E402

TUNNEL = {"a": "10.231.96.1", "b": "10.231.96.2"}
BRIDGE, VXLAN, VNI = "msbbbench00001", "msbvbench00001", 4242
GUESTS = {  # name: (host, ip, mac, tap)
    "g1": ("a", "10.231.97.2", "02:00:00:00:97:02", "msbtbench0001"),
    "g2": ("a", "10.231.97.3", "02:00:00:00:97:03", "msbtbench0002"),
    "g3": ("b", "10.231.97.4", "02:00:00:00:97:04", "msbtbench0003"),
}
GUEST_MTU = 1500 - netlink.VXLAN_OVERHEAD
PORT = 5201


def _ns(tag: str, created: list[str]) -> str:
    name = f"msbbench-{tag}-{uuid.uuid4().hex[:6]}"
    pr_netns.create(name)
    created.append(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return name


def _setup(created: list[str]) -> dict[str, str]:
    hosts = {h: _ns(f"h{h}", created) for h in TUNNEL}
    with IPRoute(netns=hosts["a"]) as ipr:
        ipr.link("add", ifname="underlay-a", kind="veth", peer="underlay-b")
        ipr.link("set", index=ipr.link_lookup(ifname="underlay-b")[0], net_ns_fd=hosts["b"])
    for h, ns in hosts.items():
        with IPRoute(netns=ns) as ipr:
            index = ipr.link_lookup(ifname=f"underlay-{h}")[0]
            ipr.addr("add", index=index, address=TUNNEL[h], prefixlen=24)
            ipr.link("set", index=index, state="up")
        netlink.bridge_ensure(BRIDGE, "10.231.97.1", 24, netns=ns)
    guests = {}
    for name, (h, ip, mac, tap) in GUESTS.items():
        guests[name] = gns = _ns(name, created)
        with IPRoute(netns=hosts[h]) as ipr:
            ipr.link("add", ifname=tap, kind="veth", peer="g" + name)
            ipr.link("set", index=ipr.link_lookup(ifname="g" + name)[0], net_ns_fd=gns)
            index = ipr.link_lookup(ifname=tap)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
        with IPRoute(netns=gns) as ipr:
            index = ipr.link_lookup(ifname="g" + name)[0]
            ipr.link("set", index=index, ifname="eth0", address=mac, mtu=GUEST_MTU)
            ipr.addr("add", index=index, address=ip, prefixlen=24)
            ipr.link("set", index=index, state="up")
    for h, ns in hosts.items():
        peer = next(a for other, a in TUNNEL.items() if other != h)
        remote = [(ip, mac) for gh, ip, mac, _ in GUESTS.values() if gh != h]
        netlink.vxlan_ensure(
            VXLAN,
            vni=VNI,
            local=TUNNEL[h],
            bridge=BRIDGE,
            fdb={(netlink.ZERO_MAC, peer), *((mac, peer) for _, mac in remote)},
            mtu=GUEST_MTU,
            netns=ns,
        )
        rules = nft.HostRules(
            networks=(
                nft.NetworkRules(
                    bridge=BRIDGE,
                    cidr="10.231.97.0/24",
                    gateway="10.231.97.1",
                    nics=tuple(
                        nft.NicRules(tap=tap, mac=mac, ip=ip, tenant="t")
                        for gh, ip, mac, tap in GUESTS.values()
                        if gh == h
                    ),
                    vxlan=VXLAN,
                    remote_nics=tuple(nft.RemoteNicRules(mac=mac, ip=ip, tenant="t") for ip, mac in remote),
                ),
            ),
            tunnel_peers=(peer,),
            tunnel_vnis=(VNI,),
        )
        nft.apply(nft.render(rules), netns=ns)
    return guests


def _sink(ns: str, ip: str) -> tuple[socket.socket, list[int]]:
    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, PORT))
        sock.listen(4)
        return sock

    sock = netlink.netns_call(ns, bind)
    received: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            total = 0
            with conn:
                while chunk := conn.recv(1 << 20):
                    total += len(chunk)
            received.append(total)

    threading.Thread(target=serve, daemon=True).start()
    return sock, received


def _send(ns: str, ip: str, seconds: float) -> float:
    """MB/s sent from ``ns`` to the sink at ``ip`` for ``seconds``, timed until the sink has read everything."""

    def run() -> tuple[int, float]:
        buf = b"\0" * (1 << 20)
        sent = 0
        with socket.create_connection((ip, PORT), timeout=10) as sock:
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                sock.sendall(buf)
                sent += len(buf)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the sink closes after reading everything
            return sent, time.monotonic() - start

    sent, elapsed = netlink.netns_call(ns, run, timeout=seconds + 30)
    return sent / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"skipped": "needs root (network namespaces)"}))
        return
    created: list[str] = []
    try:
        guests = _setup(created)
        sock, received = _sink(guests["g1"], GUESTS["g1"][1])
        local, remote = [], []
        for _ in range(args.runs):
            local.append(_send(guests["g2"], GUESTS["g1"][1], args.seconds))
            remote.append(_send(guests["g3"], GUESTS["g1"][1], args.seconds))
        time.sleep(0.2)
        sock.close()
        print(
            json.dumps(
                {
                    "runs": args.runs,
                    "seconds": args.seconds,
                    "guest_mtu": GUEST_MTU,
                    "same_host_mb_s": [round(x, 1) for x in local],
                    "across_vxlan_mb_s": [round(x, 1) for x in remote],
                    "median_ratio_vxlan_to_same_host": round(statistics.median(remote) / statistics.median(local), 3),
                    "streams_received": len(received),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                },
                indent=2,
            )
        )
    finally:
        for name in reversed(created):
            try:
                pr_netns.remove(name)
            except OSError:
                pass


if __name__ == "__main__":
    main()
