"""An in-process fake VMM behind the ``Driver`` protocol, for fast tests of everything above
the driver (lifecycle, operations, reconcile, snapshot bookkeeping). No VMM, no Django.

State lives in a module-level registry keyed by VM id, so a test and the code under test
(which gets a new ``FakeDriver`` from ``vms.hypervisor.driver_for("fake")`` each time) see
the same VMs. The runtime directory gets what the real drivers leave there that callers read:
``spec.json``, ``overlay.qcow2`` and ``serial.log`` (the console the reconciler keeps).

Test hooks (module functions): ``fake_reset``, ``fake_fail`` (the next call(s) of a method
raise), ``fake_during`` (run a callback in the middle of a method, e.g. while a snapshot
holds the VM paused), ``fake_vmm_die`` (the VMM process is gone), ``fake_guest_power_off``
(the guest powered off, the VMM stays up: ``info`` says ``SHUTDOWN`` with a reason),
``fake_console_write``, ``fake_capabilities_set``, ``fake_vm``, ``fake_calls``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .base import (
    MIGRATION_DISK_MIRROR,
    AgentTransport,
    Driver,
    DriverCapabilities,
    LaunchResult,
    MigrationResult,
    MigrationTarget,
    MigrationTls,
    NicDevice,
    RuntimeState,
    VmmError,
    VmmInvalidRequest,
    VmmNotRunning,
    VmmStateError,
    VmmUnsupported,
    VmRuntimeInfo,
    VmSpec,
)
from .snapshot import SnapshotMeta

NAME = "fake"
VERSION = "fake-vmm 1.0"
OVERLAY = "overlay.qcow2"
SERIAL_LOG = "serial.log"

DEFAULT_CAPABILITIES = DriverCapabilities(
    live_resize=True,
    memory_hotplug_step_mib=128,
    nic_hotplug=False,
    memory_snapshot=True,
    shared_disk_layers=False,
    agent_transport=AgentTransport.VIRTIO_SERIAL,
    disk_only_snapshot=True,
    live_migration=True,
    live_migration_disk=MIGRATION_DISK_MIRROR,
)


@dataclass
class FakeVm:
    """What the fake VMM of one VM is doing."""

    vm_id: str
    runtime_dir: Path
    state: RuntimeState = RuntimeState.GONE
    pid: int | None = None
    vcpus: int = 1
    memory_mib: int = 256
    reason: str = ""
    boots: int = 0
    restored_from: str = ""
    nics: dict[str, str] = field(default_factory=dict)  # device id -> TAP, as booted or hot-plugged
    migrated_to: str = ""  # "host:port" this VM was sent to (its VMM stays, stopped)
    migrated_from: bool = False  # arrived by live migration


@dataclass
class _Registry:
    vms: dict[str, FakeVm] = field(default_factory=dict)
    # Receiving side of a live migration, by VM id: (the target's VM, its listen address,
    # whether the stream arrived). It replaces ``vms[vm_id]`` once finished.
    incoming: dict[str, tuple[FakeVm, MigrationTarget, bool]] = field(default_factory=dict)
    failures: dict[str, list[VmmError]] = field(default_factory=dict)
    during: dict[str, Callable[[str], None]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    capabilities: DriverCapabilities = DEFAULT_CAPABILITIES
    next_pid: int = 4_000_000  # above any real pid_max default: never a live process


_registry = _Registry()
_lock = threading.RLock()


# --- test hooks ----------------------------------------------------------------------------


def fake_reset() -> None:
    """Forget every fake VM, injected failure, callback and call record."""
    global _registry
    with _lock:
        _registry = _Registry()


def fake_fail(method: str, exc: VmmError | None = None, *, times: int = 1) -> None:
    """Make the next ``times`` calls of ``method`` (e.g. ``"launch"``) raise ``exc``."""
    error = exc or VmmError(f"injected {method} failure")
    with _lock:
        _registry.failures.setdefault(method, []).extend([error] * times)


def fake_during(method: str, callback: Callable[[str], None] | None) -> None:
    """Call ``callback(vm_id)`` in the middle of ``method`` (None removes it)."""
    with _lock:
        if callback is None:
            _registry.during.pop(method, None)
        else:
            _registry.during[method] = callback


def fake_vmm_die(vm_id: str, *, reason: str = "") -> None:
    """The VMM process of ``vm_id`` is gone (killed, crashed): ``info`` says ``GONE``."""
    with _lock:
        vm = _registry.vms.get(vm_id)
        if vm is not None:
            vm.state, vm.pid, vm.reason = RuntimeState.GONE, None, reason


def fake_guest_power_off(vm_id: str, *, reason: str = "guest powered off") -> None:
    """The guest powered itself off; the VMM stays up (``--no-shutdown``): ``SHUTDOWN``."""
    with _lock:
        vm = _registry.vms.get(vm_id)
        if vm is not None and vm.state != RuntimeState.GONE:
            vm.state, vm.reason = RuntimeState.SHUTDOWN, reason


def fake_console_write(vm_id: str, text: str) -> None:
    """Append ``text`` to the VM's ``serial.log`` as if the guest wrote it."""
    with _lock:
        vm = _registry.vms.get(vm_id)
    if vm is not None and vm.runtime_dir.is_dir():
        with open(vm.runtime_dir / SERIAL_LOG, "a") as fh:
            fh.write(text)


def fake_capabilities_set(**changes: object) -> DriverCapabilities:
    """Change what the fake driver says it can do (``DriverCapabilities`` field names)."""
    with _lock:
        _registry.capabilities = replace(_registry.capabilities, **changes)  # type: ignore[arg-type]
        return _registry.capabilities


def fake_vm(vm_id: str) -> FakeVm | None:
    with _lock:
        return _registry.vms.get(vm_id)


def fake_calls(vm_id: str | None = None) -> list[str]:
    """Driver methods called so far (for ``vm_id`` only, when given), oldest first."""
    with _lock:
        return [method for method, who in _registry.calls if vm_id is None or who == vm_id]


# --- the driver ------------------------------------------------------------------------------


class FakeDriver:
    """``Driver`` without a VMM: every method works on the registry above."""

    name = NAME

    def _enter(self, method: str, spec: VmSpec) -> None:
        with _lock:
            _registry.calls.append((method, spec.vm_id))
            queued = _registry.failures.get(method)
            error = queued.pop(0) if queued else None
            callback = _registry.during.get(method)
        if error is not None:
            raise error
        if callback is not None:
            callback(spec.vm_id)

    def _vm(self, spec: VmSpec) -> FakeVm:
        with _lock:
            vm = _registry.vms.get(spec.vm_id)
            if vm is None:
                vm = FakeVm(vm_id=spec.vm_id, runtime_dir=spec.runtime_dir)
                _registry.vms[spec.vm_id] = vm
            return vm

    def _running(self, spec: VmSpec) -> FakeVm:
        vm = self._vm(spec)
        if vm.state == RuntimeState.GONE:
            raise VmmNotRunning(f"no VMM runs for {spec.vm_id}")
        return vm

    def _start_process(self, vm: FakeVm, spec: VmSpec) -> LaunchResult:
        with _lock:
            _registry.next_pid += 1
            vm.pid = _registry.next_pid
        vm.state, vm.reason = RuntimeState.RUNNING, ""
        vm.vcpus, vm.memory_mib = spec.vcpus, spec.memory_mib
        vm.nics = {**({"net0": spec.tap} if spec.tap else {}), **{n.device_id: n.tap for n in spec.extra_nics}}
        vm.boots += 1
        fake_console_write(spec.vm_id, f"fake VMM: booting {spec.vm_id}\nLinux version 6.1.0-fake\nsandbox login:\n")
        return LaunchResult(pid=vm.pid, driver=NAME, acceleration="fake", vmm_version=VERSION)

    def prepare(self, spec: VmSpec) -> None:
        """Create the runtime directory, ``spec.json`` and an empty overlay. Idempotent."""
        self._enter("prepare", spec)
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        (spec.runtime_dir / "spec.json").write_text(spec.to_json())
        (spec.runtime_dir / OVERLAY).touch()
        self._vm(spec)

    def launch(self, spec: VmSpec, *, timeout: float = 30.0) -> LaunchResult:
        self._enter("launch", spec)
        vm = self._vm(spec)
        if vm.state != RuntimeState.GONE:
            raise VmmStateError("a VMM already runs for this VM")
        if not (spec.runtime_dir / OVERLAY).exists():
            raise VmmError("the VM has no disk overlay (prepare first)")
        return self._start_process(vm, spec)

    def info(self, spec: VmSpec, *, timeout: float = 5.0) -> VmRuntimeInfo:
        self._enter("info", spec)
        vm = self._vm(spec)
        if vm.state == RuntimeState.GONE:
            return VmRuntimeInfo(state=RuntimeState.GONE, pid=None, reason=vm.reason)
        return VmRuntimeInfo(state=vm.state, pid=vm.pid, vcpus=vm.vcpus, memory_mib=vm.memory_mib, reason=vm.reason)

    def pause(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        self._enter("pause", spec)
        vm = self._running(spec)
        if vm.state not in (RuntimeState.RUNNING, RuntimeState.PAUSED):
            raise VmmStateError(f"cannot pause a VM that is {vm.state.value}")
        vm.state = RuntimeState.PAUSED

    def resume(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        self._enter("resume", spec)
        vm = self._running(spec)
        if vm.state not in (RuntimeState.RUNNING, RuntimeState.PAUSED):
            raise VmmStateError(f"cannot resume a VM that is {vm.state.value}")
        vm.state = RuntimeState.RUNNING

    def reboot(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        self._enter("reboot", spec)
        vm = self._running(spec)
        if vm.state != RuntimeState.RUNNING:
            raise VmmStateError(f"cannot reboot a VM that is {vm.state.value}")
        vm.boots += 1

    def shutdown(self, spec: VmSpec, *, graceful_timeout: float = 30.0, force: bool = False) -> None:
        """Afterwards no VMM runs (idempotent)."""
        self._enter("shutdown", spec)
        vm = self._vm(spec)
        vm.state, vm.pid = RuntimeState.GONE, None

    def resize(self, spec: VmSpec, *, vcpus: int | None, memory_mib: int | None, timeout: float = 10.0) -> None:
        self._enter("resize", spec)
        caps = self.capabilities()
        if not caps.live_resize:
            raise VmmUnsupported("the fake VMM cannot hotplug; restart the VM with the new size")
        vm = self._running(spec)
        if memory_mib is not None and memory_mib != vm.memory_mib:
            step = caps.memory_hotplug_step_mib
            if step <= 0 or (memory_mib - vm.memory_mib) % step:
                raise VmmInvalidRequest(f"memory can only change in steps of {step} MiB")
            vm.memory_mib = memory_mib
        if vcpus is not None:
            vm.vcpus = vcpus

    def nic_add(self, spec: VmSpec, nic: NicDevice, *, timeout: float = 10.0) -> None:
        self._enter("nic_add", spec)
        if not self.capabilities().nic_hotplug:
            raise VmmUnsupported("the fake VMM cannot hot-plug NICs; restart the VM")
        vm = self._running(spec)
        if nic.device_id in vm.nics:
            raise VmmInvalidRequest(f"device {nic.device_id} exists")
        vm.nics[nic.device_id] = nic.tap

    def nic_remove(self, spec: VmSpec, device_id: str, *, timeout: float = 10.0) -> None:
        self._enter("nic_remove", spec)
        if not self.capabilities().nic_hotplug:
            raise VmmUnsupported("the fake VMM cannot hot-unplug NICs; restart the VM")
        vm = self._running(spec)
        if vm.nics.pop(device_id, None) is None:
            raise VmmInvalidRequest(f"no device {device_id}")

    def counters(self, spec: VmSpec, *, timeout: float = 5.0) -> dict[str, dict[str, int]]:
        self._enter("counters", spec)
        vm = self._running(spec)
        return {"block.disk0": {"read_bytes": 4096 * vm.boots, "write_bytes": 0, "read_ops": vm.boots}}

    def capabilities(self) -> DriverCapabilities:
        with _lock:
            return _registry.capabilities

    def version(self) -> str:
        return VERSION

    def snapshot(
        self, spec: VmSpec, dest_dir: Path, *, include_memory: bool = True, timeout: float = 300.0
    ) -> SnapshotMeta:
        """Pause (a running VM), write ``state.bin`` (``include_memory``) and a copy of the
        overlay as ``disk.qcow2`` into ``dest_dir``, resume; a stopped VM: disk only."""
        started = time.monotonic()
        vm = self._vm(spec)
        was = vm.state
        if include_memory and was not in (RuntimeState.RUNNING, RuntimeState.PAUSED):
            raise VmmStateError("a memory snapshot needs a running VM; take a disk-only snapshot instead")
        overlay = spec.runtime_dir / OVERLAY
        if not overlay.exists():
            raise VmmError("the VM has no disk overlay to snapshot", details={"path": str(overlay)})
        dest_dir.mkdir(parents=True, exist_ok=True)
        if was == RuntimeState.RUNNING:
            vm.state = RuntimeState.PAUSED
        try:
            self._enter("snapshot", spec)  # failures and callbacks happen while it is paused
            if include_memory:
                (dest_dir / "state.bin").write_text(json.dumps({"vm": spec.vm_id, "memory_mib": vm.memory_mib}))
            shutil.copyfile(overlay, dest_dir / "disk.qcow2")
        finally:
            if was == RuntimeState.RUNNING and vm.state == RuntimeState.PAUSED:
                vm.state = RuntimeState.RUNNING
        elapsed = int((time.monotonic() - started) * 1000)
        meta = SnapshotMeta(
            driver=NAME,
            vmm_version=VERSION,
            vm_id=spec.vm_id,
            include_memory=include_memory,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            disk_gib=spec.disk_gib,
            acceleration="fake",
            disk_layer="disk.qcow2",
            state_file="state.bin" if include_memory else None,
            pause_ms=elapsed if was == RuntimeState.RUNNING else 0,
            total_ms=elapsed,
            created_unix=time.time(),
        )
        meta.write(dest_dir)
        return meta

    def restore(self, spec: VmSpec, src_dir: Path, *, timeout: float = 120.0) -> LaunchResult:
        """Start ``spec`` from the snapshot in ``src_dir`` (its own runtime directory)."""
        self._enter("restore", spec)
        meta = SnapshotMeta.read(src_dir)
        if meta.driver != NAME:
            raise VmmError(f"this snapshot was taken by {meta.driver}, not {NAME}")
        vm = self._vm(spec)
        if vm.state != RuntimeState.GONE:
            raise VmmStateError("a VMM already runs for this VM; stop it before restoring")
        layer = src_dir / (meta.disk_layer or "disk.qcow2")
        if not layer.exists():
            raise VmmError("the snapshot's disk layer is missing", details={"path": str(layer)})
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        (spec.runtime_dir / "spec.json").write_text(spec.to_json())
        shutil.copyfile(layer, spec.runtime_dir / OVERLAY)
        vm.restored_from = str(src_dir)
        return self._start_process(vm, spec)

    def cleanup(self, spec: VmSpec) -> None:
        """Forget the VMM and remove the runtime directory. Idempotent. Only the VM whose
        runtime directory this is: after a migration the VM id lives on in another one."""
        self._enter("cleanup", spec)
        with _lock:
            vm = _registry.vms.get(spec.vm_id)
            if vm is not None and vm.runtime_dir == spec.runtime_dir:
                del _registry.vms[spec.vm_id]
        shutil.rmtree(spec.runtime_dir, ignore_errors=True)

    # --- live migration: the same order and rules as the real drivers -----------------------

    def migrate_receive_prepare(
        self,
        spec: VmSpec,
        *,
        listen_host: str,
        backing: Path | None = None,
        tls: MigrationTls | None = None,
        timeout: float = 60.0,
    ) -> MigrationTarget:
        """A receiving VMM for ``spec`` (its own runtime directory) "listening" on ``listen_host``."""
        self._enter("migrate_receive_prepare", spec)
        if not self.capabilities().live_migration:
            raise VmmUnsupported("the fake VMM cannot migrate a running VM")
        with _lock:
            if spec.vm_id in _registry.incoming:
                raise VmmStateError("a migration into this host is already prepared for this VM")
            _registry.next_pid += 1
            vm = FakeVm(vm_id=spec.vm_id, runtime_dir=spec.runtime_dir, pid=_registry.next_pid)
            vm.state = RuntimeState.CREATED
            target = MigrationTarget(
                driver=NAME, host=listen_host, port=49152 + _registry.next_pid % 1000, disk_port=10809,
                disk_export="root", disk_size=spec.disk_gib << 30, acceleration="fake", vmm_version=VERSION,
                tls=tls is not None,
            )  # fmt: skip
            _registry.incoming[spec.vm_id] = (vm, target, False)
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        (spec.runtime_dir / "spec.json").write_text(spec.to_json())
        (spec.runtime_dir / OVERLAY).touch()
        return target

    def migrate_send(
        self,
        spec: VmSpec,
        target: MigrationTarget,
        *,
        tls: MigrationTls | None = None,
        timeout: float = 600.0,
        downtime_ms: int = 500,
    ) -> MigrationResult:
        """Copies the overlay into the target's runtime directory and marks the source stopped."""
        if target.tls != (tls is not None):
            raise VmmError("the source and the target disagree on TLS")
        vm = self._running(spec)
        if vm.state not in (RuntimeState.RUNNING, RuntimeState.PAUSED):
            raise VmmStateError(f"cannot migrate a VM that is {vm.state.value}")
        was = vm.state
        vm.state = RuntimeState.PAUSED
        try:
            self._enter("migrate_send", spec)  # failures and callbacks happen mid-migration
            with _lock:
                entry = _registry.incoming.get(spec.vm_id)
                if entry is None or (entry[1].host, entry[1].port) != (target.host, target.port):
                    raise VmmError(f"migrating the VM failed: nothing listens on {target.host}:{target.port}")
                incoming = entry[0]
                incoming.vcpus, incoming.memory_mib, incoming.nics = vm.vcpus, vm.memory_mib, dict(vm.nics)
                incoming.boots, incoming.migrated_from = vm.boots, True
                _registry.incoming[spec.vm_id] = (incoming, entry[1], True)
            shutil.copyfile(spec.runtime_dir / OVERLAY, incoming.runtime_dir / OVERLAY)
        except BaseException:
            vm.state = was
            raise
        vm.migrated_to = f"{target.host}:{target.port}"
        return MigrationResult(total_ms=1, downtime_ms=1, ram_bytes=vm.memory_mib << 20, disk_bytes=0, disk_sync="top")

    def migrate_receive_finish(self, spec: VmSpec, *, timeout: float = 60.0) -> None:
        """The received VM runs (and becomes what ``info`` of this VM id reports)."""
        self._enter("migrate_receive_finish", spec)
        with _lock:
            entry = _registry.incoming.get(spec.vm_id)
            if entry is None:
                raise VmmNotRunning("no receiving VMM runs for this VM on the target host")
            vm, _, arrived = entry
            if not arrived:
                raise VmmError("the migration stream has not arrived on the target host")
            del _registry.incoming[spec.vm_id]
            vm.state = RuntimeState.RUNNING
            _registry.vms[spec.vm_id] = vm

    def migrate_cancel(self, spec: VmSpec, *, timeout: float = 30.0) -> None:
        self._enter("migrate_cancel", spec)
        with _lock:
            vm = _registry.vms.get(spec.vm_id)
            if vm is not None and vm.runtime_dir == spec.runtime_dir and vm.migrated_to:
                vm.migrated_to, vm.state = "", RuntimeState.RUNNING

    def migrate_receive_abort(self, spec: VmSpec) -> None:
        self._enter("migrate_receive_abort", spec)
        with _lock:
            entry = _registry.incoming.pop(spec.vm_id, None)
        if entry is not None:
            shutil.rmtree(entry[0].runtime_dir, ignore_errors=True)


if TYPE_CHECKING:
    _conforms: Driver = FakeDriver()  # mypy checks the whole protocol here
