"""The host's disk reserve: new work (create, start, snapshot, clone, upload) is refused
with 507 before the data directory's filesystem is full, so running VMs, the database and
the console logs keep the room they need. One check, called by the services."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings

from sandbox_site.errors import ApplicationError


def _paths() -> list[Path]:
    return [Path(settings.DATA_DIR), Path(settings.SANDBOX_RUNTIME_DIR), Path(settings.SANDBOX_SNAPSHOT_DIR)]


def disk_free(path: Path) -> tuple[int, int]:
    """``(free bytes for unprivileged use, total bytes)`` of the filesystem holding ``path``
    (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _reserve_bytes(total: int) -> int:
    return max(settings.SANDBOX_DISK_RESERVE_BYTES, total * settings.SANDBOX_DISK_RESERVE_PERCENT // 100)


def disk_room_gib() -> float:
    """The smallest free space above the reserve (GiB, negative when below it) of the data,
    runtime and snapshot filesystems: what this host's heartbeat reports to placement."""
    rooms = []
    for path in _paths():
        free, total = disk_free(path)
        rooms.append((free - _reserve_bytes(total)) / 2**30)
    return round(min(rooms), 2)


def require_disk_space(*, action: str) -> None:
    """Raise 507 ``insufficient_storage`` when a filesystem of the data, runtime or snapshot
    directory has less free than the reserve: SANDBOX_DISK_RESERVE_BYTES or
    SANDBOX_DISK_RESERVE_PERCENT of its size, whichever is larger."""
    seen: set[int] = set()
    for path in _paths():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        device = os.stat(probe).st_dev
        if device in seen:
            continue
        seen.add(device)
        free, total = disk_free(probe)
        reserve = _reserve_bytes(total)
        if free < reserve:
            raise ApplicationError(
                f"The host is short of disk space ({free >> 20} MiB free under {path}, "
                f"{reserve >> 20} MiB are kept in reserve); cannot {action} now.",
                code="insufficient_storage",
                status_code=507,
                details={"free_bytes": free, "reserve_bytes": reserve, "path": str(path)},
            )
