"""VM networking with real QEMU guests through the whole stack: address from the database, TAP on
the network's bridge, guest configured from the kernel command line, nftables policy.

Every packet stays inside namespaces the stack and this module create: the stack's namespace
(``stack.netns``: bridges, TAPs, tables, VMMs; no link to the host) and an "outside" namespace
joined to it by a veth (``uplink0``), standing for the uplink. Neither has a route anywhere
else. Traffic from the guests is driven with the exec API (busybox ``ping``, ``nc``, ``httpd``);
clients and servers on the host side run in those namespaces (``netns_call``).
"""

from __future__ import annotations

import json
import os
import socket
import time

import psycopg
import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from networking import netlink, nft
from networking.netlink import netns_call
from tests.networking.netenv import TcpServer, veth_link
from tests.system.stack import DB_NAME, vmm_pids
from vms.vmm.base import VmSpec
from vms.vmm.qemu import QemuDriver

pytestmark = pytest.mark.vm

UPLINK_IP = "10.231.250.1"  # the stack namespace's end of the uplink
OUTSIDE_IP = "10.231.250.2"  # the "internet": a namespace of this module
_HTTPD = (
    "mkdir -p /tmp/www && echo hello-from-{name} > /tmp/www/index.html && exec busybox httpd -f -p 8080 -h /tmp/www"
)


class GuestShell:
    """Shell commands in a guest through the exec API (``/bin/sh -c``); returns (exit code,
    stdout stripped). Servers run as exec processes that do not wait (``background``)."""

    def __init__(self, stack, vm_id: str, persona: str) -> None:
        self.stack, self.vm_id, self.persona = stack, vm_id, persona

    def run(self, command: str, timeout: float = 20.0) -> tuple[int, str]:
        with self.stack.client(self.persona) as client:
            response = client.post(f"/api/v1/vms/{self.vm_id}/exec/", json={"command": command, "timeout": timeout})
        assert response.status_code == 200, response.text
        body = response.json()
        return (body["exit_code"] if body["exit_code"] is not None else -1), body["stdout"].strip()

    def background(self, command: str) -> str:
        with self.stack.client(self.persona) as client:
            response = client.post(f"/api/v1/vms/{self.vm_id}/exec/", json={"command": command, "wait": False})
        assert response.status_code == 202, response.text
        return response.json()["exec_id"]


def _post(stack, path, persona="owner", **body):
    with stack.client(persona) as client:
        return client.post(path, json=body)


def _nics(stack, vm_id, persona="owner") -> list[dict]:
    with stack.client(persona) as client:
        response = client.get(f"/api/v1/vms/{vm_id}/nics/")
    assert response.status_code == 200, response.text
    return response.json()


def _db(sql: str, *args):
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}", connect_timeout=10) as conn:
        return conn.execute(sql, args).fetchall()


def _links(ns: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        return {msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}


def _ruleset(ns: str) -> list[dict]:
    """Our nftables objects without kernel handles and counter values (a re-apply resets them)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: (None if k == "counter" else strip(v)) for k, v in value.items() if k != "handle"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(nft.list_ours(netns=ns))


def _eventually(check, *, timeout: float = 60.0, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s (last: {last!r})")


def _http_get(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    """Body-and-headers of ``GET /`` from a client inside ``ns``; "" when unreachable."""

    def fetch() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.decode("utf-8", "replace")
        except OSError:
            return ""
        finally:
            sock.close()

    return netns_call(ns, fetch)


@pytest.fixture(scope="module")
def lab(stack):
    """VMs a1, a2 of "owner" and b1 of "stranger" on the default network (tenant isolation on),
    an outside namespace on an uplink veth with TCP servers on 8080 and 8081."""
    assert stack.netns and os.path.exists(f"/run/netns/{stack.netns}")
    outside = f"{stack.netns}-out"
    pr_netns.create(outside)
    servers = []
    vms: dict[str, dict] = {}
    try:
        with IPRoute(netns=outside) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        veth_link(a_ns=stack.netns, a_name="uplink0", a_ip=UPLINK_IP, b_ns=outside, b_name="eth0", b_ip=OUTSIDE_IP)
        with IPRoute(netns=outside) as ipr:  # "another machine on the LAN": it knows the way to the VMs
            ipr.route("add", dst="10.231.0.0/16", gateway=UPLINK_IP)
        for port in (8080, 8081):
            servers.append(TcpServer(outside, OUTSIDE_IP, port, f"outside {port}".encode()))
        t0 = time.monotonic()
        for name, persona in (("a1", "owner"), ("a2", "owner"), ("b1", "stranger")):
            response = _post(stack, "/api/v1/vms/", persona, name=f"net-{name}", template="linux-small")
            assert response.status_code == 202, response.text
            vms[name] = {"id": response.json()["id"], "persona": persona}
        for name, vm in vms.items():
            body = stack.wait_vm(vm["id"], {"running", "error"}, timeout=300, persona=vm["persona"])
            assert body["state"] == "running", body
            (nic,) = _nics(stack, vm["id"], vm["persona"])
            vm.update(nic=nic, ip=nic["ip"], tap=nic["tap"], sh=GuestShell(stack, vm["id"], vm["persona"]))
        boot_seconds = time.monotonic() - t0
        yield {"vms": vms, "outside": outside, "ns": stack.netns, "boot_seconds": boot_seconds}
    finally:
        for server in servers:
            server.close()
        for vm in vms.values():
            with stack.client(vm["persona"]) as client:
                client.delete(f"/api/v1/vms/{vm['id']}/")
        for vm in vms.values():
            stack.wait_vm(vm["id"], {"gone"}, persona=vm["persona"])
        if os.path.exists(f"/run/netns/{outside}"):
            pr_netns.remove(outside)
        assert not os.path.exists(f"/run/netns/{outside}")


def _ping(vm: dict, ip: str, tries: int = 3) -> bool:
    """Guest ``vm`` pings ``ip`` (a few tries: the first one may wait for ARP under TCG)."""
    for _ in range(tries):
        rc, _out = vm["sh"].run(f"busybox ping -c 1 -W 2 {ip} >/dev/null 2>&1")
        if rc == 0:
            return True
    return False


def _guest_fetch(vm: dict, ip: str, port: int) -> str:
    """What a TCP server at ``ip:port`` says to guest ``vm`` (empty when unreachable)."""
    _rc, out = vm["sh"].run(f"busybox timeout 4 busybox nc {ip} {port} </dev/null 2>/dev/null")
    return out


def _egress(stack, vm: dict, mode: str, rules=None):
    with stack.client(vm["persona"]) as client:
        response = client.put(f"/api/v1/vms/{vm['id']}/egress/", json={"mode": mode, "rules": rules or []})
    assert response.status_code == 200, response.text


def test_guests_get_their_address_from_the_database_and_reach_their_gateway(stack, lab):
    vms = lab["vms"]
    ips = {vm["ip"] for vm in vms.values()}
    assert len(ips) == 3
    for vm in vms.values():
        assert vm["nic"]["network"] and vm["nic"]["prefix"] == 24
        rc, out = vm["sh"].run("ip -4 -o addr show dev eth0")
        assert rc == 0 and f"{vm['ip']}/24" in out, out
        rc, out = vm["sh"].run("ip route show default")
        assert f"via {vm['nic']['gateway']}" in out, out
        assert vm["tap"] in _links(lab["ns"])  # in the stack's namespace ...
        assert vm["tap"] not in _links_host()  # ... and never in the host's
        assert _ping(vm, vm["nic"]["gateway"])
    spec = VmSpec.from_json((stack.runtime_dir / vms["a1"]["id"] / "spec.json").read_text())
    assert spec.netns == lab["ns"] and spec.tap == vms["a1"]["tap"] and spec.mac == vms["a1"]["nic"]["mac"]
    # Host-side counters are read in the VMM's namespace (guest view: rx = what the host sent).
    counters = QemuDriver().counters(spec)[f"net.{spec.tap}"]
    assert counters["tx_packets"] > 0 and counters["rx_packets"] > 0, counters


def _links_host() -> set[str]:
    with IPRoute() as ipr:
        return {msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}


def test_vms_of_one_owner_reach_each_other_and_other_owners_do_not(stack, lab):
    a1, a2, b1 = (lab["vms"][n] for n in ("a1", "a2", "b1"))
    assert _ping(a1, a2["ip"])
    assert _ping(a2, a1["ip"])
    assert not _ping(a1, b1["ip"], tries=1)
    assert not _ping(b1, a1["ip"], tries=1)
    assert not _ping(b1, a2["ip"], tries=1)
    # Not through the gateway either (routed hairpin), and not by TCP.
    b1["sh"].background(_HTTPD.format(name="b1"))
    _eventually(
        lambda: "hello-from-b1" in b1["sh"].run("busybox wget -q -O - http://127.0.0.1:8080/")[1], what="httpd in b1"
    )
    assert "hello-from-b1" not in _guest_fetch(a1, b1["ip"], 8080)


def test_egress_deny_blocks_and_an_allow_list_allows_just_what_it_lists(stack, lab):
    a1, a2 = lab["vms"]["a1"], lab["vms"]["a2"]
    assert _guest_fetch(a1, OUTSIDE_IP, 8080) == "outside 8080"  # default network: egress allowed (NAT)
    try:
        _egress(stack, a1, "deny")
        _eventually(lambda: _guest_fetch(a1, OUTSIDE_IP, 8080) == "", timeout=60, what="egress denied")
        assert _guest_fetch(a1, OUTSIDE_IP, 8081) == ""
        assert _ping(a1, a2["ip"])  # its own tenant on the same network is not egress
        assert _guest_fetch(a2, OUTSIDE_IP, 8080) == "outside 8080"  # per VM: a2 unaffected

        _egress(stack, a1, "allowlist", [{"cidr": f"{OUTSIDE_IP}/32", "protocol": "tcp", "ports": "8080"}])
        _eventually(
            lambda: (_guest_fetch(a1, OUTSIDE_IP, 8080), _guest_fetch(a1, OUTSIDE_IP, 8081)) == ("outside 8080", ""),
            timeout=60,
            what="allow-list applied",
        )
        assert not _ping(a1, OUTSIDE_IP, tries=1)  # ICMP is not listed
    finally:
        _egress(stack, a1, "")
    _eventually(lambda: _guest_fetch(a1, OUTSIDE_IP, 8081) == "outside 8081", timeout=60, what="egress restored")


@pytest.fixture(scope="module")
def forward(stack, lab):
    """httpd in a2 on 8080, forwarded from a host port."""
    a2 = lab["vms"]["a2"]
    a2["sh"].background(_HTTPD.format(name="a2"))
    _eventually(
        lambda: "hello-from-a2" in a2["sh"].run("busybox wget -q -O - http://127.0.0.1:8080/")[1], what="httpd in a2"
    )
    response = _post(stack, f"/api/v1/vms/{a2['id']}/port-forwards/", guest_port=8080)
    assert response.status_code == 201, response.text
    pf = response.json()
    assert pf["address"].endswith(f":{pf['host_port']}")
    stranger = _post(stack, f"/api/v1/vms/{a2['id']}/port-forwards/", persona="stranger", guest_port=22)
    assert stranger.status_code == 404
    return pf


def test_a_port_forward_reaches_a_server_started_in_the_guest(stack, lab, forward):
    port = forward["host_port"]
    # From another machine (the outside namespace, via the uplink) and from the host itself.
    _eventually(lambda: "hello-from-a2" in _http_get(lab["outside"], UPLINK_IP, port), what="forward from outside")
    assert "hello-from-a2" in _http_get(lab["ns"], UPLINK_IP, port)
    # A guest cannot use the host's forwards to get around tenant isolation.
    assert "hello-from-a2" not in _guest_fetch(lab["vms"]["b1"], UPLINK_IP, port)
    # Only the forwarded port is open: the guest's other ports are not reachable from outside.
    assert _http_get(lab["outside"], lab["vms"]["a2"]["ip"], 8080) == ""


def test_a_restart_of_our_processes_keeps_vm_networking_and_leaves_no_stale_rules(stack, lab, forward):
    ns = lab["ns"]
    a1, a2 = lab["vms"]["a1"], lab["vms"]["a2"]
    rules_before = _ruleset(ns)
    pids_before = {n: vmm_pids(stack.runtime_dir / vm["id"]) for n, vm in lab["vms"].items()}
    # A leftover TAP of ours (on our bridge) and an interface that is not ours.
    (bridge,) = [name for name in _links(ns) if name.startswith("msbb")]
    netlink.tap_ensure("msbt00deadbeef", bridge, netns=ns)
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname="foreign0", kind="veth", peer="foreign1")  # no dummy module here
    t0 = time.monotonic()
    ours = [name for name in ("web", "worker", "beat", "hostd") if name in stack.procs]
    for name in ours:
        stack.kill(name)
    # Nothing of ours runs: the kernel keeps forwarding with the rules as they were.
    assert "hello-from-a2" in _http_get(lab["outside"], UPLINK_IP, forward["host_port"])
    for name in ours:
        stack.start(name)
    stack.wait_web()
    if "hostd" in ours:
        stack.wait_hostd()
    _eventually(lambda: "msbt00deadbeef" not in _links(ns), timeout=90, what="leftover TAP removed")
    reconcile_seconds = time.monotonic() - t0
    links = _links(ns)
    assert "foreign0" in links
    assert {vm["tap"] for vm in lab["vms"].values()} <= links
    assert _ruleset(ns) == rules_before  # re-applied, same rules, nothing stale or doubled
    for name, vm in lab["vms"].items():
        assert stack.wait_vm(vm["id"], {"running"}, persona=vm["persona"])["state"] == "running"
        assert vmm_pids(stack.runtime_dir / vm["id"]) == pids_before[name]
    assert _ping(a1, a2["ip"])
    assert not _ping(lab["vms"]["b1"], a1["ip"], tries=1)
    assert "hello-from-a2" in _http_get(lab["outside"], UPLINK_IP, forward["host_port"])
    with IPRoute(netns=ns) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="foreign0")[0])
    print(f"restart to reconciled: {reconcile_seconds:.1f}s")


def test_delete_removes_tap_rules_and_address(stack, lab, forward):
    ns = lab["ns"]
    a2 = lab["vms"].pop("a2")
    assert a2["tap"] in json.dumps(_ruleset(ns))
    with stack.client() as client:
        assert client.delete(f"/api/v1/vms/{a2['id']}/").status_code == 202
    stack.wait_vm(a2["id"], {"gone"})
    assert a2["tap"] not in _links(ns)
    text = json.dumps(_ruleset(ns))
    assert a2["tap"] not in text
    assert f'"{a2["ip"]}"' not in text
    assert str(forward["host_port"]) not in text
    assert _db("SELECT count(*) FROM networking_nic WHERE vm_id = %s", a2["id"]) == [(0,)]
    assert _db("SELECT count(*) FROM networking_portforward WHERE vm_id = %s", a2["id"]) == [(0,)]
    assert _http_get(lab["outside"], UPLINK_IP, forward["host_port"]) == ""
    # The address is free again: the next VM of the network gets it.
    response = _post(stack, "/api/v1/vms/", name="net-a2-again", template="linux-small", start=False)
    assert response.status_code == 202, response.text
    again = response.json()
    try:
        assert _nics(stack, again["id"])[0]["ip"] == a2["ip"]
    finally:
        with stack.client() as client:
            client.delete(f"/api/v1/vms/{again['id']}/")
        stack.wait_vm(again["id"], {"gone", "error"})
