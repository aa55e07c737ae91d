"""vms/agent_gateway.py: transport choice (hostd, else a direct agent connection for single
requests), one error mapping, streams through hostd. Against the stand-in VMM running the real
guest agent code (tests/vms/conftest.py); no VM boots."""

from __future__ import annotations

import pytest

from sandbox_site.errors import ApplicationError
from vms import agent_gateway
from vms.vmm.base import AgentTransport


@pytest.mark.parametrize(
    ("code", "api_code", "status"),
    [
        ("not_found", "not_found", 404),
        ("permission_denied", "guest_permission_denied", 403),  # the guest's, not our 403
        ("too_large", "too_large", 413),
        ("vm_not_running", "vm_not_running", 409),
        ("agent_unavailable", "agent_unavailable", 503),
        ("agent_timeout", "agent_timeout", 504),
        ("hostd_unavailable", "hostd_unavailable", 503),
        ("io_error", "io_error", 422),  # the guest could not read or write that file
        ("cross_device", "cross_device", 502),  # anything else: the guest side failed
    ],
)
def test_it_maps_agent_and_hostd_codes_to_the_api_shape(code, api_code, status):
    error = agent_gateway.agent_error(code, "it said no")
    assert (error.code, error.status_code, error.message) == (api_code, status, "it said no")


@pytest.fixture(params=["hostd", "direct"])
def reachable_vm(request):
    """The same VM reached through hostd, or directly when no hostd runs."""
    return request.getfixturevalue("live_vm" if request.param == "hostd" else "vm_runtime")[0]


def test_single_requests_work_with_and_without_hostd(reachable_vm):
    vm = reachable_vm
    assert agent_gateway.agent_wait(vm, timeout=10)["protocol"] == 2
    assert agent_gateway.agent_ping(vm)["protocol"] == 2
    result, _ = agent_gateway.agent_call(vm, "exec_start", {"argv": ["true"]})
    assert result["exec_id"]


def test_agent_errors_are_mapped_the_same_on_both_paths(reachable_vm):
    with pytest.raises(ApplicationError) as err:
        agent_gateway.agent_call(reachable_vm, "file_stat", {"path": "/no/such/file"})
    assert (err.value.code, err.value.status_code) == ("not_found", 404)


def test_requests_go_through_hostd_when_it_runs(live_vm):
    vm, _ = live_vm
    # The stand-in serves one agent client at a time, like QEMU, and hostd holds it: a
    # direct connection could not even say hello.
    agent_gateway.agent_wait(vm, timeout=10)
    assert agent_gateway.agent_ping(vm, timeout=3)["protocol"] == 2


def test_streams_need_hostd(vm_runtime):
    vm, root = vm_runtime
    with pytest.raises(ApplicationError) as err:
        agent_gateway.file_upload(vm, f"{root}/x", [b"data"])
    assert (err.value.code, err.value.status_code) == ("hostd_unavailable", 503)
    assert not (root / "x").exists()


def test_a_vm_without_an_agent_times_out_with_agent_timeout(vm, settings, tmp_path):
    settings.SANDBOX_RUNTIME_DIR = tmp_path
    settings.SANDBOX_HOSTD_SOCKET = tmp_path / "hostd.sock"
    with pytest.raises(ApplicationError) as err:
        agent_gateway.agent_wait(vm, timeout=0.5)
    assert (err.value.code, err.value.status_code) == ("agent_timeout", 504)


@pytest.mark.parametrize(
    ("driver", "transport"),
    [("qemu", AgentTransport.VIRTIO_SERIAL), ("cloud-hypervisor", AgentTransport.HYBRID_VSOCK)],
)
def test_the_agent_transport_is_the_drivers(vm, driver, transport):
    vm.driver = driver
    assert agent_gateway.agent_transport(vm) == transport
