"""Django-side glue to the Django-free driver package: picks the driver and builds the
``VmSpec`` of a VM from the database. The only module of the app that imports ``vms.vmm``
drivers."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from django.conf import settings

from vms.models import VM
from vms.vmm.base import Driver, VmSpec

logger = logging.getLogger(__name__)

HOTPLUG_DRIVERS = {"cloud-hypervisor"}
SERIAL_TAIL_BYTES = 64 * 1024


def driver_supports_hotplug(name: str) -> bool:
    return name in HOTPLUG_DRIVERS


@functools.cache
def driver_name_select() -> str:
    """SANDBOX_HYPERVISOR=auto picks cloud-hypervisor when its binary is installed and
    hardware KVM is usable, else QEMU."""
    wanted = settings.SANDBOX_HYPERVISOR
    if wanted in ("qemu", "cloud-hypervisor"):
        return wanted
    from vms.vmm.cloud_hypervisor import cloud_hypervisor_available

    return "cloud-hypervisor" if cloud_hypervisor_available(settings.SANDBOX_CLOUD_HYPERVISOR_BINARY) else "qemu"


def driver_for(name: str) -> Driver:
    if name == "cloud-hypervisor":
        from vms.vmm.cloud_hypervisor import CloudHypervisorDriver

        return CloudHypervisorDriver(binary=settings.SANDBOX_CLOUD_HYPERVISOR_BINARY)
    if name == "qemu":
        from vms.vmm.qemu import QemuDriver

        return QemuDriver()
    if name == "fake":
        from vms.vmm.fake import FakeDriver

        return FakeDriver()
    raise ValueError(f"unknown driver {name!r}")


def runtime_dir(vm_id) -> Path:
    return Path(settings.SANDBOX_RUNTIME_DIR) / str(vm_id)


def vm_spec(vm: VM) -> VmSpec:
    from vms.hooks import hook_first

    image = vm.template.image
    nic = hook_first("vm_nic", vm=vm)
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
        # Every VMM of this host runs in the namespace of our bridges and TAPs.
        netns=settings.SANDBOX_NETNS or None,
    )


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


def agent_transport(driver_name: str):
    from vms.vmm.agent_client import AgentTransport

    return AgentTransport.HYBRID_VSOCK if driver_name == "cloud-hypervisor" else AgentTransport.VIRTIO_SERIAL


def agent_wait(spec: VmSpec, driver_name: str, *, timeout: float) -> dict:
    """Block until the guest agent answers a ping (a VM is ``running`` only then).

    Through hostd when it runs (it holds the one agent connection, and this registers the
    VM with it); directly otherwise."""
    from vms.hostd.client import HostdError, HostdUnavailable
    from vms.vmm.agent_client import AgentTimeout, wait_for_agent

    try:
        with _hostd(timeout) as client:
            return client.agent_wait(spec.vm_id, timeout=timeout)
    except HostdUnavailable:
        return wait_for_agent(spec, agent_transport(driver_name), timeout)
    except HostdError as exc:
        raise AgentTimeout(f"guest agent did not answer within {timeout:.0f}s ({exc.message})") from exc


def agent_ping(spec: VmSpec, driver_name: str, *, timeout: float = 5.0) -> dict:
    """Ping through hostd when it runs, directly otherwise; raises ``AgentError``."""
    from vms.hostd.client import HostdError, HostdUnavailable
    from vms.vmm.agent_client import AgentError
    from vms.vmm.agent_client import agent_ping as ping

    try:
        with _hostd(timeout) as client:
            return client.agent(spec.vm_id, "ping", timeout=timeout)[0]
    except HostdUnavailable:
        return ping(spec, agent_transport(driver_name), timeout=timeout)
    except HostdError as exc:
        raise AgentError(exc.message, details={"code": exc.code}) from exc


def _hostd(timeout: float):
    from vms.hostd.client import HostdClient

    client = HostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=timeout + 5)
    client.connect()  # HostdUnavailable when hostd is not running
    return client
