"""Host admission: a VM is launched on a host only if it fits there.

A host admits vCPUs up to ``(cpus - reserve_cpus) x cpu_overcommit`` and memory up to
``(memory - reserve_memory) x memory_overcommit``, where a VM's memory is its guest RAM plus the
VMM's own overhead (``SANDBOX_VMM_MEMORY_OVERHEAD_MIB``, the same figure its cgroup's
``memory.max`` gets). Each host may override the site-wide ratios and reserves
(``SANDBOX_CPU_OVERCOMMIT``, ``SANDBOX_MEMORY_OVERCOMMIT``, ``SANDBOX_HOST_RESERVE_*``).

VMs in ``HOST_LOAD_STATES`` (running, paused, booting, ...; ``creating`` too, since a create
boots) hold their size on their host; a ``moving`` VM on its move's target too
(``vms.selectors.hosts_with_load``, the one place a host's load is summed).
``host_admission_check`` runs inside the request's transaction, under the host row's lock,
before the transition that makes the VM hold its size: two requests cannot both take the last
room. Lock order: the owner's quota lock, then the host,
then VM rows (audit rows take no lock in the request's transaction: ``accounts.audit``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from django.conf import settings

from sandbox_site import metrics
from sandbox_site.errors import ConflictError
from vms.models import VM, Host
from vms.selectors import HOST_LOAD_STATES, hosts_with_load


def machine_capacity() -> tuple[int, int]:
    """This machine's CPUs and memory in MiB (0 where unknown)."""
    memory_mib = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_mib = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 0, memory_mib


@dataclass(frozen=True)
class HostRoom:
    """What a host admits and what its VMs hold (vCPUs; memory in MiB incl. VMM overhead)."""

    vcpus_allowed: int
    memory_allowed_mib: int
    vcpus_used: int
    memory_used_mib: int
    vms: int

    @property
    def vcpus_free(self) -> int:
        return max(0, self.vcpus_allowed - self.vcpus_used)

    @property
    def memory_free_mib(self) -> int:
        return max(0, self.memory_allowed_mib - self.memory_used_mib)


def vm_claim_mib(memory_mib: int) -> int:
    """Host memory a VM of ``memory_mib`` guest RAM is counted for."""
    return memory_mib + settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB


def host_admits(host: Host) -> tuple[int, int]:
    """The vCPUs and memory (MiB) ``host`` admits. A host that never reported its capacity is
    measured here when it is this machine (its worker has not run yet); another one admits
    nothing until it reports."""
    cpus, memory_mib = host.cpus, host.memory_mib
    if (not cpus or not memory_mib) and host.name == settings.SANDBOX_HOST_NAME:
        cpus, memory_mib = machine_capacity()
    cpu_ratio = host.cpu_overcommit if host.cpu_overcommit is not None else settings.SANDBOX_CPU_OVERCOMMIT
    mem_ratio = host.memory_overcommit if host.memory_overcommit is not None else settings.SANDBOX_MEMORY_OVERCOMMIT
    reserve_cpus = host.reserve_cpus if host.reserve_cpus is not None else settings.SANDBOX_HOST_RESERVE_CPUS
    reserve_mib = (
        host.reserve_memory_mib if host.reserve_memory_mib is not None else settings.SANDBOX_HOST_RESERVE_MEMORY_MIB
    )
    return int(max(0, cpus - reserve_cpus) * cpu_ratio), int(max(0, memory_mib - reserve_mib) * mem_ratio)


def host_room_of(host: Host, *, vcpus: int, memory_mib: int, vms: int) -> HostRoom:
    """``host``'s room given what its holding VMs add up to (``vms`` of them, ``vcpus`` and
    ``memory_mib`` of guest RAM): for callers that summed them already (the hosts page)."""
    vcpus_allowed, memory_allowed = host_admits(host)
    return HostRoom(
        vcpus_allowed=vcpus_allowed,
        memory_allowed_mib=memory_allowed,
        vcpus_used=vcpus,
        memory_used_mib=memory_mib + vms * settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB,
        vms=vms,
    )


def host_room(host: Host, *, exclude_vm_id=None) -> HostRoom:
    """The host's admission limits and what the VMs holding their size there use now."""
    used = hosts_with_load(Host.objects.filter(pk=host.pk), exclude_vm_id=exclude_vm_id).get()
    return host_room_of(host, vcpus=used.vcpus_used, memory_mib=used.memory_used_mib, vms=used.vms_holding)


def host_admission_check(*, host: Host, vcpus: int, memory_mib: int, vm: VM | None = None, count: int = 1) -> None:
    """Inside the caller's transaction: lock the host row, then refuse (409 ``host_full``) unless
    ``count`` VMs of ``vcpus``/``memory_mib`` fit next to what the host's VMs hold. ``vm`` is the
    VM about to hold that size (start, restore, resize): what it holds now is not counted twice,
    and a resource its action does not grow is never the reason for a refusal."""
    locked = Host.objects.select_for_update().get(pk=host.pk)
    check_vcpus = check_memory = True
    if vm is not None:
        current = VM.objects.filter(pk=vm.pk).values("state", "vcpus", "memory_mib", "host_id").first()
        # It holds its size here already (a moving VM landing here is admitted as new).
        if current and current["state"] in HOST_LOAD_STATES and current["host_id"] == locked.pk:
            check_vcpus, check_memory = vcpus > current["vcpus"], memory_mib > current["memory_mib"]
    if not (check_vcpus or check_memory):
        return
    room = host_room(locked, exclude_vm_id=vm.pk if vm is not None else None)
    want_vcpus, want_mib = vcpus * count, vm_claim_mib(memory_mib) * count
    over = {}
    if check_vcpus and want_vcpus > room.vcpus_free:
        over["vcpus"] = f"{room.vcpus_used} of {room.vcpus_allowed} vCPUs held + {want_vcpus} asked"
    if check_memory and want_mib > room.memory_free_mib:
        over["memory_mib"] = f"{room.memory_used_mib} of {room.memory_allowed_mib} MiB held + {want_mib} asked"
    if over:
        for resource in over:
            metrics.ADMISSION_DENIALS.labels(locked.name, resource).inc()
        raise ConflictError(
            f"Host {locked.name} has no room for this VM now; stop another VM or ask an operator.",
            code="host_full",
            details={"host": locked.name, **over},
        )
