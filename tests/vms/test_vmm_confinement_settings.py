"""The SANDBOX_VMM_* settings reach the drivers (vms.hypervisor is the only place that reads them)."""

from __future__ import annotations

from vms.hypervisor import driver_for


def test_it_hands_the_vmm_settings_to_every_driver(settings) -> None:
    settings.SANDBOX_VMM_USER = "someone"
    settings.SANDBOX_VMM_CGROUP = "parent/vms"
    settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB = 123
    settings.SANDBOX_VMM_PIDS_MAX = 77
    settings.SANDBOX_VMM_IO_WEIGHT = 500
    for name in ("qemu", "cloud-hypervisor"):
        confinement = driver_for(name).confinement  # type: ignore[attr-defined]
        assert (confinement.user, confinement.cgroup_parent) == ("someone", "parent/vms")
        assert (confinement.memory_overhead_mib, confinement.pids_max, confinement.io_weight) == (123, 77, 500)


def test_an_empty_user_runs_vmms_as_the_caller(settings) -> None:
    settings.SANDBOX_VMM_USER = ""
    settings.SANDBOX_VMM_CGROUP = ""
    confinement = driver_for("qemu").confinement  # type: ignore[attr-defined]
    assert confinement.vmm_user() is None and not confinement.enabled
