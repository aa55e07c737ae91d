"""One cgroup per VMM process: CPU, memory, pids and I/O limits (no Django).

cgroup v2 is used when its hierarchy offers the ``cpu``, ``memory`` and ``pids``
controllers; otherwise the cgroup v1 hierarchies of each controller (a "hybrid" host, where
v2 is mounted at ``/sys/fs/cgroup/unified`` without controllers, is v1 for our purposes).

A VMM's cgroup is ``<hierarchy root>/<parent>/<name>``: ``parent`` is the operator's
setting (``SANDBOX_VMM_CGROUP``), ``name`` comes from the VM (``cgroup_name``), so every
process can find it again from the ``VmSpec`` alone. The limits are written by the
privileged caller (``vmm_cgroup_create``) before the VMM starts; the launcher of
``process.spawn_detached`` writes its own pid into every ``procs_files`` entry before it
drops privileges and execs, so the VMM and all its threads start inside (no window in
which it runs unlimited). ``vmm_cgroup_remove`` deletes the cgroup once the VMM is gone.

Limits:

- cpu: ``vcpus`` CPUs' worth of time per period (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``);
- memory: guest RAM plus the VMM's own overhead (v2 ``memory.max`` and ``memory.swap.max``
  0 where present, v1 ``memory.limit_in_bytes``); the kernel reclaims page cache first and
  OOM-kills the VMM (only it) if the guest plus the VMM really need more;
- pids: ``pids.max`` (threads count; QEMU's block I/O thread pool grows to 64);
- io: a proportional weight (v2 ``io.weight``, v1 ``blkio.bfq.weight`` or ``blkio.weight``)
  where the I/O scheduler offers one; absent otherwise (logged, not an error).

A host whose cgroups are not writable (an unprivileged development machine, a container)
gets a warning in the log and VMMs without limits: ``vmm_cgroup_create`` returns ``None``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_MOUNT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
V2_CONTROLLERS = ("cpu", "memory", "pids")  # needed for v2; "io" is used when present
V1_CONTROLLERS = ("cpu", "memory", "pids", "blkio")
_REMOVE_RETRY_SECONDS = 1.0
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class CgroupLimits:
    """What a VMM may use: ``cpus`` CPUs of time, ``memory_bytes`` of RAM (guest plus
    overhead), ``pids_max`` tasks, ``io_weight`` (1..10000 on v2, clamped to 10..1000 on v1;
    100 is the kernel's default share)."""

    cpus: float
    memory_bytes: int
    pids_max: int
    io_weight: int = 100


@dataclass(frozen=True)
class VmmCgroup:
    """A VMM's cgroup: ``dirs`` (one per v1 controller, or the one v2 directory) and the
    ``procs_files`` the launcher writes its pid into; ``version`` 1 or 2. ``applied`` lists
    the limit files written, ``skipped`` the limits this host cannot apply."""

    version: int
    dirs: tuple[Path, ...]
    applied: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(d / "cgroup.procs" for d in self.dirs)


@dataclass(frozen=True)
class CgroupLayout:
    """Where the hierarchies are: ``v2`` (the cgroup2 mount, if it has our controllers)
    or ``v1`` (controller -> mount point)."""

    v2: Path | None
    v1: dict[str, Path]


def cgroup_name(vm_id: str, runtime_dir: Path) -> str:
    """The cgroup directory name of a VM: its id (made safe for a path) and a short hash of
    its runtime directory, so two deployments (or test runs) with equal ids never share one."""
    digest = hashlib.sha256(str(runtime_dir.resolve()).encode()).hexdigest()[:10]
    return f"{_NAME_RE.sub('_', vm_id)[:64] or 'vm'}-{digest}"


def _parse_mountinfo(text: str) -> tuple[Path | None, dict[str, Path]]:
    v2: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        fstype, options = rfields[0], rfields[2].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup":
            for option in options:
                if option in V1_CONTROLLERS:
                    v1.setdefault(option, mount_point)
    return v2, v1


def cgroup_layout(mountinfo: str | None = None) -> CgroupLayout:
    """The hierarchies of this host (from ``/proc/self/mountinfo``, or ``mountinfo``)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            mountinfo = ""
    v2, v1 = _parse_mountinfo(mountinfo)
    if v2 is not None:
        try:
            available = set((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()
        if not set(V2_CONTROLLERS) <= available:
            v2 = None
    return CgroupLayout(v2=v2, v1=v1)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _parent_parts(parent: str) -> tuple[str, ...]:
    parts = tuple(p for p in parent.strip("/").split("/") if p)
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"cgroup parent {parent!r} must not contain '.' or '..'")
    return parts


def _enable_v2_controllers(root: Path, parts: Iterable[str]) -> None:
    """Delegate cpu/memory/pids (and io) from the root down to ``root/<parts>``; each
    level's ``cgroup.subtree_control`` gets what its ``cgroup.controllers`` offers."""
    here = root
    for part in (None, *parts):
        if part is not None:
            here = here / part
            here.mkdir(exist_ok=True)
        try:
            offered = set((here / "cgroup.controllers").read_text().split())
            enabled = set((here / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        missing = [c for c in (*V2_CONTROLLERS, "io") if c in offered and c not in enabled]
        if missing:
            _write(here / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _create_v2(root: Path, parts: tuple[str, ...], name: str, limits: CgroupLimits) -> VmmCgroup:
    _enable_v2_controllers(root, parts)
    path = root.joinpath(*parts, name)
    path.mkdir(exist_ok=True)
    applied: dict[str, str] = {}
    skipped: list[str] = []
    quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
    values = {
        "cpu.max": f"{quota} {CPU_PERIOD_US}",
        "memory.max": str(limits.memory_bytes),
        "memory.swap.max": "0",
        "pids.max": str(limits.pids_max),
        "io.weight": f"default {max(1, min(10000, limits.io_weight))}",
    }
    for filename, value in values.items():
        target = path / filename
        if not target.exists():
            skipped.append(filename)
            continue
        _write(target, value)
        applied[filename] = value
    return VmmCgroup(version=2, dirs=(path,), applied=applied, skipped=tuple(skipped))


def _create_v1(mounts: dict[str, Path], parts: tuple[str, ...], name: str, limits: CgroupLimits) -> VmmCgroup:
    dirs: list[Path] = []
    applied: dict[str, str] = {}
    skipped: list[str] = []
    quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
    weight = str(max(10, min(1000, limits.io_weight)))
    wanted: dict[str, list[tuple[str, str]]] = {
        # The period first: a quota is checked against the period in place.
        "cpu": [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))],
        "memory": [("memory.limit_in_bytes", str(limits.memory_bytes))],
        "pids": [("pids.max", str(limits.pids_max))],
        "blkio": [("blkio.bfq.weight", weight), ("blkio.weight", weight)],
    }
    for controller, settings in wanted.items():
        mount = mounts.get(controller)
        if mount is None:
            skipped.append(controller)
            continue
        if not mount.is_dir():
            raise FileNotFoundError(errno.ENOENT, "cgroup hierarchy not mounted", str(mount))
        path = mount.joinpath(*parts, name)
        path.mkdir(parents=True, exist_ok=True)
        dirs.append(path)
        wrote = False
        for filename, value in settings:
            target = path / filename
            if controller == "blkio" and wrote:
                break  # one weight file is enough (bfq, else cfq)
            if not target.exists():
                if controller != "blkio":
                    skipped.append(filename)
                continue
            _write(target, value)
            applied[filename] = value
            wrote = True
        if controller == "blkio" and not wrote:
            skipped.append("blkio weight")
    return VmmCgroup(version=1, dirs=tuple(dirs), applied=applied, skipped=tuple(skipped))


def vmm_cgroup_create(
    parent: str, name: str, limits: CgroupLimits, *, layout: CgroupLayout | None = None
) -> VmmCgroup | None:
    """Create (or update) the cgroup ``parent/name`` with ``limits``; ``None`` when this host
    has no writable cgroups (logged as a warning: the VMM then runs without limits).
    Idempotent: a relaunch of the same VM reuses and rewrites its cgroup."""
    parts = _parent_parts(parent)
    layout = layout or cgroup_layout()
    try:
        if layout.v2 is not None:
            group = _create_v2(layout.v2, parts, name, limits)
        elif layout.v1:
            group = _create_v1(layout.v1, parts, name, limits)
        else:
            logger.warning("no cgroup hierarchy found: VMM %s runs without CPU/memory/pids limits", name)
            return None
    except OSError as exc:
        # Not writable (a container, a development machine) or set up in a way we cannot use
        # (e.g. v2 processes in the parent): say so loudly, and launch without limits.
        logger.warning("cgroups are not writable here (%s): VMM %s runs without CPU/memory/pids limits", exc, name)
        return None
    if group.skipped:
        logger.info("cgroup of VMM %s: this host cannot apply %s", name, ", ".join(group.skipped))
    return group


def vmm_cgroup_dirs(parent: str, name: str, *, layout: CgroupLayout | None = None) -> list[Path]:
    """The directories the cgroup ``parent/name`` has (or would have) on this host."""
    parts = _parent_parts(parent)
    layout = layout or cgroup_layout()
    if layout.v2 is not None:
        return [layout.v2.joinpath(*parts, name)]
    return [mount.joinpath(*parts, name) for mount in layout.v1.values()]


def vmm_cgroup_remove(parent: str, name: str, *, layout: CgroupLayout | None = None) -> bool:
    """Remove the cgroup ``parent/name`` (all its controller directories). True when none
    is left; False when a directory still holds processes (the VMM still runs; retried for
    a moment since an exiting VMM leaves it asynchronously) or cannot be removed."""
    gone = True
    for path in vmm_cgroup_dirs(parent, name, layout=layout):
        deadline = time.monotonic() + _REMOVE_RETRY_SECONDS
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                logger.warning("cannot remove cgroup %s: %s", path, exc)
                gone = False
                break
    return gone


def cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as ``{controller: path}`` (v2's entry under ``""``)."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out
