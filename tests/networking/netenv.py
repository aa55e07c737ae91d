"""Test helpers: "guests" emulated by network namespaces joined to our bridge by a veth whose
host end carries the NIC's TAP name (the rules match interface names, so they treat it
exactly like the TAP of a VM), and traffic helpers that open sockets inside a namespace.
All addresses are inside namespaces the test created."""

from __future__ import annotations

import socket
import struct
import threading
import time

from pyroute2 import IPRoute

from networking.netlink import netns_call

CONNECT_TIMEOUT = 1.5


def guest_attach(*, host_ns: str, guest_ns: str, tap: str, bridge: str, mac: str, ip: str, prefix: int, gateway: str):
    with IPRoute(netns=host_ns) as ipr:
        ipr.link("add", ifname=tap, kind="veth", peer="g" + tap[-10:])
        peer = ipr.link_lookup(ifname="g" + tap[-10:])[0]
        ipr.link("set", index=peer, net_ns_fd=guest_ns)
        index = ipr.link_lookup(ifname=tap)[0]
        ipr.link("set", index=index, master=ipr.link_lookup(ifname=bridge)[0])
        ipr.link("set", index=index, state="up")
    with IPRoute(netns=guest_ns) as ipr:
        index = ipr.link_lookup(ifname="g" + tap[-10:])[0]
        ipr.link("set", index=index, ifname="eth0", address=mac)
        ipr.addr("add", index=index, address=ip, prefixlen=prefix)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=gateway)


def veth_link(*, a_ns: str, a_name: str, a_ip: str, b_ns: str, b_name: str, b_ip: str, prefix: int = 24):
    """A point-to-point link between two namespaces (the "uplink" to an "outside" namespace)."""
    with IPRoute(netns=a_ns) as ipr:
        ipr.link("add", ifname=a_name, kind="veth", peer=b_name)
        ipr.link("set", index=ipr.link_lookup(ifname=b_name)[0], net_ns_fd=b_ns)
        index = ipr.link_lookup(ifname=a_name)[0]
        ipr.addr("add", index=index, address=a_ip, prefixlen=prefix)
        ipr.link("set", index=index, state="up")
    with IPRoute(netns=b_ns) as ipr:
        index = ipr.link_lookup(ifname=b_name)[0]
        ipr.addr("add", index=index, address=b_ip, prefixlen=prefix)
        ipr.link("set", index=index, state="up")


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


IFA_F_NODAD = 0x02


def guest_add_ipv6(*, guest_ns: str, ip6: str, prefix6: int, gateway6: str | None, ifname: str = "eth0") -> None:
    """Give an emulated guest an IPv6 address (no duplicate address detection: usable at once)
    and, with ``gateway6``, the IPv6 default route."""
    netns_call(guest_ns, lambda: _sysctl(f"net.ipv6.conf.{ifname}.accept_dad", "0"))
    with IPRoute(netns=guest_ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=ip6, prefixlen=prefix6, family=10, flags=IFA_F_NODAD)
        if gateway6:
            ipr.route("add", dst="::/0", gateway=gateway6, family=10)


def _sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
        fh.write(value)


class TcpServer:
    """Accepts connections in ``ns`` on ``ip:port`` and answers each with ``greeting``."""

    def __init__(self, ns: str, ip: str, port: int, greeting: bytes) -> None:
        self.greeting = greeting
        self.peers: list[str] = []

        def bind() -> socket.socket:
            sock = socket.socket(_family(ip), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(16)
            sock.settimeout(0.2)
            return sock

        self.sock = netns_call(ns, bind)  # the socket stays in ``ns`` after the thread is gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            with conn:
                conn.sendall(self.greeting)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def tcp_fetch(
    ns: str, ip: str, port: int, *, source: str | None = None, timeout: float = CONNECT_TIMEOUT
) -> bytes | None:
    """What the server at ``ip:port`` says when connected to from ``ns``; None when unreachable."""

    def fetch() -> bytes | None:
        sock = socket.socket(_family(ip), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            if source:
                sock.bind((source, 0))
            sock.connect((ip, port))
            return sock.recv(100)
        except OSError:
            return None
        finally:
            sock.close()

    return netns_call(ns, fetch)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns: str, ip: str, *, timeout: float = CONNECT_TIMEOUT) -> bool:
    """One ICMP echo from ``ns`` to ``ip``; True when the reply came back."""

    def once() -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.settimeout(timeout)
        ident = threading.get_ident() & 0xFFFF
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        payload = b"microvm-sandbox"
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1) + payload
        deadline = time.monotonic() + timeout
        try:
            sock.sendto(packet, (ip, 0))
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data, addr = sock.recvfrom(1500)
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
                if addr[0] == ip and kind == 0 and rid == ident:
                    return True
        except OSError:
            return False
        finally:
            sock.close()
        return False

    return netns_call(ns, once)
