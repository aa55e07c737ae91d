"""Real boots under QEMU: lifecycle, console log, concurrency, crash detection."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vms.vmm.agent_client import AgentConnection, AgentTimeout, AgentTransport, agent_ping, wait_for_agent
from vms.vmm.base import RuntimeState, VmmNotRunning, VmmUnsupported, VmSpec
from vms.vmm.cgroups import CPU_PERIOD_US, cgroup_layout, cgroup_of, vmm_cgroup_dirs
from vms.vmm.confinement import VmmConfinement
from vms.vmm.process import read_pid
from vms.vmm.qemu import QemuDriver

from .agent_ops import agent_run
from .conftest import TEST_CGROUP_PARENT
from .test_process_detach import _children, _wait_dead, _zombie_children

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SERIAL = AgentTransport.VIRTIO_SERIAL


def _serial_exchange(path: Path, command: str, expect: bytes, timeout: float = 20.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(0.5)
        sock.sendall(command.encode() + b"\n")
        out = b""
        deadline = time.monotonic() + timeout
        while expect not in out and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            out += chunk
        return out


@pytest.fixture(scope="module")
def booted(driver: QemuDriver, make_spec: Callable[..., VmSpec]) -> Iterator[tuple[VmSpec, dict[str, object]]]:
    """One VM shared by the lifecycle tests of this module (boots are slow under TCG)."""
    spec = make_spec("life")
    started = time.monotonic()
    driver.launch(spec)
    ping = wait_for_agent(spec, SERIAL, timeout=120)
    print(f"boot-to-agent-ping: {time.monotonic() - started:.2f}s")
    yield spec, ping
    driver.cleanup(spec)


def test_it_boots_and_the_agent_answers_ping(booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver) -> None:
    spec, ping = booted
    assert ping["agent_version"]
    assert ping["hostname"] == "sandbox"
    assert len(str(ping["boot_id"])) == 36
    info = driver.info(spec)
    assert info.state == RuntimeState.RUNNING
    assert info.pid == read_pid(spec.runtime_dir)
    assert info.vcpus == 1 and info.memory_mib == 256


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_the_vmm_runs_confined(
    booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver, confinement: VmmConfinement
) -> None:
    """Unprivileged user, seccomp filter, no_new_privs, no capabilities, its own cgroup with
    the VM's limits; and the VM still works (agent ping)."""
    spec, _ = booted
    pid = read_pid(spec.runtime_dir)
    assert pid is not None
    user = confinement.vmm_user()
    assert user is not None
    status = _status(pid)
    assert status["Uid"].split() == [str(user.uid)] * 4
    assert status["Gid"].split() == [str(user.gid)] * 4
    assert "0" not in status["Groups"].split()
    assert status["Seccomp"] == "2"  # filter mode: QEMU's -sandbox
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny" in cmdline
    # Its cgroup, with the limits the VM's size gives it.
    name = confinement.cgroup_name(spec)
    limits = confinement.limits_for(spec)
    assert limits.memory_bytes == (256 + confinement.memory_overhead_mib) << 20
    group = cgroup_of(pid)
    layout = cgroup_layout()
    if layout.v2 is not None:
        path = layout.v2 / TEST_CGROUP_PARENT / name
        assert group[""] == f"/{TEST_CGROUP_PARENT}/{name}"
        assert (path / "memory.max").read_text().strip() == str(limits.memory_bytes)
        assert (path / "cpu.max").read_text().split() == [str(CPU_PERIOD_US), str(CPU_PERIOD_US)]
        assert (path / "pids.max").read_text().strip() == str(limits.pids_max)
    else:
        for controller in ("cpu", "memory", "pids"):
            assert group[controller] == f"/{TEST_CGROUP_PARENT}/{name}", group
        v1 = {c: layout.v1[c] / TEST_CGROUP_PARENT / name for c in ("cpu", "memory", "pids")}
        assert (v1["memory"] / "memory.limit_in_bytes").read_text().strip() == str(limits.memory_bytes)
        assert (v1["cpu"] / "cpu.cfs_quota_us").read_text().strip() == str(CPU_PERIOD_US)  # 1 vCPU
        assert (v1["cpu"] / "cpu.cfs_period_us").read_text().strip() == str(CPU_PERIOD_US)
        assert (v1["pids"] / "pids.max").read_text().strip() == str(limits.pids_max)
        assert 0 < int((v1["pids"] / "pids.current").read_text()) < limits.pids_max
        usage = int((v1["memory"] / "memory.usage_in_bytes").read_text())
        assert 0 < usage <= limits.memory_bytes
    # Files: the VMM writes its overlay and serial log; our files stay ours.
    assert (spec.runtime_dir / "overlay.qcow2").stat().st_uid == user.uid
    assert (spec.runtime_dir / "serial.log").stat().st_uid == user.uid
    assert (spec.runtime_dir / "spec.json").stat().st_uid == 0
    assert spec.runtime_dir.stat().st_mode & 0o7777 == 0o1770
    assert agent_ping(spec, SERIAL, timeout=10)["agent_version"]


def test_it_logs_serial_output_written_while_nobody_is_connected(booted: tuple[VmSpec, dict[str, object]]) -> None:
    spec, _ = booted
    # Nobody connected to serial.sock during boot; init's message must still be on disk.
    log = (spec.runtime_dir / "serial.log").read_bytes()
    assert b"sandbox: init done" in log


def test_it_gives_a_root_shell_on_the_serial_socket(booted: tuple[VmSpec, dict[str, object]]) -> None:
    spec, _ = booted
    out = _serial_exchange(spec.runtime_dir / "serial.sock", "echo marker-$((40+2)) $(id -u)", b"marker-42 0")
    assert b"marker-42 0" in out
    # QEMU appends to the log right after writing to the socket: allow it a moment.
    deadline = time.monotonic() + 5
    while b"marker-42 0" not in (spec.runtime_dir / "serial.log").read_bytes():
        assert time.monotonic() < deadline, "console output missing from serial.log"
        time.sleep(0.05)


def test_it_reports_block_counters(booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver) -> None:
    spec, _ = booted
    counters = driver.counters(spec)
    (block,) = [v for k, v in counters.items() if k.startswith("block.")]
    assert block["read_bytes"] > 0 and block["read_ops"] > 0


def test_it_refuses_resize(booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver) -> None:
    spec, _ = booted
    with pytest.raises(VmmUnsupported):
        driver.resize(spec, vcpus=2, memory_mib=None)


def test_launch_is_idempotent(booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver) -> None:
    spec, _ = booted
    assert driver.launch(spec).pid == read_pid(spec.runtime_dir)


def test_it_pauses_and_resumes(booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver) -> None:
    spec, _ = booted
    driver.pause(spec)
    assert driver.info(spec).state == RuntimeState.PAUSED
    with pytest.raises(AgentTimeout):
        agent_ping(spec, SERIAL, timeout=1.5)
    driver.resume(spec)
    assert driver.info(spec).state == RuntimeState.RUNNING
    assert wait_for_agent(spec, SERIAL, timeout=30)["agent_version"]


def test_it_reboots_with_a_new_boot_id(booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver) -> None:
    spec, first = booted
    pid = read_pid(spec.runtime_dir)
    driver.reboot(spec)
    deadline = time.monotonic() + 120
    while True:
        ping = wait_for_agent(spec, SERIAL, timeout=max(1.0, deadline - time.monotonic()))
        if ping["boot_id"] != first["boot_id"]:
            break
        assert time.monotonic() < deadline, "guest did not reboot"
        time.sleep(0.5)
    assert read_pid(spec.runtime_dir) == pid  # same QEMU process


def test_the_guest_keeps_a_high_resolution_clocksource(
    booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver
) -> None:
    """Without it (the jiffies fallback the clocksource watchdog picks when TCG's jiffies lag on a
    busy host) the guest ticks at 250 Hz for ever and every idle VM costs the host CPU."""
    spec, _ = booted
    with AgentConnection.open(driver.agent_socket_path(spec), SERIAL, timeout=30) as conn:
        conn.sync_session(time.monotonic() + 30)
        result, out = agent_run(conn, argv=["cat", "/sys/devices/system/clocksource/clocksource0/current_clocksource"])
    assert result["exit_code"] == 0
    assert out.decode().strip() not in ("jiffies", "refined-jiffies"), out


def test_graceful_shutdown_then_cleanup_leaves_nothing(
    booted: tuple[VmSpec, dict[str, object]], driver: QemuDriver
) -> None:
    def confinement_name(spec: VmSpec) -> str:
        return driver.confinement.cgroup_name(spec)

    spec, _ = booted
    pid = read_pid(spec.runtime_dir)
    assert pid is not None
    started = time.monotonic()
    driver.shutdown(spec, graceful_timeout=60)
    assert time.monotonic() - started < 55, "guest ignored the ACPI power button; QEMU was killed"
    assert driver.info(spec).state == RuntimeState.GONE
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"reboot: Power down" in (spec.runtime_dir / "serial.log").read_bytes()
    # The VMM's cgroup goes with it.
    assert not any(path.exists() for path in vmm_cgroup_dirs(TEST_CGROUP_PARENT, confinement_name(spec)))
    with pytest.raises(VmmNotRunning):
        driver.pause(spec)
    driver.cleanup(spec)
    driver.cleanup(spec)  # idempotent
    assert not spec.runtime_dir.exists()


def test_kill_9_of_the_vmm_is_seen_as_gone(driver: QemuDriver, make_spec: Callable[..., VmSpec]) -> None:
    spec = make_spec("kill9")
    before = _children(os.getpid())
    result = driver.launch(spec)
    assert driver.info(spec).state in (RuntimeState.RUNNING, RuntimeState.CREATED)
    assert result.pid not in _children(os.getpid())  # detached: not a child of the launcher
    os.kill(result.pid, signal.SIGKILL)
    _wait_dead(result.pid)
    assert _zombie_children(os.getpid()) - before == set()  # no defunct qemu-system-x86 here
    deadline = time.monotonic() + 10
    while driver.info(spec).state != RuntimeState.GONE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    driver.shutdown(spec, force=True)  # no-op on a dead VMM
    driver.cleanup(spec)
    assert not spec.runtime_dir.exists()


def test_force_shutdown_kills_at_once(driver: QemuDriver, make_spec: Callable[..., VmSpec]) -> None:
    spec = make_spec("force")
    driver.launch(spec)
    started = time.monotonic()
    driver.shutdown(spec, force=True)
    assert time.monotonic() - started < 5
    assert driver.info(spec).state == RuntimeState.GONE
    driver.cleanup(spec)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_four_concurrent_boots_all_reach_agent_ping(driver: QemuDriver, make_spec: Callable[..., VmSpec]) -> None:
    specs = [make_spec(f"conc{i}") for i in range(4)]
    started = time.monotonic()
    for spec in specs:
        driver.launch(spec)
    results: dict[str, object] = {}

    def wait(spec: VmSpec) -> None:
        try:
            results[spec.vm_id] = wait_for_agent(spec, SERIAL, timeout=180)
        except Exception as exc:  # noqa: BLE001 - reported below with the serial log
            results[spec.vm_id] = exc

    threads = [threading.Thread(target=wait, args=(spec,)) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    rss = [_rss_kib(driver.info(spec).pid or 0) for spec in specs]
    print(f"4 concurrent boots to agent ping: {elapsed:.1f}s; QEMU RSS KiB: {rss}")
    failures = {
        k: (v, (s.runtime_dir / "serial.log").read_bytes()[-2000:])
        for s in specs
        for k, v in [(s.vm_id, results.get(s.vm_id))]
        if not isinstance(v, dict)
    }
    assert not failures
    boot_ids = {str(r["boot_id"]) for r in results.values() if isinstance(r, dict)}
    assert len(boot_ids) == 4
    for spec in specs:
        driver.cleanup(spec)
        assert not spec.runtime_dir.exists()
