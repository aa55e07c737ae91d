"""How VMM processes are confined (no Django): an unprivileged user and a cgroup per VMM.

The privileged side (workers and hostd, as root) does the plumbing: it creates the VMM's
cgroup with its limits (``vms.vmm.cgroups``), opens TAP devices and snapshot state files
and hands them over as file descriptors, and gives the VMM user the runtime directory.
The launcher of ``process.spawn_detached`` then, in the child that becomes the VMM: joins
the cgroup, drops to the VMM user (``setgroups``/``setgid``/``setuid``), sets
``no_new_privs``, checks that the files the VMM needs are readable for that user, and
execs. QEMU adds its own seccomp filter (``-sandbox``), cloud-hypervisor its own
(``--seccomp true``).

File ownership (``runtime_dir_hand_over``): the runtime directory stays root's, group =
the VMM user's group, mode ``1770`` (sticky): the VMM creates its sockets and logs there,
but cannot delete or replace our files (``spec.json``, ``vmm.pid``, ``vmm.log``). Files the
VMM writes (its overlay, ``serial.log``) are the VMM user's. Frozen snapshot layers are
given back to root, readable by the VMM group only (``file_reclaim``): every VMM runs as
the same user, so a layer another VM (a clone) builds on must not stay writable for it.

``VmmConfinement()`` (no user, no cgroup parent) confines nothing: VMMs run as the caller,
which is what drivers do without a confinement argument (tests of the driver alone,
development machines).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from .base import VmmError, VmSpec
from .cgroups import CgroupLimits, VmmCgroup, cgroup_name, vmm_cgroup_create, vmm_cgroup_remove

logger = logging.getLogger(__name__)

DEFAULT_USER = "msbx-vmm"
DEFAULT_CGROUP_PARENT = "microvm-sandbox"
KVM_GROUP = "kvm"
# Measured under TCG (docs/security.md): QEMU's own RSS next to the guest's RAM is ~40-60 MiB
# plus the TCG translation cache (tb-size, 64 MiB here), page cache of the overlay counts too.
DEFAULT_MEMORY_OVERHEAD_MIB = 256
DEFAULT_PIDS_MAX = 256
DEFAULT_IO_WEIGHT = 100
RUNTIME_DIR_MODE = 0o1770


@dataclass(frozen=True)
class VmmUser:
    """A resolved VMM user: ``uid``, primary ``gid`` and supplementary ``groups``."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class VmmConfinement:
    """Confinement settings handed to drivers (``SANDBOX_VMM_*``).

    ``user``: run VMMs as this user ("" = as the caller). ``cgroup_parent``: put each VMM
    in a cgroup below this path of the cgroup hierarchies ("" = no cgroups).
    ``memory_overhead_mib`` is added to the guest's RAM for the memory limit (the VMM's own
    memory and page cache); ``pids_max`` bounds its threads; ``io_weight`` its I/O share;
    ``cpu_allowance`` the CPUs it may use per vCPU (1.0: exactly its vCPUs)."""

    user: str = ""
    cgroup_parent: str = ""
    memory_overhead_mib: int = DEFAULT_MEMORY_OVERHEAD_MIB
    pids_max: int = DEFAULT_PIDS_MAX
    io_weight: int = DEFAULT_IO_WEIGHT
    cpu_allowance: float = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.cgroup_parent)

    def vmm_user(self) -> VmmUser | None:
        """The VMM user, resolved (``None``: run as the caller). ``VmmError`` when it does not
        exist, or when switching to it needs root and we are not."""
        if not self.user:
            return None
        resolved = resolve_user(self.user)
        if os.geteuid() != 0 and resolved.uid != os.geteuid():
            raise VmmError(
                f"running VMMs as {self.user!r} needs root; set SANDBOX_VMM_USER= (empty) to run them as yourself",
                details={"user": self.user},
            )
        return resolved

    def limits_for(self, spec: VmSpec) -> CgroupLimits:
        """The cgroup limits of ``spec``'s VMM: its vCPUs, its RAM (the most it can grow to)
        plus the overhead, ``pids_max`` and ``io_weight``."""
        memory_mib = max(spec.memory_mib, spec.max_memory_mib) + self.memory_overhead_mib
        return CgroupLimits(
            cpus=max(spec.vcpus, spec.max_vcpus) * self.cpu_allowance,
            memory_bytes=memory_mib << 20,
            pids_max=self.pids_max + 2 * max(spec.vcpus, spec.max_vcpus),
            io_weight=self.io_weight,
        )

    def cgroup_name(self, spec: VmSpec) -> str:
        return cgroup_name(spec.vm_id, spec.runtime_dir)

    def cgroup_create(self, spec: VmSpec) -> VmmCgroup | None:
        """Create ``spec``'s cgroup with its limits (``None`` without cgroups; see
        ``cgroups.vmm_cgroup_create``)."""
        if not self.cgroup_parent:
            return None
        return vmm_cgroup_create(self.cgroup_parent, self.cgroup_name(spec), self.limits_for(spec))

    def cgroup_remove(self, spec: VmSpec) -> None:
        """Remove ``spec``'s cgroup once its VMM is gone (a no-op without cgroups)."""
        if self.cgroup_parent:
            vmm_cgroup_remove(self.cgroup_parent, self.cgroup_name(spec))

    def launch_plan(self, spec: VmSpec, *, readable: list[Path]) -> LaunchPlan | None:
        """Everything the launcher needs to confine ``spec``'s VMM (``None``: nothing to do):
        the cgroup (created now, with its limits), the user, and the files the VMM must be
        able to read (checked after the privileges are dropped, for a clear error)."""
        if not self.enabled:
            return None
        user = self.vmm_user()
        group = self.cgroup_create(spec)
        if user is not None:
            runtime_dir_hand_over(spec.runtime_dir, user)
        return LaunchPlan(
            user=user,
            cgroup_procs=group.procs_files if group is not None else (),
            readable=tuple(str(p) for p in readable),
            writable_dirs=(str(spec.runtime_dir.resolve()),) if user is not None else (),
            cgroup=group,
        )

    def give(self, path: Path) -> None:
        """Make ``path`` (a file the VMM writes: overlay, logs) the VMM user's, mode 0600/0700."""
        user = self.vmm_user()
        if user is not None:
            file_give(path, user)

    def reclaim(self, path: Path) -> None:
        """Make ``path`` (a frozen layer, a finished snapshot; recursively) root's, readable
        for the VMM user's group and nobody else: VMMs restore from it, none can change it."""
        user = self.vmm_user()
        if user is not None:
            file_reclaim(path, user.gid)


@dataclass(frozen=True)
class LaunchPlan:
    """What ``process.spawn_detached``'s launcher does before exec (see the module doc)."""

    user: VmmUser | None
    cgroup_procs: tuple[Path, ...] = ()
    readable: tuple[str, ...] = ()
    writable_dirs: tuple[str, ...] = ()
    cgroup: VmmCgroup | None = None

    def to_launcher(self) -> dict[str, object]:
        """The plan as the launcher reads it (JSON-able)."""
        return {
            "uid": self.user.uid if self.user else None,
            "gid": self.user.gid if self.user else None,
            "groups": list(self.user.groups) if self.user else [],
            "cgroup_procs": [str(p) for p in self.cgroup_procs],
            "readable": list(self.readable),
            "writable_dirs": list(self.writable_dirs),
            "no_new_privs": True,
        }


def resolve_user(name: str) -> VmmUser:
    """``name`` (or a numeric uid) resolved with its groups, plus the ``kvm`` group when it
    exists (``/dev/kvm`` access by group). ``VmmError`` when the user does not exist."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError) as exc:
        raise VmmError(
            f"the VMM user {name!r} does not exist: create it with scripts/install-system-packages.sh "
            "(make run / make test do), or set SANDBOX_VMM_USER= (empty) to run VMMs as the caller",
            details={"user": name},
        ) from exc
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    try:
        groups.add(grp.getgrnam(KVM_GROUP).gr_gid)
    except KeyError:
        pass
    return VmmUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=tuple(sorted(groups)))


def runtime_dir_hand_over(runtime_dir: Path, user: VmmUser) -> None:
    """Let the VMM user create files in ``runtime_dir`` (root-owned, its group, ``1770``)
    and own the files in it that the VMM writes (overlays, ``serial.log``, CH's event file)."""
    os.chown(runtime_dir, 0, user.gid)
    os.chmod(runtime_dir, RUNTIME_DIR_MODE)
    for name in ("overlay.qcow2", "overlay.raw", "serial.log", "events.json"):
        path = runtime_dir / name
        if path.exists():
            file_give(path, user)


def file_give(path: Path, user: VmmUser) -> None:
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    if not path.is_symlink():
        os.chmod(path, 0o700 if path.is_dir() else 0o600)


def file_reclaim(path: Path, gid: int) -> None:
    """Root's, readable (not writable) for group ``gid``, nothing for others; recursively
    for a directory."""
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += list(path.rglob("*"))
    for item in paths:
        if item.is_symlink():
            continue
        os.chown(item, 0, gid)
        os.chmod(item, 0o750 if item.is_dir() else 0o640)
