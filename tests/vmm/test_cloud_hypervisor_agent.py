"""The hybrid-vsock agent link end to end against the fake cloud-hypervisor, whose vsock
runs the real guest agent (guest_agents/linux/sandbox_agent.py, protocol v2): the direct
client (vms.vmm.agent_client) and hostd's AgentLink. No guest boots; the agent's commands
run on this host, so only harmless ones are used."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostd.runner import Hostd
from tests.vmm.test_cloud_hypervisor import driver, images, make_spec, short_dir  # noqa: F401 - fixtures
from vms.vmm.agent_client import AgentConnection, AgentError, AgentTimeout, agent_ping, wait_for_agent
from vms.vmm.base import AgentTransport, VmSpec
from vms.vmm.cloud_hypervisor import CloudHypervisorDriver


@pytest.fixture
def running(driver: CloudHypervisorDriver, short_dir: Path, images: tuple[Path, Path]) -> Iterator[VmSpec]:  # noqa: F811
    spec = make_spec(short_dir, images, "vm1")
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    yield spec
    driver.cleanup(spec)


def exec_output(conn: AgentConnection, argv: list[str]) -> tuple[int, bytes]:
    started = conn.request("exec_start", {"argv": argv})
    done = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=25)
    _, data = conn.request_data("exec_read", {"exec_id": started["exec_id"]})
    return int(done["result"]["exit_code"]), data


def test_the_direct_client_speaks_protocol_v2_over_hybrid_vsock(running: VmSpec) -> None:
    ping = wait_for_agent(running, AgentTransport.HYBRID_VSOCK, timeout=15)
    assert ping["protocol"] == 2 and ping["agent_version"]
    assert agent_ping(running, AgentTransport.HYBRID_VSOCK)["boot_id"] == ping["boot_id"]
    path = running.runtime_dir / "agent.sock"
    with AgentConnection.open(path, AgentTransport.HYBRID_VSOCK, timeout=10) as conn:
        assert conn.hello["transport"] == "vsock" and conn.hello["protocol"] == 2
        assert exec_output(conn, ["echo", "hello from the fake guest"]) == (0, b"hello from the fake guest\n")
        assert conn.health()["status"] == "ok"


def test_a_wrong_port_or_the_virtio_serial_framing_gets_no_session(running: VmSpec) -> None:
    path = running.runtime_dir / "agent.sock"
    with pytest.raises(AgentError, match="closed|lost"):  # nobody listens on guest port 1025
        AgentConnection.open(path, AgentTransport.HYBRID_VSOCK, timeout=3, port=1025)
    with pytest.raises(AgentError, match="closed|lost"):  # a frame is not a CONNECT line
        AgentConnection.open(path, AgentTransport.VIRTIO_SERIAL, timeout=3)


def test_a_paused_guest_does_not_answer_until_resumed(driver: CloudHypervisorDriver, running: VmSpec) -> None:  # noqa: F811
    wait_for_agent(running, AgentTransport.HYBRID_VSOCK, timeout=15)
    driver.pause(running)
    with pytest.raises(AgentTimeout):
        agent_ping(running, AgentTransport.HYBRID_VSOCK, timeout=1.0)
    driver.resume(running)
    assert agent_ping(running, AgentTransport.HYBRID_VSOCK)["protocol"] == 2


def test_a_reboot_ends_the_connection_and_changes_the_boot_id(driver: CloudHypervisorDriver, running: VmSpec) -> None:  # noqa: F811
    path = running.runtime_dir / "agent.sock"
    with AgentConnection.open(path, AgentTransport.HYBRID_VSOCK, timeout=10) as conn:
        before = conn.ping()["boot_id"]
        driver.reboot(running)
        with pytest.raises(AgentError, match="closed|lost"):
            conn.ping(timeout=5)
    assert wait_for_agent(running, AgentTransport.HYBRID_VSOCK, timeout=15)["boot_id"] != before


def test_hostd_reaches_the_agent_over_hybrid_vsock_and_reconnects_after_a_restore(
    driver: CloudHypervisorDriver,  # noqa: F811
    running: VmSpec,
    short_dir: Path,  # noqa: F811
) -> None:
    hostd = Hostd(short_dir).start()
    try:
        with hostd.client() as client:
            ping = client.agent_wait("vm1", timeout=15)
            assert ping["protocol"] == 2
            (status,) = client.call("vm_list")[0]["vms"]
            assert status["transport"] == "hybrid-vsock" and status["agent"]["connected"]
            first_pid = status["agent"]["vmm_pid"]
            started = client.agent("vm1", "exec_start", {"argv": ["echo", "via hostd"]})[0]
            client.agent("vm1", "exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=25)
            assert client.agent("vm1", "exec_read", {"exec_id": started["exec_id"]})[1] == b"via hostd\n"

            # A restore replaces the VMM under the same socket paths: the link reconnects.
            driver.snapshot(running, short_dir / "snap")
            driver.shutdown(running, force=True)
            driver.restore(running, short_dir / "snap", timeout=20)
            assert client.agent_wait("vm1", timeout=20)["protocol"] == 2
            (status,) = client.call("vm_list")[0]["vms"]
            assert status["agent"]["vmm_pid"] not in (None, first_pid)
    finally:
        hostd.stop()
