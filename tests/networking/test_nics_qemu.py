"""A real QEMU guest with two NICs on two dual-stack bridges: the first NIC's IPv4 configured by
the guest's init from the kernel command line, everything else (the second NIC, both NICs'
IPv6 and the IPv6 default route) through the agent with the script the host sends
(``networking.guest``); both NICs get the MTU the host gives (a tunnel host's, below 1500).
Bridges, TAPs and the VMM live in a namespace this test creates; the only traffic is between
the guest and the bridge addresses inside it."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from networking import netlink
from networking.guest import nic_configure_argv
from tests.vmm.agent_ops import agent_run
from tests.vmm.conftest import confinement, driver, image, make_spec  # noqa: F401 - fixtures
from vms.vmm.agent_client import AgentConnection, AgentTransport, wait_for_agent
from vms.vmm.base import NicDevice, VmSpec
from vms.vmm.qemu import QemuDriver

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_a_qemu_guest_gets_both_nics_configured(
    make_netns,
    driver: QemuDriver,  # noqa: F811 - fixture
    make_spec: Callable[..., VmSpec],  # noqa: F811 - fixture
) -> None:
    ns = make_netns("nics")
    bridges = [netlink.bridge_name(str(uuid.uuid4())) for _ in range(2)]
    taps = [netlink.tap_name(str(uuid.uuid4())) for _ in range(2)]
    netlink.bridge_ensure(bridges[0], "10.231.70.1", 24, netns=ns, gateway6="fd00:231:70::1", prefix6=64)
    netlink.bridge_ensure(bridges[1], "10.231.71.1", 24, netns=ns, gateway6="fd00:231:71::1", prefix6=64)
    for tap, bridge in zip(taps, bridges, strict=True):
        netlink.tap_ensure(tap, bridge, netns=ns)
    macs = ["02:00:0a:e7:46:02", "02:00:0a:e7:47:02"]
    spec = make_spec(
        "nics",
        netns=ns,
        tap=taps[0],
        mac=macs[0],
        extra_nics=(NicDevice(taps[1], macs[1], "net1"),),
        cmdline="sandbox.ip=10.231.70.2/24 sandbox.gw=10.231.70.1",
        nic_mtu=1400,
    )
    driver.launch(spec)
    try:
        wait_for_agent(spec, AgentTransport.VIRTIO_SERIAL, timeout=180)
        with AgentConnection.open(spec.runtime_dir / "agent.sock", AgentTransport.VIRTIO_SERIAL, timeout=10) as conn:
            # Dual-stack: the first NIC's IPv6 and default route come through the agent too.
            first = nic_configure_argv(macs[0], "10.231.70.2/24", "fd00:231:70::2/64", "fd00:231:70::1")
            result, out = agent_run(conn, argv=first, wait=30)
            assert result["exit_code"] == 0, out
            second = nic_configure_argv(macs[1], "10.231.71.2/24", "fd00:231:71::2/64")
            result, out = agent_run(conn, argv=second, wait=30)
            assert result["exit_code"] == 0, out
            again, _ = agent_run(conn, argv=second, wait=30)
            assert again["exit_code"] == 0  # idempotent: run after every boot or restore
            result, out = agent_run(conn, shell="ip -o addr show; ip -o link show; ip route; ip -6 route", wait=30)
            text = out.decode()
            assert "10.231.70.2/24" in text and "10.231.71.2/24" in text, text
            assert "fd00:231:70::2/64" in text and "fd00:231:71::2/64" in text, text
            assert "default via 10.231.70.1" in text and "default via fd00:231:70::1" in text, text
            assert text.count("mtu 1400") == 2 and "mtu 1500" not in text, text  # lo is 65536
            for gateway in ("10.231.70.1", "10.231.71.1", "fd00:231:70::1", "fd00:231:71::1"):
                ping = ["/usr/local/bin/busybox", "ping6" if ":" in gateway else "ping", "-c", "1", "-W", "5", gateway]
                result, out = agent_run(conn, argv=ping, wait=30)
                assert result["exit_code"] == 0, (gateway, out)
            missing, out = agent_run(conn, argv=nic_configure_argv("02:00:00:00:00:99", "10.231.72.2/24"), wait=90)
            assert missing["exit_code"] == 3 and b"no interface with MAC" in out
    finally:
        driver.cleanup(spec)
