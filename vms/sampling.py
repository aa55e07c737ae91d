"""Resource sampling of running VMs on this host (beat job), kept for a bounded window."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from vms import hypervisor
from vms.models import VM, ResourceSample, VmState
from vms.vmm.base import VmmError

logger = logging.getLogger(__name__)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_usage(pid: int) -> tuple[float, int] | None:
    """CPU seconds (user+system) and RSS bytes of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as fh:
            rss_pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return cpu, rss_pages * os.sysconf("SC_PAGE_SIZE")


def _net_counters(vm: VM) -> tuple[int, int]:
    from vms.hooks import hook_run

    counters: dict = {}
    try:
        for extra in hook_run("vm_counters", vm=vm):
            counters.update(extra or {})
    except Exception:  # networking is optional for sampling
        return 0, 0
    rx = sum(c.get("rx_bytes", 0) for c in counters.values())
    tx = sum(c.get("tx_bytes", 0) for c in counters.values())
    return rx, tx


def vms_sample(host) -> int:
    """Take one sample of every running VM on ``host``; drop samples past the retention."""
    taken = 0
    for vm in VM.objects.filter(host=host, state__in=[VmState.RUNNING, VmState.PAUSED]).select_related(
        "template__image"
    ):
        if not vm.vmm_pid:
            continue
        usage = _process_usage(vm.vmm_pid)
        if usage is None:
            continue
        disk_read = disk_write = 0
        try:
            counters = hypervisor.driver_for(vm.driver).counters(hypervisor.vm_spec(vm), timeout=2.0)
        except VmmError:
            counters = {}
        for name, values in counters.items():
            if name.startswith("block"):
                disk_read += values.get("read_bytes", 0)
                disk_write += values.get("write_bytes", 0)
        rx, tx = _net_counters(vm)
        ResourceSample.objects.create(
            vm=vm,
            cpu_seconds=usage[0],
            rss_bytes=usage[1],
            memory_bytes=vm.memory_mib * 1024 * 1024,
            disk_read_bytes=disk_read,
            disk_write_bytes=disk_write,
            net_rx_bytes=rx,
            net_tx_bytes=tx,
        )
        taken += 1
    cutoff = timezone.now() - timedelta(seconds=settings.SANDBOX_SAMPLE_RETENTION_SECONDS)
    ResourceSample.objects.filter(vm__host=host, taken_at__lt=cutoff).delete()
    return taken


def samples_as_rates(samples: list[ResourceSample]) -> list[dict]:
    """Consecutive samples -> CPU % of one core, RSS MiB and I/O rates in bytes/s."""
    points = []
    for prev, cur in zip(samples, samples[1:], strict=False):
        dt = (cur.taken_at - prev.taken_at).total_seconds()
        if dt <= 0 or cur.cpu_seconds < prev.cpu_seconds:  # VMM restarted between them
            continue
        points.append(
            {
                "t": cur.taken_at.isoformat(),
                "cpu_percent": round(100 * (cur.cpu_seconds - prev.cpu_seconds) / dt, 1),
                "rss_mib": round(cur.rss_bytes / 1048576, 1),
                "memory_mib": cur.memory_bytes // 1048576,
                "disk_read_bps": max(0, round((cur.disk_read_bytes - prev.disk_read_bytes) / dt)),
                "disk_write_bps": max(0, round((cur.disk_write_bytes - prev.disk_write_bytes) / dt)),
                "net_rx_bps": max(0, round((cur.net_rx_bytes - prev.net_rx_bytes) / dt)),
                "net_tx_bps": max(0, round((cur.net_tx_bytes - prev.net_tx_bytes) / dt)),
            }
        )
    return points
