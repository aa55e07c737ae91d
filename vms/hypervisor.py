"""Django-side glue to the Django-free driver package: picks the driver (settings reach it
as constructor arguments) and builds the ``VmSpec`` of a VM from the database. The only
module of the app that imports ``vms.vmm`` drivers. Callers branch on
``driver_capabilities(name)``, never on driver names."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from django.conf import settings

from vms.models import VM
from vms.vmm.base import DEFAULT_MTU, Driver, DriverCapabilities, NicDevice, VmSpec
from vms.vmm.confinement import VmmConfinement

logger = logging.getLogger(__name__)

SERIAL_TAIL_BYTES = 64 * 1024


@functools.cache
def driver_name_select() -> str:
    """SANDBOX_HYPERVISOR=auto picks cloud-hypervisor when its binary is installed and
    hardware KVM is usable, else QEMU."""
    wanted = settings.SANDBOX_HYPERVISOR
    if wanted in ("qemu", "cloud-hypervisor"):
        return wanted
    from vms.vmm.cloud_hypervisor import cloud_hypervisor_available

    return "cloud-hypervisor" if cloud_hypervisor_available(settings.SANDBOX_CLOUD_HYPERVISOR_BINARY) else "qemu"


def vmm_confinement() -> VmmConfinement:
    """The VMMs' user and cgroup limits from the ``SANDBOX_VMM_*`` settings."""
    return VmmConfinement(
        user=settings.SANDBOX_VMM_USER,
        cgroup_parent=settings.SANDBOX_VMM_CGROUP,
        memory_overhead_mib=settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB,
        pids_max=settings.SANDBOX_VMM_PIDS_MAX,
        io_weight=settings.SANDBOX_VMM_IO_WEIGHT,
    )


def driver_for(name: str) -> Driver:
    if name == "cloud-hypervisor":
        from vms.vmm.cloud_hypervisor import CloudHypervisorDriver

        return CloudHypervisorDriver(
            binary=settings.SANDBOX_CLOUD_HYPERVISOR_BINARY,
            firmware=settings.SANDBOX_CLOUD_HYPERVISOR_FIRMWARE,
            confinement=vmm_confinement(),
        )
    if name == "qemu":
        from vms.vmm.qemu import QemuDriver

        return QemuDriver(
            accel=settings.SANDBOX_ACCEL,
            ovmf_code=settings.SANDBOX_QEMU_OVMF_CODE,
            ovmf_vars=settings.SANDBOX_QEMU_OVMF_VARS,
            confinement=vmm_confinement(),
        )
    if name == "fake":
        from vms.vmm.fake import FakeDriver

        return FakeDriver()
    raise ValueError(f"unknown driver {name!r}")


def driver_capabilities(name: str) -> DriverCapabilities:
    """What driver ``name`` can do (``""``: the driver this host would pick)."""
    return driver_for(name or driver_name_select()).capabilities()


def driver_boot_modes(name: str) -> list[str]:
    """The boot modes driver ``name`` can run on this machine, as configured: direct kernel
    boot always; UEFI firmware boot when its firmware is there (QEMU: the OVMF code and
    variable store; cloud-hypervisor: ``SANDBOX_CLOUD_HYPERVISOR_FIRMWARE``). The host's
    heartbeat reports them and placement matches them with the image's ``boot_mode``."""
    from vms.vmm.base import BOOT_KERNEL, BOOT_UEFI

    if name == "qemu":
        firmware = [settings.SANDBOX_QEMU_OVMF_CODE, settings.SANDBOX_QEMU_OVMF_VARS]
    elif name == "cloud-hypervisor":
        firmware = [settings.SANDBOX_CLOUD_HYPERVISOR_FIRMWARE]
    else:  # the fake driver runs anything
        firmware = []
    uefi = all(path and Path(path).is_file() for path in firmware)
    return [BOOT_KERNEL, BOOT_UEFI] if uefi else [BOOT_KERNEL]


def runtime_dir(vm_id) -> Path:
    return Path(settings.SANDBOX_RUNTIME_DIR) / str(vm_id)


def vm_spec(vm: VM) -> VmSpec:
    from vms.hooks import hook_first

    image = vm.boot_image
    nics = hook_first("vm_nics", vm=vm) or []
    nic = nics[0] if nics else None
    cmdline = " ".join(
        part
        for part in (
            vm.template.kernel_cmdline,
            f"sandbox.hostname={vm.name}",
            f"sandbox.vm_id={vm.pk}",
            nic.kernel_args if nic else "",
        )
        if part
    )
    return VmSpec(
        vm_id=str(vm.pk),
        runtime_dir=runtime_dir(vm.pk),
        kernel=Path(image.kernel_path),
        initramfs=Path(image.initramfs_path) if image.initramfs_path else None,
        base_image=Path(image.rootfs_path),
        cmdline=cmdline,
        vcpus=vm.vcpus,
        max_vcpus=max(vm.vcpus, vm.template.max_vcpus),
        memory_mib=vm.memory_mib,
        max_memory_mib=max(vm.memory_mib, vm.template.max_memory_mib),
        disk_gib=vm.disk_gib,
        tap=nic.tap if nic else None,
        mac=nic.mac if nic else None,
        extra_nics=tuple(NicDevice(tap=n.tap, mac=n.mac, device_id=n.device_id) for n in nics[1:]),
        nic_mtu=nic.mtu if nic else DEFAULT_MTU,
        # Every VMM of this host runs in the namespace of our bridges and TAPs.
        netns=settings.SANDBOX_NETNS or None,
        **image_boot_args(image),
    )


def image_boot_args(image) -> dict:
    """The ``VmSpec`` fields that come from the image: boot mode, OS type, base disk format
    and, for Windows, the virtio-win driver ISO as a CD-ROM (when the operator set one)."""
    cdroms: tuple[str, ...] = ()
    if image.os_type == "windows" and settings.SANDBOX_VIRTIO_WIN_ISO:
        cdroms = (settings.SANDBOX_VIRTIO_WIN_ISO,)
    return {
        "boot_mode": image.boot_mode,
        "os_type": image.os_type,
        "extra": {"base_format": image.disk_format},
        "cdroms": cdroms,
    }


def serial_tail(vm_id, *, lines: int = 50) -> str:
    """Last lines the guest wrote to its serial port (from the on-disk log)."""
    path = runtime_dir(vm_id) / "serial.log"
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - SERIAL_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])
