"""Driver interface shared by every VMM driver.

This package imports nothing from Django and reads no environment variables: configuration
comes in as arguments (driver constructor arguments such as ``accel``, and a ``VmSpec``) and
results go out as plain dataclasses, so it can be tested alone. Callers branch on
``Driver.capabilities()``, never on driver names.

Runtime directory layout (one directory per VM, created by ``Driver.prepare``):

- ``spec.json``     the VmSpec the VM was launched with (lets any process re-attach)
- ``vmm.pid``       pid of the VMM process
- ``vmm.log``       VMM stdout/stderr
- ``api.sock``      cloud-hypervisor REST API socket, or ``qmp.sock`` for QEMU
- ``serial.sock``   serial port socket (input and live output)
- ``serial.log``    everything the guest wrote to the serial port (nothing lost while nobody is connected)
- ``agent.sock``    guest agent socket (CH hybrid vsock, or QEMU virtio-serial chardev)
- ``overlay.qcow2`` / ``overlay.raw``  the VM's copy-on-write disk layer on top of the base image
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .snapshot import SnapshotMeta


class VmmError(Exception):
    """Base error of the driver package. ``message`` is safe to show to users."""

    def __init__(self, message: str, *, details: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class VmmStateError(VmmError):
    """The VMM refused the action in its current state (e.g. pause a stopped VM)."""


class VmmUnsupported(VmmError):
    """The driver cannot do this (e.g. memory hotplug on QEMU microvm); a restart is needed."""


class VmmTimeout(VmmError):
    """The VMM did not answer in time."""


class VmmNotRunning(VmmError):
    """No VMM process is running for this VM."""


class VmmInvalidRequest(VmmError):
    """The request cannot be satisfied by this VMM as it runs now (e.g. a memory size that
    is not a multiple of the hotplug step); the caller's input is wrong, not the VMM."""


class RuntimeState(str, enum.Enum):
    """What the VMM says about the VM, normalised across drivers."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    GONE = "gone"  # no VMM process


BOOT_KERNEL = "kernel"  # direct kernel boot: ``kernel`` + ``initramfs`` + ``cmdline``, base disk = root fs
BOOT_UEFI = "uefi"  # UEFI firmware boots the base disk (GPT + EFI system partition); kernel unused
BOOT_MODES = (BOOT_KERNEL, BOOT_UEFI)
OS_LINUX = "linux"
OS_WINDOWS = "windows"
# Words of ``VmSpec.cmdline`` with this prefix reach a firmware-booted guest as SMBIOS
# OEM strings (type 11): its own boot loader owns the kernel command line.
GUEST_ARG_PREFIX = "sandbox."
DEFAULT_MTU = 1500  # Ethernet's; what guests' NICs get unless a host's tunnels need less
MIN_MTU = 1280  # IPv6's minimum: a smaller link would carry IPv4 only


@dataclass(frozen=True)
class NicDevice:
    """A NIC after the first (``VmSpec.tap``/``mac``): its TAP, MAC and VMM device id
    (``net<index>``, what a hot-unplug names)."""

    tap: str
    mac: str
    device_id: str


@dataclass(frozen=True)
class VmSpec:
    """Everything a driver needs to launch one VM.

    ``boot_mode`` is ``BOOT_KERNEL`` (direct kernel boot) or ``BOOT_UEFI`` (firmware boots
    ``base_image``; ``kernel``/``initramfs`` are ignored and the ``sandbox.*`` words of
    ``cmdline`` travel as SMBIOS OEM strings, see ``guest_oem_strings``). ``os_type`` picks
    guest-specific devices (Hyper-V enlightenments for Windows). ``cdroms`` are read-only ISO
    images attached as CD-ROMs (e.g. the virtio-win drivers) where the VMM has CD-ROMs.
    ``extra["base_format"]`` is the base image's format (``raw`` default, or ``qcow2``).
    """

    vm_id: str
    runtime_dir: Path
    kernel: Path
    base_image: Path
    initramfs: Path | None = None
    cmdline: str = ""
    vcpus: int = 1
    max_vcpus: int = 1
    memory_mib: int = 256
    max_memory_mib: int = 256
    disk_gib: int = 1
    mac: str | None = None
    tap: str | None = None
    extra_nics: tuple[NicDevice, ...] = ()  # further NICs, in guest order
    # MTU of every NIC as the guest sees it (virtio ``host_mtu`` / cloud-hypervisor ``mtu``):
    # below 1500 on a host whose networks cross hosts over an underlay too small for 1500-byte
    # frames plus VXLAN's 50 bytes (docs/scale-out.md).
    nic_mtu: int = DEFAULT_MTU
    netns: str | None = None  # network namespace (under /run/netns) the VMM runs in; None = ours
    vsock_cid: int = 3
    extra: dict[str, str] = field(default_factory=dict)
    boot_mode: str = BOOT_KERNEL
    os_type: str = OS_LINUX
    cdroms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.boot_mode not in BOOT_MODES:
            raise ValueError(f"unknown boot mode {self.boot_mode!r}")
        if self.os_type not in (OS_LINUX, OS_WINDOWS):
            raise ValueError(f"unknown OS type {self.os_type!r}")
        if self.os_type == OS_WINDOWS and self.boot_mode != BOOT_UEFI:
            raise ValueError("Windows guests boot through UEFI firmware only")
        if not MIN_MTU <= self.nic_mtu <= DEFAULT_MTU:
            raise ValueError(f"NIC MTU {self.nic_mtu} is outside {MIN_MTU}-{DEFAULT_MTU}")

    @property
    def base_format(self) -> str:
        """Format of ``base_image``: ``raw`` unless ``extra["base_format"]`` says ``qcow2``."""
        return self.extra.get("base_format", "raw")

    def guest_oem_strings(self) -> list[str]:
        """The ``sandbox.*`` words of ``cmdline`` (hostname, VM id, network): what a
        firmware-booted guest reads from SMBIOS type 11 instead of ``/proc/cmdline``."""
        return [word for word in self.cmdline.split() if word.startswith(GUEST_ARG_PREFIX)]

    def to_json(self) -> str:
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, Path):
                data[key] = str(value)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VmSpec:
        data = json.loads(text)
        for key in ("runtime_dir", "kernel", "base_image"):
            data[key] = Path(data[key])
        if data.get("initramfs"):
            data["initramfs"] = Path(data["initramfs"])
        data["cdroms"] = tuple(data.get("cdroms") or ())
        data["extra_nics"] = tuple(NicDevice(**nic) for nic in data.get("extra_nics") or ())
        return cls(**data)


class AgentTransport(str, enum.Enum):
    """How the host reaches the guest agent: QEMU's virtio-serial chardev socket, or
    cloud-hypervisor's hybrid vsock (``CONNECT <port>`` handshake first)."""

    VIRTIO_SERIAL = "virtio-serial"
    HYBRID_VSOCK = "hybrid-vsock"


@dataclass(frozen=True)
class DriverCapabilities:
    """What a driver can do, so callers branch on abilities, never on driver names."""

    live_resize: bool  # vCPU/memory hotplug on a running VM (else: stop, resize, start)
    memory_hotplug_step_mib: int  # hot-added memory must be a multiple of this (0: no hotplug)
    nic_hotplug: bool
    memory_snapshot: bool  # snapshots can include guest RAM and device state
    shared_disk_layers: bool  # a snapshot freezes the overlay as a shared backing layer (else a private copy)
    agent_transport: AgentTransport
    # Snapshots without guest memory (``include_memory=False``) are possible; a driver that
    # does not say so is assumed to always save memory.
    disk_only_snapshot: bool = False
    # A running VM can move to another host (``migrate_*``); a driver that does not say so cannot.
    live_migration: bool = False
    # How its disk travels: "mirror" (the driver copies it during the migration, no shared
    # storage) or "shared" (it must already be at the same path on the target host).
    live_migration_disk: str = ""


MIGRATION_DISK_MIRROR = "mirror"
MIGRATION_DISK_SHARED = "shared"


@dataclass(frozen=True)
class MigrationTarget:
    """What the receiving side of a live migration tells the sending side: where the target
    VMM listens (``host``:``port``, plain TCP on the hosts' underlay) and, when the driver
    copies the disk itself (``live_migration_disk == "mirror"``), the NBD export the source
    mirrors the disk into (``disk_port``, ``disk_export``), the target disk's virtual size
    and the backing chain below it (the source copies only its top layer when its own chain
    is the same, else the whole disk). Plain data: it travels between the hosts' tasks as
    ``to_dict()`` / ``from_dict()``."""

    driver: str
    host: str
    port: int
    disk_port: int | None = None
    disk_export: str = ""
    disk_size: int = 0
    backing_chain: tuple[str, ...] = ()
    acceleration: str = ""  # the target VMM's ("kvm"/"tcg"): the source's must be the same
    vmm_version: str = ""
    runtime_dir: str = ""  # the VM's runtime directory on the target host
    tls: bool = False  # the target only takes the stream (and the disk) over TLS

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["backing_chain"] = list(self.backing_chain)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> MigrationTarget:
        chain = data.get("backing_chain") or ()
        disk_port = data.get("disk_port")
        return cls(
            driver=str(data["driver"]),
            host=str(data["host"]),
            port=int(str(data["port"])),
            disk_port=None if disk_port is None else int(str(disk_port)),
            disk_export=str(data.get("disk_export") or ""),
            disk_size=int(str(data.get("disk_size") or 0)),
            backing_chain=tuple(str(p) for p in chain) if isinstance(chain, (list, tuple)) else (),
            acceleration=str(data.get("acceleration") or ""),
            vmm_version=str(data.get("vmm_version") or ""),
            runtime_dir=str(data.get("runtime_dir") or ""),
            tls=bool(data.get("tls")),
        )


@dataclass(frozen=True)
class MigrationTls:
    """Certificates that encrypt and authenticate a migration (PEM files): the CA both ends
    trust, and this end's certificate and key (the target's a server certificate naming its
    listen address, the source's a client certificate). Each end verifies the other."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class MigrationResult:
    """What the sending side measured: total time, the time the guest stood still (as the
    VMM reports it; 0 when it does not), bytes sent (memory + device state, and the disk
    copy), and how the disk was copied (``"top"``, ``"full"`` or ``"shared"``)."""

    total_ms: int
    downtime_ms: int
    ram_bytes: int
    disk_bytes: int
    disk_sync: str


@dataclass(frozen=True)
class LaunchResult:
    pid: int
    driver: str
    acceleration: str  # "kvm" or "tcg"
    vmm_version: str = ""


@dataclass(frozen=True)
class VmRuntimeInfo:
    state: RuntimeState
    pid: int | None
    vcpus: int | None = None
    memory_mib: int | None = None
    raw: dict[str, object] = field(default_factory=dict)
    # Why the VM is in this state when the VMM told us (e.g. "guest powered off",
    # "guest panic: ..."); empty when unknown.
    reason: str = ""


class Driver(Protocol):
    """One VMM driver. All methods are blocking, bounded by timeouts, and safe to call
    from any process: state lives in the runtime directory, not in the driver object."""

    name: str

    def prepare(self, spec: VmSpec) -> None:
        """Create the runtime directory and the copy-on-write overlay. Idempotent."""

    def launch(self, spec: VmSpec, *, timeout: float = 30.0) -> LaunchResult:
        """Spawn the VMM detached (``process.spawn_detached``: own session, stdin closed, not a
        child of the calling process) and boot the VM."""

    def info(self, spec: VmSpec, *, timeout: float = 5.0) -> VmRuntimeInfo:
        """What the VMM reports now; ``GONE`` when no VMM process runs."""

    def pause(self, spec: VmSpec, *, timeout: float = 10.0) -> None: ...

    def resume(self, spec: VmSpec, *, timeout: float = 10.0) -> None: ...

    def reboot(self, spec: VmSpec, *, timeout: float = 10.0) -> None: ...

    def shutdown(self, spec: VmSpec, *, graceful_timeout: float = 30.0, force: bool = False) -> None:
        """Ask the guest to power off (ACPI), wait up to ``graceful_timeout``, then kill the VMM.
        With ``force`` the VMM is killed at once. Afterwards no VMM process runs."""

    def resize(self, spec: VmSpec, *, vcpus: int | None, memory_mib: int | None, timeout: float = 10.0) -> None:
        """Hotplug CPUs/memory; raises ``VmmUnsupported`` when a restart is needed."""

    def nic_add(self, spec: VmSpec, nic: NicDevice, *, timeout: float = 10.0) -> None:
        """Hot-plug ``nic`` (its TAP exists) into the running VM; ``VmmUnsupported`` when the
        driver or machine cannot (``capabilities().nic_hotplug``): a restart is needed."""

    def nic_remove(self, spec: VmSpec, device_id: str, *, timeout: float = 10.0) -> None:
        """Hot-unplug the NIC ``device_id`` from the running VM; ``VmmUnsupported`` as ``nic_add``."""

    def counters(self, spec: VmSpec, *, timeout: float = 5.0) -> dict[str, dict[str, int]]: ...

    def capabilities(self) -> DriverCapabilities: ...

    def version(self) -> str:
        """The VMM's version string (recorded with snapshots: they are not portable across versions)."""

    def snapshot(
        self, spec: VmSpec, dest_dir: Path, *, include_memory: bool = True, timeout: float = 300.0
    ) -> SnapshotMeta:
        """Pause, save device/RAM state (``include_memory``) and the disk into ``dest_dir``,
        resume; writes ``snapshot.json`` (``vms.vmm.snapshot.SnapshotMeta``, returned) but not
        the manifest. A stopped VM gets a disk-only snapshot."""

    def restore(self, spec: VmSpec, src_dir: Path, *, timeout: float = 120.0) -> LaunchResult:
        """Start ``spec`` (its own identity: sockets, MAC, TAP) from the snapshot in ``src_dir``."""

    def cleanup(self, spec: VmSpec) -> None:
        """Kill any VMM left and remove the runtime directory (sockets, overlay, logs). Idempotent."""

    # Live migration (``capabilities().live_migration``), in this order, each on its own host:
    # target ``migrate_receive_prepare`` -> source ``migrate_send`` -> target
    # ``migrate_receive_finish`` -> source ``cleanup``. On a failure: source ``migrate_cancel``
    # (the VM runs on the source again) and target ``migrate_receive_abort``.

    def migrate_receive_prepare(
        self,
        spec: VmSpec,
        *,
        listen_host: str,
        backing: Path | None = None,
        tls: MigrationTls | None = None,
        timeout: float = 60.0,
    ) -> MigrationTarget:
        """Target host: make ``spec``'s runtime directory (a new disk backed by ``backing``,
        default ``spec.base_image``) and start a VMM that waits for the migration stream on
        ``listen_host`` (this host's underlay address, in ``spec.netns``), over TLS with
        ``tls`` (the source must then send with TLS too). ``VmmStateError`` when a VMM already
        runs for ``spec`` here; ``VmmUnsupported`` without live migration."""
        ...

    def migrate_send(
        self,
        spec: VmSpec,
        target: MigrationTarget,
        *,
        tls: MigrationTls | None = None,
        timeout: float = 600.0,
        downtime_ms: int = 500,
    ) -> MigrationResult:
        """Source host: copy the disk (when the driver mirrors it) and the running VM to
        ``target`` (over TLS with ``tls``, verifying the target's certificate). Returns once
        the target holds everything; the source VMM is left stopped (``cleanup`` removes it).
        On failure or after ``timeout`` the migration is cancelled, the VM runs on here as
        before, and ``VmmError``/``VmmTimeout`` is raised."""
        ...

    def migrate_receive_finish(self, spec: VmSpec, *, timeout: float = 60.0) -> None:
        """Target host, after ``migrate_send`` returned: close the disk export and run the VM
        here. ``VmmError`` when the migration did not complete."""

    def migrate_cancel(self, spec: VmSpec, *, timeout: float = 30.0) -> None:
        """Source host: stop any migration of ``spec`` and let the VM run here again (also
        after ``migrate_send`` returned, as long as the target has not resumed). Idempotent."""

    def migrate_receive_abort(self, spec: VmSpec) -> None:
        """Target host: kill the receiving VMM and remove its runtime directory. Idempotent."""
