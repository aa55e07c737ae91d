"""QEMU driver: one ``qemu-system-x86_64 -M microvm`` process per VM (no Django).

Layers, docker-py style: ``QmpClient`` (transport: one short QMP connection per call,
bounded reads, timeouts), ``QemuDriver`` (one method per lifecycle action, errors mapped
to the ``VmmError`` family in ``_qmp``). All state lives in the runtime directory, so any
process can drive a VM another process launched.

Devices (microvm has virtio-mmio only, no hotplug):

- serial: ISA 16550 on ``serial.sock`` (live I/O) with ``logfile=serial.log`` so nothing
  the guest writes is lost while no client is connected;
- root disk: ``overlay.qcow2`` (backing file = raw base image) on virtio-blk;
- guest agent: virtio-serial port ``org.microvm_sandbox.agent.0`` on ``agent.sock``;
- QMP on ``qmp.sock``; optional NIC on a pre-created tap device.

Capabilities (``QemuDriver.capabilities``): no CPU/memory/NIC hotplug (a resize needs a
restart), snapshots with or without guest memory, and a snapshot freezes the overlay as a
shared backing layer (``vms.vmm.snapshot``); the agent is reached over virtio-serial.
Settings arrive as constructor arguments (``accel``, binaries), never from the environment.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import (
    BOOT_KERNEL,
    BOOT_UEFI,
    MIGRATION_DISK_MIRROR,
    OS_WINDOWS,
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
    VmmNotRunning,
    VmmStateError,
    VmmTimeout,
    VmmUnsupported,
    VmRuntimeInfo,
    VmSpec,
)
from .confinement import VmmConfinement
from .process import (
    accel_choice,
    call_in_netns,
    detect_acceleration,
    host_tsc_khz,
    host_uses_tsc,
    kill_vmm,
    listen_address_check,
    listening_socket,
    log_tail,
    netdev_counters,
    remove_path_quietly,
    running_vmm_pid,
    spawn_detached,
    tap_open,
    uri_host,
    wait_for_unix_socket,
    wait_pid_exit,
)
from .snapshot import (
    DISK_LAYER,
    STATE_FILE,
    SnapshotMeta,
    backing_chain,
)

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
AGENT_PORT_NAME = "org.microvm_sandbox.agent.0"
QMP_SOCKET = "qmp.sock"
SERIAL_SOCKET = "serial.sock"
SERIAL_LOG = "serial.log"
# A graceful shutdown presses the ACPI power button again this often until QEMU exits.
POWER_BUTTON_REPEAT_SECONDS = 5.0
AGENT_SOCKET = "agent.sock"
OVERLAY = "overlay.qcow2"
SPEC_FILE = "spec.json"
UEFI_VARS = "OVMF_VARS.fd"  # this VM's UEFI variable store (boot entries), copied from the template
# Debian's ``ovmf`` package; 4M builds (the 2M ones cannot hold Windows' variables).
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
# Hyper-V enlightenments for Windows guests (QEMU docs/system/i386/hyperv.rst): without them
# Windows spins on locks and its timers drift. QEMU 7.2 under TCG accepts these four ...
HYPERV_ENLIGHTENMENTS: tuple[str, ...] = ("hv_relaxed", "hv_vapic", "hv_spinlocks=0x1fff", "hv_time")
# ... and refuses hv_vpindex (which synic and stimer need) without KVM: KVM only.
HYPERV_KVM_ENLIGHTENMENTS: tuple[str, ...] = ("hv_vpindex", "hv_runtime", "hv_synic", "hv_stimer", "hv_frequencies")

TCG_TB_SIZE_MIB = 64  # TCG translation cache; QEMU default (1 GiB) would dominate per-VM RSS
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
QMP_MAX_LINE = 1 << 20  # a QMP reply bigger than this is treated as a protocol error
# The microvm machine runs with pcie=off (virtio-mmio devices, found through ACPI): pci=off skips
# probing for a PCI host that is not there. The kernel still reports the missing config space at
# KERN_ERR ("PCI: Fatal: No config space access function found", whatever pci= says), so the
# console shows only critical messages (loglevel=3, the usual quiet boot); the guest's dmesg
# keeps everything. Not pcie=on: a different machine could not restore older snapshots.
#
# Idle guests must cost the host nothing, and boots as little as possible (docs/benchmarks.md):
# - nowatchdog: no soft-lockup hrtimer every 4 s per vCPU (and no false lockup reports when the
#   host is busy and a TCG vCPU thread waits for a core);
# - cryptomgr.notests: no crypto self-tests at boot (they test the kernel's own unchanged code);
# - nokaslr: identical guests keep identical kernel pages, which the host's KSM can merge
#   (docs/operations.md "Host tuning"). A sandbox's tenant is root in its guest: kernel address
#   randomisation protects nothing there;
# - sysctl.vm.compaction_proactiveness=0: kcompactd would otherwise wake twice a second to
#   look for fragmentation; sysctl.vm.stat_interval=10: per-CPU memory statistics folded every
#   10 s instead of every second (meminfo may lag that much).
_DEFAULT_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=3 pci=off nowatchdog cryptomgr.notests nokaslr"
    " sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10"
)
# Under TCG only:
# - tsc=reliable: the guest's TSC is the host's TSC (QEMU reads it with rdtsc), while the
#   guest's jiffies lag whenever the host is busy; without this the clocksource watchdog
#   condemns the TSC within seconds of boot, the guest falls back to the jiffies clocksource,
#   and with it to a periodic 250 Hz tick that never stops (no dynticks without a
#   high-resolution clocksource): each idle VM then costs the host hundreds of wakeups a second.
#   Added only when the host's own clocksource is the TSC (``process.host_uses_tsc``): then it
#   is stable across the host's CPUs, whichever one a vCPU thread reads it on;
# - tsc_early_khz: the host's TSC frequency (added per launch), so no PIT calibration, which
#   fails when several guests boot at once;
# - mitigations=off: TCG executes nothing speculatively, so Spectre-class mitigations (retpolines,
#   RSB filling, ...) only cost time. Under KVM the guest keeps its defaults.
_TCG_CMDLINE = "mitigations=off"
# QEMU's seccomp filter: no obsolete syscalls, no set*uid/gid, no fork/exec, no scheduler or
# priority changes (checked against QEMU 7.2, Debian 12).
SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


# Live migration: the NBD export the source mirrors the disk into, the fd name of its
# listening socket, and the source's mirror job.
_NBD_EXPORT = "root"
_NBD_LISTEN_FD = "migrate-nbd"
_MIRROR_JOB = "migrate-root"
_TLS_ID = "migrate-tls"  # QEMU's tls-creds-x509 object, and its directory in the runtime dir
_NBD_NODE = "migrate-target"  # the source's NBD client node when the copy goes over TLS


class QmpError(VmmError):
    """QEMU answered a QMP command with an error (``details`` holds class and desc)."""


class QmpClient:
    """Minimal blocking QMP client over a Unix socket (stdlib only).

    Every read is bounded in time and size; asynchronous events are skipped.
    Use as a context manager: ``with QmpClient(path, timeout=5) as qmp: qmp.execute(...)``.
    """

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._deadline = 0.0

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> dict[str, Any]:
        """Connect, read the greeting and negotiate capabilities; returns the greeting."""
        self._deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError as exc:
            sock.close()
            raise VmmNotRunning("QMP socket missing", details={"path": str(self.path)}) from exc
        except ConnectionRefusedError as exc:
            sock.close()
            raise VmmNotRunning("QMP socket refused the connection", details={"path": str(self.path)}) from exc
        except OSError as exc:
            sock.close()
            if isinstance(exc, socket.timeout):
                raise VmmTimeout("QMP connect timed out") from exc
            raise VmmError(f"QMP connect failed: {exc}") from exc
        self._sock = sock
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise VmmError("unexpected QMP greeting", details=greeting)
        self.execute("qmp_capabilities")
        return greeting

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value; raises ``QmpError``."""
        if self._sock is None:
            raise VmmError("QMP client is not connected")
        self._deadline = time.monotonic() + self.timeout
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except TimeoutError as exc:
            raise VmmTimeout(f"QMP {command}: send timed out") from exc
        except OSError as exc:
            raise VmmNotRunning(f"QMP {command}: connection lost ({exc})") from exc
        return self._reply(command)

    def _reply(self, command: str) -> Any:
        """The answer to the command just sent, skipping asynchronous events."""
        while True:
            reply = self._read_message()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpError(f"QMP {command} failed: {err.get('desc', 'unknown error')}", details=err)
            if "return" in reply:
                return reply["return"]
            raise VmmError(f"QMP {command}: unexpected reply", details=reply)

    def send_fd(self, fdname: str, fd: int) -> None:
        """Hand ``fd`` to QEMU under ``fdname`` (QMP ``getfd`` with SCM_RIGHTS), e.g. for
        ``migrate``/``migrate-incoming`` to ``fd:<fdname>``."""
        if self._sock is None:
            raise VmmError("QMP client is not connected")
        self._deadline = time.monotonic() + self.timeout
        msg = json.dumps({"execute": "getfd", "arguments": {"fdname": fdname}}).encode() + b"\n"
        try:
            socket.send_fds(self._sock, [msg], [fd])
        except OSError as exc:
            raise VmmNotRunning(f"QMP getfd: connection lost ({exc})") from exc
        self._reply("getfd")

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise VmmTimeout("QMP reply timed out")
            if len(self._buf) > QMP_MAX_LINE:
                raise VmmError("QMP reply exceeds size limit")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise VmmTimeout("QMP reply timed out") from exc
            except OSError as exc:
                raise VmmNotRunning(f"QMP connection lost ({exc})") from exc
            if not chunk:
                raise VmmNotRunning("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise VmmError("QMP sent malformed JSON") from exc
        if not isinstance(value, dict):
            raise VmmError("QMP sent a non-object message")
        return value


_STATUS_MAP = {
    "running": RuntimeState.RUNNING,
    "paused": RuntimeState.PAUSED,
    "suspended": RuntimeState.PAUSED,
    "prelaunch": RuntimeState.CREATED,
    "inmigrate": RuntimeState.CREATED,
    "shutdown": RuntimeState.SHUTDOWN,
    "guest-panicked": RuntimeState.SHUTDOWN,
    "internal-error": RuntimeState.SHUTDOWN,
    "io-error": RuntimeState.PAUSED,
    "postmigrate": RuntimeState.PAUSED,
    "finish-migrate": RuntimeState.PAUSED,
    "save-vm": RuntimeState.PAUSED,
    "restore-vm": RuntimeState.PAUSED,
    "debug": RuntimeState.PAUSED,
    "watchdog": RuntimeState.PAUSED,
    "colo": RuntimeState.RUNNING,
}


_CAPABILITIES = DriverCapabilities(
    live_resize=False,
    memory_hotplug_step_mib=0,
    nic_hotplug=False,
    memory_snapshot=True,
    shared_disk_layers=True,
    agent_transport=AgentTransport.VIRTIO_SERIAL,
    disk_only_snapshot=True,
    live_migration=True,
    live_migration_disk=MIGRATION_DISK_MIRROR,
)


class QemuDriver:
    """``Driver`` implementation for QEMU ``microvm`` (TCG here, KVM where it really works).

    ``binary``/``qemu_img`` may point to other executables; ``accel`` is ``"auto"`` (KVM
    when ``process.kvm_usable`` says it really works, detected per launch), ``"kvm"`` or
    ``"tcg"`` (the ``SANDBOX_ACCEL`` setting). ``ValueError`` for another value.
    ``confinement`` (the ``SANDBOX_VMM_*`` settings): the user and cgroup QEMU runs in
    (default: none, QEMU runs as the caller); QEMU's own seccomp sandbox is always on.
    """

    name = "qemu"

    def __init__(
        self,
        *,
        binary: str = QEMU_BINARY,
        qemu_img: str = QEMU_IMG,
        accel: str = "auto",
        ovmf_code: str = OVMF_CODE,
        ovmf_vars: str = OVMF_VARS,
        confinement: VmmConfinement | None = None,
    ) -> None:
        self.binary = binary
        self.qemu_img = qemu_img
        self.accel = accel_choice(accel)
        self.ovmf_code = ovmf_code
        self.ovmf_vars = ovmf_vars
        self.confinement = confinement or VmmConfinement()

    def capabilities(self) -> DriverCapabilities:
        """No hotplug of any kind on microvm; memory and disk-only snapshots; shared layers;
        live migration with the disk mirrored (direct-boot VMs)."""
        return _CAPABILITIES

    # ----- paths -------------------------------------------------------------------

    @staticmethod
    def qmp_path(spec: VmSpec) -> Path:
        """Path of the QMP socket of ``spec``."""
        return spec.runtime_dir / QMP_SOCKET

    @staticmethod
    def serial_socket_path(spec: VmSpec) -> Path:
        """Path of the serial console socket (live input/output)."""
        return spec.runtime_dir / SERIAL_SOCKET

    @staticmethod
    def serial_log_path(spec: VmSpec) -> Path:
        """Path of the serial log (everything the guest wrote, appended across boots)."""
        return spec.runtime_dir / SERIAL_LOG

    @staticmethod
    def agent_socket_path(spec: VmSpec) -> Path:
        """Path of the guest agent socket (plain stream to the virtio-serial port)."""
        return spec.runtime_dir / AGENT_SOCKET

    # ----- lifecycle ---------------------------------------------------------------

    def prepare(self, spec: VmSpec) -> None:
        """Create the runtime directory, ``spec.json`` and the qcow2 overlay. Idempotent:
        an existing overlay (the VM's disk state) is kept."""
        self.prepare_firmware_dir(spec)
        overlay = spec.runtime_dir / OVERLAY
        if overlay.exists():
            return
        if not spec.base_image.is_file():
            raise VmmError("base image not found", details={"path": str(spec.base_image)})
        size = _disk_size(spec)
        tmp = spec.runtime_dir / (OVERLAY + ".tmp")
        try:
            subprocess.run(  # noqa: S603
                [
                    self.qemu_img,
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    str(spec.base_image.resolve()),
                    "-F",
                    spec.base_format,
                    str(tmp),
                    str(size),
                ],
                check=True,
                capture_output=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.CalledProcessError as exc:
            raise VmmError("qemu-img create failed", details={"stderr": exc.stderr.decode("utf-8", "replace")}) from exc
        except subprocess.TimeoutExpired as exc:
            raise VmmTimeout("qemu-img create timed out") from exc
        os.replace(tmp, overlay)

    def prepare_firmware(self, spec: VmSpec) -> None:
        """Firmware boot: check OVMF is installed and give the VM its own copy of the UEFI
        variable store (kept across boots, like a machine's NVRAM). Nothing for direct boot."""
        if spec.boot_mode != BOOT_UEFI:
            return
        for path in (self.ovmf_code, self.ovmf_vars):
            if not Path(path).is_file():
                raise VmmError(
                    "UEFI firmware not found (apt-get install ovmf, or set SANDBOX_QEMU_OVMF_CODE/_VARS)",
                    details={"path": path},
                )
        store = spec.runtime_dir / UEFI_VARS
        if not store.exists():
            tmp = spec.runtime_dir / (UEFI_VARS + ".tmp")
            shutil.copyfile(self.ovmf_vars, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, store)
        self.confinement.give(store)  # OVMF writes its variables as the VMM user

    def build_argv(
        self,
        spec: VmSpec,
        *,
        acceleration: str,
        incoming: bool = False,
        start_paused: bool = False,
        tap_fd: int | None = None,
        extra_tap_fds: tuple[int, ...] = (),
    ) -> list[str]:
        """The full QEMU command line for ``spec`` (public for tests and debugging). With
        ``incoming`` QEMU waits for ``migrate-incoming`` (restore from a snapshot, or a live
        migration), with ``start_paused`` (``-S``) its vCPUs wait for ``cont``; with
        ``tap_fd`` the NIC uses that open TAP instead of opening ``spec.tap`` itself, and
        ``extra_tap_fds`` (one per ``spec.extra_nics``) do the same for the further NICs."""
        rd = spec.runtime_dir.resolve()
        bus = _device_suffix(spec)
        argv = [
            self.binary,
            "-name",
            f"{spec.vm_id},debug-threads=on",
            *self.machine_argv(spec, acceleration=acceleration),
            "-smp",
            str(spec.vcpus),
            "-m",
            f"{spec.memory_mib}M",
            "-sandbox",
            SANDBOX_OPTION,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            *self.boot_argv(spec, acceleration=acceleration),
            "-chardev",
            f"socket,id=serial0,path={rd / SERIAL_SOCKET},server=on,wait=off,logfile={rd / SERIAL_LOG},logappend=on",
            "-serial",
            "chardev:serial0",
            *self.disk_argv(spec),
            "-device",
            f"virtio-serial-{bus},max_ports=4",
            "-chardev",
            f"socket,id=agent0,path={rd / AGENT_SOCKET},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME}",
            "-device",
            f"virtio-rng-{bus}",
            "-qmp",
            f"unix:{rd / QMP_SOCKET},server=on,wait=off",
        ]
        if spec.tap:
            if tap_fd is not None:
                argv += ["-netdev", f"tap,id=net0,fd={tap_fd}"]
            else:
                argv += ["-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no"]
            # host_mtu always (also 1500): the device then always offers the MTU feature, so a
            # snapshot restores on a host whose tunnels give guests a smaller MTU and back.
            dev = f"virtio-net-{bus},netdev=net0,host_mtu={spec.nic_mtu}"
            if spec.mac:
                dev += f",mac={spec.mac}"
            argv += ["-device", dev]
        for i, nic in enumerate(spec.extra_nics):
            if i < len(extra_tap_fds):
                argv += ["-netdev", f"tap,id={nic.device_id},fd={extra_tap_fds[i]}"]
            else:
                argv += ["-netdev", f"tap,id={nic.device_id},ifname={nic.tap},script=no,downscript=no"]
            argv += ["-device", f"virtio-net-{bus},netdev={nic.device_id},mac={nic.mac},host_mtu={spec.nic_mtu}"]
        if incoming:
            argv += ["-incoming", "defer"]
        if start_paused:
            argv.append("-S")
        return argv

    def machine_argv(self, spec: VmSpec, *, acceleration: str) -> list[str]:
        """Machine, accelerator and CPU model: ``microvm`` for direct kernel boot; ``q35``
        for firmware boot (microvm has no firmware that boots a disk), with Hyper-V
        enlightenments for Windows guests."""
        accel = acceleration if acceleration == "kvm" else f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}"
        cpu = "host" if acceleration == "kvm" else "max"
        if spec.boot_mode == BOOT_KERNEL:
            # mem-merge=on (QEMU's default, stated): guest RAM is offered to the host's KSM.
            return ["-M", "microvm,acpi=on,pcie=off,rtc=on,isa-serial=on,mem-merge=on", "-accel", accel, "-cpu", cpu]
        if spec.os_type == OS_WINDOWS:
            flags = HYPERV_ENLIGHTENMENTS + (HYPERV_KVM_ENLIGHTENMENTS if acceleration == "kvm" else ())
            cpu += "," + ",".join(flags)
        # smm=off: the non-secure-boot OVMF build needs no SMM, and TCG runs faster without it.
        return ["-M", "q35,smm=off,vmport=off,mem-merge=on", "-accel", accel, "-cpu", cpu]

    def boot_argv(self, spec: VmSpec, *, acceleration: str) -> list[str]:
        """How the guest starts: ``-kernel/-initrd/-append`` (direct boot), or OVMF's code
        (read-only, shared) and this VM's own copy of the UEFI variable store as pflash, plus
        the ``sandbox.*`` command-line words as SMBIOS OEM strings (firmware boot)."""
        if spec.boot_mode == BOOT_KERNEL:
            argv = ["-kernel", str(spec.kernel.resolve()), "-append", guest_cmdline(spec, acceleration=acceleration)]
            if spec.initramfs is not None:
                argv += ["-initrd", str(spec.initramfs.resolve())]
            return argv
        rd = spec.runtime_dir.resolve()
        argv = [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_qemu_escape(str(Path(self.ovmf_code).resolve()))}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={rd / UEFI_VARS}",
        ]
        strings = spec.guest_oem_strings()
        if strings:
            argv += ["-smbios", "type=11," + ",".join(f"value={_qemu_escape(s)}" for s in strings)]
        if spec.os_type == OS_WINDOWS:
            # Windows keeps its clock in local time; a delayed PIT tick is replayed, not lost.
            argv += ["-rtc", "base=localtime,driftfix=slew"]
            if acceleration == "kvm":
                argv += ["-global", "kvm-pit.lost_tick_policy=delay"]
        return argv

    def disk_argv(self, spec: VmSpec) -> list[str]:
        """Root disk (the qcow2 overlay on virtio-blk) and, with firmware boot, the read-only
        CD-ROMs of ``spec.cdroms`` on the q35 AHCI controller (e.g. the virtio-win ISO)."""
        rd = spec.runtime_dir.resolve()
        argv = [
            "-drive",
            f"id=root,file={rd / OVERLAY},format=qcow2,if=none,cache=writeback,discard=unmap",
            "-device",
            f"virtio-blk-{_device_suffix(spec)},drive=root" + (",bootindex=0" if spec.boot_mode == BOOT_UEFI else ""),
        ]
        if spec.boot_mode == BOOT_UEFI:
            for index, iso in enumerate(spec.cdroms):
                argv += [
                    "-drive",
                    f"id=cd{index},file={_qemu_escape(str(Path(iso).resolve()))},format=raw,if=none,media=cdrom,readonly=on",
                    "-device",
                    f"ide-cd,drive=cd{index},bus=ide.{index + 1},bootindex={index + 1}",
                ]
        return argv

    def launch(self, spec: VmSpec, *, timeout: float = 30.0) -> LaunchResult:
        """Spawn QEMU detached and return once the process runs and QMP answers.

        Idempotent: when a VMM for this runtime directory already runs, its pid is
        returned. Does not wait for the guest agent (see ``agent_client.wait_for_agent``).
        """
        existing = running_vmm_pid(spec.runtime_dir)
        accel = detect_acceleration(self.accel)
        if existing is not None:
            return LaunchResult(
                pid=existing, driver=self.name, acceleration=accel, vmm_version=self._version_quiet(spec)
            )
        self.prepare(spec)
        return self._spawn(spec, accel, timeout=timeout)

    def _spawn(
        self, spec: VmSpec, accel: str, *, timeout: float, incoming: bool = False, start_paused: bool = False
    ) -> LaunchResult:
        """Start QEMU for ``spec`` and wait until QMP answers (``incoming``: QEMU waits for
        ``migrate-incoming`` instead of booting; ``start_paused``: and stays paused after it)."""
        for name in (QMP_SOCKET, SERIAL_SOCKET, AGENT_SOCKET):
            remove_path_quietly(spec.runtime_dir / name)
        overlay = spec.runtime_dir / OVERLAY
        readable: list[Path] = []
        if spec.boot_mode != BOOT_UEFI:  # firmware boot reads no kernel: the disk carries it
            readable += [spec.kernel.resolve(), *([spec.initramfs.resolve()] if spec.initramfs else [])]
        readable += [Path(p) for p in backing_chain(overlay)]
        # Joins its cgroup and drops to the VMM user in the launcher, before exec.
        plan = self.confinement.launch_plan(spec, readable=readable)
        # The TAP is opened here (root) and handed over; QEMU still starts in the namespace
        # that holds it, where its host-side counters are read.
        tap_fd = tap_open(spec.tap, netns=spec.netns) if spec.tap else None
        extra_fds: list[int] = []
        try:
            for nic in spec.extra_nics:
                extra_fds.append(tap_open(nic.tap, netns=spec.netns))
            argv = self.build_argv(
                spec,
                acceleration=accel,
                incoming=incoming,
                start_paused=start_paused,
                tap_fd=tap_fd,
                extra_tap_fds=tuple(extra_fds),
            )
            pass_fds = (*(() if tap_fd is None else (tap_fd,)), *extra_fds)
            pid = spawn_detached(argv, spec.runtime_dir, netns=spec.netns, plan=plan, pass_fds=pass_fds)
        finally:
            for fd in (*(() if tap_fd is None else (tap_fd,)), *extra_fds):
                os.close(fd)
        deadline = time.monotonic() + timeout
        try:
            wait_for_unix_socket(self.qmp_path(spec), timeout, pid=pid, runtime_dir=spec.runtime_dir)
            version = ""
            with QmpClient(self.qmp_path(spec), timeout=max(1.0, deadline - time.monotonic())) as qmp:
                ver = qmp.execute("query-version")
                if isinstance(ver, dict) and isinstance(ver.get("qemu"), dict):
                    q = ver["qemu"]
                    version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
        except VmmError as exc:
            kill_vmm(pid, spec.runtime_dir, term_timeout=2.0)
            if exc.details is None:
                exc.details = {"log_tail": log_tail(spec.runtime_dir)}
            raise
        return LaunchResult(pid=pid, driver=self.name, acceleration=accel, vmm_version=version)

    def info(self, spec: VmSpec, *, timeout: float = 5.0) -> VmRuntimeInfo:
        """State from QMP ``query-status``; ``GONE`` when no QEMU process runs."""
        pid = running_vmm_pid(spec.runtime_dir)
        if pid is None:
            return VmRuntimeInfo(state=RuntimeState.GONE, pid=None)
        try:
            with QmpClient(self.qmp_path(spec), timeout=timeout) as qmp:
                status = qmp.execute("query-status")
                cpus = qmp.execute("query-cpus-fast")
                mem = qmp.execute("query-memory-size-summary")
        except VmmNotRunning:
            # QEMU may be exiting (or killed) between the pid check and the connection:
            # give it a moment to disappear before reporting a real QMP failure.
            if wait_pid_exit(pid, spec.runtime_dir, 1.0):
                return VmRuntimeInfo(state=RuntimeState.GONE, pid=None)
            raise
        state = _STATUS_MAP.get(str(status.get("status")), RuntimeState.RUNNING)
        memory_mib = int(mem.get("base-memory", 0)) >> 20 if isinstance(mem, dict) else None
        return VmRuntimeInfo(
            state=state,
            pid=pid,
            vcpus=len(cpus) if isinstance(cpus, list) else None,
            memory_mib=memory_mib,
            raw={"status": status},
        )

    def pause(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        """Stop the vCPUs (QMP ``stop``). Idempotent on a paused VM."""
        self._qmp(spec, "stop", timeout=timeout)

    def resume(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        """Resume the vCPUs (QMP ``cont``)."""
        self._qmp(spec, "cont", timeout=timeout)

    def reboot(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        """Hard reset of the machine (QMP ``system_reset``); the guest boots again."""
        self._qmp(spec, "system_reset", timeout=timeout)

    def shutdown(self, spec: VmSpec, *, graceful_timeout: float = 30.0, force: bool = False) -> None:
        """ACPI power-down (QMP ``system_powerdown``), wait ``graceful_timeout`` for QEMU to
        exit, then kill it; ``force`` kills at once. Idempotent; afterwards no QEMU runs."""
        pid = running_vmm_pid(spec.runtime_dir)
        if pid is None:
            return
        if not force and self._power_down(spec, pid, graceful_timeout):
            self._remove_sockets(spec)
            self.confinement.cgroup_remove(spec)
            return
        kill_vmm(pid, spec.runtime_dir, term_timeout=3.0)
        self._remove_sockets(spec)
        self.confinement.cgroup_remove(spec)

    def _power_down(self, spec: VmSpec, pid: int, timeout: float) -> bool:
        """Press the ACPI power button until QEMU exits, for at most ``timeout`` seconds; True
        when it did. The press is repeated every ``POWER_BUTTON_REPEAT_SECONDS``: a guest only
        sees a press once its watcher has opened the button's input device, so a press early in
        the boot is lost."""
        deadline = time.monotonic() + timeout
        pressed = False
        while True:
            try:
                with QmpClient(self.qmp_path(spec), timeout=min(5.0, max(timeout, 0.5))) as qmp:
                    if not pressed and qmp.execute("query-status").get("status") in ("paused", "suspended"):
                        qmp.execute("cont")  # a paused guest cannot react to the power button
                    qmp.execute("system_powerdown")
                pressed = True
            except VmmError:
                if not pressed:
                    return False  # no QMP: the caller kills it
                # QEMU may be closing its monitor while the guest powers off: keep waiting.
            left = deadline - time.monotonic()
            if wait_pid_exit(pid, spec.runtime_dir, max(0.0, min(POWER_BUTTON_REPEAT_SECONDS, left))):
                return True
            if time.monotonic() >= deadline:
                return False

    def resize(self, spec: VmSpec, *, vcpus: int | None, memory_mib: int | None, timeout: float = 10.0) -> None:
        """Always raises ``VmmUnsupported``: microvm has no CPU/memory hotplug."""
        raise VmmUnsupported(
            "QEMU microvm cannot hotplug CPUs or memory; restart the VM with the new size",
            details={"vcpus": vcpus, "memory_mib": memory_mib},
        )

    def nic_add(self, spec: VmSpec, nic: NicDevice, *, timeout: float = 10.0) -> None:
        """Always raises ``VmmUnsupported``: microvm's virtio-mmio devices cannot be hot-plugged."""
        raise VmmUnsupported(
            "QEMU microvm cannot hot-plug a NIC; stop the VM, add it, then start it",
            details={"tap": nic.tap},
        )

    def nic_remove(self, spec: VmSpec, device_id: str, *, timeout: float = 10.0) -> None:
        """Always raises ``VmmUnsupported`` (see ``nic_add``)."""
        raise VmmUnsupported(
            "QEMU microvm cannot hot-unplug a NIC; stop the VM, remove it, then start it",
            details={"device": device_id},
        )

    def counters(self, spec: VmSpec, *, timeout: float = 5.0) -> dict[str, dict[str, int]]:
        """I/O counters: ``{"block.<id>": {read_bytes, write_bytes, read_ops, write_ops, flush_ops}}``
        from QMP ``query-blockstats``, plus ``{"net.<tap>": {rx_bytes, tx_bytes, rx_packets,
        tx_packets}}`` from the host side of the tap (host tx = guest rx), read in QEMU's own
        network namespace (``spec.netns``)."""
        stats = self._qmp(spec, "query-blockstats", timeout=timeout)
        out: dict[str, dict[str, int]] = {}
        if isinstance(stats, list):
            for entry in stats:
                if not isinstance(entry, dict):
                    continue
                name = entry.get("device") or entry.get("node-name") or entry.get("qdev") or "disk"
                s = entry.get("stats", {})
                out[f"block.{name}"] = {
                    "read_bytes": int(s.get("rd_bytes", 0)),
                    "write_bytes": int(s.get("wr_bytes", 0)),
                    "read_ops": int(s.get("rd_operations", 0)),
                    "write_ops": int(s.get("wr_operations", 0)),
                    "flush_ops": int(s.get("flush_operations", 0)),
                }
        pid = running_vmm_pid(spec.runtime_dir)
        taps = [*([spec.tap] if spec.tap else []), *(nic.tap for nic in spec.extra_nics)]
        for tap in taps:
            if pid is None:
                break
            host = netdev_counters(pid, tap)
            if host:
                out[f"net.{tap}"] = {
                    "rx_bytes": host["tx_bytes"],
                    "tx_bytes": host["rx_bytes"],
                    "rx_packets": host["tx_packets"],
                    "tx_packets": host["rx_packets"],
                }
        return out

    def cleanup(self, spec: VmSpec) -> None:
        """Kill any QEMU left for this VM and remove the whole runtime directory. Idempotent."""
        pid = running_vmm_pid(spec.runtime_dir)
        if pid is not None:
            kill_vmm(pid, spec.runtime_dir, term_timeout=2.0)
        self.confinement.cgroup_remove(spec)
        shutil.rmtree(spec.runtime_dir, ignore_errors=True)
        if spec.runtime_dir.exists():
            raise VmmError("could not remove runtime directory", details={"path": str(spec.runtime_dir)})

    # ----- snapshots ---------------------------------------------------------------

    def snapshot(
        self, spec: VmSpec, dest_dir: Path, *, include_memory: bool = True, timeout: float = 300.0
    ) -> SnapshotMeta:
        """Take a snapshot of ``spec`` into the (new, empty) directory ``dest_dir``.

        Running VM: ``stop`` -> (``include_memory``) device + RAM state saved with ``migrate``
        to ``dest_dir/state.bin`` through a passed fd -> the disk is frozen: the current
        overlay moves to ``dest_dir/disk.qcow2`` and a new empty overlay backed by it is
        switched in (``blockdev-snapshot-sync``, mode ``existing``), so nothing big is copied
        -> ``cont`` (only if it was running). ``pause_ms`` is the time the vCPUs were stopped.

        Stopped VM (no QEMU): disk only; ``include_memory`` raises ``VmmStateError``.
        Writes ``snapshot.json`` but not the manifest (see ``snapshot.manifest_write``).
        On failure the VM keeps running on its original overlay and ``dest_dir`` holds
        nothing the VM needs."""
        started = time.monotonic()
        overlay = spec.runtime_dir / OVERLAY
        dest_dir = dest_dir.resolve()
        dest_dir.mkdir(parents=True, exist_ok=True)
        layer = dest_dir / DISK_LAYER
        if not overlay.is_file():
            raise VmmError("the VM has no disk overlay to snapshot", details={"path": str(overlay)})
        pid = running_vmm_pid(spec.runtime_dir)
        accel = ""
        pause_ms = 0
        version = self.version()
        if pid is None:
            if include_memory:
                raise VmmStateError("a memory snapshot needs a running VM; take a disk-only snapshot instead")
            self._freeze_overlay(spec, layer, qmp=None)
        else:
            with QmpClient(self.qmp_path(spec), timeout=min(timeout, 30.0)) as qmp:
                status = str(qmp.execute("query-status").get("status"))
                if status not in ("running", "paused"):
                    raise VmmStateError(f"cannot snapshot a VM whose QEMU is {status}", details={"status": status})
                was_running = status == "running"
                version = self._version_of(qmp) or version
                accel = "kvm" if "kvm" in " ".join(_cmdline_of(pid)) else "tcg"
                # Throttling is for live migration over a network; a file takes what it can get.
                qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30, "downtime-limit": 100000})
                paused_at = time.monotonic()
                if was_running:
                    qmp.execute("stop")
                try:
                    if include_memory:
                        self._save_state(qmp, dest_dir / STATE_FILE, timeout=timeout)
                    try:
                        self._freeze_overlay(spec, layer, qmp=qmp)
                    except BaseException:
                        remove_path_quietly(dest_dir / STATE_FILE)
                        raise
                finally:
                    if was_running:
                        # After a completed migration QEMU is in "postmigrate" with its images
                        # inactive; cont re-activates them and resumes the vCPUs.
                        qmp.execute("cont")
                    pause_ms = int((time.monotonic() - paused_at) * 1000)
        meta = SnapshotMeta(
            driver=self.name,
            vmm_version=version,
            vm_id=spec.vm_id,
            include_memory=include_memory,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            disk_gib=spec.disk_gib,
            acceleration=accel,
            disk_layer=DISK_LAYER,
            state_file=STATE_FILE if include_memory else None,
            backing_chain=backing_chain(layer),
            pause_ms=pause_ms,
            total_ms=int((time.monotonic() - started) * 1000),
            created_unix=time.time(),
            extra={"kernel": str(spec.kernel.resolve()), "initramfs": str(spec.initramfs or "")},
        )
        meta.write(dest_dir)
        return meta

    def restore(self, spec: VmSpec, src_dir: Path, *, timeout: float = 120.0) -> LaunchResult:
        """Start ``spec`` from the snapshot in ``src_dir``: a new overlay backed by the
        snapshot's frozen ``disk.qcow2`` replaces the VM's overlay (copy-on-write: any number
        of VMs can share the layer), then QEMU starts with ``-incoming defer`` and loads
        ``state.bin`` (memory snapshot; the VM resumes where it was) or boots (disk-only).

        ``spec`` may be another VM (a clone): its own runtime directory, sockets, command line
        and MAC; vCPUs and memory must match the snapshot. ``VmmStateError`` when a QEMU
        already runs for ``spec``. Verify the manifest before calling this. Does not wait for
        the guest agent; the host side simply reconnects to the new ``agent.sock``."""
        meta = SnapshotMeta.read(src_dir)
        if meta.driver != self.name:
            raise VmmError(f"this snapshot was taken by {meta.driver}, not {self.name}")
        if running_vmm_pid(spec.runtime_dir) is not None:
            raise VmmStateError("a QEMU already runs for this VM; stop it before restoring")
        if meta.include_memory and (meta.vcpus, meta.memory_mib) != (spec.vcpus, spec.memory_mib):
            raise VmmError(
                "the VM's size differs from the snapshot's",
                details={"snapshot": [meta.vcpus, meta.memory_mib], "vm": [spec.vcpus, spec.memory_mib]},
            )
        accel = detect_acceleration(self.accel)
        if meta.include_memory:
            here = self.version()
            if meta.vmm_version and here and meta.vmm_version.split(".")[:2] != here.split(".")[:2]:
                raise VmmError(f"snapshot taken with QEMU {meta.vmm_version}, this host runs {here}")
            if meta.acceleration and meta.acceleration != accel:
                raise VmmError(f"snapshot taken under {meta.acceleration}, this host runs {accel}")
        layer = (src_dir / (meta.disk_layer or DISK_LAYER)).resolve()
        if not layer.is_file():
            raise VmmError("the snapshot's disk layer is missing", details={"path": str(layer)})
        self.prepare_from_layer(spec, layer)
        if not meta.include_memory:
            return self._spawn(spec, accel, timeout=timeout)
        deadline = time.monotonic() + timeout
        result = self._spawn(spec, accel, timeout=timeout, incoming=True)
        state = src_dir / (meta.state_file or STATE_FILE)
        try:
            fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with QmpClient(self.qmp_path(spec), timeout=max(1.0, deadline - time.monotonic())) as qmp:
                    qmp.send_fd("snapshot", fd)
                    qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})
                    self._wait_migration(qmp, deadline, incoming=True)
                    # The state was saved from a stopped VM, so QEMU keeps it paused.
                    if qmp.execute("query-status").get("status") != "running":
                        qmp.execute("cont")
            finally:
                os.close(fd)
        except BaseException as exc:
            kill_vmm(result.pid, spec.runtime_dir, term_timeout=2.0)
            if isinstance(exc, VmmError) and exc.details is None:
                exc.details = {"log_tail": log_tail(spec.runtime_dir)}
            raise
        return result

    def prepare_from_layer(self, spec: VmSpec, layer: Path) -> None:
        """Make ``spec``'s runtime directory with a fresh overlay backed by ``layer`` (the
        frozen layer of a snapshot); any previous overlay of the VM is discarded."""
        longest = spec.runtime_dir.resolve() / SERIAL_SOCKET
        if len(str(longest).encode()) > _UNIX_PATH_MAX:
            raise VmmError("runtime directory path too long for Unix sockets", details={"path": str(spec.runtime_dir)})
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(spec.runtime_dir, 0o700)
        spec_tmp = spec.runtime_dir / (SPEC_FILE + ".tmp")
        spec_tmp.write_text(spec.to_json())
        os.replace(spec_tmp, spec.runtime_dir / SPEC_FILE)
        self.prepare_firmware(spec)
        tmp = spec.runtime_dir / (OVERLAY + ".tmp")
        self._overlay_create(tmp, backing=layer, size=spec.disk_gib << 30)
        os.replace(tmp, spec.runtime_dir / OVERLAY)

    def version(self) -> str:
        """``major.minor.micro`` of the QEMU binary (from ``--version``), or ``""``."""
        try:
            out = subprocess.run(  # noqa: S603
                [self.binary, "--version"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
        words = out.split()
        if len(words) >= 4 and words[2] == "version":
            return words[3]
        return ""

    def _freeze_overlay(self, spec: VmSpec, layer: Path, *, qmp: QmpClient | None) -> None:
        """Move the overlay to ``layer`` and put a new empty overlay backed by it in its place;
        with ``qmp`` the running QEMU switches to the new overlay (it keeps the old file open
        read-only as the backing node). Rolled back on failure."""
        overlay = spec.runtime_dir / OVERLAY
        fresh = spec.runtime_dir / (OVERLAY + ".new")
        size = _qcow2_virtual_size(overlay)
        try:
            os.rename(overlay, layer)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise VmmError(
                    "the snapshot directory must be on the same filesystem as the runtime directory",
                    details={"runtime_dir": str(spec.runtime_dir), "snapshot_dir": str(layer.parent)},
                ) from exc
            raise VmmError(f"cannot move the disk overlay: {exc}") from exc
        try:
            self._overlay_create(fresh, backing=layer, size=size)
            self.confinement.give(fresh)  # QEMU opens it read-write as the VMM user
            os.replace(fresh, overlay)
            if qmp is not None:
                qmp.execute(
                    "blockdev-snapshot-sync",
                    {"device": "root", "snapshot-file": str(overlay.resolve()), "format": "qcow2", "mode": "existing"},
                )
        except BaseException:
            remove_path_quietly(fresh)
            os.replace(layer, overlay)
            raise
        # Frozen: other VMs (clones) may build on it, so no VMM may write it any more.
        self.confinement.reclaim(layer)

    def _overlay_create(self, path: Path, *, backing: Path, size: int, backing_format: str = "qcow2") -> None:
        # -u: do not open the backing file (a running QEMU holds locks on it).
        argv = [
            self.qemu_img, "create", "-q", "-f", "qcow2", "-u",
            "-b", str(backing.resolve()), "-F", backing_format, str(path), str(size),
        ]  # fmt: skip
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)  # noqa: S603
        except subprocess.CalledProcessError as exc:
            raise VmmError("qemu-img create failed", details={"stderr": exc.stderr.decode("utf-8", "replace")}) from exc
        except subprocess.TimeoutExpired as exc:
            raise VmmTimeout("qemu-img create timed out") from exc

    def _save_state(self, qmp: QmpClient, path: Path, *, timeout: float) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.send_fd("snapshot", fd)
        finally:
            os.close(fd)  # QEMU holds its own copy now
        try:
            qmp.execute("migrate", {"uri": "fd:snapshot"})
            self._wait_migration(qmp, time.monotonic() + timeout, incoming=False)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                qmp.execute("migrate_cancel")
            except VmmError:
                pass
            remove_path_quietly(tmp)
            raise

    @staticmethod
    def _wait_migration(qmp: QmpClient, deadline: float, *, incoming: bool, what: str = "") -> dict[str, Any]:
        """Poll ``query-migrate`` until it completes (returns its last answer), fails
        (``VmmError``) or ``deadline`` passes (``VmmTimeout``); ``what`` names it in errors."""
        what = what or ("loading the VM state" if incoming else "saving the VM state")
        delay = 0.01
        while True:
            info = qmp.execute("query-migrate")
            if not isinstance(info, dict):
                info = {}
            status = str(info.get("status", ""))
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise VmmError(f"{what} failed: {info.get('error-desc', status)}", details={"migration": info})
            if incoming:
                run = qmp.execute("query-status")
                if isinstance(run, dict) and run.get("status") == "running":
                    return info
            if time.monotonic() > deadline:
                raise VmmTimeout(f"{what} timed out", details={"migration": info})
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    @staticmethod
    def _version_of(qmp: QmpClient) -> str:
        ver = qmp.execute("query-version")
        if isinstance(ver, dict) and isinstance(ver.get("qemu"), dict):
            q = ver["qemu"]
            return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
        return ""

    # ----- live migration ----------------------------------------------------------

    def migrate_receive_prepare(
        self,
        spec: VmSpec,
        *,
        listen_host: str,
        backing: Path | None = None,
        tls: MigrationTls | None = None,
        timeout: float = 60.0,
    ) -> MigrationTarget:
        """Target host: a fresh runtime directory for ``spec`` whose overlay is backed by
        ``backing`` (default ``spec.base_image``; the same path must hold the same bytes as on
        the source for a top-layer copy), then QEMU with ``-incoming defer -S`` in
        ``spec.netns`` (its TAPs must exist there), an NBD server on ``listen_host`` exporting
        that overlay (writable: the source mirrors its disk into it) and ``migrate-incoming``
        on ``listen_host``. Both ports are chosen by the kernel and reported in the result.
        With ``tls`` both take only TLS clients whose certificate the CA signed
        (``tls-creds-x509``, ``verify-peer``). ``VmmStateError`` when a QEMU already runs for
        ``spec`` here."""
        _check_migratable(spec)
        if running_vmm_pid(spec.runtime_dir) is not None:
            raise VmmStateError("a QEMU already runs for this VM on the target host")
        listen_address_check(listen_host)
        deadline = time.monotonic() + timeout
        accel = detect_acceleration(self.accel)
        base = (backing or spec.base_image).resolve()
        if not base.is_file():
            raise VmmError("the disk's backing file is missing on the target host", details={"path": str(base)})
        # A snapshot layer is qcow2; the base image is what its spec says.
        fmt = spec.base_format if backing is None else ("qcow2" if _is_qcow2(base) else "raw")
        size = _disk_size(spec)
        remove_path_quietly(spec.runtime_dir / OVERLAY)  # a leftover of an earlier attempt
        self.prepare_firmware_dir(spec)
        tmp = spec.runtime_dir / (OVERLAY + ".tmp")
        self._overlay_create(tmp, backing=base, size=size, backing_format=fmt)
        os.replace(tmp, spec.runtime_dir / OVERLAY)
        tls_dir = self._tls_install(spec, tls, endpoint="server") if tls is not None else None
        result = self._spawn(spec, accel, timeout=timeout, incoming=True, start_paused=True)
        try:
            listener = call_in_netns(spec.netns, listening_socket, listen_host)
            try:
                with QmpClient(self.qmp_path(spec), timeout=max(1.0, deadline - time.monotonic())) as qmp:
                    nbd: dict[str, Any] = {"addr": {"type": "fd", "data": {"str": _NBD_LISTEN_FD}}}
                    if tls_dir is not None:
                        self._tls_object_add(qmp, tls_dir, endpoint="server")
                        qmp.execute("migrate-set-parameters", {"tls-creds": _TLS_ID})
                        nbd["tls-creds"] = _TLS_ID
                    qmp.send_fd(_NBD_LISTEN_FD, listener.fileno())
                    qmp.execute("nbd-server-start", nbd)
                    qmp.execute("nbd-server-add", {"device": "root", "name": _NBD_EXPORT, "writable": True})
                    qmp.execute("migrate-incoming", {"uri": f"tcp:{uri_host(listen_host)}:0"})
                    port = _incoming_port(qmp.execute("query-migrate"))
                disk_port = int(listener.getsockname()[1])
            finally:
                listener.close()  # QEMU holds its own copy
        except BaseException as exc:
            kill_vmm(result.pid, spec.runtime_dir, term_timeout=2.0)
            if isinstance(exc, VmmError) and exc.details is None:
                exc.details = {"log_tail": log_tail(spec.runtime_dir)}
            raise
        return MigrationTarget(
            driver=self.name,
            host=listen_host,
            port=port,
            disk_port=disk_port,
            disk_export=_NBD_EXPORT,
            disk_size=size,
            backing_chain=tuple(backing_chain(spec.runtime_dir / OVERLAY)),
            acceleration=accel,
            vmm_version=result.vmm_version,
            runtime_dir=str(spec.runtime_dir.resolve()),
            tls=tls is not None,
        )

    def prepare_firmware_dir(self, spec: VmSpec) -> None:
        """The runtime directory, ``spec.json`` and (firmware boot) the UEFI variable store,
        without a disk: what a VM arriving by migration needs before its overlay."""
        longest = spec.runtime_dir.resolve() / SERIAL_SOCKET
        if len(str(longest).encode()) > _UNIX_PATH_MAX:
            raise VmmError("runtime directory path too long for Unix sockets", details={"path": str(spec.runtime_dir)})
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(spec.runtime_dir, 0o700)
        spec_tmp = spec.runtime_dir / (SPEC_FILE + ".tmp")
        spec_tmp.write_text(spec.to_json())
        os.replace(spec_tmp, spec.runtime_dir / SPEC_FILE)
        self.prepare_firmware(spec)

    def migrate_send(
        self,
        spec: VmSpec,
        target: MigrationTarget,
        *,
        tls: MigrationTls | None = None,
        timeout: float = 600.0,
        downtime_ms: int = 500,
    ) -> MigrationResult:
        """Source host: mirror the disk into the target's NBD export (``blockdev``
        ``drive-mirror``, write-blocking once in sync, so the copy never falls behind), then
        ``migrate`` RAM and devices to ``tcp:<target.host>:<target.port>`` (auto-converge,
        downtime at most ``downtime_ms``), then end the mirror job without switching to it.
        The disk copy is ``sync: top`` (only this VM's overlay) when the target's overlay
        sits on the same backing chain as ours, else ``full`` (the whole disk).

        Returns with the source QEMU stopped (``postmigrate``). On any failure, or when
        ``timeout`` runs out, migration and mirror are cancelled and the VM runs on here;
        the error is raised."""
        started = time.monotonic()
        deadline = started + timeout
        _check_migratable(spec)
        if target.driver != self.name:
            raise VmmError(f"the target host prepared a {target.driver} VM, not {self.name}")
        if target.disk_port is None or not target.disk_export:
            raise VmmError("the target offers no disk export to mirror into")
        pid = running_vmm_pid(spec.runtime_dir)
        if pid is None:
            raise VmmNotRunning("the VM is not running", details={"vm_id": spec.vm_id})
        accel = "kvm" if "kvm" in " ".join(_cmdline_of(pid)) else "tcg"
        if target.acceleration and target.acceleration != accel:
            raise VmmError(f"the VM runs under {accel} here, the target host runs {target.acceleration}")
        overlay = spec.runtime_dir / OVERLAY
        size = _qcow2_virtual_size(overlay)
        if target.disk_size != size:
            raise VmmError(
                "the target's disk differs in size from the VM's",
                details={"source": size, "target": target.disk_size},
            )
        sync = "top" if tuple(backing_chain(overlay)) == target.backing_chain else "full"
        host = uri_host(target.host)
        if target.tls != (tls is not None):
            raise VmmError(
                "the target takes the migration only over TLS: give the source its certificate"
                if target.tls
                else "the target does not listen with TLS"
            )
        tls_dir = self._tls_install(spec, tls, endpoint="client") if tls is not None else None
        with QmpClient(self.qmp_path(spec), timeout=min(30.0, timeout)) as qmp:
            status = str(qmp.execute("query-status").get("status"))
            if status not in ("running", "paused"):
                raise VmmStateError(f"cannot migrate a VM whose QEMU is {status}", details={"status": status})
            version = self._version_of(qmp)
            if target.vmm_version and version and target.vmm_version.split(".")[:2] != version.split(".")[:2]:
                raise VmmError(f"the VM runs on QEMU {version} here, the target host runs {target.vmm_version}")
            was_running = status == "running"
            try:
                if tls_dir is None:
                    qmp.execute(
                        "drive-mirror",
                        {
                            "job-id": _MIRROR_JOB,
                            "device": "root",
                            "target": f"nbd://{host}:{target.disk_port}/{target.disk_export}",
                            "format": "raw",
                            "mode": "existing",
                            "sync": sync,
                            "copy-mode": "write-blocking",
                            "auto-dismiss": False,
                        },
                    )
                else:
                    _qmp_quietly(qmp, "blockdev-del", {"node-name": _NBD_NODE})  # an earlier attempt's
                    self._tls_object_add(qmp, tls_dir, endpoint="client")
                    qmp.execute(
                        "blockdev-add",
                        {
                            "driver": "nbd",
                            "node-name": _NBD_NODE,
                            "server": {"type": "inet", "host": target.host, "port": str(target.disk_port)},
                            "export": target.disk_export,
                            "tls-creds": _TLS_ID,
                        },
                    )
                    qmp.execute(
                        "blockdev-mirror",
                        {
                            "job-id": _MIRROR_JOB,
                            "device": "root",
                            "target": _NBD_NODE,
                            "sync": sync,
                            "copy-mode": "write-blocking",
                            "auto-dismiss": False,
                        },
                    )
                disk_bytes = self._wait_mirror_ready(qmp, deadline)
                qmp.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "auto-converge", "state": True}]},
                )
                # Snapshots leave huge values behind (a file takes what it can get); a network
                # copy aims for a short pause and uses the link.
                qmp.execute(
                    "migrate-set-parameters",
                    {
                        "max-bandwidth": 64 << 30,
                        "downtime-limit": downtime_ms,
                        "tls-creds": _TLS_ID if tls_dir is not None else "",  # "": plain TCP
                    },
                )
                qmp.execute("migrate", {"uri": f"tcp:{host}:{target.port}"})
                info = self._wait_migration(qmp, deadline, incoming=False, what="migrating the VM")
                # The source is stopped now: nothing writes the disk any more. Ending a ready
                # mirror with block-job-cancel completes it without switching to the copy.
                self._end_mirror(qmp, deadline)
            except BaseException:
                self._cancel_on(qmp, was_running=was_running)
                raise
        ram = info.get("ram") if isinstance(info, dict) else None
        return MigrationResult(
            total_ms=int((time.monotonic() - started) * 1000),
            downtime_ms=int(info.get("downtime", 0)) if isinstance(info, dict) else 0,
            ram_bytes=int(ram.get("transferred", 0)) if isinstance(ram, dict) else 0,
            disk_bytes=disk_bytes,
            disk_sync=sync,
        )

    def migrate_receive_finish(self, spec: VmSpec, *, timeout: float = 60.0) -> None:
        """Target host: wait for the incoming migration to be complete, stop the NBD server
        and resume the VM (``cont``). ``VmmError`` when the migration failed."""
        deadline = time.monotonic() + timeout
        if running_vmm_pid(spec.runtime_dir) is None:
            raise VmmNotRunning("no receiving QEMU runs for this VM on the target host")
        with QmpClient(self.qmp_path(spec), timeout=min(30.0, timeout)) as qmp:
            self._wait_migration(qmp, deadline, incoming=True, what="receiving the VM")
            status = str(qmp.execute("query-status").get("status"))
            if status == "inmigrate":
                raise VmmError("the migration stream has not arrived on the target host")
            try:
                qmp.execute("nbd-server-stop")
            except QmpError:
                pass  # already stopped by an earlier call: finishing is idempotent
            if status != "running":
                qmp.execute("cont")
            status = str(qmp.execute("query-status").get("status"))
        if status != "running":
            raise VmmError(f"the migrated VM did not start on the target host: {status}", details={"status": status})

    def migrate_cancel(self, spec: VmSpec, *, timeout: float = 30.0) -> None:
        """Source host: cancel a migration and the disk mirror of ``spec`` and resume the VM
        if the migration stopped it. Never call it once the target has resumed (two copies
        of the VM would then run). Idempotent; nothing to do when no QEMU runs."""
        if running_vmm_pid(spec.runtime_dir) is None:
            return
        with QmpClient(self.qmp_path(spec), timeout=timeout) as qmp:
            status = str(qmp.execute("query-status").get("status"))
            self._cancel_on(qmp, was_running=status in ("running", "postmigrate", "finish-migrate"))

    def migrate_receive_abort(self, spec: VmSpec) -> None:
        """Target host: kill the receiving QEMU and remove its runtime directory (the partial
        disk copy with it). Idempotent."""
        self.cleanup(spec)

    def _tls_install(self, spec: VmSpec, tls: MigrationTls, *, endpoint: str) -> Path:
        """Copy ``tls`` into the runtime directory under the names QEMU's ``tls-creds-x509``
        reads (``ca-cert.pem``, ``<endpoint>-cert.pem``, ``<endpoint>-key.pem``), readable by
        the VMM user only."""
        tls_dir = spec.runtime_dir / _TLS_ID
        shutil.rmtree(tls_dir, ignore_errors=True)
        tls_dir.mkdir(mode=0o700)
        try:
            for source, name in (
                (tls.ca_cert, "ca-cert.pem"),
                (tls.cert, f"{endpoint}-cert.pem"),
                (tls.key, f"{endpoint}-key.pem"),
            ):
                shutil.copyfile(source, tls_dir / name)
                os.chmod(tls_dir / name, 0o600)
                self.confinement.give(tls_dir / name)
        except OSError as exc:
            raise VmmError(f"cannot install the migration certificates: {exc}") from exc
        self.confinement.give(tls_dir)
        return tls_dir

    @staticmethod
    def _tls_object_add(qmp: QmpClient, tls_dir: Path, *, endpoint: str) -> None:
        _qmp_quietly(qmp, "object-del", {"id": _TLS_ID})  # an earlier attempt's
        qmp.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": _TLS_ID,
                "dir": str(tls_dir.resolve()),
                "endpoint": endpoint,
                "verify-peer": True,
            },
        )

    def _wait_mirror_ready(self, qmp: QmpClient, deadline: float) -> int:
        """Wait until the mirror job is in sync; returns the bytes it copied."""
        delay = 0.05
        while True:
            job = self._mirror_job(qmp)
            if job is None:
                raise VmmError("the disk mirror job vanished")
            if job.get("status") == "concluded" or job.get("error"):
                raise VmmError(
                    f"copying the disk to the target failed: {job.get('error', 'job ended early')}",
                    details={"job": job},
                )
            if job.get("ready"):
                return int(job.get("offset", 0))
            if time.monotonic() > deadline:
                raise VmmTimeout("copying the disk to the target timed out", details={"job": job})
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _end_mirror(self, qmp: QmpClient, deadline: float) -> None:
        qmp.execute("block-job-cancel", {"device": _MIRROR_JOB})
        delay = 0.02
        while True:
            job = self._mirror_job(qmp)
            if job is None:
                return
            if job.get("status") == "concluded":
                qmp.execute("job-dismiss", {"id": _MIRROR_JOB})
                if job.get("error"):
                    raise VmmError(f"the disk mirror ended with an error: {job['error']}", details={"job": job})
                return
            if time.monotonic() > deadline:
                raise VmmTimeout("ending the disk mirror timed out", details={"job": job})
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    @staticmethod
    def _mirror_job(qmp: QmpClient) -> dict[str, Any] | None:
        jobs = qmp.execute("query-block-jobs")
        for job in jobs if isinstance(jobs, list) else []:
            if isinstance(job, dict) and job.get("device") == _MIRROR_JOB:
                return job
        return None

    def _cancel_on(self, qmp: QmpClient, *, was_running: bool) -> None:
        """Best effort, on an open QMP connection: cancel the migration and the mirror job
        (forced, the copy is thrown away), then ``cont`` if the VM ran before."""
        for command, args in (
            ("migrate_cancel", None),
            ("block-job-cancel", {"device": _MIRROR_JOB, "force": True}),
        ):
            try:
                qmp.execute(command, args)
            except VmmError:
                pass
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            try:
                info = qmp.execute("query-migrate")
                job = self._mirror_job(qmp)
            except VmmError:
                break
            migrating = isinstance(info, dict) and info.get("status") in ("active", "setup", "cancelling", "device")
            if job is not None and job.get("status") == "concluded":
                try:
                    qmp.execute("job-dismiss", {"id": _MIRROR_JOB})
                except VmmError:
                    pass
                job = None
            if not migrating and job is None:
                break
            time.sleep(0.05)
        if was_running:
            try:
                if qmp.execute("query-status").get("status") != "running":
                    # After a completed migration the images are inactive: cont re-activates them.
                    qmp.execute("cont")
            except VmmError:
                pass

    # ----- helpers -----------------------------------------------------------------

    def _qmp(self, spec: VmSpec, command: str, *, timeout: float, arguments: dict[str, Any] | None = None) -> Any:
        if running_vmm_pid(spec.runtime_dir) is None:
            raise VmmNotRunning("the VM is not running", details={"vm_id": spec.vm_id})
        try:
            with QmpClient(self.qmp_path(spec), timeout=timeout) as qmp:
                return qmp.execute(command, arguments)
        except QmpError as exc:
            raise VmmStateError(exc.message, details=exc.details) from exc

    def _version_quiet(self, spec: VmSpec) -> str:
        try:
            ver = self._qmp(spec, "query-version", timeout=2.0)
            q = ver["qemu"]
            return f"{q['major']}.{q['minor']}.{q['micro']}"
        except (VmmError, KeyError, TypeError):
            return ""

    @staticmethod
    def _remove_sockets(spec: VmSpec) -> None:
        for name in (QMP_SOCKET, SERIAL_SOCKET, AGENT_SOCKET):
            remove_path_quietly(spec.runtime_dir / name)


def guest_cmdline(spec: VmSpec, *, acceleration: str) -> str:
    """The guest kernel's command line for direct boot: the driver's defaults (with the TCG-only
    words under TCG), then ``spec.cmdline``, whose words come last and so win over ours."""
    cmdline = _DEFAULT_CMDLINE
    if acceleration == "tcg":
        cmdline += f" {_TCG_CMDLINE} tsc_early_khz={host_tsc_khz()}"
        if host_uses_tsc():
            cmdline += " tsc=reliable"
    if spec.cmdline:
        cmdline += " " + spec.cmdline
    return cmdline


def _device_suffix(spec: VmSpec) -> str:
    """virtio devices are MMIO (``-device``) on microvm, PCI (``-pci``) on q35."""
    return "device" if spec.boot_mode == BOOT_KERNEL else "pci"


def _qemu_escape(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return value.replace(",", ",,")


def _cmdline_of(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def _qmp_quietly(qmp: QmpClient, command: str, arguments: dict[str, Any]) -> None:
    """A clean-up command whose failure (nothing to clean) does not matter."""
    try:
        qmp.execute(command, arguments)
    except QmpError:
        pass


def _check_migratable(spec: VmSpec) -> None:
    """Only direct-boot VMs migrate: a firmware-booted VM's UEFI variable store is a pflash
    drive of its own that is not copied yet (its boot entries would be lost at the next boot)."""
    if spec.boot_mode != BOOT_KERNEL:
        raise VmmUnsupported("live migration of firmware-booted (UEFI) VMs is not built yet")


def _disk_size(spec: VmSpec) -> int:
    """Virtual size of a new overlay for ``spec``: its disk size, at least the base image's."""
    qcow2 = spec.base_format == "qcow2"
    base_size = _qcow2_virtual_size(spec.base_image) if qcow2 else spec.base_image.stat().st_size
    return max(spec.disk_gib << 30, base_size)


def _is_qcow2(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"QFI\xfb"


def _incoming_port(info: object) -> int:
    """The port ``migrate-incoming tcp:<host>:0`` listens on (``socket-address`` of the
    target's ``query-migrate``)."""
    addresses = info.get("socket-address") if isinstance(info, dict) else None
    for address in addresses if isinstance(addresses, list) else []:
        if isinstance(address, dict) and address.get("type") == "inet" and str(address.get("port", "")).isdigit():
            return int(address["port"])
    raise VmmError("QEMU did not report the port it listens on for the migration", details={"migration": info})


def _qcow2_virtual_size(path: Path) -> int:
    """Virtual size from a qcow2 header (bytes 24..32), readable while QEMU has it open."""
    with open(path, "rb") as fh:
        header = fh.read(32)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise VmmError(f"not a qcow2 image: {path}")
    return int.from_bytes(header[24:32], "big")


if TYPE_CHECKING:  # mypy proves that QemuDriver fulfils the Driver contract
    _CONTRACT_CHECK: type[Driver] = QemuDriver
