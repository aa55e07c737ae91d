"""Contract tests of the Cloud Hypervisor driver against the fake VMM (and the real binary
when one runs here). Run: ``pytest tests/vmm/test_cloud_hypervisor.py -p no:django -q``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vms.vmm.agent_client import AgentConnection
from vms.vmm.base import (
    AgentTransport,
    DriverCapabilities,
    NicDevice,
    RuntimeState,
    VmmError,
    VmmInvalidRequest,
    VmmNotRunning,
    VmmStateError,
    VmmTimeout,
    VmSpec,
)
from vms.vmm.cloud_hypervisor import (
    MIB,
    ChApiClient,
    ChRuntimePaths,
    CloudHypervisorDriver,
    EventMonitorReader,
    EventStreamParser,
    _raise_for_response,
    build_vm_config,
    cloud_hypervisor_available,
    event_to_state,
    guest_history,
    read_recent_events,
)
from vms.vmm.snapshot import SnapshotMeta

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_cloud_hypervisor.py"
FAKE_BIN = HERE / "bin" / "cloud-hypervisor"


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep for that.
    path = Path(tempfile.mkdtemp(prefix="ch-", dir="/tmp"))
    yield path
    # A failing test must not leave VMMs behind: kill every VMM whose pid file is in here.
    for pid_file in path.glob("*/vmm.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake kernel")
    base = tmp_path / "base.raw"
    with base.open("wb") as fh:
        fh.truncate(4 * MIB)
    return kernel, base


def make_spec(root: Path, images: tuple[Path, Path], name: str = "vm1", **kw: object) -> VmSpec:
    kernel, base = images
    args: dict[str, object] = {
        "vm_id": name,
        "runtime_dir": root / name,
        "kernel": kernel,
        "base_image": base,
        "cmdline": "console=ttyS0 reboot=k panic=1",
        "vcpus": 1,
        "max_vcpus": 2,
        "memory_mib": 256,
        "max_memory_mib": 512,
        "vsock_cid": 3,
    }
    args.update(kw)
    return VmSpec(**args)  # type: ignore[arg-type]


@pytest.fixture
def spec(short_dir: Path, images: tuple[Path, Path]) -> VmSpec:
    return make_spec(short_dir, images)


@pytest.fixture
def driver() -> CloudHypervisorDriver:
    assert os.access(FAKE_BIN, os.X_OK)
    return CloudHypervisorDriver(binary=str(FAKE_BIN))


class FakeVmm:
    """A bare fake VMM process with an API client, for client-level contract tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.api_socket = root / "api.sock"
        self.events = root / "events.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--api-socket", f"path={self.api_socket}",
             "--event-monitor", f"path={self.events}", "--log-file", str(root / "vmm.log")],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while not self.api_socket.exists():
            assert self.proc.poll() is None, (root / "vmm.log").read_text()
            assert time.monotonic() < deadline, "fake VMM did not start"
            time.sleep(0.02)
        self.api = ChApiClient(self.api_socket, timeout=5.0)

    def raw(self, method: str, endpoint: str, content: bytes | None = None) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.api_socket)), timeout=5.0) as http:
            return http.request(method, f"http://localhost/api/v1/{endpoint}", content=content)

    def close(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeVmm]:
    vmm = FakeVmm(short_dir)
    yield vmm
    vmm.close()


def vm_config(spec: VmSpec) -> dict[str, object]:
    """build_vm_config without touching qemu-img: the disk is a plain file."""
    spec.runtime_dir.mkdir(parents=True, exist_ok=True)
    (spec.runtime_dir / "overlay.qcow2").write_bytes(b"")
    return build_vm_config(spec)


def agent_ping(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """Hybrid vsock handshake, then protocol v2 hello + ping (vms.vmm.agent_client)."""
    with AgentConnection.open(path, AgentTransport.HYBRID_VSOCK, timeout=timeout) as conn:
        return conn.ping(timeout=timeout)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"


# ------------------------------------------------------------------------------------------
# error mapping (the one place)
# ------------------------------------------------------------------------------------------


def response(status: int, body: object = None) -> httpx.Response:
    return httpx.Response(status, json=body) if body is not None else httpx.Response(status)


def test_it_maps_wrong_state_500_to_state_error_with_chain() -> None:
    chain = ["Error from API", "The VM could not be paused", "VM is not running"]
    with pytest.raises(VmmStateError) as caught:
        _raise_for_response("vm.pause", response(500, chain))
    assert caught.value.details == {"endpoint": "vm.pause", "status": 500, "chain": chain}
    assert "VM is not running" in caught.value.message


def test_it_maps_other_errors_to_vmm_error() -> None:
    with pytest.raises(VmmError) as caught:
        _raise_for_response("vm.add-disk", response(500, ["Error from API", "Failed to open disk"]))
    assert type(caught.value) is VmmError
    with pytest.raises(VmmError) as caught:
        _raise_for_response("vm.nope", response(404, ["Error from API", "Unknown endpoint vm.nope"]))
    assert type(caught.value) is VmmError
    with pytest.raises(VmmError) as caught:
        _raise_for_response("vm.create", httpx.Response(400, text="not json"))
    assert caught.value.details["chain"] == ["not json"]  # type: ignore[index]


def test_it_maps_404_not_created_and_405_to_state_error() -> None:
    with pytest.raises(VmmStateError):
        _raise_for_response("vm.info", response(404, ["Error from API", "VM is not created"]))
    with pytest.raises(VmmStateError):
        _raise_for_response("vm.pause", response(405))
    with pytest.raises(VmmStateError):
        _raise_for_response("vm.resize", response(429))


@pytest.mark.parametrize(
    "chain",
    [
        ["Error from API", "The VM could not boot", "InvalidStateTransition(Running, Running)"],
        ["Error from API", "The VM could not be paused", "InvalidStateTransition(Paused, Paused)"],
        ["Error from API", "The VM could not be restored", "Cannot restore a VM while VM is running"],
        ["Error from API", "The VM could not be resized", "VmNotRunning"],
        ["Error from API", "The VM could not be paused", "VM is not running"],
    ],
)
def test_it_maps_every_state_error_text_of_the_real_binary_to_state_error(chain: list[str]) -> None:
    with pytest.raises(VmmStateError) as caught:
        _raise_for_response("vm.boot", response(500, chain))
    assert caught.value.details["chain"] == chain  # type: ignore[index]


def test_it_maps_a_resize_the_vmm_cannot_do_to_invalid_request() -> None:
    for cause in ("Memory manager error: InvalidSize", "Memory manager error: NoSlotAvailable"):
        chain = ["Error from API", "The VM could not be resized", "Error resizing VM", cause]
        with pytest.raises(VmmInvalidRequest, match=cause.rsplit(" ", 1)[-1]):
            _raise_for_response("vm.resize", response(500, chain))


def test_it_accepts_200_and_204_for_vmm_shutdown() -> None:
    _raise_for_response("vmm.shutdown", response(200))
    _raise_for_response("vmm.shutdown", response(204))


def test_it_raises_timeout_when_the_vmm_does_not_answer(short_dir: Path) -> None:
    path = short_dir / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # accepted by the kernel backlog, never answered
    try:
        with ChApiClient(path, timeout=0.3) as api, pytest.raises(VmmTimeout):
            api.vmm_ping()
    finally:
        listener.close()


def test_it_raises_not_running_when_the_socket_is_missing(short_dir: Path) -> None:
    with ChApiClient(short_dir / "none.sock", timeout=1) as api, pytest.raises(VmmNotRunning):
        api.vmm_ping()


# ------------------------------------------------------------------------------------------
# the fake enforces the spec
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "endpoint", "body", "status"),
    [
        ("PUT", "vm.create", {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}, 400),  # payload missing
        ("PUT", "vm.create", {"payload": {"kernel": 5}}, 400),  # wrong type
        ("PUT", "vm.create", {"payload": {}, "cpus": {"boot_vcpus": "two", "max_vcpus": 2}}, 400),
        ("PUT", "vm.create", {"payload": {}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}}, 400),  # minimum
        ("PUT", "vm.create", {"payload": {}, "disks": [{"path": "/x", "pci_device_id": 300}]}, 400),  # uint8
        ("PUT", "vm.create", {"payload": {}, "serial": {"mode": "Sockett"}}, 400),  # enum
        ("PUT", "vm.create", {"payload": {}, "memory": {"size": 1, "hotplug": 2}}, 400),  # unknown field
        ("PUT", "vm.create", None, 400),  # required body missing
        ("PUT", "vm.resize", {"desired_vcpus": 0}, 400),
        ("PUT", "vm.add-vsock", {"cid": 2, "socket": "/tmp/x"}, 400),  # cid minimum 3
        ("PUT", "vm.restore", {"prefault": True}, 400),  # source_url required
        ("PUT", "vm.frobnicate", None, 404),  # unknown endpoint
        ("GET", "vm.create", None, 400),  # wrong method
        ("PUT", "vmm.ping", None, 400),
    ],
)
def test_the_fake_rejects_what_the_spec_rejects(
    fake: FakeVmm, method: str, endpoint: str, body: object, status: int
) -> None:
    answer = fake.raw(method, endpoint, json.dumps(body).encode() if body is not None else None)
    assert answer.status_code == status
    chain = answer.json()
    assert isinstance(chain, list) and chain[0] == "Error from API" and len(chain) >= 2


def test_the_fake_rejects_invalid_json(fake: FakeVmm) -> None:
    answer = fake.raw("PUT", "vm.create", b"{not json")
    assert answer.status_code == 400
    assert answer.json()[0] == "Error from API"


def test_the_client_surfaces_spec_rejections_as_vmm_error(fake: FakeVmm) -> None:
    with pytest.raises(VmmError) as caught:
        fake.api.vm_create({"cpus": {"boot_vcpus": 1, "max_vcpus": 1}})
    assert type(caught.value) is VmmError
    assert any("payload" in item for item in caught.value.details["chain"])  # type: ignore[index]


# ------------------------------------------------------------------------------------------
# every client method against the spec-validating fake
# ------------------------------------------------------------------------------------------


def test_every_client_method_sends_a_body_the_spec_accepts(
    fake: FakeVmm, spec: VmSpec, short_dir: Path, tmp_path: Path
) -> None:
    api = fake.api
    ping = api.vmm_ping()
    assert ping["version"] and ping["pid"] == fake.proc.pid

    config = vm_config(spec)
    api.vm_create(config)
    assert api.vm_info()["state"] == "Created"
    # Before boot, add-* and resize edit the stored config (204, no device info).
    extra_disk = tmp_path / "extra.raw"
    extra_disk.write_bytes(b"\0" * 512)
    assert api.vm_add_disk({"path": str(extra_disk), "id": "cold0"}) is None
    api.vm_resize(desired_vcpus=2)
    api.vm_boot()
    info = api.vm_info()
    assert info["state"] == "Running" and info["config"]["cpus"]["boot_vcpus"] == 2

    hot = api.vm_add_disk({"path": str(extra_disk), "readonly": True, "id": "data1"})
    assert hot is not None and hot["id"] == "data1" and hot["bdf"]
    net = api.vm_add_net({"tap": "tap-test0", "mac": "52:54:00:12:34:56", "id": "net9"})
    assert net is not None and net["id"] == "net9"
    api.vm_remove_device("data1")
    api.vm_resize(desired_ram=384 * MIB)
    assert api.vm_info()["memory_actual_size"] == 384 * MIB
    counters = api.vm_counters()
    assert set(counters["disk0"]) >= {"read_bytes", "write_bytes", "read_ops", "write_ops"}
    assert set(counters["net9"]) >= {"rx_bytes", "tx_bytes", "rx_frames", "tx_frames"}

    api.vm_pause()
    snap = short_dir / "snap"
    snap.mkdir()
    api.vm_snapshot(snap.as_uri())
    assert {p.name for p in snap.iterdir()} >= {"config.json", "state.json", "memory-ranges"}
    api.vm_resume()
    api.vm_reboot()
    api.vm_shutdown()
    assert api.vm_info()["state"] == "Created"  # VM dropped, config kept
    api.vm_boot()  # ... and it boots again
    api.vm_power_button()
    api.vm_delete()
    with pytest.raises(VmmStateError):
        api.vm_info()

    # A VM without vsock, to hot-add one.
    config.pop("vsock")
    api.vm_create(config)
    api.vm_boot()
    vsock = api.vm_add_vsock({"cid": 4, "socket": str(short_dir / "added.sock")})
    assert vsock is not None
    assert agent_ping(short_dir / "added.sock")["protocol"] == 2
    api.vm_delete()

    # Restore into this (now empty) VMM: config.json names the serial/vsock sockets that are
    # free again after vm.delete.
    api.vm_restore(snap.as_uri(), resume=True)
    assert api.vm_info()["state"] == "Running"
    api.vmm_shutdown()
    fake.proc.wait(timeout=10)
    assert fake.proc.returncode == 0


# ------------------------------------------------------------------------------------------
# state rules
# ------------------------------------------------------------------------------------------


def test_pause_before_boot_is_a_state_error(fake: FakeVmm, spec: VmSpec) -> None:
    with pytest.raises(VmmStateError):  # no VM at all: 404
        fake.api.vm_pause()
    fake.api.vm_create(vm_config(spec))
    with pytest.raises(VmmStateError) as caught:  # created, not booted: 500
        fake.api.vm_pause()
    assert caught.value.details["status"] == 500  # type: ignore[index]
    assert caught.value.details["chain"][-1] == "VM is not running"  # type: ignore[index]


def test_wrong_state_calls_are_refused(fake: FakeVmm, spec: VmSpec) -> None:
    api = fake.api
    with pytest.raises(VmmStateError):
        api.vm_boot()  # nothing created
    api.vm_create(vm_config(spec))
    with pytest.raises(VmmStateError):
        api.vm_create(vm_config(spec))  # one VM per VMM
    api.vm_boot()
    with pytest.raises(VmmStateError):
        api.vm_boot()
    with pytest.raises(VmmStateError):
        api.vm_resume()  # not paused
    api.vm_pause()
    with pytest.raises(VmmStateError):
        api.vm_pause()
    api.vm_delete()
    api.vm_create(vm_config(spec))
    with pytest.raises(VmmStateError):
        api.vm_power_button()  # not booted: refused


def test_snapshot_while_running_is_refused(fake: FakeVmm, spec: VmSpec, short_dir: Path) -> None:
    fake.api.vm_create(vm_config(spec))
    fake.api.vm_boot()
    with pytest.raises(VmmStateError) as caught:
        fake.api.vm_snapshot(short_dir.as_uri())
    assert "not paused" in caught.value.message
    assert not (short_dir / "state.json").exists()


def test_restore_into_a_vmm_with_a_vm_is_refused(fake: FakeVmm, spec: VmSpec, short_dir: Path) -> None:
    fake.api.vm_create(vm_config(spec))
    with pytest.raises(VmmStateError) as caught:
        fake.api.vm_restore(short_dir.as_uri())
    assert "already created" in caught.value.message


def test_resize_beyond_the_limits_is_refused_by_the_vmm(fake: FakeVmm, spec: VmSpec) -> None:
    fake.api.vm_create(vm_config(spec))
    fake.api.vm_boot()
    with pytest.raises(VmmError, match="exceed"):
        fake.api.vm_resize(desired_vcpus=3)
    with pytest.raises(VmmError, match="hotplug limit"):
        fake.api.vm_resize(desired_ram=1024 * MIB)
    fake.api.vm_resize(desired_vcpus=2, desired_ram=512 * MIB)


def test_stale_sockets_make_boot_fail_like_the_real_binary(fake: FakeVmm, spec: VmSpec) -> None:
    config = vm_config(spec)
    (spec.runtime_dir / "serial.sock").write_text("stale")
    fake.api.vm_create(config)
    with pytest.raises(VmmError, match="Address already in use"):
        fake.api.vm_boot()


# ------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------


def test_prepare_creates_a_qcow2_overlay_on_the_base(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt package qemu-utils)")
    driver.prepare(spec)
    driver.prepare(spec)  # idempotent
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(spec.runtime_dir / "overlay.qcow2")],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    info = json.loads(out.stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(spec.base_image.resolve())
    assert info["virtual-size"] == spec.disk_gib * 1024**3
    assert VmSpec.from_json((spec.runtime_dir / "spec.json").read_text()) == spec


def test_prepare_refuses_a_runtime_dir_too_long_for_sockets(
    driver: CloudHypervisorDriver, images: tuple[Path, Path]
) -> None:
    spec = make_spec(Path("/tmp/" + "x" * 100), images)
    with pytest.raises(VmmError, match="too long"):
        driver.prepare(spec)


def test_full_lifecycle_against_the_fake(
    driver: CloudHypervisorDriver, spec: VmSpec, short_dir: Path, images: tuple[Path, Path]
) -> None:
    driver.prepare(spec)
    rt = spec.runtime_dir
    (rt / "agent.sock").write_text("stale from a crashed VMM")  # must be removed before start

    launched = driver.launch(spec, timeout=20)
    assert launched.driver == "cloud-hypervisor" and launched.vmm_version
    assert int((rt / "vmm.pid").read_text()) == launched.pid
    info = driver.info(spec)
    assert info.state is RuntimeState.RUNNING and info.pid == launched.pid
    assert info.vcpus == 1 and info.memory_mib == 256
    assert driver.launch(spec).pid == launched.pid  # idempotent: no second VMM

    # The VMM runs detached: own session, stdin closed.
    assert os.getsid(launched.pid) == launched.pid
    assert os.readlink(f"/proc/{launched.pid}/fd/0") == "/dev/null"

    # The guest agent answers over hybrid vsock; the serial port answers on its socket.
    answer = agent_ping(rt / "agent.sock")
    assert answer["protocol"] == 2 and answer["boot_id"]
    with socket.socket(socket.AF_UNIX) as serial:
        serial.settimeout(5)
        serial.connect(str(rt / "serial.sock"))
        assert b"login:" in serial.recv(4096)

    driver.pause(spec)
    assert driver.info(spec).state is RuntimeState.PAUSED
    with pytest.raises(VmmStateError):
        driver.pause(spec)
    driver.resume(spec)
    assert driver.info(spec).state is RuntimeState.RUNNING

    driver.resize(spec, vcpus=2, memory_mib=384)
    info = driver.info(spec)
    assert (info.vcpus, info.memory_mib) == (2, 384)
    with pytest.raises(VmmInvalidRequest):
        driver.resize(spec, vcpus=3, memory_mib=None)
    with pytest.raises(VmmInvalidRequest):
        driver.resize(spec, vcpus=None, memory_mib=1024)
    with pytest.raises(VmmInvalidRequest):
        driver.resize(spec, vcpus=None, memory_mib=256)  # ACPI hotplug does not shrink

    counters = driver.counters(spec)
    assert "read_bytes" in counters["disk0"]

    driver.reboot(spec)
    assert driver.info(spec).state is RuntimeState.RUNNING

    # Snapshot: paused around vm.snapshot, running afterwards, disk copied consistently.
    snap = short_dir / "snap1"
    result = driver.snapshot(spec, snap)
    assert result.vmm_version == launched.vmm_version and result.include_memory
    assert (result.vcpus, result.memory_mib, result.state_file) == (2, 384, "state.json")
    assert SnapshotMeta.read(snap) == result
    assert {p.name for p in snap.iterdir()} >= {
        "config.json", "state.json", "memory-ranges", "overlay.qcow2", "snapshot.json",
    }  # fmt: skip
    assert driver.info(spec).state is RuntimeState.RUNNING

    # Restore as a clone beside the original: its own sockets, so no "Address already in use".
    clone = make_spec(short_dir, images, name="vm2", vsock_cid=4)
    cloned = driver.restore(clone, snap)
    clone_info = driver.info(clone)
    assert clone_info.state is RuntimeState.RUNNING and clone_info.pid == cloned.pid != launched.pid
    assert clone_info.vcpus == 2  # the snapshot's config, not the spec's
    config = clone_info.raw["config"]
    assert config["serial"]["socket"] == str(clone.runtime_dir / "serial.sock")  # type: ignore[index]
    assert config["vsock"]["socket"] == str(clone.runtime_dir / "agent.sock")  # type: ignore[index]
    assert config["disks"][0]["path"] == str(clone.runtime_dir / "overlay.qcow2")  # type: ignore[index]
    assert agent_ping(clone.runtime_dir / "agent.sock")["protocol"] == 2
    with pytest.raises(VmmStateError):
        driver.restore(clone, snap)  # a VMM already runs there

    # Graceful shutdown: power button, the guest powers off, the VMM exits.
    started = time.monotonic()
    driver.shutdown(spec, graceful_timeout=10)
    assert time.monotonic() - started < 5  # the guest powered off; no waiting for the timeout
    assert driver.info(spec).state is RuntimeState.GONE
    assert pid_gone(launched.pid)
    assert not any((rt / name).exists() for name in ("api.sock", "serial.sock", "agent.sock", "vmm.pid"))
    driver.shutdown(spec)  # idempotent

    # The event monitor saw the whole story.
    events = list(EventMonitorReader(rt / "events.json"))
    names = [(e["source"], e["event"]) for e in events]
    for expected in [("vmm", "starting"), ("vm", "booted"), ("vm", "paused"), ("vm", "resumed"),
                     ("vm", "snapshotted"), ("vm", "shutdown"), ("vmm", "shutdown")]:  # fmt: skip
        assert expected in names
    states = [s for s in map(event_to_state, events) if s is not None]
    assert states[-1] is RuntimeState.GONE

    driver.cleanup(spec)
    driver.cleanup(clone)
    assert pid_gone(cloned.pid)
    assert not spec.runtime_dir.exists() and not clone.runtime_dir.exists()
    driver.cleanup(spec)  # idempotent


def test_shutdown_falls_back_to_vmm_shutdown_when_the_guest_ignores_acpi(
    driver: CloudHypervisorDriver, spec: VmSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_IGNORE_POWER_BUTTON", "1")
    driver.prepare(spec)
    pid = driver.launch(spec).pid
    started = time.monotonic()
    driver.shutdown(spec, graceful_timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 8
    assert pid_gone(pid) and driver.info(spec).state is RuntimeState.GONE
    assert "vmm.shutdown" in (spec.runtime_dir / "vmm.log").read_text()


def test_forced_shutdown_kills_at_once(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    pid = driver.launch(spec).pid
    driver.shutdown(spec, force=True)
    assert pid_gone(pid)
    assert not (spec.runtime_dir / "api.sock").exists()


def test_launch_again_after_the_vmm_was_killed(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    pid = driver.launch(spec).pid
    os.killpg(pid, signal.SIGKILL)  # leaves stale api/serial/agent sockets behind
    deadline = time.monotonic() + 5
    while driver.info(spec).state is not RuntimeState.GONE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (spec.runtime_dir / "serial.sock").exists()
    relaunched = driver.launch(spec)
    assert relaunched.pid != pid and driver.info(spec).state is RuntimeState.RUNNING
    driver.cleanup(spec)


def test_a_failed_create_is_deleted_before_the_retry(fake: FakeVmm, spec: VmSpec) -> None:
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN))
    fake.api.vm_create(vm_config(spec) | {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}})  # leftover
    driver._create_vm(fake.api, vm_config(spec), timeout=5)
    assert fake.api.vm_info()["config"]["cpus"]["max_vcpus"] == 2
    events = [e["event"] for e in EventMonitorReader(fake.events)]
    assert "deleted" in events


def test_launch_reports_the_vmm_log_when_boot_fails(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    spec.kernel.unlink()
    with pytest.raises(VmmError) as caught:
        driver.launch(spec, timeout=10)
    assert "kernel" in caught.value.message
    assert "log" in caught.value.details  # type: ignore[operator]
    driver.cleanup(spec)


def test_info_is_gone_without_a_vmm(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    assert driver.info(spec).state is RuntimeState.GONE
    spec.runtime_dir.mkdir(parents=True)
    (spec.runtime_dir / "vmm.pid").write_text(f"{os.getpid()}\n")  # alive, but not a VMM
    assert driver.info(spec).state is RuntimeState.GONE
    with pytest.raises(VmmNotRunning):
        driver.pause(spec)


def test_build_vm_config_matches_the_spec(images: tuple[Path, Path], short_dir: Path) -> None:
    spec = make_spec(short_dir, images, tap="tap0", mac="52:54:00:00:00:01", initramfs=images[0])
    config = build_vm_config(spec)
    assert config["payload"] == {"kernel": str(spec.kernel), "cmdline": spec.cmdline, "initramfs": str(spec.kernel)}
    assert config["cpus"] == {"boot_vcpus": 1, "max_vcpus": 2}
    assert config["memory"] == {"size": 256 * MIB, "hotplug_size": 256 * MIB}
    assert config["serial"] == {"mode": "Socket", "socket": str(spec.runtime_dir / "serial.sock")}
    assert config["console"] == {"mode": "Off"}
    assert config["vsock"] == {"cid": 3, "socket": str(spec.runtime_dir / "agent.sock")}
    assert config["net"] == [{"id": "net0", "tap": "tap0", "mac": "52:54:00:00:00:01"}]
    assert "net" not in build_vm_config(make_spec(short_dir, images))
    # A tunnel host's smaller MTU reaches every NIC (NetConfig.mtu); 1500 is left to the default.
    extra = (NicDevice("tap1", "52:54:00:00:00:02", "net1"),)
    tunnel = build_vm_config(make_spec(short_dir, images, tap="tap0", extra_nics=extra, nic_mtu=1450))
    assert [net["mtu"] for net in tunnel["net"]] == [1450, 1450]
    with pytest.raises(ValueError, match="MTU"):
        make_spec(short_dir, images, nic_mtu=1000)


# ------------------------------------------------------------------------------------------
# event monitor
# ------------------------------------------------------------------------------------------


def ch_event(event: str, source: str = "vm", secs: int = 1, properties: object = None) -> bytes:
    record = {"timestamp": {"secs": secs, "nanos": 500_000_000}, "source": source, "event": event,
              "properties": properties}  # fmt: skip
    return (json.dumps(record, indent=2) + "\n\n").encode()


def test_event_parser_handles_partial_writes_byte_by_byte() -> None:
    stream = ch_event("booting") + ch_event("booted", properties={"id": "x"}) + ch_event("shutdown", "vmm")
    parser = EventStreamParser()
    events = []
    for i in range(len(stream)):
        events += parser.feed(stream[i : i + 1])
    assert [(e["source"], e["event"]) for e in events] == [("vm", "booting"), ("vm", "booted"), ("vmm", "shutdown")]
    assert events[0]["timestamp"] == 1.5 and events[1]["properties"] == {"id": "x"}
    assert parser.buffered == 0


def test_event_parser_bounds_its_buffer_and_resyncs() -> None:
    parser = EventStreamParser(max_buffer=256)
    huge = ch_event("resized", properties={"blob": "y" * 5000})
    events = []
    for i in range(0, len(huge), 100):
        events += parser.feed(huge[i : i + 100])
        assert parser.buffered <= 256
    events += parser.feed(ch_event("paused"))
    assert [e["event"] for e in events] == ["paused"]
    assert parser.dropped_bytes > 5000
    assert parser.feed(b"{not json}\n\n" + ch_event("resumed"))[0]["event"] == "resumed"
    assert parser.bad_records == 1


def test_event_reader_follows_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    reader = EventMonitorReader(path, max_buffer=1024)
    assert reader.read() == []  # not created yet
    first, second = ch_event("booting"), ch_event("booted")
    path.write_bytes(first + second[:10])
    assert [e["event"] for e in reader.read()] == ["booting"]
    with path.open("ab") as fh:
        fh.write(second[10:])
    assert [e["event"] for e in reader.read()] == ["booted"]
    assert reader.read() == []
    offset = reader.offset
    path.write_bytes(ch_event("starting", "vmm"))  # VMM restarted: file truncated
    assert reader.offset == offset and [e["event"] for e in reader.read()] == ["starting"]


def test_event_to_state() -> None:
    def ev(source: str, event: str) -> RuntimeState | None:
        return event_to_state({"timestamp": 0.0, "source": source, "event": event, "properties": None})

    assert ev("vm", "booted") is RuntimeState.RUNNING
    assert ev("vm", "paused") is RuntimeState.PAUSED
    assert ev("vm", "resumed") is RuntimeState.RUNNING
    assert ev("vm", "shutdown") is RuntimeState.SHUTDOWN
    assert ev("vmm", "shutdown") is RuntimeState.GONE
    assert ev("vm", "booting") is None and ev("guest", "panic") is None


# ------------------------------------------------------------------------------------------
# behaviour: guest power-off, panic and reboot (a); resize limits (b); stop (c); state errors
# (d); clone identity (e); the contract (capabilities, version, snapshot/restore)
# ------------------------------------------------------------------------------------------


def serial_type(spec: VmSpec, line: str) -> None:
    """Type a line into the fake guest's serial console (its shell obeys poweroff/reboot/panic)."""
    with socket.socket(socket.AF_UNIX) as serial:
        serial.settimeout(5)
        serial.connect(str(spec.runtime_dir / "serial.sock"))
        serial.recv(4096)  # banner
        serial.sendall(line.encode() + b"\n")
        serial.recv(4096)  # echo: the guest read the line


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def event_names(spec: VmSpec) -> list[tuple[str, str]]:
    return [(e["source"], e["event"]) for e in EventMonitorReader(spec.runtime_dir / "events.json")]


def test_a_guest_poweroff_leaves_the_vmm_up_with_the_vm_shut_down(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    pid = driver.launch(spec, timeout=20).pid
    assert b"--no-shutdown" in Path(f"/proc/{pid}/cmdline").read_bytes()
    serial_type(spec, "poweroff")
    wait_for(lambda: driver.info(spec).state is not RuntimeState.RUNNING)
    info = driver.info(spec)
    assert (info.state, info.pid, info.reason) == (RuntimeState.SHUTDOWN, pid, "guest powered off")
    # The VMM is still there: the VM boots again in it, and the reason is gone.
    assert driver.launch(spec, timeout=20).pid == pid
    info = driver.info(spec)
    assert (info.state, info.reason) == (RuntimeState.RUNNING, "")
    serial_type(spec, "poweroff")
    wait_for(lambda: driver.info(spec).state is RuntimeState.SHUTDOWN)
    started = time.monotonic()
    driver.shutdown(spec, graceful_timeout=10)
    assert time.monotonic() - started < 5 and pid_gone(pid)
    assert driver.info(spec).state is RuntimeState.GONE


def test_a_guest_panic_is_reported_with_what_the_event_says(
    driver: CloudHypervisorDriver, short_dir: Path, images: tuple[Path, Path]
) -> None:
    hung = make_spec(short_dir, images, "hung", cmdline="console=ttyS0")
    driver.prepare(hung)
    driver.launch(hung, timeout=20)
    serial_type(hung, "panic")
    wait_for(lambda: ("guest", "panic") in event_names(hung))
    info = driver.info(hung)
    assert (info.state, info.reason) == (RuntimeState.RUNNING, "guest panic (panic)")  # hung, still "running"
    serial_type(hung, "poweroff")
    wait_for(lambda: driver.info(hung).state is RuntimeState.SHUTDOWN)
    assert driver.info(hung).reason == "guest panic (panic); guest powered off"
    driver.cleanup(hung)

    rebooting = make_spec(short_dir, images, "reboots", cmdline="console=ttyS0 panic=1")
    driver.prepare(rebooting)
    driver.launch(rebooting, timeout=20)
    serial_type(rebooting, "panic")
    wait_for(lambda: ("vm", "rebooted") in event_names(rebooting))
    info = driver.info(rebooting)
    assert (info.state, info.reason) == (RuntimeState.RUNNING, "guest panic (panic); the guest rebooted")
    driver.cleanup(rebooting)


def test_a_guest_reboot_keeps_the_vm_running_without_a_reason(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    before = agent_ping(spec.runtime_dir / "agent.sock")["boot_id"]
    serial_type(spec, "reboot")
    wait_for(lambda: ("vm", "rebooted") in event_names(spec))
    info = driver.info(spec)
    assert (info.state, info.reason) == (RuntimeState.RUNNING, "")
    assert agent_ping(spec.runtime_dir / "agent.sock")["boot_id"] != before
    driver.cleanup(spec)


def test_guest_history_folds_events_since_the_last_boot() -> None:
    def ev(source: str, event: str, props: dict[str, str] | None = None) -> Any:
        return {"timestamp": 0.0, "source": source, "event": event, "properties": props}

    panic = ev("guest", "panic", {"event": "crash_loaded"})
    assert guest_history([ev("vm", "booted"), panic]).reason == "guest panic (crash_loaded)"
    assert guest_history([panic, ev("vm", "booting"), ev("vm", "booted")]).reason == ""  # an earlier boot
    assert guest_history([ev("vm", "booted"), ev("vm", "shutdown")]).reason == "guest powered off"
    assert guest_history([ev("vm", "booted"), ev("vm", "rebooted")]).reason == ""
    assert (
        guest_history([ev("guest", "panic"), ev("vm", "rebooted")]).reason == "guest panic (panic); the guest rebooted"
    )


def test_recent_events_are_read_from_a_bounded_window(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    old = b"".join(ch_event("resized", properties={"n": str(i)}) for i in range(2000))
    path.write_bytes(ch_event("panic", "guest") + old + ch_event("shutdown"))
    assert path.stat().st_size > 4 * 4096
    events = read_recent_events(path, max_bytes=4096)
    assert events[-1]["event"] == "shutdown" and all(e["event"] != "panic" for e in events)
    assert len(events) < 40  # only the window was parsed; the record cut by it was skipped
    assert read_recent_events(tmp_path / "missing.json") == []


def test_resize_is_validated_against_what_the_running_vmm_allows(
    driver: CloudHypervisorDriver, short_dir: Path, images: tuple[Path, Path]
) -> None:
    spec = make_spec(short_dir, images, "rs", memory_mib=256, max_memory_mib=2048, max_vcpus=2)
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    # The database may believe anything: the limits come from vm.info.
    optimistic = dataclasses.replace(spec, max_vcpus=8, max_memory_mib=8192)
    with pytest.raises(VmmInvalidRequest, match=r"outside 1\.\.2"):
        driver.resize(optimistic, vcpus=3, memory_mib=None)
    with pytest.raises(VmmInvalidRequest, match="above the 2048 MiB"):
        driver.resize(optimistic, vcpus=None, memory_mib=4096)
    with pytest.raises(VmmInvalidRequest, match="steps of 128 MiB"):
        driver.resize(spec, vcpus=None, memory_mib=300)
    assert driver.info(spec).memory_mib == 256  # nothing changed
    for step in range(1, 9):  # eight hot-adds are allowed...
        driver.resize(spec, vcpus=None, memory_mib=256 + 128 * step)
    assert driver.info(spec).memory_mib == 1280
    with pytest.raises(VmmInvalidRequest, match="already grown 8 times"):  # ... a ninth is not
        driver.resize(spec, vcpus=None, memory_mib=1408)
    # A shrink would be silently ignored by ACPI hotplug: refused up front instead.
    with pytest.raises(VmmInvalidRequest, match="cannot shrink"):
        driver.resize(spec, vcpus=None, memory_mib=512)
    driver.resize(spec, vcpus=2, memory_mib=1280)  # vCPUs only; same memory is no hot-add
    assert (driver.info(spec).vcpus, driver.info(spec).memory_mib) == (2, 1280)
    driver.cleanup(spec)


def test_the_fake_enforces_128_mib_steps_and_eight_hotplugs(fake: FakeVmm, short_dir: Path, images: Any) -> None:
    spec = make_spec(short_dir, images, "fk", memory_mib=256, max_memory_mib=4096)
    fake.api.vm_create(vm_config(spec))
    fake.api.vm_boot()
    with pytest.raises(VmmInvalidRequest, match="InvalidSize"):
        fake.api.vm_resize(desired_ram=320 * MIB)
    for step in range(1, 9):
        fake.api.vm_resize(desired_ram=(256 + 128 * step) * MIB)
    with pytest.raises(VmmInvalidRequest, match="NoSlotAvailable"):
        fake.api.vm_resize(desired_ram=(256 + 128 * 9) * MIB)
    fake.api.vm_resize(desired_ram=256 * MIB)  # a shrink: silently ignored, like the real one
    assert fake.api.vm_info()["memory_actual_size"] == 1280 * MIB


def test_stopping_a_paused_vm_resumes_it_and_powers_it_off_without_waiting(
    driver: CloudHypervisorDriver, spec: VmSpec
) -> None:
    driver.prepare(spec)
    pid = driver.launch(spec, timeout=20).pid
    driver.pause(spec)
    started = time.monotonic()
    driver.shutdown(spec, graceful_timeout=15)
    assert time.monotonic() - started < 5  # not the graceful timeout
    assert pid_gone(pid)
    names = event_names(spec)
    assert names.index(("vm", "resumed")) < names.index(("vm", "power-button")) < names.index(("vm", "shutdown"))


def test_stopping_a_created_vm_presses_no_power_button(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    pid = driver._spawn(spec)
    driver._wait_for_api(spec, pid, 10)
    with ChApiClient(spec.runtime_dir / "api.sock") as api:
        api.vm_create(build_vm_config(spec))
    assert driver.info(spec).state is RuntimeState.CREATED
    started = time.monotonic()
    driver.shutdown(spec, graceful_timeout=15)
    assert time.monotonic() - started < 5 and pid_gone(pid)
    assert "vm.power-button" not in (spec.runtime_dir / "vmm.log").read_text()


def test_the_driver_reports_wrong_state_calls_as_state_errors(driver: CloudHypervisorDriver, spec: VmSpec) -> None:
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    driver.pause(spec)
    with pytest.raises(VmmStateError, match=r"InvalidStateTransition\(Paused, Paused\)"):
        driver.pause(spec)
    with pytest.raises(VmmStateError):
        driver.resize(spec, vcpus=2, memory_mib=None)  # the fake refuses resize while paused
    driver.resume(spec)
    with pytest.raises(VmmStateError, match="InvalidStateTransition"):
        driver.resume(spec)
    driver.cleanup(spec)


def test_a_restored_clone_gets_its_own_mac_tap_sockets_and_device_paths(
    driver: CloudHypervisorDriver, short_dir: Path, images: tuple[Path, Path]
) -> None:
    tag = short_dir.name[-6:]
    orig = make_spec(short_dir, images, "orig", tap=f"ta{tag}", mac="52:54:00:00:00:0a")
    driver.prepare(orig)
    driver.launch(orig, timeout=20)
    data = orig.runtime_dir / "data1.raw"
    data.write_bytes(b"hot-added disk contents")
    with ChApiClient(orig.runtime_dir / "api.sock") as api:
        api.vm_add_disk({"path": str(data), "id": "data1"})
        api.vm_add_net({"id": "net9", "tap": f"tb{tag}", "mac": "52:54:00:00:00:0b"})
    snap = short_dir / "snap"
    meta = driver.snapshot(orig, snap)
    assert meta.extra["runtime_dir"] == str(orig.runtime_dir.resolve())

    # A hot-added NIC needs a TAP of the clone's own.
    lacking = make_spec(short_dir, images, "lacking", tap=f"tc{tag}", mac="52:54:00:00:00:0c", vsock_cid=4)
    with pytest.raises(VmmInvalidRequest, match="net9"):
        driver.restore(lacking, snap)
    # A clone that kept the original's TAP fails like the real binary (the TAP is busy).
    same_tap = make_spec(short_dir, images, "same", tap=f"ta{tag}", mac="52:54:00:00:00:0d", extra={"tap_net9": "x"})
    with pytest.raises(VmmError, match="busy"):
        driver.restore(same_tap, snap, timeout=20)

    clone = make_spec(
        short_dir, images, "clone", tap=f"tc{tag}", mac="52:54:00:00:00:0c", vsock_cid=4, extra={"tap_net9": f"td{tag}"}
    )
    driver.restore(clone, snap, timeout=20)
    config = driver.info(clone).raw["config"]
    nets = {n["id"]: n for n in config["net"]}  # type: ignore[index]
    assert (nets["net0"]["tap"], nets["net0"]["mac"]) == (f"tc{tag}", "52:54:00:00:00:0c")
    assert nets["net9"]["tap"] == f"td{tag}" and nets["net9"]["mac"] not in ("52:54:00:00:00:0b", "52:54:00:00:00:0c")
    disks = {d["id"]: d["path"] for d in config["disks"]}  # type: ignore[index]
    assert disks["data1"] == str(clone.runtime_dir.resolve() / "data1.raw")
    assert (clone.runtime_dir / "data1.raw").read_bytes() == b"hot-added disk contents"
    assert config["vsock"] == {"cid": 4, "socket": str(clone.runtime_dir / "agent.sock")}  # type: ignore[index]
    assert agent_ping(clone.runtime_dir / "agent.sock")["protocol"] == 2
    assert driver.info(orig).state is RuntimeState.RUNNING  # the original runs beside it
    for vm in (clone, orig, lacking, same_tap):
        driver.cleanup(vm)


def test_capabilities_and_version(driver: CloudHypervisorDriver) -> None:
    caps = driver.capabilities()
    assert caps == DriverCapabilities(
        live_resize=True,
        memory_hotplug_step_mib=128,
        nic_hotplug=True,
        memory_snapshot=True,
        shared_disk_layers=False,
        agent_transport=AgentTransport.HYBRID_VSOCK,
        live_migration=True,
        live_migration_disk="shared",  # CH sends RAM and devices only
    )
    assert driver.version() == "v54.0-fake"
    assert CloudHypervisorDriver(binary="/nonexistent/cloud-hypervisor").version() == ""


def test_disk_only_snapshots_of_a_running_and_a_stopped_vm(
    driver: CloudHypervisorDriver, spec: VmSpec, short_dir: Path, images: tuple[Path, Path]
) -> None:
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    live = driver.snapshot(spec, short_dir / "live", include_memory=False)
    assert (live.include_memory, live.state_file, live.disk_layer) == (False, None, "overlay.qcow2")
    assert {p.name for p in (short_dir / "live").iterdir()} == {"overlay.qcow2", "snapshot.json"}
    assert driver.info(spec).state is RuntimeState.RUNNING
    assert ("vm", "paused") in event_names(spec) and ("vm", "snapshotted") not in event_names(spec)

    driver.shutdown(spec, graceful_timeout=10)
    with pytest.raises(VmmStateError, match="needs a running VM"):
        driver.snapshot(spec, short_dir / "cold-mem", include_memory=True)
    cold = driver.snapshot(spec, short_dir / "cold", include_memory=False)
    assert cold.vmm_version == "v54.0-fake" and cold.pause_ms == 0

    # Restoring a disk-only snapshot boots the clone on the copy, with its own config.
    clone = make_spec(short_dir, images, "dclone", vsock_cid=5, vcpus=2)
    result = driver.restore(clone, short_dir / "live", timeout=20)
    info = driver.info(clone)
    assert info.state is RuntimeState.RUNNING and info.pid == result.pid and info.vcpus == 2
    assert ("vm", "restored") not in event_names(clone)
    driver.cleanup(clone)


def test_restore_refuses_a_snapshot_of_another_version_or_driver(
    driver: CloudHypervisorDriver, spec: VmSpec, short_dir: Path
) -> None:
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    snap = short_dir / "snap"
    meta = driver.snapshot(spec, snap)
    driver.cleanup(spec)
    dataclasses.replace(meta, vmm_version="v41.0").write(snap)
    with pytest.raises(VmmError, match="v41.0"):
        driver.restore(spec, snap)
    dataclasses.replace(meta, driver="qemu").write(snap)
    with pytest.raises(VmmError, match="taken by qemu"):
        driver.restore(spec, snap)
    assert driver.info(spec).state is RuntimeState.GONE


# ------------------------------------------------------------------------------------------
# the real binary
# ------------------------------------------------------------------------------------------


def test_availability_needs_the_binary() -> None:
    assert cloud_hypervisor_available("/nonexistent/cloud-hypervisor") is False


@pytest.mark.skipif(
    not cloud_hypervisor_available(),
    reason="real cloud-hypervisor not usable here: needs the binary on PATH and hardware KVM "
    "(/dev/kvm, vmx/svm in /proc/cpuinfo, not kvm_pvm)",
)
def test_real_cloud_hypervisor(short_dir: Path, images: tuple[Path, Path]) -> None:
    """Set CH_TEST_KERNEL (PVH vmlinux) and CH_TEST_IMAGE (raw disk) for a full boot."""
    driver = CloudHypervisorDriver()
    kernel = Path(os.environ.get("CH_TEST_KERNEL", images[0]))
    base = Path(os.environ.get("CH_TEST_IMAGE", images[1]))
    spec = make_spec(short_dir, (kernel, base), cmdline="console=ttyS0 root=/dev/vda rw")
    driver.prepare(spec)
    try:
        if "CH_TEST_KERNEL" not in os.environ:
            with pytest.raises(VmmError):  # a fake kernel cannot boot; errors must map cleanly
                driver.launch(spec, timeout=20)
            return
        driver.launch(spec, timeout=30)
        assert driver.info(spec).state is RuntimeState.RUNNING
        driver.pause(spec)
        driver.resume(spec)
        driver.snapshot(spec, short_dir / "snap")
        assert driver.counters(spec)
        driver.shutdown(spec, graceful_timeout=10)
        assert driver.info(spec).state is RuntimeState.GONE
    finally:
        driver.cleanup(spec)


def test_nics_boot_and_hot_plug_against_the_fake(
    driver: CloudHypervisorDriver, short_dir: Path, images: tuple[Path, Path]
) -> None:
    spec = make_spec(
        short_dir,
        images,
        name="nics",
        tap="msbt0",
        mac="02:00:00:00:00:01",
        extra_nics=(NicDevice("msbt1", "02:00:00:00:00:02", "net1"),),
    )
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    try:
        with ChApiClient(ChRuntimePaths(spec.runtime_dir).api_socket, timeout=5.0) as api:
            nets = lambda: {n["id"]: n["tap"] for n in api.vm_info()["config"]["net"]}  # noqa: E731
            assert nets() == {"net0": "msbt0", "net1": "msbt1"}
            driver.nic_add(spec, NicDevice("msbt2", "02:00:00:00:00:03", "net2"))
            assert nets() == {"net0": "msbt0", "net1": "msbt1", "net2": "msbt2"}
            driver.nic_remove(spec, "net1")
            assert nets() == {"net0": "msbt0", "net2": "msbt2"}
            with pytest.raises(VmmError):
                driver.nic_remove(spec, "net1")  # gone: the VMM says so
    finally:
        driver.shutdown(spec, force=True)
