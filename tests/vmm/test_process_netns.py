"""VMMs start inside ``VmSpec.netns``: ``spawn_detached`` forks from a thread that entered the
namespace, the caller stays where it is. Namespaces here are created by the test and removed
at the end; no traffic is sent."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from vms.vmm.base import VmmError
from vms.vmm.process import call_in_netns, kill_vmm, netdev_counters, spawn_detached


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"msbtest-vmm-{uuid.uuid4().hex[:6]}"
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)
    assert not os.path.exists(f"/run/netns/{name}")


def _net_ns_of(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_it_spawns_the_vmm_inside_the_namespace_and_stays_outside_itself(netns: str, tmp_path: Path) -> None:
    ours = _net_ns_of("self")
    # sh -c with the runtime dir as $0: a long-lived child whose command line names the dir
    # (as a VMM's does); `sleep 30 <dir>` would exit at once on the bad argument.
    pid = spawn_detached(["sh", "-c", "sleep 30", str(tmp_path)], tmp_path, netns=netns)
    try:
        assert _net_ns_of(pid) == _net_ns_of_path(netns)
        assert _net_ns_of(pid) != ours
        assert _net_ns_of("self") == ours
        assert _net_ns_of(f"self/task/{os.getpid()}") == ours
        # The child sees the namespace's interfaces (only lo here), counters come from there.
        assert netdev_counters(pid, "lo") == {"rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0}
        assert netdev_counters(pid, "eth0") == {}
    finally:
        kill_vmm(pid, tmp_path, term_timeout=2.0)


def _net_ns_of_path(name: str) -> str:
    inode = os.stat(f"/run/netns/{name}").st_ino
    return f"net:[{inode}]"


def test_it_refuses_a_namespace_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(VmmError, match="does not exist"):
        spawn_detached(["true"], tmp_path, netns="msbtest-absent")
    assert not (tmp_path / "vmm.pid").exists()


def test_call_in_netns_returns_results_and_raises_errors(netns: str) -> None:
    out = call_in_netns(netns, lambda: subprocess.run(["cat", "/proc/net/dev"], capture_output=True, text=True).stdout)
    assert "lo:" in out and "eth" not in out
    with pytest.raises(ZeroDivisionError):
        call_in_netns(netns, lambda: 1 / 0)
    assert call_in_netns(None, lambda: 42) == 42
    start = time.monotonic()
    assert call_in_netns(netns, time.sleep, 0) is None
    assert time.monotonic() - start < 5


def test_a_tap_is_opened_by_us_in_its_namespace_and_handed_over_as_an_fd(netns: str, tmp_path: Path) -> None:
    """The VMM gets an open TAP (``-netdev tap,fd=N``), not the right to open one: root opens
    it in the namespace that holds it; a TAP another process still has open is refused."""
    from pyroute2 import IPRoute

    from vms.vmm.process import tap_open

    with IPRoute(netns=netns) as ipr:
        ipr.link("add", ifname="msbtconf0", kind="tuntap", mode="tap", ifr={"no_pi": True, "vnet_hdr": True})
    with pytest.raises(VmmError, match="cannot open TAP device msbtconf0"):
        tap_open("msbtconf0")  # not in our namespace
    fd = tap_open("msbtconf0", netns=netns)
    try:
        assert not os.get_inheritable(fd)
        with pytest.raises(VmmError, match="busy"):
            tap_open("msbtconf0", netns=netns)
        pid = spawn_detached(
            ["sh", "-c", f"ls -l /proc/self/fd/{fd}; sleep 30", str(tmp_path)], tmp_path, pass_fds=(fd,)
        )
        try:
            deadline = time.monotonic() + 5
            while "/dev/net/tun" not in (tmp_path / "vmm.log").read_text():
                assert time.monotonic() < deadline, (tmp_path / "vmm.log").read_text()
                time.sleep(0.05)
        finally:
            kill_vmm(pid, tmp_path, term_timeout=2.0)
    finally:
        os.close(fd)
